"""Shared fixtures. The helpers they are built on are in ``helpers.py`` (import them from there)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
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
