"""The storage interface: the verbs every backend gives, and its errors.

The verbs follow obstore's, so that an object store fits behind them as the
local directory does::

    open_file(run_id, name) → StoredFile   write … commit (in place, never replacing a file)
                                           or discard (nothing left behind)
    hold(files)             → HeldFiles    opened before a download's first byte; ranged reads
    delete_run / delete / remove_partial / remove_empty_runs
    sign(path, seconds)     → a URL that needs no token, or None where the store cannot sign
    probe()                                 start-up: reachable and writable, or one line why

Workers write through ``open_file``; the service holds, deletes and sweeps.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

# The object store URL schemes --storage takes, and the storage_backend of their artifacts.
OBJECT_SCHEMES = {"s3": "s3", "gs": "gcs", "az": "azure", "azure": "azure"}


def is_endpoint(url: str) -> bool:
    """Whether ``url`` is an http:// or https:// URL with a host and, if any, a valid port: an
    object store's endpoint (given otherwise, obstore panics as it builds a request)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname) and port != 0


class StorageError(Exception):
    """The storage failed; the message is one line for a human."""


class StoreUnavailable(StorageError):
    """An object store could not be reached, refused the credentials, or failed a request.

    Transient for retries (SPEC: Object storage): the store may be back at the next attempt.
    """


class LowDiskSpace(StorageError):
    """Free space on the storage volume fell under the reserve."""


class NotInStorage(StorageError):
    """A recorded file is outside this storage: it was written before ``--storage`` changed."""

    def __init__(self, path: str, storage: str) -> None:
        super().__init__(f"{path} is not in the storage {storage}")
        self.path, self.storage = path, storage


class NameClash(StorageError):
    """Two files of one run would have names that differ at most in letter case."""


class FileChangedError(Exception):
    """A stored file no longer has the size recorded for it (or is not a file)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def storage_error(exc: OSError, path: Path | str) -> StorageError:
    """An OS error while writing ``path``, as one line that says what to do."""
    hint = (
        "free some space on the storage volume"
        if exc.errno == errno.ENOSPC
        else "check that the storage directory (--storage) is writable"
    )
    return StorageError(f"Cannot write {path}: {exc.strerror or exc}; {hint}")


class StoredFile(ABC):
    """A file being written: invisible until ``commit``; ``discard`` leaves nothing behind."""

    name: str

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def commit(self) -> None:
        """Put the file in place; raises NameClash rather than replace a file of that name."""

    @abstractmethod
    def discard(self) -> None: ...

    @abstractmethod
    def read_back(self) -> BinaryIO:
        """The bytes written so far, before commit (an archive copies its members this way)."""


class HeldFiles(ABC):
    """Files a download will send, held from before its first byte until ``close()``."""

    @abstractmethod
    def read(self, index: int, offset: int, size: int, /) -> bytes:
        """Up to ``size`` bytes of file ``index`` from ``offset``; fewer only at its end."""

    @abstractmethod
    def modified(self, index: int) -> float:
        """The file's modification time (seconds since the epoch)."""

    @abstractmethod
    def close(self) -> None: ...


class Storage(ABC):
    """Where artifacts are written, read back, deleted and swept."""

    backend: str  # the artifact records' storage_backend
    endpoint: str | None = None  # --storage-endpoint, which the workers need too

    @abstractmethod
    def probe(self) -> None:
        """Start-up: create, write and delete a probe; raises StorageError naming the cause."""

    @abstractmethod
    def storage_path(self, run_id: str, name: str) -> str:
        """Where a run's file is: what its artifact record shows (never a credential)."""

    @abstractmethod
    def begin_run(self, run_id: str) -> None:
        """Make room for a run's files before its first one (a directory; raises StorageError),
        clearing what an earlier attempt of the same run left: a run put back in the queue
        keeps its id, and its files stay when the storage failed as it went back."""

    @abstractmethod
    def open_file(self, run_id: str, name: str) -> StoredFile: ...

    @abstractmethod
    def open_scratch(self, run_id: str, name: str) -> StoredFile:
        """A file that is never committed: an archive's member, read back into the tarball."""

    @abstractmethod
    def free_bytes(self, run_id: str | None = None) -> int | None:
        """Free space where the run's (or any run's) files go; None where no reserve applies."""

    @abstractmethod
    def hold(self, files: Sequence[tuple[str, int]]) -> HeldFiles:
        """Hold ``(storage_path, size)`` files; raises FileNotFoundError, FileChangedError, or
        (an object store) NotInStorage for a file recorded under another URL."""

    @abstractmethod
    def delete_run(self, run_id: str) -> None:
        """Every file of the run; raises OSError when they cannot be deleted (none missing is fine)."""

    @abstractmethod
    def delete(self, storage_path: str) -> None:
        """One file, and its run's directory once empty; a file already gone is fine."""

    @abstractmethod
    def remove_partial(self, run_id: str) -> None:
        """What a run cut short was writing (never a committed file)."""

    @abstractmethod
    def remove_unrecorded(self, run_id: str, recorded: set[str]) -> None:
        """Files a dead worker finished but whose artifact message died with it."""

    @abstractmethod
    def remove_empty_runs(self, active: set[str]) -> None:
        """Empty run directories, except those of ``active`` runs."""

    def sign(self, storage_path: str, seconds: int) -> str | None:
        """A URL that downloads the file without the token; None where the store cannot sign."""
        return None

    def volume(self) -> str:
        """Where free space is counted, for messages."""
        return str(self)
