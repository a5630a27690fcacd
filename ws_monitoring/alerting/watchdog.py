"""``watch_server``: ``WebSocketServerDown`` when a server's accept loop stops unexpectedly."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from .sink import _check_alerters, fire_all

__all__ = ["ServerWatchdog", "watch_server"]

logger = logging.getLogger("ws_monitoring.alerting")


def _server_state(server: Any) -> tuple[bool, bool]:
    """(serving, closing on purpose) for a websockets asyncio or threading server."""
    if hasattr(server, "close_task"):  # websockets.asyncio.server.Server
        serving = not server.get_loop().is_closed() and bool(server.is_serving())
        return serving, server.close_task is not None
    # websockets.sync.server.Server: serve_forever() sets socket_closed when it exits;
    # shutdown() closes its notifier first, which tells a deliberate stop from a crash.
    notifier = getattr(server, "shutdown_notifier", None)
    stopping = notifier is not None and notifier.fileno() == -1
    return not server.socket_closed.is_set() and server.socket.fileno() != -1, stopping


class ServerWatchdog:
    """Fires ``WebSocketServerDown`` when a server stops accepting connections unexpectedly.

    Watches a ``websockets`` asyncio ``Server`` or threading ``Server`` from a daemon
    thread, every ``interval`` seconds: the alert fires once if the listening sockets
    stop serving (asyncio: ``is_serving()`` is false, or the event loop is closed;
    threading: ``serve_forever()`` exited or the socket was closed) without
    ``close()``/``shutdown()`` having been called. :meth:`stop` checks one last time,
    so a ``serve_forever()`` that returns because its socket died is still reported.

    Use :func:`watch_server`, as a context manager around ``serve_forever()``.
    """

    def __init__(
        self,
        server: Any,
        alerters: Sequence[Any],
        *,
        interval: float = 1.0,
        name: str = "websockets",
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        if not (hasattr(server, "close_task") or hasattr(server, "socket_closed")):
            raise TypeError(f"expected a websockets asyncio or threading Server, got {server!r}")
        self.server = server
        self.alerters = _check_alerters(alerters)
        self.interval = interval
        self.name = name
        #: Set once the alert has fired (after every alerter got it).
        self.tripped = threading.Event()
        self._fired = False
        #: Checks done so far (by the thread, :meth:`check` and :meth:`stop`).
        self.checks = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._listen = self._address()

    def _address(self) -> str:
        try:
            sockets = (
                self.server.sockets if hasattr(self.server, "close_task") else [self.server.socket]
            )
            names = []
            for sock in sockets:
                host, port = sock.getsockname()[:2]
                names.append(f"{host}:{port}")
            return ", ".join(names)
        except (OSError, AttributeError, ValueError):
            return "unknown"

    def check(self) -> bool:
        """Check now; fire if the server died unexpectedly. Returns whether it is healthy."""
        self.checks += 1
        serving, stopping = _server_state(self.server)
        if serving or stopping:
            return True
        with self._lock:
            if self._fired:
                return False
            self._fired = True
        fire_all(
            self.alerters,
            "WebSocketServerDown",
            severity="critical",
            summary=f"WebSocket server {self.name!r} stopped accepting connections",
            description=(
                "Its listening sockets stopped serving without close() or shutdown(): "
                "new clients cannot connect. Restart the process."
            ),
            labels={"server": self.name},
            annotations={"listen_address": self._listen},
        )
        self.tripped.set()
        return False

    def start(self) -> ServerWatchdog:
        """Start watching (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"ws-monitoring-watchdog-{self.name}", daemon=True
            )
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.check():
                    return
            except Exception:  # pragma: no cover - a watchdog must not die silently
                logger.exception("server watchdog %s failed", self.name)
                return

    def stop(self) -> None:
        """Stop watching, after a last check."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.check()
        except Exception:  # pragma: no cover - stopping must not raise
            logger.exception("server watchdog %s failed", self.name)
        if self._thread is not None:
            self._thread.join(self.interval + 1.0)

    def __enter__(self) -> ServerWatchdog:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> ServerWatchdog:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


def watch_server(
    server: Any, alerters: Sequence[Any], *, interval: float = 1.0, name: str = "websockets"
) -> ServerWatchdog:
    """Watch ``server``'s accept loop; ``WebSocketServerDown`` fires if it dies unexpectedly.

    Returns a started :class:`ServerWatchdog`, usable (a)synchronously as a context
    manager::

        with serve_sync(handler, "", 8765, alerters=alerters) as server, \\
                watch_server(server, alerters):
            server.serve_forever()

    Raises:
        TypeError: ``server`` is not a websockets server, or an entry of ``alerters``
            is not an :class:`Alerter`.
        ValueError: ``interval`` is not positive.
    """
    return ServerWatchdog(server, alerters, interval=interval, name=name).start()
