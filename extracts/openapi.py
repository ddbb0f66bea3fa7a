"""``GET /openapi.json``: every route with its parameters, bodies, responses and errors.

Built from the route table and the same field tables that validate, so the
document cannot drift from what the API accepts. Two documents: the anonymous one
names nothing of the source; a valid token gets the source's schemas and columns
(SPEC: Starting it). ``catalog.DocumentCache`` keeps both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from executor.filters import MAX_LIST, MAX_OPERANDS
from executor.messages import Phase, RunStatus
from extracts.config import EXTRACT_FIELDS
from extracts.http import error_kinds
from extracts.records import ARTIFACT_FIELDS, MAX_OFFSET, MODELS, RUN_FIELDS, where_schema
from extracts.state import FieldType, TriggeredBy
from extracts.storage import OBJECT_SCHEMES

TIMESTAMP = {"type": ["string", "null"], "format": "date-time"}
ERROR = {
    "type": "object",
    "required": ["success", "error", "error_code"],
    "properties": {
        "success": {"const": False},
        "error": {"type": "string"},
        "error_code": {"type": "string", "enum": sorted({kind.code for kind in error_kinds()})},
        "details": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}
PROGRESS_DETAIL = {
    "type": "object",
    "properties": {
        "phase": {"type": "string", "enum": [phase.value for phase in Phase]},
        "schemas_total": {"type": "integer"},
        "schemas_completed": {"type": "integer"},
        "current_schema": {"type": ["string", "null"]},
        "records_exported": {"type": "integer"},
        "records_total": {"type": "integer"},
    },
}
JSON_TYPES = {
    FieldType.TEXT: {"type": "string"},
    FieldType.INTEGER: {"type": "integer"},
    FieldType.NUMBER: {"type": "number"},
    FieldType.BOOLEAN: {"type": "boolean"},
    FieldType.TIMESTAMP: TIMESTAMP,
    FieldType.JSON: {"type": "object"},
}


def record_schema(
    fields: dict[str, FieldType], nullable: set[str], exact: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """A record's schema from its field table: ``nullable`` fields may be null, ``exact`` says more."""
    properties = {}
    for name, kind in fields.items():
        schema = exact.get(name, JSON_TYPES[kind])
        if name in nullable:
            schema = {**schema, "type": [schema["type"], "null"]}
        properties[name] = schema
    return {"type": "object", "properties": properties}


RUN = record_schema(
    RUN_FIELDS,
    {"duration_seconds", "error", "error_detail", "retry_of", "retry_run_id", "instance_id"},
    {
        "status": {"type": "string", "enum": [status.value for status in RunStatus]},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "progress_detail": PROGRESS_DETAIL,
        "triggered_by": {"type": "string", "enum": [trigger.value for trigger in TriggeredBy]},
    },
)
ARTIFACT = record_schema(
    ARTIFACT_FIELDS,
    {"schema_name", "part", "records"},
    {
        "storage_backend": {"type": "string", "enum": ["local", *sorted(set(OBJECT_SCHEMES.values()))]},
        "checksum": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    },
)


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A record schema whose every property is present and no other (responses are exact)."""
    return {**schema, "required": list(schema["properties"]), "additionalProperties": False}


INSTANCE = strict(
    {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "host": {"type": "string"},
            "pid": {"type": "integer"},
            "started_at": TIMESTAMP,
            "heartbeat_at": TIMESTAMP,
            "workers": {"type": "integer"},
            "active_runs": {"type": "integer"},
        },
    }
)
DESCRIBE_ENTRY = {
    "type": "object",
    "required": ["name", "type", "columns", "primary_key", "foreign_keys", "indexes", "row_count"],
    "properties": {
        "name": {"type": "string"},
        "type": {"type": "string", "enum": ["table", "view"]},
        "columns": {"type": "object"},
        "primary_key": {"type": "array"},
        "foreign_keys": {"type": "array"},
        "indexes": {"type": "array"},
        "row_count": {"type": ["integer", "null"]},
    },
}
SCHEMA_SUMMARY = {
    "type": "object",
    "required": ["name", "type", "columns", "row_count"],
    "properties": {
        "name": {"type": "string"},
        "type": {"type": "string", "enum": ["table", "view"]},
        "columns": {"type": "integer"},
        "row_count": {"type": ["integer", "null"]},
    },
}
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
DOWNLOAD_HEADERS = [  # RFC 9110 sections 13-14, as extracts.ranges reads them
    {
        "name": "Range",
        "in": "header",
        "schema": {"type": "string"},
        "description": "One range, bytes=<first>-[<last>] or bytes=-<suffix length>, on GET: 206 with "
        "Content-Range. 416 when it starts at or past the end (or asks for the last 0 "
        "bytes). Ignored, and the whole body sent (200), when it is not valid bytes= "
        "syntax (a last before its first included), when it holds more than one range "
        "(no multipart/byteranges), when it is sent twice, and on HEAD",
    },
    {
        "name": "If-Range",
        "in": "header",
        "schema": {"type": "string"},
        "description": "The ETag of the first response: the range is served only while it matches "
        "(strong comparison; a date or a second If-Range never matches: 200, whole)",
    },
    {
        "name": "If-None-Match",
        "in": "header",
        "schema": {"type": "string"},
        "description": "ETags of copies the client holds, or *: 304 when one is current (weak comparison)",
    },
    {
        "name": "If-Match",
        "in": "header",
        "schema": {"type": "string"},
        "description": "ETags the client expects, or *: 412 when none is current (strong comparison)",
    },
]
SCALAR = {"type": ["string", "number", "boolean"]}
LIST_OPERAND = {"type": "array", "minItems": 1, "maxItems": MAX_LIST, "items": SCALAR}
# One column's condition in a filter's "where" (SPEC: Extract configurations, Filters).
CONDITION = {
    "anyOf": [
        {"type": ["string", "number", "boolean", "null"]},
        {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {
                "$eq": {"type": ["string", "number", "boolean", "null"]},
                "$ne": {"type": ["string", "number", "boolean", "null"]},
                "$gt": SCALAR,
                "$gte": SCALAR,
                "$lt": SCALAR,
                "$lte": SCALAR,
                "$in": LIST_OPERAND,
                "$nin": LIST_OPERAND,
                "$like": {"type": "string"},
                "$null": {"type": "boolean"},
            },
        },
    ]
}
CONDITION_REF = {"$ref": "#/components/schemas/Condition"}
FILTER_RULES = (
    f"At most {MAX_LIST} values in one $in or $nin, and {MAX_OPERANDS} values in all in "
    "one schema's where. A filter may name only schemas the extract exports: on POST, "
    "those in `schemas` when it is given; on PUT, those in `schemas` as sent or, when "
    "not sent, as stored."
)


def _error_codes() -> dict[str, str]:
    """Each error status with what its codes mean, from the error classes themselves."""
    described: dict[str, dict[str, str]] = {}
    for kind in error_kinds():
        described.setdefault(str(kind.status), {}).setdefault(kind.code, (kind.__doc__ or "").strip())
    return {
        status: "; ".join(f"{doc.rstrip('.')} ({code})" for code, doc in codes.items())
        for status, codes in described.items()
    }


ERROR_CODES = _error_codes()


def list_parameters(fields: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``filter[...]`` query parameters of a record list: ``fields`` maps each filterable field
    to the schema of its ``filter[where]`` value."""
    orders = [f"{f}{d}" for f in fields for d in ("", " asc", " desc")]
    return [
        {
            "name": "filter[order]",
            "in": "query",
            "schema": {"type": "string", "enum": orders},
            "description": "'<field> asc' or '<field> desc'; default newest first",
        },
        {
            "name": "filter[limit]",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
        },
        {
            "name": "filter[offset]",
            "in": "query",
            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
        },
        *(
            {
                "name": f"filter[where][{f}]",
                "in": "query",
                "schema": schema,
                "description": f"{f} equals this value ('null': {f} is null); give each parameter once",
            }
            for f, schema in fields.items()
        ),
    ]


def catalog_schemas(catalog: dict[str, list[str]] | None) -> dict[str, dict[str, Any]]:
    """``schemas`` and ``filter`` as precise as the source allows: names and columns that exist."""
    if not catalog:
        return {}
    names = sorted(catalog)
    where = {
        name: {
            "type": "object",
            "additionalProperties": False,
            "properties": dict.fromkeys(columns, CONDITION_REF),
        }
        for name, columns in catalog.items()
    }
    return {
        "schemas": {
            "type": ["array", "null"],
            "minItems": 1,
            "uniqueItems": True,
            "items": {"type": "string", "enum": names},
        },
        "filter": {
            "type": ["object", "null"],
            "minProperties": 1,
            "additionalProperties": False,
            "description": FILTER_RULES,
            "properties": {
                name: {
                    "type": "object",
                    "required": ["where"],
                    "additionalProperties": False,
                    "properties": {"where": where[name]},
                }
                for name in names
            },
        },
    }


def envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["success", "data"],
        "properties": {"success": {"const": True}, "data": data},
    }


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def operation(
    summary: str,
    ok_status: str,
    ok_schema: dict[str, Any] | None,
    errors: list[str],
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    ok_content: dict[str, Any] | None = None,
    secured: bool = True,
    partial: dict[str, Any] | None = None,
    ok_headers: dict[str, Any] | None = None,
    redirects: bool = False,
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        ok_status: {
            "description": summary,
            "content": ok_content if ok_content is not None else json_content(envelope(ok_schema or {})),
        }
    }
    if ok_headers:
        responses[ok_status]["headers"] = ok_headers
    if partial is not None:  # a download: a slice of the file, not parseable as its content type says
        responses["206"] = {"description": f"The requested byte range, as one of: {', '.join(partial)}"}
        etag = {"ETag": {"required": True, "schema": {"type": "string"}}}
        responses["304"] = {"description": "If-None-Match names the current ETag: no body", "headers": etag}
    if redirects:
        responses["307"] = {
            "description": "redirect=true: the file at a URL the object store signed",
            "headers": {"Location": {"required": True, "schema": {"type": "string"}}},
        }
    for status in [*errors, "401", "500", "503"] if secured else errors:
        responses[status] = {"description": ERROR_CODES[status], "content": json_content(ERROR)}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": True, "content": json_content(body)}
    if not secured:
        op["security"] = []
    return op


def paths_of(routes: Sequence[tuple[str, str, str]], operations: dict[str, Any]) -> dict[str, Any]:
    """The document's paths: every route of the app, each method by its handler's operation."""
    paths: dict[str, dict[str, Any]] = {}
    for path, method, handler in routes:
        paths.setdefault(re.sub(r"{(\w+):\w+}", r"{\1}", path), {})[method.lower()] = operations[handler]
    return paths


def openapi_document(
    routes: Sequence[tuple[str, str, str]], catalog: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (path, method, handler name: the app's route table).

    The extract body comes from ``config.EXTRACT_FIELDS``, the list parameters from
    ``records.MODELS``; ``catalog`` maps the source's schemas to their columns, so that
    ``schemas`` and ``filter`` list what exists (only in the document a valid token gets).
    """
    fields = EXTRACT_FIELDS
    lists = {
        name: {f: where_schema(t) for f, t in model.fields.items() if t is not FieldType.JSON}
        for name, model in MODELS.items()
    }
    config_props = {f.name: f.schema for f in fields}
    body_props = config_props | {"filter": {**config_props.get("filter", {}), "description": FILTER_RULES}}
    body_props |= catalog_schemas(catalog)
    # The rule that a filter names only exported schemas spans two fields: JSON Schema can say
    # it only as one anyOf per schema of the source, from which schemathesis cannot generate
    # past three schemas. FILTER_RULES says it in words.
    create_body = {
        "type": "object",
        "additionalProperties": False,
        "required": [f.name for f in fields if f.required],
        "properties": body_props,
        # schedule_enabled needs a schedule (the current one, on PUT)
        "if": {"required": ["schedule_enabled"], "properties": {"schedule_enabled": {"const": True}}},
        "then": {"required": ["schedule"], "properties": {"schedule": {"type": "string"}}},
    }
    update_body = {"type": "object", "additionalProperties": False, "properties": body_props}
    # What the service stores was valid when saved, by the rules of the day: responses are not
    # held to today's patterns and lengths.
    stored_props = {
        name: {k: v for k, v in schema.items() if k not in ("pattern", "maxLength")}
        for name, schema in config_props.items()
    }
    extract = strict(
        {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                **stored_props,
                "created_at": TIMESTAMP,
                "updated_at": TIMESTAMP,
                "deleted_at": TIMESTAMP,
                "last_run_id": {"type": ["string", "null"]},
                "last_run_status": {"type": ["string", "null"]},
                "last_run_at": TIMESTAMP,
                "total_runs": {"type": "integer"},
                "successful_runs": {"type": "integer"},
                "failed_runs": {"type": "integer"},
                "cancelled_runs": {"type": "integer"},
                "next_run_at": TIMESTAMP,
            },
        }
    )
    body_errors = ["400", "413", "415"]
    binary: dict[str, Any] = {"schema": {}}  # any bytes: a manifest.json is JSON, a .gz is not
    file_content = dict.fromkeys(
        (
            "application/yaml",
            "application/x-ndjson",
            "application/json",
            "application/gzip",
            "application/x-tar",
        ),
        binary,
    )
    zip_content = {"application/zip": binary}
    operations = {
        "health": operation(
            "Liveness",
            "200",
            None,
            [],
            secured=False,
            ok_content=json_content({"type": "object", "properties": {"status": {"const": "ok"}}}),
        ),
        "openapi": operation(
            "This document; with a valid bearer token it also lists the source's schemas and columns",
            "200",
            None,
            [],
            secured=False,
            ok_content=json_content({"type": "object"}),
        ),
        "index": operation(
            "The web page (public: it holds no data and calls /api with the token pasted into it)",
            "200",
            None,
            [],
            secured=False,
            ok_content={"text/html": binary},
        ),
        "asset": operation(
            "The web page's script, stylesheet and icon (app.js, app.css, icon.svg)",
            "200",
            None,
            ["404"],
            [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            secured=False,
            ok_content=dict.fromkeys(("text/javascript", "text/css", "image/svg+xml"), binary),
        ),
        "metrics": operation(
            "Prometheus metrics (text format; OpenMetrics when the Accept header asks for it)",
            "200",
            None,
            [],
            ok_content=dict.fromkeys(("text/plain", "application/openmetrics-text"), binary),
        ),
        "list_extracts": operation(
            "List extracts",
            "200",
            {"type": "array", "items": extract},
            ["400"],
            list_parameters(lists.get("extracts", ())),
        ),
        "create_extract": operation(
            "Create an extract", "201", extract, [*body_errors, "503"], body=create_body
        ),
        "get_extracts": operation("Get an extract", "200", extract, ["404"], [ID]),
        "update_extract": operation(
            "Update an extract (only the fields sent change)",
            "200",
            extract,
            [*body_errors, "404", "503"],
            [ID],
            body=update_body,
        ),
        "delete_extract": operation("Soft-delete an extract", "200", extract, ["404", "409"], [ID]),
        "list_extract_runs": operation(
            "List runs",
            "200",
            {"type": "array", "items": strict(RUN)},
            ["400"],
            list_parameters(lists.get("extract_runs", ())),
        ),
        "get_extract_runs": operation("Get a run (status, progress)", "200", strict(RUN), ["404"], [ID]),
        "delete_run": operation("Delete a run's files", "200", strict(RUN), ["404", "409"], [ID]),
        "list_extract_artifacts": operation(
            "List artifacts",
            "200",
            {"type": "array", "items": strict(ARTIFACT)},
            ["400"],
            list_parameters(lists.get("extract_artifacts", ())),
        ),
        "get_extract_artifacts": operation("Get an artifact", "200", strict(ARTIFACT), ["404"], [ID]),
        "start_run": operation(
            "Queue a run",
            "202",
            {
                "type": "object",
                "required": ["run_id", "message", "status_url"],
                "properties": {
                    "run_id": {"type": "string"},
                    "message": {"type": "string"},
                    "status_url": {"type": "string"},
                },
            },
            ["404", "409"],
            [ID],
            ok_headers={
                "Location": {
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "the status_url",
                }
            },
        ),
        "cancel_run": operation(
            "Cancel the extract's active run",
            "200",
            {
                "type": "object",
                "required": ["message", "run_id"],
                "properties": {"message": {"type": "string"}, "run_id": {"type": "string"}},
            },
            ["404"],
            [ID],
        ),
        "download_run": operation(
            "Download a completed run as a ZIP (Range/If-Range supported when stored)",
            "200",
            None,
            ["400", "404", "409", "410", "412", "416"],
            [
                ID,
                {
                    "name": "compression",
                    "in": "query",
                    "schema": {"type": "string", "enum": ["stored", "deflate"], "default": "stored"},
                },
                *DOWNLOAD_HEADERS,
            ],
            ok_content=zip_content,
            partial=zip_content,
        ),
        "download_artifact": operation(
            "Download one artifact (Range supported)",
            "200",
            None,
            ["400", "404", "410", "412", "416"],
            [
                ID,
                {
                    "name": "redirect",
                    "in": "query",
                    "schema": {"type": "string", "enum": ["true", "false"], "default": "false"},
                    "description": "true: 307 to a URL the object store signed (valid 15 minutes); "
                    "400 where the storage cannot sign (a local directory)",
                },
                *DOWNLOAD_HEADERS,
            ],
            ok_content=file_content,
            partial=file_content,
            redirects=True,
        ),
        "list_instances": operation(
            "The instances serving this state (with PostgreSQL state, several), live ones only",
            "200",
            {"type": "array", "items": INSTANCE},
            [],
        ),
        "describe_list": operation(
            "List the source's tables and views",
            "200",
            {"type": "array", "items": SCHEMA_SUMMARY},
            ["503"],
        ),
        "describe_one": operation(
            "Describe one table or view",
            "200",
            DESCRIBE_ENTRY,
            ["404", "503"],
            [{"name": "schema", "in": "path", "required": True, "schema": {"type": "string"}}],
        ),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Extracts",
            "version": "0.1.0",
            "description": "Export a database into downloadable, checksummed files.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Condition": CONDITION},
        },
        "security": [{"bearer": []}],
        "paths": paths_of(routes, operations),
    }
