"""What the object-storage and several-instances benchmarks run beside the service.

- ``Moto``: moto's S3 server (``python -m moto.server``, from ``pip install
  'moto[server]'``) on 127.0.0.1, a bucket made in it, and the CPU time it used;
- ``StateDatabase``: a PostgreSQL database made for one benchmark and dropped after it;
- ``Figures``: the ``| part | measure | value | target | |`` table both print,
  and the header (date, machine, load averages, code) of their Markdown.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from service import CLK_TCK, ROOT, BenchError, free_port

BUCKET = "extracts-bench"
# moto accepts any key; the service reads these standard variables (SPEC: Object storage).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
MIB = 1 << 20


def say(message: str) -> None:
    """Progress goes to stderr; stdout carries only the results."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    return 0.0


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


@dataclass
class Moto:
    """moto's S3 server on loopback, with one bucket. It keeps every object in its own process."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60) -> Moto:
        """Launch it (unless ``launch`` did), wait for it to answer, make the bucket."""
        if self.process is None:
            self.launch()
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"moto_server exited with {self.process.returncode}: pip install 'moto[server]'"
                )
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise BenchError(f"moto_server did not answer within {timeout} s")
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{BUCKET}", method="PUT")).close()
        return self

    def launch(self) -> Moto:
        """Start the process without waiting for it (``start`` waits)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "moto.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        return self

    def url(self, prefix: str) -> str:
        """The service's ``--storage`` for a prefix of the bucket."""
        return f"s3://{BUCKET}/{prefix}"

    def options(self) -> list[str]:
        return ["--storage-endpoint", self.endpoint]

    def rss(self) -> int:
        from service import rss

        return rss(self.pid)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@dataclass
class StateDatabase:
    """A PostgreSQL database for one benchmark's shared state, dropped at the end."""

    admin: str  # a URL of the server's maintenance database, e.g. postgresql://postgres@127.0.0.1/postgres
    name: str

    @property
    def url(self) -> str:
        base = self.admin.rsplit("/", 1)[0]
        return f"{base}/{self.name}"

    def _admin(self, statement: str) -> None:
        import psycopg

        try:
            with psycopg.connect(self.admin, autocommit=True, connect_timeout=10) as con:
                con.execute(statement)
        except psycopg.OperationalError as exc:
            raise BenchError(f"PostgreSQL at {self.admin} is not reachable (--postgres): {exc}") from None

    def create(self) -> StateDatabase:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self._admin(f'CREATE DATABASE "{self.name}"')
        return self

    def drop(self) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# ---------------------------------------------------------------- the report


def mark(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "**MISSED**")


@dataclass
class Figures:
    """The rows of the results table, in the order they were measured."""

    rows: list[tuple[str, str, str, str, bool | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, part: str, measure: str, value: str, target: str = "", met: bool | None = None) -> None:
        self.rows.append((part, measure, value, target, met))
        say(f"{part}: {measure}: {value}" + (f" (target {target}: {mark(met)})" if target else ""))

    @property
    def missed(self) -> bool:
        return any(met is False for *_, met in self.rows)

    def table(self) -> str:
        lines = ["| part | measure | value | target | |", "|---|---|---|---|---|"]
        ordered = sorted(self.rows, key=lambda row: row[0])  # by part; stable: a part keeps its order
        lines += [f"| {p} | {m} | {v} | {t} | {mark(met)} |" for p, m, v, t, met in ordered]
        return "\n".join(lines)

    def render(self, script: str, argv: list[str], load_start: str, elapsed: float) -> str:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        changed = [
            line[3:]
            for line in subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
            ).stdout.splitlines()
            if line[3:].endswith((".py", ".sql")) and not line[3:].startswith(("bench/", "tests/"))
        ]
        memory = "?"
        with contextlib.suppress(OSError), open("/proc/meminfo") as f:
            memory = next(f"{int(x.split()[1]) / 1024**2:.1f} GiB" for x in f if x.startswith("MemTotal:"))
        from importlib.metadata import version

        lines = [
            f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}  ",
            f"Machine: {os.cpu_count()} CPUs, {memory} RAM, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, moto {version('moto')}  ",  # importing moto takes a second
            f"Load average at start / end: {load_start} / {load()}  ",
            f"Code: commit {head or '?'}"
            + (f", with uncommitted changes to {', '.join(changed)}" if changed else "")
            + "  ",
            f"Command: `python bench/{script} {' '.join(argv)}` — {elapsed / 60:.1f} minutes",
            "",
            self.table(),
        ]
        if self.notes:
            lines += ["", *[f"- {note}" for note in self.notes]]
        return "\n".join(lines) + "\n"
