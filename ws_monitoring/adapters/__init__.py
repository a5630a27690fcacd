"""Adapters: they feed the core connection events from a server, and do nothing else.

:mod:`~ws_monitoring.adapters.asyncio` (``websockets.asyncio.server``),
:mod:`~ws_monitoring.adapters.sync` (``websockets.sync.server``), and the entry points
that choose between them, :mod:`~ws_monitoring.adapters.instrument`.
"""
