"""Reading one table with several connections at once, its chunks handed out in order.

A table is cut into *units* (PostgreSQL: block ranges; SQLite: rowid ranges),
numbered in the order their rows come in a single-stream read. Reader ``i`` of
``n`` reads units ``i, i + n, i + 2n, …``, each on its own connection and
thread, and hands every chunk of JSON lines to a small queue of its own; the
caller takes unit 0 from reader 0, unit 1 from reader 1, and so on. So the
chunks come out in the single stream's order — the file, its checksum and the
manifest are the same bytes — and memory stays flat: each reader is at most
``_AHEAD`` chunks ahead of the caller, then waits (and its server, on a
socket, waits too).

The database drivers release the GIL while a statement runs or a socket is
read, so the readers' threads really run at the same time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_AHEAD = 2  # chunks a reader may hold ready beyond the one the caller takes
_POLL = 0.05  # seconds between checks for a stop while a queue is full


class Stopped(Exception):
    """Raised inside a reader when the caller no longer wants its chunks."""


class Feed(Generic[T]):
    """What a reader hands its chunks to: ``put(chunk)``, ``end_unit()`` after each unit."""

    def __init__(self, stop: threading.Event) -> None:
        self._queue: queue.Queue[tuple[str, object]] = queue.Queue(_AHEAD)
        self._stop = stop

    def _hand(self, kind: str, item: object) -> None:
        while True:
            if self._stop.is_set():
                raise Stopped
            try:
                self._queue.put((kind, item), timeout=_POLL)
                return
            except queue.Full:
                continue

    def put(self, chunk: T) -> None:
        """One chunk of the current unit; raises Stopped once the caller has gone."""
        self._hand("chunk", chunk)

    def end_unit(self) -> None:
        """The current unit is complete (it may have had no chunk at all)."""
        self._hand("end", None)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()


Reader = Callable[[Feed[T]], None]


def in_order(
    readers: list[Reader[T]], name: str = "read", on_stop: Callable[[], None] | None = None
) -> Iterator[T]:
    """The chunks of every reader's units, in unit order (see the module docstring).

    Each reader runs ``reader(feed)`` in a thread of its own: it reads its
    units in order and calls ``feed.put`` for each chunk and ``feed.end_unit``
    after each unit; it returns when it has no unit left. An exception in a
    reader is raised here, in the caller's thread. When the caller stops early
    (or a reader fails), ``on_stop`` is called (to cancel the statements that
    are running) and every reader is joined before this generator ends, so
    the connections are free again. ``name`` names the readers' threads.
    """
    stop = threading.Event()
    feeds = [Feed[T](stop) for _ in readers]
    finished = object()

    def run(reader: Reader[T], feed: Feed[T]) -> None:
        try:
            reader(feed)
            feed._hand("done", finished)
        except Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 — raised again in the caller's thread
            try:
                feed._hand("error", exc)
            except Stopped:
                return

    threads = [
        threading.Thread(target=run, args=(reader, feed), name=name, daemon=True)
        for i, (reader, feed) in enumerate(zip(readers, feeds, strict=True))
    ]
    for thread in threads:
        thread.start()
    completed = False
    try:
        turn = 0
        while True:
            kind, item = feeds[turn]._queue.get()
            if kind == "chunk":
                yield item  # type: ignore[misc]
            elif kind == "end":
                turn = (turn + 1) % len(feeds)
            elif kind == "done":
                # Units are numbered without gaps: once the reader whose turn it is has no
                # unit left, no reader has.
                completed = True
                return
            else:
                raise item  # type: ignore[misc]
    finally:
        stop.set()
        if not completed and on_stop is not None:
            on_stop()
        for thread in threads:
            thread.join()
