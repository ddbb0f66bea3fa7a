"""``GET /openapi.json``: every route with its parameters, bodies, responses and errors.

Built from the same field table that validates extract configurations, so the
document cannot drift from what the API accepts.
"""

from __future__ import annotations

from typing import Any

ERROR_CODES = {
    "400": ("Invalid request: bad field values or filter (VALIDATION_ERROR, with details), or a "
            "body that is not a JSON object (BAD_REQUEST)"),
    "401": "Missing or wrong bearer token (UNAUTHORIZED)",
    "404": "No such record, route or file (RECORD_NOT_FOUND)",
    "405": "Method not allowed on this route (METHOD_NOT_ALLOWED)",
    "409": "The record's state forbids this (CONFLICT)",
    "410": "The artifacts expired or were deleted (GONE)",
    "413": "Body over 1 MiB (PAYLOAD_TOO_LARGE)",
    "415": "Body not sent as application/json (UNSUPPORTED_MEDIA_TYPE)",
    "416": "Range not satisfiable (RANGE_NOT_SATISFIABLE)",
    "500": "Unexpected error (INTERNAL_ERROR)",
    "503": "The state file stayed busy, or the source cannot be read; retry (SERVICE_UNAVAILABLE)",
}

TIMESTAMP = {"type": ["string", "null"], "format": "date-time"}
ERROR = {
    "type": "object",
    "required": ["success", "error", "error_code"],
    "properties": {
        "success": {"const": False},
        "error": {"type": "string"},
        "error_code": {"type": "string", "enum": [
            "VALIDATION_ERROR", "BAD_REQUEST", "UNAUTHORIZED", "RECORD_NOT_FOUND",
            "METHOD_NOT_ALLOWED", "CONFLICT", "GONE", "PAYLOAD_TOO_LARGE",
            "UNSUPPORTED_MEDIA_TYPE", "RANGE_NOT_SATISFIABLE", "INTERNAL_ERROR",
            "SERVICE_UNAVAILABLE"]},
        "details": {"type": "array", "items": {
            "type": "object", "required": ["field", "message"],
            "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}},
    },
}
PROGRESS_DETAIL = {
    "type": "object",
    "properties": {
        "phase": {"type": "string", "enum": ["queued", "exporting_describe", "exported_describe",
                                             "exporting_data", "writing_manifest", "completed",
                                             "failed", "cancelled"]},
        "schemas_total": {"type": "integer"}, "schemas_completed": {"type": "integer"},
        "current_schema": {"type": ["string", "null"]}, "records_exported": {"type": "integer"},
        "records_total": {"type": "integer"},
    },
}
RUN = {
    "type": "object",
    "properties": {
        "id": {"type": "string"}, "extract_id": {"type": "string"},
        "extract_name": {"type": "string"},
        "status": {"type": "string", "enum": ["pending", "queued", "running", "completed",
                                              "failed", "cancelled"]},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "progress_detail": PROGRESS_DETAIL,
        "started_at": TIMESTAMP, "completed_at": TIMESTAMP,
        "duration_seconds": {"type": ["number", "null"]},
        "records_exported": {"type": "integer"}, "schemas_exported": {"type": "integer"},
        "artifacts_created": {"type": "integer"}, "total_size_bytes": {"type": "integer"},
        "error": {"type": ["string", "null"]}, "error_detail": {"type": ["object", "null"]},
        "triggered_by": {"type": "string", "enum": ["manual", "schedule", "api"]},
        "config_snapshot": {"type": "object"},
        "created_at": TIMESTAMP, "updated_at": TIMESTAMP,
    },
}
ARTIFACT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"}, "run_id": {"type": "string"}, "extract_id": {"type": "string"},
        "artifact_type": {"type": "string"}, "artifact_name": {"type": "string"},
        "schema_name": {"type": ["string", "null"]}, "part": {"type": ["integer", "null"]},
        "storage_path": {"type": "string"}, "storage_backend": {"type": "string", "enum": ["local"]},
        "format": {"type": "string"}, "content_type": {"type": "string"},
        "size_bytes": {"type": "integer"}, "records": {"type": ["integer", "null"]},
        "checksum": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "is_primary": {"type": "boolean"}, "created_at": TIMESTAMP, "expires_at": TIMESTAMP,
        "accessed_at": TIMESTAMP, "download_count": {"type": "integer"}, "deleted_at": TIMESTAMP,
    },
}
DESCRIBE_ENTRY = {
    "type": "object",
    "required": ["name", "type", "columns", "primary_key", "foreign_keys", "indexes", "row_count"],
    "properties": {
        "name": {"type": "string"}, "type": {"type": "string", "enum": ["table", "view"]},
        "columns": {"type": "object"}, "primary_key": {"type": "array"},
        "foreign_keys": {"type": "array"}, "indexes": {"type": "array"},
        "row_count": {"type": ["integer", "null"]},
    },
}
SCHEMA_SUMMARY = {
    "type": "object", "required": ["name", "type", "columns", "row_count"],
    "properties": {"name": {"type": "string"}, "type": {"type": "string", "enum": ["table", "view"]},
                   "columns": {"type": "integer"}, "row_count": {"type": ["integer", "null"]}},
}
LIST_PARAMETERS = [
    {"name": "filter[order]", "in": "query", "schema": {"type": "string"},
     "description": "'<field> asc' or '<field> desc'; default newest first"},
    {"name": "filter[limit]", "in": "query",
     "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
    {"name": "filter[offset]", "in": "query", "schema": {"type": "integer", "minimum": 0}},
]
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["success", "data"],
            "properties": {"success": {"const": True}, "data": data}}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def operation(summary: str, ok_status: str, ok_schema: dict[str, Any] | None, errors: list[str],
              parameters: list[dict[str, Any]] | None = None, body: dict[str, Any] | None = None,
              ok_content: dict[str, Any] | None = None, secured: bool = True) -> dict[str, Any]:
    responses: dict[str, Any] = {ok_status: {
        "description": summary,
        "content": ok_content if ok_content is not None else json_content(envelope(ok_schema or {}))}}
    for status in ([*errors, "401", "500"] if secured else errors):
        responses[status] = {"description": ERROR_CODES[status], "content": json_content(ERROR)}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": True, "content": json_content(body)}
    if not secured:
        op["security"] = []
    return op


def openapi_document(fields: tuple[Any, ...]) -> dict[str, Any]:
    """The OpenAPI 3.1 document; ``fields`` is extracts_app.EXTRACT_FIELDS."""
    config_props = {f.name: f.schema for f in fields}
    create_body = {"type": "object", "additionalProperties": False,
                   "required": [f.name for f in fields if f.required], "properties": config_props}
    update_body = {"type": "object", "additionalProperties": False, "properties": config_props}
    extract = {"type": "object", "properties": {
        "id": {"type": "string"}, **config_props, "created_at": TIMESTAMP, "updated_at": TIMESTAMP,
        "deleted_at": TIMESTAMP, "last_run_id": {"type": ["string", "null"]},
        "last_run_status": {"type": ["string", "null"]}, "last_run_at": TIMESTAMP,
        "total_runs": {"type": "integer"}, "successful_runs": {"type": "integer"},
        "failed_runs": {"type": "integer"}, "cancelled_runs": {"type": "integer"},
        "next_run_at": TIMESTAMP}}
    body_errors = ["400", "413", "415"]
    file_content = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    paths = {
        "/health": {"get": operation("Liveness", "200", None, [], secured=False, ok_content=json_content(
            {"type": "object", "properties": {"status": {"const": "ok"}}}))},
        "/openapi.json": {"get": operation("This document", "200", None, [], secured=False,
                                           ok_content=json_content({"type": "object"}))},
        "/api/data/extracts": {
            "get": operation("List extracts", "200", {"type": "array", "items": extract}, ["400"],
                             LIST_PARAMETERS),
            "post": operation("Create an extract", "201", extract, [*body_errors, "503"],
                              body=create_body),
        },
        "/api/data/extracts/{id}": {
            "get": operation("Get an extract", "200", extract, ["404"], [ID]),
            "put": operation("Update an extract (only the fields sent change)", "200", extract,
                             [*body_errors, "404", "503"], [ID], body=update_body),
            "delete": operation("Soft-delete an extract", "200", extract, ["404", "409"], [ID]),
        },
        "/api/data/extract_runs": {"get": operation(
            "List runs", "200", {"type": "array", "items": RUN}, ["400"], LIST_PARAMETERS)},
        "/api/data/extract_runs/{id}": {
            "get": operation("Get a run (status, progress)", "200", RUN, ["404"], [ID]),
            "delete": operation("Delete a run's files", "200", RUN, ["404", "409"], [ID]),
        },
        "/api/data/extract_artifacts": {"get": operation(
            "List artifacts", "200", {"type": "array", "items": ARTIFACT}, ["400"], LIST_PARAMETERS)},
        "/api/data/extract_artifacts/{id}": {
            "get": operation("Get an artifact", "200", ARTIFACT, ["404"], [ID])},
        "/api/extracts/{id}/run": {"post": operation(
            "Queue a run", "202", {"type": "object", "required": ["run_id", "message", "status_url"],
                                   "properties": {"run_id": {"type": "string"},
                                                  "message": {"type": "string"},
                                                  "status_url": {"type": "string"}}},
            ["404", "409"], [ID])},
        "/api/extracts/{id}/cancel": {"post": operation(
            "Cancel the extract's active run", "200",
            {"type": "object", "required": ["message", "run_id"],
             "properties": {"message": {"type": "string"}, "run_id": {"type": "string"}}},
            ["404"], [ID])},
        "/api/extracts/runs/{id}/download": {"get": operation(
            "Download a completed run as a ZIP (Range/If-Range supported when stored)", "200", None,
            ["400", "404", "409", "410", "416"],
            [ID, {"name": "compression", "in": "query",
                  "schema": {"type": "string", "enum": ["stored", "deflate"], "default": "stored"}}],
            ok_content={"application/zip": {"schema": {"type": "string", "format": "binary"}}})},
        "/api/extracts/artifacts/{id}/download": {"get": operation(
            "Download one artifact (Range supported)", "200", None, ["404", "410", "416"], [ID],
            ok_content=file_content)},
        "/api/describe": {"get": operation(
            "List the source's tables and views", "200", {"type": "array", "items": SCHEMA_SUMMARY},
            ["503"])},
        "/api/describe/{schema}": {"get": operation(
            "Describe one table or view", "200", DESCRIBE_ENTRY, ["404", "503"],
            [{"name": "schema", "in": "path", "required": True, "schema": {"type": "string"}}])},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Extracts", "version": "0.1.0",
                 "description": "Export a database into downloadable, checksummed files."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }
