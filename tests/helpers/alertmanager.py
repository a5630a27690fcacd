"""A real Alertmanager (Debian's ``prometheus-alertmanager``, 0.25) for the tests.

``running_alertmanager(tmp_path)`` starts one on a free loopback port with clustering
off and its own storage directory, waits until ``GET /-/ready`` answers, and stops it
when the block ends. The yielded :class:`Alertmanager` reads alerts back through the
v2 API, and can be stopped and restarted on the same port (to test senders that must
retry until it is back).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.helpers.system import free_port, require_binary

HOST = "127.0.0.1"

#: Accept every alert and notify nobody: the tests read alerts back through the API.
DEFAULT_CONFIG = """\
route:
  receiver: "null"
receivers:
  - name: "null"
"""

#: Seconds to wait for the process to answer ``/-/ready``.
START_TIMEOUT = 30.0


class AlertmanagerError(RuntimeError):
    """Alertmanager did not start; the message holds the end of its log."""


class Alertmanager:
    """One Alertmanager process: ``url``, ``alerts()``, ``stop()``, ``start()``."""

    def __init__(self, binary: str, directory: Path, config_yaml: str, port: int) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port
        #: Base URL, without a trailing slash (``http://127.0.0.1:PORT``).
        self.url = f"http://{HOST}:{port}"
        self.config_path = directory / "alertmanager.yml"
        self.config_path.write_text(config_yaml)
        self.log_path = directory / "alertmanager.log"
        self._process: subprocess.Popen[bytes] | None = None

    # -- process ------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start (or restart) on the same port and wait until it is ready.

        Raises:
            AlertmanagerError: it exited or was not ready within ``timeout`` seconds.
        """
        if self.running:
            return
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.path={self.directory / 'data'}",
                    f"--web.listen-address={HOST}:{self.port}",
                    # Empty: no HA gossip, so parallel test instances never find each other.
                    "--cluster.listen-address=",
                    "--log.level=info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                raise AlertmanagerError(f"alertmanager exited early:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.05)
        self.stop()
        raise AlertmanagerError(f"alertmanager not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 10 s). Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(10)
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

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # -- API ----------------------------------------------------------------------------

    def alerts(self, active: bool | None = None, **filters: str) -> list[dict[str, Any]]:
        """``GET /api/v2/alerts``: the alerts it holds, as decoded JSON objects.

        ``active`` maps to the API's ``active`` filter; resolved alerts (``endsAt`` in
        the past) are never listed by Alertmanager. ``filters`` become ``filter``
        matchers (``alertname="X"``).
        """
        query: list[tuple[str, str]] = []
        if active is not None:
            query.append(("active", "true" if active else "false"))
        query.extend(("filter", f'{key}="{value}"') for key, value in filters.items())
        url = f"{self.url}/api/v2/alerts"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=5) as response:
            result: list[dict[str, Any]] = json.loads(response.read())
        return result

    def post(self, alerts: list[dict[str, Any]]) -> int:
        """``POST /api/v2/alerts`` directly; returns the HTTP status."""
        request = urllib.request.Request(
            f"{self.url}/api/v2/alerts",
            data=json.dumps(alerts).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def wait_for_alerts(
        self,
        predicate: Any = bool,
        *,
        timeout: float = 10.0,
        active: bool | None = None,
        **filters: str,
    ) -> list[dict[str, Any]]:
        """Poll :meth:`alerts` until ``predicate(alerts)`` is true; returns those alerts.

        Raises:
            AssertionError: not true within ``timeout`` seconds (shows the last answer).
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                alerts = self.alerts(active, **filters)
            except OSError:
                alerts = []
            if predicate(alerts):
                return alerts
            if time.monotonic() > deadline:
                raise AssertionError(f"alertmanager {self.url}: condition not met; got {alerts}")
            time.sleep(0.05)


@contextlib.contextmanager
def running_alertmanager(
    tmp_path: Path, *, config_yaml: str | None = None, port: int | None = None
) -> Iterator[Alertmanager]:
    """A real Alertmanager on ``127.0.0.1`` (a free port unless ``port``), stopped on exit.

    Skips the test when the binary is missing (fails under ``CI=true``). Each instance
    gets its own directory under ``tmp_path`` for its config, storage and log.
    """
    binary = require_binary("prometheus-alertmanager", "prometheus-alertmanager")
    chosen = port if port is not None else free_port(HOST)
    directory = tmp_path / f"alertmanager-{chosen}"
    directory.mkdir(parents=True, exist_ok=True)
    manager = Alertmanager(binary, directory, config_yaml or DEFAULT_CONFIG, chosen)
    try:
        manager.start()
        yield manager
    finally:
        manager.stop()
