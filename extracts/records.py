"""Records: the fields of each record list, how a state row becomes a record, and list queries.

``/api/data/<model>`` lists and reads extracts, runs and artifacts. Each model
names its fields with their types (``FieldType``) in one place: it drives the
columns selected, how a row is shown (JSON text parsed, 0/1 as booleans), which
fields a list may filter and order on and how a ``filter[where]`` value is read,
and the OpenAPI description of those parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from databases import Database

from extracts.config import EXTRACT_FIELDS, NUL_FREE, READ_ONLY_FIELDS, anchored
from extracts.http import NotFound, ValidationFailed
from extracts.state import FieldType

_T = FieldType
# The fields of a run record and of an artifact record, in order, with their types.
RUN_FIELDS = {
    "id": _T.TEXT,
    "extract_id": _T.TEXT,
    "extract_name": _T.TEXT,
    "status": _T.TEXT,
    "progress": _T.INTEGER,
    "progress_detail": _T.JSON,
    "started_at": _T.TIMESTAMP,
    "completed_at": _T.TIMESTAMP,
    "duration_seconds": _T.NUMBER,
    "records_exported": _T.INTEGER,
    "schemas_exported": _T.INTEGER,
    "artifacts_created": _T.INTEGER,
    "total_size_bytes": _T.INTEGER,
    "error": _T.TEXT,
    "error_detail": _T.JSON,
    "triggered_by": _T.TEXT,
    "config_snapshot": _T.JSON,
    "created_at": _T.TIMESTAMP,
    "updated_at": _T.TIMESTAMP,
    "attempt": _T.INTEGER,
    "retry_of": _T.TEXT,
    "retry_run_id": _T.TEXT,
    "not_before": _T.TIMESTAMP,
    "instance_id": _T.TEXT,
    "lease_expires_at": _T.TIMESTAMP,
}
ARTIFACT_FIELDS = {
    "id": _T.TEXT,
    "run_id": _T.TEXT,
    "extract_id": _T.TEXT,
    "artifact_type": _T.TEXT,
    "artifact_name": _T.TEXT,
    "schema_name": _T.TEXT,
    "part": _T.INTEGER,
    "storage_path": _T.TEXT,
    "storage_backend": _T.TEXT,
    "format": _T.TEXT,
    "content_type": _T.TEXT,
    "size_bytes": _T.INTEGER,
    "records": _T.INTEGER,
    "checksum": _T.TEXT,
    "is_primary": _T.BOOLEAN,
    "created_at": _T.TIMESTAMP,
    "expires_at": _T.TIMESTAMP,
    "accessed_at": _T.TIMESTAMP,
    "download_count": _T.INTEGER,
    "deleted_at": _T.TIMESTAMP,
}


@dataclass(frozen=True)
class Model:
    """A table (or view) behind ``/api/data/<name>`` and its fields with their types."""

    table: str
    fields: dict[str, FieldType]
    live_only: bool = False


# The fields of an extract record, in order, with their types.
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


# How a state row becomes a record: by the types of the fields every model names.
JSON_COLUMNS = {f for m in MODELS.values() for f, t in m.fields.items() if t is FieldType.JSON}
BOOL_COLUMNS = {f for m in MODELS.values() for f, t in m.fields.items() if t is FieldType.BOOLEAN}


def to_record(row: Any) -> dict[str, Any]:
    """A state row as the API shows it: JSON columns parsed, booleans as booleans."""
    record = {}
    for key, value in dict(row._mapping).items():
        if key in JSON_COLUMNS and value is not None:
            value = orjson.loads(value)
        elif key in BOOL_COLUMNS and value is not None:
            value = bool(value)
        record[key] = value
    return record


async def fetch_record(db: Database, model: str, record_id: str) -> dict[str, Any]:
    """One record of ``model`` (live extracts only); 404 naming it."""
    m = MODELS[model]
    live = " AND deleted_at IS NULL" if m.live_only else ""
    row = await db.fetch_one(
        f"SELECT {', '.join(m.fields)} FROM {m.table} WHERE id = :id{live}", {"id": record_id}
    )
    if row is None:
        raise NotFound(f"{model.rstrip('s').replace('_', ' ').capitalize()} {record_id} not found")
    return to_record(row)
