"""Object storage against local disk (issue 14's figures): the real service, moto's S3 server.

    python bench/storage.py                         # 1M rows × 5 each way, 10M rows to S3: ~10 minutes
    python bench/storage.py --big-rows 0            # the 1M-row comparison and its downloads only
    python bench/storage.py --smoke                 # small, about 10 s: keeps this script working

Two services run side by side on the same source, each with its own SQLite
state: one writes to a local directory, the other to ``s3://extracts-bench/…``
on moto's S3 server on 127.0.0.1 (``--storage-endpoint``). It measures:

a. a ``--rows`` export (``events``, ``jsonl``, uncompressed) to S3 against the
   same export to local disk, alternated repeat by repeat, median wall time
   from POST run to ``completed`` (target: ratio ≤ 1.3), with moto's CPU time;
b. the ZIP of the biggest S3 run downloaded through the service against its
   data file (a single object of nearly the same size) downloaded through the
   service, alternated (target: throughput ratio ≥ 0.8), and the server's RSS
   growth during a ZIP download (VmHWM after it minus VmRSS before it, and
   VmRSS sampled every 0.1 s; target < 50 MiB);
c. the worker's memory during a ``--big-rows`` export to S3: peak (VmHWM) and
   its RSS sampled every 0.25 s (target < 150 MiB, flat: within 10% from a
   quarter of the way to the end).

Every exported file is checked: the first local one row by row against the
source, every S3 one by its checksum (equal to the local file's, the export
being deterministic) and one of them downloaded and hashed; the big one
downloaded as a ZIP, unpacked, hashed, counted and sampled row by row.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import datagen
import httpx
import orjson
import verify
from service import BenchError, MemoryWindow, Service, rss
from stores import BUCKET, CREDENTIALS, MIB, Figures, Moto, cpu_seconds, load, say

RATIO_TARGET = 1.3
PART_MIB, IN_FLIGHT = 8, 2  # as extracts/storage/objects.py uploads (PART_BYTES, UPLOADS_AT_ONCE)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class StorageBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.figures = Figures()
        self.work = args.workdir / f"storage-{os.getpid()}"
        self.source = Path()
        self.moto = Moto(self.work / "moto")
        self.local: Service | None = None
        self.s3: Service | None = None
        self.unsigned: Service | None = None

    # ------------------------------------------------------------ setup

    def digest(self, table: str) -> verify.Digest:
        """The source table's digest, cached beside the generated file as bench/run.py caches it."""
        cache = self.source.with_name(self.source.name + f".digests-v{verify.DIGEST_VERSION}.json")
        saved = orjson.loads(cache.read_bytes()) if cache.exists() else {}
        name = f"{table}:None"
        if name not in saved:
            digest = verify.table_digest(self.source, table)
            saved[name] = [digest.rows, digest.sha256]
            cache.write_bytes(orjson.dumps(saved))
        return verify.Digest(*saved[name])

    def setup(self) -> None:
        a = self.a
        say(f"source: {a.rows:,} rows" + (f" + {a.big_rows:,}-row table" if a.big_rows else ""))
        self.source, seconds = datagen.ensure_source(a.workdir, a.rows, a.big_rows, a.seed)
        if seconds:
            say(f"generated {self.source} in {seconds:.1f} s")
        datagen.warm_cache(self.source)
        self.digest("events")
        shutil.rmtree(self.work, ignore_errors=True)
        self.local = Service(self.source, self.work / "local", workers=a.workers)
        if a.smoke:  # it starts beside moto
            self.local.launch()
        self.moto.start()
        say(f"moto_server at {self.moto.endpoint} (pid {self.moto.pid})")
        self.s3 = self.s3_service("s3", {})
        # The same store with AWS_UNSIGNED_PAYLOAD=true (obstore reads it): no SHA-256 of each part
        # in the signature, which moto otherwise recomputes for every byte it receives.
        self.unsigned = (
            self.s3_service("s3-unsigned", {"AWS_UNSIGNED_PAYLOAD": "true"}) if a.unsigned else None
        )
        services = [svc for svc in (self.local, self.s3, self.unsigned) if svc is not None]
        # One service after another; with --smoke all at once (the smoke run's figures are not read).
        for group in [services] if a.smoke else [[svc] for svc in services]:
            for svc in group:
                if svc.process is None:
                    svc.launch()
            for svc in group:
                svc.ready()
                say(f"service ({svc.storage_url or 'local disk'}) at {svc.base_url} (pid {svc.process.pid})")
            warm = [
                (svc, svc.start_run(svc.create_extract("warm-up", ["accounts"], "jsonl", False)))
                for svc in group
            ]
            for svc, run in warm:
                svc.delete_run(svc.wait(run)["id"])  # the pool's worker starts now

    def s3_service(self, name: str, env: dict[str, str]) -> Service:
        return Service(
            self.source,
            self.work / name,
            workers=self.a.workers,
            storage_url=self.moto.url(f"{name}-{os.getpid()}"),
            extra=self.moto.options(),
            env={**CREDENTIALS, **env},
        )

    def stop(self) -> None:
        for svc in (self.local, self.s3, self.unsigned):
            if svc is not None:
                svc.stop()
        self.moto.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    # ------------------------------------------------------------ a. export to S3 vs local disk

    def timed_run(self, svc: Service, extract: str) -> tuple[str, float, MemoryWindow, float]:
        """(run id, wall seconds, memory window, moto CPU seconds) of one run."""
        assert svc.process is not None
        window = MemoryWindow(svc.process.pid).open()
        moto_cpu = cpu_seconds(self.moto.pid)
        elapsed, run, _ = svc.timed_run(extract)
        window.close()
        return run, elapsed, window, cpu_seconds(self.moto.pid) - moto_cpu

    def data_artifact(self, svc: Service, run: str) -> dict:
        (data,) = [x for x in svc.artifacts(run) if x["artifact_type"].startswith("data-")]
        return data

    def exports(self) -> None:
        a, f = self.a, self.figures
        assert self.local is not None and self.s3 is not None
        contenders = [("local disk", self.local), ("S3 (moto)", self.s3)]
        if self.unsigned is not None:
            contenders.append(("S3 (moto), AWS_UNSIGNED_PAYLOAD=true", self.unsigned))
        extracts = {label: svc.create_extract(label, ["events"], "jsonl", False) for label, svc in contenders}
        times: dict[str, list[float]] = {label: [] for label, _ in contenders}
        peaks: dict[str, list[int]] = {label: [] for label, _ in contenders}
        worker_cpu: dict[str, list[float]] = {label: [] for label, _ in contenders}
        moto_cpu: dict[str, list[float]] = {label: [] for label, _ in contenders}
        alone: list[tuple[float, float, float]] = []  # moto alone: (wall, close, moto CPU) seconds
        checksum = ""
        for rep in range(a.repeats):
            order = contenders[rep % len(contenders) :] + contenders[: rep % len(contenders)]
            order = order[::-1] if rep % 2 else order
            say(
                f"a. {a.rows:,}-row export, repeat {rep + 1} of {a.repeats} "
                f"({' then '.join(label for label, _ in order)})"
            )
            for label, svc in order:
                run, seconds, window, moto_seconds = self.timed_run(svc, extracts[label])
                times[label].append(seconds)
                peaks[label].append(window.worker_peak)
                worker_cpu[label].append(window.worker_cpu_seconds)
                moto_cpu[label].append(moto_seconds)
                record = svc.run_record(run)
                if record["records_exported"] != a.rows:
                    raise verify.Mismatch(f"{label} run {run} exported {record['records_exported']:,} rows")
                data = self.data_artifact(svc, run)
                if svc is self.local:
                    path = Path(data["storage_path"])
                    if verify.file_sha256(path) != data["checksum"]:
                        raise verify.Mismatch(f"{path}: SHA-256 differs from its artifact's checksum")
                    if not checksum:
                        say("checking the local file row by row against the source")
                        if verify.file_digest(path, "jsonl") != self.digest("events"):
                            raise verify.Mismatch(f"{path} does not hold the source's rows")
                    if a.moto_alone:
                        alone.append(self.upload_alone(path))
                elif rep == 0:
                    self.download_and_hash(svc, data)
                if checksum and data["checksum"] != checksum:
                    raise verify.Mismatch(f"{label} run {run}'s file differs from the first run's")
                checksum = data["checksum"]
                svc.delete_run(run)
        local = times["local disk"]
        for label, _ in contenders:
            t = times[label]
            f.add(
                "a export",
                f"{a.rows:,} rows, jsonl, to {label}: median wall s (runs); worker / moto CPU s, median",
                f"**{median(t):.2f}** ({', '.join(f'{x:.2f}' for x in t)}); "
                f"{median(worker_cpu[label]):.2f} / {median(moto_cpu[label]):.2f}",
            )
        for label, _ in contenders[1:]:
            ratio = median(times[label]) / median(local)
            pairs = [s / lo for s, lo in zip(times[label], local, strict=True)]
            default = label == "S3 (moto)"
            f.add(
                "a export",
                f"{label} / local disk, ratio of the medians (each repeat's)",
                f"**{ratio:.2f}** ({', '.join(f'{p:.2f}' for p in pairs)})",
                f"≤ {RATIO_TARGET}" if default else "",
                ratio <= RATIO_TARGET if default else None,
            )
        if alone:
            walls, closes, cpus = (sorted(x) for x in zip(*alone, strict=True))
            f.add(
                "a export",
                "moto alone: the local run's file uploaded straight to moto (obstore, the service's "
                f"{PART_MIB} MiB parts, {IN_FLIGHT} in flight), no service: median wall s (runs); of which "
                "the final close (CompleteMultipartUpload), median; moto CPU s",
                f"{median(walls):.2f} ({', '.join(f'{w:.2f}' for w, *_ in alone)}); {median(closes):.2f}; "
                f"{median(cpus):.2f}",
            )
            f.add(
                "a export",
                "local disk's median + moto's own close, over local disk's median",
                f"{(median(local) + median(closes)) / median(local):.2f}",
            )
        f.add(
            "a export",
            "worker peak RSS (VmHWM), median: " + " / ".join(label for label, _ in contenders),
            " / ".join(f"{median(peaks[label]) / MIB:.1f}" for label, _ in contenders) + " MiB",
        )

    def upload_alone(self, path: Path) -> tuple[float, float, float]:
        """(wall, close, moto CPU seconds) of ``path`` uploaded to moto as the service uploads, without it."""
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            BUCKET,
            config={
                "endpoint": self.moto.endpoint,
                "region": CREDENTIALS["AWS_REGION"],
                "access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            },
            client_options={"allow_http": True},
        )
        moto_cpu = cpu_seconds(self.moto.pid)
        started = time.perf_counter()
        writer = obstore.open_writer(
            store, f"alone-{os.getpid()}", buffer_size=PART_MIB << 20, max_concurrency=IN_FLIGHT
        )
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                writer.write(chunk)
        closing = time.perf_counter()
        writer.close()
        ended = time.perf_counter()
        moto_cpu = cpu_seconds(self.moto.pid) - moto_cpu
        if obstore.head(store, f"alone-{os.getpid()}")["size"] != path.stat().st_size:
            raise BenchError("moto stored a different size")
        obstore.delete(store, f"alone-{os.getpid()}")
        return ended - started, ended - closing, moto_cpu

    def download_and_hash(self, svc: Service, data: dict) -> None:
        """One S3 artifact through the service, hashed: the stored bytes are the checksummed ones."""
        h, size = hashlib.sha256(), 0
        with svc.client.stream("GET", f"/api/extracts/artifacts/{data['id']}/download") as response:
            if response.status_code != 200:
                raise BenchError(f"download of {data['artifact_name']} answered {response.status_code}")
            for chunk in response.iter_bytes(1 << 20):
                h.update(chunk)
                size += len(chunk)
        if (size, h.hexdigest()) != (data["size_bytes"], data["checksum"]):
            raise verify.Mismatch(f"{data['artifact_name']} downloaded from S3 differs from its checksum")

    # ------------------------------------------------------------ c. worker memory, big export to S3

    def big_export(self) -> tuple[str, dict]:
        """The ``--big-rows`` table exported to S3; its worker's and moto's memory."""
        a, f, s3 = self.a, self.figures, self.s3
        assert s3 is not None and s3.process is not None
        say(f"c. {a.big_rows:,}-row export to S3, the worker's RSS sampled every 0.25 s")
        extract = s3.create_extract("s3 big", ["events_big"], "jsonl", False)
        moto_peak = [0]
        stop = threading.Event()

        def watch_moto() -> None:
            while not stop.wait(0.25):
                moto_peak[0] = max(moto_peak[0], self.moto.rss())

        watcher = threading.Thread(target=watch_moto, daemon=True)
        window = MemoryWindow(s3.process.pid, sample_every=0.25).open()
        watcher.start()
        moto_cpu = cpu_seconds(self.moto.pid)
        started = time.perf_counter()
        run = s3.start_run(extract)
        s3.wait(run)
        elapsed = time.perf_counter() - started
        window.close()
        stop.set()
        watcher.join()
        moto_cpu = cpu_seconds(self.moto.pid) - moto_cpu
        record = s3.run_record(run)
        if record["records_exported"] != a.big_rows:
            raise verify.Mismatch(f"run {run} exported {record['records_exported']:,} rows")
        data = self.data_artifact(s3, run)
        f.add(
            "c memory",
            f"{a.big_rows:,}-row export to S3: wall time",
            f"{elapsed:.1f} s ({a.big_rows / elapsed:,.0f} rows/s, {data['size_bytes'] / 1e9:.2f} GB); "
            f"moto_server used {moto_cpu:.1f} s of CPU, peak RSS {moto_peak[0] / 2**30:.1f} GiB",
        )
        before = window.worker_rss_before
        f.add(
            "c memory",
            f"worker peak RSS (VmHWM), {a.big_rows:,} rows to S3",
            f"{window.worker_peak / MIB:.1f} MiB (pid {window.worker_pid}"
            + (f"; {before / MIB:.1f} MiB when the run started)" if before else "; a new process)"),
            "< 150 MiB",
            window.worker_peak < 150 * MIB,
        )
        curve = window.worker_curve()
        if len(curve) == 5:
            grown = curve[-1] / curve[1] - 1
            f.add(
                "c memory",
                "worker RSS at 10%, 25%, 50%, 75%, 100% of the run",
                " / ".join(f"{v / MIB:.1f}" for v in curve) + f" MiB ({grown:+.1%} from 25% to 100%)",
                "flat: within 10%",
                abs(grown) <= 0.10,
            )
        f.add("c memory", "server peak RSS (VmHWM) during the export", f"{window.server_peak / MIB:.1f} MiB")
        return run, data

    # ------------------------------------------------------------ b. downloads from S3

    def curl(self, svc: Service, path: str) -> tuple[float, int]:
        done = subprocess.run(
            [
                "curl",
                "-sS",
                "--fail",
                "-o",
                "/dev/null",
                "-H",
                f"Authorization: Bearer {svc.token}",
                "-w",
                "%{time_total} %{size_download}",
                svc.base_url + path,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        seconds, size = done.stdout.split()
        return float(seconds), int(size)

    def downloads(self, run: str, data: dict) -> None:
        a, f, s3 = self.a, self.figures, self.s3
        assert s3 is not None and s3.process is not None
        server = s3.process.pid
        zip_path, file_path = (
            f"/api/extracts/runs/{run}/download",
            f"/api/extracts/artifacts/{data['id']}/download",
        )
        zip_rates, file_rates, growths, sampled = [], [], [], []
        zip_size = 0
        for rep in range(a.download_repeats):
            say(f"b. downloads from S3, repeat {rep + 1} of {a.download_repeats}")
            order = ["zip", "file"] if rep % 2 == 0 else ["file", "zip"]
            for what in order:
                if what == "file":
                    seconds, size = self.curl(s3, file_path)
                    if size != data["size_bytes"]:
                        raise BenchError(f"the file download gave {size:,} bytes of {data['size_bytes']:,}")
                    file_rates.append(size / seconds)
                    continue
                with open(f"/proc/{server}/clear_refs", "w") as clear:
                    clear.write("5")
                before = rss(server)
                peak, stop = [before], threading.Event()

                def sample(peak: list[int] = peak, stop: threading.Event = stop) -> None:
                    while not stop.wait(0.1):
                        peak[0] = max(peak[0], rss(server))

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                seconds, zip_size = self.curl(s3, zip_path)
                stop.set()
                sampler.join()
                hwm = _vmhwm(server)
                growths.append(hwm - before)
                sampled.append(peak[0] - before)
                zip_rates.append(zip_size / seconds)
        ratio = median(zip_rates) / median(file_rates)
        f.add(
            "b download",
            f"run ZIP from S3 through the service ({zip_size / 1e9:.2f} GB), median of {len(zip_rates)}",
            f"{median(zip_rates) / 1e6:,.0f} MB/s ({', '.join(f'{r / 1e6:,.0f}' for r in zip_rates)})",
        )
        f.add(
            "b download",
            f"its data file, one object, through the service ({data['size_bytes'] / 1e9:.2f} GB)",
            f"{median(file_rates) / 1e6:,.0f} MB/s ({', '.join(f'{r / 1e6:,.0f}' for r in file_rates)})",
        )
        f.add("b download", "ZIP throughput / file throughput", f"**{ratio:.2f}**", "≥ 0.8", ratio >= 0.8)
        growth = max(growths)
        f.add(
            "b download",
            "server RSS growth during a ZIP download: VmHWM − VmRSS before (max); sampled every 0.1 s",
            f"{growth / MIB:.1f} MiB; {max(sampled) / MIB:.1f} MiB",
            "< 50 MiB",
            growth < 50 * MIB,
        )
        self.check_zip(run, data, zip_size)

    def check_zip(self, run: str, data: dict, zip_size: int) -> None:
        """The ZIP once more, to disk: its data member is the checksummed file, with the source's rows."""
        a, s3 = self.a, self.s3
        assert s3 is not None
        say("checking the ZIP: its data member's checksum, lines and sampled rows against the source")
        archive, member = self.work / "run.zip", self.work / data["artifact_name"]
        with open(archive, "wb") as out, s3.client.stream("GET", f"/api/extracts/runs/{run}/download") as r:
            for chunk in r.iter_bytes(1 << 20):
                out.write(chunk)
        if archive.stat().st_size != zip_size:
            raise verify.Mismatch(f"the ZIP is {archive.stat().st_size:,} bytes, {zip_size:,} before")
        h = hashlib.sha256()
        with zipfile.ZipFile(archive) as z, z.open(data["artifact_name"]) as src, open(member, "wb") as out:
            while chunk := src.read(1 << 20):  # zipfile checks the CRC-32 at the end
                h.update(chunk)
                out.write(chunk)
        archive.unlink()
        rows = a.big_rows or a.rows
        table = "events_big" if a.big_rows else "events"
        if h.hexdigest() != data["checksum"] or verify.count_lines(member) != rows:
            raise verify.Mismatch(f"the ZIP's {data['artifact_name']} differs from its checksum or row count")
        every = max(1, rows // 100_000)
        checked = verify.sampled_check(
            member, self.source, table, verify.table_columns(self.source, table), every
        )
        member.unlink()
        self.figures.notes.append(
            f"The S3 run's ZIP was downloaded once more and unpacked: its `{data['artifact_name']}` has the "
            f"artifact's SHA-256, {rows:,} lines, and {checked:,} rows ("
            + ("every row" if every == 1 else f"every {every}th")
            + ") equal to the "
            "source's."
        )

    # ------------------------------------------------------------ all of it

    def run(self) -> Figures:
        try:
            self.setup()
            self.exports()
            if self.a.big_rows:
                run, data = self.big_export()
            else:  # the downloads use a --rows run instead
                assert self.s3 is not None
                extract = self.s3.create_extract("s3 zip", ["events"], "jsonl", False)
                run = self.s3.wait(self.s3.start_run(extract))["id"]
                data = self.data_artifact(self.s3, run)
            self.downloads(run, data)
        finally:
            self.stop()
        return self.figures


def _vmhwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the compared export")
    parser.add_argument(
        "--big-rows", type=int, default=10_000_000, help="rows of the big export to S3 (0: skip)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs each way of the compared export")
    parser.add_argument("--download-repeats", type=int, default=5, help="downloads of the ZIP and the file")
    parser.add_argument("--workers", type=int, default=2, help="each service's --workers")
    parser.add_argument(
        "--no-moto-alone",
        dest="moto_alone",
        action="store_false",
        help="skip part a's upload of the local file straight to moto (what moto alone takes)",
    )
    parser.add_argument(
        "--no-unsigned",
        dest="unsigned",
        action="store_false",
        help="skip the third contender of part a (S3 with AWS_UNSIGNED_PAYLOAD=true)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/extracts-bench"), help="data and services")
    parser.add_argument("--seed", type=int, default=42, help="seed of the generated data")
    parser.add_argument("--markdown", type=Path, help="also write the results as Markdown to this file")
    parser.add_argument("--smoke", action="store_true", help="small and quick: 20,000 rows, 30,000 big")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.big_rows = min(args.rows, 20_000), min(args.big_rows, 30_000)
        args.repeats, args.download_repeats = 2, 1
    if shutil.which("curl") is None:
        parser.error("the download part needs curl")
    args.workdir = args.workdir.absolute()
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    load_start, started = load(), time.perf_counter()
    try:
        figures = StorageBench(args).run()
    except (BenchError, verify.Mismatch, subprocess.CalledProcessError, httpx.HTTPError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    text = figures.render("storage.py", argv, load_start, time.perf_counter() - started)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 1 if args.strict and figures.missed else 0


if __name__ == "__main__":
    sys.exit(main())
