"""What the service and its worker processes tell each other: one typed shape per kind, built here.

::

    service ──Job──► pool.submit(run_in_worker, job)
    worker  ──("started",  run_id, Started)──►  service   first: the worker's pid
            ──("progress", run_id, Progress)──►           throttled, at least once a second
            ──("artifact", run_id, Artifact)──►           as soon as each file is in place
            ──("result",   run_id, Result)──►             last
    service ──("escaped",  run_id, Escaped)──►  itself    an exception the job let escape
            ──("broken",   None,   Broken)──►   itself    a dead worker broke the pool
            ──("lost",     None,   None)──►     itself    the Manager (this queue) died
            ──("drained",  None,   None)──►     itself    the stop's marker: all before it applied

Everything is plain data (dicts, strings, numbers), so it crosses process
boundaries through a Manager queue. The run statuses and progress phases are
named here once: the worker reports them, the service stores them (the CHECKs
in ``schema.sql`` mirror ``RunStatus``) and the OpenAPI document lists them.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal, TypedDict


class RunStatus(str, Enum):
    """A run's status (SPEC: Running); mirrored by the CHECK on extract_runs.status."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = (RunStatus.PENDING, RunStatus.QUEUED, RunStatus.RUNNING)
ENDED_STATUSES = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)


class Phase(str, Enum):
    """``progress_detail.phase``, in the order a run goes through them (SPEC: Run records)."""

    QUEUED = "queued"
    EXPORTING_DESCRIBE = "exporting_describe"
    EXPORTED_DESCRIBE = "exported_describe"
    EXPORTING_DATA = "exporting_data"
    WRITING_MANIFEST = "writing_manifest"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunConfig(TypedDict):
    """The options a run uses: copied from its extract into ``config_snapshot`` when queued."""

    format: str
    include: list[str]
    schemas: list[str] | None
    filter: dict[str, Any] | None
    compress: bool
    split_files: bool
    split_max_records: int
    retention_days: int


SNAPSHOT_FIELDS = tuple(RunConfig.__annotations__)


class Job(TypedDict):
    """One run, as the service hands it to a worker."""

    run_id: str
    extract_id: str | None  # None: a command-line export (extracts-app export), which has no extract
    extract_name: str
    source: str
    storage: str  # where the run's files go: --storage (extracts.storage.open_storage)
    storage_endpoint: str | None  # --storage-endpoint
    min_free_bytes: int
    created_at: str
    config: RunConfig
    lease: str  # the claim's fencing token: the service applies this run's messages only while it holds


class ProgressDetail(TypedDict):
    phase: str
    schemas_total: int
    schemas_completed: int
    current_schema: str | None
    records_exported: int
    records_total: int


def progress_detail(phase: Phase, **counts: Any) -> ProgressDetail:
    """The ``progress_detail`` of a run in ``phase``; counts not given are 0 (or None)."""
    detail: ProgressDetail = {
        "phase": phase.value,
        "schemas_total": 0,
        "schemas_completed": 0,
        "current_schema": None,
        "records_exported": 0,
        "records_total": 0,
    }
    detail.update(counts)  # type: ignore[typeddict-item]
    return detail


class Started(TypedDict):
    pid: int


class Progress(TypedDict):
    progress: int
    progress_detail: ProgressDetail


class Artifact(TypedDict):
    """A file in place in the run directory: what its artifact row and manifest entry say."""

    artifact_type: str  # describe | data-<schema> | archive | manifest
    artifact_name: str
    schema_name: str | None
    part: int | None
    format: str
    content_type: str
    size_bytes: int
    records: int | None
    checksum: str  # SHA-256 hex of the stored bytes
    crc32: int
    is_primary: bool


class Result(TypedDict):
    """How a run ended, as its worker (or the service, for a dead worker) tells it."""

    status: str  # one of ENDED_STATUSES
    error: str | None
    error_detail: dict[str, Any] | None
    records_exported: int
    schemas_exported: int
    records_total: int


def result(
    status: RunStatus,
    error: str | None = None,
    error_detail: dict[str, Any] | None = None,
    *,
    records_exported: int = 0,
    schemas_exported: int = 0,
    records_total: int = 0,
) -> Result:
    return {
        "status": status.value,
        "error": error,
        "error_detail": error_detail,
        "records_exported": records_exported,
        "schemas_exported": schemas_exported,
        "records_total": records_total,
    }


def failure(
    error: str,
    exc_type: str,
    *,
    retryable: bool,
    message: str | None = None,
    traceback: str = "",
    **detail: Any,
) -> Result:
    """A failed run's result: ``error`` is the one line shown; ``error_detail`` keeps the rest.

    ``retryable``: the cause is transient (``executor.failures``), worth another attempt.
    """
    shown = error if message is None else message
    return result(
        RunStatus.FAILED,
        error,
        {"type": exc_type, "message": shown, "traceback": traceback, "retryable": retryable} | detail,
    )


class Escaped(TypedDict):
    """A run's failure the service made of an exception its worker's job let escape."""

    lease: str  # the attempt it belongs to
    result: Result


class Broken(TypedDict):
    generation: int
    exitcodes: dict[int, int | None]
    killed: list[int]  # workers the pool's SIGTERM did not stop (frozen): SIGKILLed by the service


Kind = Literal["started", "progress", "artifact", "result", "escaped", "broken", "lost", "drained"]
Message = tuple[Kind, str | None, Any]
