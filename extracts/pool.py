"""The worker processes: a ``ProcessPoolExecutor``, its message queue, and its replacement.

::

    dispatcher: while a worker is free, Runs.claim() ─► pool.submit(run_in_worker, job)
    worker ─► Manager queue: started, progress…, artifact…, result (executor.messages)
    reader thread ─► consumer task: each message applied in order through Runs

The consumer is the only writer of a run's rows while it runs. A worker that
dies breaks the stdlib pool: the pool is replaced, and the runs it held fail
with a message that tells the culprit (killed) from the innocent (stopped by
the pool). A worker silent for a lease (frozen, hung) is killed to that end
(``_watch``); a dead Manager is replaced with the pool (``_on_lost``). A
graceful stop applies every message the workers already sent before
requeueing what is still running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.managers import SyncManager
from multiprocessing.process import BaseProcess
from typing import Any

from executor.entry import forkserver_preload, manager_initializer, worker_initializer
from executor.messages import (
    Artifact,
    Broken,
    Escaped,
    Job,
    Message,
    Progress,
    Result,
    RunStatus,
    Started,
    failure,
)
from extracts.processes import kill_frozen, signal_name, terminate
from extracts.runs import Runs
from extracts.schedule import Failures
from extracts.state import new_id
from extracts.storage import Storage

log = logging.getLogger("extracts.pool")

WATCH_EVERY_S = 1.0  # how often the watchdog looks for silent workers
SILENCE_FLOOR_S = 5.0  # a worker speaks at least once a second (executor.worker._HEARTBEAT)
DRAIN_TIMEOUT_S = 20.0  # past the state file's busy timeout: one locked write is waited out
CHILD_MODULES = ["executor.entry"]  # what the pool's children run: their initializers and the job


class WorkerPool:
    """Runs claimed runs on ``workers`` processes and applies what the workers report."""

    def __init__(
        self,
        runs: Runs,
        storage: Storage,
        workers: int,
        poll: float | None = None,
    ) -> None:
        self.runs, self.storage, self.workers = runs, storage, workers
        self.poll = poll  # with a shared state: look for runs other instances queued this often
        self.retry_delay = 1.0  # seconds before writing again to a locked state file
        self._context = multiprocessing.get_context("forkserver")
        self._manager: SyncManager | None = None
        self._queue: Any = None
        self._cancelled: Any = None
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._generation = 0
        self._processes: dict[int, dict[int, BaseProcess]] = {}  # generation -> pid -> worker
        self._inflight: dict[str, int] = {}  # run id -> pool generation
        self._pids: dict[str, int] = {}  # run id -> worker pid ("started" message)
        self._jobs: dict[str, Job] = {}
        self._heard: dict[str, float] = {}  # run id -> when its worker's last message arrived
        self._silenced: dict[str, float] = {}  # run id -> seconds of silence it was killed after
        self._watchdog: asyncio.Task[None] | None = None
        self._orphans: list[str] | None = None  # the runs of a dead Manager's workers, still to end
        self._stopping = False
        self.state_answered = True  # False: the stop found the state busy (``stop``)
        self._consumer: asyncio.Task[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._messages: asyncio.Queue[Message] = asyncio.Queue()
        self._reader: threading.Thread | None = None
        self._drained = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await asyncio.to_thread(self._start_processes)
        self._start_reader(asyncio.get_running_loop())
        self._consumer = asyncio.create_task(self._consume())
        self._dispatcher = asyncio.create_task(self._dispatch())
        self._watchdog = asyncio.create_task(self._watch())
        self.runs.queued.set()

    def _start_processes(self) -> None:
        # Read when the forkserver starts, with this process's first pool.
        self._context.set_forkserver_preload(forkserver_preload(CHILD_MODULES))
        self._start_channel()
        self._new_pool()

    def _start_channel(self) -> None:
        """The Manager process, and the message queue and cancel flags it serves."""
        self._manager = SyncManager(ctx=self._context)
        self._manager.start(initializer=manager_initializer, initargs=(os.getpid(),))
        self._queue = self._manager.Queue()
        self._cancelled = self._manager.dict()

    def _start_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        self._reader = threading.Thread(
            target=self._read_queue, args=(loop,), daemon=True, name="extracts-progress-reader"
        )
        self._reader.start()

    def _new_pool(self, start_workers: bool = True) -> None:
        self._generation += 1
        self._processes[self._generation] = {}
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=self._context,
            initializer=worker_initializer,
            initargs=(os.getpid(), self._queue, self._cancelled),
        )
        if start_workers:
            self._start_workers()

    def _start_workers(self) -> None:
        """Start every worker now: the pool's thread watches the processes it knew when it went
        to wait, and submit() wakes it before spawning one, so a worker spawned on demand could
        die unnoticed until the watchdog's lease. Not while a broken pool's workers are joined:
        a process start polls every child, and two threads reading one exit status make it 255."""
        with contextlib.suppress(RuntimeError, BrokenProcessPool):  # stopped, or broken already
            for _ in range(self.workers):
                self._pool.submit(os.getpid)
        self._note_workers()

    def _note_workers(self) -> None:
        """Keep the worker processes the pool started (read after a break: who died, and how).

        Read from the pool itself (its ``_processes``): ``multiprocessing.active_children()``
        polls every child, a broken pool's dying workers too (see ``_start_workers``)."""
        self._processes[self._generation].update(self._pool._processes)

    async def stop(self) -> None:
        """Graceful stop: active runs go back to 'queued' and run again at the next start.

        Nothing a worker finished is lost: the workers are stopped first, then
        every message they had already sent (artifacts, results) is applied, and
        only the runs still 'running' after that are requeued, each one's status
        change won before its files go (SPEC: Snapshot, safety and faults).
        """
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        if self._dispatcher is not None:
            # Not cancelled: a claim in progress completes, so its run is in _inflight
            # (or still 'queued'); the loop ends at its next turn.
            self.runs.queued.set()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        await asyncio.to_thread(self._kill_pool)
        await self._drain()
        # Runs whose result never came (cancelled meanwhile, their worker killed): what was not
        # recorded goes. Not a requeued run's files: another instance may have claimed it already.
        requeued = await self.runs.put_back(set(self._inflight))
        self.state_answered = requeued is not None
        if requeued:
            log.info(
                "%d active run(s) put back in the queue: they run again at the next start", len(requeued)
            )
        await asyncio.to_thread(self._stop_manager)

    async def _drain(self) -> None:
        """Apply every message already on the queue, then stop the consumer."""
        if self._consumer is None:
            return
        self._drained.clear()
        try:
            await asyncio.to_thread(self._queue.put, ("drained", None, None))
            await asyncio.wait_for(self._drained.wait(), DRAIN_TIMEOUT_S)
        except Exception:  # noqa: BLE001 — the Manager is gone, or the state file stayed locked
            log.warning("could not apply every message of the stopped runs; they are requeued")
        self._consumer.cancel()
        await asyncio.gather(self._consumer, return_exceptions=True)

    def _kill_pool(self) -> None:
        if self._pool is not None:
            terminate(self._pool, list(self._processes.get(self._generation, {}).values()))

    def _stop_manager(self) -> None:
        if self._queue is not None:
            with contextlib.suppress(Exception):
                self._queue.put(("stop", None, None))
        if self._reader is not None:
            self._reader.join(5)
        if self._manager is not None:
            with contextlib.suppress(Exception):
                self._manager.shutdown()

    # ------------------------------------------------------------ what the handlers ask

    def holds(self, run_id: str) -> bool:
        """Whether a worker still works on the run (a cancelled one stops within 2 seconds)."""
        return run_id in self._inflight

    async def cancel(self, run_id: str) -> None:
        """Tell the run's worker, if it has one, to stop (it polls every 0.2 s)."""
        if run_id in self._inflight:
            try:
                await asyncio.to_thread(self._cancelled.__setitem__, run_id, True)
            except (EOFError, OSError):  # the Manager died: its workers are being stopped anyway
                log.warning("could not tell the worker of %s to stop: the Manager is gone", run_id)

    # ------------------------------------------------------------ dispatch

    async def _dispatch(self) -> None:
        """Start queued runs while workers are free; ends once the service stops.

        It wakes when a run is queued or a worker frees up (``runs.queued``), and
        when the earliest waiting retry may start.
        """
        failures = Failures(log, "starting queued runs")
        while not self._stopping:
            # The timeout first: cancelled while it is read, no queued.wait() coroutine is left
            # never awaited (a RuntimeWarning at garbage collection).
            timeout = await self._until_next_start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.runs.queued.wait(), timeout)
            self.runs.queued.clear()
            try:
                while len(self._inflight) < self.workers and not self._stopping:
                    if not await self._claim_and_submit():
                        break
            except Exception as exc:  # noqa: BLE001 — e.g. the state file locked past the busy timeout
                failures.failed(exc)
                await asyncio.sleep(self.retry_delay)
                self.runs.queued.set()
            else:
                failures.succeeded()

    async def _until_next_start(self) -> float | None:
        """Seconds until the earliest waiting retry may start (or the next poll); None: no reason."""
        try:
            at = await self.runs.next_start()
        except Exception:  # noqa: BLE001 — e.g. the state file locked: look again in a moment
            return self.retry_delay
        wait = None if at is None else max((at - self.runs.clock()).total_seconds(), 0) + 0.01
        return self.poll if wait is None else min(wait, self.poll or wait)

    async def _claim_and_submit(self) -> bool:
        job = await self.runs.claim()
        if job is None:
            return False
        run_id = job["run_id"]
        log.info("run %s claimed by %s", run_id, self.runs.instance_id)
        self._jobs[run_id] = job
        self._heard[run_id] = time.monotonic()
        self._inflight[run_id] = self._generation
        loop = asyncio.get_running_loop()
        from executor.entry import run_in_worker

        try:
            future = self._pool.submit(run_in_worker, job)
        except (BrokenProcessPool, RuntimeError) as exc:
            log.warning("pool refused run %s (%s); replacing the pool", run_id, exc)
            self._forget(run_id)
            await self.runs.requeue([run_id])
            await self._replace_pool(self._generation)
            return False
        self._note_workers()

        def done(f: concurrent.futures.Future[None]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(self._future_done, run_id, job["lease"], f)

        future.add_done_callback(done)
        return True

    def _future_done(self, run_id: str, lease: str, future: concurrent.futures.Future[None]) -> None:
        """The worker put its result on the queue itself; only an escaped exception is handled here:
        behind the worker's messages, applied only if the run is still that attempt (its lease),
        not one claimed again meanwhile (after a dead Manager put it back in the queue)."""
        if self._stopping or future.cancelled() or future.exception() is None:
            return
        exc = future.exception()
        if isinstance(exc, BrokenProcessPool):
            generation = self._inflight.get(run_id)
            if generation == self._generation:
                asyncio.create_task(self._replace_pool(generation))
            return
        error = " ".join(f"the worker could not run this extract: {exc}".split())
        result = failure(error, type(exc).__name__, retryable=False, message=str(exc))
        # Behind everything the worker put on the queue.
        asyncio.create_task(self._post(("escaped", run_id, {"lease": lease, "result": result})))

    async def _replace_pool(self, generation: int) -> None:
        """A worker died: build a new pool, then fail (or requeue) the runs the old one held."""
        if generation != self._generation:
            return
        old_pool, old_processes = self._pool, self._processes[generation]
        self._new_pool(start_workers=False)  # on demand until the old workers are joined
        new_pool = self._pool

        def reap() -> tuple[dict[int, int | None], list[int]]:
            killed = kill_frozen(list(old_processes.values()))  # a frozen one held the join for good
            old_pool.shutdown(wait=True, cancel_futures=True)
            return {pid: process.exitcode for pid, process in old_processes.items()}, killed

        exitcodes, killed = await asyncio.to_thread(reap)
        if self._pool is new_pool and not self._stopping:
            self._start_workers()
        del self._processes[generation]
        log.warning("worker pool broken (exit codes %s); replaced", exitcodes)
        broken: Broken = {"generation": generation, "exitcodes": exitcodes, "killed": killed}
        await self._post(("broken", None, broken))

    async def _post(self, message: Message) -> None:
        """Put a message of the service's own behind the workers' (a dead Manager: ``_on_lost``)."""
        try:
            await asyncio.to_thread(self._queue.put, message)
        except (EOFError, OSError):
            log.warning("could not queue a %s message: the Manager is gone", message[0])

    # ------------------------------------------------------------ the consumer: applies messages in order

    def _read_queue(self, loop: asyncio.AbstractEventLoop) -> None:
        queue = self._queue
        while True:
            try:
                message = queue.get()
            except (EOFError, OSError):  # the Manager died: unless the service stops, say so
                if not self._stopping:
                    loop.call_soon_threadsafe(self._messages.put_nowait, ("lost", None, None))
                return
            if message[0] == "stop":
                return
            kind, run_id = message[0], message[1]
            # When it arrived, however long the consumer takes to apply it; after its result, a
            # run's worker is no longer judged (it may be idle, or at another run already).
            if kind in ("result", "escaped"):
                self._heard.pop(run_id, None)  # type: ignore[arg-type]
            elif run_id in self._inflight:
                self._heard[run_id] = time.monotonic()
            loop.call_soon_threadsafe(self._messages.put_nowait, message)

    async def _consume(self) -> None:
        handlers: dict[str, Callable[[Any, Any], Awaitable[None]]] = {
            "started": self._on_started,
            "progress": self._on_progress,
            "artifact": self._on_artifact,
            "result": self._on_result,
            "broken": self._on_broken,
            "lost": self._on_lost,
            "escaped": self._on_escaped,
        }
        while True:
            kind, run_id, payload = await self._messages.get()
            if kind == "drained":
                self._drained.set()
                continue
            await self._apply(handlers[kind], kind, run_id, payload)

    async def _apply(
        self, handler: Callable[[Any, Any], Awaitable[None]], kind: str, run_id: str | None, payload: Any
    ) -> None:
        """Apply one message; a state file locked by another process is waited out, not skipped.

        Skipping would lose an artifact row, or leave the run 'running' forever when
        the lost message was its result. Every handler can be applied again. While
        the service stops, ``_drain`` bounds the waiting.
        """
        while True:
            try:
                await handler(run_id, payload)
                return
            except Exception as exc:  # noqa: BLE001 — one bad message must not stop every run
                if not self.runs.dialect.busy(exc):
                    log.exception("could not apply %s message for %s", kind, run_id)
                    return
                log.warning("state busy (%s); applying the %s message for %s again", exc, kind, run_id)
                await asyncio.sleep(self.retry_delay)

    async def _on_started(self, run_id: str, started: Started) -> None:
        self._pids[run_id] = started["pid"]

    async def _on_progress(self, run_id: str, progress: Progress) -> None:
        job = self._jobs.get(run_id)
        if job is not None:
            await self.runs.record_progress(run_id, progress, job["lease"])

    async def _on_artifact(self, run_id: str, artifact: Artifact) -> None:
        job = self._jobs.get(run_id)
        if job is None:
            return
        # One id per message, kept in it: applied again after a locked write, it inserts nothing more.
        artifact_id = artifact.setdefault("id", new_id("artifact"))  # type: ignore[typeddict-item]
        if not await self.runs.record_artifact(job, artifact, artifact_id):
            log.error("run %s failed: a second file named %s", run_id, artifact["artifact_name"])
            await self.cancel(run_id)  # the worker stops; its result leaves the run failed

    async def _on_result(self, run_id: str, result: Result) -> None:
        job = self._jobs.get(run_id)
        if job is not None:
            try:
                ended = await self.runs.finish(run_id, result, job["lease"])
                # The worker writes nothing more. A run it completed has every file recorded; else
                # a file with no row (its worker died, a second file of one name, files written
                # after another instance took the run over) goes, unless a worker holds it again.
                completed = ended and result["status"] == RunStatus.COMPLETED
                leftovers = not completed and not await self.runs.held(run_id)
            except Exception as exc:
                if self.runs.dialect.busy(exc):
                    raise  # applied again (_apply)
                log.exception("could not end %s", run_id)
                self._let_go(run_id)
                return
            if leftovers:
                try:
                    await self.runs.remove_leftovers(run_id)
                except Exception:  # noqa: BLE001 — the run's ending stands; the files stay, logged
                    log.exception("could not remove the unrecorded files of %s", run_id)
        self._forget(run_id)  # last: a retry after a locked write must still find the run
        self.runs.queued.set()

    async def _on_escaped(self, run_id: str, escaped: Escaped) -> None:
        job = self._jobs.get(run_id)
        if job is not None and job["lease"] == escaped["lease"]:
            await self._on_result(run_id, escaped["result"])

    async def _on_broken(self, run_id: None, broken: Broken) -> None:
        """Fail the runs of a broken pool, naming the worker that died where the exit codes tell.

        The pool stops its other workers with SIGTERM (SIGKILL when frozen): a worker that
        died of anything else is the culprit. When every worker ended by SIGTERM, one of them
        was sent it from outside: the only worker is the culprit; among several, none can be
        told apart.
        """
        exitcodes, killed = broken["exitcodes"], set(broken["killed"])
        stopped = {pid for pid, code in exitcodes.items() if code == -signal.SIGTERM or pid in killed}
        outside = len(stopped) == len(exitcodes)  # no other death: the SIGTERM came from outside
        held = [r for r, g in self._inflight.items() if g == broken["generation"]]
        for run_id in held:
            pid = self._pids.get(run_id)
            code = exitcodes.get(pid) if pid is not None else None
            if run_id in self._silenced:
                error = (
                    f"the worker process running this extract stopped answering for "
                    f"{self._silenced[run_id]:.0f} s (frozen or hung) and was killed; the pool was "
                    "restarted: run it again"
                )
            elif code is not None and (pid not in stopped or outside and len(stopped) == 1):
                error = (
                    f"the worker process running this extract died ({signal_name(code)}), "
                    "possibly out of memory; the pool was restarted: run it again"
                )
            elif pid in stopped and outside:
                error = (
                    "the worker process running this extract, or another run's, was killed by "
                    "SIGTERM (which one cannot be told); the pool was restarted: run it again"
                )
            else:
                error = (
                    "stopped because another run's worker process died and the pool was "
                    "restarted: run it again"
                )
            exit_codes = {str(k): v for k, v in exitcodes.items()}
            result = failure(
                error, "BrokenProcessPool", retryable=True, worker_pid=pid, exit_codes=exit_codes
            )
            # Ending it also removes the dead worker's half-written and unrecorded files; what
            # it recorded stays (SPEC: faults). Applied again after a busy state, the runs
            # already ended are no longer held.
            await self._end_orphan(run_id, result)
        self.runs.queued.set()

    async def _on_lost(self, run_id: None, lost: None) -> None:
        """The Manager process died (killed): its queue and cancel flags went with it, and no
        worker can report any more. A new Manager and a new pool take over; the old workers
        are stopped, and the runs they held fail, retryable (what they wrote without a record
        goes), or go back to the queue when their worker had not started.

        Applied again after a busy state (``_apply``), it restarts nothing twice: the runs
        still to end are kept in ``_orphans`` until each has ended.
        """
        if self._orphans is None:
            log.error("the workers' message queue (the Manager process) died; restarting the workers")
            generation = self._generation
            old_pool, old_processes = self._pool, list(self._processes.get(generation, {}).values())
            while True:  # without a channel no run can work: keep trying
                try:
                    await asyncio.to_thread(self._start_channel)
                    break
                except Exception:  # noqa: BLE001 — e.g. no memory for a new process just now
                    log.exception("could not start a new Manager; trying again in a second")
                    await asyncio.sleep(1.0)
            # No await since the claim of the last run submitted to the old pool; its workers
            # started once the old ones are gone (``_start_workers``).
            self._new_pool(start_workers=False)
            self._orphans = list(self._inflight)
            self._start_reader(asyncio.get_running_loop())
            if old_pool is not None:
                await asyncio.to_thread(terminate, old_pool, old_processes)
            if not self._stopping:
                self._start_workers()
            self._processes.pop(generation, None)
        error = (
            "stopped because the service's channel to its worker processes died (its Manager "
            "process was killed); the workers were restarted: run it again"
        )
        while self._orphans:  # applied again after a busy state: from the run it stopped at
            await self._end_orphan(self._orphans[0], failure(error, "ManagerLost", retryable=True))
            self._orphans.pop(0)
        self._orphans = None
        self.runs.queued.set()

    async def _end_orphan(self, run_id: str, result: Result) -> None:
        """End a run whose worker can report no more: as ``result``, or back in the queue when
        its worker never started (a state refusing that too: ``_let_go``)."""
        if run_id in self._pids:
            await self._on_result(run_id, result)
            return
        try:
            await self.runs.requeue([run_id])
        except Exception as exc:
            if self.runs.dialect.busy(exc):
                raise
            log.exception("could not put %s back in the queue", run_id)
            self._let_go(run_id)
            return
        self._forget(run_id)

    async def _watch(self) -> None:
        """Kill a worker not heard from for a lease (at least ``SILENCE_FLOOR_S``): frozen
        (SIGSTOP) or hung with the GIL held. Its instance would renew the run's lease for as
        long, and the run would stay 'running'; killed, it breaks the pool, and ``_on_broken``
        fails its run (and the pool's others), retryable, as for any dead worker.

        A run whose worker never said it started went to a worker frozen while idle: which
        one took the job cannot be told, so every worker holding no started run is killed,
        and the run goes back to the queue (``_end_orphan``)."""
        last = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(WATCH_EVERY_S)
            now = time.monotonic()
            if now - last > 3 * WATCH_EVERY_S:  # this process itself was stopped: nothing to judge by
                self._heard.update(dict.fromkeys(self._heard, now))
            last = now
            limit = max(self.runs.lease.total_seconds(), SILENCE_FLOOR_S)
            self._note_workers()
            workers = self._processes.get(self._generation, {})
            for run_id, generation in list(self._inflight.items()):
                pid, heard = self._pids.get(run_id), self._heard.get(run_id)
                if generation != self._generation or pid is not None and pid not in workers or heard is None:
                    continue
                if run_id not in self._silenced and now - heard > limit:
                    self._silenced[run_id] = now - heard
                    started = set(self._pids.values())
                    silent = [pid] if pid is not None else [p for p in workers if p not in started]
                    log.error(
                        "run %s: its worker (pid %s) said nothing for %.0f s; killed",
                        run_id,
                        ", ".join(map(str, silent)),
                        now - heard,
                    )
                    for target in silent:
                        with contextlib.suppress(OSError):
                            os.kill(target, signal.SIGKILL)

    def _let_go(self, run_id: str) -> None:
        """A run no worker holds, whose ending the state refused (not busy): held no more, its
        lease is no longer renewed, and the reaper fails it as interrupted (and retries it)
        once it lapses, rather than it staying 'running' with a slot held."""
        log.error("run %s let go: the reaper ends it once its lease lapses", run_id)
        self._forget(run_id)
        self.runs.queued.set()

    def _forget(self, run_id: str) -> None:
        self._inflight.pop(run_id, None)
        self._pids.pop(run_id, None)
        self._jobs.pop(run_id, None)
        self._heard.pop(run_id, None)
        self._silenced.pop(run_id, None)
        if self._cancelled is not None:
            with contextlib.suppress(Exception):
                self._cancelled.pop(run_id, None)

    def active(self) -> set[str]:
        """The runs workers hold now (the retention sweep leaves their directories alone)."""
        return set(self._inflight)
