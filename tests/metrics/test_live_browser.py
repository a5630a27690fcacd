"""The live page in a real headless Chromium, against a running instrumented server."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import ServerConnection

from tests.helpers.browser import chromium
from tests.helpers.otlp import OtlpHttpReceiver
from tests.helpers.servers import sync_server
from tests.metrics.test_live import fresh_provider  # noqa: F401 (a fixture)
from ws_monitoring import MetricsServer

#: What the page shows for a figure it does not have yet.
UNKNOWN = "\N{EN DASH}"


def chat(websocket: ServerConnection) -> None:
    for message in websocket:
        if message == "crash":
            raise RuntimeError("the handler's own message, never shown")
        if message == "slow":
            time.sleep(0.02)
        websocket.send(message)


def forbid(connection: ServerConnection, request: Request) -> Response | None:
    return connection.respond(403, "no\n") if request.path == "/admin" else None


@contextlib.contextmanager
def traced() -> Iterator[None]:
    """Tracing on, every message sampled, spans exported to a local OTLP receiver."""
    from ws_monitoring.tracing.setup import setup_tracing

    receiver = OtlpHttpReceiver()
    handle = setup_tracing(
        service_name="live-page", endpoint=receiver.url, sample_ratio=1.0, schedule_delay=0.05
    )
    try:
        yield
    finally:
        handle.shutdown(timeout=2)
        receiver.close()


@pytest.mark.usefixtures("fresh_provider")
def test_the_live_page_shows_connections_as_they_come(
    registry: CollectorRegistry, metrics_server: MetricsServer, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = {"registry": registry, "routes": ["/chat/{room}", "/echo"]}
    stop = threading.Event()
    with (
        traced(),
        sync_server(chat, monitoring=options, process_request=forbid) as srv,
        chromium(tmp_path / "profile", height=1100) as browser,
        contextlib.ExitStack() as open_clients,
    ):
        assert metrics_server.live_url is not None
        browser.get(metrics_server.live_url)
        wait = WebDriverWait(browser, 20, poll_frequency=0.1)
        total = browser.find_element(By.ID, "connections-total")
        # The first data arrives: nothing open yet.
        wait.until(lambda _: total.text == "0")

        clients: list[ClientConnection] = [
            open_clients.enter_context(connect(srv.url(f"/chat/room{n}"))) for n in range(3)
        ]
        echo = open_clients.enter_context(connect(srv.url("/echo")))

        def traffic() -> None:
            n = 0
            while not stop.wait(0.03):
                n += 1
                for client in (*clients, echo):
                    client.send("slow" if n % 20 == 0 else "hello")
                    client.recv()

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            with connect(srv.url("/chat/lobby")) as crashing:
                crashing.send("crash")
                with pytest.raises(ConnectionClosed):
                    crashing.recv()
            with pytest.raises(InvalidStatus):
                connect(srv.url("/admin"))
            # The page updates by itself (no reload): 4 open, on the routes they use.
            wait.until(lambda _: total.text == "4")
            chat_row = browser.find_element(By.CSS_SELECTOR, 'tr[data-route="/chat/{room}"]')
            cell = chat_row.find_element(By.CSS_SELECTOR, '[data-field="connections"]')
            wait.until(lambda _: cell.text == "3")
            routes = [
                row.find_element(By.CSS_SELECTOR, "td.route").text
                for row in browser.find_elements(By.CSS_SELECTOR, "#routes tr[data-route]")
            ]
            assert routes == ["/chat/{room}", "/echo"]
            # Rates need two samples; the crash shows its exception type, not its message.
            rate = browser.find_element(By.ID, "messages_in-rate")
            wait.until(lambda _: rate.text not in (UNKNOWN, "0"))
            crashes = browser.find_element(By.ID, "crashes")
            wait.until(lambda _: "RuntimeError" in crashes.text)
            failures = browser.find_element(By.ID, "handshake_failures")
            wait.until(lambda _: "403" in failures.text)
            trace_id = wait.until(lambda _: browser.find_elements(By.ID, "slowest-trace-id"))[
                0
            ].text
            assert re.fullmatch("[0-9a-f]{32}", trace_id)
            assert "never shown" not in browser.page_source
            # Some seconds of history for the sparklines, then the picture.
            body = browser.find_element(By.TAG_NAME, "body")
            wait.until(lambda _: int(body.get_attribute("data-samples") or 0) >= 8)
            screenshot = tmp_path / "live-page.png"
            assert browser.save_screenshot(str(screenshot))
            assert screenshot.stat().st_size > 10_000
        finally:
            stop.set()
            sender.join(5)
