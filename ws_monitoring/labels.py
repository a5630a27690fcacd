"""Bounded label values: routes, close codes, handshake statuses, error types.

No label value comes straight from a client. Routes go through a grouping (templates or
a function) and a hard limit; close codes and statuses map to fixed sets.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import ROUTE_PLACEHOLDER, Config
from .privacy import Privacy, safe_path

if TYPE_CHECKING:
    from websockets.http11 import Request

__all__ = [
    "ERROR_TYPES",
    "MAX_LABEL_LENGTH",
    "NO_TENANT",
    "OTHER_TENANT",
    "LabelTable",
    "RouteMapper",
    "TenantMapper",
    "clean_label",
    "close_code_label",
    "handshake_status_label",
]

logger = logging.getLogger("ws_monitoring")

#: Every value the ``type`` label of ``websocket_errors_total`` can take.
ERROR_TYPES = (
    "handler_exception",  # the handler raised (the connection closes with 1011)
    "protocol_error",  # the client broke RFC 6455 (1002)
    "message_too_big",  # a message over max_size (1009)
    "invalid_payload",  # invalid UTF-8 in a text message (1007)
    "timeout",  # keepalive ping timeout, or a close handshake that timed out
    "connection_reset",  # the TCP connection ended without a closing handshake (1006)
    "internal_error",  # anything else websockets reported as a failure
)

# RFC 6455 section 7.4.1 and the IANA registry: codes worth their own series.
_KNOWN_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 1015}
)
_CODE_LABELS = {code: str(code) for code in _KNOWN_CODES}


def close_code_label(code: int | None) -> str:
    """Map a close code to a bounded label: known codes by number, ``3xxx``, ``4xxx``, ``other``.

    ``None`` (no close frame at all) is reported as ``1006``, as websockets does.
    """
    if code is None:
        return "1006"
    label = _CODE_LABELS.get(code)
    if label is not None:
        return label
    if 3000 <= code <= 3999:
        return "3xxx"
    if 4000 <= code <= 4999:
        return "4xxx"
    return "other"


#: Fixed ``status`` values for handshakes that failed before any HTTP response.
HANDSHAKE_FAILURES = ("invalid_request", "timeout", "connection_lost", "error")


def handshake_status_label(status: int | None, failure: str | None) -> str:
    """Label for a failed handshake: the HTTP status sent, or a fixed failure kind."""
    if status is not None and 100 <= status <= 599:
        return str(status)
    return failure if failure in HANDSHAKE_FAILURES else "error"


#: Longest label value, in characters: longer ones are cut (``…`` last).
MAX_LABEL_LENGTH = 128
#: Longest ``tenant`` value, in characters.
MAX_TENANT_LENGTH = 64
#: Sightings a new value needs once its table is half full (see :class:`LabelTable`).
ADMIT_AFTER = 3
#: Candidates (values not admitted yet) whose sightings a table counts, per admitted value.
CANDIDATES = 8
#: ``tenant`` of a connection whose tenant is unknown (the function returned None).
NO_TENANT = "__none__"
#: ``tenant`` of the tenants past the allow-list or the ``max_tenants`` cap.
OTHER_TENANT = "__other__"

# C0 and C1 controls (ANSI escapes start with one), DEL, and the invisible format
# characters that reorder or hide text (bidi overrides, zero-width, BOM).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_label(value: str, limit: int = MAX_LABEL_LENGTH) -> str:
    """``value`` fit for a label: control characters removed, lone surrogates replaced
    by U+FFFD, cut to ``limit`` characters (the last one then ``…``)."""
    if not value.isprintable():
        value = _CONTROL.sub("", value)
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    if not value.isascii() and _SURROGATE.search(value):
        value = _SURROGATE.sub("\ufffd", value)
    return value


class LabelTable:
    """A bounded set of label values; values past it fold into ``overflow``.

    While fewer than half of ``limit`` values are admitted, a new value is admitted at
    once. Past that, a value is admitted on its :data:`ADMIT_AFTER`-th sighting: values
    seen once (a scanner, a typo, an attacker's junk) cannot crowd out values in steady
    use. Sightings are counted for at most ``CANDIDATES * limit`` candidates; a new one
    evicts the oldest candidate seen only once (else the oldest): a value seen twice
    is never evicted by one-off values, and a value seen once survives the next
    ``CANDIDATES * limit`` one-off values. Memory: ``(CANDIDATES + 1) * limit`` values
    at most. Thread-safe; a known value costs one dict lookup and no lock.
    """

    def __init__(self, limit: int, overflow: str, *, admit_after: int = ADMIT_AFTER) -> None:
        self._limit = limit
        self._free = (limit + 1) // 2
        self._admit_after = admit_after
        self._max_candidates = CANDIDATES * limit
        self._overflow = overflow
        self._seen: dict[str, str] = {}
        self._candidates: dict[str, int] = {}
        self._lock = threading.Lock()
        self._folded = 0

    @property
    def folded(self) -> int:
        """How many times a value was folded into the overflow value."""
        return self._folded

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, value: object) -> bool:
        return value in self._seen

    def __call__(self, value: str) -> str:
        """``value`` if admitted (now or before), else the overflow value (counted)."""
        label = self._seen.get(value)
        if label is not None:
            return label
        with self._lock:
            label = self._seen.get(value)
            if label is None:
                if not self._admit(value):
                    self._folded += 1
                    return self._overflow
                label = self._seen[value] = value
            return label

    def _admit(self, value: str) -> bool:
        seen = len(self._seen)
        if seen < self._free:
            return True
        if seen >= self._limit:
            return False
        candidates = self._candidates
        count = candidates.pop(value, 0) + 1
        if count >= self._admit_after:
            return True
        if count == 1 and len(candidates) >= self._max_candidates:
            # Make room: the oldest candidate seen once, else the oldest of all.
            victim = next((k for k, n in candidates.items() if n == 1), next(iter(candidates)))
            del candidates[victim]
        candidates[value] = count  # (re)inserted last: the most recently seen
        return False

    def peek(self, value: str) -> str:
        """``value`` if admitted, else the overflow value; counts nothing."""
        return self._seen.get(value, self._overflow)


_PLACEHOLDER = ROUTE_PLACEHOLDER  # Config checked the templates with it


def _compile_template(template: str) -> re.Pattern[str]:
    # Config has checked the template starts with "/".
    pattern, pos = [], 0
    for match in _PLACEHOLDER.finditer(template):
        pattern.append(re.escape(template[pos : match.start()]))
        pattern.append(".+" if match.group(2) else "[^/]+")
        pos = match.end()
    pattern.append(re.escape(template[pos:]))
    return re.compile("".join(pattern))


class RouteMapper:
    """Maps a request path to a bounded ``route`` label.

    With templates, the first template that matches the whole path (query dropped) wins,
    and unmatched paths get ``config.unmatched_route``. With a function, its result is
    used (``None`` or a non-string means unmatched). Without either, the route is
    :func:`~ws_monitoring.privacy.safe_path` of the path (identifier-like segments
    become ``{id}``), or with ``config.route_from_path`` the raw path (unsafe). Every
    route is then :func:`clean_label`-ed (at most :data:`MAX_LABEL_LENGTH` characters,
    no control character), and a :class:`LabelTable` of ``config.max_routes`` routes
    bounds the values; later ones get ``config.overflow_route``. Thread-safe.
    """

    def __init__(self, config: Config) -> None:
        self._unmatched = config.unmatched_route
        self._table = LabelTable(config.max_routes, config.overflow_route)
        self._raw = config.route_from_path
        routes = config.routes
        self._templates: list[tuple[re.Pattern[str], str]] = []
        self._func: Callable[[str], str | None] | None = None
        if callable(routes):
            self._func = routes
        elif routes is not None:
            self._templates = [(_compile_template(t), clean_label(t)) for t in routes]

    @property
    def folded(self) -> int:
        """How many connections had their route folded into the overflow value."""
        return self._table.folded

    def group(self, path: str) -> str:
        """The route (template, function result or grouped path), before the series limit."""
        path = path.split("?", 1)[0]
        if self._func is not None:
            try:
                route = self._func(path)
            except Exception:
                return self._unmatched
            return clean_label(route) if isinstance(route, str) and route else self._unmatched
        if self._templates:
            for pattern, template in self._templates:
                if pattern.fullmatch(path):
                    return template
            return self._unmatched
        if self._raw:
            return clean_label(path or "/")
        return safe_path(path, max_length=MAX_LABEL_LENGTH)

    def __call__(self, path: str, *, grouped: bool = False) -> str:
        """The bounded ``route`` label for ``path``.

        ``grouped``: ``path`` is already a route (a framework's template, see
        :mod:`ws_monitoring.adapters.asgi`): only the table's bounds apply.
        """
        return self._table(path if grouped else self.group(path))

    def peek(self, path: str, *, grouped: bool = False) -> str:
        """The label ``path`` has without claiming a place in the table (for rejected requests).

        A route already in the table, or a template (bounded by configuration, or
        ``grouped``: a framework's), is returned as is; anything else is the overflow value.
        """
        route = path if grouped else self.group(path)
        if route in self._table or grouped or self._templates or route == self._unmatched:
            return route
        return self._table.peek(route)


class TenantMapper:
    """Maps an opening handshake request to a bounded ``tenant`` label.

    ``config.tenant(request)`` names the tenant: ``None`` (or a failure, or not a
    string) is :data:`NO_TENANT`. With ``config.tenants``, a name in that allow-list is
    its own label and any other is :data:`OTHER_TENANT`. Without, the name goes through
    the privacy scrubber (emails pseudonymized, IPs truncated, tokens redacted) and
    :func:`clean_label` (at most :data:`MAX_TENANT_LENGTH` characters), then a
    :class:`LabelTable` of ``config.max_tenants`` values: later ones are
    :data:`OTHER_TENANT`. The same value goes to metrics, logs and spans. Thread-safe.
    """

    def __init__(self, config: Config, privacy: Privacy) -> None:
        if config.tenant is None:
            raise ValueError("TenantMapper needs config.tenant")
        self._func = config.tenant
        self._allowed = config.tenants
        self._privacy = privacy
        self._table = LabelTable(config.max_tenants, OTHER_TENANT)
        self._warned = False

    @property
    def folded(self) -> int:
        """How many connections had their tenant folded into :data:`OTHER_TENANT`."""
        return self._table.folded

    def __call__(self, request: Request | None) -> str:
        """The ``tenant`` label of the connection ``request`` opened."""
        if request is None:
            return NO_TENANT
        try:
            name = self._func(request)
        except Exception as exc:
            if not self._warned:
                self._warned = True
                logger.warning("tenant function raised %s: tenant unknown", type(exc).__name__)
            return NO_TENANT
        if not isinstance(name, str) or not name:
            return NO_TENANT
        if self._allowed is not None:
            return name if name in self._allowed else OTHER_TENANT
        name = clean_label(self._privacy.scrub_text(name), MAX_TENANT_LENGTH)
        if not name or name.startswith("__"):
            # Reserved for the fixed values; a client must not be able to pose as them.
            return OTHER_TENANT
        return self._table(name)
