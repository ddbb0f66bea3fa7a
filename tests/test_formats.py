"""Every format × compress × split combination through the app (served in this process), read back."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import tarfile
from pathlib import Path

import pytest
from helpers import InProcessService, parse_file


def source_rows(db: Path, table: str, where: str = "", args: tuple = ()) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute(f'SELECT * FROM "{table}" {where} ORDER BY rowid', args)]
    con.close()
    for row in rows:  # the export's encoding of BLOBs
        for key, value in row.items():
            if isinstance(value, bytes):
                row[key] = base64.b64encode(value).decode()
    return rows


def artifacts_of(service: InProcessService, run_id: str) -> list[dict]:
    return service.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run_id, "filter[limit]": "1000"}
    ).json()["data"]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "yaml"])
def test_file_formats(
    app_service: InProcessService, shop_db: Path, fmt: str, compress: bool, split: bool
) -> None:
    extract = app_service.create_extract(
        name=f"{fmt} {compress} {split}",
        format=fmt,
        compress=compress,
        split_files=split,
        split_max_records=7,
        schemas=["users", "orders", "order items"],
    )
    run = app_service.wait_run(app_service.run(extract["id"]))
    assert run["status"] == "completed", run
    data = [a for a in artifacts_of(app_service, run["id"]) if a["artifact_type"].startswith("data-")]
    for table in ("users", "orders", "order items"):
        parts = sorted((a for a in data if a["schema_name"] == table), key=lambda a: a["part"] or 0)
        rows = []
        for part in parts:
            assert part["artifact_name"].endswith(f".{fmt}.gz" if compress else f".{fmt}")
            content = parse_file(part["artifact_name"], Path(part["storage_path"]).read_bytes())
            assert len(content) == part["records"]
            rows += content
        assert rows == source_rows(shop_db, table), (table, fmt)
        expected_parts = -(-len(rows) // 7) if split else 1
        assert len(parts) == expected_parts
        if split:
            assert [p["part"] for p in parts] == list(range(1, expected_parts + 1))
            assert all(p["records"] <= 7 for p in parts)


@pytest.mark.parametrize("compress", [True, False])
def test_archive_format(app_service: InProcessService, shop_db: Path, compress: bool) -> None:
    extract = app_service.create_extract(
        name="Tar ball!", format="archive", compress=compress, schemas=["users", "order items"]
    )
    run = app_service.wait_run(app_service.run(extract["id"]))
    assert run["status"] == "completed", run
    artifacts = {a["artifact_type"]: a for a in artifacts_of(app_service, run["id"])}
    assert set(artifacts) == {"archive", "manifest"}
    tarball = artifacts["archive"]
    suffix = ".tar.gz" if compress else ".tar"
    assert tarball["artifact_name"] == f"Tar-ball--{run['created_at'][:10]}-{run['id'][:8]}{suffix}"
    assert tarball["content_type"] == ("application/gzip" if compress else "application/x-tar")
    assert tarball["is_primary"] is True
    with tarfile.open(tarball["storage_path"]) as tar:
        names = tar.getnames()
        assert set(names) == {"describe.yaml", "users.jsonl", "order%20items.jsonl", "manifest.json"}
        for table, member in (("users", "users.jsonl"), ("order items", "order%20items.jsonl")):
            content = tar.extractfile(member).read()
            assert [json.loads(line) for line in content.splitlines()] == source_rows(shop_db, table)
        inner = json.load(io.BytesIO(tar.extractfile("manifest.json").read()))
        assert {a["name"] for a in inner["artifacts"]} == set(names) - {"manifest.json"}
    outer = json.loads(Path(artifacts["manifest"]["storage_path"]).read_text())
    assert [a["name"] for a in outer["artifacts"]] == [tarball["artifact_name"]]
    assert outer["artifacts"][0]["checksum"] == tarball["checksum"]


def test_filters_select_rows_and_set_records_total(app_service: InProcessService, shop_db: Path) -> None:
    extract = app_service.create_extract(
        name="Filtered",
        compress=False,
        schemas=["orders", "users"],
        filter={
            "orders": {"where": {"total": {"$gte": 20}, "note": {"$null": False}}},
            "users": {"where": {"name": {"$like": "%a%"}}},
        },
    )
    run = app_service.wait_run(app_service.run(extract["id"]))
    assert run["status"] == "completed", run
    orders = source_rows(shop_db, "orders", "WHERE total >= ? AND note IS NOT NULL", (20,))
    users = source_rows(shop_db, "users", "WHERE name LIKE ?", ("%a%",))
    assert run["progress_detail"]["records_total"] == len(orders) + len(users)
    assert run["records_exported"] == len(orders) + len(users)
    by_schema = {a["schema_name"]: a for a in artifacts_of(app_service, run["id"]) if a["schema_name"]}
    assert parse_file("x.jsonl", Path(by_schema["orders"]["storage_path"]).read_bytes()) == orders
    assert parse_file("x.jsonl", Path(by_schema["users"]["storage_path"]).read_bytes()) == users


def test_describe_only_and_snapshot_of_options(app_service: InProcessService) -> None:
    extract = app_service.create_extract(name="Describe only", include=["describe"], schemas=["orders"])
    run = app_service.wait_run(app_service.run(extract["id"]))
    assert (run["status"], run["records_exported"], run["schemas_exported"]) == ("completed", 0, 0)
    assert run["progress_detail"]["records_total"] == 0
    assert sorted(a["artifact_name"] for a in artifacts_of(app_service, run["id"])) == [
        "describe.yaml",
        "manifest.json",
    ]
    app_service.client.put(
        f"/api/data/extracts/{extract['id']}", json={"include": ["data"], "format": "yaml"}
    )
    old = app_service.client.get(f"/api/data/extract_runs/{run['id']}").json()["data"]
    assert old["config_snapshot"]["include"] == ["describe"]
    assert old["config_snapshot"]["format"] == "jsonl"
