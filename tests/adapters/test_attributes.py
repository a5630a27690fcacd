"""Connections made by ``serve()`` cost the same memory whatever their first clients do.

See :mod:`ws_monitoring.adapters.attributes`: on CPython 3.11 and 3.12 a burst of
connections accepted before the first one of a class is set up leaves every connection
of that class with a combined instance dict of its own (about +1.5 KiB each).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Mapping
from typing import Any

import pytest
import websockets.asyncio.server

from tests.helpers.servers import HOST, RawClient, async_server, async_wait_until
from ws_monitoring.adapters import asyncio as asyncio_adapter
from ws_monitoring.adapters.attributes import late_attributes

BURST = 40


async def _idle(ws: websockets.asyncio.server.ServerConnection) -> None:
    await ws.wait_closed()


async def _dict_sizes(monitoring: Mapping[str, Any] | None, *, alone_first: bool) -> list[int]:
    """``sys.getsizeof`` of each server connection's instance dict after a burst."""
    async with async_server(_idle, monitoring=monitoring) as running:
        clients = []
        if alone_first:
            clients.append(await RawClient.open(running.port))
            await async_wait_until(lambda: len(running.server.connections) == 1)
        # Connected while the event loop is blocked: it then accepts them all in one go
        # and makes every connection object before the first one's connection_made().
        sockets = [socket.create_connection((HOST, running.port)) for _ in range(BURST)]
        for sock in sockets:
            reader, writer = await asyncio.open_connection(sock=sock)
            client = RawClient(reader, writer)
            assert await client.handshake("/burst") == 101
            clients.append(client)
        await async_wait_until(lambda: len(running.server.connections) == len(clients))
        sizes = [sys.getsizeof(vars(c)) for c in running.server.connections]
        for client in clients:
            client.writer.close()
        return sizes


async def test_a_first_burst_costs_no_more_than_connections_arriving_one_by_one() -> None:
    one_by_one = max(await _dict_sizes({}, alone_first=True))
    sizes = await _dict_sizes({}, alone_first=False)
    assert max(sizes) <= one_by_one, (sizes, one_by_one)
    # And not far from the bare server at its best (16 B more on CPython 3.13, whose
    # dicts of instance attributes are built differently): no combined dict each.
    best = max(await _dict_sizes(None, alone_first=True))
    assert max(sizes) < 2 * best, (sizes, best)


@pytest.mark.skipif(
    sys.version_info >= (3, 13), reason="CPython 3.13 sizes inline values per class"
)
async def test_without_the_late_attributes_a_first_burst_costs_a_dict_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The control: the race the test above would catch is real on this CPython.
    best = max(await _dict_sizes(None, alone_first=True))
    monkeypatch.setattr(asyncio_adapter, "late_attributes", lambda base: ())
    sizes = await _dict_sizes({}, alone_first=False)
    assert min(sizes[1:]) > 2 * best, (sizes, best)


def test_late_attributes_are_those_connection_made_sets_and_init_does_not() -> None:
    class Base:
        shared = None

        def __init__(self) -> None:
            self.early = 1

        def connection_made(self, transport: object) -> None:
            self.early = 2
            self.shared = 3  # a class attribute: an instance must not shadow it
            self.transport = transport
            other = Base.__new__(Base)
            other.not_self = 4

            def nested(self: Any) -> None:
                self.in_nested = 5

    class Child(Base):
        def connection_made(self, transport: object) -> None:
            self.first, self.second = transport, transport
            super().connection_made(transport)

    assert late_attributes(Child) == ("first", "second", "transport")
    assert late_attributes(Child, "absent") == ()
    assert late_attributes(websockets.asyncio.server.ServerConnection) == (
        "recv_messages",
        "transport",
    )


def test_late_attributes_ignores_what_is_not_a_method_of_self() -> None:
    class Odd:
        connection_made = staticmethod(lambda: None)

    class Other:
        def connection_made(this, transport: object) -> None:
            this.transport = transport

    assert late_attributes(Odd) == ()
    assert late_attributes(Other) == ()
