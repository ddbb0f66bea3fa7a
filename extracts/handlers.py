"""The JSON API's handlers: extracts, runs, artifacts, the describe API, health and /openapi.json.

Plain ``async def handler(request) -> Response`` functions; ``extracts_app``
lists them in its route table. What they share is ``Service`` (the app's
state). Downloads have their own module (``downloads``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from databases import Database
from starlette.requests import Request
from starlette.responses import Response

from executor.messages import ACTIVE_STATUSES, RunStatus
from extracts.catalog import Catalog, DocumentCache
from extracts.config import extract_columns, validate_extract
from extracts.http import (
    Conflict,
    NotFound,
    ServiceUnavailable,
    bearer_problem,
    json_response,
    ok,
    read_json_object,
)
from extracts.instances import Instance
from extracts.pool import WorkerPool
from extracts.records import EXTRACT_RECORD_FIELDS, MODELS, fetch_record, list_query, to_record
from extracts.runs import ACTIVE, Runs
from extracts.schedule import next_run_at
from extracts.settings import Settings
from extracts.state import TriggeredBy, iso, new_id, now_iso, parse_iso
from extracts.storage import Storage, StorageError


@dataclass
class Service:
    """What the handlers share: settings, state, storage, the source's catalog, runs and workers."""

    settings: Settings
    db: Database
    storage: Storage
    catalog: Catalog
    runs: Runs
    pool: WorkerPool
    documents: DocumentCache
    instance: Instance
    clock: Callable[[], datetime]


def service(request: Request) -> Service:
    return request.app.state.extracts


def list_handler(model: str) -> Callable[[Request], Any]:
    async def handler(request: Request) -> Response:
        sql, args = list_query(MODELS[model], request.query_params.multi_items())
        rows = await service(request).db.fetch_all(sql, args)
        return ok([to_record(r) for r in rows])

    handler.__name__ = f"list_{model}"
    return handler


def get_handler(model: str) -> Callable[[Request], Any]:
    async def handler(request: Request) -> Response:
        return ok(await fetch_record(service(request).db, model, request.path_params["id"]))

    handler.__name__ = f"get_{model}"
    return handler


async def create_extract(request: Request) -> Response:
    st = service(request)
    config = await validate_extract(await read_json_object(request), None, st.catalog.check)
    extract_id, now = new_id("extract"), now_iso()
    values = extract_columns(config) | {
        "id": extract_id,
        "created_at": now,
        "updated_at": now,
        "next_run_at": await next_run_at(config, st.clock()),
    }
    columns = ", ".join(values)
    await st.db.execute(
        f"INSERT INTO extracts ({columns}) VALUES ({', '.join(':' + c for c in values)})", values
    )
    return ok(await fetch_record(st.db, "extracts", extract_id), 201)


async def update_extract(request: Request) -> Response:
    st = service(request)
    extract_id = request.path_params["id"]
    body = await read_json_object(request)
    updated = None
    while updated is None:
        current = await fetch_record(st.db, "extracts", extract_id)
        config = await validate_extract(body, current, st.catalog.check)
        keep = current["next_run_at"] if current["schedule"] == config["schedule"] else None
        # Never the updated_at read, even within its millisecond: it is what tells this write
        # from the next one.
        after = iso(parse_iso(current["updated_at"]) + timedelta(milliseconds=1))
        values = extract_columns(config) | {
            "updated_at": max(now_iso(), after),
            "next_run_at": await next_run_at(config, st.clock(), keep),
        }
        assignments = ", ".join(f"{c} = :{c}" for c in values)
        # Written only over the row as read: another PUT meanwhile would lose the fields it
        # changed, and the scheduler's move of next_run_at past the due time it started would be
        # undone, starting that due time again at its next tick. Then it is all done again over
        # the row as it now is (each miss is another write that succeeded: no livelock).
        updated = await st.db.fetch_one(
            f"UPDATE extracts SET {assignments} WHERE id = :id AND deleted_at IS NULL "
            "AND updated_at = :seen AND coalesce(next_run_at, '') = :seen_next RETURNING id",
            values
            | {"id": extract_id, "seen": current["updated_at"], "seen_next": current["next_run_at"] or ""},
        )
    return ok(await fetch_record(st.db, "extracts", extract_id))


async def delete_extract(request: Request) -> Response:
    st = service(request)
    extract_id = request.path_params["id"]
    await fetch_record(st.db, "extracts", extract_id)
    now = now_iso()
    # One statement, so a run queued between a check and the update cannot slip through.
    deleted = await st.db.fetch_one(
        "UPDATE extracts SET deleted_at = :now, updated_at = :now, next_run_at = NULL "
        "WHERE id = :id AND deleted_at IS NULL AND NOT EXISTS (SELECT 1 FROM extract_runs "
        f"WHERE extract_id = :id AND status IN {ACTIVE}) RETURNING id",
        {"now": now, "id": extract_id},
    )
    if deleted is None:
        active = await st.runs.active_run(extract_id)
        if active is None:  # deleted meanwhile by another request (404), or its run just ended
            return await delete_extract(request)
        raise Conflict(
            f"Extract {extract_id} has an active run {active['id']}; cancel it with "
            f"POST /api/extracts/{extract_id}/cancel before deleting"
        )
    row = await st.db.fetch_one(
        f"SELECT {', '.join(EXTRACT_RECORD_FIELDS)} FROM extracts_with_stats WHERE id = :id",
        {"id": extract_id},
    )
    return ok(to_record(row))


async def delete_run(request: Request) -> Response:
    st = service(request)
    run = await fetch_record(st.db, "extract_runs", request.path_params["id"])
    if RunStatus(run["status"]) in ACTIVE_STATUSES:
        raise Conflict(
            f"Run {run['id']} is {run['status']}; cancel it with POST "
            f"/api/extracts/{run['extract_id']}/cancel before deleting it"
        )
    if await st.runs.held(run["id"]):  # a worker (here or on another instance) is still stopping
        raise Conflict(
            f"Run {run['id']} is {run['status']} and its worker is still stopping "
            "(within 2 seconds); retry the delete in a moment"
        )
    try:
        await st.runs.delete_files(run["id"])
    except StorageError as exc:  # the object store is down or refused: nothing was marked deleted
        raise ServiceUnavailable(
            f"Cannot delete the files of run {run['id']}: {exc}; retry in a moment",
            headers={"Retry-After": "5"},
        ) from None
    except OSError as exc:
        raise ServiceUnavailable(
            f"Cannot delete the files of run {run['id']}: {exc.strerror}; check that "
            "the storage directory (--storage) is writable, then retry"
        ) from None
    return ok(await fetch_record(st.db, "extract_runs", run["id"]))


async def start_run(request: Request) -> Response:
    st = service(request)
    extract = await fetch_record(st.db, "extracts", request.path_params["id"])
    if not extract["enabled"]:
        raise Conflict(
            f"Extract {extract['id']} is disabled; enable it with PUT "
            f'/api/data/extracts/{extract["id"]} and {{"enabled": true}}'
        )
    run_id = await st.runs.queue(extract, TriggeredBy.MANUAL)
    if run_id is None:
        active = await st.runs.active_run(extract["id"])
        if active is None:  # deleted or disabled meanwhile: say which
            return await start_run(request)
        if active["not_before"] is not None and await st.runs.start_now(active["id"]):
            # SPEC (Retries): a run request while a retry waits starts that retry at once, and
            # answers as any run request does (Running): the body names that run.
            run_id = active["id"]
    if run_id is None:
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


async def cancel_run(request: Request) -> Response:
    st = service(request)
    extract_id = request.path_params["id"]
    exists = await st.db.fetch_val("SELECT 1 FROM extracts WHERE id = :id", {"id": extract_id})
    if not exists:
        raise NotFound(f"Extract {extract_id} not found")
    run_id = await st.runs.cancel_active(extract_id)
    if run_id is None:
        raise NotFound(f"Extract {extract_id} has no active run to cancel")
    await st.pool.cancel(run_id)
    return ok({"message": "Extract cancelled", "run_id": run_id})


async def describe_list(request: Request) -> Response:
    return ok(await service(request).catalog.schemas())


async def describe_one(request: Request) -> Response:
    name = request.path_params["schema"]
    entry = await service(request).catalog.describe(name)
    if entry is None:
        raise NotFound(f"Schema '{name}' not found in the source; GET /api/describe lists them")
    return ok({"name": name, **entry})


async def list_instances(request: Request) -> Response:
    """The instances serving this state, live ones only (SPEC: Beyond one machine)."""
    return ok(await service(request).instance.live())


async def health(request: Request) -> Response:
    return json_response({"status": "ok"})


async def openapi(request: Request) -> Response:
    """Without a valid token, a document that names nothing of the source (SPEC); no 401."""
    st = service(request)
    if bearer_problem(request.headers.raw, st.settings.token.encode()) is None:
        document = await st.documents.authenticated()
    else:
        document = st.documents.anonymous()
    return Response(document, media_type="application/json", headers={"Vary": "Authorization"})
