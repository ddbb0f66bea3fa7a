"""Security checks: authentication on every /api route, hostile ids and names, the token kept secret."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sqlite3
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pymysql
import pytest
from helpers import (
    EVIL_COLUMN,
    EVIL_TABLE,
    TOKEN,
    InProcessService,
    http_client,
    http_get,
    make_hostile_source,
    start_in_process,
    start_service,
    unique_name,
)

PG_STATE = "postgresql://postgres@127.0.0.1:5432"
SAFE_STEM = "%2E%2E%2F..%2Fetc%2Fpasswd"  # '/' and leading dots encoded: one name, in the run directory

HOSTILE = [
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f",
    "..\\..\\boot.ini",
    "run_\x00evil",
    "a" * 5000,
    "ünïcødé-ид-😀",
    "' OR '1'='1",
    "1; DROP TABLE extracts; --",
    '"; DELETE FROM extract_runs; --',
    "extract_%",
    "%00",
    "/etc/passwd",
    "..",
    ".",
]


@pytest.fixture(scope="module")
def secure_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessService]:
    tmp = tmp_path_factory.mktemp("security")
    svc = start_in_process(tmp, str(make_hostile_source(tmp / "shop.db")))
    yield svc
    svc.stop()


def api_operations(service: InProcessService) -> list[tuple[str, str]]:
    """(method, path) of every /api operation in the OpenAPI document, ids filled in."""
    document = http_get(f"{service.base_url}/openapi.json").json()
    return [
        (method.upper(), path.replace("{id}", "extract_0000").replace("{schema}", "users"))
        for path, methods in document["paths"].items()
        if path.startswith("/api/")
        for method in methods
    ]


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Basic " + TOKEN,
        "Token " + TOKEN,
        "Bearer wrong-token",
        "Bearer " + TOKEN + "x",
        "Bearer " + TOKEN[:-1],
        "Bearer " + TOKEN.upper(),
        TOKEN,
        "Bearer " + TOKEN + " " + TOKEN,
        "Bearer tökén",
    ],
)
def test_every_api_route_refuses_a_missing_malformed_or_wrong_token(
    secure_service: InProcessService, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization.encode("utf-8")}
    operations = [
        *api_operations(secure_service),
        ("GET", "/api/no/such/route"),
        ("PATCH", "/api/data/extracts"),
    ]
    assert len(operations) > 15
    with http_client(base_url=secure_service.base_url, timeout=10) as client:
        for method, path in operations:
            r = client.request(method, path, headers=headers, json={"name": "x"})
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["error_code"] == "UNAUTHORIZED" and r.json()["success"] is False
            given = (authorization or "").split()[-1:]
            assert TOKEN not in r.text and not (given and len(given[0]) > 8 and given[0] in r.text)


@pytest.mark.parametrize(
    "values",
    [
        ["Bearer wrong-token", "Bearer " + TOKEN],  # the last one won: accepted
        ["Bearer " + TOKEN, "Bearer wrong-token"],
        ["Bearer " + TOKEN, "Bearer " + TOKEN],
    ],
)
def test_a_request_with_two_authorization_headers_is_refused(
    secure_service: InProcessService, values: list[str]
) -> None:
    headers = [("Authorization", v) for v in values]
    with http_client(base_url=secure_service.base_url, timeout=10) as client:
        for method, path in api_operations(secure_service):
            r = client.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["error_code"] == "UNAUTHORIZED"
            assert r.json()["error"].startswith("More than one Authorization header")


def test_a_json_body_with_two_content_types_is_refused(secure_service: InProcessService) -> None:
    """Starlette reads the first: text/plain then application/json was a 415, the reverse a 201."""
    for first, second in [
        ("application/json", "text/plain"),
        ("text/plain", "application/json"),
        ("application/json", "application/json"),
    ]:
        r = secure_service.client.post(
            "/api/data/extracts",
            content=b'{"name": "x"}',
            headers=[("Content-Type", first), ("Content-Type", second)],
        )
        assert r.status_code == 400, (first, second, r.text)
        assert r.json()["error_code"] == "BAD_REQUEST"


def test_health_and_openapi_need_no_token_and_reveal_nothing(secure_service: InProcessService) -> None:
    assert http_get(f"{secure_service.base_url}/health").json() == {"status": "ok"}
    for path in ("/health", "/openapi.json"):
        r = http_get(secure_service.base_url + path)
        assert r.status_code == 200 and TOKEN not in r.text


# ---------------------------------------------------------------- hostile ids and names


def state_tables(service: InProcessService) -> list[str]:
    con = sqlite3.connect(service.db)
    try:
        return sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    finally:
        con.close()


def files_outside(service: InProcessService, root: Path) -> set[str]:
    """Every file under ``root`` except the storage directory and the state files."""
    return {
        str(p)
        for p in root.rglob("*")
        if p.is_file()
        and service.storage not in p.parents
        and service.db.parent not in p.parents
        and not p.name.startswith("service-")
    }


def id_routes(segment: str) -> list[tuple[str, str]]:
    """Every route that takes an id (or a schema's name) in its path, with ``segment`` there."""
    return [
        ("GET", f"/api/data/extracts/{segment}"),
        ("PUT", f"/api/data/extracts/{segment}"),
        ("DELETE", f"/api/data/extracts/{segment}"),
        ("GET", f"/api/data/extract_runs/{segment}"),
        ("DELETE", f"/api/data/extract_runs/{segment}"),
        ("GET", f"/api/data/extract_artifacts/{segment}"),
        ("POST", f"/api/extracts/{segment}/run"),
        ("POST", f"/api/extracts/{segment}/cancel"),
        ("GET", f"/api/extracts/runs/{segment}/download"),
        ("GET", f"/api/extracts/artifacts/{segment}/download"),
        ("GET", f"/api/describe/{segment}"),
    ]


@pytest.mark.slow
def test_hostile_ids_never_reach_the_file_system_or_the_sql(secure_service: InProcessService) -> None:
    svc = secure_service
    root = svc.storage.parent
    tables, before = state_tables(svc), files_outside(svc, root)
    extract = svc.create_extract(name="Target", schemas=["users"])
    for hostile in HOSTILE:
        segment = quote(hostile, safe="")
        for method, path in id_routes(segment):
            r = svc.client.request(method, path, json={"description": "x"})
            if path.startswith("/api/describe/") and hostile == EVIL_TABLE:
                assert r.json()["data"]["name"] == EVIL_TABLE  # that table exists: its own name
                continue
            if hostile in (".", ".."):  # clients resolve dot segments: another URL reaches the server
                assert r.status_code < 500
                continue
            assert r.status_code in (400, 404), (method, path[:80], r.status_code, r.text[:200])
            assert r.json()["success"] is False
        # As list filter values and orderings: bound as parameters, never spliced.
        for model in ("extracts", "extract_runs", "extract_artifacts"):
            r = svc.client.get(f"/api/data/{model}", params={"filter[where][id]": hostile})
            if "\x00" in hostile:  # no stored text holds a NUL: refused, naming the parameter
                assert r.status_code == 400 and r.json()["details"][0]["field"] == "filter[where][id]"
            else:
                assert r.status_code == 200 and r.json()["data"] == [], (model, hostile[:40])
            r = svc.client.get(f"/api/data/{model}", params={"filter[order]": hostile})
            assert r.status_code == 400 and r.json()["error_code"] == "VALIDATION_ERROR"
            r = svc.client.get(f"/api/data/{model}", params={f"filter[where][{hostile}]": "1"})
            assert r.status_code == 400, (model, hostile[:40], r.text[:200])
        # As extract names: stored verbatim (up to the length limit, without NUL), harmless everywhere.
        r = svc.client.post("/api/data/extracts", json={"name": hostile, "schemas": ["users"]})
        if len(hostile) > 200 or "\x00" in hostile:
            assert r.status_code == 400 and r.json()["details"][0]["field"] == "name"
        else:
            assert r.status_code == 201, r.text
            assert r.json()["data"]["name"] == hostile.strip()
        # As filters: an unknown column is refused; a value is bound.
        r = svc.client.put(
            f"/api/data/extracts/{extract['id']}", json={"filter": {"users": {"where": {hostile: 1}}}}
        )
        assert r.status_code == 400 and r.json()["details"][0]["field"].startswith("filter.users.where.")
        r = svc.client.put(
            f"/api/data/extracts/{extract['id']}",
            json={"filter": {"users": {"where": {"name": {"$like": hostile}}}}},
        )
        assert r.status_code == 200, r.text
    assert state_tables(svc) == tables
    assert files_outside(svc, root) == before
    # The bound filters ran: nothing matched, nothing was dropped.
    run = svc.wait_run(svc.run(extract["id"]))
    assert run["status"] == "completed" and run["records_exported"] == 0
    con = sqlite3.connect(svc.source)
    assert con.execute("SELECT count(*) FROM users").fetchone() == (4,)
    con.close()


@pytest.mark.slow
def test_an_id_holding_a_nul_is_a_404_on_a_postgresql_state_too(tmp_path: Path) -> None:
    """PostgreSQL refuses a NUL in text: every route taking an id answered it with a 500 (an
    "unhandled error" with its traceback in the log) where a SQLite state says 404."""
    name = unique_name("extracts_nul_ids")
    with psycopg.connect(f"{PG_STATE}/postgres", autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    svc = None
    try:
        svc = start_service(tmp_path, str(make_hostile_source(tmp_path / "shop.db")), db=f"{PG_STATE}/{name}")
        for segment in ("%00", "extract_%00x", "run_%00", "artifact_x%00"):
            for method, path in id_routes(segment):
                r = svc.client.request(method, path, json={"description": "x"})
                assert r.status_code == 404, (method, path, r.status_code, r.text)
                assert r.json()["error_code"] == "RECORD_NOT_FOUND"
        assert "Traceback" not in svc.output()
    finally:
        if svc is not None:
            svc.stop()
        with psycopg.connect(f"{PG_STATE}/postgres", autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_schema_named_like_a_path_exports_to_a_safe_file_name(secure_service: InProcessService) -> None:
    svc = secure_service
    root = svc.storage.parent
    before = files_outside(svc, root)
    r = svc.client.get(f"/api/describe/{quote(EVIL_TABLE, safe='')}")
    assert r.status_code == 200 and r.json()["data"]["name"] == EVIL_TABLE
    assert list(r.json()["data"]["columns"]) == ["id", EVIL_COLUMN]
    for fmt in ("jsonl", "json", "yaml", "archive"):
        extract = svc.create_extract(
            name="../../etc/cron.d/evil",
            schemas=[EVIL_TABLE, "users"],
            format=fmt,
            filter={EVIL_TABLE: {"where": {EVIL_COLUMN: {"$like": "root%"}}}},
        )
        run = svc.wait_run(svc.run(extract["id"]))
        assert run["status"] == "completed", run
        run_dir = svc.storage / run["id"]
        artifacts = svc.client.get(
            "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"]}
        ).json()["data"]
        for a in artifacts:
            path = Path(a["storage_path"])
            assert path.parent == run_dir and path.resolve().parent == run_dir.resolve(), a
            assert "/" not in a["artifact_name"] and not a["artifact_name"].startswith(".")
            assert hashlib.sha256(path.read_bytes()).hexdigest() == a["checksum"]
        names = {a["artifact_name"] for a in artifacts}
        if fmt == "archive":
            assert any(n.startswith("-etc-cron-d-evil-") and n.endswith(".tar.gz") for n in names), names
        else:
            assert f"{SAFE_STEM}.{fmt}.gz" in names, names
            manifest = json.loads((run_dir / "manifest.json").read_text())
            entry = next(m for m in manifest["artifacts"] if m["schema"] == EVIL_TABLE)
            assert entry["name"] == f"{SAFE_STEM}.{fmt}.gz" and entry["records"] == 1
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(names)
        r = svc.client.get(f"/api/extracts/runs/{run['id']}/download")
        assert r.status_code == 200
        disposition = r.headers["content-disposition"]
        assert disposition.startswith('attachment; filename="-etc-cron-d-evil-') and "/" not in disposition
        with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
            assert archive.testzip() is None
            assert sorted(archive.namelist()) == sorted(names)
    assert files_outside(svc, root) == before


@pytest.mark.slow
def test_the_token_never_appears_in_logs_or_responses(tmp_path: Path) -> None:
    secret = "s3cr3t-token-that-must-never-leak"
    source = make_hostile_source(tmp_path / "shop.db")
    for how in ("flag", "env"):
        (tmp_path / how).mkdir()
        if how == "flag":
            svc = start_service(tmp_path / how, str(source), "--token", secret)  # the last --token wins
        else:
            svc = start_service(tmp_path / how, str(source), token=False, env={"EXTRACTS_TOKEN": secret})
        try:
            seen = []
            with http_client(
                base_url=svc.base_url, headers={"Authorization": f"Bearer {secret}"}, timeout=30
            ) as client:
                extract = client.post("/api/data/extracts", json={"name": "Leak?"}).json()["data"]
                run_id = client.post(f"/api/extracts/{extract['id']}/run").json()["data"]["run_id"]
                seen += [
                    client.get("/api/data/extract_runs").text,
                    client.get("/openapi.json").text,
                    client.get("/api/data/extracts/nope").text,
                    client.get("/api/describe").text,
                ]
                svc.client.headers["Authorization"] = f"Bearer {secret}"
                run = svc.wait_run(run_id)
                assert run["status"] == "completed"
                seen.append(json.dumps(run))
                for a in client.get("/api/data/extract_artifacts").json()["data"]:
                    seen.append(Path(a["storage_path"]).read_bytes().decode("latin-1"))
                r = client.get(f"/api/extracts/runs/{run_id}/download")
                seen += [r.content.decode("latin-1"), str(r.headers)]
                for header in (f"Bearer {secret}x", f"Basic {secret}"):
                    r = http_get(f"{svc.base_url}/api/describe", headers={"Authorization": header})
                    seen += [r.text, str(r.headers)]
        finally:
            svc.stop()
        assert all(secret not in text for text in seen)
        assert secret not in svc.output(), how
        assert secret not in (svc.db.parent / "extracts.db").read_bytes().decode("latin-1")
        assert not (svc.db.parent / "extracts.db.token").exists()


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--token", ""], {}),
        (["--token", "   "], {}),
        ([], {"EXTRACTS_TOKEN": "  "}),
    ],
)
def test_an_empty_token_is_refused_at_start_up(args: list[str], env: dict[str, str]) -> None:
    """`--token ""` used to start a service that let "Authorization: Bearer" in."""
    from extracts.settings import parse_settings

    with pytest.raises(SystemExit) as exit_info:
        parse_settings(args, environ=env)
    assert exit_info.value.code != 0


def test_an_empty_token_never_authenticates() -> None:
    import asyncio

    from extracts.http import BearerAuth

    async def app(scope, receive, send) -> None:
        raise AssertionError("reached the app")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    auth = BearerAuth(app, "")
    for header in (b"Bearer", b"Bearer ", b"bearer   "):
        sent.clear()
        asyncio.run(auth({"type": "http", "headers": [(b"authorization", header)]}, None, send))
        assert sent[0]["status"] == 401


# ---------------------------------------------------------------- source credentials

MARKER = "S3cret"  # in every password below: it must appear nowhere
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
ACCOUNT = unique_name("extracts_leak")  # a role/user and its database
MY_PASSWORD = "p@ss:w0rd-S3cret"  # a raw '@' and ':', as people paste them
# Every credential form each driver accepts. The local PostgreSQL trusts 127.0.0.1 (any
# password is accepted: check_trust_accepts_any_password); the MariaDB user has MY_PASSWORD.
SOURCE_FORMS = {
    "pg-query-password": "postgresql://{a}@127.0.0.1:5432/{a}?password=S3cret-query",
    "pg-encoded-userinfo": "postgresql://{a}:S3cret%40at%3Acolon%2Fslash@127.0.0.1:5432/{a}",
    "pg-raw-colon-question-hash": "postgres://{a}:S3cret:c?q#h@127.0.0.1:5432/{a}?sslmode=disable",
    "pg-ssl-and-passfile": "postgresql://{a}@127.0.0.1:5432/{a}?sslmode=disable&sslpassword=S3cret-ssl"
    "&passfile=/nonexistent/S3cret.pgpass",
    "mysql-raw-at-and-colon": "mysql://{a}:p@ss:w0rd-S3cret@127.0.0.1:3306/{a}",
    "mariadb-encoded": "mariadb://{a}:p%40ss%3Aw0rd-S3cret@127.0.0.1:3306/{a}",
}


class Account:
    """A PostgreSQL role and a MariaDB user, each owning a database named like it, for one module."""

    def __init__(self) -> None:
        self.pg = psycopg.connect(PG_ADMIN, autocommit=True)
        self.my = pymysql.connect(host="127.0.0.1", user="root", password="", autocommit=True)
        try:
            self.pg.execute(f'CREATE ROLE "{ACCOUNT}" LOGIN')
            self.pg.execute(f'CREATE DATABASE "{ACCOUNT}" OWNER "{ACCOUNT}"')
            self.my_sql(f"CREATE DATABASE `{ACCOUNT}`")
            self.my_sql(f"CREATE USER '{ACCOUNT}'@'%%' IDENTIFIED BY %s", (MY_PASSWORD,))
            self.my_sql(f"GRANT SELECT, SHOW VIEW ON `{ACCOUNT}`.* TO '{ACCOUNT}'@'%'")
        except Exception:
            self.close()
            raise

    def my_sql(self, sql: str, params: Any = None) -> None:
        with self.my.cursor() as cursor:
            cursor.execute(sql, params)

    def tables(self, dialect: str) -> None:
        """``items`` (two rows) and ``doomed``, made anew."""
        statements = [
            "DROP TABLE IF EXISTS items",
            "DROP TABLE IF EXISTS doomed",
            "CREATE TABLE items (id int PRIMARY KEY, label text)",
            "INSERT INTO items VALUES (1, 'one'), (2, 'two')",
            "CREATE TABLE doomed (id int)",
        ]
        if dialect == "pg":
            with psycopg.connect(f"postgresql://{ACCOUNT}@127.0.0.1:5432/{ACCOUNT}", autocommit=True) as conn:
                for statement in statements:
                    conn.execute(statement)
        else:
            for statement in statements:
                self.my_sql(
                    statement.replace("TABLE items", f"TABLE `{ACCOUNT}`.items")
                    .replace("INTO items", f"INTO `{ACCOUNT}`.items")
                    .replace("TABLE doomed", f"TABLE `{ACCOUNT}`.doomed")
                    .replace("EXISTS items", f"EXISTS `{ACCOUNT}`.items")
                    .replace("EXISTS doomed", f"EXISTS `{ACCOUNT}`.doomed")
                )

    def drop_doomed(self, dialect: str) -> None:
        if dialect == "pg":
            with psycopg.connect(f"postgresql://{ACCOUNT}@127.0.0.1:5432/{ACCOUNT}", autocommit=True) as conn:
                conn.execute("DROP TABLE doomed")
        else:
            self.my_sql(f"DROP TABLE `{ACCOUNT}`.doomed")

    def lock(self, dialect: str, locked: bool) -> None:
        """New connections are refused (the server's message names the user, not the password)."""
        if dialect == "pg":
            self.pg.execute(f'ALTER ROLE "{ACCOUNT}" {"NOLOGIN" if locked else "LOGIN"}')
        else:
            self.my_sql(f"ALTER USER '{ACCOUNT}'@'%' ACCOUNT {'LOCK' if locked else 'UNLOCK'}")

    def close(self) -> None:
        self.pg.execute(f'DROP DATABASE IF EXISTS "{ACCOUNT}" WITH (FORCE)')
        self.pg.execute(f'DROP ROLE IF EXISTS "{ACCOUNT}"')
        self.pg.close()
        self.my_sql(f"DROP DATABASE IF EXISTS `{ACCOUNT}`")
        self.my_sql(f"DROP USER IF EXISTS '{ACCOUNT}'@'%'")
        self.my.close()


@pytest.fixture(scope="module")
def account() -> Iterator[Account]:
    made = Account()
    yield made
    made.close()


def test_check_trust_accepts_any_password(account: Account) -> None:
    """The PostgreSQL forms above connect only because this server trusts 127.0.0.1."""
    psycopg.connect(f"postgresql://{ACCOUNT}:{MARKER}@127.0.0.1:5432/{ACCOUNT}").close()
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host="127.0.0.1", user=ACCOUNT, password=MARKER)
    pymysql.connect(host="127.0.0.1", user=ACCOUNT, password=MY_PASSWORD).close()


@pytest.mark.parametrize(
    "form",
    [  # one form per driver in the quick run; every form in the full one
        form
        if form in ("pg-raw-colon-question-hash", "mysql-raw-at-and-colon")
        else pytest.param(form, marks=pytest.mark.slow)
        for form in SOURCE_FORMS
    ],
)
def test_source_passwords_appear_nowhere(account: Account, tmp_path: Path, form: str) -> None:
    dialect = "pg" if form.startswith("pg") else "my"
    location = SOURCE_FORMS[form].format(a=ACCOUNT)
    account.tables(dialect)
    svc = start_service(tmp_path, location)
    seen: list[str] = []
    try:
        r = svc.client.get("/api/describe")
        assert r.status_code == 200 and {s["name"] for s in r.json()["data"]} == {"items", "doomed"}
        seen.append(r.text)
        ok = svc.create_extract(name="ok", schemas=["items"], format="json", compress=False)
        doomed = svc.create_extract(name="doomed", schemas=["doomed"])
        account.drop_doomed(dialect)
        runs = [svc.wait_run(svc.run(ok["id"])), svc.wait_run(svc.run(doomed["id"]))]
        assert [run["status"] for run in runs] == ["completed", "failed"]
        assert "no longer exists" in runs[1]["error"]
        seen += [
            json.dumps(runs),
            svc.client.get("/api/data/extract_runs").text,
            svc.client.get("/api/data/extract_artifacts").text,
            svc.client.get("/openapi.json").text,
        ]
        r = svc.client.get(f"/api/extracts/runs/{runs[0]['id']}/download")
        assert r.status_code == 200
        seen.append(r.content.decode("latin-1"))
        account.lock(dialect, True)
        try:
            for r in (
                svc.client.get("/api/describe"),
                svc.client.post("/api/data/extracts", json={"name": "x", "schemas": ["items"]}),
            ):
                assert r.status_code == 503 and ACCOUNT in r.json()["error"], r.text
                seen.append(r.text)
            failed = svc.wait_run(svc.run(ok["id"]))
            assert failed["status"] == "failed" and "Cannot connect" in failed["error"], failed
            seen.append(json.dumps(failed))
        finally:
            account.lock(dialect, False)
    finally:
        svc.stop()
    output = svc.output()
    assert f"Exporting from {location[: location.index('://') + 3]}" in output
    seen.append(output)
    seen += [path.read_bytes().decode("latin-1") for path in svc.storage.rglob("*") if path.is_file()]
    seen += [path.read_bytes().decode("latin-1") for path in svc.db.parent.iterdir() if path.is_file()]
    with contextlib.closing(sqlite3.connect(svc.db)) as con:
        seen.append("\n".join(con.iterdump()))
    leaks = [
        text[max(0, text.index(MARKER) - 80) : text.index(MARKER) + 40] for text in seen if MARKER in text
    ]
    assert leaks == []
