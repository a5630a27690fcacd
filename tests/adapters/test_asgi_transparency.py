"""The middleware changes nothing a client or an application can observe.

Each scenario runs against the same application twice on each real server — bare, and
wrapped in ``MonitoringMiddleware`` with its defaults — and what the clients saw (close
codes and reasons, messages, HTTP statuses, headers and bodies) and what the
application saw must be identical. The expected observation is checked too, so two
identically broken runs would not pass.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.helpers.asgi import SERVERS, VOLATILE_HEADERS, RunningASGI, asgi_server
from tests.helpers.asgi_apps import fastapi_app, starlette_app

Scenario = Callable[[RunningASGI], Awaitable[Any]]


async def compare(
    server: str, factory: Callable[..., Any], scenario: Scenario
) -> tuple[Any, list[Any]]:
    runs = []
    for options in ({}, {"registry": CollectorRegistry()}):
        seen: list[Any] = []
        with asgi_server(factory(seen, **options), server) as running:
            client_saw = await scenario(running)
        # Leaving the block waited for every application call: ``seen`` is complete.
        runs.append((client_saw, seen))
    assert runs[1] == runs[0]
    return runs[0]


def closed(exc: ConnectionClosed) -> tuple[Any, ...]:
    """What a ConnectionClosed says, in comparable form."""
    return (
        type(exc).__name__,
        (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else None,
        (exc.sent.code, exc.sent.reason) if exc.sent else None,
    )


def rejected(exc: InvalidStatus) -> tuple[int, list[tuple[str, str]], bytes]:
    response = exc.response
    headers = [(k.lower(), v) for k, v in response.headers.raw_items()]
    return (
        response.status_code,
        [(k, v) for k, v in headers if k not in VOLATILE_HEADERS],
        bytes(response.body),
    )


async def until_closed(running: RunningASGI, path: str, *messages: str | bytes) -> Any:
    """Send ``messages``, read until the server ends the connection: (replies, close)."""
    replies: list[Any] = []
    async with connect(running.url(path)) as client:
        for message in messages:
            await client.send(message)
        try:
            while True:
                replies.append(await client.recv())
        except ConnectionClosed as exc:
            return replies, closed(exc)


async def denied(running: RunningASGI, path: str) -> Any:
    with pytest.raises(InvalidStatus) as info:
        async with connect(running.url(path)):
            pass
    return rejected(info.value)


@pytest.mark.parametrize("server", SERVERS)
async def test_fastapi_echo_and_closes(server: str) -> None:
    async def scenario(running: RunningASGI) -> Any:
        saw = []
        async with connect(running.url("/echo/a")) as client:
            for message in ("hello", b"\x00\xff", "h\u00e9llo", "x" * 70000):
                await client.send(message)
                saw.append(await client.recv())
        saw.append(await until_closed(running, "/echo/b", "one", "close:4001"))
        saw.append(await until_closed(running, "/echo/c", "crash"))
        async with connect(running.url("/echo/d")) as client:
            await client.close(4002, "client done")
        async with connect(running.url("/chat/lobby"), subprotocols=["chat.v1"]) as client:
            await client.send("hi")
            saw.append((client.subprotocol, await client.recv()))
        return saw

    client_saw, app_saw = await compare(server, fastapi_app, scenario)
    crash_close = ("ConnectionClosedError", (1011, ""), (1011, "")) if server == "hypercorn" else (
        "ConnectionClosedError", None, None)  # fmt: skip
    assert client_saw == [
        "hello",
        b"\x00\xff",
        "h\u00e9llo",
        "x" * 70000,
        (["one"], ("ConnectionClosedError", (4001, "bye"), (4001, "bye"))),
        ([], crash_close),
        ("chat.v1", "lobby: hi"),
    ]
    client_close = 1006 if server == "hypercorn" else 1000
    assert app_saw == [
        "hello", b"\x00\xff", "h\u00e9llo", "x" * 70000, ("disconnect", client_close),
        "one", "close:4001",
        "crash",
        ("disconnect", 1006 if server == "hypercorn" else 4002),
        "hi", ("disconnect", client_close),
    ]  # fmt: skip


@pytest.mark.parametrize("server", SERVERS)
async def test_fastapi_denials_and_http(server: str) -> None:
    async def scenario(running: RunningASGI) -> Any:
        return [
            await denied(running, "/deny/x"),
            await denied(running, "/denied"),
            await denied(running, "/broken"),
            running.get("/items/7"),
            running.get("/items/nope"),
            running.get("/missing"),
        ]

    client_saw, app_saw = await compare(server, fastapi_app, scenario)
    assert [item[0] for item in client_saw] == [403, 401, 500, 200, 422, 404]
    assert client_saw[1][2] == b"no entry"
    assert ("x-item", "7") in client_saw[3][1]
    assert client_saw[3][2] == b'{"item":7}'
    assert app_saw == [("deny", "x"), "denied", "broken"]


@pytest.mark.parametrize("server", ["uvicorn-sansio", "hypercorn"])
async def test_starlette_routes(server: str) -> None:
    async def scenario(running: RunningASGI) -> Any:
        saw: list[Any] = [running.get("/health")]
        async with connect(running.url("/rooms/3")) as client:
            await client.send("hi")
            saw.append(await client.recv())
        async with connect(running.url("/v1/chat/bob")) as client:
            await client.send(b"abc")
            saw.append(await client.recv())
        saw.append(await denied(running, "/nowhere"))
        return saw

    client_saw, app_saw = await compare(server, starlette_app, scenario)
    assert client_saw[0][0] == 200
    assert client_saw[1:3] == ["room 3: hi", b"cba"]
    assert client_saw[3][0] == 403
    assert app_saw == ["hi", b"abc"]
