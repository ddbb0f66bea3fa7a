"""Object storage (SPEC: Object storage) against a real S3-compatible server: moto's server mode.

The tests start ``moto_server`` on 127.0.0.1 (a separate process, nothing mocked
inside ours) and the service with ``--storage s3://bucket/prefix
--storage-endpoint http://127.0.0.1:<port>`` and the standard AWS variables.
"""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import obstore
import pytest
from helpers import (
    BUCKET,
    CREDENTIALS,
    Moto,
    Service,
    StoreProxy,
    free_port,
    http_get,
    make_big_db,
    make_shop_db,
    start_in_process,
    start_moto,
    start_service,
    wait_for,
)

from extracts.settings import parse_settings
from extracts.storage import StorageError, open_storage


def s3_service(
    tmp: Path, moto: Moto, source: str, prefix: str, *extra: str, env: dict[str, str] = CREDENTIALS
) -> Service:
    return start_service(
        tmp,
        source,
        "--storage-endpoint",
        moto.endpoint,
        *extra,
        storage=f"s3://{BUCKET}/{prefix}",
        env=env,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, moto: Moto) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("s3")
    svc = s3_service(tmp, moto, str(make_shop_db(tmp / "shop.db")), "svc")
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory, moto: Moto) -> Iterator[tuple[Service, StoreProxy]]:
    """A service whose store is reached through a proxy that can cut the store's answers."""
    tmp = tmp_path_factory.mktemp("proxied")
    proxy = StoreProxy(moto.port)
    svc = start_service(
        tmp,
        str(make_big_db(tmp / "big.db", 20_000)),  # big.jsonl: 1.6 MB, well past the bytes a cut keeps
        "--storage-endpoint",
        proxy.endpoint,
        storage=f"s3://{BUCKET}/proxied",
        env=CREDENTIALS,  # type: ignore[arg-type]
    )
    yield svc, proxy
    svc.stop()
    proxy.close()


def artifacts(svc: Service, run_id: str) -> list[dict]:
    return svc.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run_id, "filter[limit]": "1000"}
    ).json()["data"]


def object_bytes(moto: Moto, prefix: str, storage_path: str) -> bytes:
    key = storage_path.removeprefix(f"s3://{BUCKET}/{prefix}/")
    return bytes(obstore.get(moto.store(prefix), key).bytes())


@pytest.mark.slow
def test_runs_write_objects_that_download_as_files_and_as_a_resumable_zip(s3: Service, moto: Moto) -> None:
    for fmt in ("jsonl", "archive"):
        extract = s3.create_extract(name=f"S3 {fmt}", format=fmt, split_files=True, split_max_records=20)
        run = s3.wait_run(s3.run(extract["id"]))
        assert run["status"] == "completed", run
        rows = artifacts(s3, run["id"])
        assert {a["storage_backend"] for a in rows} == {"s3"}
        for a in rows:
            assert a["storage_path"] == f"s3://{BUCKET}/svc/{run['id']}/{a['artifact_name']}"
            stored = object_bytes(moto, "svc", a["storage_path"])
            assert (len(stored), hashlib.sha256(stored).hexdigest()) == (a["size_bytes"], a["checksum"])
            r = s3.client.get(f"/api/extracts/artifacts/{a['id']}/download")
            assert (r.status_code, r.content) == (200, stored)
            r = s3.client.get(f"/api/extracts/artifacts/{a['id']}/download", headers={"Range": "bytes=3-40"})
            assert (r.status_code, r.content) == (206, stored[3:41])
        # The stored ZIP: its entries are the objects; a download resumed from any byte is the same.
        url = f"/api/extracts/runs/{run['id']}/download"
        whole = s3.client.get(url)
        assert whole.status_code == 200 and int(whole.headers["content-length"]) == len(whole.content)
        with zipfile.ZipFile(io.BytesIO(whole.content)) as archive:
            assert archive.testzip() is None
            assert {i.filename: archive.read(i) for i in archive.infolist()} == {
                a["artifact_name"]: object_bytes(moto, "svc", a["storage_path"]) for a in rows
            }
        middle = len(whole.content) // 3
        rest = s3.client.get(url, headers={"Range": f"bytes={middle}-", "If-Range": whole.headers["etag"]})
        assert rest.status_code == 206 and whole.content[:middle] + rest.content == whole.content
    assert moto.uploads_in_progress() == 0
    keys = [o["path"] for batch in obstore.list(moto.store("svc")) for o in batch]
    assert not [k for k in keys if "/.scratch/" in k]  # an archive's staged members are gone


@pytest.mark.slow
def test_a_redirect_hands_out_a_presigned_url(s3: Service, moto: Moto, tmp_path: Path) -> None:
    extract = s3.create_extract(name="Signed", schemas=["users"])
    run = s3.wait_run(s3.run(extract["id"]))
    data = next(a for a in artifacts(s3, run["id"]) if a["artifact_type"] == "data-users")
    r = s3.client.get(f"/api/extracts/artifacts/{data['id']}/download", params={"redirect": "true"})
    assert r.status_code == 307
    signed = http_get(r.headers["location"])  # no token, no AWS credentials: the URL is signed
    assert signed.status_code == 200 and hashlib.sha256(signed.content).hexdigest() == data["checksum"]
    # Counted as a download sent here would be: the GET from byte 0, not a HEAD nor a resume.
    url = f"/api/extracts/artifacts/{data['id']}/download?redirect=true"
    assert s3.client.head(url).status_code == 307
    assert s3.client.get(url, headers={"Range": "bytes=10-"}).status_code == 307
    again = next(a for a in artifacts(s3, run["id"]) if a["id"] == data["id"])
    assert again["download_count"] == 1, again
    r = s3.client.get(f"/api/extracts/artifacts/{data['id']}/download", params={"redirect": "maybe"})
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "redirect"
    # A local directory cannot sign: 400, saying so.
    local = start_in_process(tmp_path, str(make_shop_db(tmp_path / "shop.db")))
    try:
        extract = local.create_extract(name="Local", schemas=["users"])
        run = local.wait_run(local.run(extract["id"]))
        first = artifacts(local, run["id"])[0]
        r = local.client.get(f"/api/extracts/artifacts/{first['id']}/download", params={"redirect": "true"})
        assert r.status_code == 400 and "cannot sign" in r.json()["error"]
    finally:
        local.stop()


def test_deleting_a_run_and_the_sweep_delete_the_objects(s3: Service, moto: Moto) -> None:
    extract = s3.create_extract(name="Deleted", schemas=["users", "orders"])
    run = s3.wait_run(s3.run(extract["id"]))
    keys = lambda: [o["path"] for b in obstore.list(moto.store("svc"), run["id"]) for o in b]  # noqa: E731
    assert len(keys()) == 4
    assert s3.client.delete(f"/api/data/extract_runs/{run['id']}").status_code == 200
    assert keys() == []
    assert s3.client.get(f"/api/extracts/runs/{run['id']}/download").status_code == 410


def test_an_object_deleted_behind_the_services_back_is_a_404_naming_it(s3: Service, moto: Moto) -> None:
    extract = s3.create_extract(name="Vanishing", schemas=["users"])
    run = s3.wait_run(s3.run(extract["id"]))
    data = next(a for a in artifacts(s3, run["id"]) if a["artifact_type"] == "data-users")
    obstore.delete(moto.store("svc"), f"{run['id']}/{data['artifact_name']}")
    for url in (f"/api/extracts/runs/{run['id']}/download", f"/api/extracts/artifacts/{data['id']}/download"):
        r = s3.client.get(url)
        assert r.status_code == 404 and data["artifact_name"] in r.json()["error"], r.text


@pytest.mark.slow
def test_a_cancelled_upload_is_aborted_and_a_stopped_store_fails_the_run_naming_it(
    tmp_path: Path, moto: Moto
) -> None:
    source = make_big_db(tmp_path / "big.db", 800_000)  # 8 parts: still uploading when the cancel lands
    svc = s3_service(tmp_path, moto, str(source), "faults", "--workers", "1")
    try:
        extract = svc.create_extract(name="Big", schemas=["small", "big"], compress=False)
        run_id = svc.run(extract["id"])
        deadline = time.monotonic() + 30
        while moto.uploads_in_progress() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # big.jsonl's multipart upload has begun
        assert svc.client.post(f"/api/extracts/{extract['id']}/cancel").status_code == 200
        run = svc.wait_run(run_id)
        wait_for(lambda: moto.uploads_in_progress() == 0, what="the cancelled upload aborted")
        names = sorted(a["artifact_name"] for a in artifacts(svc, run_id))
        assert run["status"] == "cancelled" and names == ["describe.yaml", "small.jsonl"], (run, names)
        # The store dies mid-upload: the run fails with one line naming it, and its retry
        # completes once the store is back (SPEC: a failing store is transient).
        svc.client.put(f"/api/data/extracts/{extract['id']}", json={"retry_delay_seconds": 3})
        cancelled, run_id = run_id, svc.run(extract["id"])
        while moto.uploads_in_progress() == 0 and time.monotonic() < deadline + 30:
            time.sleep(0.05)
        moto.stop()
        run = svc.wait_run(run_id, timeout=120)
        assert run["status"] == "failed" and f"s3://{BUCKET}/faults" in run["error"], run["error"]
        assert "\n" not in run["error"] and run["error_detail"]["retryable"] is True
        assert "big.jsonl" not in [a["artifact_name"] for a in artifacts(svc, run_id)]
        assert svc.client.get("/health").status_code == 200
        # Deleting a run needs the store: a 503 to retry, and its files still recorded as there.
        started = time.monotonic()
        deleted = svc.client.delete(f"/api/data/extract_runs/{cancelled}")
        assert deleted.status_code == 503, deleted.text
        assert deleted.json()["error_code"] == "SERVICE_UNAVAILABLE" and deleted.headers["retry-after"] == "5"
        assert (
            f"Cannot delete the files of run {cancelled}: The object store s3://{BUCKET}/faults failed"
            in (deleted.json()["error"])
        )
        assert all(a["deleted_at"] is None for a in artifacts(svc, cancelled))
        print(f"DELETE with the store down answered in {time.monotonic() - started:.1f} s")
        moto.process = start_moto(moto.port).process  # an empty store, the bucket made again
        # The retry is due 3 s (±20 %) after the failure; on a loaded machine it may start before
        # the store is back, fail as the first did, and be retried in turn (attempt 3 of 3).
        retry = run
        while retry["status"] == "failed" and retry["attempt"] < 3:
            retry = svc.wait_run(
                retry["retry_run_id"]
                or svc.client.get(f"/api/data/extract_runs/{retry['id']}").json()["data"]["retry_run_id"],
                timeout=120,
            )
        assert retry["status"] == "completed" and retry["attempt"] >= 2, retry
        assert moto.uploads_in_progress() == 0
    finally:
        svc.stop()
        if moto.process.poll() is not None:  # the module's other tests go on with a fresh store
            moto.process = start_moto(moto.port).process


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unreachable", "refused", "no bucket"])
def test_start_up_fails_fast_naming_the_store(tmp_path: Path, moto: Moto, case: str) -> None:
    # With IAM checks on from the first request, moto refuses every key: credentials refused.
    refusing = start_moto(bucket=False, INITIAL_NO_AUTH_ACTION_COUNT="0") if case == "refused" else None
    endpoint = {"unreachable": f"http://127.0.0.1:{free_port()}", "no bucket": moto.endpoint}.get(case)
    try:
        if refusing is not None:
            endpoint = refusing.endpoint
        bucket = "no-such-bucket" if case == "no bucket" else BUCKET
        started = time.monotonic()
        process = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).parent.parent / "extracts_app.py"),
                "--db",
                str(tmp_path / "s.db"),
                "--storage",
                f"s3://{bucket}/p",
                "--storage-endpoint",
                endpoint,
                "--port",
                str(free_port()),
                "--token",
                "t",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **CREDENTIALS},
            cwd=tmp_path,
        )
        assert process.returncode == 1, process.stdout + process.stderr
        assert process.stderr.startswith(f"extracts-app: cannot write to the object store s3://{bucket}/p: ")
        assert process.stderr.count("\n") == 1, process.stderr
        if case == "no bucket":  # the store's own words, not only "object … not found"
            assert "(NoSuchBucket: The specified bucket does not exist)" in process.stderr, process.stderr
        assert time.monotonic() - started < 60
    finally:
        if refusing is not None:
            refusing.stop()


def start_up(tmp_path: Path, url: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The service started on storage ``url`` (nothing to reach): how it ends."""
    return subprocess.run(
        [sys.executable, str(Path(__file__).parent.parent / "extracts_app.py")]
        + ["--db", str(tmp_path / "s.db"), "--storage", url, "--port", str(free_port()), "--token", "t"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=tmp_path,
    )


@pytest.mark.parametrize("url", ["s3://AKIAXX:SeCrEt@bucket/p", "az://key@container/p"])
def test_a_storage_url_holding_credentials_is_refused_without_echoing_them(tmp_path: Path, url: str) -> None:
    process = start_up(tmp_path, url)
    assert process.returncode == 1, process.stdout + process.stderr
    assert "a storage URL holds no credentials" in process.stderr, process.stderr
    assert "SeCrEt" not in process.stderr and "key@" not in process.stderr and "AKIAXX" not in process.stderr
    assert process.stderr.count("\n") == 1, process.stderr


@pytest.mark.parametrize(
    ("url", "env"),
    [
        ("gs://bucket/p", {"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"}),
        (
            "az://container/p",
            {"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_ACCOUNT_KEY": "not base64!"},
        ),
    ],
)
def test_credentials_the_store_cannot_use_fail_start_up_in_one_line(
    tmp_path: Path, url: str, env: dict[str, str]
) -> None:
    process = start_up(tmp_path, url, env)
    assert process.returncode == 1, process.stdout + process.stderr
    assert process.stderr.startswith(f"extracts-app: cannot write to the object store {url}: "), (
        process.stderr
    )
    assert process.stderr.count("\n") == 1, process.stderr


def test_the_store_failing_while_an_archive_member_is_read_back_fails_the_run_naming_it(
    proxied: tuple[Service, StoreProxy], moto: Moto
) -> None:
    # An archive's members are uploaded as scratch objects, then read back into the tarball:
    # the store failing midway through that read is the store failing (SPEC: Object storage),
    # one line naming it, transient; not the object store library's error and debug dump.
    svc, proxy = proxied
    proxy.cut = lambda method, path: "/.scratch/" in path
    try:
        extract = svc.create_extract(name="Cut archive", format="archive", schemas=["big"], max_attempts=1)
        run = svc.wait_run(svc.run(extract["id"]))
    finally:
        proxy.cut = lambda method, path: False
    assert run["status"] == "failed", run
    assert run["error"].startswith(
        f"The object store s3://{BUCKET}/proxied failed to read {run['id']}/.scratch/"
    )
    assert "Debug" not in run["error"] and run["error_detail"]["retryable"] is True, run
    keys = [o["path"] for batch in obstore.list(moto.store("proxied"), run["id"]) for o in batch]
    assert not [key for key in keys if "/.scratch/" in key], keys


@pytest.mark.slow
def test_the_store_failing_mid_download_cuts_the_connection_with_one_log_line(
    proxied: tuple[Service, StoreProxy],
) -> None:
    # After the headers, a download can only stop: the client gets a short body (and resumes
    # with Range); the service logs one line saying why, not two tracebacks of the store's dump.
    svc, proxy = proxied
    extract = svc.create_extract(name="Cut download", schemas=["big"], compress=False)
    run = svc.wait_run(svc.run(extract["id"]))
    data = next(a for a in artifacts(svc, run["id"]) if a["artifact_type"] == "data-big")
    logged = len(svc.output())
    urls = [f"/api/extracts/artifacts/{data['id']}/download", f"/api/extracts/runs/{run['id']}/download"]
    proxy.cut = lambda method, path: path.endswith("/big.jsonl")
    try:
        for url in urls:
            with pytest.raises(httpx.RemoteProtocolError, match="without sending complete message body"):
                svc.client.get(url)
    finally:
        proxy.cut = lambda method, path: False
    time.sleep(0.5)  # the service's log lines of the cut are written
    log = svc.output()[logged:]
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
    cuts = [line for line in log.splitlines() if "cut after the headers were sent" in line]
    assert len(cuts) == 2 and all(
        f"The object store s3://{BUCKET}/proxied failed to read" in c for c in cuts
    ), log
    whole = svc.client.get(urls[0])  # the store back: the same file, whole
    assert whole.status_code == 200 and hashlib.sha256(whole.content).hexdigest() == data["checksum"]


def test_the_endpoint_and_plain_http_come_from_the_standard_aws_variables(tmp_path: Path, moto: Moto) -> None:
    # SPEC: endpoint and settings come from each cloud's standard variables, AWS_ALLOW_HTTP
    # among them: the service's own client options must not drop it (it failed "builder error").
    env = CREDENTIALS | {"AWS_ENDPOINT_URL": moto.endpoint, "AWS_ALLOW_HTTP": "true"}
    svc = start_service(
        tmp_path, str(make_shop_db(tmp_path / "shop.db")), storage=f"s3://{BUCKET}/from-env", env=env
    )
    try:
        run = svc.wait_run(svc.run(svc.create_extract(name="From env", schemas=["users"])["id"]))
        assert run["status"] == "completed", run
        data = next(a for a in artifacts(svc, run["id"]) if a["artifact_type"] == "data-users")
        assert object_bytes(moto, "from-env", data["storage_path"]) == (
            svc.client.get(f"/api/extracts/artifacts/{data['id']}/download").content
        )
    finally:
        svc.stop()


@pytest.mark.parametrize(
    ("args", "env", "code", "expected"),
    [
        (
            ["--storage-endpoint", "localhost:9000"],
            {},
            2,
            "--storage-endpoint [EXTRACTS_STORAGE_ENDPOINT]: not an http:// or https:// URL with a host",
        ),
        (["--storage-endpoint", "http://127.0.0.1:99999"], {}, 2, "a port from 1 to 65535"),
        (
            [],
            {"AWS_ENDPOINT_URL": "localhost:9000"},
            1,
            f"cannot write to the object store s3://{BUCKET}/p: AWS_ENDPOINT_URL is not an http:// or https://",
        ),
    ],
)
def test_an_endpoint_that_is_no_url_fails_start_up_in_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], code: int, expected: str
) -> None:
    # Handed to obstore as it was, such an endpoint made it panic: a Rust panic and a traceback.
    process = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent.parent / "extracts_app.py"),
            "--db",
            str(tmp_path / "s.db"),
        ]
        + ["--storage", f"s3://{BUCKET}/p", "--port", str(free_port()), "--token", "t", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **CREDENTIALS, **env},
        cwd=tmp_path,
    )
    assert process.returncode == code, process.stdout + process.stderr
    assert expected in process.stderr.splitlines()[-1], process.stderr
    assert "panicked" not in process.stderr and "Traceback" not in process.stderr, process.stderr


@pytest.mark.parametrize("variable", ["AZURE_ENDPOINT", "AZURE_STORAGE_ENDPOINT"])
def test_an_azure_endpoint_variable_that_is_no_url_fails_start_up_in_one_line(
    tmp_path: Path, variable: str
) -> None:
    # As AWS_ENDPOINT_URL=localhost:9000 did, it made obstore panic: Rust's panic message (and,
    # with RUST_BACKTRACE set, its backtrace) on stderr before the service's own line.
    env = {
        "AZURE_STORAGE_ACCOUNT_NAME": "acct",
        "AZURE_STORAGE_ACCOUNT_KEY": "YWJj",
        variable: "localhost:9000",
    }
    process = start_up(tmp_path, "az://container/p", env)
    assert process.returncode == 1, process.stdout + process.stderr
    assert process.stderr == (
        f"extracts-app: cannot write to the object store az://container/p: {variable} is not an "
        "http:// or https:// URL with a host, such as http://127.0.0.1:9000\n"
    )


def test_an_endpoint_with_its_scheme_in_capitals_is_used_as_plain_http(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Start-up accepts HTTP://host:port (a URL's scheme has no case), but plain HTTP was allowed
    # only for a lower-case "http://": the store failed every request with "builder error".
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    endpoint = moto.endpoint.replace("http://", "HTTP://", 1)
    assert parse_settings(["--storage", f"s3://{BUCKET}/caps", "--storage-endpoint", endpoint], {})
    storage = open_storage(f"s3://{BUCKET}/caps", endpoint)
    storage.probe()
    scratch = storage.open_scratch("run_0123456789abcdef", "member.jsonl")
    scratch.write(b"{}\n")
    with scratch.read_back() as member:
        assert member.read() == b"{}\n"
    scratch.discard()


@pytest.mark.parametrize("url", ["s3://bucket/exports?versionId=1", "gs://bucket/a#b", "az://container/p?"])
def test_a_storage_url_with_a_query_or_fragment_is_refused(tmp_path: Path, url: str) -> None:
    # urlsplit drops them: "s3://bucket/a#b" wrote under the prefix "a", the banner saying "a#b".
    process = start_up(tmp_path, url)
    assert process.returncode == 1, process.stdout + process.stderr
    assert "a storage URL is a bucket and a prefix, with no query (?…) nor fragment (#…)" in process.stderr
    assert process.stderr.count("\n") == 1, process.stderr


@pytest.mark.slow
def test_a_zip_of_many_objects_checks_them_with_a_listing_not_a_head_each(
    proxied: tuple[Service, StoreProxy], moto: Moto
) -> None:
    # A HEAD per object before the first byte: a split run's thousands of parts took seconds
    # (minutes on a distant store) before a download, or a resume of ten bytes, began.
    svc, proxy = proxied
    extract = svc.create_extract(
        name="Parts", schemas=["small", "big"], split_files=True, split_max_records=500
    )
    run = svc.wait_run(svc.run(extract["id"]))
    rows = artifacts(svc, run["id"])
    assert len(rows) == 43, len(rows)  # describe, small, 40 parts of big, manifest
    url = f"/api/extracts/runs/{run['id']}/download"
    proxy.requests.clear()
    whole = svc.client.get(url)
    assert whole.status_code == 200
    with zipfile.ZipFile(io.BytesIO(whole.content)) as archive:
        assert archive.testzip() is None and len(archive.infolist()) == 43
    heads = [path for method, path in proxy.requests if method == "HEAD"]
    assert heads == [], heads
    # Still checked: an object gone is a 404 naming it, one of another size too.
    part = next(a for a in rows if a["part"] == 7)
    key = f"{run['id']}/{part['artifact_name']}"
    obstore.put(moto.store("proxied"), key, b"shorter")
    r = svc.client.get(url, headers={"Range": "bytes=10-20"})
    assert r.status_code == 404 and part["artifact_name"] in r.json()["error"], r.text
    obstore.delete(moto.store("proxied"), key)
    r = svc.client.get(url, headers={"Range": "bytes=10-20"})
    assert (
        r.status_code == 404 and f"{part['artifact_name']} of run {run['id']} is missing" in r.json()["error"]
    )


@pytest.mark.slow
def test_a_file_written_before_the_storage_changed_is_a_404_saying_where_it_is(
    tmp_path: Path, moto: Moto
) -> None:
    # It was a 503 "retry in a moment": no retry ever finds it in the new prefix.
    source = str(make_shop_db(tmp_path / "shop.db"))
    before = s3_service(tmp_path, moto, source, "before")
    run = before.wait_run(before.run(before.create_extract(name="Moved", schemas=["users"])["id"]))
    before.stop()
    after = s3_service(tmp_path, moto, source, "after")
    try:
        first = artifacts(after, run["id"])[0]
        for url in (
            f"/api/extracts/runs/{run['id']}/download",
            f"/api/extracts/artifacts/{first['id']}/download",
        ):
            r = after.client.get(url)
            assert r.status_code == 404 and r.json()["error_code"] == "RECORD_NOT_FOUND", r.text
            assert f"outside this service's storage s3://{BUCKET}/after" in r.json()["error"], r.text
    finally:
        after.stop()


@pytest.mark.slow
def test_the_sweep_stops_at_a_store_that_is_down_and_deletes_at_the_next_one(
    tmp_path: Path, moto: Moto
) -> None:
    # Each expired file was tried in turn, a failed delete (after its retries) and a log line
    # each: a split run's thousands of files made a sweep of minutes to hours, all warnings.
    proxy = StoreProxy(moto.port)
    svc = start_service(
        tmp_path,
        str(make_big_db(tmp_path / "big.db", 200)),
        "--storage-endpoint",
        proxy.endpoint,
        "--cleanup-interval",
        "0.5",
        storage=f"s3://{BUCKET}/sweep",
        env=CREDENTIALS,  # type: ignore[arg-type]
    )
    try:
        extract = svc.create_extract(name="Swept", schemas=["big"], split_files=True, split_max_records=10)
        run = svc.wait_run(svc.run(extract["id"]))
        count = len(artifacts(svc, run["id"]))
        assert count > 10, count
        proxy.down = True
        with sqlite3.connect(svc.db) as state:
            state.execute("UPDATE extract_artifacts SET expires_at = '2000-01-01T00:00:00.000Z'")
        logged = len(svc.output())
        wait_for(lambda: "retention sweep: stopped" in svc.output()[logged:], what="a sweep stopping")
        time.sleep(2)  # a few more sweeps
        lines = [line for line in svc.output()[logged:].splitlines() if "retention sweep" in line]
        assert lines and all(f"stopped, {count} expired files left for the next sweep" in x for x in lines), (
            lines
        )
        assert "Traceback" not in svc.output()
        proxy.down = False
        wait_for(lambda: all(a["deleted_at"] for a in artifacts(svc, run["id"])), what="the files swept")
        assert [o for b in obstore.list(moto.store("sweep"), run["id"]) for o in b] == []
    finally:
        svc.stop()
        proxy.close()


def test_deleting_a_run_deletes_its_objects_in_bulk(proxied: tuple[Service, StoreProxy], moto: Moto) -> None:
    # A delete request per object: a split run's thousands of parts kept DELETE busy for minutes.
    svc, proxy = proxied
    extract = svc.create_extract(
        name="Bulk", schemas=["small", "big"], split_files=True, split_max_records=500
    )
    run = svc.wait_run(svc.run(extract["id"]))
    assert len(artifacts(svc, run["id"])) == 43
    proxy.requests.clear()
    assert svc.client.delete(f"/api/data/extract_runs/{run['id']}").status_code == 200
    deletes = [request for request in proxy.requests if request[0] in ("DELETE", "POST")]
    assert deletes == [("POST", f"/{BUCKET}?delete")], deletes
    assert [o for b in obstore.list(moto.store("proxied"), run["id"]) for o in b] == []
    assert svc.client.get(f"/api/extracts/runs/{run['id']}/download").status_code == 410


def test_a_held_back_deletion_the_store_refuses_again_is_kept_for_the_sweep(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A deletion held back by a download, refused when the download ended and refused again by a
    # second delete of its run, was dropped from the deletions the sweep retries: the object
    # stayed in the bucket for good, its artifact already marked deleted.
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    proxy = StoreProxy(moto.port)
    try:
        storage = open_storage(f"s3://{BUCKET}/held-back", proxy.endpoint)
        run_id = "run_0123456789abcdef"
        obstore.put(moto.store("held-back"), f"{run_id}/a.jsonl", b"{}\n")
        files = storage.hold([(storage.storage_path(run_id, "a.jsonl"), 3)])
        storage.delete_run(run_id)  # a download holds it: held back
        proxy.refused = lambda method, path: method in ("DELETE", "POST")  # listing works
        files.close()  # the download ends: its deletion is refused, and kept
        with pytest.raises(StorageError):
            storage.delete_run(run_id)
        proxy.refused = lambda method, path: False
        storage.remove_empty_runs(set())  # the sweep
        assert [o for b in obstore.list(moto.store("held-back"), run_id) for o in b] == []
    finally:
        proxy.close()


@pytest.mark.slow
def test_objects_read_for_longer_than_the_stores_time_limit_are_read_whole(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store request's time limit (60 s; AWS_TIMEOUT here: 0.6 s, margin for a 5 MiB upload on a
    # loaded machine) runs until its body is read, and obstore resumes a broken body 3 times
    # only: an object read for more than about four limits (a download to a slow client, a
    # large member copied into an archive) failed.
    for name, value in (CREDENTIALS | {"AWS_TIMEOUT": "600ms"}).items():
        monkeypatch.setenv(name, value)
    proxy = StoreProxy(moto.port, keep=1 << 40)  # a store that sends no faster than it is read
    try:
        storage = open_storage(f"s3://{BUCKET}/slow-reads", proxy.endpoint)
        data = os.urandom(5 << 20)
        obstore.put(moto.store("slow-reads"), "run_0123456789abcdef/file.bin", data)
        files = storage.hold([(storage.storage_path("run_0123456789abcdef", "file.bin"), len(data))])
        held = bytearray()
        while len(held) < len(data):
            held += files.read(0, len(held), 1 << 20)
            time.sleep(0.7)  # a slow client: each read comes after the time limit
        files.close()
        scratch = storage.open_scratch("run_0123456789abcdef", "member.jsonl")
        scratch.write(data)
        read_back = bytearray()
        with scratch.read_back() as member:
            while chunk := member.read(1 << 20):
                read_back += chunk
                time.sleep(0.7)
        scratch.discard()
        assert held == data and read_back == data
    finally:
        proxy.close()
