"""The ASGI rows of the main comparison: uvicorn + FastAPI, bare vs ``MonitoringMiddleware``.

The same FastAPI echo endpoint, written as its users write it, served by uvicorn (its
default WebSocket implementation, ``websockets-sansio``) in the benchmark's server
process; ``asgi-bare`` is the floor of the other two. ``asgi-metrics`` adds the
middleware with metrics only, ``asgi-defaults`` with the defaults (metrics, 1 % of
message spans to the OTLP receiver, JSON lifecycle logs), set up as for the websockets
variants. Budgets: 1.10x and 1.15x the bare server's CPU time per echoed message.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoint's annotation
# (``WebSocket``, imported where the application is built) as a class.
import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

__all__ = ["VARIANTS", "echo_app", "servers"]

#: (variant, label, floor variant, budget ratio), in report order (see report.VARIANTS).
VARIANTS: tuple[tuple[str, str, str, float | None], ...] = (
    ("asgi-bare", "7. uvicorn + FastAPI: bare (floor)", "asgi-bare", None),
    ("asgi-metrics", "7. uvicorn + FastAPI: metrics only", "asgi-bare", 1.10),
    ("asgi-defaults", "7. uvicorn + FastAPI: defaults", "asgi-bare", 1.15),
)


def echo_app() -> Any:
    """A FastAPI application echoing binary messages on ``/``."""
    from fastapi import FastAPI, WebSocket, WebSocketDisconnect

    app = FastAPI()

    @app.websocket("/")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_bytes(await websocket.receive_bytes())
        except WebSocketDisconnect:
            pass

    return app


@contextlib.asynccontextmanager
async def _uvicorn(app: Any, host: str) -> AsyncIterator[int]:
    """Serve ``app`` with uvicorn on this event loop; yields its port."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    config = uvicorn.Config(
        app,
        ws="websockets-sansio",
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


def _start(kind: str | None) -> Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]:
    def start(options: Any) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
        @contextlib.asynccontextmanager
        async def run() -> AsyncIterator[dict[str, Any]]:
            from . import variants

            app = echo_app()
            info: dict[str, Any] = {}
            if kind is not None:
                from ws_monitoring.asgi import MonitoringMiddleware

                extra = variants._ws_monitoring_setup(kind, options)
                info = variants._start_metrics_server()
                app.add_middleware(MonitoringMiddleware, **extra)
            async with _uvicorn(app, variants.HOST) as port:
                yield {"port": port, **info}

        return run()

    return start


def servers() -> dict[str, Any]:
    """The ``ServerSpec`` of each ASGI variant (for ``variants.SERVERS``)."""
    from .variants import ServerSpec, _no_sync

    return {
        "asgi-bare": ServerSpec(False, _start(None), _no_sync),
        "asgi-metrics": ServerSpec(False, _start("metrics"), _no_sync),
        "asgi-defaults": ServerSpec(False, _start("defaults"), _no_sync),
    }
