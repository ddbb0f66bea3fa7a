"""The pool's worker processes as processes: stopping them, and saying how they ended.

A pool's workers are stopped with SIGTERM; one that does not end (frozen by
SIGSTOP, the signal pending) is SIGKILLed, or it would hold the pool's join,
and outlive the service, for good.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing.connection
import signal
import time
from multiprocessing.process import BaseProcess


def signal_name(exitcode: int | None) -> str:
    if exitcode is None or exitcode >= 0:
        return f"exit code {exitcode}"
    with contextlib.suppress(ValueError):
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"killed by signal {-exitcode}"


def terminate(pool: concurrent.futures.ProcessPoolExecutor, processes: list[BaseProcess]) -> None:
    """Stop a pool and its worker processes (SIGTERM, then ``kill_frozen``)."""
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    kill_frozen(processes)


def kill_frozen(processes: list[BaseProcess], within: float = 5.0) -> list[int]:
    """Wait ``within`` seconds for processes sent SIGTERM to end, then SIGKILL the rest (frozen:
    the signal stays pending); returns their pids. Waits on their sentinels only, so their exit
    codes are left for the pool's own join to read."""
    waiting = {process.sentinel: process for process in processes}
    deadline = time.monotonic() + within
    while waiting and (left := deadline - time.monotonic()) > 0:
        for sentinel in multiprocessing.connection.wait(list(waiting), left):
            del waiting[sentinel]
    for process in waiting.values():
        with contextlib.suppress(Exception):
            process.kill()
    return [process.pid for process in waiting.values() if process.pid is not None]
