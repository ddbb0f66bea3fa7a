"""The OpenAPI document: derived from the route table and the validation rules, and what it tells whom.

Against the app served in this process; the document's rules are checked against validation itself.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator

import pytest
from helpers import EVIL_COLUMN, EVIL_TABLE, TOKEN, InProcessService, http_get, start_in_process

# Names found nowhere in the service's own vocabulary, so that a search of the document is exact.
SECRET_TABLES = {
    "payroll_q7x": ["salary_k2v", "ssn_z9w"],
    "patients_m4r": ["diagnosis_b8t"],
    EVIL_TABLE: ["id", EVIL_COLUMN],
}


@pytest.fixture(scope="module")
def secret_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessService]:
    tmp = tmp_path_factory.mktemp("secret")
    con = sqlite3.connect(tmp / "secret.db")
    for table, columns in SECRET_TABLES.items():
        con.execute(f'CREATE TABLE "{table}" ({", ".join(f"{json.dumps(c)} TEXT" for c in columns)})')
    con.execute('CREATE VIEW "staff_view_h3j" AS SELECT salary_k2v AS "bonus_y6n" FROM payroll_q7x')
    con.commit()
    con.close()
    svc = start_in_process(tmp, str(tmp / "secret.db"))
    yield svc
    svc.stop()


def source_names() -> list[str]:
    names = ["staff_view_h3j", "bonus_y6n", *SECRET_TABLES]
    names += [c for columns in SECRET_TABLES.values() for c in columns if c != "id"]
    return names


def test_openapi_without_a_valid_token_names_nothing_of_the_source(secret_service: InProcessService) -> None:
    """SPEC: without a token /openapi.json names no table or column; a wrong token is no 401."""
    url = f"{secret_service.base_url}/openapi.json"
    anonymous = [
        http_get(url),
        http_get(url, headers={"Authorization": "Bearer wrong"}),
        http_get(url, headers=[("Authorization", f"Bearer {TOKEN}")] * 2),
    ]
    for r in anonymous:
        assert r.status_code == 200 and r.headers["vary"] == "Authorization"
        assert r.content == anonymous[0].content
        for name in source_names():
            assert name not in r.text and json.dumps(name)[1:-1] not in r.text, name
    r = secret_service.client.get("/openapi.json")
    assert r.status_code == 200
    body = r.json()["paths"]["/api/data/extracts"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["properties"]["schemas"]["items"]["enum"] == sorted(
        ["staff_view_h3j", *SECRET_TABLES]
    )
    for name in source_names():
        assert json.dumps(name)[1:-1] in r.text, name


def test_openapi_catalog_is_cached_and_refreshed_when_validation_sees_it_changed(
    secret_service: InProcessService,
) -> None:
    def documented() -> list[str]:
        document = secret_service.client.get("/openapi.json").json()
        body = document["paths"]["/api/data/extracts"]["post"]["requestBody"]["content"]
        return body["application/json"]["schema"]["properties"]["schemas"]["items"]["enum"]

    before = documented()
    con = sqlite3.connect(secret_service.source)
    con.execute("CREATE TABLE added_later_p5s (v TEXT)")
    con.commit()
    con.close()
    try:
        # Served from the cache: the source is not read again, the new table not seen.
        anonymous = {http_get(f"{secret_service.base_url}/openapi.json").content for _ in range(10)}
        assert len(anonymous) == 1 and b"added_later_p5s" not in anonymous.pop()
        assert all(documented() == before for _ in range(10))
        # Validation reads the source, notices a catalog the document does not have: dropped.
        secret_service.create_extract(name="New table", schemas=["added_later_p5s"])
        assert documented() == sorted([*before, "added_later_p5s"])
    finally:
        con = sqlite3.connect(secret_service.source)
        con.execute("DROP TABLE added_later_p5s")
        con.commit()
        con.close()


def test_openapi_document_cache_reads_the_catalog_once_per_burst_and_expiry() -> None:
    """DocumentCache with a catalog reader that counts its calls and an injected clock."""

    from extracts.catalog import CATALOG_RETRY_S, CATALOG_TTL_S, DocumentCache

    reads: list[int] = []
    builds: list[object] = []
    clock = [1000.0]
    catalog: dict[str, list[str]] | None = {"t": ["a"]}

    def read_catalog() -> dict[str, list[str]] | None:
        time.sleep(0.05)  # a slow source: the burst arrives while the first read runs
        reads.append(1)
        return catalog

    def build(found: dict[str, list[str]] | None) -> bytes:
        builds.append(found)
        return json.dumps(found).encode()

    cache = DocumentCache(build, read_catalog, clock=lambda: clock[0])

    async def burst() -> set[bytes]:
        return set(await asyncio.gather(*(cache.authenticated() for _ in range(50))))

    assert asyncio.run(burst()) == {b'{"t": ["a"]}'} and len(reads) == 1
    assert {cache.anonymous() for _ in range(50)} == {b"null"} and builds.count(None) == 1
    clock[0] += CATALOG_TTL_S - 1
    asyncio.run(burst())
    assert len(reads) == 1
    clock[0] += 1
    asyncio.run(burst())
    assert len(reads) == 2
    cache.notice({"t"}, {"t": ["a"]})  # what validation read matches: kept
    asyncio.run(burst())
    assert len(reads) == 2
    cache.notice({"t", "u"}, {})  # a new schema: dropped, read again
    catalog = None  # ... and the source is down: retried sooner
    asyncio.run(burst())
    assert len(reads) == 3
    clock[0] += CATALOG_RETRY_S
    asyncio.run(burst())
    assert len(reads) == 4


def test_openapi_describes_every_route_and_the_extract_fields(secret_service: InProcessService) -> None:
    """Without a token too (tests/test_security.py checks what it leaves out)."""
    doc = http_get(f"{secret_service.base_url}/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) >= {
        "/api/data/extracts",
        "/api/data/extracts/{id}",
        "/api/extracts/{id}/run",
        "/api/extracts/{id}/cancel",
        "/api/extracts/runs/{id}/download",
        "/api/describe/{schema}",
        "/api/extracts/artifacts/{id}/download",
        "/health",
    }
    create = doc["paths"]["/api/data/extracts"]["post"]
    schema = create["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["name"]
    assert schema["properties"]["retention_days"] == {"type": "integer", "minimum": 1, "maximum": 365}
    assert {"201", "400", "401", "413", "415"} <= set(create["responses"])


def test_text_rules_of_the_document_are_validation_rules() -> None:
    """The OpenAPI schema of each text field accepts exactly what validation accepts.

    jsonschema_rs is the validator schemathesis judges with (ECMA-like regular
    expressions, where \\s and $ differ from Python's re).
    """
    import sys

    import jsonschema_rs

    from extracts.config import EXTRACT_FIELDS, FieldError
    from extracts.cron import SCHEDULE_MAX

    whitespace = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    texts = [
        "",
        "x",
        " x ",
        "\u0000",
        "x\u0000",
        "\u0000\n",
        "x\n",
        "\n",
        "\ufeff",
        "\u200b",
        "\u180e",
        "a" * 200,
        "a" * 201,
        " " * 200,
        " " * 199 + "x",
        "😀" * 200,
        "😀" * 201,
        "x" + "\n" * 3,
        *whitespace,
        *(w + "x" + w for w in whitespace),
        "".join(whitespace),
    ]
    schedules = [
        "0 3 * * *",
        " 0 3 * * * ",
        "0 3 * * *\n",
        "0\t3 * * *",
        "0 3 * * MON-fri",
        "0 0 1 jan,Jul *",
        "*/5 * * * *",
        "00 03 * * 7",
        "0 0 L * *",
        "0 0 ? * *",
        "0 0 * * 1#2",
        "@daily",
        "* * * * * *",
        "60 * * * *",
        "0 24 * * *",
        "0 0 0 * *",
        "0 0 * 13 *",
        "0 0 * * 8",
        "*/0 * * * *",
        "0\u00a03 * * *",
        "0\u20033 * * *",
        "0 3 * * *\u0000",
        ",".join(str(m) for m in range(60)) + " * * * *",
        "0 " + "1," * 95 + "11 * * *",  # 200 characters
        "0 " + "1," * 96 + "1 * * *",  # 201
    ]
    fields = {f.name: f for f in EXTRACT_FIELDS}
    for name, values in (("name", texts), ("description", texts), ("schedule", schedules)):
        validator = jsonschema_rs.validator_for(fields[name].schema)
        for value in values:
            try:
                fields[name].check(value)
                accepted = True
            except FieldError:
                accepted = False
            assert validator.is_valid(value) == accepted, (name, value, accepted)
    assert len(schedules[-1]) == SCHEDULE_MAX + 1
    items = jsonschema_rs.validator_for(fields["schemas"].schema)
    for value in (["users"], ["users\u0000"], [""], ["\u0000"]):
        try:
            fields["schemas"].check(value)
            accepted = True
        except FieldError:
            accepted = False
        assert items.is_valid(value) == accepted, value


def test_list_filter_values_are_described_as_validated() -> None:
    """Each filter[where] parameter's schema in the document accepts exactly what the list accepts."""
    import jsonschema_rs

    from extracts.http import ValidationFailed
    from extracts.records import MODELS, list_query, where_schema
    from extracts.state import FieldType

    samples = [
        "",
        "null",
        "NULL",
        "true",
        "false",
        "0",
        "-0",
        "1",
        "007",
        "-12",
        "1.5",
        "-1.5e-3",
        "1e400",
        "9" * 30,
        "²",
        " 1",
        "1\n",
        "abc",
        "a\u0000",
        "2026-01-02T03:04:05Z",
        "2026-01-02T03:04:05.123Z",
        "2026-01-02T03:04:05.1Z",
        "2026-01-02 03:04:05Z",
        "2026-01-02T03:04:05.123Z\n",
        "null\n",
    ]
    for model in MODELS.values():
        for field, field_type in model.fields.items():
            if field_type is FieldType.JSON:
                continue
            validator = jsonschema_rs.validator_for(where_schema(field_type))
            for value in samples:
                try:
                    list_query(model, [(f"filter[where][{field}]", value)])
                    accepted = True
                except ValidationFailed:
                    accepted = False
                assert validator.is_valid(value) == accepted, (field, field_type, value, accepted)
