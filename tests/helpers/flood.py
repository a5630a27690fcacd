"""Many short WebSocket connections, each on its own path, from a separate process.

``python -m tests.helpers.flood PORT COUNT [CONCURRENCY]`` opens COUNT connections to
``/flood/<i>?q=<i>`` with CONCURRENCY at a time; each sends its opening handshake,
then a close frame, then reads until the server closes. Running it in its own
process puts the client work on the other core, so 10 000 connections take seconds.
It prints the number of ``101`` answers and exits non-zero if any connection got another.
"""

from __future__ import annotations

import asyncio
import sys

HOST = "127.0.0.1"
REQUEST = (
    "GET /flood/{i}?q={i} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
)
# A masked close frame, code 1000, mask key 0: the payload goes as is.
CLOSE = b"\x88\x82\x00\x00\x00\x00\x03\xe8"


async def flood(port: int, count: int, concurrency: int) -> int:
    indexes = iter(range(count))
    accepted = 0

    async def one(i: int) -> None:
        nonlocal accepted
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(REQUEST.format(i=i, host=HOST).encode())
        # Not pipelined with the request: websockets would process the close frame
        # before answering the handshake, and then fail to answer it.
        answer = await reader.readuntil(b"\r\n\r\n")
        writer.write(CLOSE)
        await reader.read()
        writer.close()
        if answer.startswith(b"HTTP/1.1 101 "):
            accepted += 1

    async def worker() -> None:
        for i in indexes:
            await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return accepted


def main(argv: list[str]) -> int:
    port, count = int(argv[0]), int(argv[1])
    concurrency = int(argv[2]) if len(argv) > 2 else 8
    accepted = asyncio.run(flood(port, count, concurrency))
    print(accepted, flush=True)
    return 0 if accepted == count else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
