"""Start-up: everything checked before the service listens, and the banner it prints.

Fails fast with one line (SPEC: Starting it): an address that cannot be
listened on, a state file that cannot be written, storage that cannot be
written, a source that cannot be opened, a token file that cannot be read or
written. A storage volume under the free-space reserve only warns: downloads
keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import socket
import sqlite3
from pathlib import Path

from executor.credentials import blank, redact, source_secrets
from executor.sources import SourceError, open_source
from extracts import state
from extracts.settings import Settings
from extracts.storage import StorageError, open_storage
from extracts.storage.local import LocalStorage


class StartupError(Exception):
    """The service cannot start; the message is the one line printed before exiting."""


SEVERAL = (
    "several instances need --db postgresql://… and an object store --storage "
    "(README: Running several instances)"
)


def check_address(host: str, port: int) -> None:
    """Whether ``host:port`` can be listened on, bound by asyncio's server as uvicorn's will be.

    uvicorn binds only after the app's start-up: a port in use or a host that does not
    resolve failed after the banner had said "listening on", the start-up's work done.
    asyncio's own server binds here (not listening): a copy of its rules drifts from them
    (an address family the kernel lacks is skipped; from Python 3.13, so is an address the
    machine does not have, ::1 of ``localhost`` without IPv6).
    """

    async def bind() -> None:
        server = await asyncio.get_running_loop().create_server(
            asyncio.Protocol, host, port, start_serving=False
        )
        server.close()
        await server.wait_closed()

    try:
        asyncio.run(bind())
    except (socket.gaierror, UnicodeError) as exc:
        raise StartupError(f"--host {host}: not an address this machine can listen on ({exc})") from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartupError(f"cannot listen on {host}:{port}: {reason}") from None


def prepare(settings: Settings) -> None:
    """Fail fast on anything that would stop the service working (SPEC: Starting it)."""
    check_address(settings.host, settings.port)
    if isinstance(settings.db, Path):
        # Beside the file the state is (symlinks followed): every name of it finds the one lock.
        real = settings.db.resolve()
        hold_alone(real.with_name(real.name + ".lock"), f"the state file {settings.db}")
        # And on the file itself, for the names a path cannot show (a hard link): SQLite's own
        # locks are POSIX ones, which flock's do not touch. Through another name SQLite would
        # also use another -wal file: two instances would corrupt the state, not just share it.
        hold_alone(
            settings.db, f"the state file {settings.db} (by another name: a hard link?)", write_pid=False
        )
        try:
            state.prepare_state_file(settings.db)
        except (OSError, sqlite3.Error) as exc:
            raise StartupError(f"cannot write the state file {settings.db}: {exc}") from exc
    else:
        if settings.token is None:  # a generated one would differ from instance to instance
            raise StartupError(
                "give --token [EXTRACTS_TOKEN]: instances sharing --db postgresql://… share one token"
            )
        try:
            state.prepare_postgres(settings.db, state.heartbeat_seconds(settings.lease_seconds))
        except Exception as exc:  # noqa: BLE001 — psycopg's errors, a newer schema: one line either way
            reason = blank(" ".join(str(exc).split()), source_secrets(settings.db))
            raise StartupError(f"cannot prepare the state database {redact(settings.db)}: {reason}") from None
    try:
        storage = open_storage(settings.storage, settings.storage_endpoint)
        storage.probe()
    except StorageError as exc:
        raise StartupError(str(exc)) from exc
    if isinstance(storage, LocalStorage):
        hold_alone(storage.root / ".extracts.lock", f"the storage directory {storage.root}")
    if settings.source is None:
        demo = settings.home / "demo.db"
        if not demo.exists():
            from executor.demo import create_demo_database

            try:
                create_demo_database(demo)
            except (OSError, sqlite3.Error) as exc:
                raise StartupError(f"cannot create the demo database {demo}: {exc}") from exc
        settings.source = str(demo)
        settings.demo = True
    try:
        with open_source(settings.source) as source:
            source.names()
    except SourceError as exc:
        reason = blank(str(exc), source_secrets(settings.source))
        raise StartupError(f"cannot open the source: {reason}") from exc
    if settings.token is None:
        settings.token, settings.token_generated = load_or_create_token(settings.db)  # SQLite state
    free = storage.free_bytes()
    if free is not None and free >> 20 < settings.min_free_mb:
        settings.notes.append(
            f"warning: only {free >> 20} MB free on the storage volume {settings.storage}, under the "
            f"{settings.min_free_mb} MB reserve (--min-free-mb): runs will fail until space is "
            "freed; downloads keep working"
        )


_HELD: list[int] = []  # the lock files' descriptors, open for the life of the process


def hold_alone(path: Path, what: str, write_pid: bool = True) -> None:
    """Take the lock file beside ``what`` for this process's life; refuse when another instance has it.

    A SQLite state file and a local storage directory serve one instance
    (SPEC: Beyond one machine). The kernel drops the lock when the process
    ends, however it ends. ``write_pid``: this process's pid goes in ``path``,
    for the message a second instance gets (never in the state file itself,
    created as SQLite creates it: 0644 before the umask).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Read-only: an open file to write would stop the volume being remounted read-only.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600 if write_pid else 0o644)
    except OSError:
        return  # the state or storage check that follows says why it cannot be written
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() if write_pid else ""
        os.close(fd)
        by = f" (pid {holder})" if holder else ""
        raise StartupError(f"{what} is in use by another extracts-app{by}; {SEVERAL}") from None
    if write_pid:
        with contextlib.suppress(OSError):
            path.write_text(str(os.getpid()))
    _HELD.append(fd)


def load_or_create_token(db: Path) -> tuple[str, bool]:
    """The token kept beside the state file, created (mode 0600) on first start."""
    path = db.with_name(db.name + ".token")
    try:
        token = path.read_text().strip()
        if token:
            return token, True
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot read the token file {path}: {exc.strerror}") from exc
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.chmod(path, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot write the token file {path}: {exc.strerror}") from exc
    return token, True


def banner(settings: Settings) -> list[str]:
    url = f"http://{settings.host}:{settings.port}"
    lines = []
    if settings.demo:
        lines.append(
            f"No --source given: serving the demo SQLite database {settings.source} "
            "(users, orders, products, order_items)."
        )
    else:
        lines.append(f"Exporting from {redact(settings.source)}.")
    lines.append(
        f"Extracts listening on {url} — state {redact(str(settings.db))}, storage {settings.storage}, "
        f"{settings.workers} worker(s)."
    )
    if settings.token_generated:
        lines.append(f"Token (kept in {settings.db}.token): {settings.token}")
        lines.append(f"Try: curl -H 'Authorization: Bearer {settings.token}' {url}/api/describe")
    else:
        lines.append(f'Try: curl -H "Authorization: Bearer $EXTRACTS_TOKEN" {url}/api/describe')
    lines.append(
        f"Web page: {url}/ (paste the token there); Prometheus metrics: {url}/metrics (with the token)."
    )
    return lines + settings.notes
