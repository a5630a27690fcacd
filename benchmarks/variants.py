"""The servers compared, written as their users would write them.

Every variant serves the same echo handler on 127.0.0.1 and differs only in what
watches it. ``bare`` and ``sync-bare`` are the floors; ``recipe-*`` is the common
recipe (a ``prometheus_client`` counter with ``.labels(...).inc()`` and an
OpenTelemetry span per message); the ``ws-monitoring`` variants use the package's
public API only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

__all__ = ["FLUSHERS", "SERVERS", "Options", "ServerSpec"]

HOST = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class Options:
    """Where the server process sends what it exports."""

    otlp: str | None = None  # OTLP/HTTP base URL of the local receiver
    alerts: str | None = None  # Alertmanager-compatible base URL
    log_file: str = "/dev/null"
    service: str = "bench"  # service.name of exported spans: the variant's name


# -- handlers --------------------------------------------------------------------------


async def echo(websocket: Any) -> None:
    async for message in websocket:
        await websocket.send(message)


async def echo_or_crash(websocket: Any) -> None:
    """``echo``, except on ``/crash``: the handler raises (alerts for the lag test)."""
    if websocket.request.path == "/crash":
        raise RuntimeError("crash requested by the benchmark")
    await echo(websocket)


def echo_sync(websocket: Any) -> None:
    for message in websocket:
        websocket.send(message)


# -- the common recipe (what seed 004 recommends), as a user writes it -----------------


def _recipe_handler(ratio: float, options: Options) -> Callable[[Any], Any]:
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from prometheus_client import Counter

    provider = TracerProvider(
        resource=Resource.create({"service.name": options.service}),
        sampler=ParentBased(TraceIdRatioBased(ratio)),
    )
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{options.otlp}/v1/traces"))
    )
    trace.set_tracer_provider(provider)
    FLUSHERS.append(lambda: provider.force_flush(30_000))
    tracer = trace.get_tracer("chat")
    messages = Counter("ws_messages_total", "WebSocket messages.", ["path", "direction"])

    async def handler(websocket: Any) -> None:
        path = websocket.request.path
        async for message in websocket:
            with tracer.start_as_current_span(
                "ws.message",
                attributes={"ws.path": path, "messaging.message.body.size": len(message)},
            ):
                messages.labels(path, "received").inc()
                await websocket.send(message)
                messages.labels(path, "sent").inc()

    return handler


# -- ws-monitoring setups ----------------------------------------------------------------


#: Flush functions of what a variant set up (exporters, log handlers), for ``flush``.
FLUSHERS: list[Callable[[], object]] = []


def _ws_monitoring_setup(kind: str, options: Options) -> dict[str, Any]:
    """Process-wide setup (tracing, logging) and ``serve`` options for ``kind``.

    ``metrics``: metrics only. ``defaults``: metrics, message spans at the default
    sampling exported to the OTLP receiver, JSON lifecycle logs to a file. ``all``: as
    ``defaults`` with every message span sampled and exported.
    """
    if kind == "metrics":
        return {"tracing": False, "log_lifecycle": False}
    from ws_monitoring.alerting.alertmanager import PrometheusAlerter
    from ws_monitoring.logging.setup import setup_logging
    from ws_monitoring.tracing.setup import setup_tracing

    tracing = setup_tracing(
        options.service, endpoint=options.otlp, sample_ratio=1.0 if kind == "all" else None
    )
    logs = setup_logging(filename=options.log_file)
    FLUSHERS.append(lambda: tracing.force_flush(30.0))
    FLUSHERS.append(logs.flush)
    if kind != "alerting":
        return {}
    # Every crash changes the alert's annotations: with no cooldown, each one is a
    # delivery, and firing alerts are re-sent five times a second.
    alerter = PrometheusAlerter(
        options.alerts or "http://127.0.0.1:9", resend_interval=0.2, cooldown=0.0,
        crash_quiet_period=0.5,
    )  # fmt: skip
    FLUSHERS.append(lambda: alerter.flush(5.0))
    return {"alerters": [alerter]}


def _start_metrics_server() -> dict[str, Any]:
    from ws_monitoring import start_metrics_server

    server = start_metrics_server(0, HOST)
    return {"metrics_port": server.port}


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """How to start one variant; ``sync`` variants use the threading server.

    ``env``: set in the server process's environment before it starts (e.g.
    ``WS_MONITORING_NO_SPEEDUPS=1`` for the pure-Python fallback, read at import).
    """

    sync: bool
    start_async: Callable[[Options], contextlib.AbstractAsyncContextManager[dict[str, Any]]]
    start_sync: Callable[[Options], tuple[Any, dict[str, Any]]]
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _no_sync(options: Options) -> tuple[Any, dict[str, Any]]:
    raise NotImplementedError


def _no_async(options: Options) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
    raise NotImplementedError


def _async_bare(options: Options) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
    @contextlib.asynccontextmanager
    async def run() -> AsyncIterator[dict[str, Any]]:
        from websockets.asyncio.server import serve

        async with serve(echo, HOST, 0) as server:
            yield {"port": server.sockets[0].getsockname()[1]}

    return run()


def _async_recipe(ratio: float) -> Callable[[Options], Any]:
    def start(options: Options) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
        @contextlib.asynccontextmanager
        async def run() -> AsyncIterator[dict[str, Any]]:
            from prometheus_client import start_http_server
            from websockets.asyncio.server import serve

            handler = _recipe_handler(ratio, options)
            metrics, _ = start_http_server(0, HOST)
            async with serve(handler, HOST, 0) as server:
                yield {
                    "port": server.sockets[0].getsockname()[1],
                    "metrics_port": metrics.server_port,
                }

        return run()

    return start


def _async_ws_monitoring(kind: str) -> Callable[[Options], Any]:
    handler = echo_or_crash if kind == "alerting" else echo

    def start(options: Options) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
        @contextlib.asynccontextmanager
        async def run() -> AsyncIterator[dict[str, Any]]:
            import ws_monitoring

            extra = _ws_monitoring_setup(kind, options)
            info = _start_metrics_server()
            async with ws_monitoring.serve(handler, HOST, 0, **extra) as server:
                yield {"port": server.sockets[0].getsockname()[1], **info}

        return run()

    return start


def _async_instrument(kind: str) -> Callable[[Options], Any]:
    """The README's second way: the user's own ``websockets`` ``serve``, ``instrument()``."""

    def start(options: Options) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
        @contextlib.asynccontextmanager
        async def run() -> AsyncIterator[dict[str, Any]]:
            from websockets.asyncio.server import serve

            import ws_monitoring

            extra = _ws_monitoring_setup(kind, options)
            info = _start_metrics_server()
            async with serve(ws_monitoring.instrument(echo, **extra), HOST, 0) as server:
                yield {"port": server.sockets[0].getsockname()[1], **info}

        return run()

    return start


def _sync_bare(options: Options) -> tuple[Any, dict[str, Any]]:
    from websockets.sync.server import serve

    server = serve(echo_sync, HOST, 0)
    return server, {"port": server.socket.getsockname()[1]}


def _sync_ws_monitoring(kind: str) -> Callable[[Options], tuple[Any, dict[str, Any]]]:
    def start(options: Options) -> tuple[Any, dict[str, Any]]:
        import ws_monitoring

        extra = _ws_monitoring_setup(kind, options)
        info = _start_metrics_server()
        server = ws_monitoring.serve_sync(echo_sync, HOST, 0, **extra)
        return server, {"port": server.socket.getsockname()[1], **info}

    return start


#: The pure-Python fallback: the C speedups are not loaded (``ws_monitoring.core``).
_PURE_PYTHON = {"WS_MONITORING_NO_SPEEDUPS": "1"}

SERVERS: dict[str, ServerSpec] = {
    "bare": ServerSpec(False, _async_bare, _no_sync),
    "recipe-1pct": ServerSpec(False, _async_recipe(0.01), _no_sync),
    "recipe-100pct": ServerSpec(False, _async_recipe(1.0), _no_sync),
    "metrics": ServerSpec(False, _async_ws_monitoring("metrics"), _no_sync),
    "defaults": ServerSpec(False, _async_ws_monitoring("defaults"), _no_sync),
    "all-spans": ServerSpec(False, _async_ws_monitoring("all"), _no_sync),
    "alerting": ServerSpec(False, _async_ws_monitoring("alerting"), _no_sync),
    "instrument-metrics": ServerSpec(False, _async_instrument("metrics"), _no_sync),
    "instrument-defaults": ServerSpec(False, _async_instrument("defaults"), _no_sync),
    "python-metrics": ServerSpec(False, _async_ws_monitoring("metrics"), _no_sync, _PURE_PYTHON),
    "python-defaults": ServerSpec(False, _async_ws_monitoring("defaults"), _no_sync, _PURE_PYTHON),
    "sync-bare": ServerSpec(True, _no_async, _sync_bare),
    "sync-metrics": ServerSpec(True, _no_async, _sync_ws_monitoring("metrics")),
    "sync-defaults": ServerSpec(True, _no_async, _sync_ws_monitoring("defaults")),
}

# The crash-storm and long-labels rows bring their own servers (they import this module
# only when one starts).
from . import crash_storm, labels  # noqa: E402

SERVERS.update(
    {name: ServerSpec(False, start, _no_sync) for name, start in crash_storm.SERVERS.items()}
)
SERVERS.update({name: ServerSpec(False, start, _no_sync) for name, start in labels.SERVERS.items()})

# uvicorn + FastAPI, bare and with the ASGI middleware (built on the names above).
from . import asgi as _asgi  # noqa: E402

SERVERS.update(_asgi.servers())

logging.getLogger("websockets").setLevel(logging.WARNING)
