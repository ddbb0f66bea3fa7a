"""extracts.zipstream: deterministic, resumable STORED archives and the deflated variant,
read through the local storage's held files.

Every archive is read back with zipfile and checked with ``unzip -t``; ranges
are compared against slices of the whole archive.
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import sparse_scratch
from isal import isal_zlib

from extracts.storage import FileChangedError
from extracts.storage import local as storage
from extracts.storage.local import LocalHeldFiles as HeldFiles
from extracts.zipstream import FileReader, StoredZip, ZipEntry, write_deflated

WHEN = (2024, 5, 17, 13, 45, 30)
_serial = itertools.count()
GIB = 1 << 30


def entry(tmp_path: Path, name: str, data: bytes, when: tuple = WHEN) -> ZipEntry:
    """Write ``data`` to a real file and describe it as the worker would."""
    path = tmp_path / f"src-{next(_serial)}"
    path.write_bytes(data)
    return ZipEntry(name, str(path), len(data), zlib.crc32(data), when)


def sample(tmp_path: Path) -> tuple[list[ZipEntry], dict[str, bytes]]:
    rng = random.Random(7)
    contents = {
        "empty.txt": b"",
        "notes.txt": b"hello, extracts\n",
        "rows.ndjson.gz": rng.randbytes(3000),
        "résumé-данные.yaml": "name: café\n".encode(),
    }
    return [entry(tmp_path, name, data) for name, data in contents.items()], contents


def hold(entries: list[ZipEntry]) -> HeldFiles:
    """The entries' files, held as a download holds them (links, if any, beside the files)."""
    links = Path(entries[0].path).parent / "links" if entries else Path("/nonexistent")
    return HeldFiles([(e.path, e.size) for e in entries], links)


def whole(archive: StoredZip, files: FileReader, **kwargs: int) -> bytes:
    return b"".join(archive.iter_bytes(files, **kwargs))


def unzip_test(path: Path) -> None:
    if shutil.which("unzip") is None:
        pytest.skip("unzip is not installed")
    done = subprocess.run(["unzip", "-tq", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No errors detected" in done.stdout


def read_back(data: bytes, contents: dict[str, bytes]) -> list[zipfile.ZipInfo]:
    """Check the archive with zipfile: intact, and every member byte-equal."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        assert zf.namelist() == list(contents)
        for name, expected in contents.items():
            assert zf.read(name) == expected, name
        return zf.infolist()


def entry_landmarks(full: bytes) -> dict[str, int]:
    """Offsets in and around every local header and file data, found by reading back."""
    points = {}
    with zipfile.ZipFile(io.BytesIO(full)) as zf:
        infos = zf.infolist()
    for info in infos:
        start = info.header_offset
        name_len, extra_len = struct.unpack_from("<HH", full, start + 26)
        data = start + 30 + name_len + extra_len
        name = info.filename
        points[f"{name}: local header"] = start
        points[f"{name}: inside local header"] = start + 13
        points[f"{name}: last byte of local header"] = data - 1
        points[f"{name}: data"] = data
        points[f"{name}: inside data"] = data + info.file_size // 2
        points[f"{name}: last data byte"] = data + max(info.file_size - 1, 0)
    return points


def tail_landmarks(tail: bytes, base: int = 0) -> dict[str, int]:
    """Offsets in and around the central directory and the end records.

    ``tail`` is the archive from offset ``base`` to its end (all of it by
    default); the offsets returned count from the archive's start.
    """
    size = base + len(tail)
    end = size - 22

    def unpack(fmt: str, offset: int) -> tuple[int, ...]:
        return struct.unpack_from(fmt, tail, offset - base)

    assert unpack("<4s", end) == (b"PK\x05\x06",)
    cd_size, cd_offset = unpack("<LL", end + 12)
    points = {}
    if unpack("<4s", end - 20) == (b"PK\x06\x07",):
        (end64,) = unpack("<Q", end - 12)
        assert unpack("<4s", end64) == (b"PK\x06\x06",)
        cd_size, cd_offset = unpack("<QQ", end64 + 40)
        points |= {
            "ZIP64 end record": end64,
            "inside ZIP64 end record": end64 + 30,
            "ZIP64 locator": end - 20,
            "inside ZIP64 locator": end - 9,
        }
    return points | {
        "last byte before central directory": cd_offset - 1,
        "central directory": cd_offset,
        "inside first central record": cd_offset + 17,
        "inside central directory": cd_offset + cd_size // 2,
        "last byte of central directory": cd_offset + cd_size - 1,
        "end record": end,
        "inside end record": end + 11,
        "last byte": size - 1,
        "end": size,
    }


def zipfile_writes(entries: list[ZipEntry]) -> bytes:
    """The same archive written by zipfile itself, to a seekable buffer."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for e in entries:
            info = zipfile.ZipInfo(e.name, e.date_time)
            info.external_attr = 0o100644 << 16
            zf.writestr(info, Path(e.path).read_bytes())
    return buf.getvalue()


class PipeSink:
    """A non-seekable sink with only write() and flush(), like a response body."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.data = bytearray()
        self.fail_after = fail_after
        self.failures = 0

    def write(self, data: bytes) -> None:
        # Once broken, stays broken, like a closed connection.
        if self.failures or (self.fail_after is not None and len(self.data) + len(data) > self.fail_after):
            self.failures += 1
            raise BrokenPipeError("client went away")
        self.data += data

    def flush(self) -> None:
        pass


# -- the stored archive ------------------------------------------------------


def test_round_trip_with_zipfile_and_unzip(tmp_path: Path) -> None:
    entries, contents = sample(tmp_path)
    archive = StoredZip(entries)
    files = hold(entries)
    full = whole(archive, files)
    assert len(full) == archive.size

    infos = read_back(full, contents)
    for info in infos:
        assert info.compress_type == zipfile.ZIP_STORED
        assert info.date_time == WHEN
        assert info.external_attr >> 16 == stat.S_IFREG | 0o644
        assert info.create_system == 3
        assert not info.flag_bits & 0x08  # sizes in the local header, no data descriptor
        assert bool(info.flag_bits & 0x800) == (not info.filename.isascii())
    out = tmp_path / "out.zip"
    out.write_bytes(full)
    unzip_test(out)


def test_bytes_equal_zipfiles_own_output(tmp_path: Path) -> None:
    entries, _ = sample(tmp_path)
    assert whole(StoredZip(entries), hold(entries)) == zipfile_writes(entries)


def test_empty_archive() -> None:
    archive = StoredZip([])
    assert whole(archive, hold([])) == zipfile_writes([]) == b"PK\x05\x06" + bytes(18)
    assert archive.size == 22


def test_odd_seconds_round_down_to_dos_time(tmp_path: Path) -> None:
    entries = [entry(tmp_path, "a.txt", b"a", when=(2031, 12, 31, 23, 59, 59))]
    archive = StoredZip(entries)
    with zipfile.ZipFile(io.BytesIO(whole(archive, hold(entries)))) as zf:
        assert zf.getinfo("a.txt").date_time == (2031, 12, 31, 23, 59, 58)


@pytest.mark.parametrize("chunk_size", [1, 7, 100, 4096, 1 << 20])
def test_chunks_are_full_except_the_last(tmp_path: Path, chunk_size: int) -> None:
    entries, _ = sample(tmp_path)
    archive = StoredZip(entries)
    files = hold(entries)
    chunks = list(archive.iter_bytes(files, chunk_size=chunk_size))
    assert b"".join(chunks) == whole(archive, files)
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= chunk_size
    assert all(type(c) is bytes for c in chunks)


def test_same_entries_give_same_bytes_and_etag(tmp_path: Path) -> None:
    entries, _ = sample(tmp_path)
    first, second = StoredZip(entries), StoredZip(list(entries))
    assert whole(first, hold(entries)) == whole(second, hold(entries))
    assert first.etag() == second.etag()
    assert first.etag().startswith('"') and first.etag().endswith('"')
    assert len(first.etag()) == 42


def test_etag_follows_the_bytes_not_the_paths(tmp_path: Path) -> None:
    entries, _ = sample(tmp_path)
    base = StoredZip(entries)
    first = entries[1]
    moved = tmp_path / "moved"
    shutil.copy(first.path, moved)
    variants = {
        "crc": replace(first, crc32=first.crc32 ^ 1),
        "name": replace(first, name="other.txt"),
        "size": replace(first, size=first.size + 1),
        "time": replace(first, date_time=(2024, 5, 17, 13, 45, 32)),
    }
    for what, changed in variants.items():
        assert StoredZip([entries[0], changed, *entries[2:]]).etag() != base.etag(), what
    same_bytes = replace(first, path=str(moved))
    assert StoredZip([entries[0], same_bytes, *entries[2:]]).etag() == base.etag()
    assert StoredZip(entries[::-1]).etag() != base.etag()


def test_resume_from_every_offset(tmp_path: Path) -> None:
    entries, _ = sample(tmp_path)
    archive = StoredZip(entries)
    files = hold(entries)
    full = whole(archive, files)
    for n in range(archive.size + 1):
        assert full[:n] + whole(archive, files, start=n, chunk_size=512) == full, n


def test_resume_at_every_landmark(tmp_path: Path) -> None:
    # File data several chunks long, so a resume lands mid-chunk of a long read.
    rng = random.Random(11)
    contents = {"a.bin": rng.randbytes(300_000), "b.txt": b"", "c.bin": rng.randbytes(1_000_003)}
    entries = [entry(tmp_path, name, data) for name, data in contents.items()]
    archive = StoredZip(entries)
    files = hold(entries)
    full = whole(archive, files)
    read_back(full, contents)
    points = entry_landmarks(full) | tail_landmarks(full)
    for where, n in points.items():
        for cut in (n - 1, n, n + 1):
            if 0 <= cut <= archive.size:
                resumed = whole(archive, files, start=cut, chunk_size=1 << 16)
                assert full[:cut] + resumed == full, f"{where} ({cut})"


@pytest.mark.slow
def test_any_slice_equals_the_same_slice_of_the_whole(tmp_path: Path) -> None:
    entries, _ = sample(tmp_path)
    archive = StoredZip(entries)
    files = hold(entries)
    full = whole(archive, files)
    points = sorted(set(entry_landmarks(full).values()) | set(tail_landmarks(full).values()))
    rng = random.Random(3)
    pairs = [(a, b) for a in points for b in points if a <= b]
    pairs += [tuple(sorted(rng.sample(range(archive.size + 1), 2))) for _ in range(2000)]
    for a, b in pairs:
        assert whole(archive, files, start=a, end=b, chunk_size=rng.choice([1, 64, 1000])) == full[a:b]


def test_invalid_ranges_are_refused_before_streaming(tmp_path: Path) -> None:
    entries, _ = sample(tmp_path)
    archive = StoredZip(entries)
    files = hold(entries)
    for start, end in [(-1, None), (5, 4), (0, archive.size + 1), (archive.size + 1, None)]:
        with pytest.raises(ValueError, match="outside the archive"):
            archive.iter_bytes(files, start, end)
    with pytest.raises(ValueError, match="chunk_size"):
        archive.iter_bytes(files, chunk_size=0)
    assert list(archive.iter_bytes(files, archive.size)) == []
    assert list(archive.iter_bytes(files, 10, 10)) == []


@pytest.mark.parametrize(
    ("name", "when", "message"),
    [
        ("", WHEN, "plain, non-empty"),
        ("dir/file.txt", WHEN, "plain, non-empty"),
        ("back\\slash", WHEN, "plain, non-empty"),
        ("nul\0byte", WHEN, "plain, non-empty"),
        ("old.txt", (1979, 12, 31, 0, 0, 0), "1980 to 2107"),
        ("bad.txt", (2024, 13, 1, 0, 0, 0), "1980 to 2107"),
    ],
)
def test_invalid_entries_are_refused(tmp_path: Path, name: str, when: tuple, message: str) -> None:
    bad = entry(tmp_path, name, b"x", when)
    with pytest.raises(ValueError, match=message):
        StoredZip([bad])
    with pytest.raises(ValueError, match=message):
        write_deflated([bad], hold([bad]), PipeSink())


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    entries = [entry(tmp_path, "same.txt", b"1"), entry(tmp_path, "same.txt", b"2")]
    with pytest.raises(ValueError, match="appears twice"):
        StoredZip(entries)


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def descriptor_budget_spent() -> Iterator[None]:
    """As if other downloads held every descriptor the budget allows: files are held by links."""
    taken = storage._BUDGET.take(1 << 30)
    try:
        yield
    finally:
        storage._BUDGET.give(taken)


@pytest.mark.parametrize("held_by", ["descriptors", "links"])
def test_held_files_outlive_their_names(tmp_path: Path, held_by: str) -> None:
    entries, contents = sample(tmp_path)
    archive = StoredZip(entries)
    expected = whole(archive, hold(entries))
    fds = open_fds()
    with descriptor_budget_spent() if held_by == "links" else contextlib.nullcontext():
        files = hold(entries)
    links = list((tmp_path / "links").glob("*/*"))
    assert len(links) == (len(entries) if held_by == "links" else 0)
    chunks = archive.iter_bytes(files, chunk_size=64)
    first = next(chunks)
    for e in entries:  # what deleting the run or the retention sweep does
        os.remove(e.path)
    assert first + b"".join(chunks) == expected
    sink = PipeSink()
    write_deflated(entries, files, sink)
    read_back(bytes(sink.data), contents)
    files.close()
    files.close()
    assert open_fds() == fds
    assert list((tmp_path / "links").glob("*/*")) == []
    with pytest.raises(ValueError, match="released"):
        files.read(0, 0, 1)


def test_held_files_are_released_when_collected(tmp_path: Path) -> None:
    entries, _ = sample(tmp_path)
    gc.collect()  # what earlier tests of this process left to collect closes its descriptors now
    fds = open_fds()
    with descriptor_budget_spent():
        linked = hold(entries)
    held = hold(entries)
    assert len(open_fds()) == len(fds) + len(entries)
    assert len(list((tmp_path / "links").glob("*/*"))) == len(entries)
    del linked, held
    gc.collect()
    assert open_fds() == fds
    assert list((tmp_path / "links").glob("*/*")) == []


def test_files_that_cannot_be_linked_are_read_by_name(tmp_path: Path) -> None:
    # Storage read-only or full: no link can be made there (here: its directory cannot be).
    entries, contents = sample(tmp_path)
    (tmp_path / "a-file").write_bytes(b"")
    unlinkable = [(e.path, e.size) for e in entries], tmp_path / "a-file" / "links"
    fds = open_fds()
    with descriptor_budget_spent():
        files = HeldFiles(*unlinkable)
    read_back(whole(StoredZip(entries), files), contents)
    files.close()
    assert open_fds() == fds
    os.remove(entries[1].path)
    with descriptor_budget_spent(), pytest.raises(FileNotFoundError) as missing:
        HeldFiles(*unlinkable)
    assert missing.value.filename == entries[1].path
    assert open_fds() == fds


def test_holding_refuses_a_changed_or_missing_file(tmp_path: Path) -> None:
    entries, _ = sample(tmp_path)
    fds = open_fds()
    with open(entries[2].path, "r+b") as f:
        f.truncate(entries[2].size - 1)
    for spent in (False, True):
        with descriptor_budget_spent() if spent else contextlib.nullcontext():
            with pytest.raises(FileChangedError, match="recorded as 3000") as changed:
                hold(entries)
            assert changed.value.path == entries[2].path
            os.mkdir(tmp_path / "directory")
            with pytest.raises(FileChangedError, match="not a regular file"):
                hold([replace(entries[0], path=str(tmp_path / "directory"))])
            os.rmdir(tmp_path / "directory")
    os.remove(entries[0].path)
    for spent in (False, True):
        with descriptor_budget_spent() if spent else contextlib.nullcontext():
            with pytest.raises(FileNotFoundError) as missing:
                hold([entries[1], entries[0]])  # the first one held, then released
            assert missing.value.filename == entries[0].path
    assert open_fds() == fds  # nothing stays held
    assert list((tmp_path / "links").glob("*/*")) == []


def test_file_that_shrinks_mid_read_raises(tmp_path: Path) -> None:
    big = entry(tmp_path, "big.bin", random.Random(5).randbytes(100_000))
    archive = StoredZip([big])
    files = hold([big])
    chunks = archive.iter_bytes(files, chunk_size=10_000)
    next(chunks)
    with open(big.path, "r+b") as f:
        f.truncate(20_000)
    with pytest.raises(FileChangedError, match="shrank while it was being read"):
        list(chunks)


def test_streaming_memory_stays_flat(tmp_path: Path) -> None:
    rng = random.Random(1)
    entries = [entry(tmp_path, f"part-{i}.bin", rng.randbytes(16 << 20)) for i in range(3)]
    archive = StoredZip(entries)
    files = hold(entries)
    tracemalloc.start()
    try:
        total = sum(len(chunk) for chunk in archive.iter_bytes(files, start=12_345))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == archive.size - 12_345
    assert peak < 4 << 20, peak  # a few 1 MiB chunks for a 48 MiB archive


# -- ZIP64 -------------------------------------------------------------------


@pytest.mark.slow
def test_zip64_for_more_than_65535_entries(tmp_path: Path) -> None:
    count = 65_536
    shared = entry(tmp_path, "x", b"abc")  # one small file behind every entry keeps this fast
    entries = [ZipEntry(f"f{i:05d}.txt", shared.path, shared.size, shared.crc32, WHEN) for i in range(count)]
    archive = StoredZip(entries)
    files = OneFile(shared.path)
    full = whole(archive, files)
    assert len(full) == archive.size

    end = len(full) - 22
    entries_here, entries_total = struct.unpack_from("<HH", full, end + 8)
    assert entries_here == entries_total == 0xFFFF
    (end64,) = struct.unpack_from("<Q", full, end - 12)
    assert struct.unpack_from("<QQ", full, end64 + 24) == (count, count)

    out = tmp_path / "many.zip"
    out.write_bytes(full)
    with zipfile.ZipFile(out) as zf:
        infos = zf.infolist()
        assert len(infos) == count
        for i in (0, 1, 65_534, 65_535):
            assert zf.read(f"f{i:05d}.txt") == b"abc"
    unzip_test(out)  # tests every member

    for where, n in tail_landmarks(full).items():
        assert whole(archive, files, start=n) == full[n:], where
    last = infos[-1].header_offset
    for n in (last + 13, last + 30 + len("f65535.txt")):  # inside its local header, its data
        assert whole(archive, files, start=n) == full[n:], n


class OneFile:
    """The bytes of every entry from one file: an archive of many entries, quickly."""

    def __init__(self, path: str) -> None:
        self.data = Path(path).read_bytes()

    def read(self, index: int, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]


def crc32_of_sparse(size: int, written: dict[int, bytes]) -> int:
    """CRC-32 of a file of ``size`` zero bytes with ``written`` laid over it.

    ISA-L's CRC-32 (the same function as zlib's) goes through the 4 GiB in 0.04 s of CPU
    here, zlib's in 0.8 s; zipfile checks the value with zlib's as it reads the member.
    """
    zeros = bytes(64 << 20)
    crc = pos = 0
    for offset, data in sorted([*written.items(), (size, b"")]):
        while pos < offset:
            n = min(len(zeros), offset - pos)
            crc = isal_zlib.crc32(zeros if n == len(zeros) else zeros[:n], crc)
            pos += n
        crc = isal_zlib.crc32(data, crc)
        pos += len(data)
    return crc


FOUR_GIB = 4 * GIB
BIG_SIZE = FOUR_GIB + 4096
BIG_MARKS = {
    0: b"first bytes",
    2 * GIB: b"halfway",
    FOUR_GIB - 12: b"straddles the 4 GiB line",
    BIG_SIZE - 9: b"last byte",
}
SMALL = b"the entry after the big one\n"
BigArchive = tuple[StoredZip, HeldFiles, Path]


@pytest.fixture(scope="module")
def big_archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigArchive]:
    """A sparse 4 GiB + 4 KiB file and a small one after it, streamed to a sparse archive."""
    with sparse_scratch(tmp_path_factory.mktemp("zip64")) as tmp:
        big = tmp / "big.bin"
        with open(big, "wb") as f:
            f.truncate(BIG_SIZE)
            for offset, data in BIG_MARKS.items():
                f.seek(offset)
                f.write(data)
        small = tmp / "small.txt"
        small.write_bytes(SMALL)
        entries = [
            ZipEntry("big.bin", str(big), BIG_SIZE, crc32_of_sparse(BIG_SIZE, BIG_MARKS), WHEN),
            ZipEntry("small.txt", str(small), len(SMALL), zlib.crc32(SMALL), WHEN),
        ]
        archive = StoredZip(entries)
        files = hold(entries)
        out = tmp / "big.zip"
        chunk_size = 8 << 20
        zeros = bytes(chunk_size)
        with open(out, "wb") as f:
            for chunk in archive.iter_bytes(files, chunk_size=chunk_size):
                if len(chunk) == chunk_size and chunk == zeros:
                    f.seek(chunk_size, os.SEEK_CUR)  # leave a hole: the archive stays sparse too
                else:
                    f.write(chunk)
            f.truncate()
        yield archive, files, out
        files.close()


@pytest.mark.slow
def test_zip64_entry_over_4_gib_reads_back_with_zipfile(big_archive: BigArchive) -> None:
    archive, _, out = big_archive
    assert out.stat().st_size == archive.size
    with open(out, "rb") as f:
        local = f.read(30)
    assert struct.unpack_from("<LL", local, 18) == (0xFFFF_FFFF, 0xFFFF_FFFF)  # sizes in ZIP64 extra

    with zipfile.ZipFile(out) as zf:
        big, small = zf.infolist()
        assert (big.file_size, big.compress_size, big.header_offset) == (BIG_SIZE, BIG_SIZE, 0)
        assert small.header_offset > FOUR_GIB
        assert zf.read("small.txt") == SMALL  # past 4 GiB, through the ZIP64 records
        with zf.open("big.bin") as member:
            # zipfile 3.11 seeks by reading forward: one pass over the member,
            # which ends at EOF where zipfile checks the CRC.
            for offset, data in sorted(BIG_MARKS.items()):
                member.seek(offset)
                assert member.read(len(data)) == data, offset
            assert member.read() == b""
    # The member's bytes are where its local header says they start.
    with open(out, "rb") as f:
        name_length, extra_length = struct.unpack_from("<HH", f.read(30), 26)
        start = 30 + name_length + extra_length
        for offset, data in BIG_MARKS.items():
            f.seek(start + offset)
            assert f.read(len(data)) == data, offset


@pytest.mark.slow
def test_zip64_entry_over_4_gib_passes_unzip(big_archive: BigArchive) -> None:
    """Info-ZIP reads every ZIP64 record: the end records, the big entry's 64-bit sizes, and the
    entry whose local header is past 4 GiB, which it tests. (Its test of the big entry's CRC
    took 40 s, reading 4 GiB 32 KiB at a time; zipfile checks that CRC in the test above.)"""
    archive, _, out = big_archive
    if shutil.which("unzip") is None:
        pytest.skip("unzip is not installed")
    done = subprocess.run(["unzip", "-tq", str(out), "small.txt"], capture_output=True, text=True)
    assert done.returncode == 0 and "No errors detected" in done.stdout, done.stdout + done.stderr
    listing = subprocess.run(["unzip", "-Z", "-v", str(out)], capture_output=True, text=True, check=True)
    big, small = listing.stdout.split("Central directory entry #")[1:]
    assert f"Zip archive file size:                {archive.size} " in listing.stdout
    for field in ("compressed size", "uncompressed size"):
        assert re.search(rf"  {field}: +{BIG_SIZE} bytes", big), big
    with zipfile.ZipFile(out) as zf:  # the CRC zipfile checks over the whole member
        crc, small_at = zf.getinfo("big.bin").CRC, zf.getinfo("small.txt").header_offset
    assert f"32-bit CRC value (hex):                         {crc:08x}" in big
    assert re.search(rf"offset of local header from start of archive: +{small_at}\n", small), small


@pytest.mark.slow
def test_zip64_ranges_past_4_gib(big_archive: BigArchive) -> None:
    archive, files, out = big_archive
    with zipfile.ZipFile(out) as zf:
        small_at = zf.getinfo("small.txt").header_offset
    fd = os.open(out, os.O_RDONLY)
    try:
        points = [FOUR_GIB - 100, FOUR_GIB, small_at - 1, small_at, small_at + 40]
        tail_at = archive.size - 4096
        points += tail_landmarks(os.pread(fd, 4096, tail_at), base=tail_at).values()
        for start in points:
            expected = os.pread(fd, archive.size - start, start)
            assert whole(archive, files, start=start) == expected, start
        a, b = FOUR_GIB - 12, FOUR_GIB + 12
        assert whole(archive, files, start=a + 59, end=b + 59) == os.pread(fd, b - a, a + 59)
    finally:
        os.close(fd)


# -- the deflated variant ----------------------------------------------------


def test_write_deflated_round_trip(tmp_path: Path) -> None:
    entries, contents = sample(tmp_path)
    sink = PipeSink()
    write_deflated(entries, hold(entries), sink)
    data = bytes(sink.data)

    infos = read_back(data, contents)
    for info in infos:
        assert info.compress_type == zipfile.ZIP_DEFLATED
        assert info.date_time == WHEN
        assert info.external_attr >> 16 == stat.S_IFREG | 0o644
        assert bool(info.flag_bits & 0x800) == (not info.filename.isascii())
    out = tmp_path / "deflated.zip"
    out.write_bytes(data)
    unzip_test(out)


def test_write_deflated_leaves_no_end_record_when_a_file_changed(tmp_path: Path) -> None:
    entries, _ = sample(tmp_path)
    files = hold(entries)
    with open(entries[2].path, "r+b") as f:
        f.truncate(100)
    sink = PipeSink()
    with pytest.raises(FileChangedError, match="shrank while it was being read"):
        write_deflated(entries, files, sink)
    gc.collect()  # zipfile's __del__ would write the end records if it could
    assert b"PK\x05\x06" not in sink.data
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(bytes(sink.data)))


def test_write_deflated_stops_when_the_sink_fails(tmp_path: Path) -> None:
    # Incompressible data, so the sink fails in the middle of an entry.
    entries = [entry(tmp_path, "noise.bin", random.Random(2).randbytes(3 << 20))]
    sink = PipeSink(fail_after=100_000)
    with pytest.raises(BrokenPipeError):
        write_deflated(entries, hold(entries), sink)
    gc.collect()  # no "Exception ignored in __del__": filterwarnings=error would fail the test
    assert sink.failures == 1  # nothing was written after the sink failed
