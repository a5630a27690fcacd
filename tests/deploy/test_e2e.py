"""End to end: the shipped rules and dashboards against a real Prometheus and Alertmanager.

An instrumented server (``tests/deploy/e2e_app.py``, a subprocess) serves traffic with
handler crashes, TCP resets and rejected handshakes; its tracing exports to a dead OTLP
endpoint and its ``PrometheusAlerter`` posts to the Alertmanager, so the self-metrics
move too. A real Prometheus runs a test copy of deploy/prometheus (the same rules with
``for:`` shortened, one-second intervals, loopback addresses: see
:mod:`tests.deploy.stack`) and sends its alerts to a real Alertmanager running the
shipped routing and inhibition. One scenario, several checks, about 30 seconds:

1. every PromQL expression of every shipped dashboard parses and returns data through
   Prometheus' HTTP API, with template variables set to real values;
2. every recording rule produces series;
3. the error-ratio alert fires in Prometheus and reaches Alertmanager;
4. scrapes succeed for the whole run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import stack
from tests.helpers.alertmanager import Alertmanager, running_alertmanager
from tests.helpers.prometheus import Prometheus, running_prometheus
from tests.helpers.scrape import fetch
from tests.helpers.system import free_port

pytestmark = pytest.mark.timeout(150)

HOST = "127.0.0.1"
APP_START_TIMEOUT = 20.0
#: The compose service label of the demo job in the shipped prometheus.yml.
DEMO_SERVICE = "ws-demo"
FLEET_SERVICE = "ws-fleet-test"


@dataclass
class App:
    """The instrumented server subprocess."""

    process: subprocess.Popen[str]
    metrics_port: int
    ws_port: int
    tracing: bool
    alerting: bool
    log: Path

    @property
    def instance(self) -> str:
        return f"{HOST}:{self.metrics_port}"

    def metric_names(self) -> set[str]:
        """Families its /metrics exposes now (``_total`` added back to counters)."""
        status, _, body = fetch(f"http://{self.instance}/metrics")
        assert status == 200
        names = set()
        for name, kind in re.findall(r"^# TYPE (\w+) (\w+)", body, re.MULTILINE):
            names.add(
                f"{name}_total" if kind == "counter" and not name.endswith("_total") else name
            )
        return names


@contextlib.contextmanager
def running_app(tmp_path: Path, alertmanager_url: str) -> Iterator[App]:
    """Start the app with a dead OTLP endpoint; stop it by closing its standard input."""
    log = tmp_path / "e2e_app.log"
    dead_otlp = f"http://{HOST}:{free_port()}/v1/traces"
    with log.open("w") as errors:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.deploy.e2e_app",
                "--alertmanager",
                alertmanager_url,
                "--otlp-endpoint",
                dead_otlp,
            ],
            cwd=stack.ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(process.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(APP_START_TIMEOUT)
        if not line or not line[0]:
            pytest.fail(f"e2e app did not start:\n{log.read_text()[-3000:]}")
        info = json.loads(line[0])
        yield App(
            process, info["metrics_port"], info["ws_port"], info["tracing"], info["alerting"], log
        )
        assert process.poll() is None, f"e2e app died:\n{log.read_text()[-3000:]}"
    finally:
        with contextlib.suppress(OSError):
            process.stdin.close()  # type: ignore[union-attr]
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Run:
    app: App
    prometheus: Prometheus
    alertmanager: Alertmanager
    started: float
    #: Dashboard panels skipped because the app does not expose their metrics yet.
    skipped: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp_path = tmp_path_factory.mktemp("e2e")
    with (
        running_alertmanager(tmp_path, config_yaml=stack.alertmanager_config_copy()) as am,
        running_app(tmp_path, am.url) as app,
    ):
        prometheus_port = free_port()
        dead_instance = f"{HOST}:{free_port()}"
        config = stack.prometheus_config_copy(
            addresses={
                "demo:8001": app.instance,
                "alertmanager:9093": f"{HOST}:{am.port}",
                "localhost:9090": f"{HOST}:{prometheus_port}",
            },
            fleet_file="targets/fleet.yml",
        )
        fleet = [{"targets": [dead_instance], "labels": {"service": FLEET_SERVICE}}]
        files = {**stack.rule_files_copy(), "targets/fleet.yml": yaml.safe_dump(fleet)}
        with running_prometheus(
            tmp_path,
            config,
            files=files,
            port=prometheus_port,
            args=["--enable-feature=exemplar-storage"],
        ) as prometheus:
            # Prometheus applies discovered targets every 5 s: the run starts with the
            # first scrape of the demo.
            (first,) = prometheus.wait_for(
                lambda: prometheus.query('timestamp(up{job="websocket-demo"})'),
                timeout=30,
                what="a first scrape of the demo",
            )
            yield Run(app, prometheus, am, float(first["value"][0]))


def firing(prometheus: Prometheus, name: str) -> list[dict[str, Any]]:
    return [
        alert
        for alert in prometheus.alerts()
        if alert["labels"]["alertname"] == name and alert["state"] == "firing"
    ]


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(
        math.isfinite(float(value))
        for series in result
        for _, value in series.get("values", [series.get("value", [0, "NaN"])])
    )


def wait_for_full_windows(run: Run) -> None:
    """Until the demo job has been scraped for a whole dashboard rate window."""
    seconds = int(stack.TEST_RATE_INTERVAL.rstrip("s"))
    run.prometheus.wait_for(
        lambda: [
            s
            for s in run.prometheus.query(
                f'count_over_time(up{{job="websocket-demo"}}[{stack.TEST_RATE_INTERVAL}])'
            )
            if float(s["value"][1]) >= seconds - 1
        ],
        timeout=40,
        what=f"{seconds} scrapes of the demo job",
    )


# -- 3. the error-ratio alert fires and reaches Alertmanager ------------------------------


def test_error_ratio_alert_fires_and_reaches_alertmanager(run: Run) -> None:
    alerts = run.prometheus.wait_for(
        lambda: firing(run.prometheus, "WebSocketHighErrorRatio"),
        timeout=40,
        what="WebSocketHighErrorRatio firing",
    )
    assert {alert["labels"]["route"] for alert in alerts} == {"/echo"}
    (alert,) = alerts
    assert alert["labels"]["service"] == DEMO_SERVICE
    assert alert["labels"]["severity"] == "warning"
    # Crashes (1011) and resets (1006) are 2 of the 3 closes per round on /echo.
    assert 0.3 < float(alert["value"]) < 0.8

    received = run.alertmanager.wait_for_alerts(
        lambda alerts: len(alerts) == 1,
        timeout=30,
        alertname="WebSocketHighErrorRatio",
    )
    (arrived,) = received
    assert arrived["labels"] == {
        "alertname": "WebSocketHighErrorRatio",
        "service": DEMO_SERVICE,
        "route": "/echo",
        "severity": "warning",
        "monitor": "ws-monitoring",  # the external label of the shipped prometheus.yml
    }
    assert arrived["annotations"]["runbook_url"].endswith("#websockethigherrorratio")
    assert arrived["annotations"]["summary"].startswith(f"{DEMO_SERVICE} /echo: ")
    assert arrived["generatorURL"].startswith(run.prometheus.url)
    assert arrived["receivers"] == [{"name": "team-chat"}]


def test_burn_rate_alert_inhibits_the_warnings_of_its_service(run: Run) -> None:
    # One crash per ~14 received messages burns the 0.1 % budget far over 14.4x: the
    # critical burn alert of ws-demo mutes its warnings in Alertmanager (shipped rule).
    def muted(alerts: list[dict[str, Any]]) -> bool:
        burn = {
            a["fingerprint"]
            for a in alerts
            if a["labels"]["alertname"] == "WebSocketMessageErrorBudgetBurnFast"
            and a["labels"]["service"] == DEMO_SERVICE
        }
        warnings = [
            a
            for a in alerts
            if a["labels"]["alertname"] == "WebSocketHighErrorRatio"
            and a["labels"]["service"] == DEMO_SERVICE
        ]
        return (
            bool(burn)
            and all(
                a["status"]["state"] == "suppressed" and set(a["status"]["inhibitedBy"]) & burn
                for a in warnings
            )
            and bool(warnings)
        )

    alerts = run.alertmanager.wait_for_alerts(muted, timeout=40)
    fast = [a for a in alerts if a["labels"]["alertname"] == "WebSocketMessageErrorBudgetBurnFast"]
    assert fast[0]["receivers"] == [{"name": "oncall"}]
    assert fast[0]["status"]["state"] == "active"


def test_instance_down_fires_for_the_dead_fleet_target_only(run: Run) -> None:
    alerts = run.prometheus.wait_for(
        lambda: firing(run.prometheus, "WebSocketInstanceDown"),
        timeout=30,
        what="WebSocketInstanceDown firing",
    )
    assert [(a["labels"]["job"], a["labels"]["service"]) for a in alerts] == [
        ("websocket-fleet", FLEET_SERVICE)
    ]
    arrived = run.alertmanager.wait_for_alerts(
        lambda alerts: len(alerts) == 1, timeout=30, alertname="WebSocketInstanceDown"
    )
    assert arrived[0]["receivers"] == [{"name": "oncall"}]


# -- 2. every recording rule produces series ---------------------------------------------


def test_every_recording_rule_produces_series(run: Run) -> None:
    wait_for_full_windows(run)
    records = [rule["record"] for rule in stack.recording_rules()]
    loaded = {rule["name"] for rule in run.prometheus.rules() if rule["type"] == "recording"}
    assert loaded == set(records)
    empty = [record for record in records if not run.prometheus.query(record)]
    assert not empty, f"recording rules without series: {empty}"
    for rule in run.prometheus.rules():
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    # The SLO ratio is handler crashes over received messages on the demo service.
    (ratio,) = run.prometheus.query(
        f'service:websocket_message_errors:ratio_rate5m{{service="{DEMO_SERVICE}"}}'
    )
    assert 0 < float(ratio["value"][1]) < 0.5


# -- 1. every dashboard expression parses and returns data -------------------------------


def variable_values(run: Run, dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """Real values for the dashboard's variables, from their own label_values() queries."""
    values: dict[str, list[str]] = {}
    for name, var in stack.variables(dashboard).items():
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
            assert match, f"unsupported variable query {var['definition']}"
            selector = stack.interpolate(match.group(1), dashboard, values)
            found = run.prometheus.label_values(match.group(2), selector)
            assert found, f"variable {name}: {var['definition']} has no values"
            values[name] = found
        else:
            values[name] = [var.get("current", {}).get("value", "")]
    return values


def test_dashboard_variables_have_real_values(run: Run) -> None:
    wait_for_full_windows(run)
    overview = stack.dashboards()["websocket-overview.json"]
    offered = variable_values(run, overview)
    assert DEMO_SERVICE in offered["service"]
    # The e2e app's allow-listed tenants, and the resets' tenant outside it.
    assert {"acme", "globex", "__other__"} <= set(offered["tenant"])
    route = stack.dashboards()["websocket-route.json"]
    values = variable_values(run, route)
    assert run.app.instance in values["instance"]
    assert {"/echo", "/chat/{room}"} <= set(values["route"])


def test_every_dashboard_query_returns_data(run: Run) -> None:
    wait_for_full_windows(run)
    # The alerts table needs a firing alert; the alert test may not have run first.
    run.prometheus.wait_for(lambda: firing(run.prometheus, "WebSocketHighErrorRatio"), timeout=40)
    exposed = run.app.metric_names()
    end = time.time()
    checked = 0
    for file_name, dashboard in stack.dashboards().items():
        # One real value per variable, among those its own query offers: the demo
        # service, its instance, the /echo route (which has every kind of traffic);
        # text boxes stay empty.
        offered = variable_values(run, dashboard)
        chosen = {
            "service": DEMO_SERVICE,
            "instance": run.app.instance,
            "route": "/echo",
            "tenant": "acme",  # the echo traffic's tenant
        }
        values: dict[str, str] = {}
        for name, var in stack.variables(dashboard).items():
            if var["type"] == "query":
                assert chosen[name] in offered[name], (file_name, name, offered[name])
                values[name] = chosen[name]
            else:
                values[name] = offered[name][0]
        for panel, target in stack.prometheus_targets(dashboard):
            where = f"{file_name}: {panel['title']} [{target['refId']}]"
            own = {n for n in stack.metric_names(target["expr"]) if n.startswith("ws_monitoring_")}
            if own - exposed:
                run.skipped.append(f"{where}: {sorted(own - exposed)} not exposed")
                continue
            expr = stack.interpolate(target["expr"], dashboard, values)
            assert "$" not in expr, f"{where}: uninterpolated {expr}"
            result = run.prometheus.query_range(expr, run.started, end, step=1)
            assert has_finite_value(result), f"{where}: no data for {expr}"
            checked += 1
    assert checked >= 40
    # Self-metric panels may only be skipped while the sinks do not exist.
    if run.app.tracing:
        assert not [s for s in run.skipped if "spans_dropped" in s], run.skipped
    if run.app.alerting:
        assert not [s for s in run.skipped if "ws_monitoring_alert" in s], run.skipped


def test_tenant_variable_filters_the_overview(run: Run) -> None:
    wait_for_full_windows(run)
    dashboard = stack.dashboards()["websocket-overview.json"]
    (panel,) = [p for p in stack.panels(dashboard) if p["title"] == "Active connections"]
    template = panel["targets"][0]["expr"]
    assert 'tenant=~"$tenant"' in template
    tenant = stack.variables(dashboard)["tenant"]
    assert (tenant["multi"], tenant["includeAll"], tenant["allValue"]) == (True, True, ".*")

    def active(tenants: list[str] | None) -> dict[str, float]:
        values = {"service": DEMO_SERVICE, "tenant": tenants or ["ALL"]}
        expr = stack.interpolate(template, dashboard, values)
        if tenants is None:
            # "All": Grafana puts allValue in, as it is.
            expr = expr.replace('tenant=~"ALL"', f'tenant=~"{tenant["allValue"]}"')
        return {s["metric"]["route"]: float(s["value"][1]) for s in run.prometheus.query(expr)}

    # The long-lived listeners: acme's on /echo, globex's on /chat/{room}.
    acme, globex = active(["acme"]), active(["globex"])
    assert acme.get("/echo", 0) >= 1
    assert "/chat/{room}" not in acme or acme["/chat/{room}"] == 0
    assert globex.get("/chat/{room}", 0) >= 1
    assert "/echo" not in globex or globex["/echo"] == 0
    # Several tenants join as a regex; All is every series, tenant label or not.
    both = active(["acme", "globex"])
    assert set(both) >= {"/echo", "/chat/{room}"}
    everything = active(None)
    unfiltered = template.replace(', tenant=~"$tenant"', "")
    expr = stack.interpolate(unfiltered, dashboard, {"service": DEMO_SERVICE})
    assert set(everything) == {s["metric"]["route"] for s in run.prometheus.query(expr)}


def test_route_variable_is_escaped_like_grafana(run: Run) -> None:
    # "/chat/{room}" has regex metacharacters: Grafana escapes them for =~ matchers.
    wait_for_full_windows(run)
    dashboard = stack.dashboards()["websocket-route.json"]
    (panel,) = [p for p in stack.panels(dashboard) if p["title"] == "Active connections"]
    values = {"instance": run.app.instance, "route": "/chat/{room}"}
    expr = stack.interpolate(panel["targets"][0]["expr"], dashboard, values)
    assert r'route=~"/chat/\\{room\\}"' in expr
    (series,) = run.prometheus.query(expr)
    assert series["metric"]["route"] == "/chat/{room}"
    # The long-lived chat listener, plus whichever short chat sessions of the traffic
    # generator are open at that instant.
    assert float(series["value"][1]) >= 1.0


def test_exemplars_carry_trace_ids_for_jaeger(run: Run) -> None:
    if not run.app.tracing:
        pytest.skip("tracing is not available in this build: no exemplars")
    data = run.prometheus.wait_for(
        lambda: run.prometheus.api(
            "query_exemplars",
            {
                "query": "websocket_message_duration_seconds_bucket",
                "start": f"{run.started:.3f}",
                "end": f"{time.time():.3f}",
            },
        ),
        timeout=20,
        what="exemplars",
    )
    labels = [exemplar["labels"] for series in data for exemplar in series["exemplars"]]
    assert labels
    # The label Grafana's exemplarTraceIdDestinations reads.
    assert all(re.fullmatch(r"[0-9a-f]{32}", label["trace_id"]) for label in labels)


# -- 4. scrapes succeed for the whole run ------------------------------------------------


def test_scrapes_succeed_for_the_whole_run(run: Run) -> None:
    wait_for_full_windows(run)
    targets = {(t["labels"]["job"], t["labels"]["instance"]): t for t in run.prometheus.targets()}
    for job in ("websocket-demo", "prometheus", "alertmanager"):
        ((target_key, target),) = [(k, t) for k, t in targets.items() if k[0] == job]
        assert target["health"] == "up", (target_key, target["lastError"])
        assert target["lastError"] == ""
    elapsed = math.ceil(time.time() - run.started)
    # The raw samples of `up`: a failed scrape records 0, a missing scrape leaves a gap.
    (series,) = run.prometheus.query(f'up{{job="websocket-demo"}}[{elapsed}s]')
    samples = [(float(t), value) for t, value in series["values"]]
    assert {value for _, value in samples} == {"1"}, samples
    times = [t for t, _ in samples]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # One-second interval: a gap of several intervals would be a missed scrape.
    assert max(gaps) < 5, times
    assert times[0] <= run.started, (run.started, times)
    assert time.time() - times[-1] < 5, times
    (scraped,) = run.prometheus.query(
        f'min_over_time(scrape_samples_scraped{{job="websocket-demo"}}[{elapsed}s])'
    )
    assert float(scraped["value"][1]) > 50
    failures = run.prometheus.query("sum(prometheus_rule_evaluation_failures_total)")
    assert float(failures[0]["value"][1]) == 0
