"""What runs in the worker processes: read the source, write the files, report progress.

    job (plain dict) → run_extract ─ open_source() → Source (read-only, one snapshot)
                          │            └ json_lines(): chunks of JSON rows, built by the database
                          ├ writers: describe.yaml, data files ([gzip] + SHA-256 + CRC-32
                          │          on a thread), manifest.json — temporary name, then rename
                          └ queue: ("progress", …) throttled, ("artifact", …) per finished file
                        → result dict (completed | cancelled | failed, counts, error)

Modules: ``sources`` (a package: ``open_source``; ``base``, the Source
interface; ``sqlite``, ``postgres``, ``mysql``, the dialects; ``server``, the
skeleton the last two share; ``rowjson`` and ``float32``, their value
encoding), ``filters`` (checking and compiling a filter's ``where``),
``credentials`` (secrets of a source URL, redacted), ``naming`` (safe file
names), ``writers`` (formats and files), ``messages`` (the typed job, progress,
artifact and result shapes), ``worker`` (one run: ``run_extract``), ``entry``
(the pool's entry point), ``demo`` (the demo database).
"""

from executor.filters import check_where, compile_where
from executor.naming import download_base_name, safe_file_name
from executor.sources import Source, SourceError, UnknownSchema, open_source
from executor.worker import run_extract

__all__ = [
    "Source",
    "SourceError",
    "UnknownSchema",
    "check_where",
    "compile_where",
    "download_base_name",
    "open_source",
    "run_extract",
    "safe_file_name",
]
