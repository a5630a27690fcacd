"""The live page in a real headless Chromium, against a running instrumented server."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import ServerConnection

from tests.helpers.browser import chromium
from tests.helpers.servers import sync_server
from ws_monitoring import MetricsServer

#: What the page shows for a figure it does not have yet.
UNKNOWN = "\N{EN DASH}"


def chat(websocket: ServerConnection) -> None:
    for message in websocket:
        if message == "crash":
            raise RuntimeError("the handler's own message, never shown")
        websocket.send(message)


def test_the_live_page_shows_connections_as_they_come(
    registry: CollectorRegistry, metrics_server: MetricsServer, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = {"registry": registry, "routes": ["/chat/{room}", "/echo"]}
    stop = threading.Event()
    with sync_server(chat, monitoring=options) as srv, chromium(tmp_path / "profile") as browser:
        assert metrics_server.live_url is not None
        browser.get(metrics_server.live_url)
        wait = WebDriverWait(browser, 20, poll_frequency=0.1)
        total = browser.find_element(By.ID, "connections-total")
        # The first data arrives: nothing open yet.
        wait.until(lambda _: total.text == "0")

        open_clients = contextlib.ExitStack()
        clients: list[ClientConnection] = [
            open_clients.enter_context(connect(srv.url(f"/chat/room{n}"))) for n in range(3)
        ]
        echo = open_clients.enter_context(connect(srv.url("/echo")))

        def traffic() -> None:
            while not stop.wait(0.05):
                for client in (*clients, echo):
                    client.send("hello")
                    client.recv()

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            with connect(srv.url("/chat/crash")) as crashing:
                crashing.send("crash")
                with pytest.raises(ConnectionClosed):
                    crashing.recv()
            # The page updates by itself (no reload): 4 open, on the routes they use.
            wait.until(lambda _: total.text == "4")
            row = browser.find_element(By.CSS_SELECTOR, 'tr[data-route="/chat/{room}"]')
            wait.until(
                lambda _: (
                    row.find_element(By.CSS_SELECTOR, '[data-field="connections"]').text == "3"
                )
            )
            route_cells = [
                r.find_element(By.CSS_SELECTOR, "td.route").text
                for r in browser.find_elements(By.CSS_SELECTOR, "#routes tr[data-route]")
            ]
            assert route_cells == ["/chat/{room}", "/echo"]
            # Rates need two samples; the crash shows with its exception type, no message.
            wait.until(
                lambda _: browser.find_element(By.ID, "messages_in-rate").text not in (UNKNOWN, "0")
            )
            crashes = browser.find_element(By.ID, "crashes")
            wait.until(lambda _: "RuntimeError" in crashes.text)
            assert "never shown" not in browser.page_source
            # A few seconds of history for the sparklines, then the picture.
            body = browser.find_element(By.TAG_NAME, "body")
            wait.until(lambda _: int(body.get_attribute("data-samples") or 0) >= 6)
            screenshot = tmp_path / "live-page.png"
            assert browser.save_screenshot(str(screenshot))
            assert screenshot.stat().st_size > 10_000
        finally:
            stop.set()
            sender.join(5)
            open_clients.close()
