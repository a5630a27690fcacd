"""Alerting as a whole: built-in alerts from real servers, the watchdog, the fan-out sink."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

import ws_monitoring
from tests.alerting.test_alertmanager import alerter, recording_peer
from tests.helpers.alertmanager import running_alertmanager
from tests.helpers.servers import HOST, async_wait_until, wait_until
from ws_monitoring import MetricsServerError, start_metrics_server
from ws_monitoring.alerting import PrometheusAlerter
from ws_monitoring.alerting.sink import (
    AlertingMessageSink,
    AlertingSink,
    build_sink,
    fire_all,
    is_expected_failure,
)
from ws_monitoring.alerting.watchdog import ServerWatchdog, watch_server
from ws_monitoring.config import Config
from ws_monitoring.privacy import Privacy
from ws_monitoring.typing import Alerter


class Recorder:
    """A real alerter that keeps what it is given (for fan-out and application tests)."""

    def __init__(self) -> None:
        self.fired: list[tuple[str, dict[str, Any]]] = []
        self.resolved: list[str] = []
        self.flushed: list[float] = []
        self.events: list[str] = []

    def fire(self, alertname: str, **kwargs: Any) -> None:
        self.fired.append((alertname, kwargs))

    def resolve(self, alertname: str, labels: Any = None) -> None:
        self.resolved.append(alertname)

    def flush(self, timeout: float = 5.0) -> bool:
        self.flushed.append(timeout)
        return True

    def close(self, timeout: float = 5.0) -> None:
        pass

    def handler_failed(self, connection: Any, exc: BaseException) -> None:
        self.events.append(f"failed:{type(exc).__name__}")

    def connection_closed(self, connection: Any) -> None:
        self.events.append("closed")


class Broken(Recorder):
    """An alerter whose every method raises: it must not break anything."""

    def fire(self, alertname: str, **kwargs: Any) -> None:
        raise RuntimeError("broken alerter")

    def flush(self, timeout: float = 5.0) -> bool:
        raise RuntimeError("broken alerter")

    def handler_failed(self, connection: Any, exc: BaseException) -> None:
        raise RuntimeError("broken alerter")


def prom_alerter(
    url: str, registry: CollectorRegistry, **options: Any
) -> contextlib.AbstractContextManager[PrometheusAlerter]:
    """``test_alertmanager.alerter`` labelled ``service="chat"`` only: the instance and
    environment labels keep their defaults."""
    return alerter(url, registry, static={"service": "chat"}, **options)


async def crashing_server(alerters: list[Any], routes: list[str], paths: list[str]) -> None:
    """Crash one connection per path on a real server, and wait until all closed."""
    closed: list[str] = []

    class Closed(Recorder):
        def connection_closed(self, connection: Any) -> None:
            closed.append(connection.id)

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        raise ValueError("handler bug")

    async with ws_monitoring.serve(
        handler, HOST, 0, alerters=[*alerters, Closed()], routes=routes, metrics=False
    ) as server:
        port = server.sockets[0].getsockname()[1]
        for path in paths:
            async with connect(f"ws://{HOST}:{port}{path}") as client:
                await client.send("go")
                with contextlib.suppress(ConnectionClosed):
                    await client.recv()
        await async_wait_until(lambda: len(closed) == len(paths), what="closed connections")


async def test_handler_crashes_become_one_aggregated_alert(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    with (
        running_alertmanager(tmp_path) as am,
        prom_alerter(am.url, registry, crash_quiet_period=3600) as prom,
    ):
        await crashing_server([prom], ["/rooms/{room}"], ["/rooms/1", "/rooms/2", "/lobby"])
        assert prom.flush(5)
        alerts = am.alerts()
        assert len(alerts) == 1
        alert = alerts[0]
        assert alert["labels"] == {
            "alertname": "WebSocketHandlerCrashes",
            "severity": "critical",
            "service": "chat",
            "instance": socket.gethostname(),
            "environment": "production",
        }
        assert alert["annotations"]["count"] == "3"
        assert alert["annotations"]["routes"] == "/rooms/{room} (2), __unmatched__ (1)"
        assert alert["annotations"]["exception_types"] == "builtins.ValueError (3)"
        assert alert["annotations"]["summary"] == (
            "3 WebSocket handler crashes on /rooms/{room}, __unmatched__"
        )


async def test_crash_alert_resolves_after_the_quiet_period(registry: CollectorRegistry) -> None:
    with recording_peer() as peer, prom_alerter(
        peer.url, registry, crash_quiet_period=0.3
    ) as prom:  # fmt: skip
        await crashing_server([prom], ["/"], ["/"])
        await async_wait_until(lambda: len(peer.alerts()) == 2, what="fire, then resolve")
        fired, resolved = peer.alerts()
        assert fired["labels"]["alertname"] == "WebSocketHandlerCrashes"
        assert fired["annotations"]["count"] == "1"
        assert resolved["labels"] == fired["labels"]
        assert resolved["endsAt"] < fired["endsAt"]
        # A new episode counts from one again.
        await crashing_server([prom], ["/"], ["/"])
        await async_wait_until(lambda: len(peer.alerts()) >= 3, what="a new episode")
        assert peer.alerts()[2]["annotations"]["count"] == "1"


def test_alerters_flush_side_by_side_at_shutdown() -> None:
    class Stuck(Recorder):
        """An alerter whose delivery hangs: its flush takes all the time it is given."""

        def flush(self, timeout: float = 5.0) -> bool:
            super().flush(timeout)
            threading.Event().wait(timeout)
            return False

    stuck, quick = Stuck(), Recorder()
    AlertingSink([stuck, quick]).shutdown(0.3)
    # The one after the stuck alerter had the whole deadline too, not what was left.
    assert 0.2 < stuck.flushed[0] <= 0.3
    assert 0.2 < quick.flushed[0] <= 0.3


class ThreadsPrivacy(Privacy):
    """The real privacy layer, noting the threads that scrub."""

    def __init__(self) -> None:
        super().__init__(Config())
        self.threads: set[str] = set()

    def scrub(self, mapping: Any, *, keep: Any = ()) -> dict[str, Any]:
        self.threads.add(threading.current_thread().name)
        return super().scrub(mapping, keep=keep)


def test_built_in_alerts_are_built_off_the_connection_thread(registry: CollectorRegistry) -> None:
    class Record:
        route = "/r"
        error_type = "connection_reset"

    privacy = ThreadsPrivacy()
    with recording_peer() as peer, prom_alerter(
        peer.url, registry, privacy=privacy, error_rate_threshold=0.1, error_rate_window=10
    ) as prom:  # fmt: skip
        # The sink events, as the event loop calls them: they only count.
        prom.handler_failed(Record(), ValueError("bug"))  # type: ignore[arg-type]
        for _ in range(2):
            prom.connection_closed(Record())  # type: ignore[arg-type]
        wait_until(lambda: len({a["labels"]["alertname"] for a in peer.alerts()}) == 2,
                   what="both built-in alerts")  # fmt: skip
    assert {a["labels"]["alertname"] for a in peer.alerts()} == {
        "WebSocketHandlerCrashes",
        "WebSocketErrorStorm",
    }
    assert privacy.threads
    assert threading.current_thread().name not in privacy.threads


def test_crash_routes_and_types_are_bounded(registry: CollectorRegistry) -> None:
    with recording_peer() as peer, prom_alerter(peer.url, registry) as prom:

        class Record:
            def __init__(self, route: str) -> None:
                self.route = route

        for index in range(15):
            prom.handler_failed(Record(f"/r{index}"), type(f"E{index}", (Exception,), {})())  # type: ignore[arg-type]
        prom.handler_failed(Record("/r0"), ConnectionResetError())  # type: ignore[arg-type]
        assert prom.flush(5)
        notes = peer.alerts()[-1]["annotations"]
        assert notes["count"] == "15"
        # Ten names at most, by count then name; the rest folds into "other".
        assert notes["routes"] == "other (5), " + ", ".join(f"/r{i} (1)" for i in range(10))
        assert notes["exception_types"] == "other (5), " + ", ".join(
            f"tests.alerting.test_sink.E{i} (1)" for i in range(10)
        )


async def test_an_error_storm_raises_one_alert(registry: CollectorRegistry) -> None:
    with recording_peer() as peer, prom_alerter(
        peer.url, registry, error_rate_threshold=0.2, error_rate_window=10
    ) as prom:  # fmt: skip
        closed: list[str] = []

        class Closed(Recorder):
            def connection_closed(self, connection: Any) -> None:
                closed.append(connection.id)

        async def handler(ws: ServerConnection) -> None:
            await ws.wait_closed()

        async with ws_monitoring.serve(
            handler, HOST, 0, alerters=[prom, Closed()], metrics=False
        ) as server:
            port = server.sockets[0].getsockname()[1]
            # Two clean closes: not errors.
            for _ in range(2):
                async with connect(f"ws://{HOST}:{port}/"):
                    pass
            # Three abrupt resets: 3 errors in a 10 s window is 0.3/s > 0.2/s.
            for _ in range(3):
                client = await connect(f"ws://{HOST}:{port}/")
                client.transport.abort()
            await async_wait_until(lambda: len(closed) == 5, what="5 closed connections")
            # Failed handshakes count too (a client that just leaves does not).
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GARBAGE\r\n\r\n")
            await reader.read()
            writer.close()
        assert prom.flush(5)
        storms = [a for a in peer.alerts() if a["labels"]["alertname"] == "WebSocketErrorStorm"]
        assert len(storms) >= 1
        last = storms[-1]
        assert last["labels"]["severity"] == "warning"
        assert "connection_reset (3)" in last["annotations"]["error_types"]
        assert float(last["annotations"]["rate_per_second"]) >= 0.3
        assert [a["labels"]["alertname"] for a in peer.alerts()] == ["WebSocketErrorStorm"] * len(
            storms
        )


async def test_one_line_setup_with_instrument(registry: CollectorRegistry) -> None:
    recorder = Recorder()

    @ws_monitoring.instrument(alerters=[recorder], metrics=False)
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        raise KeyError("bug")

    from websockets.asyncio.server import serve

    async with serve(handler, HOST, 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://{HOST}:{port}/") as client:
            await client.send("x")
            with contextlib.suppress(ConnectionClosed):
                await client.recv()
        await async_wait_until(lambda: "closed" in recorder.events, what="the close")
    assert recorder.events == ["failed:KeyError", "closed"]


async def test_a_broken_alerter_never_breaks_the_server(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()

    async def handler(ws: ServerConnection) -> None:
        message = await ws.recv()
        if message == "crash":
            raise ValueError("x")
        await ws.send(message)

    async with ws_monitoring.serve(
        handler, HOST, 0, alerters=[Broken(), recorder], metrics=False
    ) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://{HOST}:{port}/") as client:
            await client.send("crash")
            with pytest.raises(ConnectionClosed) as info:
                await client.recv()
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == 1011
        async with connect(f"ws://{HOST}:{port}/") as client:
            await client.send("still fine")
            assert await client.recv() == "still fine"
        await async_wait_until(lambda: recorder.events.count("closed") == 2, what="2 closes")
    assert recorder.events[0] == "failed:ValueError"
    assert any("Broken.handler_failed" in r.getMessage() for r in caplog.records)


def test_build_sink(registry: CollectorRegistry) -> None:
    assert build_sink(Config()) is None
    recorder = Recorder()
    sink = build_sink(Config(alerters=[recorder]))
    assert type(sink) is AlertingSink
    with pytest.raises(TypeError, match="not an alerter"):
        build_sink(Config(alerters=[object()]))
    assert isinstance(recorder, Alerter)
    # Shutdown flushes every alerter within the shared deadline, even past a broken one.
    broken = Broken()
    AlertingSink([broken, recorder]).shutdown(1.0)
    assert len(recorder.flushed) == 1
    assert 0 <= recorder.flushed[0] <= 1.0


def test_message_sink_fan_out() -> None:
    class Messages(Recorder):
        def handshake_finished(self, handshake: Any) -> None:
            self.events.append("handshake")

        def connection_opened(self, connection: Any) -> None:
            self.events.append("opened")

        def shutdown(self, timeout: float) -> None:
            pass

        def message_started(self, connection: Any, message: Any) -> object:
            self.events.append(f"started:{message}")
            return message

        def message_finished(self, connection: Any, token: object, duration: float,
                             error: BaseException | None) -> None:  # fmt: skip
            self.events.append(f"finished:{token}")

        def message_sent(self, connection: Any, binary: bool, size: int) -> None:
            self.events.append(f"sent:{size}")

    first, second, plain = Messages(), Messages(), Recorder()
    sink = build_sink(Config(alerters=[first, plain, second]))
    assert isinstance(sink, AlertingMessageSink)
    sink.handshake_finished(None)  # type: ignore[arg-type]
    sink.connection_opened(None)  # type: ignore[arg-type]
    token = sink.message_started(None, "m")  # type: ignore[arg-type]
    sink.message_finished(None, token, 0.1, None)  # type: ignore[arg-type]
    sink.message_sent(None, False, 3)  # type: ignore[arg-type]
    assert first.events == second.events == [
        "handshake", "opened", "started:m", "finished:m", "sent:3",
    ]  # fmt: skip
    assert plain.events == []
    # One message alerter: its own token, no list.
    only = Messages()
    single = build_sink(Config(alerters=[only, plain]))
    assert isinstance(single, AlertingMessageSink)
    token = single.message_started(None, "s")  # type: ignore[arg-type]
    assert token == "s"
    single.message_finished(None, token, 0.1, None)  # type: ignore[arg-type]
    assert only.events == ["started:s", "finished:s"]


def test_expected_failures() -> None:
    from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK

    assert is_expected_failure(ConnectionClosedOK(None, None))
    assert is_expected_failure(ConnectionClosedError(None, None))
    assert is_expected_failure(asyncio.CancelledError())
    assert is_expected_failure(ConnectionResetError())
    assert is_expected_failure(BrokenPipeError())
    assert not is_expected_failure(ValueError())
    assert not is_expected_failure(OSError())


def test_fire_all_logs_a_failing_alerter(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    fire_all([Broken(), recorder], "X", severity="critical", summary="s", labels={"a": "b"})
    assert recorder.fired == [
        ("X", {"severity": "critical", "summary": "s", "description": None,
               "labels": {"a": "b"}, "annotations": None}),
    ]  # fmt: skip
    assert any("failed to fire X" in r.getMessage() for r in caplog.records)


def test_metrics_server_bind_failure_fires_before_raising(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    recorder = Recorder()
    with running_alertmanager(tmp_path) as am, socket.create_server((HOST, 0)) as taken:
        port = taken.getsockname()[1]
        with prom_alerter(am.url, registry) as prom:
            with pytest.raises(MetricsServerError, match=str(port)):
                start_metrics_server(port, HOST, registry=registry, alerters=[prom, recorder])
            alerts = am.wait_for_alerts(lambda a: len(a) == 1)
    assert alerts[0]["labels"]["alertname"] == "WebSocketMetricsServerDown"
    assert alerts[0]["labels"]["severity"] == "critical"
    assert alerts[0]["annotations"]["listen_address"] == f"{HOST}:{port}"
    assert f"{HOST}:{port}" in alerts[0]["annotations"]["summary"]
    assert [name for name, _ in recorder.fired] == ["WebSocketMetricsServerDown"]


def test_metrics_server_without_alerters_still_raises() -> None:
    with socket.create_server((HOST, 0)) as taken, pytest.raises(MetricsServerError):
        start_metrics_server(taken.getsockname()[1], HOST, registry=CollectorRegistry())


async def test_watchdog_fires_when_the_asyncio_accept_loop_dies() -> None:
    recorder = Recorder()

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with ws_monitoring.serve(handler, HOST, 0, metrics=False) as server:
        port = server.sockets[0].getsockname()[1]
        with watch_server(server, [recorder], interval=0.02, name="chat") as watchdog:
            assert watchdog.check()
            # The thread checked a healthy server at least once, and stayed quiet.
            await async_wait_until(lambda: watchdog.checks >= 3, what="periodic checks")
            assert recorder.fired == []
            # The listening socket stops serving behind websockets' back.
            server.server.close()
            await asyncio.to_thread(watchdog.tripped.wait, 5)
            assert recorder.fired == [
                ("WebSocketServerDown", {
                    "severity": "critical",
                    "summary": "WebSocket server 'chat' stopped accepting connections",
                    "description": recorder.fired[0][1]["description"],
                    "labels": {"server": "chat"},
                    "annotations": {"listen_address": f"{HOST}:{port}"},
                }),
            ]  # fmt: skip
            assert not watchdog.check()
    # Fired once only.
    assert len(recorder.fired) == 1


async def test_watchdog_stays_quiet_on_a_deliberate_close() -> None:
    recorder = Recorder()

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    server = await ws_monitoring.serve(handler, HOST, 0, metrics=False)
    async with watch_server(server, [recorder], interval=0.02) as watchdog:
        server.close()
        await server.wait_closed()
        assert watchdog.check()
    assert recorder.fired == []


def test_watchdog_sync_server(tmp_path: Path) -> None:
    def handler(ws: Any) -> None:
        for message in ws:
            ws.send(message)

    # A deliberate shutdown: no alert, even with serve_forever() returning.
    quiet = Recorder()
    server = ws_monitoring.serve_sync(handler, HOST, 0, metrics=False)
    with watch_server(server, [quiet], interval=0.02) as watchdog:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        port = server.socket.getsockname()[1]
        with sync_connect(f"ws://{HOST}:{port}/") as client:
            client.send("x")
            assert client.recv() == "x"
        server.shutdown()
        thread.join(5)
        assert watchdog.check()
    assert quiet.fired == []

    # The listening socket dies under serve_forever(): the loop exits, the alert fires.
    recorder = Recorder()
    server = ws_monitoring.serve_sync(handler, HOST, 0, metrics=False)
    port = server.socket.getsockname()[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    with watch_server(server, [recorder], interval=3600, name="sync") as watchdog:
        thread.start()
        wait_until(lambda: watchdog.check() and thread.is_alive(), what="serving")
        with sync_connect(f"ws://{HOST}:{port}/") as client:
            client.send("y")
            assert client.recv() == "y"
        # Not shutdown(): the listening socket fails under serve_forever() (on Linux,
        # accept() then raises EINVAL), which ends websockets' accept loop for good.
        server.socket.shutdown(socket.SHUT_RDWR)
        thread.join(5)
        assert not thread.is_alive()
    # stop() checked one last time (the interval is an hour): it fired.
    assert [name for name, _ in recorder.fired] == ["WebSocketServerDown"]
    assert recorder.fired[0][1]["annotations"] == {"listen_address": f"{HOST}:{port}"}
    server.shutdown()


def test_watchdog_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="interval"):
        watch_server(object(), [], interval=0)
    with pytest.raises(TypeError, match="websockets asyncio or threading Server"):
        watch_server(object(), [])
    server = ws_monitoring.serve_sync(lambda ws: None, HOST, 0, metrics=False)
    try:
        with pytest.raises(TypeError, match="not an alerter"):
            watch_server(server, [object()])
    finally:
        server.socket.close()


def test_watchdog_of_a_server_already_dead() -> None:
    recorder = Recorder()
    server = ws_monitoring.serve_sync(lambda ws: None, HOST, 0, metrics=False)
    server.socket.close()
    watchdog = ServerWatchdog(server, [recorder], interval=3600)
    # Never started: stop() still checks once, and a second stop() does nothing.
    watchdog.stop()
    watchdog.stop()
    assert watchdog.tripped.is_set()
    assert [(name, kw["annotations"]) for name, kw in recorder.fired] == [
        ("WebSocketServerDown", {"listen_address": "unknown"}),
    ]


def test_errors_age_out_of_the_rate_window(registry: CollectorRegistry) -> None:
    class Record:
        error_type = "connection_reset"

    with recording_peer() as peer, prom_alerter(
        peer.url, registry, error_rate_threshold=0.5, error_rate_window=4
    ) as prom:  # fmt: skip
        start = int(time.monotonic())
        prom.connection_closed(Record())  # type: ignore[arg-type]
        prom.connection_closed(Record())  # type: ignore[arg-type]
        # 2 errors in a 4 s window: 0.5/s is not over the threshold.
        wait_until(lambda: int(time.monotonic()) > start, what="the next second")
        assert prom.flush(1)
        assert peer.alerts() == []
        # The first two are still in the window: 3 errors in 4 s is over it.
        prom.connection_closed(Record())  # type: ignore[arg-type]
        assert prom.flush(5)
        (alert,) = peer.alerts()
        assert alert["annotations"]["rate_per_second"] == "0.75"
        assert alert["annotations"]["error_types"] == "connection_reset (3)"


def test_prometheus_alerter_as_sink_counts_failed_handshakes(
    registry: CollectorRegistry,
) -> None:
    class Handshake:
        def __init__(self, outcome: str, failure: str | None) -> None:
            self.outcome = outcome
            self.failure = failure

    with recording_peer() as peer, prom_alerter(
        peer.url, registry, error_rate_threshold=0.1, error_rate_window=10
    ) as prom:  # fmt: skip
        for outcome, failure in [("accepted", None), ("rejected", None),
                                 ("failed", "connection_lost")]:  # fmt: skip
            prom.handshake_finished(Handshake(outcome, failure))  # type: ignore[arg-type]
        assert prom.flush(1)
        assert peer.alerts() == []
        for _ in range(2):
            prom.handshake_finished(Handshake("failed", "timeout"))  # type: ignore[arg-type]
        assert prom.flush(5)
        (alert,) = peer.alerts()
        assert alert["annotations"]["error_types"] == "handshake_timeout (2)"
