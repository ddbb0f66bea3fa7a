"""An extract's configuration: one table of fields drives validation, defaults and OpenAPI.

Each ``ExtractField`` names its check, default and JSON Schema; the record's
read-only fields are listed beside them. ``validate_extract`` applies a body to
the stored configuration (or to the defaults) and answers 400 naming every bad
field at once; what only the source can tell (schema names, filter columns) is
asked of the ``Catalog``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from extracts.cron import CRON, SCHEDULE_MAX, backwards_ranges, next_due
from extracts.http import ValidationFailed
from extracts.state import FieldType, dumps, utcnow


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
    backwards = backwards_ranges(v)
    if backwards:
        raise FieldError("; ".join(backwards))
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
    ExtractField("max_attempts", _integer(1, 10), 3, {"type": "integer", "minimum": 1, "maximum": 10}),
    ExtractField(
        "retry_delay_seconds",
        _integer(1, 86_400),
        60,
        {"type": "integer", "minimum": 1, "maximum": 86_400},
    ),
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


SourceCheck = Callable[[list[str] | None, dict[str, Any] | None], Awaitable[list[dict[str, str]]]]


async def validate_extract(
    body: dict[str, Any], current: dict[str, Any] | None, check_source: SourceCheck
) -> dict[str, Any]:
    """The configuration after applying ``body`` to ``current`` (None: create); 400 lists every bad field.

    ``check_source(schemas, filter)`` names what the source refuses (``Catalog.check``).
    """
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
                "message": "schedule is required when schedule_enabled is true: "
                "give a 5-field cron expression",
            }
        )
    schedule = values.get("schedule")
    if schedule is not None and await anyio.to_thread.run_sync(next_due, schedule, utcnow()) is None:
        details.append(
            {"field": "schedule", "message": f"schedule '{schedule}' never comes due: no date matches it"}
        )
    if not bad & {"schemas", "filter"} and ("schemas" in values or "filter" in values):
        details += await check_source(merged["schemas"], merged["filter"])
    elif "schemas" in values:  # the filter is bad: the schema names can still be checked
        details += await check_source(values["schemas"], None)
    elif values.get("filter"):  # the schemas are bad: the filter's schemas and columns can still be
        checked = await check_source(list(values["filter"]), values["filter"])
        details += [d for d in checked if d["field"] != "schemas"]
    if details:
        fields = ", ".join(dict.fromkeys(d["field"] for d in details))
        raise ValidationFailed(f"Invalid extract configuration: {fields}", details)
    return merged


def extract_columns(config: dict[str, Any]) -> dict[str, Any]:
    """An extract configuration as state-file column values."""
    return {
        f.name: dumps(config[f.name]) if f.type is FieldType.JSON else config[f.name] for f in EXTRACT_FIELDS
    }
