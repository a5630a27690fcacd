"""Public entry points: :func:`instrument`, :func:`serve` and :func:`serve_sync`."""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar, overload

from websockets.asyncio.server import Server as AsyncServer
from websockets.sync.server import Server as SyncServer

from ws_monitoring.config import Config
from ws_monitoring.core import Monitor
from ws_monitoring.typing import Sink

from . import asyncio as asyncio_server
from . import sync as sync_server

__all__ = ["build_monitor", "instrument", "serve", "serve_sync"]

H = TypeVar("H", bound=Callable[..., Any])

# Each module exposes ``build_sink(config) -> Sink | None``; it imports its optional
# dependencies lazily, so a metrics-only install loads none of them.
_SINK_MODULES = (
    "ws_monitoring.tracing.setup",
    "ws_monitoring.logging.lifecycle",
    "ws_monitoring.alerting.sink",
)


def build_monitor(config: Config) -> Monitor:
    """Assemble the core and its sinks for ``config`` (metrics first, extra sinks last)."""
    sinks: list[Sink] = []
    if config.metrics:
        from ws_monitoring.metrics.sink import MetricsSink

        sinks.append(MetricsSink.for_config(config))
    for name in _SINK_MODULES:
        sink = importlib.import_module(name).build_sink(config)
        if sink is not None:
            sinks.append(sink)
    sinks.extend(config.sinks)
    return Monitor(config, sinks)


def _is_async(func: Callable[..., Any]) -> bool:
    """Coroutine functions, partials of them and objects with an ``async def __call__``."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - the method, not callable()
    )


def _monitor_of(handler: Any) -> Monitor | None:
    monitor = getattr(handler, "__ws_monitoring__", None)
    return monitor if isinstance(monitor, Monitor) else None


@overload
def instrument(handler: H, /, **options: Any) -> H: ...


@overload
def instrument(handler: None = None, /, **options: Any) -> Callable[[H], H]: ...


def instrument(handler: Any = None, /, **options: Any) -> Any:
    """Instrument a websockets connection handler (asyncio or threading).

    Use it as ``instrument(handler, **options)``, ``@instrument`` or
    ``@instrument(**options)``. Coroutine functions get the asyncio wrapper, plain
    functions the threading one. Options are the fields of :class:`Config`.

    Raises:
        TypeError: an unknown option, or a handler that is already instrumented.
        ValueError: an invalid option value.
    """
    config = Config.from_options(**options)

    def decorate(func: H) -> H:
        if _monitor_of(func) is not None:
            raise TypeError(f"{func!r} is already instrumented")
        if not callable(func):
            raise TypeError(f"expected a connection handler, got {func!r}")
        foreign = _foreign_handler(func)
        if foreign is not None:
            raise TypeError(foreign)
        monitor = build_monitor(config)
        if _is_async(func):
            return asyncio_server.instrument_async(func, monitor)  # type: ignore[return-value]
        return sync_server.instrument_sync(func, monitor)  # type: ignore[return-value]

    return decorate if handler is None else decorate(handler)


#: Frameworks whose handlers and applications instrument() cannot wrap: what to use instead.
_MIDDLEWARE = (
    "wrap the application in ws_monitoring.asgi.MonitoringMiddleware instead "
    "(app.add_middleware(MonitoringMiddleware, ...) in FastAPI and Starlette)"
)
_INSTEAD = {
    "fastapi": _MIDDLEWARE,
    "starlette": _MIDDLEWARE,
    "quart": _MIDDLEWARE,
    "aiohttp": (
        "aiohttp servers are not supported: serve WebSockets with ws_monitoring.serve() "
        "(websockets.asyncio.server), or with an ASGI framework and "
        "ws_monitoring.asgi.MonitoringMiddleware"
    ),
}


def _framework(obj: Any) -> str | None:
    """The framework of ``obj`` (a class, or an instance's class) among ``_INSTEAD``."""
    cls = obj if isinstance(obj, type) else type(obj)
    for klass in getattr(cls, "__mro__", (cls,)):
        top = getattr(klass, "__module__", "").partition(".")[0]
        if top in _INSTEAD:
            return top
    return None


def _foreign_handler(func: Any) -> str | None:
    """Why ``func`` is no websockets handler: a framework's endpoint or an ASGI application.

    An endpoint is known by the annotations of its parameters (FastAPI needs them to
    inject the ``WebSocket``); a handler written without them is caught at its first
    connection by the adapter.
    """
    framework = _framework(func) if not inspect.isroutine(func) else None
    if framework is not None:
        return (
            "instrument() wraps websockets connection handlers, not "
            f"{framework} applications: {_INSTEAD[framework]}"
        )
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable annotations: nothing to tell from them
        hints = {}
    for name, hint in hints.items():
        framework = _framework(hint) if name != "return" and isinstance(hint, type) else None
        if framework is not None:
            return (
                f"instrument() wraps websockets connection handlers; {func!r} is a {framework} "
                f"endpoint (its {name!r} is a {hint.__module__}.{hint.__qualname__}): "
                f"{_INSTEAD[framework]}"
            )
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    if params[:3] == ["scope", "receive", "send"]:
        return (
            f"instrument() wraps websockets connection handlers; {func!r} is an ASGI "
            f"application: {_MIDDLEWARE}"
        )
    return None


def _split_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = Config.__dataclass_fields__.keys()
    ours = {k: v for k, v in kwargs.items() if k in names}
    theirs = {k: v for k, v in kwargs.items() if k not in names}
    return ours, theirs


def _prepare(handler: Any, kwargs: dict[str, Any]) -> tuple[Any, Monitor, dict[str, Any]]:
    ours, theirs = _split_options(kwargs)
    monitor = _monitor_of(handler)
    if monitor is not None:
        if ours:
            raise TypeError(
                "the handler is already instrumented: pass ws_monitoring options to "
                f"instrument() or to serve(), not both (got {', '.join(sorted(ours))})"
            )
        handler = handler.__wrapped__
    else:
        monitor = build_monitor(Config.from_options(**ours))
    return handler, monitor, theirs


def serve(
    handler: Any, host: str | None = None, port: int | None = None, **kwargs: Any
) -> AsyncServer:
    """Drop-in for ``websockets.asyncio.server.serve`` that instruments every connection.

    Same arguments and return value (await it or use ``async with``), plus the options
    of :class:`Config` (``health_path``, ``routes``, ...). The user's
    ``process_request``, ``process_response`` and ``create_connection`` keep working.
    """
    handler, monitor, kwargs = _prepare(handler, kwargs)
    return asyncio_server.serve(handler, host, port, monitor=monitor, **kwargs)


def serve_sync(
    handler: Any, host: str | None = None, port: int | None = None, **kwargs: Any
) -> SyncServer:
    """Drop-in for ``websockets.sync.server.serve`` that instruments every connection."""
    handler, monitor, kwargs = _prepare(handler, kwargs)
    return sync_server.serve(handler, host, port, monitor=monitor, **kwargs)
