"""A real Prometheus (Debian's ``prometheus``, 2.42) for the tests.

``running_prometheus(tmp_path, config_yaml)`` writes the configuration (and any extra
files, such as rule files, next to it: relative paths in the configuration resolve
there), starts Prometheus on a free loopback port with its own TSDB directory, waits
until ``GET /-/ready`` answers, and stops it when the block ends. The yielded
:class:`Prometheus` queries it through the HTTP API.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.helpers.process import HOST, ManagedProcess, instance_directory
from tests.helpers.system import require_binary


class PrometheusError(RuntimeError):
    """Prometheus did not start, or its API answered an error; holds the details."""


class Prometheus(ManagedProcess):
    """One Prometheus process: ``url``, ``query()``, ``query_range()``, ``rules()``..."""

    name = "prometheus"
    error = PrometheusError
    # Relative paths in the configuration (rule files, file_sd lists) resolve there.
    run_in_directory = True
    log_lines = 40

    def __init__(self, binary: str, directory: Path, port: int, args: Sequence[str]) -> None:
        super().__init__(binary, directory, port)
        self.args = list(args)

    def command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address={HOST}:{self.port}",
            f"--web.external-url={self.url}",
            "--log.level=info",
            *self.args,
        ]

    # -- API ----------------------------------------------------------------------------

    def api(self, path: str, params: Sequence[tuple[str, str]] | Mapping[str, str] = ()) -> Any:
        """``GET /api/v1/<path>``: the ``data`` of a successful answer.

        Raises:
            PrometheusError: the answer is not ``{"status": "success"}`` (a PromQL
                parse error is a 400 ``bad_data``); the message holds Prometheus' error.
        """
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read())
            except ValueError:
                raise PrometheusError(f"GET {url}: HTTP {exc.code}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, time_: float | None = None) -> list[dict[str, Any]]:
        """Instant query: the result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        params = {"query": expr}
        if time_ is not None:
            params["time"] = f"{time_:.3f}"
        data = self.api("query", params)
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(
        self, expr: str, start: float, end: float, step: float = 1.0
    ) -> list[dict[str, Any]]:
        """Range query: the result matrix (``[{"metric": {...}, "values": [[t, "v"]...]}]``)."""
        data = self.api(
            "query_range",
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"},
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        """Values of ``label`` (on series matching the selector ``match``, if given)."""
        params = [("match[]", match)] if match else []
        values: list[str] = self.api(f"label/{urllib.parse.quote(label)}/values", params)
        return values

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule (recording and alerting), flattened over the groups."""
        groups = self.api("rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing) as ``/api/v1/alerts`` lists them."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets (``health``, ``lastError``, ``labels``, ``scrapeUrl``...)."""
        targets: list[dict[str, Any]] = self.api("targets", {"state": "active"})["activeTargets"]
        return targets

    def wait_for(
        self, predicate: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition"
    ) -> Any:
        """Poll ``predicate()`` until it returns something truthy; returns that value.

        Raises:
            AssertionError: still falsy after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = predicate()
            except PrometheusError as exc:
                last = exc
            else:
                if last:
                    return last
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus {self.url}: {what} not met; last: {last!r}")
            time.sleep(0.1)


@contextlib.contextmanager
def running_prometheus(
    tmp_path: Path,
    config_yaml: str,
    *,
    files: Mapping[str, str] | None = None,
    port: int | None = None,
    args: Sequence[str] = (),
) -> Iterator[Prometheus]:
    """A real Prometheus on ``127.0.0.1`` (a free port unless ``port``), stopped on exit.

    ``files`` maps paths relative to the configuration's directory to their content
    (rule files, file_sd target lists). ``args`` are extra command-line flags (for
    example ``--enable-feature=exemplar-storage``). Skips the test when the binary is
    missing (fails under ``CI=true``).
    """
    binary = require_binary("prometheus", "prometheus")
    chosen, directory = instance_directory(tmp_path, "prometheus", port)
    for name, content in (files or {}).items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    server = Prometheus(binary, directory, chosen, args)
    server.config_path.write_text(config_yaml)
    with server:
        yield server
