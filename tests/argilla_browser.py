"""A reviewer in Argilla's real web UI: headless Debian `chromium` driven by PyPI `playwright` (no browser download).

    with reviewer_browser(tmp_path) as browser:
        page = sign_in(browser, url, "alice", password)
        page.goto(queue_url)                       # e.g. from `curate reviewers list`
        prompt = answer(page, ranks={1: 1, 2: 1, 3: 2}, harms={3: ["violence"]}, correction="...")

What a person does, with the keyboard and mouse: sign in at /sign-in; on the annotation page rank an answer by
focusing its card (`#completion_<i>`) and pressing the digit of its rank (a tie = the same digit twice; dragging
with `drag_to` does not register in Argilla 2.8), tick harm chips (the `label` of `harm_<i>_<label>`), type the
corrected answer into its editable area, and press Submit (`.button--submit`, enabled once every required question
has an answer). Verified on Argilla 2.8 in headless Chromium 150.

No chromium: the test is skipped with the reason, except in CI (`CI=true`), where it fails like the Argilla server
fixture does when the server cannot start.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from argilla_server_fixture import in_ci

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000


def chromium_path() -> str:
    """Debian's chromium, or skip (fail in CI) with the reason."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        message = "Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return exe


@contextlib.contextmanager
def reviewer_browser(tmp_path: Path) -> Iterator:
    """A fresh headless Chromium (its own profile under `tmp_path`); yields a factory of isolated contexts."""
    exe = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        message = "playwright is not installed (pip install -e '.[dev]'; make install does it)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def sign_in(browser, url: str, username: str, password: str):
    """A new browser context (its own cookies: one per reviewer) signed in as `username`; returns its page."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{url}/sign-in")
    page.fill("input[name=Username]", username)
    page.fill("input[name=Password]", password)
    page.press("input[name=Password]", "Enter")
    page.wait_for_url(lambda u: "/sign-in" not in u)
    return page


def shown_prompt(page) -> str:
    """The user turn of the conversation on screen (which record the reviewer is looking at)."""
    page.wait_for_selector(".draggable__rank-card--unranked")
    return page.locator(".chat").first.inner_text() if page.locator(".chat").count() else page.inner_text("body")


def rank_card(page, slot: int, rank: int, tries: int = 5) -> None:
    """Put answer `slot` at `rank`: click its unranked card, press the digit. The cards animate into their slots
    (a click during the animation is lost), so each press is checked and repeated until the card is ranked."""
    unranked = page.locator(f"#completion_{slot} .draggable__rank-card--unranked")
    ranked = page.locator(f"#completion_{slot} .draggable__rank-card--ranked")
    for _ in range(tries):
        if unranked.count():
            unranked.click()
            page.keyboard.press(str(rank))
        try:
            ranked.wait_for(state="attached", timeout=2_000)
            page.wait_for_timeout(400)  # let the slot animation finish before the next click
            return
        except Exception:  # playwright's TimeoutError: press again
            continue
    raise AssertionError(f"could not rank answer {slot} at {rank} in the Argilla UI")


def answer(page, *, ranks: dict[int, int], harms: dict[int, list[str]] | None = None,
           correction: str | None = None, shot: Path | None = None) -> None:
    """Answer the record on screen and submit: `ranks` slot → rank (1 = best; equal ranks = a tie), `harms` slot →
    harm labels to tick ("none" is a label too), `correction` typed into the corrected-answer box."""
    page.wait_for_selector(".draggable__rank-card--unranked")
    for slot, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        rank_card(page, slot, rank)
    for slot, labels in sorted((harms or {}).items()):
        for label in labels:
            page.locator(f"label[for='harm_{slot}_{label}']").click()
    if correction:
        box = page.locator("[aria-label='Question: correction'] [contenteditable=true]")
        box.click()
        page.keyboard.type(correction)
    if shot is not None:
        page.screenshot(path=str(shot), full_page=True)
    submit = page.locator(".button--submit")
    submit.click()
    page.wait_for_timeout(300)  # the next record replaces this one


__all__ = ["answer", "chromium_path", "reviewer_browser", "shown_prompt", "sign_in"]
