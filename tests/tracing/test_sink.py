"""The tracing sink's per-connection state (``ws_monitoring/tracing/sink.py``)."""

from __future__ import annotations

import pytest
from opentelemetry.trace import SpanContext, TraceFlags, TraceState

from ws_monitoring.tracing.sink import _pack, _unpack


@pytest.mark.parametrize(
    ("flags", "remote", "state"),
    [(0, False, ""), (1, False, ""), (3, True, ""), (1, True, "vendor=1")],
)
def test_an_idle_connection_keeps_its_handshake_context_packed(
    flags: int, remote: bool, state: str
) -> None:
    context = SpanContext(
        (1 << 127) | 5,
        (1 << 63) | 7,
        is_remote=remote,
        trace_flags=TraceFlags(flags),
        trace_state=TraceState.from_header([state]) if state else TraceState(),
    )
    packed = _pack(context)
    assert isinstance(packed, SpanContext) is bool(state)  # a trace state: kept as it is
    assert _unpack(packed) == context
    assert _unpack(packed).trace_flags == flags
    assert _pack(None) is None
