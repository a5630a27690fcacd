"""Real FastAPI, Starlette and Quart applications for the ASGI tests.

Each factory takes ``seen``, a list the application appends what it observed to (the
messages, the disconnect codes), so a test can compare a bare and an instrumented run,
and ``wrap``, applied to the application before it is returned (``MonitoringMiddleware``
or nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Response, WebSocket, WebSocketDisconnect
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute

Wrap = Callable[[Any], Any]
log = logging.getLogger("tests.asgi_app")


def _identity(app: Any) -> Any:
    return app


def fastapi_app(seen: list[Any], *, wrap: Wrap = _identity, **options: Any) -> Any:
    """FastAPI: ``/echo/{room}`` (commands: ``crash``, ``close:<code>``, ``log``, ``trace``),
    ``/chat/{room}`` (``receive_text``, the disconnect left to propagate), two denials and
    an HTTP route. ``options``: ``MonitoringMiddleware`` added with ``add_middleware``."""
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int, response: Response) -> dict[str, Any]:
        response.headers["x-item"] = str(item_id)
        response.set_cookie("session", "abc")
        return {"item": item_id}

    @app.websocket("/echo/{room}")
    async def echo(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                seen.append(("disconnect", int(message.get("code", 1005))))
                return
            text = message.get("text")
            seen.append(text if text is not None else message.get("bytes"))
            if text == "crash":
                raise ValueError("handler bug")
            if text is not None and text.startswith("close:"):
                await websocket.close(int(text[6:]), reason="bye")
                return
            if text == "log":
                log.warning("inside the handler")
            if text == "trace":
                from opentelemetry import trace

                with trace.get_tracer("tests.asgi_app").start_as_current_span("lookup"):
                    pass
            if text is not None:
                await websocket.send_text(text)
            else:
                await websocket.send_bytes(message["bytes"])

    @app.websocket("/chat/{room}")
    async def chat(websocket: WebSocket, room: str) -> None:
        await websocket.accept(subprotocol="chat.v1" if websocket.scope["subprotocols"] else None)
        try:
            while True:
                text = await websocket.receive_text()
                seen.append(text)
                await websocket.send_text(f"{room}: {text}")
        except WebSocketDisconnect as exc:
            seen.append(("disconnect", int(exc.code)))
            raise  # as many FastAPI handlers do: it reaches the server

    @app.websocket("/deny/{what}")
    async def deny(websocket: WebSocket, what: str) -> None:
        seen.append(("deny", what))
        await websocket.close(4003)

    @app.websocket("/denied")
    async def denied(websocket: WebSocket) -> None:
        seen.append("denied")
        await websocket.send_denial_response(PlainTextResponse("no entry", status_code=401))

    @app.websocket("/broken")
    async def broken(websocket: WebSocket) -> None:
        seen.append("broken")
        raise RuntimeError("crashed before accept")

    if options:
        from ws_monitoring.asgi import MonitoringMiddleware

        app.add_middleware(MonitoringMiddleware, **options)
    return wrap(app)


def starlette_app(seen: list[Any], *, wrap: Wrap = _identity, **options: Any) -> Any:
    """Starlette: ``/rooms/{room:int}``, ``/v1/chat/{name}`` (a Mount), ``/health``.

    ``options``: ``MonitoringMiddleware`` in the ``middleware=`` list.
    """

    async def room(websocket: Any) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            seen.append(text)
            await websocket.send_text(f"room {websocket.path_params['room']}: {text}")

    async def chat(websocket: Any) -> None:
        await websocket.accept()
        async for data in websocket.iter_bytes():
            seen.append(data)
            await websocket.send_bytes(data[::-1])

    async def health(request: Any) -> Any:
        return JSONResponse({"ok": True}, headers={"x-health": "1"})

    middleware = []
    if options:
        from ws_monitoring.asgi import MonitoringMiddleware

        middleware.append(Middleware(MonitoringMiddleware, **options))
    app = Starlette(
        routes=[
            Route("/health", health),
            WebSocketRoute("/rooms/{room:int}", room),
            Mount("/v1", routes=[WebSocketRoute("/chat/{name}", chat)]),
        ],
        middleware=middleware,
    )
    return wrap(app)


def quart_app(seen: list[Any], *, wrap: Wrap = _identity) -> Any:
    """Quart: ``/ws/<room>`` echoes until the client leaves (``consent``: grants the
    ``ip`` purpose, answers the client IP the logs now show); ``/`` answers HTTP."""
    from quart import Quart, websocket

    app = Quart("asgi_tests")

    @app.route("/")
    async def index() -> Any:
        return {"hello": "world"}

    @app.websocket("/ws/<room>")
    async def ws(room: str) -> None:
        while True:
            data = await websocket.receive()
            seen.append(data)
            if data == "consent":
                import ws_monitoring

                client = ws_monitoring.grant(websocket, purposes={"ip"}, policy_version="v1")
                data = str(client.ip)
            await websocket.send(data)

    return wrap(app)
