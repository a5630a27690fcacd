"""Config: defaults, keyword options, every documented environment variable, validation."""

from __future__ import annotations

import dataclasses
import math

import pytest

from ws_monitoring.config import (
    DEFAULT_DURATION_BUCKETS,
    DEFAULT_SIZE_BUCKETS,
    Config,
)

ALL_VARS = (
    "WS_MONITORING_NAMESPACE",
    "WS_MONITORING_ROUTES",
    "WS_MONITORING_MAX_ROUTES",
    "WS_MONITORING_METRICS",
    "WS_MONITORING_SIZE_BUCKETS",
    "WS_MONITORING_DURATION_BUCKETS",
    "WS_MONITORING_HEALTH_PATH",
    "WS_MONITORING_TRACING",
    "WS_MONITORING_TRACE_SLOW_SECONDS",
    "WS_MONITORING_LOG_LIFECYCLE",
    "WS_MONITORING_TRUSTED_PROXIES",
    "WS_MONITORING_PSEUDONYMIZE_IPS",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALL_VARS:
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    config = Config.from_options()
    assert config == Config()
    assert config.metrics is True
    assert config.namespace == "websocket"
    assert config.registry is None
    assert config.routes is None
    assert config.max_routes == 100
    assert (config.unmatched_route, config.overflow_route) == ("__unmatched__", "__overflow__")
    assert config.size_buckets == DEFAULT_SIZE_BUCKETS
    assert config.duration_buckets == DEFAULT_DURATION_BUCKETS
    assert config.health_path == "/healthz"
    assert config.tracing is True
    assert config.trace_slow_threshold == 1.0
    assert config.log_lifecycle is True
    assert config.trusted_proxies == ()
    assert config.pseudonymize_ips is False


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.namespace = "other"  # type: ignore[misc]


def test_unknown_options_are_named() -> None:
    with pytest.raises(TypeError, match="unknown ws_monitoring option\\(s\\): colour, nmespace"):
        Config.from_options(nmespace="x", colour="blue")


@pytest.mark.parametrize(
    ("var", "raw", "field", "value"),
    [
        ("WS_MONITORING_NAMESPACE", "chat", "namespace", "chat"),
        ("WS_MONITORING_ROUTES", " /rooms/{id} , /lobby ,", "routes", ("/rooms/{id}", "/lobby")),
        ("WS_MONITORING_MAX_ROUTES", "7", "max_routes", 7),
        ("WS_MONITORING_METRICS", "0", "metrics", False),
        ("WS_MONITORING_METRICS", "FALSE", "metrics", False),
        ("WS_MONITORING_METRICS", "off", "metrics", False),
        ("WS_MONITORING_METRICS", "no", "metrics", False),
        ("WS_MONITORING_METRICS", "yes", "metrics", True),
        ("WS_MONITORING_METRICS", "", "metrics", True),
        ("WS_MONITORING_SIZE_BUCKETS", "10, 100,1000", "size_buckets", (10.0, 100.0, 1000.0)),
        ("WS_MONITORING_SIZE_BUCKETS", "", "size_buckets", DEFAULT_SIZE_BUCKETS),
        ("WS_MONITORING_DURATION_BUCKETS", "0.5,1", "duration_buckets", (0.5, 1.0)),
        ("WS_MONITORING_HEALTH_PATH", "/ready", "health_path", "/ready"),
        ("WS_MONITORING_HEALTH_PATH", "", "health_path", None),
        ("WS_MONITORING_TRACING", "false", "tracing", False),
        ("WS_MONITORING_TRACE_SLOW_SECONDS", "0.25", "trace_slow_threshold", 0.25),
        ("WS_MONITORING_TRACE_SLOW_SECONDS", " ", "trace_slow_threshold", 1.0),
        ("WS_MONITORING_LOG_LIFECYCLE", "0", "log_lifecycle", False),
        (
            "WS_MONITORING_TRUSTED_PROXIES",
            "10.0.0.1, 192.168.0.0/16",
            "trusted_proxies",
            ("10.0.0.1", "192.168.0.0/16"),
        ),
        ("WS_MONITORING_PSEUDONYMIZE_IPS", "1", "pseudonymize_ips", True),
        ("WS_MONITORING_PSEUDONYMIZE_IPS", "true", "pseudonymize_ips", True),
    ],
)
def test_environment_variables(
    monkeypatch: pytest.MonkeyPatch, var: str, raw: str, field: str, value: object
) -> None:
    monkeypatch.setenv(var, raw)
    assert getattr(Config.from_options(), field) == value


def test_keywords_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_MONITORING_NAMESPACE", "from_env")
    monkeypatch.setenv("WS_MONITORING_MAX_ROUTES", "0")  # invalid, but overridden
    monkeypatch.setenv("WS_MONITORING_METRICS", "0")
    config = Config.from_options(namespace="from_kw", max_routes=5, metrics=True)
    assert (config.namespace, config.max_routes, config.metrics) == ("from_kw", 5, True)


def test_direct_construction_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_MONITORING_NAMESPACE", "from_env")
    assert Config().namespace == "websocket"


@pytest.mark.parametrize(
    ("var", "raw", "message"),
    [
        ("WS_MONITORING_MAX_ROUTES", "many", "expected an integer"),
        ("WS_MONITORING_MAX_ROUTES", "0", "max_routes must be at least 1"),
        ("WS_MONITORING_METRICS", "maybe", "expected one of"),
        ("WS_MONITORING_TRACING", "2", "expected one of"),
        ("WS_MONITORING_LOG_LIFECYCLE", "nope", "expected one of"),
        ("WS_MONITORING_PSEUDONYMIZE_IPS", "y", "expected one of"),
        ("WS_MONITORING_SIZE_BUCKETS", "1,two", "expected comma-separated numbers"),
        ("WS_MONITORING_SIZE_BUCKETS", "3,2,1", "strictly increasing"),
        ("WS_MONITORING_DURATION_BUCKETS", "1,1", "strictly increasing"),
        ("WS_MONITORING_DURATION_BUCKETS", "1,inf", "finite"),
        ("WS_MONITORING_TRACE_SLOW_SECONDS", "slow", "expected a number"),
        ("WS_MONITORING_HEALTH_PATH", "healthz", "must start with '/'"),
        ("WS_MONITORING_NAMESPACE", "1st", "namespace"),
        ("WS_MONITORING_NAMESPACE", "web-socket", "namespace"),
        ("WS_MONITORING_ROUTES", "rooms/{id}", "must start with '/'"),
    ],
)
def test_bad_environment_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, raw: str, message: str
) -> None:
    monkeypatch.setenv(var, raw)
    with pytest.raises(ValueError, match=message) as caught:
        Config.from_options()
    assert str(caught.value).startswith(f"{var}={raw!r}: ")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"namespace": ""}, "namespace ''"),
        ({"namespace": "émetrics"}, "ASCII"),
        ({"namespace": "a b"}, "namespace"),
        ({"max_routes": 0}, "max_routes must be at least 1"),
        ({"size_buckets": ()}, "size_buckets: at least one"),
        ({"size_buckets": (1, math.nan)}, "size_buckets: bounds must be finite"),
        ({"rtt_buckets": (1, math.inf)}, "rtt_buckets: bounds must be finite"),
        ({"handshake_buckets": (2, 1)}, "handshake_buckets: bounds must be strictly increasing"),
        ({"connection_duration_buckets": (1, 1)}, "connection_duration_buckets"),
        ({"health_path": "healthz"}, "health_path must start with '/'"),
        ({"log_payloads": -1}, "log_payloads must be a non-negative"),
        ({"routes": "/rooms/{id}"}, "not a single string"),
        ({"routes": ["/ok", "rooms"]}, "routes: template 'rooms' must start with '/'"),
        ({"routes": [42]}, "routes: template 42"),
    ],
)
def test_bad_keyword_values(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        Config.from_options(**options)
    assert not str(caught.value).startswith("WS_MONITORING")


def test_a_bad_keyword_is_not_blamed_on_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_MONITORING_NAMESPACE", "fine")
    with pytest.raises(ValueError, match=r"^max_routes must be at least 1"):
        Config.from_options(max_routes=0)


def test_values_are_normalized() -> None:
    config = Config(
        size_buckets=[1, 2],  # type: ignore[arg-type]
        trusted_proxies=["10.0.0.1"],
        alerters=[],
        sinks=[],
        namespace="_ok_1",
    )
    assert config.size_buckets == (1.0, 2.0)
    assert all(isinstance(b, float) for b in config.size_buckets)
    assert config.trusted_proxies == ("10.0.0.1",)
    assert config.alerters == ()
    assert config.sinks == ()
