"""The Extracts benchmark: the real service against the tools people export with today.

    python bench/run.py              # 1M rows, median of 3: about 6 minutes on 2 busy cores
    python bench/run.py --smoke      # small, about 15 s: keeps this script working in CI
    python bench/run.py --big-rows 10000000 --markdown bench/RESULTS.md

One run measures, side by side (contenders interleaved, repeat by repeat, so
that load on the machine hits them alike), then prints two tables:

1. export throughput of one table, ``jsonl``, plain and gzip'd, through the
   service (POST run → completed) against ``sqlite3 -json`` (``| gzip -1``) and
   ``sqlite-utils rows --nl``;
2. the same for ``json``, ``yaml`` and a two-table run;
3. peak memory (VmHWM) of the worker and the server, at N rows and ``--big-rows``;
4. ZIP download throughput against the plain file download of the same server;
5. API latency of 8 polling clients while two exports run;
6. start latency, POST run → ``running``, with a worker free;
7. each source dialect (SQLite, PostgreSQL, MySQL) against its own fastest
   command-line export and DuckDB, where installed (``bench/sources.py``).

Every exported file is checked against the source (``verify.py``). See
``bench/README.md`` for what each figure means and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import platform
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import datagen
import httpx
import orjson
import sources
import verify
from service import ROOT, TLS, BenchError, MemoryWindow, Service

MIB = 1 << 20
EXPORT_RATIO_TARGET = 2.0


def say(message: str) -> None:
    """Progress goes to stderr; stdout carries only the result tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- results


@dataclass
class Export:
    """One contender of one case: wall times of every repeat, output size, ratio to its reference."""

    case: str
    contender: str
    rows: int
    times: list[float] = field(default_factory=list)
    size: int = 0
    reference: Export | None = None
    target: float | None = None

    @property
    def seconds(self) -> float:
        return median(self.times)

    @property
    def ratio(self) -> float | None:
        return self.seconds / self.reference.seconds if self.reference and self.reference.times else None

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        return None if self.target is None or ratio is None else ratio <= self.target


@dataclass
class Check:
    """A figure of parts 3–6 and its target."""

    part: str
    measure: str
    value: str
    target: str = ""
    met: bool | None = None


@dataclass
class Results:
    exports: list[Export] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def export(self, case: str, contender: str, rows: int, **kwargs: Any) -> Export:
        row = Export(case, contender, rows, **kwargs)
        self.exports.append(row)
        return row

    def check(self, part: str, measure: str, value: str, target: str = "", met: bool | None = None) -> None:
        self.checks.append(Check(part, measure, value, target, met))


def mark(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "**MISSED**")


def export_table(results: Results) -> str:
    lines = [
        "| case | contender | rows | median wall s (runs) | rows/s | output MB | ratio | target | |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for e in results.exports:
        if not e.times:
            continue
        ratio = e.ratio
        ratio_text = "—" if ratio is None else f"{ratio:.2f}× {e.reference.contender}"  # type: ignore[union-attr]
        runs = ", ".join(f"{t:.2f}" for t in e.times) if len(e.times) <= 5 else f"{len(e.times)} runs"
        target = f"≤ {e.target:.1f}" if e.target else ""
        lines.append(
            f"| {e.case} | {e.contender} | {e.rows:,} | **{e.seconds:.2f}** ({runs}) | "
            f"{e.rows / e.seconds:,.0f} | {e.size / 1e6:,.1f} | {ratio_text} | {target} | "
            f"{mark(e.met)} |"
        )
    return "\n".join(lines)


def check_table(results: Results) -> str:
    lines = ["| part | measure | value | target | |", "|---|---|---|---|---|"]
    for c in sorted(results.checks, key=lambda c: c.part):  # stable: each part's rows keep their order
        lines.append(f"| {c.part} | {c.measure} | {c.value} | {c.target} | {mark(c.met)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the benchmark


@dataclass
class Options:
    rows: int
    big_rows: int
    repeats: int
    sqlite_utils_repeats: int
    sqlite_utils_rows: int
    yaml_rows: int
    latency_seconds: float
    clients: int
    poll_interval: float
    start_repeats: int
    workers: int
    workdir: Path
    seed: int
    verify_big: str
    check_baselines: str
    profile: bool
    sources: list[str]
    sources_only: bool
    smoke: bool


class Bench:
    def __init__(self, options: Options) -> None:
        self.o = options
        self.results = Results()
        self.out = options.workdir / "out"
        self.digests: dict[tuple[str, int | None], verify.Digest] = {}
        self.columns: dict[str, list[str]] = {}
        self.source: Path = Path()
        self.service: Service | None = None
        self.idle_run = ""  # a finished run the idle latency clients poll
        self.kept_run: tuple[str, int] | None = None  # (run id, rows): the run the download part fetches
        self.verified: set[tuple[str, str, int | None]] = set()  # (JSON lines' SHA-256, table, max id)
        self.pending: dict[tuple[str, str, int | None], tuple[Path, str]] = {}  # (file, format) to check
        self.kept_outputs: list[Path] = []  # files and runs kept until their check
        self.kept_runs: list[str] = []
        self.outputs = 0

    # ------------------------------------------------------------ helpers

    @property
    def svc(self) -> Service:
        assert self.service is not None
        return self.service

    def digest(self, table: str, max_id: int | None = None) -> verify.Digest:
        """The source table's digest, kept beside the generated file (the file never changes)."""
        key = (table, max_id)
        if key not in self.digests:
            cache = self.source.with_name(self.source.name + f".digests-v{verify.DIGEST_VERSION}.json")
            saved = orjson.loads(cache.read_bytes()) if cache.exists() else {}
            name = f"{table}:{max_id}"
            if name not in saved:
                digest = verify.table_digest(self.source, table, max_id)
                saved[name] = [digest.rows, digest.sha256]
                cache.write_bytes(orjson.dumps(saved))
            self.digests[key] = verify.Digest(*saved[name])
        return self.digests[key]

    def table_columns(self, table: str) -> list[str]:
        if table not in self.columns:
            self.columns[table] = verify.table_columns(self.source, table)
        return self.columns[table]

    def check_file(
        self, path: Path, fmt: str, table: str, max_id: int | None = None, content: str | None = None
    ) -> bool:
        """Queue a data file for checking against the source, unless its rows are checked or queued.

        Files are known by the SHA-256 of the JSON lines they hold
        (``verify.json_lines_sha256``; ``content`` when the caller has it): the
        other repeats, the gzip'd, ``json``, ``yaml`` and two-table outputs of
        the same rows are recognised and not parsed again. True: the file is
        queued, keep it until ``verify_pending()``.
        """
        lines = content or verify.json_lines_sha256(path, fmt)
        key = (lines, table, max_id) if lines else (verify.file_sha256(path), table, max_id)
        if fmt == "yaml" and lines and key not in self.verified:
            verify.yaml_reads_as_json(path)  # the JSON lines mean the same to YAML
        if key in self.verified or key in self.pending:
            return False
        self.pending[key] = (path, fmt)
        return True

    def verify_pending(self) -> None:
        """Check every queued file, two at a time (between measurements, never during one)."""
        if self.pending:
            say(f"checking {len(self.pending)} files row by row against the source")
            with concurrent.futures.ProcessPoolExecutor(max_workers=2) as pool:
                files = list(self.pending.values())
                digests = pool.map(verify.file_digest, *zip(*files, strict=True))
                for (key, (path, _fmt)), got in zip(self.pending.items(), digests, strict=True):
                    _lines, table, max_id = key
                    want = self.digest(table, max_id)
                    if got != want:
                        raise verify.Mismatch(
                            f"{path.name}: {got.rows:,} rows, digest {got.sha256[:16]}…; the source "
                            f"{table} has {want.rows:,} rows, digest {want.sha256[:16]}…"
                        )
                    self.verified.add(key)
            self.pending.clear()
        for path in self.kept_outputs:
            path.unlink(missing_ok=True)
        for run in self.kept_runs:
            self.svc.delete_run(run)
        self.kept_outputs, self.kept_runs = [], []

    def timed_command(self, command: str, output: Path) -> float:
        """Wall time of a shell command whose stdout goes to ``output``."""
        started = time.perf_counter()
        subprocess.run(
            ["bash", "-o", "pipefail", "-c", f"{command} > {shlex.quote(str(output))}"], check=True
        )
        return time.perf_counter() - started

    def sqlite3_json(self, table: str, max_id: int | None = None) -> str:
        where = f" WHERE id <= {int(max_id)}" if max_id else ""
        return f"sqlite3 -json {shlex.quote(str(self.source))} 'SELECT * FROM \"{table}\"{where}'"

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        o = self.o
        say(f"source: {o.rows:,} rows" + (f" + {o.big_rows:,}-row table" if o.big_rows else ""))
        self.source, seconds = datagen.ensure_source(o.workdir, o.rows, o.big_rows, o.seed)
        if seconds:
            self.results.notes.append(
                f"Generated the source ({self.source.stat().st_size / 1e6:,.0f} MB) in {seconds:.1f} s."
            )
            say(f"generated {self.source} in {seconds:.1f} s")
        datagen.warm_cache(self.source)
        say("reading the source's digests")
        self.digest("events")
        self.digest("accounts")
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)

    def start_service(self, name: str) -> None:
        """A new service on a new state file and storage directory (the previous one stopped)."""
        self.stop_service()
        run_dir = self.o.workdir / f"service-{os.getpid()}-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        self.service = Service(self.source, run_dir, workers=self.o.workers)
        self.service.start()
        say(f"{name} service up at {self.svc.base_url} (pid {self.svc.process.pid})")

    def stop_service(self) -> None:
        if self.service is not None:
            self.service.stop()
            shutil.rmtree(self.service.workdir, ignore_errors=True)
            self.service = None

    def warm_up(self) -> None:
        """Two small runs at once: the pool starts its worker processes now, not in a timed run."""
        small = {"filter": {"accounts": {"where": {"id": {"$lte": 1000}}}}}
        extracts = [
            self.svc.create_extract(f"warm-up {i}", ["accounts"], "jsonl", False, **small)
            for i in range(self.o.workers)
        ]
        runs = [self.svc.start_run(e) for e in extracts]
        for run in runs:
            self.svc.wait(run)
            self.svc.delete_run(run)

    # ------------------------------------------------------------ part 6: start latency

    def start_latency(self) -> None:
        say(f"part 6: start latency ({self.o.start_repeats} runs)")
        small = {"filter": {"accounts": {"where": {"id": {"$lte": 1000}}}}}
        extract = self.svc.create_extract("start latency", ["accounts"], "jsonl", False, **small)
        to_running, to_answer = [], []
        for _ in range(self.o.start_repeats):
            started = time.perf_counter()
            run = self.svc.start_run(extract)
            to_answer.append(time.perf_counter() - started)
            while (status := self.svc.run_record(run)["status"]) == "queued":
                time.sleep(0.002)
            if status == "failed":
                raise BenchError(f"run {run} failed")
            to_running.append(time.perf_counter() - started)
            self.svc.wait(run)
            self.svc.delete_run(run)
            self.idle_run = run
        worst = max(to_running)
        self.results.check(
            "6 start",
            f"POST run → `running`, worker free (median / max of {len(to_running)})",
            f"{median(to_running) * 1000:.0f} / {worst * 1000:.0f} ms",
            "< 200 ms",
            worst < 0.2,
        )
        self.results.check("6 start", "POST run answered (202), median", f"{median(to_answer) * 1000:.0f} ms")

    # ------------------------------------------------------------ parts 1 and 2: exports

    def service_export(self, row: Export, extract: str, checks: list[tuple[str, str, int | None]]) -> None:
        """One timed run of ``extract``; ``checks``: (table, format, max id) of each data file, in order."""
        seconds, run, record = self.svc.timed_run(extract)
        row.times.append(seconds)
        artifacts = {
            a["schema_name"]: a for a in self.svc.artifacts(run) if a["artifact_type"].startswith("data-")
        }
        row.size = sum(a["size_bytes"] for a in artifacts.values())
        expected_rows = sum(self.digest(table, max_id).rows for table, _, max_id in checks)
        if record["records_exported"] != expected_rows:
            raise verify.Mismatch(
                f"run {run} exported {record['records_exported']:,} records, expected {expected_rows:,}"
            )
        keep = False
        for table, fmt, max_id in checks:
            artifact = artifacts[table]
            path = Path(artifact["storage_path"])
            stored = verify.file_sha256(path)
            if stored != artifact["checksum"]:
                raise verify.Mismatch(f"{path}: SHA-256 differs from the artifact's checksum")
            plain = fmt == "jsonl" and not path.name.endswith(".gz")  # then its bytes are its JSON lines
            queued = self.check_file(path, fmt, table, max_id, stored if plain else None)
            keep = keep or queued
        if keep:
            self.kept_runs.append(run)
        else:
            self.svc.delete_run(run)

    def baseline_export(self, row: Export, commands: list[tuple[str, str, str, int | None]]) -> None:
        """One timed run of shell commands; (command, format, table, max id) each, run one after another."""
        outputs = []
        elapsed = 0.0
        for command, _fmt, _table, _max_id in commands:
            self.outputs += 1
            output = self.out / (f"baseline-{self.outputs}.json" + (".gz" if "| gzip" in command else ""))
            elapsed += self.timed_command(command, output)
            outputs.append(output)
        row.times.append(elapsed)
        row.size = sum(p.stat().st_size for p in outputs)
        for output, (_command, fmt, table, max_id) in zip(outputs, commands, strict=True):
            if self.o.check_baselines == "full":
                if self.check_file(output, fmt, table, max_id):
                    self.kept_outputs.append(output)
                    continue
            elif (lines := verify.count_lines(output)) != self.digest(table, max_id).rows:
                raise verify.Mismatch(
                    f"{row.contender} wrote {lines:,} lines for "
                    f"{self.digest(table, max_id).rows:,} rows of {table}"
                )
            output.unlink()

    def exports(self) -> None:
        o, svc, r = self.o, self.svc, self.results
        n, yaml_rows = o.rows, min(o.yaml_rows or o.rows, o.rows)
        two_rows = n + self.digest("accounts").rows
        yaml_filter = {"filter": {"events": {"where": {"id": {"$lte": yaml_rows}}}}} if yaml_rows < n else {}
        yaml_case = "yaml, 1 table" + (f", first {yaml_rows:,} rows" if yaml_rows < n else "")
        yaml_max_id = yaml_rows if yaml_rows < n else None
        utils = shutil.which("sqlite-utils")

        plain = "jsonl, 1 table"
        gz = "jsonl.gz, 1 table"
        ref = r.export(plain, "`sqlite3 -json`", n)
        svc_plain = r.export(plain, "extracts service", n, reference=ref, target=EXPORT_RATIO_TARGET)
        utils_rows = min(o.sqlite_utils_rows or n, n)
        utils_max_id = utils_rows if utils_rows < n else None
        utils_ref, utils_row = ref, None
        if utils and utils_max_id:  # on the first rows only, against sqlite3 on the same rows
            utils_case = f"jsonl, 1 table, first {utils_rows:,} rows"
            utils_ref = r.export(utils_case, "`sqlite3 -json`", utils_rows)
            utils_row = r.export(utils_case, "`sqlite-utils query --nl`", utils_rows, reference=utils_ref)
        elif utils:
            utils_row = r.export(plain, "`sqlite-utils rows --nl`", n, reference=ref)
        ref_gz = r.export(gz, "`sqlite3 -json \\| gzip -1`", n)
        svc_gz = r.export(gz, "extracts service, compress", n, reference=ref_gz, target=EXPORT_RATIO_TARGET)
        svc_json = r.export("json, 1 table", "extracts service", n, reference=ref, target=EXPORT_RATIO_TARGET)
        ref_yaml = r.export(yaml_case, "`sqlite3 -json`", yaml_rows) if yaml_max_id else ref
        svc_yaml = r.export(
            yaml_case, "extracts service", yaml_rows, reference=ref_yaml, target=EXPORT_RATIO_TARGET
        )
        two = "jsonl, 2 tables"
        ref_two = r.export(two, "`sqlite3 -json`, one table after the other", two_rows)
        svc_two = r.export(two, "extracts service", two_rows, reference=ref_two, target=EXPORT_RATIO_TARGET)

        e_plain = svc.create_extract("bench jsonl", ["events"], "jsonl", False)
        e_gz = svc.create_extract("bench jsonl gz", ["events"], "jsonl", True)
        e_json = svc.create_extract("bench json", ["events"], "json", False)
        e_yaml = svc.create_extract("bench yaml", ["events"], "yaml", False, **yaml_filter)
        e_two = svc.create_extract("bench two tables", ["events", "accounts"], "jsonl", False)

        for rep in range(o.repeats):
            say(f"parts 1-2: exports, repeat {rep + 1} of {o.repeats}")
            self.baseline_export(ref, [(self.sqlite3_json("events"), "sqlite3-json", "events", None)])
            self.service_export(svc_plain, e_plain, [("events", "jsonl", None)])
            if utils_row is not None and rep < o.sqlite_utils_repeats:
                db = shlex.quote(str(self.source))
                if utils_max_id:
                    first = self.sqlite3_json("events", utils_max_id)
                    self.baseline_export(utils_ref, [(first, "sqlite3-json", "events", utils_max_id)])
                    command = (
                        f"sqlite-utils query {db} 'SELECT * FROM events WHERE id <= {utils_max_id}' --nl"
                    )
                else:
                    command = f"sqlite-utils rows {db} events --nl"
                self.baseline_export(utils_row, [(command, "jsonl", "events", utils_max_id)])
            command = self.sqlite3_json("events") + " | gzip -1"
            self.baseline_export(ref_gz, [(command, "sqlite3-json", "events", None)])
            self.service_export(svc_gz, e_gz, [("events", "jsonl", None)])
            self.service_export(svc_json, e_json, [("events", "json", None)])
            if yaml_max_id:  # otherwise the yaml case compares with the first sqlite3 -json row
                self.baseline_export(
                    ref_yaml,
                    [(self.sqlite3_json("events", yaml_max_id), "sqlite3-json", "events", yaml_max_id)],
                )
            self.service_export(svc_yaml, e_yaml, [("events", "yaml", yaml_max_id)])
            self.baseline_export(
                ref_two,
                [
                    (self.sqlite3_json("events"), "sqlite3-json", "events", None),
                    (self.sqlite3_json("accounts"), "sqlite3-json", "accounts", None),
                ],
            )
            self.service_export(svc_two, e_two, [("events", "jsonl", None), ("accounts", "jsonl", None)])
        self.verify_pending()
        if utils_row is not None and o.sqlite_utils_repeats < o.repeats:
            r.notes.append(
                f"`sqlite-utils` ran {o.sqlite_utils_repeats} time(s) (`--sqlite-utils-repeats`): "
                "it is a reference point, not a target, and takes several times longer."
            )
        if utils_row is None:
            r.notes.append(
                "`sqlite-utils` is not installed: its row is missing (`pip install sqlite-utils`)."
            )

    # ------------------------------------------------------------ part 3: memory

    def memory(self) -> None:
        """Peak memory of ``jsonl`` at ``--rows`` (and ``--big-rows``), then ``json`` and ``yaml``.

        A fresh pool starts one worker process for the first run and hands it
        every later run that does not overlap another: every export runs in
        that one process. Its first run grows the heap to its working size
        (reported, without a target); the compared runs come after it, so
        their peaks compare like with like. Flat means the worker does not
        grow with the rows it has read: its RSS at the end of a run is within
        10% of its RSS a quarter of the way in.
        """
        o, r = self.o, self.results
        if not o.smoke:  # --smoke: the main service's pool, whose worker has run before (figures not read)
            self.start_service("memory")
        big_part = f", {o.big_rows:,} rows as jsonl" if o.big_rows else ""
        say(f"part 3: memory, {o.rows:,} rows as jsonl{big_part}, {o.rows:,} rows as json and yaml")
        extract = self.svc.create_extract("bench memory", ["events"], "jsonl", False)
        first, cold = self.run_measured(extract)
        self.svc.delete_run(first)
        run, small = self.run_measured(extract)
        self.check_file(self.data_file(run), "jsonl", "events")
        self.verify_pending()
        self.kept_run = (run, o.rows)
        r.check(
            "3 memory",
            f"worker peak RSS (VmHWM), jsonl, {o.rows:,} rows, the process's first run",
            f"{cold.worker_peak / MIB:.1f} MiB (pid {cold.worker_pid}; its heap grows to its "
            "working size: the runs below come after it)",
        )
        windows = [("jsonl", o.rows, small)]
        big = None
        if o.big_rows:  # right after the small one: the same format, the same process history
            self.svc.delete_run(run)
            big = self.big_export()
            windows.append(("jsonl", o.big_rows, big))
        for fmt in ("json", "yaml"):
            other, window = self.run_measured(
                self.svc.create_extract(f"bench memory {fmt}", ["events"], fmt, False)
            )
            self.check_file(self.data_file(other, lines=False), fmt, "events")
            self.kept_runs.append(other)
            windows.append((fmt, o.rows, window))
        self.verify_pending()
        for fmt, rows, window in windows:
            before = (
                f"; {window.worker_rss_before / MIB:.1f} MiB when the run started"
                if window.worker_rss_before
                else "; a new process"
            )
            r.check(
                "3 memory",
                f"worker peak RSS (VmHWM), {fmt}, {rows:,} rows",
                f"{window.worker_peak / MIB:.1f} MiB (pid {window.worker_pid}{before})",
                "< 150 MiB",
                window.worker_peak < 150 * MIB,
            )
            r.check(
                "3 memory",
                f"server peak RSS (VmHWM), {fmt}, {rows:,} rows",
                f"{window.server_peak / MIB:.1f} MiB",
            )
        for fmt, rows, window in windows:
            curve = window.worker_curve()
            if curve:
                grown = curve[-1] / curve[1] - 1
                r.check(
                    "3 memory",
                    f"worker RSS at 10%, 25%, 50%, 75%, 100% of the {fmt} run, {rows:,} rows",
                    " / ".join(f"{v / MIB:.1f}" for v in curve) + f" MiB ({grown:+.1%} from 25% to 100%)",
                    "flat: within 10%",
                    grown <= 0.10,
                )
        if big is not None:
            for who, grown in (
                ("worker", big.worker_peak / small.worker_peak - 1),
                ("server", big.server_peak / small.server_peak - 1),
            ):
                r.check(
                    "3 memory",
                    f"{who} peak at {o.big_rows:,} vs {o.rows:,} rows (jsonl)",
                    f"{grown:+.1%}",
                    "within 10%",
                    grown <= 0.10,
                )

    def run_measured(self, extract: str, timings: Export | None = None) -> tuple[str, MemoryWindow]:
        """One run with its memory window (and its wall time appended to ``timings``)."""
        window = MemoryWindow(self.svc.process.pid, sample_every=0.25).open()
        seconds, run, _ = self.svc.timed_run(extract)
        if timings is not None:
            timings.times.append(seconds)
        window.close()
        return run, window

    def data_file(self, run: str, lines: bool = True) -> Path:
        """The one data file of a one-table run, its checksum (and its line count: ``jsonl``) checked."""
        (data,) = [a for a in self.svc.artifacts(run) if a["artifact_type"].startswith("data-")]
        path = Path(data["storage_path"])
        if verify.file_sha256(path) != data["checksum"]:
            raise verify.Mismatch(f"{path}: SHA-256 differs from the artifact's checksum")
        if lines and data["records"] != (rows := verify.count_lines(path)):
            raise verify.Mismatch(f"{path}: {rows:,} lines, {data['records']:,} records in its artifact")
        return path

    def big_export(self) -> MemoryWindow:
        """The ``--big-rows`` table once, through the service and ``sqlite3 -json``."""
        o, r = self.o, self.results
        case = "jsonl, 1 table (big)"
        ref = r.export(case, "`sqlite3 -json`", o.big_rows)
        row = r.export(case, "extracts service", o.big_rows, reference=ref, target=EXPORT_RATIO_TARGET)
        extract = self.svc.create_extract("bench big jsonl", ["events_big"], "jsonl", False)
        output = self.out / "big.json"
        ref.times.append(self.timed_command(self.sqlite3_json("events_big"), output))
        ref.size = output.stat().st_size
        lines = verify.count_lines(output)
        output.unlink()
        if lines != o.big_rows:
            raise verify.Mismatch(f"sqlite3 -json wrote {lines:,} lines for {o.big_rows:,} rows")

        run, window = self.run_measured(extract, row)
        say("verifying the big export")
        path = self.data_file(run)
        row.size = path.stat().st_size
        if verify.count_lines(path) != o.big_rows:
            raise verify.Mismatch(f"{path}: not {o.big_rows:,} records")
        if o.verify_big == "full":
            self.check_file(path, "jsonl", "events_big")
            self.verify_pending()
            how = "every row against the source"
        else:
            every = max(1, o.big_rows // 100_000)
            checked = verify.sampled_check(
                path, self.source, "events_big", self.table_columns("events_big"), every
            )
            sample = "every row" if every == 1 else f"every {every}th row"
            how = (
                f"its line count, its checksum and {checked:,} rows ({sample}) against the source "
                "(`--verify-big full` checks every row)"
            )
        r.notes.append(
            f"The {o.big_rows:,}-row export was checked by {how}; `sqlite3 -json`'s by its line count."
        )
        self.kept_run = (run, o.big_rows)
        return window

    # ------------------------------------------------------------ part 4: downloads

    def fetch(self, path: str) -> tuple[float, int]:
        """(seconds, bytes) of one download to /dev/null, with curl when present."""
        url = self.svc.base_url + path
        if shutil.which("curl"):
            done = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--fail",
                    "-o",
                    "/dev/null",
                    "-H",
                    f"Authorization: Bearer {self.svc.token}",
                    "-w",
                    "%{time_total} %{size_download}",
                    url,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            seconds, size = done.stdout.split()
            return float(seconds), int(size)
        started, size = time.perf_counter(), 0
        with self.svc.client.stream("GET", path) as response:
            response.raise_for_status()
            for chunk in response.iter_raw(1 << 20):
                size += len(chunk)
        return time.perf_counter() - started, size

    def downloads(self) -> None:
        if self.kept_run is None:
            return
        run, rows = self.kept_run
        say(f"part 4: downloads of the {rows:,}-row run")
        (data,) = [a for a in self.svc.artifacts(run) if a["artifact_type"].startswith("data-")]
        head = self.svc.client.head(f"/api/extracts/runs/{run}/download")
        zip_length = int(head.headers.get("content-length", 0))
        zip_rates, file_rates, growths = [], [], []
        for _ in range(self.o.repeats):
            server = self.svc.process.pid
            window = MemoryWindow(server).open()
            seconds, size = self.fetch(f"/api/extracts/runs/{run}/download")
            window.close()
            if zip_length and size != zip_length:
                raise BenchError(f"the ZIP download gave {size:,} bytes, Content-Length said {zip_length:,}")
            zip_rates.append(size / seconds)
            growths.append(window.server_peak - window.server_rss_before)
            seconds, size = self.fetch(f"/api/extracts/artifacts/{data['id']}/download")
            if size != data["size_bytes"]:
                raise BenchError(f"the file download gave {size:,} bytes, not {data['size_bytes']:,}")
            file_rates.append(size / seconds)
        zip_rate, file_rate = median(zip_rates), median(file_rates)
        ratio = zip_rate / file_rate
        r = self.results
        r.check(
            "4 download",
            f"run ZIP ({zip_length / 1e9:.2f} GB, {rows:,}-row jsonl run), median of {len(zip_rates)}",
            f"{zip_rate / 1e6:,.0f} MB/s",
        )
        r.check(
            "4 download",
            f"one file, FileResponse ({data['size_bytes'] / 1e9:.2f} GB)",
            f"{file_rate / 1e6:,.0f} MB/s",
        )
        r.check("4 download", "ZIP throughput / file throughput", f"{ratio:.2f}", "≥ 0.8", ratio >= 0.8)
        growth = max(growths)
        r.check(
            "4 download",
            "server RSS growth during a ZIP download (max)",
            f"{growth / MIB:.1f} MiB",
            "< 50 MiB",
            growth < 50 * MIB,
        )
        self.svc.delete_run(run)
        self.kept_run = None

    # ------------------------------------------------------------ part 5: API latency under load

    def api_latency(self) -> None:
        """Polling clients with the workers idle (the service's own floor), then with two exports running."""
        o, r = self.o, self.results
        table = "events_big" if o.big_rows else "events"
        say(
            f"part 5: API latency, {o.clients} clients: {o.latency_seconds / 4:g} s idle, "
            f"{o.latency_seconds:.0f} s during two exports of {table}"
        )
        idle = asyncio.run(self._latency([], o.latency_seconds / 4))
        extracts = [self.svc.create_extract(f"load {i}", [table], "jsonl", False) for i in range(2)]
        busy = asyncio.run(self._latency(extracts, o.latency_seconds))
        clients = f"{o.clients} clients polling every {o.poll_interval * 1000:.0f} ms"
        for label, (latencies, errors, exports), seconds in (
            ("workers idle", idle, o.latency_seconds / 4),
            ("two exports running", busy, o.latency_seconds),
        ):
            latencies.sort()
            if not latencies:
                r.check("5 latency", f"{label}: no request answered", "—", "p99 < 100 ms", False)
                continue
            p50, p99 = (
                latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 for q in (0.5, 0.99)
            )
            loaded = label != "workers idle"
            r.check(
                "5 latency",
                f"{label}: p50 / p99 / max; {clients}, {seconds:.0f} s "
                f"({len(latencies):,} requests, {len(latencies) / seconds:.0f}/s)",
                f"{p50:.1f} / {p99:.1f} / {latencies[-1] * 1000:.1f} ms",
                "p99 < 100 ms" if loaded else "",
                p99 < 100 if loaded else None,
            )
            r.check(
                "5 latency",
                f"{label}: errors" + (f" (exports completed meanwhile: {exports})" if loaded else ""),
                f"{errors}",
                "0",
                errors == 0,
            )

    async def _latency(self, extracts: list[str], seconds: float) -> tuple[list[float], int, int]:
        """(latencies, errors, exports completed) of ``clients`` pollers over ``seconds``.

        Each extract in ``extracts`` is kept running the whole time (a new run as
        soon as one completes); the pollers read those runs, or the last start
        latency run when there are none, and list the extracts.
        """
        o = self.o
        limits = httpx.Limits(max_connections=o.clients + 4)
        async with httpx.AsyncClient(
            base_url=self.svc.base_url, headers=self.svc.headers, timeout=30, limits=limits, verify=TLS
        ) as client:
            current: dict[str, str] = {}
            finished = 0
            stop = asyncio.Event()

            async def keep_exporting(extract: str) -> None:
                nonlocal finished
                while not stop.is_set():
                    response = await client.post(f"/api/extracts/{extract}/run")
                    response.raise_for_status()
                    run = response.json()["data"]["run_id"]
                    current[extract] = run
                    while not stop.is_set():
                        record = (await client.get(f"/api/data/extract_runs/{run}")).json()["data"]
                        if record["status"] in ("completed", "failed", "cancelled"):
                            if record["status"] != "completed":
                                raise BenchError(f"load run {run} {record['status']}: {record['error']}")
                            finished += 1
                            await client.delete(f"/api/data/extract_runs/{run}")
                            break
                        await asyncio.sleep(0.2)
                    else:
                        await client.post(f"/api/extracts/{extract}/cancel")

            loaders = [asyncio.create_task(keep_exporting(e)) for e in extracts]
            while len(current) < len(extracts):
                await asyncio.sleep(0.05)
            if extracts:
                await asyncio.sleep(0.5)  # both exports reading and writing
            runs = list(current.values()) or [self.idle_run]

            latencies: list[float] = []
            errors = 0

            async def poller(number: int) -> None:
                nonlocal errors
                while not stop.is_set():
                    run = current[extracts[number % len(extracts)]] if extracts else runs[0]
                    for path in (f"/api/data/extract_runs/{run}", "/api/data/extracts"):
                        started = time.perf_counter()
                        try:
                            response = await client.get(path)
                            ok = response.status_code == 200 and response.json()["success"]
                        except httpx.HTTPError:
                            ok = False
                        latencies.append(time.perf_counter() - started)
                        errors += not ok
                    await asyncio.sleep(o.poll_interval)

            pollers = [asyncio.create_task(poller(i)) for i in range(o.clients)]
            await asyncio.sleep(seconds)
            stop.set()
            await asyncio.gather(*pollers)
            await asyncio.gather(*loaders)
            for extract in extracts:  # the runs cancelled at the end: wait for them, then delete them
                run = current[extract]
                while (await client.get(f"/api/data/extract_runs/{run}")).json()["data"]["status"] in (
                    "queued",
                    "running",
                ):
                    await asyncio.sleep(0.1)
                # A cancelled run's worker may still be stopping: 409 until it has, then its files go.
                for _ in range(100):
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.delete(f"/api/data/extract_runs/{run}")).status_code != 409:
                            break
                    await asyncio.sleep(0.1)
            return latencies, errors, finished

    # ------------------------------------------------------------ profile (when the export misses)

    def profile(self) -> None:
        """py-spy the whole service tree during one jsonl export; top functions of the busiest process."""
        import spy

        say("profiling one jsonl export with py-spy")
        extract = self.svc.create_extract("bench profile", ["events"], "jsonl", False)
        report = spy.profile_run(self.svc, extract, self.out / "profile.txt")
        self.results.notes.append(report)

    # ------------------------------------------------------------ all of it

    def sources_part(self) -> None:
        """Part 7 (``bench/sources.py``): each dialect against its own tools."""
        o = self.o
        if o.sources:
            part = sources.Part(
                self.results, self.results.check, self.source, o.workdir, o.rows, o.big_rows,
                o.repeats, o.workers, o.sources, reuse=o.smoke, service=self.service,
            )  # fmt: skip
            sources.run(part)

    def run(self) -> Results:
        self.setup()
        if self.o.sources_only:
            self.sources_part()
            return self.results
        try:
            self.start_service("main")
            self.warm_up()
            self.start_latency()
            self.exports()
            self.api_latency()
            self.memory()
            self.downloads()
            if not self.o.smoke:  # --smoke: part 7's SQLite runs on this service too
                self.stop_service()
            self.sources_part()
            if self.o.profile:
                self.start_service("profile")
                self.profile()
        finally:
            self.stop_service()
            shutil.rmtree(self.out, ignore_errors=True)
        return self.results


# ---------------------------------------------------------------- report


def machine() -> dict[str, str]:
    memory = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cli = subprocess.run(["sqlite3", "--version"], capture_output=True, text=True).stdout.split()[:1]
    utils = (
        subprocess.run(["sqlite-utils", "--version"], capture_output=True, text=True).stdout.strip()
        if shutil.which("sqlite-utils")
        else "not installed"
    )
    head = (
        subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or "?"
    )
    status = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    changed = [
        path
        for path in (line[3:] for line in status)  # the service's code, not the bench's
        if path.endswith((".py", ".sql")) and not path.startswith(("bench/", "tests/"))
    ]
    return {
        "code": f"commit {head}" + (f", with uncommitted changes to {', '.join(changed)}" if changed else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs (`nproc` {len(os.sched_getaffinity(0))}), {cpu}, {memory} RAM, "
        f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "sqlite": f"CLI {cli[0] if cli else '?'}, Python module {sqlite3.sqlite_version}",
        "orjson": orjson.__version__,
        "sqlite-utils": utils,
        "load": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    }


def render(results: Results, info: dict[str, str], argv: list[str], elapsed: float) -> str:
    lines = [
        f"Date: {info['date']}  ",
        f"Machine: {info['machine']}  ",
        f"Python {info['python']}; SQLite {info['sqlite']}; orjson {info['orjson']}; "
        f"{info['sqlite-utils']}  ",
        f"Load average at start / end: {info['load']} / {info['load_end']}  ",
        f"Code: {info['code']}  ",
        f"Command: `python bench/run.py {' '.join(argv)}` — {elapsed / 60:.1f} minutes",
        "",
        "### Exports (parts 1, 2, 3's big table and 7): "
        "wall time from POST run to the run's recorded `completed_at`",
        "",
        export_table(results),
        "",
        "### Memory, downloads, latency, sources (parts 3–7)",
        "",
        check_table(results),
    ]
    if results.notes:
        lines += ["", "### Notes", ""]
        for note in results.notes:  # a one-line note is a bullet, a block (a profile) its own paragraph
            lines += [note, ""] if "\n" in note else [f"- {note}"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the exported table")
    parser.add_argument(
        "--big-rows",
        type=int,
        default=0,
        help="rows of the big table (memory, downloads); 0: skip; e.g. 10000000",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender (median)")
    parser.add_argument("--sqlite-utils-repeats", type=int, default=1, help="runs of sqlite-utils (slow)")
    parser.add_argument(
        "--sqlite-utils-rows",
        type=int,
        default=100_000,
        help="rows sqlite-utils exports, the first ones, against sqlite3 -json on the same "
        "rows (0: all of --rows; at 1M rows it takes about a minute)",
    )
    parser.add_argument(
        "--yaml-rows", type=int, default=0, help="rows of the yaml case, the first ones (0: all of --rows)"
    )
    parser.add_argument("--latency-seconds", type=float, default=20, help="duration of the latency part")
    parser.add_argument("--clients", type=int, default=8, help="polling clients in the latency part")
    parser.add_argument(
        "--poll-interval", type=float, default=0.25, help="seconds each latency client waits between polls"
    )
    parser.add_argument("--start-repeats", type=int, default=10, help="runs of the start latency part")
    parser.add_argument("--workers", type=int, default=2, help="the service's --workers")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/extracts-bench"),
        help="generated data (kept for later runs), the service's state and files",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the generated data")
    parser.add_argument(
        "--verify-big",
        choices=["sampled", "full"],
        default="sampled",
        help="check the big export row by row (full: slower by about a minute per 10M rows)",
    )
    parser.add_argument(
        "--check-baselines",
        choices=["rows", "full"],
        default="rows",
        help="check the command-line tools' outputs by row count, or row by row like the "
        "service's (full: slower by a few seconds per million rows)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one jsonl export with py-spy and print where the time goes",
    )
    parser.add_argument(
        "--sources",
        default="sqlite,postgresql,mysql",
        help="part 7: the dialects to measure against their own tools ('none': skip; a server "
        "that does not answer is skipped)",
    )
    parser.add_argument("--sources-only", action="store_true", help="run part 7 only")
    parser.add_argument("--markdown", type=Path, help="also write the results as Markdown to this file")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="small and quick (about 15 s): 5,000 rows, one run each, 1 s of latency, one service "
        "per database",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.big_rows = min(args.rows, 5_000), min(args.big_rows or 15_000, 15_000)
        args.repeats, args.sqlite_utils_repeats = 1, 1
        args.latency_seconds, args.start_repeats = min(args.latency_seconds, 1), 3
        args.check_baselines = "full"
    if args.rows < 2 or args.repeats < 1:
        parser.error("--rows must be at least 2 and --repeats at least 1")
    args.workdir = args.workdir.absolute()
    args.sources = [] if args.sources == "none" else [d.strip() for d in args.sources.split(",") if d.strip()]
    unknown = set(args.sources) - {"sqlite", "postgresql", "mysql"}
    if unknown:
        parser.error(f"--sources: unknown dialect(s) {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    options = Options(**{k: v for k, v in vars(args).items() if k in Options.__dataclass_fields__})
    info = machine()
    started = time.perf_counter()
    try:
        results = Bench(options).run()
    except (BenchError, verify.Mismatch, subprocess.CalledProcessError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    info["load_end"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    text = render(results, info, argv, elapsed)
    print(text)
    if args.markdown:
        args.markdown.write_text("# Benchmark results\n\n" + text)
    missed = [e for e in results.exports if e.met is False] + [c for c in results.checks if c.met is False]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
