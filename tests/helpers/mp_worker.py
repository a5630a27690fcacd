"""A worker process for the multiprocess test: an instrumented echo server on a shared port.

Run as ``python -m tests.helpers.mp_worker PORT`` with ``PROMETHEUS_MULTIPROC_DIR`` set.
It prints ``ready <pid>`` once listening, prints ``served <n>`` when asked to stop
(SIGTERM), and exits cleanly so that its live-gauge share is removed.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from websockets.asyncio.server import ServerConnection

import ws_monitoring

served = 0


async def echo(ws: ServerConnection) -> None:
    global served
    served += 1
    async for message in ws:
        await ws.send(message)


async def main(port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with ws_monitoring.serve(echo, "127.0.0.1", port, reuse_port=True, health_path=None):
        print(f"ready {__import__('os').getpid()}", flush=True)
        await stop
    print(f"served {served}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
