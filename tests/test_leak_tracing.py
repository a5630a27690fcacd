"""The leak scenario, extended to exported spans.

Raw client IPs, user ids, secrets and payloads go in (see ``tests/helpers/leak.py``);
the spans a real OTLP receiver gets must hold none of them without consent, and must
hold the consented raw values where the privacy-safe client view puts them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.util._once import Once
from prometheus_client import CollectorRegistry

from tests.helpers.leak import MARKERS, assert_no_markers, run_leak_scenario
from tests.helpers.otlp import OtlpHttpReceiver, ReceivedSpan
from ws_monitoring.tracing.setup import setup_tracing

ALL = ("ip", "user", "payload")


def _reset_globals() -> None:
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


async def exported_spans(
    tmp_path: Path, consent: tuple[str, ...], consent_via: str
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
            options={"registry": CollectorRegistry(), "trace_sent_messages": True},
        )
        assert await asyncio.to_thread(handle.force_flush, 5.0)
        return receiver.spans
    finally:
        handle.shutdown(2.0)
        receiver.close()
        _reset_globals()


@pytest.mark.parametrize("consent_via", ["grant", "resolver"])
@pytest.mark.parametrize("consent", [(), ("ip",), ("user",), ("payload",), ALL])
async def test_spans_leak_nothing_without_consent(
    tmp_path: Path, consent: tuple[str, ...], consent_via: str
) -> None:
    spans = await exported_spans(tmp_path, consent, consent_via)
    assert_no_markers("\n".join(s.text() for s in spans), MARKERS.forbidden(consent), "spans")

    names = sorted(s.name for s in spans)
    # Two connections and a rejected handshake; the first client's three messages
    # (one crashed) and two echoes, the second client's message and echo.
    assert names.count("process /chat") == 4
    assert names.count("send /chat") == 3
    assert names.count("close /chat") == 2
    assert len([s for s in spans if s.kind == "SERVER"]) == 3

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

    [crashed] = [s for s in messages if s.status == "ERROR"]
    [(_, _, exception)] = crashed.events
    assert exception["exception.type"] == "RuntimeError"
    if "payload" in consent:
        # Scrubbed even with consent: the IP anonymized, the query string dropped.
        assert exception["exception.message"] == "cannot serve 203.0.113.0 on /chat"
    else:
        assert "exception.message" not in exception
