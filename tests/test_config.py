"""Config: every option and every environment variable, checked the same way everywhere.

One table covers each option (a good value, a value of the wrong type, an invalid value,
the empty string) and each variable (a good value, an invalid value, empty and blank).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import pytest
from prometheus_client import CollectorRegistry

import ws_monitoring
from tests.adapters.test_instrument import ExtraSink
from tests.alerting.test_sink import Recorder
from ws_monitoring.config import (
    DEFAULT_DURATION_BUCKETS,
    DEFAULT_SIZE_BUCKETS,
    ENV_VARIABLES,
    OPTION_NAMES,
    Config,
)

#: No bad value of the right type exists for this option (a bool, a function...).
NONE_OF_THAT_TYPE = object()


def route_of(path: str) -> str | None:
    return path


SINK, ALERTER, REGISTRY = ExtraSink(), Recorder(), CollectorRegistry()


class Option(NamedTuple):
    name: str
    good: Any
    #: What the config holds for ``good`` (normalized).
    held: Any
    bad_type: Any
    bad_value: Any
    #: What ``name=""`` raises.
    empty: type[Exception]
    #: Other options the good value needs (``tenants`` needs ``tenant``).
    extra: dict[str, Any] = {}  # noqa: RUF012 - read only


OPTIONS = [
    Option("metrics", False, False, "no", NONE_OF_THAT_TYPE, TypeError),
    Option("namespace", "chat", "chat", 5, "web-socket", ValueError),
    Option("registry", REGISTRY, REGISTRY, "default", NONE_OF_THAT_TYPE, TypeError),
    Option("routes", ["/rooms/{id}", "/f/{p:path}"], ("/rooms/{id}", "/f/{p:path}"), 5,
           ["/a/{x"], ValueError),
    Option("max_routes", 5, 5, "5", 0, TypeError),
    Option("unmatched_route", "none", "none", 1, "", ValueError),
    Option("overflow_route", "more", "more", None, "", ValueError),
    Option("size_buckets", [1, 2.5], (1.0, 2.5), [1, "2"], [2, 1], ValueError),
    Option("duration_buckets", (0.5,), (0.5,), 0.5, [math.nan], ValueError),
    Option("connection_duration_buckets", [1], (1.0,), [True], [], ValueError),
    Option("handshake_buckets", [1, 2], (1.0, 2.0), {1: 2}, [1, 1], ValueError),
    Option("rtt_buckets", [0.1], (0.1,), None, [math.inf], ValueError),
    Option("health_path", "/ready", "/ready", b"/ready", "ready", ValueError),
    Option("tracing", True, True, 1, NONE_OF_THAT_TYPE, TypeError),
    Option("trace_slow_threshold", 2, 2.0, "abc", -1, TypeError),
    Option("trace_messages_in_connection_trace", True, True, "yes", NONE_OF_THAT_TYPE, TypeError),
    Option("trace_sent_messages", True, True, 1, NONE_OF_THAT_TYPE, TypeError),
    Option("context_from_message", route_of, route_of, "trace", NONE_OF_THAT_TYPE, TypeError),
    Option("log_lifecycle", False, False, 0, NONE_OF_THAT_TYPE, TypeError),
    Option("log_payloads", 64, 64, 64.0, -1, TypeError),
    Option("trusted_proxies", ["10.0.0.0/8", "::1"], ("10.0.0.0/8", "::1"), [10], ["bad"],
           ValueError),
    Option("pseudonymize_ips", True, True, "true", NONE_OF_THAT_TYPE, TypeError),
    Option("pseudonym_key", b"k" * 32, b"k" * 32, "k" * 32, b"", TypeError),
    Option("consent_resolver", route_of, route_of, 1, NONE_OF_THAT_TYPE, TypeError),
    Option("user_id_resolver", route_of, route_of, "user", NONE_OF_THAT_TYPE, TypeError),
    Option("route_from_path", True, True, "yes", NONE_OF_THAT_TYPE, TypeError),
    Option("exception_messages", "drop", "drop", 1, "hide", ValueError),
    Option("tenant", route_of, route_of, "host", NONE_OF_THAT_TYPE, TypeError),
    Option("tenants", ["a", "b"], frozenset({"a", "b"}), 5, ["__other__"], ValueError,
           {"tenant": route_of}),
    Option("max_tenants", 5, 5, 5.0, 0, TypeError),
    Option("alerters", [ALERTER], (ALERTER,), [object()], "alerter", ValueError),
    Option("sinks", [SINK], (SINK,), [object()], "sink", ValueError),
]  # fmt: skip


class Variable(NamedTuple):
    name: str
    option: str
    good: str
    held: Any
    bad: str
    #: What the message says about ``bad``.
    message: str
    #: What an empty or blank variable gives.
    empty: Any


VARIABLES = [
    Variable("WS_MONITORING_NAMESPACE", "namespace", "chat", "chat", "1st", "ASCII", "websocket"),
    Variable("WS_MONITORING_ROUTES", "routes", " /rooms/{id} , /lobby ,", ("/rooms/{id}", "/lobby"),
             "/a/{x", "unclosed", None),
    Variable("WS_MONITORING_MAX_ROUTES", "max_routes", "7", 7, "many", "expected an integer", 100),
    Variable("WS_MONITORING_METRICS", "metrics", "off", False, "maybe", "expected one of", True),
    Variable("WS_MONITORING_SIZE_BUCKETS", "size_buckets", "10, 100", (10.0, 100.0), "3,2",
             "strictly increasing", DEFAULT_SIZE_BUCKETS),
    Variable("WS_MONITORING_DURATION_BUCKETS", "duration_buckets", "0.5,1", (0.5, 1.0), "1,two",
             "expected comma-separated numbers", DEFAULT_DURATION_BUCKETS),
    Variable("WS_MONITORING_HEALTH_PATH", "health_path", "/ready", "/ready", "ready",
             "must start with '/'", None),  # empty: off, as documented
    Variable("WS_MONITORING_TRACING", "tracing", "1", True, "2", "expected one of", None),
    Variable("WS_MONITORING_TRACE_SLOW_SECONDS", "trace_slow_threshold", "0.25", 0.25, "nan",
             "finite number", 1.0),
    Variable("WS_MONITORING_LOG_LIFECYCLE", "log_lifecycle", "FALSE", False, "nope",
             "expected one of", True),
    Variable("WS_MONITORING_TRUSTED_PROXIES", "trusted_proxies", "10.0.0.1, 192.168.0.0/16",
             ("10.0.0.1", "192.168.0.0/16"), "bad", "not an IP or CIDR", ()),
    Variable("WS_MONITORING_PSEUDONYMIZE_IPS", "pseudonymize_ips", "yes", True, "y",
             "expected one of", False),
    Variable("WS_MONITORING_PSEUDONYM_KEY", "pseudonym_key", "s3cret", b"s3cret", "", "", None),
]  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, _ in ENV_VARIABLES.values():
        monkeypatch.delenv(var, raising=False)


def test_the_tables_cover_every_option_and_variable() -> None:
    assert [o.name for o in OPTIONS] == list(OPTION_NAMES)
    assert {v.name: v.option for v in VARIABLES} == {
        var: field for field, (var, _) in ENV_VARIABLES.items()
    }


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_option_good_value(option: Option) -> None:
    for config in (
        Config(**option.extra, **{option.name: option.good}),
        Config.from_options(**option.extra, **{option.name: option.good}),
    ):
        assert getattr(config, option.name) == option.held


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_option_bad_type(option: Option) -> None:
    with pytest.raises(TypeError, match=f"^{option.name}: "):
        Config(**option.extra, **{option.name: option.bad_type})


@pytest.mark.parametrize(
    "option", [o for o in OPTIONS if o.bad_value is not NONE_OF_THAT_TYPE], ids=lambda o: o.name
)
def test_option_bad_value(option: Option) -> None:
    with pytest.raises(ValueError, match=f"^{option.name}\\b"):
        Config(**option.extra, **{option.name: option.bad_value})


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_option_empty_string(option: Option) -> None:
    with pytest.raises(option.empty, match=f"^{option.name}\\b"):
        Config(**option.extra, **{option.name: ""})


@pytest.mark.parametrize("variable", VARIABLES, ids=lambda v: v.name)
def test_variable_good_value(monkeypatch: pytest.MonkeyPatch, variable: Variable) -> None:
    monkeypatch.setenv(variable.name, variable.good)
    # Config() and Config.from_options() agree about the environment.
    assert getattr(Config(), variable.option) == variable.held
    assert getattr(Config.from_options(), variable.option) == variable.held


@pytest.mark.parametrize("variable", [v for v in VARIABLES if v.bad], ids=lambda v: v.name)
def test_variable_bad_value(monkeypatch: pytest.MonkeyPatch, variable: Variable) -> None:
    monkeypatch.setenv(variable.name, variable.bad)
    for make in (Config, Config.from_options):
        with pytest.raises(ValueError, match=re.escape(variable.message)) as caught:
            make()
        assert str(caught.value).startswith(f"{variable.name}={variable.bad!r}: ")


@pytest.mark.parametrize("blank", ["", "  "], ids=["empty", "blank"])
@pytest.mark.parametrize("variable", VARIABLES, ids=lambda v: v.name)
def test_variable_empty_means_default(
    monkeypatch: pytest.MonkeyPatch, variable: Variable, blank: str
) -> None:
    monkeypatch.setenv(variable.name, blank)
    assert getattr(Config(), variable.option) == variable.empty


def test_defaults() -> None:
    config = Config()
    assert config == Config.from_options()
    assert config.metrics is True
    assert config.namespace == "websocket"
    assert config.routes is None
    assert config.max_routes == 100
    assert config.health_path == "/healthz"
    # Tracing not asked for: on when OpenTelemetry is installed, silently off otherwise.
    assert config.tracing is None
    assert config.trace_slow_threshold == 1.0
    assert config.log_lifecycle is True
    assert config.trusted_proxies == ()
    assert config.pseudonym_key is None


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.namespace = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("rutes", "unknown option 'rutes'; did you mean 'routes'?"),
        ("max_route", "unknown option 'max_route'; did you mean 'max_routes'?"),
        ("sample_ratio", "it is an argument of ws_monitoring.setup_tracing()"),
        ("colour", "unknown option 'colour'$"),
    ],
)
def test_unknown_options_name_the_closest_one(name: str, message: str) -> None:
    with pytest.raises(TypeError, match=re.escape(message).replace(r"\$", "$")):
        Config.from_options(**{name: 1})


def test_keywords_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_MONITORING_NAMESPACE", "from_env")
    monkeypatch.setenv("WS_MONITORING_MAX_ROUTES", "0")  # invalid, but overridden
    monkeypatch.setenv("WS_MONITORING_METRICS", "0")
    config = Config(namespace="from_kw", max_routes=5, metrics=True)
    assert (config.namespace, config.max_routes, config.metrics) == ("from_kw", 5, True)


def test_the_environment_is_read_when_the_config_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_MONITORING_NAMESPACE", "first")
    config = Config()
    monkeypatch.setenv("WS_MONITORING_NAMESPACE", "second")
    assert config.namespace == "first"
    # A copy with changes keeps what the original read.
    assert dataclasses.replace(config, max_routes=3).namespace == "first"


def test_a_bad_keyword_is_not_blamed_on_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_MONITORING_NAMESPACE", "fine")
    with pytest.raises(ValueError, match=r"^max_routes must be at least 1"):
        Config(max_routes=0)


@pytest.mark.parametrize(
    ("port", "error", "message"),
    [("8001", TypeError, "port: expected an int"), (70000, ValueError, "port must be 0-65535"),
     (-1, ValueError, "port must be 0-65535")],
)  # fmt: skip
def test_metrics_server_port(port: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ws_monitoring.start_metrics_server(port=port, addr="127.0.0.1")
