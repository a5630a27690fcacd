"""Public entry points: :func:`instrument`, :func:`serve` and :func:`serve_sync`.

Each takes ws_monitoring's options as explicit keyword-only parameters, the fields of
:class:`~ws_monitoring.config.Config` (so type checkers and IDEs see them), or a whole
``config=Config(...)``; keywords given with ``config`` replace its fields. An option left
out is ``DEFAULT``: its environment variable, else the field's default. ``serve`` and
``serve_sync`` pass every other keyword to websockets, and refuse at the call, with
ws_monitoring's own ``TypeError``, a keyword neither of them knows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import inspect
import socket
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import websockets.asyncio.server
import websockets.sync.server
from websockets.asyncio.server import Server as AsyncServer
from websockets.sync.server import Server as SyncServer

from ws_monitoring.config import (
    OPTION_NAMES,
    Config,
    ExceptionMessages,
    RouteGrouping,
    unknown_option,
)
from ws_monitoring.core import Monitor
from ws_monitoring.typing import Alerter, Sink

from . import asyncio as asyncio_server
from . import sync as sync_server

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from websockets.http11 import Request

    from ws_monitoring.typing import Data

__all__ = ["DEFAULT", "build_monitor", "instrument", "serve", "serve_sync"]

H = TypeVar("H", bound=Callable[..., Any])


class _Default:
    """The value of an option left out: its environment variable, else Config's default."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFAULT"


#: An option left out. Typed ``Any`` so that it fits every option's annotation.
DEFAULT: Any = _Default()

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


def _config(config: Config | None, options: Mapping[str, Any]) -> Config:
    """``config`` (or a new one) with the options that were given."""
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config: expected a ws_monitoring.Config, got {config!r}")
    given = {name: value for name, value in options.items() if value is not DEFAULT}
    if config is None:
        return Config.from_options(**given)
    return dataclasses.replace(config, **given) if given else config


def _given(values: Mapping[str, Any]) -> dict[str, Any]:
    """The options among a function's ``locals()``, left-out ones included."""
    return {name: values[name] for name in OPTION_NAMES}


# The parameters below are Config's fields, in its order, each typed as the field is (a
# sequence where the field holds a tuple). Python cannot share a parameter list between
# functions; tests/adapters/test_instrument.py checks that the four lists stay the same.


@overload
def instrument(
    handler: H,
    /,
    *,
    config: Config | None = None,
    metrics: bool = DEFAULT,
    namespace: str = DEFAULT,
    registry: CollectorRegistry | None = DEFAULT,
    routes: RouteGrouping | None = DEFAULT,
    max_routes: int = DEFAULT,
    unmatched_route: str = DEFAULT,
    overflow_route: str = DEFAULT,
    size_buckets: Sequence[float] = DEFAULT,
    duration_buckets: Sequence[float] = DEFAULT,
    connection_duration_buckets: Sequence[float] = DEFAULT,
    handshake_buckets: Sequence[float] = DEFAULT,
    rtt_buckets: Sequence[float] = DEFAULT,
    health_path: str | None = DEFAULT,
    tracing: bool | None = DEFAULT,
    trace_slow_threshold: float | None = DEFAULT,
    trace_messages_in_connection_trace: bool = DEFAULT,
    trace_sent_messages: bool = DEFAULT,
    context_from_message: Callable[[Data], Mapping[str, str] | None] | None = DEFAULT,
    log_lifecycle: bool = DEFAULT,
    log_payloads: int | None = DEFAULT,
    trusted_proxies: Sequence[str] = DEFAULT,
    pseudonymize_ips: bool = DEFAULT,
    pseudonym_key: bytes | None = DEFAULT,
    consent_resolver: Callable[[Request], Any] | None = DEFAULT,
    user_id_resolver: Callable[[Request], str | None] | None = DEFAULT,
    route_from_path: bool = DEFAULT,
    exception_messages: ExceptionMessages = DEFAULT,
    tenant: Callable[[Request], str | None] | None = DEFAULT,
    tenants: Collection[str] | None = DEFAULT,
    max_tenants: int = DEFAULT,
    alerters: Sequence[Alerter] = DEFAULT,
    sinks: Sequence[Sink] = DEFAULT,
) -> H: ...


@overload
def instrument(
    handler: None = None,
    /,
    *,
    config: Config | None = None,
    metrics: bool = DEFAULT,
    namespace: str = DEFAULT,
    registry: CollectorRegistry | None = DEFAULT,
    routes: RouteGrouping | None = DEFAULT,
    max_routes: int = DEFAULT,
    unmatched_route: str = DEFAULT,
    overflow_route: str = DEFAULT,
    size_buckets: Sequence[float] = DEFAULT,
    duration_buckets: Sequence[float] = DEFAULT,
    connection_duration_buckets: Sequence[float] = DEFAULT,
    handshake_buckets: Sequence[float] = DEFAULT,
    rtt_buckets: Sequence[float] = DEFAULT,
    health_path: str | None = DEFAULT,
    tracing: bool | None = DEFAULT,
    trace_slow_threshold: float | None = DEFAULT,
    trace_messages_in_connection_trace: bool = DEFAULT,
    trace_sent_messages: bool = DEFAULT,
    context_from_message: Callable[[Data], Mapping[str, str] | None] | None = DEFAULT,
    log_lifecycle: bool = DEFAULT,
    log_payloads: int | None = DEFAULT,
    trusted_proxies: Sequence[str] = DEFAULT,
    pseudonymize_ips: bool = DEFAULT,
    pseudonym_key: bytes | None = DEFAULT,
    consent_resolver: Callable[[Request], Any] | None = DEFAULT,
    user_id_resolver: Callable[[Request], str | None] | None = DEFAULT,
    route_from_path: bool = DEFAULT,
    exception_messages: ExceptionMessages = DEFAULT,
    tenant: Callable[[Request], str | None] | None = DEFAULT,
    tenants: Collection[str] | None = DEFAULT,
    max_tenants: int = DEFAULT,
    alerters: Sequence[Alerter] = DEFAULT,
    sinks: Sequence[Sink] = DEFAULT,
) -> Callable[[H], H]: ...


def instrument(handler: Any = None, /, *, config: Config | None = None, **options: Any) -> Any:
    """Instrument a websockets connection handler (asyncio or threading).

    Use it as ``instrument(handler, **options)``, ``@instrument`` or
    ``@instrument(**options)``. Coroutine functions get the asyncio wrapper, for
    ``websockets.asyncio.server.serve``; plain functions the threading one, for
    ``websockets.sync.server.serve``. Options are the fields of :class:`Config`, or
    ``config=Config(...)``.

    ``websockets.legacy.server.serve`` is not supported (websockets deprecated it): its
    connections are served unmonitored, exactly as without ``instrument()``, and the
    first one logs an error naming the migration.

    Raises:
        TypeError: an unknown option or a value of the wrong type, or a handler that is
            already instrumented.
        ValueError: an invalid option value.
    """
    for name in options:
        if name not in Config.__dataclass_fields__:
            raise unknown_option(name, ("config", *OPTION_NAMES), "instrument()")
    built = _config(config, options)

    def decorate(func: H) -> H:
        if _monitor_of(func) is not None:
            raise TypeError(f"{func!r} is already instrumented")
        if not callable(func):
            raise TypeError(f"expected a connection handler, got {func!r}")
        foreign = _foreign_handler(func)
        if foreign is not None:
            raise TypeError(foreign)
        monitor = build_monitor(built)
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


@functools.cache
def _websockets_keywords(server: str) -> frozenset[str]:
    """Keywords websockets' ``serve`` of ``server`` (asyncio or sync) accepts."""
    if server == "asyncio":
        functions: tuple[Callable[..., Any], ...] = (
            websockets.asyncio.server.serve,
            asyncio.AbstractEventLoop.create_server,  # where its **kwargs go
            asyncio.AbstractEventLoop.create_unix_server,
        )
        private = {"unix", "path"}  # what unix_serve() passes
    else:
        functions = (websockets.sync.server.serve, socket.create_server)
        private = {"unix", "path", "ssl_context"}  # unix_serve(); ssl's deprecated name
    names = {
        name
        for function in functions
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }
    return frozenset(names - {"self", "protocol_factory", "handler", "address"} | private)


def _prepare(
    handler: Any,
    server: str,
    config: Config | None,
    options: dict[str, Any],
    kwargs: dict[str, Any],
) -> tuple[Any, Monitor]:
    theirs = _websockets_keywords(server)
    for name in kwargs:
        if name not in theirs:
            where = "serve()" if server == "asyncio" else "serve_sync()"
            raise unknown_option(name, sorted({"config", *OPTION_NAMES} | theirs), where)
    monitor = _monitor_of(handler)
    if monitor is None:
        return handler, build_monitor(_config(config, options))
    given = sorted(name for name, value in options.items() if value is not DEFAULT)
    if config is not None:
        given.insert(0, "config")
    if given:
        raise TypeError(
            "the handler is already instrumented: pass ws_monitoring options to "
            f"instrument() or to serve(), not both (got {', '.join(given)})"
        )
    return handler.__wrapped__, monitor


def serve(
    handler: Callable[[websockets.asyncio.server.ServerConnection], Any],
    host: str | None = None,
    port: int | None = None,
    *,
    config: Config | None = None,
    metrics: bool = DEFAULT,
    namespace: str = DEFAULT,
    registry: CollectorRegistry | None = DEFAULT,
    routes: RouteGrouping | None = DEFAULT,
    max_routes: int = DEFAULT,
    unmatched_route: str = DEFAULT,
    overflow_route: str = DEFAULT,
    size_buckets: Sequence[float] = DEFAULT,
    duration_buckets: Sequence[float] = DEFAULT,
    connection_duration_buckets: Sequence[float] = DEFAULT,
    handshake_buckets: Sequence[float] = DEFAULT,
    rtt_buckets: Sequence[float] = DEFAULT,
    health_path: str | None = DEFAULT,
    tracing: bool | None = DEFAULT,
    trace_slow_threshold: float | None = DEFAULT,
    trace_messages_in_connection_trace: bool = DEFAULT,
    trace_sent_messages: bool = DEFAULT,
    context_from_message: Callable[[Data], Mapping[str, str] | None] | None = DEFAULT,
    log_lifecycle: bool = DEFAULT,
    log_payloads: int | None = DEFAULT,
    trusted_proxies: Sequence[str] = DEFAULT,
    pseudonymize_ips: bool = DEFAULT,
    pseudonym_key: bytes | None = DEFAULT,
    consent_resolver: Callable[[Request], Any] | None = DEFAULT,
    user_id_resolver: Callable[[Request], str | None] | None = DEFAULT,
    route_from_path: bool = DEFAULT,
    exception_messages: ExceptionMessages = DEFAULT,
    tenant: Callable[[Request], str | None] | None = DEFAULT,
    tenants: Collection[str] | None = DEFAULT,
    max_tenants: int = DEFAULT,
    alerters: Sequence[Alerter] = DEFAULT,
    sinks: Sequence[Sink] = DEFAULT,
    **kwargs: Any,
) -> AsyncServer:
    """Drop-in for ``websockets.asyncio.server.serve`` that instruments every connection.

    Same arguments and return value (await it or use ``async with``), plus the options
    of :class:`Config` (``health_path``, ``routes``, ...) or ``config=Config(...)``. The
    user's ``process_request``, ``process_response`` and ``create_connection`` keep
    working.

    Raises:
        TypeError: a keyword that is neither an option nor one of websockets' (at the
            call, not when the server starts), or a value of the wrong type.
        ValueError: an invalid option value.
    """
    handler, monitor = _prepare(handler, "asyncio", config, _given(locals()), kwargs)
    return asyncio_server.serve(handler, host, port, monitor=monitor, **kwargs)


def serve_sync(
    handler: Callable[[websockets.sync.server.ServerConnection], Any],
    host: str | None = None,
    port: int | None = None,
    *,
    config: Config | None = None,
    metrics: bool = DEFAULT,
    namespace: str = DEFAULT,
    registry: CollectorRegistry | None = DEFAULT,
    routes: RouteGrouping | None = DEFAULT,
    max_routes: int = DEFAULT,
    unmatched_route: str = DEFAULT,
    overflow_route: str = DEFAULT,
    size_buckets: Sequence[float] = DEFAULT,
    duration_buckets: Sequence[float] = DEFAULT,
    connection_duration_buckets: Sequence[float] = DEFAULT,
    handshake_buckets: Sequence[float] = DEFAULT,
    rtt_buckets: Sequence[float] = DEFAULT,
    health_path: str | None = DEFAULT,
    tracing: bool | None = DEFAULT,
    trace_slow_threshold: float | None = DEFAULT,
    trace_messages_in_connection_trace: bool = DEFAULT,
    trace_sent_messages: bool = DEFAULT,
    context_from_message: Callable[[Data], Mapping[str, str] | None] | None = DEFAULT,
    log_lifecycle: bool = DEFAULT,
    log_payloads: int | None = DEFAULT,
    trusted_proxies: Sequence[str] = DEFAULT,
    pseudonymize_ips: bool = DEFAULT,
    pseudonym_key: bytes | None = DEFAULT,
    consent_resolver: Callable[[Request], Any] | None = DEFAULT,
    user_id_resolver: Callable[[Request], str | None] | None = DEFAULT,
    route_from_path: bool = DEFAULT,
    exception_messages: ExceptionMessages = DEFAULT,
    tenant: Callable[[Request], str | None] | None = DEFAULT,
    tenants: Collection[str] | None = DEFAULT,
    max_tenants: int = DEFAULT,
    alerters: Sequence[Alerter] = DEFAULT,
    sinks: Sequence[Sink] = DEFAULT,
    **kwargs: Any,
) -> SyncServer:
    """Drop-in for ``websockets.sync.server.serve`` that instruments every connection.

    Same arguments as :func:`serve`, for the threading server.
    """
    handler, monitor = _prepare(handler, "sync", config, _given(locals()), kwargs)
    return sync_server.serve(handler, host, port, monitor=monitor, **kwargs)
