"""Container entry point of the demo image: set up logs, traces and Sentry, then run the CLI.

Environment:

``WS_MONITORING_LOG_FORMAT``
    ``ecs`` (default: Elastic Common Schema lines, read by Filebeat and by Loki with
    ``| json``), ``json`` or ``text``. Written to standard error (standard output
    carries the demo's banner); Docker collects both.
``WS_MONITORING_LOG_LEVEL``
    ``INFO`` by default.
``OTEL_EXPORTER_OTLP_ENDPOINT`` (and the other ``OTEL_*`` variables)
    When set, spans are exported over OTLP (Jaeger in the compose file).
``SENTRY_DSN``
    When set (an external Sentry project), the Sentry SDK starts with ws_monitoring's
    integration and no default PII: error log records (handler crashes) become events.

Arguments are those of the ``ws-monitoring`` console script (``demo --host 0.0.0.0 ...``).
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str]) -> int:
    """Configure observability from the environment, then run ``ws-monitoring argv``."""
    from ws_monitoring.cli import main as cli_main
    from ws_monitoring.logging.setup import setup_logging

    setup_logging(
        os.environ.get("WS_MONITORING_LOG_LEVEL", "INFO"),
        fmt=os.environ.get("WS_MONITORING_LOG_FORMAT", "ecs"),
        stream=sys.stderr,
        service_name=os.environ.get("OTEL_SERVICE_NAME"),
    )
    log = logging.getLogger("ws_monitoring.entrypoint")
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        try:
            from ws_monitoring.tracing.setup import setup_tracing

            setup_tracing()
        except ImportError as exc:
            log.warning("tracing disabled: %s", exc)
    dsn = os.environ.get("SENTRY_DSN")
    if dsn:
        try:
            import sentry_sdk

            from ws_monitoring.alerting.sentry import WebsocketsIntegration

            sentry_sdk.init(dsn=dsn, send_default_pii=False, integrations=[WebsocketsIntegration()])
        except ImportError as exc:
            log.warning("Sentry disabled: %s", exc)
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
