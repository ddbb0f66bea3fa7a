"""run_extract end to end on real SQLite files: every format, compression and split, read back."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import sqlite3
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    VALUES,
    Channel,
    assert_same_rows,
    make_job,
    make_source,
    parse_records,
    read_file,
    source_rows,
    tar_members,
)

from executor import run_extract, safe_file_name
from executor.formats import encoder

QUOTED = 'notes "2024" Zoë\'s'
TABLES = ["../../etc/passwd", "empty", "keyed", QUOTED, "order items", "orders", "users", "values"]
ROWS = {
    "../../etc/passwd": 2,
    "empty": 0,
    "keyed": 2,
    QUOTED: 2,
    "order items": 20,
    "orders": 50,
    "users": 4,
    "values": len(VALUES),
}
TOTAL = sum(ROWS.values())
CONTENT_TYPES = {"jsonl": "application/x-ndjson", "json": "application/json", "yaml": "application/yaml"}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("source") / "source.db")


def check_fingerprints(run_dir: Path, artifacts: list[dict[str, Any]]) -> None:
    """Sizes, SHA-256 and CRC-32 in the artifact messages are those of the bytes on disk."""
    for item in artifacts:
        data = (run_dir / item["artifact_name"]).read_bytes()
        assert item["size_bytes"] == len(data)
        assert item["checksum"] == hashlib.sha256(data).hexdigest()
        assert item["crc32"] == zlib.crc32(data)


def check_manifest(
    manifest: dict[str, Any], listed: list[dict[str, Any]], job: dict[str, Any], schemas: list[str]
) -> None:
    assert manifest.pop("generated_at").endswith("Z")
    assert manifest.pop("source") == {
        "dialect": "sqlite",
        "path": job["source"],
        "version": sqlite3.sqlite_version,
    }
    assert manifest == {
        "version": "1.0",
        "run_id": job["run_id"],
        "extract_id": "extract_test",
        "extract_name": job["extract_name"],
        "format": job["config"]["format"],
        "include": job["config"]["include"],
        "schemas": schemas,
        "artifacts": [
            {
                "type": a["artifact_type"],
                "name": a["artifact_name"],
                "schema": a["schema_name"],
                "part": a["part"],
                "size": a["size_bytes"],
                "checksum": a["checksum"],
                "records": a["records"],
            }
            for a in listed
        ],
    }


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "yaml"])
def test_every_file_holds_the_source_rows(
    tmp_path: Path, manager: Any, source: Path, fmt: str, compress: bool, split: bool
) -> None:
    channel = Channel(manager)
    job = make_job(tmp_path, source, format=fmt, compress=compress, split_files=split, split_max_records=3)

    result = channel.run(job)

    assert result == {
        "status": "completed",
        "records_exported": TOTAL,
        "schemas_exported": len(TABLES),
        "records_total": TOTAL,
        "error": None,
        "error_detail": None,
    }
    run_dir = Path(job["run_dir"])
    artifacts = channel.artifacts()
    assert sorted(os.listdir(run_dir)) == sorted(a["artifact_name"] for a in artifacts)
    check_fingerprints(run_dir, artifacts)
    suffix = f".{fmt}" + (".gz" if compress else "")
    for name in TABLES:
        parts = [a for a in artifacts if a["schema_name"] == name]
        records = []
        for number, item in enumerate(parts, start=1):
            part = f".{number:05d}" if split else ""
            assert item == item | {
                "artifact_type": f"data-{name}",
                "part": number if split else None,
                "artifact_name": f"{safe_file_name(name)}{part}{suffix}",
                "format": fmt,
                "content_type": "application/gzip" if compress else CONTENT_TYPES[fmt],
                "is_primary": True,
            }
            part_records = parse_records(read_file(run_dir / item["artifact_name"]), fmt)  # valid alone
            assert item["records"] == len(part_records) <= (3 if split else TOTAL)
            records += part_records
        assert len(parts) == (max(1, -(-ROWS[name] // 3)) if split else 1)
        assert_same_rows(records, source_rows(source, name))
    assert [a["artifact_type"] for a in artifacts][0] == "describe"
    manifest = json.loads((run_dir / "manifest.json").read_bytes())
    assert artifacts[-1] == artifacts[-1] | {
        "artifact_type": "manifest",
        "artifact_name": "manifest.json",
        "is_primary": False,
        "content_type": "application/json",
    }
    check_manifest(manifest, artifacts[:-1], job, TABLES)


def test_empty_tables_give_valid_empty_files(tmp_path: Path, manager: Any, source: Path) -> None:
    expected = {"jsonl": b"", "json": b"[]\n", "yaml": b"[]\n"}
    for fmt, empty in expected.items():
        for split in (False, True):
            channel = Channel(manager)
            job = make_job(
                tmp_path / f"{fmt}-{split}",
                source,
                format=fmt,
                schemas=["empty"],
                include=["data"],
                split_files=split,
                split_max_records=10,
            )
            assert channel.run(job)["status"] == "completed"
            (data,) = [a for a in channel.artifacts() if a["artifact_type"] == "data-empty"]
            assert data["artifact_name"] == ("empty.00001." if split else "empty.") + fmt
            assert (Path(job["run_dir"]) / data["artifact_name"]).read_bytes() == empty


def test_a_split_boundary_on_the_last_record_opens_no_empty_part(
    tmp_path: Path, manager: Any, source: Path
) -> None:
    channel = Channel(manager)
    job = make_job(
        tmp_path, source, schemas=["orders"], include=["data"], split_files=True, split_max_records=25
    )
    channel.run(job)
    assert [(a["part"], a["records"]) for a in channel.artifacts()[:-1]] == [(1, 25), (2, 25)]


def test_values_keep_their_exact_type(tmp_path: Path, manager: Any, source: Path) -> None:
    """64-bit integers, REALs to the last bit (-0.0 too), infinities, text, NULL, BLOBs."""
    channel = Channel(manager)
    job = make_job(tmp_path, source, schemas=["values"], include=["data"])
    channel.run(job)
    lines = (Path(job["run_dir"]) / "values.jsonl").read_bytes().split(b"\n")[:-1]
    got = [json.loads(line)["v"] for line in lines]
    assert b'"v":9223372036854775807' in lines[0] and b'"v":-9223372036854775808' in lines[1]
    assert got[:6] == [2**63 - 1, -(2**63), 0, 1, -1, 2**53 + 1]
    floats = got[6:16]
    assert [x.hex() for x in floats] == [
        x.hex() for x in (0.1 + 0.2, 1e308, -1e308, 5e-324, -0.0, 0.0, 1.0, 2.0**60, 1e16 + 2, 123456789.125)
    ]
    assert got[16:21] == ["Infinity", "-Infinity", None, "", "AP8QIGJsb2I="]
    assert got[21:] == VALUES[21:]


@pytest.mark.parametrize(
    "chunk",
    [
        b'{"a":1,"b":"x\xc2\x85y\x7f\xe2\x80\xa8\xef\xbb\xbf"}\n{"a":-2.5,"b":null,"c":[1,{"d":true}]}',
        b'{"a":1e-06,"b":"z"}\n{"a":1.5e16}\n{"a":-2E+300}',  # number forms YAML 1.1 reads as strings
        b'{"s":"\\ud83d\\ude00 \\u00e9 \\\\ud83d"}',  # escaped UTF-16 surrogates, and a lookalike
        # Every digit kept: numbers are rewritten where they stand, never parsed (a json column's).
        b'{"j":[123456789012345678901234567890,1.0000000000000000000001,1e400],"f":1e-310}\n'
        b'{"s":"a:1e5 \\"1e5 \\u00e9","n":2}',
    ],
)
def test_yaml_reads_back_what_the_json_says(chunk: bytes) -> None:
    yaml_text = b"".join(encoder("yaml").body(chunk, first=True))
    assert yaml.safe_load(yaml_text) == [json.loads(line) for line in chunk.split(b"\n")]
    libyaml = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    assert yaml.load(yaml_text, Loader=libyaml) == yaml.safe_load(yaml_text)
    assert yaml_text.count(b"\n- ") == chunk.count(b"\n")  # one record per line


def test_yaml_keeps_a_json_numbers_digits_and_holds_a_lone_surrogate_as_u_fffd() -> None:
    chunk = b'{"j":[123456789012345678901234567890,1e400],"s":"\\ud800 \\udc00 \\ud83d\\ude00"}'
    yaml_text = b"".join(encoder("yaml").body(chunk, first=True))
    assert b"123456789012345678901234567890" in yaml_text
    libyaml = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for loader in (yaml.SafeLoader, libyaml):
        assert yaml.load(yaml_text, Loader=loader) == [
            {"j": [123456789012345678901234567890, math.inf], "s": "\ufffd \ufffd \U0001f600"}
        ]


_LONG = "k" * 1100


@pytest.mark.parametrize(
    ("rows", "json_is_yaml_safe", "explicit"),
    [
        # A JSON column's nested keys (a server source), plain, of escapes, of 2-byte characters.
        ([{"id": 1, "j": {_LONG: 1, "b": {'"' * 600: [1], "é" * 600: 2}}}, {"id": 2, "j": None}], False, 3),
        # U+2028 is escaped for YAML (6 characters): 200 of them make a key long only then.
        ([{"\u2028" * 200: 1}, {"v": "\u2028" * 200 + ":"}], False, 1),
        ([{"\u2028" * 200: 1, "a": 2}, {"\u2028" * 200: 3, "a": 4}], True, 2),
        # An SQLite column's name: every line has it.
        ([{"id": 1, _LONG: "x"}, {"id": 2, _LONG: "y" * 2000}], True, 2),
        # Long values are no keys: only the key gets its "?".
        ([{"v": _LONG, "w": [_LONG, {"k": _LONG}], '"' * 600: 1}], False, 1),
    ],
)
def test_yaml_keys_longer_than_an_implicit_key_are_explicit(
    rows: list, json_is_yaml_safe: bool, explicit: int
) -> None:
    """YAML takes an implicit key of at most 1024 characters: a longer one failed the whole file."""
    chunk = b"\n".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() for row in rows)
    yaml_text = b"".join(encoder("yaml", json_is_yaml_safe).body(chunk, first=True))
    libyaml = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for loader in (yaml.SafeLoader, libyaml):
        assert yaml.load(yaml_text, Loader=loader) == rows
    assert yaml_text.count(b"? ") == explicit


@pytest.mark.slow
def test_a_yaml_file_of_a_column_with_a_long_name_reads_back(tmp_path: Path, manager: Any) -> None:
    db = tmp_path / "long.db"
    with sqlite3.connect(db) as conn:
        conn.execute(f'CREATE TABLE t (id INTEGER PRIMARY KEY, "{_LONG}" TEXT)')
        conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"v{i}") for i in range(3000)])
    conn.close()
    job = make_job(tmp_path, db, format="yaml", include=["data"])
    assert Channel(manager).run(job)["status"] == "completed"
    rows = yaml.safe_load((Path(job["run_dir"]) / "t.yaml").read_bytes())
    assert rows == [{"id": i, _LONG: f"v{i}"} for i in range(3000)]


@pytest.mark.parametrize(
    "unsafe", ["\x7f", "\x80", "\x85", "\x9f", "\u2028", "\u2029", "\ufeff", "\ufffe", "\uffff"]
)
def test_yaml_escapes_each_unsafe_character_among_lookalikes(unsafe: str) -> None:
    # Lookalikes share a lead byte with an unsafe character: NBSP and ° (c2),
    # an en dash (e2 80), a fullwidth ! (ef): they stay as they are.
    lookalikes = "\xa0 ° – ！ é"
    chunk = "\n".join(
        [
            json.dumps({"t": lookalikes}, ensure_ascii=False),
            json.dumps({"t": f"{lookalikes} {unsafe} end"}, ensure_ascii=False),
        ]
    ).encode()
    yaml_text = b"".join(encoder("yaml", json_is_yaml_safe=True).body(chunk, first=True))
    assert unsafe.encode() not in yaml_text and lookalikes.encode() in yaml_text
    assert yaml.safe_load(yaml_text) == [{"t": lookalikes}, {"t": f"{lookalikes} {unsafe} end"}]


def test_names_are_safe_and_views_come_only_when_named(tmp_path: Path, manager: Any, source: Path) -> None:
    channel = Channel(manager)
    job = make_job(tmp_path, source, schemas=["../../etc/passwd", "adults"], include=["data"])
    assert channel.run(job)["status"] == "completed"
    names = [a["artifact_name"] for a in channel.artifacts()]
    assert names == ["%2E%2E%2F..%2Fetc%2Fpasswd.jsonl", "adults.jsonl", "manifest.json"]
    assert sorted(os.listdir(Path(job["run_dir"]))) == sorted(names)
    assert not (tmp_path / "etc").exists()


def test_describe_yaml_lists_keys_indexes_and_types(tmp_path: Path, manager: Any, source: Path) -> None:
    channel = Channel(manager)
    job = make_job(tmp_path, source, schemas=["order items", "users"], include=["describe"])

    result = channel.run(job)

    assert result == {
        "status": "completed",
        "records_exported": 0,
        "schemas_exported": 0,
        "records_total": 0,
        "error": None,
        "error_detail": None,
    }
    describe = yaml.safe_load((Path(job["run_dir"]) / "describe.yaml").read_bytes())
    column = {"type": "INTEGER", "required": True, "default": None, "primary_key": True}
    assert describe["order items"] == {
        "type": "table",
        "columns": {
            "order_id": column,
            "line": column,
            'sku "quoted"': column | {"type": "TEXT", "required": False, "primary_key": False},
            "qty": column | {"required": False, "primary_key": False},
        },
        "primary_key": ["order_id", "line"],
        "foreign_keys": [
            {
                "columns": ["order_id"],
                "references": {"table": "orders", "columns": ["id"]},
                "on_update": "CASCADE",
                "on_delete": "NO ACTION",
            }
        ],
        "indexes": [{"name": "items by sku", "columns": ['sku "quoted"', "line"], "unique": True}],
        "row_count": 20,
    }
    users = describe["users"]
    assert list(describe) == ["order items", "users"]
    assert users["columns"]["avatar"] == {
        "type": "BLOB",
        "required": False,
        "default": None,
        "primary_key": False,
    }
    assert users["columns"]["age"]["default"] == "18"
    assert users["columns"]["created_at"]["default"] == "strftime('%Y-%m-%dT%H:%M:%SZ', 'now')"
    assert users["indexes"] == [{"name": "sqlite_autoindex_users_1", "columns": ["email"], "unique": True}]
    assert (users["primary_key"], users["row_count"]) == (["id"], 4)
    assert [a["artifact_name"] for a in channel.artifacts()] == ["describe.yaml", "manifest.json"]


@pytest.mark.parametrize("compress", [False, True], ids=["tar", "tar.gz"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_archive_is_one_tarball_with_an_inner_manifest(
    tmp_path: Path, manager: Any, source: Path, compress: bool, split: bool
) -> None:
    channel = Channel(manager)
    job = make_job(
        tmp_path, source, format="archive", compress=compress, split_files=split, split_max_records=30
    )
    job["extract_name"] = "Daily Backup: all!"

    result = channel.run(job)

    assert result["status"] == "completed" and result["records_exported"] == TOTAL
    run_dir = Path(job["run_dir"])
    tarball, manifest_artifact = channel.artifacts()
    name = "Daily-Backup-all--2026-11-28-run_0123" + (".tar.gz" if compress else ".tar")  # "!" is a "-" too
    assert tarball == tarball | {
        "artifact_type": "archive",
        "artifact_name": name,
        "format": "tar",
        "content_type": "application/gzip" if compress else "application/x-tar",
        "is_primary": True,
        "records": TOTAL,
        "schema_name": None,
        "part": None,
    }
    check_fingerprints(run_dir, [tarball, manifest_artifact])
    assert sorted(os.listdir(run_dir)) == sorted([name, "manifest.json"])
    outer = json.loads((run_dir / "manifest.json").read_bytes())
    check_manifest(outer, [tarball], job, TABLES)

    members = tar_members(run_dir / name)
    inner = json.loads(members.pop("manifest.json"))
    assert list(members)[0] == "describe.yaml"
    assert [entry["name"] for entry in inner["artifacts"]] == list(members)
    for entry in inner["artifacts"]:
        data = members[entry["name"]]
        assert (entry["size"], entry["checksum"]) == (len(data), hashlib.sha256(data).hexdigest())
    for table in TABLES:
        entries = [e for e in inner["artifacts"] if e["schema"] == table]
        stem = safe_file_name(table)
        assert [e["name"] for e in entries] == (
            [f"{stem}.{n:05d}.jsonl" for n in range(1, len(entries) + 1)] if split else [f"{stem}.jsonl"]
        )
        rows = [r for e in entries for r in parse_records(members[e["name"]], "jsonl")]
        assert_same_rows(rows, source_rows(source, table))


def test_progress_climbs_through_the_phases(tmp_path: Path, manager: Any, source: Path) -> None:
    channel = Channel(manager)
    channel.run(make_job(tmp_path, source))
    progress = channel.progress()
    values = [p["progress"] for p in progress]
    assert values == sorted(values) and values[-1] == 99 and max(values) <= 99
    phases = list(dict.fromkeys(p["progress_detail"]["phase"] for p in progress))
    assert phases == ["exporting_describe", "exported_describe", "exporting_data", "writing_manifest"]
    assert next(p["progress"] for p in progress if p["progress_detail"]["phase"] == "exported_describe") == 25
    assert progress[-1]["progress_detail"] == {
        "phase": "writing_manifest",
        "schemas_total": len(TABLES),
        "schemas_completed": len(TABLES),
        "current_schema": None,
        "records_exported": TOTAL,
        "records_total": TOTAL,
    }


def test_runs_in_a_forkserver_process_pool(tmp_path: Path, manager: Any, source: Path) -> None:
    channel = Channel(manager)
    job = make_job(tmp_path, source, compress=True)
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        result = pool.submit(run_extract, job, channel.queue, channel.cancelled).result(60)
    assert result["status"] == "completed" and result["records_exported"] == TOTAL
    artifacts = channel.artifacts()
    check_fingerprints(Path(job["run_dir"]), artifacts)
    (users,) = [a for a in artifacts if a["schema_name"] == "users"]
    assert_same_rows(
        parse_records(read_file(Path(job["run_dir"]) / users["artifact_name"]), "jsonl"),
        source_rows(source, "users"),
    )
