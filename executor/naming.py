"""File names derived from schema and extract names (SPEC: Artifacts, Downloads).

A schema name becomes a file-name stem by percent-encoding every UTF-8 byte
outside ``[A-Za-z0-9._-]`` with upper-case hex, so ``order items`` is
``order%20items``. ``%`` itself is encoded, so percent-decoding gives the name
back: the encoding is injective, two schemas never share a file, and no result
contains ``/``. Leading dots are encoded too (``..`` is ``%2E%2E``): no name is
``.`` or ``..``, and no name starts with a dot, which leaves dot-names free for
the writers' temporary files.

Two more rules keep every stem apart from the run's own files and from the
others when letter case is ignored (macOS and Windows, where an unpacked ZIP
lands, treat ``Users.jsonl`` and ``users.jsonl`` as one file):

- The stems ``describe`` and ``manifest`` get their first byte encoded
  (``%64escribe``, ``%6Danifest``): no data file is ``describe.yaml`` or
  ``manifest.json``, whatever the format.
- A stem with capital letters gets ``~`` and the lower-case hex of a mask of
  where they are (bit i: character i of the stem is a literal ``A``–``Z``):
  ``Users~1``, ``USERS~1f``, ``users`` unchanged. The hex digits of escapes
  (always upper case) are not letters of the name and are left out.

Why two names can never give stems equal ignoring case: the encoding never
produces ``~`` (it is ``%7E``), so the part before ``~`` and the mask line up;
masks are lower-case hex, so they must be equal. In the parts, ``%`` sits at
the same places, so the escapes line up and are equal (their hex is always upper
case); the literal letters can only differ in case, and the equal masks say
they do not. So the stems are equal, and decoding gives one name. Only
``describe`` and ``manifest`` themselves, without capitals, could equal a
reserved stem, and they are encoded. Reversible: drop a ``~…`` suffix and
percent-decode.
"""

from __future__ import annotations

import hashlib
import re

_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_ENCODED = {byte: chr(byte) if byte in _SAFE_BYTES else f"%{byte:02X}" for byte in range(256)}
_ESCAPE = re.compile(r"%[0-9A-F]{2}")
# The run's own files are describe.yaml and manifest.json (SPEC: Artifacts).
_RESERVED_STEMS = frozenset({"describe", "manifest"})

# Room for ".00001.jsonl.gz" and a temporary-file prefix within the usual 255-byte limit.
_MAX_STEM = 200
_NOT_DOWNLOAD_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_file_name(schema: str) -> str:
    """The file-name stem for ``schema``: safe on every file system, never a path.

    Apart from the run's own files and from every other schema's stem, letter
    case ignored (module docstring). A stem (with its ``~`` mask) longer than
    200 characters is cut, never inside an escape, and given ``~`` and 16 hex
    digits of the SHA-256 of the exact name instead of the mask: names that
    differ only in case get different digests, and two cut stems, or a cut stem
    and a masked one, could only meet on a 64-bit hash collision. The empty
    name, which SQLite allows when quoted, becomes ``%00``: no real name
    contains a NUL byte.
    """
    if not schema:
        return "%00"
    stem = "".join(_ENCODED[byte] for byte in schema.encode("utf-8"))
    dots = len(stem) - len(stem.lstrip("."))
    stem = "%2E" * dots + stem[dots:]
    if stem in _RESERVED_STEMS:
        stem = f"%{ord(stem[0]):02X}{stem[1:]}"
    literal = _ESCAPE.sub("%..", stem)  # same length, escape digits blanked out
    mask = sum(1 << i for i, char in enumerate(literal) if "A" <= char <= "Z")
    suffix = f"~{mask:x}" if mask else ""
    if len(stem) + len(suffix) > _MAX_STEM:
        cut = _MAX_STEM - 17
        # Never split a %XX escape.
        while "%" in stem[cut - 2 : cut]:
            cut -= 1
        digest = hashlib.sha256(schema.encode("utf-8")).hexdigest()[:16]
        return f"{stem[:cut]}~{digest}"
    return stem + suffix


def download_base_name(extract_name: str, created_at: str, run_id: str) -> str:
    """``<Name>-<YYYY-MM-DD>-<run_id[:8]>``: the ZIP and archive name rule (SPEC: Downloads).

    Each run of characters outside ``[A-Za-z0-9_-]`` becomes one ``-``, at either
    end too, as the SPEC words it: ``Sales report!`` is ``Sales-report-``, so its
    file is ``Sales-report--2026-…``. A name is never empty, so neither is this part.
    The date is the run's creation date (``created_at`` is ISO 8601 UTC). The
    service's ZIP downloads, an ``archive`` run's tarball and ``export``'s ZIP are
    all named by this one function.
    """
    name = _NOT_DOWNLOAD_SAFE.sub("-", extract_name)
    return f"{name}-{created_at[:10]}-{run_id[:8]}"
