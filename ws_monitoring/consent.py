"""The application's consent API: grant and withdraw purposes for a connection or a user.

These functions find the :class:`~ws_monitoring.privacy.Privacy` of an instrumented
connection, server or handler (through the connection's record, see
:func:`ws_monitoring.core.record_of`) and journal every change (see
:mod:`ws_monitoring.privacy` for the consent model and the journal's fields).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .core import ConnectionRecord, Monitor, monitor_of, record_of
from .privacy import Client, Consent, Privacy, _check_purposes, _check_version

__all__ = ["grant", "grant_user", "privacy_of", "withdraw", "withdraw_user"]


def _record_of(connection: Any) -> ConnectionRecord:
    record = record_of(connection)
    if record is None:
        raise ValueError(
            "this connection is not instrumented by ws_monitoring (or its handler has not "
            "started yet): grant and withdraw work inside an instrumented handler"
        )
    return record


def privacy_of(target: Any) -> Privacy:
    """The :class:`Privacy` of an instrumented connection, server, handler or monitor.

    Raises:
        TypeError: ``target`` is none of those.
    """
    if isinstance(target, Privacy):
        return target
    record = record_of(target)
    if record is not None:
        return record.monitor.privacy
    if isinstance(target, Monitor):
        return target.privacy
    monitor = monitor_of(target)
    if monitor is not None:
        return monitor.privacy
    raise TypeError(f"{target!r} is not an instrumented connection, server or handler")


def _rebuild(record: ConnectionRecord, consent: Consent) -> None:
    privacy: Privacy = record.monitor.privacy
    record.client = privacy.client(
        record.remote_address,
        record.request,
        username=getattr(record.connection, "username", None),
        consent=consent,
    )


def _subject(record: ConnectionRecord) -> str:
    return record.client.subject or f"connection:{record.id}"


def grant(connection: Any, *, purposes: Iterable[str], policy_version: str) -> Client:
    """Add ``purposes`` to the consent of this open connection; journaled.

    ``record.client`` is rebuilt at once: later log lines and spans of this connection
    carry the consented raw values. Returns the new :class:`Client`.

    Raises:
        ValueError: the connection is not instrumented, an unknown purpose, or an
            empty ``policy_version``.
    """
    record = _record_of(connection)
    granted = _check_purposes(purposes)
    _check_version(policy_version)
    consent = Consent(record.client.consent.purposes | granted, policy_version)
    _rebuild(record, consent)
    record.monitor.privacy.journal(
        "grant", _subject(record), granted, consent, scope="connection", connection_id=record.id
    )
    return record.client


def withdraw(
    connection: Any,
    *,
    purposes: Iterable[str] | None = None,
    policy_version: str | None = None,
) -> Client:
    """Withdraw ``purposes`` (all if ``None``) from this open connection; journaled.

    Returns the new :class:`Client`.

    Raises:
        ValueError: the connection is not instrumented, or an unknown purpose.
    """
    record = _record_of(connection)
    old = record.client.consent
    removed = old.purposes if purposes is None else _check_purposes(purposes)
    consent = Consent(old.purposes - removed, policy_version or old.policy_version)
    _rebuild(record, consent)
    record.monitor.privacy.journal(
        "withdraw", _subject(record), removed, consent, scope="connection", connection_id=record.id
    )
    return record.client


def grant_user(
    target: Any, user_id: str, *, purposes: Iterable[str], policy_version: str
) -> Consent:
    """:meth:`Privacy.grant_user` on the server of ``target`` (see :func:`privacy_of`)."""
    return privacy_of(target).grant_user(user_id, purposes=purposes, policy_version=policy_version)


def withdraw_user(
    target: Any,
    user_id: str,
    *,
    purposes: Iterable[str] | None = None,
    policy_version: str | None = None,
) -> Consent:
    """:meth:`Privacy.withdraw_user` on the server of ``target`` (see :func:`privacy_of`)."""
    return privacy_of(target).withdraw_user(
        user_id, purposes=purposes, policy_version=policy_version
    )
