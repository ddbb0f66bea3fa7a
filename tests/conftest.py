"""Shared fixtures: source databases and a real service (the console script under uvicorn)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789"

SHOP_SCHEMA = '''
CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT, age INTEGER,
                    score REAL, avatar BLOB, created_at TEXT DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users (id)
                     ON DELETE CASCADE, total REAL NOT NULL DEFAULT 0, note TEXT);
CREATE INDEX orders_user ON orders (user_id);
CREATE TABLE "order items" (order_id INTEGER NOT NULL REFERENCES orders (id), line INTEGER NOT NULL,
                            "sku ""quoted""" TEXT, qty INTEGER, PRIMARY KEY (order_id, line));
CREATE VIEW adults AS SELECT id, name FROM users WHERE age >= 18;
'''


def make_shop_db(path: Path) -> Path:
    """A small source with a composite key, a foreign key, an index, a BLOB and awkward names."""
    con = sqlite3.connect(path)
    con.executescript(SHOP_SCHEMA)
    con.executemany(
        "INSERT INTO users (id, email, name, age, score, avatar) VALUES (?, ?, ?, ?, ?, ?)",
        [
            (1, "ana@example.com", "Ana Żółć", 34, 0.1 + 0.2, b"\x00\xff\x10"),
            (2, "bo@example.com", "Bo 李", 17, None, None),
            (3, "cy@example.com", None, 70, 1e308, b""),
            (2**62, "big@example.com", "Big", None, -0.5, None),
        ],
    )
    con.executemany(
        "INSERT INTO orders (id, user_id, total, note) VALUES (?, ?, ?, ?)",
        [(i, 1 + i % 3, i * 1.25, None if i % 2 else f"note {i} ✓") for i in range(1, 51)],
    )
    con.executemany(
        'INSERT INTO "order items" VALUES (?, ?, ?, ?)',
        [(o, n, f"SKU-{o}-{n}", n) for o in range(1, 11) for n in (1, 2)],
    )
    con.commit()
    con.close()
    return path


def make_big_db(path: Path, rows: int) -> Path:
    """A ``big`` table of ``rows`` rows (~80 bytes of JSON each) and a one-row ``small``."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, name TEXT, amount REAL, at TEXT)")
    con.execute(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT ?) "
        "INSERT INTO big SELECT x, 'name ' || x, x * 0.25, '2024-01-01T00:00:00Z' FROM c",
        (rows,),
    )
    con.execute("CREATE TABLE small (id INTEGER PRIMARY KEY, v TEXT)")
    con.execute("INSERT INTO small VALUES (1, 'one')")
    con.commit()
    con.close()
    return path


def worker_writing(storage: Path, run_id: str, timeout: float = 30) -> int:
    """The pid of the process holding a file of the run directory open."""
    target = str(storage / run_id) + "/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(target):
                        return int(pid)
            except OSError:
                continue
        time.sleep(0.01)
    raise AssertionError(f"no process writing {target}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_command() -> list[str]:
    """This checkout's service, whatever checkout an installed console script points at."""
    return [sys.executable, str(ROOT / "extracts_app.py")]


def script_command() -> list[str]:
    """The installed ``extracts-app`` console script (``pip install -e .`` puts it on PATH)."""
    script = shutil.which("extracts-app")
    assert script, "extracts-app is not installed: run pip install -e '.[test]'"
    return [script]


@dataclass
class Service:
    """A running extracts-app process and an authenticated client for it."""

    base_url: str
    db: Path
    storage: Path
    source: str
    process: subprocess.Popen[bytes]
    log: Path
    args: list[str] = field(default_factory=list)
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(
            base_url=self.base_url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                return self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(10)
        return self.process.returncode

    def wait_run(self, run_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.client.get(f"/api/data/extract_runs/{run_id}").json()["data"]
            if run["status"] in ("completed", "failed", "cancelled"):
                return run
            time.sleep(0.05)
        raise AssertionError(f"run {run_id} still {run['status']} after {timeout}s")

    def create_extract(self, **fields) -> dict:
        body = {"name": "Test export"} | fields
        response = self.client.post("/api/data/extracts", json=body)
        assert response.status_code == 201, response.text
        return response.json()["data"]

    def run(self, extract_id: str) -> str:
        response = self.client.post(f"/api/extracts/{extract_id}/run")
        assert response.status_code == 202, response.text
        return response.json()["data"]["run_id"]


def start_service(
    tmp: Path,
    source: str | None,
    *extra: str,
    env: dict | None = None,
    db: Path | None = None,
    storage: Path | None = None,
) -> Service:
    port = free_port()
    db = db or tmp / "state" / "extracts.db"
    storage = storage or tmp / "storage"
    args = [
        "--db",
        str(db),
        "--storage",
        str(storage),
        "--port",
        str(port),
        "--token",
        TOKEN,
        "--workers",
        "2",
        *extra,
    ]
    if source is not None:
        args += ["--source", source]
    log = tmp / f"service-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*app_command(), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            env={**os.environ, **(env or {})},
        )
    service = Service(f"http://127.0.0.1:{port}", db, storage, source or "", process, log, args)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"service exited {process.returncode}:\n{service.output()}")
        try:
            if httpx.get(f"{service.base_url}/health", timeout=1).status_code == 200:
                return service
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"service did not start:\n{service.output()}")


@pytest.fixture(scope="module")
def shop_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shop_db(tmp_path_factory.mktemp("source") / "shop.db")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, shop_db: Path) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("service"), str(shop_db))
    yield svc
    svc.stop()
