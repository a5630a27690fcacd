"""The shipped deploy/ files pass the real validators and follow the stack's conventions.

promtool (config, rules, rule unit tests), amtool (config, routing tree) and
docker-compose (config) run for real; what no tool checks (annotations, runbooks,
pinned images, dashboard structure) is checked here against the files themselves.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import stack
from tests.helpers.system import require_binary

SEVERITIES = {"critical", "warning", "info"}


def run(*argv: str, cwd: Path = stack.DEPLOY) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}"
    return result


# -- Prometheus ----------------------------------------------------------------------------


def test_promtool_check_config_loads_every_rule_file() -> None:
    promtool = require_binary("promtool", "prometheus")
    out = run(promtool, "check", "config", "prometheus/prometheus.yml").stdout
    assert f"SUCCESS: {len(stack.rule_files())} rule files found" in out
    for path in stack.rule_files():
        assert f"Checking prometheus/rules/{path.name}" in out


def test_promtool_check_rules() -> None:
    promtool = require_binary("promtool", "prometheus")
    out = run(promtool, "check", "rules", *map(str, stack.rule_files())).stdout
    total = sum(int(n) for n in re.findall(r"SUCCESS: (\d+) rules found", out))
    assert total == len(stack.rules())


def test_promtool_rule_unit_tests_pass() -> None:
    promtool = require_binary("promtool", "prometheus")
    out = run(promtool, "test", "rules", "prometheus/tests/websocket-rules.test.yml")
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_unit_tests_fail_when_an_alert_is_broken(tmp_path: Path) -> None:
    # The unit tests can fail: a copy whose error-ratio threshold is 10x higher must not pass.
    promtool = require_binary("promtool", "prometheus")
    shutil.copytree(stack.PROMETHEUS_DIR, tmp_path / "prometheus")
    alerts = tmp_path / "prometheus" / "rules" / "websocket-alerts.yml"
    text = alerts.read_text()
    assert "service_route:websocket_error_ratio:rate5m > 0.05" in text
    alerts.write_text(
        text.replace("websocket_error_ratio:rate5m > 0.05", "error_ratio:rate5m > 0.5")
    )
    result = subprocess.run(
        [promtool, "test", "rules", "prometheus/tests/websocket-rules.test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "WebSocketHighErrorRatio" in result.stdout + result.stderr


def test_every_alert_has_for_severity_and_annotations() -> None:
    runbook = stack.RUNBOOK_FILE.read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", title.strip().lower()).replace(" ", "-")
        for title in re.findall(r"^##+ (.+)$", runbook, re.MULTILINE)
    }
    names = [rule["alert"] for rule in stack.alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in stack.alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: no for:"
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) >= {"summary", "description", "runbook_url"}, name
        url = annotations["runbook_url"]
        assert url.startswith("https://"), name
        anchor = url.rsplit("#", 1)[1]
        assert anchor in anchors, f"{name}: runbook anchor #{anchor} not in RUNBOOK.md"
        # Alertmanager groups by service (and route): every alert must keep the label.
        assert "service" in rule["expr"] or "up{" in rule["expr"], name


def test_issue_alerts_are_all_there() -> None:
    names = {rule["alert"] for rule in stack.alert_rules()}
    assert names == {
        "WebSocketHighErrorRatio",
        "WebSocketHandshakeFailureRatioHigh",
        "WebSocketMessageLatencyP95High",
        "WebSocketMessageLatencyP99High",
        "WebSocketAbnormalCloseRatioHigh",
        "WebSocketPingRttHigh",
        "WebSocketConnectionDropStorm",
        "WebSocketInstanceDown",
        "WebSocketNoTraffic",
        "WebSocketMessageErrorBudgetBurnFast",
        "WebSocketMessageErrorBudgetBurnSlow",
    }
    by_name = {rule["alert"]: rule for rule in stack.alert_rules()}
    fast = by_name["WebSocketMessageErrorBudgetBurnFast"]["expr"]
    slow = by_name["WebSocketMessageErrorBudgetBurnSlow"]["expr"]
    assert "ratio_rate1h > (14.4 * 0.001)" in fast
    assert "ratio_rate5m > (14.4 * 0.001)" in fast
    assert "ratio_rate6h > (6 * 0.001)" in slow
    assert "ratio_rate30m > (6 * 0.001)" in slow


def test_rules_use_only_metrics_the_code_emits() -> None:
    # Names come from ws_monitoring.metrics (default namespace), never invented.
    emitted = {
        "websocket_connections_active",
        "websocket_connections_total",
        "websocket_connection_duration_seconds_bucket",
        "websocket_disconnections_total",
        "websocket_handshake_failures_total",
        "websocket_handshake_duration_seconds_count",
        "websocket_messages_total",
        "websocket_message_size_bytes_sum",
        "websocket_message_duration_seconds_bucket",
        "websocket_errors_total",
        "websocket_ping_rtt_seconds_bucket",
    }
    used: set[str] = set()
    for rule in stack.rules():
        used |= stack.metric_names(rule["expr"])
    assert used <= emitted, used - emitted
    assert used >= emitted - {"websocket_connection_duration_seconds_bucket"}


def test_promtool_tests_cover_every_alert_firing_and_not_firing() -> None:
    tests = stack.load_yaml(stack.PROMETHEUS_DIR / "tests" / "websocket-rules.test.yml")
    assert set(tests["rule_files"]) == {f"../rules/{p.name}" for p in stack.rule_files()}
    fires: set[str] = set()
    quiet: set[str] = set()
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in stack.alert_rules()}
    assert fires == names
    assert quiet == names


# -- Alertmanager ------------------------------------------------------------------------


def test_amtool_check_config() -> None:
    amtool = require_binary("amtool", "prometheus-alertmanager")
    out = run(amtool, "check-config", "alertmanager/alertmanager.yml").stdout
    assert "SUCCESS" in out
    assert "1 inhibit rules" in out


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=critical", "service=chat"], "oncall"),
        (["severity=warning", "service=chat", "route=/echo"], "team-chat"),
        (["severity=info", "service=chat"], "webhook"),
        (["alertname=Unlabelled"], "webhook"),
    ],
)
def test_amtool_routes_by_severity(labels: list[str], receiver: str) -> None:
    amtool = require_binary("amtool", "prometheus-alertmanager")
    out = run(
        amtool, "config", "routes", "test", "--config.file=alertmanager/alertmanager.yml", *labels
    ).stdout
    assert out.strip() == receiver


def test_alertmanager_secrets_come_from_files() -> None:
    config = stack.load_yaml(stack.ALERTMANAGER_FILE)
    text = stack.ALERTMANAGER_FILE.read_text()
    for key in ("smtp_auth_password:", "slack_api_url:", "routing_key:", "service_key:"):
        assert key not in text, f"secret value {key} in alertmanager.yml"
    assert config["global"]["smtp_auth_password_file"].startswith("/etc/alertmanager/secrets/")
    assert config["global"]["slack_api_url_file"].startswith("/etc/alertmanager/secrets/")
    receivers = {r["name"]: r for r in config["receivers"]}
    assert receivers["oncall"]["pagerduty_configs"][0]["routing_key_file"].startswith(
        "/etc/alertmanager/secrets/"
    )
    assert {"webhook_configs", "email_configs", "pagerduty_configs"} <= set(receivers["oncall"])
    assert {"webhook_configs", "slack_configs"} <= set(receivers["team-chat"])
    assert config["route"]["group_by"] == ["alertname", "service", "route"]
    assert config["inhibit_rules"] == [
        {
            "source_matchers": ['severity="critical"'],
            "target_matchers": ['severity="warning"'],
            "equal": ["service"],
        }
    ]


# -- docker compose --------------------------------------------------------------------------

#: Host paths the compose file mounts on purpose (log collectors read Docker's files).
HOST_MOUNTS = {"/var/run/docker.sock", "/var/lib/docker/containers"}
ELK = {"elasticsearch", "kibana", "kibana-setup", "filebeat"}


def compose_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = config["services"]
    return services


def check_compose(config: dict[str, Any], base: Path) -> None:
    """What `docker-compose config` cannot say: pinned images, ports, mounts that exist."""
    services = compose_services(config)
    assert set(services) >= {
        "demo", "prometheus", "alertmanager", "grafana", "loki", "alloy", "jaeger", *ELK,
    }  # fmt: skip
    for name, service in services.items():
        image = service.get("image", "")
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: image {image!r} not pinned"
        assert not image.endswith(":latest"), name
        if name != "kibana-setup" and name != "filebeat":
            assert service.get("ports"), f"{name}: no published port"
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith((".", "/")):
                path = (base / source).resolve() if source.startswith(".") else Path(source)
                if str(path) not in HOST_MOUNTS:
                    assert path.exists(), f"{name}: mount source {source} does not exist"
            else:
                assert source in config.get("volumes", {}), f"{name}: unknown volume {source}"
        profiles = set(service.get("profiles", []))
        assert profiles == ({"elk"} if name in ELK else set()), name
    demo = services["demo"]
    assert demo["build"]["dockerfile"] == "deploy/Dockerfile"
    command = demo["command"]
    assert command[:1] == ["demo"]
    assert "--host" in command
    assert "--metrics-host" in command
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--metrics-host") + 1] == "0.0.0.0"
    environment = demo["environment"]
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]


def test_compose_file_yaml_structure() -> None:
    config = stack.load_yaml(stack.COMPOSE_FILE)
    check_compose(config, stack.DEPLOY)
    text = stack.COMPOSE_FILE.read_text()
    # Secrets only by reference: ${VAR} from deploy/.env, or files in deploy/secrets/.
    for key, value in re.findall(r"^\s*(\w*(?:DSN|PASSWORD|KEY|TOKEN)\w*):\s*(.+)$", text, re.M):
        assert value.startswith("${"), (key, value)


def test_docker_compose_config_validates() -> None:
    compose = require_binary("docker-compose", "docker-compose")
    run(compose, "-f", str(stack.COMPOSE_FILE), "--profile", "elk", "config", "-q", cwd=stack.ROOT)
    out = run(compose, "-f", str(stack.COMPOSE_FILE), "config", cwd=stack.ROOT).stdout
    # The resolved configuration (absolute paths, defaults applied) passes the same
    # checks; docker-compose 1.29 lists every service whatever the profile, so the
    # profiles themselves are checked on it.
    check_compose(yaml.safe_load(out), stack.DEPLOY)


def test_dockerfile_runs_the_demo_on_all_interfaces() -> None:
    dockerfile = (stack.DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11[\w.-]+$", dockerfile, re.M)
    assert "pip install '.[all]'" in dockerfile
    assert 'CMD ["demo", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0"]' in dockerfile
    assert "USER app" in dockerfile
    # Everything the image copies passes the Dockerfile's own .dockerignore.
    ignore = (stack.DEPLOY / "Dockerfile.dockerignore").read_text().split()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = [
        source.rstrip("/")
        for line in re.findall(r"^COPY (.+)$", dockerfile, re.M)
        for source in line.split()[:-1]
    ]
    assert copied == ["pyproject.toml", "README.md", "ws_monitoring", "deploy/demo/entrypoint.py"]
    assert set(copied) <= kept


# -- Grafana ---------------------------------------------------------------------------------


def test_grafana_provisioning() -> None:
    provisioning = stack.DEPLOY / "grafana" / "provisioning"
    sources = stack.load_yaml(provisioning / "datasources" / "datasources.yml")["datasources"]
    by_uid = {source["uid"]: source for source in sources}
    assert {by_uid[u]["type"] for u in ("prometheus", "loki", "jaeger")} == {
        "prometheus", "loki", "jaeger",
    }  # fmt: skip
    exemplars = by_uid["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    # The label name the code puts on exemplars (metrics.py: Exemplar({"trace_id": ...})).
    assert exemplars == [{"name": "trace_id", "datasourceUid": "jaeger"}]
    derived = by_uid["loki"]["jsonData"]["derivedFields"][0]
    assert derived["datasourceUid"] == "jaeger"
    line = json.dumps({"message": "x", "trace": {"id": "0af7651916cd43dd8448eb211c80319c"}})
    assert re.search(derived["matcherRegex"], line).group(1) == "0af7651916cd43dd8448eb211c80319c"  # type: ignore[union-attr]
    providers = stack.load_yaml(provisioning / "dashboards" / "dashboards.yml")["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboards_structure() -> None:
    dashboards = stack.dashboards()
    assert set(dashboards) == {"websocket-overview.json", "websocket-route.json"}
    uids = set()
    for name, dashboard in dashboards.items():
        uids.add(dashboard["uid"])
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in stack.panels(dashboard):
            assert panel["title"], name
            assert panel.get("targets"), f"{name}: {panel['title']}"
            for target in panel["targets"]:
                kind = stack.datasource_type(panel, target)
                assert kind in {"prometheus", "loki"}, (name, panel["title"])
                uid = (target.get("datasource") or panel["datasource"])["uid"]
                assert uid == kind  # the provisioned uids
                expr = target["expr"]
                if kind == "prometheus":
                    # Rates follow Grafana's interval, never a fixed window.
                    for window in re.findall(r"\[([^\]]+)\]", expr):
                        assert window == "$__rate_interval", (name, panel["title"], expr)
    assert uids == {"ws-monitoring-overview", "ws-monitoring-route"}

    # The overview's tenant variable filters every family that has a tenant label (the
    # route-labelled ones, ws_monitoring/metrics/sink.py); "All" matches servers without.
    overview = dashboards["websocket-overview.json"]
    tenant = stack.variables(overview)["tenant"]
    assert (
        tenant["definition"]
        == 'label_values(websocket_connections_total{service=~"$service"}, tenant)'
    )
    assert (tenant["multi"], tenant["includeAll"], tenant["allValue"]) == (True, True, ".*")
    tenant_families = re.compile(
        r"websocket_(connections_active|connections_total|connection_duration_seconds_\w+|"
        r"disconnections_total|messages_total|message_size_bytes_\w+|"
        r"message_duration_seconds_\w+|errors_total|ping_rtt_seconds_\w+)\{([^}]*)\}"
    )
    filtered = 0
    for panel, target in stack.prometheus_targets(overview):
        for match in tenant_families.finditer(target["expr"]):
            assert 'tenant=~"$tenant"' in match.group(2), (panel["title"], target["expr"])
            filtered += 1
        if "websocket_handshake" in target["expr"]:
            assert "tenant" not in target["expr"], panel["title"]
    assert filtered >= 10

    route = dashboards["websocket-route.json"]
    assert {"instance", "route"} <= set(stack.variables(route))
    logs = [p for p in stack.panels(route) if p["type"] == "logs"]
    assert len(logs) == 1
    expr = logs[0]["targets"][0]["expr"]
    assert '|= "$connection_id"' in expr
    assert '|= "$trace_id"' in expr


def test_dashboards_cover_the_issue_panels() -> None:
    exprs = " ".join(
        target["expr"]
        for dashboard in stack.dashboards().values()
        for _, target in stack.prometheus_targets(dashboard)
    )
    for needed in (
        "websocket_connections_active",
        "rate(websocket_connections_total",
        "rate(websocket_disconnections_total",
        "rate(websocket_messages_total",
        "rate(websocket_message_size_bytes_sum",
        "websocket_message_duration_seconds_bucket",
        "sum by (type) (rate(websocket_errors_total",
        "sum by (code) (rate(websocket_disconnections_total",
        "websocket_handshake_failures_total",
        "websocket_ping_rtt_seconds_bucket",
        "ws_monitoring_alerts_total",
        "ws_monitoring_alert_queue_depth",
        "ws_monitoring_spans_dropped_total",
    ):
        assert needed in exprs, needed
    overview = stack.dashboards()["websocket-overview.json"]
    kinds = {panel["type"] for panel in stack.panels(overview)}
    assert "heatmap" in kinds
    exemplar_panels = [
        panel["title"]
        for panel in stack.panels(overview)
        if any(t.get("exemplar") for t in panel["targets"])
    ]
    assert "Message handling time" in exemplar_panels


# -- Kibana, logs ----------------------------------------------------------------------------


def test_kibana_ndjson_objects_and_references() -> None:
    lines = stack.KIBANA_FILE.read_text().splitlines()
    objects = [json.loads(line) for line in lines]  # one JSON object per line
    assert all(isinstance(obj, dict) for obj in objects)
    by_id = {(obj["type"], obj["id"]): obj for obj in objects}
    data_views = [obj for obj in objects if obj["type"] == "index-pattern"]
    assert len(data_views) == 1
    assert data_views[0]["attributes"]["timeFieldName"] == "@timestamp"
    assert data_views[0]["attributes"]["title"] == "ws-monitoring-logs*"
    searches = [obj for obj in objects if obj["type"] == "search"]
    assert any("error" in s["attributes"]["title"].lower() for s in searches)
    dashboards = [obj for obj in objects if obj["type"] == "dashboard"]
    assert len(dashboards) == 1
    for obj in objects:
        for ref in obj["references"]:
            assert (ref["type"], ref["id"]) in by_id, (obj["id"], ref)
    panels = json.loads(dashboards[0]["attributes"]["panelsJSON"])
    ref_names = {ref["name"] for ref in dashboards[0]["references"]}
    for panel in panels:
        assert f"{panel['panelIndex']}:{panel['panelRefName']}" in ref_names
    # Filebeat writes where the data view reads.
    filebeat = stack.load_yaml(stack.DEPLOY / "filebeat" / "filebeat.yml")
    assert filebeat["output.elasticsearch"]["index"] == "ws-monitoring-logs"


def test_log_shippers_use_low_cardinality_labels_only() -> None:
    alloy = (stack.DEPLOY / "alloy" / "config.alloy").read_text()
    labels = set(re.findall(r'target_label\s*=\s*"(\w+)"', alloy))
    labels |= set(re.findall(r"values\s*=\s*\{\s*(\w+)\s*=", alloy))
    assert labels == {"service", "stream", "level"}
    assert "loki.write" in alloy
    assert "http://loki:3100/loki/api/v1/push" in alloy
