"""The web page in a real headless browser: Debian's chromium driven by playwright (never a
browser that playwright downloads).  It types a puzzle, sees the canvas drafts and the answer."""

from __future__ import annotations

import os
import shutil

import pytest

from serving import assert_solves

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync"]

if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        pytest.fail("chromium is missing: .ci/run installs Debian's chromium for this test", pytrace=False)
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def test_page_shows_drafts_and_the_answer(browser, sudoku_server, puzzles):
    text, grid = puzzles[6]
    page = browser.new_page()
    page.goto(sudoku_server.url + "/")
    page.wait_for_selector("#model:has-text('sudoku')")
    assert page.locator("#canvas .cell").count() == 81                  # the 81-cell canvas, drawn 9 x 9
    page.fill("#seed", "0")
    page.fill("#prompt", "Solve " + text)
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.assistant[data-done='true']", timeout=30_000)
    answer = page.locator(".message.assistant").first.evaluate("e => e.firstChild.textContent")
    assert_solves(answer, grid)
    drafts = int(page.get_attribute("#canvas", "data-drafts"))
    assert drafts >= 2                                                   # at least one step and the commit
    cells = page.locator("#canvas .cell").all_inner_texts()
    assert "".join(cells) == answer                                      # the committed canvas is the answer
    assert "committed" in page.inner_text("#step")
    assert page.inner_text("#t-draft").endswith("ms") and page.inner_text("#t-text").endswith("ms")
    assert page.locator(".message.user").first.inner_text() == "Solve " + text
    page.close()


def test_page_reports_errors_and_recovers(browser, sudoku_server, puzzles):
    page = browser.new_page()
    page.goto(sudoku_server.url + "/")
    page.wait_for_selector("#model:has-text('sudoku')")
    page.fill("#prompt", "no puzzle in here")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#error:has-text('puzzle')")
    page.fill("#prompt", puzzles[7][0])
    page.click("#send")
    page.wait_for_selector(".message.assistant[data-done='true']", timeout=30_000)
    assert page.inner_text("#error") == ""
    page.close()
