"""Entry points: the three ways to call instrument(), errors, and monitor assembly."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.sync.client import connect as sync_connect
from websockets.sync.server import ServerConnection as SyncServerConnection

import ws_monitoring
from tests.helpers.scrape import Samples, scrape
from tests.helpers.servers import async_server, echo, settled, settled_sync, sync_server
from ws_monitoring.adapters.instrument import build_monitor
from ws_monitoring.config import OPTION_NAMES, Config
from ws_monitoring.core import ConnectionRecord, HandshakeRecord, Monitor
from ws_monitoring.metrics import MetricsSink

ROOT = Path(__file__).resolve().parents[2]


def sync_echo(ws: SyncServerConnection) -> None:
    ws.send("ready")  # the client waits for it: the handler is hooked by then
    for message in ws:
        ws.send(message)


async def exchange(url: str) -> None:
    async with connect(url) as client:
        await client.send("one")
        assert await client.recv() == "one"
        await client.send(b"two")
        assert await client.recv() == b"two"


def exchange_sync(url: str) -> None:
    """:func:`exchange` with the threading client, after ``sync_echo``'s greeting."""
    with sync_connect(url) as client:
        assert client.recv() == "ready"
        client.send("one")
        assert client.recv() == "one"
        client.send(b"two")
        assert client.recv() == b"two"


def assert_echo_counted(samples: Samples, route: str = "/", handshakes: float | None = 0) -> None:
    def messages(direction: str, kind: str) -> float | None:
        return samples.get("websocket_messages_total", route=route, direction=direction, type=kind)

    assert samples["websocket_connections_total", {"route": route}] == 1
    assert messages("received", "text") == 1
    assert messages("received", "binary") == 1
    assert messages("sent", "binary") == 1
    assert samples["websocket_disconnections_total", {"route": route, "code": "1000"}] == 1
    # Only ws_monitoring.serve sees handshakes; instrument() alone starts at the handler.
    if handshakes is not None:
        assert samples["websocket_handshake_duration_seconds_count"] == handshakes


async def test_instrument_as_a_plain_decorator() -> None:
    @ws_monitoring.instrument
    async def handler(ws: ServerConnection) -> None:
        await echo(ws)

    assert handler.__name__ == "handler"
    assert isinstance(handler.__ws_monitoring__, Monitor)  # type: ignore[attr-defined]
    assert handler.__ws_monitoring__.config == Config()  # type: ignore[attr-defined]
    # Without options it counts into prometheus_client's default registry, which
    # outlives this test: the route is unique to it.
    with ws_monitoring.start_metrics_server(0, "127.0.0.1") as metrics:
        async with async_server(handler, monitoring={}) as srv:
            await exchange(srv.url("/plain-decorator"))
        samples = scrape(metrics.url)
    assert_echo_counted(samples, route="/plain-decorator", handshakes=None)


async def test_instrument_as_a_decorator_with_options(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    @ws_monitoring.instrument(registry=registry, routes=["/rooms/{id}"])
    async def handler(ws: ServerConnection) -> None:
        await echo(ws)

    # Given to websockets' own serve: no handshake hooks, everything else counted.
    import websockets.asyncio.server

    async with websockets.asyncio.server.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        await exchange(f"ws://127.0.0.1:{port}/rooms/7")
        samples = await settled(scrape_metrics, 1)
    assert_echo_counted(samples, route="/rooms/{id}")


async def test_instrument_called_with_the_handler(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    handler = ws_monitoring.instrument(echo, registry=registry)
    assert handler.__wrapped__ is echo  # type: ignore[attr-defined]
    async with async_server(handler, monitoring={}) as srv:
        await exchange(srv.url("/x"))
        samples = await settled(scrape_metrics, 1)
    # ws_monitoring.serve reuses the handler's monitor, handshake hooks included.
    assert_echo_counted(samples, route="/x", handshakes=1)


async def test_instrument_an_object_with_async_call(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    class Handler:
        async def __call__(self, ws: ServerConnection) -> None:
            await echo(ws)

    handler = ws_monitoring.instrument(Handler(), registry=registry)
    partial = ws_monitoring.instrument(functools.partial(echo), registry=registry)
    for instrumented in (handler, partial):
        async with async_server(instrumented, monitoring={}) as srv:
            await exchange(srv.url("/obj"))
    samples = await settled(scrape_metrics, 2)
    assert samples["websocket_connections_total", {"route": "/obj"}] == 2
    assert samples.total("websocket_messages_total", direction="received") == 4


def test_instrument_a_sync_handler_for_websockets_sync_serve(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    handler = ws_monitoring.instrument(sync_echo, registry=registry)
    with sync_server(handler) as srv:
        exchange_sync(srv.url("/sync"))
    samples = settled_sync(scrape_metrics, 1)
    assert_echo_counted(samples, route="/sync")
    sent = {"route": "/sync", "direction": "sent", "type": "text"}
    assert samples["websocket_messages_total", sent] == 2


def test_double_instrumentation_raises() -> None:
    once = ws_monitoring.instrument(echo, registry=CollectorRegistry())
    with pytest.raises(TypeError, match="already instrumented"):
        ws_monitoring.instrument(once)
    with pytest.raises(TypeError, match="already instrumented"):
        ws_monitoring.instrument(registry=CollectorRegistry())(once)


def test_options_twice_raise() -> None:
    once = ws_monitoring.instrument(echo, registry=CollectorRegistry())
    with pytest.raises(TypeError, match=r"not both \(got health_path, routes\)"):
        ws_monitoring.serve(once, "127.0.0.1", 0, routes=["/x"], health_path=None)
    sync_once = ws_monitoring.instrument(sync_echo, registry=CollectorRegistry())
    with pytest.raises(TypeError, match="not both"):
        ws_monitoring.serve_sync(sync_once, "127.0.0.1", 0, max_routes=3)


UNKNOWN = [
    ("instrument", lambda **kw: ws_monitoring.instrument(echo, **kw)),
    ("instrument", lambda **kw: ws_monitoring.instrument(**kw)),
    ("serve", lambda **kw: ws_monitoring.serve(echo, "127.0.0.1", 0, **kw)),
    ("serve_sync", lambda **kw: ws_monitoring.serve_sync(sync_echo, "127.0.0.1", 0, **kw)),
]


@pytest.mark.parametrize(
    ("keyword", "message"),
    [
        ("rutes", "unknown option 'rutes'; did you mean 'routes'?"),
        ("sample_ratio", "unknown option 'sample_ratio'; it is an argument of "
         "ws_monitoring.setup_tracing()"),
        ("colour", "unknown option 'colour'"),
    ],
)  # fmt: skip
@pytest.mark.parametrize(("where", "call"), UNKNOWN, ids=["direct", "decorator", "serve", "sync"])
def test_unknown_options_raise_at_the_call(
    where: str, call: Callable[..., Any], keyword: str, message: str
) -> None:
    # At the call, not when the server starts: serve() here runs without an event loop.
    with pytest.raises(TypeError, match=re.escape(f"{where}(): {message}")):
        call(**{keyword: ["/x"]})


def test_a_misspelled_websockets_keyword_is_named_too() -> None:
    with pytest.raises(TypeError, match=r"'ping_intervall'; did you mean 'ping_interval'\?"):
        ws_monitoring.serve(echo, "127.0.0.1", 0, ping_intervall=5)
    with pytest.raises(TypeError, match=r"'reuseport'; did you mean 'reuse_port'\?"):
        ws_monitoring.serve_sync(sync_echo, "127.0.0.1", 0, reuseport=True)


async def test_websockets_own_keywords_pass_through(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    # serve()'s, and those websockets hands to loop.create_server / socket.create_server.
    async with ws_monitoring.serve(
        echo, "127.0.0.1", 0, registry=registry, compression=None, backlog=10, reuse_port=True
    ) as server:
        port = server.sockets[0].getsockname()[1]
        await exchange(f"ws://127.0.0.1:{port}/kw")
    with sync_server(sync_echo, monitoring={"registry": registry}, backlog=10) as srv:
        exchange_sync(srv.url("/kw"))
    samples = settled_sync(scrape_metrics, 2)
    assert samples["websocket_connections_total", {"route": "/kw"}] == 2


def test_invalid_option_value_raises_value_error() -> None:
    with pytest.raises(ValueError, match="max_routes"):
        ws_monitoring.instrument(echo, max_routes=0)


def test_not_a_handler_raises() -> None:
    with pytest.raises(TypeError, match="expected a connection handler, got 42"):
        ws_monitoring.instrument(42)  # type: ignore[call-overload]


# -- build_monitor -----------------------------------------------------------------------------


class ExtraSink:
    def handshake_finished(self, handshake: HandshakeRecord) -> None: ...
    def connection_opened(self, connection: ConnectionRecord) -> None: ...
    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None: ...
    def connection_closed(self, connection: ConnectionRecord) -> None: ...
    def shutdown(self, timeout: float) -> None: ...


def test_build_monitor_puts_metrics_first_and_extra_sinks_last() -> None:
    extra = ExtraSink()
    registry = CollectorRegistry()
    monitor = build_monitor(Config(registry=registry, sinks=[extra]))
    assert isinstance(monitor.sinks[0], MetricsSink)
    assert monitor.sinks[-1] is extra
    # The same registry and namespace share one collector.
    again = build_monitor(Config(registry=registry))
    assert again.sinks[0] is monitor.sinks[0]


def test_build_monitor_without_metrics() -> None:
    extra = ExtraSink()
    monitor = build_monitor(
        Config(metrics=False, tracing=False, log_lifecycle=False, sinks=[extra])
    )
    assert not any(isinstance(s, MetricsSink) for s in monitor.sinks)
    assert monitor.sinks[-1] is extra


def test_serve_sync_accepts_an_instrumented_handler(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    handler = ws_monitoring.instrument(sync_echo, registry=registry)
    with sync_server(handler, monitoring={}) as srv:
        exchange_sync(srv.url("/s"))
    samples = settled_sync(scrape_metrics, 1)
    assert_echo_counted(samples, route="/s", handshakes=1)


# -- config=, typed options ----------------------------------------------------------------


async def test_config_object_is_accepted_everywhere(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    config = Config(registry=registry, routes=["/rooms/{id}"], log_lifecycle=False)
    handler = ws_monitoring.instrument(echo, config=config)
    assert handler.__ws_monitoring__.config is config  # type: ignore[attr-defined]
    # Keywords given with config= replace its fields.
    changed = ws_monitoring.instrument(config=config, max_routes=3)(echo)
    assert changed.__ws_monitoring__.config == dataclasses.replace(config, max_routes=3)
    async with ws_monitoring.serve(echo, "127.0.0.1", 0, config=config) as server:
        port = server.sockets[0].getsockname()[1]
        await exchange(f"ws://127.0.0.1:{port}/rooms/1")
    with sync_server(sync_echo, monitoring={"config": config}) as srv:
        exchange_sync(srv.url("/rooms/2"))
    samples = settled_sync(scrape_metrics, 2)
    assert samples["websocket_connections_total", {"route": "/rooms/{id}"}] == 2
    with pytest.raises(TypeError, match=r"config: expected a ws_monitoring\.Config"):
        ws_monitoring.instrument(echo, config={"routes": ["/x"]})  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"not both \(got config\)"):
        ws_monitoring.serve_sync(ws_monitoring.instrument(sync_echo), "127.0.0.1", 0, config=config)


def test_the_four_signatures_list_configs_options() -> None:
    """instrument() (both forms), serve() and serve_sync() take Config's fields, typed alike."""
    from typing import get_overloads

    def options(function: Callable[..., Any]) -> list[tuple[str, Any]]:
        parameters = inspect.signature(function).parameters.values()
        return [(p.name, p.annotation) for p in parameters if p.kind is p.KEYWORD_ONLY]

    lists = [options(f) for f in (*get_overloads(ws_monitoring.instrument), ws_monitoring.serve)]
    lists.append(options(ws_monitoring.serve_sync))
    assert all(found == lists[0] for found in lists)
    assert [name for name, _ in lists[0]] == ["config", *OPTION_NAMES]
    for name, annotation in lists[0][1:]:
        field = Config.__dataclass_fields__[name].type
        # Each typed as the field is; a sequence where the field holds a tuple.
        assert annotation == field.replace("tuple[float, ...]", "Sequence[float]"), name


def test_mypy_strict_rejects_unknown_and_mistyped_options(tmp_path: Path) -> None:
    source = tmp_path / "app.py"
    source.write_text(
        textwrap.dedent(
            """
            import ws_monitoring

            async def handler(ws: object) -> None: ...

            ws_monitoring.instrument(handler, routes=["/a/{x}"], max_routes=100)
            ws_monitoring.instrument(handler, rutes=["/a"])  # line 7
            ws_monitoring.instrument(max_routes="100")  # line 8
            ws_monitoring.serve(handler, "", 0, max_routes="100")  # line 9
            ws_monitoring.serve_sync(lambda ws: None, "", 0, metrics="no")  # line 10
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--follow-imports=silent",
         "--cache-dir", str(tmp_path / "cache"), str(source)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT)},
    )  # fmt: skip
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert sorted({int(line.split(":")[1]) for line in errors}) == [7, 8, 9, 10], result.stdout
    assert 'Unexpected keyword argument "rutes"' in result.stdout


# -- websockets.legacy ----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_legacy_server_runs_unmonitored_and_says_so(
    registry: CollectorRegistry,
    scrape_metrics: Callable[[], Samples],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not supported (deprecated upstream): never in the app's way, one error naming the way out."""
    import websockets.legacy.server

    handler = ws_monitoring.instrument(echo, registry=registry)
    async with websockets.legacy.server.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        for _ in range(2):
            await exchange(f"ws://127.0.0.1:{port}/legacy")  # echoed: no 1011
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert "websockets.legacy.server.serve is not supported" in errors[0]
    assert "migrate to websockets.asyncio.server.serve" in errors[0]
    assert "howto/upgrade.html" in errors[0]
    assert scrape_metrics().total("websocket_connections_total") == 0
