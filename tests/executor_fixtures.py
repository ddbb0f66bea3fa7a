"""Helpers for the executor tests: real SQLite sources, jobs, and reading exports back."""

from __future__ import annotations

import base64
import gzip
import json
import math
import multiprocessing
import sqlite3
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from executor import run_extract

SOURCE_SCHEMA = '''
PRAGMA journal_mode = WAL;
CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT,
                    age INTEGER DEFAULT 18, score REAL, avatar BLOB,
                    created_at TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')));
CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users (id)
                     ON DELETE CASCADE, total REAL NOT NULL DEFAULT 0, note TEXT);
CREATE INDEX orders_user ON orders (user_id);
CREATE TABLE "order items" (order_id INTEGER NOT NULL REFERENCES orders (id) ON UPDATE CASCADE,
                            line INTEGER NOT NULL, "sku ""quoted""" TEXT, qty INTEGER,
                            PRIMARY KEY (order_id, line));
CREATE UNIQUE INDEX "items by sku" ON "order items" ("sku ""quoted""", line);
CREATE TABLE "values" (id INTEGER PRIMARY KEY, v, label TEXT);
CREATE TABLE "../../etc/passwd" (x TEXT);
CREATE TABLE "notes ""2024"" Zoë's" ("the ""text""" TEXT, n INTEGER);
CREATE TABLE empty (a INTEGER, b TEXT);
CREATE TABLE keyed (k TEXT PRIMARY KEY, n INT) WITHOUT ROWID;
CREATE VIEW adults AS SELECT id, name FROM users WHERE age >= 18;
'''

TEXTS = [
    "Ana Żółć",
    "Bo 李",
    "",
    "emoji 😀 𝄞",
    'quote " back \\ slash',
    "tab\tnew\nline\r",
    "nul\x00byte",
    "\u2028\u2029\x85\ufeff",
    "del\x7f c1\x9f \uffff",
    "12",
    "null",
    "true",
    "- dash",
    "{",
    "}",
    "a: b",
    "# hash",
    "&anchor *alias",
    "550e8400-e29b-41d4",
    "ratio:1e5",
]
VALUES: list[Any] = [
    2**63 - 1,
    -(2**63),
    0,
    1,
    -1,
    2**53 + 1,
    0.1 + 0.2,
    1e308,
    -1e308,
    5e-324,
    -0.0,
    0.0,
    1.0,
    2.0**60,
    1e16 + 2,
    123456789.125,
    float("inf"),
    float("-inf"),
    None,
    b"",
    b"\x00\xff\x10 blob",
    *TEXTS,
]
USERS = [
    (1, "ana@example.com", "Ana Żółć", 34, 0.1 + 0.2, b"\x00\xff\x10"),
    (2, "bo@example.com", "Bo 李", 17, None, None),
    (3, "cy@example.com", None, 70, 1e308, b""),
    (2**62, "big@example.com", "Big", None, -0.5, None),
]


def make_source(path: Path) -> Path:
    """A WAL source with every awkward case: keys, names, storage classes, an empty table."""
    con = sqlite3.connect(path)
    con.executescript(SOURCE_SCHEMA)
    con.executemany(
        "INSERT INTO users (id, email, name, age, score, avatar) VALUES (?, ?, ?, ?, ?, ?)", USERS
    )
    con.executemany(
        "INSERT INTO orders (id, user_id, total, note) VALUES (?, ?, ?, ?)",
        [(i, 1 + i % 3, i * 1.25, None if i % 2 else f"note {i} ✓") for i in range(1, 51)],
    )
    con.executemany(
        'INSERT INTO "order items" VALUES (?, ?, ?, ?)',
        [(o, n, f"SKU-{o}-{n}", n) for o in range(1, 11) for n in (1, 2)],
    )
    con.executemany(
        'INSERT INTO "values" (v, label) VALUES (?, ?)', [(value, repr(value)) for value in VALUES]
    )
    con.executemany('INSERT INTO "../../etc/passwd" VALUES (?)', [("root:x:0:0",), ("daemon",)])
    con.executemany('INSERT INTO "notes ""2024"" Zoë\'s" VALUES (?, ?)', [('a "b"', 1), ("ü", 2)])
    con.executemany("INSERT INTO keyed VALUES (?, ?)", [("b", 2), ("a", 1)])
    con.commit()
    con.close()
    return path


def run_sql(db: Path, script: str) -> Path:
    """Run an SQL script on ``db`` with a connection of its own (another application)."""
    con = sqlite3.connect(db)
    try:
        con.executescript(script)
    finally:
        con.close()
    return db


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def json_value(value: Any) -> Any:
    """What the SPEC's encoding makes of an SQLite value."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def source_rows(db: Path, name: str, sql: str | None = None, params: tuple = ()) -> list[dict[str, Any]]:
    """The rows of ``name`` as the export should hold them, read with plain sqlite3."""
    con = sqlite3.connect(db)
    try:
        cursor = con.execute(sql or f"SELECT * FROM {quote(name)}", params)
        columns = [d[0] for d in cursor.description]
        return [{c: json_value(v) for c, v in zip(columns, row, strict=True)} for row in cursor]
    finally:
        con.close()


def same(got: Any, want: Any) -> bool:
    """Equal, with the same type, and floats with the same sign (-0.0 is not 0.0)."""
    if type(got) is not type(want):
        return False
    if isinstance(want, dict):
        return list(got) == list(want) and all(same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, float):
        return got == want and math.copysign(1.0, got) == math.copysign(1.0, want)
    return got == want


def assert_same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert same(g, w), f"row {index}: {g!r} != {w!r}"


def parse_records(data: bytes, fmt: str) -> list[dict[str, Any]]:
    """The records of one (decompressed) data file."""
    if fmt == "jsonl":
        return [json.loads(line) for line in data.split(b"\n")[:-1]] if data else []
    if fmt == "json":
        return json.loads(data)
    return yaml.safe_load(data)


def read_file(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def make_job(tmp_path: Path, source: Path | str, run_id: str = "run_0123456789ab", **config: Any) -> dict:
    """A job as the service hands it to a worker; ``run_dir`` (not read by the worker) is where
    its files land in the local storage ``storage``."""
    return {
        "run_id": run_id,
        "extract_id": "extract_test",
        "extract_name": "Daily Backup",
        "source": str(source),
        "storage": str(tmp_path / "storage"),
        "run_dir": str(tmp_path / "storage" / run_id),
        "min_free_bytes": 1 << 20,
        "created_at": "2026-11-28T17:00:00.000Z",
        "config": {
            "format": "jsonl",
            "include": ["describe", "data"],
            "schemas": None,
            "filter": None,
            "compress": False,
            "split_files": False,
            "split_max_records": 1_000_000,
        }
        | config,
    }


class Channel:
    """The service's side of a run: a Manager queue and cancel dict, messages collected."""

    def __init__(self, manager: Any) -> None:
        self.queue = manager.Queue()
        self.cancelled = manager.dict()
        self.messages: list[tuple[str, str, dict]] = []

    def drain(self) -> list[tuple[str, str, dict]]:
        while not self.queue.empty():
            self.messages.append(self.queue.get())
        return self.messages

    def artifacts(self) -> list[dict[str, Any]]:
        return [payload for kind, _, payload in self.drain() if kind == "artifact"]

    def progress(self) -> list[dict[str, Any]]:
        return [payload for kind, _, payload in self.drain() if kind == "progress"]

    def run(self, job: dict) -> dict:
        return run_extract(job, self.queue, self.cancelled)

    def run_in_thread(self, job: dict) -> tuple[threading.Thread, dict]:
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(run_extract(job, self.queue, self.cancelled)))
        thread.start()
        return thread, outcome


def manager_fixture() -> Iterator[Any]:
    manager = multiprocessing.Manager()
    yield manager
    manager.shutdown()


def build_big_table(db: Path, name: str, rows: int) -> None:
    """``rows`` rows built by SQLite itself (recursive CTE), not Python loops."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute(f"CREATE TABLE {quote(name)} (id INTEGER PRIMARY KEY, label TEXT, amount REAL, n INTEGER)")
    con.execute(
        f"""
        WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?)
        INSERT INTO {quote(name)} SELECT i, 'row ' || i, i / 7.0, i % 1000 FROM s""",
        (rows,),
    )
    con.commit()
    con.close()
