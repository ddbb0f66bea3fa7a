"""The benchmark's source database: deterministic, seeded, generated inside SQLite.

Tables (``n`` = ``--rows``):

- ``events``: ``n`` rows of 8 columns (integers, reals, unicode text, ISO
  timestamps, some NULLs), about 223 bytes of JSON per row;
- ``accounts``: ``n // 2`` rows of 7 columns, the second table of the two-table run;
- ``events_big``: ``--big-rows`` rows (only when asked), ``events`` repeated in
  blocks with shifted ids, amounts and account ids: copying rows is about four
  times faster than computing them, which keeps a 10M-row table to seconds.

Every value is a function of the row number and the seed (no ``random()``), so
the same options always give the same file. A file is built under a temporary
name and renamed, then reused by later runs (its name carries every option).
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

GENERATOR_VERSION = 1

# Unicode of several scripts, emoji (4-byte UTF-8), and characters JSON must escape.
WORDS = [
    "Zoë",
    "José",
    "Łukasz",
    "Ærøskøbing",
    "naïve café",
    "李小龙",
    "Ἀθηνᾶ",
    "Москва",
    "🚀 launch",
    "Ünïcödé",
    "straße",
    "日本語テキスト",
    "Crème brûlée",
    "señor",
    "Ωmega",
    'tab\tand "quotes"',
    "back\\slash",
    "emoji 🎉🎈",
    "plain ascii",
    "Åsa-Märta",
    "İstanbul",
    "Дмитрий",
    "عربى",
    "עברית",
    "हिन्दी",
    "ελληνικά",
    "中文字符",
    "한국어",
    "Ñandú",
    "Øre",
    "façade",
    "Zürich",
]
COUNTRIES = ["DE", "FR", "JP", "BR", "IN", "US", "PL", "GR", "IL", "KR", "ES", "CN"]

EVENTS_SQL = """
CREATE TABLE {name} (
    id INTEGER PRIMARY KEY,
    account_id INTEGER NOT NULL,
    amount REAL NOT NULL,
    ratio REAL,
    title TEXT NOT NULL,
    note TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT
)"""

ACCOUNTS_SQL = """
CREATE TABLE accounts (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL,
    display_name TEXT NOT NULL,
    country TEXT NOT NULL,
    balance REAL NOT NULL,
    active INTEGER NOT NULL,
    signup_at TEXT NOT NULL
)"""

# {w}: the number of words; :n, :s bound. Row i's values depend on i and the seed only.
EVENTS_ROWS = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :n)
SELECT i,
  (i * 7919 + :s) % 100000 + 1,
  ((i * 104729 + :s * 13) % 10000000) / 100.0,
  CASE WHEN i % 10 = 0 THEN NULL ELSE ((i * 2654435761 + :s) % 1000003) / 1000003.0 END,
  (SELECT w FROM temp.words WHERE words.i = (n.i * 31 + :s) % {w}) || ' #' || i,
  CASE WHEN i % 7 = 0 THEN NULL ELSE
    (SELECT w FROM temp.words WHERE words.i = (n.i * 17 + :s) % {w}) || ' – ' ||
    (SELECT w FROM temp.words WHERE words.i = (n.i * 13 + 5) % {w}) || ' note ' ||
    ((i + :s) * 48271 % 2147483647) END,
  printf('%04d-%02d-%02dT%02d:%02d:%02dZ', 2020 + i % 5, 1 + i * 7 % 12, 1 + i * 11 % 28,
         i * 13 % 24, i * 17 % 60, (i + :s) * 19 % 60),
  CASE WHEN i % 5 = 0 THEN NULL ELSE
    printf('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', 2021 + i % 4, 1 + i * 5 % 12, 1 + i * 3 % 28,
           i * 7 % 24, i * 11 % 60, i * 23 % 60, (i + :s) * 29 % 1000) END
FROM n
"""

ACCOUNTS_ROWS = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :n)
SELECT i,
  'user' || i || '@example.com',
  (SELECT w FROM temp.words WHERE words.i = (n.i * 7 + :s) % {w}) || ' ' ||
    (SELECT w FROM temp.words WHERE words.i = (n.i * 11 + 3) % {w}),
  (SELECT c FROM temp.countries WHERE countries.i = (n.i + :s) % {c}),
  ((i * 6700417 + :s) % 100000000) / 100.0 - 250000,
  (i + :s) % 3 <> 0,
  printf('%04d-%02d-%02dT%02d:%02d:%02dZ', 2015 + i % 9, 1 + i * 5 % 12, 1 + i * 7 % 28,
         i * 11 % 24, i * 13 % 60, (i + :s) * 17 % 60)
FROM n
"""


def source_path(workdir: Path, rows: int, big_rows: int, seed: int) -> Path:
    big = f"-big{big_rows}" if big_rows else ""
    return workdir / "data" / f"bench-v{GENERATOR_VERSION}-rows{rows}{big}-seed{seed}.db"


def ensure_source(workdir: Path, rows: int, big_rows: int, seed: int) -> tuple[Path, float]:
    """The source database for these options, built when missing; (path, seconds spent building)."""
    path = source_path(workdir, rows, big_rows, seed)
    if path.exists():
        return path, 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    building = path.with_suffix(".building")
    building.unlink(missing_ok=True)
    started = time.perf_counter()
    con = sqlite3.connect(building, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode = OFF")
        con.execute("PRAGMA synchronous = OFF")
        con.execute("PRAGMA cache_size = -262144")
        con.execute("BEGIN")
        con.execute("CREATE TEMP TABLE words (i INTEGER PRIMARY KEY, w TEXT NOT NULL)")
        con.executemany("INSERT INTO temp.words VALUES (?, ?)", enumerate(WORDS))
        con.execute("CREATE TEMP TABLE countries (i INTEGER PRIMARY KEY, c TEXT NOT NULL)")
        con.executemany("INSERT INTO temp.countries VALUES (?, ?)", enumerate(COUNTRIES))
        con.execute(EVENTS_SQL.format(name="events"))
        con.execute("INSERT INTO events " + EVENTS_ROWS.format(w=len(WORDS)), {"n": rows, "s": seed})
        con.execute(ACCOUNTS_SQL)
        con.execute(
            "INSERT INTO accounts " + ACCOUNTS_ROWS.format(w=len(WORDS), c=len(COUNTRIES)),
            {"n": rows // 2, "s": seed},
        )
        if big_rows:
            con.execute(EVENTS_SQL.format(name="events_big"))
            for block in range(-(-big_rows // rows)):
                con.execute(
                    "INSERT INTO events_big SELECT id + :k * :n, (account_id + :k * 7919) % 100000 + 1, "
                    "amount + :k, ratio, title, note, created_at, updated_at FROM events "
                    "WHERE id <= :big - :k * :n ORDER BY id",
                    {"k": block, "n": rows, "big": big_rows},
                )
        con.execute("COMMIT")
    finally:
        con.close()
    os.replace(building, path)
    return path, time.perf_counter() - started


def warm_cache(path: Path) -> None:
    """Read the file once so every contender starts from the same warm page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
