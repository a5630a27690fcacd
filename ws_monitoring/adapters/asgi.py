"""ASGI adapter: feeds the core from WebSocket scopes of any ASGI 3 application.

:class:`MonitoringMiddleware` wraps an ASGI application (FastAPI, Starlette, Quart, a
bare callable) and sees each ``websocket`` scope through the ``receive`` and ``send``
callables it hands the application; ``http`` and ``lifespan`` scopes go straight
through. The events map onto the core (:mod:`ws_monitoring.core`) as the websockets
adapters' do:

==============================================  ===============================================
ASGI                                            core
==============================================  ===============================================
the scope arrives                               ``handshake_started``
``websocket.accept`` sent                       ``handshake_finished`` (accepted), ``open``
``websocket.close`` before accept               ``handshake_finished``: rejected, 403
``websocket.http.response.start``               ``handshake_finished``: rejected, its status
the app raises or returns before either         ``handshake_finished``: rejected, 500
``websocket.disconnect`` before accept          ``handshake_finished``: failed, connection_lost
``websocket.receive`` handed to the app         a received message; handling starts
the app calls ``receive`` again                 handling ends (``message_done``)
``websocket.send`` accepted by the server       a sent message
``websocket.close`` / ``websocket.disconnect``  the close code (sent / received)
an exception escapes the app                    ``failed`` (``handler_exception``), code 1011
the app returns or raises                       ``closed``
==============================================  ===============================================

Messages are counted by the core's frame counters (in C when built), fed one whole
message at a time: an ASGI server hands over complete messages, never frames, pings
or pongs, so ``websocket_ping_rtt_seconds`` stays empty and protocol errors are known
only from the close code the server reports.

Close codes are the ones the application exchanged through ASGI. ASGI servers differ
in what they report: uvicorn reports a dropped TCP connection as 1005 without a
``reason`` (taken here for what it is, a reset); hypercorn reports every
client-initiated close as 1006 (pgjones/hypercorn#127), which is then counted as a
reset. A crash is recorded as 1011, what websockets and hypercorn send; uvicorn drops
the TCP connection instead (its clients see 1006). Nothing here changes what the
server or the client see: messages are passed on unchanged, exceptions propagate.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Never

from websockets.datastructures import Headers
from websockets.frames import Close, Opcode
from websockets.http11 import Request, Response

from ws_monitoring.config import OPTION_NAMES, Config, unknown_option
from ws_monitoring.core import RECORD_ATTR, ConnectionRecord, HandshakeRecord, Monitor

from .instrument import DEFAULT, _config, _given, build_monitor

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ws_monitoring.config import ExceptionMessages, RouteGrouping
    from ws_monitoring.typing import Alerter, Data, Sink

__all__ = ["MonitoringMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_TEXT, _BINARY = Opcode.TEXT, Opcode.BINARY
#: Close codes a server reports when it failed the connection because of the peer.
_FAILURES = frozenset({1002, 1007, 1009})
_NO_CLOSE = Close(1011, "")


class _Message:
    """One whole ASGI message, as the core's frame counters read a frame.

    ``data`` is what its size is taken from: the bytes, or the text when it is ASCII
    (as many characters as UTF-8 bytes), else its UTF-8 encoding.
    """

    __slots__ = ("data", "opcode")
    fin = True
    rsv1 = rsv2 = rsv3 = False

    def __init__(self) -> None:
        self.opcode = _TEXT
        self.data: Any = None


class _Closing:
    """What the core reads of a websockets protocol to finalize a record's close."""

    __slots__ = ("close_rcvd", "close_rcvd_then_sent", "close_sent")
    parser_exc = None

    def __init__(self) -> None:
        self.close_rcvd: Close | None = None
        self.close_sent: Close | None = None
        self.close_rcvd_then_sent = False


def _request(scope: Scope) -> Request:
    """The opening handshake request, as websockets represents it (for sinks and resolvers)."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) and raw else scope.get("path", "/")
    query = scope.get("query_string")
    if query:
        path = f"{path}?{query.decode('latin-1')}"
    headers = Headers(
        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())]
    )
    return Request(path, headers)


def _response(status: int, headers: Any = ()) -> Response:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return Response(
        status, phrase, Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers])
    )


def route_template(scope: Mapping[str, Any]) -> str | None:
    """The path template of the route the framework matched (Starlette, FastAPI), if any.

    Starlette's router puts the matched route in ``scope["route"]``; its
    ``path_format`` is relative to the innermost ``Mount``, whose concrete prefix is
    ``root_path`` minus ``app_root_path``.
    """
    template = getattr(scope.get("route"), "path_format", None)
    if not isinstance(template, str) or not template.startswith("/"):
        return None
    root = scope.get("root_path", "")
    app_root = scope.get("app_root_path", root)
    if isinstance(root, str) and isinstance(app_root, str) and root.startswith(app_root):
        return root[len(app_root) :] + template
    return template


def _peer_gone(exc: BaseException) -> bool:
    """True for Starlette's ``WebSocketDisconnect``: the peer left, not an app bug."""
    module = sys.modules.get("starlette.websockets")
    disconnect = getattr(module, "WebSocketDisconnect", None)
    return isinstance(disconnect, type) and isinstance(exc, disconnect)


class _Connection:
    """One WebSocket scope: the ``receive``/``send`` the application gets, and its record.

    Also the record's ``connection`` (``id``, ``remote_address``, ``subprotocol``,
    ``request``), and what ``scope[RECORD_ATTR]`` holds for :func:`ws_monitoring.grant`.
    """

    # ``_ws_monitoring_record`` is core.RECORD_ATTR, spelled out: an attribute read on the
    # per-message path costs half a getattr() (the consent tests find it by RECORD_ATTR).
    __slots__ = (
        "_receive",
        "_send",
        "_send_error",
        "_ws_monitoring_record",
        "closing",
        "counter",
        "disconnected",
        "frame",
        "handshake",
        "id",
        "monitor",
        "remote_address",
        "request",
        "scope",
        "subprotocol",
    )

    def __init__(self, monitor: Monitor, scope: Scope, receive: Receive, send: Send) -> None:
        self.monitor = monitor
        self.scope = scope
        self._receive = receive
        self._send = send
        self.handshake: HandshakeRecord | None = monitor.handshake_started()
        self.id = uuid.uuid4()
        client = scope.get("client")
        self.remote_address = tuple(client) if client else None
        self.request = _request(scope)
        self.subprotocol: str | None = None
        self._ws_monitoring_record: ConnectionRecord | None = None
        self.counter: Any = None
        self.frame = _Message()
        self.closing = _Closing()
        self.disconnected = False
        self._send_error: BaseException | None = None

    # -- what the application calls ----------------------------------------------------

    async def receive(self) -> Message:
        record = self._ws_monitoring_record
        if record is not None:
            # The application asks for its next message: handling of the previous one ends.
            record.recv_started()
        message = await self._receive()
        kind = message["type"]
        if kind == "websocket.receive":
            # Read again: a framework may ask for a message before it accepts (Quart);
            # the record exists before the server can send its 101 (see send()).
            record = self._ws_monitoring_record
            assert record is not None
            frame = self.frame
            text = message.get("text")
            if text is not None:
                frame.opcode = _TEXT
                frame.data = text if text.isascii() else text.encode("utf-8", "surrogatepass")
                data: Any = text
            else:
                data = message.get("bytes") or b""
                frame.opcode = _BINARY
                frame.data = data
            self.counter.decode(frame)
            frame.data = None  # an idle connection keeps no payload
            record.recv_done(data)
        elif kind == "websocket.disconnect":
            self._disconnect(message)
        return message

    async def send(self, message: Message) -> None:
        record = self._ws_monitoring_record
        kind = message["type"]
        if record is not None and kind == "websocket.send":
            try:
                await self._send(message)
            except BaseException as exc:
                self._send_error = exc
                raise
            frame = self.frame
            data = message.get("bytes")
            if data is not None:
                frame.opcode = _BINARY
                frame.data = data
            else:
                text = message.get("text") or ""
                frame.opcode = _TEXT
                frame.data = text if text.isascii() else text.encode("utf-8", "surrogatepass")
            self.counter.encode(frame)
            frame.data = None
            return
        accepting = kind == "websocket.accept" and self.handshake is not None
        if accepting:
            # Counting starts before the server answers 101: a message the client sends
            # at once may reach a framework's reader task (Quart's) before send() returns.
            record = ConnectionRecord(self.monitor)
            self.counter = self.monitor.frame_counter(record)
            self._ws_monitoring_record = record
        try:
            await self._send(message)
        except BaseException as exc:
            self._send_error = exc
            if accepting:
                self._ws_monitoring_record = None
                failure = "connection_lost" if isinstance(exc, OSError) else "error"
                self._finish_handshake(failure=failure, error=exc)
            raise
        if self.handshake is not None:
            if accepting:
                self.subprotocol = message.get("subprotocol")
                self._finish_handshake(accepted=True)
            elif kind == "websocket.close":
                # ASGI servers answer a close before accept with 403 Forbidden.
                self._finish_handshake(response=_response(403))
            elif kind == "websocket.http.response.start":
                status = message.get("status", 500)
                self._finish_handshake(response=_response(status, message.get("headers", ())))
        elif record is not None and kind == "websocket.close":
            closing = self.closing
            if closing.close_sent is None:
                closing.close_sent = Close(
                    int(message.get("code", 1000)), message.get("reason") or ""
                )
                closing.close_rcvd_then_sent = closing.close_rcvd is not None

    # -- events ------------------------------------------------------------------------------

    def _finish_handshake(
        self,
        *,
        response: Response | None = None,
        accepted: bool = False,
        failure: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        handshake = self.handshake
        assert handshake is not None
        self.handshake = None
        self.monitor.handshake_finished(
            handshake,
            request=self.request,
            response=response,
            accepted=accepted,
            error=error,
            failure=failure,
            remote_address=self.remote_address,
            route=route_template(self.scope),
        )
        if accepted:
            record = self._ws_monitoring_record
            self.monitor.open(self, handshake=handshake, request=self.request, record=record)

    def _disconnect(self, message: Message) -> None:
        self.disconnected = True
        if self._ws_monitoring_record is None:
            return  # the client left before the handshake ended
        closing = self.closing
        if closing.close_sent is not None or closing.close_rcvd is not None:
            return  # the echo of the application's close, or a repeat
        code = int(message.get("code", 1005))
        if code == 1006 or (code == 1005 and "reason" not in message):
            # No close frame: uvicorn reports a lost connection as 1005 without a reason.
            return
        close = Close(code, message.get("reason") or "")
        if code in _FAILURES:
            # The server failed the connection (message too big, invalid UTF-8...).
            closing.close_sent = close
        else:
            closing.close_rcvd = close

    def ended(self, exc: BaseException | None) -> None:
        """The application returned (``exc`` None) or raised ``exc``."""
        monitor = self.monitor
        if self.handshake is not None:
            if self.disconnected:
                self._finish_handshake(failure="connection_lost", error=exc)
            else:
                # Servers answer 500 when the app ends without accepting or denying,
                # whatever it raised (uvicorn, and hypercorn for a cancelled app too).
                self._finish_handshake(response=_response(500), error=exc)
            return
        record = self._ws_monitoring_record
        if record is None:
            return  # denied
        closing = self.closing
        if isinstance(exc, Exception) and exc is not self._send_error and not _peer_gone(exc):
            monitor.failed(record, exc)
            if closing.close_sent is None and closing.close_rcvd is None:
                closing.close_sent = _NO_CLOSE
        monitor.closed(record, closing)  # type: ignore[arg-type]


class MonitoringMiddleware:
    """ASGI 3 middleware: metrics, traces, logs and alerts for WebSocket connections.

    ``MonitoringMiddleware(app, **options)`` wraps any ASGI application, or
    ``app.add_middleware(MonitoringMiddleware, **options)`` in Starlette and FastAPI.
    Options are the fields of :class:`~ws_monitoring.Config` (or ``config=Config(...)``),
    as for :func:`~ws_monitoring.instrument`; ``health_path`` has no use here. ``http``
    scopes are passed through untouched; ``lifespan`` scopes too, except that the sinks
    are flushed (spans, alerts; within the shutdown deadline, 5 s) before
    ``lifespan.shutdown.complete`` reaches the server.

    Raises:
        TypeError: an unknown option or a value of the wrong type, or ``app`` is not
            callable.
        ValueError: an invalid option value.
    """

    # The parameters are Config's fields, as for instrument() (tests/adapters/test_asgi.py
    # checks that the lists stay the same); ``**unknown`` gives a misspelled option
    # ws_monitoring's own error, and type checkers reject it (nothing is a Never).
    def __init__(
        self,
        app: ASGIApp,
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
        **unknown: Never,
    ) -> None:
        for name in unknown:
            raise unknown_option(name, ("config", *OPTION_NAMES), "MonitoringMiddleware()")
        if not callable(app):
            raise TypeError(f"expected an ASGI application, got {app!r}")
        self.app = app
        self.monitor = build_monitor(_config(config, _given(locals())))
        #: Lets ``privacy_of``/``grant_user`` find this monitor.
        self.__ws_monitoring__ = self.monitor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            connection = _Connection(self.monitor, scope, receive, send)
            # The connection, found by ws_monitoring.grant() through the scope.
            scope[RECORD_ATTR] = connection
            try:
                await self.app(scope, connection.receive, connection.send)
            except BaseException as exc:
                connection.ended(exc)
                raise
            connection.ended(None)
        elif kind == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
        else:
            await self.app(scope, receive, send)

    def _lifespan_send(self, send: Send) -> Send:
        monitor = self.monitor

        async def lifespan_send(message: Message) -> None:
            if message.get("type") == "lifespan.shutdown.complete":
                await _flush(monitor)
            await send(message)

        return lifespan_send


async def _flush(monitor: Monitor) -> None:
    """Flush the sinks off the event loop (in place when the loop is not asyncio's)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # another async library (trio): a blocking flush, at shutdown
        monitor.shutdown()
    else:
        await asyncio.to_thread(monitor.shutdown)
