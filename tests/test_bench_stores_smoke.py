"""bench/storage.py and bench/instances.py keep working: each runs end to end in its smoke size.

No timing is asserted (bench/RESULTS.md holds a real run's figures). The runs
still check what they export: a file that differs from the source, a run that
fails, a retry that never starts after its instance is killed fail them (exit 2).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from helpers import PG_ADMIN, ROOT


def bench(script: str, tmp_path: Path, *extra: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--smoke", "--workdir", str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="the download part runs curl")
def test_storage_bench_smoke_prints_every_part(tmp_path: Path) -> None:
    # A quarter and a third of --smoke's own sizes (20,000 and 30,000 rows): the same parts and
    # checks, for a fifth less CPU.
    out = bench("storage.py", tmp_path, "--rows", "5000", "--big-rows", "10000")
    for row in (
        "| a export | 5,000 rows, jsonl, to local disk:",
        "| a export | 5,000 rows, jsonl, to S3 (moto):",
        "| a export | S3 (moto) / local disk, ratio of the medians",
        "| b download | ZIP throughput / file throughput |",
        "| b download | server RSS growth during a ZIP download",
        "| c memory | worker peak RSS (VmHWM), 10,000 rows to S3 |",
        "its `events_big.jsonl` has the artifact's SHA-256, 10,000 lines",
    ):
        assert row in out, out


@pytest.mark.slow
def test_instances_bench_smoke_prints_every_part(tmp_path: Path) -> None:
    try:
        psycopg.connect(PG_ADMIN, connect_timeout=5).close()
    except psycopg.OperationalError:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    # Part c's two exports run for the whole latency part (--smoke's 2 s): half a second gives the
    # same table, and 4 runs fill part a's table as 8 did, for a third less CPU.
    out = bench("instances.py", tmp_path, "--trials", "1", "--runs", "4", "--latency-seconds", "0.5")
    for row in (
        "| a throughput | 4 runs of 1,000 rows, 2 instance(s) × 1 worker(s):",
        "| a throughput | coordination overhead: 2 instances × 1 against 1 instance × 2",
        "| b failover | kill → retry seen `running` on another instance: median / max of 1",
        "| c latency | two exports running: GET run status p50 / p99 / max;",
    ):
        assert row in out, out
