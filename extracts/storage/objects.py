"""Object stores through obstore: S3 (and S3-compatible stores), Google Cloud Storage, Azure.

A run's files are objects ``<prefix>/<run_id>/<file name>``. Credentials,
region and endpoint come from each cloud's standard environment variables
(obstore reads them: ``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_ACCOUNT_NAME``…), and
``--storage-endpoint`` overrides the endpoint.

Writing streams a multipart upload of ``PART_BYTES`` parts, at most
``UPLOADS_AT_ONCE`` in flight: a worker holds a bounded buffer whatever the
file's size, and no local disk. ``commit`` completes the upload and checks the
stored size; ``discard`` aborts it, so a failed or cancelled run leaves no
half-uploaded object. A download holds the objects it sends: their deletion
(a run deleted, the retention sweep) waits until the download ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import weakref
from collections import Counter
from collections.abc import Generator, Sequence
from datetime import timedelta
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import obstore
from obstore.store import AzureStore, GCSStore, S3Store

from extracts.storage.base import (
    OBJECT_SCHEMES,
    FileChangedError,
    HeldFiles,
    NameClash,
    NotInStorage,
    Storage,
    StorageError,
    StoredFile,
    StoreUnavailable,
    is_endpoint,
)

PART_BYTES = 8 << 20  # a multipart upload's part (S3 needs 5 MiB at least)
UPLOADS_AT_ONCE = 2  # parts in flight per file: memory stays at a few parts per worker
READ_BYTES = 1 << 20
DELETES_AT_ONCE = 1000  # keys a bulk delete is given (obstore splits them as each store needs)
HEADS_AT_MOST = 8  # objects a download checks with a HEAD each; more are listed (ObjectHeldFiles)
SCRATCH = ".scratch"  # an archive's members, uploaded then copied into the tarball
CLIENT_OPTIONS = {"connect_timeout": "5s", "timeout": "60s"}
RETRY = {"max_retries": 3, "retry_timeout": timedelta(seconds=30)}


# The HTTP client's settings that each store reads from the environment as <PREFIX>_<NAME>
# (AWS_ALLOW_HTTP, AZURE_PROXY_URL, GOOGLE_TIMEOUT…). Client options given to a store replace
# all of them, so those set are passed on with ours (a variable wins over our timeouts).
CLIENT_SETTINGS = (
    "allow_http",
    "allow_invalid_certificates",
    "connect_timeout",
    "default_content_type",
    "http1_only",
    "http2_keep_alive_interval",
    "http2_keep_alive_timeout",
    "http2_keep_alive_while_idle",
    "http2_only",
    "pool_idle_timeout",
    "pool_max_idle_per_host",
    "proxy_url",
    "proxy_ca_certificate",
    "proxy_excludes",
    "randomize_addresses",
    "timeout",
    "user_agent",
)
ENV_PREFIX = {"s3": "AWS_", "gs": "GOOGLE_", "az": "AZURE_", "azure": "AZURE_"}
# The endpoint variables obstore reads for S3 and Azure (a malformed one made it panic as it
# signed).
_AZURE_ENDPOINTS = ("AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT")
_ENDPOINT_VARIABLES = {
    "s3": ("AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
    "az": _AZURE_ENDPOINTS,
    "azure": _AZURE_ENDPOINTS,
}


def client_options(scheme: str, endpoint: str | None) -> dict[str, Any]:
    """Our timeouts, the client settings of the cloud's environment variables, and plain HTTP
    for an ``http://`` ``--storage-endpoint``."""
    options: dict[str, Any] = dict(CLIENT_OPTIONS)
    for name in CLIENT_SETTINGS:
        value = os.environ.get(ENV_PREFIX[scheme] + name.upper())
        if value:
            options[name] = value
    # A local server: MinIO, Azurite, an emulator. A scheme has no case: start-up takes HTTP://.
    if endpoint and urlsplit(endpoint).scheme.lower() == "http":
        options["allow_http"] = True
    return options


def _store(scheme: str, bucket: str, prefix: str, endpoint: str | None) -> Any:
    options: dict[str, Any] = {"client_options": client_options(scheme, endpoint), "retry_config": RETRY}
    if prefix:
        options["prefix"] = prefix
    if scheme == "s3":
        return S3Store(bucket, config={"endpoint": endpoint} if endpoint else {}, **options)
    if scheme == "gs":
        return GCSStore(bucket, config={"base_url": endpoint} if endpoint else {}, **options)
    config = {"endpoint": endpoint} if endpoint else {}
    return AzureStore(bucket, config=config, **options)


# Blob names whose signed link Azure accepts (obstore 0.x signs the escaped name).
_AZURE_SIGNABLE = re.compile(r"[A-Za-z0-9._~/+-]*")
# What a store's error body says: S3's and Azure's XML, GCS's JSON.
_BODY_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")
_BODY_MESSAGE = re.compile(r'<Message>([^<\n]{1,300})|"message"\s*:\s*"([^"\\]{1,300})')


def _reason(exc: BaseException) -> str:
    """The first line of an obstore error (its debug dump follows), the response body reduced to
    the store's own code and message: "… 404 Not Found (NoSuchBucket: The specified bucket
    does not exist)", where the first line alone blames a missing object."""
    text = str(exc)
    line = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    line = line.split(": <?xml", 1)[0].split(": {", 1)[0]
    code, message = _BODY_CODE.search(text), _BODY_MESSAGE.search(text)
    said = ": ".join(
        part for part in (code and code.group(1), message and (message.group(1) or message.group(2))) if part
    )
    return f"{line} ({said.strip()})" if said and said.strip() not in line else line


class ObjectStorage(Storage):
    """``s3://``, ``gs://`` or ``az://`` ``bucket[/prefix]``."""

    def __init__(self, url: str, endpoint: str | None = None) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        self.backend = OBJECT_SCHEMES[scheme]
        if "@" in parts.netloc:  # named without what it holds: a secret would be echoed
            raise StorageError(
                f"--storage {scheme}://…: a storage URL holds no credentials; give them in the "
                "environment (the README's Object storage section names the variables)"
            )
        if "?" in url or "#" in url:  # urlsplit drops them: objects would go under another prefix
            raise StorageError(
                f"--storage {scheme}://{parts.netloc}/…: a storage URL is a bucket and a prefix, with "
                "no query (?…) nor fragment (#…); settings come from the environment (the README's "
                "Object storage section names the variables)"
            )
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        if not self.bucket:
            raise StorageError(f"--storage {url}: name a bucket, as in {scheme}://bucket/prefix")
        # The URL as shown: scheme, bucket and prefix only (a user-info part never survives).
        self.url = f"{scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint = endpoint
        for variable in _ENDPOINT_VARIABLES.get(scheme, ()):
            if os.environ.get(variable) and not endpoint and not is_endpoint(os.environ[variable]):
                raise StorageError(
                    f"cannot write to the object store {self.url}: {variable} is not an http:// or "
                    "https:// URL with a host, such as http://127.0.0.1:9000"
                )
        try:
            self._store = _store(scheme, self.bucket, self.prefix, endpoint)
        except Exception as exc:  # noqa: BLE001 — a malformed key or key file, refused before any request
            raise StorageError(f"cannot write to the object store {self.url}: {_reason(exc)}") from None
        self._held: Counter[str] = Counter()  # keys being sent by downloads
        self._deferred: set[str] = set()  # keys to delete once no download holds them
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return self.url

    def _failed(self, exc: BaseException, doing: str) -> StoreUnavailable:
        return StoreUnavailable(f"The object store {self.url} failed to {doing}: {_reason(exc)}")

    def key(self, storage_path: str) -> str:
        """The object key (below the prefix) of an artifact's storage_path."""
        base = self.url + "/"
        if not storage_path.startswith(base):
            raise NotInStorage(storage_path, self.url)
        return storage_path[len(base) :]

    def probe(self) -> None:
        key = f".write-test-{threading.get_ident()}"
        try:
            obstore.put(self._store, key, b"ok")
            obstore.delete(self._store, key)
        except Exception as exc:  # noqa: BLE001 — obstore raises many kinds; one line names the cause
            raise StorageError(f"cannot write to the object store {self.url}: {_reason(exc)}") from None
        except BaseException as exc:
            # A setting obstore cannot use as it builds a request (AWS_ENDPOINT_URL=host:port)
            # panics in Rust: pyo3's PanicException, a BaseException, would end in a traceback.
            if type(exc).__name__ != "PanicException":
                raise
            raise StorageError(
                f"cannot write to the object store {self.url}: {_reason(exc)} (check the endpoint: "
                "--storage-endpoint or the cloud's variables)"
            ) from None

    def storage_path(self, run_id: str, name: str) -> str:
        return f"{self.url}/{run_id}/{name}"

    def begin_run(self, run_id: str) -> None:
        """Objects need no directory; an earlier attempt's objects go (one listing)."""
        self.delete_run(run_id)

    def open_file(self, run_id: str, name: str) -> StoredFile:
        return ObjectFile(self, f"{run_id}/{name}", name)

    def open_scratch(self, run_id: str, name: str) -> StoredFile:
        return ObjectFile(self, f"{run_id}/{SCRATCH}/{name}", name)

    def free_bytes(self, run_id: str | None = None) -> int | None:
        return None  # a bucket has no free-space reserve

    def hold(self, files: Sequence[tuple[str, int]]) -> HeldFiles:
        return ObjectHeldFiles(self, files)

    def delete_run(self, run_id: str) -> None:
        self._delete_all(self._keys(f"{run_id}/"))

    def delete(self, storage_path: str) -> None:
        self._delete(self.key(storage_path))

    def remove_partial(self, run_id: str) -> None:
        self._delete_all(self._keys(f"{run_id}/{SCRATCH}/"))

    def remove_unrecorded(self, run_id: str, recorded: set[str]) -> None:
        self._delete_all(
            [
                key
                for key in self._keys(f"{run_id}/")
                if "/" not in key[len(run_id) + 1 :] and key[len(run_id) + 1 :] not in recorded
            ]
        )

    def remove_empty_runs(self, active: set[str]) -> None:
        """Objects leave no empty directory behind; deletions a download held back are retried."""
        with self._lock:
            ready = [key for key in self._deferred if not self._held[key]]
        for key in ready:
            try:
                self._delete(key)
            except StorageError:  # the store is down: kept for the next sweep (``_delete``)
                return

    def sign(self, storage_path: str, seconds: int) -> str | None:
        key = self.key(storage_path)
        if self.backend == "azure" and not _AZURE_SIGNABLE.fullmatch(f"{self.prefix}/{key}"):
            # obstore signs an Azure blob's escaped name; Azure checks the name itself, so a
            # link to "order%20items.jsonl" (or under a prefix with a space, an "é") is refused
            # with 403: no link at all, a 400, is the honest answer.
            return None
        try:
            return obstore.sign(self._store, "GET", key, timedelta(seconds=seconds))
        except Exception:  # noqa: BLE001 — a store without signing credentials (anonymous, emulators)
            return None

    # ------------------------------------------------------------ plumbing

    def _keys(self, prefix: str) -> list[str]:
        try:
            return [item["path"] for batch in obstore.list(self._store, prefix) for item in batch]
        except Exception as exc:  # noqa: BLE001
            raise self._failed(exc, f"list {prefix}") from None

    def _listed(self, keys: Sequence[str]) -> dict[str, Any]:
        """The metadata of ``keys`` (and of their neighbours): one listing per directory."""
        found: dict[str, Any] = {}
        for directory in dict.fromkeys(key.rpartition("/")[0] for key in keys):
            try:
                for batch in obstore.list(self._store, directory or None):
                    found.update((item["path"], item) for item in batch)
            except Exception as exc:  # noqa: BLE001
                raise self._failed(exc, f"list {directory or 'the prefix'}") from None
        return found

    def _delete(self, key: str) -> None:
        with self._lock:
            if self._held[key]:  # a download is sending it: deleted when it is released
                self._deferred.add(key)
                return
            held_back = key in self._deferred
            self._deferred.discard(key)
        try:
            obstore.delete(self._store, key)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            if held_back:  # its artifact is marked deleted already: only the sweep retries it
                with self._lock:
                    self._deferred.add(key)
            raise self._failed(exc, f"delete {key}") from None

    def _delete_all(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` in bulk requests (S3 takes 1,000 a request, Azure 256 a batch): one
        request each made a split run's DELETE minutes long. Held keys wait, as in ``_delete``;
        a batch the store refuses as a whole, or in part (Azure: a blob gone meanwhile), is
        deleted again one key at a time, so a missing key is fine and a failure names its key."""
        with self._lock:
            held = {key for key in keys if self._held[key]}
            self._deferred.update(held)
            ready = [key for key in keys if key not in held]
        for start in range(0, len(ready), DELETES_AT_ONCE):
            batch = ready[start : start + DELETES_AT_ONCE]
            try:
                obstore.delete(self._store, batch)
            except Exception:  # noqa: BLE001
                for key in batch:
                    self._delete(key)  # a key held back earlier stays for the sweep if this fails
            else:
                with self._lock:
                    self._deferred.difference_update(batch)

    def _hold(self, keys: Sequence[str]) -> None:
        with self._lock:
            self._held.update(keys)

    def _release(self, keys: Sequence[str]) -> None:
        with self._lock:
            self._held.subtract(keys)
            ready = [key for key in keys if key in self._deferred and not self._held[key]]
        for key in ready:
            with contextlib.suppress(StorageError):  # kept for the sweep to retry (``_delete``)
                self._delete(key)


class ObjectFile(StoredFile):
    """A streaming multipart upload; the object exists only once ``commit`` completes it."""

    def __init__(self, storage: ObjectStorage, key: str, name: str) -> None:
        self.name, self.key, self._storage = name, key, storage
        self._size = 0
        self._writer = obstore.open_writer(
            storage._store, key, buffer_size=PART_BYTES, max_concurrency=UPLOADS_AT_ONCE
        )

    def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
        except Exception as exc:  # noqa: BLE001
            raise self._storage._failed(exc, f"upload {self.key}") from None
        self._size += len(data)

    def commit(self) -> None:
        try:
            obstore.head(self._storage._store, self.key)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            self.discard()
            raise self._storage._failed(exc, f"upload {self.key}") from None
        else:
            self.discard()
            raise NameClash(f"Cannot write {self.key}: an object of that name is already in the store")
        try:
            self._writer.close()
            stored = obstore.head(self._storage._store, self.key)["size"]
        except Exception as exc:  # noqa: BLE001
            self.discard()
            raise self._storage._failed(exc, f"upload {self.key}") from None
        if stored != self._size:
            raise StoreUnavailable(
                f"The object store {self._storage.url} stored {stored} bytes of {self.key}, "
                f"{self._size} sent; the run fails rather than keep a damaged file"
            )

    def discard(self) -> None:
        """Abort the upload (its parts go); an object already completed is deleted."""
        # Errors are let go: the store is down (an aborted upload's parts cannot be
        # listed back; a bucket lifecycle rule removes them), or the object is gone already.
        if not self._writer.closed():
            with contextlib.suppress(Exception):
                self._writer.__exit__(StorageError, StorageError("discarded"), None)
        else:
            with contextlib.suppress(Exception):
                obstore.delete(self._storage._store, self.key)

    def read_back(self) -> BinaryIO:
        self.commit()
        return _ObjectReader(self._storage, self.key)  # type: ignore[return-value]


def _object_chunks(storage: ObjectStorage, key: str, offset: int = 0) -> Generator[bytes, None, None]:
    """The object's bytes from ``offset``, in chunks of about ``READ_BYTES``.

    A body that breaks after some of it arrived is read on with a ranged GET from where it
    stopped: a request's time limit (``CLIENT_OPTIONS``) counts until its body is read, so a
    download sent to a slow client, or a large archive member copied into its tarball, would
    otherwise fail after a minute; so would an idle connection the store closed. A request
    that brings nothing (obstore retried it already) is the store failing: StoreUnavailable
    naming it, as for any other request.
    """
    position, size = offset, None
    while size is None or position < size:
        options: dict[str, Any] = {"range": {"offset": position}} if position else {}
        started = position
        try:
            result = obstore.get(storage._store, key, options=options)
            size = result.meta["size"]
            for chunk in result.stream(min_chunk_size=READ_BYTES):
                position += len(chunk)
                yield bytes(chunk)
            return
        except Exception as exc:  # noqa: BLE001
            if position == started:
                raise storage._failed(exc, f"read {key}") from None


class _ObjectReader:
    """A scratch object read back in order (``tarfile`` copies it with ``read``)."""

    def __init__(self, storage: ObjectStorage, key: str) -> None:
        self._chunks = _object_chunks(storage, key)
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def __enter__(self) -> _ObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._chunks.close()


class ObjectHeldFiles(HeldFiles):
    """Objects checked before a download's first byte, read in order with ranged GETs.

    A few are checked with a HEAD each; more (a run's ZIP) with one listing of each
    run's objects, a page per 1,000: a HEAD each made a split run's thousands of
    parts seconds to minutes of requests before the first byte, again at every
    resume. An object the listing lacks gets its HEAD (so a missing one is named as
    before). While held their deletion waits; a read at the position the last one
    ended goes on with the same request, any other opens a ranged one.
    """

    def __init__(self, storage: ObjectStorage, files: Sequence[tuple[str, int]]) -> None:
        self._storage = storage
        self._keys = [storage.key(path) for path, _ in files]
        self._modified: list[float] = []
        self._stream: tuple[int, int, Generator[bytes, None, None]] | None = None  # (index, position, chunks)
        self._pending = b""
        storage._hold(self._keys)
        # Released once, by close() or when the holder is garbage-collected (a backstop).
        self._release = weakref.finalize(self, storage._release, list(self._keys))
        try:
            listed = storage._listed(self._keys) if len(self._keys) > HEADS_AT_MOST else {}
            for (path, size), key in zip(files, self._keys, strict=True):
                try:
                    meta = listed.get(key) or obstore.head(storage._store, key)
                except FileNotFoundError:
                    raise FileNotFoundError(2, "No such object", path) from None
                except Exception as exc:  # noqa: BLE001
                    raise storage._failed(exc, f"read {key}") from None
                if meta["size"] != size:
                    raise FileChangedError(
                        path, f"{path} is {meta['size']} bytes in the store but was recorded as {size}"
                    )
                self._modified.append(meta["last_modified"].timestamp())
        except BaseException:
            self.close()
            raise

    def read(self, index: int, offset: int, size: int) -> bytes:
        if not self._release.alive:
            raise ValueError("The files were released; this download can read nothing more.")
        if self._stream is None or self._stream[:2] != (index, offset):
            if self._stream is not None:
                self._stream[2].close()
            chunks = _object_chunks(self._storage, self._keys[index], offset)
            self._stream, self._pending = (index, offset, chunks), b""
        _, position, chunks = self._stream
        while len(self._pending) < size:
            chunk = next(chunks, None)
            if chunk is None:
                break
            self._pending += chunk
        data, self._pending = self._pending[:size], self._pending[size:]
        self._stream = (index, position + len(data), chunks)
        return data

    def modified(self, index: int) -> float:
        return self._modified[index]

    def close(self) -> None:
        if self._stream is not None:
            self._stream[2].close()
        self._stream = None
        self._release()
