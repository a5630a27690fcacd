"""Configuration: one frozen dataclass per instrumented server, from keywords and environment.

Precedence: an explicit keyword argument, then the documented environment variable,
then the default. ``None`` disables an optional feature. Nothing here is global: two
servers in one process may be configured differently.

Environment variables (all optional):

=====================================  ==============================================
``WS_MONITORING_NAMESPACE``            metric name prefix (default ``websocket``)
``WS_MONITORING_ROUTES``               comma-separated route templates (``/rooms/{id}``)
``WS_MONITORING_MAX_ROUTES``           series limit per metric for ``route`` (100)
``WS_MONITORING_METRICS``              ``0``/``false`` turns metrics off
``WS_MONITORING_SIZE_BUCKETS``         comma-separated byte bounds
``WS_MONITORING_DURATION_BUCKETS``     comma-separated second bounds (handling time)
``WS_MONITORING_HEALTH_PATH``          health path on the WebSocket port; empty = off
``WS_MONITORING_TRACING``              ``0``/``false`` turns message spans off
``WS_MONITORING_TRACE_SLOW_SECONDS``   always keep spans of messages slower than this
``WS_MONITORING_LOG_LIFECYCLE``        ``0``/``false`` turns lifecycle logs off
``WS_MONITORING_TRUSTED_PROXIES``      comma-separated IPs/CIDRs allowed to set X-Forwarded-For
``WS_MONITORING_PSEUDONYMIZE_IPS``     ``1``/``true``: HMAC IPs instead of truncating them
``WS_MONITORING_PSEUDONYM_KEY``        secret key for HMAC-SHA256 pseudonyms
``PROMETHEUS_MULTIPROC_DIR``           enables prometheus_client multiprocess mode
=====================================  ==============================================
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from websockets.http11 import Request

    from .typing import Data, Sink

__all__ = ["Config"]

RouteGrouping = Sequence[str] | Callable[[str], str | None]
#: What exception messages become in every sink (see ``Privacy.exception_text``).
ExceptionMessages = Literal["scrub", "keep", "drop"]

DEFAULT_SIZE_BUCKETS = (64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0)
DEFAULT_DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
DEFAULT_CONNECTION_DURATION_BUCKETS = (
    0.1, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
)  # fmt: skip
DEFAULT_HANDSHAKE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
DEFAULT_RTT_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

_NAMESPACE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_FALSE = {"0", "false", "no", "off"}
_TRUE = {"1", "true", "yes", "on"}


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise ValueError(f"{name}={raw!r}: expected one of 0/1/true/false/yes/no/on/off")


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [item.strip() for item in raw.split(",") if item.strip()]


def _env_buckets(name: str) -> tuple[float, ...] | None:
    items = _env_list(name)
    if not items:
        # Unset or empty: the default, as for every other variable.
        return None
    try:
        return tuple(float(item) for item in items)
    except ValueError:
        raise ValueError(f"{name}={os.environ[name]!r}: expected comma-separated numbers") from None


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None


def _check_buckets(name: str, buckets: Sequence[float]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in buckets)
    if not bounds:
        raise ValueError(f"{name}: at least one bucket bound is needed")
    if any(b != b or b == float("inf") for b in bounds):
        raise ValueError(f"{name}: bounds must be finite numbers (+Inf is implicit)")
    if list(bounds) != sorted(set(bounds)):
        raise ValueError(f"{name}: bounds must be strictly increasing, got {list(bounds)}")
    return bounds


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Options of one instrumented server, grouped by concern.

    Build it with :meth:`from_options`, which applies environment variables and
    validates values (``ValueError``) and names (``TypeError``).
    """

    # -- metrics --------------------------------------------------------------------
    #: Metrics on or off. Off: the hot path does no metric work at all.
    metrics: bool = True
    #: Metric name prefix: ``{namespace}_connections_active`` and so on.
    namespace: str = "websocket"
    #: Registry the collector is registered in (``None``: prometheus_client's default).
    registry: CollectorRegistry | None = None
    #: Route templates (``/rooms/{room}``; ``{rest:path}`` spans segments) or a function
    #: path -> route (``None`` when unmatched). ``None``: the path without its query.
    routes: RouteGrouping | None = None
    #: Distinct ``route`` values per server before new ones fold into ``overflow_route``.
    max_routes: int = 100
    #: Label for paths no template matches.
    unmatched_route: str = "__unmatched__"
    #: Label for routes past ``max_routes``.
    overflow_route: str = "__overflow__"
    size_buckets: tuple[float, ...] = DEFAULT_SIZE_BUCKETS
    duration_buckets: tuple[float, ...] = DEFAULT_DURATION_BUCKETS
    connection_duration_buckets: tuple[float, ...] = DEFAULT_CONNECTION_DURATION_BUCKETS
    handshake_buckets: tuple[float, ...] = DEFAULT_HANDSHAKE_BUCKETS
    rtt_buckets: tuple[float, ...] = DEFAULT_RTT_BUCKETS

    # -- WebSocket port -------------------------------------------------------------
    #: Path answered with ``200 OK`` on the WebSocket port by :func:`ws_monitoring.serve`.
    health_path: str | None = "/healthz"

    # -- tracing (the [tracing] extra) ------------------------------------------------
    #: Message spans on or off. On without OpenTelemetry installed: a warning, then off.
    tracing: bool = True
    #: Always export spans of messages whose handling took longer (seconds); None: never.
    trace_slow_threshold: float | None = 1.0
    #: Make message spans children of the handshake span instead of new traces with a link.
    trace_messages_in_connection_trace: bool = False
    #: PRODUCER spans for sent messages.
    trace_sent_messages: bool = False
    #: Extract a carrier (``{"traceparent": ...}``) from a received message.
    context_from_message: Callable[[Data], Mapping[str, str] | None] | None = None

    # -- logging (the [logging] extra for JSON formatting) ---------------------------
    #: Lifecycle logs (opened, closed, rejected, crashed) on the ``ws_monitoring`` logger.
    log_lifecycle: bool = True
    #: Log payloads at DEBUG for connections that consented to ``payload``; max bytes.
    log_payloads: int | None = None

    # -- privacy ----------------------------------------------------------------------
    #: Peers whose ``Forwarded``/``X-Forwarded-For`` headers are believed (IPs or CIDRs).
    trusted_proxies: Sequence[str] = ()
    #: HMAC client IPs instead of truncating them.
    pseudonymize_ips: bool = False
    #: Secret for HMAC-SHA256 pseudonyms; ``None``: ``WS_MONITORING_PSEUDONYM_KEY`` or a
    #: random per-process key (pseudonyms then change across restarts).
    pseudonym_key: bytes | None = None
    #: Decides consent from the opening handshake request.
    consent_resolver: Callable[[Request], Any] | None = None
    #: Extracts a user id from the opening handshake request (pseudonymized unless consented).
    user_id_resolver: Callable[[Request], str | None] | None = None

    # -- privacy of routes, tenants and exception messages (README: privacy table) -----
    #: Use the raw path (query dropped) as the route when ``routes`` is None. UNSAFE: any
    #: identifier in a path (ids, emails, tokens) becomes a label, a span name, a log field.
    route_from_path: bool = False
    #: Exception messages in logs, spans, Sentry and alerts: ``"scrub"`` (identifiers
    #: masked), ``"keep"`` (as raised, unsafe) or ``"drop"`` (type and frames only).
    exception_messages: ExceptionMessages = "scrub"
    #: Tenant of a connection, from its opening handshake request (``None``: unknown).
    tenant: Callable[[Request], str | None] | None = None
    #: The tenants with their own ``tenant`` label value; others are ``__other__``.
    #: ``None``: the first ``max_tenants`` seen (see ``labels.LabelTable``).
    tenants: Collection[str] | None = None
    #: Distinct ``tenant`` values per server without an allow-list.
    max_tenants: int = 20

    # -- alerting ---------------------------------------------------------------------
    #: Alerters (``SentryAlerter``, ``PrometheusAlerter``) that receive critical failures.
    alerters: Sequence[Any] = ()

    # -- extension --------------------------------------------------------------------
    #: Extra sinks, called after the built-in ones.
    sinks: Sequence[Sink] = ()

    @classmethod
    def from_options(cls, **options: Any) -> Config:
        """Build a config from keyword options, falling back to environment variables.

        Raises:
            TypeError: an unknown option name.
            ValueError: an invalid value, from a keyword or the environment (the
                message then names the variable).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown ws_monitoring option(s): {', '.join(unknown)}")
        env: dict[str, Any] = {}
        if (ns := os.environ.get("WS_MONITORING_NAMESPACE")) is not None:
            env["namespace"] = ns
        if (routes := _env_list("WS_MONITORING_ROUTES")) is not None:
            env["routes"] = routes
        if (max_routes := os.environ.get("WS_MONITORING_MAX_ROUTES")) is not None:
            try:
                env["max_routes"] = int(max_routes)
            except ValueError:
                raise ValueError(
                    f"WS_MONITORING_MAX_ROUTES={max_routes!r}: expected an integer"
                ) from None
        env["metrics"] = _env_bool("WS_MONITORING_METRICS", cls.metrics)
        env["tracing"] = _env_bool("WS_MONITORING_TRACING", cls.tracing)
        env["log_lifecycle"] = _env_bool("WS_MONITORING_LOG_LIFECYCLE", cls.log_lifecycle)
        env["pseudonymize_ips"] = _env_bool("WS_MONITORING_PSEUDONYMIZE_IPS", cls.pseudonymize_ips)
        if (sb := _env_buckets("WS_MONITORING_SIZE_BUCKETS")) is not None:
            env["size_buckets"] = sb
        if (db := _env_buckets("WS_MONITORING_DURATION_BUCKETS")) is not None:
            env["duration_buckets"] = db
        if (hp := os.environ.get("WS_MONITORING_HEALTH_PATH")) is not None:
            env["health_path"] = hp or None
        if (slow := _env_float("WS_MONITORING_TRACE_SLOW_SECONDS")) is not None:
            env["trace_slow_threshold"] = slow
        if (proxies := _env_list("WS_MONITORING_TRUSTED_PROXIES")) is not None:
            env["trusted_proxies"] = tuple(proxies)
        # Which fields come from which variable, to name it when its value is invalid.
        sources = {
            field: var
            for field, var in _ENV_FIELDS.items()
            if field in env and field not in options and var in os.environ
        }
        env.update(options)
        try:
            return cls(**env)
        except ValueError as exc:
            for field, var in sources.items():
                if str(exc).startswith(field):
                    raise ValueError(f"{var}={os.environ[var]!r}: {exc}") from None
            raise

    def __post_init__(self) -> None:
        if not _NAMESPACE.fullmatch(self.namespace):
            raise ValueError(
                f"namespace {self.namespace!r}: use ASCII letters, digits and '_', "
                "not starting with a digit"
            )
        if self.max_routes < 1:
            raise ValueError(f"max_routes must be at least 1, got {self.max_routes}")
        for name in (
            "size_buckets",
            "duration_buckets",
            "connection_duration_buckets",
            "handshake_buckets",
            "rtt_buckets",
        ):
            object.__setattr__(self, name, _check_buckets(name, getattr(self, name)))
        if self.health_path is not None and not self.health_path.startswith("/"):
            raise ValueError(f"health_path must start with '/', got {self.health_path!r}")
        if self.log_payloads is not None and self.log_payloads < 0:
            raise ValueError("log_payloads must be a non-negative number of bytes")
        if isinstance(self.routes, str):
            raise ValueError("routes: pass a list of templates, not a single string")
        if self.routes is not None and not callable(self.routes):
            object.__setattr__(self, "routes", tuple(self.routes))
            for template in self.routes:
                if not isinstance(template, str) or not template.startswith("/"):
                    raise ValueError(f"routes: template {template!r} must start with '/'")
        self._check_privacy_options()
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))
        object.__setattr__(self, "alerters", tuple(self.alerters))
        object.__setattr__(self, "sinks", tuple(self.sinks))

    def _check_privacy_options(self) -> None:
        if self.exception_messages not in EXCEPTION_MESSAGES:
            raise ValueError(
                f"exception_messages must be one of {', '.join(map(repr, EXCEPTION_MESSAGES))}, "
                f"got {self.exception_messages!r}"
            )
        if self.route_from_path and self.routes is not None:
            raise ValueError("route_from_path=True and routes= exclude each other")
        if self.tenant is not None and not callable(self.tenant):
            raise ValueError("tenant must be a function request -> str | None")
        if self.max_tenants < 1:
            raise ValueError(f"max_tenants must be at least 1, got {self.max_tenants}")
        if self.tenants is not None:
            if self.tenant is None:
                raise ValueError("tenants= needs tenant= (the function that finds the tenant)")
            if isinstance(self.tenants, str):
                raise ValueError("tenants: pass a collection of tenant names, not a single string")
            for name in self.tenants:
                if not isinstance(name, str) or not _TENANT.fullmatch(name):
                    raise ValueError(
                        f"tenants: {name!r} must be 1 to 64 printable characters, not a "
                        "reserved __name__"
                    )
            object.__setattr__(self, "tenants", frozenset(self.tenants))


#: Values of ``exception_messages``.
EXCEPTION_MESSAGES = ("scrub", "keep", "drop")
_TENANT = re.compile(r"(?!__)[^\x00-\x1f\x7f-\x9f]{1,64}")

#: Fields that environment variables can set, validated in ``__post_init__``.
_ENV_FIELDS = {
    "namespace": "WS_MONITORING_NAMESPACE",
    "routes": "WS_MONITORING_ROUTES",
    "max_routes": "WS_MONITORING_MAX_ROUTES",
    "size_buckets": "WS_MONITORING_SIZE_BUCKETS",
    "duration_buckets": "WS_MONITORING_DURATION_BUCKETS",
    "health_path": "WS_MONITORING_HEALTH_PATH",
}
