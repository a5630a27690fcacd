"""Sentry: the real sentry-sdk sending envelopes to a real local HTTP receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

import ws_monitoring
from tests.helpers.process import HangingPeer
from tests.helpers.scrape import Samples
from tests.helpers.sentry_receiver import SentryReceiver, reset_sentry, sentry_receiver
from tests.helpers.servers import HOST, async_wait_until, wait_until
from ws_monitoring.alerting.sentry import SentryAlerter, WebsocketsIntegration
from ws_monitoring.alerting.sink import build_sink
from ws_monitoring.config import Config
from ws_monitoring.consent import privacy_of
from ws_monitoring.privacy import Privacy

ROUTES = ["/rooms/{room}"]


@pytest.fixture
def receiver() -> Iterator[SentryReceiver]:
    with sentry_receiver() as running:
        yield running


class Closed:
    """A real sink counting closed connections, to wait on a condition."""

    def __init__(self) -> None:
        self.count = 0

    def handshake_finished(self, handshake: Any) -> None:
        pass

    def connection_opened(self, connection: Any) -> None:
        pass

    def handler_failed(self, connection: Any, exc: BaseException) -> None:
        pass

    def connection_closed(self, connection: Any) -> None:
        self.count += 1

    def shutdown(self, timeout: float) -> None:
        pass


def sentinel(receiver: SentryReceiver, alerter: SentryAlerter) -> list[dict[str, Any]]:
    """Every event captured so far, proven complete by a sentinel (see ``drain``)."""
    return receiver.drain(alerter)


def crumbs(event: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c["data"]
        for c in event.get("breadcrumbs", {}).get("values", [])
        if c.get("category") == "websocket.message"
    ]


@contextlib.asynccontextmanager
async def serving(
    handler: Any, *alerters: Any, closes: int = 1, **options: Any
) -> AsyncIterator[tuple[Server, str]]:
    """``ws_monitoring.serve`` on a free loopback port with ``alerters`` and no metrics.

    Yields the server and its ``ws://host:port`` base URL; once the block is done, waits
    until ``closes`` connections have closed (every sink has seen them) before the
    server stops.
    """
    closed = Closed()
    async with ws_monitoring.serve(
        handler, HOST, 0, alerters=list(alerters), metrics=False, sinks=[closed], **options
    ) as server:
        port = server.sockets[0].getsockname()[1]
        yield server, f"ws://{HOST}:{port}"
        await async_wait_until(lambda: closed.count == closes, what=f"{closes} closed")


async def crash_once(
    alerter: SentryAlerter, *, consent: frozenset[str] = frozenset(), **options: Any
) -> tuple[str, Any]:
    """A real server whose handler echoes, then crashes on "boom"; returns (id, server)."""
    seen: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        seen.append(str(ws.id))
        async for message in ws:
            if message == "boom":
                raise ValueError("boom")
            await ws.send(message)

    async with (
        serving(
            handler,
            alerter,
            routes=ROUTES,
            user_id_resolver=lambda request: request.headers.get("X-User"),
            consent_resolver=lambda request: consent,
            **options,
        ) as (server, url),
        connect(f"{url}/rooms/42?token=secret", additional_headers={"X-User": "alice"}) as client,
    ):
        await client.send("hello")
        assert await client.recv() == "hello"
        await client.send(b"\x00\x01")
        assert await client.recv() == b"\x00\x01"
        await client.send("boom")
        with pytest.raises(ConnectionClosed) as info:
            await client.recv()
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1011
    return seen[0], server


async def test_handler_crash_is_one_complete_event(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, environment="test", release="1.2.3", registry=registry)
    connection_id, server = await crash_once(alerter)
    events = await asyncio.to_thread(sentinel, receiver, alerter)

    # One event per crash: the handler_crashed and "connection handler failed" log
    # records of the same exception are not reported again.
    assert len(events) == 1, events
    event = events[0]
    assert event["environment"] == "test"
    assert event["release"] == "1.2.3"
    exception = event["exception"]["values"][-1]
    assert exception["type"] == "ValueError"
    assert exception["value"] == "boom"
    assert exception["mechanism"]["type"] == "websockets"
    assert exception["mechanism"]["handled"] is False
    frames = exception["stacktrace"]["frames"]
    assert frames[-1]["function"] == "handler"
    assert all("vars" not in frame for frame in frames)
    assert event["tags"]["websocket.route"] == "/rooms/{room}"
    assert event["tags"]["websocket.connection_id"] == connection_id
    assert event["tags"]["websocket.close_code"] == "1011"
    context = event["contexts"]["websocket"]
    assert context["route"] == "/rooms/{room}"
    assert context["subprotocol"] is None
    assert context["messages_received"] == 3
    assert context["messages_sent"] == 2
    assert context["bytes_received"] == 5 + 2 + 4
    assert context["bytes_sent"] == 5 + 2
    assert context["age_seconds"] >= 0
    assert crumbs(event) == [
        {"direction": "in", "type": "text", "size": 5},
        {"direction": "out", "type": "text", "size": 5},
        {"direction": "in", "type": "binary", "size": 2},
        {"direction": "out", "type": "binary", "size": 2},
        {"direction": "in", "type": "text", "size": 4},
    ]
    assert event["fingerprint"] == ["websockets", "/rooms/{room}", "ValueError"]
    privacy = privacy_of(server)
    # The anonymized IP is set too, but the SDK strips ip_address without default PII.
    assert event["user"] == {"id": privacy.pseudonymize("alice")}
    assert "alice" not in receiver.raw_text()
    assert "secret" not in receiver.raw_text()
    samples = Samples(ws_monitoring_exposition(registry))
    assert samples.get("ws_monitoring_alerts_total", sink="sentry", outcome="sent") == 1
    assert samples.get("ws_monitoring_alerts_total", sink="sentry", outcome="dropped") == 0
    assert samples.get("ws_monitoring_alert_queue_depth", sink="sentry") == 0


def ws_monitoring_exposition(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


async def test_consented_connection_gets_payload_breadcrumbs_and_raw_user(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry, payload_bytes=3)
    await crash_once(alerter, consent=frozenset({"payload", "user"}))
    events = await asyncio.to_thread(sentinel, receiver, alerter)
    assert len(events) == 1
    assert crumbs(events[0]) == [
        {"direction": "in", "type": "text", "size": 5, "payload": "hel"},
        {"direction": "out", "type": "text", "size": 5},
        {"direction": "in", "type": "binary", "size": 2, "payload": "0001"},
        {"direction": "out", "type": "binary", "size": 2},
        {"direction": "in", "type": "text", "size": 4, "payload": "boo"},
    ]
    assert events[0]["user"]["id"] == "alice"


async def test_breadcrumbs_keep_the_last_frames_only(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry, max_frames=2)
    await crash_once(alerter)
    events = await asyncio.to_thread(sentinel, receiver, alerter)
    assert crumbs(events[0]) == [
        {"direction": "out", "type": "binary", "size": 2},
        {"direction": "in", "type": "text", "size": 4},
    ]


async def test_normal_closes_closed_ok_and_resets_produce_no_event(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry)

    async def handler(ws: ServerConnection) -> None:
        if ws.request is not None and ws.request.path == "/return":
            await ws.recv()
            return
        if ws.request is not None and ws.request.path == "/reset-error":
            raise ConnectionResetError("peer reset")
        # Raises ConnectionClosedOK after a normal close, ConnectionClosedError after a
        # reset: both propagate, websockets logs them, and neither is reported.
        while True:
            await ws.recv()

    async with serving(handler, alerter, closes=4) as (_, url):
        async with connect(f"{url}/return") as client:
            await client.send("x")
            await client.wait_closed()
        async with connect(f"{url}/closed-ok") as client:
            await client.send("x")
        async with connect(f"{url}/reset") as client:
            await client.send("x")
            client.transport.abort()
        async with connect(f"{url}/reset-error") as client:
            with contextlib.suppress(ConnectionClosed):
                await client.recv()
    events = await asyncio.to_thread(sentinel, receiver, alerter)
    assert events == []


def test_sync_server_crash_runs_in_the_connection_scope(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry)
    closed = Closed()

    def handler(ws: Any) -> None:
        # Set inside the connection: stays in that connection's isolation scope.
        sentry_sdk.set_tag("room", ws.request.path)
        for message in ws:
            if message == "boom":
                raise KeyError("missing")
            ws.send(message)

    server = ws_monitoring.serve_sync(
        handler, HOST, 0, alerters=[alerter], metrics=False, sinks=[closed], routes=ROUTES
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.socket.getsockname()[1]
        with sync_connect(f"ws://{HOST}:{port}/rooms/7") as client:
            client.send("a")
            assert client.recv() == "a"
            client.send("boom")
            with pytest.raises(ConnectionClosed):
                client.recv()
        wait_until(lambda: closed.count == 1, what="the connection closed")
    finally:
        server.shutdown()
    events = sentinel(receiver, alerter)
    assert len(events) == 1
    event = events[0]
    assert event["exception"]["values"][-1]["type"] == "KeyError"
    assert event["exception"]["values"][-1]["mechanism"] == {"type": "websockets",
                                                            "handled": False}  # fmt: skip
    assert event["tags"]["room"] == "/rooms/7"
    assert event["tags"]["websocket.route"] == "/rooms/{room}"
    assert event["fingerprint"] == ["websockets", "/rooms/{room}", "KeyError"]
    # The scope was left when the connection closed: the tag did not leak out.
    sentry_sdk.capture_message("after")
    after = receiver.wait_for_events(predicate=lambda e: e.get("message") == "after")[0]
    assert "room" not in after.get("tags", {})
    assert "websocket.route" not in after.get("tags", {})


async def test_events_captured_by_the_handler_are_enriched_and_scrubbed(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry)

    async def handler(ws: ServerConnection) -> None:
        message = await ws.recv()
        # Built at run time: the event's source context must not hold the raw value.
        peer = ".".join(["203", "0", "113", str(7 * 11)])
        try:
            raise LookupError(f"no room for {peer} ({message})")
        except LookupError:
            sentry_sdk.capture_exception()
        await ws.send("ok")

    async with serving(handler, alerter) as (_, url), connect(f"{url}/lobby") as client:
        await client.send("hi")
        assert await client.recv() == "ok"
    events = await asyncio.to_thread(sentinel, receiver, alerter)
    assert len(events) == 1
    event = events[0]
    assert event["exception"]["values"][-1]["value"] == "no room for 203.0.113.0 (hi)"
    assert event["tags"]["websocket.route"] == "/lobby"
    assert "websocket.close_code" not in event["tags"]
    assert event["contexts"]["websocket"]["messages_received"] == 1
    assert event["fingerprint"] == ["websockets", "/lobby", "LookupError"]
    assert "203.0.113.77" not in receiver.raw_text()


async def test_an_application_client_is_kept_and_extended(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    def before_send(event: Any, hint: Any) -> Any:
        event.setdefault("tags", {})["app_hook"] = "yes"
        return event

    sentry_sdk.init(
        dsn=receiver.dsn, environment="app-env", before_send=before_send, default_integrations=False
    )
    client = sentry_sdk.get_client()
    alerter = SentryAlerter("http://other@127.0.0.1:1/1", environment="ours", registry=registry)
    assert not alerter.owns_client
    assert sentry_sdk.get_client() is client
    assert client.options["environment"] == "app-env"
    assert client.options["before_send"] is before_send
    assert client.get_integration(WebsocketsIntegration) is alerter.integration
    # A second alerter reuses the integration already there.
    SentryAlerter(registry=CollectorRegistry())
    assert client.get_integration(WebsocketsIntegration) is alerter.integration

    await crash_once(alerter)
    events = await asyncio.to_thread(sentinel, receiver, alerter)
    assert len(events) == 1
    event = events[0]
    assert event["environment"] == "app-env"
    assert event["tags"]["app_hook"] == "yes"
    assert event["exception"]["values"][-1]["mechanism"]["type"] == "websockets"
    assert event["tags"]["websocket.route"] == "/rooms/{room}"
    assert "alice" not in receiver.raw_text()
    # Closing an alerter that did not initialise the SDK leaves the client running.
    alerter.close(timeout=1)
    assert sentry_sdk.get_client() is client
    assert client.transport is not None


async def test_without_the_integration_the_sink_stays_quiet(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry)
    # The application re-initialises Sentry without the integration: hooks do nothing.
    sentry_sdk.init(dsn=receiver.dsn, default_integrations=False)
    await crash_once(alerter)
    assert await asyncio.to_thread(sentinel, receiver, alerter) == []


def test_fire_deduplicates_and_groups(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry, cooldown=0)
    labels = {"backend": "payments", "peer": "203.0.113.77"}
    alerter.fire(
        "PaymentsDown", severity="critical", summary="payments backend down",
        description="since 203.0.113.77 left", labels=labels, annotations={"runbook": "rb"},
    )  # fmt: skip
    alerter.fire("PaymentsDown", severity="critical", summary="again", labels=labels)
    alerter.fire("Slow", severity="warning", summary="slow")
    alerter.resolve("PaymentsDown", labels)
    alerter.resolve("NeverFired")
    alerter.fire("PaymentsDown", severity="critical", summary="back again", labels=labels)
    events = sentinel(receiver, alerter)
    assert [e["message"] for e in events] == [
        "payments backend down",
        "slow",
        "back again",
    ]
    first = events[0]
    assert first["level"] == "fatal"
    assert events[1]["level"] == "warning"
    assert first["fingerprint"] == [
        "ws-monitoring-alert", "PaymentsDown", "backend=payments", "peer=203.0.113.0",
    ]  # fmt: skip
    assert first["tags"]["alertname"] == "PaymentsDown"
    assert first["tags"]["severity"] == "critical"
    assert first["tags"]["alert.backend"] == "payments"
    assert first["contexts"]["alert"]["annotations"] == {
        "runbook": "rb",
        "description": "since 203.0.113.0 left",
    }
    assert "203.0.113.77" not in receiver.raw_text()
    samples = Samples(ws_monitoring_exposition(registry))
    assert samples.get("ws_monitoring_alerts_total", sink="sentry", outcome="sent") == 3


def test_fire_cooldown_holds_back_a_flapping_alert(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry, cooldown=3600)
    for _ in range(5):
        alerter.fire("Flap", severity="error", summary="flap")
        alerter.resolve("Flap")
    assert [e["message"] for e in sentinel(receiver, alerter)] == ["flap"]


def test_fire_rejects_bad_input(receiver: SentryReceiver, registry: CollectorRegistry) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry)
    with pytest.raises(ValueError, match="alertname"):
        alerter.fire("", severity="critical", summary="x")
    with pytest.raises(ValueError, match="cooldown"):
        SentryAlerter(receiver.dsn, cooldown=-1)
    with pytest.raises(ValueError, match="negative"):
        WebsocketsIntegration(max_frames=-1)


def test_dsn_falls_back_to_the_environment(
    receiver: SentryReceiver, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SENTRY_DSN", receiver.dsn)
    alerter = SentryAlerter(registry=registry)
    assert alerter.owns_client
    alerter.fire("FromEnv", severity="info", summary="from env")
    assert [e["message"] for e in sentinel(receiver, alerter)] == ["from env"]
    assert alerter.flush(2)
    alerter.close(timeout=1)
    assert sentry_sdk.get_client().transport is None


def test_capture_never_blocks_and_the_transport_queue_is_bounded(
    registry: CollectorRegistry,
) -> None:
    hanging = HangingPeer()
    reset_sentry()
    try:
        alerter = SentryAlerter(
            f"http://key@{HOST}:{hanging.port}/1",
            registry=registry,
            cooldown=0,
            transport_queue_size=2,
            default_integrations=False,
        )
        alerter.fire("First", severity="error", summary="first")
        depth = lambda: Samples(ws_monitoring_exposition(registry)).get(  # noqa: E731
            "ws_monitoring_alert_queue_depth", sink="sentry"
        )
        # The worker took the first event and is stuck on the hanging server.
        wait_until(lambda: hanging.accepted and depth() == 0, what="the first event in flight")
        for index in range(10):
            alerter.fire(f"Alert{index}", severity="error", summary=f"alert {index}")
        # The alerter's worker hands them to the transport, whose queue takes two.
        wait_until(
            lambda: (
                Samples(ws_monitoring_exposition(registry)).get(
                    "ws_monitoring_alerts_total", sink="sentry", outcome="dropped"
                )
                == 8
            ),
            what="8 events dropped",
        )
        samples = Samples(ws_monitoring_exposition(registry))
        assert samples.get("ws_monitoring_alert_queue_depth", sink="sentry") == 2
        assert samples.get("ws_monitoring_alerts_total", sink="sentry", outcome="sent") == 3
        assert samples.get("ws_monitoring_alerts_total", sink="sentry", outcome="dropped") == 8
        assert not alerter.flush(0.05)
    finally:
        hanging.close()
        reset_sentry(timeout=0.1)


def test_build_sink_is_a_message_sink_only_with_sentry(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    from ws_monitoring.typing import MessageSink

    alerter = SentryAlerter(receiver.dsn, registry=registry)
    sink = build_sink(Config(alerters=[alerter]))
    assert isinstance(sink, MessageSink)


def test_the_application_before_send_runs_first(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    def before_send(event: Any, hint: Any) -> Any:
        if event.get("message") == "drop me":
            return None
        event.setdefault("extra", {})["added"] = "by the app for 203.0.113.77"
        return event

    alerter = SentryAlerter(receiver.dsn, registry=registry, before_send=before_send)
    alerter.fire("Dropped", severity="error", summary="drop me")
    alerter.fire("Kept", severity="error", summary="keep me")
    events = sentinel(receiver, alerter)
    assert [e["message"] for e in events] == ["keep me"]
    # The privacy layer runs after the application's hook.
    assert events[0]["extra"]["added"] == "by the app for 203.0.113.0"
    samples = Samples(ws_monitoring_exposition(registry))
    assert samples.get("ws_monitoring_alerts_total", sink="sentry", outcome="sent") == 1


class BrokenPrivacy(Privacy):
    """A privacy layer that cannot scrub: events must then not be sent at all."""

    def scrub_event(self, event: Any) -> dict[str, Any]:
        raise RuntimeError("cannot scrub")


def test_an_event_that_cannot_be_scrubbed_is_not_sent(
    receiver: SentryReceiver, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    SentryAlerter(receiver.dsn, registry=registry, privacy=BrokenPrivacy(Config()))
    sentry_sdk.capture_message("203.0.113.77 must not leave")
    # The sentinel is dropped too: wait on the client's flush instead.
    sentry_sdk.flush(5)
    assert receiver.events == []
    assert any("could not be scrubbed" in r.getMessage() for r in caplog.records)


async def test_a_connection_event_that_cannot_be_scrubbed_is_not_sent(
    receiver: SentryReceiver,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry)

    async def handler(ws: ServerConnection) -> None:
        privacy = privacy_of(ws)
        monkeypatch.setattr(privacy, "scrub_event", BrokenPrivacy.scrub_event.__get__(privacy))
        sentry_sdk.capture_message("inside")
        await ws.send("done")

    async with serving(handler, alerter) as (_, url), connect(f"{url}/") as client:
        assert await client.recv() == "done"
    assert await asyncio.to_thread(sentinel, receiver, alerter) == []
    assert any("could not be scrubbed" in r.getMessage() for r in caplog.records)


async def test_foreign_breadcrumbs_holding_dead_weak_proxies_are_scrubbed(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry)

    class Thing:
        pass

    async def handler(ws: ServerConnection) -> None:
        thing = Thing()
        sentry_sdk.add_breadcrumb(category="app", data={"thing": weakref.proxy(thing)})
        del thing  # the breadcrumb now holds a dead weak proxy
        await ws.recv()
        raise ValueError("crash")

    await run_and_crash(handler, alerter)
    (event,) = await asyncio.to_thread(sentinel, receiver, alerter)
    crumbs = {c.get("category"): c for c in event["breadcrumbs"]["values"]}
    # The application's breadcrumb is kept; the unreadable value inside it is replaced.
    assert crumbs["app"]["data"] == {"thing": "[weak reference]"}
    assert crumbs["websocket.message"]["data"]["direction"] == "in"


async def run_and_crash(
    handler: Any, alerter: Any, *alerters: Any, repeat: int = 1, **options: Any
) -> None:
    """``repeat`` connections, one after the other, send "go" and wait for the close;
    ``alerters`` come first."""
    async with serving(handler, *alerters, alerter, closes=repeat, **options) as (_, url):
        for _ in range(repeat):
            async with connect(f"{url}/") as client:
                await client.send("go")
                with contextlib.suppress(ConnectionClosed):
                    await client.recv()


async def test_events_after_the_close_carry_the_close_code(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    class CapturesOnClose:
        """An alerter before Sentry's that reports from connection_closed."""

        def fire(self, alertname: str, **kwargs: Any) -> None: ...
        def resolve(self, alertname: str, labels: Any = None) -> None: ...
        def flush(self, timeout: float = 5.0) -> bool:
            return True

        def close(self, timeout: float = 5.0) -> None: ...
        def connection_closed(self, connection: Any) -> None:
            sentry_sdk.capture_message("closing")

    alerter = SentryAlerter(receiver.dsn, registry=registry)

    async def handler(ws: ServerConnection) -> None:
        # A message event before any frame: no breadcrumbs, no exception fingerprint.
        sentry_sdk.capture_message("first")
        await ws.recv()

    await run_and_crash(handler, alerter, CapturesOnClose())
    first, closing = await asyncio.to_thread(sentinel, receiver, alerter)
    assert first["message"] == "first"
    assert "websocket.close_code" not in first["tags"]
    assert crumbs(first) == []
    assert "fingerprint" not in first
    assert closing["message"] == "closing"
    assert closing["tags"]["websocket.close_code"] == "1000"
    assert closing["contexts"]["websocket"]["messages_received"] == 1


async def test_a_client_re_initialised_mid_connection_is_left_alone(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry)

    async def handler(ws: ServerConnection) -> None:
        sentry_sdk.init(dsn=receiver.dsn, default_integrations=False)
        sentry_sdk.capture_message("mid")
        await ws.recv()

    await run_and_crash(handler, alerter)
    (event,) = await asyncio.to_thread(sentinel, receiver, alerter)
    assert event["message"] == "mid"
    assert "websocket" not in event.get("contexts", {})


async def test_a_unix_socket_client_has_no_user(
    receiver: SentryReceiver, registry: CollectorRegistry, tmp_path: Path
) -> None:
    from websockets.asyncio.client import unix_connect
    from websockets.asyncio.server import unix_serve

    alerter = SentryAlerter(receiver.dsn, registry=registry)
    closed = Closed()

    @ws_monitoring.instrument(alerters=[alerter], sinks=[closed], metrics=False)
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        raise ValueError("crash")

    path = str(tmp_path / "ws.sock")
    async with unix_serve(handler, path):
        async with unix_connect(path) as client:
            await client.send("go")
            with contextlib.suppress(ConnectionClosed):
                await client.recv()
        await async_wait_until(lambda: closed.count == 1, what="the close")
    (event,) = await asyncio.to_thread(sentinel, receiver, alerter)
    assert event["exception"]["values"][-1]["type"] == "ValueError"
    assert "user" not in event


def test_shutdown_flushes_and_the_cooldown_table_is_bounded(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry, cooldown=3600)
    alerter.max_tracked = 4
    for index in range(6):
        alerter.fire(f"A{index}", severity="info", summary=f"a{index}")
        alerter.resolve(f"A{index}")
    assert len(alerter._last_capture) <= 4
    # A0 was forgotten: it may be captured again despite its cooldown; A5 may not.
    alerter.fire("A0", severity="info", summary="a0 again")
    alerter.fire("A5", severity="info", summary="a5 again")
    alerter.shutdown(5)
    messages = [e["message"] for e in sentinel(receiver, alerter)]
    assert messages == [f"a{i}" for i in range(6)] + ["a0 again"]


# -- crash storms: nothing on the connection's thread but a few reads (issue 19) -----------


async def test_a_crash_event_is_built_scrubbed_and_sent_off_the_connection_thread(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    pipeline: list[str] = []

    def before_send(event: Any, hint: Any) -> Any:
        # Runs after the processors and the privacy layer, in the same thread.
        pipeline.append(threading.current_thread().name)
        return event

    alerter = SentryAlerter(receiver.dsn, registry=registry, before_send=before_send)
    handler_threads: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        handler_threads.append(threading.current_thread().name)
        await ws.recv()
        raise ValueError("crash")

    await run_and_crash(handler, alerter)
    (event,) = await asyncio.to_thread(sentinel, receiver, alerter)
    assert event["exception"]["values"][-1]["type"] == "ValueError"
    assert len(pipeline) == 2  # the crash event and the sentinel
    assert handler_threads[0] not in pipeline
    # The crash's log records (websockets' and ours) were not built into events that
    # a processor then drops: the SDK reports no such discarded event.
    await asyncio.to_thread(alerter.flush, 5)
    assert discarded(receiver).get(("event_processor", "error"), 0) == 0


def discarded(receiver: SentryReceiver) -> dict[tuple[str, str], int]:
    """Events the SDK reports as discarded (its client reports), by (reason, category)."""
    counts: dict[tuple[str, str], int] = {}
    for _, items in receiver.envelopes:
        for header, payload in items:
            if header.get("type") == "client_report":
                for entry in json.loads(payload).get("discarded_events", []):
                    key = (entry["reason"], entry["category"])
                    counts[key] = counts.get(key, 0) + entry["quantity"]
    return counts


async def test_a_crash_storm_is_rate_limited_per_fingerprint(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry, rate_limit=3, rate_window=3600)

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        raise ValueError("bad json") if ws.request.path == "/a" else KeyError("missing")  # type: ignore[union-attr]

    async with serving(handler, alerter, closes=14) as (_, url):
        for path in ["/a"] * 12 + ["/b"] * 2:
            async with connect(f"{url}{path}") as client:
                await client.send("go")
                with contextlib.suppress(ConnectionClosed):
                    await client.recv()
    events = await asyncio.to_thread(sentinel, receiver, alerter)
    types = [e["exception"]["values"][-1]["type"] for e in events]
    # A burst of three per fingerprint (route and exception type); another one has its own.
    assert sorted(types) == ["KeyError"] * 2 + ["ValueError"] * 3
    samples = Samples(ws_monitoring_exposition(registry))
    assert samples.get("ws_monitoring_alerts_total", sink="sentry", outcome="sent") == 5
    assert samples.get("ws_monitoring_alerts_total", sink="sentry", outcome="dropped") == 9


async def test_the_rate_limit_refills_and_can_be_turned_off(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    limited = SentryAlerter(receiver.dsn, registry=registry, rate_limit=1, rate_window=0.2)
    await run_and_crash(crash_on_message, limited, repeat=2)
    assert len(await asyncio.to_thread(sentinel, receiver, limited)) == 1
    # One token per rate_window / rate_limit seconds.
    await asyncio.sleep(0.3)
    await run_and_crash(crash_on_message, limited)
    assert len(await asyncio.to_thread(sentinel, receiver, limited)) == 2
    with pytest.raises(ValueError, match="rate_limit"):
        SentryAlerter(receiver.dsn, rate_limit=0)
    with pytest.raises(ValueError, match="rate_window"):
        SentryAlerter(receiver.dsn, rate_window=0)

    unlimited = SentryAlerter(receiver.dsn, registry=CollectorRegistry(), rate_limit=None)
    await run_and_crash(crash_on_message, unlimited, repeat=12)
    assert len(await asyncio.to_thread(sentinel, receiver, unlimited)) == 2 + 12


async def crash_on_message(ws: ServerConnection) -> None:
    await ws.recv()
    raise ValueError("crash")


async def test_an_event_keeps_its_last_breadcrumbs_only(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, registry=registry, max_breadcrumbs=5)

    async def handler(ws: ServerConnection) -> None:
        for index in range(50):
            sentry_sdk.add_breadcrumb(category="app", message=f"crumb {index}")
        await ws.recv()
        raise ValueError("crash")

    await run_and_crash(handler, alerter)
    (event,) = await asyncio.to_thread(sentinel, receiver, alerter)
    values = event["breadcrumbs"]["values"]
    assert len(values) == 5
    # The newest: the handler's last ones (then the crash's log record), then ours.
    app = [c["message"] for c in values if c.get("category") == "app"]
    assert app
    assert app == [f"crumb {i}" for i in range(50 - len(app), 50)]
    assert values[-1]["category"] == "websocket.message"
    with pytest.raises(ValueError, match="max_breadcrumbs"):
        WebsocketsIntegration(max_breadcrumbs=-1)


def test_the_worker_queue_is_bounded_and_fire_never_waits(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    release = threading.Event()

    def before_send(event: Any, hint: Any) -> Any:
        release.wait(10)  # a slow pipeline: in the alerter's worker, not in fire()
        return event

    alerter = SentryAlerter(
        receiver.dsn, registry=registry, cooldown=0, queue_size=2, before_send=before_send
    )
    for index in range(5):
        alerter.fire(f"A{index}", severity="error", summary=f"a{index}")
    samples = Samples(ws_monitoring_exposition(registry))
    # One running, one waiting: the other three are dropped at once.
    assert samples.get("ws_monitoring_alert_queue_depth", sink="sentry") == 2
    assert samples.get("ws_monitoring_alerts_total", sink="sentry", outcome="dropped") == 3
    assert not alerter.flush(0.05)
    release.set()
    assert [e["message"] for e in sentinel(receiver, alerter)] == ["a0", "a1"]
    with pytest.raises(ValueError, match="queue_size"):
        SentryAlerter(receiver.dsn, queue_size=0)


def test_close_drops_and_counts_what_the_worker_did_not_start(
    receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    release = threading.Event()

    def before_send(event: Any, hint: Any) -> Any:
        release.wait(10)
        return event

    alerter = SentryAlerter(receiver.dsn, registry=registry, cooldown=0, before_send=before_send)
    for index in range(4):
        alerter.fire(f"A{index}", severity="error", summary=f"a{index}")
    alerter.close(timeout=0.05)
    release.set()
    samples = Samples(ws_monitoring_exposition(registry))
    # The one running goes on; the three waiting are dropped, and later ones too.
    assert samples.get("ws_monitoring_alerts_total", sink="sentry", outcome="dropped") == 3
    alerter.fire("Late", severity="error", summary="late")
    samples = Samples(ws_monitoring_exposition(registry))
    assert samples.get("ws_monitoring_alerts_total", sink="sentry", outcome="dropped") == 4


def test_the_rate_limit_table_is_bounded() -> None:
    from ws_monitoring.alerting.sentry import _RateLimit

    limit = _RateLimit(1, 60.0, max_keys=2)
    assert limit.allow(("/a", "E"), 0.0)
    assert not limit.allow(("/a", "E"), 1.0)
    assert limit.allow(("/b", "E"), 1.0)
    assert limit.allow(("/c", "E"), 1.0)  # forgets /a, the least recently used
    assert limit.allow(("/a", "E"), 1.0)
    assert not limit.allow(("/c", "E"), 1.0)
    assert limit.allow(("/a", "E"), 61.0)  # refilled: one token per 60 s
