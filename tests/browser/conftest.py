"""Playwright driving Debian's chromium against a live server (see TESTING.md)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.waiting import scaled_ms

# Playwright's fixtures start an asyncio loop before the test database exists; Django refuses ORM calls from
# inside a running loop unless told this is a test process.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
# Chromium writes its profile and caches here, not into the home folder.
_browser_home = tempfile.mkdtemp(prefix="distillweb-chromium-")
os.environ.setdefault("XDG_CONFIG_HOME", _browser_home)
os.environ.setdefault("XDG_CACHE_HOME", _browser_home)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    if not Path(CHROMIUM).exists():
        if os.environ.get("DISTILLWEB_REQUIRE_SERVICES"):
            pytest.fail(
                "chromium is not installed (apt-get install chromium), and DISTILLWEB_REQUIRE_SERVICES is set"
            )
        pytest.skip("chromium is not installed")
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"],
    }


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1400, "height": 1000}}


@pytest.fixture(autouse=True)
def _scaled_browser_timeouts(request):
    """Playwright's default bounds (5 s for an expectation, 30 s for an action or a page load) are
    idle-machine bounds: they scale like every other wait (tests/waiting.py, DISTILLWEB_TEST_WAIT_SCALE)."""
    if "page" not in request.fixturenames:
        return
    page = request.getfixturevalue("page")
    page.set_default_timeout(scaled_ms(30))
    page.set_default_navigation_timeout(scaled_ms(30))
    expect.set_options(timeout=scaled_ms(5))


@pytest.fixture
def screenshot(page):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def take(name: str) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take
