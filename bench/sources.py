"""Part 7 of ``bench/run.py``: each source dialect against its own fastest export, and DuckDB (issue 19).

For each dialect, the bench table (``events`` of ``datagen.py``, plus a boolean
``active``) is exported as ``jsonl`` by the service (POST run → completed, as in
part 1) and by the command-line tool a user would reach for, side by side,
alternated repeat by repeat:

| dialect | reference | others |
|---|---|---|
| SQLite | ``sqlite3 -json`` | DuckDB's ``sqlite_scan`` |
| PostgreSQL | ``psql -c "COPY (SELECT row_to_json(t) FROM events t) TO STDOUT"`` | DuckDB (postgres) |
| MySQL / MariaDB | ``mysql --quick -N -B -e "SELECT JSON_OBJECT(...) FROM events"`` | |

Targets (service / reference): SQLite ≤ 0.7, PostgreSQL ≤ 0.5, MySQL ≤ 1.0.
A dialect whose server does not answer (PostgreSQL at 127.0.0.1:5432, user
``postgres``; MariaDB/MySQL at 127.0.0.1:3306, user ``root``) or whose client
is not installed is skipped, and a note says so; DuckDB (``pip install
duckdb==1.4.4 duckdb-ext-sqlite duckdb-ext-postgres``: the extension wheels
ship the files DuckDB cannot download here) likewise.

The server tables live in a database ``extracts_bench`` (created; its tables
are tagged with the options that made them and reused). Every file the
service writes is checked against the SQLite source (``expected``): the same
rows in the same order with the values the README's mapping gives each type
(timestamps as PostgreSQL or MySQL print them, ``active`` as a boolean or a
0/1 number). The tools' outputs are checked by their line counts.
"""

from __future__ import annotations

import glob
import hashlib
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import verify
from service import MemoryWindow, Service

PG_DSN = "postgresql://postgres@127.0.0.1:5432"
MY_DSN = "mysql://root@127.0.0.1:3306"
TARGETS = {"sqlite": 0.7, "postgresql": 0.5, "mysql": 1.0}
COLUMNS = ["id", "account_id", "amount", "ratio", "title", "note", "created_at", "updated_at", "active"]
MIB = 1 << 20


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the expected rows


def _pg_time(text: str | None) -> str | None:
    """An ISO text of the generator as PostgreSQL prints the timestamptz (trailing zeros dropped)."""
    if text is None or "." not in text:
        return text
    whole, fraction = text[:-1].split(".")
    fraction = fraction.rstrip("0")
    return f"{whole}.{fraction}Z" if fraction else f"{whole}Z"


def _rows(db: Path, table: str, dialect: str) -> Iterator[list[dict[str, Any]]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        cursor = con.execute(f'SELECT *, id % 3 <> 0 FROM "{table}"')
        while batch := cursor.fetchmany(10_000):
            rows = []
            for row in batch:
                values = dict(zip(COLUMNS, row, strict=True))
                if dialect == "postgresql":
                    values["created_at"], values["updated_at"] = map(
                        _pg_time, (values["created_at"], values["updated_at"])
                    )
                    values["active"] = bool(values["active"])
                if dialect == "sqlite":
                    del values["active"]
                rows.append(values)
            yield rows
    finally:
        con.close()


def _multiset(batches: Iterator[list[dict[str, Any]]]) -> verify.Digest:
    """Rows, and the sum of their canonical SHA-256s: the same rows in any order.

    A server table's rows come in its physical order, which is not the generator's
    (COPY fills a page's free space with later rows); the tests check the order.
    """
    total, count, dumps = 0, 0, orjson.dumps
    for batch in batches:
        for row in batch:
            total += int.from_bytes(hashlib.sha256(dumps(row)).digest(), "big")
        count += len(batch)
    return verify.Digest(count, f"{total % (1 << 256):064x}")


def _file_rows(path: Path) -> Iterator[list[dict[str, Any]]]:
    with open(path, "rb") as f:
        while lines := f.readlines(1 << 22):
            yield [orjson.loads(line) for line in lines]


def expected(db: Path, table: str, dialect: str) -> verify.Digest:
    """The digest (``_multiset``) a correct export of ``table`` from ``dialect`` has."""
    cache = db.with_name(db.name + f".{dialect}-{table}.multiset-v1.json")
    if cache.exists():
        return verify.Digest(*orjson.loads(cache.read_bytes()))
    digest = _multiset(_rows(db, table, dialect))
    cache.write_bytes(orjson.dumps([digest.rows, digest.sha256]))
    return digest


# ---------------------------------------------------------------- the server tables


def _tag(db: Path, table: str) -> str:
    return f"{db.name}:{table}"


def _database(db: Path) -> str:
    """The server database of one data file: a smoke run never reloads a full run's tables."""
    return "extracts_bench_" + re.sub(r"[^a-z0-9]+", "_", db.stem.lower()).strip("_")


# datagen's events_big: block k of events with shifted ids, account ids and amounts.
_BIG_SELECT = (
    "SELECT id + {k} * {n}, (account_id + {k} * 7919) % 100000 + 1, amount + {k}, ratio, title, note,"
    " created_at, updated_at, (id + {k} * {n}) % 3 <> 0 FROM events WHERE id <= {big} - {k} * {n} ORDER BY id"
)


def _blocks(db: Path) -> Iterator[tuple[int, int, int]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute("SELECT count(*) FROM events").fetchone()[0]
    big = con.execute("SELECT count(*) FROM events_big").fetchone()[0]
    con.close()
    for block in range(-(-big // rows)):
        yield block, rows, big


def prepare_postgres(db: Path, tables: list[str]) -> str | None:
    """The tables in PostgreSQL (loaded once, then reused); the source URL, or None (no server)."""
    try:
        import psycopg
    except ImportError:
        return None
    try:
        admin = psycopg.connect(f"{PG_DSN}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.Error:
        return None
    database = _database(db)
    with admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone():
            admin.execute(f"CREATE DATABASE {database}")
    url = f"{PG_DSN}/{database}"
    with psycopg.connect(url, autocommit=True) as conn:
        for table in tables:
            tag = conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", (table,)).fetchone()[0]
            if tag == _tag(db, table):
                continue
            _say(f"loading {table} into PostgreSQL")
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(
                f"CREATE TABLE {table} (id bigint PRIMARY KEY, account_id integer NOT NULL,"
                " amount double precision NOT NULL, ratio double precision, title text NOT NULL, note text,"
                " created_at timestamptz NOT NULL, updated_at timestamptz, active boolean NOT NULL)"
            )
            if table == "events_big":  # datagen's blocks of shifted copies, made inside the server
                for block, rows, big in _blocks(db):
                    conn.execute("INSERT INTO events_big " + _BIG_SELECT.format(k=block, n=rows, big=big))
            else:
                source = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                with conn.cursor() as cursor, cursor.copy(f"COPY {table} FROM STDIN") as copy:
                    for row in source.execute(f'SELECT *, id % 3 <> 0 FROM "{table}" ORDER BY id'):
                        copy.write_row(row)
                source.close()
            conn.execute(f"VACUUM (ANALYZE) {table}")
            conn.execute(f"COMMENT ON TABLE {table} IS '{_tag(db, table)}'")
    return url


def prepare_mysql(db: Path, tables: list[str]) -> str | None:
    """The tables in MySQL / MariaDB (loaded once, then reused); the source URL, or None."""
    try:
        import pymysql
    except ImportError:
        return None
    try:
        conn = pymysql.connect(
            host="127.0.0.1", user="root", password="", charset="utf8mb4", connect_timeout=5
        )
    except pymysql.err.MySQLError:
        return None
    database = _database(db)
    with conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE IF NOT EXISTS {database} CHARACTER SET utf8mb4")
        cursor.execute(f"USE {database}")
        cursor.execute("SET time_zone = '+00:00'")
        for table in tables:
            cursor.execute(
                "SELECT TABLE_COMMENT FROM information_schema.TABLES"
                " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
                (database, table),
            )
            found = cursor.fetchone()
            if found and found[0] == _tag(db, table):
                continue
            _say(f"loading {table} into MySQL")
            cursor.execute(f"DROP TABLE IF EXISTS {table}")
            cursor.execute(
                f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, account_id INT NOT NULL,"
                " amount DOUBLE NOT NULL, ratio DOUBLE, title TEXT NOT NULL, note TEXT,"
                " created_at TIMESTAMP NOT NULL DEFAULT"
                " '2000-01-01 00:00:00', updated_at TIMESTAMP(3) NULL DEFAULT NULL, active BOOLEAN NOT NULL)"
                " ENGINE=InnoDB"
            )
            if table == "events_big":
                for block, rows, big in _blocks(db):
                    cursor.execute("INSERT INTO events_big " + _BIG_SELECT.format(k=block, n=rows, big=big))
                    conn.commit()
                cursor.execute(f"ALTER TABLE {table} COMMENT = %s", (_tag(db, table),))
                continue
            source = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            rows = source.execute(
                "SELECT id, account_id, amount, ratio, title, note,"
                " replace(replace(created_at, 'T', ' '), 'Z', ''),"
                f" replace(replace(updated_at, 'T', ' '), 'Z', ''), id % 3 <> 0 FROM \"{table}\" ORDER BY id"
            )
            while batch := rows.fetchmany(5000):
                cursor.executemany(f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", batch)
                conn.commit()
            source.close()
            cursor.execute(f"ALTER TABLE {table} COMMENT = %s", (_tag(db, table),))
            cursor.execute(f"ANALYZE TABLE {table}")
            cursor.fetchall()
    return f"{MY_DSN}/{database}"


# ---------------------------------------------------------------- the contenders


def _duckdb_extension(name: str) -> str | None:
    try:
        import duckdb
    except ImportError:
        return None
    found = glob.glob(
        str(Path(duckdb.__file__).parent.parent / "duckdb_ext" / "**" / f"{name}.duckdb_extension"),
        recursive=True,
    )
    return found[0] if found else None


def _duckdb(extension: str, *statements: str) -> str:
    """A Python one-liner running DuckDB statements after loading an extension from its file."""
    script = "import duckdb; c = duckdb.connect()" + "".join(
        f"; c.execute({sql!r})" for sql in (f"LOAD '{extension}'", *statements)
    )
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"


@dataclass
class Contender:
    name: str
    command: str | None  # a shell command writing ``output``; None: the service
    output: Path | None = None


def contenders(dialect: str, source: str, table: str, out: Path) -> tuple[list[Contender], list[str]]:
    """The reference first, then the others; and notes on the ones left out."""
    notes = []
    database = source.rsplit("/", 1)[-1]  # a server's: prepare_postgres's or prepare_mysql's URL
    if dialect == "sqlite":
        q = shlex.quote(source)
        found = [
            Contender(
                "`sqlite3 -json`", f"sqlite3 -json {q} 'SELECT * FROM \"{table}\"'", out / "sqlite3.json"
            )
        ]
        extension = _duckdb_extension("sqlite_scanner")
        if extension:
            scan = f"SELECT * FROM sqlite_scan('{source}', '{table}')"
            sql = f"COPY ({scan}) TO '{out / 'duckdb.json'}' (FORMAT json)"
            found.append(Contender("DuckDB `sqlite_scan`", _duckdb(extension, sql), out / "duckdb.json"))
        else:
            notes.append("DuckDB is not installed: its sqlite_scan row is missing.")
    elif dialect == "postgresql":
        if not shutil.which("psql"):
            return [], ["`psql` is not installed: the PostgreSQL rows are missing."]
        copy = f"COPY (SELECT row_to_json(t) FROM {table} t) TO STDOUT"
        found = [
            Contender(
                "`psql COPY row_to_json`",
                f"psql -XAtq {shlex.quote(source)} -c {shlex.quote(copy)}",
                out / "psql.json",
            )
        ]
        extension = _duckdb_extension("postgres_scanner")
        if extension:
            attach = (
                f"ATTACH 'dbname={database} host=127.0.0.1 user=postgres' AS pg (TYPE postgres, READ_ONLY)"
            )
            copy_out = f"COPY (SELECT * FROM pg.public.{table}) TO '{out / 'duckdb.json'}' (FORMAT json)"
            found.append(
                Contender(
                    "DuckDB postgres scanner", _duckdb(extension, attach, copy_out), out / "duckdb.json"
                )
            )
        else:
            notes.append("DuckDB is not installed: its postgres scanner row is missing.")
    else:
        client = shutil.which("mariadb") or shutil.which("mysql")
        if not client:
            return [], ["The `mysql` client is not installed: the MySQL rows are missing."]
        pairs = ", ".join(f"'{c}', {c}" for c in COLUMNS)
        query = f"SELECT JSON_OBJECT({pairs}) FROM {table}"
        command = (
            f"mysql -h127.0.0.1 -uroot --default-character-set=utf8mb4 --quick -N -B "
            f"-e {shlex.quote(query)} {database}"
        )
        found = [Contender("`mysql --quick` `JSON_OBJECT`", command, out / "mysql.json")]
    found.insert(1, Contender("extracts service", None))
    return found, notes


def _timed(command: str, output: Path) -> float:
    started = time.perf_counter()
    redirect = "" if "duckdb" in command else f" > {shlex.quote(str(output))}"
    subprocess.run(["bash", "-o", "pipefail", "-c", command + redirect], check=True)
    return time.perf_counter() - started


def _lines(path: Path) -> int:
    return verify.count_lines(path)


def _versions() -> str:
    found = []
    for name, command in [("psql", ["psql", "--version"]), ("mysql", ["mysql", "--version"])]:
        if shutil.which(command[0]):
            found.append(subprocess.run(command, capture_output=True, text=True).stdout.strip())
        else:
            found.append(f"{name} not installed")
    try:
        import duckdb

        found.append(f"DuckDB {duckdb.__version__}")
    except ImportError:
        found.append("DuckDB not installed")
    return "; ".join(found)


# ---------------------------------------------------------------- the part


@dataclass
class Part:
    """What ``bench/run.py`` hands over: its results, options and the generated SQLite source."""

    results: Any  # run.Results: .export(case, contender, rows, reference=, target=) and .notes
    checks: Callable[..., None]  # run.Results.check
    db: Path
    workdir: Path
    rows: int
    big_rows: int
    repeats: int
    workers: int
    dialects: list[str]
    reuse: bool = False  # --smoke: one service per dialect, all started at once, not one per table
    service: Service | None = None  # with ``reuse``: run.py's running service on ``db``, for SQLite


def run(part: Part) -> None:
    """Part 7 (see the module docstring)."""
    tables = ["events"] + (["events_big"] if part.big_rows else [])
    sources: dict[str, str | None] = {}
    for dialect in part.dialects:
        if dialect == "sqlite":
            sources[dialect] = str(part.db)
        elif dialect == "postgresql":
            sources[dialect] = prepare_postgres(part.db, tables)
        else:
            sources[dialect] = prepare_mysql(part.db, tables)
        if sources[dialect] is None:
            part.results.notes.append(f"No {dialect} server answered: its part 7 rows are missing.")
    part.results.notes.append(f"Part 7 tools: {_versions()}.")
    out = part.workdir / "out-sources"
    kept: dict[str, Service] = {}  # with ``reuse``: each dialect's service, launched now, by dialect
    warm: set[str] = set()  # the dialects whose kept service has run an export
    if part.reuse:
        for dialect, source in sources.items():
            if dialect == "sqlite" and part.service is not None:
                kept[dialect] = part.service
                warm.add(dialect)
            elif source is not None:
                kept[dialect] = _service(part, dialect, source).launch()
    try:
        for dialect, source in sources.items():
            if source is None:
                continue
            for table, rows, repeats in [("events", part.rows, part.repeats)] + (
                [("events_big", part.big_rows, 1)] if part.big_rows else []
            ):
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                _measure(part, dialect, source, table, rows, repeats, out, kept.get(dialect), dialect in warm)
                warm.add(dialect)
    finally:
        for service in kept.values():
            if service is not part.service:
                _stop(service)
    shutil.rmtree(out, ignore_errors=True)


def _service(part: Part, dialect: str, source: str) -> Service:
    return Service(source, part.workdir / f"service-{dialect}", workers=part.workers)  # type: ignore[arg-type]


def _stop(service: Service) -> None:
    service.stop()
    shutil.rmtree(service.workdir, ignore_errors=True)


def _measure(
    part: Part,
    dialect: str,
    source: str,
    table: str,
    rows: int,
    repeats: int,
    out: Path,
    kept: Service | None = None,
    warm: bool = False,
) -> None:
    """One table of one dialect, on a service of its own, or on ``kept`` (``warm``: it has exported)."""
    found, notes = contenders(dialect, source, table, out)
    part.results.notes.extend(notes)
    if not found:
        return
    case = f"{dialect}, jsonl" + (" (big)" if table == "events_big" else "")
    reference = part.results.export(case, found[0].name, rows)
    lines = [reference] + [
        part.results.export(
            case,
            contender.name,
            rows,
            reference=reference,
            target=TARGETS[dialect] if contender.command is None else None,
        )
        for contender in found[1:]
    ]
    want = expected(part.db, table, dialect)
    service = kept or _service(part, dialect, source)
    if kept is None:
        service.start()
    else:
        service.ready()
    try:
        extract = service.create_extract(f"bench {dialect} {table}", [table], "jsonl", False)
        if not warm:
            first = service.start_run(extract)  # the pool's worker starts, the server's cache warms
            service.wait(first)
            service.delete_run(first)
        peak = 0
        for repeat in range(repeats):
            _say(f"part 7: {dialect} {table}, repeat {repeat + 1} of {repeats}")
            for contender, line in zip(found, lines, strict=True):
                if contender.command is None:
                    window = MemoryWindow(service.process.pid, sample_every=0.25).open()  # type: ignore[union-attr]
                    seconds, run, record = service.timed_run(extract)
                    line.times.append(seconds)
                    window.close()
                    peak = max(peak, window.worker_peak)
                    _check_service(service, run, record, want, line)
                    service.delete_run(run)
                else:
                    assert contender.output is not None
                    line.times.append(_timed(contender.command, contender.output))
                    line.size = contender.output.stat().st_size
                    got = _lines(contender.output)
                    if got != rows:
                        raise verify.Mismatch(f"{contender.name} wrote {got:,} lines for {rows:,} rows")
                    contender.output.unlink()
        part.checks(
            "7 sources",
            f"worker peak RSS (VmHWM), {dialect}, jsonl, {rows:,} rows",
            f"{peak / MIB:.1f} MiB",
            "< 150 MiB",
            peak < 150 * MIB,
        )
    finally:
        if kept is None:
            _stop(service)


_CHECKED: set[str] = set()


def _check_service(
    service: Service, run: str, record: dict[str, Any], want: verify.Digest, line: Any
) -> None:
    (data,) = [a for a in service.artifacts(run) if a["artifact_type"].startswith("data-")]
    path = Path(data["storage_path"])
    line.size = data["size_bytes"]
    if verify.file_sha256(path) != data["checksum"]:
        raise verify.Mismatch(f"{path}: SHA-256 differs from the artifact's checksum")
    if record["records_exported"] != want.rows:
        raise verify.Mismatch(f"run {run} exported {record['records_exported']:,} records, not {want.rows:,}")
    if data["checksum"] in _CHECKED:
        return  # the same bytes as a file already checked
    got = _multiset(_file_rows(path))
    _CHECKED.add(data["checksum"])
    if got != want:
        raise verify.Mismatch(f"{path}: digest {got.sha256[:16]}…, the source's {want.sha256[:16]}…")
