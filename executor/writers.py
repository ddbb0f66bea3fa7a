"""Writing a run's artifacts: files that are complete, checksummed and named safely.

Every file goes through the storage (``extracts.storage``): a ``StoredFile``
is in place only once committed, so a half-written file never looks finished.
Nothing is ever overwritten: a run refuses a second file whose name equals one
it already used, letter case ignored, before writing it (``RunFiles``), and a
commit fails on an existing file. Bytes flow

    encoder (main thread) → ArtifactFile.write → queue → [gzip] → SHA-256 + CRC-32 → StoredFile

where everything after the queue runs on the file's own thread: deflate, hashlib
and file writes release the GIL, so compressing and hashing overlap with
reading the source. The queue is bounded: memory stays flat. Deflate and CRC-32
are ISA-L's (``isal``): the same gzip format as zlib's, at its level 1 three
to four times faster for the same size, and CRC-32 five times faster
(bench/RESULTS.md).

Records arrive as chunks of JSON lines, laid out by a format (``executor.formats``);
``archive`` is one tar stream (gzip'd with ``compress``) holding ``describe.yaml``,
plain ``<schema>.jsonl`` members and an inner ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import io
import queue
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from isal import isal_zlib

from executor.formats import Encoder, JsonLines, encoder
from executor.messages import Artifact
from executor.naming import safe_file_name
from extracts.storage import LowDiskSpace, NameClash, Storage, StoredFile

_BLOCK = 1 << 20  # bytes handed to the file thread at a time
# Blocks waiting for the file thread: two keep it busy. More only fill up, and hold
# memory, while the kernel throttles a big file's writes (eight: +5 MiB at 10M rows).
_QUEUE_BLOCKS = 2
_SPACE_CHECK_EVERY = 64 << 20
_GZIP_LEVEL = 1  # ISA-L's levels are 0–3; at 1 this JSON comes out as small as with zlib's level 1


class RunFiles:
    """The file names a run has used in one place: its directory, or its archive's members.

    Compared ignoring letter case: macOS and Windows, where the ZIP is unpacked,
    take ``Users.jsonl`` and ``users.jsonl`` for one file (SPEC: Artifacts).
    ``safe_file_name`` never gives two schemas such names; this makes sure,
    before anything is written, that nothing else does either.
    """

    def __init__(self) -> None:
        self._used: dict[str, tuple[str, str]] = {}  # casefolded name -> (name, what wrote it)

    def claim(self, name: str, owner: str) -> str:
        """``name``, now taken by ``owner`` (``schema 'users'``, ``the manifest``…)."""
        first = self._used.get(name.casefold())
        if first is not None:
            used, by = first
            raise NameClash(
                f"Two files of this run would be named {used} (letter case aside): {by} "
                f"and {owner}; the run stopped before overwriting either. Rename one of "
                "them in the source, or report this as a bug in the file naming"
            )
        self._used[name.casefold()] = (name, owner)
        return name


class RunPlace:
    """Where one run's files go: its storage, its id, and the free-space reserve kept there."""

    def __init__(self, storage: Storage, run_id: str, min_free_bytes: int) -> None:
        self.storage, self.run_id, self.min_free_bytes = storage, run_id, min_free_bytes

    def check(self) -> None:
        """Fail the run when free space under the run's files fell under the reserve."""
        free = self.storage.free_bytes(self.run_id)
        if free is not None and free < self.min_free_bytes:
            raise LowDiskSpace(
                f"Free space on {self.storage.volume()} is {free >> 20} MB, under the "
                f"{self.min_free_bytes >> 20} MB reserve; free some space or lower --min-free-mb"
            )

    def open(self, name: str, scratch: bool = False) -> StoredFile:
        """A new file of the run (``scratch``: one that is read back, never committed)."""
        if scratch:
            return self.storage.open_scratch(self.run_id, name)
        return self.storage.open_file(self.run_id, name)


@dataclass(frozen=True)
class FileInfo:
    """A finished file: its name in the run directory and its stored bytes' fingerprints."""

    name: str
    size: int
    checksum: str  # SHA-256 hex
    crc32: int


class ArtifactFile:
    """One file being written: hashed (and gzip'd) on its own thread into a ``StoredFile``."""

    def __init__(self, place: RunPlace, name: str, compress: bool = False, scratch: bool = False) -> None:
        self.name = name
        self._place = place
        place.check()
        self.stored = place.open(name, scratch)
        self._compressor = isal_zlib.compressobj(_GZIP_LEVEL, isal_zlib.DEFLATED, 31) if compress else None
        self._sha256 = hashlib.sha256()
        self._crc32 = 0
        self._size = 0
        self._next_check = _SPACE_CHECK_EVERY
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(_QUEUE_BLOCKS)
        self._thread = threading.Thread(target=self._drain, name=f"write {name}", daemon=True)
        self._thread.start()

    def __enter__(self) -> ArtifactFile:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.discard()

    # ------------------------------------------------------------ the producer side

    def write(self, data: bytes) -> None:
        """Queue ``data``; raises the file thread's error (disk full, I/O) as soon as it happens."""
        if self._error is not None:
            raise self._error
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= _BLOCK:
            self._flush_pending()

    def _flush_pending(self) -> None:
        if self._pending:
            self._queue.put(self._pending)  # the pieces as they are: no copy on this thread
            self._pending, self._pending_size = [], 0

    def finish(self) -> FileInfo:
        """Write everything out; the file is not in place yet (``commit``)."""
        self._flush_pending()
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return FileInfo(self.name, self._size, self._sha256.hexdigest(), self._crc32)

    def commit(self) -> FileInfo:
        """Finish and put the file in place; an existing file of that name is never replaced."""
        info = self.finish()
        self.stored.commit()
        return info

    def discard(self) -> None:
        """Stop and remove what was written (after a failure, or once an archive took it)."""
        if self._thread.is_alive():
            self._pending = []
            self._queue.put(None)
            self._thread.join()
        self.stored.discard()
        # The error's traceback holds frames that hold this file: let the cycle go.
        self._error = None

    # ------------------------------------------------------------ the file thread

    def _drain(self) -> None:
        while True:
            pieces = self._queue.get()
            if self._error is None:
                try:
                    if pieces is None:
                        if self._compressor is not None:
                            self._store(self._compressor.flush())
                    else:
                        for piece in pieces:
                            self._store(self._compressor.compress(piece) if self._compressor else piece)
                except BaseException as exc:  # noqa: BLE001 — handed to the producer
                    self._error = exc
            if pieces is None:
                return

    def _store(self, data: bytes) -> None:
        self._sha256.update(data)
        self._crc32 = isal_zlib.crc32(data, self._crc32)
        self.stored.write(data)
        self._size += len(data)
        if self._size >= self._next_check:
            self._next_check += _SPACE_CHECK_EVERY
            self._place.check()


def write_file(place: RunPlace, name: str, data: bytes) -> FileInfo:
    """A small artifact written whole (describe.yaml, manifest.json)."""
    with ArtifactFile(place, name) as file:
        file.write(data)
        return file.commit()


# ---------------------------------------------------------------- one schema's data


PartDone = Callable[[ArtifactFile, int | None, int], None]


class SchemaWriter:
    """One schema's records as one file, or as parts of at most ``split_max`` records.

    Each file's name is claimed in ``names`` before the file is opened; each
    finished file goes to ``part_done(file, part, records)``, which commits it
    (or hands it to an archive). With splitting, an empty table still gives one
    (empty) part 00001.
    """

    def __init__(
        self,
        place: RunPlace,
        schema: str,
        encoder: Encoder,
        compress: bool,
        split_max: int | None,
        part_done: PartDone,
        names: RunFiles,
        scratch: bool = False,
    ) -> None:
        self.place, self.schema, self.encoder = place, schema, encoder
        self.compress, self.split_max, self.scratch = compress, split_max, scratch
        self._part_done, self._names = part_done, names
        self._file: ArtifactFile | None = None
        self._part = 0
        self._part_records = 0

    def file_name(self, part: int | None) -> str:
        number = "" if part is None else f".{part:05d}"
        return f"{safe_file_name(self.schema)}{number}.{self.encoder.extension}" + (
            ".gz" if self.compress else ""
        )

    def _open(self) -> ArtifactFile:
        self._part += 1
        self._part_records = 0
        part = self._part if self.split_max else None
        name = self._names.claim(self.file_name(part), f"schema {self.schema!r}")
        self._file = ArtifactFile(self.place, name, self.compress, self.scratch)
        self._file.write(self.encoder.head())
        return self._file

    def _close(self) -> None:
        file = self._file
        assert file is not None
        file.write(self.encoder.tail(self._part_records))
        self._part_done(file, self._part if self.split_max else None, self._part_records)
        self._file = None  # only now: when part_done fails, abort() discards the file

    def write(self, chunk: bytes, records: int) -> None:
        """Add ``records`` records: a chunk of JSON lines (``Source.json_lines``)."""
        while records:
            file = self._file or self._open()
            room = self.split_max - self._part_records if self.split_max else records
            taken = min(room, records)
            if taken < records:
                lines = chunk.split(b"\n", taken)
                head, chunk = b"\n".join(lines[:taken]), lines[taken]
            else:
                head = chunk
            for piece in self.encoder.body(head, first=self._part_records == 0):
                file.write(piece)
            self._part_records += taken
            records -= taken
            if self.split_max and self._part_records >= self.split_max:
                self._close()  # the next part opens only when more records come

    def close(self) -> None:
        """Finish the last file (an empty file when the schema had no records)."""
        if self._file is None and self._part == 0:
            self._open()
        if self._file is not None:
            self._close()

    def abort(self) -> None:
        if self._file is not None:
            self._file.discard()
            self._file = None


# ---------------------------------------------------------------- the run's outputs


def artifact(
    kind: str,
    info: FileInfo,
    fmt: str,
    content_type: str,
    *,
    schema: str | None = None,
    part: int | None = None,
    records: int | None = None,
    primary: bool = True,
) -> Artifact:
    """The artifact message the worker sends to the service."""
    return {
        "artifact_type": kind,
        "artifact_name": info.name,
        "schema_name": schema,
        "part": part,
        "format": fmt,
        "content_type": content_type,
        "size_bytes": info.size,
        "records": records,
        "checksum": info.checksum,
        "crc32": info.crc32,
        "is_primary": primary,
    }


def manifest_entry(item: dict[str, Any]) -> dict[str, Any]:
    """An artifact as listed in ``manifest.json``."""
    return {
        "type": item["artifact_type"],
        "name": item["artifact_name"],
        "schema": item["schema_name"],
        "part": item["part"],
        "size": item["size_bytes"],
        "checksum": item["checksum"],
        "records": item["records"],
    }


Report = Callable[[dict[str, Any]], None]
Manifest = Callable[[list[dict[str, Any]]], bytes]


class FileOutput:
    """``jsonl``/``json``/``yaml``: describe.yaml, data files and manifest.json side by side."""

    def __init__(
        self, place: RunPlace, config: dict[str, Any], report: Report, json_is_yaml_safe: bool = False
    ) -> None:
        self.place, self.config = place, config
        self._report = report
        self.artifacts: list[dict[str, Any]] = []
        self.encoder = encoder(config["format"], json_is_yaml_safe)
        self.names = RunFiles()

    def _add(self, item: dict[str, Any]) -> None:
        self.artifacts.append(item)
        self._report(item)

    def describe(self, data: bytes) -> None:
        info = write_file(self.place, self.names.claim("describe.yaml", "the schemas' description"), data)
        self._add(artifact("describe", info, "yaml", "application/yaml"))

    def schema(self, name: str) -> SchemaWriter:
        split = self.config["split_max_records"] if self.config["split_files"] else None
        compress = bool(self.config["compress"])
        content_type = "application/gzip" if compress else self.encoder.content_type

        def part_done(file: ArtifactFile, part: int | None, records: int) -> None:
            info = file.commit()
            self._add(
                artifact(
                    f"data-{name}",
                    info,
                    self.encoder.extension,
                    content_type,
                    schema=name,
                    part=part,
                    records=records,
                )
            )

        return SchemaWriter(self.place, name, self.encoder, compress, split, part_done, self.names)

    def finish(self, manifest: Manifest) -> None:
        entries = [manifest_entry(item) for item in self.artifacts]
        info = write_file(self.place, self.names.claim("manifest.json", "the manifest"), manifest(entries))
        self._report(artifact("manifest", info, "json", "application/json", primary=False))

    def abort(self) -> None:
        """Nothing to undo: every file here was committed whole."""


class ArchiveOutput:
    """``archive``: one tar stream of describe.yaml, ``<schema>.jsonl`` members and manifest.json.

    A tar header holds its member's size, so each data member is first written
    to a temporary file in the run directory, then copied into the stream.
    The outer manifest.json lists the tarball. Member names are kept apart like
    the run directory's (``RunFiles``): the tarball is unpacked too.
    """

    def __init__(self, place: RunPlace, config: dict[str, Any], report: Report, base_name: str) -> None:
        self.place, self.config = place, config
        self._report = report
        self.compress = bool(config["compress"])
        self.members: list[dict[str, Any]] = []
        self.names, self.member_names = RunFiles(), RunFiles()
        name = self.names.claim(base_name + (".tar.gz" if self.compress else ".tar"), "the archive")
        self._file = ArtifactFile(place, name, self.compress)
        self._tar = tarfile.open(  # noqa: SIM115 — closed in finish()
            fileobj=self._file, mode="w|", format=tarfile.PAX_FORMAT, copybufsize=_BLOCK
        )
        self._mtime = time.time()

    def _member(self, name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, self._mtime, 0o644
        return info

    def _add_bytes(self, name: str, data: bytes, owner: str) -> FileInfo:
        self.member_names.claim(name, owner)
        self._tar.addfile(self._member(name, len(data)), io.BytesIO(data))
        return FileInfo(name, len(data), hashlib.sha256(data).hexdigest(), isal_zlib.crc32(data))

    def describe(self, data: bytes) -> None:
        info = self._add_bytes("describe.yaml", data, "the schemas' description")
        self.members.append(artifact("describe", info, "yaml", "application/yaml"))

    def schema(self, name: str) -> SchemaWriter:
        split = self.config["split_max_records"] if self.config["split_files"] else None

        def part_done(file: ArtifactFile, part: int | None, records: int) -> None:
            info = file.finish()
            with file.stored.read_back() as member:
                self._tar.addfile(self._member(info.name, info.size), member)
            file.discard()
            self.members.append(
                artifact(
                    f"data-{name}",
                    info,
                    "jsonl",
                    "application/x-ndjson",
                    schema=name,
                    part=part,
                    records=records,
                )
            )

        return SchemaWriter(self.place, name, JsonLines(), False, split, part_done, self.member_names, True)

    def finish(self, manifest: Manifest) -> None:
        self._add_bytes(
            "manifest.json",
            manifest([manifest_entry(item) for item in self.members]),
            "the archive's manifest",
        )
        self._tar.close()
        info = self._file.commit()
        records = sum(item["records"] or 0 for item in self.members)
        tarball = artifact(
            "archive",
            info,
            "tar",
            "application/gzip" if self.compress else "application/x-tar",
            records=records,
        )
        self._report(tarball)
        outer = write_file(
            self.place, self.names.claim("manifest.json", "the manifest"), manifest([manifest_entry(tarball)])
        )
        self._report(artifact("manifest", outer, "json", "application/json", primary=False))

    def abort(self) -> None:
        self._file.discard()
