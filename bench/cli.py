"""``extracts-app export`` against ``sqlite3 -json`` on the bench table (issue 17, SPEC: Command line).

    python bench/cli.py                    # 1M rows, median of 5 alternated runs: about 2 minutes
    python bench/cli.py --smoke            # 20,000 rows, one run: keeps this script working

Each repeat runs every contender once, in turn (so load on the machine hits
them alike), on the same warm source file; the figure to read is the ratio of
median wall times to the reference on the same row. ``extracts-app`` runs as
the console script runs it (``from extracts.cli import main; main()``, from
this checkout): process start, imports, the source checks, the run (count,
describe.yaml, data, manifest, SHA-256) and, with ``-o``, the ZIP. Every
output is checked afterwards (``extracts-app verify``, and the records
against the table's row count). Target: ≤ 1.2 × ``sqlite3 -json``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import datagen

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.2
CLI = f"{shlex.quote(sys.executable)} -c 'from extracts.cli import main; main()'"


def contenders(db: Path, out: Path) -> list[tuple[str, str, str | None, Path]]:
    """(case, contender, reference contender or None, output) with the shell command in the name's place."""
    source, events = shlex.quote(str(db)), "'SELECT * FROM \"events\"'"
    export = f"{CLI} export {source} --schemas events -q"
    return [
        ("jsonl", f"sqlite3 -json {source} {events} > {out / 'sqlite3.json'}", None, out / "sqlite3.json"),
        ("jsonl", f"{export} --no-compress -d {out / 'dir'}", "sqlite3", out / "dir"),
        ("jsonl", f"{export} --no-compress -o {out / 'plain.zip'}", "sqlite3", out / "plain.zip"),
        (
            "jsonl.gz",
            f"sqlite3 -json {source} {events} | gzip -1 > {out / 'sqlite3.json.gz'}",
            None,
            out / "sqlite3.json.gz",
        ),
        ("jsonl.gz", f"{export} -o {out / 'gz.zip'}", "sqlite3", out / "gz.zip"),
    ]


def label(command: str) -> str:
    if command.startswith("sqlite3"):
        return "`sqlite3 -json" + (" \\| gzip -1`" if "gzip" in command else "`")
    flags = command.split(" export ", 1)[1].split(" ", 1)[1]
    flags = " ".join(word if not word.startswith("/") else Path(word).name for word in flags.split())
    return f"`extracts-app export … {flags}`"


def clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def timed(command: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return time.perf_counter() - started


def check(output: Path, rows: int) -> None:
    """The export's files match their manifest, and hold every row."""
    if output.name.startswith("sqlite3"):
        return
    done = subprocess.run(
        [sys.executable, "-c", "from extracts.cli import main; main()", "verify", str(output)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if done.returncode != 0 or f"{rows:,} records" not in done.stdout:
        raise SystemExit(f"{output} did not verify with {rows:,} records:\n{done.stdout}{done.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/extracts-bench"))
    parser.add_argument("--smoke", action="store_true", help="20,000 rows, one repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.repeats = 20_000, 1
    db, built = datagen.ensure_source(args.workdir, args.rows, 0, args.seed)
    datagen.warm_cache(db)
    out = args.workdir / "cli-out"
    out.mkdir(parents=True, exist_ok=True)
    rows = contenders(db, out)
    load_start = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    times: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    for repeat in range(args.repeats):
        for i, (_, command, _, output) in enumerate(rows):
            clear(output)
            times[i].append(timed(command))
            check(output, args.rows)
            clear(output)
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    load_end = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    print(
        f"{args.rows:,} rows (`events`, {db.stat().st_size >> 20} MiB source), median of {args.repeats} "
        f"alternated runs; load average at start / end: {load_start} / {load_end}; "
        f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n"
    )
    print("| case | contender | median wall s (runs) | rows/s | ratio | target |")
    print("|---|---|---:|---:|---:|---|")
    failed = False
    reference = None
    for i, (case, command, ref, _) in enumerate(rows):
        median = statistics.median(times[i])
        runs = ", ".join(f"{t:.2f}" for t in times[i])
        if ref is None:
            reference = median
            ratio, target = "—", ""
        else:
            value = median / reference
            met = value <= TARGET
            failed |= not met and case == "jsonl"
            ratio, target = f"{value:.2f}×", f"≤ {TARGET} {'met' if met else 'missed'}"
        rate = f"{args.rows / median:,.0f}"
        print(f"| {case} | {label(command)} | **{median:.2f}** ({runs}) | {rate} | {ratio} | {target} |")
    return 1 if failed and not args.smoke else 0


if __name__ == "__main__":
    raise SystemExit(main())
