"""The headline privacy test: no raw client data in any output without consent.

A real server behind a trusted proxy (127.0.0.1) receives forwarded documentation-range
IPs, user ids, tokens in headers and query strings, and payload markers; every log
format and the consent journal are captured and searched (tests/helpers/leak.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.helpers.leak import MARKERS, POLICY_VERSION, assert_no_markers, run_leak_scenario
from tests.helpers.scrape import scrape
from ws_monitoring import start_metrics_server
from ws_monitoring.privacy import truncate_ip

FORMATS = ["json", "ecs", "text"]
ALL = ("ip", "user", "payload")


def _field(line: dict[str, object], dotted: str) -> object:
    node: object = line
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@pytest.mark.parametrize("fmt", FORMATS)
async def test_no_consent_no_raw_marker_anywhere(tmp_path: Path, fmt: str) -> None:
    run = await run_leak_scenario(tmp_path, fmt=fmt)
    assert_no_markers(run.all_text(), MARKERS.forbidden(()), where=f"{fmt} logs")
    log = run.texts["log"]
    # The scenario really ran: both connections, the crash and the rejection were logged.
    assert log.count("connection closed") == 2
    assert "handler crashed" in log
    assert "handshake rejected" in log
    # Anonymized forms are there instead of the raw ones.
    assert truncate_ip(MARKERS.ipv4) in log
    assert truncate_ip(MARKERS.ipv6) in log
    assert run.journal == []


async def test_no_consent_json_fields_are_anonymized(tmp_path: Path) -> None:
    run = await run_leak_scenario(tmp_path, fmt="json")
    closed = [line for line in run.lines if line.get("event") == "connection_closed"]
    assert [line["client_ip"] for line in closed] == ["203.0.113.0", "2001:db8:5ee::"]
    users = {line["user_id"] for line in closed}
    assert len(users) == 1
    (user,) = users
    assert len(user) == 32
    assert user != MARKERS.user
    assert all("payload" not in line and "payload_base64" not in line for line in run.lines)
    crashed = next(line for line in run.lines if line.get("event") == "handler_crashed")
    assert crashed["error_message"] == "cannot serve 203.0.113.0 on /chat"
    assert crashed["error_type"] == "RuntimeError"
    assert "Traceback" in crashed["stack_trace"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("consent", [("ip",), ("user",), ("payload",), ALL])
async def test_consent_reveals_exactly_the_consented_fields(
    tmp_path: Path, fmt: str, consent: tuple[str, ...]
) -> None:
    run = await run_leak_scenario(tmp_path, fmt=fmt, consent=consent)
    assert_no_markers(run.all_text(), MARKERS.forbidden(consent), where=f"{fmt} logs")
    for marker in MARKERS.expected(consent):
        assert marker in run.texts["log"], f"consented {marker!r} missing from {fmt} logs"
    assert_no_markers(run.texts["journal"], MARKERS.forbidden(()), where="consent journal")


@pytest.mark.parametrize(("fmt", "ip_field", "user_field"), [
    ("json", "client_ip", "user_id"),
    ("ecs", "client.ip", "user.id"),
])  # fmt: skip
async def test_consent_puts_raw_values_in_their_fields(
    tmp_path: Path, fmt: str, ip_field: str, user_field: str
) -> None:
    run = await run_leak_scenario(tmp_path, fmt=fmt, consent=ALL)
    closed = [line for line in run.lines if line["message"] == "connection closed"]
    assert [_field(line, ip_field) for line in closed] == [
        MARKERS.ipv4,
        str(ipaddress.IPv6Address(MARKERS.ipv6)),
    ]
    assert {_field(line, user_field) for line in closed} == {MARKERS.user}
    payloads = [line for line in run.lines if line["message"] == "message received"]
    texts = [_field(line, "payload" if fmt == "json" else "websocket.payload") for line in payloads]
    assert texts.count(MARKERS.text_payload) == 2


async def test_consent_from_resolver_applies_from_the_first_line(tmp_path: Path) -> None:
    run = await run_leak_scenario(tmp_path, fmt="json", consent=("ip",), consent_via="resolver")
    opened = [line for line in run.lines if line.get("event") == "connection_opened"]
    assert [line["client_ip"] for line in opened] == [
        MARKERS.ipv4,
        str(ipaddress.IPv6Address(MARKERS.ipv6)),
    ]
    assert_no_markers(run.all_text(), MARKERS.forbidden(("ip",)))
    # A resolver decides at the handshake: nothing to journal.
    assert run.journal == []


async def test_grant_is_journaled_without_raw_identifiers(tmp_path: Path) -> None:
    run = await run_leak_scenario(tmp_path, fmt="json", consent=ALL)
    assert [(e["action"], e["scope"], e["purposes"], e["policy_version"]) for e in run.journal] == [
        ("grant", "connection", sorted(ALL), POLICY_VERSION),
    ] * 2
    subjects = {entry["subject"] for entry in run.journal}
    # Both connections carry the same user: one pseudonymous subject.
    assert len(subjects) == 1
    assert next(iter(subjects)).startswith("user:")
    assert_no_markers(run.texts["journal"], MARKERS.forbidden(()), where="consent journal")


async def test_metrics_carry_no_client_identifier(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    with start_metrics_server(0, "127.0.0.1", registry=registry) as metrics:
        await run_leak_scenario(
            tmp_path, fmt=None, consent=ALL, options={"metrics": True, "registry": registry}
        )
        samples = await asyncio.to_thread(scrape, metrics.url)
    body = samples.text
    assert samples.total("websocket_connections_total") == 2
    markers = [*MARKERS.forbidden(()), truncate_ip(MARKERS.ipv4), truncate_ip(MARKERS.ipv6)]
    assert_no_markers(body, markers, where="metrics")
