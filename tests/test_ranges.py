"""Range and If-Range on both download routes, against RFC 9110 sections 14.1-14.2.

One table drives the stored ZIP and the single-file download alike: what the client sends,
and what it gets back (status, Content-Range, Content-Length, body) for a body of ``size``
bytes. Multiple ranges are ignored (200, the whole body): the service never answers
multipart/byteranges.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from helpers import InProcessService

from extracts.http import RangeNotSatisfiable
from extracts.ranges import parse_range

HUGE = "9" * 5000


@dataclass(frozen=True)
class Case:
    """``headers`` for a body of ``size`` bytes → the bytes [start, end) as 206; None: 200 whole; "416"."""

    headers: Callable[[int, str], list[tuple[str, str]]]
    expect: Callable[[int], tuple[int, int] | str | None]


def rng(value: str) -> Callable[[int, str], list[tuple[str, str]]]:
    return lambda size, etag: [("Range", value.format(size=size))]


CASES: dict[str, Case] = {
    "no Range": Case(lambda size, etag: [], lambda size: None),
    "first byte": Case(rng("bytes=0-0"), lambda size: (0, 1)),
    "closed range": Case(rng("bytes=1-3"), lambda size: (1, 4)),
    "open-ended": Case(rng("bytes=5-"), lambda size: (5, size)),
    "from 0": Case(rng("bytes=0-"), lambda size: (0, size)),
    "last byte": Case(
        lambda size, etag: [("Range", f"bytes={size - 1}-{size - 1}")], lambda size: (size - 1, size)
    ),
    "last-pos past the end": Case(rng("bytes=2-99999999"), lambda size: (2, size)),
    "suffix": Case(rng("bytes=-5"), lambda size: (size - 5, size)),
    "suffix longer than the body": Case(rng("bytes=-99999999"), lambda size: (0, size)),
    "unit in capitals": Case(rng("Bytes=1-3"), lambda size: (1, 4)),
    "whitespace before the range": Case(rng("bytes= \t1-3"), lambda size: (1, 4)),
    "empty list elements": Case(rng("bytes=, ,1-3,"), lambda size: (1, 4)),
    "starts at the end": Case(rng("bytes={size}-"), lambda size: "416"),
    "starts past the end": Case(rng("bytes=99999999-99999999"), lambda size: "416"),
    "zero-length suffix": Case(rng("bytes=-0"), lambda size: "416"),
    "last-pos before first-pos": Case(rng("bytes=20-10"), lambda size: None),
    "last-pos before first-pos, past the end": Case(rng("bytes=99999999-1"), lambda size: None),
    "5-1": Case(rng("bytes=5-1"), lambda size: None),
    "not a number": Case(rng("bytes=abc"), lambda size: None),
    "hexadecimal": Case(rng("bytes=0x1-2"), lambda size: None),
    "negative": Case(rng("bytes=--1"), lambda size: None),
    "three parts": Case(rng("bytes=1-2-3"), lambda size: None),
    "no positions": Case(rng("bytes=-"), lambda size: None),
    "no range set": Case(rng("bytes="), lambda size: None),
    "no unit": Case(rng("=1-3"), lambda size: None),
    "unit alone": Case(rng("bytes"), lambda size: None),
    "other unit": Case(rng("items=0-1"), lambda size: None),
    "space before =": Case(rng("bytes =1-3"), lambda size: None),
    "space inside": Case(rng("bytes=1 -3"), lambda size: None),
    "superscript digit": Case(rng("bytes=\u00b2-3"), lambda size: None),
    "two ranges": Case(rng("bytes=0-0,5-9"), lambda size: None),
    "two ranges, one past the end": Case(rng("bytes=0-0,999999999999-"), lambda size: None),
    "two ranges, none satisfiable": Case(rng("bytes=99999999-,99999998-"), lambda size: None),
    "two ranges, one invalid": Case(rng("bytes=5-1,0-3"), lambda size: None),
    "thousands of leading zeros": Case(rng("bytes=" + "0" * 5000 + "1-"), lambda size: (1, size)),
    "thousands of digits, first-pos": Case(rng(f"bytes={HUGE}-"), lambda size: "416"),
    "thousands of digits, last-pos": Case(rng(f"bytes=3-{HUGE}"), lambda size: (3, size)),
    "thousands of digits, suffix": Case(rng(f"bytes=-{HUGE}"), lambda size: (0, size)),
    "thousands of digits, last-pos before first-pos": Case(
        rng(f"bytes={HUGE}-{HUGE[1:]}"), lambda size: None
    ),
    "thousands of digits, both equal": Case(rng(f"bytes={HUGE}-{HUGE}"), lambda size: "416"),
    "two Range headers": Case(
        lambda size, etag: [("Range", "bytes=1-3"), ("Range", "bytes=1-3")], lambda size: None
    ),
    "If-Range matching": Case(
        lambda size, etag: [("Range", "bytes=1-3"), ("If-Range", etag)], lambda size: (1, 4)
    ),
    "If-Range matching, past the end": Case(
        lambda size, etag: [("Range", f"bytes={size}-"), ("If-Range", etag)], lambda size: "416"
    ),
    "If-Range stale": Case(
        lambda size, etag: [("Range", "bytes=1-3"), ("If-Range", '"stale"')], lambda size: None
    ),
    "If-Range stale, past the end": Case(
        lambda size, etag: [("Range", f"bytes={size}-"), ("If-Range", '"stale"')], lambda size: None
    ),
    "If-Range weak": Case(
        lambda size, etag: [("Range", "bytes=1-3"), ("If-Range", "W/" + etag)], lambda size: None
    ),
    "If-Range a date": Case(
        lambda size, etag: [("Range", "bytes=1-3"), ("If-Range", "Sun, 06 Nov 1994 08:49:37 GMT")],
        lambda size: None,
    ),
    "two If-Range headers": Case(
        lambda size, etag: [("Range", "bytes=1-3"), ("If-Range", etag), ("If-Range", etag)], lambda size: None
    ),
}


# The cases that are one Range value and nothing else, for the parser alone.
ONE_VALUE = [name for name, case in CASES.items() if [h for h, _ in case.headers(1000, "")] == ["Range"]]


@pytest.mark.parametrize("name", ONE_VALUE)
def test_parse_range(name: str) -> None:
    case = CASES[name]
    [(_, header)] = case.headers(1000, "")
    expected = case.expect(1000)
    if expected == "416":
        with pytest.raises(RangeNotSatisfiable) as caught:
            parse_range(header, 1000)
        assert caught.value.headers == {"Content-Range": "bytes */1000"}
    else:
        assert parse_range(header, 1000) == expected


def test_an_empty_body_has_no_range() -> None:
    for header in ("bytes=0-", "bytes=0-0"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(header, 0)
    assert parse_range("bytes=-5", 0) is None  # no Content-Range can name 0 bytes: 200, empty
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-0", 0)


@pytest.fixture(scope="module")
def downloads(app_service: InProcessService) -> dict[str, tuple[str, bytes, str]]:
    """Each route's URL, its whole body and its ETag."""
    extract = app_service.create_extract(name="Ranges", schemas=["users", "orders"], compress=False)
    run = app_service.wait_run(app_service.run(extract["id"]))
    artifact = app_service.client.get(
        "/api/data/extract_artifacts",
        params={"filter[where][run_id]": run["id"], "filter[where][artifact_type]": "data-orders"},
    ).json()["data"][0]
    urls = {
        "zip": f"/api/extracts/runs/{run['id']}/download",
        "file": f"/api/extracts/artifacts/{artifact['id']}/download",
    }
    out = {}
    for route, url in urls.items():
        whole = app_service.client.get(url)
        assert whole.status_code == 200 and len(whole.content) > 1000
        out[route] = (url, whole.content, whole.headers["etag"])
    return out


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("route", ["zip", "file"])
def test_range_requests(app_service: InProcessService, downloads: dict, route: str, name: str) -> None:
    url, whole, etag = downloads[route]
    size = len(whole)
    headers = [(h, v.encode("latin-1")) for h, v in CASES[name].headers(size, etag)]
    r = app_service.client.get(url, headers=headers)
    expected = CASES[name].expect(size)
    if expected == "416":
        assert r.status_code == 416
        assert r.headers["content-range"] == f"bytes */{size}"
        assert r.json()["error_code"] == "RANGE_NOT_SATISFIABLE"
        assert r.headers["content-type"] == "application/json"
    elif expected is None:
        assert r.status_code == 200, r.text[:200]
        assert "content-range" not in r.headers
        assert r.content == whole
        assert int(r.headers["content-length"]) == size
    else:
        start, end = expected
        assert r.status_code == 206, r.text[:200]
        assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
        assert int(r.headers["content-length"]) == end - start
        assert r.content == whole[start:end]
    assert r.headers.get("accept-ranges") == ("bytes" if r.status_code != 416 else None)


@pytest.mark.parametrize(
    "name",
    ["no Range", "closed range", "starts past the end", "zero-length suffix", "If-Range matching", "5-1"],
)
@pytest.mark.parametrize("route", ["zip", "file"])
def test_head_has_no_ranges(app_service: InProcessService, downloads: dict, route: str, name: str) -> None:
    """RFC 9110 section 14.2: only GET has ranges; HEAD answers the whole body's headers."""
    url, whole, etag = downloads[route]
    head = app_service.client.head(url, headers=CASES[name].headers(len(whole), etag))
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(whole) and "content-range" not in head.headers
    assert head.headers["etag"] == etag and head.headers["accept-ranges"] == "bytes"


CONDITIONS = {  # headers (given the ETag) -> status of a GET, RFC 9110 section 13.2.2
    "If-None-Match current": (lambda etag: {"If-None-Match": etag}, 304),
    "If-None-Match weak": (lambda etag: {"If-None-Match": "W/" + etag}, 304),
    "If-None-Match in a list": (lambda etag: {"If-None-Match": f'"other", {etag}'}, 304),
    "If-None-Match *": (lambda etag: {"If-None-Match": "*"}, 304),
    "If-None-Match current, with a Range": (lambda etag: {"If-None-Match": etag, "Range": "bytes=1-3"}, 304),
    "If-None-Match current, with a Range past the end": (
        lambda etag: {"If-None-Match": etag, "Range": "bytes=99999999-"},
        304,
    ),
    "If-None-Match stale": (lambda etag: {"If-None-Match": '"stale"'}, 200),
    "If-None-Match not a tag": (lambda etag: {"If-None-Match": etag[1:-1]}, 200),
    "If-Match current": (lambda etag: {"If-Match": etag}, 200),
    "If-Match *": (lambda etag: {"If-Match": "*"}, 200),
    "If-Match current, with a Range": (lambda etag: {"If-Match": etag, "Range": "bytes=1-3"}, 206),
    "If-Match stale": (lambda etag: {"If-Match": '"stale"'}, 412),
    "If-Match weak": (lambda etag: {"If-Match": "W/" + etag}, 412),
    "If-Match stale, with If-None-Match current": (
        lambda etag: {"If-Match": '"stale"', "If-None-Match": etag},
        412,
    ),
}


@pytest.mark.parametrize("name", list(CONDITIONS))
@pytest.mark.parametrize("route", ["zip", "file"])
def test_conditional_requests(app_service: InProcessService, downloads: dict, route: str, name: str) -> None:
    """If-None-Match naming the ETag is a 304 without a body; If-Match not naming it, a 412."""
    url, whole, etag = downloads[route]
    headers, status = CONDITIONS[name]
    r = app_service.client.get(url, headers=headers(etag))
    assert r.status_code == status, r.text[:200]
    if status == 304:
        assert r.content == b"" and r.headers["etag"] == etag and "content-length" not in r.headers
        assert app_service.client.head(url, headers=headers(etag)).status_code == 304
    elif status == 412:
        assert r.json()["error_code"] == "PRECONDITION_FAILED" and etag in r.json()["error"]
    elif status == 200:
        assert r.content == whole
    else:
        assert r.content == whole[1:4]


def test_the_deflated_zip_ignores_range(app_service: InProcessService, downloads: dict) -> None:
    url, _, _ = downloads["zip"]
    whole = app_service.client.get(url, params={"compression": "deflate"})
    for header in ("bytes=1-3", "bytes=99999999-", "bytes=-0"):
        r = app_service.client.get(url, params={"compression": "deflate"}, headers={"Range": header})
        assert r.status_code == 200 and r.content == whole.content
        assert "content-range" not in r.headers and "content-length" not in r.headers
    head = app_service.client.head(url, params={"compression": "deflate"})
    assert head.status_code == 200 and "content-length" not in head.headers


def test_a_download_counts_once_when_it_starts_at_byte_0(app_service: InProcessService) -> None:
    extract = app_service.create_extract(name="Counted", schemas=["users"], compress=False)
    run = app_service.wait_run(app_service.run(extract["id"]))

    def counts() -> list[int]:
        artifacts = app_service.client.get(
            "/api/data/extract_artifacts", params={"filter[where][run_id]": run["id"]}
        ).json()["data"]
        return [a["download_count"] for a in artifacts]

    zip_url = f"/api/extracts/runs/{run['id']}/download"
    n = len(counts())
    requests = [  # (params, headers, counted)
        ({}, {}, True),
        ({}, {"Range": "bytes=0-99"}, True),
        ({}, {"Range": "bytes=100-"}, False),  # a resumed download
        ({}, {"Range": "bytes=-10"}, False),
        ({}, {"Range": "bytes=100-", "If-Range": '"stale"'}, True),  # sent whole
        ({}, {"Range": "bytes=20-10"}, True),  # invalid: sent whole
        ({}, {"Range": "bytes=99999999-"}, False),  # 416
        ({"compression": "deflate"}, {"Range": "bytes=100-"}, True),  # no ranges: sent whole
    ]
    expected = 0
    for params, headers, is_counted in requests:
        app_service.client.get(zip_url, params=params, headers=headers)
        app_service.client.head(zip_url, params=params, headers=headers)  # never counted
        expected += is_counted
        assert counts() == [expected] * n, (params, headers)
    etag = app_service.client.head(zip_url).headers["etag"]
    assert app_service.client.get(zip_url, headers={"If-None-Match": etag}).status_code == 304
    assert counts() == [expected] * n  # nothing was sent
