"""asyncio adapter: feeds the core from ``websockets.asyncio.server`` connections.

The handler receives the very same ``ServerConnection`` object websockets created, so
identity, attributes, exceptions and close codes are unchanged. Its ``recv`` and
``recv_streaming`` time message handling: they are methods of the connection class
``serve()`` makes; a handler wrapped by ``instrument()`` and run by websockets' own
``serve`` moves its connection to a subclass of its class that has them (same layout,
same names: see :func:`_timed_class`). Frames are counted on the sans-I/O protocol
(see :mod:`ws_monitoring.core`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from ws_monitoring.adapters.attributes import late_attributes
from ws_monitoring.core import (
    HANDSHAKE_ATTR,
    RECORD_ATTR,
    SPEEDUPS,
    ConnectionRecord,
    HandshakeRecord,
    Monitor,
    _speedups,
)
from ws_monitoring.typing import Data

__all__ = ["instrument_async", "serve"]

logger = logging.getLogger("ws_monitoring")

AsyncHandler = Callable[[ServerConnection], Awaitable[None]]
HTTPHook = Callable[..., Awaitable[Response | None] | Response | None]


#: Where a connection's original ``recv``/``recv_streaming`` are found by ``TimedRecv``.
_RECV_ATTR = "_ws_monitoring_recv"
_RECV_STREAMING_ATTR = "_ws_monitoring_recv_streaming"
#: True on connection classes whose ``recv`` methods are ``TimedRecv``'s.
_TIMED_ATTR = "_ws_monitoring_timed"


class RecvHooksBase:
    """Per-connection hooks: the fallback for a connection whose class cannot be timed.

    A connection whose class ``serve`` did not make, and that cannot move to a timed
    subclass of its class (see :func:`_timed_class`), gets its ``recv``/``recv_streaming``
    shadowed by bound methods of this small object (the mixin's, bound to it): about
    350 bytes per connection, three new keys in the connection's ``__dict__`` (which
    then stops sharing its keys with its class: +1.5 KiB) and a Python frame per message.
    """

    __slots__ = (RECORD_ATTR, _RECV_ATTR, _RECV_STREAMING_ATTR)

    def __init__(self, connection: Any, record: ConnectionRecord) -> None:
        setattr(self, RECORD_ATTR, record)
        setattr(self, _RECV_ATTR, connection.recv)
        setattr(self, _RECV_STREAMING_ATTR, connection.recv_streaming)

    @classmethod
    def install(cls, connection: Any, record: ConnectionRecord) -> None:
        hooks: Any = cls(connection, record)
        # ``async for message in connection`` calls ``self.recv()``: it picks this up too.
        connection.recv = hooks.recv
        connection.recv_streaming = hooks.recv_streaming


class TimedRecv:
    """``recv``/``recv_streaming`` timing how long each message is handled.

    The methods of the connection classes ``serve`` makes and of :func:`_timed_class`,
    where they cost nothing per connection; or of :class:`_RecvHooks`. Each provides
    ``_ws_monitoring_record`` and, under ``_ws_monitoring_recv(_streaming)``, websockets'
    own methods.
    """

    __slots__ = ()
    _ws_monitoring_record: ConnectionRecord
    _ws_monitoring_recv: Callable[..., Awaitable[Data]]
    _ws_monitoring_recv_streaming: Callable[..., AsyncIterator[Data]]

    def recv(self, decode: bool | None = None) -> Awaitable[Data]:
        # Not a coroutine function: the record's ``timed()`` (in C when built) wraps
        # websockets' own coroutine, one layer less per message than an ``async def``.
        return self._ws_monitoring_record.timed(self._ws_monitoring_recv(decode))

    async def recv_streaming(self, decode: bool | None = None) -> AsyncIterator[Data]:
        record = self._ws_monitoring_record
        record.recv_started()
        first = True
        async for fragment in self._ws_monitoring_recv_streaming(decode):
            if first:
                first = False
                record.recv_done(fragment)
            yield fragment


class _RecvHooks(TimedRecv, RecvHooksBase):
    __slots__ = ()


def instrument_async(handler: AsyncHandler, monitor: Monitor) -> AsyncHandler:
    """Wrap an asyncio connection handler so that ``monitor`` sees its connection.

    The wrapper returns the handler's coroutine chained to :func:`_ended` (in C with the
    speedups: 64 B per connection instead of a coroutine frame of its own).
    """

    @functools.wraps(handler)
    def instrumented(connection: ServerConnection) -> Awaitable[None]:
        if not isinstance(connection, ServerConnection):
            # websockets.legacy.server.serve, say: told once, never in the app's way.
            _unsupported(connection)
            return handler(connection)
        record = monitor.open(connection, handshake=getattr(connection, HANDSHAKE_ATTR, None))
        setattr(connection, RECORD_ATTR, record)
        if getattr(connection, HANDSHAKE_ATTR, None) is not None:
            setattr(connection, HANDSHAKE_ATTR, None)  # see ConnectionRecord.handshake
        if not getattr(connection, _TIMED_ATTR, False):  # not a class made by serve()
            _time_recv(connection, record)
        try:
            running = handler(connection)
        except BaseException as exc:  # raised before its first await: the same ending
            return _ended(record, exc)
        return _then(running, _ended, record)

    _mark_coroutine_function(instrumented)
    instrumented.__ws_monitoring__ = monitor  # type: ignore[attr-defined]
    return instrumented


async def _ended(record: ConnectionRecord, exc: BaseException | None) -> None:
    """How the handler ended (``exc``: what it raised), as websockets' server sees it."""
    connection = record.connection
    try:
        if exc is None:
            # What ``async with connection`` does next in websockets' server; doing it
            # here lets the record see the final close code. Closing twice is a no-op.
            await connection.close()
            return
        if isinstance(exc, Exception) and not isinstance(exc, ConnectionClosed):
            record.monitor.failed(record, exc)
        # websockets closes with 1011 for any exception, CancelledError included; close
        # first so that the record sees that code. ConnectionClosed (the peer went away
        # under the handler) is not a handler bug, and is not reported as one.
        await connection.close(1011)
        try:
            raise exc
        finally:
            del exc  # else this frame holds its own exception's traceback: a cycle
    finally:
        record.monitor.closed(record, connection.protocol)


async def _then_python(
    inner: Awaitable[None],
    tail: Callable[[ConnectionRecord, BaseException | None], Awaitable[Any]],
    arg: ConnectionRecord,
) -> Any:
    """``_speedups.Then`` in Python: await ``inner``, then ``tail(arg, its exception)``,
    whose result is the result."""
    try:
        await inner
    except GeneratorExit as exc:
        # Closed while awaiting: the tail starts, and is closed at its first suspension
        # (a closed coroutine may not await), so that its ``finally`` clauses run.
        ending = tail(arg, exc).__await__()
        with contextlib.suppress(StopIteration, GeneratorExit):
            next(ending)
            ending.close()
        raise
    except BaseException as exc:
        return await tail(arg, exc)
    return await tail(arg, None)


_then: Callable[..., Awaitable[None]] = _speedups.Then if SPEEDUPS else _then_python


def _mark_coroutine_function(function: Callable[..., Any]) -> None:
    """Make ``function`` pass for a coroutine function, as the handler it wraps does."""
    mark = getattr(inspect, "markcoroutinefunction", None)  # Python 3.12+
    if mark is not None:
        mark(function)
    else:  # Python 3.11: what asyncio.iscoroutinefunction() looks for
        function._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]


def _timed_recv(base: type[Any], record_slot: Any = None) -> dict[str, Any]:
    """The class attributes that time ``recv``/``recv_streaming`` in subclasses of ``base``.

    TimedRecv's methods, not the mixin itself: the user's class stays first in the MRO.
    With the speedups, ``recv`` is a C method: no Python frame per message; given the
    subclass's ``__slots__`` entry for the record (``record_slot``), it reads the record
    without an attribute lookup.
    """
    return {
        "recv": (
            _speedups.RecvMethod(base.recv, record_slot=record_slot) if SPEEDUPS else TimedRecv.recv
        ),
        "recv_streaming": TimedRecv.recv_streaming,
        _TIMED_ATTR: True,
        _RECV_ATTR: base.recv,
        _RECV_STREAMING_ATTR: base.recv_streaming,
    }


@functools.lru_cache(maxsize=64)
def _timed_class(base: Any) -> type[Any] | None:
    """A subclass of ``base`` that times ``recv``, for connections ``serve()`` did not make.

    Shared by every monitor (``recv`` finds the record on the connection). It adds no
    slot, so a connection can move to it (``__class__`` assignment) with its layout,
    identity and attributes unchanged; it keeps ``base``'s name, qualified name and
    module, so the connection's ``repr`` and log lines do not change either. ``None``
    when ``base`` cannot be subclassed. At most 64 classes are kept: one per connection
    class (usually just websockets' ``ServerConnection``).
    """
    try:
        timed: type[Any] = type(base.__name__, (base,), {"__slots__": (), **_timed_recv(base)})
    except TypeError:  # e.g. a final class, or a metaclass that refuses
        return None
    timed.__qualname__ = base.__qualname__
    timed.__module__ = base.__module__
    return timed


def _time_recv(connection: Any, record: ConnectionRecord) -> None:
    """Time ``connection``'s messages, with the class-level ``recv`` when possible.

    Moving the connection to :func:`_timed_class` of its class costs it only the dict
    CPython then makes of its attributes, keys still shared with its class (64 B on
    CPython 3.11 and 3.12, about 260 B on 3.13, against 1.5 KiB for the three keys the
    hooks add), and no Python frame per message. Only a class that refuses the move gets
    per-connection hooks.
    """
    kind: Any = type(connection)
    timed = _timed_class(kind)
    if timed is not None:
        try:
            connection.__class__ = timed
        except TypeError:  # a layout CPython will not swap (e.g. a C base with __slots__)
            pass
        else:
            return
    _RecvHooks.install(connection, record)


#: Connection classes already reported by :func:`_unsupported`.
_UNSUPPORTED: set[type] = set()


#: Frameworks whose handlers get their own objects, not a websockets connection.
_FRAMEWORKS = frozenset({"starlette", "fastapi", "quart", "aiohttp"})


def _unsupported(connection: object) -> None:
    """Say once per class that connections not made by ``websockets.asyncio`` go unmonitored."""
    cls = type(connection)
    if cls in _UNSUPPORTED:
        return
    _UNSUPPORTED.add(cls)
    legacy = any(c.__module__.startswith("websockets.legacy") for c in cls.__mro__)
    framework = cls.__module__.partition(".")[0]
    advice = (
        "Serve it with websockets.asyncio.server.serve or ws_monitoring.serve()"
        if framework not in _FRAMEWORKS
        else f"For {framework}, wrap the application in ws_monitoring.asgi.MonitoringMiddleware"
        if framework != "aiohttp"
        else "aiohttp servers are not supported: use ws_monitoring.serve(), or an ASGI "
        "framework with ws_monitoring.asgi.MonitoringMiddleware"
    )
    logger.error(
        "ws_monitoring.instrument(): %s.%s is not a websockets.asyncio.server.ServerConnection; "
        "connections of this server run unmonitored. %s",
        cls.__module__,
        cls.__qualname__,
        "websockets.legacy.server.serve is not supported (websockets deprecated it): "
        "migrate to websockets.asyncio.server.serve "
        "(https://websockets.readthedocs.io/en/stable/howto/upgrade.html) or use "
        "ws_monitoring.serve()"
        if legacy
        else advice,
    )


def _connection_class(base: type[ServerConnection], monitor: Monitor) -> type[ServerConnection]:
    """A subclass of ``base`` that times and classifies the opening handshake."""
    if not isinstance(base, type):
        # websockets also takes a wrapper function here; it cannot be subclassed, so
        # that server's handshakes are not timed (its connections are still counted).
        return base

    late = late_attributes(base)

    class InstrumentedServerConnection(base):  # type: ignore[valid-type, misc]
        __slots__ = (RECORD_ATTR, HANDSHAKE_ATTR)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            for name in late:  # see ws_monitoring.adapters.attributes
                setattr(self, name, None)
            setattr(self, HANDSHAKE_ATTR, monitor.handshake_started())

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            record: HandshakeRecord = getattr(self, HANDSHAKE_ATTR)
            try:
                await super().handshake(*args, **kwargs)
            except asyncio.CancelledError:
                # open_timeout expired (asyncio.timeout cancels the handshake).
                _finish(monitor, record, self, failure="timeout")
                raise
            except Exception as exc:
                _finish(monitor, record, self, failure="error", error=exc)
                raise
            else:
                _finish(monitor, record, self)

    InstrumentedServerConnection.__name__ = f"Instrumented{base.__name__}"
    InstrumentedServerConnection.__qualname__ = InstrumentedServerConnection.__name__
    # Set after the class exists: recv() needs the record slot's descriptor.
    slot = InstrumentedServerConnection.__dict__[RECORD_ATTR]
    for name, value in _timed_recv(base, slot).items():
        setattr(InstrumentedServerConnection, name, value)
    return InstrumentedServerConnection


def _finish(
    monitor: Monitor,
    record: HandshakeRecord,
    connection: Any,
    *,
    failure: str | None = None,
    error: BaseException | None = None,
) -> None:
    """Report how a handshake ended; shared by the asyncio and threading adapters."""
    request, response = connection.request, connection.response
    accepted = failure is None and connection.protocol.state is State.OPEN
    if not accepted and failure is None and (response is None or response.status_code == 101):
        # No response went out: the request was unreadable, or the client left first.
        response = None
        exc = connection.protocol.handshake_exc
        # websockets wraps "EOF before a full request" in InvalidMessage too.
        lost = exc is None or isinstance(exc.__cause__, EOFError)
        failure = "connection_lost" if lost else "invalid_request"
    health = bool(
        response is not None
        and response.status_code == 200
        and getattr(connection, "_ws_monitoring_health", False)
    )
    monitor.handshake_finished(
        record,
        request=request,
        response=response,
        accepted=accepted,
        error=error if error is not None else connection.protocol.handshake_exc,
        failure=failure,
        health_check=health,
        remote_address=_peer(connection),
    )


def _peer(connection: Any) -> Any:
    try:
        return connection.remote_address
    except OSError:  # the socket is already gone
        return None


def _is_upgrade(request: Request) -> bool:
    """A WebSocket opening handshake: the health path then stays a WebSocket route."""
    return "websocket" in request.headers.get("Upgrade", "").lower()


def chain_process_request(user_hook: HTTPHook | None, health_path: str | None) -> HTTPHook | None:
    """``process_request`` answering ``health_path``, then calling the user's hook."""
    if health_path is None:
        return user_hook

    async def process_request(connection: Any, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] == health_path and not _is_upgrade(request):
            connection._ws_monitoring_health = True
            response: Response = connection.respond(200, "OK\n")
            return response
        if user_hook is None:
            return None
        result = user_hook(connection, request)
        if inspect.isawaitable(result):
            result = await result
        return result

    return process_request


def serve(
    handler: AsyncHandler,
    host: str | None = None,
    port: int | None = None,
    *,
    monitor: Monitor,
    create_connection: type[ServerConnection] | None = None,
    process_request: HTTPHook | None = None,
    **kwargs: Any,
) -> Server:
    """``websockets.asyncio.server.serve`` with ``monitor`` watching every connection."""
    server = ws_serve(
        instrument_async(handler, monitor),
        host,
        port,
        create_connection=_connection_class(create_connection or ServerConnection, monitor),
        process_request=chain_process_request(process_request, monitor.config.health_path),
        **kwargs,
    )
    # Lets the privacy and logging layers find this server's monitor.
    server.__ws_monitoring__ = monitor  # type: ignore[attr-defined]
    wait_closed = server.wait_closed

    async def wait_closed_then_flush() -> None:
        # ``async with serve(...)`` and ``serve_forever()`` both end here: flush the
        # sinks (spans, alerts) within the shared shutdown deadline, off the event loop.
        await wait_closed()
        await asyncio.to_thread(monitor.shutdown)

    server.wait_closed = wait_closed_then_flush  # type: ignore[method-assign]
    return server
