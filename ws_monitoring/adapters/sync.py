"""Threading adapter: feeds the core from ``websockets.sync.server`` connections.

Same approach as :mod:`ws_monitoring.adapters.asyncio`: the handler gets websockets' own
``ServerConnection``; ``recv``/``recv_streaming`` are shadowed on the instance to time
message handling, and frames are counted on the sans-I/O protocol, where websockets
already serializes access with the connection's ``protocol_mutex``.

Only :func:`serve` hooks the connection before its handshake (``Monitor.prepare``)
and opens its record when the handshake ends. A handler instrumented with
:func:`ws_monitoring.instrument` and given to ``websockets.sync.server.serve`` is hooked
when the handler starts, while the connection's reader thread may already have parsed
the client's first messages: :func:`count_from_handshake` counts those too. What such
a server cannot see: a connection that closes before websockets calls its handler,
and messages other threads send to a connection before its handler starts (a
``broadcast()`` in that gap). :func:`serve` sees both.
"""

from __future__ import annotations

import functools
import logging
import queue
from collections.abc import Callable, Iterator
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection
from websockets.sync.server import serve as ws_serve

from ws_monitoring.core import (
    HANDSHAKE_ATTR,
    RECORD_ATTR,
    SPEEDUPS,
    ConnectionRecord,
    HandshakeRecord,
    Monitor,
)
from ws_monitoring.typing import Data

from .asyncio import (
    _TIMED_ATTR,
    RecvHooksBase,
    _finish,
    _is_upgrade,
)

__all__ = ["instrument_sync", "serve"]

SyncHandler = Callable[[ServerConnection], None]

#: The record a connection created by :func:`serve` counts into from its creation.
_PREPARED_ATTR = "_ws_monitoring_prepared"
SyncHTTPHook = Callable[..., Response | None]


class TimedRecv:
    """The threading server's :class:`~ws_monitoring.adapters.asyncio.TimedRecv`."""

    __slots__ = ()
    _ws_monitoring_record: ConnectionRecord
    _ws_monitoring_recv: Callable[..., Data]
    _ws_monitoring_recv_streaming: Callable[..., Iterator[Data]]

    def recv(self, timeout: float | None = None, decode: bool | None = None) -> Data:
        record = self._ws_monitoring_record
        record.recv_started()
        message: Data = self._ws_monitoring_recv(timeout, decode)
        record.recv_done(message)
        return message

    def recv_streaming(self, decode: bool | None = None) -> Iterator[Data]:
        record = self._ws_monitoring_record
        record.recv_started()
        first = True
        for fragment in self._ws_monitoring_recv_streaming(decode):
            if first:
                first = False
                record.recv_done(fragment)
            yield fragment


class _RecvHooks(TimedRecv, RecvHooksBase):
    __slots__ = ()


def instrument_sync(handler: SyncHandler, monitor: Monitor) -> SyncHandler:
    """Wrap a threading-server handler so that ``monitor`` sees its connection."""

    @functools.wraps(handler)
    def instrumented(connection: ServerConnection) -> None:
        # Opened at the end of the handshake when served by serve(); here otherwise.
        record = getattr(connection, RECORD_ATTR, None)
        if record is None:
            prepared = getattr(connection, _PREPARED_ATTR, None)
            if prepared is None:
                # A plain websockets server: the connection is hooked only now.
                prepared = ConnectionRecord(monitor)
                if monitor.count_frames:
                    count_from_handshake(connection, prepared, monitor)
            record = monitor.open(
                connection, handshake=getattr(connection, HANDSHAKE_ATTR, None), record=prepared
            )
            setattr(connection, RECORD_ATTR, record)
        if not _claim(connection):
            # The connection closed before its handler started, and the reader thread
            # closed its record: nothing left to observe.
            handler(connection)
            return
        if not getattr(connection, _TIMED_ATTR, False):  # not a class made by serve()
            _RecvHooks.install(connection, record)
        try:
            handler(connection)
        except ConnectionClosed:
            connection.close(1011)
            raise
        except Exception as exc:
            monitor.failed(record, exc)
            connection.close(1011)
            raise
        except BaseException:
            # KeyboardInterrupt, SystemExit: websockets' ``with connection`` closes with
            # 1011 for these too; close first so the record sees that code.
            connection.close(1011)
            raise
        else:
            # What ``with connection`` does next in websockets' server; closing twice
            # is a no-op. Doing it here lets the record see the final close code.
            connection.close()
        finally:
            monitor.closed(record, connection.protocol)

    instrumented.__ws_monitoring__ = monitor  # type: ignore[attr-defined]
    return instrumented


class _CountingFrames(queue.SimpleQueue):  # type: ignore[type-arg]
    """A connection's assembler queue that counts the frames put in it (see below)."""

    count: Callable[[Any], object]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is not None:  # the assembler's end-of-stream marker
            self.count(item)
        super().put(item, block, timeout)

    def stop(self) -> None:
        """The protocol's frame counter sees every later frame: stop counting here."""
        # The plain queue's method from now on: no Python call per frame.
        self.put = functools.partial(queue.SimpleQueue.put, self)  # type: ignore[method-assign]


class _Boundary(list):  # type: ignore[type-arg]
    """``protocol.events`` when the frame counter joined the protocol.

    The reader thread parses frames under ``protocol_mutex``, then puts them in the
    assembler without it. It iterates this list once, to put the first frames parsed
    after the counter joined: by then it has put every frame parsed before.
    """

    __slots__ = ("frames", "uncounted")
    frames: _CountingFrames
    #: Events already in the list, parsed before the counter joined (none in practice:
    #: the reader takes them under the lock it parses them with).
    uncounted: int

    def __iter__(self) -> Iterator[Any]:
        items = super().__iter__()
        for _ in range(self.uncounted):
            yield next(items)
        self.frames.stop()
        yield from items


logger = logging.getLogger("ws_monitoring")
_warned_internals = False


def count_from_handshake(
    connection: ServerConnection, record: ConnectionRecord, monitor: Monitor
) -> None:
    """Count every frame ``connection`` received since its handshake, though hooked later.

    ``websockets.sync.server.serve`` calls the handler after the handshake, and the
    connection's reader thread parses frames meanwhile: a client that sends a message
    at once (subscribe, authenticate) often has it parsed first. Frames parsed before
    the counter joins the protocol are in the assembler's queue, or about to be put
    there by the reader: the queue counts them as they are (or were) put, until the
    reader puts the first frames the counter saw. Each frame is counted once, in the
    order websockets parsed it (fragmented messages span the switch), and no lock is
    taken in an order websockets does not take it (the reader puts frames holding the
    assembler's mutex; closing takes that mutex while holding ``protocol_mutex``).
    """
    protocol = connection.protocol
    assembler = connection.recv_messages
    frames = getattr(assembler, "frames", None)
    counter = monitor.frame_counter(record)
    if type(frames) is not queue.SimpleQueue or type(protocol.events) is not list:
        # Another websockets release (13.x buffers no frame; a future one may change):
        # counting starts now, and the user is told where the count is exact.
        global _warned_internals
        if not _warned_internals:
            _warned_internals = True
            logger.warning(
                "instrument() on websockets.sync.server.serve: this websockets version "
                "buffers received frames differently; messages received before the "
                "handler starts are not counted. ws_monitoring.serve_sync counts them all."
            )
        with connection.protocol_mutex:
            protocol.extensions = [counter, *protocol.extensions]
        return
    if not SPEEDUPS and record.h is None:
        # The queue counts in the reader thread while the handler may already send: the
        # pure-Python counters would race to allocate the histograms.
        record.h = [0] * monitor.layout.length
    counting = _CountingFrames()
    counting.count = counter.decode
    with assembler.mutex:
        while True:
            try:
                counting.put(frames.get(block=False))
            except queue.Empty:
                break
        assembler.frames = counting
    with connection.protocol_mutex:
        protocol.extensions = [counter, *protocol.extensions]
        boundary = _Boundary(protocol.events)
        boundary.frames = counting
        boundary.uncounted = len(boundary)
        protocol.events = boundary


#: Set on a connection by whoever closes its record: the handler, or the reader thread.
_CLAIM_ATTR = "_ws_monitoring_claim"
#: Set on a connection when its reader thread has ended (the connection is closed).
_READER_DONE_ATTR = "_ws_monitoring_reader_done"


def _claim(connection: ServerConnection) -> bool:
    """Take the job of closing the record of ``connection``: True for one caller only."""
    token = object()
    # dict.setdefault is atomic: of concurrent callers, exactly one stores its token.
    return vars(connection).setdefault(_CLAIM_ATTR, token) is token


def _connection_class(base: type[ServerConnection], monitor: Monitor) -> type[ServerConnection]:
    """A subclass of ``base`` that times the handshake and opens the record at its end.

    websockets does not call the handler of a connection that failed right after its
    handshake (a client sending an oversized or invalid frame at once): the record is
    opened when the handshake ends, and closed by the reader thread if the handler
    never took it over, so such a connection is counted like any other.
    """
    if not isinstance(base, type):
        # websockets also takes a wrapper function here; it cannot be subclassed, so
        # that server's handshakes are not timed. Its frames are still counted from
        # the start: the reader thread may parse a message before the handler starts.
        factory = base

        def create_connection(sock: Any, protocol: Any, *args: Any, **kwargs: Any) -> Any:
            record = monitor.prepare(protocol)
            connection = factory(sock, protocol, *args, **kwargs)
            setattr(connection, _PREPARED_ATTR, record)
            return connection

        return create_connection

    class InstrumentedServerConnection(base):  # type: ignore[valid-type, misc]
        __slots__ = (RECORD_ATTR, HANDSHAKE_ATTR, _PREPARED_ATTR)
        # TimedRecv's methods, not the mixin itself: the user's class stays first in the MRO.
        recv = TimedRecv.recv
        recv_streaming = TimedRecv.recv_streaming
        _ws_monitoring_timed = True
        _ws_monitoring_recv = base.recv
        _ws_monitoring_recv_streaming = base.recv_streaming

        def __init__(self, sock: Any, protocol: Any, *args: Any, **kwargs: Any) -> None:
            # Before super().__init__, which starts the reader thread: a message sent
            # right after the handshake may be parsed before the handler starts.
            setattr(self, HANDSHAKE_ATTR, monitor.handshake_started())
            setattr(self, _PREPARED_ATTR, monitor.prepare(protocol))
            super().__init__(sock, protocol, *args, **kwargs)

        def handshake(self, *args: Any, **kwargs: Any) -> None:
            record: HandshakeRecord = getattr(self, HANDSHAKE_ATTR)
            try:
                super().handshake(*args, **kwargs)
            except TimeoutError as exc:
                _finish(monitor, record, self, failure="timeout", error=exc)
                raise
            except Exception as exc:
                _finish(monitor, record, self, failure="error", error=exc)
                raise
            else:
                _finish(monitor, record, self)
                if record.outcome == "accepted":
                    opened = monitor.open(
                        self, handshake=record, record=getattr(self, _PREPARED_ATTR, None)
                    )
                    setattr(self, RECORD_ATTR, opened)
                    # See ConnectionRecord.handshake: idle connections keep neither.
                    setattr(self, HANDSHAKE_ATTR, None)
                    setattr(self, _PREPARED_ATTR, None)
                    # Set, then check (the reader does the reverse): one of us sees both.
                    if getattr(self, _READER_DONE_ATTR, False) and _claim(self):
                        monitor.closed(opened, self.protocol)

        def recv_events(self) -> None:
            try:
                super().recv_events()
            finally:
                setattr(self, _READER_DONE_ATTR, True)
                opened = getattr(self, RECORD_ATTR, None)
                if opened is not None and _claim(self):
                    # The handler never started: websockets skipped it, or has yet to
                    # start it on a connection that is already closed.
                    monitor.closed(opened, self.protocol)

    InstrumentedServerConnection.__name__ = f"Instrumented{base.__name__}"
    InstrumentedServerConnection.__qualname__ = InstrumentedServerConnection.__name__
    return InstrumentedServerConnection


def chain_process_request(
    user_hook: SyncHTTPHook | None, health_path: str | None
) -> SyncHTTPHook | None:
    """``process_request`` answering ``health_path``, then calling the user's hook."""
    if health_path is None:
        return user_hook

    def process_request(connection: Any, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] == health_path and not _is_upgrade(request):
            connection._ws_monitoring_health = True
            response: Response = connection.respond(200, "OK\n")
            return response
        return None if user_hook is None else user_hook(connection, request)

    return process_request


def serve(
    handler: SyncHandler,
    host: str | None = None,
    port: int | None = None,
    *,
    monitor: Monitor,
    create_connection: type[ServerConnection] | None = None,
    process_request: SyncHTTPHook | None = None,
    **kwargs: Any,
) -> Server:
    """``websockets.sync.server.serve`` with ``monitor`` watching every connection."""
    server = ws_serve(
        instrument_sync(handler, monitor),
        host,
        port,
        create_connection=_connection_class(create_connection or ServerConnection, monitor),
        process_request=chain_process_request(process_request, monitor.config.health_path),
        **kwargs,
    )
    # Lets the privacy and logging layers find this server's monitor.
    server.__ws_monitoring__ = monitor  # type: ignore[attr-defined]
    shutdown = server.shutdown

    @functools.wraps(shutdown)
    def shutdown_then_flush(*args: Any, **kwargs: Any) -> None:
        # ``with serve(...)`` ends here: flush the sinks (spans, alerts) within the
        # shared shutdown deadline.
        shutdown(*args, **kwargs)
        monitor.shutdown()

    server.shutdown = shutdown_then_flush  # type: ignore[method-assign]
    return server
