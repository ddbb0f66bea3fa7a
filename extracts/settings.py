"""The service's start-up options: one table of flag, environment variable, default and help.

Read once at start-up (Datasette's ``SETTINGS``): a flag wins over the
variable, the variable over the default. ``README.md`` lists the same table.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from executor.sources.sqlite import sqlite_path
from extracts.dialects import SQLITE, dialect_of
from extracts.storage import OBJECT_SCHEMES, is_endpoint

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
MAX_WORKERS = 256  # worker processes one instance may start (50-100 MiB each)
# A lease is added to the clock as a timedelta: far past a day, lease_expires_at leaves the
# calendar (year 9999) and every claim of a run failed with OverflowError, the runs left queued.
MAX_LEASE_SECONDS = 86_400


class Once(argparse.Action):
    """An option that holds one value: given twice, it is refused (exit 2) rather than the
    last one silently winning, as query parameters are refused when repeated. A second
    ``--filter`` dropped the first (every row of its schema exported), a second ``--format``
    or ``-o`` the first."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        given = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in given:
            parser.error(f"{'/'.join(self.option_strings)} is given more than once; give it once")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


@dataclass(frozen=True)
class Setting:
    """One start-up option: flag ``--name``, environment variable, default, help."""

    name: str
    default: Any
    env: str
    help: str
    type: Callable[[str], Any] = str
    metavar: str | None = None


SETTINGS = (
    Setting(
        "source",
        None,
        "EXTRACTS_SOURCE",
        "the database to export: a SQLite file path, "
        "sqlite:///relative/path, sqlite:////absolute/path, postgresql://… or mysql://… "
        "(default: a demo SQLite database created beside the state file)",
        metavar="URL|PATH",
    ),
    Setting(
        "db",
        "./extracts.db",
        "EXTRACTS_DB",
        "the service's own state: a SQLite file, or postgresql://… shared by several instances",
        metavar="PATH|URL",
    ),
    Setting(
        "storage",
        "/tmp/extracts",
        "EXTRACTS_STORAGE",
        "where artifacts are written: a directory, or an object store s3://bucket/prefix, "
        "gs://bucket/prefix, az://container/prefix",
        metavar="DIR|URL",
    ),
    Setting(
        "storage_endpoint",
        None,
        "EXTRACTS_STORAGE_ENDPOINT",
        "the object store's endpoint (S3-compatible stores, emulators); default: the cloud's own",
        metavar="URL",
    ),
    Setting("host", "127.0.0.1", "EXTRACTS_HOST", "address to listen on"),
    Setting("port", 9001, "EXTRACTS_PORT", "port to listen on", int),
    Setting(
        "token",
        None,
        "EXTRACTS_TOKEN",
        "bearer token; when absent one is generated and kept in <state file>.token (mode 0600)",
    ),
    Setting(
        "workers",
        min(os.cpu_count() or 1, MAX_WORKERS),
        "EXTRACTS_WORKERS",
        "size of the process pool: runs executed at once",
        int,
        metavar="N",
    ),
    Setting(
        "min_free_mb",
        100,
        "EXTRACTS_MIN_FREE_MB",
        "free space to keep on the storage volume; a run fails cleanly when free space falls under it",
        int,
        metavar="MB",
    ),
    Setting(
        "lease_seconds",
        30,
        "EXTRACTS_LEASE_SECONDS",
        "how long a run stays its instance's without a heartbeat; past it, another instance "
        "fails the run as interrupted and retries it",
        float,
        metavar="SECONDS",
    ),
    Setting(
        "cleanup_interval",
        3600,
        "EXTRACTS_CLEANUP_INTERVAL",
        "seconds between retention sweeps of expired artifacts",
        float,
        metavar="SECONDS",
    ),
)


@dataclass
class Settings:
    """The resolved start-up options (flag, else environment variable, else default)."""

    source: str | None
    db: Path | str  # a SQLite file, or a postgresql:// URL
    storage: str
    storage_endpoint: str | None
    host: str
    port: int
    token: str | None
    workers: int
    min_free_mb: int
    lease_seconds: float
    cleanup_interval: float
    demo: bool = False

    @property
    def shared(self) -> bool:
        """The state is PostgreSQL: several instances may serve it together."""
        return isinstance(self.db, str)

    @property
    def home(self) -> Path:
        """Where the demo database and the generated token live: beside the state file, or here."""
        return self.db.parent if isinstance(self.db, Path) else Path.cwd()

    token_generated: bool = False
    notes: list[str] = field(default_factory=list)


def parse_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="extracts-app",
        description="Export a database into downloadable, checksummed files over HTTP.",
        epilog="Without a service: extracts-app export SOURCE | verify PATH | run EXTRACT "
        "(extracts-app COMMAND --help). 'extracts-app serve [options]' is the service too.",
    )
    for s in SETTINGS:
        parser.add_argument(
            f"--{s.name.replace('_', '-')}",
            dest=s.name,
            metavar=s.metavar,
            help=f"{s.help} [{s.env}]",
        )
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = getattr(args, s.name)
        # As an empty variable is unset; given on the command line, an empty value is a mistake:
        # --host '' bound every interface, --storage '' and --db '' took the current directory.
        if raw == "":
            parser.error(
                f"--{s.name.replace('_', '-')} [{s.env}] must not be empty; leave it out for its default"
            )
        if raw is None:
            raw = environ.get(s.env) or None
        if raw is None:
            values[s.name] = s.default
            continue
        try:
            values[s.name] = s.type(raw)
        except ValueError:
            parser.error(f"--{s.name.replace('_', '-')} [{s.env}]: {raw!r} is not a valid {s.type.__name__}")
        # float() takes 'nan', 'inf' and '1e400': no range check refuses NaN (every comparison
        # is false), and either ended in a traceback at start-up or a timer that never fires.
        if isinstance(values[s.name], float) and not math.isfinite(values[s.name]):
            parser.error(f"--{s.name.replace('_', '-')} [{s.env}]: {raw!r} is not a finite number of seconds")
    # Every worker is started with the pool: --workers 100000 would fork until the machine gave out.
    if not 1 <= values["workers"] <= MAX_WORKERS:
        parser.error(f"--workers [EXTRACTS_WORKERS] must be between 1 and {MAX_WORKERS}")
    # Out of range, the bind raised OverflowError, which uvicorn does not catch: a traceback or a hang.
    if not 1 <= values["port"] <= 65535:
        parser.error("--port [EXTRACTS_PORT] must be between 1 and 65535")
    if values["min_free_mb"] < 0:
        parser.error("--min-free-mb [EXTRACTS_MIN_FREE_MB] must be at least 0")
    if values["token"] is not None:  # an empty token would let "Authorization: Bearer" in
        values["token"] = values["token"].strip()
        if not values["token"]:
            parser.error("--token [EXTRACTS_TOKEN] must not be empty")
    if not 1 <= values["lease_seconds"] <= MAX_LEASE_SECONDS:
        parser.error(f"--lease-seconds [EXTRACTS_LEASE_SECONDS] must be between 1 and {MAX_LEASE_SECONDS:,}")
    if values["cleanup_interval"] <= 0:
        parser.error("--cleanup-interval [EXTRACTS_CLEANUP_INTERVAL] must be positive")
    # A URL of another kind is refused: taken as a path, "mysql://h/db" made a directory "mysql:".
    if dialect_of(values["db"]) is SQLITE:
        if _scheme(values["db"]) not in (None, "sqlite"):
            parser.error(
                f"--db [EXTRACTS_DB]: {_scheme(values['db'])}:// is no state database; "
                "give a SQLite file (a path or sqlite:///path) or postgresql://…"
            )
        values["db"] = sqlite_path(values["db"])
    if _scheme(values["storage"]) is None:
        values["storage"] = str(Path(values["storage"]).expanduser().absolute())
    elif _scheme(values["storage"]) not in OBJECT_SCHEMES:
        parser.error(
            f"--storage [EXTRACTS_STORAGE]: {_scheme(values['storage'])}:// is no storage; give a "
            "directory or s3://bucket/prefix, gs://bucket/prefix, az://container/prefix"
        )
    endpoint = values["storage_endpoint"]
    if endpoint is not None and _scheme(values["storage"]) is None:  # it would be ignored
        parser.error(
            "--storage-endpoint [EXTRACTS_STORAGE_ENDPOINT]: only an object store --storage "
            f"(s3://, gs://, az://) has an endpoint; the storage is the directory {values['storage']}"
        )
    if endpoint is not None and not is_endpoint(endpoint):
        # Given to the store unchecked, "localhost:9000" made obstore panic: a traceback.
        parser.error(
            "--storage-endpoint [EXTRACTS_STORAGE_ENDPOINT]: not an http:// or https:// URL with a "
            "host (and a port from 1 to 65535), such as http://127.0.0.1:9000"
        )
    return Settings(**values)


def _scheme(location: str) -> str | None:
    """The URL scheme ``location`` starts with (lower case), None for a path."""
    found = _SCHEME.match(location)
    return found.group(1).lower() if found else None
