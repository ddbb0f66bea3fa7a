"""What the service's pool children run: what the forkserver preloads, their initializers, the job.

The job announces its pid, runs the extract, and reports.

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

import importlib.machinery
import importlib.util
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from executor.sources.sqlitemem import turn_off_memory_statistics
from executor.worker import run_extract

_channel: tuple[Any, Any] | None = None  # (queue, cancelled) for every job of this process

# Workers run at a lower CPU priority than the service's event loop: on a busy host
# an export gives way to the API (status p99) and to the application beside it.
WORKER_NICENESS = 10


def forkserver_preload(modules: Iterable[str]) -> list[str]:
    """What the forkserver imports once: the Manager and every worker are forked from it ready.

    Without it each of them imported what it runs on its own, at start-up and again after
    every worker death. The forkserver never preloads ``__main__`` (CPython gh-126631, fixed
    in 3.14 and late 3.13 releases): each child runs the main script again, which is why
    ``extracts_app.py`` imports nothing heavy at its top. Python 3.11 also starts the
    forkserver without this process's ``sys.path`` (gh-117378): a package it would find in
    another place than this process did (a checkout run by path, not the installed one) is
    left to the children.
    """
    return ["__main__", *(name for name in modules if _found_alike(name.partition(".")[0]))]


def _found_alike(package: str) -> bool:
    """Whether a new interpreter started here imports ``package`` from the file this process does."""
    here = importlib.util.find_spec(package)
    # A new interpreter's sys.path: its working directory, then what every interpreter gets.
    path = [os.getcwd(), *sys.path[1:]]
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder:
            there = finder.find_spec(package, path)
        elif hasattr(finder, "find_spec"):
            there = finder.find_spec(package, None)
        else:
            continue
        if there is not None:
            return here is not None and here.origin == there.origin
    return False


def manager_initializer(service_pid: int) -> None:
    """The Manager process outlives a signal sent to the service's whole process group.

    It holds the messages workers already put; the service drains them when it
    stops (``WorkerPool.stop``) and shuts the Manager down itself. It still dies
    with the service after a ``kill -9``.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker_initializer(service_pid)


def worker_initializer(service_pid: int | None = None, queue: Any = None, cancelled: Any = None) -> None:
    """Workers leave SIGINT to the service, which stops them itself (runs go back to queued).

    Pool workers receive the progress queue and cancel flags here, once
    (``executor.entry.keep_channel`` says why not with every job).

    They also die with the service: after a ``kill -9`` of it, a worker would
    otherwise finish its export into a run that the next start marks failed, and
    the manager (which holds the forkserver open) would idle forever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if queue is not None:
        os.nice(max(0, WORKER_NICENESS - os.nice(0)))  # the Manager is not a worker: it keeps its niceness
        turn_off_memory_statistics()  # before the worker's first SQLite connection (its docstring)

        keep_channel(queue, cancelled)
    if service_pid is not None:
        threading.Thread(
            target=_exit_with, args=(service_pid,), daemon=True, name="extracts-exit-with-service"
        ).start()


def _exit_with(service_pid: int) -> None:
    try:
        pidfd = os.pidfd_open(service_pid)
    except (AttributeError, OSError):  # not Linux 5.3+: poll
        while True:
            time.sleep(0.5)
            try:
                os.kill(service_pid, 0)
            except ProcessLookupError:
                break
    else:
        select.select([pidfd], [], [])  # readable once the service has exited
    os._exit(1)


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
