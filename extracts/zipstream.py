"""ZIP archives of a run's artifacts, streamed in constant memory (SPEC "Downloads").

The default download is a STORED archive whose every byte is fixed before any
file is read, because the worker recorded each artifact's size and CRC-32:

    [local header 0][data 0] [local header 1][data 1] ... [central directory]
    [ZIP64 end record][ZIP64 locator]   (only when needed)   [end record]

``StoredZip`` computes that layout once (headers only, never file data), so the
HTTP layer knows the archive's length and a strong ETag up front, and
``iter_bytes(files, start, end)`` serves any byte range by finding where
``start`` falls and reading only what the range covers: an interrupted download
resumes without regenerating the prefix.

``write_deflated`` is the ``?compression=deflate`` variant: a plain
``zipfile.ZipFile`` written into a non-seekable sink, of unknown length.

Both read the files through the storage's ``HeldFiles``, which holds every
file before the first byte is sent: deleting the run or the retention sweep
meanwhile unlinks names, not the bytes a download is sending.

Record layouts follow PKWARE's APPNOTE 6.3.x (4.3.7 local header, 4.3.12
central directory, 4.3.14-4.3.16 end records, 4.5.3 ZIP64 extra field). A
32-bit field (16-bit for entry counts) whose value does not fit below its
all-ones sentinel is written as the sentinel, with the real value in a ZIP64
record.
"""

from __future__ import annotations

import hashlib
import stat
import struct
import zipfile
from array import array
from bisect import bisect_right
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from extracts.storage import FileChangedError

__all__ = ["StoredZip", "ZipEntry", "stored_around", "write_deflated"]

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF

_VERSION = 20  # 2.0: stored entries, plain headers
_VERSION_ZIP64 = 45  # 4.5: ZIP64 records (APPNOTE 4.4.3.2)
_UNIX = 3  # "version made by" host system; makes unzip honour the mode bits below
_EXTERNAL_ATTR = (stat.S_IFREG | 0o644) << 16  # -rw-r--r-- regular file
_UTF8_NAME = 0x0800  # general purpose flag bit 11: the name is UTF-8

_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # APPNOTE 4.3.12, before name and extra
_END64 = struct.Struct("<4sQ2H2L4Q")  # 4.3.14
_LOCATOR64 = struct.Struct("<4sLQL")  # 4.3.15
_END = struct.Struct("<4s4H2LH")  # 4.3.16

# Deflate can grow incompressible data slightly and a streamed entry's sizes
# are only known at the end: go ZIP64 early, as zipfile itself does.
_DEFLATE_ZIP64_FROM = 1 << 31
_READ_SIZE = 1 << 20
# The extra field that pads a local header (``stored_around``): the ID Android's
# zipalign gives its alignment padding; readers skip extra fields they do not know.
_PADDING_ID = 0xD935
_EXTRA_HEADER = struct.Struct("<HH")


@dataclass(frozen=True)
class ZipEntry:
    """One file of the archive: its name inside it, where it is, and what it holds."""

    name: str  # name inside the archive (already safe, no directories)
    path: str  # file on disk
    size: int
    crc32: int
    date_time: tuple[int, int, int, int, int, int]  # UTC; DOS time keeps even seconds


class FileReader(Protocol):
    """Where the archive's file bytes come from (``storage.HeldFiles``), one file per entry, in order."""

    def read(self, index: int, offset: int, size: int, /) -> bytes: ...


class StoredZip:
    """The layout of a STORED archive of ``entries``, streamable from any offset."""

    def __init__(self, entries: Sequence[ZipEntry]) -> None:
        self._entries = tuple(entries)
        _check_entries(self._entries)
        self._offsets = array("Q")  # where each local header starts
        self._headers: list[bytes] = []
        central: list[bytes] = []
        digest = hashlib.sha256()
        offset = 0
        for entry in self._entries:
            info = _stored_info(entry)
            header = _local_header(info)
            self._offsets.append(offset)
            self._headers.append(header)
            central.append(_central_record(info, offset))
            digest.update(header)
            offset += len(header) + entry.size
        self._cd_offset = offset
        directory = b"".join(central)
        self._tail = directory + _end_records(len(self._entries), offset, len(directory))
        digest.update(self._tail)
        # Every byte that is not file data is hashed; the file data is pinned by
        # the sizes and CRCs in those bytes.
        self._etag = f'"{digest.hexdigest()[:40]}"'
        self.size: int = offset + len(self._tail)

    def etag(self) -> str:
        """A strong ETag (quoted) that changes whenever any byte of the archive would."""
        return self._etag

    def iter_bytes(
        self, files: FileReader, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Generator[bytes, None, None]:
        """Yield the archive's bytes [start, end) in chunks of exactly ``chunk_size``
        (the last may be shorter), reading from ``files`` only what the range covers.

        Arguments are checked now, not at the first ``next()``. Raises
        FileChangedError when a file turns out shorter than recorded.
        """
        if end is None:
            end = self.size
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"Range [{start}, {end}) is outside the archive's {self.size} bytes.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}.")
        return self._iter(files, start, end, chunk_size)

    def _iter(self, files: FileReader, start: int, end: int, chunk_size: int) -> Generator[bytes, None, None]:
        buf = bytearray()
        pos = start
        index = bisect_right(self._offsets, pos) - 1
        while pos < min(end, self._cd_offset):
            entry, header = self._entries[index], self._headers[index]
            offset = self._offsets[index]
            data_offset = offset + len(header)
            if pos < data_offset:
                stop = min(end, data_offset)
                yield from _fill(buf, header[pos - offset : stop - offset], chunk_size)
                pos = stop
            stop = min(end, data_offset + entry.size)
            if pos < stop:
                yield from _read(
                    files.read, index, entry, pos - data_offset, stop - data_offset, buf, chunk_size
                )
                pos = stop
            index += 1
        if pos < end:
            tail = memoryview(self._tail)[pos - self._cd_offset : end - self._cd_offset]
            yield from _fill(buf, tail, chunk_size)
        if buf:
            yield bytes(buf)


def stored_around(
    entries: Sequence[ZipEntry], first: int, header_size: int
) -> tuple[bytes, list[tuple[int, bytes]], bytes] | None:
    """A STORED archive of ``entries`` that begins with entry ``first``'s data file itself.

    For ``extracts-app export -o``: room for ``header_size`` bytes is made in
    front of that file (a file system can insert whole blocks), so the biggest
    file becomes the archive without being copied. Returns that entry's local
    header, padded to exactly ``header_size`` bytes by an extra field; the local
    headers of the other entries, in the order they follow the first's data
    (``(index, header)``); and the tail: the central directory, in the order of
    ``entries`` (what a listing shows), and the end records. None when the
    header cannot take that size.
    """
    entries = tuple(entries)
    _check_entries(entries)
    infos = [_stored_info(entry) for entry in entries]
    headers = [_local_header(info) for info in infos]
    padding = header_size - len(headers[first]) - _EXTRA_HEADER.size
    if not 0 <= padding <= _U16 - 20:  # 20: the ZIP64 extra that may share the field
        return None
    infos[first].extra = _EXTRA_HEADER.pack(_PADDING_ID, padding) + bytes(padding)
    headers[first] = _local_header(infos[first])
    offsets = {first: 0}
    offset = header_size + entries[first].size
    others = [index for index in range(len(entries)) if index != first]
    for index in others:
        offsets[index] = offset
        offset += len(headers[index]) + entries[index].size
    directory = b"".join(_central_record(info, offsets[index]) for index, info in enumerate(infos))
    tail = directory + _end_records(len(entries), offset, len(directory))
    return headers[first], [(index, headers[index]) for index in others], tail


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...
    def flush(self) -> object: ...


def write_deflated(entries: Sequence[ZipEntry], files: FileReader, sink: _Sink) -> None:
    """Write a deflated archive of ``entries``, read from ``files``, into ``sink``
    (needs write() and flush()).

    Entries carry data descriptors, since the sink cannot seek. If anything
    fails, the end records are never written, so a broken stream cannot pass
    for a complete archive. Raises FileChangedError like ``StoredZip``.
    """
    entries = tuple(entries)
    _check_entries(entries)
    out = _CutOffWriter(sink)
    archive = zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED)
    try:
        for index, entry in enumerate(entries):
            info = _zipinfo(entry)
            info.compress_type = zipfile.ZIP_DEFLATED
            force_zip64 = entry.size >= _DEFLATE_ZIP64_FROM
            with archive.open(info, "w", force_zip64=force_zip64) as dst:
                position = 0
                while position < entry.size:
                    data = files.read(index, position, min(_READ_SIZE, entry.size - position))
                    if not data:
                        raise _shrank(entry)
                    dst.write(data)
                    position += len(data)
    except BaseException:
        out.cut_off()
        archive.close()  # writes nothing now; releases zipfile's state
        raise
    archive.close()


class _CutOffWriter:
    """Passes writes to a sink until cut off, then drops them.

    ZipFile writes its end records when closed, even after an error (its
    ``__exit__`` and ``__del__`` both close): cutting off first keeps them out.
    Having no ``tell()`` makes zipfile treat the sink as unseekable.
    """

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink
        self._cut = False

    def cut_off(self) -> None:
        self._cut = True

    def write(self, data: bytes) -> int:
        if not self._cut:
            try:
                self._sink.write(data)
            except BaseException:
                self._cut = True
                raise
        return len(data)  # zipfile counts offsets from this; sinks may return None

    def flush(self) -> None:
        if not self._cut:
            self._sink.flush()


def _check_entries(entries: Sequence[ZipEntry]) -> None:
    seen: set[str] = set()
    for entry in entries:
        name = entry.name
        if not name or "\0" in name or "/" in name or "\\" in name:
            raise ValueError(f"Entry name {name!r} must be a plain, non-empty file name.")
        if len(name.encode("utf-8")) > _U16:
            raise ValueError(f"Entry name {name[:40]!r}... is longer than 65,535 bytes.")
        if name in seen:
            raise ValueError(f"Entry name {name!r} appears twice; names must be unique.")
        seen.add(name)
        if entry.size < 0 or not 0 <= entry.crc32 <= _U32:
            raise ValueError(f"Entry {name!r} has an invalid size or CRC-32.")
        year, month, day, hour, minute, second = entry.date_time
        if not (
            1980 <= year <= 2107
            and 1 <= month <= 12
            and 1 <= day <= 31
            and 0 <= hour <= 23
            and 0 <= minute <= 59
            and 0 <= second <= 59
        ):
            raise ValueError(
                f"Entry {name!r} has date_time {entry.date_time}; ZIP can only store "
                "valid times from 1980 to 2107."
            )


def _shrank(entry: ZipEntry) -> FileChangedError:
    return FileChangedError(
        entry.path, f"{entry.path} shrank while it was being read: expected {entry.size} bytes."
    )


def _zipinfo(entry: ZipEntry) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(entry.name, date_time=entry.date_time)
    info.create_system = _UNIX  # ZipInfo picks the running OS; pin it for determinism
    info.external_attr = _EXTERNAL_ATTR
    return info


def _stored_info(entry: ZipEntry) -> zipfile.ZipInfo:
    """The entry as a STORED member whose CRC and sizes are known before its data."""
    info = _zipinfo(entry)
    info.CRC = entry.crc32
    info.file_size = info.compress_size = entry.size
    return info


def _local_header(info: zipfile.ZipInfo) -> bytes:
    # The sizes are known, so the local header carries them and no data
    # descriptor follows; ZIP64 there requires both sizes (APPNOTE 4.5.3).
    return info.FileHeader(zip64=info.file_size >= _U32)


def _central_record(info: zipfile.ZipInfo, offset: int) -> bytes:
    """The central directory record of a STORED entry whose local header is at ``offset``."""
    # The ZIP64 extra holds exactly the fields that overflowed, in this order
    # (APPNOTE 4.5.3).
    zip64: list[int] = []
    size = info.file_size
    if size >= _U32:
        zip64 += [size, size]  # uncompressed, compressed
        size = _U32
    if offset >= _U32:
        zip64.append(offset)
        offset = _U32
    extra = struct.pack(f"<HH{len(zip64)}Q", 1, 8 * len(zip64), *zip64) if zip64 else b""
    version = _VERSION_ZIP64 if zip64 else _VERSION
    name, flags = _encode_name(info.filename)
    year, month, day, hour, minute, second = info.date_time
    dos_date = (year - 1980) << 9 | month << 5 | day
    dos_time = hour << 11 | minute << 5 | second // 2
    record = _CENTRAL.pack(
        b"PK\x01\x02",
        version,  # version made by, then its host system
        info.create_system,
        version,  # version needed to extract
        0,
        flags,
        zipfile.ZIP_STORED,
        dos_time,
        dos_date,
        info.CRC,
        size,  # compressed
        size,  # uncompressed
        len(name),
        len(extra),
        0,  # comment length
        0,  # disk number start
        0,  # internal attributes
        info.external_attr,
        offset,
    )
    return record + name + extra


def _end_records(count: int, cd_offset: int, cd_size: int) -> bytes:
    """The end of central directory record, preceded by the ZIP64 ones when needed."""
    zip64 = b""
    if count >= _U16 or cd_offset >= _U32 or cd_size >= _U32:
        zip64 = _END64.pack(
            b"PK\x06\x06",
            _END64.size - 12,  # size of the rest of this record
            _VERSION_ZIP64,  # version made by (zipfile writes the same)
            _VERSION_ZIP64,
            0,  # this disk
            0,  # disk where the central directory starts
            count,  # entries on this disk
            count,
            cd_size,
            cd_offset,
        ) + _LOCATOR64.pack(b"PK\x06\x07", 0, cd_offset + cd_size, 1)
    return zip64 + _END.pack(
        b"PK\x05\x06",
        0,
        0,
        min(count, _U16),
        min(count, _U16),
        min(cd_size, _U32),
        min(cd_offset, _U32),
        0,  # comment length
    )


def _encode_name(name: str) -> tuple[bytes, int]:
    """The name's bytes and flag bits, as ZipInfo.FileHeader encodes them."""
    try:
        return name.encode("ascii"), 0
    except UnicodeEncodeError:
        return name.encode("utf-8"), _UTF8_NAME


def _fill(buf: bytearray, data: bytes | memoryview, chunk_size: int) -> Iterator[bytes]:
    """Append ``data`` to ``buf``, yielding every chunk that fills up."""
    view = memoryview(data)
    while view:
        room = chunk_size - len(buf)
        buf += view[:room]
        view = view[room:]
        if len(buf) == chunk_size:
            yield bytes(buf)
            buf.clear()


def _read(
    read: Callable[[int, int, int], bytes],
    index: int,
    entry: ZipEntry,
    start: int,
    stop: int,
    buf: bytearray,
    chunk_size: int,
) -> Iterator[bytes]:
    """Yield chunks of ``buf`` topped up with the entry's file bytes [start, stop)."""
    pos = start
    while pos < stop:
        # Reads are sized to fill the buffer, so after the first one they
        # are whole chunks that go out without a copy.
        data = read(index, pos, min(chunk_size - len(buf), stop - pos))
        if not data:
            raise _shrank(entry)
        pos += len(data)
        if not buf and len(data) == chunk_size:
            yield data
            continue
        buf += data
        if len(buf) == chunk_size:
            yield bytes(buf)
            buf.clear()
