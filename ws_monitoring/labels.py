"""Bounded label values: routes, close codes, handshake statuses, error types.

No label value comes straight from a client. Routes go through a grouping (templates or
a function) and a hard limit; close codes and statuses map to fixed sets.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

from .config import ROUTE_PLACEHOLDER, Config

__all__ = [
    "ERROR_TYPES",
    "RouteMapper",
    "close_code_label",
    "handshake_status_label",
]

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
    used (``None`` or a non-string means unmatched). Without either, the route is the
    path. In every case at most ``config.max_routes`` distinct routes get their own
    value; later ones get ``config.overflow_route``. Thread-safe.
    """

    def __init__(self, config: Config) -> None:
        self._unmatched = config.unmatched_route
        self._overflow = config.overflow_route
        self._max = config.max_routes
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()
        self._folded = 0
        routes = config.routes
        self._templates: list[tuple[re.Pattern[str], str]] = []
        self._func: Callable[[str], str | None] | None = None
        if callable(routes):
            self._func = routes
        elif routes is not None:
            self._templates = [(_compile_template(t), t) for t in routes]

    @property
    def folded(self) -> int:
        """How many connections had their route folded into the overflow value."""
        return self._folded

    def group(self, path: str) -> str:
        """The route template (or raw route) for ``path``, before the series limit."""
        path = path.split("?", 1)[0]
        if self._func is not None:
            try:
                route = self._func(path)
            except Exception:
                return self._unmatched
            return route if isinstance(route, str) and route else self._unmatched
        if self._templates:
            for pattern, template in self._templates:
                if pattern.fullmatch(path):
                    return template
            return self._unmatched
        return path or "/"

    def __call__(self, path: str) -> str:
        """The bounded ``route`` label for ``path``."""
        route = self.group(path)
        label = self._seen.get(route)
        if label is not None:
            return label
        with self._lock:
            label = self._seen.get(route)
            if label is None:
                if len(self._seen) < self._max:
                    label = self._seen[route] = route
                else:
                    # Not remembered: the table stays bounded whatever clients send.
                    self._folded += 1
                    return self._overflow
            return label

    def peek(self, path: str) -> str:
        """The label ``path`` has without claiming a place in the table (for rejected requests).

        A route already in the table, or a template (bounded by configuration), is
        returned as is; anything else is the overflow value.
        """
        route = self.group(path)
        label = self._seen.get(route)
        if label is not None:
            return label
        if self._templates or route == self._unmatched:
            return route
        return self._overflow
