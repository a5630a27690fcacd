"""A metrics-only install (websockets + prometheus_client) works and loads no extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, urllib.request

    class Block:
        # Simulates an environment where the optional extras are not installed.
        blocked = ("opentelemetry", "pythonjsonlogger", "sentry_sdk", "httpx", "grpc")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, Block())

    import ws_monitoring
    from websockets.asyncio.client import connect

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async def main():
        with ws_monitoring.start_metrics_server(0, "127.0.0.1") as metrics:
            async with ws_monitoring.serve(echo, "127.0.0.1", 0) as server:
                port = server.sockets[0].getsockname()[1]
                async with connect(f"ws://127.0.0.1:{port}/x") as client:
                    await client.send("hi")
                    assert await client.recv() == "hi"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(metrics.url).read())
        text = body.decode()
        line = 'websocket_messages_total{direction="received",route="/x",type="text"} 1.0'
        assert line in text, text
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in Block.blocked)
        assert not loaded, loaded
        try:
            ws_monitoring.setup_tracing
        except ImportError as exc:
            print("tracing:", exc)
        print("ok")

    asyncio.run(main())
    """
)


def test_metrics_only_install_needs_no_extra() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok"), result.stdout
