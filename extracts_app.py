"""Extracts: export a database into downloadable, checksummed files, over HTTP.

The data flow, left to right::

    request ─► extract row ─► run row (queued) ─► process pool ─► worker reads the
    source in one snapshot, writes files to storage, puts progress + artifacts on a
    queue ─► parent (the only writer of the state file) updates the run and
    artifact rows ─► downloads stream the files, one by one or as a ZIP built on the fly

This module is the entry point: the route table, ``create_app`` and ``main``.
The server side lives in the ``extracts`` package (one module per concern, see
its docstring); what runs in the worker processes in ``executor``.

Its top imports nothing of the server side: each process the pool's forkserver
forks (the workers, the Manager) runs the main script again, as
``__mp_main__``, and needs none of it (a service start costs one import of the
server side, not two).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route

    from extracts.settings import Settings

COMMANDS = ("export", "verify", "run")  # extracts.commands.COMMANDS (a test keeps them equal)
POLL_S = 1.0  # with a shared state, how often an instance looks for runs another one queued


class Endpoint:
    """The handlers of one path by method (read by ``operations``), and the ASGI app serving them."""

    def __init__(self, methods: dict[str, Callable[[Request], Any]], app: Callable[..., Any]) -> None:
        self.methods, self.app = methods, app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def route(path: str, **methods: Callable[[Request], Any]) -> Route:
    """One route per path, dispatching on the method, so a 405 lists the path's own methods.

    Starlette's Route gets an ASGI app (an object, not a function) and no ``methods``,
    so it passes every method on, and this endpoint answers every 405 itself. Given a
    function and a list of methods, Route answered a method outside that list (``FOO``)
    with its own 405, whose Allow header named the whole list, not this path's methods.
    """
    from starlette.routing import Route, request_response

    from extracts.http import MethodNotAllowed, NotFound

    allowed = ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))

    async def endpoint(request: Request) -> Any:
        method = "GET" if request.method == "HEAD" else request.method
        handler = methods.get(method)
        if handler is None:
            raise MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}",
                headers={"Allow": allowed},
            )
        # No id or schema name holds a NUL, and a PostgreSQL state refuses one in text (a 500).
        if any("\0" in str(value) for value in request.path_params.values()):
            raise NotFound(f"Nothing is named with a NUL character: {request.url.path!r}")
        return await handler(request)

    return Route(path, Endpoint(methods, request_response(endpoint)))


def routes() -> tuple[list[Route], list[Route]]:
    """(the public routes, the API's under ``/api``): the route table."""
    from extracts import downloads, handlers, metrics, page
    from extracts.handlers import get_handler, list_handler

    api = [
        route("/data/extracts", GET=list_handler("extracts"), POST=handlers.create_extract),
        route(
            "/data/extracts/{id}",
            GET=get_handler("extracts"),
            PUT=handlers.update_extract,
            DELETE=handlers.delete_extract,
        ),
        route("/data/extract_runs", GET=list_handler("extract_runs")),
        route("/data/extract_runs/{id}", GET=get_handler("extract_runs"), DELETE=handlers.delete_run),
        route("/data/extract_artifacts", GET=list_handler("extract_artifacts")),
        route("/data/extract_artifacts/{id}", GET=get_handler("extract_artifacts")),
        route("/extracts/{id}/run", POST=handlers.start_run),
        route("/extracts/{id}/cancel", POST=handlers.cancel_run),
        route("/extracts/runs/{id}/download", GET=downloads.download_run),
        route("/extracts/artifacts/{id}/download", GET=downloads.download_artifact),
        route("/instances", GET=handlers.list_instances),
        route("/describe", GET=handlers.describe_list),
        route("/describe/{schema:path}", GET=handlers.describe_one),
    ]
    # Served without the /api bearer check: the page (public, it holds no data), its files, liveness,
    # the API's description, and the metrics (which check the token themselves).
    public = [
        route("/", GET=page.index),
        route("/assets/{name}", GET=page.asset),
        route("/health", GET=handlers.health),
        route("/openapi.json", GET=handlers.openapi),
        route("/metrics", GET=metrics.metrics),
    ]
    return public, api


def operations(tables: list[tuple[str, Route]]) -> list[tuple[str, str, str]]:
    """Every (path, method, handler name) of the (prefix, route) table: what OpenAPI describes."""
    return [
        (prefix + item.path, method, handler.__name__)
        for prefix, item in tables
        for method, handler in item.endpoint.methods.items()  # type: ignore[attr-defined]
    ]


def create_app(settings: Settings) -> Starlette:
    """The ASGI app; ``prepare(settings)`` must have run (the CLI does it)."""
    import asyncio
    import contextlib
    from datetime import timedelta

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.routing import Mount, Router

    from executor.sources import SourceError
    from extracts import state
    from extracts.catalog import Catalog, DocumentCache
    from extracts.dialects import dialect_of
    from extracts.handlers import Service
    from extracts.http import (
        ApiError,
        BearerAuth,
        CatchAll,
        api_error_handler,
        http_exception_handler,
        source_error_handler,
    )
    from extracts.instances import Instance
    from extracts.metrics import Metrics, RequestMetrics
    from extracts.pool import WorkerPool
    from extracts.runs import Runs
    from extracts.schedule import Scheduler, Sweeper
    from extracts.storage import open_storage

    public, api = routes()
    tables = [("", item) for item in public] + [("/api", item) for item in api]
    db = state.open_database(settings.db, state.heartbeat_seconds(settings.lease_seconds))
    dialect = dialect_of(str(settings.db))
    storage = open_storage(settings.storage, settings.storage_endpoint)
    catalog = Catalog(settings.source)
    runs = Runs(db, storage, settings.source, settings.min_free_mb << 20, dialect=dialect)
    runs.lease = timedelta(seconds=settings.lease_seconds)
    poll = POLL_S if settings.shared else None
    pool = WorkerPool(runs, storage, settings.workers, poll=poll)
    instance = Instance(db, runs, pool, settings.shared)
    documents = DocumentCache.of(operations(tables), catalog)
    st = Service(settings, db, storage, catalog, runs, pool, documents, instance, state.utcnow)
    runs.clock = lambda: st.clock()  # one clock for runs, retries and schedules (tests move it)
    scheduler = Scheduler(db, runs, lambda: st.clock(), instance.leads)
    sweeper = Sweeper(db, storage, settings.cleanup_interval, pool.active, lambda: st.clock(), instance.leads)
    measured = Metrics(db, instance, settings.token, tables)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await db.connect()
        await instance.start()
        await runs.recover(alone=not settings.shared)
        await pool.start()
        stopping = asyncio.Event()
        loops = [asyncio.create_task(job.run_forever(stopping)) for job in (scheduler, sweeper, instance)]
        try:
            yield
        finally:
            stopping.set()  # each loop ends after the step it is in (never cut in a statement)
            await asyncio.gather(*loops, return_exceptions=True)
            await pool.stop()
            if pool.state_answered:  # else each write would wait out the busy timeout again
                await instance.stop()
            await state.disconnect(db)

    exception_handlers = {
        ApiError: api_error_handler,
        HTTPException: http_exception_handler,
        SourceError: source_error_handler,
    }
    api_router = Router(routes=api, redirect_slashes=False)
    app = Starlette(
        routes=[*public, Mount("/api", app=BearerAuth(api_router, settings.token))],
        # Outermost first: every response is counted, the 500s CatchAll makes included.
        middleware=[Middleware(RequestMetrics, metrics=measured), Middleware(CatchAll, busy=dialect.busy)],
        exception_handlers=exception_handlers,
        lifespan=lifespan,
    )
    # "/api/data/extracts/" is no route: a 404 naming it, not a bodiless 307 (whose Location,
    # built from the Host header, says http:// behind a TLS proxy).
    app.router.redirect_slashes = False
    app.state.extracts = st
    app.state.metrics = measured
    return app


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _command(argv: list[str]) -> int:
    """Run a command (before the service's imports: it starts in a tenth of a second).

    Ctrl-C, SIGTERM or SIGHUP (the terminal closed) at any point exits 130 with one line
    (README: Command line). While the command's modules load, a signal is only noted:
    raised inside an extension module's initialisation (orjson's), KeyboardInterrupt
    crashed the interpreter. Once they are loaded, these signals raise KeyboardInterrupt
    (the source may take long to open), until the export puts its own handlers in place.
    """
    import signal

    noted: list[int] = []
    # An ignored signal (SIGINT in a background job, SIGHUP under nohup) stays ignored.
    stops = [
        sig
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(sig) != signal.SIG_IGN
    ]
    for sig in stops:
        signal.signal(sig, lambda signum, _: noted.append(signum))
    try:
        from extracts.commands import run_command
    finally:
        for sig in stops:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else _interrupt)
    try:
        if noted:
            raise KeyboardInterrupt
        return run_command(argv, own_process=True)
    except KeyboardInterrupt:
        print("extracts-app: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # its reader went away (verify … | head -1): nothing more to say
        import os

        # Flushed at exit, the closed pipe would add "Exception ignored … BrokenPipeError".
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(devnull, stream.fileno())
        return 1


KEEP_ALIVE_S = 65
# A graceful stop waits this long for responses still being sent, then cuts them (a stalled
# client would hold the stop forever, and the runs it should requeue with it).
STOP_RESPONSES_AFTER_S = 5
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: list[str] | None = None) -> None:
    """``extracts-app [serve] [options]``: the service; ``export``, ``verify``, ``run``: the commands."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in COMMANDS:
        raise SystemExit(_command(argv))

    if argv[:1] == ["serve"]:
        argv = argv[1:]
    try:
        _serve(argv)
    except KeyboardInterrupt:  # Ctrl-C before uvicorn took the signals over: nothing ran yet
        print("extracts-app: interrupted before the service started", file=sys.stderr)
        raise SystemExit(130) from None


def _serve(argv: list[str]) -> None:
    import contextlib
    import logging
    import signal

    import uvicorn

    from executor.credentials import BlankingFormatter
    from extracts.http import CutByStop, OneStop
    from extracts.settings import parse_settings
    from extracts.startup import StartupError, banner, prepare

    settings = parse_settings(argv)
    handler = logging.StreamHandler()  # every log line, uvicorn's too, without the source's secrets
    handler.setFormatter(BlankingFormatter(LOG_FORMAT, settings.source))
    handler.addFilter(CutByStop())
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
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=None,
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=STOP_RESPONSES_AFTER_S,
    )
    server = OneStop(config)
    # SIGHUP (the terminal closed) stops the service as SIGTERM does, runs requeued; it killed
    # it as kill -9 would. Under nohup it stays ignored.
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, lambda _, frame: server.handle_exit(signal.SIGTERM, frame))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the signal that stopped it
        server.run()
    if not server.started:  # the app's start-up failed (as uvicorn.run exits)
        raise SystemExit(3)


if __name__ == "__main__":
    # Through the module, so that handlers and tests share one copy of its classes.
    import extracts_app

    extracts_app.main()
