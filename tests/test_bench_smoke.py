"""The benchmark keeps working: ``bench/run.py --smoke`` runs end to end and prints its tables.

No timing is asserted here: the figures depend on the machine (bench/RESULTS.md
holds a real run's). The smoke run still verifies every exported file against
the source, so a wrong export fails this test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the benchmark compares with the sqlite3 CLI")
def test_bench_smoke_runs_and_prints_its_tables(tmp_path: Path) -> None:
    # Smaller than --smoke's own sizes (5,000 and 15,000 rows, 1 s of latency): the same tables
    # and the same check of every file, for a fifth less CPU.
    smaller = ["--rows", "2000", "--big-rows", "6000", "--latency-seconds", "0.25"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--workdir", str(tmp_path), *smaller],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "| case | contender | rows | median wall s (runs) |" in out
    for contender in (
        "| jsonl, 1 table | extracts service |",
        "| jsonl, 1 table | `sqlite3 -json` |",
        "| jsonl.gz, 1 table | extracts service, compress |",
        "| json, 1 table |",
        "| jsonl, 2 tables | extracts service |",
    ):
        assert contender in out
    assert "| part | measure | value | target | |" in out
    for part in ("| 3 memory |", "| 4 download |", "| 5 latency |", "| 6 start |"):
        assert part in out
    # The service and its workers are gone, and so are the run's files.
    assert not list(tmp_path.glob("service-*"))
