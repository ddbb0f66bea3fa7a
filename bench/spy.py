"""Where an export's time goes: py-spy on the pool's processes during one run.

py-spy samples the forkserver and its children (the pool workers; the Manager
barely shows) with native frames, so time spent inside SQLite's C code shows up
by function. Sampling pauses the process, so the run is slower while profiled:
read the shares, not the seconds.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from service import Service, descendants

RATE = 47  # samples a second: low enough that native unwinding keeps up on 2 cores
# Frames of threads that wait (py-spy counts a thread blocked in a system call as active).
IDLE = (
    "acquire_lock",
    "Queue.get",
    "wait (",
    "_recv_bytes",
    "accept_connection",
    "accept4",
    "select (",
    "epoll_wait",
)


def forkserver_pid(server: int) -> int | None:
    for pid in descendants(server):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"forkserver" in f.read():
                return pid
    return None


def summarize(raw: Path, top: int = 15) -> str:
    """Self time by frame, and inclusive time by Python function, from py-spy's raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        frames = stack.split(";")[1:]  # the first frame names the process
        if not frames or any(idle in frame for frame in frames for idle in IDLE):
            continue  # a thread waiting, not working
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            if ".py:" in frame:
                inclusive[frame] += samples
    if not total:
        return "py-spy collected no samples."
    lines = [f"{total} busy samples of the pool's processes. Self time by frame:", ""]
    lines += [f"    {n / total:6.1%}  {frame[:110]}" for frame, n in own.most_common(top)]
    lines += ["", "Inclusive time by Python frame:", ""]
    lines += [
        f"    {n / total:6.1%}  {frame[:110]}"
        for frame, n in inclusive.most_common(top + 10)
        if "forkserver" not in frame and "process.py" not in frame and "spawn.py" not in frame
    ]
    return "\n".join(lines)


def profile_run(service: Service, extract: str, raw: Path) -> str:
    """Profile one run of ``extract``; a Markdown block summarising where the time went."""
    if shutil.which("py-spy") is None:
        return "py-spy is not installed (`pip install py-spy`): no profile."
    target = forkserver_pid(service.process.pid)
    if target is None:
        return "No forkserver process found under the service: no profile."
    spy = subprocess.Popen(
        [
            "py-spy",
            "record",
            "-p",
            str(target),
            "--subprocesses",
            "--native",
            "--format",
            "raw",
            "-r",
            str(RATE),
            "-o",
            str(raw),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    time.sleep(1.5)  # py-spy attaches
    started = time.perf_counter()
    run = service.start_run(extract)
    service.wait(run)
    seconds = time.perf_counter() - started
    spy.send_signal(signal.SIGINT)
    output = spy.communicate(timeout=60)[0].decode(errors="replace")
    service.delete_run(run)
    if not raw.exists():
        return f"py-spy wrote no profile: {output.strip()[-300:]}"
    summary = summarize(raw)
    return (
        f"Profile of one jsonl export with py-spy ({RATE} Hz, native frames; {seconds:.1f} s "
        f"wall while profiled):\n\n```\n{summary}\n```"
    )
