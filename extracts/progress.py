"""How a run shows on the command line: a progress bar, one line per schema, or nothing.

``export`` feeds a view from its worker's messages, ``run --wait`` from the
run's status URL; both hand it the same two things (SPEC: Command line)::

    progress_detail (phase, current schema, records exported / total) ─► view.update
    data artifacts (schema, records)                                   ─► view.artifacts

A schema is finished once the run has moved on to another one (or to the
manifest): its line then gives its records and files, summed over its
artifacts, so split parts make one line.

The bar is rich's (``rich.progress``): it composes the columns asked for
(schema, records, rows/s, ETA) from stock parts, redraws in place only when
the stream is a terminal, and prints the schema lines above itself. Every view
writes to stderr: stdout stays free for what a command prints as its result.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, Protocol, TextIO

from executor.messages import Phase

# Phases after which no schema is being exported any more.
_PAST_DATA = {Phase.WRITING_MANIFEST.value, Phase.COMPLETED.value, Phase.FAILED.value, Phase.CANCELLED.value}
_ALL_WRITTEN = {Phase.WRITING_MANIFEST.value, Phase.COMPLETED.value}  # the schema it was on is whole


class View(Protocol):
    def update(self, detail: dict[str, Any]) -> None: ...
    def artifacts(self, items: Iterable[dict[str, Any]]) -> None: ...
    def restarted(self) -> None: ...
    def note(self, line: str) -> None: ...
    def close(self) -> None: ...


RESTARTED = "The run went back to the queue (the service running it stopped); it starts again"


class SchemaTally:
    """Which schemas are finished, from the run's data artifacts and where its progress is."""

    def __init__(self) -> None:
        self._records: dict[str, int] = {}  # schema -> records, in the order their files came
        self._files: dict[str, set[str]] = {}
        self._told: set[str] = set()

    def add(self, items: Iterable[dict[str, Any]]) -> None:
        for item in items:
            if not item["artifact_type"].startswith("data-"):
                continue
            schema = item["schema_name"]
            names = self._files.setdefault(schema, set())
            if item["artifact_name"] not in names:  # the status poll lists the same artifact again
                names.add(item["artifact_name"])
                self._records[schema] = self._records.get(schema, 0) + (item["records"] or 0)

    def forget(self) -> None:
        """The run starts again: the files of its earlier attempt are gone (lines given stay given)."""
        self._records.clear()
        self._files.clear()

    def finished(self, detail: dict[str, Any]) -> list[str]:
        """Lines for the schemas finished since the last call."""
        current = None if detail["phase"] in _ALL_WRITTEN else detail["current_schema"]
        lines = []
        for schema, records in self._records.items():
            if schema != current and schema not in self._told:
                self._told.add(schema)
                files = len(self._files[schema])
                lines.append(f"{schema}: {records:,} records" + (f" in {files} files" if files > 1 else ""))
        return lines


def _label(detail: dict[str, Any]) -> str:
    if detail["current_schema"] and detail["phase"] not in _PAST_DATA:
        done, total = detail["schemas_completed"], detail["schemas_total"]
        return f"{detail['current_schema']} ({done + 1}/{total})" if total else detail["current_schema"]
    return detail["phase"].replace("_", " ")


class Lines:
    """Not a terminal: one line per finished schema, and the notes."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tally = SchemaTally()

    def update(self, detail: dict[str, Any]) -> None:
        for line in self.tally.finished(detail):
            self.note(line)

    def artifacts(self, items: Iterable[dict[str, Any]]) -> None:
        self.tally.add(items)

    def restarted(self) -> None:
        self.tally.forget()
        self.note(RESTARTED)

    def note(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """The run ended (its last update came): the lines are all out."""


class Quiet:
    """``--quiet``: nothing at all (errors still go to stderr, from the command)."""

    def update(self, detail: dict[str, Any]) -> None: ...
    def artifacts(self, items: Iterable[dict[str, Any]]) -> None: ...
    def restarted(self) -> None: ...
    def note(self, line: str) -> None: ...
    def close(self) -> None: ...


class Bar(Lines):
    """A terminal: rich's progress bar (schema, records, rows/s, ETA), schema lines above it."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        super().__init__()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[records]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            refresh_per_second=8,
        )
        self._task = self._progress.add_task("starting", total=None, records="", rate="")
        self._progress.start()

    def update(self, detail: dict[str, Any]) -> None:
        from rich.markup import escape  # rich is imported for a terminal only (make_view)

        done, total = detail["records_exported"], detail["records_total"]
        # The description column renders markup: a schema named "z[/foo]" is text, not a tag.
        description = escape(_label(detail))
        self._progress.update(self._task, description=description, completed=done, total=total or None)
        speed = self._progress.tasks[0].speed
        self._progress.update(
            self._task,
            records=f"{done:,}/{total:,} records" if total else f"{done:,} records",
            rate=f"{speed:,.0f} rows/s" if speed else "",
        )
        super().update(detail)

    def note(self, line: str) -> None:
        self._progress.console.print(line, markup=False, highlight=False)

    def close(self) -> None:
        self._progress.stop()


def make_view(quiet: bool) -> View:
    """The bar when stderr is a terminal, lines otherwise, nothing with ``--quiet``."""
    if quiet:
        return Quiet()
    from rich.console import Console

    console = Console(stderr=True)
    if console.is_terminal and not console.is_dumb_terminal:
        return Bar(console)
    return Lines()
