"""One run of an extract, in a worker process: ``run_extract(job, queue, cancelled)``.

    open the source → one read transaction: schemas, filters, counts, describe.yaml,
    data files → manifest.json → the result (plain data) for the service

Messages go to the service through ``queue`` (their shapes: ``executor.messages``):
``("progress", run_id, {...})`` throttled by a ``Monitor``, and
``("artifact", run_id, {...})`` as soon as each file is in place.
The monitor's thread polls ``cancelled`` every 0.2 s; once the run is
cancelled it interrupts the source's running statement, and the export stops
at the next batch. A run never raises: every error becomes a ``failed``
result whose ``error`` is one line a user can act on; temporary files are
removed, completed files stay (they were already reported).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from executor.credentials import blank, source_secrets
from executor.failures import is_transient
from executor.filters import check_where
from executor.formats import dump_yaml
from executor.messages import Artifact, Job, Phase, Result, RunStatus, progress_detail, result
from executor.naming import download_base_name
from executor.sources import Source, SourceError, UnknownSchema, open_source
from executor.writers import ArchiveOutput, FileOutput, RunPlace
from extracts.storage import StorageError, open_storage, storage_error

BATCH_ROWS = 10_000
_SEND_EVERY = 0.2  # seconds between progress messages (a Manager queue put is an RPC)
_HEARTBEAT = 0.8  # at least one message a second while the run works (its own thread)
# A cancel is seen within this (a Manager dict get is an RPC of ~0.1 ms): the server sources
# read a million rows a second, so a cancel must not wait for the end of a table.
_POLL_CANCEL = 0.05


class Cancelled(Exception):
    """The run was cancelled: it stops, keeping the files already written."""


class RunError(Exception):
    """A run failure whose message is already the one line shown to the user."""


# ---------------------------------------------------------------- progress and cancellation


class Monitor:
    """Progress of one run, sent throttled, plus the thread that watches for cancellation.

    ``progress`` never goes down: 0 until describe.yaml is written, 25 after it
    (when included), then up to 99 by records exported against records_total.
    """

    def __init__(self, run_id: str, queue: Any, cancelled: Any) -> None:
        self.run_id, self._queue, self._cancelled = run_id, queue, cancelled
        self.detail = progress_detail(Phase.QUEUED)
        self.progress = 0
        self._base = 0
        self._lock = threading.Lock()
        self._last_sent = 0.0
        self._stop = threading.Event()
        self.cancel_requested = threading.Event()
        self.on_cancel: Callable[[], None] | None = None
        self._threads = [
            threading.Thread(target=self._watch, name=f"monitor {run_id}", daemon=True),
            threading.Thread(target=self._beat, name=f"heartbeat {run_id}", daemon=True),
        ]

    def __enter__(self) -> Monitor:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def phase(self, phase: Phase, *, described: bool = False, **fields: Any) -> None:
        """Enter ``phase`` and say so at once; ``described``: describe.yaml is written (25)."""
        with self._lock:
            if described:
                self._base = 25
            self.detail.update(fields, phase=phase.value)  # type: ignore[typeddict-item]
            self._recompute()
        self._send()

    def advance(self, records: int) -> None:
        """Count exported records; raises Cancelled once the run is cancelled."""
        if self.cancel_requested.is_set():
            raise Cancelled
        with self._lock:
            self.detail["records_exported"] += records
            self._recompute()
        if time.monotonic() - self._last_sent >= _SEND_EVERY:
            self._send()

    def check(self) -> None:
        if self.cancel_requested.is_set():
            raise Cancelled

    def plan(self, schemas_total: int, records_total: int) -> None:
        with self._lock:
            self.detail.update(schemas_total=schemas_total, records_total=records_total)

    def schema_done(self) -> None:
        with self._lock:
            self.detail["schemas_completed"] += 1

    def artifact(self, item: Artifact) -> None:
        """An artifact is complete (renamed into place): tell the service now."""
        with self._lock:
            self._queue.put(("artifact", self.run_id, item))

    def _recompute(self) -> None:
        total, done = self.detail["records_total"], self.detail["records_exported"]
        progress = self._base + (99 - self._base) * done // total if total else self._base
        self.progress = max(self.progress, min(progress, 99))

    def _send(self) -> None:
        with self._lock:
            message = (
                "progress",
                self.run_id,
                {"progress": self.progress, "progress_detail": dict(self.detail)},
            )
            self._queue.put(message)  # under the lock: messages leave in order
            self._last_sent = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(_POLL_CANCEL):
            if not self.cancel_requested.is_set():
                try:
                    asked = self._cancelled.get(self.run_id)
                except Exception:  # noqa: BLE001 — the service went away; the run finishes alone
                    return
                if asked:
                    self.cancel_requested.set()
            if self.cancel_requested.is_set() and self.on_cancel is not None:
                with contextlib.suppress(Exception):  # e.g. a helper connection closed meanwhile
                    self.on_cancel()  # again each time: a call between two statements is lost

    def _beat(self) -> None:
        """At least one message a second, whatever the run's threads are doing (stopping a
        source's statement can take seconds): the service kills a worker it has not heard
        from for a lease (``extracts.pool``)."""
        while not self._stop.wait(_POLL_CANCEL):
            if time.monotonic() - self._last_sent >= _HEARTBEAT:
                try:
                    self._send()
                except Exception:  # noqa: BLE001 — the service went away; the run finishes alone
                    return


# ---------------------------------------------------------------- the export


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Export:
    """The steps of one run; the counts it reports whatever the outcome."""

    def __init__(self, job: Job, monitor: Monitor) -> None:
        self.job, self.config, self.monitor = job, job["config"], monitor
        self.include = self.config.get("include") or ["describe", "data"]
        self.records_exported = 0
        self.schemas_exported = 0
        storage = open_storage(job["storage"], job.get("storage_endpoint"))
        self.place = RunPlace(storage, job["run_id"], int(job["min_free_bytes"]))

    def report(self, item: Artifact) -> None:
        if item["artifact_type"].startswith("data-") or item["artifact_type"] == "archive":
            self.records_exported += item["records"] or 0
        self.monitor.artifact(item)

    def run(self) -> None:
        self.place.storage.begin_run(self.job["run_id"])
        self.place.check()
        with open_source(self.job["source"]) as source:
            self.monitor.on_cancel = source.interrupt
            location = source.location()
            output = self._output(source)
            try:
                with source.snapshot():
                    names = self._read(source, output)
                self.monitor.check()
                self.monitor.phase(Phase.WRITING_MANIFEST, current_schema=None)
                output.finish(lambda entries: self._manifest(names, location, entries))
            except BaseException:
                output.abort()
                raise

    def _output(self, source: Source) -> FileOutput | ArchiveOutput:
        if self.config["format"] == "archive":
            base = download_base_name(self.job["extract_name"], self.job["created_at"], self.job["run_id"])
            return ArchiveOutput(self.place, self.config, self.report, base)
        return FileOutput(self.place, self.config, self.report, source.json_is_yaml_safe)

    def _read(self, source: Source, output: FileOutput | ArchiveOutput) -> list[str]:
        """Everything read from the source, inside its one snapshot."""
        self.monitor.phase(Phase.EXPORTING_DESCRIBE if "describe" in self.include else Phase.EXPORTING_DATA)
        names = self._schema_names(source)
        wheres = self._wheres(source, names)
        if "data" in self.include:
            totals = []
            for name in names:
                self.monitor.check()
                totals.append(source.count(name, wheres[name]))
            self.monitor.plan(len(names), sum(totals))
        if "describe" in self.include:
            output.describe(dump_yaml(source.describe(names)))
            self.monitor.phase(Phase.EXPORTED_DESCRIBE, described=True)
        if "data" in self.include:
            self.monitor.phase(Phase.EXPORTING_DATA)
            for name in names:
                self._export_schema(source, output, name, wheres[name])
        return names

    def _schema_names(self, source: Source) -> list[str]:
        names = self.config.get("schemas")
        if not names:  # every user table; views only when named
            return source.tables()
        for name in names:
            source.columns(name)  # raises UnknownSchema
        return list(names)

    def _wheres(self, source: Source, names: list[str]) -> dict[str, dict[str, Any] | None]:
        filters = self.config.get("filter") or {}
        unexported = sorted(set(filters) - set(names))
        if unexported:  # schemas null, and the table was dropped or became a view since the save
            raise RunError(
                f"The filter filter.{unexported[0]} names a schema this run does not export (no such "
                "table; a view is exported only when schemas names it); update the extract's filter"
            )
        wheres = {name: (filters.get(name) or {}).get("where") for name in names}
        for name, where in wheres.items():
            problems = check_where(
                where,
                source.columns(name),
                field=f"filter.{name}.where",
                text_holds_nul=source.text_holds_nul,
            )
            if problems:
                field, message = problems[0]
                raise RunError(
                    f"The filter {field} no longer fits the source ({message}); update the extract's filter"
                )
        return wheres

    def _export_schema(
        self, source: Source, output: FileOutput | ArchiveOutput, name: str, where: dict[str, Any] | None
    ) -> None:
        self.monitor.phase(Phase.EXPORTING_DATA, current_schema=name)
        writer = output.schema(name)
        since_trim = 0
        try:
            for chunk, records in source.json_lines(name, where, BATCH_ROWS):
                self.monitor.advance(records)
                writer.write(chunk, records)
                since_trim += len(chunk)
                if since_trim >= _TRIM_EVERY_BYTES:
                    _trim_heap()
                    since_trim = 0
            writer.close()
        except BaseException:
            writer.abort()
            raise
        self.schemas_exported += 1
        self.monitor.schema_done()

    def _manifest(self, names: list[str], location: dict[str, Any], entries: list[dict[str, Any]]) -> bytes:
        job = self.job
        manifest = {
            "version": "1.0",
            "generated_at": _utc_now(),
            "run_id": job["run_id"],
            "extract_id": job["extract_id"],
            "extract_name": job["extract_name"],
            "format": self.config["format"],
            "include": self.include,
            "schemas": names,
            "source": location,
            "artifacts": entries,
        }
        return orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n"

    def remove_partial(self) -> None:
        self.place.storage.remove_partial(self.job["run_id"])


# ---------------------------------------------------------------- errors


def error_message(exc: BaseException, job: Job) -> str:
    """One line a user can act on."""
    if isinstance(exc, UnknownSchema):
        where = (  # a command-line export has no extract (extracts.export)
            f"the extract's schemas (PUT /api/data/extracts/{job['extract_id']})"
            if job["extract_id"] is not None
            else "--schemas"
        )
        message = f"Schema '{exc.name}' no longer exists in the source; remove it from {where} or restore it"
    elif isinstance(exc, (SourceError, StorageError, RunError)):
        message = str(exc)
    elif isinstance(exc, OSError) and exc.filename is not None:
        message = str(storage_error(exc, Path(exc.filename)))
    else:
        message = f"{type(exc).__name__}: {exc}"
    return " ".join(message.split())


def _libc_function(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_function("malloc_trim")
_TRIM_EVERY_BYTES = 16 << 20


def _tune_malloc() -> None:
    """Keep freed memory for reuse instead of returning it to the OS block by block.

    Measured: without it the exporters took about one page fault per row (0.7× the time with it).
    glibc only; elsewhere nothing changes. Same values every time: idempotent.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_trim_threshold, 128 << 20)
    mallopt(m_top_pad, 16 << 20)
    mallopt(m_mmap_threshold, 32 << 20)


def _trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc only; 1–2 ms a call).

    Chunks are read in one thread and checked and written in others, so
    megabyte buffers are freed out of the order they were allocated in; the
    holes between them grew the worker by about 25 MiB over 10 million rows
    (bench part 3). Trimming every ``_TRIM_EVERY_BYTES`` of output keeps it
    flat, for about 0.3 s per 10 million rows.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def run_extract(job: Job, queue: Any, cancelled: Any) -> Result:
    """Run one extract (the process pool's entry point); returns the run's outcome as plain data."""
    _tune_malloc()
    monitor = Monitor(job["run_id"], queue, cancelled)
    export = Export(job, monitor)
    status, error, error_detail = RunStatus.COMPLETED, None, None
    with monitor:  # its heartbeat goes on through the clean-up (an object store's can take seconds)
        try:
            export.run()
        except Exception as exc:  # noqa: BLE001 — every run error becomes a failed result
            monitor.on_cancel = None  # the source reads no more: nothing left to interrupt
            with contextlib.suppress(Exception):  # best effort: the service sweeps what is left
                export.remove_partial()
            if monitor.cancel_requested.is_set():
                status = RunStatus.CANCELLED
            else:
                # Only strings leave this block: a kept exception would hold the run's frames
                # (and the service's queue proxy) in a reference cycle.
                # Blanked again here: a run record must never carry the source's secrets, whatever
                # raised (the sources blank their own messages; a traceback holds every chained one).
                hidden = source_secrets(job["source"])
                status, error = RunStatus.FAILED, blank(error_message(exc, job), hidden)
                error_detail = {
                    "type": type(exc).__name__,
                    "message": blank(str(exc), hidden),
                    "traceback": blank(traceback.format_exc(), hidden),
                    "retryable": is_transient(exc),
                }
    return result(
        status,
        error,
        error_detail,
        records_exported=export.records_exported,
        schemas_exported=export.schemas_exported,
        records_total=monitor.detail["records_total"],
    )
