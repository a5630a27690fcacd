"""A closed connection is freed by reference counting, as on a bare server.

The record sits in reference cycles while its connection is open (the connection holds
it, it holds the connection, the protocol's extensions hold it); once the connection is
closed, nothing of it may be left for the cyclic GC beyond what websockets and asyncio
leave themselves: with churn or a crash storm, that garbage is what long collections on
the event loop are made of.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import websockets.asyncio.server
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers.servers import async_server, echo

CONNECTIONS = 20


async def crash(ws: websockets.asyncio.server.ServerConnection) -> None:
    await ws.recv()
    raise ValueError("boom")


@pytest.fixture
def quiet_gc() -> Iterator[None]:
    # websockets logs each crash with its traceback: not what this test is about.
    logging.disable(logging.CRITICAL)
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        logging.disable(logging.NOTSET)


async def _cyclic_garbage(handler: Any, monitoring: Mapping[str, Any] | None) -> int:
    """Objects the cyclic GC finds after ``CONNECTIONS`` connections came and went."""
    async with async_server(handler, monitoring=monitoring) as running:
        for _ in range(3):  # warm-up: first-use caches are not garbage
            await _one(running.url("/rooms/1"))
        gc.collect()
        for _ in range(CONNECTIONS):
            await _one(running.url("/rooms/1"))
        await asyncio.sleep(0.1)  # the server's side of the last close
        return gc.collect()


async def _one(url: str) -> None:
    async with connect(url) as client:
        await client.send("x")
        with contextlib.suppress(ConnectionClosed):
            await client.recv()


@pytest.mark.usefixtures("quiet_gc")
@pytest.mark.parametrize("handler", [echo, crash], ids=["echo", "crash"])
@pytest.mark.parametrize(
    "monitoring",
    [{"tracing": False, "log_lifecycle": False}, {}],
    ids=["metrics", "defaults"],
)
async def test_closed_connections_leave_no_more_cycles_than_bare(
    handler: Any, monitoring: Mapping[str, Any]
) -> None:
    bare = await _cyclic_garbage(handler, None)
    ours = await _cyclic_garbage(handler, monitoring)
    assert ours <= bare, (ours, bare)
