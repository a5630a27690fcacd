"""Privacy layer (interface stub; the logging/privacy work completes it).

Every sink emits client data only through :class:`Client` views built here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

from .config import Config

__all__ = ["Client", "Consent", "Privacy"]


@dataclasses.dataclass(frozen=True)
class Consent:
    """What a data subject agreed to: ``purposes`` under ``policy_version``."""

    purposes: frozenset[str] = frozenset()
    policy_version: str | None = None

    def allows(self, purpose: str) -> bool:
        return purpose in self.purposes


NO_CONSENT = Consent()


@dataclasses.dataclass
class Client:
    """What sinks may emit about a client: already anonymized unless consented."""

    ip: str | None
    user: str | None
    consent: Consent = NO_CONSENT

    def allows(self, purpose: str) -> bool:
        return self.consent.allows(purpose)


def truncate_ip(address: str) -> str:
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        net = ipaddress.ip_network(f"{ip}/24", strict=False)
    else:
        net = ipaddress.ip_network(f"{ip}/48", strict=False)
    return str(net.network_address)


class Privacy:
    """Builds :class:`Client` views for one server's configuration."""

    def __init__(self, config: Config) -> None:
        self._config = config

    def client(self, remote_address: Any, request: Any) -> Client:
        host = remote_address[0] if isinstance(remote_address, tuple) else None
        return Client(ip=truncate_ip(host) if host else None, user=None)
