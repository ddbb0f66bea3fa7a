"""Downloads: one artifact, or a run's artifacts as a ZIP built on the fly (SPEC: Downloads).

Every check that can answer 4xx (unknown run, status, expiry, a file missing
from disk) runs before the first byte is sent. The stored ZIP is deterministic
(``extracts_zip.StoredZip``), so it carries Content-Length and a strong ETag and
serves byte ranges by computing where they fall: an interrupted download
resumes with ``curl -C -``. File reads happen in worker threads, never on the
event loop.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import FileResponse, MalformedRangeHeader, Response, StreamingResponse
from starlette.responses import RangeNotSatisfiable as StarletteRangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from executor.naming import download_base_name
from extracts_http import ApiError, Conflict, Gone, NotFound, ValidationFailed, query_param
from extracts_state import ARTIFACT_FIELDS, RUN_FIELDS, now_iso, parse_iso
from extracts_zip import StoredZip, ZipEntry, write_deflated

RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def check_available(artifacts: list[dict[str, Any]]) -> None:
    """410 when any artifact expired or was deleted; 404 naming a file missing from disk."""
    now = now_iso()
    for artifact in artifacts:
        if artifact["deleted_at"] is not None:
            raise Gone(f"Artifact {artifact['artifact_name']} of run {artifact['run_id']} was "
                           f"deleted at {artifact['deleted_at']}")
        if artifact["expires_at"] <= now:
            raise Gone(f"Artifact {artifact['artifact_name']} of run {artifact['run_id']} "
                           f"expired at {artifact['expires_at']}")
    for artifact in artifacts:
        path = Path(artifact["storage_path"])
        try:
            size = path.stat().st_size
        except OSError:
            raise NotFound(f"File {artifact['artifact_name']} of run {artifact['run_id']} is "
                               f"missing from storage ({path})") from None
        if size != artifact["size_bytes"]:
            raise NotFound(f"File {artifact['artifact_name']} of run {artifact['run_id']} changed "
                               f"on disk: {size} bytes, {artifact['size_bytes']} expected")


async def count_downloads(request: Request, artifact_ids: list[str]) -> None:
    placeholders = ", ".join(f":a{i}" for i in range(len(artifact_ids)))
    await request.app.state.extracts.db.execute(
        "UPDATE extract_artifacts SET download_count = download_count + 1, accessed_at = :now "
        f"WHERE id IN ({placeholders})",
        {"now": now_iso(), **{f"a{i}": a for i, a in enumerate(artifact_ids)}})


def starts_at_zero(request: Request) -> bool:
    """A resumed download (Range from a later byte) is the same download: counted once."""
    match = RANGE.match(request.headers.get("range", "").strip())
    return match is None or match[1] in ("", "0")


async def download_artifact(request: Request) -> Response:
    st = request.app.state.extracts
    artifact = await st.db.fetch_one(
        f"SELECT {', '.join(ARTIFACT_FIELDS)} FROM extract_artifacts WHERE id = :id",
        {"id": request.path_params["id"]})
    if artifact is None:
        raise NotFound(f"Artifact {request.path_params['id']} not found")
    artifact = dict(artifact._mapping)
    await anyio.to_thread.run_sync(check_available, [artifact])
    etag = f'"{artifact["checksum"]}"'
    response_class = ArtifactFile if file_range_usable(request, artifact["size_bytes"], etag) else WholeFile
    if request.method == "GET" and starts_at_zero(request):
        await count_downloads(request, [artifact["id"]])
    return response_class(
        artifact["storage_path"], media_type=artifact["content_type"],
        filename=artifact["artifact_name"],
        headers={"X-Checksum-SHA256": artifact["checksum"], "ETag": etag})


def file_range_usable(request: Request, size: int, etag: str) -> bool:
    """Whether FileResponse may honour the Range header; 416 (in the envelope) past the end.

    FileResponse answers a malformed Range with a plain-text 400 and an
    unsatisfiable one with a bare 416; this check runs first so that every error
    is the JSON envelope, and a malformed Range gets the whole file, as the ZIP
    download does (RFC 9110 lets a server ignore Range). So does an If-Range that
    is not the artifact's ETag.
    """
    header = request.headers.get("range")
    if header is None:
        return True
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        return False
    try:
        FileResponse._parse_range_header(header, size)
    except MalformedRangeHeader:
        return False
    except StarletteRangeNotSatisfiable:
        raise RangeNotSatisfiable(f"The range starts past the end of the {size}-byte file",
                                  headers={"Content-Range": f"bytes */{size}"}) from None
    return True


class ArtifactFile(FileResponse):
    """A FileResponse reading 1 MiB per thread hop: 64 KiB (Starlette's) ran at 130–180 MB/s here.

    bench/RESULTS.md, Downloads: a 2 GiB file at 0.9–1.4 GB/s with 1 MiB.
    """

    chunk_size = 1 << 20


class WholeFile(ArtifactFile):
    """An artifact that ignores the request's (malformed) Range header."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"range"]
        await super().__call__({**scope, "headers": headers}, receive, send)


async def download_run(request: Request) -> Response:
    st = request.app.state.extracts
    run = await st.db.fetch_one(f"SELECT {', '.join(RUN_FIELDS)} FROM extract_runs WHERE id = :id",
                                {"id": request.path_params["id"]})
    if run is None:
        raise NotFound(f"Run {request.path_params['id']} not found")
    compression = query_param(request, "compression", "stored")
    if compression not in ("stored", "deflate"):
        raise ValidationFailed("compression must be 'stored' (the default) or 'deflate'", [
            {"field": "compression", "message": "compression must be 'stored' or 'deflate'"}])
    if run["status"] != "completed":
        raise Conflict(f"Run {run['id']} is {run['status']}; only a completed run downloads as a "
                       "ZIP (its files download one by one from /api/extracts/artifacts/<id>/download)")
    rows = await st.db.fetch_all(
        f"SELECT {', '.join(ARTIFACT_FIELDS)}, crc32 FROM extract_artifacts "
        "WHERE run_id = :id ORDER BY rowid", {"id": run["id"]})
    artifacts = [dict(r._mapping) for r in rows]
    if not artifacts:
        raise Gone(f"Run {run['id']} has no artifacts left")
    await anyio.to_thread.run_sync(check_available, artifacts)
    entries = [ZipEntry(a["artifact_name"], a["storage_path"], a["size_bytes"], a["crc32"],
                        parse_iso(a["created_at"]).timetuple()[:6]) for a in artifacts]
    filename = download_base_name(run["extract_name"], run["created_at"], run["id"]) + ".zip"
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    counted = request.method == "GET" and starts_at_zero(request)
    if compression == "deflate":
        if counted:
            await count_downloads(request, [a["id"] for a in artifacts])
        return StreamingResponse(threaded_producer(write_deflated, entries),
                                 media_type="application/zip", headers=headers)
    archive = await anyio.to_thread.run_sync(StoredZip, entries)  # ~11 µs an entry
    etag = archive.etag()
    headers |= {"ETag": etag, "Accept-Ranges": "bytes"}
    start, end, status = 0, archive.size, 200
    requested = parse_range(request, etag, archive.size)
    if requested is not None:
        start, end = requested
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{archive.size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/zip")
    if counted:
        await count_downloads(request, [a["id"] for a in artifacts])
    return StreamingResponse(chunks_in_thread(archive.iter_bytes(start, end)), status_code=status,
                             headers=headers, media_type="application/zip")


class RangeNotSatisfiable(ApiError):
    """The Range starts past the end of the archive."""

    status, code = 416, "RANGE_NOT_SATISFIABLE"


def parse_range(request: Request, etag: str, size: int) -> tuple[int, int] | None:
    """A single byte range as [start, end); None for the whole archive.

    Multiple ranges, a malformed header or an If-Range that no longer matches
    get the whole archive (RFC 9110 allows a server to ignore Range).
    """
    header = request.headers.get("range")
    if not header:
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        return None
    match = RANGE.match(header.strip())
    if match is None or (match[1] == "" and match[2] == ""):
        return None
    if match[1] == "":
        length = int(match[2])
        if length == 0:
            raise RangeNotSatisfiable("The range is empty", headers={"Content-Range": f"bytes */{size}"})
        return max(size - length, 0), size
    start = int(match[1])
    end = min(int(match[2]) + 1, size) if match[2] else size
    if start >= size or end <= start:
        raise RangeNotSatisfiable(f"The range starts past the end of the {size}-byte archive",
                                  headers={"Content-Range": f"bytes */{size}"})
    return start, end


async def chunks_in_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Pull a blocking iterator from a worker thread; closed at once if the client goes away."""
    try:
        while True:
            chunk = await anyio.to_thread.run_sync(next, chunks, None)
            if chunk is None:
                return
            yield chunk
    finally:
        chunks.close()  # type: ignore[attr-defined]


class _QueueSink:
    """A write-only, non-seekable file for zipfile that hands chunks to the event loop."""

    def __init__(self, out: queue.Queue[bytes | BaseException | None], stop: threading.Event) -> None:
        self.out, self.stop, self.buffer, self.position = out, stop, bytearray(), 0

    def write(self, data: bytes) -> int:
        if self.stop.is_set():
            raise ConnectionAbortedError("the client went away")
        self.buffer += data
        self.position += len(data)
        if len(self.buffer) >= 1 << 20:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            while not self.stop.is_set():
                try:
                    self.out.put(bytes(self.buffer), timeout=0.5)
                    break
                except queue.Full:
                    continue
            self.buffer.clear()

    def tell(self) -> int:
        return self.position


async def threaded_producer(write: Any, entries: list[ZipEntry]) -> AsyncIterator[bytes]:
    """Run ``write(entries, sink)`` in a thread and yield what it writes (bounded queue)."""
    out: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=8)
    stop = threading.Event()

    def produce() -> None:
        sink = _QueueSink(out, stop)
        try:
            write(entries, sink)
            sink.flush()
            out.put(None)
        except BaseException as exc:  # noqa: BLE001 — handed to the consumer
            if not stop.is_set():
                out.put(exc)

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
