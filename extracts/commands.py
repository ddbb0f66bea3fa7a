"""The commands beside the service (SPEC: Command line): ``export``, ``verify`` and ``run``.

``run_command(argv)`` parses one of them and returns its exit status: 0 done,
1 failed (one line on stderr says why), 2 a bad option (argparse's usage
line, naming it), 130 stopped by Ctrl-C. ``extracts_app.main`` (the console
script's too) sends these words here before it imports the service; anything
else starts the service.

Nothing here imports the service (Starlette, databases, SQLAlchemy): an
export starts in a tenth of a second. So the options are checked here, with
the same rules as an extract's fields (``extracts.config``; a test keeps the
choices and defaults equal) and the same source checks (``Catalog.check``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from executor.credentials import blank, source_secrets
from executor.filters import DuplicateKey, check_where, loads_exact
from executor.messages import RunConfig
from executor.sources import SourceError, open_source
from executor.sources.sqlitetext import spellable
from extracts.settings import Once

COMMANDS = ("export", "verify", "run")
FORMATS = ("jsonl", "json", "yaml", "archive")  # extracts.config.FORMATS
INCLUDE = ("describe", "data")
SPLIT_MAX = 100_000_000  # extracts.config: split_max_records between 1 and this
NAME_MAX = 200  # extracts.config.NAME_MAX
DEFAULT_RETENTION_DAYS = 7  # in the run's config snapshot, as an extract's default; unused here


def run_command(argv: list[str], own_process: bool = False) -> int:
    """Run ``export``, ``verify`` or ``run`` with its options; returns the exit status.

    ``own_process``: this process holds no SQLite connection and will open none
    but the export's (the console script), so an export may first turn SQLite's
    allocation statistics off (``executor.sources.sqlitemem``), which is only
    safe with no connection open anywhere in the process.
    """
    try:
        parser, subs = _parser()
        args = parser.parse_args(argv)
        command, sub = args.command, subs[args.command]
        check_text(args, sub.error)
        if command == "export":
            if own_process:
                from executor.sources.sqlitemem import turn_off_memory_statistics

                turn_off_memory_statistics()
            return _export(sub, args, own_process)
        if command == "verify":
            from extracts.verify import verify_path

            if not args.path:  # Path("") is ".", the current directory
                sub.error("PATH: give a ZIP, a run directory or a tarball, not ''")
            path = Path(args.path)
            try:
                exists = path.exists()
            except OSError as exc:  # a name too long, a directory it may not search
                sub.error(f"PATH: {exc.filename}: {exc.strerror or exc}")
            if not exists:
                sub.error(f"PATH: {path} does not exist")
            return 0 if verify_path(path, sys.stdout) else 1
        from extracts.remote import run_remote

        return run_remote(args, sub.error)
    except KeyboardInterrupt:  # before the export's own handling (or verify's, run's)
        print("extracts-app: interrupted; nothing was written", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- the parsers


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="extracts-app", description="Export a database to checksummed files."
    )
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = subs.add_parser(
        "export",
        help="export a database here and now, without a service",
        description="Export SOURCE into a ZIP (-o) or a directory (-d): the service's files and manifest, "
        "without a service. Progress goes to stderr.",
    )
    export.add_argument(
        "source", metavar="SOURCE", help="a SQLite file, sqlite:///…, postgresql://… or mysql://…"
    )
    export.add_argument(
        "--schemas", action="append", metavar="NAME[,NAME…]", help="tables and views (default: every table)"
    )
    export.add_argument(
        "--format", action=Once, default="jsonl", choices=FORMATS, help="data file format (default: jsonl)"
    )
    export.add_argument(
        "--include",
        action="append",
        metavar="describe,data",
        help="what to write (default: both); repeatable",
    )
    export.add_argument(
        "--filter",
        action=Once,
        metavar="JSON",
        help='rows to keep: {"<schema>": {"where": {…}}}, as an extract\'s filter',
    )
    export.add_argument("--no-compress", action="store_true", help="plain data files, not gzip'd")
    export.add_argument(
        "--split-max-records",
        action=Once,
        type=int,
        metavar="N",
        help="split each schema into parts of N records",
    )
    export.add_argument(
        "--name", action=Once, help="the extract name in the manifest and the ZIP name (default: from SOURCE)"
    )
    out = export.add_mutually_exclusive_group()
    out.add_argument(
        "-o",
        "--output",
        action=Once,
        metavar="ZIP",
        help="the ZIP to write (default: <name>-<date>-<run>.zip here)",
    )
    out.add_argument(
        "-d",
        "--directory",
        action=Once,
        metavar="DIR",
        help="write the files into DIR (new or empty) instead",
    )
    export.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

    verify = subs.add_parser(
        "verify",
        help="check a ZIP, run directory or archive tarball against its manifest",
        description="Check every file against the manifest: present, size, SHA-256, records of JSON lines "
        "files. One line per file; exit status 0 only when all match.",
    )
    verify.add_argument("path", metavar="PATH", help="a ZIP, a run directory, or an archive .tar/.tar.gz")

    run = subs.add_parser(
        "run",
        help="start a run on a running service, wait for it, download it",
        description=(
            "Start a run of EXTRACT on a service; exit status 0 once it is queued, and with --wait "
            "or --download only when it completed."
        ),
    )
    run.add_argument("extract", metavar="EXTRACT", help="the extract's id or exact name")
    run.add_argument(
        "--url",
        action=Once,
        help="the service (default: $EXTRACTS_URL, else http://EXTRACTS_HOST:EXTRACTS_PORT)",
    )
    run.add_argument(
        "--token",
        action=Once,
        help="bearer token (default: $EXTRACTS_TOKEN, else the token file beside EXTRACTS_DB)",
    )
    run.add_argument("--wait", action="store_true", help="show the run's progress until it ends")
    run.add_argument(
        "--download",
        action=Once,
        metavar="PATH",
        help="then fetch its ZIP to PATH (resumes a partial file; implies --wait)",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return parser, {"export": export, "verify": verify, "run": run}


# Options that are text (names, JSON, URLs): on POSIX, argv bytes that are not UTF-8 reach Python
# as lone surrogates, which no manifest, JSON or HTTP request can carry. Paths (-o, -d,
# --download) are bytes to the OS and may hold them; SOURCE is opened through a URI, so it may not.
TEXT_OPTIONS = {
    "export": (
        ("source", "SOURCE"),
        ("schemas", "--schemas"),
        ("include", "--include"),
        ("filter", "--filter"),
        ("name", "--name"),
    ),
    "run": (("extract", "EXTRACT"), ("url", "--url"), ("token", "--token")),
}


def check_text(args: argparse.Namespace, fail: Any) -> None:
    """Refuse (exit 2) a text option holding bytes that are not UTF-8, before any work."""
    for dest, option in TEXT_OPTIONS.get(args.command, ()):
        value = getattr(args, dest)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and not spellable(item):  # UTF-8 text: no lone surrogates
                fail(f"{option}: {os.fsencode(item)!r} holds bytes that are not UTF-8; give it as UTF-8 text")


# ---------------------------------------------------------------- export


def _names(values: list[str] | None, option: str, fail: Any) -> list[str] | None:
    """The comma-separated names of an option (None when not given); an empty one is refused."""
    if values is None:
        return None
    names = [name.strip() for value in values for name in value.split(",")]
    if not all(names):  # "--schemas ," would be no schema, which the service refuses, not every table
        fail(f"{option}: {','.join(values)!r} holds an empty name (two commas, or one at an end)")
    return names


def export_config(args: argparse.Namespace, fail: Any) -> RunConfig:
    """The run's configuration from the options; ``fail(message)`` names a bad one (exit 2)."""
    include = _names(args.include or [",".join(INCLUDE)], "--include", fail) or []
    if not include or any(item not in INCLUDE for item in include) or len(set(include)) != len(include):
        fail(f"--include: {','.join(args.include)!r} must be describe, data or describe,data")
    schemas = _names(args.schemas, "--schemas", fail)
    if schemas is not None and len(set(schemas)) != len(schemas):
        fail("--schemas: a schema is named twice")
    filters = None
    if args.filter is not None:
        try:
            filters = loads_exact(args.filter)  # an integer past 64 bits is refused, not rounded
        except orjson.JSONDecodeError as exc:
            fail(f"--filter: not JSON ({exc})")
        except DuplicateKey as exc:
            fail(f"--filter: {exc}")
        if not isinstance(filters, dict) or not filters:
            fail('--filter: must be an object like {"<schema>": {"where": {...}}}')
        for schema, spec in filters.items():
            if not isinstance(spec, dict) or set(spec) != {"where"} or not isinstance(spec["where"], dict):
                fail(f'--filter: .{schema} must be an object with one key, "where", holding an object')
    if args.name is not None and (not args.name.strip() or "\x00" in args.name or len(args.name) > NAME_MAX):
        fail(f"--name: must be 1 to {NAME_MAX} characters, not only whitespace, without NUL")
    split = args.split_max_records
    if split is not None and not 1 <= split <= SPLIT_MAX:
        fail(f"--split-max-records: must be between 1 and {SPLIT_MAX:,}")
    return {
        "format": args.format,
        "include": include,
        "schemas": schemas,
        "filter": filters,
        "compress": not args.no_compress,
        "split_files": split is not None,
        "split_max_records": split or 1_000_000,
        "retention_days": DEFAULT_RETENTION_DAYS,
    }


def check_against_source(source: str, config: RunConfig, fail: Any) -> None:
    """What ``Catalog.check`` refuses at an extract's creation, refused here naming the option."""
    with open_source(source) as src:
        known = set(src.names())
        unknown = [name for name in config["schemas"] or [] if name not in known]
        if unknown:
            fail(f"--schemas: not in the source: {', '.join(unknown)} (it has: {', '.join(sorted(known))})")
        for schema, spec in (config["filter"] or {}).items():
            if schema not in known:
                fail(f"--filter: schema '{schema}' does not exist in the source")
            if config["schemas"] is not None and schema not in config["schemas"]:
                fail(f"--filter: schema '{schema}' is not among --schemas")
            if config["schemas"] is None and schema not in src.tables():
                fail(f"--filter: schema '{schema}' is a view, exported only when named: add it to --schemas")
            problems = check_where(
                spec["where"], src.columns(schema), field=f"{schema}.where", text_holds_nul=src.text_holds_nul
            )
            if problems:
                path, message = problems[0]
                fail(f"--filter: {path}: {message}")


def default_name(source: str) -> str:
    """The extract name an export takes from its source: a file's stem, a server database's name."""
    if "://" in source:
        path = unquote(urlsplit(source).path)
        return Path(path.rstrip("/")).stem or "extract"
    return Path(source).stem or "extract"


SQLITE_SIDECARS = ("-wal", "-shm", "-journal")  # the files SQLite keeps beside a database


def source_files(source: str) -> list[Path]:
    """The files a SQLite source is made of (the database and its sidecars); none for a server."""
    if "://" in source and not source.lower().startswith("sqlite:///"):
        return []
    from executor.sources.sqlite import sqlite_path

    path = sqlite_path(source)
    # SQLite names the sidecars after the database's real path; a symlink's name is checked too.
    bases = {path, path.resolve()}
    return [Path(str(base) + suffix) for base in bases for suffix in ("", *SQLITE_SIDECARS)]


def is_source_file(target: Path, source: str) -> bool:
    """Whether writing ``target`` would replace the source database or one of its files."""
    resolved = target.resolve()
    for path in source_files(source):
        if resolved == path.resolve():
            return True
        with contextlib.suppress(OSError):  # either may not exist: then only the names compare
            if os.path.samefile(target, path):  # a hard link
                return True
    return False


def _check_targets(
    sub: argparse.ArgumentParser,
    source: str,
    output: str | None,
    directory: Path | None,
    zip_path: Path | None,
) -> None:
    """Refuse (exit 2) a -o or -d the result cannot be put at; OSError when a path cannot be looked at."""
    # A trailing slash means a directory (Path drops it): "-o newdir/" never writes a file "newdir".
    if output and output.endswith(("/", os.sep)) and not Path(output).is_dir():
        sub.error(f"-o {output}: no such directory")
    for option, path in (("-d", directory), ("-o", zip_path)):
        if path is not None and not path.absolute().parent.is_dir():
            sub.error(f"{option}: the directory {path.absolute().parent} does not exist")
    for option, path in (("-d", directory), ("-o", zip_path)):
        if path is not None and not (option == "-o" and path.is_dir()) and is_source_file(path, source):
            sub.error(f"{option}: {path} is the source database (or one of its files); choose another path")
    if zip_path is not None and zip_path.exists() and not (zip_path.is_file() or zip_path.is_dir()):
        # Never renamed over: -o /dev/null, run as root, replaced the device with the ZIP.
        sub.error(
            f"-o: {zip_path} is not a regular file (a named pipe, a device or a socket); "
            "the ZIP replaces a file, never one of these"
        )
    if directory is not None and directory.is_symlink() and not directory.exists():
        sub.error(f"-d: {directory} is a symlink to nothing; give the directory itself")
    # An existing empty directory (or a symlink to one) is kept: the files go into it.
    if directory is not None and directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        sub.error(f"-d: {directory} exists and is not an empty directory")


def _export(sub: argparse.ArgumentParser, args: argparse.Namespace, own_process: bool) -> int:
    from extracts.export import Export, ExportFailed, Interrupted
    from extracts.progress import make_view

    config = export_config(args, sub.error)
    # Path("") is ".": an empty -d was dropped as if not given, an empty -o wrote the default name.
    if args.directory == "":
        sub.error("-d: give a directory, not ''")
    if args.output == "":
        sub.error("-o: give a ZIP file name, not ''")
    directory = Path(args.directory) if args.directory else None
    zip_path = Path(args.output) if args.output else None
    try:
        _check_targets(sub, args.source, args.output, directory, zip_path)
    except OSError as exc:  # a name too long, a directory it may not search: a look at the path fails
        sub.error(f"{'-d' if directory is not None else '-o'}: {exc.filename}: {exc.strerror or exc}")
    hidden = source_secrets(args.source)
    try:
        check_against_source(args.source, config, sub.error)
    except SourceError as exc:
        print(f"extracts-app: cannot open the source: {blank(str(exc), hidden)}", file=sys.stderr)
        return 1
    view = make_view(args.quiet)
    name = args.name.strip() if args.name else default_name(args.source)
    job = Export(args.source, config, name, zip_path, directory, view, own_process=own_process)
    started = time.monotonic()
    try:
        target, result = job.run()
    except ExportFailed as exc:
        view.close()
        print(f"extracts-app: {blank(str(exc), hidden)}", file=sys.stderr)
        return 1
    except Interrupted:
        view.close()
        print("extracts-app: interrupted; nothing was written", file=sys.stderr)
        return 130
    except OSError as exc:
        view.close()
        print(f"extracts-app: {exc.strerror or exc} ({exc.filename})", file=sys.stderr)
        return 1
    view.close()
    files = len(job.artifacts)
    view.note(
        f"Wrote {target}: {result['records_exported']:,} records of {result['schemas_exported']} schemas, "
        f"{files} files, in {time.monotonic() - started:.1f} s"
    )
    return 0
