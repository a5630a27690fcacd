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
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.helpers.process import HOST, ManagedProcess, instance_directory
from tests.helpers.system import require_binary

#: Accept every alert and notify nobody: the tests read alerts back through the API.
DEFAULT_CONFIG = """\
route:
  receiver: "null"
receivers:
  - name: "null"
"""


class AlertmanagerError(RuntimeError):
    """Alertmanager did not start; the message holds the end of its log."""


class Alertmanager(ManagedProcess):
    """One Alertmanager process: ``url``, ``alerts()``, ``stop()``, ``start()``."""

    name = "alertmanager"
    error = AlertmanagerError

    def __init__(self, binary: str, directory: Path, config_yaml: str, port: int) -> None:
        super().__init__(binary, directory, port)
        self.config_path.write_text(config_yaml)

    def command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.path={self.directory / 'data'}",
            f"--web.listen-address={HOST}:{self.port}",
            # Empty: no HA gossip, so parallel test instances never find each other.
            "--cluster.listen-address=",
            "--log.level=info",
        ]

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
    chosen, directory = instance_directory(tmp_path, "alertmanager", port)
    with Alertmanager(binary, directory, config_yaml or DEFAULT_CONFIG, chosen) as manager:
        yield manager
