"""Schedules: the 5-field cron grammar ``schedule`` accepts, and the next due time of one.

The grammar is a regular expression that validation and the OpenAPI document
both use; croniter (a dependency: day-of-month/day-of-week rules and the
calendar are its job) steps through the dates.

Ranges and steps are ours to read, not croniter's: croniter 7 takes a range of one
value (``1-1``, ``sun-sun``, ``1-1/2``) for the whole field, a list holding one
(``1-1,15``) included, and reads ``7/2`` in the weekday field as every other day.
Classic cron reads ``N-N`` as ``N``, so croniter is given each range and
``start/step`` item as the list of values it stands for (``classic``), and only
``*``, ``*/step`` and plain numbers of its own. A range that runs backwards
(``30-10``, ``sat-sun``) is refused, as classic cron refuses it; croniter would
wrap it around the end of the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from croniter import croniter

from extracts.state import iso

SCHEDULE_MAX = 200  # room for a list of all 60 minutes; croniter's work stays small


MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True)
class _Field:
    """One of the five fields: its values, the end of a ``start/step`` item, and its names."""

    name: str
    low: int
    high: int  # 7 in the weekday field: Sunday again, as in classic cron
    step_end: int  # where ``start/step`` stops: croniter's field end (6, not 7, for weekdays)
    names: tuple[str, ...] = ()
    first_name: int = 0  # the value of names[0]

    def value(self, text: str) -> int:
        """A number or a name of this field as its value."""
        if text[0].isdigit():
            return int(text)
        return self.names.index(text.lower()) + self.first_name


FIELDS = (
    _Field("minute", 0, 59, 59),
    _Field("hour", 0, 23, 23),
    _Field("day-of-month", 1, 31, 31),
    _Field("month", 1, 12, 12, MONTHS, 1),
    _Field("day-of-week", 0, 7, 6, DAYS, 0),
)


def _grammar() -> str:
    """The 5-field cron expressions ``schedule`` accepts: numbers, names, ranges, steps and lists.

    Every expression it matches is one croniter parses (tests/test_api_extracts.py checks
    each item of each field); croniter's own extensions (L, W, #, ?) are not part of it.
    Whether a range runs forwards is beyond a regular expression: ``backwards_ranges``.
    """

    def anycase(word: str) -> str:
        return "".join(f"[{c}{c.upper()}]" for c in word)

    numbers = (
        r"0?[0-9]|[1-5][0-9]",
        r"0?[0-9]|1[0-9]|2[0-3]",
        r"0?[1-9]|[12][0-9]|3[01]",
        r"0?[1-9]|1[0-2]",
        r"0?[0-7]",
    )
    parts = []
    for field, number in zip(FIELDS, numbers, strict=True):
        value = "|".join((number, *map(anycase, field.names)))
        item = rf"(?:\*|(?:{value})(?:-(?:{value}))?)(?:/[1-9][0-9]?)?"
        parts.append(rf"{item}(?:,{item})*")
    return r"[ \t]*" + r"[ \t]+".join(parts) + r"[ \t]*"


CRON = _grammar()


def _bounds(field: _Field, item: str) -> tuple[int, int, int] | None:
    """An item's first value, last value and step; None for ``*`` and ``*/step``."""
    span, _, step = item.partition("/")
    start, _, end = span.partition("-")
    if start == "*":
        return None
    first = field.value(start)
    if end:
        last = field.value(end)
    elif step:
        last = max(field.step_end, first)  # "7/2" in the weekday field: Sunday alone
    else:
        last = first
    return first, last, int(step or 1)


def _items(schedule: str) -> list[list[tuple[_Field, str]]]:
    """The items of each field of ``schedule`` (which CRON matches: five fields)."""
    fields = zip(FIELDS, schedule.split(), strict=True)
    return [[(field, item) for item in text.split(",")] for field, text in fields]


def backwards_ranges(schedule: str) -> list[str]:
    """Sentences naming each range of ``schedule`` (which CRON matches) that runs backwards."""
    problems = []
    for items in _items(schedule):
        for field, item in items:
            bounds = _bounds(field, item)
            if bounds is not None and bounds[0] > bounds[1]:
                problems.append(
                    f"range '{item}' in the {field.name} field runs backwards: cron ranges go from low "
                    f"to high ({field.low}-{field.high}); split it into two ranges or a list"
                )
    return problems


def classic(schedule: str) -> str:
    """``schedule`` (which CRON matches) with each range and ``start/step`` item as its values.

    What croniter is given: it then reads only ``*``, ``*/step`` and numbers, which it reads
    the classic way (module docstring). ``*`` items stay, so whether the day-of-month or the
    day-of-week field is ``*`` (the rule that joins them with "or") is unchanged.
    ValueError for a range that runs backwards.
    """
    fields = []
    for items in _items(schedule):
        values = []
        for field, item in items:
            bounds = _bounds(field, item)
            if bounds is None:
                values.append(item)
                continue
            first, last, step = bounds
            if first > last:
                raise ValueError(f"range {item!r} runs backwards")
            values += map(str, range(first, last + 1, step))
        fields.append(",".join(values))
    return " ".join(fields)


def next_due(schedule: str, after: datetime) -> str | None:
    """The first due time of a cron expression after ``after``; None when no date matches it.

    CPU work proportional to the expression: callers run it in a worker thread. An expression
    stored before today's grammar goes to croniter as it is.
    """
    try:
        expression = classic(schedule) if re.fullmatch(CRON, schedule) else schedule
        return iso(croniter(expression, after).get_next(datetime))
    except (
        ValueError
    ):  # CroniterBadDateError ('0 0 31 2 *'), an expression croniter refuses, a backwards range
        return None
