"""The real service under test, as a subprocess, and what the benchmark reads from /proc about it.

The service is started exactly as a user starts it (``python extracts_app.py
...``), never imported: its event loop, process pool and memory are its own.
Its process tree: the server (uvicorn, the event loop) → the forkserver → the
pool workers and the Manager process (the progress queue); plus a resource
tracker. Memory is read from ``/proc/<pid>/status``: ``VmHWM`` is reset before
a measurement by writing ``5`` to ``/proc/<pid>/clear_refs``, so after it
``VmHWM`` is the exact peak over that measurement, with no sampling.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("completed", "failed", "cancelled")
CLK_TCK = os.sysconf("SC_CLK_TCK")
TIMED_POLL_S = 0.1  # how often a timed run is polled (``Service.timed_run``)
# One TLS context for every client: httpx builds one per client otherwise, CA bundle loaded
# (about 50 ms of CPU each).
TLS = ssl.create_default_context()


class BenchError(Exception):
    """The service did something the benchmark cannot measure (failed run, no start)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    """A running ``extracts_app.py`` and an authenticated client for it."""

    source: Path
    workdir: Path
    workers: int = 2
    token: str = "bench-token-0123456789abcdef"
    port: int = field(default_factory=free_port)
    state: str | None = None  # --db: a postgresql:// URL; default: state.db in workdir
    storage_url: str | None = None  # --storage: an object store URL; default: the storage directory
    extra: list[str] = field(default_factory=list)  # more options (--storage-endpoint, --lease-seconds…)
    env: dict[str, str] = field(default_factory=dict)  # more environment (an object store's credentials)
    process: subprocess.Popen[bytes] | None = None
    client: httpx.Client = field(init=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self, timeout: float = 60) -> None:
        self.launch()
        self.ready(timeout)

    def launch(self) -> Service:
        """Start the process without waiting for it: ``ready`` waits (several services start at once)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "service.log", "ab")  # noqa: SIM115 — the child keeps it
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        for name in list(env):  # the bench's options, not a stray environment, configure it
            if name.startswith("EXTRACTS_"):
                del env[name]
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "extracts_app.py"),
                "--source",
                str(self.source),
                "--db",
                self.state or str(self.workdir / "state.db"),
                "--storage",
                self.storage_url or str(self.storage),
                "--port",
                str(self.port),
                "--token",
                self.token,
                "--workers",
                str(self.workers),
                *self.extra,
            ],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        self.client = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=60, verify=TLS)
        return self

    def ready(self, timeout: float = 60) -> None:
        """Wait until the launched service answers ``/health``."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"the service exited with {self.process.returncode} at start-up; "
                    f"see {self.workdir / 'service.log'}"
                )
            with contextlib.suppress(httpx.TransportError):
                if self.client.get("/health").status_code == 200:
                    return
            time.sleep(0.05)
        raise BenchError(f"the service did not answer /health within {timeout} s")

    def stop(self) -> None:
        """SIGTERM, as a user stops it (its workers go with it); SIGKILL after 30 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        with contextlib.suppress(AttributeError):
            self.client.close()

    # ------------------------------------------------------------ API

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.client.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise BenchError(f"{method} {path} answered {response.status_code}: {response.text[:500]}")
        return response.json()["data"]

    def create_extract(self, name: str, schemas: list[str], fmt: str, compress: bool, **extra: Any) -> str:
        body = {"name": name, "schemas": schemas, "format": fmt, "compress": compress, **extra}
        return self.api("POST", "/api/data/extracts", json=body)["id"]

    def start_run(self, extract_id: str) -> str:
        return self.api("POST", f"/api/extracts/{extract_id}/run")["run_id"]

    def run_record(self, run_id: str) -> dict[str, Any]:
        return self.api("GET", f"/api/data/extract_runs/{run_id}")

    def timed_run(self, extract_id: str) -> tuple[float, str, dict[str, Any]]:
        """(seconds from POST run to the run's recorded ``completed_at``, run id, record).

        The end is the service's own timestamp (this machine's clock, to the
        millisecond), so the waiting polls only every ``TIMED_POLL_S``: polling every
        20 ms cost the export about 0.08 s of 1.5 s on two cores (each poll is a
        request and a state read on the service, beside the export's own work).
        """
        posted = time.time()
        run = self.start_run(extract_id)
        record = self.wait(run, poll=TIMED_POLL_S)
        completed = datetime.fromisoformat(record["completed_at"]).timestamp()
        return completed - posted, run, record

    def wait(self, run_id: str, poll: float = 0.02, timeout: float = 3600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.run_record(run_id)
            if record["status"] in TERMINAL:
                if record["status"] != "completed":
                    raise BenchError(f"run {run_id} {record['status']}: {record.get('error')}")
                return record
            time.sleep(poll)
        raise BenchError(f"run {run_id} did not finish within {timeout} s")

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        return self.api(
            "GET",
            "/api/data/extract_artifacts",
            params={"filter[where][run_id]": run_id, "filter[limit]": 1000},
        )

    def delete_run(self, run_id: str) -> None:
        self.api("DELETE", f"/api/data/extract_runs/{run_id}")


# ------------------------------------------------------------ /proc


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes (empty when it is gone)."""
    values = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount, _unit = line.split()
                values[key[:-1]] = int(amount) * 1024
    return values


def _cpu_ticks(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    return 0


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rss(pid: int) -> int:
    return _status(pid).get("VmRSS", 0)


@dataclass
class MemoryWindow:
    """Peak memory of the server and of its busiest descendant between ``open`` and ``close``.

    The busiest descendant (most CPU time used in the window) is the pool worker
    that ran the export: the forkserver, the Manager and idle workers barely run.
    """

    root: int
    sample_every: float = 0.0  # > 0: also sample every descendant's VmRSS, for a curve over the run
    before_cpu: dict[int, int] = field(default_factory=dict)
    before_rss: dict[int, int] = field(default_factory=dict)
    server_rss_before: int = 0
    server_peak: int = 0
    worker_peak: int = 0
    worker_pid: int | None = None
    worker_rss_before: int = 0  # 0: the worker started during the window
    worker_cpu_seconds: float = 0.0
    samples: dict[int, list[int]] = field(default_factory=dict)  # pid -> VmRSS every sample_every s
    _stop: threading.Event = field(default_factory=threading.Event)
    _sampler: threading.Thread | None = None

    def open(self) -> MemoryWindow:
        for pid in [self.root, *descendants(self.root)]:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
            self.before_cpu[pid] = _cpu_ticks(pid)
            self.before_rss[pid] = rss(pid)
        self.server_rss_before = rss(self.root)
        if self.sample_every > 0:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_every):
            for pid in descendants(self.root):
                self.samples.setdefault(pid, []).append(rss(pid))

    def worker_curve(self, points: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)) -> list[int]:
        """The worker's VmRSS at these fractions of the run (needs ``sample_every``)."""
        series = self.samples.get(self.worker_pid or -1, [])
        return [series[max(0, round(p * len(series)) - 1)] for p in points] if series else []

    def close(self) -> MemoryWindow:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        self.server_peak = _status(self.root).get("VmHWM", 0)
        busiest, most = None, -1
        for pid in descendants(self.root):
            used = _cpu_ticks(pid) - self.before_cpu.get(pid, 0)
            if used > most:
                busiest, most = pid, used
        if busiest is not None:
            self.worker_pid = busiest
            self.worker_peak = _status(busiest).get("VmHWM", 0)
            self.worker_rss_before = self.before_rss.get(busiest, 0)
            self.worker_cpu_seconds = most / CLK_TCK
        return self
