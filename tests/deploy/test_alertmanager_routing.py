"""The shipped Alertmanager routing and inhibition, run by a real Alertmanager."""

from __future__ import annotations

import datetime
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.deploy import stack
from tests.helpers.alertmanager import running_alertmanager


def alert(name: str, **labels: str) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC)
    return {
        "labels": {"alertname": name, **labels},
        "annotations": {"summary": f"{name} test"},
        "startsAt": now.isoformat(),
        "endsAt": (now + datetime.timedelta(minutes=5)).isoformat(),
        "generatorURL": "http://prometheus.test/graph",
    }


def state(alerts: list[dict[str, Any]], name: str, service: str) -> dict[str, Any]:
    (found,) = [
        a
        for a in alerts
        if a["labels"]["alertname"] == name and a["labels"].get("service") == service
    ]
    status: dict[str, Any] = found["status"]
    return status


def alert_groups(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v2/alerts/groups", timeout=5) as response:
        groups: list[dict[str, Any]] = json.loads(response.read())
    return groups


def test_critical_inhibits_warnings_of_the_same_service_only(tmp_path: Path) -> None:
    with running_alertmanager(tmp_path, config_yaml=stack.alertmanager_config_copy()) as am:
        status = am.post(
            [
                alert("WebSocketInstanceDown", service="chat", severity="critical"),
                alert("WebSocketHighErrorRatio", service="chat", route="/echo", severity="warning"),
                alert(
                    "WebSocketHighErrorRatio", service="other", route="/echo", severity="warning"
                ),
                alert("WebSocketNoTraffic", service="chat", severity="info"),
            ]
        )
        assert status == 200
        alerts = am.wait_for_alerts(lambda alerts: len(alerts) == 4)
        critical = [
            a["fingerprint"] for a in alerts if a["labels"]["alertname"] == "WebSocketInstanceDown"
        ]
        muted = state(alerts, "WebSocketHighErrorRatio", "chat")
        assert muted["state"] == "suppressed"
        assert muted["inhibitedBy"] == critical
        assert state(alerts, "WebSocketHighErrorRatio", "other")["state"] == "active"
        # Only warnings are inhibited; critical and info alerts stay active.
        assert state(alerts, "WebSocketInstanceDown", "chat")["state"] == "active"
        assert state(alerts, "WebSocketNoTraffic", "chat")["state"] == "active"


def test_alerts_are_grouped_by_alertname_service_and_route(tmp_path: Path) -> None:
    with running_alertmanager(tmp_path, config_yaml=stack.alertmanager_config_copy()) as am:
        assert (
            am.post(
                [
                    alert(
                        "WebSocketHighErrorRatio", service="chat", route="/a", severity="warning"
                    ),
                    alert(
                        "WebSocketHighErrorRatio", service="chat", route="/b", severity="warning"
                    ),
                    alert("WebSocketPingRttHigh", service="chat", route="/a", severity="warning"),
                ]
            )
            == 200
        )
        deadline = time.monotonic() + 10
        while True:
            groups = alert_groups(am.url)
            if sum(len(g["alerts"]) for g in groups) == 3:
                break
            assert time.monotonic() < deadline, groups
            time.sleep(0.05)
        keys = sorted(
            ((g["labels"], g["receiver"]["name"], len(g["alerts"])) for g in groups),
            key=lambda group: sorted(group[0].items()),
        )
        warning = "team-chat"
        assert keys == [
            (
                {"alertname": "WebSocketHighErrorRatio", "route": "/a", "service": "chat"},
                warning,
                1,
            ),
            (
                {"alertname": "WebSocketHighErrorRatio", "route": "/b", "service": "chat"},
                warning,
                1,
            ),
            ({"alertname": "WebSocketPingRttHigh", "route": "/a", "service": "chat"}, warning, 1),
        ]
