"""Where a run's files live (SPEC: Object storage): one interface, one module per backend.

``base`` names the verbs and errors; ``local`` is the embedded default (a
directory); ``objects`` serves S3 and every S3-compatible store, Google Cloud
Storage and Azure Blob Storage through obstore. ``open_storage`` picks one from
``--storage``.
"""

from __future__ import annotations

from pathlib import Path

from extracts.storage.base import (
    OBJECT_SCHEMES,
    FileChangedError,
    HeldFiles,
    LowDiskSpace,
    NameClash,
    NotInStorage,
    Storage,
    StorageError,
    StoredFile,
    StoreUnavailable,
    is_endpoint,
    storage_error,
)

__all__ = [
    "OBJECT_SCHEMES",
    "FileChangedError",
    "HeldFiles",
    "LowDiskSpace",
    "NameClash",
    "NotInStorage",
    "Storage",
    "StorageError",
    "StoreUnavailable",
    "StoredFile",
    "is_endpoint",
    "open_storage",
    "storage_error",
]


def open_storage(location: str | Path, endpoint: str | None = None) -> Storage:
    """The storage ``--storage`` names: ``s3://``, ``gs://`` or ``az://bucket/prefix``, else a directory.

    Raises StorageError for an object store URL that names no bucket.
    """
    text = str(location)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in OBJECT_SCHEMES:
        from extracts.storage.objects import ObjectStorage

        return ObjectStorage(text, endpoint)
    from extracts.storage.local import LocalStorage

    return LocalStorage(Path(text).expanduser().absolute())
