"""Browser fixtures for the portal's pages: Debian's chromium driven by Playwright, against a real uvicorn
serving portal.asgi on the test database (SSE works there, as in production).

How to use them (the page tests in this folder):

    pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]  # server sees committed rows

    def test_something(page, live_url, sign_in, alice, acme):
        sign_in(alice)                 # a real session cookie for alice (no login form round trip)
        page.goto(f"{live_url}/jobs/")
        expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
        shot(page, "jobs")                         # var/screenshots/jobs.png

- ``browser``: one chromium per test module; ``page``: a fresh context (cookies) and page per test,
  whose base URL is the live server, with a full-page screenshot saved as var/screenshots/FAILED-<test>.png
  when the test fails.
- ``live_url``: the uvicorn server (tests/api/test_stream.py's ``uvicorn_url``). Tests must be
  ``transaction=True`` so the server, another process, sees their rows.
- The browser tests are skipped, saying why, only when chromium is not installed (``make test`` installs it
  where it is root on Debian). Playwright's own browser download is never used.
- Playwright's sync API runs an event loop in the test's thread, which makes Django refuse ORM calls there
  ("async context"); the ``browser`` fixture sets DJANGO_ALLOW_ASYNC_UNSAFE for as long as it lives (one
  module), which is safe here: the test thread is still one thread doing one thing at a time.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client

from tests.api.test_stream import uvicorn_url  # noqa: F401 (fixture)

BASE = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(os.environ.get("OPENTINKER_SCREENSHOTS", BASE / "var" / "screenshots"))


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


# Per module, not per session: Playwright stops (and its event loop with it) when a module's browser tests
# are done, so the async-safety switch below never outlives them into other test modules.
@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip(
            "chromium is not installed: the browser tests need Debian's chromium package "
            "(`apt-get install chromium`; `make test` installs it where it runs as root on Debian)"
        )
    from playwright.sync_api import sync_playwright

    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    pw = sync_playwright().start()
    try:
        # --no-sandbox: chromium's sandbox refuses to run as root (CI containers); the pages are our own.
        b = pw.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()
    finally:
        pw.stop()
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def live_url(uvicorn_url) -> str:  # noqa: F811
    return uvicorn_url


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def page(browser, live_url, request) -> Iterator:
    context = browser.new_context(base_url=live_url, viewport={"width": 1280, "height": 900})
    # Deadlines that only catch a hang: on a loaded 2-core box a page can take seconds (issue 11), and
    # Playwright's `expect` has its own 5 s default besides the context's.
    context.set_default_timeout(60_000)
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    p = context.new_page()
    yield p
    if request.node.stash.get(_FAILED, False):
        shot(p, f"FAILED-{re.sub(r'[^A-Za-z0-9_.-]+', '_', request.node.name)}")
    context.close()


def shot(page, name: str) -> Path:
    """A full-page PNG of what the browser shows now: var/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture
def sign_in(page, live_url):
    """``sign_in(user)``: give the browser a signed-in session of `user` (a real session row, as the login
    form makes), skipping the form where a test is not about it."""

    def do(user) -> None:
        client = Client()
        client.force_login(user)
        cookie = client.cookies[settings.SESSION_COOKIE_NAME]
        page.context.add_cookies([{"name": cookie.key, "value": cookie.value, "url": live_url}])

    return do
