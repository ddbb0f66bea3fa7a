"""The function the service's process pool runs: announces its pid, runs the extract, reports.

The pid lets the service tell which run a dead worker held (SPEC: a worker that
dies fails the runs it held; the others get the pool's message). The run's
result is the last message the worker puts on the queue, so the service applies
it after every progress and artifact message of the run, in one order; the
pool's future only carries an exception that escaped the run.

The service's progress queue and cancel flags (Manager proxies) reach each
worker process once, through the pool's initializer (``keep_channel``), not
with every job. Proxies unpickled per job share one connection per thread and
one set of referent ids: when a finished job's proxy was garbage collected
during a later job (a failed run's traceback keeps it in a reference cycle),
CPython closed that connection under the running job, which then failed with
"TypeError: 'NoneType' object cannot be interpreted as an integer".
"""

from __future__ import annotations

import os
from typing import Any

from executor.worker import run_extract

_channel: tuple[Any, Any] | None = None  # (queue, cancelled) for every job of this process


def keep_channel(queue: Any, cancelled: Any) -> None:
    """Pool initializer part: keep the service's queue and cancel flags for this process's life."""
    global _channel
    _channel = (queue, cancelled)


def run_in_worker(job: dict[str, Any], queue: Any = None, cancelled: Any = None) -> None:
    if queue is None:
        if _channel is None:
            raise RuntimeError("the pool's initializer did not call executor.entry.keep_channel")
        queue, cancelled = _channel
    queue.put(("started", job["run_id"], {"pid": os.getpid()}))
    queue.put(("result", job["run_id"], run_extract(job, queue, cancelled)))
