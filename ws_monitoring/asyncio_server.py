"""asyncio adapter: feeds the core from ``websockets.asyncio.server`` connections.

The handler receives the very same ``ServerConnection`` object websockets created, so
identity, attributes, exceptions and close codes are unchanged. Two methods are
shadowed on that instance (``recv`` and ``recv_streaming``) to time message handling,
and two on its sans-I/O protocol (see :mod:`ws_monitoring.core`) to count frames.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from .core import ConnectionRecord, HandshakeRecord, Monitor, _now
from .typing import Data

__all__ = ["instrument_async", "serve"]

AsyncHandler = Callable[[ServerConnection], Awaitable[None]]
HTTPHook = Callable[..., Awaitable[Response | None] | Response | None]

#: Attribute under which the record of a connection is kept on the connection object.
RECORD_ATTR = "_ws_monitoring_record"
_HANDSHAKE_ATTR = "_ws_monitoring_handshake"

#: Seconds the sinks get to flush (spans, alerts) when a server made by ``serve`` closes.
SHUTDOWN_TIMEOUT = 5.0


class RecvHooksBase:
    """``recv``/``recv_streaming`` of one connection, timing how long each message is handled.

    Bound methods of one small object rather than two closures: about 350 bytes less per
    connection for the same cost per call. Subclassed by each adapter for its API.
    """

    __slots__ = ("message_sinks", "orig_recv", "orig_recv_streaming", "record")

    def __init__(self, connection: Any, record: ConnectionRecord) -> None:
        self.record = record
        self.orig_recv = connection.recv
        self.orig_recv_streaming = connection.recv_streaming
        self.message_sinks = record.monitor.message_sinks


class _RecvHooks(RecvHooksBase):
    __slots__ = ()

    async def recv(self, decode: bool | None = None) -> Data:
        record = self.record
        start = record.handling_start
        if start:
            h = record.h
            if h is not None and record.tokens is None and record.exemplar_trace_id is None:
                # ``record.message_done()`` when it has nothing but the histogram to do,
                # inlined: this runs once per message, and a call costs a tenth of it.
                duration = _now() - start
                record.handling_start = 0.0
                monitor = record.monitor
                bounds = monitor.duration_bounds
                bucket = 0 if duration <= bounds[0] else bisect_left(bounds, duration)
                h[monitor.layout.duration + bucket] += 1
                record.handling_sum += duration
            else:
                record.message_done()
        message: Data = await self.orig_recv(decode)
        if self.message_sinks:
            record.message_handed(message)
        else:
            # All ``message_handed`` does without message sinks, minus a call per message.
            record.handling_start = _now()
        return message

    async def recv_streaming(self, decode: bool | None = None) -> AsyncIterator[Data]:
        record = self.record
        if record.handling_start:
            record.message_done()
        first = True
        async for fragment in self.orig_recv_streaming(decode):
            if first:
                first = False
                record.message_handed(fragment)
            yield fragment


def _install_recv_hooks(connection: ServerConnection, record: ConnectionRecord) -> None:
    hooks = _RecvHooks(connection, record)
    # ``async for message in connection`` calls ``self.recv()``: it picks this up too.
    connection.recv = hooks.recv  # type: ignore[method-assign, assignment]
    connection.recv_streaming = hooks.recv_streaming  # type: ignore[method-assign, assignment]


def instrument_async(handler: AsyncHandler, monitor: Monitor) -> AsyncHandler:
    """Wrap an asyncio connection handler so that ``monitor`` sees its connection."""

    @functools.wraps(handler)
    async def instrumented(connection: ServerConnection) -> None:
        record = monitor.open(connection, handshake=getattr(connection, _HANDSHAKE_ATTR, None))
        setattr(connection, RECORD_ATTR, record)
        _install_recv_hooks(connection, record)
        try:
            await handler(connection)
        except ConnectionClosed:
            # The peer went away under the handler: not a handler bug; websockets
            # closes with 1011 as for any exception, so do we.
            await connection.close(1011)
            raise
        except Exception as exc:
            monitor.failed(record, exc)
            await connection.close(1011)
            raise
        except BaseException:
            # CancelledError and the like: websockets' ``async with connection`` closes
            # with 1011 for these too; close first so the record sees that code.
            await connection.close(1011)
            raise
        else:
            # What ``async with connection`` does next in websockets' server; doing it
            # here lets the record see the final close code. Closing twice is a no-op.
            await connection.close()
        finally:
            monitor.closed(record, connection.protocol)

    instrumented.__ws_monitoring__ = monitor  # type: ignore[attr-defined]
    return instrumented


def _connection_class(base: type[ServerConnection], monitor: Monitor) -> type[ServerConnection]:
    """A subclass of ``base`` that times and classifies the opening handshake."""
    if not isinstance(base, type):
        # websockets also takes a wrapper function here; it cannot be subclassed, so
        # that server's handshakes are not timed (its connections are still counted).
        return base

    class InstrumentedServerConnection(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            setattr(self, _HANDSHAKE_ATTR, monitor.handshake_started())

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            record: HandshakeRecord = getattr(self, _HANDSHAKE_ATTR)
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
        # sinks (spans, alerts) within a deadline, off the event loop.
        await wait_closed()
        await asyncio.to_thread(monitor.shutdown, SHUTDOWN_TIMEOUT)

    server.wait_closed = wait_closed_then_flush  # type: ignore[method-assign]
    return server
