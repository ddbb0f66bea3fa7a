"""executor.sources.sqlitemem: SQLite stops counting allocations, and still reads and writes."""

from __future__ import annotations

import ctypes
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import ROOT, make_shop_db

PROGRAM = textwrap.dedent(
    """
    import ctypes, sqlite3
    from executor.sources.sqlitemem import turn_off_memory_statistics

    library = ctypes.CDLL("libsqlite3.so.0")
    library.sqlite3_memory_used.restype = ctypes.c_int64
    before = sqlite3.connect(":memory:")
    before.execute("CREATE TABLE t (x)")
    counted = library.sqlite3_memory_used()
    before.close()
    assert turn_off_memory_statistics()
    after = sqlite3.connect(":memory:")
    after.execute("CREATE TABLE t (x)")
    after.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
    rows = after.execute("SELECT json_group_array(x) FROM t").fetchone()[0]
    print(counted, library.sqlite3_memory_used(), len(rows))
    """
)


def test_a_process_turns_the_statistics_off_and_sqlite_works_on() -> None:
    """In a process of its own: the call is only safe before any connection stays open."""
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    counted, after, length = map(int, done.stdout.split())
    assert counted > 0  # on by default: the statistics counted the first connection's memory
    assert after == 0  # off: nothing counted any more
    assert length == len("[" + ",".join(map(str, range(1000))) + "]")


def test_an_export_run_in_a_programs_own_process_leaves_the_statistics_on(tmp_path: Path) -> None:
    """Only the console script may switch them: here this process holds other connections."""
    from extracts import commands

    library = ctypes.CDLL("libsqlite3.so.0")
    library.sqlite3_memory_used.restype = ctypes.c_int64
    held = sqlite3.connect(make_shop_db(tmp_path / "shop.db"))  # a connection the program keeps open
    try:
        held.execute("SELECT count(*) FROM users").fetchone()
        assert (
            commands.run_command(["export", str(tmp_path / "shop.db"), "-d", str(tmp_path / "out"), "-q"])
            == 0
        )
        before = library.sqlite3_memory_used()
        assert held.execute("SELECT count(*) FROM users").fetchone() == (4,)
        held.execute("CREATE TEMP TABLE grown AS SELECT randomblob(1000000) AS b")
        # Still counted: SQLite was never shut down under the open connection.
        assert library.sqlite3_memory_used() > before
    finally:
        held.close()
