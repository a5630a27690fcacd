"""The demo image's entry point: ECS logs on stderr, the demo's banner on stdout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests.deploy import stack
from tests.helpers.system import free_port

#: The demo on a free WebSocket port, through the image's entry point.
DEMO = (sys.executable, str(stack.DEPLOY / "demo" / "entrypoint.py"), "demo", "--port", "0")


def run_demo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``DEMO`` plus ``args``, run from the repository root with ``env`` added to this
    process' environment; output captured as text. Raises ``TimeoutExpired`` after 60 s."""
    return subprocess.run(
        [*DEMO, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=stack.ROOT,
    )


def test_entrypoint_runs_the_demo_with_ecs_logs() -> None:
    env = {
        "WS_MONITORING_LOG_FORMAT": "ecs",
        "OTEL_SERVICE_NAME": "ws-demo",
        # Both configured and unreachable: the demo must run regardless.
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "SENTRY_DSN": f"http://public@127.0.0.1:{free_port()}/1",
    }
    result = run_demo("--metrics-port", "0", "--duration", "2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WebSocket server: ws://127.0.0.1:" in result.stdout
    assert "{" not in result.stdout  # no log line mixed into the banner
    documents = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert documents
    assert {doc["service"]["name"] for doc in documents} == {"ws-demo"}
    actions = {doc.get("event", {}).get("action") for doc in documents}
    assert {"connection_opened", "connection_closed"} <= actions
    assert all(doc["ecs"]["version"] for doc in documents)


def test_entrypoint_reports_a_taken_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_demo(
            "--metrics-port",
            str(port),
            "--duration",
            "1",
            "--no-clients",
            env={"WS_MONITORING_LOG_FORMAT": "text"},
        )
    assert result.returncode == 1
    assert "ws-monitoring demo:" in result.stderr
