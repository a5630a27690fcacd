"""Privacy layer: one anonymizer and one consent model for every sink.

Every sink emits client data only through what this module produces: the
:class:`Client` view on each connection record (``record.client``), and the scrubbers
:meth:`Privacy.scrub` (span attributes, Alertmanager labels and annotations, log
extras), :meth:`Privacy.scrub_text` (free text) and :meth:`Privacy.scrub_event`
(Sentry events, inside ``before_send``). One :class:`Privacy` exists per instrumented
server (``monitor.privacy``); :func:`ws_monitoring.consent.privacy_of` finds it from a
connection, a server or an instrumented handler.

Defaults (no consent):

* Client IPs are truncated: the last octet of IPv4, the last 80 bits of IPv6 (IPv4
  addresses mapped into IPv6 are treated as IPv4). With ``config.pseudonymize_ips`` they
  are replaced by a keyed hash instead.
* Pseudonyms are HMAC-SHA256 (first 128 bits, hex) with a secret key from
  ``config.pseudonym_key``, else ``WS_MONITORING_PSEUDONYM_KEY``, else a random
  per-process key (pseudonyms then change across restarts; one warning per server).
  Kinds are domain-separated: a user id and an IP with the same text hash differently.
* User ids (``config.user_id_resolver(request)``, else websockets' basic-auth
  ``connection.username``, else the user name of a ``Basic`` ``Authorization`` header)
  are pseudonymized.
* Query strings are dropped; ``Authorization``, ``Cookie``, ``Sec-WebSocket-Key`` and
  token-like fields are never emitted; payloads are never emitted.
* Paths (``url.path``, URL fields, the default route) keep their words; segments that
  look like identifiers become ``{id}`` (:func:`safe_path`, rule table in
  :func:`is_identifier`).
* Exception messages, wherever a sink shows one (logs, spans, Sentry), follow
  ``config.exception_messages`` (:meth:`Privacy.exception_text`); type and stack frames
  are always shown. Alertmanager alerts name exception types only, never a message.

Consent purposes (:data:`PURPOSES`): ``"ip"`` (raw client IP), ``"user"`` (raw user id),
``"payload"`` (message payloads in DEBUG logs, truncated to ``config.log_payloads``).
Consent comes from, in order: an explicit per-connection :func:`~ws_monitoring.grant` or
:func:`~ws_monitoring.withdraw`; a per-user entry (:meth:`Privacy.grant_user` or
:meth:`Privacy.withdraw_user`, applying to that user's later connections);
``config.consent_resolver(request)``; else none.

The client IP is the peer address, unless the peer is one of ``config.trusted_proxies``:
then the ``Forwarded`` header (RFC 7239), or else ``X-Forwarded-For``, is walked from
the right, skipping trusted proxies; the first other hop is the client (``None`` when
that hop is not an IP address, e.g. ``unknown`` or an obfuscated node). Headers from an
untrusted peer are ignored.

Consent journal: every grant and withdrawal is logged at INFO on the
``ws_monitoring.consent`` logger (:data:`JOURNAL_LOGGER`) with the entry in the record
attribute ``consent_entry``: ``time`` (UTC ISO-8601), ``action`` (``grant`` or
``withdraw``), ``scope`` (``connection`` or ``user``), ``subject`` (pseudonymous:
``user:<hash>``, ``ip:<hash>`` or ``connection:<uuid>``), ``connection_id``, ``purposes``
(those granted or withdrawn), ``consent`` (the purposes in force afterwards) and
``policy_version``. :func:`ws_monitoring.logging.setup.setup_logging` writes it as JSON
lines to its own file (``consent_journal=path``). It never holds a raw identifier.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import threading
import traceback
import weakref
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

from .config import Config

__all__ = [
    "IDENTIFIER",
    "JOURNAL_LOGGER",
    "MAX_SCRUB_LENGTH",
    "NO_CONSENT",
    "PSEUDONYM_KEY_ENV",
    "PURPOSES",
    "PURPOSE_IP",
    "PURPOSE_PAYLOAD",
    "PURPOSE_USER",
    "Client",
    "Consent",
    "Privacy",
    "exception_type",
    "is_identifier",
    "mask_identifiers",
    "safe_path",
    "truncate_ip",
]

logger = logging.getLogger("ws_monitoring.privacy")
journal_logger = logging.getLogger("ws_monitoring.consent")

#: Logger of the consent journal.
JOURNAL_LOGGER = journal_logger.name
#: Environment variable holding the secret key for pseudonyms (UTF-8 text).
PSEUDONYM_KEY_ENV = "WS_MONITORING_PSEUDONYM_KEY"

PURPOSE_IP = "ip"
PURPOSE_USER = "user"
PURPOSE_PAYLOAD = "payload"
#: Every purpose a consent can name.
PURPOSES = frozenset({PURPOSE_IP, PURPOSE_USER, PURPOSE_PAYLOAD})

#: Replaces a value that must never be emitted.
REDACTED = "[redacted]"

# Drawn once at import and never changed: pseudonyms stay stable within a process
# across servers when no key is configured.
_PROCESS_KEY = secrets.token_bytes(32)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _check_purposes(purposes: Iterable[str]) -> frozenset[str]:
    if isinstance(purposes, str):
        raise TypeError("purposes: pass a collection of purposes, not a single string")
    result = frozenset(purposes)
    unknown = result - PURPOSES
    if unknown:
        raise ValueError(f"unknown consent purpose(s) {sorted(unknown)}; known: {sorted(PURPOSES)}")
    return result


_PROXY_TYPES = (weakref.ProxyType, weakref.CallableProxyType)
_PROXY_TEXT = "[weak reference]"


@dataclasses.dataclass(frozen=True)
class Consent:
    """What a data subject agreed to: ``purposes`` under ``policy_version``.

    Raises:
        ValueError: a purpose outside :data:`PURPOSES`.
    """

    purposes: frozenset[str] = frozenset()
    policy_version: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "purposes", _check_purposes(self.purposes))

    def allows(self, purpose: str) -> bool:
        return purpose in self.purposes


NO_CONSENT = Consent()


@dataclasses.dataclass(frozen=True, slots=True)  # slots: one per connection, kept small
class Client:
    """What sinks may emit about a client: anonymized unless consented.

    ``ip`` is the raw client IP only with consent to ``"ip"``, else truncated or
    pseudonymized; ``user`` is the raw user id only with consent to ``"user"``, else a
    pseudonym (``None`` when no user is known). ``subject`` is always pseudonymous: the
    consent journal's subject for this client.
    """

    ip: str | None
    user: str | None
    consent: Consent = NO_CONSENT
    subject: str | None = None

    def allows(self, purpose: str) -> bool:
        return self.consent.allows(purpose)


# -- IP addresses ---------------------------------------------------------------------------

_V4_KEEP = (1 << 32) - (1 << 8)  # /24
_V6_KEEP = (1 << 128) - (1 << 80)  # /48


def _parse_ip(address: str) -> IPAddress:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            # The zone names a local interface: not part of the address's identity.
            ip = ipaddress.IPv6Address(int(ip))
    return ip


def truncate_ip(address: str) -> str:
    """``address`` without its host bits: last octet of IPv4, last 80 bits of IPv6.

    IPv4-mapped IPv6 addresses are truncated as IPv4; an IPv6 zone is dropped.

    Raises:
        ValueError: ``address`` is not an IP address.
    """
    return str(_truncate(_parse_ip(address)))


def _truncate(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv4Address):
        return ipaddress.IPv4Address(int(ip) & _V4_KEEP)
    return ipaddress.IPv6Address(int(ip) & _V6_KEEP)


def _parse_node(node: str) -> IPAddress | None:
    """An IP from a ``Forwarded``/``X-Forwarded-For`` node, without port; else ``None``."""
    node = node.strip().strip('"').strip()
    if node.startswith("["):
        node = node[1:].split("]", 1)[0]
    elif node.count(":") == 1:
        node = node.split(":", 1)[0]
    try:
        return _parse_ip(node)
    except ValueError:
        return None


def _forwarded_for(values: list[str]) -> list[str]:
    """The ``for=`` nodes of ``Forwarded`` header values, left to right."""
    nodes: list[str] = []
    for value in values:
        for element in value.split(","):
            node = "unknown"  # an element without for= hides its client
            for pair in element.split(";"):
                name, _, param = pair.partition("=")
                if name.strip().lower() == "for":
                    node = param
            nodes.append(node)
    return nodes


# -- scrubbing rules ------------------------------------------------------------------------

_SECRET_KEY = re.compile(
    r"auth|cookie|token|secret|passw|session|api_?key|apikey|credential|private_?key"
    r"|signature|jwt|csrf|xsrf|bearer|sec_websocket_key|x_api",
)
_IP_KEYS = frozenset(
    {
        "ip", "addr", "address", "client_ip", "remote_addr", "remote_address", "remote_ip",
        "peer", "peer_address", "peer_ip", "ip_address", "x_forwarded_for", "forwarded",
        "x_real_ip", "true_client_ip", "cf_connecting_ip", "x_client_ip",
    }
)  # fmt: skip
_USER_KEYS = frozenset(
    {"user", "user_id", "userid", "username", "user_name", "email", "login", "enduser"}
)
_USER_PATH = re.compile(r"(?:^|\.)(?:end)?user\.(?:id|name|username|email|login)$")
_QUERY_KEYS = frozenset({"query", "query_string", "querystring", "search", "params"})
_URL_KEYS = frozenset(
    {
        "url", "uri", "full", "target", "href", "referer", "referrer", "location", "path",
        "request_uri", "http_url", "http_target", "origin",
    }
)  # fmt: skip

_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f:.%]*")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_BEARER = re.compile(r"(?i)\b(bearer|basic|digest|token)(\s+)[A-Za-z0-9._~+/=-]+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Every repetition that can restart at many positions is bounded: scrubbing runs on
# text a client controls, on the event loop, and must stay linear in its length.
_SECRET_PARAM = re.compile(
    r"(?i)(?<![\w-])([\w-]{0,64}?(?:token|secret|passw\w{0,16}|api_?key|apikey|auth\w{0,16}|"
    r"session\w{0,16}|sid|key|cookie|jwt|signature|code))(\s{0,8}[=:]\s{0,8})"
    r"(\"[^\"]{0,4096}\"|'[^']{0,4096}'|(?:(?:bearer|basic|digest)\s{1,8})?[^\s&,;\"'<>]+)"
)
_QUERY = re.compile(r"\?[^\s\"'<>]*")
_USERINFO = re.compile(r"(?i)(?<![a-z0-9+.-])([a-z][a-z0-9+.-]{0,31}://)[^/\s@]{1,512}@")
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}")
#: Text longer than this is cut before it is scrubbed (and emitted).
MAX_SCRUB_LENGTH = 16384
_SURROGATE = re.compile("[\ud800-\udfff]")

_MAX_DEPTH = 32
#: Sentry event keys handled field by field; anything else goes through :meth:`scrub`.
_EVENT_SAFE = frozenset(
    {
        "event_id", "timestamp", "start_timestamp", "platform", "level", "logger", "sdk",
        "release", "environment", "server_name", "modules", "type", "fingerprint",
        "transaction_info", "measurements", "dist", "debug_meta",
    }
)  # fmt: skip


def _norm(key: object) -> str:
    return str(key).lower().replace("-", "_")


def _coerce_consent(value: Any) -> Consent:
    """A :class:`Consent` from what a ``consent_resolver`` returned."""
    if value is None:
        return NO_CONSENT
    if isinstance(value, Consent):
        return value
    if isinstance(value, Mapping):
        purposes = value.get("purposes", ())
        version = value.get("policy_version")
        return Consent(_known(purposes), None if version is None else str(version))
    return Consent(_known(value))


def _known(purposes: Any) -> frozenset[str]:
    if isinstance(purposes, str):
        purposes = (purposes,)
    given = frozenset(str(p) for p in purposes)
    if given - PURPOSES:
        logger.warning(
            "consent_resolver returned unknown purpose(s) %s: ignored", sorted(given - PURPOSES)
        )
    return given & PURPOSES


def _utc_now() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Privacy:
    """Anonymizer and consent state for one server's configuration.

    Thread-safe. ``max_users`` bounds the per-user consent entries kept in memory (the
    oldest entry is forgotten first); keep consent in your own store and supply
    ``config.consent_resolver`` beyond that.

    Raises:
        ValueError: an entry of ``config.trusted_proxies`` is not an IP or CIDR.
    """

    def __init__(self, config: Config, *, max_users: int = 100_000) -> None:
        self._config = config
        self._max_users = max_users
        self._lock = threading.Lock()
        self._users: dict[str, Consent] = {}
        self._warned = False
        proxies = []
        for entry in config.trusted_proxies:
            try:
                proxies.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ValueError(f"trusted_proxies: {entry!r} is not an IP or CIDR") from None
        self._proxies = tuple(proxies)
        key = config.pseudonym_key
        if key is None and (env := os.environ.get(PSEUDONYM_KEY_ENV)):
            key = env.encode()
        self._key = key

    @property
    def config(self) -> Config:
        return self._config

    # -- pseudonyms and IPs -----------------------------------------------------------------

    def _get_key(self) -> bytes:
        if self._key is not None:
            return self._key
        if not self._warned:
            self._warned = True
            logger.warning(
                "no pseudonym key (config.pseudonym_key or %s): using a random per-process "
                "key, so pseudonyms change when the process restarts",
                PSEUDONYM_KEY_ENV,
            )
        return _PROCESS_KEY

    def pseudonymize(self, value: str, kind: str = "user") -> str:
        """Keyed pseudonym of ``value``: 32 hex digits of HMAC-SHA256 over ``kind:value``."""
        message = f"{kind}:{value}".encode("utf-8", "surrogatepass")
        return hmac.new(self._get_key(), message, hashlib.sha256).hexdigest()[:32]

    def anonymize_ip(self, address: str) -> str:
        """``address`` truncated, or pseudonymized with ``config.pseudonymize_ips``.

        Raises:
            ValueError: ``address`` is not an IP address.
        """
        return self._anonymize(_parse_ip(address))

    def _anonymize(self, ip: IPAddress) -> str:
        if self._config.pseudonymize_ips:
            return self.pseudonymize(str(ip), "ip")
        return str(_truncate(ip))

    def _trusted(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self._proxies)

    def client_ip(self, remote_address: Any, request: Any) -> str | None:
        """The raw client IP (see the module docstring); ``None`` when unknown.

        Never emit it: it is for :meth:`client` and for callers that check consent.
        """
        ip = self._client_address(remote_address, request)
        return None if ip is None else str(ip)

    def _client_address(self, remote_address: Any, request: Any) -> IPAddress | None:
        host = remote_address[0] if isinstance(remote_address, tuple) and remote_address else None
        if not isinstance(host, str):
            return None
        try:
            peer = _parse_ip(host)
        except ValueError:
            return None
        headers = getattr(request, "headers", None)
        if headers is None or not self._proxies or not self._trusted(peer):
            return peer
        forwarded = headers.get_all("Forwarded")
        nodes = (
            _forwarded_for(forwarded)
            if forwarded
            else [n for v in headers.get_all("X-Forwarded-For") for n in v.split(",")]
        )
        if not nodes:
            return peer
        hop: IPAddress | None = None
        for node in reversed(nodes):
            hop = _parse_node(node)
            if hop is None or not self._trusted(hop):
                break
        return hop

    def user_id(self, request: Any, username: str | None = None) -> str | None:
        """The raw user id: ``user_id_resolver``, else ``username``, else basic auth."""
        resolver = self._config.user_id_resolver
        if resolver is not None and request is not None:
            try:
                user = resolver(request)
            except Exception as exc:
                logger.warning("user_id_resolver raised %s: no user id", type(exc).__name__)
            else:
                if user is not None and str(user):
                    return str(user)
        if username:
            return str(username)
        headers = getattr(request, "headers", None)
        authorization = headers.get("Authorization") if headers is not None else None
        if authorization:
            from websockets.exceptions import InvalidHeader
            from websockets.headers import parse_authorization_basic

            try:
                return parse_authorization_basic(authorization)[0] or None
            except InvalidHeader:
                return None
        return None

    # -- consent ----------------------------------------------------------------------------

    def consent_for(self, request: Any, user: str | None) -> Consent:
        """Consent of a new connection: the user's entry, else ``consent_resolver``."""
        if user is not None:
            # Outside the lock: the first pseudonym may log a warning, and formatting a
            # log line can need this very lookup (a connection's client view).
            key = self.pseudonymize(user)
            with self._lock:
                entry = self._users.get(key)
            if entry is not None:
                return entry
        resolver = self._config.consent_resolver
        if resolver is None or request is None:
            return NO_CONSENT
        try:
            return _coerce_consent(resolver(request))
        except Exception as exc:
            logger.warning("consent_resolver raised %s: no consent", type(exc).__name__)
            return NO_CONSENT

    def client(
        self,
        remote_address: Any,
        request: Any,
        *,
        username: str | None = None,
        consent: Consent | None = None,
    ) -> Client:
        """The privacy-safe view of a client; ``consent`` overrides the resolved one."""
        ip = self._client_address(remote_address, request)
        user = self.user_id(request, username)
        if consent is None:
            consent = self.consent_for(request, user)
        shown_ip = shown_user = subject = None
        if user is not None:
            alias = self.pseudonymize(user)
            subject = f"user:{alias}"
            shown_user = user if consent.allows(PURPOSE_USER) else alias
        if ip is not None:
            pseudonymize = self._config.pseudonymize_ips
            # One keyed hash at most: the shown pseudonym and the journal subject agree.
            ip_alias = self.pseudonymize(str(ip), "ip") if pseudonymize or subject is None else ""
            subject = subject or f"ip:{ip_alias}"
            if consent.allows(PURPOSE_IP):
                shown_ip = str(ip)
            else:
                shown_ip = ip_alias if pseudonymize else str(_truncate(ip))
        return Client(ip=shown_ip, user=shown_user, consent=consent, subject=subject)

    def user_consent(self, user_id: str) -> Consent | None:
        """The per-user consent entry of ``user_id``, or ``None`` if there is none."""
        with self._lock:
            return self._users.get(self.pseudonymize(str(user_id)))

    def grant_user(self, user_id: str, *, purposes: Iterable[str], policy_version: str) -> Consent:
        """Add ``purposes`` to the consent of ``user_id``'s later connections; journaled.

        Raises:
            ValueError: an unknown purpose or an empty ``policy_version``.
        """
        granted = _check_purposes(purposes)
        _check_version(policy_version)
        key = self.pseudonymize(str(user_id))
        with self._lock:
            old = self._users.pop(key, NO_CONSENT)
            new = Consent(old.purposes | granted, policy_version)
            self._store(key, new)
        self.journal("grant", f"user:{key}", granted, new, scope="user")
        return new

    def withdraw_user(
        self,
        user_id: str,
        *,
        purposes: Iterable[str] | None = None,
        policy_version: str | None = None,
    ) -> Consent:
        """Withdraw ``purposes`` (all if ``None``) for ``user_id``'s later connections.

        The entry is kept (with what remains), so a ``consent_resolver`` cannot
        override a withdrawal. Journaled.

        Raises:
            ValueError: an unknown purpose.
        """
        key = self.pseudonymize(str(user_id))
        with self._lock:
            old = self._users.pop(key, NO_CONSENT)
            removed = old.purposes if purposes is None else _check_purposes(purposes)
            new = Consent(old.purposes - removed, policy_version or old.policy_version)
            self._store(key, new)
        self.journal("withdraw", f"user:{key}", removed, new, scope="user")
        return new

    def _store(self, key: str, consent: Consent) -> None:
        self._users[key] = consent
        while len(self._users) > self._max_users:
            del self._users[next(iter(self._users))]

    def journal(
        self,
        action: str,
        subject: str,
        purposes: Iterable[str],
        consent: Consent,
        *,
        scope: str,
        connection_id: str | None = None,
    ) -> dict[str, Any]:
        """Append an entry to the consent journal and return it (see module docstring)."""
        entry: dict[str, Any] = {
            "time": _utc_now(),
            "action": action,
            "scope": scope,
            "subject": subject,
            "connection_id": connection_id,
            "purposes": sorted(purposes),
            "consent": sorted(consent.purposes),
            "policy_version": consent.policy_version,
        }
        journal_logger.info("consent %s", action, extra={"consent_entry": entry})
        return entry

    # -- scrubbing --------------------------------------------------------------------------

    def _replace_ip(self, match: re.Match[str]) -> str:
        text = match.group(0)
        # "2001:db8::" is an address; in "peer 2001:db8::1: closed" the last ":" is prose.
        for candidate in (text, text.rstrip(":.")):
            try:
                ip = _parse_ip(candidate)
                break
            except ValueError:
                continue
        else:
            return text
        if ip.is_loopback or ip.is_unspecified:
            # Identifies no one, and keeps "listening on 127.0.0.1:8765" readable.
            return text
        return self._anonymize(ip) + text[len(candidate) :]

    def scrub_text(self, text: str) -> str:
        """``text`` with IPs anonymized, emails pseudonymized, and query strings,
        URL credentials, bearer/basic credentials, JWTs and ``token=...``-like
        values removed. Lone surrogates become U+FFFD. Text longer than
        :data:`MAX_SCRUB_LENGTH` characters is cut first (``…[truncated]``)."""
        if len(text) > MAX_SCRUB_LENGTH:
            text = text[:MAX_SCRUB_LENGTH] + "…[truncated]"
        if _SURROGATE.search(text):
            text = _SURROGATE.sub("\ufffd", text)
        if "://" in text:
            text = _USERINFO.sub(r"\1", text)
        if "?" in text:
            text = _QUERY.sub("", text)
        if "eyJ" in text:
            text = _JWT.sub(REDACTED, text)
        text = _SECRET_PARAM.sub(rf"\1\2{REDACTED}", text)
        text = _BEARER.sub(rf"\1\2{REDACTED}", text)
        if "@" in text:
            text = _EMAIL.sub(lambda m: "user:" + self.pseudonymize(m.group(0)), text)
        if ":" in text:
            text = _IPV6_CANDIDATE.sub(self._replace_ip, text)
        if "." in text:
            text = _IPV4.sub(self._replace_ip, text)
        return text

    def scrub_url(self, url: str) -> str:
        """A URL or path safe to emit: no query, fragment or credentials; its path
        through :func:`safe_path` (identifier-like segments become ``{id}``); the
        rest of the URL through :meth:`scrub_text`."""
        url = url.split("?", 1)[0].split("#", 1)[0]
        if url.startswith("/"):
            return safe_path(url)
        scheme, sep, rest = url.partition("://")
        if not sep:
            return self.scrub_text(url)
        authority, slash, path = rest.partition("/")
        origin = self.scrub_text(f"{scheme}://{authority.rpartition('@')[2]}")
        return origin + safe_path("/" + path) if slash else origin

    # -- exceptions: one rule for every sink ---------------------------------------------

    def exception_text(self, message: str) -> str | None:
        """An exception message as every sink may emit it (``config.exception_messages``).

        ``"scrub"`` (default): through :meth:`scrub_text`, then every word the rule
        table calls an identifier (:func:`is_identifier`, text rules) becomes ``{id}``.
        ``"keep"``: as raised (lone surrogates replaced, cut to
        :data:`MAX_SCRUB_LENGTH`): client data quoted in messages leaves the process.
        ``"drop"``: ``None``, no message at all. Consent does not change it.
        """
        mode = self._config.exception_messages
        if mode == "drop":
            return None
        if mode == "keep":
            if len(message) > MAX_SCRUB_LENGTH:
                message = message[:MAX_SCRUB_LENGTH] + "…[truncated]"
            return _SURROGATE.sub("\ufffd", message)
        return mask_identifiers(self.scrub_text(message))

    def exception_message(self, exc: BaseException) -> str | None:
        """:meth:`exception_text` of ``str(exc)``; ``None`` when dropped or empty."""
        try:
            text = str(exc)
        except Exception:
            return None
        return self.exception_text(text) or None

    def exception_summary(self, exc: BaseException) -> str:
        """``Type: message`` (:meth:`exception_message`), or ``Type`` without a message.

        The type is qualified by its module unless it is a builtin, as tracebacks show it.
        """
        name = exception_type(exc)
        message = self.exception_message(exc)
        return name if message is None else f"{name}: {message}"

    def format_exception(self, exc: BaseException) -> str:
        """A traceback of ``exc`` and the exceptions it chains, messages by the rule.

        Stack frames (file, line, function, source line) as :mod:`traceback` shows
        them, through :meth:`scrub_text` (source lines may hold literals), at most 32
        per exception and 8 exceptions; each exception line is
        :meth:`exception_summary`. No final newline, as ``logging`` formats them.
        """
        chain: list[tuple[BaseException, str]] = []
        seen: set[int] = set()
        current: BaseException | None = exc
        link = ""
        while current is not None and id(current) not in seen and len(chain) < _MAX_CHAIN:
            seen.add(id(current))
            chain.append((current, link))
            if current.__cause__ is not None:
                current, link = current.__cause__, _CAUSE
            elif current.__context__ is not None and not current.__suppress_context__:
                current, link = current.__context__, _CONTEXT
            else:
                current = None
        parts: list[str] = []
        # Oldest first, as Python prints them; each one's link says how the next one
        # (newer) relates to it.
        for index, (item, _) in enumerate(reversed(chain)):
            if index:
                parts.append(chain[len(chain) - index][1])
            if item.__traceback__ is not None:
                frames = traceback.format_tb(item.__traceback__, limit=-_MAX_FRAMES)
                parts.append("Traceback (most recent call last):\n")
                parts.append(self.scrub_text("".join(frames)))
            parts.append(self.exception_summary(item) + "\n")
        return "".join(parts)[:-1]

    def scrub(self, mapping: Mapping[Any, Any], *, keep: Iterable[str] = ()) -> dict[str, Any]:
        """A copy of ``mapping`` safe to emit; the input is not modified.

        Recursive through mappings and lists. By key (case-insensitive, ``-`` = ``_``,
        judged on the last dotted component): secrets (``authorization``, ``cookie``,
        ``*token*``, ``sec-websocket-key``, ``password``...) and query strings
        (``query``, ``query_string``...) are dropped; IP fields (``client.ip``,
        ``x-forwarded-for``, ``network.peer.address``...) are anonymized, user fields
        (``user.id``, ``enduser.id``, ``username``, ``email``...) pseudonymized, URL
        fields lose their query string. Every other string goes through
        :meth:`scrub_text`; bytes are replaced by ``<N bytes>`` (they may be payloads).
        Keys in ``keep`` (exact, top level) are copied untouched: use it for values
        already taken from a :class:`Client` view. Depth is capped at 32 levels.
        """
        kept = frozenset(keep)
        result: dict[str, Any] = {}
        for key, value in mapping.items():
            name = str(key)
            if name in kept:
                result[name] = value
                continue
            out = self._scrub_item(name, value, 0)
            if out is not _DROP:
                result[name] = out
        return result

    def _scrub_item(self, key: str, value: Any, depth: int) -> Any:
        if type(value) in _PROXY_TYPES:
            # Any use of a dead weak proxy raises ReferenceError; nothing in one is
            # worth emitting anyway.
            return _PROXY_TEXT
        path = _norm(key)
        last = path.rsplit(".", 1)[-1]
        if _SECRET_KEY.search(last) or last in _QUERY_KEYS:
            return _DROP
        if value is None or isinstance(value, bool | int | float):
            return value
        if last in _IP_KEYS and not isinstance(value, Mapping):
            return self._scrub_ips(value, depth)
        if (last in _USER_KEYS or _USER_PATH.search(path)) and not isinstance(value, Mapping):
            return self._scrub_users(value, depth)
        if last in _URL_KEYS and isinstance(value, str):
            return self.scrub_url(value)
        return self._scrub_value(value, depth, path)

    def _scrub_value(self, value: Any, depth: int, path: str = "") -> Any:
        if type(value) in _PROXY_TYPES:
            return _PROXY_TEXT
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return self.scrub_text(value)
        if isinstance(value, bytes | bytearray | memoryview):
            return f"<{len(value)} bytes>"
        if depth >= _MAX_DEPTH:
            return "[depth limit]"
        if isinstance(value, Mapping):
            result: dict[str, Any] = {}
            for k, v in value.items():
                out = self._scrub_item(f"{path}.{k}" if path else str(k), v, depth + 1)
                if out is not _DROP:
                    result[str(k)] = out
            return result
        if isinstance(value, list | tuple | set | frozenset):
            return [self._scrub_value(v, depth + 1, path) for v in value]
        try:
            text = str(value)
        except Exception:
            text = f"<unprintable {type(value).__name__}>"
        return self.scrub_text(text)

    def _scrub_ips(self, value: Any, depth: int) -> Any:
        if isinstance(value, list | tuple):
            return [self._scrub_ips(v, depth + 1) for v in value]
        if not isinstance(value, str):
            return REDACTED
        parts = []
        for part in value.split(","):
            ip = _parse_node(part)
            parts.append(REDACTED if ip is None else self._anonymize(ip))
        return ", ".join(parts)

    def _scrub_users(self, value: Any, depth: int) -> Any:
        if isinstance(value, list | tuple):
            return [self._scrub_users(v, depth + 1) for v in value]
        return self.pseudonymize(str(value))

    def scrub_event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of a Sentry event safe to send; use it inside ``before_send``.

        ``request``: ``url`` loses its query, ``query_string``, ``cookies`` and
        ``data`` are dropped, ``headers`` and ``env`` are scrubbed (``REMOTE_ADDR``
        anonymized). ``user``: ids, names and emails pseudonymized, ``ip_address``
        anonymized. Exception and thread stack frames lose their local variables
        (``vars``: they hold payloads); exception values, messages, log entries and
        breadcrumbs go through :meth:`scrub_text`/:meth:`scrub`. ``extra``,
        ``contexts``, ``tags``, ``spans`` and unknown keys go through :meth:`scrub`.
        """
        result: dict[str, Any] = {}
        for key, value in event.items():
            if key in _EVENT_SAFE:
                result[key] = value
            elif key == "request" and isinstance(value, Mapping):
                result[key] = self._scrub_request(value)
            elif key == "user" and isinstance(value, Mapping):
                result[key] = self._scrub_user(value)
            elif key in ("exception", "threads") and isinstance(value, Mapping):
                result[key] = self._scrub_exceptions(value)
            elif key == "breadcrumbs":
                result[key] = self._scrub_breadcrumbs(value)
            elif key == "transaction" and isinstance(value, str):
                result[key] = self.scrub_url(value)
            else:
                out = self._scrub_item(key, value, 0)
                if out is not _DROP:
                    result[key] = out
        return result

    def _scrub_request(self, request: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in request.items():
            if key in ("query_string", "cookies", "data"):
                continue
            if key == "url" and isinstance(value, str):
                result[key] = self.scrub_url(value)
            elif key in ("headers", "env") and isinstance(value, Mapping):
                result[key] = self.scrub(value)
            elif key == "method":
                result[key] = value
            else:
                out = self._scrub_item(key, value, 1)
                if out is not _DROP:
                    result[key] = out
        return result

    def _scrub_user(self, user: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in user.items():
            if value is None:
                result[key] = None
            elif key in ("id", "username", "email", "name"):
                result[key] = self.pseudonymize(str(value))
            elif key == "ip_address":
                ip = _parse_node(str(value))
                # Anything else ("{{auto}}") would let Sentry fill in the raw address.
                result[key] = None if ip is None else self._anonymize(ip)
            else:
                out = self._scrub_item(key, value, 1)
                if out is not _DROP:
                    result[key] = out
        return result

    def _scrub_exceptions(self, container: Mapping[str, Any]) -> dict[str, Any]:
        values = container.get("values")
        result = {k: v for k, v in container.items() if k != "values"}
        if not isinstance(values, list):
            return result
        cleaned = []
        for item in values:
            if not isinstance(item, Mapping):
                continue
            entry = dict(item)
            if isinstance(entry.get("value"), str):
                entry["value"] = self.exception_text(entry["value"]) or ""
            stacktrace = entry.get("stacktrace")
            if isinstance(stacktrace, Mapping):
                frames = stacktrace.get("frames")
                entry["stacktrace"] = {
                    **stacktrace,
                    "frames": [
                        {k: v for k, v in frame.items() if k != "vars"}
                        for frame in (frames if isinstance(frames, list) else [])
                        if isinstance(frame, Mapping)
                    ],
                }
            cleaned.append(entry)
        result["values"] = cleaned
        return result

    def _scrub_breadcrumbs(self, breadcrumbs: Any) -> Any:
        if isinstance(breadcrumbs, Mapping):
            values = breadcrumbs.get("values")
            return {**breadcrumbs, "values": self._scrub_breadcrumbs(values or [])}
        if isinstance(breadcrumbs, list):
            return [self._scrub_value(crumb, 1) for crumb in breadcrumbs]
        return []


_DROP: Any = object()

_MAX_CHAIN = 8
_MAX_FRAMES = 32
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def exception_type(exc: BaseException) -> str:
    """The exception's class, qualified by its module unless a builtin (or ``__main__``)."""
    cls = type(exc)
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


# -- identifiers: one rule table for routes, url.path and exception messages ----------------

#: What an identifier-like path segment or word of text becomes.
IDENTIFIER = "{id}"
#: What the path segments past :data:`MAX_PATH_SEGMENTS` or the length budget become.
REST = "{rest}"
#: Path segments kept before the rest is folded into ``{rest}``.
MAX_PATH_SEGMENTS = 16
#: Segments or words longer than this are identifiers, whatever they hold.
MAX_WORD_LENGTH = 32

_NUMBER = re.compile(r"[+-]?[0-9][0-9.,:_-]*")
_HEX_RUN = re.compile(r"[0-9A-Fa-f]{8,}")
_PATH_WORD = re.compile(r"[A-Za-z0-9._~-]+")
_DIGIT = re.compile(r"[0-9]")
_SEGMENT = re.compile(r"[^/]+")
# Changes of character class: random strings are full of them, words are not.
_JUMP = re.compile(r"[a-z](?=[A-Z])|[A-Za-z](?=[0-9])|[0-9](?=[A-Za-z])")
# A word of free text, as the rule table judges it in exception messages.
_TEXT_WORD = re.compile(r"[^\s/\\'\"`()\[\]{}<>,;|!?#&*^$]+")


def is_identifier(word: str, *, path: bool = True) -> bool:
    """Whether ``word`` may identify someone or something: the rule table.

    ``word`` is a percent-decoded path segment (``path=True``) or a word of free text
    (``path=False``: small numbers and non-ASCII words are then ordinary words). The
    first matching rule decides:

    ====  ====================================================  ===========================
    rule  an identifier when the word...                        examples
    ====  ====================================================  ===========================
    1     is longer than 32 characters (every JWT, UUIDs        ``eyJhbGci….eyJzdWIi….sig``,
          with dashes, long base64 or hex)                      ``3f2b8c1e-9d4a-4c1b-…``
    2     contains ``@`` (emails, ``user@host``)                ``alice@example.com``
    3     has 3 or more digits                                  ``room123``, ``a1b2c3``,
                                                                ``+15551234``
    4     (path) is a number: a digit, then digits and          ``7``, ``42``, ``1.5``,
          ``.,:_-``                                             ``2024-01-31``
    5     is 8+ hex digits, one at least a digit (UUIDs         ``5f3a9c21``, ``deadbee1``
          without dashes, hashes, ids)
    6     (path) holds anything but ASCII letters, digits,      ``josé``, ``a+b``, ``a b``,
          ``-``, ``_``, ``.``, ``~`` (base64 ``+/=``, spaces,   ``dGVzdA==``, ``a%2Fb``
          non-ASCII, control characters, an encoded ``/``)
    7     has 8+ characters and 3+ class changes                ``aZbYcXdW``, ``kQzPwMvN``
          (lower→upper, letter↔digit), at least one every
          4 characters: random-looking
    —     otherwise it is a word, kept                          ``rooms``, ``v1``, ``feed``,
                                                                ``socket.io``, ``getUser``
    ====  ====================================================  ===========================

    Plain words stay, whatever they mean: a user *name* made of letters (``/u/alice``)
    looks like any other word. Paths that carry such names need ``routes=``.
    """
    n = len(word)
    if n > MAX_WORD_LENGTH or "@" in word:
        return True
    digits = len(_DIGIT.findall(word))
    if digits >= 3 or (digits and path and _NUMBER.fullmatch(word)):
        return True
    if digits and n >= 8 and _HEX_RUN.fullmatch(word):
        return True
    if path and not _PATH_WORD.fullmatch(word):
        return True
    if n >= 8:
        jumps = len(_JUMP.findall(word))
        if jumps >= 3 and jumps * 4 >= n:
            return True
    return False


def safe_path(path: str, *, max_length: int = 128) -> str:
    """``path`` with every segment that may carry an identifier replaced by ``{id}``.

    The default route grouping, and what spans and logs show as a path. The query
    string and fragment are dropped; each segment is percent-decoded, then judged by
    :func:`is_identifier` (a kept segment is shown decoded); empty segments (``//``)
    are dropped, a trailing ``/`` is kept. Past :data:`MAX_PATH_SEGMENTS` segments, or
    past ``max_length`` characters, the rest becomes one ``{rest}``. The result starts
    with ``/`` and holds only ASCII letters, digits, ``-_.~/`` and placeholders.

    Linear in the length of ``path``, and it stops at the first segment that does not fit.
    """
    path = path.split("?", 1)[0].split("#", 1)[0]
    budget = max_length - len(REST) - 1
    out: list[str] = []
    size = 0
    rest = False
    for found in _SEGMENT.finditer(path):
        raw = found.group(0)
        if len(out) == MAX_PATH_SEGMENTS:
            rest = True
            break
        if len(raw) > 3 * MAX_WORD_LENGTH:
            # Longer than any word even once decoded: not worth decoding.
            segment = IDENTIFIER
        else:
            word = unquote(raw, errors="replace") if "%" in raw else raw
            segment = IDENTIFIER if is_identifier(word) else word
        size += len(segment) + 1
        if size > budget:
            rest = True
            break
        out.append(segment)
    if rest:
        out.append(REST)
    route = "/" + "/".join(out)
    return route + "/" if path.endswith("/") and out and not rest else route


def mask_identifiers(text: str) -> str:
    """``text`` with each word that :func:`is_identifier` (text rules) flags made ``{id}``.

    Words that are IP addresses are left alone: :meth:`Privacy.scrub_text` has already
    anonymized them.
    """
    return _TEXT_WORD.sub(_mask_word, text)


def _mask_word(match: re.Match[str]) -> str:
    word = match.group(0)
    if not is_identifier(word, path=False):
        return word
    for candidate in (word, word.rstrip(":.")):
        try:
            _parse_ip(candidate)
        except ValueError:
            continue
        return word
    return IDENTIFIER


def _check_version(policy_version: Any) -> None:
    if not isinstance(policy_version, str) or not policy_version:
        raise ValueError("policy_version: a non-empty string naming the policy consented to")
