"""The shipped deploy/ files, read and turned into test copies for real Prometheus runs.

What the tests override, and nothing else (documented in deploy/README.md):

* ``for:`` of every alert becomes :data:`TEST_FOR` (:func:`shorten_for`);
* scrape and evaluation intervals become one second;
* the compose host names (``demo:8001``, ``alertmanager:9093``, ...) become the
  loopback addresses of the processes the test started, and the file_sd target files
  are the test's own.

Grafana dashboards are interpolated as Grafana does it (:func:`interpolate`), with
``$__rate_interval`` replaced by :data:`TEST_RATE_INTERVAL`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
DASHBOARDS_DIR = DEPLOY / "grafana" / "dashboards"
COMPOSE_FILE = DEPLOY / "docker-compose.monitoring.yml"
ALERTMANAGER_FILE = DEPLOY / "alertmanager" / "alertmanager.yml"
KIBANA_FILE = DEPLOY / "kibana" / "ws-monitoring.ndjson"
RUNBOOK_FILE = DEPLOY / "RUNBOOK.md"

#: ``for:`` of every alert in the test copy of the rules.
TEST_FOR = "1s"
#: What ``$__rate_interval`` becomes (Grafana: at least four scrape intervals).
TEST_RATE_INTERVAL = "15s"

_FOR = re.compile(r"^(?P<indent>\s*)for:\s*\S+\s*$", re.MULTILINE)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def rules() -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of every shipped rule file."""
    return [
        rule
        for path in rule_files()
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
    ]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recording_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "record" in rule]


def shorten_for(text: str, duration: str = TEST_FOR) -> str:
    """``text`` (a rule file) with every ``for:`` set to ``duration``.

    The same as ``sed -E 's/^([[:space:]]*)for:.*/\\1for: 1s/'``: a line-based rewrite,
    so the copy keeps the shipped expressions, labels and annotations byte for byte.
    """
    return _FOR.sub(lambda m: f"{m.group('indent')}for: {duration}", text)


def prometheus_config_copy(
    *,
    addresses: Mapping[str, str],
    fleet_file: str,
    interval: str = "1s",
) -> str:
    """The shipped prometheus.yml with test intervals, addresses and file_sd files.

    ``addresses`` maps each compose address of the shipped file (``demo:8001``) to a
    loopback one; an address without a mapping raises ``KeyError``, so a target added
    to the shipped file cannot silently be scraped in vain.
    """
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"].update(
        scrape_interval=interval, evaluation_interval=interval, scrape_timeout=interval
    )

    def rewrite(static_configs: list[dict[str, Any]]) -> None:
        for static in static_configs:
            static["targets"] = [addresses[target] for target in static["targets"]]

    for alerting in config["alerting"]["alertmanagers"]:
        rewrite(alerting["static_configs"])
    for job in config["scrape_configs"]:
        rewrite(job.get("static_configs", []))
        for file_sd in job.get("file_sd_configs", []):
            file_sd["files"] = [fleet_file]
            file_sd["refresh_interval"] = interval
    return yaml.safe_dump(config, sort_keys=False)


def rule_files_copy() -> dict[str, str]:
    """Rule files for the test copy, keyed by the path prometheus.yml loads them from."""
    return {f"rules/{path.name}": shorten_for(path.read_text()) for path in rule_files()}


# -- Grafana --------------------------------------------------------------------------------


def dashboards() -> dict[str, dict[str, Any]]:
    """Every shipped dashboard, by file name."""
    return {
        path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS_DIR.glob("*.json"))
    }


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included (rows themselves excluded)."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def datasource_type(panel: Mapping[str, Any], target: Mapping[str, Any]) -> str:
    source = target.get("datasource") or panel.get("datasource") or {}
    return str(source.get("type", ""))


def prometheus_targets(
    dashboard: Mapping[str, Any],
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every Prometheus query of the dashboard."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if datasource_type(panel, target) == "prometheus":
                yield panel, target


def variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in dashboard.get("templating", {}).get("list", [])}


# Grafana's prometheusSpecialRegexEscape: a regex metacharacter gets a backslash, itself
# escaped for the PromQL string literal (so the query text has two).
_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")


def regex_escape(value: str) -> str:
    value = value.replace("\\", "\\\\\\\\")
    return _REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), value)


def interpolate(
    expr: str,
    dashboard: Mapping[str, Any],
    values: Mapping[str, Sequence[str] | str],
    rate_interval: str = TEST_RATE_INTERVAL,
) -> str:
    """``expr`` with its template variables replaced as Grafana's Prometheus source does.

    Multi-value or include-all query variables are regex-escaped (several values join
    as ``(a|b)``); other variables are inserted as they are. ``$__rate_interval`` becomes
    ``rate_interval``.

    Raises:
        KeyError: a variable without a value (or an unknown ``$`` variable).
    """
    declared = variables(dashboard)

    def value_of(name: str) -> str:
        if name == "__rate_interval":
            return rate_interval
        var = declared[name]
        value = values[name]
        items = [value] if isinstance(value, str) else list(value)
        if var.get("multi") or var.get("includeAll"):
            escaped = [regex_escape(item) for item in items]
            return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
        return items[0]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: value_of(m.group(1) or m.group(2)), expr)


def metric_names(expr: str) -> set[str]:
    """Metric-like identifiers of a PromQL expression that name our own metrics."""
    return set(re.findall(r"(?<![:\w])((?:websocket|ws_monitoring)_[a-z_]+)(?![:\w])", expr))


# -- Alertmanager ---------------------------------------------------------------------------


def alertmanager_config_copy() -> str:
    """The shipped alertmanager.yml with the receivers' integrations removed.

    Routing, grouping and inhibition stay exactly as shipped; the receivers keep their
    names but notify nobody, so a test never reaches Slack, PagerDuty or SMTP.
    """
    config = load_yaml(ALERTMANAGER_FILE)
    config["receivers"] = [{"name": receiver["name"]} for receiver in config["receivers"]]
    return yaml.safe_dump(config, sort_keys=False)
