"""The local directory: the embedded default, one directory per run under a root.

A file is written under a temporary dot-name and linked into place; a download
holds files by open descriptors (or private hard links), so deleting a run
meanwhile unlinks names, not the bytes being sent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import secrets
import shutil
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from extracts.storage.base import (
    FileChangedError,
    HeldFiles,
    NameClash,
    Storage,
    StorageError,
    StoredFile,
    storage_error,
)

# Private hard links of held files live here (LocalHeldFiles); what a stopped service
# left behind is removed at the next start (probe).
LINKS_DIR = ".downloads"
# link() errors of a file system without hard links (FAT, exFAT, some SMB shares).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS})


class LocalStorage(Storage):
    """A directory on this machine: ``<root>/<run_id>/<file name>``."""

    backend = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def __str__(self) -> str:
        return str(self.root)

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def probe(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{secrets.token_hex(4)}"
            probe.write_bytes(b"ok")
            probe.unlink()
            shutil.rmtree(self.root / LINKS_DIR, ignore_errors=True)  # links of a stopped service
        except OSError as exc:
            raise StorageError(
                f"cannot create or write the storage directory {self.root}: {exc.strerror or exc}"
            ) from exc

    def storage_path(self, run_id: str, name: str) -> str:
        return str(self.run_dir(run_id) / name)

    def begin_run(self, run_id: str) -> None:
        run_dir = self.run_dir(run_id)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"Cannot create the run directory {run_dir}: {exc.strerror}; "
                "check that the storage directory (--storage) is writable"
            ) from exc
        self.remove_unrecorded(run_id, set())  # an earlier attempt's files (a temp one is rewritten)

    def open_file(self, run_id: str, name: str) -> StoredFile:
        return LocalFile(self.run_dir(run_id), name)

    def open_scratch(self, run_id: str, name: str) -> StoredFile:
        return LocalFile(self.run_dir(run_id), name)

    def free_bytes(self, run_id: str | None = None) -> int | None:
        run_dir = self.root if run_id is None else self.run_dir(run_id)
        return shutil.disk_usage(run_dir if run_dir.is_dir() else self.root).free

    def volume(self) -> str:
        """The mount point of the volume the directory is on."""
        path = self.root.resolve()
        while not os.path.ismount(path):
            path = path.parent
        return str(path)

    def hold(self, files: Sequence[tuple[str, int]]) -> HeldFiles:
        return LocalHeldFiles(files, self.root / LINKS_DIR)

    def delete_run(self, run_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.run_dir(run_id))

    def delete(self, storage_path: str) -> None:
        path = Path(storage_path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(OSError):
            path.parent.rmdir()

    def remove_partial(self, run_id: str) -> None:
        with contextlib.suppress(OSError):
            for temp in self.run_dir(run_id).glob(".*.tmp"):
                temp.unlink(missing_ok=True)

    def remove_unrecorded(self, run_id: str, recorded: set[str]) -> None:
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.run_dir(run_id)):
                if not entry.name.startswith(".") and entry.name not in recorded:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    def remove_empty_runs(self, active: set[str]) -> None:
        # Not one made in the last minute: a run claimed after ``active`` was read may have just
        # made its directory, and would find it gone when it writes its first file.
        settled = time.time() - 60
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root):
                if entry.is_dir() and entry.name.startswith("run_") and entry.name not in active:
                    with contextlib.suppress(OSError):
                        if entry.stat().st_mtime < settled:
                            os.rmdir(entry.path)


# ---------------------------------------------------------------- writing a local file


class LocalFile(StoredFile):
    """A temporary dot-name in the run directory, linked into place on commit.

    No artifact name starts with a dot (``executor.naming``), so a half-written
    file never looks finished; a hard link, unlike a rename, fails when the name
    exists (also in another letter case, on a case-insensitive volume).
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.path = directory / name
        self.temp_path = directory / f".{name}.tmp"
        try:
            # Buffered: a big write goes straight through, looping over partial writes.
            self._file = open(self.temp_path, "wb")  # noqa: SIM115 — closed in commit()/discard()
        except OSError as exc:
            raise storage_error(exc, self.path) from exc

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            raise storage_error(exc, self.path) from exc

    def _close(self) -> None:
        try:
            self._file.close()  # the raw file closes even when the last flush fails
        except OSError as exc:
            raise storage_error(exc, self.path) from exc

    def commit(self) -> None:
        self._close()
        try:
            os.link(self.temp_path, self.path)
        except FileExistsError as exc:
            raise self._exists() from exc
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise storage_error(exc, self.path) from exc
            # No hard links on this volume: check, then rename (the run is its directory's only writer).
            if self.path.exists():
                raise self._exists() from exc
            os.rename(self.temp_path, self.path)
        else:
            self.temp_path.unlink()

    def _exists(self) -> NameClash:
        return NameClash(
            f"Cannot write {self.path}: a file of that name (letter case aside) is already "
            "in the run directory, and it was not overwritten; report this as a bug"
        )

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self.temp_path.unlink(missing_ok=True)

    def read_back(self) -> BinaryIO:
        self._close()
        return open(self.temp_path, "rb")  # noqa: SIM115 — the caller's to close


# ---------------------------------------------------------------- holding local files for downloads


class LocalHeldFiles(HeldFiles):
    """Local files held by open descriptors or private hard links until ``close()``.

    Deleting a run and the retention sweep unlink names; the bytes stay while an
    open descriptor or another hard link refers to them, so a download that
    started always completes (SPEC: Downloads). Each file is held by a
    descriptor while the process's budget allows (a quarter of its open-file
    limit, shared by every download), the rest by hard links in a private
    directory made under ``links``: a run can have more files than a process may
    open. Where no link can be made (storage read-only or full, or without hard
    links) a file is read by name: on read-only storage nothing can delete it.
    Sizes are checked here. ``close()`` also runs when the holder is
    garbage-collected, as a backstop. Raises FileNotFoundError (its
    ``filename`` the missing path) or FileChangedError; nothing stays held then.
    """

    def __init__(self, files: Sequence[tuple[str, int]], links: Path) -> None:
        self._held = _Held()
        self._release = weakref.finalize(self, self._held.release)
        self._paths = [path for path, _ in files]
        self._by_name: set[int] = set()  # files past the budget that could not be linked
        self._reading: int | None = None  # the file past the budget open in _held.reading
        try:
            self._held.granted = _BUDGET.take(len(files))
            for index, (path, size) in enumerate(files):
                if index < self._held.granted:
                    self._held.fds.append(os.open(path, os.O_RDONLY))
                    _check_file(path, size, os.fstat(self._held.fds[-1]))
                    continue
                _check_file(path, size, os.stat(path))  # before: a directory cannot be linked
                if not self._link(index, path, links):
                    self._by_name.add(index)
        except BaseException:
            self.close()
            raise

    def read(self, index: int, offset: int, size: int) -> bytes:
        return os.pread(self._fd(index), size, offset)

    def modified(self, index: int) -> float:
        return os.fstat(self._fd(index)).st_mtime

    def close(self) -> None:
        """Release every descriptor and link; the bytes of files deleted meanwhile go with them."""
        self._release()

    def _fd(self, index: int) -> int:
        held = self._held
        if not self._release.alive:
            raise ValueError("The files were released; this download can read nothing more.")
        if index < held.granted:
            return held.fds[index]
        if self._reading != index:  # past the budget: open while it is read, one at a time
            self._reading = None
            while held.reading:
                os.close(held.reading.pop())
            if index in self._by_name:
                path = self._paths[index]
            else:
                path = os.path.join(held.directory or "", str(index))
            held.reading.append(os.open(path, os.O_RDONLY))
            self._reading = index
        return held.reading[0]

    def _link(self, index: int, path: str, links: Path) -> bool:
        try:
            if self._held.directory is None:
                links.mkdir(parents=True, exist_ok=True)
                self._held.directory = tempfile.mkdtemp(dir=links)
            os.link(path, os.path.join(self._held.directory, str(index)))
            return True
        except OSError:
            if not os.path.exists(path):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None
            return False


@dataclass
class _Held:
    """What a LocalHeldFiles holds, apart from it: its finalizer must not refer to the holder."""

    fds: list[int] = field(default_factory=list)
    granted: int = 0  # descriptors taken from the budget, for the first files
    directory: str | None = None  # the private links of the other files
    reading: list[int] = field(default_factory=list)  # the file past the budget being read

    def release(self) -> None:
        for fd in (*self.fds, *self.reading):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self.reading.clear()
        _BUDGET.give(self.granted)
        self.granted = 0
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


class _DescriptorBudget:
    """How many descriptors held files take at once: a quarter of the open-file limit.

    The rest stays for sockets and the state database, so that no number of
    downloads makes the service unable to accept a connection.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = 0

    def take(self, wanted: int) -> int:
        """Reserve up to ``wanted`` descriptors; returns how many were granted."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        with self._lock:
            granted = max(0, min(wanted, soft // 4 - self._taken))
            self._taken += granted
            return granted

    def give(self, count: int) -> None:
        with self._lock:
            self._taken -= count


_BUDGET = _DescriptorBudget()


def _check_file(path: str, expected: int, result: os.stat_result) -> None:
    if not stat.S_ISREG(result.st_mode):
        raise FileChangedError(path, f"{path} is not a regular file.")
    if result.st_size != expected:
        raise FileChangedError(
            path,
            f"{path} is {result.st_size} bytes on disk but was recorded as {expected}; "
            "the artifact changed after its run completed.",
        )
