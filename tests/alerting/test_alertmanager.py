"""PrometheusAlerter against a real Alertmanager 0.25 (and real misbehaving HTTP peers)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection

import ws_monitoring
from tests.helpers.alertmanager import Alertmanager, running_alertmanager
from tests.helpers.process import hanging_peer
from tests.helpers.scrape import Samples
from tests.helpers.servers import HOST, async_wait_until, wait_until
from tests.helpers.system import free_port
from ws_monitoring.alerting import PrometheusAlerter

STATIC = {"service": "chat", "instance": "chat-1", "environment": "test"}


def alert_labels(alerts: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [a["labels"] for a in alerts]


def named(name: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda alerts: any(a["labels"]["alertname"] == name for a in alerts)


@contextlib.contextmanager
def alerter(
    urls: str | list[str],
    registry: CollectorRegistry,
    *,
    static: Mapping[str, str] = STATIC,
    **options: Any,
) -> Iterator[PrometheusAlerter]:
    """A ``PrometheusAlerter`` with the ``static`` labels, quick retries and no cooldown
    (unless ``options`` say otherwise), closed when the block ends."""
    options = {"backoff": 0.02, "max_backoff": 0.2, "cooldown": 0, **static, **options}
    prom = PrometheusAlerter(urls, registry=registry, **options)
    try:
        yield prom
    finally:
        prom.close(timeout=1)


@pytest.fixture
def am(tmp_path: Path) -> Iterator[Alertmanager]:
    with running_alertmanager(tmp_path) as manager:
        yield manager


def test_fire_appears_with_labels_and_annotations_then_resolves(
    am: Alertmanager, registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    with alerter(am.url, registry, generator_url="http://runbooks/chat") as prom:
        prom.fire(
            "ChatBackendDown", severity="critical", summary="chat backend down",
            description="the backend stopped answering", labels={"backend": "redis"},
            annotations={"runbook": "http://runbooks/chat#backend"},
        )  # fmt: skip
        alerts = am.wait_for_alerts(named("ChatBackendDown"), active=True)
        assert len(alerts) == 1
        alert = alerts[0]
        assert alert["labels"] == {
            "alertname": "ChatBackendDown",
            "severity": "critical",
            "backend": "redis",
            **STATIC,
        }
        assert alert["annotations"] == {
            "summary": "chat backend down",
            "description": "the backend stopped answering",
            "runbook": "http://runbooks/chat#backend",
        }
        assert alert["generatorURL"] == "http://runbooks/chat"
        assert alert["status"]["state"] == "active"

        prom.resolve("ChatBackendDown", {"backend": "redis"})
        # Resolved alerts (endsAt in the past) are no longer listed by Alertmanager.
        am.wait_for_alerts(lambda alerts: not named("ChatBackendDown")(alerts))
        assert prom.active_alerts() == []
        assert prom.flush(5)
        samples = scrape_metrics()
        assert (
            samples["ws_monitoring_alerts_total", {"sink": "alertmanager", "outcome": "sent"}] == 2
        )
        assert samples["ws_monitoring_alert_queue_depth", {"sink": "alertmanager"}] == 0
        for outcome in ("failed", "retried", "dropped"):
            labels = {"sink": "alertmanager", "outcome": outcome}
            assert samples["ws_monitoring_alerts_total", labels] == 0


def test_ha_pair_both_receive_every_alert(tmp_path: Path, registry: CollectorRegistry) -> None:
    with (
        running_alertmanager(tmp_path) as first,
        running_alertmanager(tmp_path) as second,
        alerter([first.url, second.url + "/"], registry) as prom,
    ):
        prom.fire("Replicated", severity="warning", summary="both see it")
        for manager in (first, second):
            alerts = manager.wait_for_alerts(named("Replicated"))
            assert alerts[0]["annotations"] == {"summary": "both see it"}
        prom.resolve("Replicated")
        for manager in (first, second):
            manager.wait_for_alerts(lambda alerts: alerts == [])


def test_an_alertmanager_started_after_firing_still_receives_it(
    tmp_path: Path, registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    port = free_port()
    with alerter(f"http://{HOST}:{port}", registry) as prom:
        prom.fire("EarlyBird", severity="critical", summary="fired before Alertmanager was up")
        # Nothing listens yet: the sender retries with backoff.
        wait_until(
            lambda: (
                scrape_metrics().get(
                    "ws_monitoring_alerts_total", sink="alertmanager", outcome="retried"
                )
                >= 1
            ),
            what="a failed attempt",
        )
        assert scrape_metrics()["ws_monitoring_alert_queue_depth", {"sink": "alertmanager"}] == 1
        with running_alertmanager(tmp_path, port=port) as manager:
            alerts = manager.wait_for_alerts(named("EarlyBird"))
            assert alerts[0]["annotations"]["summary"] == "fired before Alertmanager was up"
            assert prom.flush(5)
        samples = scrape_metrics()
        assert (
            samples["ws_monitoring_alerts_total", {"sink": "alertmanager", "outcome": "sent"}] == 1
        )
        assert samples["ws_monitoring_alert_queue_depth", {"sink": "alertmanager"}] == 0


def test_an_alertmanager_restart_gets_the_active_alerts_again(
    am: Alertmanager, registry: CollectorRegistry
) -> None:
    with alerter(am.url, registry, resend_interval=0.2) as prom:
        prom.fire("StillBroken", severity="critical", summary="still broken")
        am.wait_for_alerts(named("StillBroken"))
        am.stop()
        am.start()
        # Alertmanager keeps alerts in memory only: the re-send brings it back.
        am.wait_for_alerts(named("StillBroken"))


def test_identical_label_sets_are_deduplicated(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    with recording_peer() as peer, alerter(peer.url, registry, cooldown=3600) as prom:
        for _ in range(50):
            prom.fire("Same", severity="warning", summary="same")
        assert prom.flush(5)
        prom.fire("Same", severity="warning", summary="new annotation")
        prom.fire("Same", severity="critical", summary="new annotation")
        assert prom.flush(5)
        assert [a["labels"]["severity"] for a in peer.alerts()] == ["warning", "warning",
                                                                     "critical"]  # fmt: skip
        first, old, new = peer.alerts()
        assert first["annotations"] == {"summary": "same"}
        # A severity change resolves the old label set at once and fires the new one.
        assert old["endsAt"] < first["endsAt"]
        assert new["annotations"] == {"summary": "new annotation"}
        assert new["endsAt"] > old["endsAt"]


def test_cooldown_stops_a_flapping_storm(registry: CollectorRegistry) -> None:
    with recording_peer() as peer, alerter(peer.url, registry, cooldown=3600) as prom:
        prom.fire("Flappy", severity="warning", summary="flap")
        for _ in range(100):
            prom.resolve("Flappy")
            prom.fire("Flappy", severity="warning", summary="flap")
        prom.resolve("Flappy")
        # Within the cooldown nothing more goes out; flush() sends the last state once.
        wait_until(lambda: prom.queue_depth == 0 and len(peer.alerts()) == 1, what="the first fire")
        assert prom.flush(5)
        sent = peer.alerts()
        assert len(sent) == 2
        assert sent[1]["labels"]["alertname"] == "Flappy"
        assert sent[1]["startsAt"] == sent[0]["startsAt"]
        assert sent[1]["endsAt"] <= sent[0]["endsAt"]


class RecordingPeer:
    """A real HTTP server that records alert POSTs and answers ``status``."""

    def __init__(self, status: int = 200, gate: threading.Event | None = None) -> None:
        self.status = status
        #: When set, each request waits for it before being answered (recorded first).
        self.gate = gate
        self.bodies: list[list[dict[str, Any]]] = []
        self.raw: list[str] = []
        self.lock = threading.Lock()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with peer.lock:
                    peer.raw.append(body.decode())
                    peer.bodies.append(json.loads(body))
                    status = peer.status
                if peer.gate is not None:
                    peer.gate.wait(10)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def alerts(self) -> list[dict[str, Any]]:
        with self.lock:
            return [alert for body in self.bodies for alert in body]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def recording_peer(
    status: int = 200, gate: threading.Event | None = None
) -> Iterator[RecordingPeer]:
    peer = RecordingPeer(status, gate)
    try:
        yield peer
    finally:
        peer.close()


def test_4xx_is_logged_once_and_not_retried(
    registry: CollectorRegistry,
    scrape_metrics: Callable[[], Samples],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with recording_peer(400) as peer, alerter(peer.url, registry) as prom:
        prom.fire("Rejected", severity="warning", summary="one")
        wait_until(lambda: prom.queue_depth == 0, what="the answer")
        prom.fire("Rejected2", severity="warning", summary="two")
        wait_until(lambda: prom.queue_depth == 0, what="the answer")
        assert len(peer.bodies) == 2  # one attempt each
        samples = scrape_metrics()
        assert (
            samples["ws_monitoring_alerts_total", {"sink": "alertmanager", "outcome": "failed"}]
            == 2
        )
        assert (
            samples["ws_monitoring_alerts_total", {"sink": "alertmanager", "outcome": "retried"}]
            == 0
        )
    errors = [r for r in caplog.records if "answered 400" in r.getMessage()]
    assert len(errors) == 1


def test_5xx_is_retried_with_backoff_until_it_succeeds(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    with recording_peer(503) as peer, alerter(peer.url, registry) as prom:
        prom.fire("Flaky", severity="warning", summary="flaky")
        wait_until(lambda: len(peer.bodies) >= 3, what="three attempts")
        with peer.lock:
            peer.status = 200
        assert prom.flush(5)
        attempts = len(peer.bodies)
        samples = scrape_metrics()
        assert (
            samples["ws_monitoring_alerts_total", {"sink": "alertmanager", "outcome": "sent"}] == 1
        )
        retried = samples[
            "ws_monitoring_alerts_total", {"sink": "alertmanager", "outcome": "retried"}
        ]
        assert retried == attempts - 1
        assert all(body[0]["labels"] == peer.bodies[0][0]["labels"] for body in peer.bodies)


async def test_a_hanging_alertmanager_never_slows_message_handling(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    with hanging_peer() as peer, alerter(peer.url, registry, timeout=30, queue_size=5) as prom:

        async def handler(ws: ServerConnection) -> None:
            async for message in ws:
                if message == "crash":
                    raise RuntimeError("crash")
                await ws.send(message)

        async with ws_monitoring.serve(
            handler, HOST, 0, alerters=[prom], registry=registry, metrics=False
        ) as server:
            port = server.sockets[0].getsockname()[1]
            for index in range(8):
                prom.fire(f"App{index}", severity="warning", summary="pending")
            # A crash while the sender is stuck in a request that never gets an answer.
            async with connect(f"ws://{HOST}:{port}/") as client:
                await client.send("crash")
                await client.wait_closed()
            await async_wait_until(lambda: peer.accepted, what="the stuck request")
            async with connect(f"ws://{HOST}:{port}/") as client:
                for index in range(2000):
                    await client.send(f"m{index}")
                    assert await client.recv() == f"m{index}"
        samples = scrape_metrics()
        # 5 label sets fit in the queue (the one in flight included): 4 of 9 dropped.
        assert samples["ws_monitoring_alert_queue_depth", {"sink": "alertmanager"}] == 5
        assert (
            samples["ws_monitoring_alerts_total", {"sink": "alertmanager", "outcome": "dropped"}]
            == 4
        )
        assert (
            samples["ws_monitoring_alerts_total", {"sink": "alertmanager", "outcome": "sent"}] == 0
        )
        # close() gives up after its deadline and counts what is left as dropped.
        assert not prom.flush(0.05)
        prom.close(timeout=0.05)
        samples = scrape_metrics()
        assert samples["ws_monitoring_alert_queue_depth", {"sink": "alertmanager"}] == 0
        assert (
            samples["ws_monitoring_alerts_total", {"sink": "alertmanager", "outcome": "dropped"}]
            == 9
        )
        prom.fire("AfterClose", severity="warning", summary="too late")
        assert (
            scrape_metrics()[
                "ws_monitoring_alerts_total", {"sink": "alertmanager", "outcome": "dropped"}
            ]
            == 10
        )


def test_queue_overflow_is_counted_and_the_rest_delivered(
    tmp_path: Path, registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    port = free_port()
    with alerter(f"http://{HOST}:{port}", registry, queue_size=3, batch_size=2) as prom:
        for index in range(7):
            prom.fire(f"Overflow{index}", severity="info", summary=str(index))
        samples = scrape_metrics()
        assert samples["ws_monitoring_alert_queue_depth", {"sink": "alertmanager"}] == 3
        assert (
            samples["ws_monitoring_alerts_total", {"sink": "alertmanager", "outcome": "dropped"}]
            == 4
        )
        with running_alertmanager(tmp_path, port=port) as manager:
            assert prom.flush(10)
            alerts = manager.alerts()
            assert sorted(a["labels"]["alertname"] for a in alerts) == [
                "Overflow0", "Overflow1", "Overflow2",
            ]  # fmt: skip
        samples = scrape_metrics()
        assert (
            samples["ws_monitoring_alerts_total", {"sink": "alertmanager", "outcome": "sent"}] == 3
        )


def test_max_active_bounds_memory(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    with recording_peer() as peer, alerter(peer.url, registry, max_active=2) as prom:
        for index in range(5):
            prom.fire("Many", severity="info", summary="x", labels={"n": str(index)})
        assert len(prom.active_alerts()) == 2
        assert prom.flush(5)
        assert len(peer.alerts()) == 2
        dropped = {"sink": "alertmanager", "outcome": "dropped"}
        assert scrape_metrics()["ws_monitoring_alerts_total", dropped] == 3


def test_firing_alerts_are_resent_with_a_future_ends_at(registry: CollectorRegistry) -> None:
    with recording_peer() as peer, alerter(peer.url, registry, resend_interval=0.1) as prom:
        prom.fire("Resent", severity="warning", summary="again and again")
        wait_until(lambda: len(peer.alerts()) >= 3, what="two re-sends")
        sent = peer.alerts()[:3]
        assert all(a["labels"]["alertname"] == "Resent" for a in sent)
        assert len({a["startsAt"] for a in sent}) == 1
        assert all(a["endsAt"] > a["startsAt"] for a in sent)


def test_resolve_after_resolves_a_quiet_alert(registry: CollectorRegistry) -> None:
    with recording_peer() as peer, alerter(peer.url, registry) as prom:
        prom.fire("Quiet", severity="warning", summary="x", resolve_after=0.2)
        wait_until(lambda: len(peer.alerts()) == 2, what="fire and resolve")
        fired, resolved = peer.alerts()
        assert resolved["labels"] == fired["labels"]
        assert resolved["endsAt"] < fired["endsAt"]
        assert prom.active_alerts() == []


def test_labels_and_annotations_go_through_the_privacy_layer(registry: CollectorRegistry) -> None:
    with recording_peer() as peer, alerter(
        peer.url, registry, instance="10.1.2.3:8765"
    ) as prom:  # fmt: skip
        prom.fire(
            "Suspicious",
            severity="warning",
            summary="many errors from 203.0.113.77",
            labels={"client_ip": "203.0.113.77", "token": "abc"},
            annotations={"url": "http://x/y?token=secret", "user_id": "alice"},
        )
        assert prom.flush(5)
        (alert,) = peer.alerts()
        # Static labels are the operator's own: kept as given.
        assert alert["labels"]["instance"] == "10.1.2.3:8765"
        assert alert["labels"]["client_ip"] == "203.0.113.0"
        assert "token" not in alert["labels"]
        assert alert["annotations"]["summary"] == "many errors from 203.0.113.0"
        assert alert["annotations"]["url"] == "http://x/y"
        assert alert["annotations"]["user_id"] == prom.privacy.pseudonymize("alice")
        prom.resolve("Suspicious", {"client_ip": "203.0.113.77", "token": "abc"})
        assert prom.flush(5)
        assert "endsAt" in peer.alerts()[-1]
        assert peer.alerts()[-1]["labels"] == alert["labels"]


def test_bad_input_is_a_clear_error(registry: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match="http"):
        PrometheusAlerter("localhost:9093", registry=registry)
    with pytest.raises(ValueError, match="not a valid URL"):
        PrometheusAlerter("http://127.0.0.1:99999", registry=registry)
    with pytest.raises(ValueError, match="not a valid URL"):
        PrometheusAlerter("http://[::1", registry=registry)
    with pytest.raises(ValueError, match="at least one"):
        PrometheusAlerter([], registry=registry)
    with pytest.raises(ValueError, match="resend_interval"):
        PrometheusAlerter("http://x", resend_interval=0, registry=registry)
    with pytest.raises(ValueError, match="cooldown"):
        PrometheusAlerter("http://x", cooldown=-1, registry=registry)
    with pytest.raises(ValueError, match="queue_size"):
        PrometheusAlerter("http://x", queue_size=0, registry=registry)
    with pytest.raises(ValueError, match="not a valid name"):
        PrometheusAlerter("http://x", labels={"bad-name": "x"}, registry=registry)
    prom = PrometheusAlerter("http://x", registry=registry)
    with pytest.raises(ValueError, match="alertname"):
        prom.fire("", severity="warning", summary="x")
    with pytest.raises(ValueError, match="severity"):
        prom.fire("X", severity="", summary="x")
    with pytest.raises(ValueError, match="not a valid name"):
        prom.fire("X", severity="warning", summary="x", annotations={"1x": "y"})
    with pytest.raises(ValueError, match="resolve_after"):
        prom.fire("X", severity="warning", summary="x", resolve_after=0)
    prom.resolve("NeverFired")
    assert prom.flush(0.1)
    prom.close()
    prom.close()


def test_default_static_labels(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "svc")
    monkeypatch.setenv("WS_MONITORING_ENVIRONMENT", "staging")
    prom = PrometheusAlerter("http://x", registry=registry, labels={"team": "rt"})
    assert prom.static_labels == {
        "service": "svc",
        "instance": socket.gethostname(),
        "environment": "staging",
        "team": "rt",
    }
    prom.close()


def test_a_re_fire_after_a_sent_resolve_is_a_new_occurrence(registry: CollectorRegistry) -> None:
    with recording_peer() as peer, alerter(peer.url, registry, cooldown=3600) as prom:
        prom.fire("Again", severity="warning", summary="x", labels={"dropped": None})  # type: ignore[dict-item]
        assert prom.flush(5)
        prom.resolve("Again")
        assert prom.flush(5)
        prom.fire("Again", severity="warning", summary="x")
        assert prom.flush(5)
        first, resolved, second = peer.alerts()
        assert first["labels"] == second["labels"]
        assert "dropped" not in first["labels"]
        assert resolved["startsAt"] == first["startsAt"]
        assert second["startsAt"] > first["startsAt"]


def test_held_back_changes_go_out_when_the_cooldown_ends(registry: CollectorRegistry) -> None:
    with recording_peer() as peer, alerter(peer.url, registry, cooldown=0.3) as prom:
        prom.fire("Cool", severity="warning", summary="first")
        prom.fire("Cool", severity="warning", summary="second")
        wait_until(lambda: len(peer.alerts()) == 2, what="the held-back update")
        assert [a["annotations"]["summary"] for a in peer.alerts()] == ["first", "second"]
        prom.resolve("Cool")
        wait_until(lambda: len(peer.alerts()) == 3, what="the held-back resolve")
        assert "endsAt" in peer.alerts()[2]
        assert prom.active_alerts() == []
        # Once forgotten (a cooldown after its resolve), a new fire goes out at once.
        wait_until(lambda: not prom._active, what="the resolved alert to be forgotten")
        prom.fire("Cool", severity="warning", summary="third")
        wait_until(lambda: len(peer.alerts()) == 4, what="the new fire")


def test_an_update_during_delivery_is_not_lost(registry: CollectorRegistry) -> None:
    gate = threading.Event()
    with recording_peer(gate=gate) as peer, alerter(peer.url, registry) as prom:
        prom.fire("InFlight", severity="warning", summary="old")
        wait_until(lambda: len(peer.alerts()) == 1, what="the request in flight")
        prom.fire("InFlight", severity="warning", summary="new")
        assert prom.queue_depth == 1
        gate.set()
        assert prom.flush(5)
        assert [a["annotations"]["summary"] for a in peer.alerts()] == ["old", "new"]


def test_shutdown_flushes_like_a_sink(registry: CollectorRegistry) -> None:
    with recording_peer() as peer, alerter(peer.url, registry) as prom:
        prom.fire("Flushed", severity="info", summary="x")
        prom.shutdown(5)
        assert prom.queue_depth == 0
        assert len(peer.alerts()) == 1


def test_queued_alerts_are_delivered_when_the_process_exits() -> None:
    with recording_peer() as peer:
        script = (
            "from prometheus_client import CollectorRegistry\n"
            "from ws_monitoring.alerting import PrometheusAlerter\n"
            f"prom = PrometheusAlerter({peer.url!r}, registry=CollectorRegistry())\n"
            "prom.fire('Exiting', severity='warning', summary='bye')\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr.decode()
        assert [a["labels"]["alertname"] for a in peer.alerts()] == ["Exiting"]
