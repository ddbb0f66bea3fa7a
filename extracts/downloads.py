"""Downloads: one artifact, or a run's artifacts as a ZIP built on the fly (SPEC: Downloads).

Every check that can answer 4xx (unknown run, status, expiry, the range, a file
missing from storage) runs before the first byte is sent, and so does holding
every file the response will send (``Storage.hold``): deleting the run or the
retention sweep meanwhile cannot cut a download short. The stored ZIP is
deterministic (``zipstream.StoredZip``), so it carries Content-Length and a
strong ETag and serves byte ranges by computing where they fall (``ranges``):
an interrupted download resumes with ``curl -C -``. File reads happen in worker
threads, never on the event loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from email.utils import formatdate
from functools import partial
from typing import Any, Literal
from urllib.parse import quote

import anyio
from databases import Database
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from executor.messages import RunStatus
from executor.naming import download_base_name
from extracts.http import Conflict, Gone, NotFound, ServiceUnavailable, ValidationFailed, query_param
from extracts.ranges import not_modified, requested_range
from extracts.records import ARTIFACT_FIELDS, RUN_FIELDS
from extracts.state import now_iso, parse_iso
from extracts.storage import FileChangedError, HeldFiles, NotInStorage, StorageError
from extracts.zipstream import StoredZip, ZipEntry, write_deflated

# 1 MiB per thread hop: 64 KiB (Starlette's FileResponse) ran at 130-180 MB/s here, 1 MiB
# at 0.9-1.4 GB/s (bench/RESULTS.md, Downloads).
CHUNK = 1 << 20


def check_not_gone(artifacts: list[dict[str, Any]]) -> None:
    """410 when any artifact expired or was deleted."""
    now = now_iso()
    for artifact in artifacts:
        if artifact["deleted_at"] is not None:
            raise Gone(
                f"Artifact {artifact['artifact_name']} of run {artifact['run_id']} was "
                f"deleted at {artifact['deleted_at']}"
            )
        if artifact["expires_at"] <= now:
            raise Gone(
                f"Artifact {artifact['artifact_name']} of run {artifact['run_id']} "
                f"expired at {artifact['expires_at']}"
            )


async def hold(request: Request, artifacts: list[dict[str, Any]]) -> HeldFiles:
    """Every file of ``artifacts``, held (in a thread); 404 naming a file missing or changed."""
    storage = request.app.state.extracts.storage
    files = [(a["storage_path"], a["size_bytes"]) for a in artifacts]
    try:
        return await anyio.to_thread.run_sync(storage.hold, files)
    except (FileNotFoundError, FileChangedError) as exc:
        path = exc.filename if isinstance(exc, FileNotFoundError) else exc.path
        artifact = next(a for a in artifacts if a["storage_path"] == path)
        what = f"File {artifact['artifact_name']} of run {artifact['run_id']}"
        if isinstance(exc, FileNotFoundError):
            if await being_deleted(request, artifact):
                raise Gone(f"{what} was deleted with its run") from None
            raise NotFound(f"{what} is missing from storage ({path})") from None
        raise NotFound(f"{what} cannot be sent: {exc}") from None
    except NotInStorage as exc:  # never there to find: a 404, not a 503 to retry
        artifact = next(a for a in artifacts if a["storage_path"] == exc.path)
        raise NotFound(
            f"File {artifact['artifact_name']} of run {artifact['run_id']} was written to {exc.path}, "
            f"outside this service's storage {exc.storage}; serve it with the --storage it was written to"
        ) from None
    except StorageError as exc:  # the object store is down or refused: retry later
        raise ServiceUnavailable(f"{exc}; retry in a moment", headers={"Retry-After": "5"}) from None
    except OSError as exc:
        raise ServiceUnavailable(
            f"Cannot open the files to send: {exc.strerror} ({exc.filename}); "
            "check the storage directory (--storage), then retry"
        ) from None


async def being_deleted(request: Request, artifact: dict[str, Any]) -> bool:
    """Whether a file found missing went with a DELETE of its run, here or through another
    instance: the files go first, then the rows are marked, and a download between the two
    passed the 410 check (``check_not_gone``)."""
    st = request.app.state.extracts
    if artifact["run_id"] in st.runs.deleting:
        return True
    deleted = await st.db.fetch_val(
        "SELECT deleted_at FROM extract_artifacts WHERE id = :id", {"id": artifact["id"]}
    )
    return deleted is not None


async def release(files: HeldFiles) -> None:
    """Close ``files`` in a thread (freeing a deleted file's blocks takes time), even when cancelled."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(files.close)


async def count_download(db: Database, key: Literal["id", "run_id"], value: str) -> None:
    """One more download of an artifact (``id``) or of every artifact of a run (``run_id``).

    One bound value, however many artifacts: a run can have more than SQLite
    accepts parameters in one statement.
    """
    await db.execute(
        "UPDATE extract_artifacts SET download_count = download_count + 1, "
        f"accessed_at = :now WHERE {key} = :value",
        {"now": now_iso(), "value": value},
    )


def counted(request: Request, requested: tuple[int, int] | None) -> bool:
    """A GET that starts at byte 0 is a download; a resumed one (a later start) was already counted."""
    return request.method == "GET" and (requested is None or requested[0] == 0)


async def unchanged(files: HeldFiles, etag: str) -> Response:
    """304: the client's copy, named by If-None-Match, is current (once every file was found).

    Not counted: no byte is sent.
    """
    await release(files)
    return Response(status_code=304, headers={"ETag": etag, "Accept-Ranges": "bytes"})


class HeldResponse(StreamingResponse):
    """A streamed body over held files, released when the response ends, however it ends.

    Completed, the client gone mid-stream or before the body started: the body
    is closed (stopping any thread producing it) and then the files.
    """

    def __init__(self, content: AsyncGenerator[bytes, None], files: HeldFiles, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._content, self._files = content, files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._content.aclose()
            await release(self._files)


async def download_artifact(request: Request) -> Response:
    st = request.app.state.extracts
    artifact = await st.db.fetch_one(
        f"SELECT {', '.join(ARTIFACT_FIELDS)} FROM extract_artifacts WHERE id = :id",
        {"id": request.path_params["id"]},
    )
    if artifact is None:
        raise NotFound(f"Artifact {request.path_params['id']} not found")
    artifact = dict(artifact._mapping)
    check_not_gone([artifact])
    if await redirect_requested(request):
        return await redirect(request, artifact)
    size, etag = artifact["size_bytes"], f'"{artifact["checksum"]}"'
    fresh = not_modified(request, etag, "file")
    requested = None if fresh else requested_range(request, etag, size, "file")
    start, end = requested or (0, size)
    files = await hold(request, [artifact])
    try:
        if fresh:
            return await unchanged(files, etag)
        if counted(request, requested):
            await count_download(st.db, "id", artifact["id"])
        headers = {
            "Content-Disposition": content_disposition(artifact["artifact_name"]),
            "Content-Length": str(end - start),
            "ETag": etag,
            "X-Checksum-SHA256": artifact["checksum"],
            "Accept-Ranges": "bytes",
            "Last-Modified": formatdate(files.modified(0), usegmt=True),
        }
        if requested is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        status = 206 if requested is not None else 200
        if request.method == "HEAD":
            await release(files)
            return Response(status_code=status, headers=headers, media_type=artifact["content_type"])
        body = file_chunks(files, artifact["storage_path"], start, end)
        return HeldResponse(
            body, files, status_code=status, headers=headers, media_type=artifact["content_type"]
        )
    except BaseException:
        await release(files)
        raise


SIGNED_FOR_S = 15 * 60  # SPEC: a presigned URL is valid 15 minutes


async def redirect_requested(request: Request) -> bool:
    """``?redirect=true`` (or false, the default); 400 naming anything else."""
    value = query_param(request, "redirect", "false")
    if value not in ("true", "false"):
        raise ValidationFailed(
            "redirect must be true or false",
            [{"field": "redirect", "message": "redirect must be true or false"}],
        )
    return value == "true"


async def redirect(request: Request, artifact: dict[str, Any]) -> Response:
    """307 to a URL the store signed, so a large file need not pass through the service.

    The file is checked first (404 naming it when it is gone); the download counts as one
    sent here would (``counted``): not a HEAD, nor a resumed GET.
    """
    st = request.app.state.extracts
    files = await hold(request, [artifact])
    try:
        url = await anyio.to_thread.run_sync(st.storage.sign, artifact["storage_path"], SIGNED_FOR_S)
    finally:
        await release(files)
    if url is None:
        raise ValidationFailed(
            f"The storage ({st.storage.backend}) cannot sign a URL for {artifact['artifact_name']}; "
            "download without redirect=true",
            [{"field": "redirect", "message": f"the {st.storage.backend} storage cannot sign a URL for it"}],
        )
    # Counted as a download sent here would be: a GET from byte 0 (the store gets the Range).
    requested = requested_range(request, f'"{artifact["checksum"]}"', artifact["size_bytes"], "file")
    if counted(request, requested):
        await count_download(st.db, "id", artifact["id"])
    return Response(status_code=307, headers={"Location": url, "Cache-Control": "no-store"})


def content_disposition(name: str) -> str:
    """``attachment`` with the name as ``filename``, and as ``filename*`` too when it holds a ``%``.

    An artifact name is ASCII without quotes or backslashes (``executor.naming``), so
    ``filename`` carries it exactly: curl -J reads only that parameter. A browser may
    percent-decode ``filename`` (``order%20items.jsonl`` saved as ``order items.jsonl``);
    ``filename*``, which browsers prefer (RFC 6266 section 4.3), carries the name itself.
    """
    quoted = quote(name)
    if quoted != name:
        return f"attachment; filename=\"{name}\"; filename*=utf-8''{quoted}"
    return f'attachment; filename="{name}"'


async def file_chunks(files: HeldFiles, path: str, start: int, end: int) -> AsyncGenerator[bytes, None]:
    """Bytes [start, end) of the one held file, read in CHUNK-sized preads in a thread."""
    position = start
    while position < end:
        data = await anyio.to_thread.run_sync(files.read, 0, position, min(CHUNK, end - position))
        if not data:
            raise FileChangedError(path, f"{path} shrank while it was sent: {end - position} bytes short")
        position += len(data)
        yield data


async def download_run(request: Request) -> Response:
    st = request.app.state.extracts
    run = await st.db.fetch_one(
        f"SELECT {', '.join(RUN_FIELDS)} FROM extract_runs WHERE id = :id", {"id": request.path_params["id"]}
    )
    if run is None:
        raise NotFound(f"Run {request.path_params['id']} not found")
    compression = query_param(request, "compression", "stored")
    if compression not in ("stored", "deflate"):
        raise ValidationFailed(
            "compression must be 'stored' (the default) or 'deflate'",
            [{"field": "compression", "message": "compression must be 'stored' or 'deflate'"}],
        )
    if run["status"] != RunStatus.COMPLETED:
        raise Conflict(
            f"Run {run['id']} is {run['status']}; only a completed run downloads as a "
            "ZIP (its files download one by one from /api/extracts/artifacts/<id>/download)"
        )
    rows = await st.db.fetch_all(
        f"SELECT {', '.join(ARTIFACT_FIELDS)}, crc32 FROM extract_artifacts "
        f"WHERE run_id = :id ORDER BY {st.runs.dialect.artifact_order}",
        {"id": run["id"]},
    )
    artifacts = [dict(r._mapping) for r in rows]
    if not artifacts:
        raise Gone(f"Run {run['id']} has no artifacts left")
    check_not_gone(artifacts)
    entries = [
        ZipEntry(
            a["artifact_name"],
            a["storage_path"],
            a["size_bytes"],
            a["crc32"],
            parse_iso(a["created_at"]).timetuple()[:6],
        )
        for a in artifacts
    ]
    filename = download_base_name(run["extract_name"], run["created_at"], run["id"]) + ".zip"
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    if compression == "deflate":  # of unknown length: no Range (the whole archive, always)
        requested, status, archive, fresh = None, 200, None, False
    else:
        archive = await anyio.to_thread.run_sync(StoredZip, entries)  # ~11 µs an entry
        etag = archive.etag()
        fresh = not_modified(request, etag, "archive")
        requested = None if fresh else requested_range(request, etag, archive.size, "archive")
        start, end = requested or (0, archive.size)
        status = 206 if requested is not None else 200
        headers |= {"ETag": etag, "Accept-Ranges": "bytes", "Content-Length": str(end - start)}
        if requested is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{archive.size}"
    files = await hold(request, artifacts)
    try:
        if fresh:
            return await unchanged(files, etag)
        if counted(request, requested):
            await count_download(st.db, "run_id", run["id"])
        if request.method == "HEAD":
            await release(files)
            response = Response(status_code=status, headers=headers, media_type="application/zip")
            if archive is None:  # a deflated archive's length is known once it is written
                del response.headers["content-length"]
            return response
        if archive is None:
            body = threaded_producer(partial(write_deflated, entries, files))
        else:
            body = chunks_in_thread(archive.iter_bytes(files, start, end, CHUNK))
        return HeldResponse(body, files, status_code=status, headers=headers, media_type="application/zip")
    except BaseException:
        await release(files)
        raise


async def chunks_in_thread(chunks: Generator[bytes, None, None]) -> AsyncGenerator[bytes, None]:
    """Pull a blocking generator from a worker thread; closed with this one."""
    try:
        while True:
            chunk = await anyio.to_thread.run_sync(next, chunks, None)
            if chunk is None:
                return
            yield chunk
    finally:
        chunks.close()


class _QueueSink:
    """A write-only, non-seekable file for zipfile that hands chunks to the event loop."""

    def __init__(self, out: queue.Queue[bytes | BaseException | None], stop: threading.Event) -> None:
        self.out, self.stop, self.buffer, self.position = out, stop, bytearray(), 0

    def write(self, data: bytes) -> int:
        if self.stop.is_set():
            raise ConnectionAbortedError("the client went away")
        self.buffer += data
        self.position += len(data)
        if len(self.buffer) >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            self.put(bytes(self.buffer))
            self.buffer.clear()

    def put(self, item: bytes | BaseException | None) -> None:
        """Queue ``item`` unless the consumer stopped (then nobody would ever take it)."""
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def tell(self) -> int:
        return self.position


async def threaded_producer(write: Callable[[_QueueSink], None]) -> AsyncGenerator[bytes, None]:
    """Run ``write(sink)`` in a thread and yield what it writes (a bounded queue between them).

    Closing this generator stops the thread and waits for it (half a second at
    most), so that nothing reads the held files once they are released.
    """
    out: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=8)
    stop = threading.Event()
    sink = _QueueSink(out, stop)

    def produce() -> None:
        try:
            write(sink)
            sink.flush()
            sink.put(None)
        except BaseException as exc:  # noqa: BLE001 — handed to the consumer
            sink.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="extracts-zip-deflate")
    thread.start()
    try:
        while True:
            item = await anyio.to_thread.run_sync(out.get)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(thread.join)
