"""``ws-monitoring`` console script.

``ws-monitoring demo`` configures what the README recommends before it serves: logs
with :func:`~ws_monitoring.setup_logging` (one line per event on standard error, text
or JSON by ``--log-format``; kept as they are when the caller configured them already,
as the container's entry point does), tracing with every span sampled
(:func:`~ws_monitoring.demo.demo_tracing`), and alerts when asked. Ctrl-C and SIGTERM
both stop it cleanly: the clients stop, the servers close (flushing spans), the summary
table is printed, and the exit status is 0. A mistake on the command line (an
Alertmanager address that is no URL, ``--sentry`` without a DSN) is a one-line error
and status 2; a port already taken, status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

LOG_FORMATS = ("text", "json", "ecs")


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="ws-monitoring")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run an instrumented chat server with synthetic clients"
    )
    demo.add_argument("--host", default="127.0.0.1", help="WebSocket address (127.0.0.1)")
    demo.add_argument("--port", type=int, default=8765, help="WebSocket port (8765)")
    demo.add_argument("--metrics-host", default="127.0.0.1", help="metrics address (127.0.0.1)")
    demo.add_argument("--metrics-port", type=int, default=8001, help="metrics port (8001)")
    demo.add_argument("--duration", type=float, default=None, help="stop after SECONDS")
    demo.add_argument("--no-clients", action="store_true", help="serve only, no synthetic clients")
    demo.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="log lines on standard error: text (default), json or ecs",
    )
    demo.add_argument("--log-level", default="INFO", help="log level (INFO)")
    demo.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        default=None,
        help="send spans to this OTLP/HTTP collector (default: a local receiver)",
    )
    demo.add_argument("--no-tracing", action="store_true", help="no spans, no exemplars")
    demo.add_argument(
        "--summary-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between two live summary lines (5; 0: none)",
    )
    demo.add_argument(
        "--alertmanager",
        action="append",
        default=[],
        metavar="URL",
        help="send alerts to this Alertmanager (repeat for an HA cluster)",
    )
    demo.add_argument(
        "--sentry", action="store_true", help="report handler crashes to Sentry (SENTRY_DSN)"
    )
    return parser, demo


def _alerters(args: argparse.Namespace, demo: argparse.ArgumentParser) -> list[object]:
    """The alerters asked for; a bad address or a missing DSN is a usage error (exit 2)."""
    alerters: list[object] = []
    if args.alertmanager:
        from .alerting.alertmanager import PrometheusAlerter

        try:
            alerters.append(PrometheusAlerter(args.alertmanager, service="ws-demo"))
        except ValueError as exc:
            demo.error(f"--alertmanager: {exc} (for example http://127.0.0.1:9093)")
    if args.sentry:
        if not os.environ.get("SENTRY_DSN") and not _sentry_initialised():
            demo.error(
                "--sentry needs a DSN: set SENTRY_DSN=https://<key>@<host>/<project> "
                "(a local receiver will do)"
            )
        from .alerting.sentry import SentryAlerter

        alerters.append(SentryAlerter())
    return alerters


def _sentry_initialised() -> bool:
    try:
        import sentry_sdk
    except ImportError:
        return False
    return bool(sentry_sdk.get_client().is_active())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (argparse exits 2 on a usage error)."""
    parser, demo = _parser()
    args = parser.parse_args(argv)
    try:
        alerters = _alerters(args, demo)
    except ImportError as exc:
        print(f"ws-monitoring demo: {exc}", file=sys.stderr)
        return 1

    from .demo import demo_tracing
    from .logging.setup import configured, setup_logging
    from .metrics.server import MetricsServerError

    logs = None
    if args.log_format is not None or not configured():
        try:
            logs = setup_logging(args.log_level, fmt=args.log_format or "text", stream=sys.stderr)
        except ValueError as exc:
            demo.error(f"--log-level: {exc}")
        except ImportError as exc:
            print(f"ws-monitoring demo: {exc}", file=sys.stderr)
            return 1
    try:
        with demo_tracing(args.otlp_endpoint, enabled=not args.no_tracing) as tracing:
            asyncio.run(_run(args, alerters, tracing))
    except KeyboardInterrupt:  # a second Ctrl-C, during the cleanup
        return 130
    except (MetricsServerError, OSError) as exc:
        print(f"ws-monitoring demo: {exc}", file=sys.stderr)
        return 1
    finally:
        for alerter in alerters:
            close = getattr(alerter, "close", None)
            if close is not None:
                close(2.0)
        if logs is not None:
            logs.close()
    return 0


async def _run(args: argparse.Namespace, alerters: Sequence[Any], tracing: str) -> None:
    """The demo until its duration ends or a signal: SIGINT and SIGTERM alike stop it."""
    from .demo import run_demo

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(number: int) -> None:
        say(f"Stopping ({signal.Signals(number).name}); again to quit at once.")
        stop.set()
        for again in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(again)

    say = functools.partial(print, flush=True)
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, on_signal, number)
    try:
        await run_demo(
            host=args.host,
            port=args.port,
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port,
            duration=args.duration,
            clients=not args.no_clients,
            print_fn=say,
            alerters=alerters,
            stop=stop,
            summary_interval=args.summary_interval or None,
            tracing=tracing,
        )
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(number)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
