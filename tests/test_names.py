"""File names: no data file takes the run's own names, none differ only in letter case, nothing
is overwritten, and the state file never records two artifacts of one name (SPEC: Artifacts)."""

from __future__ import annotations

import asyncio
import errno
import gzip
import hashlib
import io
import itertools
import json
import os
import random
import re
import secrets
import sqlite3
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from helpers import (
    ROOT,
    Api,
    InProcessService,
    Service,
    make_big_db,
    make_shop_db,
    start_in_process,
    start_service,
    unique_name,
    wait_for,
    worker_writing,
)
from helpers import parse_file as parse

from executor.naming import safe_file_name

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def folded(names: list[str]) -> set[str]:
    return {name.casefold() for name in names}


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("schema", "stem"),
    [
        ("users", "users"),
        ("Users", "Users~1"),
        ("uSers", "uSers~2"),
        ("USERS", "USERS~1f"),
        ("describe", "%64escribe"),
        ("manifest", "%6Danifest"),
        ("Describe", "Describe~1"),
        ("MANIFEST", "MANIFEST~ff"),
        ("%64escribe", "%2564escribe"),
        ("order items", "order%20items"),
        ("Order Items", "Order%20Items~101"),
        ("Café 李", "Caf%C3%A9%20%E6%9D%8E~1"),  # escape digits are not letters of the name
        ("café", "caf%C3%A9"),
        ("a~b", "a%7Eb"),
        (".Hidden", "%2EHidden~8"),
        ("", "%00"),
    ],
)
def test_the_naming_rule(schema: str, stem: str) -> None:
    assert safe_file_name(schema) == stem


def decode(stem: str) -> str:
    """The README's inverse: drop a ``~`` suffix, percent-decode."""
    return re.sub(
        rb"%([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), stem.split("~")[0].encode()
    ).decode()


def check_names(names: list[str]) -> None:
    stems = {name: safe_file_name(name) for name in set(names)}
    assert len(folded(list(stems.values()))) == len(stems)
    for name, stem in stems.items():
        assert stem.casefold() not in ("describe", "manifest"), name
        assert len(stem) <= 200 and re.fullmatch(r"(?:[A-Za-z0-9._-]|%[0-9A-F]{2})+(?:~[0-9a-f]+)?", stem)
        cut = stem.endswith("~" + sha256(name.encode())[:16])
        if name and not cut:  # the empty name is %00
            assert decode(stem) == name


def test_no_two_stems_meet_ignoring_case() -> None:
    base = [
        "users",
        "Users",
        "USERS",
        "uSers",
        "usErs",
        "describe",
        "Describe",
        "DESCRIBE",
        "dEscribe",
        "manifest",
        "Manifest",
        "MANIFEST",
        "%64escribe",
        "%6Danifest",
        "%6danifest",
        "users~1",
        "Users~1",
        "users%7E1",
        "Café",
        "CAFÉ",
        "café",
        "cafÉ",
        "ÇA",
        "ça",
        "李",
        "Ωmega",
        "ωmega",
        "describe.yaml",
        "manifest.json",
        "Manifest.JSON",
        "order items",
        "Order Items",
        "",
        ".",
        "..",
    ]
    long_names = [
        prefix + "x" * n + suffix
        for prefix in ("", "X", "é", "É")
        for n in (180, 181, 182, 183, 190, 199, 200, 250)
        for suffix in ("", "Y", "y")
    ]
    long_names += [
        "a" * 150 + "B" * 50,
        "A" * 150 + "b" * 50,
        "李" * 60 + "A",
        "李" * 60 + "a",
        "李" * 61 + "Q" * 20,
        "李" * 61 + "q" * 20,
    ]
    cased = [name.upper() for name in base + long_names] + [name.lower() for name in base + long_names]
    check_names(base + long_names + cased)


@pytest.mark.slow
def test_generated_names_never_meet_ignoring_case() -> None:
    """Every name of up to three characters over letters in both cases and the characters the rules
    treat specially, and random longer ones, alone and after padding that makes them long."""
    alphabet = "aAbBeE~%._-éÉ"
    short = ["".join(chars) for n in range(4) for chars in itertools.product(alphabet, repeat=n)]
    rng = random.Random(12)
    longer = ["".join(rng.choices(alphabet + "dDmMsS李 ", k=rng.randrange(5, 40))) for _ in range(2000)]
    for padding in ("", "p" * 60, "P" * 60, "p" * 182, "q" * 195):
        names = [padding + name for name in short + longer]
        check_names(names + [name.swapcase() for name in names])


def test_long_stems_keep_within_200_characters_and_whole_escapes() -> None:
    for name in ["A" * 300, "é" * 70 + "B", "x" * 190 + "Y" * 10, "É" * 100]:
        stem = safe_file_name(name)
        assert len(stem) <= 200, name
        assert re.fullmatch(r"(?:[A-Za-z0-9._-]|%[0-9A-F]{2})+~[0-9a-f]{16}", stem), stem
    assert safe_file_name("A" * 300) != safe_file_name("a" * 300)
    assert safe_file_name("A" * 300).casefold() != safe_file_name("a" * 300).casefold()


# ---------------------------------------------------------------- the writers never overwrite


def test_a_second_name_equal_ignoring_case_is_refused_before_writing() -> None:
    from executor.writers import RunFiles
    from extracts.storage import NameClash

    names = RunFiles()
    names.claim("users.jsonl", "schema 'users'")
    with pytest.raises(NameClash) as caught:
        names.claim("USERS.jsonl", "schema 'USERS'")
    assert str(caught.value).startswith(
        "Two files of this run would be named users.jsonl (letter case aside): schema 'users' and "
        "schema 'USERS'; the run stopped before overwriting either."
    )
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_finished_file_never_replaces_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    from executor.writers import ArtifactFile, RunPlace
    from extracts.storage import NameClash
    from extracts.storage.local import LocalStorage

    if not hard_links:  # a volume without hard links (FAT, exFAT): link() says EPERM

        def no_link(*args: Any) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    place = RunPlace(LocalStorage(tmp_path), "run_1", 0)
    run_dir = tmp_path / "run_1"
    place.storage.begin_run("run_1")
    (run_dir / "manifest.json").write_bytes(b"the run's manifest")
    with pytest.raises(NameClash, match="manifest.json"), ArtifactFile(place, "manifest.json") as f:
        f.write(b"a table's rows")
        f.commit()
    assert (run_dir / "manifest.json").read_bytes() == b"the run's manifest"
    with ArtifactFile(place, "users.jsonl") as f:
        f.write(b"{}\n")
        info = f.commit()
    assert (info.name, info.size) == ("users.jsonl", 3)
    assert sorted(os.listdir(run_dir)) == ["manifest.json", "users.jsonl"]  # no temporary file left


# ---------------------------------------------------------------- runs through the service


ROWS = {"manifest": 5, "describe": 3, "users": 12}


@pytest.fixture(scope="module")
def reserved_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("source") / "reserved.db"
    con = sqlite3.connect(path)
    for table, count in ROWS.items():
        con.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, label TEXT)")
        con.executemany(f"INSERT INTO {table} VALUES (?, ?)", [(i, f"{table} {i}") for i in range(count)])
    con.commit()
    con.close()
    return path


@pytest.fixture(scope="module")
def reserved_service(
    tmp_path_factory: pytest.TempPathFactory, reserved_db: Path
) -> Iterator[InProcessService]:
    svc = start_in_process(tmp_path_factory.mktemp("service"), str(reserved_db))
    yield svc
    svc.stop()


def artifacts_of(service: Api, run_id: str) -> list[dict]:
    return service.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run_id, "filter[limit]": "1000"}
    ).json()["data"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_listing(files: dict[str, bytes], manifest: dict, listed: list[str]) -> None:
    """A manifest lists every other file, by name, size and checksum, and nothing else."""
    assert sorted((e["name"], e["size"], e["checksum"]) for e in manifest["artifacts"]) == sorted(
        (name, len(files[name]), sha256(files[name])) for name in listed
    )


def rows_by_schema(files: dict[str, bytes], manifest: dict) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for entry in sorted((e for e in manifest["artifacts"] if e["schema"]), key=lambda e: e["part"] or 0):
        content = parse(entry["name"], files[entry["name"]])
        assert len(content) == entry["records"]
        rows.setdefault(entry["schema"], []).extend(content)
    return rows


def check_run(service: Api, run: dict, schemas: dict[str, int]) -> dict[str, bytes]:
    """Every row of ``schemas`` (name → row count) in files of distinct names, each recorded once."""
    assert run["status"] == "completed", run
    artifacts = artifacts_of(service, run["id"])
    names = [a["artifact_name"] for a in artifacts]
    assert len(folded(names)) == len(names) == run["artifacts_created"]
    run_dir = service.storage / run["id"]
    assert sorted(os.listdir(run_dir)) == sorted(names)
    files = {name: (run_dir / name).read_bytes() for name in names}
    for a in artifacts:
        assert (a["size_bytes"], a["checksum"]) == (
            len(files[a["artifact_name"]]),
            sha256(files[a["artifact_name"]]),
        )
    manifest = json.loads(files["manifest.json"])
    check_listing(files, manifest, [name for name in names if name != "manifest.json"])
    if run["config_snapshot"]["format"] == "archive":
        (tarball,) = [a for a in artifacts if a["artifact_type"] == "archive"]
        with tarfile.open(run_dir / tarball["artifact_name"]) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            assert len(folded(tar.getnames())) == len(tar.getnames()) == len(files)
        manifest = json.loads(files["manifest.json"])
        check_listing(files, manifest, [name for name in files if name != "manifest.json"])
    rows = rows_by_schema(files, manifest)
    assert {schema: len(r) for schema, r in rows.items()} == schemas
    return files


@pytest.mark.parametrize(
    "config",
    [
        {"format": "json", "compress": False},
        {"format": "yaml", "compress": False},
        {"format": "jsonl", "compress": False},
        {"format": "jsonl", "compress": True},
        {"format": "yaml", "compress": False, "split_files": True, "split_max_records": 2},
        {"format": "json", "compress": True, "split_files": True, "split_max_records": 2},
        {"format": "archive", "compress": False},
        {"format": "archive", "compress": True, "split_files": True, "split_max_records": 4},
    ],
    ids=lambda c: "-".join(str(v) for v in c.values()),
)
def test_tables_named_like_the_runs_own_files_keep_every_row(
    reserved_service: InProcessService, reserved_db: Path, config: dict
) -> None:
    """A table named manifest or describe overwrote manifest.json or describe.yaml: its rows were
    gone, the manifest listed a file whose size no longer matched, and the run said completed."""
    extract = reserved_service.create_extract(name="Reserved", schemas=list(ROWS), **config)
    run = reserved_service.wait_run(reserved_service.run(extract["id"]))
    files = check_run(reserved_service, run, ROWS)
    assert set(yaml.safe_load(files["describe.yaml"])) == set(ROWS)
    data = [name for name in files if name not in ("describe.yaml", "manifest.json")]
    assert all(name.startswith(("%6Danifest.", "%64escribe.", "users.")) for name in data), data


def test_the_zip_of_a_run_holds_every_file_once(reserved_service: InProcessService) -> None:
    extract = reserved_service.create_extract(
        name="Zipped", schemas=list(ROWS), format="yaml", compress=False
    )
    run = reserved_service.wait_run(reserved_service.run(extract["id"]))
    files = check_run(reserved_service, run, ROWS)
    r = reserved_service.client.get(f"/api/extracts/runs/{run['id']}/download")
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(archive.namelist()) == sorted(files)
    assert {name: archive.read(name) for name in archive.namelist()} == files


# ---------------------------------------------------------------- names that differ only in case


CASED = {"users": 2, "Users": 3, "USERS": 4}


@pytest.fixture(scope="module")
def cased_pg() -> Iterator[str]:
    """A PostgreSQL database holding users, "Users" and "USERS": its source URL."""
    name = unique_name("extracts_names")
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(url, autocommit=True) as con:
        for table, count in CASED.items():
            con.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, owner text)')
            for i in range(count):
                con.execute(f'INSERT INTO "{table}" VALUES (%s, %s)', (i, table))
    yield url
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def cased_service(tmp_path_factory: pytest.TempPathFactory, cased_pg: str) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("service"), cased_pg)
    yield svc
    svc.stop()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "archive"])
def test_tables_that_differ_only_in_case_get_distinct_files(cased_service: Service, fmt: str) -> None:
    """users, Users and USERS were users.jsonl.gz, Users.jsonl.gz and USERS.jsonl.gz: one file
    once unpacked on macOS or Windows."""
    extract = cased_service.create_extract(name="Cased", schemas=list(CASED), format=fmt)
    run = cased_service.wait_run(cased_service.run(extract["id"]))
    files = check_run(cased_service, run, CASED)
    manifest = json.loads(files["manifest.json"])
    suffix = ".jsonl" if fmt == "archive" else ".jsonl.gz"
    assert {e["schema"]: e["name"] for e in manifest["artifacts"] if e["schema"]} == {
        "users": f"users{suffix}",
        "Users": f"Users~1{suffix}",
        "USERS": f"USERS~1f{suffix}",
    }
    for entry in manifest["artifacts"]:
        if entry["schema"]:
            assert {row["owner"] for row in parse(entry["name"], files[entry["name"]])} == {entry["schema"]}
    r = cased_service.client.get(f"/api/extracts/runs/{run['id']}/download")
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert len(folded(names)) == len(names) == len(artifacts_of(cased_service, run["id"]))


# ---------------------------------------------------------------- the state file


def state_file(tmp_path: Path) -> sqlite3.Connection:
    from extracts.state import prepare_state_file

    path = tmp_path / "state.db"
    prepare_state_file(path)
    return sqlite3.connect(path, isolation_level=None)


def add_run(con: sqlite3.Connection, run_id: str, extract_id: str = "extract_1") -> None:
    con.execute(
        "INSERT OR IGNORE INTO extracts (id, name, created_at, updated_at) "
        "VALUES (?, 'X', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')",
        (extract_id,),
    )
    con.execute(
        "INSERT INTO extract_runs (id, extract_id, extract_name, status, progress_detail, "
        "config_snapshot, created_at, updated_at) VALUES (?, ?, 'X', 'completed', '{}', '{}', "
        "'2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')",
        (run_id, extract_id),
    )


def add_artifact(con: sqlite3.Connection, run_id: str, name: str, storage: Path | None = None) -> None:
    path = (storage or Path("/storage")) / run_id / name
    data = path.read_bytes() if path.is_file() else b""
    con.execute(
        "INSERT INTO extract_artifacts (id, run_id, extract_id, artifact_type, artifact_name, "
        "storage_path, format, content_type, size_bytes, checksum, crc32, is_primary, created_at, "
        "expires_at) SELECT ?, id, extract_id, 'data-x', ?, ?, 'jsonl', 'application/x-ndjson', ?, ?, "
        "?, 1, '2026-01-01T00:00:00.000Z', '2999-01-01T00:00:00.000Z' FROM extract_runs WHERE id = ?",
        (
            f"artifact_{secrets.token_hex(8)}",
            name,
            str(path),
            len(data),
            sha256(data),
            zlib.crc32(data),
            run_id,
        ),
    )


def test_the_schema_refuses_two_artifact_names_equal_ignoring_case(tmp_path: Path) -> None:
    con = state_file(tmp_path)
    add_run(con, "run_1")
    add_run(con, "run_2")
    add_artifact(con, "run_1", "users.jsonl")
    add_artifact(con, "run_2", "USERS.jsonl")  # another run: its own ZIP
    for name in ("users.jsonl", "USERS.jsonl", "Users.JSONL"):
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            add_artifact(con, "run_1", name)
    assert con.execute("SELECT count(*) FROM extract_artifacts").fetchone() == (2,)


@pytest.mark.slow
def test_a_second_artifact_of_one_name_fails_the_run(tmp_path: Path) -> None:
    """INSERT OR REPLACE dropped the first artifact row, or (names differing in case) kept both,
    and the run ended completed either way."""
    db = make_big_db(tmp_path / "big.db", 300_000)
    svc = start_service(tmp_path, str(db))
    try:
        extract = svc.create_extract(name="Twice", schemas=["big", "small"], compress=False)
        run_id = svc.run(extract["id"])
        worker_writing(svc.storage, run_id)
        con = sqlite3.connect(svc.db, timeout=15, isolation_level=None)
        add_artifact(con, run_id, "SMALL.jsonl")  # forced in before the worker writes small.jsonl
        run = svc.wait_run(run_id)
        assert run["status"] == "failed", run
        assert run["error"] == (
            "The run wrote a second file named small.jsonl (letter case aside), which "
            "was not recorded; the run was stopped. Report this as a bug in the "
            "file naming"
        )
        names = [
            row[0]
            for row in con.execute("SELECT artifact_name FROM extract_artifacts WHERE run_id = ?", (run_id,))
        ]
        con.close()
        # The worker may finish manifest.json before it sees the stop.
        assert (
            {"SMALL.jsonl", "big.jsonl", "describe.yaml"}
            <= set(names)
            <= {"SMALL.jsonl", "big.jsonl", "describe.yaml", "manifest.json"}
        )
        # The second small.jsonl, on disk but never recorded, goes once the worker has stopped;
        # the files that were recorded stay (SMALL.jsonl's row was forced in, with no file).
        recorded = sorted(set(names) - {"SMALL.jsonl"})
        wait_for(lambda: sorted(os.listdir(svc.storage / run_id)) == recorded, what="only recorded files")
        # The next run is not disturbed.
        assert svc.wait_run(svc.run(extract["id"]))["status"] == "completed"
    finally:
        svc.stop()


class LockedAfterWriting:
    """The state database, whose first write is done but reported as locked."""

    def __init__(self, db: Any) -> None:
        self.db, self.failures = db, 1

    async def execute(self, sql: str, values: dict | None = None) -> Any:
        result = await self.db.execute(sql, values)
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        return result


def test_an_artifact_message_applied_twice_is_recorded_once(tmp_path: Path) -> None:
    """_apply runs a handler again after "database is locked": that must not look like a second file."""

    from extracts.pool import WorkerPool
    from extracts.runs import Runs
    from extracts.state import open_database
    from extracts.storage.local import LocalStorage

    con = state_file(tmp_path)
    add_run(con, "run_x")
    con.execute("UPDATE extract_runs SET status = 'running', lease_token = 'lease_x'")

    async def scenario() -> None:
        db = open_database(tmp_path / "state.db")
        await db.connect()
        try:
            storage = LocalStorage(tmp_path)
            pool = WorkerPool(Runs(LockedAfterWriting(db), storage, "source.db", 0), storage, 1)
            pool.retry_delay = 0.01
            pool._jobs["run_x"] = {
                "run_id": "run_x",
                "extract_id": "extract_1",
                "config": {"retention_days": 7},
                "lease": "lease_x",
            }
            message = {
                "artifact_type": "data-users",
                "artifact_name": "users.jsonl",
                "schema_name": "users",
                "part": None,
                "format": "jsonl",
                "content_type": "application/x-ndjson",
                "size_bytes": 3,
                "records": 1,
                "checksum": sha256(b"{}\n"),
                "crc32": 0,
                "is_primary": True,
            }
            await pool._apply(pool._on_artifact, "artifact", "run_x", message)
        finally:
            await db.disconnect()

    asyncio.run(scenario())
    assert con.execute("SELECT artifact_name FROM extract_artifacts").fetchall() == [("users.jsonl",)]
    assert con.execute("SELECT status, error FROM extract_runs").fetchone() == ("running", None)


@pytest.mark.slow
def test_a_version_1_state_file_keeps_artifacts_that_differ_only_in_case(tmp_path: Path) -> None:
    """Version 1 recorded users.jsonl.gz and Users.jsonl.gz of one run (PostgreSQL, MySQL): the
    migration keeps both, under names the new unique index accepts, and the ZIP serves both."""
    storage = tmp_path / "storage"
    legacy = {
        "run_1": [
            "describe.yaml",
            "users.jsonl.gz",
            "Users.jsonl.gz",
            "USERS.jsonl.gz",
            "a.b.jsonl.gz",
            "A.b.jsonl.gz",
            "Users~2.jsonl.gz",
            "manifest.json",
        ],
        "run_2": ["users.jsonl.gz", "manifest.json"],
    }
    path = tmp_path / "state.db"
    con = sqlite3.connect(path, isolation_level=None)
    con.executescript((ROOT / "tests" / "schema_v1.sql").read_text())
    con.execute("PRAGMA user_version = 1")
    for run_id, names in legacy.items():
        add_run(con, run_id)
        for name in names:
            (storage / run_id).mkdir(parents=True, exist_ok=True)
            (storage / run_id / name).write_bytes(gzip.compress(f'{{"file": "{name}"}}\n'.encode()))
            add_artifact(con, run_id, name, storage)
    before = con.execute("SELECT id, storage_path, checksum FROM extract_artifacts ORDER BY rowid").fetchall()
    con.close()

    from extracts.state import SCHEMA_VERSION, prepare_state_file

    prepare_state_file(path)
    prepare_state_file(path)  # and again: nothing more changes
    con = sqlite3.connect(path, isolation_level=None)
    assert con.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert (
        con.execute("SELECT id, storage_path, checksum FROM extract_artifacts ORDER BY rowid").fetchall()
        == before
    )
    names = {
        run_id: [
            row[0]
            for row in con.execute(
                "SELECT artifact_name FROM extract_artifacts WHERE run_id = ? ORDER BY rowid", (run_id,)
            )
        ]
        for run_id in legacy
    }
    assert names == {
        "run_1": [
            "describe.yaml",
            "users.jsonl.gz",
            "Users~3.jsonl.gz",
            "USERS~4.jsonl.gz",
            "a.b.jsonl.gz",
            "A~2.b.jsonl.gz",
            "Users~2.jsonl.gz",
            "manifest.json",
        ],
        "run_2": legacy["run_2"],
    }
    with pytest.raises(sqlite3.IntegrityError):
        add_artifact(con, "run_1", "USERS~3.JSONL.GZ")
    con.close()

    svc = start_service(tmp_path, str(make_shop_db(tmp_path / "shop.db")), db=path, storage=storage)
    try:
        r = svc.client.get("/api/extracts/runs/run_1/download")
        assert r.status_code == 200, r.text
        archive = zipfile.ZipFile(io.BytesIO(r.content))
        assert sorted(archive.namelist()) == sorted(names["run_1"])
        for name, storage_path in sqlite3.connect(path).execute(
            "SELECT artifact_name, storage_path FROM extract_artifacts WHERE run_id = 'run_1'"
        ):
            assert archive.read(name) == Path(storage_path).read_bytes()  # each file, under its new name
    finally:
        svc.stop()
