"""The web page (SPEC: Web page and metrics), in a real headless browser.

Debian's chromium driven by Playwright (``executable_path``: no browser is
downloaded). One service for the module, on the shop plus a ``big`` table whose
runs last a few seconds, so that progress can be watched and a run cancelled.
Every test's tab records the requests it makes and the errors its console shows:
none may go to another host, none may be a script error or a refused policy.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import subprocess
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from helpers import (
    Service,
    add_big_table,
    app_command,
    http_get,
    make_shop_db,
    start_service,
    wait_healthy,
)
from playwright.sync_api import Browser, Page, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
TOKEN = "test-token-0123456789"  # the conftest service's
BIG_ROWS = 1_500_000
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}


@pytest.fixture(scope="module")
def shop_db(shop_db: Path) -> Path:
    """The shop (conftest's, for this module only) plus a table a run takes seconds over."""
    return add_big_table(shop_db, BIG_ROWS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@dataclass
class Tab:
    """A browser tab on the service, with what it requested and what its console said."""

    page: Page
    requests: list[tuple[float, str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def api_calls(self, method: str, path: str) -> list[float]:
        """When the page sent ``method`` to an /api URL whose path starts with ``path``."""
        return [t for t, m, url in self.requests if m == method and urlsplit(url).path.startswith(path)]


def open_tab(browser: Browser, base_url: str, viewport: dict[str, int] = LAPTOP) -> Tab:
    context = browser.new_context(base_url=base_url, viewport=viewport, accept_downloads=True)
    tab = Tab(context.new_page())
    tab.page.on("request", lambda r: tab.requests.append((time.monotonic(), r.method, r.url)))
    # A 4xx the page handles is still logged by chromium as "Failed to load resource": not an error.
    tab.page.on(
        "console",
        lambda m: (
            m.type == "error"
            and not m.text.startswith("Failed to load resource")
            and tab.errors.append(m.text)
        ),
    )
    tab.page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    tab.page.on("dialog", lambda d: tab.errors.append(f"unexpected dialog: {d.message}"))
    return tab


@pytest.fixture
def tab(browser: Browser, service: Any) -> Iterator[Tab]:
    tab = open_tab(browser, service.base_url)
    yield tab
    tab.page.context.close()
    check_tab(tab, service.base_url)


def check_tab(tab: Tab, base_url: str) -> None:
    origin = urlsplit(base_url).netloc
    foreign = [
        url for _, _, url in tab.requests if not url.startswith("blob:") and urlsplit(url).netloc != origin
    ]
    assert not foreign, f"requests to another host: {foreign}"
    assert not tab.errors, f"console errors: {tab.errors}"


def connect(page: Page, token: str = TOKEN) -> None:
    page.goto("/")
    page.fill("#token", token)
    page.get_by_role("button", name="Connect").click()
    if token == TOKEN:
        expect(page.get_by_role("heading", name="Extracts")).to_be_visible()


def extract_id_of(page: Page) -> str:
    page.wait_for_url(re.compile(r"#/extracts/extract_\w+$"))
    return page.url.rsplit("/", 1)[1]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- served as it should be


def test_the_page_is_public_and_served_with_a_strict_policy(service: Any) -> None:
    r = http_get(f"{service.base_url}/")  # no token
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    directives = [d.split() for d in r.headers["content-security-policy"].split("; ")]
    policy = {d[0]: d[1:] for d in directives}
    assert policy["default-src"] == ["'none'"]
    for directive in ("script-src", "style-src", "connect-src", "img-src"):
        assert policy[directive] == ["'self'"], directive
    assert policy["frame-ancestors"] == ["'none'"] and policy["base-uri"] == ["'none'"]
    assert r.headers["x-content-type-options"] == "nosniff"
    html = r.text
    # Nothing inline for the policy to refuse, nothing from elsewhere.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html) and "<style" not in html
    assert not re.search(r"\s(style|on\w+)=", html)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assets = re.findall(r"(?:src|href)=\"(assets/[^\"]+)\"", html)
    assert sorted(set(assets)) == ["assets/app.css", "assets/app.js", "assets/icon.svg"]
    for asset in assets:
        a = http_get(f"{service.base_url}/{asset}")
        assert (
            a.status_code == 200
            and a.headers["content-security-policy"] == r.headers["content-security-policy"]
        )
        remote = re.sub(rb'xmlns="http://www.w3.org/2000/svg"', b"", a.content)  # a name, not a fetch
        assert not re.search(rb"https?://", remote), asset
        etag = a.headers["etag"]
        again = http_get(f"{service.base_url}/{asset}", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
    script = http_get(f"{service.base_url}/assets/app.js").text
    assert "innerHTML" not in script and "eval(" not in script  # text is always set as text
    r = http_get(f"{service.base_url}/assets/../extracts.db")
    assert r.status_code == 404
    r = http_get(f"{service.base_url}/assets/nope.js")
    assert r.status_code == 404 and r.json()["error_code"] == "RECORD_NOT_FOUND"


# ---------------------------------------------------------------- the token


@pytest.mark.slow
def test_a_wrong_token_gives_a_clear_message(tab: Tab) -> None:
    page = tab.page
    connect(page, f"\u201c{TOKEN}\u201d")  # in typographic quotes, as pasted from a document
    expect(page.locator("#token-error")).to_contain_text("A token is printable ASCII")
    assert tab.api_calls("GET", "/api/") == []  # not "Cannot reach the service": it was never asked
    connect(page, "not-the-token")
    expect(page.locator("#token-error")).to_contain_text("refused this token (401 Unauthorized)")
    assert page.evaluate("sessionStorage.length") == 0
    # The token changed while the tab kept the old one: back to the form, saying why.
    connect(page)
    page.evaluate("sessionStorage.setItem('extracts.token', 'an-old-token')")
    page.reload()
    expect(page.locator("#token-error")).to_contain_text("refused the token (401 Unauthorized)")
    expect(page.locator("#token")).to_be_visible()


@pytest.mark.slow
def test_the_token_is_taken_while_the_source_is_down(browser: Browser, tmp_path: Path) -> None:
    """The token was checked with /api/describe: with the source gone (503) nobody could connect,
    though extracts, runs and their files are all served from the state and the storage."""
    source = make_shop_db(tmp_path / "shop.db")
    svc = start_service(tmp_path, str(source))
    try:
        extract = svc.create_extract(name="Backup", schemas=["users"])
        run = svc.wait_run(svc.run(extract["id"]))
        source.unlink()
        tab = open_tab(browser, svc.base_url)
        page = tab.page
        connect(page)
        expect(page.locator("#banner")).to_contain_text("The source database cannot be read")
        page.goto(f"/#/extracts/{extract['id']}/runs/{run['id']}")
        with page.expect_download() as download:
            page.click("#download-zip")
        assert zipfile.ZipFile(download.value.path()).testzip() is None
        page.context.close()
        check_tab(tab, svc.base_url)
    finally:
        svc.stop()


@pytest.mark.slow
def test_the_token_is_kept_for_the_tab_only(tab: Tab, browser: Browser, service: Any) -> None:
    connect(tab.page)
    tab.page.reload()
    expect(tab.page.locator("#extracts")).to_be_visible()  # still connected
    assert all(auth for auth in [tab.page.evaluate("sessionStorage.getItem('extracts.token')")])
    other = open_tab(browser, service.base_url)  # another tab (its own session): asks again
    other.page.goto("/")
    expect(other.page.locator("#token")).to_be_visible()
    other.page.context.close()
    tab.page.get_by_role("button", name="Change token").click()
    expect(tab.page.locator("#token")).to_be_visible()
    assert tab.page.evaluate("sessionStorage.length") == 0


# ---------------------------------------------------------------- extracts, runs, downloads


@pytest.mark.slow
def test_schemas_are_listed_with_their_row_counts(tab: Tab) -> None:
    connect(tab.page)
    rows = tab.page.locator("table.schemas tbody tr")
    expect(rows).to_have_count(5)
    texts = [" ".join(r.split()) for r in rows.all_inner_texts()]
    assert texts == [
        "adults view 2 2",
        f"big {BIG_ROWS:,} 4",
        "order items 20 4",
        "orders 50 4",
        "users 4 7",
    ]


@pytest.mark.slow
def test_create_run_and_download_through_the_page(tab: Tab, service: Any, tmp_path: Path) -> None:
    page = tab.page
    connect(page)
    page.get_by_role("button", name="New extract").click()
    page.fill("#f-name", "Through the page")
    page.fill("#f-description", "made in a browser")
    page.select_option("#f-format", "json")
    page.check("#f-schemas-some")
    page.check("input[name=schema][value='users']")
    page.check("input[name=schema][value='order items']")
    page.uncheck("#f-compress")
    page.fill("#f-retention_days", "3")
    page.fill("#f-max_attempts", "2")
    page.get_by_role("button", name="Create").click()
    extract_id = extract_id_of(page)
    extract = service.client.get(f"/api/data/extracts/{extract_id}").json()["data"]
    assert {k: extract[k] for k in ("name", "description", "format", "schemas", "compress")} == {
        "name": "Through the page",
        "description": "made in a browser",
        "format": "json",
        "schemas": ["order items", "users"],  # in the order the source lists them
        "compress": False,
    }
    assert (extract["retention_days"], extract["max_attempts"], extract["filter"]) == (3, 2, None)

    page.click("#run-button")
    expect(page.locator("#run-percent")).to_have_text("100%", timeout=30_000)
    expect(page.locator("#run .badge")).to_have_text("completed")
    run = service.client.get(f"/api/data/extract_runs?filter[where][extract_id]={extract_id}").json()["data"][
        0
    ]
    assert run["status"] == "completed" and run["progress"] == 100

    with page.expect_download() as info:
        page.click("#download-zip")
    download = info.value
    assert re.fullmatch(
        rf"Through-the-page-\d{{4}}-\d\d-\d\d-{run['id'][:8]}\.zip", download.suggested_filename
    )
    path = tmp_path / download.suggested_filename
    download.save_as(path)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        manifest = json.loads(archive.read("manifest.json"))
        assert sorted(archive.namelist()) == sorted(
            ["manifest.json", *(a["name"] for a in manifest["artifacts"])]
        )
        for artifact in manifest["artifacts"]:
            body = archive.read(artifact["name"])
            assert (len(body), sha256(body)) == (artifact["size"], artifact["checksum"]), artifact["name"]
        assert [u["id"] for u in json.loads(archive.read("users.json"))] == [1, 2, 3, 2**62]

    # One file on its own: the same bytes as its record says.
    with page.expect_download() as info:
        page.get_by_role("button", name="Download order%20items.json").click()
    single = tmp_path / "single"
    info.value.save_as(single)
    assert info.value.suggested_filename == "order%20items.json"
    artifacts = service.client.get(f"/api/data/extract_artifacts?filter[where][run_id]={run['id']}").json()[
        "data"
    ]
    record = next(a for a in artifacts if a["artifact_name"] == "order%20items.json")
    assert sha256(single.read_bytes()) == record["checksum"] and len(json.loads(single.read_bytes())) == 20
    # Every call the page made went to /api with the token (the listener saw the URLs).
    assert tab.api_calls("GET", "/api/extracts/runs/") and tab.api_calls("GET", "/api/extracts/artifacts/")


@pytest.mark.slow
def test_progress_is_live_and_a_run_can_be_cancelled(tab: Tab, service: Any) -> None:
    page = tab.page
    extract = service.create_extract(name="Big one", schemas=["big"])
    connect(page)
    page.goto(f"/#/extracts/{extract['id']}")
    expect(page.locator("#run")).to_contain_text("No run yet")
    # Every percentage the page shows, as it shows it.
    page.evaluate(
        """() => { window.seen = [];
        new MutationObserver(() => { const p = document.querySelector('#run-percent');
          if (p && window.seen[window.seen.length - 1] !== p.textContent) window.seen.push(p.textContent); })
        .observe(document.querySelector('#main'), {subtree: true, childList: true, characterData: true}); }"""
    )
    page.click("#run-button")
    expect(page.locator("#run-percent")).to_have_text("100%", timeout=60_000)
    ended = time.monotonic()
    seen = [int(p.rstrip("%")) for p in page.evaluate("window.seen")]
    assert seen == sorted(seen) and seen[-1] == 100, seen
    started = tab.api_calls("POST", f"/api/extracts/{extract['id']}/run")[0]
    # Watched moving, not only its end: a value within the table for each second the run took
    # past the first (two at most; about one second on a fast machine, four on a slow one).
    moving = max(1, min(2, int(ended - started) - 1))
    assert len([p for p in seen if 25 < p < 100]) >= moving, (seen, ended - started)
    assert page.locator("[data-fact=records]").inner_text() == f"{BIG_ROWS:,} of {BIG_ROWS:,}"
    # While it ran, the page asked for it at least once a second.
    polls = [t for t in tab.api_calls("GET", "/api/data/extract_runs") if started <= t <= ended]
    gaps = [b - a for a, b in zip(polls, polls[1:], strict=False)]
    assert len(polls) >= max(2, int(ended - started)) and sorted(gaps)[len(gaps) // 2] <= 1.0, gaps

    page.click("#run-button")
    expect(page.locator("#run .badge")).to_have_text("running", timeout=30_000)
    page.wait_for_function(
        "() => { const p = document.querySelector('#run-percent');"
        " return p && parseInt(p.textContent) > 25; }"
    )
    expect(page.locator("#run-button")).to_be_hidden()
    page.get_by_role("button", name="Cancel run").click()
    expect(page.locator("#banner")).to_contain_text("cancelled")
    expect(page.locator("#run .badge")).to_have_text("cancelled", timeout=10_000)
    expect(page.locator("#run-button")).to_be_visible()
    expect(page.locator("#run")).to_contain_text("Files written before the run ended")
    runs = service.client.get(f"/api/data/extract_runs?filter[where][extract_id]={extract['id']}").json()[
        "data"
    ]
    assert [r["status"] for r in runs] == ["cancelled", "completed"]


@pytest.mark.slow
def test_a_run_deleted_while_shown_shows_its_files_gone(tab: Tab, service: Any) -> None:
    """The page listed a run's files once per (run, status, files created): deleting the run
    (or the retention sweep) changes none of them, so the files stayed listed, each Download
    and the ZIP answering 410. The files of an ended run are now listed at every poll."""
    extract = service.create_extract(name="Deleted while shown", schemas=["users"])
    run = service.wait_run(service.run(extract["id"]))
    page = tab.page
    connect(page)
    page.goto(f"/#/extracts/{extract['id']}/runs/{run['id']}")
    expect(page.locator("#run .files-list li")).to_have_count(run["artifacts_created"])
    expect(page.locator("#download-zip")).to_be_visible()
    assert service.client.delete(f"/api/data/extract_runs/{run['id']}").status_code == 200
    expect(page.locator("#run")).to_contain_text("The files were deleted", timeout=10_000)
    expect(page.locator("#run .files-list li")).to_have_count(0)
    expect(page.locator("#download-zip")).to_have_count(0)  # its ZIP is 410 now
    expect(page.locator("#run .badge")).to_have_text("completed")  # the run record stays


@pytest.mark.slow
def test_a_run_ending_between_the_pages_two_reads_is_not_shown_for_long(tab: Tab, service: Any) -> None:
    """The run view reads the extract (its counts) and its runs in two requests: a run that ended
    between them showed in the runs and not in the counts, and with no run active the next read
    came 5 s later. Reads that disagree on the latest run are now made again at once."""
    extract = service.create_extract(name="Two reads", schemas=["users"])
    path = f"/api/data/extracts/{extract['id']}"
    service.wait_run(service.run(extract["id"]))
    page = tab.page
    connect(page)
    page.goto(f"/#/extracts/{extract['id']}")
    counts = page.locator("[data-fact=runs]")
    expect(counts).to_have_text("1 (1 completed, 0 failed, 0 cancelled)")
    stale: list[str] = []

    def second_run() -> None:
        """Once, before either request is answered: the extract as it stands, then a run to its end."""
        if not stale:
            stale.append(service.client.get(path).text)
            service.wait_run(service.run(extract["id"]))

    def extract_read_before(route: Any) -> None:
        second_run()
        route.fulfill(status=200, content_type="application/json", body=stale[0])

    def runs_read_after(route: Any) -> None:
        second_run()
        route.continue_()

    page.route(f"**{path}", extract_read_before, times=1)
    page.route("**/api/data/extract_runs?*", runs_read_after, times=1)
    expect(page.locator("#runs li")).to_have_count(2, timeout=10_000)  # the read with the second run
    expect(counts).to_have_text("2 (2 completed, 0 failed, 0 cancelled)", timeout=2_000)


@pytest.mark.slow
def test_a_failed_runs_error_is_shown(tab: Tab, service: Any, shop_db: Path) -> None:
    with sqlite3.connect(shop_db) as con:
        con.execute("CREATE TABLE doomed (id INTEGER PRIMARY KEY)")
    extract = service.create_extract(name="Doomed", schemas=["users", "doomed"], max_attempts=1)
    with sqlite3.connect(shop_db) as con:
        con.execute("DROP TABLE doomed")
    page = tab.page
    connect(page)
    page.goto(f"/#/extracts/{extract['id']}")
    page.click("#run-button")
    expect(page.locator("#run .badge")).to_have_text("failed", timeout=30_000)
    run = service.client.get(f"/api/data/extract_runs?filter[where][extract_id]={extract['id']}").json()[
        "data"
    ][0]
    expect(page.locator("#run-error")).to_have_text(run["error"])
    assert "doomed" in run["error"]
    expect(page.locator("#run")).to_contain_text("A permanent cause: not retried.")
    page.locator("#run details summary").click()
    expect(page.locator("#run details pre")).to_contain_text("Traceback")
    # The list shows it failed, too.
    page.goto("/#/")
    item = page.locator("#extracts li", has_text="Doomed")
    expect(item.locator(".badge")).to_have_text("failed")


@pytest.mark.slow
def test_validation_messages_appear_beside_their_fields(tab: Tab, service: Any) -> None:
    extract = service.create_extract(name="Edit me", schemas=["users"])
    page = tab.page
    connect(page)
    page.goto(f"/#/extracts/{extract['id']}/edit")
    page.fill("#f-retention_days", "0")
    page.fill("#f-schedule", "every night")
    page.uncheck("input[name=include][value=describe]")
    page.uncheck("input[name=include][value=data]")
    page.fill("#f-filter", '{"users": {"where": {"nope": 1}}}')
    page.get_by_role("button", name="Save").click()
    # The API's own messages (its 400 names each field), each beside its field.
    expect(page.locator("#err-retention_days")).to_have_text("retention_days must be between 1 and 365")
    expect(page.locator("#err-schedule")).to_contain_text("schedule must be a 5-field cron expression")
    expect(page.locator("#err-include")).to_have_text("include must be a non-empty array")
    expect(page.locator("#form-summary")).to_contain_text("Invalid extract configuration: include")
    page.fill("#f-retention_days", "30")
    page.fill("#f-schedule", "15 4 * * *")
    page.check("input[name=include][value=data]")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#err-filter")).to_contain_text("nope")  # found by the source: filter.users.where
    expect(page.locator("#err-retention_days")).to_be_hidden()
    page.check("#f-schemas-some")
    page.uncheck("input[name=schema][value='users']")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#err-schemas")).to_contain_text("schemas must be a non-empty array")
    # Not JSON: said at once, nothing sent.
    puts = len(tab.api_calls("PUT", "/api/data/extracts/"))
    page.fill("#f-filter", "{users:")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#err-filter")).to_contain_text("filter is not valid JSON")
    assert len(tab.api_calls("PUT", "/api/data/extracts/")) == puts
    page.check("input[name=schema][value='users']")
    page.fill("#f-filter", '{"users": {"where": {"age": {"$gte": 18}}}}')
    page.fill("#f-name", "  Edited  ")
    page.check("#f-schedule_enabled")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("heading", name="Edited")).to_be_visible()
    saved = service.client.get(f"/api/data/extracts/{extract['id']}").json()["data"]
    assert {k: saved[k] for k in ("name", "retention_days", "schedule", "schedule_enabled", "include")} == {
        "name": "Edited",
        "retention_days": 30,
        "schedule": "15 4 * * *",
        "schedule_enabled": True,
        "include": ["data"],
    }
    assert saved["filter"] == {"users": {"where": {"age": {"$gte": 18}}}} and saved["next_run_at"]
    expect(page.locator("[data-fact='next run']")).not_to_have_text("—")


@pytest.mark.slow
def test_saving_the_form_keeps_what_another_client_changed_meanwhile(tab: Tab, service: Any) -> None:
    """The edit form sent every field as it had loaded them: a change made meanwhile through the
    API (a script disabling the extract, another user's edit) was undone by saving an edit of
    the description. The form now sends only the fields changed in it."""
    extract = service.create_extract(name="Shared", schemas=["users"])
    path = f"/api/data/extracts/{extract['id']}"
    page = tab.page
    connect(page)
    page.goto(f"/#/extracts/{extract['id']}/edit")
    expect(page.locator("#f-name")).to_have_value("Shared")
    assert service.client.put(path, json={"enabled": False, "retention_days": 30}).status_code == 200
    page.fill("#f-description", "edited in the page")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(re.compile(rf"#/extracts/{extract['id']}$"))
    expect(page.locator("[data-fact=enabled]")).to_have_text("no")
    saved = service.client.get(path).json()["data"]
    assert {k: saved[k] for k in ("description", "enabled", "retention_days", "schemas")} == {
        "description": "edited in the page",
        "enabled": False,
        "retention_days": 30,
        "schemas": ["users"],
    }


@pytest.mark.slow
def test_saving_the_form_keeps_lists_another_client_changed_meanwhile(tab: Tab, service: Any) -> None:
    """The form's check boxes read a list in the page's order (include: describe, data; schemas:
    as the source lists them), and an edit sent a list whose order differed from the extract's as
    a change: saving an edit of the description put back the schemas and parts another client had
    set meanwhile. A list with the same items as loaded is no change."""
    names = [s["name"] for s in service.client.get("/api/describe").json()["data"]]
    loaded = names[:2][::-1]  # two schemas, in the order opposite to the page's
    extract = service.create_extract(name="Lists", include=["data", "describe"], schemas=loaded)
    path = f"/api/data/extracts/{extract['id']}"
    page = tab.page
    connect(page)
    page.goto(f"/#/extracts/{extract['id']}/edit")
    expect(page.locator("#f-name")).to_have_value("Lists")
    changed = {"include": ["data"], "schemas": [names[2]]}
    assert service.client.put(path, json=changed).status_code == 200
    page.fill("#f-description", "edited in the page")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(re.compile(rf"#/extracts/{extract['id']}$"))
    saved = service.client.get(path).json()["data"]
    assert {k: saved[k] for k in ("description", "include", "schemas")} == {
        "description": "edited in the page",
        **changed,
    }


@pytest.mark.slow
def test_64_bit_filter_values_are_shown_and_saved_exactly(tab: Tab, service: Any) -> None:
    """Past 2^53 a JavaScript Number rounds: 9007199254740993 became ...992, silently, on any save."""
    big = {"users": {"where": {"id": {"$in": [9007199254740993, -9223372036854775807]}}}}
    extract = service.create_extract(name="Snowflake ids", schemas=["users"], filter=big)
    page = tab.page
    connect(page)
    page.goto(f"/#/extracts/{extract['id']}")
    expect(page.locator("[data-fact='filter']")).to_have_text(json.dumps(big, separators=(",", ":")))
    page.get_by_role("button", name="Edit").click()
    page.fill("#f-description", "only the description changes")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("[data-fact='filter']")).to_be_visible()
    saved = service.client.get(f"/api/data/extracts/{extract['id']}").json()["data"]
    assert (saved["description"], saved["filter"]) == ("only the description changes", big)
    # As typed in the form, too.
    page.get_by_role("button", name="Edit").click()
    page.fill("#f-filter", '{"users": {"where": {"id": {"$gt": 9223372036854775806}}}}')
    page.get_by_role("button", name="Save").click()
    expect(page.locator("[data-fact='filter']")).to_contain_text("9223372036854775806")
    saved = service.client.get(f"/api/data/extracts/{extract['id']}").json()["data"]
    assert saved["filter"] == {"users": {"where": {"id": {"$gt": 9223372036854775806}}}}


@pytest.mark.slow
def test_delete_takes_two_clicks_and_names_are_shown_as_text(tab: Tab, service: Any) -> None:
    name = "<img src=x onerror=alert(1)> & co"
    extract = service.create_extract(name=name, schemas=["users"])
    page = tab.page
    connect(page)
    expect(page.locator("#extracts strong", has_text=name)).to_have_text(name)  # text, not markup
    page.goto(f"/#/extracts/{extract['id']}")
    expect(page.get_by_role("heading", name=name)).to_be_visible()
    page.get_by_role("button", name="Delete").click()
    expect(page.get_by_role("button", name="Click again to delete")).to_be_visible()
    assert service.client.get(f"/api/data/extracts/{extract['id']}").status_code == 200
    page.get_by_role("button", name="Click again to delete").click()
    expect(page.locator("#banner")).to_contain_text("deleted")
    page.wait_for_url(re.compile(r"#/$"))
    assert service.client.get(f"/api/data/extracts/{extract['id']}").status_code == 404
    expect(page.locator("#extracts strong", has_text=name)).to_have_count(0)


@pytest.mark.slow
def test_a_mangled_link_is_answered_not_a_blank_page(tab: Tab) -> None:
    page = tab.page
    connect(page)
    page.goto("/#/extracts/%E0%A4%A")  # not valid percent-encoding: decodeURIComponent threw
    expect(page.locator("#banner")).to_contain_text("Extract %E0%A4%A not found")
    expect(page.get_by_role("heading", name="Extracts")).to_be_visible()


@pytest.mark.slow
def test_an_api_refusal_is_shown(tab: Tab, service: Any) -> None:
    extract = service.create_extract(name="Switched off", schemas=["users"], enabled=False)
    page = tab.page
    connect(page)
    page.goto(f"/#/extracts/{extract['id']}")
    page.click("#run-button")
    expect(page.locator("#banner")).to_contain_text(f"Extract {extract['id']} is disabled")


def start_again(svc: Service) -> Service:
    """The same service (state, storage, port: the tab's origin) started again after it stopped."""
    with svc.log.open("ab") as out:
        process = subprocess.Popen([*app_command(), *svc.args], stdout=out, stderr=subprocess.STDOUT)
    again = Service(svc.base_url, svc.db, svc.storage, svc.source, process, svc.log, svc.args)
    wait_healthy(again)
    return again


@pytest.mark.slow
def test_the_page_carries_on_when_the_service_comes_back(browser: Browser, tmp_path: Path) -> None:
    """A restart under the page, or its source gone a moment (503), used to stop its polling for
    good: stuck on "Cannot reach the service", schemas "Loading…"."""
    source = make_shop_db(tmp_path / "shop.db")
    svc = start_service(tmp_path, str(source))
    try:
        tab = open_tab(browser, svc.base_url)
        page = tab.page
        connect(page)
        source.rename(tmp_path / "away.db")
        page.reload()
        expect(page.locator("#banner")).to_contain_text("The source database cannot be read")
        (tmp_path / "away.db").rename(source)
        expect(page.locator("table.schemas")).to_be_visible(timeout=10_000)
        expect(page.locator("#banner")).to_be_hidden()
        svc.stop()
        expect(page.locator("#banner")).to_contain_text("Cannot reach the service", timeout=10_000)
        svc = start_again(svc)
        extract = svc.create_extract(name="Made while the page waited", schemas=["users"])
        expect(page.locator("#extracts strong", has_text=extract["name"])).to_be_visible(timeout=10_000)
        expect(page.locator("#banner")).to_be_hidden()
        page.goto(f"/#/extracts/{extract['id']}")
        expect(page.locator("#run")).to_contain_text("No run yet")
        svc.stop()
        expect(page.locator("#banner")).to_contain_text("Cannot reach the service", timeout=10_000)
        svc = start_again(svc)
        run = svc.run(extract["id"])
        expect(page.locator("#run h2")).to_contain_text(run, timeout=10_000)
        expect(page.locator("#run .badge")).to_have_text("completed", timeout=10_000)
        expect(page.locator("#banner")).to_be_hidden()
        page.context.close()
        check_tab(tab, svc.base_url)
    finally:
        svc.stop()


@pytest.mark.slow
def test_a_phone_width_window_has_no_horizontal_overflow(browser: Browser, service: Any) -> None:
    extract = service.create_extract(
        name="A rather long extract name that has to wrap on a phone", schemas=["users", "order items"]
    )
    run = service.wait_run(service.run(extract["id"]))
    tab = open_tab(browser, service.base_url, PHONE)
    page = tab.page

    def fits(what: str) -> None:
        page.wait_for_timeout(100)
        width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], (what, width)

    page.goto("/")
    fits("token form")
    connect(page)
    expect(page.locator("table.schemas")).to_be_visible()
    fits("extracts")
    page.goto(f"/#/extracts/{extract['id']}/runs/{run['id']}")
    expect(page.locator("#download-zip")).to_be_visible()
    fits("a completed run with its files")
    page.goto(f"/#/extracts/{extract['id']}/edit")
    page.fill("#f-schedule", "not a schedule at all, really not")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#err-schedule")).to_be_visible()
    fits("the form with an error")
    page.context.close()
    check_tab(tab, service.base_url)
