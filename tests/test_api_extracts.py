"""Extract configurations and the Data API conventions, against the app served in this process.

Authentication of every route is checked in tests/test_security.py.
"""

from __future__ import annotations

import socket
import sqlite3
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import TOKEN, InProcessService, http_client, http_get, wait_for

VALID = {"name": "Daily backup"}


def test_create_applies_defaults_and_returns_201(app_service: InProcessService) -> None:
    r = app_service.client.post("/api/data/extracts", json={"name": "  Full export  "})
    assert r.status_code == 201
    body = r.json()
    assert body["success"] is True
    data = body["data"]
    assert data["id"].startswith("extract_")
    assert data["created_at"].endswith("Z") and data["updated_at"] == data["created_at"]
    expected = {
        "name": "Full export",
        "description": None,
        "format": "jsonl",
        "include": ["describe", "data"],
        "schemas": None,
        "filter": None,
        "compress": True,
        "split_files": False,
        "split_max_records": 1000000,
        "schedule": None,
        "schedule_enabled": False,
        "retention_days": 7,
        "enabled": True,
        "deleted_at": None,
        "last_run_id": None,
        "last_run_status": None,
        "last_run_at": None,
        "total_runs": 0,
        "successful_runs": 0,
        "failed_runs": 0,
        "cancelled_runs": 0,
        "next_run_at": None,
    }
    assert {k: data[k] for k in expected} == expected
    assert app_service.client.get(f"/api/data/extracts/{data['id']}").json() == {
        "success": True,
        "data": data,
    }


@pytest.mark.parametrize(
    "field,bad,good",
    [
        ("name", "", "x"),
        ("name", "   ", "x"),
        ("name", "x" * 201, "x" * 200),
        ("name", 5, "n"),
        ("description", 7, "notes"),
        ("description", ["a"], None),
        ("format", "csv", "yaml"),
        ("format", "JSONL", "archive"),
        ("format", None, "json"),
        ("include", [], ["data"]),
        ("include", ["data", "data"], ["describe"]),
        ("include", ["everything"], ["describe", "data"]),
        ("include", "data", ["data"]),
        ("schemas", [], ["users"]),
        ("schemas", ["users", "users"], ["users", "orders"]),
        ("schemas", ["nope"], ["order items"]),
        ("schemas", "users", None),
        ("schemas", [1], ["adults"]),
        ("schemas", ["sqlite_master"], ["users"]),
        ("compress", "yes", False),
        ("compress", 1, True),
        ("split_files", None, True),
        ("split_max_records", 0, 1),
        ("split_max_records", 100_000_001, 100_000_000),
        ("split_max_records", 10.0, 10),
        ("split_max_records", "10", 10),
        ("schedule", "not cron", "0 3 * * *"),
        ("schedule", "* * * * * *", "*/5 * * * *"),
        ("schedule", "61 * * * *", None),
        ("schedule", "@daily", "0 0 * * 1-5"),
        ("schedule", "30-10 * * * *", "10-30 * * * *"),
        ("schedule", "0 0 * * sat-sun", "0 0 * * sat,sun"),
        ("schedule", "0 0 * dec-jan/2 *", "0 0 * jan-dec/2 *"),
        ("schedule", "0 0 * * 7-0", "0 0 * * 0-7"),
        ("retention_days", 0, 1),
        ("retention_days", 366, 365),
        ("retention_days", "7", 7),
        ("retention_days", 7.5, 30),
        ("retention_days", True, 3),
        ("enabled", "yes", False),
        ("enabled", 0, True),
        ("schedule_enabled", "true", False),
    ],
)
def test_each_field_rule_rejects_bad_and_accepts_good(
    app_service: InProcessService, field: str, bad, good
) -> None:
    r = app_service.client.post("/api/data/extracts", json=VALID | {field: bad})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["success"] is False and body["error_code"] == "VALIDATION_ERROR"
    assert [d["field"] for d in body["details"]] == [field]
    assert field in body["details"][0]["message"]
    r = app_service.client.post("/api/data/extracts", json=VALID | {field: good})
    assert r.status_code == 201, r.text
    expected = good.strip() if isinstance(good, str) and field == "schedule" else good
    assert r.json()["data"][field] == expected


def test_unknown_schemas_are_listed(app_service: InProcessService) -> None:
    r = app_service.client.post("/api/data/extracts", json=VALID | {"schemas": ["users", "ghost", "x y"]})
    assert r.status_code == 400
    assert r.json()["details"] == [
        {"field": "schemas", "message": "schemas not found in the source: ghost, x y"}
    ]


def test_every_bad_field_is_named_at_once(app_service: InProcessService) -> None:
    r = app_service.client.post(
        "/api/data/extracts", json={"format": "csv", "retention_days": 0, "bogus": 1, "id": "extract_mine"}
    )
    assert r.status_code == 400
    fields = [d["field"] for d in r.json()["details"]]
    assert sorted(fields) == ["bogus", "format", "id", "name", "retention_days"]


def test_schedule_enabled_requires_schedule(app_service: InProcessService) -> None:
    r = app_service.client.post("/api/data/extracts", json=VALID | {"schedule_enabled": True})
    assert r.status_code == 400
    assert [d["field"] for d in r.json()["details"]] == ["schedule"]
    r = app_service.client.post(
        "/api/data/extracts", json=VALID | {"schedule_enabled": True, "schedule": "0 3 * * *"}
    )
    assert r.status_code == 201
    data = r.json()["data"]
    assert data["next_run_at"].endswith("T03:00:00.000Z")
    # Disabling the schedule on an existing extract clears next_run_at; removing the cron
    # expression while still enabled is refused, naming schedule.
    r = app_service.client.put(f"/api/data/extracts/{data['id']}", json={"schedule": None})
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "schedule"
    r = app_service.client.put(f"/api/data/extracts/{data['id']}", json={"schedule_enabled": False})
    assert r.json()["data"]["next_run_at"] is None


@pytest.mark.parametrize(
    "filter_,field",
    [
        ({"users": {"where": {"age": {"$gt": 17}}}}, None),
        ({"users": {"where": {"name": None, "age": {"$in": [1, 2]}, "email": {"$like": "%@x"}}}}, None),
        ({"users": {"where": {"shoe_size": 4}}}, "filter.users.where.shoe_size"),
        ({"ghost": {"where": {"a": 1}}}, "filter.ghost"),
        ({"users": {"where": {"age": {"$between": [1, 2]}}}}, "filter.users.where.age"),
        ({"users": {"where": {"age": {"$in": 3}}}}, "filter.users.where.age"),
        ({"users": {"where": {"age": {"$null": "yes"}}}}, "filter.users.where.age"),
        ({"users": {"where": {"age": 1}, "limit": 3}}, "filter"),
        ({"users": "age > 3"}, "filter"),
        ([], "filter"),
    ],
)
def test_filter_shape_and_columns_are_checked(app_service: InProcessService, filter_, field) -> None:
    r = app_service.client.post("/api/data/extracts", json=VALID | {"filter": filter_})
    if field is None:
        assert r.status_code == 201, r.text
        assert r.json()["data"]["filter"] == filter_
    else:
        assert r.status_code == 400, r.text
        assert [d["field"] for d in r.json()["details"] if d["field"].startswith(field)], r.text


@pytest.mark.parametrize(
    "where,field",
    [
        ({"id": {"$gt": 18446744073709551615}}, "filter.users.where.id.$gt"),
        ({"id": 9223372036854775808}, "filter.users.where.id"),
        ({"id": {"$in": [1, 9223372036854775808]}}, "filter.users.where.id.$in"),
        ({"id": {"$nin": [-9223372036854775808, 18446744073709551615]}}, "filter.users.where.id.$nin"),
        ({"id": {"$gte": -9223372036854775808, "$lte": 9223372036854775807}}, None),
    ],
)
def test_filter_integers_a_source_cannot_bind_are_refused(
    app_service: InProcessService, where: dict, field: str | None
) -> None:
    """Past signed 64 bits they were stored, and every run then failed (SQLite: OverflowError).

    A string with NUL is refused where the source is PostgreSQL: tests/test_sources_sql.py.
    """
    r = app_service.client.post(
        "/api/data/extracts", json={"name": "f10", "filter": {"users": {"where": where}}}
    )
    if field is None:
        assert r.status_code == 201, r.text
        return
    assert r.status_code == 400, r.text
    assert r.json()["error_code"] == "VALIDATION_ERROR"
    assert [d["field"] for d in r.json()["details"]] == [field]


def test_filter_on_schema_not_exported_is_refused(app_service: InProcessService) -> None:
    r = app_service.client.post(
        "/api/data/extracts", json=VALID | {"schemas": ["orders"], "filter": {"users": {"where": {"age": 3}}}}
    )
    assert r.status_code == 400
    assert r.json()["details"][0]["field"] == "filter.users"


def test_unknown_schemas_are_named_beside_a_bad_filter(app_service: InProcessService) -> None:
    """Every bad field at once (SPEC): a malformed filter hid the unknown schema names."""
    for bad_filter in (1, {"users": []}):
        body = VALID | {"schemas": ["users", "no_such_table"], "filter": bad_filter}
        r = app_service.client.post("/api/data/extracts", json=body)
        assert r.status_code == 400, r.text
        assert sorted(d["field"] for d in r.json()["details"]) == ["filter", "schemas"], r.text
        assert any("no_such_table" in d["message"] for d in r.json()["details"]), r.text
    created = app_service.create_extract(name="Schemas beside a bad filter")
    body = {"schemas": ["no_such_table"], "filter": 1}
    r = app_service.client.put(f"/api/data/extracts/{created['id']}", json=body)
    assert r.status_code == 400, r.text
    assert sorted(d["field"] for d in r.json()["details"]) == ["filter", "schemas"], r.text


def test_a_bad_filter_is_named_beside_bad_schemas(app_service: InProcessService) -> None:
    """Every bad field at once (SPEC): with schemas malformed, the filter was never checked."""
    cases = [
        ([], {"users": {"where": {"no_such_column": 1}}}, "filter.users.where.no_such_column"),
        ("users", {"no_such_table": {"where": {}}}, "filter.no_such_table"),
    ]
    for schemas, bad_filter, field in cases:
        body = VALID | {"schemas": schemas, "filter": bad_filter}
        r = app_service.client.post("/api/data/extracts", json=body)
        assert r.status_code == 400, r.text
        assert [d["field"] for d in r.json()["details"]] == ["schemas", field], r.text
    # A filter that is fine on its own adds nothing to the schemas' error.
    body = VALID | {"schemas": [], "filter": {"users": {"where": {"id": 1}}}}
    r = app_service.client.post("/api/data/extracts", json=body)
    assert [d["field"] for d in r.json()["details"]] == ["schemas"], r.text


def test_filter_integer_past_64_bits_is_refused_not_rounded(app_service: InProcessService) -> None:
    """orjson reads an integer past 64 bits as a float: the filter was saved rounded (1.2e+29)."""
    big = 123456789012345678901234567890
    for where in ({"id": big}, {"id": {"$in": [1, big]}}, {"id": {"$gt": 1.5, "$lt": big}}):
        body = VALID | {"filter": {"users": {"where": where}}}
        r = app_service.client.post("/api/data/extracts", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error_code"] == "VALIDATION_ERROR"
        assert str(big) in r.json()["details"][0]["message"], r.text


def test_filter_on_a_view_needs_the_view_named_in_schemas(app_service: InProcessService) -> None:
    """schemas null exports every table, views only when named (SPEC): the filter was ignored."""
    view_filter = {"adults": {"where": {"id": 1}}}
    refused = [
        {
            "field": "filter.adults",
            "message": "schema 'adults' is a view, and with schemas null only tables are exported: "
            "name it in schemas to export and filter it",
        }
    ]
    r = app_service.client.post("/api/data/extracts", json=VALID | {"filter": view_filter})
    assert r.status_code == 400 and r.json()["details"] == refused, r.text
    named = app_service.create_extract(name="View named", schemas=["adults", "users"], filter=view_filter)
    # Dropping schemas would drop the view, and its filter with it.
    r = app_service.client.put(f"/api/data/extracts/{named['id']}", json={"schemas": None})
    assert r.status_code == 400 and r.json()["details"] == refused, r.text
    r = app_service.client.put(f"/api/data/extracts/{named['id']}", json={"schemas": None, "filter": None})
    assert r.status_code == 200 and r.json()["data"]["schemas"] is None, r.text
    # A table's filter with schemas null is fine.
    app_service.create_extract(name="Table filter", filter={"users": {"where": {"id": 1}}})


def test_put_changes_only_the_fields_sent(app_service: InProcessService) -> None:
    created = app_service.create_extract(name="Partial", description="before", retention_days=3)
    r = app_service.client.put(f"/api/data/extracts/{created['id']}", json={"description": "after"})
    assert r.status_code == 200
    updated = r.json()["data"]
    assert updated["description"] == "after"
    assert updated["retention_days"] == 3 and updated["name"] == "Partial"
    assert updated["updated_at"] >= created["updated_at"]
    assert {k: v for k, v in updated.items() if k not in ("description", "updated_at")} == {
        k: v for k, v in created.items() if k not in ("description", "updated_at")
    }


def test_put_keeps_what_was_written_between_its_read_and_its_write(app_service: InProcessService) -> None:
    """A PUT read the extract, merged the body into it and wrote every column back: what was
    written between the two was undone. The scheduler's move of next_run_at past the due time
    it started went back to that due time, which then started again at the next tick (a real
    service, PUTs of a description around a minute's due time: 5 scheduled runs for it); another
    PUT's fields were lost. The PUT now writes only over the row as it read it, else does it again.
    """
    created = app_service.create_extract(name="Nightly", schedule="0 3 * * *", schedule_enabled=True)
    path = f"/api/data/extracts/{created['id']}"
    taken = "2099-01-02T03:00:00.000Z"
    written = [  # what each writer meanwhile does: its statement, and what it leaves
        ("UPDATE extracts SET next_run_at = ? WHERE id = ?", (taken,), {"next_run_at": taken}),
        (
            "UPDATE extracts SET retention_days = 30, updated_at = ? WHERE id = ?",
            ("2099-01-01T00:00:00.000Z",),
            {"retention_days": 30, "next_run_at": taken},
        ),
    ]
    con = sqlite3.connect(app_service.db, isolation_level=None, timeout=30)
    try:
        for n, (sql, args, left) in enumerate(written):
            con.execute("BEGIN IMMEDIATE")  # the write lock: the PUT reads the row, then waits to write
            with ThreadPoolExecutor(1) as pool:
                put = pool.submit(app_service.client.put, path, json={"description": f"edit {n}"})
                time.sleep(0.3)
                con.execute(sql, (*args, created["id"]))
                con.execute("COMMIT")
                r = put.result(30)
            assert r.status_code == 200, r.text
            now = app_service.client.get(path).json()["data"]
            assert r.json()["data"] == now
            assert {k: now[k] for k in ("description", *left)} == {"description": f"edit {n}", **left}
    finally:
        con.close()


def test_put_ignores_read_only_fields_and_rejects_unknown(app_service: InProcessService) -> None:
    created = app_service.create_extract(name="Round trip")
    echoed = created | {"name": "Round trip 2", "total_runs": 99, "id": "extract_other"}
    r = app_service.client.put(f"/api/data/extracts/{created['id']}", json=echoed)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["id"] == created["id"] and r.json()["data"]["total_runs"] == 0
    assert r.json()["data"]["name"] == "Round trip 2"
    r = app_service.client.put(f"/api/data/extracts/{created['id']}", json={"colour": "red"})
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "colour"
    r = app_service.client.put(f"/api/data/extracts/{created['id']}", json={"enabled": "no"})
    assert r.status_code == 400


def test_soft_delete(app_service: InProcessService) -> None:
    created = app_service.create_extract(name="To delete")
    r = app_service.client.delete(f"/api/data/extracts/{created['id']}")
    assert r.status_code == 200
    assert r.json()["data"]["deleted_at"] is not None and r.json()["data"]["id"] == created["id"]
    for method, path in [
        ("GET", f"/api/data/extracts/{created['id']}"),
        ("PUT", f"/api/data/extracts/{created['id']}"),
        ("DELETE", f"/api/data/extracts/{created['id']}"),
        ("POST", f"/api/extracts/{created['id']}/run"),
    ]:
        r = app_service.client.request(method, path, json={"name": "x"})
        assert r.status_code == 404, (method, r.text)
        assert r.json()["error_code"] == "RECORD_NOT_FOUND"
    ids = [e["id"] for e in app_service.client.get("/api/data/extracts?filter[limit]=1000").json()["data"]]
    assert created["id"] not in ids


def test_simultaneous_deletes_answer_200_once_then_404(app_service: InProcessService) -> None:
    """A DELETE that lost the race to another was a 409 'has an active run None': it is a 404."""
    statuses: Counter[tuple[int, str]] = Counter()
    for i in range(10):
        created = app_service.create_extract(name=f"Deleted at once {i}")

        def delete(_: int, extract_id: str = created["id"]) -> httpx.Response:
            with http_client(base_url=app_service.base_url, headers=app_service.client.headers) as client:
                return client.delete(f"/api/data/extracts/{extract_id}")

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(delete, range(8)))
        assert sorted(r.status_code for r in responses)[0] == 200
        statuses.update((r.status_code, r.json().get("error_code", "")) for r in responses)
    assert set(statuses) == {(200, ""), (404, "RECORD_NOT_FOUND")}, statuses
    assert statuses[(200, "")] == 10


def test_list_filter_order_limit_offset(app_service: InProcessService) -> None:
    made = [
        app_service.create_extract(
            name=f"List {i}", format="yaml", description="list test", retention_days=100 + i
        )
        for i in range(5)
    ]
    mine = {"filter[where][description]": "list test"}
    r = app_service.client.get("/api/data/extracts", params=mine | {"filter[where][enabled]": "true"})
    assert [row["name"] for row in r.json()["data"]] == [m["name"] for m in reversed(made)]
    r = app_service.client.get(
        "/api/data/extracts",
        params=mine | {"filter[order]": "retention_days asc", "filter[limit]": "2", "filter[offset]": "1"},
    )
    assert [row["retention_days"] for row in r.json()["data"]] == [101, 102]
    r = app_service.client.get(
        "/api/data/extracts", params=mine | {"filter[order]": "name desc", "filter[limit]": "1"}
    )
    assert [row["name"] for row in r.json()["data"]] == ["List 4"]
    r = app_service.client.get("/api/data/extracts", params={"filter[where][schemas]": "null"})
    assert r.status_code == 400
    r = app_service.client.get(
        "/api/data/extracts",
        params={"filter[where][description]": "null", "filter[where][retention_days]": "104"},
    )
    assert r.json()["data"] == []
    r = app_service.client.get("/api/data/extracts", params=mine | {"filter[where][enabled]": "false"})
    assert r.json()["data"] == []
    app_service.client.put(f"/api/data/extracts/{made[0]['id']}", json={"description": None})
    r = app_service.client.get(
        "/api/data/extracts",
        params={"filter[where][description]": "null", "filter[where][retention_days]": "100"},
    )
    assert [row["id"] for row in r.json()["data"]] == [made[0]["id"]]


@pytest.mark.parametrize(
    "params,field",
    [
        ({"filter[where][colour]": "red"}, "filter[where][colour]"),
        ({"filter[limit]": "1001"}, "filter[limit]"),
        ({"filter[limit]": "0"}, "filter[limit]"),
        ({"filter[limit]": "ten"}, "filter[limit]"),
        ({"filter[offset]": "-1"}, "filter[offset]"),
        ({"filter[order]": "name sideways"}, "filter[order]"),
        ({"filter[order]": "nope desc"}, "filter[order]"),
        ({"filter[sort]": "name"}, "filter[sort]"),
        ({"filter[where]": "x"}, "filter[where]"),
    ],
)
def test_bad_list_filters_are_400(app_service: InProcessService, params, field) -> None:
    for model in ("extracts", "extract_runs", "extract_artifacts"):
        r = app_service.client.get(f"/api/data/{model}", params=params)
        assert r.status_code == 400, r.text
        assert r.json()["error_code"] == "VALIDATION_ERROR"
        assert r.json()["details"][0]["field"] == field


def test_runs_and_artifacts_lists_are_read_only(app_service: InProcessService) -> None:
    for model in ("extract_runs", "extract_artifacts"):
        assert app_service.client.get(f"/api/data/{model}?filter[where][id]=none").json() == {
            "success": True,
            "data": [],
        }
        r = app_service.client.post(f"/api/data/{model}", json={})
        assert r.status_code == 405 and r.json()["error_code"] == "METHOD_NOT_ALLOWED"
        assert "GET" in r.headers["allow"]
        r = app_service.client.get(f"/api/data/{model}/missing")
        assert r.status_code == 404 and r.json()["error_code"] == "RECORD_NOT_FOUND"
    r = app_service.client.put("/api/data/extract_artifacts/x", json={})
    assert r.status_code == 405


@pytest.mark.parametrize(
    "content,headers,status,code",
    [
        (b"{not json", {"Content-Type": "application/json"}, 400, "BAD_REQUEST"),
        (b"[1, 2]", {"Content-Type": "application/json"}, 400, "BAD_REQUEST"),
        (b'"text"', {"Content-Type": "application/json"}, 400, "BAD_REQUEST"),
        (b"", {"Content-Type": "application/json"}, 400, "BAD_REQUEST"),
        (b'{"name": "x"}', {"Content-Type": "text/plain"}, 415, "UNSUPPORTED_MEDIA_TYPE"),
        (b'{"name": "x"}', {}, 415, "UNSUPPORTED_MEDIA_TYPE"),
        (
            b'{"name": "' + b"x" * (1 << 20) + b'"}',
            {"Content-Type": "application/json"},
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (b"\xff\xfe{", {"Content-Type": "application/json"}, 400, "BAD_REQUEST"),
    ],
)
def test_malformed_bodies_get_the_envelope(
    app_service: InProcessService, content, headers, status, code
) -> None:
    r = app_service.client.post("/api/data/extracts", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["success"] is False and r.json()["error_code"] == code


def test_a_key_given_twice_in_a_body_is_refused_not_the_last_one_kept(app_service: InProcessService) -> None:
    """orjson keeps the last of two equal keys: {"name": "a", "name": "b"} created "b", and a
    where naming a column twice kept one condition, without a word. Which was meant cannot be
    told, so the body is refused naming the key, at any depth, on POST and PUT alike."""
    extract = app_service.create_extract(name="twice")["id"]
    for method, path, content, key in [
        ("POST", "/api/data/extracts", b'{"name": "a", "name": "b"}', "name"),
        (
            "POST",
            "/api/data/extracts",
            b'{"name": "a", "filter": {"users": {"where": {"id": 1, "id": {"$gt": 0}}}}}',
            "id",
        ),
        ("PUT", f"/api/data/extracts/{extract}", b'{"enabled": false, "enabled": true}', "enabled"),
    ]:
        r = app_service.client.request(
            method, path, content=content, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert r.json() == {
            "success": False,
            "error": f"The body is ambiguous: the key '{key}' appears twice in one object; "
            "give each key once",
            "error_code": "BAD_REQUEST",
        }
    assert app_service.client.get(f"/api/data/extracts/{extract}").json()["data"]["enabled"] is True
    names = [
        e["name"] for e in app_service.client.get("/api/data/extracts?filter[limit]=1000").json()["data"]
    ]
    assert "a" not in names and "b" not in names
    # Equal keys in different objects are no repeat.
    r = app_service.client.post(
        "/api/data/extracts",
        content=b'{"name": "c", "filter": {"users": {"where": {"id": {"$gte": 1}, "name": {"$gte": "a"}}}}}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "content,kind",
    [
        (b"null", "null"),
        (b"[1]", "an array"),
        (b'"x"', "a string"),
        (b"1.5", "a number"),
        (b"true", "a boolean"),
    ],
)
def test_a_body_that_is_no_object_says_what_it_is_in_json_words(
    app_service: InProcessService, content: bytes, kind: str
) -> None:
    """It said "not NoneType", "not list": Python's names, which the client never wrote."""
    r = app_service.client.post(
        "/api/data/extracts", content=content, headers={"Content-Type": "application/json"}
    )
    assert r.json() == {
        "success": False,
        "error": f"The body must be a JSON object, not {kind}",
        "error_code": "BAD_REQUEST",
    }


def test_chunked_body_over_the_limit_is_413(app_service: InProcessService) -> None:
    def body():
        yield b'{"name": "'
        for _ in range(70):
            yield b"y" * 16384
        yield b'"}'

    r = app_service.client.post(
        "/api/data/extracts", content=body(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413


def test_a_client_gone_before_its_body_is_one_log_line_and_no_500(app_service: InProcessService) -> None:
    """A client that closed its connection before sending the body it announced was an
    "unhandled error" with a traceback in the service log, and a 500 in the metrics."""
    host, port = app_service.base_url.removeprefix("http://").split(":")
    extract = app_service.create_extract(name="gone")["id"]
    logged = len(app_service.output().splitlines())
    for path in ("/api/data/extracts", f"/api/data/extracts/{extract}"):
        with socket.create_connection((host, int(port))) as sock:
            method = "POST" if path.endswith("extracts") else "PUT"
            sock.sendall(
                f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"name"'.encode()
            )
            time.sleep(0.2)  # the handler is reading the body
        wait_for(lambda sent=path: sent in app_service.output(), what=f"the log line of {method} {path}")
    log = app_service.output().splitlines()[logged:]
    gone = "INFO extracts: the client closed the connection before the response:"
    assert [line for line in log if "/api/data/extracts" in line] == [
        f"{gone} POST /api/data/extracts",
        f"{gone} PUT /api/data/extracts/{extract}",
    ]
    assert "Traceback" not in "\n".join(log)
    metrics = app_service.client.get("/metrics").text
    assert 'status="500"' not in metrics, metrics


def test_unknown_routes_and_methods(app_service: InProcessService) -> None:
    r = app_service.client.get("/api/nowhere")
    assert r.status_code == 404 and r.json()["error_code"] == "RECORD_NOT_FOUND"
    r = app_service.client.patch("/api/data/extracts/x", json={})
    assert r.status_code == 405 and r.json()["error_code"] == "METHOD_NOT_ALLOWED"
    r = http_get(f"{app_service.base_url}/nowhere")
    assert r.status_code == 404 and r.json()["success"] is False


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/api/data/extracts/", "/api/extracts/extract_x/run/", "/health/"])
def test_a_trailing_slash_is_no_route(app_service: InProcessService, method: str, path: str) -> None:
    """It was a 307 with no body, to a Location built from the Host header (http:// behind TLS)."""
    r = app_service.client.request(method, path)
    assert r.status_code == 404, r.text
    error = f"No route {method} {path}"
    assert r.json() == {"success": False, "error": error, "error_code": "RECORD_NOT_FOUND"}


@pytest.mark.parametrize(
    "path,allowed",
    [
        ("/api/describe", "GET, HEAD"),
        ("/api/data/extracts", "GET, HEAD, POST"),
        ("/api/data/extracts/extract_x", "DELETE, GET, HEAD, PUT"),
        ("/api/extracts/extract_x/run", "POST"),
        ("/health", "GET, HEAD"),
    ],
)
@pytest.mark.parametrize("method", ["FOO", "PROPFIND", "TRACE", "OPTIONS", "PATCH"])
def test_every_405_lists_only_the_routes_own_methods(
    app_service: InProcessService, path: str, allowed: str, method: str
) -> None:
    """An unknown method (FOO) got Starlette's 405, whose Allow listed every method of HTTP."""
    r = app_service.client.request(method, path)
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == allowed
    assert r.json() == {
        "success": False,
        "error": f"{method} is not allowed on {path}; allowed: {allowed}",
        "error_code": "METHOD_NOT_ALLOWED",
    }


# ---------------------------------------------------------------- text: Python's, SQLite's, the document's


@pytest.mark.parametrize(
    "body,field",
    [
        ({"name": "\u0000"}, "name"),  # was a 500: SQLite's length() stops at NUL
        ({"name": " \u0000x"}, "name"),
        ({"name": "x\u0000"}, "name"),
        ({"description": "notes\u0000"}, "description"),  # was stored
        ({"schedule": "0 3 * * *\u0000"}, "schedule"),
        ({"schemas": ["users\u0000"]}, "schemas"),
        ({"filter": {"users\u0000": {"where": {"age": 1}}}}, "filter.users\u0000"),
        ({"filter": {"users": {"where": {"age\u0000": 1}}}}, "filter.users.where.age\u0000"),
    ],
)
def test_nul_in_any_text_of_the_configuration_is_a_400(
    app_service: InProcessService, body: dict, field: str
) -> None:
    created = app_service.create_extract(name="NUL target")
    for method, path, sent in [
        ("POST", "/api/data/extracts", VALID | body),
        ("PUT", f"/api/data/extracts/{created['id']}", body),
    ]:
        r = app_service.client.request(method, path, json=sent)
        assert r.status_code == 400, (method, r.text)
        assert r.json()["error_code"] == "VALIDATION_ERROR"
        assert [d["field"] for d in r.json()["details"]] == [field], r.text
    # A NUL in a filter VALUE is source data, bound as a parameter: accepted.
    r = app_service.client.post(
        "/api/data/extracts", json=VALID | {"filter": {"users": {"where": {"name": "a\u0000b"}}}}
    )
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "name,stored",
    [
        pytest.param(" " * 199 + "x", "x", id="199-spaces-x"),
        ("\u3000\u00a0x\u2029\t", "x"),  # str.strip() whitespace, which SQLite's trim() keeps
        ("é" * 200, "é" * 200),
        ("😀" * 200, "😀" * 200),  # characters, not UTF-8 bytes or UTF-16 units
        ("\ufeffx", "\ufeffx"),  # not whitespace for Python: kept
    ],
)
def test_name_length_counts_the_name_as_sent_and_the_stored_name_is_trimmed(
    app_service: InProcessService, name: str, stored: str
) -> None:
    r = app_service.client.post("/api/data/extracts", json={"name": name})
    assert r.status_code == 201, r.text
    assert r.json()["data"]["name"] == stored


@pytest.mark.parametrize(
    "name",
    [
        " " * 249 + "x",  # was stored as "x": now over the limit as sent
        "x" * 201,
        "😀" * 201,
        "\u3000",
        "\u00a0\u2000\u205f",
        "\x1c\x1d\x1e\x1f",
        "\x85",  # whitespace only, Unicode's
    ],
    ids=["249-spaces-x", "201-x", "201-emoji", "ideographic-space", "nbsp-etc", "separators", "nel"],
)
def test_name_over_the_limit_or_only_whitespace_is_a_400(app_service: InProcessService, name: str) -> None:
    r = app_service.client.post("/api/data/extracts", json={"name": name})
    assert r.status_code == 400, r.text
    assert [d["field"] for d in r.json()["details"]] == ["name"]


def test_every_schedule_the_grammar_allows_is_one_croniter_parses() -> None:
    """Each item of each field, with steps: croniter parses it (or finds it never due)."""
    import contextlib
    import re
    from datetime import UTC, datetime

    from croniter import CroniterBadDateError, croniter

    from extracts.cron import CRON

    now = datetime(2026, 1, 1, tzinfo=UTC)
    values = (range(0, 60), range(0, 24), range(1, 32), range(1, 13), range(0, 8))
    names = ((), (), (), ("jan", "Feb", "DEC"), ("sun", "Mon", "SAT"))
    for position, (numbers, words) in enumerate(zip(values, names, strict=True)):
        singles = [str(v) for v in numbers] + [f"0{numbers[0]}", f"0{numbers[-1] % 10}", *words]
        for item in ["*", *singles, *(f"{x}-{y}" for x in singles[::7] for y in singles[::5])]:
            for step in ("", "/1", "/7", "/99"):
                fields = ["*"] * 5
                fields[position] = item + step
                expression = " ".join(fields)
                assert re.fullmatch(CRON, expression), expression
                with contextlib.suppress(CroniterBadDateError):  # parsed, but never due
                    croniter(expression, now).get_next(datetime)


@pytest.mark.parametrize(
    "schedule,due",
    [
        # A range of one value is that value (croniter 7 alone reads it as the whole field).
        ("0 0 1-1 * *", ["2027-01-01T00:00", "2027-02-01T00:00"]),
        ("5-5 3 * * *", ["2026-12-02T03:05", "2026-12-03T03:05"]),
        ("0 0 * * 7-7", ["2026-12-06T00:00", "2026-12-13T00:00"]),
        ("0 0 * * sun-sun", ["2026-12-06T00:00", "2026-12-13T00:00"]),
        ("0 0 * * 0-0", ["2026-12-06T00:00", "2026-12-13T00:00"]),
        ("0 0 * jan-JAN *", ["2027-01-01T00:00", "2027-01-02T00:00"]),
        ("0-0 * * * *", ["2026-12-01T17:00", "2026-12-01T18:00"]),
        ("59-59 23 31-31 12-12 *", ["2026-12-31T23:59", "2027-12-31T23:59"]),
        ("1-1/2 * * * *", ["2026-12-01T17:01", "2026-12-01T18:01"]),
        ("0 0 * * 7-7/2", ["2026-12-06T00:00", "2026-12-13T00:00"]),
        ("0 0 1-1,15 * *", ["2026-12-15T00:00", "2027-01-01T00:00"]),
        ("0 0 * * 3-3,5", ["2026-12-02T00:00", "2026-12-04T00:00", "2026-12-09T00:00"]),
        # A start with a step runs to the field's end; 7 is Sunday alone.
        ("0 0 * * 7/2", ["2026-12-06T00:00", "2026-12-13T00:00"]),
        ("0 0 * * 1/2", ["2026-12-02T00:00", "2026-12-04T00:00", "2026-12-07T00:00"]),
        ("10/20 * * * *", ["2026-12-01T16:50", "2026-12-01T17:10"]),
        # Ranges that already worked still do.
        ("0 0 * * 3-7/2", ["2026-12-02T00:00", "2026-12-04T00:00", "2026-12-06T00:00"]),
        ("0 0 * * 6-7", ["2026-12-05T00:00", "2026-12-06T00:00", "2026-12-12T00:00"]),
        ("0 0 1 * 1", ["2026-12-07T00:00", "2026-12-14T00:00"]),  # day-of-month or day-of-week
        ("*/20 1-2 * * *", ["2026-12-02T01:00", "2026-12-02T01:20"]),
    ],
)
def test_ranges_and_steps_are_read_as_classic_cron_reads_them(schedule: str, due: list[str]) -> None:
    from datetime import UTC, datetime

    from extracts.cron import next_due

    at = datetime(2026, 12, 1, 16, 49, 30, tzinfo=UTC)
    found = []
    for _ in due:
        found.append(next_due(schedule, at))
        at = datetime.fromisoformat(found[-1])
    assert found == [f"{d}:00.000Z" for d in due]


def test_a_range_of_one_value_gives_next_run_at_of_that_value(app_service: InProcessService) -> None:
    from extracts.cron import next_due
    from extracts.state import utcnow

    r = app_service.client.post(
        "/api/data/extracts", json=VALID | {"schedule": "0 0 1-1 1-1 *", "schedule_enabled": True}
    )
    assert r.status_code == 201, r.text
    assert r.json()["data"]["next_run_at"] == next_due("0 0 1 1 *", utcnow())


def test_a_backwards_range_is_named_in_the_message(app_service: InProcessService) -> None:
    r = app_service.client.post(
        "/api/data/extracts", json=VALID | {"schedule": "30-10 * * * mon-fri,sat-sun"}
    )
    assert r.status_code == 400
    assert r.json()["details"] == [
        {
            "field": "schedule",
            "message": "schedule range '30-10' in the minute field runs backwards: cron ranges go from "
            "low to high (0-59); split it into two ranges or a list; range 'sat-sun' in the day-of-week "
            "field runs backwards: cron ranges go from low to high (0-7); split it into two ranges or a list",
        }
    ]
    created = app_service.create_extract(name="Backwards later")
    r = app_service.client.put(f"/api/data/extracts/{created['id']}", json={"schedule": "0 0 * dec-jan *"})
    assert r.status_code == 400 and [d["field"] for d in r.json()["details"]] == ["schedule"]


@pytest.mark.parametrize(
    "schedule,ok",
    [
        ("0 3 * * mon-fri", True),
        ("0 0 1 JAN,jul *", True),
        ("00 03 * * *", True),
        ("0 0 L * *", False),
        ("0 0 15W * *", False),
        ("0 0 * * 1#2", False),
        ("0 0 ? * *", False),
        pytest.param(",".join(str(m) for m in range(60)) + " * * * *", True, id="every-minute-listed"),
        pytest.param("0 " + "1," * 95 + "11 * * *", True, id="200-characters"),
        pytest.param("0 " + "1," * 96 + "1 * * *", False, id="201-characters"),
    ],
)
def test_schedule_grammar_and_length_bound(app_service: InProcessService, schedule: str, ok: bool) -> None:
    r = app_service.client.post("/api/data/extracts", json=VALID | {"schedule": schedule})
    assert (r.status_code == 201) is ok, r.text
    if not ok:
        assert [d["field"] for d in r.json()["details"]] == ["schedule"]


def test_a_huge_schedule_is_refused_quickly_and_does_not_stall_other_requests(
    app_service: InProcessService,
) -> None:
    """500k comma-separated values used to hold the event loop ~8 s (croniter, three times)."""
    import threading
    import time

    schedule = ",".join(["1"] * 250_000) + " * * * *"
    timings: dict[str, float] = {}

    def post() -> None:
        start = time.monotonic()
        r = app_service.client.post("/api/data/extracts", json=VALID | {"schedule": schedule})
        timings["post"] = time.monotonic() - start
        assert r.status_code == 400 and r.json()["details"][0]["field"] == "schedule"

    thread = threading.Thread(target=post)
    thread.start()
    health = []
    with http_client(base_url=app_service.base_url, timeout=30) as client:
        while not health or thread.is_alive():
            start = time.monotonic()
            assert client.get("/health").status_code == 200
            health.append(time.monotonic() - start)
    thread.join()
    assert timings["post"] < 3, timings
    assert max(health) < 2, health


def test_a_filter_binds_at_most_10000_values_in_one_where(app_service: InProcessService) -> None:
    columns = ["id", "email", "name", "age", "score"]
    full = {c: {"$in": list(range(1000)), "$nin": list(range(1000))} for c in columns}
    r = app_service.client.post("/api/data/extracts", json=VALID | {"filter": {"users": {"where": full}}})
    assert r.status_code == 201, r.text[:300]
    over = full | {"created_at": "2024"}
    r = app_service.client.post("/api/data/extracts", json=VALID | {"filter": {"users": {"where": over}}})
    assert r.status_code == 400
    assert r.json()["details"] == [
        {"field": "filter.users.where", "message": "holds 10001 values; at most 10000 in one where"}
    ]


# ---------------------------------------------------------------- typed list filters


def ids(app_service: InProcessService, model: str, **where: str) -> list[str]:
    r = app_service.client.get(
        f"/api/data/{model}", params={f"filter[where][{k}]": v for k, v in where.items()}
    )
    assert r.status_code == 200, r.text
    return [row["id"] for row in r.json()["data"]]


def test_list_filters_read_each_value_by_its_field_type(app_service: InProcessService) -> None:
    """filter[where][total_runs]=1 never matched: the value was bound as text (issue 12, item 11)."""
    extract = app_service.create_extract(
        name="true", description="typed", schemas=["users"], compress=False, retention_days=42
    )
    run = app_service.wait_run(app_service.run(extract["id"]))
    assert run["status"] == "completed", run
    other = app_service.create_extract(name="false", description="typed", compress=True)
    # integers, computed (the view's count(*)) and stored
    assert ids(app_service, "extracts", description="typed", total_runs="1") == [extract["id"]]
    assert ids(app_service, "extracts", description="typed", successful_runs="01") == [extract["id"]]
    assert ids(app_service, "extracts", description="typed", total_runs="0") == [other["id"]]
    assert ids(app_service, "extracts", description="typed", retention_days="42") == [extract["id"]]
    assert ids(app_service, "extracts", description="typed", total_runs="-1") == []
    assert ids(app_service, "extracts", description="typed", total_runs="9" * 30) == []  # past 64 bits
    assert ids(app_service, "extracts", description="typed", total_runs="-" + "9" * 30) == []
    assert ids(app_service, "extracts", description="typed", total_runs="0" * 5000 + "1") == [extract["id"]]
    # booleans: true/false on boolean fields only; text stays text
    assert ids(app_service, "extracts", description="typed", compress="false") == [extract["id"]]
    assert ids(app_service, "extracts", description="typed", compress="true") == [other["id"]]
    assert ids(app_service, "extracts", description="typed", name="true") == [extract["id"]]
    assert ids(app_service, "extracts", description="typed", name="false") == [other["id"]]
    # null, on every type
    assert ids(app_service, "extracts", description="typed", next_run_at="null", name="true") == [
        extract["id"]
    ]
    assert ids(app_service, "extracts", description="typed", last_run_id="null") == [other["id"]]
    # timestamps: as stored, milliseconds optional
    created = extract["created_at"]
    assert ids(app_service, "extracts", created_at=created) == [extract["id"]]
    if created.endswith(".000Z"):
        assert ids(app_service, "extracts", created_at=created[:-5] + "Z") == [extract["id"]]
    # runs: integers, a number, text, a timestamp
    assert ids(app_service, "extract_runs", extract_id=extract["id"], progress="100") == [run["id"]]
    assert ids(app_service, "extract_runs", id=run["id"], records_exported=str(run["records_exported"])) == [
        run["id"]
    ]
    assert ids(app_service, "extract_runs", id=run["id"], duration_seconds=repr(run["duration_seconds"])) == [
        run["id"]
    ]
    assert ids(app_service, "extract_runs", id=run["id"], duration_seconds="-1.5e3") == []
    assert ids(
        app_service, "extract_runs", id=run["id"], started_at=run["started_at"], status="completed"
    ) == [run["id"]]
    assert ids(app_service, "extract_runs", id=run["id"], error="null") == [run["id"]]
    # artifacts: a boolean, integers, null
    artifacts = app_service.client.get(
        "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"]}
    ).json()["data"]
    data = next(a for a in artifacts if a["artifact_type"] == "data-users")
    primary = {a["id"] for a in artifacts if a["is_primary"]}
    assert primary and len(primary) < len(artifacts)
    assert set(ids(app_service, "extract_artifacts", run_id=run["id"], is_primary="true")) == primary
    assert (
        set(ids(app_service, "extract_artifacts", run_id=run["id"], is_primary="false"))
        == {a["id"] for a in artifacts} - primary
    )
    assert ids(
        app_service,
        "extract_artifacts",
        run_id=run["id"],
        size_bytes=str(data["size_bytes"]),
        records=str(data["records"]),
        download_count="0",
        part="null",
    ) == [data["id"]]


@pytest.mark.parametrize(
    "model,field,value",
    [
        ("extracts", "total_runs", "one"),
        ("extracts", "total_runs", "1.0"),
        ("extracts", "total_runs", " 1"),
        ("extracts", "retention_days", "0x10"),
        ("extracts", "enabled", "1"),
        ("extracts", "enabled", "yes"),
        ("extracts", "enabled", "TRUE"),
        ("extracts", "created_at", "yesterday"),
        ("extracts", "created_at", "2026-01-01"),
        ("extracts", "name", "a\u0000b"),
        ("extract_runs", "progress", "²"),
        ("extract_runs", "duration_seconds", "1,5"),
        ("extract_runs", "duration_seconds", "nan"),
        ("extract_runs", "status", "\u0000"),
        ("extract_artifacts", "is_primary", "0"),
        ("extract_artifacts", "size_bytes", "1e3"),
        ("extract_artifacts", "expires_at", "2026-01-01T00:00:00+00:00"),
    ],
)
def test_a_list_filter_value_not_of_the_field_type_is_a_400(
    app_service: InProcessService, model: str, field: str, value: str
) -> None:
    key = f"filter[where][{field}]"
    r = app_service.client.get(f"/api/data/{model}", params={key: value})
    assert r.status_code == 400, r.text
    assert r.json()["error_code"] == "VALIDATION_ERROR"
    assert [d["field"] for d in r.json()["details"]] == [key]


@pytest.mark.parametrize(
    "key,values",
    [
        ("filter[limit]", ["1", "2"]),
        ("filter[offset]", ["0", "0"]),
        ("filter[order]", ["created_at asc", "id desc"]),
        ("filter[where][id]", ["a", "b"]),
    ],
)
def test_a_list_parameter_given_twice_is_a_400(
    app_service: InProcessService, key: str, values: list[str]
) -> None:
    for model in ("extracts", "extract_runs", "extract_artifacts"):
        r = app_service.client.get(f"/api/data/{model}", params=[(key, v) for v in values])
        assert r.status_code == 400, r.text
        message = f"{key} is given more than once; give it once"
        assert r.json()["details"] == [{"field": key, "message": message}]


def test_download_compression_given_twice_is_a_400(app_service: InProcessService) -> None:
    extract = app_service.create_extract(name="Twice", schemas=["users"])
    run = app_service.wait_run(app_service.run(extract["id"]))
    url = f"/api/extracts/runs/{run['id']}/download"
    r = app_service.client.get(url, params=[("compression", "stored"), ("compression", "deflate")])
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "compression"
    assert app_service.client.get(url, params={"compression": "deflate"}).status_code == 200


@pytest.mark.parametrize(
    "declared,status",
    [
        (b"0" * 5000 + b"13", None),
        (b"\xb2", None),  # int() refused both: a 500 under a lenient server
        (b"9" * 5000, 413),
        (b"1048577", 413),
        (b"13", None),
    ],
    ids=["5000-zeros", "superscript-two", "5000-nines", "over-1MiB", "13"],
)
def test_content_length_is_read_without_int_on_the_raw_header(declared: bytes, status: int | None) -> None:
    """uvicorn's h11 refuses such headers first; read_json_object must not depend on it."""
    import asyncio

    from starlette.requests import Request

    from extracts.http import ApiError, read_json_object

    async def receive() -> dict:
        return {"type": "http.request", "body": b'{"name": "x"}', "more_body": False}

    request = Request(
        {
            "type": "http",
            "method": "POST",
            "headers": [(b"content-type", b"application/json"), (b"content-length", declared)],
        },
        receive,
    )
    try:
        assert asyncio.run(read_json_object(request)) == {"name": "x"}
        assert status is None
    except ApiError as exc:
        assert exc.status == status
