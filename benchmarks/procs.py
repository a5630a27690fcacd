"""Child processes of a benchmark run: servers, the OTLP/Alertmanager receiver, pinning."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Receiver", "ServerProcess", "cpu_plan", "raise_fd_limit"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raise_fd_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_plan() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, load CPUs): one core each when at least two are usable, else no pinning."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return None, None
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


def _pin(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread of ``pid``: threads inherit the mask of the thread creating them."""
    if cpus is None:
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # pragma: no cover - no procfs
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(tid, cpus)


class _Child:
    """A Python child process speaking JSON lines on stdin/stdout."""

    def __init__(
        self,
        args: list[str],
        cpus: set[int] | None,
        name: str,
        extra_env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        env = {**os.environ, **(extra_env or {})}
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        # Coverage or other interpreter-wide hooks would skew the server's CPU time.
        env.pop("COVERAGE_PROCESS_START", None)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=ROOT,
            env=env,
        )
        self.cpus = cpus
        self.stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.info: dict[str, Any] = {}

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            # Bounded: a noisy child must not grow the harness without limit.
            if len(self.stderr) < 200:
                self.stderr.append(line.rstrip())

    def read(self, timeout: float = 60.0) -> dict[str, Any]:
        """Next JSON line from the child.

        Raises:
            RuntimeError: the child exited or printed something else (its stderr attached).
            TimeoutError: nothing within ``timeout`` seconds.
        """
        assert self.proc.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        reader.daemon = True
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            raise TimeoutError(f"{self.name}: no answer within {timeout} s")
        line = result[0]
        if not line:
            self.proc.wait(5)
            tail = "\n".join(self.stderr[-20:])
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{tail}")
        try:
            message: dict[str, Any] = json.loads(line)
        except ValueError:
            raise RuntimeError(f"{self.name}: unexpected output {line!r}") from None
        return message

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the ready line, then pin the child: imports ran on every core."""
        self.info = self.read(timeout)
        if not self.info.get("ready"):
            raise RuntimeError(f"{self.name}: not ready: {self.info}")
        _pin(self.proc.pid, self.cpus)
        return self.info

    def command(self, command: str, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


class ServerProcess(_Child):
    """``python -m benchmarks.server VARIANT``, pinned to ``cpus``."""

    def __init__(
        self,
        variant: str,
        cpus: set[int] | None,
        *,
        otlp: str | None,
        alerts: str | None,
        log_file: str,
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix``: a command the server runs under (e.g. valgrind's)."""
        args = ["-m", "benchmarks.server", variant, "--log-file", log_file]
        if otlp:
            args += ["--otlp", otlp]
        if alerts:
            args += ["--alerts", alerts]
        # Here, not at import: variants imports the crash-storm module, which imports this.
        from .variants import SERVERS

        super().__init__(args, cpus, f"server {variant}", SERVERS[variant].env, prefix)
        self.variant = variant

    @property
    def port(self) -> int:
        return int(self.info["port"])

    @property
    def metrics_port(self) -> int | None:
        port = self.info.get("metrics_port")
        return int(port) if port is not None else None


class Receiver(_Child):
    """``python -m benchmarks.receiver``: the local OTLP/HTTP and Alertmanager endpoint."""

    def __init__(self, cpus: set[int] | None) -> None:
        super().__init__(["-m", "benchmarks.receiver"], cpus, "receiver")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.info['port']}"
