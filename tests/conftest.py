"""Shared fixtures. The helpers they are built on are in ``helpers.py`` (import them from there)."""

from __future__ import annotations

import compileall
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ROOT,
    InProcessService,
    Moto,
    Service,
    make_shop_db,
    manager_fixture,
    start_in_process,
    start_moto,
    start_service,
)


@pytest.fixture(scope="module")
def shop_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shop_db(tmp_path_factory.mktemp("source") / "shop.db")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, shop_db: Path) -> Iterator[Service]:
    """The console script in its own process, serving ``shop_db``, for the module."""
    svc = start_service(tmp_path_factory.mktemp("service"), str(shop_db))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def app_service(tmp_path_factory: pytest.TempPathFactory, shop_db: Path) -> Iterator[InProcessService]:
    """The same app served in this process, serving ``shop_db``, for the module: the HTTP contract."""
    svc = start_in_process(tmp_path_factory.mktemp("app"), str(shop_db))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    """moto's S3 server with the test bucket, for the module."""
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def manager() -> Iterator[Any]:
    """A multiprocessing Manager for the executor's queues, for the module."""
    yield from manager_fixture()


# The modules that take longest (seconds each, summed over their tests, in a full run with four
# processes on the 2-core machine, 2026-12-02 with nothing else running: README, Tests), handed
# to the test processes first. xdist would otherwise start the modules with the most tests
# first and leave these few-test, long modules for the end. The ones that mostly wait (a
# lease, a lock, a restart) go before the ones that mostly compute: at the end, when the other
# processes are done, a module that computes speeds up and one that waits does not (ahead of
# its turn by length, test_faults_state.py used to run alone for the suite's last 8 s).
LONGEST_FIRST = [
    "test_faults.py",  # 95 s
    "test_web.py",  # 69 s
    "test_instances.py",  # 55 s
    "test_object_storage.py",  # 48 s
    "test_cli.py",  # 45 s
    "test_sources_sql.py",  # 36 s
    "test_retries.py",  # 34 s
    "test_faults_state.py",  # 21 s, most of it waiting
    "test_fuzz.py",  # 30 s
    "test_bench_stores_smoke.py",  # 23 s
    "test_sources_parallel.py",  # 25 s
    "test_security.py",  # 17 s
    "test_bench_smoke.py",  # 11 s
    "test_executor_faults.py",  # 10 s
    "test_downloads_held.py",  # 10 s
    "test_faults_storage.py",  # 8 s
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest modules first (``LONGEST_FIRST``), the others after them in their own order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config: pytest.Config) -> None:
    """Compile the checkout's modules once, before the test processes start.

    This machine sets PYTHONDONTWRITEBYTECODE, so every service, forkserver and command
    line the suite starts (hundreds) compiled the service's modules again: about 40 ms of
    CPU each. compileall writes the cached bytecode whatever that variable says.

    The test modules are pytest's to compile (it rewrites their asserts), and it caches
    them beside them only when the variable is unset: every test process rewrote all of
    them again, 1.7 s of its CPU of the 3.2 s it took to collect. It caches them now, and
    the next run's test processes read them.
    """
    sys.dont_write_bytecode = False
    if hasattr(config, "workerinput"):  # an xdist test process: the controller did the rest
        return
    for target in ("extracts", "executor", "bench"):
        compileall.compile_dir(ROOT / target, quiet=1)
    compileall.compile_file(ROOT / "extracts_app.py", quiet=1)
