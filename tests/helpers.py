"""What the tests share: source databases, a running service, moto's S3 server, executor jobs.

Fixtures live in ``conftest.py``; test files import these helpers with ``from helpers import …``.

Two ways to run the service:

- ``start_service``: the console script in its own process under uvicorn, for what only a real
  process shows (a crash, ``kill -9``, signals, its output, its process limits).
- ``start_in_process``: the same app (``prepare`` then ``create_app``) served by uvicorn on a
  thread of the test process, for the HTTP contract. Its lifespan still starts the worker pool:
  runs are real runs in real worker processes. One at a time per test process: the pool counts
  this process's children as its own.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import logging
import math
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789"
# One TLS context for every HTTP client the tests make: httpx builds one for each new
# client, loading the CA bundle (about 50 ms of CPU here). A health poll every 20 ms cost
# most of a service start's CPU that way, and the suite made thousands of clients.
TLS = ssl.create_default_context()
TERMINAL = ("completed", "failed", "cancelled")
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def unique_name(prefix: str) -> str:
    """A database, role or bucket name no other test process uses at the same time (xdist-safe)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"{prefix}_{worker}_{os.getpid()}_{secrets.token_hex(3)}"


def wait_for(condition: Callable[[], Any], timeout: float = 30, every: float = 0.02, what: str = "") -> Any:
    """Poll ``condition`` until it returns something true; that value. Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or condition}")
        time.sleep(every)


# ---------------------------------------------------------------- source databases

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


def add_big_table(path: Path, rows: int) -> Path:
    """Adds a ``big`` table of ``rows`` rows (~80 bytes of JSON each): a run takes a while over it."""
    with contextlib.closing(sqlite3.connect(path)) as con, con:
        con.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, name TEXT, amount REAL, at TEXT)")
        con.execute(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT ?) "
            "INSERT INTO big SELECT x, 'name ' || x, x * 0.25, '2024-01-01T00:00:00Z' FROM c",
            (rows,),
        )
    return path


def make_big_db(path: Path, rows: int) -> Path:
    """A ``big`` table of ``rows`` rows (~80 bytes of JSON each) and a one-row ``small``."""
    add_big_table(path, rows)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE small (id INTEGER PRIMARY KEY, v TEXT)")
    con.execute("INSERT INTO small VALUES (1, 'one')")
    con.commit()
    con.close()
    return path


EVIL_TABLE = "../../etc/passwd"
EVIL_COLUMN = "x'; DROP TABLE users; --"


def make_hostile_source(path: Path) -> Path:
    """The shop, plus a table and a column named to reach a file path or SQL as code if they could."""
    make_shop_db(path)
    con = sqlite3.connect(path)
    con.execute(f'CREATE TABLE "{EVIL_TABLE}" (id INTEGER PRIMARY KEY, "{EVIL_COLUMN}" TEXT)')
    con.executemany(f'INSERT INTO "{EVIL_TABLE}" VALUES (?, ?)', [(1, "root:x:0:0"), (2, "daemon:x:1:1")])
    con.commit()
    con.close()
    return path


def parse_file(name: str, data: bytes) -> list[dict]:
    """The records of an exported data file, by its name (.jsonl, .json, .yaml, each maybe .gz)."""
    if name.endswith(".gz"):
        data, name = gzip.decompress(data), name[:-3]
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in data.splitlines()]
    if name.endswith(".json"):
        return json.loads(data)
    if name.endswith(".yaml"):
        return yaml.safe_load(data)
    raise AssertionError(name)


@contextlib.contextmanager
def sparse_scratch(fallback: Path) -> Iterator[Path]:
    """A directory for multi-GiB sparse files, removed afterwards: on the tmpfs at /dev/shm if any.

    ext4 reads a hole at about 400 MB/s here, all of it kernel time (a 4 GiB file:
    10 s of CPU per read); tmpfs reads it at about 10 GB/s. Sparse, the files take
    no memory there. Elsewhere ``fallback``.
    """
    shm = Path("/dev/shm")
    # Room for what a run writes beside them, and the service's free-space reserve (100 MB).
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1 << 30):
        yield fallback
        return
    directory = Path(tempfile.mkdtemp(prefix="extracts-test-", dir=shm))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- processes


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


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A real small volume (root only); skips the test where the machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


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


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (workers, the forkserver, the manager, the resource tracker)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def manager_pid(service_pid: int) -> int:
    """The pid of a service's Manager process (the workers' message queue).

    The pool's processes are forked by the service's forkserver; the Manager is
    the first of them (started with the service, workers as runs come).
    """

    def stat(pid: int) -> list[str]:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()

    below = descendants(service_pid)
    forkserver = next(
        pid
        for pid in below
        if int(stat(pid)[1]) == service_pid and b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    forked = [pid for pid in below if int(stat(pid)[1]) == forkserver]
    return min(forked, key=lambda pid: int(stat(pid)[19]))  # starttime


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ---------------------------------------------------------------- the service


class Api:
    """What a test does through the service's HTTP API, wherever the service runs."""

    client: httpx.Client

    def wait_run(self, run_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.client.get(f"/api/data/extract_runs/{run_id}").json()["data"]
            if run["status"] in TERMINAL:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} still {run['status']} after {timeout}s")
            time.sleep(0.02)

    def create_extract(self, **fields: Any) -> dict:
        body = {"name": "Test export"} | fields
        response = self.client.post("/api/data/extracts", json=body)
        assert response.status_code == 201, response.text
        return response.json()["data"]

    def run(self, extract_id: str) -> str:
        response = self.client.post(f"/api/extracts/{extract_id}/run")
        assert response.status_code == 202, response.text
        return response.json()["data"]["run_id"]

    def artifacts(self, run_id: str) -> list[dict]:
        """The run's artifact records, oldest first."""
        return self.client.get(
            "/api/data/extract_artifacts",
            params={
                "filter[where][run_id]": run_id,
                "filter[order]": "created_at asc",
                "filter[limit]": "1000",
            },
        ).json()["data"]


def http_client(**options: Any) -> httpx.Client:
    """An httpx client on the shared TLS context (``TLS``); make every client with this."""
    return httpx.Client(verify=TLS, **options)


def http_get(url: str, **options: Any) -> httpx.Response:
    """One GET on a client of its own, as ``httpx.get`` (but a 30 s timeout unless given), on ``TLS``."""
    with http_client(timeout=options.pop("timeout", 30)) as client:
        return client.get(url, **options)


def authenticated_client(base_url: str) -> httpx.Client:
    return http_client(base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"})


@dataclass
class Service(Api):
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
        self.client = authenticated_client(self.base_url)

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
                self.process.wait(10)
                # Killed quietly, a stop that hangs went unseen for sessions (cb863a0).
                raise AssertionError(
                    f"the service did not stop within 30 s of signal {sig}:\n{self.output()[-4000:]}"
                ) from None
        return self.process.returncode


def wait_healthy(service: Service, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise AssertionError(f"service exited {service.process.returncode}:\n{service.output()}")
        try:
            if http_get(f"{service.base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.02)
    service.process.kill()
    raise AssertionError(f"service did not start:\n{service.output()}")


def start_service(
    tmp: Path,
    source: str | None,
    *extra: str,
    env: dict | None = None,
    db: Path | str | None = None,
    storage: Path | str | None = None,
    token: bool = True,
    preexec_fn: Callable[[], None] | None = None,
) -> Service:
    """The console script in its own process, on a free port; returns once /health answers.

    ``token=False`` passes no ``--token`` (give it in ``env`` as ``EXTRACTS_TOKEN``);
    ``preexec_fn`` runs in the child before exec (process limits). A port another process
    took between ``free_port`` and the bind is retried on another one.
    """
    db = db or tmp / "state" / "extracts.db"
    storage = storage or tmp / "storage"
    for attempt in range(3):
        port = free_port()
        args = ["--db", str(db), "--storage", str(storage), "--port", str(port), "--workers", "2"]
        args += ["--token", TOKEN] if token else []
        args += [*extra, *(["--source", source] if source is not None else [])]
        log = tmp / f"service-{port}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*app_command(), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                env={**os.environ, **(env or {})},
                preexec_fn=preexec_fn,
            )
        service = Service(f"http://127.0.0.1:{port}", db, storage, source or "", process, log, args)  # type: ignore[arg-type]
        try:
            wait_healthy(service)
            return service
        except AssertionError:
            if attempt < 2 and "address already in use" in service.output().lower():
                continue
            raise
    raise AssertionError("unreachable")


class InProcessService(Api):
    """The app served by uvicorn on a thread of this process (see the module docstring)."""

    running: InProcessService | None = None

    def __init__(
        self, tmp: Path, source: str | None, *extra: str, db: Path | None = None, storage: Path | None = None
    ) -> None:
        import uvicorn

        import extracts_app
        from extracts import startup
        from extracts.settings import parse_settings

        self.db = db or tmp / "state" / "extracts.db"
        self.storage = storage or tmp / "storage"
        if InProcessService.running is not None:
            raise AssertionError("one in-process service at a time: its pool takes this process's children")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by accepted connections (uvicorn sets it only on sockets it binds itself):
        # without it a response written in two parts waits out the client's delayed ACK (40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))  # bound here: no other process can take the port meanwhile
        port = sock.getsockname()[1]
        args = ["--db", str(self.db), "--storage", str(self.storage), "--port", str(port)]
        args += ["--token", TOKEN, "--workers", "2", *extra]
        args += ["--source", source] if source is not None else []
        self.settings = parse_settings(args, environ={})
        self._records: list[str] = []
        self._capture = _Capture(self._records)
        held = len(startup._HELD)
        try:
            startup.prepare(self.settings)
        except BaseException:  # a start-up refused: nothing of it stays in this process
            for fd in startup._HELD[held:]:
                os.close(fd)
            del startup._HELD[held:]
            sock.close()
            self._capture.close()
            raise
        self._held = startup._HELD[held:]  # the lock files this instance took: released at stop
        del startup._HELD[held:]
        self.source = self.settings.source or ""
        self.base_url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                extracts_app.create_app(self.settings),
                log_config=None,
                access_log=False,
                timeout_keep_alive=extracts_app.KEEP_ALIVE_S,
            )
        )
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True, name="extracts-in-process"
        )
        self._sock = sock
        InProcessService.running = self
        self._thread.start()
        try:
            wait_for(lambda: self.server.started or not self._thread.is_alive(), what="uvicorn start")
            if not self.server.started:
                raise AssertionError(f"the app did not start:\n{self.output()}")
        except BaseException:
            self.stop()
            raise
        self.client = authenticated_client(self.base_url)

    def output(self) -> str:
        """What the service logged (its loggers and uvicorn's) while it ran."""
        return "\n".join(self._records)

    def stop(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
        self.server.should_exit = True
        self._thread.join(60)
        assert not self._thread.is_alive(), "the in-process service did not stop"
        self._sock.close()
        for fd in self._held:
            os.close(fd)
        self._held = []
        self._capture.close()
        InProcessService.running = None


class _Capture(logging.Handler):
    """Every log record of the service's loggers, formatted, into ``records``."""

    LOGGERS = ("extracts", "executor", "uvicorn", "uvicorn.error")

    def __init__(self, records: list[str]) -> None:
        super().__init__(logging.INFO)
        self.records = records
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._levels = {}
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.INFO)
        logging.getLogger().addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))

    def close(self) -> None:
        logging.getLogger().removeHandler(self)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        super().close()


def start_in_process(
    tmp: Path, source: str | None, *extra: str, db: Path | None = None, storage: Path | None = None
) -> InProcessService:
    """The app in this process (see the module docstring); ``stop()`` it when done."""
    tmp.mkdir(parents=True, exist_ok=True)
    return InProcessService(tmp, source, *extra, db=db, storage=storage)


# ---------------------------------------------------------------- faults


def assert_files_match(service: Api, run_id: str) -> None:
    """Every artifact of the run is on disk with its recorded size and SHA-256; no temp file left."""
    run_dir = service.storage / run_id
    artifacts = service.artifacts(run_id)
    for a in artifacts:
        data = Path(a["storage_path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (a["size_bytes"], a["checksum"]), a
    if run_dir.exists():
        on_disk = sorted(p.name for p in run_dir.iterdir())
        assert on_disk == sorted(a["artifact_name"] for a in artifacts), (run_id, on_disk, artifacts)


def no_temporary_files(storage: Path) -> list[str]:
    return [str(p) for p in storage.glob("run_*/.*")]


class Prober:
    """Hits /health and a list every ``every`` seconds from a thread; records anything but a 200."""

    def __init__(self, service: Api, every: float = 0.02) -> None:
        self.service, self.every = service, every
        self.problems: list[str] = []
        self.requests = 0
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _probe(self) -> None:
        with http_client(
            base_url=self.service.base_url, timeout=10, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as client:
            while not self._stop.wait(self.every):
                for url in ("/health", "/api/data/extract_runs?filter[limit]=5"):
                    started = time.monotonic()
                    try:
                        status = client.get(url).status_code
                    except httpx.HTTPError as exc:
                        self.problems.append(f"{url}: {exc!r}")
                        continue
                    self.slowest = max(self.slowest, time.monotonic() - started)
                    self.requests += 1
                    if status != 200:
                        self.problems.append(f"{url}: {status}")


@contextlib.contextmanager
def state_locked(db: Path, seconds: float) -> Iterator[None]:
    """Another process takes the state file's write lock (BEGIN EXCLUSIVE) for at most ``seconds``.

    The block starts once the lock is held; leaving it releases the lock (if still held).
    """
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import select, sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); "
            "select.select([sys.stdin], [], [], float(sys.argv[2])); c.rollback()",
            str(db),
            str(seconds),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.stdin.close()  # wakes the holder's select: the lock goes now
        holder.wait(seconds + 30)
        holder.stdout.close()


# ---------------------------------------------------------------- moto's S3 server

BUCKET = "extracts-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


@dataclass
class Moto:
    """A running moto_server: an S3 endpoint on loopback."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def store(self, prefix: str) -> Any:
        from obstore.store import S3Store

        return S3Store(
            BUCKET,
            prefix=prefix,
            config={
                "endpoint": self.endpoint,
                **{"access_key_id": "test", "secret_access_key": "test", "region": "us-east-1"},
            },
            client_options={"allow_http": True},
        )

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()

    def uploads_in_progress(self) -> int:
        with urllib.request.urlopen(f"{self.endpoint}/{BUCKET}?uploads") as reply:
            return reply.read().count(b"<Upload>")


def start_moto(port: int | None = None, bucket: bool = True, **env: str) -> Moto:
    """moto_server on ``port`` (a free one by default), with the test bucket unless ``bucket=False``."""
    for attempt in range(3):
        chosen = port or free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(chosen)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **env},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{chosen}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            process.kill()
            process.wait()
            if port is None and attempt < 2:  # the port was taken meanwhile: another one
                continue
            raise AssertionError("moto_server did not start")
        if bucket:
            request = urllib.request.Request(f"http://127.0.0.1:{chosen}/{BUCKET}", method="PUT")
            urllib.request.urlopen(request).close()
        return Moto(chosen, process)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- executor jobs, in-process

SOURCE_SCHEMA = '''
PRAGMA journal_mode = WAL;
CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT,
                    age INTEGER DEFAULT 18, score REAL, avatar BLOB,
                    created_at TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')));
CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users (id)
                     ON DELETE CASCADE, total REAL NOT NULL DEFAULT 0, note TEXT);
CREATE INDEX orders_user ON orders (user_id);
CREATE TABLE "order items" (order_id INTEGER NOT NULL REFERENCES orders (id) ON UPDATE CASCADE,
                            line INTEGER NOT NULL, "sku ""quoted""" TEXT, qty INTEGER,
                            PRIMARY KEY (order_id, line));
CREATE UNIQUE INDEX "items by sku" ON "order items" ("sku ""quoted""", line);
CREATE TABLE "values" (id INTEGER PRIMARY KEY, v, label TEXT);
CREATE TABLE "../../etc/passwd" (x TEXT);
CREATE TABLE "notes ""2024"" Zoë's" ("the ""text""" TEXT, n INTEGER);
CREATE TABLE empty (a INTEGER, b TEXT);
CREATE TABLE keyed (k TEXT PRIMARY KEY, n INT) WITHOUT ROWID;
CREATE VIEW adults AS SELECT id, name FROM users WHERE age >= 18;
'''

TEXTS = [
    "Ana Żółć",
    "Bo 李",
    "",
    "emoji 😀 𝄞",
    'quote " back \\ slash',
    "tab\tnew\nline\r",
    "nul\x00byte",
    "\u2028\u2029\x85\ufeff",
    "del\x7f c1\x9f \uffff",
    "12",
    "null",
    "true",
    "- dash",
    "{",
    "}",
    "a: b",
    "# hash",
    "&anchor *alias",
    "550e8400-e29b-41d4",
    "ratio:1e5",
]
VALUES: list[Any] = [
    2**63 - 1,
    -(2**63),
    0,
    1,
    -1,
    2**53 + 1,
    0.1 + 0.2,
    1e308,
    -1e308,
    5e-324,
    -0.0,
    0.0,
    1.0,
    2.0**60,
    1e16 + 2,
    123456789.125,
    float("inf"),
    float("-inf"),
    None,
    b"",
    b"\x00\xff\x10 blob",
    *TEXTS,
]
USERS = [
    (1, "ana@example.com", "Ana Żółć", 34, 0.1 + 0.2, b"\x00\xff\x10"),
    (2, "bo@example.com", "Bo 李", 17, None, None),
    (3, "cy@example.com", None, 70, 1e308, b""),
    (2**62, "big@example.com", "Big", None, -0.5, None),
]


def make_source(path: Path) -> Path:
    """A WAL source with every awkward case: keys, names, storage classes, an empty table."""
    con = sqlite3.connect(path)
    con.executescript(SOURCE_SCHEMA)
    con.executemany(
        "INSERT INTO users (id, email, name, age, score, avatar) VALUES (?, ?, ?, ?, ?, ?)", USERS
    )
    con.executemany(
        "INSERT INTO orders (id, user_id, total, note) VALUES (?, ?, ?, ?)",
        [(i, 1 + i % 3, i * 1.25, None if i % 2 else f"note {i} ✓") for i in range(1, 51)],
    )
    con.executemany(
        'INSERT INTO "order items" VALUES (?, ?, ?, ?)',
        [(o, n, f"SKU-{o}-{n}", n) for o in range(1, 11) for n in (1, 2)],
    )
    con.executemany(
        'INSERT INTO "values" (v, label) VALUES (?, ?)', [(value, repr(value)) for value in VALUES]
    )
    con.executemany('INSERT INTO "../../etc/passwd" VALUES (?)', [("root:x:0:0",), ("daemon",)])
    con.executemany('INSERT INTO "notes ""2024"" Zoë\'s" VALUES (?, ?)', [('a "b"', 1), ("ü", 2)])
    con.executemany("INSERT INTO keyed VALUES (?, ?)", [("b", 2), ("a", 1)])
    con.commit()
    con.close()
    return path


def run_sql(db: Path, script: str) -> Path:
    """Run an SQL script on ``db`` with a connection of its own (another application)."""
    con = sqlite3.connect(db)
    try:
        con.executescript(script)
    finally:
        con.close()
    return db


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def json_value(value: Any) -> Any:
    """What the SPEC's encoding makes of an SQLite value."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def source_rows(db: Path, name: str, sql: str | None = None, params: tuple = ()) -> list[dict[str, Any]]:
    """The rows of ``name`` as the export should hold them, read with plain sqlite3."""
    con = sqlite3.connect(db)
    try:
        cursor = con.execute(sql or f"SELECT * FROM {quote(name)}", params)
        columns = [d[0] for d in cursor.description]
        return [{c: json_value(v) for c, v in zip(columns, row, strict=True)} for row in cursor]
    finally:
        con.close()


def same(got: Any, want: Any) -> bool:
    """Equal, with the same type, and floats with the same sign (-0.0 is not 0.0)."""
    if type(got) is not type(want):
        return False
    if isinstance(want, dict):
        return list(got) == list(want) and all(same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, float):
        return got == want and math.copysign(1.0, got) == math.copysign(1.0, want)
    return got == want


def assert_same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert same(g, w), f"row {index}: {g!r} != {w!r}"


def parse_records(data: bytes, fmt: str) -> list[dict[str, Any]]:
    """The records of one (decompressed) data file."""
    if fmt == "jsonl":
        return [json.loads(line) for line in data.split(b"\n")[:-1]] if data else []
    if fmt == "json":
        return json.loads(data)
    return yaml.safe_load(data)


def read_file(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def make_job(tmp_path: Path, source: Path | str, run_id: str = "run_0123456789ab", **config: Any) -> dict:
    """A job as the service hands it to a worker; ``run_dir`` (not read by the worker) is where
    its files land in the local storage ``storage``."""
    return {
        "run_id": run_id,
        "extract_id": "extract_test",
        "extract_name": "Daily Backup",
        "source": str(source),
        "storage": str(tmp_path / "storage"),
        "run_dir": str(tmp_path / "storage" / run_id),
        "min_free_bytes": 1 << 20,
        "created_at": "2026-11-28T17:00:00.000Z",
        "config": {
            "format": "jsonl",
            "include": ["describe", "data"],
            "schemas": None,
            "filter": None,
            "compress": False,
            "split_files": False,
            "split_max_records": 1_000_000,
        }
        | config,
    }


class Channel:
    """The service's side of a run: a Manager queue and cancel dict, messages collected."""

    def __init__(self, manager: Any) -> None:
        self.queue = manager.Queue()
        self.cancelled = manager.dict()
        self.messages: list[tuple[str, str, dict]] = []

    def drain(self) -> list[tuple[str, str, dict]]:
        while not self.queue.empty():
            self.messages.append(self.queue.get())
        return self.messages

    def artifacts(self) -> list[dict[str, Any]]:
        return [payload for kind, _, payload in self.drain() if kind == "artifact"]

    def progress(self) -> list[dict[str, Any]]:
        return [payload for kind, _, payload in self.drain() if kind == "progress"]

    def run(self, job: dict) -> dict:
        from executor import run_extract

        return run_extract(job, self.queue, self.cancelled)

    def run_in_thread(self, job: dict) -> tuple[threading.Thread, dict]:
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(self.run(job)))
        thread.start()
        return thread, outcome


def manager_fixture() -> Iterator[Any]:
    manager = multiprocessing.Manager()
    yield manager
    manager.shutdown()


def build_big_table(db: Path, name: str, rows: int) -> None:
    """``rows`` rows built by SQLite itself (recursive CTE), not Python loops."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute(f"CREATE TABLE {quote(name)} (id INTEGER PRIMARY KEY, label TEXT, amount REAL, n INTEGER)")
    con.execute(
        f"""
        WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?)
        INSERT INTO {quote(name)} SELECT i, 'row ' || i, i / 7.0, i % 1000 FROM s""",
        (rows,),
    )
    con.commit()
    con.close()


class StoreProxy:
    """An HTTP proxy in front of an object store (moto) that can cut what it sends back.

    Requests pass through unchanged (moto does not check the signature against the Host),
    and are noted in ``requests``. While ``cut(method, path)`` is true for a GET, the proxy
    sends the store's status and headers and the first ``keep`` bytes of its body, then
    closes the connection: the store failing mid-read, as a reset connection or a crashed
    store does.
    """

    def __init__(self, upstream: int, keep: int = 1000) -> None:
        import http.client
        import http.server

        proxy = self
        self.cut: Callable[[str, str], bool] = lambda method, path: False
        self.keep = keep
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request passed on
        self.down = False  # True: every request is answered 503, as by a store that is down
        # True for a (method, path): that request is answered 503 (a store refusing some requests).
        self.refused: Callable[[str, str], bool] = lambda method, path: False

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                proxy.requests.append((self.command, self.path))
                if proxy.down or proxy.refused(self.command, self.path):
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream_connection = http.client.HTTPConnection("127.0.0.1", upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream_connection.request(self.command, self.path, body=body, headers=headers)
                reply = upstream_connection.getresponse()
                data = reply.read()
                upstream_connection.close()
                cut = self.command == "GET" and proxy.cut(self.command, self.path)
                self.send_response(reply.status)
                for name, value in reply.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(name, value)
                # A HEAD's length is the object's; a body's is what was read.
                length = reply.getheader("Content-Length") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length or 0))
                if cut:
                    self.send_header("Connection", "close")
                self.end_headers()
                if cut:
                    self.wfile.write(data[: proxy.keep])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
