"""``extracts-app run EXTRACT``: start a run on a service, watch it, download and check its ZIP.

::

    EXTRACT ─► GET /api/data/extracts/<id>, else ?filter[where][name]=<EXTRACT> (exactly one)
            ─► POST /api/extracts/<id>/run ─► 202 {run_id, status_url}
    --wait  ─► GET status_url every 0.25 s ─► the export's progress view (and the run's
               artifacts when a schema ends, for its line) until the run ends
    --download PATH ─► GET /api/extracts/runs/<id>/download, ``Range: bytes=<size>-`` with
               ``If-Range: <ETag>`` when PATH holds part of it; then ``verify`` on the ZIP

The service itself, its URL, token and JSON API, is ``extracts.client``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlencode, urlsplit

from executor.messages import ENDED_STATUSES, RunStatus
from extracts.client import DEFAULT_URL, Client, Failed, default_token, default_url, token_file
from extracts.progress import View, make_view

POLL_S = 0.25
RETRIES = 3  # a download whose connection drops resumes where it stopped
_CHUNK = 1 << 20
_SAMPLE = 64 << 10  # bytes of a partial file compared with the ZIP's at each end before resuming
_PAGE = 1000  # artifacts a request lists
_ENDED = {status.value for status in ENDED_STATUSES}
RUN_ID = re.compile(r"run_[A-Za-z0-9_-]+")  # the service's run ids: run_ and 16 hex digits


def find_extract(client: Client, wanted: str) -> dict[str, Any]:
    """The extract whose id is ``wanted``, else the one whose name is exactly ``wanted``."""
    # "." and ".." are no id: in a path they would name the list (or the API) instead.
    found = None
    if wanted.strip("."):
        found = client.call("GET", f"/api/data/extracts/{quote(wanted, safe='')}", missing_ok=True)
    if found is not None:
        return _extract(found, client)
    if wanted == "null":  # filter[where][name]=null means IS NULL (README): compared here instead
        named = [extract for extract in _every_extract(client) if extract["name"] == wanted][:2]
    else:
        query = urlencode({"filter[where][name]": wanted, "filter[limit]": "2"})
        named = _extracts(client, client.call("GET", f"/api/data/extracts?{query}"))
    if not named:
        raise Failed(f"no extract has the id or name {wanted!r}; GET /api/data/extracts lists them")
    if len(named) > 1:
        ids = ", ".join(extract["id"] for extract in named)
        raise Failed(f"several extracts are named {wanted!r} ({ids}…); give the id")
    return named[0]


def _every_extract(client: Client) -> list[dict[str, Any]]:
    """Every extract, a page at a time."""
    found: list[dict[str, Any]] = []
    while True:
        query = urlencode(
            {"filter[order]": "id asc", "filter[limit]": str(_PAGE), "filter[offset]": len(found)}
        )
        page = _extracts(client, client.call("GET", f"/api/data/extracts?{query}"))
        found += page
        if len(page) < _PAGE:
            return found


def _extracts(client: Client, answer: Any) -> list[dict[str, Any]]:
    """``answer`` if it is a list of extracts, else Failed."""
    if not isinstance(answer, list):
        raise Failed(f"GET /api/data/extracts: the answer is not a list; is {client.url} the service?")
    return [_extract(extract, client) for extract in answer]


def _extract(found: Any, client: Client) -> dict[str, Any]:
    """``found`` if it is an extract (an id and a name), else Failed."""
    if not (
        isinstance(found, dict) and isinstance(found.get("id"), str) and isinstance(found.get("name"), str)
    ):
        raise Failed(f"the service at {client.url} answered with something that is not an extract")
    return found


def check_options(
    args: argparse.Namespace, url: str, token: str, bad_option: Callable[[str], NoReturn]
) -> None:
    """Refuse (exit 2) what no request can carry: an empty EXTRACT, an unusable URL or token."""
    if not args.extract.strip():
        bad_option("EXTRACT: must be an extract's id or name, not empty")
    named = (
        "--url"
        if args.url
        else "EXTRACTS_URL"
        if os.environ.get("EXTRACTS_URL")
        else ("EXTRACTS_HOST/EXTRACTS_PORT")
    )
    if not url.isascii():  # a request line is ASCII: a name holding more is percent-encoded
        bad_option(f"{named}: {url!r} is not ASCII; percent-encode the path, use the punycode of a host")
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number from 0 to 65535
    except ValueError as exc:
        bad_option(f"{named}: {url!r} is not a usable URL ({exc})")
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        bad_option(f"{named}: {url!r} is not an http:// or https:// URL with a host, such as {DEFAULT_URL}")
    # Every request appends its path to the URL: after a query or a fragment it would be lost in
    # them, and urllib takes "user:password@host" for a host name. The URL is not repeated: it
    # may hold a password.
    if "@" in parts.netloc or "?" in url or "#" in url:
        bad_option(
            f"{named}: give the service's URL without user:password@, ?query or #fragment, "
            f"such as {DEFAULT_URL} (the token goes in --token)"
        )
    if not all("!" <= char <= "~" for char in token):
        given = (
            "--token"
            if args.token
            else "EXTRACTS_TOKEN"
            if os.environ.get("EXTRACTS_TOKEN")
            else f"the token file {token_file()}"
        )
        bad_option(f"{given}: a token is printable ASCII without spaces; this one is not")


ZIP_START = b"PK\x03\x04"  # a local file header: what every ZIP, and so every partial download, begins with


def check_download(given: str, bad_option: Callable[[str], NoReturn]) -> None:
    """Refuse (exit 2) a --download PATH the ZIP cannot be written to, before the run starts."""
    if not given:  # Path("") is ".": the ZIP went into the current directory
        bad_option("--download: give a file or a directory, not ''")
    target = Path(given)
    if target.is_dir():
        folder = target
    elif given.endswith(("/", os.sep)):  # a trailing slash means a directory (Path drops it)
        bad_option(f"--download: {given}: no such directory")
    else:
        folder = target.absolute().parent
        if not folder.is_dir():
            bad_option(f"--download: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        bad_option(f"--download: the directory {folder} is not writable")
    if target.exists() and not (target.is_file() or target.is_dir()):  # a FIFO would be waited on
        bad_option(
            f"--download: {given} is not a regular file (a named pipe, a device or a socket); "
            "the ZIP replaces a file, never one of these"
        )
    if not target.is_file():
        return
    try:
        with open(target, "rb") as file:
            start = file.read(len(ZIP_START))
    except OSError as exc:
        bad_option(f"--download: {given} cannot be read ({exc.strerror}): remove it or give another path")
    if start and start != ZIP_START[: len(start)]:
        bad_option(
            f"--download: {given} exists and does not begin as a ZIP does, so it is no partial download; "
            "it is left as it is: remove it or give another path"
        )
    if not os.access(target, os.W_OK):
        bad_option(f"--download: {given} is not writable")


_ARTIFACT_FIELDS = {"artifact_type", "artifact_name", "schema_name", "records"}  # what the view reads


def run_artifacts(client: Client, run_id: str) -> list[dict[str, Any]]:
    """Every artifact of the run, a page at a time (split files can make thousands)."""
    found: list[dict[str, Any]] = []
    while True:
        query = {
            "filter[where][run_id]": run_id,
            "filter[order]": "created_at asc",
            "filter[limit]": str(_PAGE),
            "filter[offset]": str(len(found)),
        }
        page = client.call("GET", "/api/data/extract_artifacts?" + urlencode(query))
        if not (
            isinstance(page, list)
            and all(isinstance(item, dict) and item.keys() >= _ARTIFACT_FIELDS for item in page)
        ):
            raise Failed(
                "GET /api/data/extract_artifacts: the answer is not a list of artifacts; "
                f"is {client.url} the service?"
            )
        found += page
        if len(page) < _PAGE:
            return found


_DETAIL_COUNTS = ("schemas_total", "schemas_completed", "records_exported", "records_total")


def checked_run(run: Any, path: str, client: Client) -> dict[str, Any]:
    """``run`` if it holds every field watching it reads, else Failed naming those it lacks."""
    if not isinstance(run, dict):
        raise Failed(f"GET {path}: the answer is not a run; is {client.url} the service?")
    detail = run.get("progress_detail")
    wrong = [
        name
        for name, ok in [
            ("status", isinstance(run.get("status"), str)),
            ("error", isinstance(run.get("error", 0), str | None)),
            ("records_exported", isinstance(run.get("records_exported", ""), int | None)),
            ("progress_detail", isinstance(detail, dict)),
        ]
        if not ok
    ]
    if isinstance(detail, dict):
        wrong += [
            f"progress_detail.{name}"
            for name, ok in [
                ("phase", isinstance(detail.get("phase"), str)),
                ("current_schema", isinstance(detail.get("current_schema", 0), str | None)),
                *((count, isinstance(detail.get(count), int)) for count in _DETAIL_COUNTS),
            ]
            if not ok
        ]
    if wrong:
        raise Failed(
            f"GET {path}: the run lacks {', '.join(wrong)} (or they are not what a run holds); "
            f"is {client.url} the service?"
        )
    return run


def _where(run: dict[str, Any]) -> tuple[str, str | None, Any]:
    return run["status"], run["progress_detail"]["current_schema"], run.get("started_at")


def watch(client: Client, run_id: str, view: View) -> dict[str, Any]:
    """Poll the run until it ends, feeding ``view``; returns the ended run.

    The files are listed between two reads of the run that agree on where it is: a
    listing taken after a single read can hold the first part of a schema the read
    had not reached yet, which would then count as that schema's whole. A run put
    back in the queue (its service stopped gracefully) loses its files and starts
    again: a new ``started_at`` (or none) says so, and the view forgets the files of
    the earlier attempt rather than count them with the next one's.
    """
    path = f"/api/data/extract_runs/{run_id}"
    schema, began = None, None
    while True:
        run = checked_run(client.call("GET", path), path, client)
        detail = run["progress_detail"]
        ended = run["status"] in _ENDED
        # A schema ended (its line needs its files), or the run started again.
        if ended or detail["current_schema"] != schema or (began and run.get("started_at") != began):
            while True:
                listed = run_artifacts(client, run_id)
                again = checked_run(client.call("GET", path), path, client)
                if _where(again) == _where(run):
                    break
                run = again
            if began and run.get("started_at") != began:
                view.restarted()
            began = run.get("started_at")
            view.artifacts(listed)
            detail = run["progress_detail"]
            ended = run["status"] in _ENDED
            schema = detail["current_schema"]
        if ended:
            detail = {**detail, "phase": run["status"]}
            if run["status"] == RunStatus.COMPLETED:
                detail["records_exported"] = run["records_exported"] or detail["records_exported"]
        view.update(detail)
        if ended:
            return run
        time.sleep(POLL_S)


def _span(client: Client, path: str, start: int, end: int) -> bytes | None:
    """Bytes ``start`` to ``end`` (excluded) of the download; None if the service sends no part."""
    with client.open(client.request("GET", path, {"Range": f"bytes={start}-{end - 1}"})) as response:
        if response.status != 206:
            return None
        try:
            return response.read(end - start + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise Failed(f"GET {path} (bytes {start}-{end - 1}) stopped: {exc}; run it again") from None


def is_partial(client: Client, path: str, target: Path, have: int, size: int) -> bool:
    """Whether the file at ``target`` (``have`` bytes) looks like the start of the download.

    Its first and last ``_SAMPLE`` bytes must be the ZIP's at the same offsets: a file that is not
    a partial download of this ZIP (the user's own, another run's) is never appended to. What the
    samples cannot see, ``verify`` catches once the file is whole.
    """
    if have > size:
        return False
    try:
        with open(target, "rb") as file:
            # From byte 1: a GET from byte 0 is counted as a download (SPEC), and byte 0 of
            # a ZIP is always "P"; the check before the run saw it.
            for start in sorted({min(1, have), max(1, have - _SAMPLE)}):
                end = min(have, start + _SAMPLE)
                if end <= start:
                    continue
                file.seek(start)
                if file.read(end - start) != _span(client, path, start, end):
                    return False
            file.seek(0)
            return file.read(1) == ZIP_START[:1]
    except OSError as exc:
        reason = exc.strerror or exc
        raise Failed(f"{target} cannot be read ({reason}): remove it or give another path") from None


def download(client: Client, run_id: str, target: Path, view: View) -> tuple[Path, bool]:
    """The run's ZIP at ``target`` (a file, or a directory to put it in), resuming a partial file.

    A connection lost midway is resumed from where it stopped (``RETRIES`` times). Returns the
    file and whether it was resumed. A file found there is resumed only when it starts and ends
    as the ZIP's bytes do (``is_partial``); another ZIP there is replaced once the new one is
    whole beside it (``.NAME.RUN.part``, itself resumed); ``verify`` then checks the whole. A
    partial file is kept on failure, for the next attempt.
    """
    path = f"/api/extracts/runs/{run_id}/download"
    with client.open(client.request("HEAD", path)) as head:
        length, etag = head.headers.get("Content-Length", ""), head.headers.get("ETag")
        name = head.headers.get("Content-Disposition", "").partition('filename="')[2].rstrip('"')
    # Both are needed to resume: the size says where the ZIP ends, the ETag that it is the same one.
    lacking = [
        header
        for header, ok in (("Content-Length", length.isascii() and length.isdigit()), ("ETag", etag))
        if not ok
    ]
    if lacking:
        raise Failed(
            f"HEAD {path}: the answer has no {' or '.join(lacking)} (a ZIP download has both); "
            f"is {client.url} the service?"
        )
    size = int(length)
    if target.is_dir():
        # The service names a ZIP as a file name; "../x.zip" or an absolute path from a server
        # would put it (or rename it over a file) outside the directory given.
        if name and (name.startswith(".") or any(char in name for char in "/\\\0")):
            raise Failed(
                f"HEAD {path}: the file name {name!r} in its Content-Disposition is not one file name "
                f"(the service's never holds a / nor starts with a dot); is {client.url} the service?"
            )
        target = target / (name or f"{run_id}.zip")
    into = target
    first = target.stat().st_size if target.is_file() else 0
    if first and not is_partial(client, path, target, first, size):
        # Another ZIP (the check before the run refused any other file): last night's download,
        # replaced as `export -o` replaces, once the new one is whole beside it.
        into = target.with_name(f".{target.name}.{run_id}.part")
        first = into.stat().st_size if into.is_file() else 0
        if first and not is_partial(client, path, into, first, size):
            into.unlink()  # an earlier try's, of a ZIP since changed: fetched whole
            first = 0
    resumed = first > 0
    for attempt in range(RETRIES + 1):
        have = into.stat().st_size if into.is_file() else 0
        if have == size:
            break
        # If-Range: should the archive have changed, the answer is all of it (200), not a part.
        headers = {"Range": f"bytes={have}-", "If-Range": etag} if 0 < have < size else {}
        try:
            with client.open(client.request("GET", path, headers)) as response:
                partial = response.status == 206
                resumed = resumed and partial
                _save(response, into, "ab" if partial else "wb")
        except _Dropped as exc:
            if attempt == RETRIES:
                raise Failed(
                    f"the download of {target} stopped: {exc}; run the command again to resume"
                ) from None
            view.note(f"the download stopped ({exc}); resuming")
    if into != target:
        try:
            os.replace(into, target)
        except OSError as exc:
            raise Failed(f"cannot replace {target}: {exc.strerror or exc}; the new ZIP is {into}") from None
    how = f"resumed at byte {first:,}" if resumed else "whole"
    view.note(f"Downloaded {target} ({size:,} bytes, {how})")
    return target, resumed


class _Dropped(Exception):
    """The connection broke while the body was read: the download resumes."""


def _save(response: Any, target: Path, mode: str) -> None:
    """The response's body into ``target``; a local file error is Failed, never a dropped connection."""
    try:
        with open(target, mode) as out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Dropped(exc) from None
                if not chunk:
                    return
                out.write(chunk)
    except OSError as exc:  # opening, writing or closing the local file
        raise Failed(
            f"cannot write {target}: {exc.strerror or exc}; the run's ZIP stays on the service"
        ) from None


def run_remote(args: argparse.Namespace, bad_option: Callable[[str], NoReturn]) -> int:
    # Given empty, they were dropped for the defaults: the local service, the token file.
    if args.url == "":
        bad_option("--url: give the service's URL, not ''")
    if args.token == "":
        bad_option("--token: give the token, not ''")
    url = args.url or default_url()
    token = args.token or default_token()
    if not token:
        path = token_file()
        beside = "a PostgreSQL state keeps none" if path is None else path
        bad_option(
            f"--token: none given, no EXTRACTS_TOKEN, and no token file beside the state file ({beside}); "
            "the service prints its token when it starts"
        )
    check_options(args, url, token, bad_option)
    if args.download is not None:
        try:
            check_download(args.download, bad_option)
        except OSError as exc:  # a name too long, a directory it may not search
            bad_option(f"--download: {exc.filename}: {exc.strerror or exc}")
    client = Client(url, token)
    view: View | None = None
    try:
        extract = find_extract(client, args.extract)
        started = client.call("POST", f"/api/extracts/{quote(extract['id'], safe='')}/run")
        if not (isinstance(started, dict) and isinstance(started.get("run_id"), str)):
            raise Failed(f"the service at {url} started no run: its answer has no run_id")
        run_id = started["run_id"]
        if not RUN_ID.fullmatch(run_id):  # it goes into URLs and a file name beside --download PATH
            raise Failed(
                f"POST /api/extracts/{quote(extract['id'], safe='')}/run: the run_id {run_id!r} is not a "
                f"run's id (run_ and letters, digits, - or _); is {url} the service?"
            )
        if not args.quiet:
            said = started.get("message") or "started"
            print(f"Run {run_id} of {extract['name']!r} ({extract['id']}): {said}", file=sys.stderr)
        if not (args.wait or args.download):
            return 0
        view = make_view(args.quiet)
        run = watch(client, run_id, view)
        view.close()
        if run["status"] != RunStatus.COMPLETED:
            print(
                f"extracts-app: run {run_id} {run['status']}: {run['error'] or 'no error given'}"
                + _retried_as(run),
                file=sys.stderr,
            )
            return 1
        view.note(f"Run {run_id} completed: {run['records_exported'] or 0:,} records")
        if args.download:
            return _download_and_verify(client, run_id, Path(args.download), view, args.quiet)
        return 0
    except Failed as exc:
        if view is not None:
            view.close()
        print(f"extracts-app: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if view is not None:
            view.close()
        print(
            "extracts-app: interrupted; the run goes on in the service (cancel it with POST "
            "/api/extracts/<id>/cancel); a partial download resumes with the same --download PATH",
            file=sys.stderr,
        )
        return 130


def _retried_as(run: dict[str, Any]) -> str:
    """What follows a failed run the service retries (SPEC: Retries): the retry is a run of its own,
    which this command does not wait for; its id is how to follow it."""
    retry = run.get("retry_run_id")
    if not (isinstance(retry, str) and RUN_ID.fullmatch(retry)):
        return ""
    return f"; the service retries it as {retry} (GET /api/data/extract_runs/{retry})"


def _download_and_verify(client: Client, run_id: str, target: Path, view: View, quiet: bool) -> int:
    """Download, then ``verify``; a resumed file that does not verify is fetched again whole, once."""
    from extracts.verify import verify_path

    path, resumed = download(client, run_id, target, view)
    with open(os.devnull, "w") if quiet else contextlib.nullcontext(sys.stderr) as out:
        if verify_path(path, out):
            return 0
        if resumed:
            view.note(f"{path} did not verify after resuming: downloading it again whole")
            path.unlink()
            path, _ = download(client, run_id, path, view)
            if verify_path(path, out):
                return 0
    print(f"extracts-app: {path} does not match its manifest (lines above)", file=sys.stderr)
    return 1
