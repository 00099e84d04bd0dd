"""The report and the review page as a person sees them: real headless Chromium (Debian's
`chromium`, driven by playwright), checking headings, numbers, loaded images and the console.

Set IMAGEFAB_SCREENSHOT_DIR to keep the screenshots."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from analysis_catalog import RUNS, image_id, make_output

import analysis
from analysis.report import write_report
from analysis.review_page import make_server
from app.review import ReviewStore, decide, pending_review
from app.storage import OutputStore

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = pytest.mark.slow


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    why = _missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests need Chromium in CI: {why}")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            viewport={"width": 1200, "height": 900},
        )
        context.set_default_timeout(15_000)
        yield context
        context.close()


@pytest.fixture()
def page(browser):
    page = browser.new_page()
    page.console_errors = []
    page.requests = []
    page.on("console", lambda m: page.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    page.on("request", lambda r: page.requests.append(r.url))
    yield page
    page.close()


def _screenshot(page, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("IMAGEFAB_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


BROKEN_IMAGES = "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)"


def test_report_renders_with_the_catalog_numbers(tmp_path, page):
    out = make_output(str(tmp_path / "out"))
    decide(out, [image_id(7)], "rejected", "alice", note="wrong bottle")
    html = write_report(out, tmp_path / "report.html", max_thumbs=4)
    page.goto(html.as_uri())

    assert page.locator("h1").inner_text() == "imagefab report: all runs"
    headings = page.locator("h2").all_inner_texts()
    assert headings == [
        "Runs",
        "Acceptance by combination",
        "QC score distributions",
        "Cost breakdown",
        "Throughput",
        "Prompt performance",
        "Contact sheets",
    ]
    # The numbers a person reads are the catalog's.
    con = analysis.connect(out)
    counts = dict(con.execute("SELECT outcome, count(*) FROM images GROUP BY ALL").fetchall())
    assert counts == {"accepted": 7, "review": 1, "rejected": 3, "failed": 1}
    for key, value in (("images", 12), ("accepted", 7), ("review", 1), ("rejected", 3), ("failed", 1)):
        assert page.locator(f"#stat-{key} b").inner_text() == str(value), key
    assert page.locator("#stat-acceptance b").inner_text() == f"{7 / 11:.1%}"
    run_ids = page.locator("#runs tbody td[data-col=run_id]").all_inner_texts()
    assert run_ids == [RUNS[r][0] for r in "abc"]
    studio = page.locator("#templates tbody tr", has_text="studio")
    assert studio.locator("td[data-col=acceptance_rate]").inner_text() == f"{round(5 / 7, 4):.4g}"
    assert "lifestyle (0%)" in page.locator("#flagged").inner_text()

    # Every picture loaded: 4 plots, and the contact sheets (4 of 7 accepted, 1 review, 3 rejected).
    assert page.evaluate(BROKEN_IMAGES) == []
    assert page.locator("img.plot").count() == 4
    assert [page.locator(f"#sheet-{o} .tile img").count() for o in ("accepted", "review", "rejected")] == [4, 1, 3]
    assert page.locator("#sheet-accepted h3").inner_text() == "Accepted (4 of 7)"
    rejected = page.locator(f"#sheet-rejected .tile[data-image-id='{image_id(7)}'] .why").inner_text()
    assert rejected == "borderline_low_contrast; rejected by alice: wrong bottle"
    assert page.locator(f"#sheet-rejected .tile[data-image-id='{image_id(6)}'] .why").inner_text() == "blur"

    # Self-contained: nothing but the file itself was requested.
    assert [u for u in page.requests if not u.startswith(("file:", "data:"))] == []
    assert page.console_errors == []
    _screenshot(page, "report.png", tmp_path)


@pytest.fixture()
def review_server(tmp_path):
    out = make_output(str(tmp_path / "out"))
    server = make_server(out, port=0, reviewer="", quiet=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_review_page_approve_and_reject(review_server, page, tmp_path):
    out: OutputStore = review_server.output
    page.goto(review_server.url)
    assert page.locator("h1").inner_text() == "Review queue: 2 waiting"
    cards = page.locator(".card")
    assert cards.count() == 2
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    assert page.evaluate(BROKEN_IMAGES) == []
    _screenshot(page, "review-before.png", tmp_path)

    # No name yet: the server refuses, the page says why, the item stays.
    card5 = page.locator(f"#card-{image_id(5)}")
    card5.get_by_role("button", name="Approve").click()
    page.wait_for_function("document.getElementById('status').className === 'error'")
    assert "needs the reviewer's name" in page.locator("#status").inner_text()
    assert cards.count() == 2 and not (Path(out.uri) / "reviews").exists()
    # Chromium logs the refused request itself; that one entry is expected, nothing else.
    assert page.console_errors == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    page.console_errors.clear()

    page.locator("#reviewer").fill("alice")
    card5.locator(".note").fill("colour is right")
    card5.get_by_role("button", name="Approve").click()
    card5.wait_for(state="detached")
    assert page.locator("#count").inner_text() == "1"
    latest = ReviewStore(out).latest()
    assert (latest[image_id(5)].decision, latest[image_id(5)].reviewer, latest[image_id(5)].note) == (
        "approved",
        "alice",
        "colour is right",
    )
    assert [r["image_id"] for r in pending_review(out)] == [image_id(7)]

    page.locator(f"#card-{image_id(7)}").get_by_role("button", name="Reject").click()
    page.locator(f"#card-{image_id(7)}").wait_for(state="detached")
    assert page.locator("#empty").is_visible()
    assert ReviewStore(out).latest()[image_id(7)].decision == "rejected"
    page.reload()
    assert page.locator("h1").inner_text() == "Review queue: 0 waiting" and page.locator(".card").count() == 0
    assert page.console_errors == []
    _screenshot(page, "review-after.png", tmp_path)


def test_review_api_refuses_other_origins(review_server):
    host, port = review_server.server_address[:2]
    body = json.dumps({"image_ids": [image_id(5)], "decision": "approved", "reviewer": "mallory"})

    def post(headers):
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("POST", "/api/decide", body=body, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    assert post({})[0] == 403  # no token: a page from another site cannot post
    assert post({"X-Review-Token": review_server.token, "Host": "evil.example:80"})[0] == 403
    status, answer = post({"X-Review-Token": review_server.token})
    assert status == 200 and answer["decided"][0]["reviewer"] == "mallory"
    assert host == "127.0.0.1"
