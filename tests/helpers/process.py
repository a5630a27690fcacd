"""Loopback peers for the tests: a real server binary run as a process, a peer that hangs.

:class:`ManagedProcess` is what ``running_prometheus`` and ``running_alertmanager`` share:
one process of a real binary (Prometheus, Alertmanager) listening on ``127.0.0.1:port``,
with its configuration, data and log in a directory of its own. ``start()`` appends the
process' output to the log and waits until ``GET /-/ready`` answers 200; ``stop()``
terminates it; both are idempotent, and a stopped process starts again on the same port.
A subclass names itself and gives its command line (:meth:`ManagedProcess.command`).

:class:`HangingPeer` (:func:`hanging_peer`) is a TCP server that accepts connections and
never answers: the peer a sender must not wait for.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from tests.helpers.system import free_port

HOST = "127.0.0.1"

#: Seconds to wait for a process to answer ``/-/ready``.
START_TIMEOUT = 30.0

#: Seconds ``stop()`` waits after SIGTERM before it sends SIGKILL.
STOP_TIMEOUT = 10.0


def instance_directory(tmp_path: Path, name: str, port: int | None) -> tuple[int, Path]:
    """``(port, directory)`` for one instance: ``port`` or a free one, and
    ``tmp_path/<name>-<port>`` (created), so instances under one ``tmp_path`` never share."""
    chosen = port if port is not None else free_port(HOST)
    directory = tmp_path / f"{name}-{chosen}"
    directory.mkdir(parents=True, exist_ok=True)
    return chosen, directory


class ManagedProcess:
    """One process of ``binary`` on ``127.0.0.1:port``; a context manager that starts it
    on entry and stops it on exit.

    Subclasses set :attr:`name` (used for the configuration and log file names and in
    errors), :attr:`error` (raised when it does not start) and :meth:`command`.
    """

    #: ``<name>.yml`` is the configuration and ``<name>.log`` the log, in ``directory``.
    name: ClassVar[str] = "process"
    #: Raised by :meth:`start`; the message holds the end of the log.
    error: ClassVar[type[RuntimeError]] = RuntimeError
    #: Whether the process runs in ``directory`` (relative paths in its config resolve there).
    run_in_directory: ClassVar[bool] = False
    #: Lines of log :meth:`log_tail` shows by default.
    log_lines: ClassVar[int] = 30

    def __init__(self, binary: str, directory: Path, port: int) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port
        #: Base URL, without a trailing slash (``http://127.0.0.1:PORT``).
        self.url = f"http://{HOST}:{port}"
        self.config_path = directory / f"{self.name}.yml"
        self.log_path = directory / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command line (binary first) that serves on ``self.port``."""
        raise NotImplementedError

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start (or restart) on the same port and wait until it is ready; a no-op when
        it is running.

        Raises:
            error: it exited (a bad configuration) or was not ready within ``timeout``
                seconds (it is stopped then).
        """
        if self.running:
            return
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory if self.run_in_directory else None,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                raise self.error(f"{self.name} exited early:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.05)
        self.stop()
        raise self.error(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after ``STOP_TIMEOUT`` s). Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def ready(self) -> bool:
        """Whether ``GET /-/ready`` answers 200 right now."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def log_tail(self, lines: int | None = None) -> str:
        """The last ``lines`` (default :attr:`log_lines`) lines of the process' log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        count = self.log_lines if lines is None else lines
        return "\n".join(text.splitlines()[-count:])

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class HangingPeer:
    """A TCP server on ``127.0.0.1`` that accepts connections and never reads nor answers.

    ``port``, ``url`` (``http://127.0.0.1:PORT``) and ``accepted`` (the connections so
    far); ``close()`` closes them all (:func:`hanging_peer` does on exit).
    """

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # close() makes accept() fail: that ends the thread.
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@contextlib.contextmanager
def hanging_peer() -> Iterator[HangingPeer]:
    """A :class:`HangingPeer` for the length of the block."""
    peer = HangingPeer()
    try:
        yield peer
    finally:
        peer.close()
