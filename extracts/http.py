"""The HTTP conventions of the SPEC: the JSON envelope, error codes, auth, body limits.

Errors carry their status and code (``raise NotFound(...)``); one handler turns
them into ``{"success": false, "error", "error_code"[, "details"]}``. Anything
unexpected is logged with its traceback and answered with a generic 500.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from types import FrameType
from typing import Any

import orjson
import uvicorn
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from executor.credentials import blank, source_secrets
from executor.filters import DuplicateKey, loads_exact
from extracts.storage import FileChangedError, StorageError

log = logging.getLogger("extracts")

MAX_BODY_BYTES = 1 << 20


class ResponseCut(Exception):
    """A response whose storage failed after its headers were sent; ``CatchAll`` logged it in
    one line, and raising it makes uvicorn close the connection (the client sees a short body)."""


class CutByStop(logging.Filter):
    """A response uvicorn cut at a graceful stop is logged in one line, not as a crash.

    Past its graceful-stop timeout uvicorn cancels the responses still being sent (a
    client downloading slowly, or not reading at all) and logs each cancellation as an
    "Exception in ASGI application" with a traceback; it is the stop working, and a cut
    download resumes with Range. A ``ResponseCut`` was logged already: uvicorn's record
    of it is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error" and record.exc_info and isinstance(record.exc_info[1], ResponseCut):
            return False
        cut = record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError)
        if cut and record.name == "uvicorn.error":
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = (
                "a response still being sent was cut by the stop; a download resumes with Range",
                (),
            )
            record.exc_info = record.exc_text = None
        return True


class OneStop(uvicorn.Server):
    """uvicorn's server, where a second Ctrl-C does not skip the service's stop.

    uvicorn "force quits" on a second SIGINT: it skips the app's lifespan stop, then
    cancels it on the way out, so the worker pool's stop ran with its message consumer
    already cancelled (a 20 s wait for messages never applied) and ended in a logged
    traceback. The stop is bounded anyway (``timeout_graceful_shutdown`` cuts the
    responses still being sent), so every signal after the first is ignored.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            super().handle_exit(sig, frame)


class ApiError(Exception):
    """An error with its HTTP status and error_code, rendered as the JSON envelope."""

    status = 400
    code = "BAD_REQUEST"

    def __init__(
        self, message: str, details: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers


class BadRequest(ApiError):
    """The body is not a JSON object, or a query parameter is malformed."""


class ValidationFailed(ApiError):
    """One or more fields have bad values; details names each."""

    code = "VALIDATION_ERROR"


class Unauthorized(ApiError):
    """Missing or wrong bearer token."""

    status, code = 401, "UNAUTHORIZED"


class NotFound(ApiError):
    """No such record, route or file."""

    status, code = 404, "RECORD_NOT_FOUND"


class MethodNotAllowed(ApiError):
    """The route exists but not with this method."""

    status, code = 405, "METHOD_NOT_ALLOWED"


class Conflict(ApiError):
    """The record's state forbids the action (disabled, already running, active run)."""

    status, code = 409, "CONFLICT"


class Gone(ApiError):
    """The artifacts expired or were deleted."""

    status, code = 410, "GONE"


class PayloadTooLarge(ApiError):
    """Body over 1 MiB."""

    status, code = 413, "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(ApiError):
    """A body that is not sent as application/json."""

    status, code = 415, "UNSUPPORTED_MEDIA_TYPE"


class PreconditionFailed(ApiError):
    """If-Match names no current ETag of the download."""

    status, code = 412, "PRECONDITION_FAILED"


class RangeNotSatisfiable(ApiError):
    """The one byte range asked for selects no byte of the body."""

    status, code = 416, "RANGE_NOT_SATISFIABLE"


class ServiceUnavailable(ApiError):
    """The state file stayed busy, or the source cannot be read; retry."""

    status, code = 503, "SERVICE_UNAVAILABLE"


class InternalError(ApiError):
    """Unexpected error; the service log has its traceback."""

    status, code = 500, "INTERNAL_ERROR"


def error_kinds() -> list[type[ApiError]]:
    """Every error the API answers with, by status then code: what the OpenAPI document lists."""
    kinds, todo = [], ApiError.__subclasses__()
    while todo:
        kind = todo.pop()
        kinds.append(kind)
        todo += kind.__subclasses__()
    return sorted(kinds, key=lambda kind: (kind.status, kind.code))


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, headers=headers, media_type="application/json")


def ok(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return json_response({"success": True, "data": data}, status, headers)


def error_response(exc: ApiError) -> Response:
    body: dict[str, Any] = {"success": False, "error": exc.message, "error_code": exc.code}
    if exc.details is not None:
        body["details"] = exc.details
    return json_response(body, exc.status, exc.headers)


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def source_error_handler(request: Request, exc: Exception) -> Response:
    """The source went away (file removed, server down): 503, the service itself is fine."""
    reason = blank(str(exc), source_secrets(request.app.state.extracts.settings.source))
    return error_response(
        ServiceUnavailable(
            f"The source database cannot be read: {reason}; retry when it is back",
            headers={"Retry-After": "5"},
        )
    )


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown route, wrong method) in the envelope."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(
            MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}", headers=exc.headers)
        )
    if exc.status_code == 404:
        return error_response(NotFound(f"No route {request.method} {request.url.path}"))
    return error_response(ApiError(str(exc.detail)))


class CatchAll:
    """Answers any unexpected exception with a generic 500 envelope, logged with its traceback.

    A client that closed its connection (before sending the body it announced) is one
    line in the log, and gets no answer: it is not there to read one.

    State that stays busy (a locked SQLite file past its busy timeout, a PostgreSQL
    connection lost or a lock not granted: ``busy``) becomes a 503 the client may retry.
    """

    def __init__(self, app: ASGIApp, busy: Callable[[BaseException], bool]) -> None:
        self.app, self.busy = app, busy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:  # gone before its body was read, or mid-response: no one to answer
            log.info(
                "the client closed the connection before the response: %s %s", scope["method"], scope["path"]
            )
        except Exception as exc:  # noqa: BLE001 — the last line of defence
            if started and isinstance(exc, (StorageError, FileChangedError, OSError)):
                # The storage failed midway through a download (the object store gone, a file
                # changed): one line, and the connection closes; the client resumes with Range.
                log.warning(
                    "%s %s: cut after the headers were sent, the client gets a short body: %s",
                    scope["method"],
                    scope["path"],
                    " ".join(str(exc).split()),
                )
                raise ResponseCut(str(exc)) from None
            if started:
                log.exception("error after the response started: %s %s", scope["method"], scope["path"])
                raise
            if self.busy(exc):
                log.warning("state busy (%s): %s %s", exc, scope["method"], scope["path"])
                response = error_response(
                    ServiceUnavailable(
                        "The service's state database is busy; retry in a few seconds",
                        headers={"Retry-After": "2"},
                    )
                )
            else:
                log.exception("unhandled error: %s %s", scope["method"], scope["path"])
                response = error_response(InternalError("Internal error; see the service log"))
            await response(scope, receive, send)


def bearer_problem(headers: list[tuple[bytes, bytes]], token: bytes) -> str | None:
    """Why ``headers`` do not carry exactly one valid bearer token (constant-time); None if they do."""
    given = [value for name, value in headers if name.lower() == b"authorization"]
    if not given:
        return "Missing bearer token"
    if len(given) > 1:  # which one would count? Refused whichever is valid, as no client sends two
        return "More than one Authorization header"
    scheme, _, credentials = given[0].partition(b" ")
    credentials = credentials.strip()
    if scheme.lower() != b"bearer" or not credentials or not hmac.compare_digest(credentials, token):
        return "Invalid bearer token"
    return None


class BearerAuth:
    """Every ``/api`` route requires one ``Authorization: Bearer <token>`` header."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = bearer_problem(scope.get("headers", []), self.token)
        if problem is not None:
            response = error_response(
                Unauthorized(
                    f"{problem}; send one header Authorization: Bearer <token>",
                    headers={"WWW-Authenticate": 'Bearer realm="extracts"'},
                )
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def query_param(request: Request, name: str, default: str) -> str:
    """A query parameter that means one value: 400 naming it when it is given more than once."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        message = f"{name} is given more than once; give it once"
        raise ValidationFailed(message, [{"field": name, "message": message}])
    return values[0] if values else default


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words (a client never wrote ``NoneType`` or ``list``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object: 415 wrong type, 413 over 1 MiB, 400 not an object."""
    content_types = request.headers.getlist("content-type")
    if len(content_types) > 1:  # the first or the last? Either reading could be the wrong one
        raise BadRequest(f"Send one Content-Type header, not {len(content_types)}")
    content_type = "".join(content_types).split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"Send the body as JSON with Content-Type: application/json (got {content_type or 'none'})"
        )
    # uvicorn's h11 has checked Content-Length; still, no int() of thousands of digits here.
    declared = request.headers.get("content-length", "").lstrip("0")
    if (
        declared.isascii()
        and declared.isdigit()
        and (len(declared) > len(str(MAX_BODY_BYTES)) or int(declared) > MAX_BODY_BYTES)
    ):
        raise PayloadTooLarge(f"The body is over {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"The body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = loads_exact(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}") from exc
    except DuplicateKey as exc:
        raise BadRequest(f"The body is ambiguous: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"The body must be a JSON object, not {json_kind(body)}")
    return body
