"""Configuration: one frozen dataclass per instrumented server, from keywords and environment.

Precedence: an explicit keyword argument, then the documented environment variable,
then the default. ``Config(...)`` and :meth:`Config.from_options` read the environment
the same way, when the config is made. ``None`` disables an optional feature. Nothing
here is global: two servers in one process may be configured differently.

Every value is checked when the config is made: a value of the wrong type raises
``TypeError``, an invalid one ``ValueError``; both name the option, or the variable
and its value when it came from the environment. A variable that is set but empty (or
blank) means the default, except ``WS_MONITORING_HEALTH_PATH``, where empty turns the
health check off.

Environment variables (all optional):

=====================================  ==============================================
``WS_MONITORING_NAMESPACE``            metric name prefix (default ``websocket``)
``WS_MONITORING_ROUTES``               comma-separated route templates (``/rooms/{id}``)
``WS_MONITORING_MAX_ROUTES``           series limit per metric for ``route`` (100)
``WS_MONITORING_METRICS``              ``0``/``false``/``no``/``off`` turns metrics off
``WS_MONITORING_SIZE_BUCKETS``         comma-separated byte bounds
``WS_MONITORING_DURATION_BUCKETS``     comma-separated second bounds (handling time)
``WS_MONITORING_HEALTH_PATH``          health path on the WebSocket port; empty = off
``WS_MONITORING_TRACING``              ``1``: message spans asked for; ``0``: off
``WS_MONITORING_TRACE_SLOW_SECONDS``   always keep spans of messages slower than this
``WS_MONITORING_LOG_LIFECYCLE``        ``0``/``false`` turns lifecycle logs off
``WS_MONITORING_TRUSTED_PROXIES``      comma-separated IPs/CIDRs allowed to set X-Forwarded-For
``WS_MONITORING_PSEUDONYMIZE_IPS``     ``1``/``true``: HMAC IPs instead of truncating them
``WS_MONITORING_PSEUDONYM_KEY``        secret key for HMAC-SHA256 pseudonyms (UTF-8 text)
``PROMETHEUS_MULTIPROC_DIR``           enables prometheus_client multiprocess mode
=====================================  ==============================================
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from numbers import Real
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from .typing import Alerter, Sink

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from websockets.http11 import Request

    from .typing import Data

__all__ = ["Config", "unknown_option"]

T = TypeVar("T")

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
#: A placeholder of a route template: ``{name}`` (one segment) or ``{name:path}``.
ROUTE_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")

_FALSE = {"0", "false", "no", "off"}
_TRUE = {"1", "true", "yes", "on"}


# -- checks, shared by keywords and variables ---------------------------------------------
#
# Each takes the name to blame (the option, or ``VAR='value'``) and the value; it returns
# the value normalized (tuples for sequences, floats for numbers) or raises.


def _type_error(name: str, expected: str, value: object) -> TypeError:
    return TypeError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})")


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _type_error(name, "True or False", value)
    return value


def _optional_bool(name: str, value: object) -> bool | None:
    return None if value is None else _bool(name, value)


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an int", value)
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _type_error(name, "a number", value)
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise _type_error(name, "a str", value)
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


def _items(name: str, value: object, what: str) -> tuple[Any, ...]:
    """A list or tuple as a tuple; a single string (iterated per character) is refused."""
    if isinstance(value, str | bytes):
        raise ValueError(f"{name}: pass a list of {what}, not a single string")
    if not isinstance(value, Sequence):
        raise _type_error(name, f"a list of {what}", value)
    return tuple(value)


def _callable(name: str, value: object) -> Any:
    if value is not None and not callable(value):
        raise _type_error(name, "a function or None", value)
    return value


def _namespace(name: str, value: object) -> str:
    text = _text(name, value)
    if not _NAMESPACE.fullmatch(text):
        raise ValueError(
            f"{name}: {text!r} is not a metric prefix: use ASCII letters, digits and '_', "
            "not starting with a digit"
        )
    return text


def _buckets(name: str, value: object) -> tuple[float, ...]:
    items = _items(name, value, "numbers")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, Real):
            raise _type_error(name, "numbers", item)
    bounds = tuple(float(b) for b in items)
    if not bounds:
        raise ValueError(f"{name}: at least one bucket bound is needed")
    if not all(math.isfinite(b) for b in bounds):
        raise ValueError(f"{name}: bounds must be finite numbers (+Inf is implicit)")
    if list(bounds) != sorted(set(bounds)):
        raise ValueError(f"{name}: bounds must be strictly increasing, got {list(bounds)}")
    return bounds


def _template(name: str, template: object) -> str:
    if not isinstance(template, str):
        raise _type_error(name, "route templates (str)", template)
    if not template.startswith("/"):
        raise ValueError(f"{name}: template {template!r} must start with '/'")
    rest = ROUTE_PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        raise ValueError(
            f"{name}: template {template!r} has an unclosed or invalid placeholder "
            "(use {name} or {name:path})"
        )
    return template


def _routes(name: str, value: object) -> RouteGrouping | None:
    if value is None or callable(value):
        return cast("RouteGrouping | None", value)
    return tuple(_template(name, t) for t in _items(name, value, "route templates"))


def _health_path(name: str, value: object) -> str | None:
    if value is None:
        return None
    path = _text(name, value)
    if not path.startswith("/"):
        raise ValueError(f"{name} must start with '/', got {path!r}")
    return path


def _slow_threshold(name: str, value: object) -> float | None:
    return None if value is None else _number(name, value)


def _log_payloads(name: str, value: object) -> int | None:
    return None if value is None else _int(name, value, 0)


def _proxies(name: str, value: object) -> tuple[str, ...]:
    entries = _items(name, value, "IPs or CIDRs")
    for entry in entries:
        if not isinstance(entry, str):
            raise _type_error(name, "IPs or CIDRs (str)", entry)
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{name}: {entry!r} is not an IP or CIDR") from None
    return entries


def _key(name: str, value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise _type_error(name, "bytes or None", value)
    if not value:
        raise ValueError(f"{name} must not be empty (None: a random per-process key)")
    return value


def _registry(name: str, value: object) -> Any:
    if value is not None and not callable(getattr(value, "register", None)):
        raise _type_error(name, "a prometheus_client CollectorRegistry or None", value)
    return value


def _exception_messages(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise _type_error(name, "'scrub', 'keep' or 'drop'", value)
    if value not in EXCEPTION_MESSAGES:
        raise ValueError(f"{name} must be one of 'scrub', 'keep', 'drop', got {value!r}")
    return value


def _tenants(name: str, value: object) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes):
        raise ValueError(f"{name}: pass a collection of tenant names, not a single string")
    if not isinstance(value, Collection):
        raise _type_error(name, "a collection of tenant names", value)
    for tenant in value:
        if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
            raise ValueError(
                f"{name}: {tenant!r} must be 1 to 64 printable characters, not a reserved __name__"
            )
    return frozenset(value)


def _of_protocol(protocol: type, what: str, needs: str) -> Callable[[str, object], tuple[Any, ...]]:
    def check(name: str, value: object) -> tuple[Any, ...]:
        items = _items(name, value, name)
        for item in items:
            if not isinstance(item, protocol):
                raise TypeError(f"{name}: {item!r} is not {what} (it needs {needs})")
        return items

    return check


#: The check of every field.
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "metrics": _bool,
    "namespace": _namespace,
    "registry": _registry,
    "routes": _routes,
    "max_routes": lambda name, value: _int(name, value, 1),
    "unmatched_route": _text,
    "overflow_route": _text,
    "size_buckets": _buckets,
    "duration_buckets": _buckets,
    "connection_duration_buckets": _buckets,
    "handshake_buckets": _buckets,
    "rtt_buckets": _buckets,
    "health_path": _health_path,
    "tracing": _optional_bool,
    "trace_slow_threshold": _slow_threshold,
    "trace_messages_in_connection_trace": _bool,
    "trace_sent_messages": _bool,
    "context_from_message": _callable,
    "log_lifecycle": _bool,
    "log_payloads": _log_payloads,
    "trusted_proxies": _proxies,
    "pseudonymize_ips": _bool,
    "pseudonym_key": _key,
    "consent_resolver": _callable,
    "user_id_resolver": _callable,
    "route_from_path": _bool,
    "exception_messages": _exception_messages,
    "tenant": _callable,
    "tenants": _tenants,
    "max_tenants": lambda name, value: _int(name, value, 1),
    "alerters": _of_protocol(Alerter, "an alerter", "fire, resolve, flush and close"),
    "sinks": _of_protocol(
        Sink,
        "a sink",
        "handshake_finished, connection_opened, handler_failed, connection_closed, shutdown",
    ),
}


# -- environment variables ------------------------------------------------------------------


def _parse_bool(raw: str) -> bool:
    value = raw.lower()
    if value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise ValueError("expected one of 0/1/true/false/yes/no/on/off")


def _parse_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("expected an integer") from None


def _parse_number(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError("expected a number") from None


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _parse_numbers(raw: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in _parse_list(raw))
    except ValueError:
        raise ValueError("expected comma-separated numbers") from None


#: Fields that environment variables can set: (variable, parser of its text).
ENV_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "namespace": ("WS_MONITORING_NAMESPACE", str),
    "routes": ("WS_MONITORING_ROUTES", _parse_list),
    "max_routes": ("WS_MONITORING_MAX_ROUTES", _parse_int),
    "metrics": ("WS_MONITORING_METRICS", _parse_bool),
    "size_buckets": ("WS_MONITORING_SIZE_BUCKETS", _parse_numbers),
    "duration_buckets": ("WS_MONITORING_DURATION_BUCKETS", _parse_numbers),
    "health_path": ("WS_MONITORING_HEALTH_PATH", str),
    "tracing": ("WS_MONITORING_TRACING", _parse_bool),
    "trace_slow_threshold": ("WS_MONITORING_TRACE_SLOW_SECONDS", _parse_number),
    "log_lifecycle": ("WS_MONITORING_LOG_LIFECYCLE", _parse_bool),
    "trusted_proxies": ("WS_MONITORING_TRUSTED_PROXIES", _parse_list),
    "pseudonymize_ips": ("WS_MONITORING_PSEUDONYMIZE_IPS", _parse_bool),
    "pseudonym_key": ("WS_MONITORING_PSEUDONYM_KEY", str.encode),
}


def _from_env(field: str, default: Any) -> Any:
    """The value of ``field`` from its variable, checked; ``default`` when unset or blank."""
    var, parse = ENV_VARIABLES[field]
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        # Blank means default, but an empty health path is documented as "off".
        return None if field == "health_path" and raw is not None else default
    name = f"{var}={raw!r}"
    try:
        return _CHECKS[field](name, parse(raw.strip()))
    except ValueError as exc:
        # The checks blame ``name`` first ("NAME must ...", "NAME: ..."): one form here.
        message = str(exc).removeprefix(name).removeprefix(":").strip()
        raise ValueError(f"{name}: {message}") from None


def _env(field: str, default: T) -> T:
    """A dataclass field whose default comes from its environment variable, if set."""
    return cast(T, dataclasses.field(default_factory=lambda: _from_env(field, default)))


# -- options ------------------------------------------------------------------------------

#: Names that belong to another entry point, for the error about an unknown option.
_ELSEWHERE = {
    **dict.fromkeys(
        ("sample_ratio", "sampler", "endpoint", "protocol", "service_name", "compression"),
        "setup_tracing()",
    ),
    **dict.fromkeys(("fmt", "filename", "level", "max_bytes", "backup_count"), "setup_logging()"),
    **dict.fromkeys(
        ("addr", "certfile", "keyfile", "username", "password", "bearer_token"),
        "start_metrics_server()",
    ),
}


def unknown_option(name: str, known: Sequence[str], where: str = "ws_monitoring") -> TypeError:
    """The error for an unknown keyword ``name``: names the closest known one, if any."""
    message = f"{where}: unknown option {name!r}"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    elif name in _ELSEWHERE:
        message += f"; it is an argument of ws_monitoring.{_ELSEWHERE[name]}"
    return TypeError(message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Options of one instrumented server, grouped by concern.

    ``Config(...)`` takes keywords, falls back to the environment variables (see the
    module docstring) and checks every value (``TypeError`` for a wrong type,
    ``ValueError`` for an invalid value, naming the option or variable).
    :meth:`from_options` does the same from a mapping of names.
    """

    # -- metrics --------------------------------------------------------------------
    #: Metrics on or off. Off: the hot path does no metric work at all.
    metrics: bool = _env("metrics", True)
    #: Metric name prefix: ``{namespace}_connections_active`` and so on.
    namespace: str = _env("namespace", "websocket")
    #: Registry the collector is registered in (``None``: prometheus_client's default).
    registry: CollectorRegistry | None = None
    #: Route templates (``/rooms/{room}``; ``{rest:path}`` spans segments) or a function
    #: path -> route (``None`` when unmatched). ``None``: the path without its query.
    routes: RouteGrouping | None = _env("routes", None)  # noqa: RUF009 - a field()
    #: Distinct ``route`` values per server before new ones fold into ``overflow_route``.
    max_routes: int = _env("max_routes", 100)
    #: Label for paths no template matches.
    unmatched_route: str = "__unmatched__"
    #: Label for routes past ``max_routes``.
    overflow_route: str = "__overflow__"
    size_buckets: tuple[float, ...] = _env("size_buckets", DEFAULT_SIZE_BUCKETS)
    duration_buckets: tuple[float, ...] = _env("duration_buckets", DEFAULT_DURATION_BUCKETS)
    connection_duration_buckets: tuple[float, ...] = DEFAULT_CONNECTION_DURATION_BUCKETS
    handshake_buckets: tuple[float, ...] = DEFAULT_HANDSHAKE_BUCKETS
    rtt_buckets: tuple[float, ...] = DEFAULT_RTT_BUCKETS

    # -- WebSocket port -------------------------------------------------------------
    #: Path answered with ``200 OK`` on the WebSocket port by :func:`ws_monitoring.serve`.
    health_path: str | None = _env("health_path", "/healthz")

    # -- tracing (the [tracing] extra) ------------------------------------------------
    #: Message spans: ``None`` (default) when OpenTelemetry is installed, silently off
    #: otherwise; ``True`` asks for them (a warning when OpenTelemetry is missing);
    #: ``False`` turns them off.
    tracing: bool | None = _env("tracing", None)
    #: Always export spans of messages whose handling took longer (seconds); None: never.
    trace_slow_threshold: float | None = _env("trace_slow_threshold", 1.0)
    #: Make message spans children of the handshake span instead of new traces with a link.
    trace_messages_in_connection_trace: bool = False
    #: PRODUCER spans for sent messages.
    trace_sent_messages: bool = False
    #: Extract a carrier (``{"traceparent": ...}``) from a received message.
    context_from_message: Callable[[Data], Mapping[str, str] | None] | None = None

    # -- logging (the [logging] extra for JSON formatting) ---------------------------
    #: Lifecycle logs (opened, closed, rejected, crashed) on the ``ws_monitoring`` logger.
    log_lifecycle: bool = _env("log_lifecycle", True)
    #: Log payloads at DEBUG for connections that consented to ``payload``; max bytes.
    log_payloads: int | None = None

    # -- privacy ----------------------------------------------------------------------
    #: Peers whose ``Forwarded``/``X-Forwarded-For`` headers are believed (IPs or CIDRs).
    trusted_proxies: Sequence[str] = _env("trusted_proxies", ())
    #: HMAC client IPs instead of truncating them.
    pseudonymize_ips: bool = _env("pseudonymize_ips", False)
    #: Secret for HMAC-SHA256 pseudonyms; ``None``: a random per-process key
    #: (pseudonyms then change across restarts).
    pseudonym_key: bytes | None = _env("pseudonym_key", None)
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
    alerters: Sequence[Alerter] = ()

    # -- extension --------------------------------------------------------------------
    #: Extra sinks, called after the built-in ones.
    sinks: Sequence[Sink] = ()

    @classmethod
    def from_options(cls, **options: Any) -> Config:
        """``Config(**options)``, with ws_monitoring's own error for an unknown name.

        Raises:
            TypeError: an unknown option name (naming the closest known one), or a
                value of the wrong type.
            ValueError: an invalid value, from a keyword or the environment (the
                message then names the variable).
        """
        for name in options:
            if name not in _CHECKS:
                raise unknown_option(name, OPTION_NAMES)
        return cls(**options)

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            object.__setattr__(self, name, check(name, getattr(self, name)))
        self._check_privacy_options()

    def _check_privacy_options(self) -> None:
        """Rules between options (each option's own type and value are checked above)."""
        if self.route_from_path and self.routes is not None:
            raise ValueError("route_from_path=True and routes= exclude each other")
        if self.tenants is not None and self.tenant is None:
            raise ValueError("tenants= needs tenant= (the function that finds the tenant)")


#: Values of ``exception_messages``.
EXCEPTION_MESSAGES = ("scrub", "keep", "drop")
_TENANT = re.compile(r"(?!__)[^\x00-\x1f\x7f-\x9f]{1,64}")

#: Every option of :class:`Config`, in declaration order.
OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))
