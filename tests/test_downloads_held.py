"""A download that started completes, whatever happens to its files meanwhile (SPEC: Downloads).

Deleting the run or the retention sweep unlinks the files while the response streams: every
file is held (an open descriptor, or a private hard link past the descriptor budget) before
the first byte. The client reads through a small receive buffer, so the server is still
reading files when they are removed; the artifacts are random bytes (base64 in JSON), so
the deflated ZIP cannot run ahead of the client by compressing.
"""

from __future__ import annotations

import http.client
import io
import os
import random
import resource
import shutil
import socket
import sqlite3
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import TOKEN, Service, start_service

PARTS = 96  # one part per row, 128 KiB of random bytes each: ~16 MB of JSON lines, 4 MB past the buffers
# A lower open-file limit for the service: its budget for held descriptors (a quarter of
# the limit) is then 64, so a ZIP of PARTS files holds the later ones by hard links.
NOFILE = 256


def make_noise_db(path: Path) -> Path:
    rng = random.Random(12)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE noise (id INTEGER PRIMARY KEY, data BLOB)")
    con.executemany("INSERT INTO noise VALUES (?, ?)", [(i, rng.randbytes(128 << 10)) for i in range(PARTS)])
    con.commit()
    con.close()
    return path


@pytest.fixture(scope="module")
def held_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("held")
    svc = start_service(tmp, str(make_noise_db(tmp / "noise.db")), "--cleanup-interval", "1")
    resource.prlimit(
        svc.process.pid, resource.RLIMIT_NOFILE, (NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )
    yield svc
    svc.stop()


def storage_fds(svc: Service) -> list[str]:
    """What the service process holds open under its storage directory (but its lock file)."""
    held = []
    for fd in os.listdir(f"/proc/{svc.process.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{svc.process.pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith(str(svc.storage)) and not target.endswith("/.extracts.lock"):
            held.append(target)
    return held


def assert_nothing_held(svc: Service) -> None:
    """Every descriptor closed and every private link removed once the responses ended.

    Both are read together, and the last reading is the one asserted: a response's files are
    released just after its last byte (descriptors, then the links' directory, which rmtree
    opens while it empties it), so a first look may fall between the two.
    """
    links = svc.storage / ".downloads"

    def held() -> tuple[list[str], list[Path]]:
        return storage_fds(svc), list(links.iterdir()) if links.exists() else []

    deadline = time.monotonic() + 10
    while (now := held()) != ([], []) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now == ([], [])


def completed_run(svc: Service, **fields) -> tuple[dict, list[dict]]:
    extract = svc.create_extract(name="Noise", schemas=["noise"], compress=False, **fields)
    run = svc.wait_run(svc.run(extract["id"]))
    assert run["status"] == "completed", run
    params = {"filter[where][run_id]": run["id"], "filter[limit]": 1000}
    artifacts = svc.client.get("/api/data/extract_artifacts", params=params).json()["data"]
    return run, artifacts


def open_download(svc: Service, url: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A GET whose client reads through a 64 KiB receive buffer: the server cannot run far ahead."""
    host, port = svc.base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    sock.connect((host, int(port)))
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.sock = sock
    conn.request("GET", url, headers={"Authorization": f"Bearer {TOKEN}"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    return conn, response


def delete_run(svc: Service, run: dict) -> None:
    assert svc.client.delete(f"/api/data/extract_runs/{run['id']}").status_code == 200
    assert not (svc.storage / run["id"]).exists()


def expire_and_sweep(svc: Service, run: dict) -> None:
    con = sqlite3.connect(svc.db)
    con.execute(
        "UPDATE extract_artifacts SET expires_at = '2000-01-01T00:00:00.000Z' WHERE run_id = ?", (run["id"],)
    )
    con.commit()
    con.close()
    deadline = time.monotonic() + 20  # the sweep runs every second (--cleanup-interval 1)
    while (svc.storage / run["id"]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (svc.storage / run["id"]).exists()


def unzip_test(data: bytes, tmp_path: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
    if shutil.which("unzip"):
        path = tmp_path / "download.zip"
        path.write_bytes(data)
        assert subprocess.run(["unzip", "-tq", str(path)], capture_output=True).returncode == 0


REMOVALS: dict[str, Callable[[Service, dict], None]] = {"delete": delete_run, "sweep": expire_and_sweep}


@pytest.mark.parametrize("removal", list(REMOVALS))
@pytest.mark.parametrize("compression", ["stored", pytest.param("deflate", marks=pytest.mark.slow)])
def test_a_zip_download_completes_when_its_run_is_removed(
    held_service: Service, tmp_path: Path, compression: str, removal: str
) -> None:
    svc = held_service
    run, artifacts = completed_run(svc, split_files=True, split_max_records=1)
    assert len(artifacts) == PARTS + 2  # describe.yaml, the parts, manifest.json
    url = f"/api/extracts/runs/{run['id']}/download?compression={compression}"
    expected = svc.client.get(url)
    assert expected.status_code == 200 and len(expected.content) > 12 << 20
    assert_nothing_held(svc)  # that response released its files: the budget is whole again
    conn, response = open_download(svc, url)
    first = response.read(1 << 16)
    # The first files are held by descriptors, the others (past the budget) by links.
    assert len(list((svc.storage / ".downloads").glob("*/*"))) == len(artifacts) - NOFILE // 4
    REMOVALS[removal](svc, run)
    rest = response.read()
    conn.close()
    assert first + rest == expected.content
    if compression == "stored":
        assert int(response.headers["content-length"]) == len(expected.content)
    unzip_test(first + rest, tmp_path)
    assert svc.client.get(url).status_code == 410
    assert_nothing_held(svc)


@pytest.mark.parametrize("removal", list(REMOVALS))
def test_a_file_download_completes_when_its_run_is_removed(held_service: Service, removal: str) -> None:
    svc = held_service
    run, artifacts = completed_run(svc)
    data = next(a for a in artifacts if a["artifact_type"] == "data-noise")
    url = f"/api/extracts/artifacts/{data['id']}/download"
    expected = Path(data["storage_path"]).read_bytes()
    conn, response = open_download(svc, url)
    first = response.read(1 << 16)
    REMOVALS[removal](svc, run)
    rest = response.read()
    conn.close()
    assert first + rest == expected
    assert int(response.headers["content-length"]) == len(expected)
    assert svc.client.get(url).status_code == 410
    assert_nothing_held(svc)


@pytest.mark.slow
def test_descriptors_are_released_when_the_client_goes_away(held_service: Service) -> None:
    svc = held_service
    run, artifacts = completed_run(svc, split_files=True, split_max_records=1)
    data = next(a for a in artifacts if a["artifact_type"] == "data-noise")
    urls = [
        f"/api/extracts/runs/{run['id']}/download",
        f"/api/extracts/runs/{run['id']}/download?compression=deflate",
        f"/api/extracts/artifacts/{data['id']}/download",
    ]
    for url in urls:  # gone mid-stream
        conn, response = open_download(svc, url)
        assert response.read(1 << 16)
        conn.sock.close()
        conn.close()
    host, port = svc.base_url.removeprefix("http://").split(":")
    for url in urls:  # gone before the body starts
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    for url in urls:  # HEAD
        assert svc.client.head(url).status_code == 200
    assert_nothing_held(svc)
    for url in urls:  # and everything still downloads whole
        assert svc.client.get(url).status_code == 200
    assert_nothing_held(svc)
