"""Byte ranges and conditions of a download, as RFC 9110 (sections 13-14) has them, for both routes.

If-Match without the ETag gets 412 and If-None-Match with it 304, before any
range is read (section 13.2.2). A valid single range gets 206; one that starts
past the end gets 416. Anything else — invalid syntax, several ranges, Range or
If-Range sent twice, an If-Range that is not the ETag, HEAD — gets the whole
body (a server may ignore Range), so a client never sees multipart/byteranges.
"""

from __future__ import annotations

import re

from starlette.requests import Request

from extracts.http import PreconditionFailed, RangeNotSatisfiable


def not_modified(request: Request, etag: str, what: str) -> bool:
    """Whether the client's copy is current (If-None-Match names the ETag, or ``*``): a 304.

    RFC 9110 sections 13.1.1-13.1.2: If-Match compares strongly (a weak tag never
    matches) and raises PreconditionFailed (412) when no tag matches and it is not
    ``*``; If-None-Match compares weakly. A value that is not ``*`` nor a list of
    entity tags is ignored. The date conditions are not read (no Last-Modified here
    is as precise as the ETag): the body is sent.
    """
    if_match = _entity_tags(request.headers.getlist("if-match"))
    if if_match and "*" not in if_match and etag not in if_match:
        raise PreconditionFailed(
            f"If-Match does not name the {what}'s ETag, {etag}; send it without If-Match to get it as it is"
        )
    if_none_match = _entity_tags(request.headers.getlist("if-none-match"))
    return "*" in if_none_match or etag in {tag.removeprefix("W/") for tag in if_none_match}


ENTITY_TAG = re.compile(r'(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"')


def _entity_tags(values: list[str]) -> set[str]:
    """The entity tags (or ``*``) of each valid value of a list header; one not valid is ignored.

    Empty list elements are allowed (RFC 9110 section 5.6.1); no ETag of the service holds a comma.
    """
    tags: set[str] = set()
    for value in values:
        items = [item for item in (part.strip(" \t") for part in value.split(",")) if item]
        if items == ["*"] or (items and all(ENTITY_TAG.fullmatch(item) for item in items)):
            tags.update(items)
    return tags


def requested_range(request: Request, etag: str, size: int, what: str) -> tuple[int, int] | None:
    """The byte range a request asks for, as [start, end); None to send the whole body.

    RFC 9110 section 14.2: only GET has ranges (HEAD gets the whole body's headers);
    Range or If-Range sent twice, or an If-Range other than the ETag (a date
    included: no Last-Modified is strong enough), gets the whole body. The header
    itself is read by ``parse_range``.
    """
    if request.method != "GET":
        return None
    ranges, if_ranges = request.headers.getlist("range"), request.headers.getlist("if-range")
    if len(ranges) != 1 or len(if_ranges) > 1 or (if_ranges and if_ranges[0].strip() != etag):
        return None
    return parse_range(ranges[0], size, what)


RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")


def parse_range(header: str, size: int, what: str = "file") -> tuple[int, int] | None:
    """The one byte range a Range value selects in ``size`` bytes, as [start, end); None to
    ignore the header and send the whole body (RFC 9110 sections 14.1-14.2).

    Ignored: anything but valid ``bytes=`` syntax (a last-pos before its
    first-pos is invalid: ``bytes=5-1``), and more than one range (the service
    never answers multipart/byteranges). A single range starting at or past the
    end, or a suffix of 0 bytes, raises RangeNotSatisfiable (416). Positions of
    any number of digits are read without int()'s 4,300-digit limit.
    """
    unit, equals, range_set = header.strip(" \t").partition("=")
    if not equals or unit.lower() != "bytes":
        return None
    # A list may hold empty elements (RFC 9110 section 5.6.1): "bytes=, 0-5" is one range.
    specs = [spec for spec in (part.strip(" \t") for part in range_set.split(",")) if spec]
    match = RANGE_SPEC.fullmatch(specs[0]) if len(specs) == 1 else None
    if match is None or match[0] == "-":
        return None
    first, last = match[1], match[2]
    unsatisfiable = {"Content-Range": f"bytes */{size}"}
    if not first:  # the last N bytes
        if _number(last) == 0:
            raise RangeNotSatisfiable(
                f"The range asks for the last 0 bytes of the {size}-byte {what}", headers=unsatisfiable
            )
        # An empty body has no byte to name in a Content-Range: it is sent whole.
        return (max(size - _number(last), 0), size) if size else None
    if last and _less(last, first):
        return None
    start = _number(first)
    if start >= size:
        raise RangeNotSatisfiable(
            f"The range starts at or past the end of the {size}-byte {what}", headers=unsatisfiable
        )
    return start, min(_number(last) + 1, size) if last else size


def _number(digits: str) -> int:
    """A position or length; past any size when it has more than 18 significant digits."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else 10**18


def _less(a: str, b: str) -> bool:
    """Whether the number written ``a`` is less than ``b``, whatever their lengths."""
    a, b = a.lstrip("0"), b.lstrip("0")
    return (len(a), a) < (len(b), b)
