"""Fuzzing: schemathesis against the service's own /openapi.json, every operation, authenticated.

The run is reproducible (fixed seed, no example database) and bounded
(``EXTRACTS_FUZZ_EXAMPLES`` examples per operation and phase, 8 by default, about
20 s on two cores with nothing else running). It passes only with zero 5xx and every response
matching the documented status codes, content types, headers and schemas; the
other checks (negative data rejected, auth not ignored, 405 for other methods,
deleted resources gone, ...) run too. Below it, the bugs it found, one
regression test each.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TOKEN, InProcessService, make_hostile_source, start_in_process

EXAMPLES = int(os.environ.get("EXTRACTS_FUZZ_EXAMPLES", "8"))
SEED = int(os.environ.get("EXTRACTS_FUZZ_SEED", "20261128"))

# Whether a valid-looking body is accepted depends on more than the schema can say:
# a filter may only name a schema among the extract's `schemas` (JSON Schema can say it
# only as one anyOf per schema of the source, and schemathesis 4.32 cannot generate from
# that past three schemas: the filter's description says it), a cron expression must come
# due at least once, and a PUT is merged with the record as it stands. Everything else
# about these two operations is still checked, negative data rejection included.
CONFIG = """
[[operations]]
include-path = "/api/data/extracts"
include-method = "POST"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path = "/api/data/extracts/{id}"
include-method = "PUT"
checks.positive_data_acceptance.enabled = false

# A well-formed Range may still start past the end of the file (416), a well-formed If-Match
# may name another ETag (412), a run's files may have expired (410), and a local directory
# cannot sign the URL redirect=true asks for (400, SPEC: Object storage): valid requests all the same.
[[operations]]
include-name-regex = "^GET /api/extracts/(runs|artifacts)/[{]id[}]/download$"
checks.positive_data_acceptance.expected-statuses = [
    "2XX", "3XX", "400", "401", "404", "409", "410", "412", "416"
]

# SPEC: deleting a run deletes its files, and the run record stays readable (its ZIP is
# then 410). Schemathesis expects a deleted resource to be gone: not for this one.
[[operations]]
include-name-regex = "^(DELETE|GET) /api/data/extract_runs/[{]id[}]$"
checks.use_after_free.enabled = false

# The coverage phase's boundary cases take minutes for the lists (a filter[where][<field>]
# parameter for each of ~20 fields) and for PUT (its body is POST's, whose boundaries
# it does cover). The fuzzing and stateful phases still send them.
[[operations]]
include-name-regex = "^GET /api/data/(extracts|extract_runs|extract_artifacts)$"
phases.coverage.enabled = false

[[operations]]
include-name = "PUT /api/data/extracts/{id}"
phases.coverage.enabled = false
"""


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessService]:
    """``users`` (every storage class), ``order items`` (a space in its name, a ``"`` in a
    column's, a composite key) and a table named to reach a file path or SQL as code; served
    in this process.

    ``orders`` and the view are dropped: the coverage phase sends about 170 bodies to POST
    /api/data/extracts for each column a filter can name (each boundary of each operator),
    and with the shop's 19 columns that phase took two thirds of the run.
    """
    tmp = tmp_path_factory.mktemp("fuzz")
    source = make_hostile_source(tmp / "shop.db")
    with contextlib.closing(sqlite3.connect(source)) as con:
        con.executescript("DROP VIEW adults; DROP TABLE orders;")
    svc = start_in_process(tmp, str(source))
    yield svc
    svc.stop()


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    fuzz_service: InProcessService, tmp_path: Path
) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "--no-color",
        "run",
        f"{fuzz_service.base_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        str(SEED),
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "all",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    # Every operation was tested (schemathesis leaves out the one serving the document).
    document = fuzz_service.client.get("/openapi.json").json()
    operations = sum(len(methods) for methods in document["paths"].values()) - 1
    assert f"{operations} selected / {operations} total" in output, output[-5000:]
    # The service never answered with an unhandled error, whatever schemathesis checked.
    assert "unhandled error" not in fuzz_service.output()
    assert TOKEN not in fuzz_service.output()


# ---------------------------------------------------------------- what the fuzzer found


@pytest.mark.parametrize(
    "query",
    [
        {"filter[offset]": "785864347158895919104"},  # past SQLite's 64-bit integers: was a 500
        {"filter[offset]": "9" * 5000},  # past int()'s 4,300-digit limit
        {"filter[offset]": "²"},  # str.isdigit() is true, int() refuses it: was a 500
        {"filter[limit]": "²"},
        {"filter[limit]": "1" * 5000},
    ],
)
def test_list_paging_out_of_range_is_a_400(fuzz_service: InProcessService, query: dict[str, str]) -> None:
    for model in ("extracts", "extract_runs", "extract_artifacts"):
        r = fuzz_service.client.get(f"/api/data/{model}", params=query)
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["error_code"] == "VALIDATION_ERROR"
        assert [d["field"] for d in body["details"]] == list(query)


@pytest.mark.parametrize(
    "query",
    [
        {"filter[offset]": str(2**63 - 1), "filter[limit]": "0001000"},
        {"filter[offset]": "0" * 5000 + "1", "filter[limit]": "0" * 5000 + "5"},  # the offset was a 500
    ],
    ids=["largest", "5000-leading-zeros"],
)
def test_list_paging_at_the_limits_works(fuzz_service: InProcessService, query: dict[str, str]) -> None:
    for model in ("extracts", "extract_runs", "extract_artifacts"):
        r = fuzz_service.client.get(f"/api/data/{model}", params=query)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "body",
    [
        {"name": "Never", "schedule": "0 0 31 2 *", "schedule_enabled": True},  # was a 500
        {"name": "Never", "schedule": "0 0 30 2 *"},
    ],
)
def test_a_schedule_that_never_comes_due_is_a_400(fuzz_service: InProcessService, body: dict) -> None:
    r = fuzz_service.client.post("/api/data/extracts", json=body)
    assert r.status_code == 400, r.text
    message = f"schedule '{body['schedule']}' never comes due: no date matches it"
    assert r.json()["details"] == [{"field": "schedule", "message": message}]


def test_artifact_range_errors_are_json_envelopes(fuzz_service: InProcessService) -> None:
    extract = fuzz_service.create_extract(name="Ranges", schemas=["users"], compress=False)
    run = fuzz_service.wait_run(fuzz_service.run(extract["id"]))
    artifact = fuzz_service.client.get(
        "/api/data/extract_artifacts",
        params={"filter[where][run_id]": run["id"], "filter[where][artifact_type]": "data-users"},
    ).json()["data"][0]
    url = f"/api/extracts/artifacts/{artifact['id']}/download"
    whole = fuzz_service.client.get(url).content
    assert len(whole) == artifact["size_bytes"]
    # Malformed ranges were a text/plain 400 from FileResponse: now ignored, the whole file served.
    for header in ("bytes=abc", "items=0-1", "bytes=5-2", "bytes"):
        r = fuzz_service.client.get(url, headers={"Range": header})
        assert (r.status_code, r.content) == (200, whole), header
    # Past the end was a bare 416: now the envelope, with Content-Range.
    r = fuzz_service.client.get(url, headers={"Range": f"bytes={len(whole)}-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(whole)}"
    assert r.json()["error_code"] == "RANGE_NOT_SATISFIABLE"
    r = fuzz_service.client.get(url, headers={"Range": "bytes=1-3"})
    assert (r.status_code, r.content) == (206, whole[1:4])
    # An If-Range that is not the ETag: the whole file, whatever the range (was a 416).
    for header in ("bytes=1-3", f"bytes={len(whole)}-"):
        r = fuzz_service.client.get(url, headers={"Range": header, "If-Range": '"stale"'})
        assert (r.status_code, r.content) == (200, whole), header
    r = fuzz_service.client.get(url, headers={"Range": "bytes=1-3", "If-Range": r.headers["etag"]})
    assert (r.status_code, r.content) == (206, whole[1:4])
