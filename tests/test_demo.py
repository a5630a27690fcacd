"""The demo moves every metric of the core table (what `make demo` promises)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.helpers.scrape import Samples, scrape
from tests.helpers.system import free_port
from ws_monitoring.cli import main
from ws_monitoring.demo import run_demo

MOVING = [
    "websocket_connections_total",
    "websocket_connection_duration_seconds_count",
    "websocket_disconnections_total",
    "websocket_handshake_failures_total",
    "websocket_handshake_duration_seconds_count",
    "websocket_messages_total",
    "websocket_message_size_bytes_count",
    "websocket_message_duration_seconds_count",
    "websocket_errors_total",
    "websocket_ping_rtt_seconds_count",
]


async def test_demo_moves_every_metric() -> None:
    lines: list[str] = []
    samples: list[Samples] = []

    async def ready(ws_port: int, metrics_port: int) -> None:
        async def scrape_late() -> None:
            # After the synthetic clients ran a few rounds, while the listener is still in.
            await asyncio.sleep(4.5)
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            samples.append(await asyncio.to_thread(scrape, url))

        asyncio.get_running_loop().create_task(scrape_late())

    await run_demo(port=free_port(), metrics_port=free_port(), duration=5, print_fn=lines.append,
                   ready=ready)  # fmt: skip
    assert any(line.startswith("Metrics:") for line in lines)
    (scraped,) = samples
    for name in MOVING:
        assert scraped.total(name) > 0, f"{name} did not move in the demo"
    assert scraped.total("websocket_connections_active") >= 1
    assert scraped.total("websocket_messages_total", direction="sent", type="binary") > 0
    assert scraped.total("websocket_messages_total", direction="received", type="text") > 0
    assert scraped.total("websocket_errors_total", type="handler_exception") > 0
    assert scraped.total("websocket_disconnections_total", code="1011") > 0
    assert scraped.total("websocket_disconnections_total", code="4xxx") > 0


def test_cli_reports_a_taken_port(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(["demo", "--metrics-port", str(port), "--port", str(free_port()),
                       "--duration", "0.1", "--no-clients"])  # fmt: skip
    assert status == 1
    assert str(port) in capsys.readouterr().err


def test_cli_runs_for_a_duration(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["demo", "--metrics-port", "0", "--port", "0", "--duration", "0.2",
                   "--no-clients"])  # fmt: skip
    assert status == 0
    assert "Metrics:" in capsys.readouterr().out


def test_cli_sends_alerts_to_alertmanager(tmp_path: Path) -> None:
    """`--alertmanager URL`: a metrics port already taken fires WebSocketMetricsServerDown."""
    import socket

    from tests.helpers.alertmanager import running_alertmanager

    with running_alertmanager(tmp_path) as am, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(["demo", "--metrics-port", str(port), "--port", "0", "--duration", "0.1",
                       "--no-clients", "--alertmanager", am.url])  # fmt: skip
        assert status == 1
        name = "WebSocketMetricsServerDown"
        alerts = am.wait_for_alerts(lambda got: any(a["labels"]["alertname"] == name for a in got))
        (alert,) = [a for a in alerts if a["labels"]["alertname"] == name]
        assert alert["labels"]["service"] == "ws-demo"
