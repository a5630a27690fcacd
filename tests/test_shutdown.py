"""Closing a server made by ws_monitoring.serve/serve_sync flushes every sink once, and
everything ws-monitoring does to stop shares one deadline (``SHUTDOWN_TIMEOUT``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

import ws_monitoring
from tests.alerting.test_alertmanager import recording_peer
from tests.helpers.leak import ClosedCounter
from tests.helpers.process import hanging_peer
from tests.helpers.servers import HOST, echo, sync_echo, wait_until
from ws_monitoring import core
from ws_monitoring.core import shutdown_step


class FlushRecorder(ClosedCounter):
    """A sink that also records its shutdown calls (and from which thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.shutdowns: list[tuple[float, str]] = []

    def shutdown(self, timeout: float) -> None:
        self.shutdowns.append((timeout, threading.current_thread().name))


async def test_async_server_close_flushes_sinks(registry: CollectorRegistry) -> None:
    sink = FlushRecorder()

    async with ws_monitoring.serve(echo, "127.0.0.1", 0, registry=registry, sinks=[sink]) as srv:
        port = srv.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/") as client:
            await client.send("x")
            await client.recv()
        assert sink.shutdowns == []
    assert sink.closed == 1
    ((timeout, thread),) = sink.shutdowns
    assert timeout > 0
    # Flushing may wait on the network: never on the event loop's thread.
    assert thread != threading.main_thread().name


def test_sync_server_close_flushes_sinks(registry: CollectorRegistry) -> None:
    sink = FlushRecorder()

    with ws_monitoring.serve_sync(
        sync_echo, "127.0.0.1", 0, registry=registry, sinks=[sink]
    ) as srv:
        thread = threading.Thread(target=srv.serve_forever)
        thread.start()
        port = srv.socket.getsockname()[1]
        with sync_connect(f"ws://127.0.0.1:{port}/") as client:
            client.send("x")
            client.recv()
    thread.join(10)
    assert not thread.is_alive()
    assert len(sink.shutdowns) == 1


class StuckRecorder(FlushRecorder):
    """A sink whose flush waits for all the time it is given (a collector that hangs)."""

    def shutdown(self, timeout: float) -> None:
        super().shutdown(timeout)
        threading.Event().wait(timeout)


async def test_a_stuck_sink_does_not_starve_the_others(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WS_MONITORING_SHUTDOWN_TIMEOUT", "0.5")
    stuck, quick = StuckRecorder(), FlushRecorder()

    async with ws_monitoring.serve(
        echo, HOST, 0, registry=registry, metrics=False, sinks=[stuck, quick]
    ):
        pass
    # Side by side: the sink after the stuck one got the same deadline, not what was left.
    ((stuck_timeout, _),) = stuck.shutdowns
    ((quick_timeout, _),) = quick.shutdowns
    assert 0.4 < stuck_timeout <= 0.5
    assert 0.4 < quick_timeout <= 0.5


def test_shutdown_steps_share_one_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_MONITORING_SHUTDOWN_TIMEOUT", "0.3")
    monkeypatch.setattr(core, "SHUTDOWN_GAP", 0.1)
    time.sleep(0.15)  # whatever an earlier test stopped is another shutdown
    with shutdown_step() as first:
        # A stuck flush: it runs out of time.
        time.sleep(max(0.0, first - time.monotonic()))
        with shutdown_step() as nested:
            assert nested == first
    with shutdown_step() as second:
        # Right after a step that ran out of time: nothing left to wait for.
        assert second == first
    time.sleep(0.15)
    with shutdown_step() as fresh:
        # After the gap: another shutdown.
        assert fresh > first
    with shutdown_step(exiting=True) as exiting:
        # The exit right after a server's close is the same shutdown, even a quick one.
        assert exiting == fresh
    with shutdown_step(timeout=0.01) as own:
        assert own < fresh
    time.sleep(0.15)
    with shutdown_step() as quick:
        pass
    with shutdown_step() as another:
        # A close right after a close that had time to spare starts its own shutdown.
        assert another > quick


def test_shutdown_timeout_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("WS_MONITORING_SHUTDOWN_TIMEOUT", raising=False)
    assert core.shutdown_timeout() == core.SHUTDOWN_TIMEOUT == 5.0
    monkeypatch.setenv("WS_MONITORING_SHUTDOWN_TIMEOUT", "2.5")
    assert core.shutdown_timeout() == 2.5
    monkeypatch.setattr(core._Shutdown, "warned", False)
    for bad in ("soon", "-1", "inf"):
        monkeypatch.setenv("WS_MONITORING_SHUTDOWN_TIMEOUT", bad)
        assert core.shutdown_timeout() == 5.0
    # Logged once, not at every step.
    assert [r.getMessage() for r in caplog.records].count(
        "WS_MONITORING_SHUTDOWN_TIMEOUT='soon' is not a number of seconds: using 5 s"
    ) == 1
    assert len(caplog.records) == 1


#: A server as the README runs it, stopped by SIGTERM, every sink on.
SERVER = textwrap.dedent(
    """
    import asyncio, signal, sys
    import ws_monitoring
    from ws_monitoring import PrometheusAlerter, SentryAlerter, setup_logging, setup_tracing

    collector, alertmanager, sentry_dsn, log_file = sys.argv[1:5]
    setup_tracing("exit-test", endpoint=collector, sample_ratio=1.0)
    setup_logging(filename=log_file)
    alerters = [PrometheusAlerter(alertmanager), SentryAlerter(sentry_dsn)]

    async def handler(ws):
        async for message in ws:
            if message == "crash":
                raise RuntimeError("a crash before the exit")
            await ws.send(message)

    async def main():
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        async with ws_monitoring.serve(handler, "127.0.0.1", 0, alerters=alerters) as server:
            print(server.sockets[0].getsockname()[1], flush=True)
            await stop

    asyncio.run(main())
    """
)

#: The deadline the server process is given, and what its exit may add on a busy machine.
DEADLINE = 2.0
MARGIN = 1.5


def test_sigterm_to_exit_within_the_deadline_with_a_collector_that_never_reads(
    tmp_path: Path,
) -> None:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    log_file = tmp_path / "server.log"
    env = {
        **os.environ,
        "WS_MONITORING_SHUTDOWN_TIMEOUT": str(DEADLINE),
        # Export at once: the request is in flight, unanswered, when SIGTERM comes.
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    env.pop("COVERAGE_PROCESS_START", None)  # its exit hook would be timed too
    with hanging_peer() as collector, hanging_peer() as sentry, recording_peer() as am:
        dsn = f"http://key@{HOST}:{sentry.port}/1"
        process = subprocess.Popen(
            [sys.executable, str(script), collector.url, am.url, dsn, str(log_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            assert process.stdout is not None
            port = int(process.stdout.readline())
            with sync_connect(f"ws://{HOST}:{port}/") as client:
                for index in range(5):
                    client.send(f"message {index}")
                    assert client.recv() == f"message {index}"
                client.send("crash")
                with pytest.raises(ConnectionClosed):
                    client.recv()
            # Spans and the crash's Sentry event are stuck at peers that never answer.
            wait_until(lambda: collector.accepted and sentry.accepted, what="stuck exports")
            wait_until(lambda: am.alerts(), what="the crash alert")
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)
            elapsed = time.monotonic() - start
        finally:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr.decode()
    # One deadline for everything: closing the server, then the exit hooks (span
    # exporter, alert queues, log queue); not the close's, then the exporter's own.
    assert elapsed <= DEADLINE + MARGIN, f"SIGTERM to exit took {elapsed:.2f} s"
    # And honoured: the stuck sinks were given the whole deadline to deliver.
    assert elapsed >= DEADLINE - 0.1, f"SIGTERM to exit took {elapsed:.2f} s"
    assert [a["labels"]["alertname"] for a in am.alerts()][:1] == ["WebSocketHandlerCrashes"]
    assert '"connection closed"' in log_file.read_text()
