"""The function the service's process pool runs: announces its pid, then runs the extract.

The pid lets the service tell which run a dead worker held (SPEC: a worker that
dies fails the runs it held; the others get the pool's message).
"""

from __future__ import annotations

import os
from typing import Any

from executor.worker import run_extract


def run_in_worker(job: dict[str, Any], queue: Any, cancelled: Any) -> dict[str, Any]:
    queue.put(("started", job["run_id"], {"pid": os.getpid()}))
    return run_extract(job, queue, cancelled)
