"""Checks that an exported file holds exactly the source's rows.

Both sides are reduced to the same canonical form: for each row, in rowid order,
the JSON object of its columns as orjson writes it (keys in the order given,
shortest round-trip floats, exact integers) and a newline; the SHA-256 of that
stream is the digest. Equal digests mean equal row counts, the same keys in the
same order, equal values of equal types, rows in the same order.

A REAL printed with 17 or 18 digits parses back to the same double, so the
digest does not depend on how an exporter formats numbers, only on the values.
"""

from __future__ import annotations

import gzip
import hashlib
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
YAML_BOTH_WAYS = 10_000  # lines of a flow-style YAML file also read with PyYAML
DIGEST_VERSION = 2  # bump when the canonical form changes: digests of sources are cached on disk


class Mismatch(Exception):
    """An exported file does not match its source."""


@dataclass(frozen=True)
class Digest:
    rows: int
    sha256: str


def _digest(batches: Iterable[list[Any]]) -> Digest:
    """Digest of rows given in batches, each row a dict (keys in order)."""
    h = hashlib.sha256()
    count = 0
    dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
    for batch in batches:
        h.update(b"".join([dumps(row, option=newline) for row in batch]))
        count += len(batch)
    return Digest(count, h.hexdigest())


def _batched(items: Iterable[Any], size: int = 10_000) -> Iterator[list[Any]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def table_columns(db: Path, table: str) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return [row[1] for row in con.execute("SELECT * FROM pragma_table_info(?)", (table,))]


def table_digest(db: Path, table: str, max_id: int | None = None) -> Digest:
    """The canonical digest of a source table (rows with ``id <= max_id``), read in rowid order."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    where = "" if max_id is None else f" WHERE id <= {int(max_id)}"
    try:
        cursor = con.execute(f'SELECT * FROM "{table}"{where} ORDER BY rowid')
        cursor.arraysize = 10_000
        columns = [d[0] for d in cursor.description]
        return _digest(
            [dict(zip(columns, row, strict=True)) for row in batch] for batch in iter(cursor.fetchmany, [])
        )
    finally:
        con.close()


def _open(path: Path) -> Any:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _jsonl_objects(path: Path) -> Iterator[dict[str, Any]]:
    loads = orjson.loads
    with _open(path) as f:
        for line in f:
            yield loads(line)


def _sqlite3_json_objects(path: Path) -> Iterator[dict[str, Any]]:
    """``sqlite3 -json`` output: ``[{...},\\n{...},\\n...]`` one row a line (or empty for no rows)."""
    loads = orjson.loads
    with _open(path) as f:
        for line in f:
            line = line.rstrip(b"\n")
            if line.startswith(b"["):
                line = line[1:]
            if line.endswith((b",", b"]")):
                line = line[:-1]
            if line:
                yield loads(line)


def _yaml_objects(path: Path, both_ways: int = YAML_BOTH_WAYS, stop: int = 0) -> Iterator[dict[str, Any]]:
    """The mappings of a YAML sequence, read fast when it is one flow mapping per line.

    PyYAML's loader reads about 5,000 records a second: a million would take
    minutes. A line ``- {...}`` that is also valid JSON is read with orjson, and
    the first ``both_ways`` lines are read both ways and must agree, which
    checks that the writer's JSON means the same to YAML; a line that is not
    JSON is read with PyYAML. Any other layout is read whole with PyYAML.
    """
    with _open(path) as f:
        flow = f.read(3) == b"- {"
    if not flow:
        with _open(path) as f:
            yield from yaml.load(f, Loader=YamlLoader) or []
        return
    loads, dumps = orjson.loads, orjson.dumps
    with _open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.startswith(b"- {"):
                raise Mismatch(f"{path.name} line {number}: not a one-line sequence item: {line[:80]!r}")
            try:
                record = loads(line[2:])
            except orjson.JSONDecodeError:
                record = None
            if record is None or number <= both_ways:
                (as_yaml,) = yaml.load(line, Loader=YamlLoader)
                if record is not None and dumps(as_yaml) != dumps(record):
                    raise Mismatch(
                        f"{path.name} line {number} reads differently as YAML: {as_yaml} "
                        f"and as JSON: {record}"
                    )
                record = as_yaml
            yield record
            if number == stop:
                return


def file_digest(path: Path, fmt: str) -> Digest:
    """The canonical digest of an exported data file (``.gz`` is decompressed)."""
    if fmt == "jsonl":
        objects: Iterable[dict[str, Any]] = _jsonl_objects(path)
    elif fmt == "sqlite3-json":
        objects = _sqlite3_json_objects(path)
    elif fmt == "json":
        with _open(path) as f:
            objects = orjson.loads(f.read())
    elif fmt == "yaml":
        objects = _yaml_objects(path)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return _digest(_batched(objects))


def content_sha256(path: Path) -> str:
    """SHA-256 of a file's content, decompressed when it is gzip'd."""
    h = hashlib.sha256()
    with _open(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def json_lines_sha256(path: Path, fmt: str) -> str | None:
    """SHA-256 of the JSON lines a file holds in one of the layouts the service writes, else None.

    ``jsonl``: the (decompressed) content. ``json``: ``[``, then one object a
    line, ``,`` between lines, then ``]``. ``yaml``: one ``- {...}`` a line.
    Two files with the same JSON lines hold the same rows, so a ``json`` or
    ``yaml`` file whose lines are those of a checked ``jsonl`` file needs no
    parsing of its own (for YAML, ``yaml_reads_as_json`` checks that its JSON
    means the same to a YAML reader).
    """
    h = hashlib.sha256()
    with _open(path) as f:
        if fmt == "jsonl":
            while chunk := f.read(1 << 20):
                h.update(chunk)
        elif fmt == "json":
            if f.readline() != b"[\n":  # not so for an empty table ("[]"): parsed instead
                return None
            row, closed = None, False
            for line in f:
                if closed:
                    return None
                if line == b"]\n":  # a row is an object: this is the array's end
                    if row is None or not row.endswith(b"}\n"):
                        return None
                    h.update(row)
                    row, closed = None, True
                    continue
                if row is not None:
                    if not row.endswith(b"},\n"):
                        return None
                    h.update(row[:-2] + b"\n")
                row = line
            if not closed:
                return None
        elif fmt == "yaml":
            for line in f:
                if not line.startswith(b"- {"):
                    return None
                h.update(line[2:])
        else:
            return None
    return h.hexdigest()


def yaml_reads_as_json(path: Path, lines: int = YAML_BOTH_WAYS) -> None:
    """The first ``lines`` lines of a flow-style YAML file read the same with PyYAML and as JSON."""
    for _ in _yaml_objects(path, both_ways=lines, stop=lines):
        pass


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def count_lines(path: Path) -> int:
    lines = 0
    with _open(path) as f:
        while chunk := f.read(1 << 22):
            lines += chunk.count(b"\n")
    return lines


def sampled_check(path: Path, db: Path, table: str, columns: list[str], every: int) -> int:
    """Compare every ``every``-th line of a JSON-lines export with the source row of that id.

    For tables too big to digest in the time budget: with the line count and the
    service's own SHA-256 checked too, it catches any systematic encoding error.
    """
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    checked = 0
    try:
        with _open(path) as f:
            for number, line in enumerate(f):
                if number % every:
                    continue
                obj = orjson.loads(line)
                if list(obj) != columns:
                    raise Mismatch(f"line {number + 1}: keys {list(obj)} are not the columns {columns}")
                row = con.execute(f'SELECT * FROM "{table}" WHERE rowid = ?', (obj[columns[0]],)).fetchone()
                if row is None or orjson.dumps(list(row)) != orjson.dumps(list(obj.values())):
                    raise Mismatch(f"line {number + 1} differs from the source row: {obj} != {row}")
                checked += 1
    finally:
        con.close()
    return checked
