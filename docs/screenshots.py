"""Regenerate the screenshots of the web page in docs/screenshots/: ``python docs/screenshots.py``.

Starts this checkout's service on the demo shop (plus a large ``events`` table, so
that a run's progress can be caught midway, and a ``legacy_orders`` table dropped
after an extract names it, so that a run fails), then drives the page in Debian's
chromium through Playwright, at a laptop's width and a phone's, and saves one PNG
per main screen: the token form, the extracts, the form with validation errors,
a run in progress, a completed run with its files, a failed run. Needs ``apt-get install chromium`` and
``pip install -e '.[test]'`` (Playwright); takes about half a minute.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's executor, whatever is installed

from executor.demo import create_demo_database  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
CHROMIUM = os.environ.get("EXTRACTS_CHROMIUM", "/usr/bin/chromium")
TOKEN = "screenshot-token-4f7a1c"
EVENTS = 3_000_000  # rows: a run long enough to be caught at work
WIDTHS = {"laptop": ({"width": 1280, "height": 800}, 1), "phone": ({"width": 390, "height": 844}, 2)}


def make_source(path: Path) -> Path:
    create_demo_database(path)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, user_id INTEGER, at TEXT)")
    con.execute(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT ?) "
        "INSERT INTO events SELECT x, 'page_view', x % 500, '2026-11-30T12:00:00Z' FROM c",
        (EVENTS,),
    )
    con.execute("CREATE TABLE legacy_orders (id INTEGER PRIMARY KEY, total REAL)")
    con.execute("INSERT INTO legacy_orders VALUES (1, 9.5)")
    con.commit()
    con.close()
    return path


def start(tmp: Path, source: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--source", str(source), "--db", str(tmp / "extracts.db"), "--storage", str(tmp / "files")]
    args += ["--port", str(port), "--token", TOKEN, "--workers", "2"]
    log = (tmp / "service.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "extracts_app.py"), *args], stdout=log, stderr=subprocess.STDOUT, cwd=tmp
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the service did not start:\n{(tmp / 'service.log').read_text()}")


def prepare(url: str, source: Path) -> dict[str, str]:
    """A few extracts with history: completed runs, a scheduled one, one that will fail."""
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    def create(**body: object) -> str:
        r = api.post("/api/data/extracts", json=body)
        r.raise_for_status()
        return r.json()["data"]["id"]

    def run(extract_id: str) -> None:
        run_id = api.post(f"/api/extracts/{extract_id}/run").json()["data"]["run_id"]
        while api.get(f"/api/data/extract_runs/{run_id}").json()["data"]["status"] in ("queued", "running"):
            time.sleep(0.1)

    ids = {
        "nightly": create(
            name="Nightly backup",
            description="Every table, every night at 03:00 UTC",
            schemas=["users", "products", "orders", "order_items"],
            schedule="0 3 * * *",
            schedule_enabled=True,
            retention_days=14,
        ),
        "finance": create(
            name="Large orders for finance",
            format="json",
            schemas=["orders"],
            filter={"orders": {"where": {"total": {"$gte": 100}}}},
        ),
        "legacy": create(name="Legacy orders", schemas=["legacy_orders"], max_attempts=1),
        "events": create(name="Events (3 M rows)", schemas=["events"], compress=False),
    }
    run(ids["nightly"])
    run(ids["finance"])
    with sqlite3.connect(source) as con:
        con.execute("DROP TABLE legacy_orders")
    run(ids["legacy"])
    api.close()
    return ids


def shoot(page: Page, name: str, width: str, full: bool = False) -> None:
    page.mouse.move(0, 0)  # no hover highlight
    page.wait_for_timeout(150)  # fonts and the last poll settled
    page.screenshot(path=str(OUT / f"{name}-{width}.png"), full_page=full)
    print(f"docs/screenshots/{name}-{width}.png")


def screens(page: Page, url: str, ids: dict[str, str], width: str) -> None:
    page.goto(url + "/")
    page.fill("#token", "not-the-token")
    page.click("button:has-text('Connect')")
    page.wait_for_selector("#token-error:has-text('refused')")
    shoot(page, "token", width)

    page.fill("#token", TOKEN)
    page.click("button:has-text('Connect')")
    page.wait_for_selector("#extracts a.item")
    page.wait_for_selector("table.schemas")
    shoot(page, "extracts", width, full=True)

    page.goto(f"{url}/#/extracts/{ids['nightly']}/edit")
    page.fill("#f-retention_days", "0")
    page.fill("#f-schedule", "every night")
    page.click("button:has-text('Save')")
    page.wait_for_selector("#err-retention_days:not(:empty)")
    shoot(page, "form", width, full=True)

    page.goto(f"{url}/#/extracts/{ids['events']}")
    page.click("#run-button")
    page.wait_for_function(
        "() => { const p = document.querySelector('#run-progress');"
        " return p && p.value >= 30 && p.value < 90; }",
        timeout=60_000,
        polling=50,
    )
    page.screenshot(path=str(OUT / f"progress-{width}.png"))  # at once: the run goes on
    print(f"docs/screenshots/progress-{width}.png")
    page.wait_for_selector("#run-percent:has-text('100%')", timeout=120_000)

    page.goto(f"{url}/#/extracts/{ids['nightly']}")
    page.wait_for_selector("#download-zip")
    shoot(page, "completed", width, full=True)

    page.goto(f"{url}/#/extracts/{ids['legacy']}")
    page.wait_for_selector("#run-error")
    shoot(page, "failed", width, full=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        source = make_source(tmp / "shop.db")
        process, url = start(tmp, source)
        try:
            ids = prepare(url, source)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM)
                for width, (viewport, scale) in WIDTHS.items():
                    context = browser.new_context(viewport=viewport, device_scale_factor=scale)
                    screens(context.new_page(), url, ids, width)
                    context.close()
                browser.close()
        finally:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
