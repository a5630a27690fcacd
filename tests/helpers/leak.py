"""The leak scenario: raw client data goes in, and must not come out without consent.

Reusable by every sink's tests (logs here; spans, Sentry envelopes, Alertmanager
payloads in theirs). API:

``MARKERS`` (a :class:`Markers`)
    Known raw values the scenario injects: forwarded client IPs from the documentation
    ranges (``ipv4``, ``ipv6``), a user id, secrets (bearer token, cookie, API key
    header, query-string token), payload markers (text, binary) and identifiers for
    paths and exception messages (an email, a JWT, a UUID, a long number, a random
    token drawn per run, a short random-looking one). ``markers.of(purpose)`` lists the
    raw strings of one purpose (``"ip"``, ``"user"``, ``"payload"``; ``"secret"`` and
    ``"identifier"`` never have a consent), ``markers.forbidden(consent)`` those that
    must not appear under ``consent`` (a set of purposes), and
    ``markers.expected(consent)`` those that must appear in the logs.
    ``SCRUBBED_CRASH`` is the crash message as the default rule shows it; ``ROUTES``
    every route of the scenario's connections; ``CONNECTIONS`` how many there are.

``await run_leak_scenario(tmp_path, *, consent=(), consent_via="grant", fmt="json",
options=None)`` -> :class:`LeakRun`
    Sets up logging (``fmt`` to ``tmp_path/ws.log`` at DEBUG, consent journal to
    ``tmp_path/consent.jsonl``; ``fmt=None`` leaves logging alone), serves a real
    ``ws_monitoring.serve`` server on 127.0.0.1 with 127.0.0.1 as trusted proxy, then:
    an IPv4 client (``X-Forwarded-For``) sends a text and a binary payload, and a
    message that makes the handler raise an exception whose text holds the forwarded
    IP, the request path with its query and every identifier marker; an IPv6 client
    (``Forwarded``) sends a text payload and closes; then one client per identifier
    path (:data:`IDENTIFIER_PATHS`: an email, a JWT, a UUID, a long number, random
    tokens) sends a text payload; a last request is rejected with 403. Every request
    carries the user id, ``Authorization: Bearer``, ``Cookie``, ``X-Api-Key``, an
    ``X-Tenant`` holding an email (for servers with ``tenant=by_tenant_header``) and a
    query string with a token and the user id. ``consent`` is given per connection
    with ``ws_monitoring.grant()`` in the handler (``consent_via="grant"``,
    journaled) or from the handshake by ``consent_resolver`` (``"resolver"``).
    ``options`` are more ``ws_monitoring.serve`` options (a ``registry``, a tracing or
    alerting setup...); they override the scenario's. The call returns once both
    connections are closed and every log line is written.

``LeakRun``
    ``markers``, ``consent``, ``texts`` (``{"log": ..., "journal": ...}``), ``lines``
    (parsed JSON log lines, for ``fmt`` ``json``/``ecs``), ``journal`` (parsed entries),
    ``port``; ``run.all_text()`` joins every captured text.

``assert_no_markers(text, markers, where="")``
    Fails listing each marker found in ``text`` with the surrounding characters.

Extend it by capturing your sink's output during the run (pass its options), then
``assert_no_markers(captured, MARKERS.forbidden(consent))``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import json
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

import ws_monitoring
from tests.helpers.servers import HOST, async_wait_until
from ws_monitoring.consent import grant
from ws_monitoring.core import ConnectionRecord, HandshakeRecord
from ws_monitoring.logging.setup import setup_logging

POLICY_VERSION = "privacy-policy-2024-06"
PAYLOAD_LIMIT = 256


@dataclasses.dataclass(frozen=True)
class Markers:
    """Raw values injected by the scenario (see the module docstring)."""

    ipv4: str = "203.0.113.77"
    ipv6: str = "2001:db8:5ee:1:2:3:4:77"
    user: str = "user-MARKER-4e1d"
    bearer: str = "bearer-MARKER-b3a9"
    cookie: str = "cookie-MARKER-c7d1"
    api_key: str = "apikey-MARKER-e42f"
    query_token: str = "qtoken-MARKER-9f0c"
    text_payload: str = "payload-MARKER-text-5150"
    binary_payload: bytes = b"payload-MARKER-binary-7777"
    # Identifiers in paths and exception messages: no consent ever reveals them.
    email: str = "alice.marker@example.com"
    jwt: str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYXJrZXItand0In0.c2lnLU1BUktFUi1qd3QtOWYwYw"
    uuid: str = "8f14e45f-ceea-467f-a0e5-7d6e1c2b9a31"
    number: str = "4111111111111111"
    token: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(32))
    short_token: str = "tk_Q9zLm2XvB8nR4wY7"

    def of(self, purpose: str) -> list[str]:
        """Every raw form of the markers of ``purpose`` (ip, user, payload, secret)."""
        if purpose == "ip":
            v6 = ipaddress.IPv6Address(self.ipv6)
            return [self.ipv4, str(v6), v6.exploded]
        if purpose == "user":
            return [self.user]
        if purpose == "payload":
            return [
                self.text_payload,
                self.binary_payload.decode(),
                base64.b64encode(self.binary_payload).decode(),
            ]
        if purpose == "secret":
            return [self.bearer, self.cookie, self.api_key, self.query_token]
        if purpose == "identifier":
            return [self.email, self.jwt, self.uuid, self.number, self.token, self.short_token]
        raise ValueError(f"unknown purpose {purpose!r}")

    def forbidden(self, consent: Iterable[str] = ()) -> list[str]:
        """Markers that must not appear anywhere under ``consent``."""
        allowed = set(consent)
        return [
            m
            for p in ("ip", "user", "payload", "secret", "identifier")
            if p not in allowed
            for m in self.of(p)
        ]

    def expected(self, consent: Iterable[str] = ()) -> list[str]:
        """Markers that must appear in the logs under ``consent`` (one form each)."""
        wanted = set(consent)
        result = []
        if "ip" in wanted:
            result += [self.ipv4, str(ipaddress.IPv6Address(self.ipv6))]
        if "user" in wanted:
            result.append(self.user)
        if "payload" in wanted:
            result += [self.text_payload, base64.b64encode(self.binary_payload).decode()]
        return result

    def identifier_paths(self) -> dict[str, str]:
        """Paths carrying identifiers, and the route the default grouping gives each."""
        return {
            f"/users/{self.email}/feed": "/users/{id}/feed",
            f"/t/{self.jwt}": "/t/{id}",
            f"/rooms/{self.uuid}": "/rooms/{id}",
            f"/orders/{self.number}/items": "/orders/{id}/items",
            f"/k/{self.token}": "/k/{id}",
            f"/s/{self.short_token}/": "/s/{id}/",
        }

    def crash_message(self, forwarded: str | None, path: str) -> str:
        """What the handler's exception says: client data, as application code writes it."""
        return (
            f"cannot serve {forwarded} on {path} - order {self.number} of {self.email} "
            f"in room {self.uuid} with {self.token} and {self.short_token} ({self.jwt})"
        )


MARKERS = Markers()
#: The crash message under the default ``exception_messages="scrub"``: the IP truncated,
#: the query string dropped, the JWT redacted, every other identifier ``{id}``.
SCRUBBED_CRASH = (
    "cannot serve 203.0.113.0 on /chat - order {id} of {id} in room {id} with {id} and {id} "
    "([redacted])"
)
#: Connections of the scenario (the rejected request is none).
CONNECTIONS = 2 + len(MARKERS.identifier_paths())
#: Every route the scenario's connections have under the default grouping.
ROUTES = {"/chat", *MARKERS.identifier_paths().values()}


def by_tenant_header(request: Request) -> str | None:
    """A ``tenant=`` function: the ``X-Tenant`` header (here it holds an email)."""
    return request.headers.get("X-Tenant")


@dataclasses.dataclass
class LeakRun:
    """What one run of the scenario produced (see the module docstring)."""

    markers: Markers
    consent: frozenset[str]
    texts: dict[str, str]
    lines: list[dict[str, Any]]
    journal: list[dict[str, Any]]
    port: int

    def all_text(self) -> str:
        return "\n".join(self.texts.values())


def assert_no_markers(text: str, markers: Iterable[str], where: str = "") -> None:
    """Fail if any of ``markers`` occurs in ``text``, showing where."""
    found = []
    for marker in markers:
        index = text.find(marker)
        if index >= 0:
            found.append(f"{marker!r} in ...{text[max(0, index - 80) : index + 80]!r}...")
    assert not found, f"raw markers leaked{' into ' + where if where else ''}:\n" + "\n".join(found)


class ClosedCounter:
    """A real sink that counts closed connections, so the scenario waits on a condition."""

    def __init__(self) -> None:
        self.closed = 0

    def handshake_finished(self, handshake: HandshakeRecord) -> None:
        pass

    def connection_opened(self, connection: ConnectionRecord) -> None:
        pass

    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None:
        pass

    def connection_closed(self, connection: ConnectionRecord) -> None:
        self.closed += 1

    def shutdown(self, timeout: float) -> None:
        pass


def _headers(markers: Markers) -> dict[str, str]:
    return {
        "X-User-Id": markers.user,
        "Authorization": f"Bearer {markers.bearer}",
        "Cookie": f"session={markers.cookie}; theme=dark",
        "X-Api-Key": markers.api_key,
        "X-Tenant": f"org-{markers.email}",
    }


async def run_leak_scenario(
    tmp_path: Path,
    *,
    consent: Iterable[str] = (),
    consent_via: str = "grant",
    fmt: str | None = "json",
    options: Mapping[str, Any] | None = None,
    markers: Markers = MARKERS,
) -> LeakRun:
    """Run the scenario once (see the module docstring)."""
    purposes = frozenset(consent)
    query = f"?token={markers.query_token}&user={markers.user}"
    counter = ClosedCounter()

    async def handler(ws: ServerConnection) -> None:
        if purposes and consent_via == "grant":
            grant(ws, purposes=purposes, policy_version=POLICY_VERSION)
        async for message in ws:
            if message == "crash":
                forwarded = ws.request.headers.get("X-Forwarded-For") if ws.request else None
                path = ws.request.path if ws.request else ""
                raise RuntimeError(markers.crash_message(forwarded, path))
            await ws.send(message)

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.path.startswith("/private"):
            return connection.respond(403, "Forbidden\n")
        return None

    def resolve_consent(request: Request) -> frozenset[str] | None:
        return purposes if consent_via == "resolver" else None

    config: dict[str, Any] = {
        "trusted_proxies": ["127.0.0.1"],
        "user_id_resolver": lambda request: request.headers.get("X-User-Id"),
        "consent_resolver": resolve_consent,
        "log_payloads": PAYLOAD_LIMIT,
        "metrics": False,
        **(options or {}),
    }
    config["sinks"] = (*config.get("sinks", ()), counter)

    log_file = tmp_path / "ws.log"
    journal_file = tmp_path / "consent.jsonl"
    setup = (
        setup_logging("DEBUG", fmt=fmt, filename=log_file, consent_journal=journal_file)
        if fmt is not None
        else None
    )
    try:
        async with ws_monitoring.serve(
            handler, HOST, 0, process_request=process_request, **config
        ) as server:
            port = server.sockets[0].getsockname()[1]
            base = f"ws://{HOST}:{port}"
            async with connect(
                f"{base}/chat{query}",
                additional_headers={**_headers(markers), "X-Forwarded-For": markers.ipv4},
            ) as client:
                await client.send(markers.text_payload)
                assert await client.recv() == markers.text_payload
                await client.send(markers.binary_payload)
                assert await client.recv() == markers.binary_payload
                await client.send("crash")
                with contextlib.suppress(ConnectionClosed):
                    await client.recv()
            async with connect(
                f"{base}/chat{query}",
                additional_headers={
                    **_headers(markers),
                    "Forwarded": f'for="[{markers.ipv6}]:4711";proto=ws',
                },
            ) as client:
                await client.send(markers.text_payload)
                assert await client.recv() == markers.text_payload
            for path in markers.identifier_paths():
                async with connect(
                    f"{base}{path}{query}", additional_headers=_headers(markers)
                ) as client:
                    await client.send(markers.text_payload)
                    assert await client.recv() == markers.text_payload
            with pytest.raises(InvalidStatus) as rejected:
                await connect(f"{base}/private{query}", additional_headers=_headers(markers))
            assert rejected.value.response.status_code == 403
            closed = 2 + len(markers.identifier_paths())
            await async_wait_until(lambda: counter.closed == closed, what="all connections closed")
    finally:
        if setup is not None:
            assert await asyncio.to_thread(setup.flush), "log lines were not written in time"
            setup.close()

    texts = {}
    lines: list[dict[str, Any]] = []
    journal: list[dict[str, Any]] = []
    if fmt is not None:
        texts["log"] = log_file.read_text(encoding="utf-8")
        texts["journal"] = journal_file.read_text(encoding="utf-8")
        if fmt in ("json", "ecs"):
            lines = [json.loads(line) for line in texts["log"].splitlines()]
        journal = [json.loads(line) for line in texts["journal"].splitlines()]
    return LeakRun(markers, purposes, texts, lines, journal, port)
