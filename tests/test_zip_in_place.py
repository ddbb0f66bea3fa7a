"""``extracts-app export -o``: the run's biggest file grown into the ZIP where it lies.

``zip_in_place`` inserts a block in front of the file (ext4 and XFS can; tmpfs
cannot, and then the caller writes the archive afresh) and appends the other
files and the central directory. The archive must read back like the
service's download: the same names in the same order, the same bytes, and
clean checks by zipfile and ``unzip -t``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
import zlib
from pathlib import Path

import pytest

from extracts.export import zip_in_place
from extracts.zipstream import ZipEntry, stored_around

WHEN = (2026, 11, 30, 23, 0, 0)
SHM = Path("/dev/shm")


def entry(folder: Path, name: str, data: bytes) -> ZipEntry:
    path = folder / name
    path.write_bytes(data)
    return ZipEntry(name, str(path), len(data), zlib.crc32(data), WHEN)


def inserts_blocks(folder: Path) -> bool:
    """Whether the file system under ``folder`` can insert a block (what the test relies on)."""
    probe = entry(folder, "probe", b"x" * 10)
    made = zip_in_place([probe])
    Path(probe.path).unlink()
    return made is not None


def test_the_biggest_file_becomes_the_archive(tmp_path: Path) -> None:
    if not inserts_blocks(tmp_path):
        pytest.skip(f"{tmp_path}'s file system cannot insert blocks")
    contents = {
        "describe.yaml": b"schemas: []\n" * 10,
        "orders.jsonl": os.urandom(300_000),  # the biggest: not first in the list
        "users.jsonl": os.urandom(70_000),
        "manifest.json": b'{"files": []}',
    }
    entries = [entry(tmp_path, name, data) for name, data in contents.items()]
    made = zip_in_place(entries)
    assert made == Path(entries[1].path)
    with zipfile.ZipFile(made) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == list(contents)  # the listing keeps the run's order
        assert {name: archive.read(name) for name in contents} == contents
        assert archive.getinfo("orders.jsonl").header_offset == 0
    if shutil.which("unzip"):
        checked = subprocess.run(["unzip", "-tq", str(made)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.skipif(not SHM.is_dir(), reason="no tmpfs at /dev/shm")
def test_a_file_system_that_cannot_insert_leaves_the_file_alone(tmp_path: Path) -> None:
    folder = SHM / tmp_path.name
    folder.mkdir()
    try:
        data = os.urandom(50_000)
        big = entry(folder, "events.jsonl", data)
        assert zip_in_place([big, entry(folder, "manifest.json", b"{}")]) is None
        assert Path(big.path).read_bytes() == data
    finally:
        shutil.rmtree(folder)


def test_a_file_over_4_gib_gets_zip64_fields_in_its_padded_header(tmp_path: Path) -> None:
    """Sparse: no 4 GiB is written; the CRC is never checked, only the layout is read."""
    if not inserts_blocks(tmp_path):
        pytest.skip(f"{tmp_path}'s file system cannot insert blocks")
    size = (4 << 30) + 123
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as out:
        out.truncate(size)
    entries = [
        ZipEntry("big.jsonl", str(path), size, 0, WHEN),
        entry(tmp_path, "manifest.json", b'{"n": 1}'),
    ]
    assert zip_in_place(entries) == path
    with zipfile.ZipFile(path) as archive:
        big = archive.getinfo("big.jsonl")
        assert (big.file_size, big.header_offset) == (size, 0)
        with archive.open(big) as member:  # the local header parses, the data starts after it
            assert member.read(1 << 16) == bytes(1 << 16)
        assert archive.read("manifest.json") == b'{"n": 1}'


def test_a_header_that_cannot_take_the_block_is_refused(tmp_path: Path) -> None:
    small = entry(tmp_path, "a.jsonl", b"{}")
    assert stored_around([small], 0, 20) is None  # shorter than the header itself
    assert stored_around([small], 0, 1 << 17) is None  # more than an extra field can pad
    header, others, tail = stored_around([small], 0, 4096)
    assert len(header) == 4096 and others == [] and b"PK\x05\x06" in tail
