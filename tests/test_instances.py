"""Several instances over one PostgreSQL state and one S3 store (SPEC: Beyond one machine).

Real processes on one machine: PostgreSQL on 127.0.0.1 (a database made for the
module), moto's S3 server, and three service instances on three ports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from helpers import (
    BUCKET,
    CREDENTIALS,
    PG_ADMIN,
    TOKEN,
    Moto,
    Service,
    descendants,
    free_port,
    http_client,
    make_shop_db,
    start_in_process,
    start_service,
    unique_name,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

ADMIN = PG_ADMIN
LEASE_S = 3


def make_state_database(name: str) -> str:
    with psycopg.connect(ADMIN, autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        con.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_state_database(name: str) -> None:
    with psycopg.connect(ADMIN, autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Cluster:
    """Three instances sharing a PostgreSQL state and an S3 prefix."""

    def __init__(self, tmp: Path, moto: Moto, source: Path, name: str, workers: int = 1) -> None:
        self.tmp, self.moto, self.source, self.workers = tmp, moto, source, workers
        self.name = name
        self.url = make_state_database(name)
        self.instances: list[Service] = []

    def start(self, count: int = 3) -> list[Service]:
        """All at once, over a state without tables: each instance's start-up makes them if they
        are missing, one instance at a time (``state.prepare_postgres``)."""
        with concurrent.futures.ThreadPoolExecutor(count) as starting:
            self.instances += starting.map(self.start_one, range(count))
        return self.instances

    def start_one(self, i: int) -> Service:
        home = self.tmp / f"instance{i}-{len(self.instances)}"
        home.mkdir(parents=True, exist_ok=True)
        return start_service(
            home,
            str(self.source),
            "--storage-endpoint",
            self.moto.endpoint,
            "--lease-seconds",
            str(LEASE_S),
            "--workers",
            str(self.workers),
            db=self.url,  # type: ignore[arg-type]
            storage=f"s3://{BUCKET}/{self.name}",  # type: ignore[arg-type]
            env=CREDENTIALS,
        )

    def stop(self) -> None:
        for svc in self.instances:
            if svc.process.poll() is None:
                os.kill(svc.process.pid, signal.SIGCONT)
            svc.stop()
        drop_state_database(self.name)

    def logs(self) -> str:
        return "".join(svc.output() for svc in self.instances)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, moto: Moto) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    source = make_shop_db(tmp / "shop.db")
    con = sqlite3.connect(source)  # and a table that takes a worker a second or two, and a tiny one
    con.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, pad TEXT)")
    con.execute(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 400000) "
        "INSERT INTO big SELECT x, 'padding padding padding ' || x FROM c"
    )
    con.execute("CREATE TABLE small (id INTEGER PRIMARY KEY, v TEXT)")
    con.execute("INSERT INTO small VALUES (1, 'one')")
    con.commit()
    con.close()
    group = Cluster(tmp, moto, source, unique_name("extracts_cluster"))
    group.start()
    yield group
    group.stop()


@pytest.mark.slow
def test_instances_list_each_other(cluster: Cluster) -> None:
    for svc in cluster.instances:

        def three(svc: Service = svc) -> list[dict] | None:
            found = svc.client.get("/api/instances").json()["data"]
            return found if len(found) == 3 else None

        # Polled: on a loaded machine a heartbeat (every lease / 3) can come late for a moment.
        listed = wait_for(three, what="three live instances")
        assert {i["workers"] for i in listed} == {1}
        assert {i["pid"] for i in listed} == {s.process.pid for s in cluster.instances}


@pytest.mark.slow
def test_fifty_queued_runs_each_run_exactly_once(cluster: Cluster) -> None:
    first = cluster.instances[0]
    extracts = [first.create_extract(name=f"Small {i}", schemas=["users"]) for i in range(50)]
    runs = [cluster.instances[i % 3].run(e["id"]) for i, e in enumerate(extracts)]
    for run_id in runs:
        assert first.wait_run(run_id, timeout=120)["status"] == "completed"
    claimed = re.findall(r"run (run_[0-9a-f]+) claimed", cluster.logs())
    assert sorted(r for r in claimed if r in runs) == sorted(runs)  # each claimed once, by one instance
    by = {first.client.get(f"/api/data/extract_runs/{r}").json()["data"]["instance_id"] for r in runs}
    assert len(by) >= 2, "the work was not shared"


@pytest.mark.slow
def test_simultaneous_run_requests_over_three_instances_create_one_run(cluster: Cluster) -> None:
    first = cluster.instances[0]
    # Every worker busy, so the one run the burst creates stays active (queued) throughout.
    busy = [first.create_extract(name=f"Busy {i}", schemas=["big"], compress=False) for i in range(3)]
    busy_runs = [cluster.instances[i].run(e["id"]) for i, e in enumerate(busy)]
    extract = first.create_extract(name="Contended", schemas=["users"])
    statuses: list[int] = []

    def ask(svc: Service) -> None:
        with http_client(base_url=svc.base_url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            statuses.append(client.post(f"/api/extracts/{extract['id']}/run").status_code)

    def all_running() -> bool:
        runs = [first.client.get(f"/api/data/extract_runs/{r}").json()["data"] for r in busy_runs]
        return all(run["status"] == "running" for run in runs)

    wait_for(all_running, what="every worker busy")
    # The workers (and their managers) held still during the burst: no busy run can end meanwhile.
    held = [pid for svc in cluster.instances for pid in descendants(svc.process.pid)]
    for pid in held:
        os.kill(pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=ask, args=(cluster.instances[i % 3],)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for pid in held:
            os.kill(pid, signal.SIGCONT)
    assert statuses.count(202) == 1 and statuses.count(409) == 49, statuses
    for busy_extract, run_id in zip(busy, busy_runs, strict=True):  # their work is done: freed
        assert first.client.post(f"/api/extracts/{busy_extract['id']}/cancel").status_code == 200
        assert first.wait_run(run_id)["status"] == "cancelled"
    (contended,) = first.client.get(
        "/api/data/extract_runs", params={"filter[where][extract_id]": extract["id"]}
    ).json()["data"]
    assert first.wait_run(contended["id"], timeout=120)["status"] == "completed"


@pytest.mark.slow
def test_downloads_are_the_same_bytes_from_every_instance(cluster: Cluster) -> None:
    first = cluster.instances[0]
    extract = first.create_extract(name="Everywhere", schemas=["users", "orders"])
    run = first.wait_run(first.run(extract["id"]))
    bodies = [svc.client.get(f"/api/extracts/runs/{run['id']}/download").content for svc in cluster.instances]
    assert bodies[0] == bodies[1] == bodies[2] and zipfile.ZipFile(io.BytesIO(bodies[0])).testzip() is None


def scrape(svc: Service) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/metrics`` of one instance, parsed by prometheus-client's own parser."""
    text = svc.client.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.slow
def test_metrics_count_runs_per_instance_and_the_same_from_each(cluster: Cluster) -> None:
    first = cluster.instances[0]
    extract = first.create_extract(name="Watched", schemas=["big"])
    run_id = first.run(extract["id"])
    deadline = time.monotonic() + 30
    while (run := first.client.get(f"/api/data/extract_runs/{run_id}").json()["data"])["status"] != "running":
        assert time.monotonic() < deadline, run
        time.sleep(0.05)
    ids = {_instance_id(svc) for svc in cluster.instances}
    scrapes = [scrape(svc) for svc in cluster.instances]
    for svc, samples in zip(cluster.instances, scrapes, strict=True):
        workers = {
            dict(labels)["instance_id"] for name, labels in samples if name == "extracts_instance_workers"
        }
        assert workers == ids  # every live instance, from any instance
        active = {
            dict(labels)["instance_id"]: v
            for (name, labels), v in samples.items()
            if name == "extracts_runs_active"
        }
        assert active[run["instance_id"]] >= 1 and set(active) >= ids
        answering = [
            dict(labels)["instance_id"] for name, labels in samples if name == "extracts_instance_info"
        ]
        assert answering == [_instance_id(svc)]
    assert first.client.post(f"/api/extracts/{extract['id']}/cancel").status_code == 200
    first.wait_run(run_id)
    # Counted in the shared state: every instance says the same.
    ended = [
        {labels: v for (name, labels), v in scrape(svc).items() if name == "extracts_runs_total"}
        for svc in cluster.instances
    ]
    assert ended[0] == ended[1] == ended[2]
    cancelled = frozenset({"status": "cancelled", "triggered_by": "manual"}.items())
    assert ended[0][cancelled] >= 1


def _instance_id(svc: Service) -> str:
    """The id of the instance behind ``svc`` (its pid is in the instance list)."""
    listed = svc.client.get("/api/instances").json()["data"]
    return next(i["id"] for i in listed if i["pid"] == svc.process.pid)


@pytest.mark.slow
def test_a_frozen_instance_is_fenced_off(cluster: Cluster) -> None:
    """SIGSTOP past the lease, then SIGCONT: its late progress, status and files change nothing."""
    a = cluster.instances[0]
    by_id = {_instance_id(s): s for s in cluster.instances}  # looked up before: the freeze comes fast
    extract = a.create_extract(name="Frozen", schemas=["small", "big"], compress=False, retry_delay_seconds=1)
    run_id = a.run(extract["id"])
    deadline = time.monotonic() + 30
    # Frozen once describe.yaml is written (25, sent at once): the big table's rows are still to
    # come. The first progress past 30 came after the run's end on a fast machine.
    while (run := a.client.get(f"/api/data/extract_runs/{run_id}").json()["data"])["progress"] < 25:
        assert time.monotonic() < deadline, run
        time.sleep(0.01)
    victim = by_id[run["instance_id"]]
    family = [victim.process.pid, *descendants(victim.process.pid)]  # its workers freeze with it
    for pid in family:
        os.kill(pid, signal.SIGSTOP)
    assert run["status"] == "running" and run["progress"] < 99, run
    try:
        survivor = next(s for s in cluster.instances if s is not victim)
        failed = survivor.wait_run(run_id, timeout=LEASE_S + 30)
        assert failed["status"] == "failed"
        frozen = survivor.client.get(f"/api/data/extract_runs/{run_id}").json()["data"]
        artifacts_before = survivor.client.get(
            "/api/data/extract_artifacts", params={"filter[where][run_id]": run_id}
        ).json()["data"]
        retry = survivor.wait_run(failed["retry_run_id"], timeout=120)
        assert retry["status"] == "completed"
        victim_id = run["instance_id"]
        resumed = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    finally:  # the cluster's next test finds every instance answering
        for pid in family:
            os.kill(pid, signal.SIGCONT)

    def done_with_it() -> bool:  # the old worker finished or died, and its messages were applied
        listed = survivor.client.get("/api/instances").json()["data"]
        mine = [i for i in listed if i["id"] == victim_id and i["heartbeat_at"] > resumed]
        return bool(mine) and mine[0]["active_runs"] == 0

    wait_for(done_with_it, timeout=60, every=0.2, what="the resumed instance letting go of the run")
    after = survivor.client.get(f"/api/data/extract_runs/{run_id}").json()["data"]
    for field in ("status", "progress", "progress_detail", "error", "records_exported", "retry_run_id"):
        assert after[field] == frozen[field], field
    artifacts = survivor.client.get("/api/data/extract_artifacts", params={"filter[where][run_id]": run_id})
    assert artifacts.json()["data"] == artifacts_before
    body = survivor.client.get(f"/api/extracts/runs/{retry['id']}/download").content
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        names = archive.namelist()
        assert archive.testzip() is None
    assert sorted(names) == ["big.jsonl", "describe.yaml", "manifest.json", "small.jsonl"]
    manifest = archive_manifest(body)
    assert manifest["run_id"] == retry["id"]


@pytest.mark.slow
def test_a_scheduler_frozen_in_its_tick_starts_no_second_run_for_a_due_time(cluster: Cluster) -> None:
    """The leading scheduler frozen past its lease halfway through the extracts it read as due: the
    next leader starts the rest, a user cancels them, and the old leader, resumed, starts none."""
    a = cluster.instances[0]
    extracts = [
        a.create_extract(name=f"Due {i}", schemas=["small"], schedule="0 0 1 1 *", schedule_enabled=True)
        for i in range(60)
    ]
    ids = [e["id"] for e in extracts]
    by_pid = {s.process.pid: s for s in cluster.instances}
    with psycopg.connect(cluster.url, autocommit=True) as con:
        leader = con.execute(
            "SELECT i.pid FROM extracts_leaders l JOIN extracts_instances i ON i.id = l.instance_id "
            "WHERE l.name = 'scheduler'"
        ).fetchone()[0]
        victim = by_pid[leader]
        family = [leader, *descendants(leader)]
        con.execute("UPDATE extracts SET next_run_at = '2000-01-01T00:00:00.000Z' WHERE id = ANY(%s)", (ids,))

        def queued() -> int:
            return con.execute(
                "SELECT count(*) FROM extract_runs WHERE extract_id = ANY(%s)", (ids,)
            ).fetchone()[0]

        wait_for(lambda: queued() >= 5, timeout=30, every=0.002, what="the leader starting the due runs")
        for pid in family:
            os.kill(pid, signal.SIGSTOP)
        try:
            assert queued() < len(ids), "frozen after its tick: nothing left to check"
            survivor = next(s for s in cluster.instances if s is not victim)
            wait_for(  # another instance leads, and has started every due extract
                lambda: (
                    con.execute(
                        "SELECT count(*) FROM extracts WHERE id = ANY(%s) AND next_run_at < '2001'", (ids,)
                    ).fetchone()[0]
                    == 0
                ),
                timeout=LEASE_S + 30,
                what="another scheduler",
            )
            for extract_id in ids:  # no run active: only the due time, now past, could start one
                survivor.client.post(f"/api/extracts/{extract_id}/cancel")
        finally:
            for pid in family:
                os.kill(pid, signal.SIGCONT)
        assert victim.client.get("/health").status_code == 200
        time.sleep(2)  # the old leader's tick goes on over what it read
        per_extract = con.execute(
            "SELECT extract_id, count(*) FROM extract_runs WHERE extract_id = ANY(%s) "
            "AND triggered_by = 'schedule' GROUP BY extract_id",
            (ids,),
        ).fetchall()
    for extract_id in ids:
        a.client.post(f"/api/extracts/{extract_id}/cancel")
    assert sorted(n for _, n in per_extract) == [1] * len(ids)


@pytest.mark.slow
def test_a_killed_instance_loses_its_run_within_the_lease_and_the_retry_completes(cluster: Cluster) -> None:
    """The cluster's last test: it leaves two instances."""
    a = cluster.instances[0]
    by_id = {_instance_id(s): s for s in cluster.instances}  # looked up before: the kill comes fast
    extract = a.create_extract(name="Orphaned", schemas=["big"], compress=False, retry_delay_seconds=1)
    run_id = a.run(extract["id"])
    deadline = time.monotonic() + 30
    while (run := a.client.get(f"/api/data/extract_runs/{run_id}").json()["data"])["instance_id"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victim = by_id[run["instance_id"]]
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    killed = time.monotonic()
    survivor = next(s for s in cluster.instances if s is not victim)
    failed = survivor.wait_run(run_id, timeout=LEASE_S + 30)
    assert failed["status"] == "failed" and failed["error"].startswith("interrupted"), failed
    assert time.monotonic() - killed <= LEASE_S + 5 + 1  # + the poll of wait_run
    retry = survivor.wait_run(failed["retry_run_id"], timeout=120)
    assert retry["status"] == "completed" and retry["instance_id"] != run["instance_id"]
    body = survivor.client.get(f"/api/extracts/runs/{retry['id']}/download").content
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None


def archive_manifest(body: bytes) -> dict:
    import json

    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        return json.loads(archive.read("manifest.json"))


@pytest.mark.slow
def test_an_instance_frozen_inside_a_transaction_holds_up_no_other(tmp_path: Path) -> None:
    """An instance frozen while its transaction holds a run's row lock: PostgreSQL ends its
    session within the stall bound, so another instance reaps the run at once instead of
    waiting (its heartbeat with it) for as long as the freeze lasts; the frozen one's write
    fails as a busy state, retried."""
    from extracts import state
    from extracts.dialects import POSTGRES
    from extracts.runs import Runs
    from extracts.state import TriggeredBy
    from extracts.storage.local import LocalStorage

    stall, freeze = 0.5, 4.0
    name = unique_name("extracts_frozen")
    url = make_state_database(name)
    state.prepare_postgres(url, stall)
    clock = [datetime.now(UTC)]

    async def scenario() -> tuple[list[str], float, BaseException | None, dict]:
        frozen_db, other_db = state.open_database(url, stall), state.open_database(url, stall)
        await frozen_db.connect()
        await other_db.connect()
        storage = LocalStorage(tmp_path)
        frozen = Runs(frozen_db, storage, "source.db", 0, lambda: clock[0], dialect=POSTGRES)
        other = Runs(other_db, storage, "source.db", 0, lambda: clock[0], dialect=POSTGRES)
        await frozen_db.execute(
            "INSERT INTO extracts (id, name, created_at, updated_at) VALUES ('extract_f', 'F', 't', 't')"
        )
        extract = dict((await frozen_db.fetch_one("SELECT * FROM extracts WHERE id = 'extract_f'"))._mapping)
        run_id = await frozen.queue(extract, TriggeredBy.MANUAL)
        assert (await frozen.claim())["run_id"] == run_id
        by_id = {"id": run_id}
        locked, late = asyncio.Event(), None

        async def freeze_in_a_transaction() -> None:
            nonlocal late
            try:
                async with frozen_db.transaction():
                    await frozen_db.execute("UPDATE extract_runs SET progress = 50 WHERE id = :id", by_id)
                    locked.set()
                    await asyncio.sleep(freeze)  # to PostgreSQL, as a SIGSTOP'd process: silent
            except Exception as exc:  # noqa: BLE001 — what the frozen instance sees on waking
                late = exc

        frozen_task = asyncio.create_task(freeze_in_a_transaction())
        await locked.wait()
        clock[0] += timedelta(minutes=5)  # the lease lapsed
        started = time.monotonic()
        while True:
            try:
                reaped = await asyncio.wait_for(other.reap(), freeze * 2)
                break
            except TimeoutError:  # not busy: it waited for the whole freeze and more
                raise
            except Exception as exc:  # noqa: BLE001 — a lock not granted within the bound: next beat
                assert POSTGRES.busy(exc), exc
        waited = time.monotonic() - started
        await frozen_task
        assert await frozen_db.fetch_val("SELECT 1") == 1  # the pool hands out a live session
        run = dict((await other_db.fetch_one("SELECT * FROM extract_runs WHERE id = :id", by_id))._mapping)
        await frozen_db.disconnect()
        await other_db.disconnect()
        return reaped, waited, late, run

    try:
        reaped, waited, late, run = asyncio.run(scenario())
    finally:
        drop_state_database(name)
    assert reaped == [run["id"]] and waited < freeze - 1, waited
    assert run["status"] == "failed" and run["progress"] == 0, run  # the frozen write rolled back
    assert late is not None and POSTGRES.busy(late), repr(late)


@pytest.fixture
def prepared_state() -> Iterator[tuple[str, str]]:
    """A PostgreSQL state database of the test's own, its tables made: (name, URL); dropped after."""
    from extracts import state

    name = unique_name("extracts_state")
    url = make_state_database(name)
    state.prepare_postgres(url)
    yield name, url
    drop_state_database(name)


def test_a_task_whose_transaction_lost_its_session_goes_on(
    tmp_path: Path, prepared_state: tuple[str, str]
) -> None:
    """The pool's consumer is one task applying message after message: when PostgreSQL ends the
    session of a run's ending mid-transaction (as it ends a frozen instance's), the error is a
    busy state, and the same task's next try ends the run (``state.in_transaction``)."""
    from extracts import state
    from extracts.dialects import POSTGRES
    from extracts.runs import Runs
    from extracts.state import TriggeredBy
    from extracts.storage.local import LocalStorage

    name, url = prepared_state
    result = {"status": "completed", "records_exported": 1, "schemas_exported": 1}
    result |= {"error": None, "error_detail": None}

    async def scenario() -> tuple[BaseException | None, bool, str]:
        db = state.open_database(url, stall_seconds=30)
        await db.connect()
        runs = Runs(db, LocalStorage(tmp_path), "source.db", 0, dialect=POSTGRES)
        await db.execute(
            "INSERT INTO extracts (id, name, created_at, updated_at) VALUES ('extract_l', 'L', 't', 't')"
        )
        extract = dict((await db.fetch_one("SELECT * FROM extracts WHERE id = 'extract_l'"))._mapping)
        run_id = await runs.queue(extract, TriggeredBy.MANUAL)
        lease = (await runs.claim())["lease"]
        locked, tried, released = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def consumer() -> tuple[BaseException | None, bool]:  # one task, as the pool's
            await locked.wait()
            try:
                await runs.finish(run_id, result, lease)  # waits for the row; its session ends
            except Exception as exc:  # noqa: BLE001 — what _apply sees
                lost = exc
            else:
                lost = None
            tried.set()
            await released.wait()
            return lost, await runs.finish(run_id, result, lease)  # _apply's next try

        applying = asyncio.create_task(consumer())
        with psycopg.connect(url, autocommit=True) as other:
            other.execute("BEGIN")
            other.execute("SELECT 1 FROM extract_runs WHERE id = %s FOR UPDATE", (run_id,))
            locked.set()

            def waiting() -> int | None:
                row = other.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                    (name,),
                ).fetchone()
                return row and row[0]

            while not (pid := await asyncio.to_thread(waiting)):
                await asyncio.sleep(0.02)
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await tried.wait()
            other.execute("ROLLBACK")
        released.set()
        lost, ended = await applying
        status = await db.fetch_val("SELECT status FROM extract_runs WHERE id = :id", {"id": run_id})
        await db.disconnect()
        return lost, ended, status

    lost, ended, status = asyncio.run(scenario())
    assert isinstance(lost, BaseException) and POSTGRES.busy(lost), repr(lost)
    assert ended and status == "completed"


def test_transactions_whose_connection_was_cut_leave_the_pool_whole(
    monkeypatch: pytest.MonkeyPatch, prepared_state: tuple[str, str]
) -> None:
    """Found as a 30 s stop (SIGTERM, then SIGKILL) of an instance resumed from a freeze: its
    session had ended while it was frozen, asyncpg's protocol was cut without its connection
    being cleaned up, the ROLLBACK failed ("the underlying connection is closed") and databases
    kept the connection checked out for good. The pool's ``close()`` waits for every connection:
    the stop hung; and after ten of them (the pool's size) every statement would have waited.
    The cut is made here as asyncpg makes it (``Connection._abort``), eleven times."""
    from extracts import state

    name, url = prepared_state

    async def scenario() -> tuple[list[str], int, float, float]:
        db = state.open_database(url)
        await db.connect()

        async def cut() -> None:
            await db.execute("UPDATE extract_runs SET progress = 1 WHERE id = 'none'")
            db.connection().raw_connection._con._abort()  # asyncpg's own cut of a protocol
            await db.execute("UPDATE extract_runs SET progress = 2 WHERE id = 'none'")

        failures = []
        for _ in range(11):
            try:
                await asyncio.wait_for(state.in_transaction(db, cut), 5)
            except TimeoutError:
                failures.append("the pool had no connection left")
                break
            except Exception as exc:  # noqa: BLE001 — the cut statement's error
                failures.append(type(exc).__name__)
        alive = await asyncio.wait_for(db.fetch_val("SELECT 1"), 5)
        started = time.monotonic()
        await state.disconnect(db)
        closed = time.monotonic() - started
        # And a stop never waits on a connection that is never handed back.
        other = state.open_database(url)
        await other.connect()
        await other.connection().__aenter__()  # checked out, never released
        monkeypatch.setattr(state, "DISCONNECT_S", 0.5)
        started = time.monotonic()
        await state.disconnect(other)
        return failures, alive, closed, time.monotonic() - started

    failures, alive, closed, bounded = asyncio.run(scenario())
    assert failures == ["InterfaceError"] * 11 and alive == 1
    assert closed < 2 and bounded < 3, (closed, bounded)


@pytest.mark.slow
def test_a_task_whose_connection_could_not_be_handed_back_goes_on(
    monkeypatch: pytest.MonkeyPatch, prepared_state: tuple[str, str]
) -> None:
    """Found as runs left 'queued' for good after PostgreSQL ended an instance's sessions (frozen,
    or pg_terminate_backend): the dispatcher, the consumer, the heartbeat are each one task running
    statement after statement, and when asyncpg's pool failed to hand one back (its reset met the
    cut session, "another operation (2) is in progress"), databases kept it as the task's
    connection in use: every later statement of that task failed on "Connection is already
    acquired". The cut is made here as asyncpg makes it (``Connection._abort``), at the reset."""
    import asyncpg

    from extracts import state

    name, url = prepared_state
    reset = asyncpg.Connection.reset

    async def cut_then_reset(self: asyncpg.Connection, *, timeout: float | None = None) -> None:
        self._abort()  # the session ends as the connection goes back to the pool
        await reset(self, timeout=timeout)

    async def scenario() -> tuple[list[str], list[int]]:
        db = state.open_database(url)
        await db.connect()
        failures, after = [], []
        for _ in range(11):  # one task, as the dispatcher; one more hand-back than the pool holds
            with monkeypatch.context() as patched:
                patched.setattr(asyncpg.Connection, "reset", cut_then_reset)
                try:
                    await db.fetch_val("SELECT 1")
                except Exception as exc:  # noqa: BLE001 — the failed hand-back
                    failures.append(type(exc).__name__)
            try:  # the same task's next statement
                after.append(await db.fetch_val("SELECT 1"))
            except Exception as exc:  # noqa: BLE001 — what the task met, for the assertion
                after.append(f"{type(exc).__name__}: {exc}")
        await state.disconnect(db)
        return failures, after

    failures, after = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert failures == ["InterfaceError"] * 11 and after == [1] * 11, (failures, after)


@pytest.mark.slow
def test_a_statement_on_a_session_ended_while_frozen_meets_a_busy_state(
    prepared_state: tuple[str, str],
) -> None:
    """PostgreSQL ends an instance's idle sessions while it is frozen (or restarts): on waking,
    asyncpg reads the session's last words before its end, and a statement on that connection
    fails as "cannot switch to state 11; another operation (2) is in progress". That was no busy
    state: the consumer dropped the message (an artifact's row: a run completed without one of
    its files), a run's ending was let go, a request got a 500. It is one now, and the next try
    gets a live session. The freeze is the event loop's, blocked while the sessions end."""
    from extracts import state
    from extracts.dialects import POSTGRES

    name, url = prepared_state

    async def scenario() -> tuple[list[BaseException], list[int]]:
        db = state.open_database(url)
        await db.connect()
        errors, after = [], []

        async def statements() -> None:  # as a heartbeat: a statement, a wait, the next one
            for _ in range(6):
                await asyncio.sleep(0.05)
                for _ in range(5):  # a busy state is tried again, as the callers do
                    try:
                        after.append(await db.fetch_val("SELECT 1"))
                        break
                    except Exception as exc:  # noqa: BLE001 — what the callers see
                        errors.append(exc)

        async def freezes() -> None:
            for _ in range(3):
                await asyncio.sleep(0.01)
                with psycopg.connect(url, autocommit=True) as other:
                    other.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()",
                        (name,),
                    )
                time.sleep(0.3)  # the loop frozen, as a SIGSTOP'd instance's, while its sessions end
                await asyncio.sleep(0.1)

        await asyncio.gather(statements(), freezes())
        await state.disconnect(db)
        return errors, after

    errors, after = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert errors and all(POSTGRES.busy(exc) for exc in errors), errors
    assert after == [1] * 6


@pytest.mark.slow
def test_a_state_that_stops_answering_holds_up_no_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL frozen (its sessions SIGSTOP'd: a paused server, a network gone silent): every
    statement waited for an answer forever, the heartbeat's and the dispatcher's too, and a stop
    waited for them — it never ended. A statement now fails past the busy timeout (shortened
    here), its cancel is waited as long at most, and the stop ends."""
    from extracts import state

    monkeypatch.setattr(state, "BUSY_TIMEOUT_S", 1.0)
    name = unique_name("extracts_silent")
    url = make_state_database(name)
    frozen: list[int] = []
    stopped = None
    svc = start_in_process(
        tmp_path,
        str(make_shop_db(tmp_path / "shop.db")),
        "--lease-seconds",
        "3",
        db=url,  # type: ignore[arg-type]
    )
    try:
        extract = svc.create_extract(name="Silent", schemas=["users"])
        assert svc.wait_run(svc.run(extract["id"]))["status"] == "completed"
        with psycopg.connect(ADMIN, autocommit=True) as con:
            frozen += [
                pid
                for (pid,) in con.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'",
                    (name,),
                )
            ]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(1.5)  # the loops' next statements wait on the frozen sessions
        started = time.monotonic()
        svc.stop()
        stopped = time.monotonic() - started
    finally:
        for pid in frozen:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        if stopped is None:
            svc.stop()
        drop_state_database(name)
    assert stopped is not None and stopped < 20, stopped


def test_what_a_postgresql_state_waits_out_and_what_it_does_not() -> None:
    """A busy state is retried without end (a message is applied again, a request answered 503):
    only a cause that passes. A server going away or refusing sessions does; a statement a DBA
    cancelled, or the state's database dropped, never would, and the retries would hold up
    every message after them."""
    import asyncpg

    from extracts.dialects import POSTGRES

    waited = [
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CrashShutdownError("terminating connection because of crash of another server process"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.TooManyConnectionsError('too many connections for role "x"'),
        asyncpg.DiskFullError("could not extend file: No space left on device"),
    ]
    not_waited = [
        asyncpg.QueryCanceledError("canceling statement due to user request"),
        asyncpg.DatabaseDroppedError("database is being dropped"),
        asyncpg.UndefinedTableError('relation "extracts" does not exist'),
    ]
    assert [POSTGRES.busy(exc) for exc in waited] == [True] * len(waited)
    assert [POSTGRES.busy(exc) for exc in not_waited] == [False] * len(not_waited)


@pytest.mark.slow
def test_a_state_refusing_new_sessions_is_a_busy_state(tmp_path: Path) -> None:
    """The service's sessions ended (a restart, pg_terminate_backend) while PostgreSQL refuses new
    ones: a role's connection limit, max_connections (53300), a server starting or stopping
    (57P03). Each request then got a 500 and the consumer dropped its message; it is a busy
    state: a 503 saying to retry, and the service carries on once sessions open again."""
    name = unique_name("extracts_limit")
    role = unique_name("extracts_limited")
    with psycopg.connect(ADMIN, autocommit=True) as con:
        con.execute(f'CREATE ROLE "{role}" LOGIN')
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        con.execute(f'CREATE DATABASE "{name}" OWNER "{role}"')
    url = f"postgresql://{role}@127.0.0.1:5432/{name}"
    svc = start_in_process(tmp_path, str(make_shop_db(tmp_path / "shop.db")), db=url)  # type: ignore[arg-type]
    try:
        assert svc.client.get("/api/data/extracts").status_code == 200
        with psycopg.connect(ADMIN, autocommit=True) as con:
            con.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
            con.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        answers = [svc.client.get("/api/data/extracts") for _ in range(5)]
        assert {a.status_code for a in answers} == {503}, [(a.status_code, a.text) for a in answers]
        assert "retry" in answers[-1].json()["error"], answers[-1].text
        with psycopg.connect(ADMIN, autocommit=True) as con:
            con.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
        assert svc.client.get("/api/data/extracts").status_code == 200
        assert "unhandled" not in svc.output().lower()  # no request answered 500
        # asyncpg's pool logs its failed tries to reopen sessions in one line. A periodic step (the
        # heartbeat, the sweep, the dispatcher) whose statement met the ended sessions logs its
        # first failure with its traceback, by design (schedule.Failures): whether one ran then is
        # the machine's timing.
        records = re.split(r"\n(?=(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) )", svc.output())
        traced = [
            r
            for r in records
            if "Traceback" in r and not re.match(r"ERROR extracts\.\w+: [^\n]* failed\n", r)
        ]
        assert traced == [], traced
    finally:
        svc.stop()
        drop_state_database(name)
        with psycopg.connect(ADMIN, autocommit=True) as con:
            con.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_one_scheduled_run_per_due_time_and_the_scheduler_survives_its_leader(tmp_path: Path) -> None:
    """Three schedulers on one PostgreSQL state, an injected clock: one run per due time; when
    the leading instance dies (its lease lapses), another leads."""
    from extracts import state
    from extracts.dialects import POSTGRES
    from extracts.instances import Instance
    from extracts.pool import WorkerPool
    from extracts.runs import Runs
    from extracts.schedule import Scheduler
    from extracts.storage.local import LocalStorage

    name = unique_name("extracts_sched")
    url = make_state_database(name)
    state.prepare_postgres(url)
    clock = [datetime(2026, 3, 1, 2, 59, 0, tzinfo=UTC)]
    try:

        async def scenario() -> list[tuple[str, str]]:
            db = state.open_database(url)
            await db.connect()
            await db.execute(
                "INSERT INTO extracts (id, name, schedule, schedule_enabled, next_run_at, created_at, "
                "updated_at) VALUES ('extract_s', 'S', '* * * * *', 1, '2026-03-01T03:00:00.000Z', 't', 't')"
            )
            storage = LocalStorage(tmp_path)
            schedulers, instances = [], []
            for _ in range(3):
                runs = Runs(db, storage, "source.db", 0, lambda: clock[0], dialect=POSTGRES)
                instance = Instance(db, runs, WorkerPool(runs, storage, 1), shared=True)
                await instance.start()
                instances.append(instance)
                schedulers.append(Scheduler(db, runs, lambda: clock[0], instance.leads))
            for minute in range(1, 6):
                clock[0] = datetime(2026, 3, 1, 3, minute - 1, 1, tzinfo=UTC)
                started = [await s.tick() for s in schedulers]
                assert sum(len(x) for x in started) == 1, started
                await db.execute("UPDATE extract_runs SET status = 'completed' WHERE status = 'queued'")
                if minute == 2:  # the leader dies: its lease row lapses, another takes over
                    leader = next(i for i, x in enumerate(started) if x)
                    del schedulers[leader]
                    clock[0] += timedelta(seconds=LEASE_S * 20)
                    await db.execute(
                        "UPDATE extracts SET next_run_at = :due",
                        {"due": state.iso(clock[0] - timedelta(seconds=1))},
                    )
            rows = await db.fetch_all("SELECT status, triggered_by FROM extract_runs ORDER BY created_at")
            await db.disconnect()
            return [(r["status"], r["triggered_by"]) for r in rows]

        runs = asyncio.run(scenario())
        assert runs == [("completed", "schedule")] * 5
    finally:
        drop_state_database(name)


@pytest.mark.slow
def test_a_second_instance_on_the_same_sqlite_state_or_local_storage_refuses_to_start(tmp_path: Path) -> None:
    source = make_shop_db(tmp_path / "shop.db")
    (tmp_path / "one").mkdir()
    first = start_service(tmp_path / "one", str(source))
    # The same state file by other names: a symlink to it, through a symlinked directory, and a
    # hard link (which took a lock of its own beside it, and SQLite another -wal file).
    (tmp_path / "link.db").symlink_to(first.db)
    (tmp_path / "state-dir").symlink_to(first.db.parent, target_is_directory=True)
    (tmp_path / "hard.db").hardlink_to(first.db)
    try:
        for args in (
            ["--db", str(first.db), "--storage", str(tmp_path / "other")],
            ["--db", str(tmp_path / "link.db"), "--storage", str(tmp_path / "other")],
            ["--db", str(tmp_path / "hard.db"), "--storage", str(tmp_path / "other")],
            ["--db", str(tmp_path / "state-dir" / first.db.name), "--storage", str(tmp_path / "other")],
            ["--db", str(tmp_path / "other.db"), "--storage", str(first.storage)],
        ):
            second = start_up(tmp_path, *args, "--source", str(source), "--token", TOKEN)
            assert second.returncode == 1, second.stderr
            assert "is in use by another extracts-app" in second.stderr and "postgresql" in second.stderr
            assert second.stderr.count("\n") == 1
        assert first.client.get("/health").status_code == 200
    finally:
        first.stop()


def start_up(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The service started with ``args`` on a free port, for a start-up that is expected to fail."""
    command = [sys.executable, str(Path(__file__).parent.parent / "extracts_app.py"), *args]
    return subprocess.run(
        [*command, "--port", str(free_port())], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_a_shared_state_needs_a_token(tmp_path: Path) -> None:
    name = unique_name("extracts_token")
    url = make_state_database(name)
    try:
        process = start_up(
            tmp_path,
            "--db",
            url,
            "--storage",
            str(tmp_path / "st"),
            "--source",
            str(make_shop_db(tmp_path / "shop.db")),
        )
        assert process.returncode == 1 and "give --token" in process.stderr, process.stderr
    finally:
        drop_state_database(name)


@pytest.mark.slow
def test_a_state_that_refuses_the_service_pool_stops_start_up_with_one_line(tmp_path: Path) -> None:
    """psycopg makes the tables, then the service's own pool (two sessions at least) is refused:
    one line and exit 1, not a traceback from the app's start-up."""
    name = unique_name("extracts_limited")
    with psycopg.connect(ADMIN, autocommit=True) as con:
        con.execute(f'CREATE ROLE "{name}" LOGIN CONNECTION LIMIT 1')
        con.execute(f'CREATE DATABASE "{name}" OWNER "{name}"')
    try:
        process = start_up(
            tmp_path,
            *("--db", f"postgresql://{name}@127.0.0.1:5432/{name}", "--storage", str(tmp_path / "st")),
            *("--source", str(make_shop_db(tmp_path / "shop.db")), "--token", TOKEN),
        )
        assert process.returncode == 1, process.stderr
        assert process.stderr == (
            f"extracts-app: cannot prepare the state database postgresql://{name}@127.0.0.1:5432/{name}: "
            f'too many connections for role "{name}"\n'
        )
    finally:
        drop_state_database(name)
        with psycopg.connect(ADMIN, autocommit=True) as con:
            con.execute(f'DROP ROLE IF EXISTS "{name}"')
