"""``extracts-app verify PATH``: a ZIP, a run directory or an archive tarball against its manifest.

Every file the manifest lists must be there with its size and SHA-256, and a
JSON lines file (gzip'd or not) must hold as many records as it says; a file
the manifest does not list is reported too. An ``archive`` tarball, on its own
or inside a ZIP or run directory, is also opened and checked against the
manifest inside it. Files are read as streams, a megabyte at a time: the
tarball's bytes are hashed as tarfile reads them, never held whole. One line
per file; ``verify_path`` is true only when every file matches.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

import orjson

_CHUNK = 1 << 20
_INFLATED_MAX = 8 << 20  # decompressed bytes per step: a gzip bomb cannot fill memory
_MANIFEST_MAX = 256 << 20  # a manifest is read whole, so no more than this: a million files' worth
_ARCHIVE = (".tar", ".tar.gz", ".tgz")
# What zipfile raises for a member it cannot read: a bad local header, an encrypted member
# (RuntimeError: no password), a compression method it does not know (NotImplementedError).
_ZIP_ERRORS = (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError, zlib.error)


class Unreadable(Exception):
    """The container (ZIP, tarball, manifest) cannot be read; the message says why."""


@dataclass
class Measured:
    size: int
    sha256: str
    records: int | None  # newlines of a JSON lines file (decompressed), else None
    error: str | None = None  # a read that failed midway (bad CRC, corrupt gzip)


class _Hashing:
    """A readable stream that hashes and counts every byte read through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.sha256, self.size = stream, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def _lines(compressed: bool) -> Callable[[bytes], int]:
    """Counts newlines of the (decompressed) bytes fed to it, a chunk at a time."""
    inflater = zlib.decompressobj(31) if compressed else None

    def count(data: bytes) -> int:
        nonlocal inflater
        if inflater is None:
            return data.count(b"\n")
        total = 0
        while data:
            out = inflater.decompress(data, _INFLATED_MAX)
            total += out.count(b"\n")
            data = inflater.unconsumed_tail
            if inflater.eof and inflater.unused_data:  # another gzip member follows
                data, inflater = inflater.unused_data, zlib.decompressobj(31)
        return total

    return count


def is_json_lines(name: str) -> bool:
    return name.endswith((".jsonl", ".jsonl.gz"))


def measure(stream: IO[bytes], name: str) -> Measured:
    """Size, SHA-256 and, for a JSON lines file, its records, in one streamed pass."""
    sha256, size = hashlib.sha256(), 0
    count = _lines(name.endswith(".gz")) if is_json_lines(name) else None
    records = 0
    try:
        while chunk := stream.read(_CHUNK):
            sha256.update(chunk)
            size += len(chunk)
            if count is not None:
                records += count(chunk)
    except (*_ZIP_ERRORS, tarfile.TarError) as exc:
        return Measured(size, sha256.hexdigest(), None, f"cannot be read whole: {exc}")
    return Measured(size, sha256.hexdigest(), records if count is not None else None)


def printable(text: str) -> str:
    """``text`` with control characters escaped: a name in a ZIP or manifest may hold a newline
    (a forged "ok" line) or a terminal's escape sequences, and is shown, never obeyed."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


class Report:
    """The lines of one verification and whether every file matched."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.checked, self.failed = out, 0, 0

    def line(self, ok: bool, word: str, text: str) -> None:
        self.checked += 1
        self.failed += not ok
        print(f"{word:<8}{printable(text)}", file=self.out, flush=True)

    def compare(self, entry: dict[str, Any], got: Measured | None, label: str) -> None:
        """One manifest entry against what was read (None: the file is missing)."""
        if got is None:
            self.line(False, "MISSING", f"{label}: listed in the manifest, not found")
            return
        if got.error and not got.sha256:  # nothing could be read: the sizes would say nothing more
            self.line(False, "FAILED", f"{label}: {got.error}")
            return
        problems = []
        if got.error:
            problems.append(got.error)
        if got.size != entry["size"]:
            problems.append(f"{got.size:,} bytes, the manifest says {entry['size']:,}")
        if got.sha256 != entry["checksum"]:
            problems.append("SHA-256 differs from the manifest")
        if got.records is not None and got.records != entry["records"]:
            problems.append(f"{got.records:,} records, the manifest says {entry['records']}")
        if problems:
            self.line(False, "FAILED", f"{label}: {'; '.join(problems)}")
            return
        records = f", {got.records:,} records" if got.records is not None else ""
        self.line(True, "ok", f"{label}: {got.size:,} bytes{records}")

    def extra(self, label: str) -> None:
        self.line(False, "EXTRA", f"{label}: not listed in the manifest")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# What each field of a manifest entry must hold, checked before any is used (README: verify).
_FIELDS: dict[str, Callable[[object], bool]] = {
    "name": lambda value: isinstance(value, str) and value != "",
    "size": _is_count,
    "checksum": lambda value: isinstance(value, str),
    "records": lambda value: value is None or _is_count(value),
}


def _bounded(stream: IO[bytes], where: str, declared: int = 0) -> bytes:
    """A manifest's bytes, refused past ``_MANIFEST_MAX``: a ZIP or tarball may inflate it without end.

    ``declared``: the size its container gives, refused before anything is read.
    """
    data = b"" if declared > _MANIFEST_MAX else stream.read(_MANIFEST_MAX + 1)
    if declared > _MANIFEST_MAX or len(data) > _MANIFEST_MAX:
        raise Unreadable(
            f"the manifest.json of {where} is over {_MANIFEST_MAX >> 20} MiB; a run's manifest "
            "(a few hundred bytes a file) is never that large"
        )
    return data


def _manifest(data: bytes, where: str) -> list[dict[str, Any]]:
    try:
        manifest = orjson.loads(data)
        # Each shape named as the README words it (Python's "'int' object is not subscriptable",
        # or a bare "'size'", said nothing a user could act on).
        if not isinstance(manifest, dict) or "artifacts" not in manifest:
            raise TypeError("it is no object holding artifacts")
        entries = manifest["artifacts"]
        if not isinstance(entries, list):
            raise TypeError("artifacts is not a list")
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise TypeError(f"artifacts[{index}] is {entry!r}, not an object")
            for key, valid in _FIELDS.items():
                if key not in entry:
                    raise TypeError(f"artifacts[{index}] has no {key}")
                if not valid(entry[key]):
                    raise TypeError(f"artifacts[{index}].{key} is {entry[key]!r}")
        return entries
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise Unreadable(f"the manifest.json of {where} is not a run manifest ({exc})") from None


_NOT_A_FILE_NAME = "not a file name of a run (it would be read from elsewhere); not read"


def is_file_name(name: str) -> bool:
    """Whether a manifest may name it: one file name beside the manifest, as a run writes them.

    A run's names never hold a ``/`` or ``\\`` and never start with a dot
    (``executor.naming``): a manifest naming ``/etc/hostname`` or ``../t.db`` is not
    one, and whatever is there is not read.
    """
    return not name.startswith(".") and not any(char in name for char in "/\\\0")


Measure = Callable[[str, str], Measured | None]  # (name, label) -> what was read; None: missing


def _check_files(
    report: Report, entries: list[dict[str, Any]], names: set[str], read: Measure, prefix: str
) -> None:
    """Every entry measured by ``read``; then the names the manifest does not list."""
    listed: set[str] = set()
    for entry in entries:
        label = prefix + entry["name"]
        if not is_file_name(entry["name"]):
            report.line(False, "FAILED", f"{label}: {_NOT_A_FILE_NAME}")
            continue
        if entry["name"] in listed:  # a run names each file once: one file cannot stand for two
            report.line(False, "FAILED", f"{label}: listed twice in the manifest")
            continue
        listed.add(entry["name"])
        report.compare(entry, read(entry["name"], label), label)
    for name in sorted(names - {entry["name"] for entry in entries} - {"manifest.json"}):
        report.extra(prefix + name)


def _read(report: Report, stream: IO[bytes], name: str, label: str) -> Measured:
    """A file's measure; a tarball is also checked inside (its lines come first)."""
    if name.endswith(_ARCHIVE):
        return _check_tarball(report, stream, label + "/")
    return measure(stream, name)


def _check_tarball(report: Report, stream: IO[bytes], prefix: str) -> Measured:
    """Check a tarball's members against its inner manifest; returns the tarball's own measure.

    Its records are the members' total (what the outer manifest lists for the archive).
    """
    hashing = _Hashing(stream)
    seen: dict[str, Measured] = {}
    inner: list[dict[str, Any]] | None = None
    error = None
    try:
        with tarfile.open(fileobj=hashing, mode="r|*") as tar:  # type: ignore[call-overload]
            for member in tar:
                file = tar.extractfile(member) if member.isfile() else None
                if file is None:
                    seen[member.name] = Measured(0, "", None, "is not a regular file")
                elif member.name == "manifest.json":
                    where = prefix.rstrip("/") or "the tarball"
                    inner = _manifest(_bounded(file, where, member.size), where)
                else:
                    seen[member.name] = measure(file, member.name)
        hashing.drain()
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        error = f"cannot be read whole: {exc}"
    if inner is None:
        report.line(False, "FAILED", f"{prefix}manifest.json: {error or 'not in the archive'}")
        return Measured(hashing.size, hashing.sha256.hexdigest(), None, error or "has no manifest.json")
    _check_files(report, inner, set(seen), lambda name, _: seen.get(name), prefix)
    records = None if error else sum(m.records or 0 for m in seen.values())
    return Measured(hashing.size, hashing.sha256.hexdigest(), records, error)


def verify_path(path: Path, out: TextIO) -> bool:
    """Print one line per file of ``path`` (ZIP, run directory or tarball); True when all match."""
    report = Report(out)
    try:
        _verify(report, path)
    except Unreadable as exc:
        print(printable(f"FAILED  {path}: {exc}"), file=out)
        return False
    except BrokenPipeError:  # stdout is gone: the command ends quietly
        raise
    except OSError as exc:  # the directory or its manifest cannot be listed or read
        print(printable(f"FAILED  {path}: cannot be read: {exc.filename}: {exc.strerror or exc}"), file=out)
        return False
    if report.failed:
        print(f"{report.failed} of {report.checked} files do not match the manifest", file=out)
        return False
    print(f"all {report.checked} files match the manifest", file=out)
    return True


def _verify(report: Report, path: Path) -> None:
    if not (path.is_dir() or path.is_file()):  # a FIFO would be waited on, /dev/zero read forever
        raise Unreadable("not a readable ZIP, tarball or run directory (a named pipe, a device or a socket)")
    if path.is_dir():
        manifest = path / "manifest.json"
        if not manifest.is_file():
            raise Unreadable(f"{path} has no manifest.json: not a run directory")
        names = {p.name for p in path.iterdir() if not p.name.startswith(".")}  # dot-names: temp files

        def read_file(name: str, label: str) -> Measured | None:
            if not (path / name).is_file():
                return None
            real = (path / name).resolve()
            if not real.is_relative_to(path.resolve()):  # a symlink leading out of the directory
                return Measured(0, "", None, f"is a link to {real}, outside {path}; not read")
            try:
                stream = open(path / name, "rb")  # noqa: SIM115 (closed below, once open)
            except OSError as exc:
                return Measured(0, "", None, f"cannot be read: {exc.strerror}")
            with stream:
                return _read(report, stream, name, label)

        with open(manifest, "rb") as stream:
            data = _bounded(stream, str(path), os.fstat(stream.fileno()).st_size)
        _check_files(report, _manifest(data, str(path)), names, read_file, "")
    elif path.name.endswith(_ARCHIVE) or (not zipfile.is_zipfile(path) and tarfile.is_tarfile(path)):
        with open(path, "rb") as stream:
            _check_tarball(report, stream, "")
    else:
        try:
            archive = zipfile.ZipFile(path)
        except _ZIP_ERRORS as exc:
            raise Unreadable(f"not a readable ZIP, tarball or run directory ({exc}; truncated?)") from None
        with archive:
            names = set(archive.namelist())
            if "manifest.json" not in names:
                raise Unreadable("the ZIP has no manifest.json")
            try:
                with archive.open("manifest.json") as stream:
                    data = _bounded(stream, str(path), archive.getinfo("manifest.json").file_size)
                entries = _manifest(data, str(path))
            except _ZIP_ERRORS as exc:
                raise Unreadable(f"the ZIP's manifest.json cannot be read: {exc}") from None

            def read_entry(name: str, label: str) -> Measured | None:
                if name not in names:
                    return None
                try:
                    stream = archive.open(name)
                except _ZIP_ERRORS as exc:
                    return Measured(0, "", None, f"cannot be read: {exc}")
                with stream:
                    return _read(report, stream, name, label)

            _check_files(report, entries, names, read_entry, "")
