"""Exposition: metric families to Prometheus text and OpenMetrics bytes.

prometheus_client's encoders cost tens of milliseconds for thousands of series; the
sink's own families are written here directly (:class:`_Writer`), byte-identical to
prometheus_client's output, while any other collector's families still go through
prometheus_client (:func:`encode`). A collector learns that it may prerender through
:func:`direct_exposition_format` and answers with one :class:`Prerendered` chunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from itertools import accumulate
from operator import add
from typing import Any, Literal, NamedTuple

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import ALLOWUTF8, UNDERSCORES
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

__all__ = ["Prerendered", "direct_exposition_format", "encode"]


ExpositionFormat = Literal["text", "openmetrics"]

#: The format of the scrape this thread is encoding, when collectors may prerender it.
_DIRECT_FORMAT: ContextVar[ExpositionFormat | None] = ContextVar(
    "ws_monitoring_direct_exposition_format", default=None
)


def direct_exposition_format() -> ExpositionFormat | None:
    """The format a collector may write itself, or None: yield ordinary families.

    Not None only inside a collector's ``collect()`` called by this server's scrape:
    ``"text"`` for the Prometheus text format, ``"openmetrics"`` for OpenMetrics 1.0.0.
    The collector may then yield one :class:`Prerendered` holding exactly what
    prometheus_client would write for its families in that format (OpenMetrics without
    the final ``# EOF``). It is only asked for escaping schemes that leave valid legacy
    metric and label names unchanged (``underscores``, ``allow-utf-8``); its names must
    be such names.
    """
    return _DIRECT_FORMAT.get()


class Prerendered(Metric):
    """Families a collector already wrote as exposition text.

    See :func:`direct_exposition_format`; only this server's scrapes understand it.
    """

    def __init__(self, text: str) -> None:
        super().__init__("ws_monitoring_prerendered", "Prerendered exposition text.", "unknown")
        self.text = text


class _Spec(NamedTuple):
    """What a metric family is, whatever its namespace."""

    #: Name after ``{namespace}_`` (counters without ``_total``).
    suffix: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...]


_Exemplars = dict[int, tuple[str, float, float]]
#: One series of a counter or gauge: label values (in the spec's order) and value.
_Value = tuple[tuple[str, ...], float]
#: One series of a histogram: label values, per-bucket counts (+Inf last, not
#: cumulative), sum, and exemplars by bucket index.
_HistogramValue = tuple[tuple[str, ...], Sequence[int], float, _Exemplars | None]


class _Family:
    """One family's series at one instant (``values`` or, for histograms, ``histograms``)."""

    __slots__ = ("histograms", "le", "name", "spec", "values")

    def __init__(self, spec: _Spec, name: str, le: tuple[str, ...]) -> None:
        self.spec = spec
        self.name = name
        #: Histograms: every bucket's ``le`` label value, ``"+Inf"`` last.
        self.le = le
        self.values: list[_Value] = []
        self.histograms: list[_HistogramValue] = []


def _escape(value: str) -> str:
    """A label value (or OpenMetrics HELP text) as both text formats quote it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _value_line(value: float) -> str:
    """``floatToGoString(value)`` ending a sample line: how both formats print a value.

    Counts are ints, and an int below 10**6 prints as ``repr(float(value))`` (the
    exponent form starts at 10**6): that common case skips the float conversion, the
    NaN/Inf tests and ``repr``.
    """
    if type(value) is int and 0 <= value < 1_000_000:
        return f"{value}.0\n"
    return f"{floatToGoString(value)}\n"  # type: ignore[no-untyped-call]


def _yield_gil() -> None:
    """Let another thread (the event loop) take the GIL, in the middle of a long scrape.

    A scrape runs in the metrics server's thread; without this, an event loop that
    wants the GIL waits a whole switch interval (5 ms) at a time, twice in a row at
    worst (measured: stalls of 11-12 ms with scrapes of 5 000 connections every 0.2 s,
    9 ms at most with a yield every 8 routes and every family).
    """
    time.sleep(0)


class _Writer:
    """Writes a sink's families in the Prometheus text format or OpenMetrics 1.0.0.

    The output is byte for byte what prometheus_client's ``generate_latest`` (or its
    OpenMetrics twin, without ``# EOF``) writes for :meth:`MetricsSink.families`, for
    names that need no escaping (the namespace is checked by :class:`Config`). Sample
    lines start with a prefix (name and sorted, escaped labels) that depends only on the
    family and the label values: prefixes are kept between scrapes. Their number is the
    number of series, which bounded labels keep bounded (``max_routes``).
    """

    def __init__(self) -> None:
        self._headers: dict[tuple[str, bool], str] = {}
        self._prefixes: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}

    def write(self, families: list[_Family], *, openmetrics: bool) -> str:
        """``families`` as exposition text (OpenMetrics without its final ``# EOF``)."""
        out: list[str] = []
        for family in families:
            _yield_gil()
            out.append(self._header(family, openmetrics))
            if family.spec.kind != "histogram":
                for values, value in family.values:
                    out.append(self._series_prefixes(family, values)[0] + _value_line(value))
                continue
            # prometheus_client leaves out _count and _sum when a bucket bound is negative.
            with_totals = float(family.le[0]) >= 0
            for values, counts, total, exemplars in family.histograms:
                prefixes = self._series_prefixes(family, values)
                lines = list(map(_value_line, accumulate(counts)))
                count_line = lines[-1]
                if exemplars and openmetrics:
                    for index, (trace_id, value, ts) in exemplars.items():
                        lines[index] = (
                            f'{lines[index][:-1]} # {{trace_id="{_escape(trace_id)}"}} '
                            f"{floatToGoString(value)} {ts}\n"  # type: ignore[no-untyped-call]
                        )
                out += map(add, prefixes, lines)  # stops after the bucket prefixes
                if with_totals:
                    out.append(prefixes[-2] + count_line)
                    out.append(prefixes[-1] + _value_line(total))
        return "".join(out)

    def _header(self, family: _Family, openmetrics: bool) -> str:
        key = (family.name, openmetrics)
        header = self._headers.get(key)
        if header is None:
            spec = family.spec
            if openmetrics:
                name, text = family.name, _escape(spec.help)
            else:
                # The text format names a counter family after its samples (``_total``)
                # and escapes no quote in HELP.
                name = family.name + "_total" if spec.kind == "counter" else family.name
                text = spec.help.replace("\\", r"\\").replace("\n", r"\n")
            header = self._headers[key] = f"# HELP {name} {text}\n# TYPE {name} {spec.kind}\n"
        return header

    def _series_prefixes(self, family: _Family, values: tuple[str, ...]) -> tuple[str, ...]:
        """Line prefixes of one series: its sample (or each bucket, then _count, _sum)."""
        key = (family.name, values)
        prefixes = self._prefixes.get(key)
        if prefixes is None:
            spec, name = family.spec, family.name
            labels = list(zip(spec.labels, values, strict=True))
            if spec.kind == "histogram":
                prefixes = (
                    *(_prefix(f"{name}_bucket", [*labels, ("le", le)]) for le in family.le),
                    _prefix(f"{name}_count", labels),
                    _prefix(f"{name}_sum", labels),
                )
            else:
                prefixes = (_prefix(name + "_total" if spec.kind == "counter" else name, labels),)
            self._prefixes[key] = prefixes
        return prefixes


def _prefix(sample: str, labels: list[tuple[str, str]]) -> str:
    """``name{label="value",...} ``: labels sorted by name, as prometheus_client does."""
    if not labels:
        return sample + " "
    return sample + "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels)) + "} "


def _buckets(
    le: Sequence[str],
    counts: Sequence[int],
    exemplars: _Exemplars | None = None,
) -> list[Any]:
    """Cumulative ``(le, count[, exemplar])`` pairs from per-bucket counts."""
    out: list[Any] = []
    for index, (bound, total) in enumerate(zip(le, accumulate(counts), strict=True)):
        if exemplars and index in exemplars:
            trace_id, value, ts = exemplars[index]
            out.append((bound, total, Exemplar({"trace_id": trace_id}, value, ts)))
        else:
            out.append((bound, total))
    return out


def encode(registry: Collector, accept: str) -> tuple[bytes, str]:
    """The exposition of ``registry`` for a request's ``Accept`` header, and its content type.

    prometheus_client negotiates the format; in the formats collectors may prerender
    (:func:`direct_exposition_format`), their :class:`Prerendered` text goes out as is,
    between what prometheus_client writes for the other families, in collection order.
    """
    encoder, content_type = choose_encoder(accept)
    # Only a CollectorRegistry passes collectors' families through untouched; another
    # collector (a RestrictedRegistry, for one) may filter or rewrite their samples.
    fmt = _direct_format(content_type) if isinstance(registry, CollectorRegistry) else None
    if fmt is None:
        return encoder(registry), content_type
    parts: list[bytes] = []
    others: list[Metric] = []

    def format_others() -> None:
        if others:
            text = encoder(_Collected(others))
            # The OpenMetrics encoder ends its output; the scrape ends once, below.
            parts.append(text.removesuffix(b"# EOF\n") if fmt == "openmetrics" else text)
            others.clear()

    token = _DIRECT_FORMAT.set(fmt)
    try:
        for metric in registry.collect():
            if isinstance(metric, Prerendered):
                format_others()
                parts.append(metric.text.encode())
            else:
                others.append(metric)
    finally:
        _DIRECT_FORMAT.reset(token)
    format_others()
    if fmt == "openmetrics":
        parts.append(b"# EOF\n")
    return b"".join(parts), content_type


def _direct_format(content_type: str) -> ExpositionFormat | None:
    """The prerenderable format ``content_type`` (from ``choose_encoder``) names, if any.

    Not for name escapings that rewrite valid names (``dots``, ``values``), nor for
    OpenMetrics versions other than 1.0.0: prometheus_client formats those.
    """
    media, *params = (part.strip() for part in content_type.split(";"))
    options = dict(param.partition("=")[::2] for param in params)
    if options.get("escaping", UNDERSCORES) not in (UNDERSCORES, ALLOWUTF8):
        return None
    if media == "text/plain":
        return "text"
    if media == "application/openmetrics-text" and options.get("version") == "1.0.0":
        return "openmetrics"
    return None


class _Collected:
    """Families already collected, as a collector prometheus_client's encoders can read."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families
