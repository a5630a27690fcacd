"""Every Python block of README.md runs as written, against loopback.

Each block runs in its own process, in an empty directory. A block that serves declares
what it needs in a comment, as a reader would run it:

* ``# client: ws://127.0.0.1:8765/path``: once the server answers there, a client sends
  a message and expects it echoed back; then the block gets SIGINT (Ctrl-C) and must
  end within the shutdown deadline, with no traceback but the ``KeyboardInterrupt``.
* ``metrics: http://...``: a scrape there must have counted that message.
* ``collector: http://...``: a real OTLP/HTTP receiver listens there.
* ``alertmanager: http://...``: a real Alertmanager listens there.

A block without a client must run to completion and exit 0. ``SentryAlerter()`` gets
``SENTRY_DSN`` pointing at a real envelope receiver. The one thing the test changes is
the ports: each fixed port of a block (8765, 8001, 4318, 9093) becomes a free one, so
that the test runs next to a real server on this machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from websockets.sync.client import connect

from tests.helpers.alertmanager import running_alertmanager
from tests.helpers.otlp import OtlpHttpReceiver
from tests.helpers.scrape import scrape
from tests.helpers.sentry_receiver import SentryReceiver
from tests.helpers.system import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_DECLARED = re.compile(r"\b(client|metrics|collector|alertmanager): (\S+)")
_PORTS = re.compile(r"\b(8765|8001|4318|9093)\b")

#: How long a served block may take to start (imports, binding) and to stop.
STARTUP, SHUTDOWN = 30.0, 20.0


class Block(NamedTuple):
    line: int
    code: str

    @property
    def declared(self) -> dict[str, str]:
        return dict(_DECLARED.findall(self.code))


def readme_blocks() -> list[Block]:
    text = README.read_text()
    return [
        Block(text.count("\n", 0, match.start()) + 1, match.group(1))
        for match in _BLOCK.finditer(text)
    ]


def test_the_readme_has_blocks_and_servers_declare_a_client() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 8
    for block in blocks:
        serves = "serve_forever()" in block.code or "create_future()" in block.code
        assert serves == ("client" in block.declared), f"README.md line {block.line}"


@contextlib.contextmanager
def services(declared: dict[str, str], tmp_path: Path, ports: dict[str, int]) -> Iterator[None]:
    """The collector and Alertmanager a block declares, on the ports it gets instead."""
    with contextlib.ExitStack() as stack:
        if "collector" in declared:
            receiver = OtlpHttpReceiver()
            stack.callback(receiver.close)
            ports["4318"] = receiver.port
        if "alertmanager" in declared:
            manager = stack.enter_context(running_alertmanager(tmp_path / "am"))
            ports["9093"] = manager.port
        yield


def wait_for_echo(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + STARTUP
    while True:
        try:
            with connect(url, open_timeout=5) as client:
                client.send("hello from the README test")
                assert client.recv(timeout=10) == "hello from the README test"
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("block", readme_blocks(), ids=lambda b: f"line{b.line}")
def test_readme_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    declared = block.declared
    ports: dict[str, int] = {}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WS_MONITORING_", "OTEL_", "SENTRY_", "PROMETHEUS_MULTIPROC"))
    }
    with contextlib.ExitStack() as stack:
        stack.enter_context(services(declared, tmp_path, ports))
        if "SentryAlerter()" in block.code:
            sentry = SentryReceiver()
            stack.callback(sentry.close)
            env["SENTRY_DSN"] = sentry.dsn

        def port_of(match: re.Match[str]) -> str:
            return str(ports.setdefault(match.group(1), free_port()))

        code = _PORTS.sub(port_of, block.code)
        work = tmp_path / "work"
        work.mkdir()
        process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=work, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        stack.callback(lambda: process.poll() is None and process.kill())
        if "client" not in declared:
            _, err = process.communicate(timeout=STARTUP + SHUTDOWN)
            assert process.returncode == 0, f"README.md line {block.line}:\n{err}"
            return
        wait_for_echo(_PORTS.sub(port_of, declared["client"]), process)
        if "metrics" in declared:
            samples = scrape(_PORTS.sub(port_of, declared["metrics"]))
            assert samples.total("websocket_messages_total", direction="received") >= 1
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=SHUTDOWN)
    # Ctrl-C ends asyncio.run() (cancelling the main task) and serve_forever() with
    # KeyboardInterrupt: no other exception.
    assert set(raised(err)) <= {"KeyboardInterrupt", "asyncio.exceptions.CancelledError"}, err
    assert process.returncode in (0, 1, -signal.SIGINT, 128 + signal.SIGINT), err


def raised(stderr: str) -> list[str]:
    """The exception line of each traceback in ``stderr``."""
    found, inside = [], False
    for line in stderr.splitlines():
        if line.startswith("Traceback (most recent call last):"):
            inside = True
        elif inside and line and not line.startswith(" "):
            found.append(line)
            inside = False
    return found
