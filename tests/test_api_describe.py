"""The describe API against a real SQLite source with awkward names and keys."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from helpers import InProcessService

from extracts.catalog import Catalog


def column(type_: str, required: bool = False, default=None, primary_key: bool = False) -> dict:
    return {"type": type_, "required": required, "default": default, "primary_key": primary_key}


def test_list_schemas(app_service: InProcessService) -> None:
    r = app_service.client.get("/api/describe")
    assert r.json() == {
        "success": True,
        "data": [
            {"name": "adults", "type": "view", "columns": 2, "row_count": 2},
            {"name": "order items", "type": "table", "columns": 4, "row_count": 20},
            {"name": "orders", "type": "table", "columns": 4, "row_count": 50},
            {"name": "users", "type": "table", "columns": 7, "row_count": 4},
        ],
    }


def test_composite_key_foreign_key_and_quoted_names(app_service: InProcessService) -> None:
    r = app_service.client.get("/api/describe/order items")
    assert r.json() == {
        "success": True,
        "data": {
            "name": "order items",
            "type": "table",
            "columns": {
                "order_id": column("INTEGER", True, primary_key=True),
                "line": column("INTEGER", True, primary_key=True),
                'sku "quoted"': column("TEXT"),
                "qty": column("INTEGER"),
            },
            "primary_key": ["order_id", "line"],
            "foreign_keys": [
                {
                    "columns": ["order_id"],
                    "references": {"table": "orders", "columns": ["id"]},
                    "on_update": "NO ACTION",
                    "on_delete": "NO ACTION",
                }
            ],
            "indexes": [],
            "row_count": 20,
        },
    }


def test_index_blob_and_default(app_service: InProcessService) -> None:
    users = app_service.client.get("/api/describe/users").json()["data"]
    assert users["columns"]["avatar"] == column("BLOB")
    assert users["columns"]["created_at"] == column("TEXT", default="CURRENT_TIMESTAMP")
    assert users["columns"]["email"] == column("TEXT", required=True)
    assert users["primary_key"] == ["id"]
    orders = app_service.client.get("/api/describe/orders").json()["data"]
    assert orders["indexes"] == [{"name": "orders_user", "unique": False, "columns": ["user_id"]}]
    assert orders["foreign_keys"] == [
        {
            "columns": ["user_id"],
            "references": {"table": "users", "columns": ["id"]},
            "on_update": "NO ACTION",
            "on_delete": "CASCADE",
        }
    ]
    assert orders["columns"]["total"] == column("REAL", True, "0")


def test_views_and_internal_tables(app_service: InProcessService) -> None:
    view = app_service.client.get("/api/describe/adults").json()["data"]
    assert view["type"] == "view" and list(view["columns"]) == ["id", "name"]
    for name in ("sqlite_master", "sqlite_sequence", "sqlite_schema", "nope", "users; DROP TABLE users"):
        r = app_service.client.get(f"/api/describe/{name}")
        assert r.status_code == 404, name
        assert r.json()["error_code"] == "RECORD_NOT_FOUND" and name in r.json()["error"]


def test_row_counts_are_of_one_moment_while_the_source_is_written(tmp_path: Path) -> None:
    """``GET /api/describe`` counted each table in a statement of its own: with an application
    adding a row to two tables in each transaction, 231 of 8,915 listings showed them apart,
    counts the source never held. The listing now reads in one snapshot, as a run does."""
    source = tmp_path / "pair.db"
    with sqlite3.connect(source) as con:
        con.executescript("PRAGMA journal_mode = WAL; CREATE TABLE a (id INTEGER PRIMARY KEY);")
        con.execute("CREATE TABLE b (id INTEGER PRIMARY KEY)")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "while True:\n"
            "    c.execute('BEGIN IMMEDIATE'); c.execute('INSERT INTO a DEFAULT VALUES')\n"
            "    c.execute('INSERT INTO b DEFAULT VALUES'); c.execute('COMMIT')\n",
            str(source),
        ]
    )
    catalog = Catalog(str(source))

    async def listings() -> list[dict[str, int]]:
        # At least 600, and until the writer (a process still starting on a loaded machine) wrote.
        seen: list[dict[str, int]] = []
        deadline = time.monotonic() + 60
        while len(seen) < 600 or (seen[-1]["a"] == seen[0]["a"] and time.monotonic() < deadline):
            seen.append({s["name"]: s["row_count"] for s in await catalog.schemas()})
        return seen

    try:
        seen = asyncio.run(listings())
    finally:
        writer.kill()
        writer.wait()
    assert seen[-1]["a"] > seen[0]["a"]  # written all along
    assert [counts for counts in seen if counts["a"] != counts["b"]] == []
