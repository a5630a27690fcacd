"""The leak scenario, extended to Sentry envelopes and Alertmanager payloads.

Raw client IPs, user ids, secrets, payloads, and identifiers in paths and exception
messages go in (see ``tests/helpers/leak.py``); what the real sentry-sdk sends to a
real receiver and what the alerter POSTs to a real HTTP peer must hold none of them
without consent. Exception messages follow ``exception_messages`` in Sentry; the
Alertmanager alerts name exception types only, in every mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.alerting.test_alertmanager import RecordingPeer, recording_peer
from tests.helpers.leak import MARKERS, SCRUBBED_CRASH, assert_no_markers, run_leak_scenario
from tests.helpers.sentry_receiver import SentryReceiver, sentry_receiver
from ws_monitoring.alerting import PrometheusAlerter, SentryAlerter

ALL = ("ip", "user", "payload")


@pytest.fixture
def receiver() -> Iterator[SentryReceiver]:
    with sentry_receiver() as running:
        yield running


@pytest.fixture
def peer() -> Iterator[RecordingPeer]:
    with recording_peer() as running:
        yield running


async def run(
    tmp_path: Path,
    receiver: SentryReceiver,
    peer: RecordingPeer,
    consent: tuple[str, ...],
    consent_via: str = "grant",
    options: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], str, str]:
    registry = CollectorRegistry()
    sentry = SentryAlerter(receiver.dsn, registry=registry)
    prom = PrometheusAlerter(peer.url, registry=registry, cooldown=0, backoff=0.02)
    try:
        await run_leak_scenario(
            tmp_path,
            consent=consent,
            consent_via=consent_via,
            fmt=None,
            options={"alerters": [sentry, prom], **(options or {})},
        )
        assert await asyncio.to_thread(prom.flush, 5)
        events = await asyncio.to_thread(receiver.drain, sentry)
    finally:
        prom.close(timeout=1)
    return events, receiver.raw_text(), "\n".join(peer.raw)


@pytest.mark.parametrize("consent_via", ["grant", "resolver"])
async def test_nothing_raw_leaves_without_consent(
    tmp_path: Path, receiver: SentryReceiver, peer: RecordingPeer, consent_via: str
) -> None:
    events, sentry_text, alertmanager_text = await run(tmp_path, receiver, peer, (), consent_via)
    # The scenario's crash was reported to both sinks: the check below is not vacuous.
    (crash,) = events
    assert crash["exception"]["values"][-1]["type"] == "RuntimeError"
    assert crash["exception"]["values"][-1]["value"] == SCRUBBED_CRASH
    assert crash["contexts"]["websocket"]["messages_received"] == 3
    assert [c["data"].get("payload") for c in crash["breadcrumbs"]["values"]
            if c.get("category") == "websocket.message"] == [None] * 5  # fmt: skip
    assert "WebSocketHandlerCrashes" in alertmanager_text
    assert_no_markers(sentry_text, MARKERS.forbidden(()), "Sentry envelopes")
    assert_no_markers(alertmanager_text, MARKERS.forbidden(()), "Alertmanager payloads")


@pytest.mark.parametrize("consent_via", ["grant", "resolver"])
async def test_consent_lets_exactly_what_was_consented_through(
    tmp_path: Path, receiver: SentryReceiver, peer: RecordingPeer, consent_via: str
) -> None:
    events, sentry_text, alertmanager_text = await run(tmp_path, receiver, peer, ALL, consent_via)
    (crash,) = events
    # Consented: the raw user id and the payloads (breadcrumbs) may go to Sentry.
    assert crash["user"]["id"] == MARKERS.user
    payloads = [
        c["data"].get("payload")
        for c in crash["breadcrumbs"]["values"]
        if c.get("category") == "websocket.message"
    ]
    assert payloads == [
        MARKERS.text_payload, None, MARKERS.binary_payload.hex(), None, "crash",
    ]  # fmt: skip
    # Secrets never have a consent.
    assert_no_markers(sentry_text, MARKERS.forbidden(ALL), "Sentry envelopes")
    assert_no_markers(alertmanager_text, MARKERS.forbidden(()), "Alertmanager payloads")


RAW_CRASH = MARKERS.crash_message(
    MARKERS.ipv4, f"/chat?token={MARKERS.query_token}&user={MARKERS.user}"
)


@pytest.mark.parametrize(
    ("mode", "value"), [("scrub", SCRUBBED_CRASH), ("keep", RAW_CRASH), ("drop", "")]
)
async def test_exception_messages_rule_in_sentry_and_alertmanager(
    tmp_path: Path, receiver: SentryReceiver, peer: RecordingPeer, mode: str, value: str
) -> None:
    events, sentry_text, alertmanager_text = await run(
        tmp_path, receiver, peer, (), options={"exception_messages": mode}
    )
    (crash,) = events
    assert crash["exception"]["values"][-1]["type"] == "RuntimeError"
    assert crash["exception"]["values"][-1]["value"] == value
    if mode != "keep":
        assert_no_markers(sentry_text, MARKERS.forbidden(()), "Sentry envelopes")
    # Alertmanager alerts aggregate crashes: exception types and routes, never a message.
    assert "WebSocketHandlerCrashes" in alertmanager_text
    assert "RuntimeError" in alertmanager_text
    assert "cannot serve" not in alertmanager_text
    assert_no_markers(alertmanager_text, MARKERS.forbidden(()), "Alertmanager payloads")
