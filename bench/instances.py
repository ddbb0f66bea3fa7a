"""Several instances over one PostgreSQL state and one S3 store (issue 16's figures).

    python bench/instances.py                     # about 10 minutes on 2 cores
    python bench/instances.py --smoke             # small, about 20 s: keeps this script working

Real processes on one machine: PostgreSQL (``--postgres``, a database made
for each cluster and dropped after it), moto's S3 server on 127.0.0.1, and the
service started as a user starts it, N times on N ports with the same
``--db postgresql://…``, ``--storage s3://…`` and ``--token``. It measures:

a. throughput of a workload of ``--runs`` small extracts (``accounts``, the
   first ``--small-rows`` rows, each its own extract, all requested at once,
   the requests spread over the instances) with k instances of one worker each
   against one instance of k workers, for each k of ``--instances``; each
   configuration on a fresh cluster, warm (its workers started), alternated
   repeat by repeat, median wall time from the first request to the last run's
   ``completed_at`` (target: k instances at most 10 % slower), and the CPU
   time the servers, their workers and moto used per run;
b. failover: a run of the ``events`` table is started, its instance SIGKILLed
   half a second after the run is seen ``running``; the time from the kill to
   the run seen failed as interrupted, and to its retry seen ``running`` on
   another instance (and by the retry's ``started_at``), over ``--trials``
   trials with ``--lease-seconds`` (target: the retry starts within lease + 5 s,
   every trial). The retry is cancelled and a new instance replaces the dead one;
c. status latency with 3 instances of one worker and two exports of ``events``
   running (a new run as soon as one completes): ``--clients`` clients, each
   polling a running export's status (``GET /api/data/extract_runs/:id``)
   every ``--poll-interval`` through instance ``client % 3`` (target: p99 <
   100 ms, no errors); the same idle first, as the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import datagen
import httpx
from service import TERMINAL, TLS, BenchError, Service, descendants
from stores import CREDENTIALS, Figures, Moto, StateDatabase, cpu_seconds, load, say

OVERHEAD_TARGET = 0.10
LATENCY_TARGET_MS = 100


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Cluster:
    """Instances sharing one PostgreSQL database and one S3 prefix."""

    def __init__(self, bench: InstancesBench, name: str, workers: int) -> None:
        self.bench, self.name, self.workers = bench, name, workers
        self.state = StateDatabase(bench.a.postgres, f"extracts_bench_{name}_{os.getpid()}")
        self.instances: list[Service] = []
        self.spares: list[Service] = []  # launched ahead, not yet waited for (``--smoke``)
        self.started = 0

    def start(self, count: int) -> Cluster:
        self.state.create()
        for _ in range(count):
            self.add()
        return self

    def add(self) -> Service:
        return self.grow(len(self.instances) + 1).instances[-1]

    def launch(self, count: int) -> Cluster:
        """Spares launched until ``count`` instances run or are launched: ``grow`` waits for them."""
        missing = count - len(self.instances) - len(self.spares)
        self.spares += [self.instance().launch() for _ in range(missing)]
        return self

    def grow(self, count: int) -> Cluster:
        """Instances added until there are ``count``: the spares first, all launched, then waited for."""
        adding = count - len(self.instances)
        if adding < 0:
            raise BenchError(f"{self.name}: {len(self.instances)} instances, cannot shrink to {count}")
        self.launch(count)
        new, self.spares = self.spares[:adding], self.spares[adding:]
        self.instances += new
        for svc in new:
            svc.ready()
        return self

    def instance(self) -> Service:
        """The next instance, not started."""
        b = self.bench
        self.started += 1
        return Service(
            b.source,
            b.work / f"{self.name}-{self.started}",
            workers=self.workers,
            state=self.state.url,
            storage_url=b.moto.url(f"{self.state.name}"),
            extra=[*b.moto.options(), "--lease-seconds", str(b.a.lease_seconds)],
            env=CREDENTIALS,
        )

    @property
    def first(self) -> Service:
        return self.instances[0]

    def stop(self) -> None:
        for svc in self.instances + self.spares:
            svc.stop()
            shutil.rmtree(svc.workdir, ignore_errors=True)
        self.instances, self.spares = [], []
        with contextlib.suppress(BenchError):
            self.state.drop()

    def pid_of(self, instance_id: str) -> int:
        listed = self.first.api("GET", "/api/instances")
        return next(i["pid"] for i in listed if i["id"] == instance_id)

    def warm_up(self) -> None:
        """One small run per worker, all at once: every pool starts its worker processes now."""
        extracts = [
            self.first.create_extract(f"warm-up {i}", ["accounts"], "jsonl", False, **self.bench.small_filter)
            for i in range(len(self.instances) * self.workers)
        ]
        runs = [self.instances[i % len(self.instances)].start_run(e) for i, e in enumerate(extracts)]
        for run in runs:
            self.first.wait(run, poll=0.05, timeout=300)


class InstancesBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.figures = Figures()
        self.work = args.workdir / f"instances-{os.getpid()}"
        self.source = Path()
        self.moto = Moto(self.work / "moto")
        self.small_filter = {"filter": {"accounts": {"where": {"id": {"$lte": args.small_rows}}}}}
        # --smoke: the clusters, by name, launched ahead and kept. One cluster of one-worker instances
        # grows from part to part instead of a fresh cluster for each: a service takes seconds to start,
        # and the smoke run's figures are not read.
        self.kept: dict[str, Cluster] = {}

    def cluster(self, name: str, workers: int, count: int, launch: bool = False) -> Cluster:
        """``count`` instances of ``workers`` workers: a fresh cluster, or with ``--smoke`` a kept one
        (all one-worker instances share one); ``launch``: only launch them, ``cluster()`` waits later."""
        if not self.a.smoke:
            return Cluster(self, name, workers).start(count)
        name = "shared" if workers == 1 else name
        if name not in self.kept:
            self.kept[name] = Cluster(self, name, workers).start(0)
        cluster = self.kept[name]
        return cluster.launch(count) if launch else cluster.grow(count)

    def release(self, cluster: Cluster) -> None:
        """Stop a cluster, unless it is the kept one-worker cluster (``--smoke``): the next part grows it."""
        if self.kept.get("shared") is not cluster:
            cluster.stop()
            self.kept = {name: kept for name, kept in self.kept.items() if kept is not cluster}

    def setup(self) -> None:
        a = self.a
        shutil.rmtree(self.work, ignore_errors=True)
        if a.smoke:  # moto starts while the source is generated
            self.moto.launch()
        say(f"source: {a.rows:,} rows")
        self.source, seconds = datagen.ensure_source(a.workdir, a.rows, 0, a.seed)
        if seconds:
            say(f"generated {self.source} in {seconds:.1f} s")
        datagen.warm_cache(self.source)
        self.moto.start()
        say(f"moto_server at {self.moto.endpoint} (pid {self.moto.pid})")

    # ------------------------------------------------------------ a. throughput

    def workload(
        self, instances: int, workers: int, label: str
    ) -> tuple[float, Counter[str], dict[str, float]]:
        """Wall seconds of ``--runs`` small runs on a fresh, warm cluster; runs per instance; CPU seconds
        used meanwhile by the instances' servers, their workers, and moto.

        The end is the last run's ``completed_at``, read (with the runs' statuses) from the state
        database every 0.1 s: polling the instances' API would load the instances being measured.
        """
        import psycopg

        a = self.a
        cluster = self.cluster(label, workers, instances)
        try:
            cluster.warm_up()
            extracts = [
                cluster.first.create_extract(f"small {i}", ["accounts"], "jsonl", False, **self.small_filter)
                for i in range(a.runs)
            ]
            servers = [svc.process.pid for svc in cluster.instances if svc.process]
            children = [pid for server in servers for pid in descendants(server)]
            cpu = {"servers": servers, "workers": children, "moto": [self.moto.pid]}
            cpu_before = {k: sum(cpu_seconds(pid) for pid in pids) for k, pids in cpu.items()}
            started, started_wall = time.perf_counter(), time.time()
            runs = [cluster.instances[i % instances].start_run(extract) for i, extract in enumerate(extracts)]
            deadline = time.monotonic() + 600
            with psycopg.connect(cluster.state.url, autocommit=True) as con:
                while True:
                    completed, ended, last = con.execute(
                        "SELECT count(*) FILTER (WHERE status = 'completed'), "
                        "count(*) FILTER (WHERE status IN ('failed', 'cancelled')), max(completed_at) "
                        "FROM extract_runs WHERE id = ANY(%s)",
                        (runs,),
                    ).fetchone()
                    if ended:
                        raise BenchError(f"{label}: {ended} runs failed; see {cluster.first.workdir}")
                    if completed == len(runs):
                        break
                    if time.monotonic() > deadline:
                        raise BenchError(f"{label}: {len(runs) - completed} runs unfinished after 600 s")
                    time.sleep(0.1)
                rows = con.execute(
                    "SELECT instance_id, records_exported FROM extract_runs WHERE id = ANY(%s)", (runs,)
                ).fetchall()
            used = {k: sum(cpu_seconds(pid) for pid in pids) - cpu_before[k] for k, pids in cpu.items()}
            elapsed = parse_iso(last) - started_wall
            if abs(elapsed - (time.perf_counter() - started)) > 5:
                raise BenchError(f"{label}: the state's clock and this one differ")
            wrong = [n for _, n in rows if n != min(a.small_rows, a.rows // 2)]
            if wrong:
                raise BenchError(f"{label}: a run exported {wrong[0]} rows")
            return elapsed, Counter(instance for instance, _ in rows), used
        finally:
            self.release(cluster)

    def throughput(self) -> None:
        a, f = self.a, self.figures
        times: dict[tuple[int, int], list[float]] = {}
        spread: dict[tuple[int, int], list[str]] = {}
        used: dict[tuple[int, int], list[dict[str, float]]] = {}
        configs = [(k, 1) for k in a.instances] + [(1, k) for k in a.instances if k > 1]
        if a.smoke:  # the clusters of several workers start with the first one-worker cluster
            for instances, workers in [c for c in configs if c[1] > 1] + configs[:1]:
                self.cluster(f"{instances}x{workers}", workers, instances, launch=True)
        for rep in range(a.repeats):
            order = configs if rep % 2 == 0 else configs[::-1]
            for number, (instances, workers) in enumerate(order):
                label = f"{instances}x{workers}"
                done_with_one_worker = rep + 1 == a.repeats and all(w > 1 for _, w in order[number:])
                if a.smoke and done_with_one_worker and set(a.parts) & set("bc"):
                    self.cluster("failover", 1, 3, launch=True)  # part b's third instance starts meanwhile
                say(
                    f"a. repeat {rep + 1} of {a.repeats}: {a.runs} small runs, "
                    f"{instances} instance(s) × {workers} worker(s)"
                )
                seconds, per_instance, cpu = self.workload(instances, workers, label)
                used.setdefault((instances, workers), []).append(cpu)
                times.setdefault((instances, workers), []).append(seconds)
                spread.setdefault((instances, workers), []).append(
                    "/".join(str(n) for n in sorted(per_instance.values(), reverse=True))
                )
                say(
                    f"   {seconds:.2f} s, {a.runs / seconds:.1f} runs/s, "
                    f"runs per instance {spread[(instances, workers)][-1]}; CPU s: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
                )
        for instances, workers in configs:
            t = times[(instances, workers)]
            per_run = {
                k: median([u[k] for u in used[(instances, workers)]]) / a.runs * 1000
                for k in used[configs[0]][0]
            }
            f.add(
                "a throughput",
                f"{a.runs} runs of {a.small_rows:,} rows, {instances} instance(s) × {workers} worker(s): "
                "median wall s (runs); runs per instance; CPU ms per run: servers / workers / moto",
                f"**{median(t):.2f}** ({', '.join(f'{x:.2f}' for x in t)}); "
                f"{a.runs / median(t):.2f} runs/s; {', '.join(spread[(instances, workers)])}; "
                + " / ".join(f"{v:.0f}" for v in per_run.values()),
            )
        for k in a.instances:
            if k == 1:
                continue
            overhead = median(times[(k, 1)]) / median(times[(1, k)]) - 1
            pairs = [s / o - 1 for s, o in zip(times[(k, 1)], times[(1, k)], strict=True)]
            f.add(
                "a throughput",
                f"coordination overhead: {k} instances × 1 against 1 instance × {k} (each repeat's)",
                f"**{overhead:+.1%}** ({', '.join(f'{p:+.0%}' for p in pairs)})",
                f"≤ {OVERHEAD_TARGET:.0%}",
                overhead <= OVERHEAD_TARGET,
            )
        if 1 in a.instances:
            one = median(times[(1, 1)])
            f.add(
                "a throughput",
                "scaling: 1 instance × 1 worker → " + ", ".join(f"{k} × 1" for k in a.instances if k > 1),
                ", ".join(f"{one / median(times[(k, 1)]):.2f}×" for k in a.instances if k > 1)
                + " the throughput of one (2 cores)",
            )

    # ------------------------------------------------------------ b. failover

    def failover(self) -> None:
        a, f = self.a, self.figures
        say(f"b. failover: {a.trials} trials, 3 instances, --lease-seconds {a.lease_seconds}")
        cluster = self.cluster("failover", 1, 3)
        to_failed, to_running, to_started = [], [], []
        try:
            extract = cluster.first.create_extract(
                "failover", ["events"], "jsonl", False, retry_delay_seconds=1, max_attempts=3
            )
            for trial in range(a.trials):
                target = cluster.instances[trial % len(cluster.instances)]
                run_id = target.start_run(extract)
                deadline = time.monotonic() + 60
                # Killed once it exports its data: a fixed wait let the smoke run's table finish first.
                while (run := target.run_record(run_id))["progress_detail"]["phase"] != "exporting_data":
                    if run["status"] in TERMINAL or time.monotonic() > deadline:
                        raise BenchError(f"failover run {run_id} did not start exporting: {run['status']}")
                    time.sleep(0.02)
                pid = cluster.pid_of(run["instance_id"])
                victim = next(s for s in cluster.instances if s.process and s.process.pid == pid)
                os.kill(pid, signal.SIGKILL)
                killed, killed_wall = time.perf_counter(), time.time()
                victim.process.wait()  # type: ignore[union-attr]
                if a.smoke:  # the replacement starts while the lease runs out, not after the trial
                    cluster.spares.append(cluster.instance().launch())
                survivor = next(s for s in cluster.instances if s is not victim)
                failed_at = running_at = None
                retry_id = None
                deadline = time.monotonic() + a.lease_seconds + 60
                while running_at is None:
                    if time.monotonic() > deadline:
                        raise BenchError(f"trial {trial + 1}: no retry of {run_id} started within a minute")
                    if failed_at is None:
                        record = survivor.run_record(run_id)
                        if record["status"] == "failed":
                            failed_at = time.perf_counter()
                            retry_id = record["retry_run_id"]
                            if not (record["error"] or "").startswith("interrupted") or not retry_id:
                                raise BenchError(f"trial {trial + 1}: {run_id} failed: {record['error']}")
                        elif record["status"] != "running":
                            raise BenchError(f"trial {trial + 1}: {run_id} became {record['status']}")
                    if retry_id is not None:
                        retry = survivor.run_record(retry_id)
                        if retry["status"] == "running":
                            running_at = time.perf_counter()
                            if retry["instance_id"] == run["instance_id"]:
                                raise BenchError(f"trial {trial + 1}: the retry ran on the dead instance")
                            to_started.append(parse_iso(retry["started_at"]) - killed_wall)
                        elif retry["status"] != "queued":
                            raise BenchError(f"trial {trial + 1}: the retry became {retry['status']}")
                    time.sleep(0.02)
                to_failed.append(failed_at - killed)  # type: ignore[operator]
                to_running.append(running_at - killed)
                say(
                    f"   trial {trial + 1}: failed as interrupted after {to_failed[-1]:.2f} s, "
                    f"retry running after {to_running[-1]:.2f} s"
                )
                cluster.instances.remove(victim)
                shutil.rmtree(victim.workdir, ignore_errors=True)
                survivor.api("POST", f"/api/extracts/{extract}/cancel")
                while survivor.run_record(retry_id)["status"] not in TERMINAL:  # type: ignore[arg-type]
                    time.sleep(0.05)
                for r in (run_id, retry_id):
                    with contextlib.suppress(BenchError):
                        survivor.delete_run(r)  # type: ignore[arg-type]
                cluster.add()  # three instances again for the next trial (and part c, with --smoke)
        finally:
            self.release(cluster)
        lease = a.lease_seconds
        for label, values in (
            ("kill → run seen failed as interrupted", to_failed),
            ("kill → retry seen `running` on another instance", to_running),
            ("kill → retry's `started_at`", to_started),
        ):
            target = label.startswith("kill → retry seen")
            f.add(
                "b failover",
                f"{label}: median / max of {len(values)} (each trial's)",
                f"**{median(values):.2f} / {max(values):.2f} s** ({', '.join(f'{v:.1f}' for v in values)})",
                f"≤ lease + 5 = {lease + 5} s" if target else "",
                max(values) <= lease + 5 if target else None,
            )
        self.figures.notes.append(
            f"Failover: `--lease-seconds {lease}` (heartbeat every {max(min(lease / 3, 5), 0.2):.2f} s), "
            "the extract's `retry_delay_seconds` 1 (its minimum; ±20 % jitter): the retry waits that "
            "second after the reap by design."
        )

    # ------------------------------------------------------------ c. status latency

    def latency(self) -> None:
        a, f = self.a, self.figures
        say(f"c. status latency: 3 instances, {a.clients} clients, idle then two exports running")
        cluster = self.cluster("latency", 1, 3)
        try:
            cluster.warm_up()
            if a.nice_workers:  # an experiment: the workers (and the forkserver they come from) yield the CPU
                for svc in cluster.instances:
                    for pid in descendants(svc.process.pid):  # type: ignore[union-attr]
                        os.setpriority(os.PRIO_PROCESS, pid, a.nice_workers)
            idle_run = cluster.first.start_run(
                cluster.first.create_extract("idle", ["accounts"], "jsonl", False, **self.small_filter)
            )
            cluster.first.wait(idle_run)
            extracts = [
                cluster.first.create_extract(f"load {i}", ["events"], "jsonl", False) for i in range(2)
            ]
            idle = asyncio.run(self._latency(cluster, [], idle_run, a.latency_seconds / 4))
            busy = asyncio.run(self._latency(cluster, extracts, idle_run, a.latency_seconds))
        finally:
            self.release(cluster)
        for label, (latencies, errors, finished, spread), seconds in (
            ("workers idle", idle, a.latency_seconds / 4),
            ("two exports running", busy, a.latency_seconds),
        ):
            latencies.sort()
            loaded = bool(finished is not None)
            if not latencies:
                f.add("c latency", f"{label}: no request answered", "—", "p99 < 100 ms", False)
                continue
            p50, p99 = (
                latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 for q in (0.5, 0.99)
            )
            f.add(
                "c latency",
                f"{label}: GET run status p50 / p99 / max; {a.clients} clients over 3 instances, every "
                f"{a.poll_interval * 1000:.0f} ms, {seconds:.0f} s ({len(latencies):,} requests)",
                f"{p50:.1f} / **{p99:.1f}** / {latencies[-1] * 1000:.1f} ms",
                f"p99 < {LATENCY_TARGET_MS} ms" if loaded else "",
                p99 < LATENCY_TARGET_MS if loaded else None,
            )
            f.add(
                "c latency",
                f"{label}: errors"
                + (f" (exports completed meanwhile: {finished}" if loaded else "")
                + (f", by instance: {spread})" if loaded and spread else ")" if loaded else ""),
                str(errors),
                "0",
                errors == 0,
            )

    async def _latency(
        self, cluster: Cluster, extracts: list[str], idle_run: str, seconds: float
    ) -> tuple[list[float], int, int | None, str]:
        """(latencies, errors, exports completed, instances that ran them) over ``seconds``."""
        a = self.a
        clients = [
            httpx.AsyncClient(base_url=svc.base_url, headers=svc.headers, timeout=30, verify=TLS)
            for svc in cluster.instances
        ]
        current: dict[str, str] = {}
        ran_on: Counter[str] = Counter()
        finished = 0
        stop = asyncio.Event()

        async def keep_exporting(number: int, extract: str) -> None:
            nonlocal finished
            client = clients[number % len(clients)]
            while not stop.is_set():
                response = await client.post(f"/api/extracts/{extract}/run")
                response.raise_for_status()
                run = response.json()["data"]["run_id"]
                current[extract] = run
                while not stop.is_set():
                    record = (await client.get(f"/api/data/extract_runs/{run}")).json()["data"]
                    if record["status"] in TERMINAL:
                        if record["status"] != "completed":
                            raise BenchError(f"load run {run} {record['status']}: {record['error']}")
                        finished += 1
                        ran_on[record["instance_id"]] += 1
                        await client.delete(f"/api/data/extract_runs/{run}")
                        break
                    await asyncio.sleep(0.2)
                else:
                    await client.post(f"/api/extracts/{extract}/cancel")

        try:
            loaders = [asyncio.create_task(keep_exporting(i, e)) for i, e in enumerate(extracts)]
            while len(current) < len(extracts):
                await asyncio.sleep(0.05)
            if extracts:
                await asyncio.sleep(0.5)  # both exports reading and uploading
            latencies: list[float] = []
            errors = 0

            async def poller(number: int) -> None:
                nonlocal errors
                client = clients[number % len(clients)]
                while not stop.is_set():
                    run = current[extracts[number % len(extracts)]] if extracts else idle_run
                    started = time.perf_counter()
                    try:
                        response = await client.get(f"/api/data/extract_runs/{run}")
                        ok = response.status_code == 200 and response.json()["success"]
                    except httpx.HTTPError:
                        ok = False
                    latencies.append(time.perf_counter() - started)
                    errors += not ok
                    await asyncio.sleep(a.poll_interval)

            pollers = [asyncio.create_task(poller(i)) for i in range(a.clients)]
            await asyncio.sleep(seconds)
            stop.set()
            await asyncio.gather(*pollers)
            await asyncio.gather(*loaders)
            for extract in extracts:  # the runs cancelled at the end
                run = current[extract]
                while (await clients[0].get(f"/api/data/extract_runs/{run}")).json()["data"]["status"] in (
                    "queued",
                    "running",
                ):
                    await asyncio.sleep(0.1)
            spread = "/".join(str(n) for n in sorted(ran_on.values(), reverse=True))
            return latencies, errors, (finished if extracts else None), spread
        finally:
            for client in clients:
                await client.aclose()

    # ------------------------------------------------------------ all of it

    def run(self) -> Figures:
        self.setup()
        try:
            for part in self.a.parts:
                {"a": self.throughput, "b": self.failover, "c": self.latency}[part]()
        finally:
            for cluster in self.kept.values():
                cluster.stop()
            self.moto.stop()
            shutil.rmtree(self.work, ignore_errors=True)
        return self.figures


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the source's events table")
    parser.add_argument("--runs", type=int, default=100, help="small runs in the throughput workload")
    parser.add_argument("--small-rows", type=int, default=1000, help="rows of each small run (accounts)")
    parser.add_argument(
        "--instances", default="1,2,3", help="instance counts compared with one instance of as many workers"
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs of each throughput configuration")
    parser.add_argument("--trials", type=int, default=10, help="failover trials")
    parser.add_argument("--lease-seconds", type=int, default=5, help="the instances' --lease-seconds (≥ 1)")
    parser.add_argument("--latency-seconds", type=float, default=20, help="duration of the latency part")
    parser.add_argument("--clients", type=int, default=8, help="polling clients in the latency part")
    parser.add_argument("--poll-interval", type=float, default=0.25, help="seconds between a client's polls")
    parser.add_argument(
        "--nice-workers",
        type=int,
        default=0,
        help="part c renices every instance's workers to this (0: as started, which is 10)",
    )
    parser.add_argument("--parts", default="abc", help="which parts to run, e.g. 'b' for failover only")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL maintenance database: each cluster's state database is made beside it",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/extracts-bench"), help="data and services")
    parser.add_argument("--seed", type=int, default=42, help="seed of the generated data")
    parser.add_argument("--markdown", type=Path, help="also write the results as Markdown to this file")
    parser.add_argument("--smoke", action="store_true", help="small and quick")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.runs = min(args.rows, 120_000), min(args.runs, 12)
        args.repeats, args.trials = 1, min(args.trials, 2)
        args.instances, args.latency_seconds = "1,2", min(args.latency_seconds, 2)
        args.lease_seconds = min(args.lease_seconds, 2)
    try:
        args.instances = sorted({int(k) for k in args.instances.split(",")})
    except ValueError:
        parser.error("--instances: comma-separated counts, e.g. 1,2,3")
    if args.lease_seconds < 1:
        parser.error("--lease-seconds: at least 1")
    if not set(args.parts) <= set("abc") or not args.parts:
        parser.error("--parts: letters among a, b, c")
    args.workdir = args.workdir.absolute()
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    load_start, started = load(), time.perf_counter()
    try:
        figures = InstancesBench(args).run()
    except (BenchError, subprocess.CalledProcessError, httpx.HTTPError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    text = figures.render("instances.py", argv, load_start, time.perf_counter() - started)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 1 if args.strict and figures.missed else 0


if __name__ == "__main__":
    sys.exit(main())
