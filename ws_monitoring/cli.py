"""``ws-monitoring`` console script."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
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
        "--alertmanager",
        action="append",
        default=[],
        metavar="URL",
        help="send alerts to this Alertmanager (repeat for an HA cluster)",
    )
    demo.add_argument(
        "--sentry", action="store_true", help="report handler crashes to Sentry (SENTRY_DSN)"
    )
    args = parser.parse_args(argv)

    alerters: list[object] = []
    if args.alertmanager:
        from .alerting.alertmanager import PrometheusAlerter

        alerters.append(PrometheusAlerter(args.alertmanager, service="ws-demo"))
    if args.sentry:
        from .alerting.sentry import SentryAlerter

        alerters.append(SentryAlerter())

    from .demo import run_demo
    from .metrics.server import MetricsServerError

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                run_demo(
                    host=args.host,
                    port=args.port,
                    metrics_host=args.metrics_host,
                    metrics_port=args.metrics_port,
                    duration=args.duration,
                    clients=not args.no_clients,
                    alerters=alerters,
                )
            )
    except (MetricsServerError, OSError) as exc:
        print(f"ws-monitoring demo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
