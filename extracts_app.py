"""Extracts: export a database into downloadable, checksummed files, over HTTP.

The data flow, left to right::

    request ─► extract row ─► run row (queued) ─► process pool ─► worker reads the
    source in one snapshot, writes files, puts progress + artifacts on a queue
    ─► parent (the only writer of the state file) updates the run and artifact
    rows ─► downloads stream the files, one by one or as a ZIP built on the fly

This module is the HTTP edge: settings and start-up, routes, validation, the
JSON envelope, downloads. ``extracts_state`` owns the state file,
``extracts_runs`` the pool and the run lifecycle, ``executor`` what runs in the
worker processes, ``extracts_zip`` the byte layout of the ZIP downloads.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import secrets
import shutil
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
from databases import Database
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route, Router

import extracts_downloads
import extracts_state as state
from executor.credentials import BlankingFormatter, blank, redact, source_secrets
from executor.filters import check_where
from executor.sources import SourceError, open_source
from extracts_http import (
    ApiError,
    BearerAuth,
    CatchAll,
    Conflict,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    ValidationFailed,
    api_error_handler,
    bearer_problem,
    http_exception_handler,
    json_response,
    ok,
    read_json_object,
    source_error_handler,
)
from extracts_openapi import DocumentCache, openapi_document
from extracts_runs import RunManager, next_due
from extracts_state import (
    ACTIVE_STATUSES,
    ARTIFACT_FIELDS,
    RUN_FIELDS,
    FieldType,
    TriggeredBy,
    new_id,
    now_iso,
    to_record,
    utcnow,
)

log = logging.getLogger("extracts")

# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One start-up option: flag ``--name``, environment variable, default, help."""

    name: str
    default: Any
    env: str
    help: str
    type: Callable[[str], Any] = str
    metavar: str | None = None


SETTINGS = (
    Setting(
        "source",
        None,
        "EXTRACTS_SOURCE",
        "the database to export: a SQLite file path, "
        "sqlite:///relative/path, sqlite:////absolute/path, postgresql://… or mysql://… "
        "(default: a demo SQLite database created beside the state file)",
        metavar="URL|PATH",
    ),
    Setting("db", "./extracts.db", "EXTRACTS_DB", "the service's own SQLite state file", metavar="PATH"),
    Setting(
        "storage", "/tmp/extracts", "EXTRACTS_STORAGE", "directory where artifacts are written", metavar="DIR"
    ),
    Setting("host", "127.0.0.1", "EXTRACTS_HOST", "address to listen on"),
    Setting("port", 9001, "EXTRACTS_PORT", "port to listen on", int),
    Setting(
        "token",
        None,
        "EXTRACTS_TOKEN",
        "bearer token; when absent one is generated and kept in <state file>.token (mode 0600)",
    ),
    Setting(
        "workers",
        os.cpu_count() or 1,
        "EXTRACTS_WORKERS",
        "size of the process pool: runs executed at once",
        int,
        metavar="N",
    ),
    Setting(
        "min_free_mb",
        100,
        "EXTRACTS_MIN_FREE_MB",
        "free space to keep on the storage volume; a run fails cleanly when free space falls under it",
        int,
        metavar="MB",
    ),
    Setting(
        "cleanup_interval",
        3600,
        "EXTRACTS_CLEANUP_INTERVAL",
        "seconds between retention sweeps of expired artifacts",
        float,
        metavar="SECONDS",
    ),
)


@dataclass
class Settings:
    """The resolved start-up options (flag, else environment variable, else default)."""

    source: str | None
    db: Path
    storage: Path
    host: str
    port: int
    token: str | None
    workers: int
    min_free_mb: int
    cleanup_interval: float
    demo: bool = False
    token_generated: bool = False
    notes: list[str] = field(default_factory=list)


def parse_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="extracts-app", description="Export a database into downloadable, checksummed files over HTTP."
    )
    for s in SETTINGS:
        parser.add_argument(
            f"--{s.name.replace('_', '-')}", dest=s.name, metavar=s.metavar, help=f"{s.help} [{s.env}]"
        )
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = getattr(args, s.name)
        if raw is None:
            raw = environ.get(s.env) or None
        if raw is None:
            values[s.name] = s.default
            continue
        try:
            values[s.name] = s.type(raw)
        except ValueError:
            parser.error(f"--{s.name.replace('_', '-')} [{s.env}]: {raw!r} is not a valid {s.type.__name__}")
    if values["workers"] < 1:
        parser.error("--workers [EXTRACTS_WORKERS] must be at least 1")
    if values["token"] is not None:  # an empty token would let "Authorization: Bearer" in
        values["token"] = values["token"].strip()
        if not values["token"]:
            parser.error("--token [EXTRACTS_TOKEN] must not be empty")
    if values["cleanup_interval"] <= 0:
        parser.error("--cleanup-interval [EXTRACTS_CLEANUP_INTERVAL] must be positive")
    values["db"] = Path(values["db"]).expanduser().absolute()
    values["storage"] = Path(values["storage"]).expanduser().absolute()
    return Settings(**values)


class StartupError(Exception):
    """The service cannot start; the message is the one line printed before exiting."""


def prepare(settings: Settings) -> None:
    """Fail fast on anything that would stop the service working (SPEC: Starting it)."""
    try:
        state.prepare_state_file(settings.db)
    except (OSError, sqlite3.Error) as exc:
        raise StartupError(f"cannot write the state file {settings.db}: {exc}") from exc
    try:
        settings.storage.mkdir(parents=True, exist_ok=True)
        probe = settings.storage / f".write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"ok")
        probe.unlink()
        extracts_downloads.remove_stale_links(settings.storage)
    except OSError as exc:
        raise StartupError(
            f"cannot create or write the storage directory {settings.storage}: {exc.strerror or exc}"
        ) from exc
    if settings.source is None:
        demo = settings.db.with_name("demo.db")
        if not demo.exists():
            from executor.demo import create_demo_database

            try:
                create_demo_database(demo)
            except (OSError, sqlite3.Error) as exc:
                raise StartupError(f"cannot create the demo database {demo}: {exc}") from exc
        settings.source = str(demo)
        settings.demo = True
    try:
        with open_source(settings.source) as source:
            source.names()
    except SourceError as exc:
        reason = blank(str(exc), source_secrets(settings.source))
        raise StartupError(f"cannot open the source: {reason}") from exc
    if settings.token is None:
        settings.token, settings.token_generated = load_or_create_token(settings.db)
    free_mb = shutil.disk_usage(settings.storage).free // (1 << 20)
    if free_mb < settings.min_free_mb:
        settings.notes.append(
            f"warning: only {free_mb} MB free on the storage volume {settings.storage}, under the "
            f"{settings.min_free_mb} MB reserve (--min-free-mb): runs will fail until space is "
            "freed; downloads keep working"
        )


def load_or_create_token(db: Path) -> tuple[str, bool]:
    """The token kept beside the state file, created (mode 0600) on first start."""
    path = db.with_name(db.name + ".token")
    try:
        token = path.read_text().strip()
        if token:
            return token, True
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot read the token file {path}: {exc.strerror}") from exc
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.chmod(path, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot write the token file {path}: {exc.strerror}") from exc
    return token, True


# ---------------------------------------------------------------- the extract configuration


class FieldError(Exception):
    """A bad field value; the message completes the sentence '<field> …'."""


# Text is stored in SQLite (PostgreSQL later), whose idea of a string must not differ from
# Python's: SQLite's length() stops at a NUL, so a CHECK would count less than Python does, and
# PostgreSQL refuses NUL in text. Whitespace is what str.isspace() says, which str.strip()
# removes; SQLite's trim() removes spaces only, so names are stored stripped. Each rule is a
# regular expression both validation (re.fullmatch) and the OpenAPI document (``pattern``)
# read; character classes are spelled out, as \s means three things in Python, ECMA and Rust.
WHITESPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NUL_FREE = r"[^\x00]*"
NAME = rf"[^\x00]*[^\x00{WHITESPACE}][^\x00]*"
NAME_MAX = 200
SCHEDULE_MAX = 200  # room for a list of all 60 minutes; croniter's work stays small


def anchored(body: str) -> str:
    """A rule as a JSON Schema ``pattern``, which matches anywhere unless anchored."""
    return f"^(?:{body})$"


def _string(v: Any) -> str:
    if not isinstance(v, str):
        raise FieldError("must be a string")
    return v


def _text(v: Any) -> str:
    if "\x00" in _string(v):
        raise FieldError("must not contain NUL characters (\\u0000)")
    return v


def _name(v: Any) -> str:
    v = _text(v)
    if len(v) > NAME_MAX:  # the name as sent: what the OpenAPI document's maxLength can say
        raise FieldError(f"must be at most {NAME_MAX} characters")
    if not v.strip():
        raise FieldError("must not be empty or only whitespace")
    return v.strip()


def _nullable(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise FieldError("must be true or false")
    return v


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise FieldError("must be an integer")
        if not low <= v <= high:
            raise FieldError(f"must be between {low} and {high}")
        return v

    return check


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options or not isinstance(v, str):
            raise FieldError(f"must be one of {', '.join(options)}")
        return v

    return check


def _include(v: Any) -> list[str]:
    if not isinstance(v, list) or not v:
        raise FieldError("must be a non-empty array")
    if any(item not in ("describe", "data") for item in v):
        raise FieldError("items must be 'describe' or 'data'")
    if len(set(v)) != len(v):
        raise FieldError("must not repeat an item")
    return v


def _schemas(v: Any) -> list[str] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not v:
        raise FieldError("must be a non-empty array of schema names, or null for every table")
    if not all(isinstance(item, str) and item for item in v):
        raise FieldError("items must be non-empty strings")
    if any("\x00" in item for item in v):
        raise FieldError("items must not contain NUL characters (\\u0000)")
    if len(set(v)) != len(v):
        raise FieldError("must not repeat a schema")
    return v


def _filter(v: Any) -> dict[str, Any] | None:
    if v is None:
        return None
    if not isinstance(v, dict) or not v:
        raise FieldError('must be an object like {"<schema>": {"where": {...}}}, or null')
    for schema, spec in v.items():
        if not isinstance(spec, dict) or set(spec) != {"where"} or not isinstance(spec["where"], dict):
            raise FieldError(f'.{schema} must be an object with one key, "where", holding an object')
    return v


def _cron() -> str:
    """The 5-field cron expressions ``schedule`` accepts: numbers, names, ranges, steps and lists.

    Every expression it matches is one croniter parses (tests/test_api_extracts.py checks
    each item of each field); croniter's own extensions (L, W, #, ?) are not part of it.
    """

    def anycase(word: str) -> str:
        return "".join(f"[{c}{c.upper()}]" for c in word)

    months = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    days = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
    fields = (
        (r"0?[0-9]|[1-5][0-9]",),
        (r"0?[0-9]|1[0-9]|2[0-3]",),
        (r"0?[1-9]|[12][0-9]|3[01]",),
        (r"0?[1-9]|1[0-2]", *map(anycase, months)),
        (r"0?[0-7]", *map(anycase, days)),
    )
    parts = []
    for alternatives in fields:
        value = "|".join(alternatives)
        item = rf"(?:\*|(?:{value})(?:-(?:{value}))?)(?:/[1-9][0-9]?)?"
        parts.append(rf"{item}(?:,{item})*")
    return r"[ \t]*" + r"[ \t]+".join(parts) + r"[ \t]*"


CRON = _cron()


def _schedule(v: Any) -> str | None:
    """A cron expression as written; whether it ever comes due is checked off the event loop."""
    if v is None:
        return None
    v = _string(v)
    if len(v) > SCHEDULE_MAX:
        raise FieldError(f"must be at most {SCHEDULE_MAX} characters")
    if re.fullmatch(CRON, v) is None:
        raise FieldError(
            "must be a 5-field cron expression (minute hour day month weekday), e.g. '0 3 * * *'"
        )
    return v.strip()


@dataclass(frozen=True)
class ExtractField:
    """One field of an extract configuration: drives validation, defaults and OpenAPI."""

    name: str
    check: Callable[[Any], Any]
    default: Any
    schema: dict[str, Any]
    required: bool = False

    @property
    def type(self) -> FieldType:
        """The record field's type, as its JSON Schema says (arrays and objects are JSON)."""
        kind = self.schema["type"] if isinstance(self.schema["type"], str) else self.schema["type"][0]
        return {"string": FieldType.TEXT, "integer": FieldType.INTEGER, "boolean": FieldType.BOOLEAN}.get(
            kind, FieldType.JSON
        )


FORMATS = ("jsonl", "json", "yaml", "archive")

EXTRACT_FIELDS = (
    ExtractField(
        "name",
        _name,
        None,
        {"type": "string", "minLength": 1, "maxLength": NAME_MAX, "pattern": anchored(NAME)},
        required=True,
    ),
    ExtractField(
        "description", _nullable(_text), None, {"type": ["string", "null"], "pattern": anchored(NUL_FREE)}
    ),
    ExtractField("format", _choice(FORMATS), "jsonl", {"type": "string", "enum": list(FORMATS)}),
    ExtractField(
        "include",
        _include,
        ["describe", "data"],
        {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "uniqueItems": True,
            "items": {"type": "string", "enum": ["describe", "data"]},
        },
    ),
    ExtractField(
        "schemas",
        _schemas,
        None,
        {
            "type": ["array", "null"],
            "minItems": 1,
            "uniqueItems": True,
            "items": {"type": "string", "minLength": 1, "pattern": anchored(NUL_FREE)},
        },
    ),
    ExtractField("filter", _filter, None, {"type": ["object", "null"]}),
    ExtractField("compress", _boolean, True, {"type": "boolean"}),
    ExtractField("split_files", _boolean, False, {"type": "boolean"}),
    ExtractField(
        "split_max_records",
        _integer(1, 100_000_000),
        1_000_000,
        {"type": "integer", "minimum": 1, "maximum": 100_000_000},
    ),
    ExtractField(
        "schedule",
        _schedule,
        None,
        {"type": ["string", "null"], "maxLength": SCHEDULE_MAX, "pattern": anchored(CRON)},
    ),
    ExtractField("schedule_enabled", _boolean, False, {"type": "boolean"}),
    ExtractField("retention_days", _integer(1, 365), 7, {"type": "integer", "minimum": 1, "maximum": 365}),
    ExtractField("enabled", _boolean, True, {"type": "boolean"}),
)
FIELDS_BY_NAME = {f.name: f for f in EXTRACT_FIELDS}
READ_ONLY_FIELDS = {
    "id": FieldType.TEXT,
    "created_at": FieldType.TIMESTAMP,
    "updated_at": FieldType.TIMESTAMP,
    "deleted_at": FieldType.TIMESTAMP,
    "last_run_id": FieldType.TEXT,
    "last_run_status": FieldType.TEXT,
    "last_run_at": FieldType.TIMESTAMP,
    "total_runs": FieldType.INTEGER,
    "successful_runs": FieldType.INTEGER,
    "failed_runs": FieldType.INTEGER,
    "cancelled_runs": FieldType.INTEGER,
    "next_run_at": FieldType.TIMESTAMP,
}
# The options a run uses, copied into its config_snapshot when it is queued.
SNAPSHOT_FIELDS = (
    "name",
    "format",
    "include",
    "schemas",
    "filter",
    "compress",
    "split_files",
    "split_max_records",
    "retention_days",
)


async def validate_extract(
    app_state: AppState, body: dict[str, Any], current: dict[str, Any] | None
) -> dict[str, Any]:
    """The configuration after applying ``body`` to ``current`` (None: create); 400 lists every bad field."""
    details: list[dict[str, str]] = []
    values: dict[str, Any] = {}
    for key, value in body.items():
        spec = FIELDS_BY_NAME.get(key)
        if spec is None:
            if key in READ_ONLY_FIELDS and current is not None:
                continue  # SPEC: read-only fields sent back on PUT are ignored
            reason = (
                "is read-only: the service sets it"
                if key in READ_ONLY_FIELDS
                else "is not a field of an extract"
            )
            details.append({"field": key, "message": f"{key} {reason}"})
            continue
        try:
            values[key] = spec.check(value)
        except FieldError as exc:
            details.append({"field": key, "message": f"{key} {exc}"})
    merged = dict(current) if current is not None else {f.name: f.default for f in EXTRACT_FIELDS}
    if current is None and "name" not in body:
        details.append({"field": "name", "message": "name is required"})
    merged.update(values)
    bad = {d["field"] for d in details}
    if merged["schedule_enabled"] and merged["schedule"] is None and "schedule" not in bad:
        details.append(
            {
                "field": "schedule",
                "message": "schedule is required when "
                "schedule_enabled is true: give a 5-field cron expression",
            }
        )
    schedule = values.get("schedule")
    if schedule is not None and await anyio.to_thread.run_sync(next_due, schedule, utcnow()) is None:
        details.append(
            {"field": "schedule", "message": f"schedule '{schedule}' never comes due: no date matches it"}
        )
    if not bad & {"schemas", "filter"} and ("schemas" in values or "filter" in values):
        problems, seen = await anyio.to_thread.run_sync(
            check_against_source, app_state.settings.source, merged["schemas"], merged["filter"]
        )
        app_state.documents.notice(*seen)
        details += problems
    if details:
        fields = ", ".join(dict.fromkeys(d["field"] for d in details))
        raise ValidationFailed(f"Invalid extract configuration: {fields}", details)
    return merged


def check_against_source(
    location: str, schemas: list[str] | None, filters: dict[str, Any] | None
) -> tuple[list[dict[str, str]], tuple[set[str], dict[str, list[str]]]]:
    """Schema names and filter columns checked against the source (runs in a thread).

    Also returns what it read of the source's catalog (every schema name, the columns of
    the filtered schemas), so that a stale OpenAPI document can be noticed.
    """
    details = []
    columns: dict[str, list[str]] = {}
    with open_source(location) as source:
        known = set(source.names())
        if schemas is not None:
            unknown = [name for name in schemas if name not in known]
            if unknown:
                details.append(
                    {"field": "schemas", "message": "schemas not found in the source: " + ", ".join(unknown)}
                )
        for schema, spec in (filters or {}).items():
            if schema not in known:
                details.append(
                    {
                        "field": f"filter.{schema}",
                        "message": f"schema '{schema}' does not exist in the source",
                    }
                )
            elif schemas is not None and schema not in schemas:
                details.append(
                    {
                        "field": f"filter.{schema}",
                        "message": f"schema '{schema}' is not among the extract's schemas",
                    }
                )
            else:
                columns[schema] = source.columns(schema)
                problems = check_where(spec["where"], columns[schema], field=f"filter.{schema}.where")
                details += [{"field": path, "message": message} for path, message in problems]
    return details, (known, columns)


# ---------------------------------------------------------------- lists: filter[...] query parameters


@dataclass(frozen=True)
class Model:
    """A table (or view) behind ``/api/data/<name>`` and its fields with their types."""

    table: str
    fields: dict[str, FieldType]
    live_only: bool = False


# The fields of an extract record, in order, with their types (runs and artifacts: extracts_state).
EXTRACT_RECORD_FIELDS = {
    "id": FieldType.TEXT,
    **{f.name: f.type for f in EXTRACT_FIELDS},
    **{k: t for k, t in READ_ONLY_FIELDS.items() if k != "id"},
}
MODELS = {
    "extracts": Model("extracts_with_stats", EXTRACT_RECORD_FIELDS, live_only=True),
    "extract_runs": Model("extract_runs", RUN_FIELDS),
    "extract_artifacts": Model("extract_artifacts", ARTIFACT_FIELDS),
}
MAX_OFFSET = 2**63 - 1  # SQLite's largest integer: anything larger is not an OFFSET
FILTER_PARAM = re.compile(r"^filter\[(where|order|limit|offset)\](?:\[([^\]]+)\])?$")
# What filter[where][<field>] accepts, by the field's type, and what it is then compared with:
# an integer or a boolean as a number, since a computed statistic (total_runs) has no column
# affinity that would convert text. 'null' means IS NULL for every type. JSON fields are not
# filterable. The OpenAPI document shows the same rules.
WHERE_VALUES = {
    FieldType.TEXT: (NUL_FREE, "text without NUL characters"),
    FieldType.INTEGER: (r"null|-?[0-9]+", "an integer"),
    FieldType.NUMBER: (r"null|-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?", "a number"),
    FieldType.BOOLEAN: (r"null|true|false", "true or false"),
    FieldType.TIMESTAMP: (
        r"null|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{3})?Z",
        "a timestamp like 2026-03-01T03:00:00.000Z",
    ),
}


def _bounded_int(digits: str) -> int:
    """ASCII digits as an int; past 20 significant digits, MAX_OFFSET + 1 (int() refuses 4,300+)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 20 else MAX_OFFSET + 1


def where_value(field_type: FieldType, text: str) -> Any:
    """A value WHERE_VALUES accepts (not 'null') as it is bound; None for an integer past 64 bits."""
    if field_type is FieldType.INTEGER:
        digits = text.removeprefix("-").lstrip("0") or "0"
        if len(digits) > 19:  # past 64 bits (and int() refuses 4,300 digits)
            return None
        number = -int(digits) if text.startswith("-") else int(digits)
        return number if -MAX_OFFSET - 1 <= number <= MAX_OFFSET else None
    if field_type is FieldType.NUMBER:
        return float(text)
    if field_type is FieldType.BOOLEAN:
        return int(text == "true")
    if field_type is FieldType.TIMESTAMP and "." not in text:
        return text[:-1] + ".000Z"  # as iso() writes it
    return text


def where_schema(field_type: FieldType) -> dict[str, Any]:
    """The OpenAPI schema of a filter[where][<field>] parameter."""
    if field_type is FieldType.BOOLEAN:
        return {"type": "string", "enum": ["true", "false", "null"]}
    rule, help_ = WHERE_VALUES[field_type]
    return {"type": "string", "pattern": anchored(rule), "description": f"{help_}, or null"}


def list_query(model: Model, params: list[tuple[str, str]]) -> tuple[str, dict[str, Any]]:
    """SQL for a list request; 400 names every bad ``filter[...]`` parameter."""
    details: list[dict[str, str]] = []
    where: list[str] = []
    args: dict[str, Any] = {}
    order, limit, offset = "created_at DESC, id DESC", 100, 0
    if model.live_only:
        where.append("deleted_at IS NULL")
    seen: set[str] = set()
    for key, value in params:
        if not key.startswith("filter"):
            continue
        if key in seen:  # which copy would count? (Two conditions on one field would AND: never meant.)
            if not any(d["field"] == key for d in details):
                details.append({"field": key, "message": f"{key} is given more than once; give it once"})
            continue
        seen.add(key)
        match = FILTER_PARAM.match(key)
        if match is None or (match[1] == "where") != (match[2] is not None):
            details.append(
                {
                    "field": key,
                    "message": f"{key} is not a known filter parameter: use "
                    "filter[where][<field>], filter[order], filter[limit], filter[offset]",
                }
            )
            continue
        kind, name = match[1], match[2]
        if kind == "where":
            field_type = model.fields.get(name)
            if field_type is None or field_type is FieldType.JSON:
                details.append({"field": key, "message": f"{name} is not a field that can be filtered"})
                continue
            rule, help_ = WHERE_VALUES[field_type]
            if re.fullmatch(rule, value) is None:
                details.append({"field": key, "message": f"{key} must be {help_}, or null"})
            elif value == "null":
                where.append(f'"{name}" IS NULL')
            elif (scalar := where_value(field_type, value)) is None:
                where.append("0 = 1")  # no record holds an integer SQLite cannot store
            else:
                where.append(f'"{name}" = :w{len(args)}')
                args[f"w{len(args)}"] = scalar
        elif kind == "order":
            column, _, direction = value.strip().partition(" ")
            direction = direction.strip().lower() or "asc"
            if model.fields.get(column, FieldType.JSON) is FieldType.JSON or direction not in ("asc", "desc"):
                details.append(
                    {
                        "field": key,
                        "message": "filter[order] must be '<field> asc' or "
                        f"'<field> desc' with a known field (got {value!r})",
                    }
                )
                continue
            order = f'"{column}" {direction.upper()}, id {direction.upper()}'
        elif not (value.isascii() and value.isdigit()):  # str.isdigit alone takes '²'
            details.append({"field": key, "message": f"{key} must be a non-negative integer"})
        elif kind == "limit":
            limit = _bounded_int(value)
            if not 1 <= limit <= 1000:
                details.append({"field": key, "message": "filter[limit] must be between 1 and 1000"})
                limit = 100
        elif (offset := _bounded_int(value)) > MAX_OFFSET:
            details.append({"field": key, "message": f"filter[offset] must be at most {MAX_OFFSET}"})
    if details:
        raise ValidationFailed("Invalid list filter: " + ", ".join(d["field"] for d in details), details)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    columns = ", ".join(f'"{c}"' for c in model.fields)
    return (
        f"SELECT {columns} FROM {model.table}{clause} ORDER BY {order} LIMIT {limit} OFFSET {offset}",
        args,
    )


# ---------------------------------------------------------------- handlers


@dataclass
class AppState:
    """What handlers share: settings, the state database, the run manager, the OpenAPI documents."""

    settings: Settings
    db: Database
    runs: RunManager
    documents: DocumentCache


def app_state(request: Request) -> AppState:
    return request.app.state.extracts


async def fetch_record(db: Database, model: str, record_id: str) -> dict[str, Any]:
    m = MODELS[model]
    live = " AND deleted_at IS NULL" if m.live_only else ""
    row = await db.fetch_one(
        f"SELECT {', '.join(m.fields)} FROM {m.table} WHERE id = :id{live}", {"id": record_id}
    )
    if row is None:
        raise NotFound(f"{model.rstrip('s').replace('_', ' ').capitalize()} {record_id} not found")
    return to_record(row)


def list_handler(model: str) -> Callable[[Request], Any]:
    async def handler(request: Request) -> Response:
        sql, args = list_query(MODELS[model], request.query_params.multi_items())
        rows = await app_state(request).db.fetch_all(sql, args)
        return ok([to_record(r) for r in rows])

    handler.__name__ = f"list_{model}"
    return handler


def get_handler(model: str) -> Callable[[Request], Any]:
    async def handler(request: Request) -> Response:
        return ok(await fetch_record(app_state(request).db, model, request.path_params["id"]))

    handler.__name__ = f"get_{model}"
    return handler


def extract_columns(config: dict[str, Any]) -> dict[str, Any]:
    """An extract configuration as state-file column values."""
    return {
        f.name: state.dumps(config[f.name]) if f.name in state.JSON_COLUMNS else config[f.name]
        for f in EXTRACT_FIELDS
    }


async def create_extract(request: Request) -> Response:
    st = app_state(request)
    config = await validate_extract(st, await read_json_object(request), None)
    extract_id, now = new_id("extract"), now_iso()
    values = extract_columns(config) | {
        "id": extract_id,
        "created_at": now,
        "updated_at": now,
        "next_run_at": await st.runs.next_run_at(config),
    }
    columns = ", ".join(values)
    await st.db.execute(
        f"INSERT INTO extracts ({columns}) VALUES ({', '.join(':' + c for c in values)})", values
    )
    return ok(await fetch_record(st.db, "extracts", extract_id), 201)


async def update_extract(request: Request) -> Response:
    st = app_state(request)
    extract_id = request.path_params["id"]
    current = await fetch_record(st.db, "extracts", extract_id)
    config = await validate_extract(st, await read_json_object(request), current)
    keep = current["next_run_at"] if current["schedule"] == config["schedule"] else None
    values = extract_columns(config) | {
        "updated_at": now_iso(),
        "next_run_at": await st.runs.next_run_at(config, keep),
    }
    assignments = ", ".join(f"{c} = :{c}" for c in values)
    await st.db.execute(
        f"UPDATE extracts SET {assignments} WHERE id = :id AND deleted_at IS NULL",
        values | {"id": extract_id},
    )
    return ok(await fetch_record(st.db, "extracts", extract_id))


async def delete_extract(request: Request) -> Response:
    st = app_state(request)
    extract_id = request.path_params["id"]
    await fetch_record(st.db, "extracts", extract_id)
    now = now_iso()
    # One statement, so a run queued between a check and the update cannot slip through.
    deleted = await st.db.fetch_one(
        "UPDATE extracts SET deleted_at = :now, updated_at = :now, next_run_at = NULL "
        "WHERE id = :id AND deleted_at IS NULL AND NOT EXISTS (SELECT 1 FROM extract_runs "
        f"WHERE extract_id = :id AND status IN {ACTIVE_STATUSES}) RETURNING id",
        {"now": now, "id": extract_id},
    )
    if deleted is None:
        active = await st.db.fetch_val(
            f"SELECT id FROM extract_runs WHERE extract_id = :id AND status IN {ACTIVE_STATUSES}",
            {"id": extract_id},
        )
        raise Conflict(
            f"Extract {extract_id} has an active run {active}; cancel it with "
            f"POST /api/extracts/{extract_id}/cancel before deleting"
        )
    row = await st.db.fetch_one(
        f"SELECT {', '.join(EXTRACT_RECORD_FIELDS)} FROM extracts_with_stats WHERE id = :id",
        {"id": extract_id},
    )
    return ok(to_record(row))


async def delete_run(request: Request) -> Response:
    st = app_state(request)
    run = await fetch_record(st.db, "extract_runs", request.path_params["id"])
    if run["status"] in ACTIVE_STATUSES:
        raise Conflict(
            f"Run {run['id']} is {run['status']}; cancel it with POST "
            f"/api/extracts/{run['extract_id']}/cancel before deleting it"
        )
    if st.runs.worker_holds(run["id"]):  # its last files and rows are still on their way
        raise Conflict(
            f"Run {run['id']} is {run['status']} and its worker is still stopping "
            "(within 2 seconds); retry the delete in a moment"
        )
    try:
        await st.runs.delete_run_files(run["id"])
    except OSError as exc:
        raise ServiceUnavailable(
            f"Cannot delete the files of run {run['id']}: {exc.strerror}; check that "
            "the storage directory (--storage) is writable, then retry"
        ) from None
    return ok(await fetch_record(st.db, "extract_runs", run["id"]))


async def run_extract(request: Request) -> Response:
    st = app_state(request)
    extract = await fetch_record(st.db, "extracts", request.path_params["id"])
    if not extract["enabled"]:
        raise Conflict(
            f"Extract {extract['id']} is disabled; enable it with PUT "
            f'/api/data/extracts/{extract["id"]} and {{"enabled": true}}'
        )
    run_id = await st.runs.queue_run(extract, TriggeredBy.MANUAL)
    if run_id is None:
        active = await st.db.fetch_one(
            f"SELECT id, status FROM extract_runs WHERE extract_id = :id AND status IN {ACTIVE_STATUSES}",
            {"id": extract["id"]},
        )
        if active is None:  # deleted or disabled meanwhile: say which
            return await run_extract(request)
        raise Conflict(
            f"Extract {extract['id']} already has an active run ({active['id']} is "
            f"{active['status']}); wait for it or cancel it with "
            f"POST /api/extracts/{extract['id']}/cancel"
        )
    status_url = f"/api/data/extract_runs/{run_id}"
    return ok(
        {"run_id": run_id, "message": "Extract queued for execution", "status_url": status_url},
        202,
        headers={"Location": status_url},
    )


async def cancel_extract(request: Request) -> Response:
    st = app_state(request)
    extract_id = request.path_params["id"]
    exists = await st.db.fetch_val("SELECT 1 FROM extracts WHERE id = :id", {"id": extract_id})
    if not exists:
        raise NotFound(f"Extract {extract_id} not found")
    run_id = await st.runs.cancel_active(extract_id)
    if run_id is None:
        raise NotFound(f"Extract {extract_id} has no active run to cancel")
    return ok({"message": "Extract cancelled", "run_id": run_id})


async def describe_list(request: Request) -> Response:
    location = app_state(request).settings.source
    return ok(await anyio.to_thread.run_sync(list_schemas, location))


def list_schemas(location: str) -> list[dict[str, Any]]:
    with open_source(location) as source:
        return source.schemas()


async def describe_one(request: Request) -> Response:
    name = request.path_params["schema"]
    location = app_state(request).settings.source
    entry = await anyio.to_thread.run_sync(describe_schema, location, name)
    if entry is None:
        raise NotFound(f"Schema '{name}' not found in the source; GET /api/describe lists them")
    return ok({"name": name, **entry})


def describe_schema(location: str, name: str) -> dict[str, Any] | None:
    with open_source(location) as source:
        if name not in source.names():
            return None
        return source.describe([name])[name]


async def health(request: Request) -> Response:
    return json_response({"status": "ok"})


async def openapi(request: Request) -> Response:
    """Without a valid token, a document that names nothing of the source (SPEC); no 401."""
    st = app_state(request)
    if bearer_problem(request.headers.raw, st.settings.token.encode()) is None:
        document = await st.documents.authenticated()
    else:
        document = st.documents.anonymous()
    return Response(document, media_type="application/json", headers={"Vary": "Authorization"})


def openapi_documents(location: str) -> DocumentCache:
    lists = {
        name: {f: where_schema(t) for f, t in model.fields.items() if t is not FieldType.JSON}
        for name, model in MODELS.items()
    }

    def build(catalog: dict[str, list[str]] | None) -> bytes:
        return orjson.dumps(openapi_document(EXTRACT_FIELDS, lists, catalog))

    def read_catalog() -> dict[str, list[str]] | None:
        try:
            return source_catalog(location)
        except SourceError:
            return None  # the document stays valid; schemas and filter are then described loosely

    return DocumentCache(build, read_catalog)


def source_catalog(location: str) -> dict[str, list[str]]:
    """Every schema of the source with its columns, for the OpenAPI document."""
    with open_source(location) as source:
        return {name: source.columns(name) for name in source.names()}


def route(path: str, **handlers: Callable[[Request], Any]) -> Route:
    """One route per path, dispatching on the method, so a 405 lists every allowed method."""
    allowed = ", ".join(sorted({*handlers, *(["HEAD"] if "GET" in handlers else [])}))

    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        handler = handlers.get(method)
        if handler is None:
            raise MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}",
                headers={"Allow": allowed},
            )
        return await handler(request)

    return Route(path, endpoint, methods=HTTP_METHODS)


HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]


api_routes = [
    route("/data/extracts", GET=list_handler("extracts"), POST=create_extract),
    route("/data/extracts/{id}", GET=get_handler("extracts"), PUT=update_extract, DELETE=delete_extract),
    route("/data/extract_runs", GET=list_handler("extract_runs")),
    route("/data/extract_runs/{id}", GET=get_handler("extract_runs"), DELETE=delete_run),
    route("/data/extract_artifacts", GET=list_handler("extract_artifacts")),
    route("/data/extract_artifacts/{id}", GET=get_handler("extract_artifacts")),
    route("/extracts/{id}/run", POST=run_extract),
    route("/extracts/{id}/cancel", POST=cancel_extract),
    route("/extracts/runs/{id}/download", GET=extracts_downloads.download_run),
    route("/extracts/artifacts/{id}/download", GET=extracts_downloads.download_artifact),
    route("/describe", GET=describe_list),
    route("/describe/{schema:path}", GET=describe_one),
]


def create_app(settings: Settings) -> Starlette:
    """The ASGI app; ``prepare(settings)`` must have run (the CLI does it)."""
    db = state.open_database(settings.db)
    runs = RunManager(db, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await db.connect()
        await runs.start()
        try:
            yield
        finally:
            await runs.stop()
            await state.close_database(db)

    exception_handlers = {
        ApiError: api_error_handler,
        HTTPException: http_exception_handler,
        SourceError: source_error_handler,
    }
    app = Starlette(
        routes=[
            route("/health", GET=health),
            route("/openapi.json", GET=openapi),
            Mount("/api", app=BearerAuth(Router(routes=api_routes), settings.token)),
        ],
        middleware=[Middleware(CatchAll)],
        exception_handlers=exception_handlers,
        lifespan=lifespan,
    )
    app.state.extracts = AppState(settings, db, runs, openapi_documents(settings.source))
    return app


def banner(settings: Settings) -> list[str]:
    url = f"http://{settings.host}:{settings.port}"
    lines = []
    if settings.demo:
        lines.append(
            f"No --source given: serving the demo SQLite database {settings.source} "
            "(users, orders, products, order_items)."
        )
    else:
        lines.append(f"Exporting from {redact(settings.source)}.")
    lines.append(
        f"Extracts listening on {url} — state {settings.db}, storage {settings.storage}, "
        f"{settings.workers} worker(s)."
    )
    if settings.token_generated:
        lines.append(f"Token (kept in {settings.db}.token): {settings.token}")
        lines.append(f"Try: curl -H 'Authorization: Bearer {settings.token}' {url}/api/describe")
    else:
        lines.append(f'Try: curl -H "Authorization: Bearer $EXTRACTS_TOKEN" {url}/api/describe')
    return lines + settings.notes


KEEP_ALIVE_S = 65
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    settings = parse_settings(argv)
    handler = logging.StreamHandler()  # every log line, uvicorn's too, without the source's secrets
    handler.setFormatter(BlankingFormatter(LOG_FORMAT, settings.source))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        prepare(settings)
    except StartupError as exc:
        print(f"extracts-app: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    for line in banner(settings):
        print(line, flush=True)
    # Idle keep-alive connections stay open well past the 5 s that clients such as httpx keep
    # them: with equal timeouts, a request sent as the server closes the socket is lost.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=None,
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
    )


if __name__ == "__main__":
    # Through the module, so that handlers and tests share one copy of its classes.
    import extracts_app

    extracts_app.main()
