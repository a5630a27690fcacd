"""The demo moves every metric of the core table (what `make demo` promises)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.scrape import OPENMETRICS, Samples, fetch, scrape
from tests.helpers.servers import wait_until
from tests.helpers.system import free_port
from ws_monitoring.cli import main
from ws_monitoring.demo import run_demo

MOVING = [
    "websocket_connections_total",
    "websocket_connection_duration_seconds_count",
    "websocket_disconnections_total",
    "websocket_handshake_failures_total",
    "websocket_handshake_duration_seconds_count",
    "websocket_messages_total",
    "websocket_message_size_bytes_count",
    "websocket_message_duration_seconds_count",
    "websocket_errors_total",
    "websocket_ping_rtt_seconds_count",
]


async def test_demo_moves_every_metric() -> None:
    lines: list[str] = []
    samples: list[Samples] = []

    async def ready(ws_port: int, metrics_port: int) -> None:
        async def scrape_late() -> None:
            # After the synthetic clients ran a few rounds, while the listener is still in.
            await asyncio.sleep(4.5)
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            samples.append(await asyncio.to_thread(scrape, url))

        asyncio.get_running_loop().create_task(scrape_late())

    await run_demo(port=free_port(), metrics_port=free_port(), duration=5, print_fn=lines.append,
                   ready=ready)  # fmt: skip
    assert any(line.startswith("Metrics:") for line in lines)
    assert any(line.startswith("Summary after") for line in lines)
    (scraped,) = samples
    for name in MOVING:
        assert scraped.total(name) > 0, f"{name} did not move in the demo"
    assert scraped.total("websocket_connections_active") >= 1
    assert scraped.total("websocket_messages_total", direction="sent", type="binary") > 0
    assert scraped.total("websocket_messages_total", direction="received", type="text") > 0
    assert scraped.total("websocket_errors_total", type="handler_exception") > 0
    assert scraped.total("websocket_disconnections_total", code="1011") > 0
    assert scraped.total("websocket_disconnections_total", code="4xxx") > 0


def test_cli_reports_a_taken_port(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(["demo", "--metrics-port", str(port), "--port", str(free_port()),
                       "--duration", "0.1", "--no-clients", "--no-tracing"])  # fmt: skip
    assert status == 1
    assert str(port) in capsys.readouterr().err


def test_cli_runs_for_a_duration(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["demo", "--metrics-port", "0", "--port", "0", "--duration", "0.2",
                   "--no-clients", "--no-tracing"])  # fmt: skip
    assert status == 0
    assert "Metrics:" in capsys.readouterr().out


def test_cli_sends_alerts_to_alertmanager(tmp_path: Path) -> None:
    """`--alertmanager URL`: a metrics port already taken fires WebSocketMetricsServerDown."""
    import socket

    from tests.helpers.alertmanager import running_alertmanager

    with running_alertmanager(tmp_path) as am, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(["demo", "--metrics-port", str(port), "--port", "0", "--duration", "0.1",
                       "--no-clients", "--no-tracing", "--alertmanager", am.url])  # fmt: skip
        assert status == 1
        name = "WebSocketMetricsServerDown"
        alerts = am.wait_for_alerts(lambda got: any(a["labels"]["alertname"] == name for a in got))
        (alert,) = [a for a in alerts if a["labels"]["alertname"] == name]
        assert alert["labels"]["service"] == "ws-demo"


# -- the console, as a newcomer sees it -----------------------------------------------------

#: A log line of setup_logging(fmt="text") starts with its UTC timestamp.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
LIVE_LINE = re.compile(
    r"\[ *\d+ s\] connections open \d+ \| messages/s in [\d.]+ out [\d.]+ "
    r"\| errors so far \d+ \| spans exported (\d+)$"
)


class DemoProcess:
    """``ws-monitoring demo ARGS`` in a process of its own, its output in files."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.ws_port, self.metrics_port = free_port(), free_port()
        self.out_path, self.err_path = tmp_path / "stdout", tmp_path / "stderr"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ws_monitoring.cli", "demo", "--port", str(self.ws_port),
                 "--metrics-port", str(self.metrics_port), *args],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for_stdout(self, text: str) -> None:
        wait_until(lambda: text in self.stdout or self.process.poll() is not None, 30, text)
        assert text in self.stdout, self.stderr[-3000:]

    def wait(self) -> int:
        try:
            return self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def _exemplar_lines(url: str) -> list[str]:
    try:
        _, _, text = fetch(url, accept=OPENMETRICS)
    except OSError:
        return []
    return [
        line
        for line in text.splitlines()
        if line.startswith("websocket_message_duration_seconds_bucket") and ' # {trace_id="' in line
    ]


def test_ten_seconds_of_console_output(tmp_path: Path) -> None:
    """One clean line per event; the only traceback is the crash on purpose, once."""
    demo = DemoProcess(tmp_path, "--duration", "10")
    demo.wait_for_stdout("Running for 10 s.")
    url = f"http://127.0.0.1:{demo.metrics_port}/metrics"
    # Every span is sampled and exported: message latencies carry their trace as exemplar.
    exemplars = wait_until(lambda: _exemplar_lines(url), 30, "an exemplar in the scrape")
    assert re.search(r'trace_id="[0-9a-f]{32}"', exemplars[0])
    assert demo.wait() == 0, demo.stderr[-3000:]
    out, err = demo.stdout, demo.stderr
    console = out + err
    for noise in ("connection handler failed", "Logging error", "Task exception", "ignored"):
        assert noise not in console
    assert console.count("Traceback (most recent call last)") == 1
    # On standard error, log lines only; the crash's stack trace follows its own line.
    lines = err.splitlines()
    (crash,) = [i for i, line in enumerate(lines) if LOG_LINE.match(line) and "crashed" in line]
    assert lines[crash].split()[1] == "ERROR"
    assert lines[crash + 1] == "Traceback (most recent call last):"
    trace_end = next(i for i in range(crash + 1, len(lines)) if LOG_LINE.match(lines[i]))
    assert lines[trace_end - 1] == "RuntimeError: demo: the handler crashed on purpose"
    others = lines[:crash] + lines[trace_end:]
    assert others
    assert all(LOG_LINE.match(line) for line in others), [
        line for line in others if not LOG_LINE.match(line)
    ]
    for event in ("connection opened", "connection closed", "handshake rejected"):
        assert any(f" {event} " in line for line in others), event
    # On standard output: the URLs, one curl line, live summaries, the summary table.
    assert f"Metrics:          {url}" in out
    (curl,) = [line for line in out.splitlines() if "curl " in line]
    assert url in curl
    assert "Traces:           every span to a local OTLP receiver" in out
    live = [m for m in map(LIVE_LINE.match, out.splitlines()) if m]
    assert live
    assert int(live[-1].group(1)) > 0
    table = out[out.index("Summary after") :].splitlines()
    rows = {line.split()[0] + " " + line.split()[1]: line for line in table[1:]}
    assert int(rows["messages received"].split()[2]) > 0
    assert int(rows["spans exported"].split()[2]) > 0
    assert "handler_exception 1" in next(r for k, r in rows.items() if k.startswith("errors"))


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_demo_with_its_cleanup(tmp_path: Path, number: int) -> None:
    """SIGTERM is handled as Ctrl-C: clients stop, servers close, the table is printed."""
    demo = DemoProcess(tmp_path, "--log-format", "json")
    demo.wait_for_stdout("Press Ctrl-C to stop.")
    demo.process.send_signal(number)
    assert demo.wait() == 0, demo.stderr[-3000:]
    out = demo.stdout
    assert f"Stopping ({signal.Signals(number).name})" in out
    assert "Summary after" in out
    records = [json.loads(line) for line in demo.stderr.splitlines()]  # JSON lines only
    assert "server closed" in [record["message"] for record in records]
    assert "Traceback" not in out


def test_spans_go_to_the_otlp_endpoint_given(tmp_path: Path) -> None:
    from tests.helpers.otlp import OtlpHttpReceiver

    receiver = OtlpHttpReceiver()
    try:
        demo = DemoProcess(tmp_path, "--duration", "3", "--otlp-endpoint", receiver.url)
        assert demo.wait() == 0, demo.stderr[-3000:]
        assert f"Traces:           every span to {receiver.url}" in demo.stdout
        names = {span.name for span in receiver.spans}
        assert {"process /echo", "GET /echo"} <= names
        assert {span.resource.get("service.name") for span in receiver.spans} == {"ws-demo"}
    finally:
        receiver.close()


# -- mistakes on the command line ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--alertmanager", "notaurl"],
            "--alertmanager: alertmanager_url: expected an http(s) URL",
        ),
        (["--sentry"], "--sentry needs a DSN: set SENTRY_DSN="),
        (["--log-level", "LOUD"], "--log-level: level='LOUD': not a logging level"),
    ],
)
def test_a_mistake_is_one_clear_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv("SENTRY_DSN", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--port", "0", "--metrics-port", "0", "--no-tracing", *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith("ws-monitoring demo: error: ")
    assert message in line


def test_sentry_gets_the_crash_on_purpose(tmp_path: Path) -> None:
    from tests.helpers.sentry_receiver import SentryReceiver

    receiver = SentryReceiver()
    try:
        env = {**os.environ, "SENTRY_DSN": receiver.dsn}
        demo = DemoProcess(tmp_path, "--duration", "3", "--no-tracing", "--sentry", env=env)
        assert demo.wait() == 0, demo.stderr[-3000:]
        (event,) = receiver.wait_for_events(1)
        (exception,) = event["exception"]["values"]
        assert exception["value"] == "demo: the handler crashed on purpose"
    finally:
        receiver.close()
