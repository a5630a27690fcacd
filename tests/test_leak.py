"""The headline privacy test: no raw client data in any output without consent.

A real server behind a trusted proxy (127.0.0.1) receives forwarded documentation-range
IPs, user ids, tokens in headers and query strings, payload markers, and paths and an
exception message carrying emails, JWTs, UUIDs, long numbers and random tokens; every
log format, the consent journal and the metrics are captured and searched
(tests/helpers/leak.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.helpers.leak import (
    CONNECTIONS,
    MARKERS,
    POLICY_VERSION,
    ROUTES,
    SCRUBBED_CRASH,
    assert_no_markers,
    by_tenant_header,
    run_leak_scenario,
)
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


def _chat(lines: list[dict[str, Any]], message: str, route: str = "route") -> list[dict[str, Any]]:
    """The ``message`` lines of the two /chat connections (the forwarded clients)."""
    return [line for line in lines if line["message"] == message and _field(line, route) == "/chat"]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_no_consent_no_raw_marker_anywhere(tmp_path: Path, fmt: str) -> None:
    run = await run_leak_scenario(tmp_path, fmt=fmt)
    assert_no_markers(run.all_text(), MARKERS.forbidden(()), where=f"{fmt} logs")
    log = run.texts["log"]
    # The scenario really ran: every connection, the crash and the rejection were logged.
    assert log.count("connection closed") == CONNECTIONS
    assert "handler crashed" in log
    assert "handshake rejected" in log
    # Anonymized forms are there instead of the raw ones.
    assert truncate_ip(MARKERS.ipv4) in log
    assert truncate_ip(MARKERS.ipv6) in log
    for route in ROUTES:
        assert route in log
    assert run.journal == []


async def test_no_consent_json_fields_are_anonymized(tmp_path: Path) -> None:
    run = await run_leak_scenario(tmp_path, fmt="json")
    closed = _chat(run.lines, "connection closed")
    assert [line["client_ip"] for line in closed] == ["203.0.113.0", "2001:db8:5ee::"]
    users = {line["user_id"] for line in run.lines if line.get("event") == "connection_closed"}
    assert len(users) == 1
    (user,) = users
    assert len(user) == 32
    assert user != MARKERS.user
    assert all("payload" not in line and "payload_base64" not in line for line in run.lines)
    crashed = next(line for line in run.lines if line.get("event") == "handler_crashed")
    assert crashed["error_message"] == SCRUBBED_CRASH
    assert crashed["error_type"] == "RuntimeError"
    assert crashed["stack_trace"].startswith("Traceback (most recent call last):")
    assert crashed["stack_trace"].endswith(f"RuntimeError: {SCRUBBED_CRASH}")


async def test_the_route_is_the_same_in_logs_and_metrics(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    with start_metrics_server(0, "127.0.0.1", registry=registry) as metrics:
        run = await run_leak_scenario(
            tmp_path, fmt="json", options={"metrics": True, "registry": registry}
        )
        samples = await asyncio.to_thread(scrape, metrics.url)
    labels = {s["route"] for s in samples.series("websocket_connections_total")}
    logged = {line["route"] for line in run.lines if line.get("event") == "connection_closed"}
    assert labels == logged == ROUTES


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


@pytest.mark.parametrize(("fmt", "ip_field", "user_field", "route_field"), [
    ("json", "client_ip", "user_id", "route"),
    ("ecs", "client.ip", "user.id", "websocket.route"),
])  # fmt: skip
async def test_consent_puts_raw_values_in_their_fields(
    tmp_path: Path, fmt: str, ip_field: str, user_field: str, route_field: str
) -> None:
    run = await run_leak_scenario(tmp_path, fmt=fmt, consent=ALL)
    closed = _chat(run.lines, "connection closed", route_field)
    assert [_field(line, ip_field) for line in closed] == [
        MARKERS.ipv4,
        str(ipaddress.IPv6Address(MARKERS.ipv6)),
    ]
    assert {_field(line, user_field) for line in closed} == {MARKERS.user}
    payloads = [line for line in run.lines if line["message"] == "message received"]
    texts = [_field(line, "payload" if fmt == "json" else "websocket.payload") for line in payloads]
    assert texts.count(MARKERS.text_payload) == CONNECTIONS
    # No consent reveals an identifier of a path or an exception message.
    assert_no_markers(run.texts["log"], MARKERS.of("identifier"), where=f"{fmt} logs")


async def test_consent_from_resolver_applies_from_the_first_line(tmp_path: Path) -> None:
    run = await run_leak_scenario(tmp_path, fmt="json", consent=("ip",), consent_via="resolver")
    opened = _chat(run.lines, "connection opened")
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
    ] * CONNECTIONS
    subjects = {entry["subject"] for entry in run.journal}
    # Every connection carries the same user: one pseudonymous subject.
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
    assert samples.total("websocket_connections_total") == CONNECTIONS
    assert {s["route"] for s in samples.series("websocket_connections_total")} == ROUTES
    markers = [*MARKERS.forbidden(()), truncate_ip(MARKERS.ipv4), truncate_ip(MARKERS.ipv6)]
    assert_no_markers(body, markers, where="metrics")


# -- exception messages: the one rule, in the logs -------------------------------------------


ERROR_FIELDS = {
    "json": {k: k for k in ("error_type", "error_message", "stack_trace")},
    "ecs": {"error_type": "error.type", "error_message": "error.message",
            "stack_trace": "error.stack_trace"},
}  # fmt: skip


@pytest.mark.parametrize("fmt", ["json", "ecs"])
async def test_drop_leaves_the_exception_type_and_frames_only(tmp_path: Path, fmt: str) -> None:
    run = await run_leak_scenario(tmp_path, fmt=fmt, options={"exception_messages": "drop"})
    [crashed] = [line for line in run.lines if line["message"] == "handler crashed"]
    keys = ERROR_FIELDS[fmt]
    assert _field(crashed, keys["error_type"]) == "RuntimeError"
    assert _field(crashed, keys["error_message"]) is None
    stack = _field(crashed, keys["stack_trace"])
    assert isinstance(stack, str)
    assert stack.startswith("Traceback (most recent call last):")
    assert stack.endswith("\nRuntimeError")
    assert "cannot serve" not in run.texts["log"]
    assert_no_markers(run.all_text(), MARKERS.forbidden(()), where=f"{fmt} logs")


async def test_keep_logs_the_message_as_raised(tmp_path: Path) -> None:
    run = await run_leak_scenario(tmp_path, fmt="json", options={"exception_messages": "keep"})
    [crashed] = [line for line in run.lines if line["message"] == "handler crashed"]
    raw = MARKERS.crash_message(
        MARKERS.ipv4, f"/chat?token={MARKERS.query_token}&user={MARKERS.user}"
    )
    assert crashed["error_message"] == raw
    assert crashed["stack_trace"].endswith(f"RuntimeError: {raw}")
    # Only the message is kept: every other field still follows the defaults.
    closed = _chat(run.lines, "connection closed")
    assert [line["client_ip"] for line in closed] == ["203.0.113.0", "2001:db8:5ee::"]
    others = [line for line in run.lines if line is not crashed]
    assert_no_markers(str(others), MARKERS.forbidden(()), where="other log lines")


# -- tenants ------------------------------------------------------------------------------------


async def test_tenant_is_the_same_bounded_value_in_logs_and_metrics(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    options = {"metrics": True, "registry": registry, "tenant": by_tenant_header}
    with start_metrics_server(0, "127.0.0.1", registry=registry) as metrics:
        run = await run_leak_scenario(tmp_path, fmt="ecs", options=options)
        samples = await asyncio.to_thread(scrape, metrics.url)
    labels = {s["tenant"] for s in samples.series("websocket_connections_total")}
    logged = {
        _field(line, "websocket.tenant")
        for line in run.lines
        if _field(line, "event.action") == "connection_closed"
    }
    # X-Tenant holds "org-<email>": the label is its pseudonym, in logs and metrics alike.
    assert len(labels) == 1
    assert labels == logged
    (tenant,) = labels
    assert isinstance(tenant, str)
    assert tenant.startswith("user:")
    assert_no_markers(run.all_text() + samples.text, MARKERS.forbidden(()), where="logs, metrics")
