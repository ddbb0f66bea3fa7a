"""``az://`` storage against Azurite, Microsoft's own Azure Storage emulator (from npm).

Azurite runs as a separate process on loopback; the service gets ``--storage
az://container/prefix --storage-endpoint http://127.0.0.1:<port>/devstoreaccount1``
and the standard ``AZURE_STORAGE_ACCOUNT_*`` variables, as it would against Azure.
``.ci/run`` installs Azurite under ``.ci/node``; ``EXTRACTS_AZURITE`` names another copy.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import obstore
import pytest
from azure.storage.blob import BlobServiceClient
from helpers import Service, free_port, make_shop_db, start_service
from obstore.store import AzureStore

ROOT = Path(__file__).resolve().parents[1]
ACCOUNT = "devstoreaccount1"  # Azurite's well-known development account and key
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONTAINER = "extracts-test"
CREDENTIALS = {"AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": KEY}

# Azurite (Node.js) takes many seconds to start: the module runs in the full suite, not the quick one.
pytestmark = pytest.mark.slow


def azurite_command() -> str | None:
    for candidate in (
        os.environ.get("EXTRACTS_AZURITE"),
        str(ROOT / ".ci/node/node_modules/.bin/azurite-blob"),
        shutil.which("azurite-blob"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@pytest.fixture(scope="module")
def azurite() -> Iterator[str]:
    """The blob endpoint of a fresh Azurite, with the test container created."""
    command = azurite_command()
    if command is None:
        pytest.skip("Azurite is not installed (.ci/run installs it: npm install --prefix .ci/node azurite)")
    port = free_port()
    process = subprocess.Popen(
        [command, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence"]
        + ["--skipApiVersionCheck"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    connection = (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={endpoint};"
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            # No retries: the client's own backoff, while Azurite was not yet listening, made
            # its 1 s start take 20 s here.
            BlobServiceClient.from_connection_string(connection, retry_total=0).create_container(CONTAINER)
            break
        except Exception:  # not listening yet
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise AssertionError("Azurite did not start") from None
            time.sleep(0.2)
    yield endpoint
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def az(tmp_path_factory: pytest.TempPathFactory, azurite: str) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("az")
    svc = start_service(
        tmp,
        str(make_shop_db(tmp / "shop.db")),
        "--storage-endpoint",
        azurite,
        storage=f"az://{CONTAINER}/svc",
        env=CREDENTIALS,  # type: ignore[arg-type]
    )
    yield svc
    svc.stop()


def container(endpoint: str) -> AzureStore:
    return AzureStore(
        CONTAINER,
        prefix="svc",
        config={"account_name": ACCOUNT, "account_key": KEY, "endpoint": endpoint},
        client_options={"allow_http": True},
    )


def test_runs_write_blobs_that_download_whole_in_ranges_and_as_a_zip_then_delete(
    az: Service, azurite: str
) -> None:
    store = container(azurite)
    extract = az.create_extract(name="Azure", format="jsonl", split_files=True, split_max_records=20)
    run = az.wait_run(az.run(extract["id"]))
    assert run["status"] == "completed", run
    rows = az.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"], "filter[limit]": "1000"}
    ).json()["data"]
    assert len(rows) > 2 and {a["storage_backend"] for a in rows} == {"azure"}
    stored = {}
    for a in rows:
        assert a["storage_path"] == f"az://{CONTAINER}/svc/{run['id']}/{a['artifact_name']}"
        body = bytes(obstore.get(store, f"{run['id']}/{a['artifact_name']}").bytes())
        assert (len(body), hashlib.sha256(body).hexdigest()) == (a["size_bytes"], a["checksum"])
        stored[a["artifact_name"]] = body
        r = az.client.get(f"/api/extracts/artifacts/{a['id']}/download")
        assert (r.status_code, r.content) == (200, body)
        r = az.client.get(f"/api/extracts/artifacts/{a['id']}/download", headers={"Range": "bytes=3-40"})
        assert (r.status_code, r.content) == (206, body[3:41])

    url = f"/api/extracts/runs/{run['id']}/download"
    whole = az.client.get(url)
    assert whole.status_code == 200 and int(whole.headers["content-length"]) == len(whole.content)
    with zipfile.ZipFile(io.BytesIO(whole.content)) as archive:
        assert {i.filename: archive.read(i) for i in archive.infolist()} == stored
    middle = len(whole.content) // 3
    rest = az.client.get(url, headers={"Range": f"bytes={middle}-", "If-Range": whole.headers["etag"]})
    assert rest.status_code == 206 and whole.content[:middle] + rest.content == whole.content

    # A link Azure would refuse (a name escaped in the blob's key, "order%20items") is a 400.
    answers = set()
    for a in rows:
        redirect = az.client.get(f"/api/extracts/artifacts/{a['id']}/download", params={"redirect": "true"})
        if "%" in a["storage_path"]:
            assert redirect.status_code == 400 and "cannot sign a URL for" in redirect.json()["error"]
            answers.add(400)
            continue
        assert redirect.status_code == 307 and KEY not in redirect.headers["location"]
        with urllib.request.urlopen(redirect.headers["location"]) as signed:
            assert signed.read() == stored[a["artifact_name"]]
        answers.add(307)
    assert answers == {307, 400}

    assert az.client.delete(f"/api/data/extract_runs/{run['id']}").status_code == 200
    assert [o for batch in obstore.list(store, prefix=run["id"]) for o in batch] == []
    assert az.client.get(url).status_code == 410


@pytest.mark.parametrize("case", ["wrong key", "no container"])
def test_start_up_fails_fast_naming_the_container(tmp_path: Path, azurite: str, case: str) -> None:
    wrong_key = case == "wrong key"
    name = "no-such-container" if case == "no container" else CONTAINER
    started = time.monotonic()
    process = subprocess.run(
        [sys.executable, str(ROOT / "extracts_app.py"), "--db", str(tmp_path / "s.db")]
        + ["--storage", f"az://{name}/p", "--storage-endpoint", azurite]
        + ["--port", str(free_port()), "--token", "t"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **CREDENTIALS, "AZURE_STORAGE_ACCOUNT_KEY": KEY[::-1] if wrong_key else KEY},
        cwd=tmp_path,
    )
    assert process.returncode == 1, process.stdout + process.stderr
    assert process.stderr.startswith(f"extracts-app: cannot write to the object store az://{name}/p: ")
    assert process.stderr.count("\n") == 1, process.stderr
    assert KEY not in process.stderr and KEY[::-1] not in process.stderr
    assert time.monotonic() - started < 60
