"""SQLiteSource: opening read-only, the catalog, exact values, snapshots and safe names."""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import VALUES, assert_same_rows, build_big_table, make_source, run_sql, source_rows

from executor import SourceError, UnknownSchema, open_source, safe_file_name
from executor.naming import download_base_name
from executor.sources.sqlite import SQLiteSource


def export(source: SQLiteSource, name: str, batch_size: int = 1000, where: dict | None = None) -> list[dict]:
    with source.snapshot():
        return [json.loads(row) for batch in source.json_batches(name, where, batch_size) for row in batch]


# ---------------------------------------------------------------- opening


def test_a_missing_file_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    with pytest.raises(SourceError, match=f"Source database {missing} does not exist"):
        open_source(str(missing))
    assert not missing.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a database, just some text " * 50, "file is not a database"),
        (None, "is a directory"),
    ],
)
def test_what_is_not_a_database_is_one_clear_line(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "source.db"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(SourceError, match=message) as raised:
        open_source(str(path))
    assert "\n" not in str(raised.value)


def test_sqlite_urls_and_odd_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "a dir?#%"
    folder.mkdir()
    db = make_source(folder / "my db.sqlite")
    monkeypatch.chdir(tmp_path)
    for location in (str(db), "sqlite:///a dir?#%/my db.sqlite", f"sqlite:///{db}"):
        with open_source(location) as source:
            assert source.location() == {
                "dialect": "sqlite",
                "path": str(db),
                "version": sqlite3.sqlite_version,
            }
            assert source.count("users", None) == 4


def test_the_source_is_never_written(tmp_path: Path) -> None:
    db = make_source(tmp_path / "source.db")
    run_sql(db, "PRAGMA wal_checkpoint(TRUNCATE)")
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with open_source(str(db)) as source:
        export(source, "users")
        source.describe(["users"])
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            source._conn.execute("DELETE FROM users")  # type: ignore[attr-defined]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


# ---------------------------------------------------------------- catalog


def test_internal_tables_never_appear(tmp_path: Path) -> None:
    db = run_sql(
        tmp_path / "source.db",
        "CREATE TABLE counters (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER);"
        "INSERT INTO counters (n) VALUES (1); CREATE INDEX counters_n ON counters (n);"
        "CREATE VIRTUAL TABLE docs USING fts5(body); INSERT INTO docs VALUES ('hello'); ANALYZE;",
    )
    with open_source(str(db)) as source:
        assert [(s["name"], s["type"], s["row_count"]) for s in source.schemas()] == [
            ("counters", "table", 1),
            ("docs", "table", 1),
        ]
        for internal in ("sqlite_sequence", "sqlite_stat1", "sqlite_master", "docs_data", "nope"):
            with pytest.raises(UnknownSchema, match=f"Schema '{internal}' does not exist in the source"):
                source.columns(internal)
        assert export(source, "docs") == [{"body": "hello"}]


def test_an_unreadable_view_or_virtual_table_is_left_out_of_the_list(tmp_path: Path) -> None:
    db = run_sql(
        tmp_path / "source.db",
        "CREATE TABLE gone (a); CREATE TABLE kept (a);"
        "CREATE VIEW broken AS SELECT * FROM gone; DROP TABLE gone; PRAGMA writable_schema = ON;"
        "INSERT INTO sqlite_master (type, name, tbl_name, rootpage, sql) VALUES ('table', 'vx',"
        " 'vx', 0, 'CREATE VIRTUAL TABLE vx USING no_such_module (a)');",
    )
    with open_source(str(db)) as source:
        assert [s["name"] for s in source.schemas()] == source.names() == source.tables() == ["kept"]
        with pytest.raises(SourceError, match="no such module: no_such_module"):
            source.columns("vx")


def test_schemas_lists_tables_and_views_with_counts(tmp_path: Path) -> None:
    with open_source(str(make_source(tmp_path / "source.db"))) as source:
        assert source.schemas() == [
            {"name": "../../etc/passwd", "type": "table", "columns": 1, "row_count": 2},
            {"name": "adults", "type": "view", "columns": 2, "row_count": 2},
            {"name": "empty", "type": "table", "columns": 2, "row_count": 0},
            {"name": "keyed", "type": "table", "columns": 2, "row_count": 2},
            {"name": 'notes "2024" Zoë\'s', "type": "table", "columns": 2, "row_count": 2},
            {"name": "order items", "type": "table", "columns": 4, "row_count": 20},
            {"name": "orders", "type": "table", "columns": 4, "row_count": 50},
            {"name": "users", "type": "table", "columns": 7, "row_count": 4},
            {"name": "values", "type": "table", "columns": 3, "row_count": len(VALUES)},
        ]
        assert source.tables() == [s["name"] for s in source.schemas() if s["name"] != "adults"]
        assert source.describe(["adults"])["adults"] == {
            "type": "view",
            "columns": {
                "id": {"type": "INTEGER", "required": False, "default": None, "primary_key": False},
                "name": {"type": "TEXT", "required": False, "default": None, "primary_key": False},
            },
            "primary_key": [],
            "foreign_keys": [],
            "indexes": [],
            "row_count": 2,
        }


def test_a_reference_to_the_parent_key_names_its_columns(tmp_path: Path) -> None:
    db = run_sql(
        tmp_path / "source.db",
        "CREATE TABLE parent (a TEXT, b INTEGER, PRIMARY KEY (a, b));"
        "CREATE TABLE child (x TEXT, y INTEGER, FOREIGN KEY (x, y) REFERENCES parent"
        " ON DELETE SET NULL);",
    )
    with open_source(str(db)) as source:
        assert source.describe(["child"])["child"]["foreign_keys"] == [
            {
                "columns": ["x", "y"],
                "references": {"table": "parent", "columns": ["a", "b"]},
                "on_update": "NO ACTION",
                "on_delete": "SET NULL",
            }
        ]


# ---------------------------------------------------------------- values


@pytest.mark.slow
def test_random_doubles_come_back_bit_for_bit(tmp_path: Path) -> None:
    rng = random.Random(20261128)
    doubles = [struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(30_000)]
    doubles += [struct.unpack("<d", rng.getrandbits(52).to_bytes(8, "little"))[0] for _ in range(3_000)]
    doubles += [rng.uniform(-1e6, 1e6) for _ in range(3_000)]
    doubles += [
        round(rng.uniform(-2e9, 2e9) / 10 ** rng.randrange(12), rng.randrange(10)) for _ in range(20_000)
    ]  # decimals: the short form
    doubles += [1.7976931348623157e308, 2.2250738585072014e-308, -0.0, float("inf"), float("-inf")]
    doubles = [d for d in doubles if d == d]  # SQLite stores NaN as NULL
    db = tmp_path / "source.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE r (untyped, typed REAL)")
    con.executemany("INSERT INTO r VALUES (?, ?)", [(d, d) for d in doubles])
    con.commit()
    con.close()
    with open_source(str(db)) as source:
        rows = export(source, "r", 5000)
    assert_same_rows(rows, source_rows(db, "r"))  # as stored (a REAL column keeps -0.0 as 0)
    special = {float("inf"): "Infinity", float("-inf"): "-Infinity"}
    assert_same_rows([{"v": row["untyped"]} for row in rows], [{"v": special.get(d, d)} for d in doubles])


def test_reals_are_written_short_when_that_is_exact(tmp_path: Path) -> None:
    values = [19.99, 0.1, -2.5, 100.0, 12345.67, 1e-06, 999999999.999999, 1 / 7, 0.1 + 0.2, 1e-07, 1e9 + 0.5]
    db = run_sql(tmp_path / "source.db", "CREATE TABLE r (x REAL)")
    con = sqlite3.connect(db)
    con.executemany("INSERT INTO r VALUES (?)", [(v,) for v in values])
    con.commit()
    con.close()
    with open_source(str(db)) as source, source.snapshot():
        ((chunk, _),) = source.json_lines("r", None, 100)
    assert chunk.decode().split("\n") == [
        '{"x":19.99}',
        '{"x":0.1}',
        '{"x":-2.5}',
        '{"x":100.0}',
        '{"x":12345.67}',
        '{"x":1.0e-06}',
        '{"x":999999999.999999}',
        '{"x":0.142857142857142849}',
        '{"x":0.300000000000000044}',
        '{"x":9.99999999999999955e-08}',
        '{"x":1000000000.5}',
    ]


def test_text_that_is_not_utf8_still_gives_valid_json(tmp_path: Path) -> None:
    db = run_sql(
        tmp_path / "source.db",
        "CREATE TABLE t (id INTEGER PRIMARY KEY, s TEXT);"
        "INSERT INTO t (s) VALUES (CAST(x'4361666580ff' AS TEXT)), ('ok é');"
        "CREATE VIEW v AS SELECT * FROM t;",
    )
    with open_source(str(db)) as source:
        for name in ("t", "v"):
            assert export(source, name) == [{"id": 1, "s": "Cafe\ufffd\ufffd"}, {"id": 2, "s": "ok é"}]


@pytest.mark.parametrize("offset", range(8))
def test_utf8_is_checked_across_piece_boundaries(tmp_path: Path, offset: int) -> None:
    # 64 KiB pieces: an emoji straddles a boundary, then a stray byte lies past it.
    long = "x" * (65_536 - 9 - offset) + "🎉" + "€" * 30_000
    db = run_sql(tmp_path / "source.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, s TEXT)")
    con = sqlite3.connect(db)
    con.execute("INSERT INTO t (s) VALUES (?)", (long,))
    bad = long.encode()[:70_000] + b"\xe2\x82" + "end 🎈".encode()
    con.execute("INSERT INTO t (s) VALUES (CAST(? AS TEXT))", (bad,))
    con.commit()
    con.close()
    with open_source(str(db)) as source:
        assert export(source, "t") == [{"id": 1, "s": long}, {"id": 2, "s": bad.decode("utf-8", "replace")}]


def test_every_kind_of_column_keeps_its_values(tmp_path: Path) -> None:
    db = tmp_path / "source.db"
    con = sqlite3.connect(db)
    wide = ", ".join(f'"c{i}"' for i in range(150))
    con.executescript(f"""
        CREATE TABLE mixed (id INTEGER PRIMARY KEY, i INTEGER, r REAL, t TEXT, b BLOB, n NUMERIC, v);
        CREATE TABLE strict (i INTEGER, r REAL, t TEXT, b BLOB, a ANY) STRICT;
        CREATE TABLE shadowed (rowid TEXT, _rowid_ TEXT, oid TEXT, v);
        CREATE TABLE one_shadow (rowid TEXT, v);
        CREATE TABLE wide ({wide});
        CREATE TABLE gen (x REAL, y TEXT GENERATED ALWAYS AS (x * 2));
        CREATE TABLE desc_key (id INTEGER PRIMARY KEY DESC, v);  -- not a rowid alias: any value
        -- 'ﬅ'.upper() is 'ST' to Python: NUMERIC affinity to SQLite, not TEXT.
        CREATE TABLE ligature (a \ufb05ext);
    """)
    values = [0, 1, -1, 2**63 - 1, 1.5, -0.0, 1e300, float("inf"), "text", "12", b"\x00\x01", None, ""]
    for index, value in enumerate(values):
        con.execute("INSERT INTO mixed VALUES (?, ?, ?, ?, ?, ?, ?)", (index, *[value] * 6))
        con.execute("INSERT INTO shadowed VALUES (?, ?, ?, ?)", ("a", "b", "c", value))
        con.execute("INSERT INTO one_shadow VALUES (?, ?)", ("a", value))
        con.execute(
            f"INSERT INTO wide VALUES ({', '.join('?' * 150)})",
            [values[(index + i) % len(values)] for i in range(150)],
        )
        con.execute("INSERT INTO gen (x) VALUES (?)", (index / 3,))
        con.execute("INSERT OR IGNORE INTO desc_key VALUES (?, ?)", (value, index))
        con.execute("INSERT INTO ligature VALUES (?)", (value,))
    con.executemany(
        "INSERT INTO strict VALUES (?, ?, ?, ?, ?)",
        [
            (1, 2.5, "x", b"\x00", 3.5),
            (None, None, None, None, None),
            (-5, -0.0, "", b"", b"z"),
            (2**63 - 1, float("-inf"), "é", b"\xff", "t"),
        ],
    )
    # SQLite 3.37-3.4x let ADD COLUMN give rows already there a default their STRICT type
    # refuses (newer ones refuse the ALTER): the types hold no promise about those rows.
    con.execute("INSERT INTO strict (i) VALUES (7)")
    for column in (
        "f REAL DEFAULT 'txt'",
        "k REAL DEFAULT x'01'",
        "c INT DEFAULT 0.30000000000000004",
        "d INT DEFAULT 1e999",
        "e TEXT DEFAULT x'ff'",
        "g BLOB DEFAULT 'txt'",
    ):
        try:
            con.execute(f"ALTER TABLE strict ADD COLUMN {column}")
        except sqlite3.OperationalError:
            continue
    con.commit()
    con.close()
    with open_source(str(db)) as source:
        for name in ("mixed", "strict", "shadowed", "one_shadow", "wide", "gen", "desc_key", "ligature"):
            for batch_size in (1, 4, 10_000):
                assert_same_rows(export(source, name, batch_size), source_rows(db, name))
        assert list(export(source, "wide")[0]) == [f"c{i}" for i in range(150)]


@pytest.mark.parametrize("encoding", ["UTF-16le", "UTF-16be"])
def test_a_utf16_database_is_written_as_utf8(tmp_path: Path, encoding: str) -> None:
    # Casting text to a blob, which gives a UTF-8 database's JSON its bytes for free,
    # gives a UTF-16 one's UTF-16 bytes.
    db = tmp_path / "source.db"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA encoding = '{encoding}'")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b)")
    con.execute('CREATE TABLE "tâble" ("çol" TEXT)')  # WITHOUT a rowid alias: any column
    con.executemany(
        "INSERT INTO t VALUES (?, ?, ?)", [(1, "é", "héllo 😀"), (2, "plain", 1.5), (3, None, b"\xff")]
    )
    con.execute("INSERT INTO \"tâble\" VALUES ('ünï')")
    con.commit()
    con.close()
    with open_source(str(db)) as source:
        assert source.names() == ["t", "tâble"]
        assert_same_rows(export(source, "t"), source_rows(db, "t"))
        assert export(source, "tâble") == [{"çol": "ünï"}]
        with source.snapshot():
            assert b"".join(chunk for chunk, _ in source.json_lines("t", None, 10)).decode("utf-8")


def test_a_collation_this_process_lacks_does_not_stop_the_export(tmp_path: Path) -> None:
    db = tmp_path / "source.db"
    con = sqlite3.connect(db)
    con.create_collation("app_order", lambda a, b: (a > b) - (a < b))
    con.executescript("""
        CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT COLLATE app_order, b COLLATE app_order,
                        r REAL COLLATE app_order);
        INSERT INTO t VALUES (1, 'x', x'01', 0.1), (2, 'y', 'z', 2.5);
        CREATE VIEW v AS SELECT a, b, r FROM t;
    """)
    con.close()
    with open_source(str(db)) as source:
        assert_same_rows(export(source, "t"), source_rows(db, "t"))
        # A view over such a column is another matter: SQLite itself cannot read it.
        with pytest.raises(SourceError, match="Cannot read 'v' in .*: no such collation sequence: app_order"):
            export(source, "v")


def test_names_that_are_not_utf8_leave_out_only_what_cannot_be_named(tmp_path: Path) -> None:
    db = tmp_path / "source.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE plain (a)")
    con.execute("INSERT INTO plain VALUES (1)")
    con.commit()
    con.close()
    # SQLite does not check TEXT, names included; Python's sqlite3 cannot send these.
    script = (
        b'CREATE TABLE "bad\xff" (a);'
        b'CREATE TABLE badcol (a, "c\xfe" TEXT);'
        b"CREATE TABLE odd (a TY\xffPE DEFAULT 'x\xff', b INTEGER);"
        b'CREATE INDEX "ix\xff" ON odd (b);'
        b"INSERT INTO odd (a, b) VALUES (1.5, 2);"
    )
    subprocess.run(["sqlite3", str(db)], input=script, check=True)
    with open_source(str(db)) as source:
        assert source.names() == ["odd", "plain"]  # the others cannot be named: left out
        assert export(source, "odd") == [{"a": 1.5, "b": 2}]
        described = source.describe(["odd"])["odd"]
        assert described["columns"]["a"]["type"] == "TY\ufffdPE"
        assert described["columns"]["a"]["default"] == "'x\ufffd'"
        assert described["indexes"] == [{"name": "ix\ufffd", "columns": ["b"], "unique": False}]
        with pytest.raises(SourceError, match="the name of column 'c\ufffd' is not UTF-8"):
            source.columns("badcol")


def test_big_tables_stream_in_bounded_batches(tmp_path: Path) -> None:
    db = tmp_path / "source.db"
    build_big_table(db, "big", 30_000)
    with open_source(str(db)) as source, source.snapshot():
        sizes = [len(batch) for batch in source.json_batches("big", {"n": {"$lt": 500}}, 2_000)]
    assert sum(sizes) == 15_000 and max(sizes) <= 2_000 and len(sizes) >= 8


def test_chunks_shrink_under_sqlites_string_limit(tmp_path: Path) -> None:
    db = run_sql(tmp_path / "source.db", "CREATE TABLE files (id INTEGER PRIMARY KEY, body BLOB)")
    con = sqlite3.connect(db)
    con.executemany(
        "INSERT INTO files (body) VALUES (?)", [(bytes([i]) * (20_000 if i % 3 else 10),) for i in range(100)]
    )
    con.commit()
    con.close()
    with open_source(str(db)) as source:
        source._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 100_000)  # type: ignore[attr-defined]
        assert_same_rows(export(source, "files"), source_rows(db, "files"))


# ---------------------------------------------------------------- snapshot and cancellation


def test_a_snapshot_does_not_see_later_commits(tmp_path: Path) -> None:
    db = make_source(tmp_path / "source.db")
    writer = sqlite3.connect(db)
    with open_source(str(db)) as source, source.snapshot():
        writer.execute("INSERT INTO users (id, email) VALUES (10, 'late@example.com')")
        writer.execute("DELETE FROM orders")
        writer.commit()
        assert source.count("users", None) == 4
        assert len([r for b in source.json_batches("orders", None, 10) for r in b]) == 50
    with open_source(str(db)) as source:
        assert (source.count("users", None), source.count("orders", None)) == (5, 0)
    writer.close()


def test_interrupt_stops_a_running_statement(tmp_path: Path) -> None:
    db = tmp_path / "source.db"
    build_big_table(db, "big", 200_000)
    stop = threading.Event()
    with open_source(str(db)) as source:

        def interrupt_until_stopped() -> None:  # one call between two statements is lost
            while not stop.wait(0.05):
                source.interrupt()

        interrupter = threading.Thread(target=interrupt_until_stopped)
        interrupter.start()
        started = time.monotonic()
        try:
            with pytest.raises(SourceError, match="interrupted"), source.snapshot():
                while time.monotonic() - started < 10:
                    source.count("big", {"label": {"$like": "%never%"}, "amount": {"$gt": -1}})
        finally:
            stop.set()
            interrupter.join()
        assert time.monotonic() - started < 2


def read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sqlite-read-ahead"]


def test_interrupt_stops_a_streaming_read_in_its_thread(tmp_path: Path) -> None:
    db = tmp_path / "source.db"
    build_big_table(db, "big", 200_000)
    stop = threading.Event()
    with open_source(str(db)) as source:

        def interrupt_until_stopped() -> None:
            # A statement runs about 1 ms of each 10 ms chunk here; an interrupt between two is
            # lost (the worker's monitor repeats it too). Every 50 ms, a loaded machine let one
            # whole read through without a hit (CI, once): every 2 ms, hundreds of tries.
            while not stop.wait(0.002):
                source.interrupt()

        read = 0
        interrupter = threading.Thread(target=interrupt_until_stopped)
        try:
            with pytest.raises(SourceError, match="interrupted"), source.snapshot():
                for _chunk, count in source.json_lines("big", None, 1_000):
                    read += count
                    if not interrupter.is_alive():
                        interrupter.start()
                    time.sleep(0.01)  # a slow writer: the reader waits one chunk ahead
        finally:
            stop.set()
            interrupter.join()
        assert 0 < read < 200_000
        assert not read_ahead_threads()
        assert source.count("big", None) == 200_000  # the connection is whole again


def test_a_read_stopped_early_leaves_no_thread_and_a_usable_connection(tmp_path: Path) -> None:
    db = tmp_path / "source.db"
    build_big_table(db, "big", 50_000)
    with open_source(str(db)) as source:
        with source.snapshot():
            lines = source.json_lines("big", None, 1_000)
            first, count = next(lines)
            assert count == first.count(b"\n") + 1 and read_ahead_threads()
            lines.close()
            assert not read_ahead_threads()
            assert source.count("big", None) == 50_000
        chunks = list(source.json_lines("big", {"n": {"$lt": 500}}, 1_000))
        assert sum(count for _, count in chunks) == 25_000
        assert all(chunk.count(b"\n") + 1 == count for chunk, count in chunks)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("schema", "file_name"),
    [
        ("users", "users"),
        ("order items", "order%20items"),
        ("../../etc/passwd", "%2E%2E%2F..%2Fetc%2Fpasswd"),
        (".", "%2E"),
        ("..", "%2E%2E"),
        (".hidden.tbl", "%2Ehidden.tbl"),
        ("100%", "100%25"),
        ('we"ird\\name', "we%22ird%5Cname"),
        ("Café 李", "Caf%C3%A9%20%E6%9D%8E~1"),
        ("a-b_c.d", "a-b_c.d"),
        ("", "%00"),
    ],
)
def test_safe_file_names(schema: str, file_name: str) -> None:
    assert safe_file_name(schema) == file_name


def test_long_names_are_cut_without_collisions() -> None:
    first, second = "李" * 100 + "a", "李" * 100 + "b"
    assert safe_file_name(first) != safe_file_name(second)
    assert len(safe_file_name(first)) <= 200 and "~" in safe_file_name(first)


def test_download_names() -> None:
    assert (
        download_base_name("Daily Backup", "2026-11-28T17:00:00.000Z", "run_abcdefgh")
        == "Daily-Backup-2026-11-28-run_abcd"
    )
    # SPEC: runs outside [A-Za-z0-9_-] become "-", at either end too (no trimming, no fallback).
    assert (
        download_base_name("  ¡Ünïcode!  export ", "2025-01-19T00:00:00Z", "run_xyz789")
        == "-n-code-export--2025-01-19-run_xyz7"
    )
    assert download_base_name("***", "2025-01-19T00:00:00Z", "run_1") == "--2025-01-19-run_1"
    assert download_base_name("-x-", "2026-12-01T00:00:00Z", "run_1234abcd") == "-x--2026-12-01-run_1234"
    assert (
        download_base_name("Sales report!", "2026-12-01T00:00:00Z", "run_1234abcd")
        == "Sales-report--2026-12-01-run_1234"
    )
    assert download_base_name("a_b-c", "2026-12-01T00:00:00Z", "run_1") == "a_b-c-2026-12-01-run_1"
