"""File names derived from schema and extract names (SPEC: Artifacts, Downloads).

A schema name becomes a file name by percent-encoding every UTF-8 byte outside
``[A-Za-z0-9._-]`` with upper-case hex, so ``order items`` is ``order%20items``.
The encoding is injective (``%`` itself is encoded), so two schemas never share a
file, and no result contains ``/``. Leading dots are encoded too (``..`` is
``%2E%2E``): no name is ``.`` or ``..``, and no name starts with a dot, which
leaves dot-names free for the writers' temporary files.
"""

from __future__ import annotations

import hashlib
import re

_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_ENCODED = {byte: chr(byte) if byte in _SAFE_BYTES else f"%{byte:02X}" for byte in range(256)}

# Room for ".00001.jsonl.gz" and a temporary-file prefix within the usual 255-byte limit.
_MAX_STEM = 200
_NOT_DOWNLOAD_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_file_name(schema: str) -> str:
    """The file-name stem for ``schema``: safe on every file system, never a path.

    A name whose encoding passes 200 characters is cut and given a hash suffix
    after ``~`` (a character the encoding never produces, so it cannot collide).
    The empty name, which SQLite allows when quoted, becomes ``%00``: no real
    name contains a NUL byte.
    """
    if not schema:
        return "%00"
    stem = "".join(_ENCODED[byte] for byte in schema.encode("utf-8"))
    dots = len(stem) - len(stem.lstrip("."))
    stem = "%2E" * dots + stem[dots:]
    if len(stem) > _MAX_STEM:
        cut = _MAX_STEM - 17
        # Never split a %XX escape.
        while "%" in stem[cut - 2 : cut]:
            cut -= 1
        digest = hashlib.sha256(schema.encode("utf-8")).hexdigest()[:16]
        stem = f"{stem[:cut]}~{digest}"
    return stem


def download_base_name(extract_name: str, created_at: str, run_id: str) -> str:
    """``<Name>-<YYYY-MM-DD>-<run_id[:8]>``: the ZIP and archive name rule (SPEC: Downloads).

    Runs of characters outside ``[A-Za-z0-9_-]`` become ``-`` (dashes at either
    end dropped; ``extract`` when nothing is left); the date is the run's
    creation date (``created_at`` is ISO 8601 UTC). The service names its ZIP
    downloads with this same function.
    """
    name = _NOT_DOWNLOAD_SAFE.sub("-", extract_name).strip("-") or "extract"
    return f"{name}-{created_at[:10]}-{run_id[:8]}"
