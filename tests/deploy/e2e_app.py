"""An instrumented server under steady synthetic traffic, for the deploy end-to-end test.

Run as ``python -m tests.deploy.e2e_app --alertmanager URL --otlp-endpoint URL``. It
serves ``ws_monitoring.serve`` (routes ``/echo`` and ``/chat/{room}``) and
``start_metrics_server`` on free loopback ports, prints one JSON line with the ports
and what is enabled, then drives traffic until its standard input closes:

* echo sessions with text, binary and slow messages, closed normally (1000);
* chat sessions closed by the client with an application code (4xxx);
* handler crashes (1011, ``handler_exception``);
* TCP resets after a message (1006, ``connection_reset``);
* handshakes rejected with 404;
* long-lived connections on both routes that answer keepalive pings (ping RTT).

Every connection names its tenant in ``X-Tenant`` (``tenant=``, ``tenants=`` allow-list):
echo traffic is ``acme``'s, chat traffic ``globex``'s, the resets ``initech``'s
(``__other__``).

It is a separate process because tracing installs a global tracer provider, and
because its self-metrics (alert and span sinks) live in the default registry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import struct
import sys
import threading
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

import ws_monitoring

ROUTES = ["/echo", "/chat/{room}"]
#: The allow-listed tenants (the X-Tenant header): echo traffic is acme's, chat globex's.
TENANTS = ["acme", "globex"]
ACME = {"X-Tenant": "acme"}
GLOBEX = {"X-Tenant": "globex"}


def tenant_of(request: Request) -> str | None:
    return request.headers.get("X-Tenant")


async def handler(ws: ServerConnection) -> None:
    async for message in ws:
        if message == "crash":
            raise RuntimeError("e2e: the handler crashed on purpose")
        if message == "slow":
            await asyncio.sleep(0.02)
        await ws.send(message)


def process_request(ws: ServerConnection, request: Request) -> Response | None:
    if request.path.startswith("/missing"):
        return ws.respond(404, "Not Found\n")
    return None


async def echo_session(base: str) -> None:
    async with connect(f"{base}/echo", additional_headers=ACME) as client:
        for index in range(6):
            await client.send(f"hello {index}")
            await client.recv()
        await client.send(b"\x00" * 2048)
        await client.recv()
        await client.send("slow")
        await client.recv()


async def chat_session(base: str) -> None:
    async with connect(f"{base}/chat/lobby", additional_headers=GLOBEX) as client:
        for index in range(3):
            await client.send(f"chat {index}")
            await client.recv()
        await client.close(4001, "bye")


async def crash_session(base: str) -> None:
    async with connect(f"{base}/echo", additional_headers=ACME) as client:
        await client.send("before the crash")
        await client.recv()
        await client.send("crash")
        await client.wait_closed()


async def reset_session(base: str) -> None:
    # A tenant outside the allow-list: counted as __other__.
    async with connect(f"{base}/echo", additional_headers={"X-Tenant": "initech"}) as client:
        await client.send("about to vanish")
        await client.recv()
        sock = client.transport.get_extra_info("socket")
        # SO_LINGER 0: close() sends a TCP RST, no closing handshake (1006).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.transport.abort()


async def rejected_session(base: str) -> None:
    with contextlib.suppress(InvalidStatus):
        async with connect(f"{base}/missing"):
            pass


async def listener(url: str, tenant: dict[str, str], stop: asyncio.Event) -> None:
    async with connect(url, ping_interval=None, additional_headers=tenant) as client:
        closed = asyncio.ensure_future(client.wait_closed())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        stopped.cancel()


async def traffic(base: str, stop: asyncio.Event) -> None:
    sessions = (echo_session, chat_session, crash_session, reset_session, rejected_session)
    while not stop.is_set():
        results = await asyncio.gather(
            *(session(base) for session in sessions), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(
                result, ConnectionClosed | OSError
            ):
                raise result
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


def _alerters(alertmanager: str | None) -> list[Any]:
    if not alertmanager:
        return []
    try:
        from ws_monitoring.alerting.alertmanager import PrometheusAlerter
    except ImportError:
        return []
    return [PrometheusAlerter(alertmanager, service="ws-demo-app", resend_interval=2.0)]


def _tracing(endpoint: str | None) -> bool:
    if not endpoint:
        return False
    try:
        from ws_monitoring.tracing.setup import setup_tracing

        setup_tracing(
            "ws-demo",
            endpoint=endpoint,
            sample_ratio=1.0,
            timeout=0.5,
            schedule_delay=0.2,
        )
    except ImportError:
        return False
    return True


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def wait_for_eof() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_eof, daemon=True).start()
    tracing = _tracing(args.otlp_endpoint)
    alerters = _alerters(args.alertmanager)
    with ws_monitoring.start_metrics_server(0, "127.0.0.1") as metrics:
        async with ws_monitoring.serve(
            handler,
            "127.0.0.1",
            0,
            routes=ROUTES,
            tenant=tenant_of,
            tenants=TENANTS,
            ping_interval=0.3,
            process_request=process_request,
            tracing=tracing,
            alerters=alerters,
        ) as server:
            port = server.sockets[0].getsockname()[1]
            base = f"ws://127.0.0.1:{port}"
            print(
                json.dumps(
                    {
                        "ws_port": port,
                        "metrics_port": metrics.port,
                        "tracing": tracing,
                        "alerting": bool(alerters),
                    }
                ),
                flush=True,
            )
            listeners = [
                asyncio.create_task(listener(f"{base}/echo", ACME, stop)),
                asyncio.create_task(listener(f"{base}/chat/lobby", GLOBEX, stop)),
            ]
            await traffic(base, stop)
            await asyncio.gather(*listeners, return_exceptions=True)
    for alerter in alerters:
        alerter.close(1.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--alertmanager", default=None)
    parser.add_argument("--otlp-endpoint", default=None)
    asyncio.run(main(parser.parse_args()))
