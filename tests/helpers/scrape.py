"""Read metrics the way Prometheus does: an HTTP scrape, parsed by prometheus_client."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def fetch(url: str, *, accept: str | None = None, headers: Mapping[str, str] | None = None,
          timeout: float = 10.0) -> tuple[int, str, str]:  # fmt: skip
    """GET ``url``; returns (status, content type, body). HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return (
                response.status,
                response.headers.get("Content-Type", ""),
                response.read().decode(),
            )
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


class Samples:
    """Samples of one scrape: ``samples["websocket_messages_total", {"route": "/"}]``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, default: float | None = 0.0, **labels: str) -> float | None:
        """The value of the one sample with exactly these labels (``default`` if absent)."""
        return self.values.get((name, frozenset(labels.items())), default)

    def __getitem__(self, key: tuple[str, Mapping[str, str]] | str) -> float:
        name, labels = (key, {}) if isinstance(key, str) else key
        value = self.values.get((name, frozenset(labels.items())))
        if value is None:
            raise KeyError(f"no sample {name}{dict(labels)} in scrape:\n{self.text}")
        return value

    def series(self, name: str) -> list[dict[str, str]]:
        """Label sets of every sample called ``name``."""
        return [dict(labels) for (n, labels) in self.values if n == name]

    def total(self, name: str, **labels: str) -> float:
        """Sum of every sample called ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and want <= ls)


def scrape(url: str, **kwargs: object) -> Samples:
    """Scrape ``url`` (a /metrics endpoint) and parse it; fails on a non-200 answer."""
    status, _, body = fetch(url, **kwargs)  # type: ignore[arg-type]
    assert status == 200, f"scrape of {url} answered {status}: {body}"
    return Samples(body)
