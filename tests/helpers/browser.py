"""A real headless browser for the tests: Debian's ``chromium``, driven by selenium.

``make test`` installs ``chromium`` and ``chromium-driver`` (``.ci/system-deps``); no
browser is ever downloaded: selenium gets both paths, so Selenium Manager never runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tests.helpers.system import require_binary

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

#: Headless, as root, and quiet: nothing reaches out to any network but the page's.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


@contextlib.contextmanager
def chromium(profile: Path, *, width: int = 1280, height: int = 1000) -> Iterator[WebDriver]:
    """A headless Chromium with a fresh profile in ``profile``; quit when the block ends.

    Skips the test when ``chromium`` or ``chromedriver`` is missing (fails under CI=true).
    """
    browser = require_binary("chromium", "chromium")
    driver_path = require_binary("chromedriver", "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
