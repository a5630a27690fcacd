"""The privacy layer: IP anonymizer, pseudonyms, trusted proxies, consent, scrubbers."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.sync.client import connect as sync_connect
from websockets.sync.server import ServerConnection as SyncServerConnection

import ws_monitoring
from tests.helpers.leak import assert_no_markers
from tests.helpers.servers import async_server, sync_server_async
from ws_monitoring.config import Config
from ws_monitoring.consent import grant, grant_user, privacy_of, withdraw, withdraw_user
from ws_monitoring.core import RECORD_ATTR, ConnectionRecord, Monitor
from ws_monitoring.privacy import (
    IDENTIFIER,
    JOURNAL_LOGGER,
    MAX_SCRUB_LENGTH,
    NO_CONSENT,
    PSEUDONYM_KEY_ENV,
    Consent,
    Privacy,
    exception_type,
    is_identifier,
    mask_identifiers,
    truncate_ip,
)

KEY = b"k" * 32
HEX32 = re.compile(r"[0-9a-f]{32}")


def privacy(**options: Any) -> Privacy:
    return Privacy(Config(pseudonym_key=KEY, **options))


def request(path: str = "/", **headers: str | list[str]) -> Request:
    items: list[tuple[str, str]] = []
    for name, value in headers.items():
        for v in value if isinstance(value, list) else [value]:
            items.append((name.replace("_", "-"), v))
    return Request(path, Headers(items))


# -- IP truncation ------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "expected"), [
    ("203.0.113.77", "203.0.113.0"),
    ("2001:db8:5ee:1:2:3:4:77", "2001:db8:5ee::"),
    ("::ffff:203.0.113.9", "203.0.113.0"),
    ("fe80::1:2%eth0", "fe80::"),
    ("0.0.0.0", "0.0.0.0"),
])  # fmt: skip
def test_truncate_ip(address: str, expected: str) -> None:
    assert truncate_ip(address) == expected


def test_truncate_ip_rejects_non_addresses() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6"):
        truncate_ip("203.0.113")


@given(st.ip_addresses(v=4))
def test_ipv4_truncation_keeps_24_bits_only(ip: ipaddress.IPv4Address) -> None:
    out = ipaddress.ip_address(truncate_ip(str(ip)))
    assert isinstance(out, ipaddress.IPv4Address)
    assert int(out) & 0xFF == 0
    assert int(out) >> 8 == int(ip) >> 8


@given(st.ip_addresses(v=6))
def test_ipv6_truncation_keeps_48_bits_only(ip: ipaddress.IPv6Address) -> None:
    out = ipaddress.ip_address(truncate_ip(str(ip)))
    if ip.ipv4_mapped is not None:
        assert out == ipaddress.IPv4Address(int(ip.ipv4_mapped) & ~0xFF)
        return
    assert isinstance(out, ipaddress.IPv6Address)
    assert int(out) & ((1 << 80) - 1) == 0
    assert int(out) >> 80 == int(ip) >> 80


@given(st.ip_addresses())
def test_pseudonymized_ips_never_show_the_address(ip: Any) -> None:
    p = privacy(pseudonymize_ips=True)
    out = p.anonymize_ip(str(ip))
    assert HEX32.fullmatch(out)
    assert out == p.anonymize_ip(ip.exploded)  # every spelling, one pseudonym
    assert str(ip) not in out


@given(st.ip_addresses().map(str))
def test_scrub_text_removes_every_host_address(address: str) -> None:
    ip = ipaddress.ip_address(address)
    ip = getattr(ip, "ipv4_mapped", None) or ip
    if ip.is_loopback or ip.is_unspecified:
        return
    text = privacy().scrub_text(f"peer {address} failed")
    assert text == f"peer {truncate_ip(address)} failed"


# -- pseudonyms and keys --------------------------------------------------------------------


def test_pseudonyms_are_keyed_stable_and_domain_separated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PSEUDONYM_KEY_ENV, raising=False)
    a, b = privacy(), privacy()
    assert a.pseudonymize("alice") == b.pseudonymize("alice")
    assert HEX32.fullmatch(a.pseudonymize("alice"))
    assert a.pseudonymize("alice") != a.pseudonymize("alice", "ip")
    other = Privacy(Config(pseudonym_key=b"another key"))
    assert other.pseudonymize("alice") != a.pseudonymize("alice")


def test_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "k" * 32)
    assert Privacy(Config()).pseudonymize("bob") == privacy().pseudonymize("bob")


def test_random_key_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(PSEUDONYM_KEY_ENV, raising=False)
    p = Privacy(Config())
    with caplog.at_level(logging.WARNING, "ws_monitoring.privacy"):
        first = p.pseudonymize("bob")
        assert p.pseudonymize("bob") == first
        assert Privacy(Config()).pseudonymize("bob") == first  # one key per process
    warnings = [r for r in caplog.records if "random per-process key" in r.getMessage()]
    assert len(warnings) == 2  # one per server


# -- client IP and trusted proxies ------------------------------------------------------------


def test_peer_address_without_proxies() -> None:
    p = privacy()
    req = request(x_forwarded_for="198.51.100.4")
    assert p.client_ip(("203.0.113.5", 4242), req) == "203.0.113.5"
    assert p.client(("203.0.113.5", 4242), req).ip == "203.0.113.0"


def test_spoofed_forwarded_headers_from_untrusted_peer_are_ignored() -> None:
    p = privacy(trusted_proxies=["10.0.0.0/8"])
    req = request(x_forwarded_for="198.51.100.4", forwarded="for=198.51.100.5")
    assert p.client_ip(("203.0.113.5", 1), req) == "203.0.113.5"


@pytest.mark.parametrize(("headers", "expected"), [
    ({"x_forwarded_for": "198.51.100.4"}, "198.51.100.4"),
    # The client can write the left part: the rightmost untrusted hop counts.
    ({"x_forwarded_for": "192.0.2.66, 198.51.100.4, 10.1.2.3"}, "198.51.100.4"),
    ({"x_forwarded_for": ["192.0.2.66", "198.51.100.4"]}, "198.51.100.4"),
    ({"x_forwarded_for": "10.9.9.9, 10.1.2.3"}, "10.9.9.9"),
    ({"x_forwarded_for": "garbage"}, None),
    ({"forwarded": 'for="[2001:db8::77]:4711";proto=https'}, "2001:db8::77"),
    ({"forwarded": "for=198.51.100.4:80, for=10.1.1.1"}, "198.51.100.4"),
    ({"forwarded": "For=unknown"}, None),
    ({"forwarded": "proto=https"}, None),
    ({"forwarded": "for=198.51.100.9", "x_forwarded_for": "198.51.100.4"}, "198.51.100.9"),
    ({}, "10.0.0.1"),
])  # fmt: skip
def test_forwarded_headers_from_trusted_proxy(
    headers: dict[str, str | list[str]], expected: str | None
) -> None:
    p = privacy(trusted_proxies=["10.0.0.0/8", "2001:db8:ffff::1"])
    assert p.client_ip(("10.0.0.1", 1), request(**headers)) == expected


def test_ipv4_mapped_peer_matches_ipv4_proxy() -> None:
    p = privacy(trusted_proxies=["127.0.0.1"])
    req = request(x_forwarded_for="198.51.100.4")
    assert p.client_ip(("::ffff:127.0.0.1", 1, 0, 0), req) == "198.51.100.4"


@pytest.mark.parametrize("remote", [None, "", ("",), ("not an ip", 1), ()])
def test_unknown_peer(remote: Any) -> None:
    client = privacy().client(remote, request())
    assert client.ip is None
    assert client.subject is None


def test_invalid_trusted_proxy_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"trusted_proxies: 'proxy\.local' is not an IP or CIDR"):
        privacy(trusted_proxies=["proxy.local"])


# -- user ids ---------------------------------------------------------------------------------


def test_user_from_resolver_is_pseudonymized() -> None:
    p = privacy(user_id_resolver=lambda r: r.headers.get("X-User"))
    client = p.client(("203.0.113.5", 1), request(x_user="alice"))
    assert client.user == p.pseudonymize("alice")
    assert client.subject == f"user:{p.pseudonymize('alice')}"


def test_user_sources_in_order(caplog: pytest.LogCaptureFixture) -> None:
    def broken(r: Request) -> str:
        raise KeyError("alice")

    basic = "Basic " + __import__("base64").b64encode(b"carol:pw").decode()
    p = privacy(user_id_resolver=lambda r: None)
    assert p.user_id(request(authorization=basic), "bob") == "bob"
    assert p.user_id(request(authorization=basic)) == "carol"
    assert p.user_id(request(authorization="Bearer xyz")) is None
    assert p.user_id(request()) is None
    with caplog.at_level(logging.WARNING, "ws_monitoring.privacy"):
        assert privacy(user_id_resolver=broken).user_id(request()) is None
    assert "user_id_resolver raised KeyError" in caplog.text
    assert "alice" not in caplog.text


# -- consent ----------------------------------------------------------------------------------


def test_consent_validation() -> None:
    with pytest.raises(ValueError, match=r"unknown consent purpose\(s\) \['location'\]"):
        Consent(frozenset({"location"}))
    with pytest.raises(TypeError, match="not a single string"):
        privacy().grant_user("u", purposes="ip", policy_version="v1")
    with pytest.raises(ValueError, match="policy_version"):
        privacy().grant_user("u", purposes={"ip"}, policy_version="")
    assert Consent(frozenset({"ip"})).allows("ip")
    assert not NO_CONSENT.allows("ip")


@pytest.mark.parametrize(("returned", "purposes", "version"), [
    (None, set(), None),
    (Consent(frozenset({"ip"}), "v2"), {"ip"}, "v2"),
    ({"purposes": ["user"], "policy_version": 3}, {"user"}, "3"),
    ({"purposes": ["user"]}, {"user"}, None),
    (["ip", "payload"], {"ip", "payload"}, None),
    ("ip", {"ip"}, None),
    (["ip", "location"], {"ip"}, None),
])  # fmt: skip
def test_consent_resolver_results(returned: Any, purposes: set[str], version: str | None) -> None:
    p = privacy(consent_resolver=lambda r: returned)
    consent = p.client(("203.0.113.5", 1), request()).consent
    assert consent.purposes == purposes
    assert consent.policy_version == version


def test_consent_resolver_failure_means_no_consent(caplog: pytest.LogCaptureFixture) -> None:
    def broken(r: Request) -> Any:
        raise RuntimeError("boom")

    with caplog.at_level(logging.WARNING, "ws_monitoring.privacy"):
        assert privacy(consent_resolver=broken).client(("203.0.113.5", 1), request()).consent == (
            NO_CONSENT
        )
    assert "consent_resolver raised RuntimeError" in caplog.text


def test_consent_reveals_raw_values() -> None:
    p = privacy(
        user_id_resolver=lambda r: "alice",
        consent_resolver=lambda r: Consent(frozenset({"ip", "user"}), "v1"),
    )
    client = p.client(("203.0.113.5", 1), request())
    assert (client.ip, client.user) == ("203.0.113.5", "alice")
    assert client.allows("ip")
    assert not client.allows("payload")
    # The journal subject stays pseudonymous even with consent.
    assert client.subject == f"user:{p.pseudonymize('alice')}"


def test_user_consent_overrides_resolver_and_is_journaled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = privacy(
        user_id_resolver=lambda r: r.headers.get("X-User"),
        consent_resolver=lambda r: ["ip"],
    )
    with caplog.at_level(logging.INFO, JOURNAL_LOGGER):
        assert p.grant_user("alice", purposes={"user"}, policy_version="v1") == Consent(
            frozenset({"user"}), "v1"
        )
        assert p.client(("203.0.113.5", 1), request(x_user="alice")).ip == "203.0.113.0"
        assert p.client(("203.0.113.5", 1), request(x_user="alice")).user == "alice"
        assert p.client(("203.0.113.5", 1), request(x_user="bob")).ip == "203.0.113.5"
        # Withdrawing everything keeps an empty entry, which still beats the resolver.
        assert p.withdraw_user("alice") == Consent(frozenset(), "v1")
        assert p.user_consent("alice") == Consent(frozenset(), "v1")
        assert p.user_consent("nobody") is None
        assert p.client(("203.0.113.5", 1), request(x_user="alice")).ip == "203.0.113.0"
    entries = [r.consent_entry for r in caplog.records if r.name == JOURNAL_LOGGER]
    subject = f"user:{p.pseudonymize('alice')}"
    assert [
        (e["action"], e["scope"], e["subject"], e["purposes"], e["consent"]) for e in entries
    ] == [
        ("grant", "user", subject, ["user"], ["user"]),
        ("withdraw", "user", subject, ["user"], []),
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in entries)
    assert "alice" not in json.dumps(entries)


def test_user_consents_are_bounded() -> None:
    p = Privacy(Config(pseudonym_key=KEY), max_users=2)
    for user in ("a", "b", "c"):
        p.grant_user(user, purposes={"ip"}, policy_version="v1")
    assert p.user_consent("a") is None
    assert p.user_consent("c") is not None
    p.withdraw_user("b", purposes={"ip"}, policy_version="v2")
    assert p.user_consent("b") == Consent(frozenset(), "v2")


# -- scrub ------------------------------------------------------------------------------------


def test_scrub_mapping() -> None:
    p = privacy()
    source = {
        "http.url": "wss://chat.example/rooms/1?token=abc&user=alice",
        "client.address": "203.0.113.5",
        "network.peer.address": "2001:db8:5ee::77",
        "x-forwarded-for": "203.0.113.5, 10.1.2.3, unknown",
        "ip": 3232235777,
        "enduser.id": "alice",
        "user": {"id": "alice", "email": "a@example.org", "ip_address": "198.51.100.7"},
        "usernames": ["x"],
        "username": ["alice", "bob"],
        "headers": {
            "Authorization": "Bearer abc",
            "Cookie": "session=1",
            "Sec-WebSocket-Key": "k==",
            "X-Api-Key": "k",
            "User-Agent": "probe/1.0",
        },
        "url.query": "token=abc",
        "note": "from 198.51.100.7 as bob@example.org with token=abc",
        "body": b"raw payload",
        "count": 3,
        "ratio": 0.5,
        "ok": True,
        "nothing": None,
        "tags": ("a", "203.0.113.5"),
        "ips": ["203.0.113.5"],
        "obj": ipaddress.ip_address("203.0.113.5"),
        7: "seven",
    }
    out = p.scrub(source)
    alice = p.pseudonymize("alice")
    bob = p.pseudonymize("bob@example.org")
    assert out == {
        # URL paths lose their identifier-like segments (privacy.safe_path).
        "http.url": "wss://chat.example/rooms/{id}",
        "client.address": "203.0.113.0",
        "network.peer.address": "2001:db8:5ee::",
        "x-forwarded-for": "203.0.113.0, 10.1.2.0, [redacted]",
        "ip": 3232235777,
        "enduser.id": alice,
        "user": {
            "id": alice,
            "email": p.pseudonymize("a@example.org"),
            "ip_address": "198.51.100.0",
        },
        "usernames": ["x"],
        "username": [alice, p.pseudonymize("bob")],
        "headers": {"User-Agent": "probe/1.0"},
        "note": f"from 198.51.100.0 as user:{bob} with token=[redacted]",
        "body": "<11 bytes>",
        "count": 3,
        "ratio": 0.5,
        "ok": True,
        "nothing": None,
        "tags": ["a", "203.0.113.0"],
        "ips": ["203.0.113.0"],
        "obj": "203.0.113.0",
        "7": "seven",
    }
    assert source["client.address"] == "203.0.113.5"  # the input is left alone


def test_scrub_keep_and_depth() -> None:
    p = privacy()
    out = p.scrub(
        {"client.address": "203.0.113.5", "other": "203.0.113.5"}, keep=["client.address"]
    )
    assert out == {"client.address": "203.0.113.5", "other": "203.0.113.0"}
    deep: dict[str, Any] = {"v": "203.0.113.5"}
    for _ in range(40):
        deep = {"d": deep}
    node = p.scrub(deep)
    for _ in range(33):
        node = node["d"]
    assert node == "[depth limit]"


def test_scrub_ip_field_with_a_non_string() -> None:
    assert privacy().scrub({"client.ip": object(), "peer": ["203.0.113.5"]}) == {
        "client.ip": "[redacted]",
        "peer": ["203.0.113.0"],
    }


@pytest.mark.parametrize(("text", "expected"), [
    ("listening on 127.0.0.1:8765 and [::1]:8765 and 0.0.0.0", None),
    ("at 12:30:45.123 version 1.2.3", None),
    ("mac aa:bb:cc:dd:ee:ff", None),
    ("peer 2001:db8::dead:beef: closed", "peer 2001:db8::: closed"),
    ("peer [2001:db8::1]:443 ok", "peer [2001:db8::]:443 ok"),
    ("GET /chat?token=abc&user=1 HTTP/1.1", "GET /chat HTTP/1.1"),
    ("ws://alice:secret@host/x", "ws://host/x"),
    ("Authorization: Bearer abc.def", "Authorization: [redacted]"),
    ("auth=Basic Zm9vOmJhcg==", "auth=[redacted]"),
    ("jwt eyJhbGciOi.eyJzdWIiOi.c2ln here", "jwt [redacted] here"),
    ('password: "hunter 2"', "password: [redacted]"),
    ("bad \udc80 surrogate", "bad \ufffd surrogate"),
])  # fmt: skip
def test_scrub_text(text: str, expected: str | None) -> None:
    assert privacy().scrub_text(text) == (text if expected is None else expected)


def test_scrub_event() -> None:
    p = privacy()
    event = {
        "event_id": "abc",
        "level": "error",
        "transaction": "/chat?token=abc",
        "request": {
            "url": "https://h/chat?token=abc",
            "method": "GET",
            "query_string": "token=abc",
            "cookies": {"session": "1"},
            "data": "payload",
            "headers": {"Cookie": "a", "X-Forwarded-For": "203.0.113.5", "Host": "h"},
            "env": {"REMOTE_ADDR": "203.0.113.5", "SERVER_NAME": "h"},
            "fragment": "x?token=abc",
        },
        "user": {
            "id": "alice",
            "username": "alice",
            "ip_address": "{{auto}}",
            "segment": "vip",
            "email": None,
            "token": "t",
        },
        "exception": {
            "values": [
                {
                    "type": "RuntimeError",
                    "value": "cannot serve 203.0.113.5",
                    "stacktrace": {"frames": [{"function": "h", "vars": {"m": "payload"}}, 7]},
                },
                {"type": "KeyError", "stacktrace": {"frames": None}},
                "junk",
            ]
        },
        "threads": {"values": None},
        "breadcrumbs": {"values": [{"message": "from 203.0.113.5", "data": {"cookie": "x"}}]},
        "extra": {"client_ip": "203.0.113.5"},
        "contexts": {"trace": {"trace_id": "t" * 32}},
        "tags": {"user.id": "alice"},
    }
    out = p.scrub_event(event)
    alice = p.pseudonymize("alice")
    assert out == {
        "event_id": "abc",
        "level": "error",
        "transaction": "/chat",
        "request": {
            "url": "https://h/chat",
            "method": "GET",
            "headers": {"X-Forwarded-For": "203.0.113.0", "Host": "h"},
            "env": {"REMOTE_ADDR": "203.0.113.0", "SERVER_NAME": "h"},
            "fragment": "x",
        },
        "user": {
            "id": alice,
            "username": alice,
            "ip_address": None,
            "segment": "vip",
            "email": None,
        },
        "exception": {
            "values": [
                {
                    "type": "RuntimeError",
                    "value": "cannot serve 203.0.113.0",
                    "stacktrace": {"frames": [{"function": "h"}]},
                },
                {"type": "KeyError", "stacktrace": {"frames": []}},
            ]
        },
        "threads": {},
        "breadcrumbs": {"values": [{"message": "from 203.0.113.0", "data": {}}]},
        "extra": {"client_ip": "203.0.113.0"},
        "contexts": {"trace": {"trace_id": "t" * 32}},
        "tags": {"user.id": alice},
    }
    assert p.scrub_event({"breadcrumbs": [{"message": "198.51.100.1"}]}) == {
        "breadcrumbs": [{"message": "198.51.100.0"}]
    }
    assert p.scrub_event({"breadcrumbs": "junk", "user": {"ip_address": "198.51.100.1"}}) == {
        "breadcrumbs": [],
        "user": {"ip_address": "198.51.100.0"},
    }


@pytest.fixture
def sentry_events() -> Iterator[list[dict[str, Any]]]:
    """A real Sentry client whose ``before_send`` keeps events instead of sending them."""
    events: list[dict[str, Any]] = []

    def keep(event: Any, hint: Any) -> None:
        events.append(event)

    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",
        before_send=keep,
        default_integrations=False,
        send_client_reports=False,
    )
    try:
        yield events
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.init()


# Sentry sends the source lines around each frame: the markers live out of that window.
SENTRY_PAYLOAD = "payload-MARKER-sentry"
SENTRY_USER = "user-MARKER-sentry"
SENTRY_TOKEN = "token-MARKER-sentry"
SENTRY_IP = "203.0.113.77"
SENTRY_MARKERS = (SENTRY_PAYLOAD, SENTRY_USER, SENTRY_TOKEN, SENTRY_IP)


def _crash_with_local_payload(message: str) -> None:
    payload = message  # a local variable: Sentry records it in the frame's vars
    raise RuntimeError(f"cannot serve {SENTRY_IP} ({len(payload)} bytes)")


def test_scrub_event_on_a_real_sentry_event(sentry_events: list[dict[str, Any]]) -> None:
    p = privacy()
    with sentry_sdk.new_scope() as scope:
        scope.set_user({"id": SENTRY_USER, "ip_address": SENTRY_IP})
        scope.set_context("websocket", {"client_ip": SENTRY_IP, "path": f"/c?t={SENTRY_TOKEN}"})
        sentry_sdk.add_breadcrumb(message=f"peer {SENTRY_IP} sent token={SENTRY_TOKEN}")
        try:
            _crash_with_local_payload(SENTRY_PAYLOAD)
        except RuntimeError:
            sentry_sdk.capture_exception()
    (event,) = sentry_events
    raw = json.dumps(event, default=str)
    assert all(marker in raw for marker in SENTRY_MARKERS)
    scrubbed = json.dumps(p.scrub_event(event), default=str)
    assert_no_markers(scrubbed, SENTRY_MARKERS, where="scrubbed Sentry event")
    assert "cannot serve 203.0.113.0 (21 bytes)" in scrubbed


# -- grant and withdraw on live connections ----------------------------------------------------


def _client_view(ws: Any) -> str:
    record: ConnectionRecord = getattr(ws, RECORD_ATTR)
    c = record.client
    return json.dumps([c.ip, c.user, sorted(c.consent.purposes), c.consent.policy_version])


async def test_grant_and_withdraw_on_an_asyncio_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            if message == "grant":
                grant(ws, purposes={"ip", "user"}, policy_version="v1")
            elif message == "grant-payload":
                grant(ws, purposes=["payload"], policy_version="v2")
            elif message == "withdraw-ip":
                withdraw(ws, purposes={"ip"})
            elif message == "withdraw":
                withdraw(ws, policy_version="v3")
            await ws.send(_client_view(ws))

    options = {
        "metrics": False,
        "pseudonym_key": KEY,
        "user_id_resolver": lambda r: r.headers.get("X-User"),
    }
    p = privacy()
    alice = p.pseudonymize("alice")
    with caplog.at_level(logging.INFO, JOURNAL_LOGGER):
        async with (
            async_server(handler, monitoring=options) as server,
            connect(server.url(), additional_headers={"X-User": "alice"}) as client,
        ):
            views = []
            for step in ("hello", "grant", "grant-payload", "withdraw-ip", "withdraw"):
                await client.send(step)
                views.append(json.loads(await client.recv()))
    assert views == [
        ["127.0.0.0", alice, [], None],
        ["127.0.0.1", "alice", ["ip", "user"], "v1"],
        ["127.0.0.1", "alice", ["ip", "payload", "user"], "v2"],
        ["127.0.0.0", "alice", ["payload", "user"], "v2"],
        ["127.0.0.0", alice, [], "v3"],
    ]
    entries = [r.consent_entry for r in caplog.records if r.name == JOURNAL_LOGGER]
    assert [(e["action"], e["purposes"], e["consent"], e["policy_version"]) for e in entries] == [
        ("grant", ["ip", "user"], ["ip", "user"], "v1"),
        ("grant", ["payload"], ["ip", "payload", "user"], "v2"),
        ("withdraw", ["ip"], ["payload", "user"], "v2"),
        ("withdraw", ["payload", "user"], [], "v3"),
    ]
    assert {e["subject"] for e in entries} == {f"user:{alice}"}
    assert {e["scope"] for e in entries} == {"connection"}
    assert len({e["connection_id"] for e in entries}) == 1


async def test_grant_on_a_sync_connection_without_user(caplog: pytest.LogCaptureFixture) -> None:
    def handler(ws: SyncServerConnection) -> None:
        for _ in ws:
            client = grant(ws, purposes={"ip"}, policy_version="v1")
            ws.send(json.dumps([client.ip, client.subject]))

    def talk(url: str) -> Any:
        with sync_connect(url) as client:
            client.send("go")
            return json.loads(client.recv())

    with caplog.at_level(logging.INFO, JOURNAL_LOGGER):
        async with sync_server_async(
            handler, monitoring={"metrics": False, "pseudonym_key": KEY}
        ) as server:
            ip, subject = await asyncio.to_thread(talk, server.url())
    assert ip == "127.0.0.1"
    assert subject == f"ip:{privacy().pseudonymize('127.0.0.1', 'ip')}"
    (entry,) = [r.consent_entry for r in caplog.records if r.name == JOURNAL_LOGGER]
    assert entry["subject"] == subject


async def test_grant_without_subject_uses_the_connection_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(ws: ServerConnection) -> None:
        record: ConnectionRecord = getattr(ws, RECORD_ATTR)
        # A unix-socket-like peer: no address, no user.
        record.remote_address = None
        record.client = record.monitor.privacy.client(None, record.request)
        grant(ws, purposes={"payload"}, policy_version="v1")
        await ws.send(record.id)

    with caplog.at_level(logging.INFO, JOURNAL_LOGGER):
        async with (
            async_server(handler, monitoring={"metrics": False}) as server,
            connect(server.url()) as client,
        ):
            connection_id = await client.recv()
    (entry,) = [r.consent_entry for r in caplog.records if r.name == JOURNAL_LOGGER]
    assert entry["subject"] == f"connection:{connection_id}"


def test_grant_needs_an_instrumented_connection() -> None:
    with pytest.raises(ValueError, match="not instrumented by ws_monitoring"):
        grant(object(), purposes={"ip"}, policy_version="v1")
    with pytest.raises(ValueError, match="not instrumented by ws_monitoring"):
        withdraw(object())


async def test_user_consent_through_the_server_applies_to_later_connections() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(_client_view(ws))

    options = {"metrics": False, "user_id_resolver": lambda r: r.headers.get("X-User")}
    async with async_server(handler, monitoring=options) as server:
        grant_user(server.server, "alice", purposes={"user"}, policy_version="v1")
        async with connect(server.url(), additional_headers={"X-User": "alice"}) as client:
            assert json.loads(await client.recv())[1:] == ["alice", ["user"], "v1"]
        withdraw_user(server.server, "alice", purposes={"user"})
        async with connect(server.url(), additional_headers={"X-User": "alice"}) as client:
            view = json.loads(await client.recv())
        assert view[1] != "alice"
        assert view[2] == []


def test_privacy_of_finds_the_server_privacy() -> None:
    async def handler(ws: ServerConnection) -> None:
        pass

    instrumented = ws_monitoring.instrument(handler, metrics=False)
    monitor: Monitor = instrumented.__ws_monitoring__  # type: ignore[attr-defined]
    assert privacy_of(instrumented) is monitor.privacy
    assert privacy_of(monitor) is monitor.privacy
    assert privacy_of(monitor.privacy) is monitor.privacy
    with pytest.raises(TypeError, match="not an instrumented connection, server or handler"):
        privacy_of(handler)


@pytest.mark.parametrize(
    ("trusted_proxies", "client_ip"),
    [
        (["10.0.0.0/8"], "127.0.0.0"),  # the peer is no trusted proxy: its headers are ignored
        (["127.0.0.1"], "198.51.100.0"),  # it is: the forwarded address counts
    ],
)
async def test_spoofed_x_forwarded_for_on_a_live_server(
    trusted_proxies: list[str], client_ip: str
) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(_client_view(ws))

    spoof = {"X-Forwarded-For": "198.51.100.23", "Forwarded": "for=198.51.100.24"}
    monitoring = {"metrics": False, "trusted_proxies": trusted_proxies}
    async with (
        async_server(handler, monitoring=monitoring) as server,
        connect(server.url(), additional_headers=spoof) as client,
    ):
        assert json.loads(await client.recv())[0] == client_ip


def test_scrub_odds_and_ends() -> None:
    p = privacy()
    assert p.config.pseudonym_key == KEY
    assert p.scrub({"values": [1, None, 2.5, "198.51.100.7"]}) == {
        "values": [1, None, 2.5, "198.51.100.0"]
    }
    event = {
        "request": {"session_id": "s", "method": "GET"},
        "user": {"api_token": "t", "id": None},
        "exception": {"values": [{"type": "E", "value": None}]},
        "tags": {"auth": "x"},
        "unknown": object(),
        "cookies": "session=1",
    }
    out = p.scrub_event(event)
    assert out["request"] == {"method": "GET"}
    assert out["user"] == {"id": None}
    assert out["exception"] == {"values": [{"type": "E", "value": None}]}
    assert out["tags"] == {}
    assert out["unknown"].startswith("<object object at")
    assert "cookies" not in out


def _closure_with_an_empty_cell() -> Any:
    if not __name__:  # never true: the cell of ``handler`` stays empty
        handler = None

    def server_handler() -> Any:
        return handler

    return type("Server", (), {"handler": staticmethod(server_handler)})()


def test_privacy_of_tolerates_foreign_servers() -> None:
    with pytest.raises(TypeError):
        privacy_of(_closure_with_an_empty_cell())
    with pytest.raises(TypeError):
        privacy_of(type("Server", (), {"handler": staticmethod(lambda: None)})())


async def test_privacy_of_a_live_connection() -> None:
    async def handler(ws: ServerConnection) -> None:
        record: ConnectionRecord = getattr(ws, RECORD_ATTR)
        await ws.send(json.dumps(privacy_of(ws) is record.monitor.privacy))

    async with (
        async_server(handler, monitoring={"metrics": False}) as server,
        connect(server.url()) as client,
    ):
        assert json.loads(await client.recv()) is True


def test_scrub_event_survives_a_dead_weak_proxy() -> None:
    import gc
    import weakref

    from ws_monitoring.config import Config
    from ws_monitoring.privacy import Privacy

    class Thing:
        pass

    thing = Thing()
    proxy = weakref.proxy(thing)
    del thing
    gc.collect()
    privacy = Privacy(Config(pseudonym_key=b"k"))
    event = {"breadcrumbs": {"values": [{"data": {"ws_connection": proxy, "n": 1}}]}}
    scrubbed = privacy.scrub_event(event)
    assert scrubbed["breadcrumbs"]["values"][0]["data"] == {
        "ws_connection": "[weak reference]",
        "n": 1,
    }
    assert privacy.scrub({"x": [proxy]}) == {"x": ["[weak reference]"]}


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "text",
    [
        "a-" * 8192,  # many word boundaries before a key-like suffix
        "a" * 16000 + "@",  # a long local part that never becomes an email
        'token="' * 2000,  # unterminated quoted values
        "a.b" * 5000 + "://x",  # a long scheme-like run
        "a@" * 8000,
    ],
    ids=["hyphens", "local-part", "quotes", "scheme", "ats"],
)
def test_scrub_text_stays_linear_on_hostile_input(text: str) -> None:
    """Client-controlled text (paths, headers) is scrubbed on the event loop: these inputs
    took seconds to minutes with backtracking regexes; the timeout guards against a hang."""
    privacy = Privacy(Config(pseudonym_key=b"k"))
    out = privacy.scrub_text(text * 4)
    assert out.endswith("…[truncated]")
    # Bounded: redaction markers may be longer than what they replace, never unbounded.
    assert len(out) <= 3 * MAX_SCRUB_LENGTH


# -- the identifier rule table ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "in_path", "in_text"),
    [
        # rule 1: longer than 32 characters
        ("a" * 32, False, False),
        ("a" * 33, True, True),
        ("8f14e45f-ceea-467f-a0e5-7d6e1c2b9a31", True, True),
        # rule 2: @
        ("alice@example.com", True, True),
        ("@", True, True),
        # rule 3: 3+ digits
        ("room123", True, True),
        ("a1b2c3", True, True),
        ("+15551234", True, True),
        ("203.0.113.0", True, True),
        ("h264", True, True),
        ("a1b2", False, False),
        # rule 4: numbers (paths only)
        ("7", True, False),
        ("42", True, False),
        ("1.5", True, False),
        ("-3", True, False),
        ("2024-01-31", True, True),
        ("3d", False, False),
        # rule 5: hex runs with a digit
        ("5f3a9c21", True, True),
        ("deadbee1", True, True),
        ("deadbeef", False, False),
        ("abcdef12", True, True),
        ("abcdef1", False, False),  # 7 hex digits: too short
        # rule 6: other characters (paths only)
        ("josé", True, False),
        ("a+b", True, False),
        ("a b", True, False),
        ("dGVzdA==", True, False),
        ("a/b", True, False),
        ("\x1b[31m", True, False),
        # rule 7: random-looking
        ("aZbYcXdW", True, True),
        ("kQzPwMvN", True, True),
        ("getUserProfile", False, False),
        ("XMLHttpRequest", False, False),
        ("iPhone", False, False),
        # words
        ("rooms", False, False),
        ("v1", False, False),
        ("socket.io", False, False),
        ("chat-room", False, False),
        ("~lobby", False, False),
        ("..", False, False),
    ],
)
def test_identifier_rule_table(word: str, in_path: bool, in_text: bool) -> None:
    assert is_identifier(word) is in_path
    assert is_identifier(word, path=False) is in_text


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("division by zero", "division by zero"),
        ("invalid literal for int() with base 10: 'alice'", None),
        ("Expecting value: line 1 column 5 (char 4)", None),
        ("bad order 4111111111111111 for room 8f14e45f-ceea", "bad order {id} for room {id}"),
        ("no user alice@example.com", "no user {id}"),
        ("token tk_Q9zLm2XvB8nR4wY7 expired", "token {id} expired"),
        # Addresses are left alone: scrub_text has anonymized them already.
        ("from 203.0.113.0 and 2001:db8:5ee:: ok", None),
        ("path /users/5f3a9c21/feed", "path /users/{id}/feed"),
        ("KeyError: 'k_aZbYcXdWeVfU'", "KeyError: '{id}'"),
    ],
)
def test_mask_identifiers(text: str, masked: str | None) -> None:
    assert mask_identifiers(text) == (text if masked is None else masked)


def test_scrub_url_keeps_words_and_hides_identifiers() -> None:
    p = privacy()
    assert p.scrub_url("/users/alice@example.com/feed?x=1#f") == "/users/{id}/feed"
    assert p.scrub_url("wss://bob:pw@chat.example:8443/rooms/42?t=1") == (
        "wss://chat.example:8443/rooms/{id}"
    )
    assert p.scrub_url("https://203.0.113.5/x/123") == "https://203.0.113.0/x/{id}"
    assert p.scrub_url("https://example.com") == "https://example.com"
    assert p.scrub_url("relative/a@b.example") == "relative/user:" + p.pseudonymize("a@b.example")
    assert p.scrub({"url.path": "/t/eyJ" + "x" * 40, "path": "/p/7"}) == {
        "url.path": "/t/{id}",
        "path": "/p/{id}",
    }


# -- exception messages: one rule for every sink ------------------------------------------------

RAW_MESSAGE = "no order 4111111111111111 for alice@example.com from 203.0.113.77?token=t0k"


class Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no")


RAW_MESSAGE_MARKERS = ["4111111111111111", "alice@example.com", "203.0.113.77", "t0k"]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("scrub", "no order {id} for {id} from 203.0.113.0"),
        ("keep", RAW_MESSAGE),
        ("drop", None),
    ],
)
def test_exception_messages_rule(mode: str, expected: str | None) -> None:
    p = privacy(exception_messages=mode)
    exc = RuntimeError(RAW_MESSAGE)
    assert p.exception_message(exc) == expected
    assert p.exception_text(RAW_MESSAGE) == expected
    assert p.exception_summary(exc) == (
        "RuntimeError" if expected is None else f"RuntimeError: {expected}"
    )
    # An empty or unprintable message is no message.
    assert p.exception_message(RuntimeError()) is None
    assert p.exception_summary(Unprintable()) == "tests.test_privacy.Unprintable"


def test_exception_messages_option_is_validated() -> None:
    with pytest.raises(ValueError, match="exception_messages must be one of 'scrub', 'keep'"):
        Config(exception_messages="hide")  # type: ignore[arg-type]


def test_keep_still_bounds_and_repairs_the_text() -> None:
    p = privacy(exception_messages="keep")
    text = p.exception_text("x" * (MAX_SCRUB_LENGTH + 10) + "\udcff")
    assert text == "x" * MAX_SCRUB_LENGTH + "…[truncated]"
    assert p.exception_text("lone \udcff") == "lone \ufffd"


def chained() -> BaseException:
    try:
        try:
            raise KeyError(f"item 8f14e45f-ceea-467f-a0e5-7d6e1c2b9a31 in {RAW_MESSAGE}")
        except KeyError as inner:
            raise ValueError("bad item 5f3a9c21") from inner
    except ValueError:
        try:
            raise RuntimeError(RAW_MESSAGE)
        except RuntimeError as outer:
            return outer
    raise AssertionError("unreachable")


@pytest.mark.parametrize("mode", ["scrub", "keep", "drop"])
def test_format_exception_follows_the_rule_for_every_chained_message(mode: str) -> None:
    p = privacy(exception_messages=mode)
    text = p.format_exception(chained())
    lines = text.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "The above exception was the direct cause of the following exception:" in lines
    assert "During handling of the above exception, another exception occurred:" in lines
    summaries = [
        line for line in lines if line.split(":")[0] in {"KeyError", "ValueError", "RuntimeError"}
    ]
    if mode == "drop":
        assert summaries == ["KeyError", "ValueError", "RuntimeError"]
    elif mode == "scrub":
        assert summaries == [
            "KeyError: 'item {id} in no order {id} for {id} from 203.0.113.0'",
            "ValueError: bad item {id}",
            "RuntimeError: no order {id} for {id} from 203.0.113.0",
        ]
    else:
        assert summaries[-1] == f"RuntimeError: {RAW_MESSAGE}"
    if mode != "keep":
        assert_no_markers(text, RAW_MESSAGE_MARKERS)
    # Frames are the application's code, scrubbed like any text.
    assert "raise RuntimeError(RAW_MESSAGE)" in text
    assert not text.endswith("\n")
    assert exception_type(KeyError()) == "KeyError"


def test_format_exception_survives_cycles_and_long_chains() -> None:
    first, second = ValueError("a"), ValueError("b")
    first.__context__, second.__context__ = second, first
    assert privacy().format_exception(first) == (
        "ValueError: b\n\nDuring handling of the above exception, another exception occurred:"
        "\n\nValueError: a"
    )
    exc: BaseException = ValueError("0")
    for i in range(1, 20):
        new = ValueError(str(i))
        new.__cause__ = exc
        exc = new
    assert privacy().format_exception(exc).count("ValueError") == 8


@pytest.mark.parametrize(
    ("mode", "value"),
    [("scrub", "no order {id} for {id} from 203.0.113.0"), ("keep", RAW_MESSAGE), ("drop", "")],
)
def test_scrub_event_exception_values_follow_the_rule(mode: str, value: str) -> None:
    event = {"exception": {"values": [{"type": "RuntimeError", "value": RAW_MESSAGE}]}}
    out = privacy(exception_messages=mode).scrub_event(event)
    assert out["exception"]["values"][0] == {"type": "RuntimeError", "value": value}
    assert IDENTIFIER == "{id}"
