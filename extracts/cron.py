"""Schedules: the 5-field cron grammar ``schedule`` accepts, and the next due time of one.

The grammar is a regular expression that validation and the OpenAPI document
both use; croniter (a dependency: day-of-month/day-of-week rules and the
calendar are its job) steps through the dates.
"""

from __future__ import annotations

from datetime import datetime

from croniter import croniter

from extracts.state import iso

SCHEDULE_MAX = 200  # room for a list of all 60 minutes; croniter's work stays small


def _grammar() -> str:
    """The 5-field cron expressions ``schedule`` accepts: numbers, names, ranges, steps and lists.

    Every expression it matches is one croniter parses (tests/test_api_extracts.py checks
    each item of each field); croniter's own extensions (L, W, #, ?) are not part of it.
    """

    def anycase(word: str) -> str:
        return "".join(f"[{c}{c.upper()}]" for c in word)

    months = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    days = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
    fields = (
        (r"0?[0-9]|[1-5][0-9]",),
        (r"0?[0-9]|1[0-9]|2[0-3]",),
        (r"0?[1-9]|[12][0-9]|3[01]",),
        (r"0?[1-9]|1[0-2]", *map(anycase, months)),
        (r"0?[0-7]", *map(anycase, days)),
    )
    parts = []
    for alternatives in fields:
        value = "|".join(alternatives)
        item = rf"(?:\*|(?:{value})(?:-(?:{value}))?)(?:/[1-9][0-9]?)?"
        parts.append(rf"{item}(?:,{item})*")
    return r"[ \t]*" + r"[ \t]+".join(parts) + r"[ \t]*"


CRON = _grammar()


def next_due(schedule: str, after: datetime) -> str | None:
    """The first due time of a cron expression after ``after``; None when no date matches it.

    CPU work proportional to the expression: callers run it in a worker thread.
    """
    try:
        return iso(croniter(schedule, after).get_next(datetime))
    except ValueError:  # CroniterBadDateError ('0 0 31 2 *'), or an expression croniter refuses
        return None
