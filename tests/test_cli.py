"""The command line (SPEC: Command line): export, verify and run, as a user runs them.

Every command runs as ``python extracts_app.py …`` from this checkout, in a
child process; ``export`` is compared byte for byte with what the running
service writes for the same options.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import pty
import re
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import make_big_db, wait_for

from extracts import commands, config
from extracts.client import Client
from extracts.progress import Quiet
from extracts.remote import download
from extracts.state import parse_iso
from extracts.storage.local import LocalStorage
from extracts.verify import verify_path
from extracts.zipstream import ZipEntry

ROOT = Path(__file__).resolve().parent.parent
APP = [sys.executable, str(ROOT / "extracts_app.py")]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")

# Options of one run, as an extract's fields and as export options.
CASES = {
    "jsonl-gz": ({}, []),
    "json-split": (
        {"format": "json", "compress": False, "split_files": True, "split_max_records": 20},
        ["--format", "json", "--no-compress", "--split-max-records", "20"],
    ),
    "yaml-filtered": (
        {
            "format": "yaml",
            "schemas": ["users", "order items"],
            "filter": {"users": {"where": {"age": {"$gte": 18}}}},
        },
        [
            "--format",
            "yaml",
            "--schemas",
            "users,order items",
            "--filter",
            '{"users": {"where": {"age": {"$gte": 18}}}}',
        ],
    ),
    "archive": (
        {"format": "archive", "split_files": True, "split_max_records": 30},
        ["--format", "archive", "--split-max-records", "30"],
    ),
    "describe-only": (
        {"include": ["describe"], "compress": False},
        ["--include", "describe", "--no-compress"],
    ),
}
ENDED_DIFFERENTLY = {"run_id", "generated_at", "extract_id"}  # what a command-line manifest may differ in


def cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*APP, *args], capture_output=True, cwd=cwd, env=env or ENV, timeout=timeout, text=True
    )


@pytest.fixture(scope="module")
def big_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_big_db(tmp_path_factory.mktemp("big") / "big.db", 600_000)


def in_pty(
    args: list[str], cwd: Path, until: float = 60, stop_when: bytes | None = None
) -> tuple[int, bytes, float]:
    """Run the command on a pseudo-terminal; with ``stop_when``, send SIGINT once the output matches.

    Returns the exit status, the output, and seconds from SIGINT to exit (0 without one).
    """
    master, slave = pty.openpty()
    env = {**ENV, "TERM": "xterm-256color", "COLUMNS": "140"}
    process = subprocess.Popen([*APP, *args], stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    output, sent, deadline = b"", 0.0, time.monotonic() + until
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data and process.poll() is not None:
                    break
                output += data
            elif process.poll() is not None:
                break
            if stop_when is not None and not sent and re.search(stop_when, ANSI.sub(b"", output)):
                process.send_signal(signal.SIGINT)
                sent = time.monotonic()
        code = process.wait(5)
        return code, output, (time.monotonic() - sent) if sent else 0.0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)


def manifest_of(data: bytes) -> dict:
    manifest = json.loads(data)
    return {key: value for key, value in manifest.items() if key not in ENDED_DIFFERENTLY}


def tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def service_token(service) -> str:
    return service.client.headers["Authorization"].split()[1]


# ---------------------------------------------------------------- export against the service


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_export_writes_the_service_files_and_manifest(service, shop_db: Path, tmp_path: Path, case: str):
    fields, options = CASES[case]
    extract = service.create_extract(name="shop", **fields)
    run = service.wait_run(service.run(extract["id"]))
    assert run["status"] == "completed", run["error"]
    served = service.storage / run["id"]

    done = cli("export", str(shop_db), *options, "-d", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    if case != "archive":
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in served.iterdir())

    ours, theirs = (
        manifest_of((out / "manifest.json").read_bytes()),
        manifest_of((served / "manifest.json").read_bytes()),
    )
    if case != "archive":
        assert ours == theirs
        for path in served.iterdir():
            if path.name != "manifest.json":
                assert (out / path.name).read_bytes() == path.read_bytes(), path.name
        assert json.loads((out / "manifest.json").read_bytes())["extract_id"] is None
    else:
        # The tarball's name and its members' times carry the run: its members are the same bytes.
        (tar_ours,) = out.glob("*.tar.gz")
        (tar_theirs,) = served.glob("*.tar.gz")
        assert tar_ours.name.startswith(f"shop-{run['created_at'][:10]}-run_")
        drop = {"name", "size", "checksum"}
        assert [{k: v for k, v in a.items() if k not in drop} for a in ours.pop("artifacts")] == [
            {k: v for k, v in a.items() if k not in drop} for a in theirs.pop("artifacts")
        ]
        assert ours == theirs
        members_ours, members_theirs = (
            tar_members(tar_ours.read_bytes()),
            tar_members(tar_theirs.read_bytes()),
        )
        assert manifest_of(members_ours.pop("manifest.json")) == manifest_of(
            members_theirs.pop("manifest.json")
        )
        assert members_ours == members_theirs

    zipped = cli("export", str(shop_db), *options, "-o", str(tmp_path / "out.zip"), "-q", cwd=tmp_path)
    assert zipped.returncode == 0 and zipped.stdout == zipped.stderr == ""
    served_zip = service.client.get(f"/api/extracts/runs/{run['id']}/download")
    ours_zip, theirs_zip = (
        zipfile.ZipFile(tmp_path / "out.zip"),
        zipfile.ZipFile(io.BytesIO(served_zip.content)),
    )
    assert ours_zip.testzip() is None
    if case != "archive":
        assert ours_zip.namelist() == theirs_zip.namelist()  # the same files, in the same order
        for name in theirs_zip.namelist():
            if name != "manifest.json":
                assert ours_zip.read(name) == theirs_zip.read(name)


def test_the_zip_is_the_service_download_for_the_same_files(service, tmp_path: Path):
    """The export's ZIP writer, given the service's files and times, gives the download's bytes."""
    from extracts.export import write_zip

    extract = service.create_extract(name="shop zip", schemas=["orders", "users"])
    run = service.wait_run(service.run(extract["id"]))
    artifacts = service.client.get(
        "/api/data/extract_artifacts",
        params={"filter[where][run_id]": run["id"], "filter[order]": "created_at asc"},
    ).json()["data"]
    served = service.client.get(f"/api/extracts/runs/{run['id']}/download").content
    order = zipfile.ZipFile(io.BytesIO(served)).namelist()
    by_name = {a["artifact_name"]: a for a in artifacts}
    entries = []
    for name in order:
        artifact = by_name[name]
        data = Path(artifact["storage_path"]).read_bytes()
        at = parse_iso(artifact["created_at"]).timetuple()[:6]
        entries.append(ZipEntry(name, artifact["storage_path"], len(data), zlib.crc32(data), at))
    files = LocalStorage(service.storage).hold([(e.path, e.size) for e in entries])
    try:
        write_zip(entries, files, tmp_path / "same.zip", lambda: False)
    finally:
        files.close()
    assert (tmp_path / "same.zip").read_bytes() == served


@pytest.mark.slow
def test_export_default_name_and_plain_lines_when_piped(shop_db: Path, tmp_path: Path):
    done = cli("export", str(shop_db), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (made,) = tmp_path.glob("*.zip")
    run_id = json.loads(zipfile.ZipFile(made).read("manifest.json"))["run_id"]
    assert made.name == f"shop-{time.strftime('%Y-%m-%d', time.gmtime())}-{run_id[:8]}.zip"
    lines = done.stderr.splitlines()
    assert lines[:3] == ["order items: 20 records", "orders: 50 records", "users: 4 records"]
    assert lines[3].startswith(f"Wrote {made}: 74 records of 3 schemas, 5 files, in ")
    assert "\x1b" not in done.stderr and done.stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == [made.name]  # no work directory left


@pytest.mark.slow
def test_export_names_a_bad_option(shop_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for options, named in [
        (["--schemas", "users,nope"], "--schemas: not in the source: nope"),
        (["--filter", "{x"], "--filter: not JSON"),
        (
            ["--filter", '{"users": {"where": {"agez": 1}}}'],
            "--filter: users.where.agez: unknown column 'agez'",
        ),
        (["--filter", '{"orders": {"where": {}}}', "--schemas", "users"], "'orders' is not among --schemas"),
        (["--filter", '{"adults": {"where": {"id": 1}}}'], "'adults' is a view, exported only when named"),
        (["--filter", '{"users": {"where": {"id": 9223372036854775808}}}'], "users.where.id: 922337"),
        # Past 64 bits orjson reads a float: rounded, it would have passed.
        (
            ["--filter", '{"users": {"where": {"id": 123456789012345678901234567890}}}'],
            "id: 12345678901234567890123",
        ),
        (["--split-max-records", "0"], "--split-max-records: must be between 1 and"),
        (["--include", "data,everything"], "--include:"),
        (["--include", "data,,describe"], "--include: 'data,,describe' holds an empty name"),
        (["--schemas", ","], "--schemas: ',' holds an empty name"),
        (["--schemas", ""], "--schemas: '' holds an empty name"),
        (["--schemas", "users", "--schemas", "orders,"], "--schemas: 'users,orders,' holds an empty name"),
        (["--format", "csv"], "--format: invalid choice: 'csv'"),
        (["--name", " "], "--name: must be 1 to 200 characters"),
        (["-d", str(tmp_path / "full")], "-d: "),
        (["-o", str(tmp_path / "no" / "such" / "x.zip")], "-o: the directory"),
        (["-o", f"{tmp_path / 'newdir'}/"], f"-o {tmp_path / 'newdir'}/: no such directory"),
        (["-o", f"{tmp_path / 'full' / 'x'}/"], f"-o {tmp_path / 'full' / 'x'}/: no such directory"),
    ]:
        with pytest.raises(SystemExit) as exited:  # in this process: argparse's exit
            commands.run_command(["export", str(shop_db), *options])
        stderr = capsys.readouterr().err
        assert exited.value.code == 2, (options, stderr)
        assert named in stderr.splitlines()[-1], (options, stderr)
    done = cli("export", str(shop_db), "--schemas", "nope", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.splitlines()[-1].startswith(
        "extracts-app export: error: --schemas"
    )
    missing = cli("export", str(tmp_path / "nope.db"), cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"extracts-app: cannot open the source: Source database {tmp_path / 'nope.db'} does not exist"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_an_option_given_twice_is_refused_and_include_adds_up(
    shop_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """argparse let the last of a repeated option win without a word: a second --filter dropped
    the first (every row of that schema exported), ``--include data --include describe`` wrote
    no data, a second -o or --url replaced the first. A one-value option given twice is now
    refused; --include adds up as --schemas does."""
    for argv, named in [
        (
            ["export", str(shop_db), "--filter", '{"users": {"where": {"id": 1}}}', "--filter", "{}"],
            "--filter",
        ),
        (["export", str(shop_db), "--format", "json", "--format", "yaml"], "--format"),
        (
            ["export", str(shop_db), "--split-max-records", "5", "--split-max-records", "6"],
            "--split-max-records",
        ),
        (["export", str(shop_db), "--name", "a", "--name", "b"], "--name"),
        (["export", str(shop_db), "-o", "a.zip", "--output", "b.zip"], "-o/--output"),
        (["export", str(shop_db), "-d", "a", "-d", "b"], "-d/--directory"),
        (["run", "x", "--url", "http://127.0.0.1:1", "--url", "http://127.0.0.1:2"], "--url"),
        (["run", "x", "--token", "a", "--token", "b"], "--token"),
        (["run", "x", "--download", "a.zip", "--download", "b.zip"], "--download"),
    ]:
        with pytest.raises(SystemExit) as exited:
            commands.run_command(argv)
        stderr = capsys.readouterr().err
        assert exited.value.code == 2, (argv, stderr)
        assert stderr.splitlines()[-1].endswith(f"error: {named} is given more than once; give it once")
    out = tmp_path / "both"
    assert (
        commands.run_command(
            ["export", str(shop_db), "-q", "-d", str(out), "--include", "data", "--include", "describe"]
        )
        == 0
    )
    assert {"describe.yaml", "users.jsonl.gz"} <= {p.name for p in out.iterdir()}
    with pytest.raises(SystemExit):
        commands.run_command(["export", str(shop_db), "--include", "data", "--include", "data"])
    assert "--include: 'data,data' must be" in capsys.readouterr().err


def test_a_filter_naming_a_key_twice_is_refused(shop_db: Path, capsys: pytest.CaptureFixture):
    """``{"users": {"where": {"id": 1, "id": 2}}}`` kept only id = 2, without a word."""
    with pytest.raises(SystemExit) as exited:
        commands.run_command(["export", str(shop_db), "--filter", '{"users": {"where": {"id": 1, "id": 2}}}'])
    assert exited.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith("error: --filter: the key 'id' appears twice in one object; give each key once")
    )


def test_an_empty_path_is_refused_not_ignored(shop_db: Path, tmp_path: Path):
    """-d '' was dropped as if not given (a ZIP written instead of a directory), -o '' wrote the
    default name, verify '' checked the current directory, run --download '' saved there, and
    run --url '' or --token '' fell back to the defaults."""
    env = {k: v for k, v in ENV.items() if not k.startswith("EXTRACTS_")}
    for args, named in [
        (["export", str(shop_db), "-d", ""], "extracts-app export: error: -d: give a directory, not ''"),
        (["export", str(shop_db), "-o", ""], "extracts-app export: error: -o: give a ZIP file name, not ''"),
        (
            ["verify", ""],
            "extracts-app verify: error: PATH: give a ZIP, a run directory or a tarball, not ''",
        ),
        (
            ["run", "x", "--url", "http://127.0.0.1:1", "--token", "t", "--download", ""],
            "extracts-app run: error: --download: give a file or a directory, not ''",
        ),
        # Dropped for the defaults: the local service, and the token file beside its state.
        (
            ["run", "x", "--url", "", "--token", "t"],
            "extracts-app run: error: --url: give the service's URL, not ''",
        ),
        (["run", "x", "--token", ""], "extracts-app run: error: --token: give the token, not ''"),
    ]:
        done = cli(*args, cwd=tmp_path, env=env)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.splitlines()[-1] == named, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_path_that_cannot_be_looked_at_is_one_line(shop_db: Path, tmp_path: Path):
    """A name past the file system's 255 bytes (or, for a user, in a directory they may not
    search): looking at it raises OSError, which reached the user as a traceback."""
    env = {k: v for k, v in ENV.items() if not k.startswith("EXTRACTS_")}
    long = "x" * 300
    for args, status, said in [
        (["export", str(shop_db), "-o", f"{long}.zip"], 2, "extracts-app export: error: -o: "),
        (["export", str(shop_db), "-d", long], 2, "extracts-app export: error: -d: "),
        (
            ["export", f"{long}.db"],
            1,
            "extracts-app: cannot open the source: Cannot open the source database ",
        ),
        (["verify", long], 2, "extracts-app verify: error: PATH: "),
        (
            ["run", "x", "--url", "http://127.0.0.1:1", "--token", "t", "--download", long],
            2,
            "extracts-app run: error: --download: ",
        ),
    ]:
        done = cli(*args, cwd=tmp_path, env=env)
        assert done.returncode == status and "Traceback" not in done.stderr, (args[:2], done.stderr)
        last = done.stderr.splitlines()[-1]
        assert last.startswith(said) and last.endswith("File name too long"), done.stderr
    assert list(tmp_path.iterdir()) == []


def test_text_options_that_are_not_utf8_are_refused_up_front(shop_db: Path, tmp_path: Path):
    """Bytes that are not UTF-8 in a name, JSON or URL: exit 2 naming the option, before any work."""
    bad = "n\udcff"  # how Python hands over the argv bytes b"n\xff"
    for options, named in [
        (["--name", bad], "--name: b'n\\xff' holds bytes"),
        (["--schemas", f"users,{bad}"], "--schemas: b'users,n\\xff' holds bytes"),
        (["--filter", bad], "--filter: b'n\\xff' holds bytes"),
        (["--include", bad], "--include: b'n\\xff' holds bytes"),
    ]:
        done = cli("export", str(shop_db), *options, "-o", "out.zip", cwd=tmp_path)
        assert done.returncode == 2, (options, done.stderr)
        assert done.stderr.splitlines()[-1] == f"extracts-app export: error: {named} that are not UTF-8; " + (
            "give it as UTF-8 text"
        ), (options, done.stderr)
    source = tmp_path / f"{bad}.db"
    source.write_bytes(shop_db.read_bytes())
    done = cli("export", str(source), "-o", "out.zip", cwd=tmp_path)
    assert done.returncode == 2 and "error: SOURCE: " in done.stderr.splitlines()[-1], done.stderr
    source.unlink()
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a work directory
    # -o and -d are paths: bytes there are the user's file names.
    done = cli("export", str(shop_db), "-q", "-o", f"{bad}.zip", cwd=tmp_path)
    assert done.returncode == 0 and verify_path(tmp_path / f"{bad}.zip", io.StringIO()), done.stderr

    env = {**ENV, "EXTRACTS_DB": str(tmp_path / "none.db")}
    for options, extra_env, named in [
        ([bad, "--token", "t"], {}, "EXTRACT: b'n\\xff' holds bytes"),
        (
            ["x", "--token", "t", "--url", f"http://127.0.0.1:9/{bad}"],
            {},
            "--url: b'http://127.0.0.1:9/n\\xff'",
        ),
        (["x", "--token", "t"], {"EXTRACTS_URL": f"http://127.0.0.1:9/{bad}"}, "EXTRACTS_URL: "),
    ]:
        done = cli("run", *options, env={**env, **extra_env})  # port 9: a request would exit 1
        assert done.returncode == 2, (options, done.stderr)
        assert named in done.stderr.splitlines()[-1] and "Traceback" not in done.stderr, done.stderr


def test_export_into_an_existing_empty_directory_keeps_it(shop_db: Path, tmp_path: Path):
    """-d onto the user's empty directory (or a symlink to one) moves the files in; the directory stays."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    before = private.stat()
    done = cli("export", str(shop_db), "-q", "-d", str(private), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    after = private.stat()
    assert (after.st_ino, after.st_mode, after.st_uid) == (before.st_ino, before.st_mode, before.st_uid)
    assert verify_path(private, io.StringIO())
    assert not [p.name for p in private.iterdir() if p.name.startswith(".")]  # no work directory left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private"]

    # Through a symlink: into the directory it leads to, which may be elsewhere; the link stays.
    elsewhere = tmp_path / "elsewhere" / "real"
    elsewhere.mkdir(parents=True)
    (tmp_path / "lnk").symlink_to(elsewhere)
    done = cli("export", str(shop_db), "-q", "-d", "lnk", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "lnk").is_symlink() and verify_path(elsewhere, io.StringIO())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "lnk", "private"]

    # A symlink to nothing is refused up front.
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    done = cli("export", str(shop_db), "-q", "-d", "dangling", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "extracts-app export: error: -d: dangling is a symlink to nothing; give the directory itself"
    )
    assert not (tmp_path / "nowhere").exists()


def test_export_refuses_to_write_over_its_source(
    shop_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """-o or -d naming the source database, through a symlink, a hard link or a sidecar: exit 2."""
    source = tmp_path / "s.db"
    source.write_bytes(shop_db.read_bytes())
    (tmp_path / "link.db").symlink_to(source)
    os.link(source, tmp_path / "hard.db")
    before = source.read_bytes()
    for given, options in [
        (str(source), ["-o", str(source)]),
        (str(source), ["-o", str(tmp_path / "link.db")]),
        (str(source), ["-o", str(tmp_path / "hard.db")]),
        (str(tmp_path / "link.db"), ["-o", str(source)]),
        (f"sqlite:///{source}", ["-o", str(tmp_path / "." / "s.db")]),
        (str(source), ["-o", str(tmp_path / "s.db-wal")]),
        (str(source), ["-d", str(tmp_path / "s.db-journal")]),
        (str(source), ["-d", str(source)]),
    ]:
        with pytest.raises(SystemExit) as exited:
            commands.run_command(["export", given, "-q", *options])
        stderr = capsys.readouterr().err
        assert exited.value.code == 2, (options, stderr)
        assert f"{options[0]}: {options[1]} is the source database" in stderr.splitlines()[-1]
    done = cli("export", "s.db", "-q", "-o", "s.db", cwd=tmp_path)
    assert done.returncode == 2 and "-o: s.db is the source database" in done.stderr
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.db", "link.db", "s.db"]


def test_export_options_follow_the_extract_fields():
    """The command line checks options without importing the service: its copies of the rules must agree."""
    assert commands.FORMATS == config.FORMATS
    import extracts_app

    assert extracts_app.COMMANDS == commands.COMMANDS
    assert config.FIELDS_BY_NAME["split_max_records"].schema["maximum"] == commands.SPLIT_MAX
    defaults = {f.name: f.default for f in config.EXTRACT_FIELDS}
    parsed = commands._parser()[0].parse_args(["export", "x.db"])
    snapshot = commands.export_config(parsed, pytest.fail)
    assert snapshot == {key: defaults[key] for key in snapshot}
    leaves = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, extracts.cli, extracts.export, extracts.verify, extracts.remote, extracts.progress; "
            "heavy = {'starlette', 'databases', 'sqlalchemy', 'extracts_app', 'uvicorn'}; "
            "print(sorted(heavy & set(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
    )
    assert leaves.stdout.strip() == "[]", leaves.stderr


# ---------------------------------------------------------------- the progress bar, Ctrl-C


@pytest.mark.slow
def test_progress_bar_on_a_terminal_appears_advances_and_finishes(big_db: Path, tmp_path: Path):
    code, output, _ = in_pty(["export", str(big_db), "-o", "big.zip"], tmp_path)
    assert code == 0, output[-2000:]
    text = ANSI.sub(b"", output).decode()
    counts = [int(done.replace(",", "")) for done in re.findall(r"([\d,]+)/600,001 records", text)]
    assert len(set(counts)) >= 3, text[-2000:]  # it advanced
    assert counts == sorted(counts) and counts[-1] == 600_001
    assert re.search(r"big \(1/2\)", text) and re.search(r"[\d,]+ rows/s", text) and "ETA" in text
    assert "small: 1 records" in text and "big: 600,000 records" in text
    assert "Wrote " in text and "\x1b[" in output.decode()  # drawn in place, with escapes
    assert verify_path(tmp_path / "big.zip", io.StringIO())


@pytest.mark.slow
@pytest.mark.parametrize("target", [["-o", "out.zip"], ["-d", "out"]])
def test_ctrl_c_mid_table_stops_within_two_seconds_leaving_nothing(big_db: Path, tmp_path: Path, target):
    code, output, stopped_in = in_pty(
        ["export", str(big_db), *target],
        tmp_path,
        stop_when=rb"big \(1/2\)[^\r\n]* [1-9][\d,]*/600,001 records",
    )
    assert code == 130, output[-2000:]
    assert 0 < stopped_in < 2.0
    assert b"extracts-app: interrupted; nothing was written" in output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_terminal_closing_mid_table_stops_as_ctrl_c_does_and_nohup_keeps_it(big_db: Path, tmp_path: Path):
    """SIGHUP (the terminal or the ssh session closed) used to kill the export on the spot,
    leaving its hidden work directory, half-written files and all, beside the target."""
    for nohup in (False, True):
        process = subprocess.Popen(
            [*APP, "export", str(big_db), "-o", "out.zip"],
            cwd=tmp_path,
            env=ENV,
            stderr=subprocess.PIPE,
            preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if nohup else None,
        )
        wait_for(lambda: list(tmp_path.glob(".out.zip.*/run_*/.big.*")), what="the export writing big")
        process.send_signal(signal.SIGHUP)
        sent = time.monotonic()
        _, stderr = process.communicate(timeout=30)
        if nohup:
            assert process.returncode == 0, stderr.decode()
            assert [p.name for p in tmp_path.iterdir()] == ["out.zip"]
            (tmp_path / "out.zip").unlink()
        else:
            assert process.returncode == 130 and time.monotonic() - sent < 2.0, stderr.decode()
            assert stderr.decode().splitlines()[-1] == "extracts-app: interrupted; nothing was written"
            assert list(tmp_path.iterdir()) == []


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler for ``sig`` (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)[1], 16)
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_the_export_starts_exits_130_leaving_nothing(big_db: Path, tmp_path: Path, sig):
    """While its modules load (orjson's init once crashed on KeyboardInterrupt) and the source opens.

    Python takes SIGINT over as it starts, the command SIGTERM about 50 ms later (before that,
    Python is still starting: nothing there can catch a signal): each signal is sent a moment
    after one or the other.
    """
    for after, delay in [(signal.SIGTERM, 0), (signal.SIGTERM, 0.02), (signal.SIGINT, 0.15)]:
        for more in (0, 0.1, 0.2) if after == signal.SIGINT else (0,):
            process = subprocess.Popen(
                [*APP, "export", str(big_db), "-o", "out.zip"], cwd=tmp_path, env=ENV, stderr=subprocess.PIPE
            )
            deadline = time.monotonic() + 10
            while not _catches(process.pid, after) and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(delay + more)
            process.send_signal(sig)
            _, stderr = process.communicate(timeout=30)
            if process.returncode == 0:  # a fast machine: the file was in place, the signal then ignored
                with zipfile.ZipFile(tmp_path / "out.zip") as done:
                    assert done.testzip() is None
                (tmp_path / "out.zip").unlink()
                continue
            assert process.returncode == 130, (after, delay + more, stderr.decode())
            # On a fast machine the export may be under way (its line for each table done comes first).
            *begun, last = stderr.decode().splitlines()
            assert last == "extracts-app: interrupted; nothing was written", stderr.decode()
            assert all(re.fullmatch(r"(big|small): [\d,]+ records", line) for line in begun), stderr.decode()
            assert list(tmp_path.iterdir()) == [], (after, delay + more)


@pytest.mark.parametrize("schema", ["z[/foo]", "y[/]", "[bold]x"])
def test_progress_bar_shows_a_schema_name_as_it_is(schema: str):
    """The bar's label is text: a schema name that looks like rich markup is shown, not parsed."""
    from rich.console import Console

    from executor.messages import Phase, progress_detail
    from extracts.progress import Bar

    out = io.StringIO()
    bar = Bar(Console(file=out, force_terminal=True, width=140))
    detail = progress_detail(Phase.EXPORTING_DATA, current_schema=schema, schemas_total=2, records_total=9)
    bar.update(detail)
    bar.close()  # draws the bar a last time, in this thread
    assert f"{schema} (1/2)" in ANSI.sub(b"", out.getvalue().encode()).decode()


def test_quiet_prints_nothing(shop_db: Path, tmp_path: Path):
    code, output, _ = in_pty(["export", str(shop_db), "-q", "-d", "out"], tmp_path)
    assert code == 0 and output == b""
    assert (tmp_path / "out" / "manifest.json").is_file()


# ---------------------------------------------------------------- verify


@pytest.fixture(scope="module")
def exported(shop_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One ZIP and one directory per format, compressed and not."""
    base = tmp_path_factory.mktemp("exported")
    made = {}
    for fmt in ("jsonl", "json", "yaml", "archive"):
        for compress in ("gz", "plain"):
            name = f"{fmt}-{compress}"
            options = ["--format", fmt] + (["--no-compress"] if compress == "plain" else [])
            for kind, target in (
                ("zip", ["-o", str(base / f"{name}.zip")]),
                ("dir", ["-d", str(base / name)]),
            ):
                # In this process (the same code as the command; a process start costs 0.4 s here).
                assert commands.run_command(["export", str(shop_db), *options, *target, "-q"]) == 0
                made[f"{name}.{kind}"] = Path(target[1])
    return made


@pytest.mark.slow
def test_verify_passes_on_every_format(exported: dict[str, Path]):
    for name, path in exported.items():
        out = io.StringIO()
        assert verify_path(path, out), (name, out.getvalue())
        lines = out.getvalue().splitlines()
        assert all(line.startswith("ok ") for line in lines[:-1]) and lines[-1].startswith("all ")
        if name.startswith("jsonl"):
            assert any(line.split()[1] == "users.jsonl.gz:" or "users.jsonl:" in line for line in lines)
            assert any("4 records" in line for line in lines)
    tarball = next(exported["archive-gz.dir"].glob("*.tar.gz"))
    done = cli("verify", str(tarball))
    assert done.returncode == 0
    assert "ok      users.jsonl: " in done.stdout and ", 4 records" in done.stdout
    plain = next(exported["archive-plain.dir"].glob("*.tar"))
    assert cli("verify", str(plain)).returncode == 0


def _copy_dir(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_verify_catches_flipped_truncated_missing_and_wrong_sizes(exported: dict[str, Path], tmp_path: Path):
    def check(path: Path, expected: str) -> None:
        out = io.StringIO()
        assert not verify_path(path, out)
        assert expected in out.getvalue(), out.getvalue()

    flipped = _copy_dir(exported["jsonl-plain.dir"], tmp_path / "flipped")
    _flip(flipped / "orders.jsonl", 100)
    check(flipped, "FAILED  orders.jsonl: SHA-256 differs from the manifest")
    done = cli("verify", str(flipped))  # the command: one line per file, exit status 1
    assert done.returncode == 1 and len(done.stdout.splitlines()) == 5
    assert done.stdout.splitlines()[-1] == "1 of 4 files do not match the manifest"

    truncated = _copy_dir(exported["jsonl-gz.dir"], tmp_path / "truncated")
    data = (truncated / "users.jsonl.gz").read_bytes()
    (truncated / "users.jsonl.gz").write_bytes(data[:-10])
    check(truncated, f"FAILED  users.jsonl.gz: {len(data) - 10:,} bytes, the manifest says {len(data):,}")

    missing = _copy_dir(exported["yaml-plain.dir"], tmp_path / "missing")
    (missing / "users.yaml").unlink()
    (missing / "notes.txt").write_text("mine")
    check(missing, "MISSING users.yaml: listed in the manifest, not found")
    check(missing, "EXTRA   notes.txt: not listed in the manifest")

    wrong = _copy_dir(exported["json-gz.dir"], tmp_path / "wrong")
    manifest = json.loads((wrong / "manifest.json").read_bytes())
    manifest["artifacts"][1]["size"] += 1
    (wrong / "manifest.json").write_text(json.dumps(manifest))
    check(wrong, f"the manifest says {manifest['artifacts'][1]['size']:,}")

    records = _copy_dir(exported["jsonl-plain.dir"], tmp_path / "records")
    manifest = json.loads((records / "manifest.json").read_bytes())
    users = next(a for a in manifest["artifacts"] if a["name"] == "users.jsonl")
    users["records"] = 5
    (records / "manifest.json").write_text(json.dumps(manifest))
    check(records, "FAILED  users.jsonl: 4 records, the manifest says 5")

    # One file listed twice (a run names each once): the second entry fails, the first still counts.
    twice = _copy_dir(exported["jsonl-plain.dir"], tmp_path / "twice")
    manifest = json.loads((twice / "manifest.json").read_bytes())
    users = next(a for a in manifest["artifacts"] if a["name"] == "users.jsonl")
    manifest["artifacts"].append(users)
    (twice / "manifest.json").write_text(json.dumps(manifest))
    check(twice, "FAILED  users.jsonl: listed twice in the manifest")
    out = io.StringIO()
    verify_path(twice, out)
    assert "ok      users.jsonl" in out.getvalue() and "1 of 5 files" in out.getvalue(), out.getvalue()

    # In a ZIP: a flipped byte of a stored entry, and the ZIP cut short.
    source = exported["jsonl-plain.zip"]
    archive = zipfile.ZipFile(source)
    info = archive.getinfo("orders.jsonl")
    flipped_zip = tmp_path / "flipped.zip"
    flipped_zip.write_bytes(source.read_bytes())
    local = flipped_zip.read_bytes()[info.header_offset : info.header_offset + 30]
    name_length, extra_length = struct.unpack("<HH", local[26:30])  # the extra may pad the header
    _flip(flipped_zip, info.header_offset + 30 + name_length + extra_length + 5)
    check(flipped_zip, "FAILED  orders.jsonl: cannot be read whole: Bad CRC-32")
    cut = tmp_path / "cut.zip"
    cut.write_bytes(source.read_bytes()[:-100])
    check(cut, "not a readable ZIP, tarball or run directory")

    # In a tarball: a flipped byte in a plain tar member.
    tarball = tmp_path / "flipped.tar"
    tarball.write_bytes(next(exported["archive-plain.dir"].glob("*.tar")).read_bytes())
    with tarfile.open(tarball) as tar:
        member = tar.getmember("orders.jsonl")
    _flip(tarball, member.offset_data + 10)
    check(tarball, "FAILED  orders.jsonl: SHA-256 differs from the manifest")
    assert cli("verify", str(tmp_path / "nothing-here")).returncode == 2


def _zip_of(path: Path, files: dict[str, bytes], manifest: dict | None = None) -> Path:
    """A ZIP of ``files`` stored, with a manifest listing them (or ``manifest``)."""
    listed = [
        {"name": name, "size": len(data), "checksum": hashlib.sha256(data).hexdigest(), "records": None}
        for name, data in files.items()
    ]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("manifest.json", json.dumps(manifest or {"artifacts": listed}))
    return path


def _patch_central(path: Path, name: str, offset: int, value: bytes) -> None:
    """Overwrite bytes of ``name``'s central directory header (8: flags, 10: method)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")
    while data[at + 46 : at + 46 + len(name)] != name.encode():
        at = data.index(b"PK\x01\x02", at + 4)
    data[at + offset : at + offset + len(value)] = value
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_verify_says_in_one_line_what_it_cannot_read(tmp_path: Path):
    """A manifest with fields of the wrong type, members zipfile cannot open: lines, no traceback."""

    def check(path: Path, expected: str) -> None:
        done = cli("verify", str(path))
        assert done.returncode == 1 and done.stderr == "", done.stderr
        assert expected in done.stdout, done.stdout

    data = b'{"a": 1}\n'
    entry = {"name": "a.jsonl", "size": len(data), "checksum": hashlib.sha256(data).hexdigest(), "records": 1}
    for key, value in [("size", "9"), ("name", 5), ("size", True), ("records", "1"), ("checksum", None)]:
        folder = tmp_path / f"{key}-{value}"
        folder.mkdir()
        (folder / "a.jsonl").write_bytes(data)
        (folder / "manifest.json").write_text(json.dumps({"artifacts": [{**entry, key: value}]}))
        check(folder, f"is not a run manifest (artifacts[0].{key} is {value!r})")
    check(_zip_of(tmp_path / "listed.zip", {}, {"artifacts": {"a": 1}}), "is not a run manifest")
    # Named as a user can act on: it said "'int' object is not subscriptable", "'artifacts'", "'size'".
    for shape, said in [
        (["artifacts"], "(it is no object holding artifacts)"),
        ({"version": "1.0"}, "(it is no object holding artifacts)"),
        ({"artifacts": [1]}, "(artifacts[0] is 1, not an object)"),
        ({"artifacts": [{"name": "a.jsonl"}]}, "(artifacts[0] has no size)"),
    ]:
        check(_zip_of(tmp_path / "shape.zip", {}, shape), f"is not a run manifest {said}")  # type: ignore[arg-type]

    encrypted = _zip_of(tmp_path / "encrypted.zip", {"a.jsonl": data})
    _patch_central(encrypted, "a.jsonl", 8, struct.pack("<H", 1))
    check(encrypted, "FAILED  a.jsonl: cannot be read: File 'a.jsonl' is encrypted, password required")
    method = _zip_of(tmp_path / "method.zip", {"a.jsonl": data})
    _patch_central(method, "a.jsonl", 10, struct.pack("<H", 99))
    check(method, "FAILED  a.jsonl: cannot be read: ")
    local = _zip_of(tmp_path / "local.zip", {"a.jsonl": data})
    _flip(local, 0)  # a.jsonl's local header comes first
    check(local, "FAILED  a.jsonl: cannot be read: Bad magic number for file header")
    manifest = _zip_of(tmp_path / "manifest.zip", {"a.jsonl": data})
    _patch_central(manifest, "manifest.json", 10, struct.pack("<H", 99))
    check(manifest, "the ZIP's manifest.json cannot be read: ")


def test_a_named_pipe_given_to_read_is_refused_not_waited_on(tmp_path: Path):
    """A FIFO as SOURCE (the command or the service) or as verify's PATH: one line, at once.

    Opening one waits for a writer: SQLite's open retried through every signal, so the export
    and the service's start-up hung for good, deaf to Ctrl-C; verify hung in zipfile's check.
    """
    pipe = tmp_path / "pipe.db"
    os.mkfifo(pipe)
    done = cli("export", str(pipe), "-o", str(tmp_path / "out.zip"), timeout=20)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines() == [
        f"extracts-app: cannot open the source: Source database {pipe} is not a regular file "
        "(a named pipe, a device or a socket); give an SQLite file"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.db"]
    done = cli("serve", "--source", str(pipe), "--db", str(tmp_path / "state.db"), "--port", "1", timeout=20)
    assert done.returncode == 1 and "is not a regular file" in done.stderr.splitlines()[-1], done.stderr
    done = cli("verify", str(pipe), timeout=20)
    assert done.returncode == 1 and done.stderr == "", done.stderr
    assert done.stdout.splitlines() == [
        f"FAILED  {pipe}: not a readable ZIP, tarball or run directory (a named pipe, a device or a socket)"
    ]


def test_a_named_pipe_or_device_is_never_written_over(shop_db: Path, tmp_path: Path):
    """export -o and run --download onto a FIFO (or a device: -o /dev/null as root) refuse it (exit 2).

    The ZIP was renamed over it, so the device or pipe was gone, a plain file in its place;
    run --download waited on the pipe for good, once the run had started.
    """
    pipe = tmp_path / "pipe.zip"
    os.mkfifo(pipe)
    done = cli("export", str(shop_db), "-o", str(pipe), timeout=20)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"extracts-app export: error: -o: {pipe} is not a regular file (a named pipe, a device or a socket); "
        "the ZIP replaces a file, never one of these"
    )
    env = {k: v for k, v in ENV.items() if not k.startswith("EXTRACTS_")}
    options = ["--url", "http://127.0.0.1:1", "--token", "t", "--download", str(pipe)]
    done = cli("run", "x", *options, env=env, timeout=20)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"extracts-app run: error: --download: {pipe} is not a regular file (a named pipe, a device or a "
        "socket); the ZIP replaces a file, never one of these"
    )
    assert pipe.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["pipe.zip"]


def test_verify_shows_a_hostile_name_and_never_obeys_it(tmp_path: Path):
    """Names from the ZIP or manifest were printed as they are: a newline forged a line of the
    report ("all 2 files match the manifest" from a ZIP that does not), and an escape sequence
    reached the terminal."""
    forged = "x.json\nall 2 files match the manifest\n\x1b]0;title\x07"
    archive = _zip_of(tmp_path / "hostile.zip", {forged: b"[]", "y.json": b"[]"})
    with zipfile.ZipFile(archive, "a") as extra:
        extra.writestr("z\x1b[2J.json", b"[]")  # not listed: an EXTRA line
    done = cli("verify", str(archive))
    assert done.returncode == 1, done.stdout
    assert done.stdout.splitlines() == [
        "ok      x.json\\nall 2 files match the manifest\\n\\x1b]0;title\\x07: 2 bytes",
        "ok      y.json: 2 bytes",
        "EXTRA   z\\x1b[2J.json: not listed in the manifest",
        "1 of 3 files do not match the manifest",
    ]


def test_verify_into_a_pipe_closed_early_ends_quietly(tmp_path: Path):
    """verify … | head -1: the next line met a closed pipe, and a BrokenPipeError traceback
    (two, with the one at exit) followed on stderr."""
    files = {f"part{n:05d}.json": b"[]" for n in range(3000)}
    archive = _zip_of(tmp_path / "many.zip", files)
    reader = subprocess.Popen(
        [*APP, "verify", str(archive)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    assert reader.stdout is not None and reader.stdout.readline().startswith(b"ok      part")
    reader.stdout.close()  # as head -1 does
    _, stderr = reader.communicate(timeout=60)
    assert reader.returncode == 1 and stderr == b"", stderr.decode()


@pytest.mark.slow
def test_verify_refuses_a_manifest_that_inflates_past_reason(tmp_path: Path):
    """A manifest.json deflated from 257 MiB of blanks (a few hundred KB in the ZIP or tarball)
    was read whole: half a gigabyte of memory for this one, as much as it declares for others."""
    blanks = b" " * (1 << 20)
    bomb = tmp_path / "bomb.zip"
    with (
        zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("manifest.json", "w") as out,
    ):
        for _ in range(257):
            out.write(blanks)
        out.write(b'{"artifacts": []}')
    tarball = tmp_path / "bomb.tar.gz"
    with tarfile.open(tarball, "w:gz", compresslevel=1) as tar:
        member = tarfile.TarInfo("manifest.json")
        member.size = 257 * len(blanks)
        tar.addfile(member, io.BytesIO(blanks * 257))
    for path in (bomb, tarball):
        done = cli("verify", str(path))
        assert done.returncode == 1 and done.stderr == "", done.stderr
        where = path if path == bomb else "the tarball"
        assert done.stdout.splitlines()[-1] == (
            f"FAILED  {path}: the manifest.json of {where} is over 256 MiB; a run's manifest "
            "(a few hundred bytes a file) is never that large"
        ), done.stdout


def test_verify_reads_no_file_outside_what_it_checks(tmp_path: Path):
    """Names that lead out of the directory or ZIP, with the real sizes and checksums: FAILED, not ok."""
    outside = tmp_path / "t.db"
    outside.write_bytes(b"the user's database")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "link.yaml").symlink_to(outside)
    (folder / "inside.yaml").symlink_to(folder / "link.yaml")  # inside, then out
    data = outside.read_bytes()
    real = {"size": len(data), "checksum": hashlib.sha256(data).hexdigest(), "records": None}
    names = [str(outside), "../t.db", "..", "link.yaml", "inside.yaml"]
    (folder / "manifest.json").write_text(json.dumps({"artifacts": [{"name": n, **real} for n in names]}))
    done = cli("verify", str(folder))
    assert done.returncode == 1, done.stderr
    refused = "not a file name of a run (it would be read from elsewhere); not read"
    assert done.stdout.splitlines() == [
        f"FAILED  {outside}: {refused}",
        f"FAILED  ../t.db: {refused}",
        f"FAILED  ..: {refused}",
        f"FAILED  link.yaml: is a link to {outside}, outside {folder}; not read",
        f"FAILED  inside.yaml: is a link to {outside}, outside {folder}; not read",
        "5 of 5 files do not match the manifest",
    ]
    zipped = _zip_of(tmp_path / "slip.zip", {"../t.db": data})
    done = cli("verify", str(zipped))
    assert done.returncode == 1 and done.stdout.splitlines()[0] == f"FAILED  ../t.db: {refused}"


def test_verify_reads_in_a_stream(exported: dict[str, Path], tmp_path: Path):
    """A gzip'd JSON lines file counted a chunk at a time gives the records of the whole file."""
    lines = b"".join(b'{"n": %d}\n' % i for i in range(300_000))
    path = tmp_path / "many.jsonl.gz"
    path.write_bytes(gzip.compress(lines, 1))
    from extracts.verify import measure

    with open(path, "rb") as stream:
        got = measure(stream, path.name)
    assert got.records == 300_000 and got.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- run against a live service


@contextmanager
def _stand_in(answer: Callable[[http.server.BaseHTTPRequestHandler], None]) -> Iterator[str]:
    """An HTTP server at a URL (what ``run --url`` may meet instead of the service); ``answer``
    replies to every request. Yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer(self)

        do_POST = do_HEAD = do_GET

        def log_message(self, *args: object) -> None: ...

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def _reply(handler: http.server.BaseHTTPRequestHandler, body: bytes, kind: str = "application/json") -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _artifact(schema: str, name: str, records: int) -> dict[str, object]:
    """A data artifact as the service lists it (the fields ``run --wait`` reads)."""
    return {"artifact_type": "data-jsonl", "artifact_name": name, "schema_name": schema, "records": records}


def _run_read(
    status: str, current: str | None, completed: int = 0, started: str | None = None
) -> dict[str, object]:
    """A run of two schemas (54 records) as the service answers it, on ``current``."""
    detail = {
        "phase": "exporting_data" if current else status,
        "current_schema": current,
        "schemas_total": 2,
        "schemas_completed": completed,
        "records_exported": 0,
        "records_total": 54,
    }
    return {
        "status": status,
        "error": None,
        "records_exported": 54,
        "started_at": started,
        "progress_detail": detail,
    }


def _watched(
    answer: Callable[[http.server.BaseHTTPRequestHandler], None],
) -> tuple[dict[str, Any], list[str]]:
    """``run --wait``'s watch of run_1 at a stand-in answering with ``answer``: the ended run, the lines."""
    from extracts.progress import Lines
    from extracts.remote import watch

    lines = io.StringIO()
    with _stand_in(answer) as url:
        ended = watch(Client(url, "t"), "run_1", Lines(lines))
    return ended, lines.getvalue().splitlines()


def test_run_wait_counts_a_schema_only_once_its_files_are_all_listed():
    """The CI failure of stop 30: ``run --wait`` read the run (on "users"), then listed the files,
    by which time the worker had finished "users" and written the first of three parts of
    "orders"; "orders" was not the current schema, so its line said 20 records, not 50 in 3
    files. The listing now sits between two reads of the run that agree on where it is."""
    users = _artifact("users", "users.jsonl", 4)
    parts = [_artifact("orders", f"orders.0000{n}.jsonl", r) for n, r in ((1, 20), (2, 20), (3, 10))]
    # What the service holds at each read of the run; the listing answers with the next moment's files.
    moments = [
        (_run_read("running", "users", completed=0), []),
        (_run_read("running", "orders", completed=1), [users, parts[0]]),
        (_run_read("running", "orders", completed=1), [users, parts[0]]),
        (_run_read("completed", None, completed=2), [users, *parts]),
    ]
    at = {"moment": 0}

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        if handler.path.startswith("/api/data/extract_artifacts"):
            data = moments[min(at["moment"], len(moments) - 1)][1]
        else:  # the run: each read is a moment later
            data = moments[min(at["moment"], len(moments) - 1)][0]
            at["moment"] += 1
        _reply(handler, json.dumps({"data": data}).encode())

    ended, lines = _watched(answer)
    assert ended["status"] == "completed"
    assert lines == ["users: 4 records", "orders: 50 records in 3 files"]


@pytest.mark.slow
def test_run_wait_forgets_the_files_of_an_attempt_put_back_in_the_queue():
    """A run whose instance stops gracefully goes back to the queue, its files deleted, and runs
    again (SPEC: Snapshot, safety and faults; on another instance of a shared state). ``run
    --wait`` kept the files it had listed: the first part of "orders" made that schema's line
    ("orders: 20 records") as soon as the run was no longer on it, then its files of the next
    attempt were taken for ones already counted. Files of an earlier attempt are now forgotten."""
    users = _artifact("users", "users.jsonl", 4)
    first = _artifact("orders", "orders.00001.jsonl", 20)
    again = [_artifact("orders", f"orders.0000{n}.jsonl", r) for n, r in ((1, 20), (2, 20), (3, 10))]
    # What the service holds at each read of the run, and its files then (read twice: they agree).
    states = [
        (_run_read("running", "users", started="T1"), []),
        (_run_read("running", "orders", started="T1"), [users, first]),
        (_run_read("queued", None), []),  # put back: the first attempt's files deleted
        (_run_read("running", "users", started="T2"), []),
        (_run_read("running", "orders", started="T2"), [users]),
        (_run_read("completed", None, started="T2"), [users, *again]),
    ]
    at = {"read": 0}

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        state, files = states[min(at["read"] // 2, len(states) - 1)]
        if handler.path.startswith("/api/data/extract_artifacts"):
            data: object = files
        else:
            data = state
            at["read"] += 1
        _reply(handler, json.dumps({"data": data}).encode())

    ended, lines = _watched(answer)
    assert ended["status"] == "completed"
    assert lines == [
        "users: 4 records",
        "The run went back to the queue (the service running it stopped); it starts again",
        "orders: 50 records in 3 files",
    ]


@pytest.mark.slow
def test_run_wait_names_the_retry_of_a_run_that_failed(service, tmp_path: Path):
    """A run that failed for a transient cause is retried by the service as a run of its own; the
    command ended on "failed" without a word of it, as if nothing more would happen."""
    service.create_extract(name="cli retried", schemas=["users"], max_attempts=2, retry_delay_seconds=3600)
    source = Path(service.source)
    source.rename(tmp_path / "away.db")  # the source is gone: a transient cause
    try:
        done = cli(
            "run", "cli retried", "--url", service.base_url, "--token", service_token(service), "--wait"
        )
    finally:
        (tmp_path / "away.db").rename(source)
    assert done.returncode == 1, done.stderr
    last = done.stderr.splitlines()[-1]
    retry = re.search(r"; the service retries it as (run_[0-9a-f]+) \(GET /api/data/extract_runs/\1\)$", last)
    assert retry and "failed" in last and "(attempt 1 of 2)" in last, done.stderr
    run = service.client.get(f"/api/data/extract_runs/{retry[1]}").json()["data"]
    assert run["triggered_by"] == "retry" and run["attempt"] == 2
    service.client.post(f"/api/extracts/{run['extract_id']}/cancel")


@pytest.mark.slow
def test_run_wait_download_against_the_service(service, tmp_path: Path):
    extract = service.create_extract(
        name="cli run", schemas=["users", "orders"], split_files=True, split_max_records=20
    )
    token = service_token(service)
    target = tmp_path / "run.zip"
    done = cli(
        "run", "cli run", "--url", service.base_url, "--token", token, "--wait", "--download", str(target)
    )
    assert done.returncode == 0, done.stderr
    assert "orders: 50 records in 3 files" in done.stderr and "users: 4 records" in done.stderr
    run_id = re.search(r"Run (run_[0-9a-f]+) of 'cli run'", done.stderr)[1]
    assert f"Run {run_id} completed: 54 records" in done.stderr
    assert "all 5 files match the manifest" in done.stderr
    served = service.client.get(f"/api/extracts/runs/{run_id}/download").content
    assert target.read_bytes() == served

    # A partial file of that ZIP resumes where it stops (Range), and the whole verifies.
    partial = tmp_path / "partial.zip"
    partial.write_bytes(served[: len(served) // 2])

    def counts() -> list[int]:
        listed = service.client.get("/api/data/extract_artifacts", params={"filter[where][run_id]": run_id})
        return [a["download_count"] for a in listed.json()["data"]]

    before = counts()
    path, resumed = download(Client(service.base_url, token), run_id, partial, Quiet())
    assert resumed and path.read_bytes() == served
    assert counts() == before  # a resumed download was counted when it began (SPEC), not again
    assert verify_path(path, io.StringIO())

    # By id, with the URL and the token file from the environment; the partial file
    # holds the first bytes every such ZIP starts with: the download resumes after them.
    state = tmp_path / "state" / "extracts.db"
    state.parent.mkdir()
    (state.parent / "extracts.db.token").write_text(token + "\n")
    env = {**ENV, "EXTRACTS_URL": service.base_url, "EXTRACTS_DB": str(state)}
    env.pop("EXTRACTS_TOKEN", None)
    again = tmp_path / "again.zip"
    again.write_bytes(served[:10])  # "PK\3\4", version 20, no flags, stored
    done = cli("run", extract["id"], "--download", str(again), env=env)
    assert done.returncode == 0, done.stderr
    assert "resumed at byte 10" in done.stderr and "all 5 files match the manifest" in done.stderr

    # Another ZIP there (last night's download, or part of another run's) is replaced whole, as
    # `export -o` replaces: a nightly `run --download nightly.zip` goes on working.
    other = tmp_path / "other.zip"
    other.write_bytes(served[: len(served) - 200])
    done = cli("run", extract["id"], "--download", str(other), "--url", service.base_url, "--token", token)
    assert done.returncode == 0, done.stderr
    assert f"Downloaded {other} (" in done.stderr and "bytes, whole)" in done.stderr
    assert "all 5 files match the manifest" in done.stderr and "Traceback" not in done.stderr
    assert verify_path(other, io.StringIO()) and [p.name for p in tmp_path.glob(".other.zip.*")] == []


def test_a_resumed_download_that_does_not_verify_is_fetched_again_whole(
    service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Its first and last bytes were the ZIP's, a byte between them was not: downloaded again, once."""
    from extracts import remote

    extract = service.create_extract(name="cli refetch", schemas=["orders"])
    run = service.wait_run(service.run(extract["id"]))
    served = service.client.get(f"/api/extracts/runs/{run['id']}/download").content
    partial = tmp_path / "partial.zip"
    partial.write_bytes(served[: len(served) - 100])
    _flip(partial, len(served) // 2)
    monkeypatch.setattr(remote, "_SAMPLE", 16)  # the ZIP is small: the samples then miss the flip
    client = Client(service.base_url, service_token(service))
    assert remote._download_and_verify(client, run["id"], partial, Quiet(), quiet=True) == 0
    assert partial.read_bytes() == served


def test_run_checks_the_download_path_before_the_run(tmp_path: Path):
    """A --download PATH the ZIP cannot go to is refused (exit 2) before the first request."""
    env = {**ENV, "EXTRACTS_DB": str(tmp_path / "none.db")}
    (tmp_path / "mine.txt").write_text("the user's notes")
    (tmp_path / "empty.zip").write_bytes(b"")
    (tmp_path / "started.zip").write_bytes(b"PK\x03\x04\x14\x00")
    base = ["x", "--url", "http://127.0.0.1:9", "--token", "t", "--download"]  # port 9: a request exits 1
    for given, named in [
        ("nodir/x.zip", f"--download: the directory {tmp_path / 'nodir'} does not exist"),
        ("nodir/", "--download: nodir/: no such directory"),
        (
            "mine.txt",
            "--download: mine.txt exists and does not begin as a ZIP does, so it is no partial download; "
            "it is left as it is: remove it or give another path",
        ),
    ]:
        done = cli("run", *base, given, cwd=tmp_path, env=env)
        assert done.returncode == 2, (given, done.stderr)
        assert done.stderr.splitlines()[-1] == f"extracts-app run: error: {named}", done.stderr
    for given in ("empty.zip", "started.zip", "."):  # may be resumed, or a directory to put it in
        done = cli("run", *base, given, cwd=tmp_path, env=env)
        assert done.returncode == 1 and "cannot reach the service" in done.stderr, (given, done.stderr)
    assert (tmp_path / "mine.txt").read_text() == "the user's notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.zip", "mine.txt", "started.zip"]


def test_a_local_write_error_is_not_a_dropped_connection(service, tmp_path: Path):
    """A file that cannot be written fails the download at once, in one line, without resuming.

    The file is held under 1 KiB (RLIMIT_FSIZE, SIGXFSZ ignored): each write past it fails as
    one on a full disk does. (/dev/full is a device, refused before the run starts.)
    """
    import resource

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    service.create_extract(name="cli full", schemas=["users"])
    target = tmp_path / "full.zip"
    done = subprocess.run(
        [*APP, "run", "cli full", "--url", service.base_url, "--token", service_token(service)]
        + ["--download", str(target)],
        capture_output=True,
        env=ENV,
        timeout=60,
        text=True,
        preexec_fn=small_files,
    )
    assert done.returncode == 1, done.stderr
    assert "resuming" not in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"extracts-app: cannot write {target}: File too large; the run's ZIP stays on the service"
    )


def test_run_finds_an_extract_named_null_or_true(service):
    """By name, an extract is looked up with filter[where][name]=…, where null means IS NULL:
    an extract named "null" was "no extract has the id or name 'null'"."""
    base = ["--url", service.base_url, "--token", service_token(service)]
    for name in ("null", "true", "12"):
        extract = service.create_extract(name=name, schemas=["users"])
        done = cli("run", name, *base, "--wait", "-q")
        assert done.returncode == 0, (name, done.stderr)
        runs = service.client.get(f"/api/data/extract_runs?filter[where][extract_id]={extract['id']}")
        assert [run["status"] for run in runs.json()["data"]] == ["completed"], name


@pytest.mark.slow
def test_run_fails_clearly(service, tmp_path: Path):
    token = service_token(service)
    base = ["--url", service.base_url, "--token", token]
    missing = cli("run", "no such extract", *base)
    assert missing.returncode == 1
    assert (
        missing.stderr.strip()
        == "extracts-app: no extract has the id or name 'no such extract'; GET /api/data/extracts lists them"
    )
    wrong = cli("run", "x", "--url", service.base_url, "--token", "wrong")
    assert wrong.returncode == 1 and "401" in wrong.stderr and "--token" in wrong.stderr
    down = cli("run", "x", "--url", "http://127.0.0.1:9", "--token", "t")
    assert down.returncode == 1 and "cannot reach the service at http://127.0.0.1:9" in down.stderr
    no_token = cli("run", "x", env={**ENV, "EXTRACTS_DB": str(tmp_path / "none.db"), "EXTRACTS_TOKEN": ""})
    assert no_token.returncode == 2 and "--token: none given" in no_token.stderr
    # A run that fails exits 1 with its error: its filter names a column renamed since.
    service.create_extract(
        name="cli fails", schemas=["orders"], filter={"orders": {"where": {"note": {"$null": False}}}}
    )
    with sqlite3.connect(service.source) as con:
        con.execute("ALTER TABLE orders RENAME COLUMN note TO remark")
    try:
        failed = cli("run", "cli fails", *base, "--wait")
    finally:
        with sqlite3.connect(service.source) as con:
            con.execute("ALTER TABLE orders RENAME COLUMN remark TO note")
    assert failed.returncode == 1
    assert re.search(
        r"extracts-app: run run_[0-9a-f]+ failed: The filter filter.orders.where.note no longer fits",
        failed.stderr,
    )


def test_run_finds_the_token_file_of_a_sqlite_url_state(tmp_path: Path):
    """EXTRACTS_DB=sqlite:///… names the state file as a path does: the token is read beside it."""
    (tmp_path / "state.db.token").write_text("t0ken\n")
    down = "http://127.0.0.1:9"  # nothing listens: a token found gets as far as the request (exit 1)
    env = {**ENV, "EXTRACTS_URL": down, "EXTRACTS_TOKEN": ""}
    for db, cwd in (
        (f"sqlite:///{tmp_path}/state.db", None),  # sqlite:////absolute
        ("sqlite:///state.db", tmp_path),  # sqlite:///relative, from the state file's directory
        (str(tmp_path / "state.db"), None),
    ):
        found = cli("run", "x", cwd=cwd, env={**env, "EXTRACTS_DB": db})
        assert found.returncode == 1, (db, found.stderr)
        assert f"cannot reach the service at {down}" in found.stderr
    (tmp_path / "state.db.token").unlink()
    missing = cli("run", "x", env={**env, "EXTRACTS_DB": f"sqlite:///{tmp_path}/state.db"})
    assert missing.returncode == 2
    assert f"no token file beside the state file ({tmp_path}/state.db.token)" in missing.stderr


@pytest.mark.slow
def test_run_refuses_what_no_request_can_carry_and_answers_it_cannot_use(tmp_path: Path):
    """Bad options exit 2 naming the option; a server that is not the service exits 1; one line each."""
    env = {**ENV, "EXTRACTS_DB": str(tmp_path / "none.db")}
    for key in ("EXTRACTS_URL", "EXTRACTS_TOKEN", "EXTRACTS_HOST", "EXTRACTS_PORT"):
        env.pop(key, None)
    for options, extra_env, named in [
        (["x", "--url", "foo", "--token", "t"], {}, "--url: 'foo' is not an http:// or https:// URL"),
        (["x", "--url", "http://h:abc", "--token", "t"], {}, "--url: 'http://h:abc' is not a usable URL"),
        (
            ["x", "--token", "t"],
            {"EXTRACTS_PORT": "abc"},
            "EXTRACTS_HOST/EXTRACTS_PORT: 'http://127.0.0.1:abc'",
        ),
        (["x", "--token", "t"], {"EXTRACTS_URL": "ftp://h/"}, "EXTRACTS_URL: 'ftp://h/' is not an http://"),
        (["x", "--token", "€"], {}, "--token: a token is printable ASCII without spaces"),
        (["x", "--token", "a\nb"], {}, "--token: a token is printable ASCII without spaces"),
        (["x"], {"EXTRACTS_TOKEN": "a b"}, "EXTRACTS_TOKEN: a token is printable ASCII"),
        (["", "--token", "t"], {}, "EXTRACT: must be an extract's id or name, not empty"),
        # Each request's path is appended to the URL: a query or fragment would swallow it, and
        # urllib resolved "user:pw@127.0.0.1" as a host name (the password then in the error line).
        (["x", "--url", "http://u:pw@127.0.0.1:1", "--token", "t"], {}, "--url: give the service's URL"),
        (
            ["x", "--token", "t"],
            {"EXTRACTS_URL": "http://127.0.0.1:1/?a=1"},
            "EXTRACTS_URL: give the service's",
        ),
        (["x", "--url", "http://127.0.0.1:1#top", "--token", "t"], {}, "--url: give the service's URL"),
    ]:
        done = cli("run", *options, env={**env, **extra_env})
        assert done.returncode == 2, (options, done.stderr)
        assert (
            done.stderr.splitlines()[-1] == f"extracts-app run: error: {named}"
            or named in (done.stderr.splitlines()[-1])
        ), (options, done.stderr)
        assert "Traceback" not in done.stderr and ":pw@" not in done.stderr

    def page(handler: http.server.BaseHTTPRequestHandler) -> None:  # a web server: HTML everywhere
        _reply(handler, b"<html><body>hello</body></html>", "text/html")

    with _stand_in(page) as url:
        by_name = "?filter%5Bwhere%5D%5Bname%5D=..&filter%5Blimit%5D=2"  # "..": never asked as an id
        for name, asked in (("x", "/x"), ("..", by_name)):
            done = cli("run", name, "--url", url, "--token", "t", env=env)
            assert done.returncode == 1, done.stderr
            assert done.stderr.splitlines() == [
                f"extracts-app: GET /api/data/extracts{asked}: the answer is not the JSON an Extracts "
                f"service sends; is {url} the service?"
            ]


def test_run_says_in_one_line_what_a_service_answer_lacks(tmp_path: Path):
    """A run without the fields watching reads, a download without Content-Length or ETag: exit 1."""
    detail = {
        "phase": "completed",
        "schemas_total": 1,
        "schemas_completed": 1,
        "current_schema": None,
        "records_exported": 4,
        "records_total": 4,
    }
    whole = {"status": "completed", "error": None, "records_exported": 4, "progress_detail": detail}
    answers: dict[str, object] = {}

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?")[0]
        if path.endswith("/download"):  # a HEAD without Content-Length or ETag
            handler.send_response(200)
            handler.send_header("Content-Type", "application/zip")
            handler.end_headers()
            return
        data = {
            "/api/data/extracts/x": {"id": "x", "name": "x"},
            "/api/extracts/x/run": {"run_id": "run_1"},
            "/api/data/extract_runs/run_1": answers["run"],
            "/api/data/extract_artifacts": [],
        }[path]
        _reply(handler, json.dumps({"data": data}).encode())

    asked = "GET /api/data/extract_runs/run_1: the run lacks"
    with _stand_in(answer) as url:
        for run, download, expected in [
            (
                {"id": "run_1"},
                [],
                f"{asked} status, error, records_exported, progress_detail "
                "(or they are not what a run holds)",
            ),
            (
                {**whole, "progress_detail": {"phase": "completed", "current_schema": None}},
                [],
                f"{asked} progress_detail.schemas_total, progress_detail.schemas_completed, "
                "progress_detail.records_exported, progress_detail.records_total "
                "(or they are not what a run holds)",
            ),
            (
                whole,
                ["--download", str(tmp_path / "x.zip")],
                "HEAD /api/extracts/runs/run_1/download: the answer has no Content-Length or ETag "
                "(a ZIP download has both)",
            ),
        ]:
            answers["run"] = run
            done = cli("run", "x", "--url", url, "--token", "t", "--wait", "-q", *download)
            assert done.returncode == 1, done.stderr
            assert done.stderr.splitlines() == [f"extracts-app: {expected}; is {url} the service?"], (
                done.stderr
            )
    assert list(tmp_path.iterdir()) == []


def test_run_writes_nowhere_but_where_it_is_told(tmp_path: Path):
    """--download DIR took the file name from the server's Content-Disposition as given, so a
    server naming "../x.zip" or an absolute path had the ZIP written (or renamed over a file)
    outside DIR; a run_id holding a "/" ended in a ValueError traceback. Both are refused."""
    detail = {
        "phase": "completed",
        "schemas_total": 0,
        "schemas_completed": 0,
        "current_schema": None,
        "records_exported": 0,
        "records_total": 0,
    }
    run = {"status": "completed", "error": None, "records_exported": 0, "progress_detail": detail}
    zipped = _zip_of(tmp_path / "source.zip", {})
    body = zipped.read_bytes()
    zipped.unlink()
    answers: dict[str, str] = {}

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?")[0]
        if path.endswith("/download"):
            handler.send_response(200)
            handler.send_header("Content-Type", "application/zip")
            handler.send_header("Content-Length", str(len(body)))
            handler.send_header("ETag", '"e"')
            handler.send_header("Content-Disposition", f'attachment; filename="{answers["name"]}"')
            handler.end_headers()
            if handler.command == "GET":
                handler.wfile.write(body)
            return
        run_id = answers["run_id"]
        data = {
            "/api/data/extracts/x": {"id": "x", "name": "x"},
            "/api/extracts/x/run": {"run_id": run_id},
            f"/api/data/extract_runs/{run_id}": run,
            "/api/data/extract_artifacts": [],
        }[path]
        _reply(handler, json.dumps({"data": data}).encode())

    into = tmp_path / "in"
    into.mkdir()
    (tmp_path / "mine.zip").write_bytes(b"PK\x03\x04 the user's own ZIP")
    with _stand_in(answer) as url:
        for run_id, name, expected in [
            (
                "run_1",
                "../escaped.zip",
                "HEAD /api/extracts/runs/run_1/download: the file name '../escaped.zip'",
            ),
            (
                "run_1",
                str(tmp_path / "mine.zip"),
                f"HEAD /api/extracts/runs/run_1/download: the file name '{tmp_path}",
            ),
            ("run_1", ".hidden.zip", "HEAD /api/extracts/runs/run_1/download: the file name '.hidden.zip'"),
            ("run/../1", "x.zip", "POST /api/extracts/x/run: the run_id 'run/../1' is not a run's id"),
        ]:
            answers.update(run_id=run_id, name=name)
            done = cli("run", "x", "--url", url, "--token", "t", "-q", "--download", str(into))
            assert done.returncode == 1, done.stderr
            lines = done.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"extracts-app: {expected}"), done.stderr
            assert lines[0].endswith(f"is {url} the service?"), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "mine.zip"]
    assert (
        list(into.iterdir()) == []
        and (tmp_path / "mine.zip").read_bytes() == b"PK\x03\x04 the user's own ZIP"
    )


@pytest.mark.slow
def test_serve_and_no_command_are_the_service():
    for argv in (["--help"], ["serve", "--help"]):
        done = subprocess.run([*APP, *argv], capture_output=True, text=True, env=ENV, timeout=30)
        assert done.returncode == 0
        assert "--storage" in done.stdout and "--workers" in done.stdout
    bad = subprocess.run(
        [*APP, "serve", "--port", "many"], capture_output=True, text=True, env=ENV, timeout=30
    )
    assert bad.returncode == 2 and "--port [EXTRACTS_PORT]: 'many' is not a valid int" in bad.stderr
    export_help = subprocess.run(
        [*APP, "export", "--help"], capture_output=True, text=True, env=ENV, timeout=30
    )
    assert export_help.returncode == 0 and "--split-max-records N" in export_help.stdout


@pytest.mark.slow
def test_bench_cli_smoke(tmp_path: Path):
    """``bench/cli.py --smoke`` runs end to end (the figures: bench/cli.py on 1M rows)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cli.py"), "--smoke", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| jsonl | `sqlite3 -json` |" in done.stdout
    assert "-o plain.zip` |" in done.stdout and "-d dir` |" in done.stdout
