"""The leak scenario, extended to exported spans.

Raw client IPs, user ids, secrets, payloads, and identifiers in paths and exception
messages go in (see ``tests/helpers/leak.py``); the spans a real OTLP receiver gets must
hold none of them without consent, must hold the consented raw values where the
privacy-safe client view puts them, and must name routes as the metrics do.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.util._once import Once
from prometheus_client import CollectorRegistry

from tests.helpers.leak import (
    CONNECTIONS,
    MARKERS,
    ROUTES,
    SCRUBBED_CRASH,
    assert_no_markers,
    by_tenant_header,
    run_leak_scenario,
)
from tests.helpers.otlp import OtlpHttpReceiver, ReceivedSpan
from tests.helpers.scrape import scrape
from ws_monitoring import start_metrics_server
from ws_monitoring.tracing.setup import setup_tracing

ALL = ("ip", "user", "payload")


def _reset_globals() -> None:
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


async def exported_spans(
    tmp_path: Path,
    consent: tuple[str, ...] = (),
    consent_via: str = "grant",
    options: Mapping[str, Any] | None = None,
) -> list[ReceivedSpan]:
    _reset_globals()
    receiver = OtlpHttpReceiver()
    handle = setup_tracing(endpoint=receiver.url, sample_ratio=1.0, schedule_delay=0.02)
    try:
        await run_leak_scenario(
            tmp_path,
            consent=consent,
            consent_via=consent_via,
            fmt=None,
            options={
                "registry": CollectorRegistry(),
                "trace_sent_messages": True,
                **(options or {}),
            },
        )
        assert await asyncio.to_thread(handle.force_flush, 5.0)
        return receiver.spans
    finally:
        handle.shutdown(2.0)
        receiver.close()
        _reset_globals()


def crash_event(spans: list[ReceivedSpan]) -> dict[str, Any]:
    [crashed] = [s for s in spans if s.name == "process /chat" and s.status == "ERROR"]
    [(_, _, exception)] = crashed.events
    assert exception["exception.type"] == "RuntimeError"
    assert exception["exception.stacktrace"].startswith("Traceback (most recent call last):")
    return exception


@pytest.mark.parametrize("consent_via", ["grant", "resolver"])
@pytest.mark.parametrize("consent", [(), ("ip",), ("user",), ("payload",), ALL])
async def test_spans_leak_nothing_without_consent(
    tmp_path: Path, consent: tuple[str, ...], consent_via: str
) -> None:
    spans = await exported_spans(tmp_path, consent, consent_via)
    assert_no_markers("\n".join(s.text() for s in spans), MARKERS.forbidden(consent), "spans")

    names = sorted(s.name for s in spans)
    # The two /chat connections and a rejected handshake; the first client's three
    # messages (one crashed) and two echoes, the second client's message and echo.
    assert names.count("process /chat") == 4
    assert names.count("send /chat") == 3
    assert names.count("close /chat") == 2
    # One connection per identifier path: one message and its echo each.
    for route in ROUTES - {"/chat"}:
        assert names.count(f"process {route}") == 1
        assert names.count(f"close {route}") == 1
    assert len([s for s in spans if s.kind == "SERVER"]) == CONNECTIONS + 1

    messages = [s for s in spans if s.name == "process /chat"]
    addresses = {s.attributes["client.address"] for s in messages}
    users = {s.attributes["user.id"] for s in messages}
    v6 = str(ipaddress.IPv6Address(MARKERS.ipv6))
    if "ip" in consent:
        assert addresses == {MARKERS.ipv4, v6}
    else:
        assert addresses == {"203.0.113.0", "2001:db8:5ee::"}
    if "user" in consent:
        assert users == {MARKERS.user}
    else:
        [pseudonym] = users
        assert re.fullmatch(r"[0-9a-f]{32}", pseudonym)

    # One rule for exception messages, consent or not: scrubbed, identifiers masked.
    assert crash_event(spans)["exception.message"] == SCRUBBED_CRASH


async def test_spans_name_routes_as_the_metrics_do(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    with start_metrics_server(0, "127.0.0.1", registry=registry) as metrics:
        spans = await exported_spans(tmp_path, options={"metrics": True, "registry": registry})
        samples = await asyncio.to_thread(scrape, metrics.url)
    labels = {s["route"] for s in samples.series("websocket_connections_total")}
    assert labels == ROUTES
    accepted = [s for s in spans if s.kind == "SERVER" and s.status != "ERROR"]
    assert {s.attributes["http.route"] for s in accepted} == labels
    assert {s.name for s in accepted} == {f"GET {route}" for route in labels}
    process = {s.name.removeprefix("process ") for s in spans if s.name.startswith("process ")}
    assert process == labels
    assert {
        s.attributes["messaging.destination.name"] for s in spans if s.kind == "CONSUMER"
    } == labels
    # url.path goes through the scrubber: the path's words, identifiers as {id}.
    assert {s.attributes["url.path"] for s in accepted} == labels
    rejected = [s for s in spans if s.kind == "SERVER" and s.status == "ERROR"]
    assert [s.attributes["url.path"] for s in rejected] == ["/private"]


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("drop", None),
        (
            "keep",
            MARKERS.crash_message(
                MARKERS.ipv4, f"/chat?token={MARKERS.query_token}&user={MARKERS.user}"
            ),
        ),
    ],
)
async def test_exception_messages_option_in_spans(
    tmp_path: Path, mode: str, message: str | None
) -> None:
    spans = await exported_spans(tmp_path, options={"exception_messages": mode})
    exception = crash_event(spans)
    assert exception.get("exception.message") == message
    if mode == "drop":
        assert_no_markers("\n".join(s.text() for s in spans), MARKERS.forbidden(()), "spans")
        assert "cannot serve" not in "\n".join(s.text() for s in spans)


async def test_tenant_in_spans_is_the_bounded_label(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    options = {"metrics": True, "registry": registry, "tenant": by_tenant_header}
    with start_metrics_server(0, "127.0.0.1", registry=registry) as metrics:
        spans = await exported_spans(tmp_path, options=options)
        samples = await asyncio.to_thread(scrape, metrics.url)
    labels = {s["tenant"] for s in samples.series("websocket_connections_total")}
    tenants = {s.attributes.get("websocket.tenant") for s in spans if s.kind != "SERVER"}
    assert tenants == labels
    assert len(labels) == 1
    assert next(iter(labels)).startswith("user:")
    assert_no_markers("\n".join(s.text() for s in spans), MARKERS.forbidden(()), "spans")
