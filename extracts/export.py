"""``extracts-app export``: one run of the worker code in the foreground, no service, no state.

::

    options ─► Job ─► thread: executor.worker.run_extract(job, local queue, cancel flags)
                              writes <work dir>/<run_id>/ through LocalStorage, as a service run
    queue ─► progress view; artifact messages kept (with the time each came, as the service does)
    completed ─► ZIP: the biggest file grown into it in place (zipstream.stored_around), or
                 written afresh by zipstream.StoredZip (the service's download) ─► renamed into place
              or the run directory renamed into place (``-d``; into an existing directory,
              its files moved in, the manifest last)

The work directory is a hidden temporary directory beside the target (inside
it, for an existing empty ``-d`` directory), so the last step is a rename on
one file system: a target either is complete or does not exist (or, in the
user's directory, holds no manifest until every file it lists is there).
Whatever ends the export early (an error, Ctrl-C, SIGTERM, SIGHUP) removes the work
directory; the run's cancel flag stops the worker at its next batch
and interrupts a running statement (the service's cancel path), so Ctrl-C ends
the command within a second.

What differs from a service run of the same options (README: Command line):
the run id, ``generated_at``, ``extract_id`` (null: there is no extract) in
the manifest, and for ``archive`` the tarball's name and member times; every
data file and describe.yaml is byte for byte the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from executor.messages import Job, Phase, Result, RunConfig, RunStatus, progress_detail
from executor.naming import download_base_name
from extracts.progress import View
from extracts.storage import HeldFiles
from extracts.storage.local import LocalStorage
from extracts.zipstream import StoredZip, ZipEntry, stored_around

_CHUNK = 1 << 20
_FALLOC_FL_INSERT_RANGE = 0x20  # linux/falloc.h
STOP_WITHIN_S = 1.5  # after Ctrl-C: the worker's own cancel path takes ~0.2-0.5 s


class ExportFailed(Exception):
    """The export failed; the message is the one line shown."""


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP stopped the export; nothing was left behind."""


@dataclass
class Export:
    """One command-line export: what to read, how, and where the result goes."""

    source: str
    config: RunConfig
    name: str
    zip_path: Path | None  # -o (None with -d: then ``directory``)
    directory: Path | None
    view: View
    run_id: str = field(default_factory=lambda: f"run_{secrets.token_hex(8)}")  # the service's id shape
    created_at: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    artifacts: list[tuple[dict[str, Any], tuple[int, int, int, int, int, int]]] = field(default_factory=list)
    #: The command's own process: once the result is in place, a stop signal is ignored for the
    #: moments left (it would end the command saying nothing was written, the file complete).
    own_process: bool = False

    @property
    def target(self) -> Path:
        if self.directory is not None:
            return self.directory
        if self.zip_path is not None and not self.zip_path.is_dir():
            return self.zip_path
        folder = self.zip_path or Path.cwd()
        return folder / (download_base_name(self.name, self.created_at, self.run_id) + ".zip")

    def job(self, storage: str) -> Job:
        return {
            "run_id": self.run_id,
            "extract_id": None,  # no extract: the manifest says null
            "extract_name": self.name,
            "source": self.source,
            "storage": storage,
            "storage_endpoint": None,
            "min_free_bytes": 0,  # a reserve is the service's, for its volume: here ENOSPC fails
            "created_at": self.created_at,
            "config": self.config,
            "lease": "",
        }

    def run(self) -> tuple[Path, Result]:
        """Export, then put the result in place; raises ExportFailed or Interrupted."""
        target = self.target.absolute()
        # Into an existing (empty) -d directory, or the directory a -d symlink leads to: the work
        # directory goes inside it (one file system), and the files move in, never the directory
        # itself: the user's directory keeps its inode, mode and owner.
        into = self.directory is not None and target.is_dir()
        # The handlers first: a signal between making the work directory and the try.
        with _Signals(ignore_after=self.own_process) as stop:
            work = Path(
                tempfile.mkdtemp(
                    prefix=f".{target.name}.", suffix=".tmp", dir=target if into else target.parent
                )
            )
            try:
                result = self._export(work, stop)
                if stop.is_set():
                    raise Interrupted
                self._place(LocalStorage(work), work, target, stop, into)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return target, result

    def _export(self, work: Path, stop: threading.Event) -> Result:
        from executor.worker import run_extract

        messages: queue.SimpleQueue[Any] = queue.SimpleQueue()
        cancelled: dict[str, bool] = {}
        job = self.job(str(work))
        outcome: list[Result] = []

        def worker() -> None:
            try:
                outcome.append(run_extract(job, messages, cancelled))
            finally:
                messages.put(("done", self.run_id, None))

        thread = threading.Thread(target=worker, name="extracts-export", daemon=True)
        thread.start()
        stop_by: float | None = None
        while True:
            if stop.is_set() and stop_by is None:
                cancelled[self.run_id] = True  # polled by the worker's monitor every 0.2 s
                stop_by = time.monotonic() + STOP_WITHIN_S
            try:
                kind, _, payload = messages.get(timeout=0.05)
            except queue.Empty:
                if stop_by is not None and time.monotonic() > stop_by:
                    raise Interrupted from None  # the work directory goes; the daemon thread dies with us
                continue
            if kind == "progress":
                self.view.update(payload["progress_detail"])
            elif kind == "artifact":
                self.artifacts.append((payload, datetime.now(UTC).timetuple()[:6]))
                self.view.artifacts([payload])
            elif kind == "done":
                break
        thread.join()
        if stop.is_set():
            raise Interrupted
        if not outcome:  # run_extract returns whatever happens; only a bug in it lands here
            raise ExportFailed("the export stopped without a result; see the traceback above")
        result = outcome[0]
        if result["status"] != RunStatus.COMPLETED:
            raise ExportFailed(result["error"] or f"the export ended {result['status']}")
        self.view.update(
            progress_detail(
                Phase.COMPLETED,
                records_exported=result["records_exported"],
                records_total=result["records_total"],
                schemas_total=result["schemas_exported"],
                schemas_completed=result["schemas_exported"],
            )
        )
        return result

    def _place(
        self, storage: LocalStorage, work: Path, target: Path, stop: threading.Event, into: bool
    ) -> None:
        run_dir = storage.run_dir(self.run_id)
        if self.directory is not None:
            try:
                if into:
                    move_files(run_dir, target)
                else:
                    os.rename(run_dir, target)  # a new directory, whole at once
            except OSError as exc:
                raise ExportFailed(f"Cannot move the files to {target}: {exc.strerror}") from None
            return
        partial = work / target.name
        entries = [
            ZipEntry(
                item["artifact_name"],
                str(run_dir / item["artifact_name"]),
                item["size_bytes"],
                item["crc32"],
                at,
            )
            for item, at in self.artifacts
        ]
        archive = zip_in_place(entries)
        if archive is None:
            files = storage.hold([(entry.path, entry.size) for entry in entries])
            try:
                write_zip(entries, files, partial, stop.is_set)
            finally:
                files.close()
            archive = partial
        if stop.is_set():
            raise Interrupted
        os.replace(archive, target)


def move_files(run_dir: Path, target: Path) -> None:
    """Move the run's files into ``target``, the manifest last; on failure, take back those moved."""
    # The manifest last: once it is there, every file it lists is too.
    names = sorted(os.listdir(run_dir), key=lambda name: name == "manifest.json")
    moved: list[str] = []
    try:
        for name in names:
            os.rename(run_dir / name, target / name)
            moved.append(name)
    except OSError:
        for name in moved:
            with contextlib.suppress(OSError):
                os.unlink(target / name)
        raise


def write_zip(entries: list[ZipEntry], files: HeldFiles, path: Path, stopped: Callable[[], bool]) -> None:
    """The run's ZIP as the service's download streams it (``StoredZip``), into ``path``."""
    archive = StoredZip(entries)
    with open(path, "wb") as out:
        for chunk in archive.iter_bytes(files, chunk_size=_CHUNK):
            if stopped():
                return
            out.write(chunk)


def zip_in_place(entries: list[ZipEntry]) -> Path | None:
    """The run's biggest file turned into its ZIP (``zipstream.stored_around``); None: not here.

    The file system inserts a block in front of the file's data
    (``FALLOC_FL_INSERT_RANGE``: ext4 and XFS on Linux), the entry's local header
    fills it, and the other files and the central directory are appended: the
    big file is never copied. Where the file system cannot insert, the caller
    writes the archive afresh (``write_zip``).
    """
    if not entries:
        return None
    first = max(range(len(entries)), key=lambda index: entries[index].size)
    path = Path(entries[first].path)
    fd = os.open(path, os.O_RDWR)
    try:
        stat = os.fstat(fd)
        parts = stored_around(entries, first, stat.st_blksize)
        if parts is None or stat.st_size != entries[first].size or not _insert_block(fd, stat.st_blksize):
            return None
        header, others, tail = parts
        os.pwrite(fd, header, 0)  # into the inserted block: never a short write
        os.lseek(fd, 0, os.SEEK_END)
        for index, local_header in others:
            _write_all(fd, local_header)
            _append_file(fd, entries[index])
        _write_all(fd, tail)
    finally:
        os.close(fd)
    return path


def _insert_block(fd: int, size: int) -> bool:
    """Insert ``size`` bytes (a multiple of the file system's block) in front of the file's data."""
    if not sys.platform.startswith("linux"):
        return False
    fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fallocate(fd, _FALLOC_FL_INSERT_RANGE, 0, size) == 0


def _append_file(fd: int, entry: ZipEntry) -> None:
    """Append the entry's file: copied by the kernel where it can, else through a buffer."""
    with open(entry.path, "rb", buffering=0) as source:  # unbuffered: both ways move one offset
        copied = 0
        while copied < entry.size:
            try:
                step = os.copy_file_range(source.fileno(), fd, entry.size - copied)
            except OSError:
                data = source.read(min(_CHUNK, entry.size - copied)) or b""
                step = len(data)
                _write_all(fd, data)
            if step == 0:
                raise ExportFailed(f"{entry.path} shrank while the ZIP was written")
            copied += step


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Signals:
    """SIGINT, SIGTERM and SIGHUP (the terminal closed) set an event instead of raising: the export
    stops at a point it chooses. A signal ignored when the command started (``nohup``) stays ignored."""

    def __init__(self, ignore_after: bool = False) -> None:
        self.ignore_after = ignore_after  # on success, ignore them from then on (``Export.own_process``)

    def __enter__(self) -> threading.Event:
        self.event = threading.Event()
        self._old = {
            sig: signal.signal(sig, lambda *_: self.event.set())
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            if signal.getsignal(sig) != signal.SIG_IGN
        }
        return self.event

    def __exit__(self, failed: type[BaseException] | None, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, signal.SIG_IGN if self.ignore_after and failed is None else handler)
