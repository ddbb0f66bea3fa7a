"""Start-up: everything checked before the service listens, and the banner it prints.

Fails fast with one line (SPEC: Starting it): a state file that cannot be
written, storage that cannot be written, a source that cannot be opened, a
token file that cannot be read or written. A storage volume under the
free-space reserve only warns: downloads keep working.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from pathlib import Path

from executor.credentials import blank, redact, source_secrets
from executor.sources import SourceError, open_source
from extracts import state
from extracts.settings import Settings
from extracts.storage import StorageError, open_storage


class StartupError(Exception):
    """The service cannot start; the message is the one line printed before exiting."""


def prepare(settings: Settings) -> None:
    """Fail fast on anything that would stop the service working (SPEC: Starting it)."""
    try:
        state.prepare_state_file(settings.db)
    except (OSError, sqlite3.Error) as exc:
        raise StartupError(f"cannot write the state file {settings.db}: {exc}") from exc
    try:
        storage = open_storage(settings.storage, settings.storage_endpoint)
        storage.probe()
    except StorageError as exc:
        raise StartupError(str(exc)) from exc
    if settings.source is None:
        demo = settings.db.with_name("demo.db")
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
        settings.token, settings.token_generated = load_or_create_token(settings.db)
    free = storage.free_bytes()
    if free is not None and free >> 20 < settings.min_free_mb:
        settings.notes.append(
            f"warning: only {free >> 20} MB free on the storage volume {settings.storage}, under the "
            f"{settings.min_free_mb} MB reserve (--min-free-mb): runs will fail until space is "
            "freed; downloads keep working"
        )


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
        f"Extracts listening on {url} — state {settings.db}, storage {settings.storage}, "
        f"{settings.workers} worker(s)."
    )
    if settings.token_generated:
        lines.append(f"Token (kept in {settings.db}.token): {settings.token}")
        lines.append(f"Try: curl -H 'Authorization: Bearer {settings.token}' {url}/api/describe")
    else:
        lines.append(f'Try: curl -H "Authorization: Bearer $EXTRACTS_TOKEN" {url}/api/describe')
    return lines + settings.notes
