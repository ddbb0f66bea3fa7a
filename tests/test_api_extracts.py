"""Extract configurations, the Data API conventions and auth, against a real server."""

from __future__ import annotations

import httpx
import pytest
from conftest import TOKEN, Service

VALID = {"name": "Daily backup"}


def test_create_applies_defaults_and_returns_201(service: Service) -> None:
    r = service.client.post("/api/data/extracts", json={"name": "  Full export  "})
    assert r.status_code == 201
    body = r.json()
    assert body["success"] is True
    data = body["data"]
    assert data["id"].startswith("extract_")
    assert data["created_at"].endswith("Z") and data["updated_at"] == data["created_at"]
    expected = {
        "name": "Full export", "description": None, "format": "jsonl",
        "include": ["describe", "data"], "schemas": None, "filter": None, "compress": True,
        "split_files": False, "split_max_records": 1000000, "schedule": None,
        "schedule_enabled": False, "retention_days": 7, "enabled": True, "deleted_at": None,
        "last_run_id": None, "last_run_status": None, "last_run_at": None, "total_runs": 0,
        "successful_runs": 0, "failed_runs": 0, "cancelled_runs": 0, "next_run_at": None,
    }
    assert {k: data[k] for k in expected} == expected
    assert service.client.get(f"/api/data/extracts/{data['id']}").json() == {"success": True,
                                                                              "data": data}


@pytest.mark.parametrize("field,bad,good", [
    ("name", "", "x"), ("name", "   ", "x"), ("name", "x" * 201, "x" * 200), ("name", 5, "n"),
    ("description", 7, "notes"), ("description", ["a"], None),
    ("format", "csv", "yaml"), ("format", "JSONL", "archive"), ("format", None, "json"),
    ("include", [], ["data"]), ("include", ["data", "data"], ["describe"]),
    ("include", ["everything"], ["describe", "data"]), ("include", "data", ["data"]),
    ("schemas", [], ["users"]), ("schemas", ["users", "users"], ["users", "orders"]),
    ("schemas", ["nope"], ["order items"]), ("schemas", "users", None), ("schemas", [1], ["adults"]),
    ("schemas", ["sqlite_master"], ["users"]),
    ("compress", "yes", False), ("compress", 1, True), ("split_files", None, True),
    ("split_max_records", 0, 1), ("split_max_records", 100_000_001, 100_000_000),
    ("split_max_records", 10.0, 10), ("split_max_records", "10", 10),
    ("schedule", "not cron", "0 3 * * *"), ("schedule", "* * * * * *", "*/5 * * * *"),
    ("schedule", "61 * * * *", None), ("schedule", "@daily", "0 0 * * 1-5"),
    ("retention_days", 0, 1), ("retention_days", 366, 365), ("retention_days", "7", 7),
    ("retention_days", 7.5, 30), ("retention_days", True, 3),
    ("enabled", "yes", False), ("enabled", 0, True), ("schedule_enabled", "true", False),
])
def test_each_field_rule_rejects_bad_and_accepts_good(service: Service, field: str, bad, good) -> None:
    r = service.client.post("/api/data/extracts", json=VALID | {field: bad})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["success"] is False and body["error_code"] == "VALIDATION_ERROR"
    assert [d["field"] for d in body["details"]] == [field]
    assert field in body["details"][0]["message"]
    r = service.client.post("/api/data/extracts", json=VALID | {field: good})
    assert r.status_code == 201, r.text
    expected = good.strip() if isinstance(good, str) and field == "schedule" else good
    assert r.json()["data"][field] == expected


def test_unknown_schemas_are_listed(service: Service) -> None:
    r = service.client.post("/api/data/extracts", json=VALID | {"schemas": ["users", "ghost", "x y"]})
    assert r.status_code == 400
    assert r.json()["details"] == [
        {"field": "schemas", "message": "schemas not found in the source: ghost, x y"}]


def test_every_bad_field_is_named_at_once(service: Service) -> None:
    r = service.client.post("/api/data/extracts", json={
        "format": "csv", "retention_days": 0, "bogus": 1, "id": "extract_mine"})
    assert r.status_code == 400
    fields = [d["field"] for d in r.json()["details"]]
    assert sorted(fields) == ["bogus", "format", "id", "name", "retention_days"]


def test_schedule_enabled_requires_schedule(service: Service) -> None:
    r = service.client.post("/api/data/extracts", json=VALID | {"schedule_enabled": True})
    assert r.status_code == 400
    assert [d["field"] for d in r.json()["details"]] == ["schedule"]
    r = service.client.post("/api/data/extracts",
                            json=VALID | {"schedule_enabled": True, "schedule": "0 3 * * *"})
    assert r.status_code == 201
    data = r.json()["data"]
    assert data["next_run_at"].endswith("T03:00:00.000Z")
    # Disabling the schedule on an existing extract clears next_run_at; removing the cron
    # expression while still enabled is refused, naming schedule.
    r = service.client.put(f"/api/data/extracts/{data['id']}", json={"schedule": None})
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "schedule"
    r = service.client.put(f"/api/data/extracts/{data['id']}", json={"schedule_enabled": False})
    assert r.json()["data"]["next_run_at"] is None


@pytest.mark.parametrize("filter_,field", [
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
])
def test_filter_shape_and_columns_are_checked(service: Service, filter_, field) -> None:
    r = service.client.post("/api/data/extracts", json=VALID | {"filter": filter_})
    if field is None:
        assert r.status_code == 201, r.text
        assert r.json()["data"]["filter"] == filter_
    else:
        assert r.status_code == 400, r.text
        assert [d["field"] for d in r.json()["details"] if d["field"].startswith(field)], r.text


def test_filter_on_schema_not_exported_is_refused(service: Service) -> None:
    r = service.client.post("/api/data/extracts", json=VALID | {
        "schemas": ["orders"], "filter": {"users": {"where": {"age": 3}}}})
    assert r.status_code == 400
    assert r.json()["details"][0]["field"] == "filter.users"


def test_put_changes_only_the_fields_sent(service: Service) -> None:
    created = service.create_extract(name="Partial", description="before", retention_days=3)
    r = service.client.put(f"/api/data/extracts/{created['id']}", json={"description": "after"})
    assert r.status_code == 200
    updated = r.json()["data"]
    assert updated["description"] == "after"
    assert updated["retention_days"] == 3 and updated["name"] == "Partial"
    assert updated["updated_at"] >= created["updated_at"]
    assert {k: v for k, v in updated.items() if k not in ("description", "updated_at")} == \
        {k: v for k, v in created.items() if k not in ("description", "updated_at")}


def test_put_ignores_read_only_fields_and_rejects_unknown(service: Service) -> None:
    created = service.create_extract(name="Round trip")
    echoed = created | {"name": "Round trip 2", "total_runs": 99, "id": "extract_other"}
    r = service.client.put(f"/api/data/extracts/{created['id']}", json=echoed)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["id"] == created["id"] and r.json()["data"]["total_runs"] == 0
    assert r.json()["data"]["name"] == "Round trip 2"
    r = service.client.put(f"/api/data/extracts/{created['id']}", json={"colour": "red"})
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "colour"
    r = service.client.put(f"/api/data/extracts/{created['id']}", json={"enabled": "no"})
    assert r.status_code == 400


def test_soft_delete(service: Service) -> None:
    created = service.create_extract(name="To delete")
    r = service.client.delete(f"/api/data/extracts/{created['id']}")
    assert r.status_code == 200
    assert r.json()["data"]["deleted_at"] is not None and r.json()["data"]["id"] == created["id"]
    for method, path in [("GET", f"/api/data/extracts/{created['id']}"),
                         ("PUT", f"/api/data/extracts/{created['id']}"),
                         ("DELETE", f"/api/data/extracts/{created['id']}"),
                         ("POST", f"/api/extracts/{created['id']}/run")]:
        r = service.client.request(method, path, json={"name": "x"})
        assert r.status_code == 404, (method, r.text)
        assert r.json()["error_code"] == "RECORD_NOT_FOUND"
    ids = [e["id"] for e in service.client.get("/api/data/extracts?filter[limit]=1000").json()["data"]]
    assert created["id"] not in ids


def test_list_filter_order_limit_offset(service: Service) -> None:
    made = [service.create_extract(name=f"List {i}", format="yaml", description="list test",
                                   retention_days=100 + i) for i in range(5)]
    mine = {"filter[where][description]": "list test"}
    r = service.client.get("/api/data/extracts", params=mine | {"filter[where][enabled]": "true"})
    assert [row["name"] for row in r.json()["data"]] == [m["name"] for m in reversed(made)]
    r = service.client.get("/api/data/extracts", params=mine | {
        "filter[order]": "retention_days asc", "filter[limit]": "2", "filter[offset]": "1"})
    assert [row["retention_days"] for row in r.json()["data"]] == [101, 102]
    r = service.client.get("/api/data/extracts", params=mine | {"filter[order]": "name desc",
                                                                "filter[limit]": "1"})
    assert [row["name"] for row in r.json()["data"]] == ["List 4"]
    r = service.client.get("/api/data/extracts", params={"filter[where][schemas]": "null"})
    assert r.status_code == 400
    r = service.client.get("/api/data/extracts", params={"filter[where][description]": "null",
                                                         "filter[where][retention_days]": "104"})
    assert r.json()["data"] == []
    r = service.client.get("/api/data/extracts", params=mine | {"filter[where][enabled]": "false"})
    assert r.json()["data"] == []
    service.client.put(f"/api/data/extracts/{made[0]['id']}", json={"description": None})
    r = service.client.get("/api/data/extracts", params={"filter[where][description]": "null",
                                                         "filter[where][retention_days]": "100"})
    assert [row["id"] for row in r.json()["data"]] == [made[0]["id"]]


@pytest.mark.parametrize("params,field", [
    ({"filter[where][colour]": "red"}, "filter[where][colour]"),
    ({"filter[limit]": "1001"}, "filter[limit]"),
    ({"filter[limit]": "0"}, "filter[limit]"),
    ({"filter[limit]": "ten"}, "filter[limit]"),
    ({"filter[offset]": "-1"}, "filter[offset]"),
    ({"filter[order]": "name sideways"}, "filter[order]"),
    ({"filter[order]": "nope desc"}, "filter[order]"),
    ({"filter[sort]": "name"}, "filter[sort]"),
    ({"filter[where]": "x"}, "filter[where]"),
])
def test_bad_list_filters_are_400(service: Service, params, field) -> None:
    for model in ("extracts", "extract_runs", "extract_artifacts"):
        r = service.client.get(f"/api/data/{model}", params=params)
        assert r.status_code == 400, r.text
        assert r.json()["error_code"] == "VALIDATION_ERROR"
        assert r.json()["details"][0]["field"] == field


def test_runs_and_artifacts_lists_are_read_only(service: Service) -> None:
    for model in ("extract_runs", "extract_artifacts"):
        assert service.client.get(f"/api/data/{model}?filter[where][id]=none").json() == {
            "success": True, "data": []}
        r = service.client.post(f"/api/data/{model}", json={})
        assert r.status_code == 405 and r.json()["error_code"] == "METHOD_NOT_ALLOWED"
        assert "GET" in r.headers["allow"]
        r = service.client.get(f"/api/data/{model}/missing")
        assert r.status_code == 404 and r.json()["error_code"] == "RECORD_NOT_FOUND"
    r = service.client.put("/api/data/extract_artifacts/x", json={})
    assert r.status_code == 405


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN},
])
def test_every_api_route_requires_the_token(service: Service, headers) -> None:
    paths = [("GET", "/api/data/extracts"), ("POST", "/api/data/extracts"),
             ("GET", "/api/data/extracts/x"), ("PUT", "/api/data/extracts/x"),
             ("DELETE", "/api/data/extracts/x"), ("GET", "/api/data/extract_runs"),
             ("GET", "/api/data/extract_runs/x"), ("DELETE", "/api/data/extract_runs/x"),
             ("GET", "/api/data/extract_artifacts"), ("GET", "/api/data/extract_artifacts/x"),
             ("POST", "/api/extracts/x/run"), ("POST", "/api/extracts/x/cancel"),
             ("GET", "/api/extracts/runs/x/download"), ("GET", "/api/extracts/artifacts/x/download"),
             ("GET", "/api/describe"), ("GET", "/api/describe/users"), ("GET", "/api/nowhere")]
    with httpx.Client(base_url=service.base_url, headers=headers) as anonymous:
        for method, path in paths:
            r = anonymous.request(method, path)
            assert r.status_code == 401, (method, path)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["error_code"] == "UNAUTHORIZED" and r.json()["success"] is False
            assert TOKEN not in r.text


def test_health_and_openapi_need_no_token(service: Service) -> None:
    assert httpx.get(f"{service.base_url}/health").json() == {"status": "ok"}
    doc = httpx.get(f"{service.base_url}/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) >= {"/api/data/extracts", "/api/data/extracts/{id}",
                                 "/api/extracts/{id}/run", "/api/extracts/{id}/cancel",
                                 "/api/extracts/runs/{id}/download", "/api/describe/{schema}",
                                 "/api/extracts/artifacts/{id}/download", "/health"}
    create = doc["paths"]["/api/data/extracts"]["post"]
    schema = create["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["name"]
    assert schema["properties"]["retention_days"] == {"type": "integer", "minimum": 1, "maximum": 365}
    assert {"201", "400", "401", "413", "415"} <= set(create["responses"])


@pytest.mark.parametrize("content,headers,status,code", [
    (b"{not json", {"Content-Type": "application/json"}, 400, "BAD_REQUEST"),
    (b"[1, 2]", {"Content-Type": "application/json"}, 400, "BAD_REQUEST"),
    (b'"text"', {"Content-Type": "application/json"}, 400, "BAD_REQUEST"),
    (b"", {"Content-Type": "application/json"}, 400, "BAD_REQUEST"),
    (b'{"name": "x"}', {"Content-Type": "text/plain"}, 415, "UNSUPPORTED_MEDIA_TYPE"),
    (b'{"name": "x"}', {}, 415, "UNSUPPORTED_MEDIA_TYPE"),
    (b'{"name": "' + b"x" * (1 << 20) + b'"}', {"Content-Type": "application/json"}, 413,
     "PAYLOAD_TOO_LARGE"),
    (b"\xff\xfe{", {"Content-Type": "application/json"}, 400, "BAD_REQUEST"),
])
def test_malformed_bodies_get_the_envelope(service: Service, content, headers, status, code) -> None:
    r = service.client.post("/api/data/extracts", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["success"] is False and r.json()["error_code"] == code


def test_chunked_body_over_the_limit_is_413(service: Service) -> None:
    def body():
        yield b'{"name": "'
        for _ in range(70):
            yield b"y" * 16384
        yield b'"}'
    r = service.client.post("/api/data/extracts", content=body(),
                            headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_unknown_routes_and_methods(service: Service) -> None:
    r = service.client.get("/api/nowhere")
    assert r.status_code == 404 and r.json()["error_code"] == "RECORD_NOT_FOUND"
    r = service.client.patch("/api/data/extracts/x", json={})
    assert r.status_code == 405 and r.json()["error_code"] == "METHOD_NOT_ALLOWED"
    r = httpx.get(f"{service.base_url}/nowhere")
    assert r.status_code == 404 and r.json()["success"] is False


def test_a_filter_binds_at_most_10000_values_in_one_where(service: Service) -> None:
    columns = ["id", "email", "name", "age", "score"]
    full = {c: {"$in": list(range(1000)), "$nin": list(range(1000))} for c in columns}
    r = service.client.post("/api/data/extracts", json=VALID | {"filter": {"users": {"where": full}}})
    assert r.status_code == 201, r.text[:300]
    over = full | {"created_at": "2024"}
    r = service.client.post("/api/data/extracts", json=VALID | {"filter": {"users": {"where": over}}})
    assert r.status_code == 400
    assert r.json()["details"] == [{"field": "filter.users.where",
                                    "message": "holds 10001 values; at most 10000 in one where"}]


def test_download_compression_given_twice_is_a_400(service: Service) -> None:
    extract = service.create_extract(name="Twice", schemas=["users"])
    run = service.wait_run(service.run(extract["id"]))
    url = f"/api/extracts/runs/{run['id']}/download"
    r = service.client.get(url, params=[("compression", "stored"), ("compression", "deflate")])
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "compression"
    assert service.client.get(url, params={"compression": "deflate"}).status_code == 200


@pytest.mark.parametrize("declared,status", [
    (b"0" * 5000 + b"13", None), (b"\xb2", None),  # int() refused both: a 500 under a lenient server
    (b"9" * 5000, 413), (b"1048577", 413), (b"13", None),
], ids=["5000-zeros", "superscript-two", "5000-nines", "over-1MiB", "13"])
def test_content_length_is_read_without_int_on_the_raw_header(declared: bytes, status: int | None) -> None:
    """uvicorn's h11 refuses such headers first; read_json_object must not depend on it."""
    import asyncio

    from starlette.requests import Request

    from extracts_http import ApiError, read_json_object

    async def receive() -> dict:
        return {"type": "http.request", "body": b'{"name": "x"}', "more_body": False}

    request = Request({"type": "http", "method": "POST", "headers": [
        (b"content-type", b"application/json"), (b"content-length", declared)]}, receive)
    try:
        assert asyncio.run(read_json_object(request)) == {"name": "x"}
        assert status is None
    except ApiError as exc:
        assert exc.status == status
