"""Who is asking: the actor of an operation, carried into every journal entry."""

from __future__ import annotations

import dataclasses
import secrets


def new_request_id() -> str:
    return secrets.token_hex(8)


@dataclasses.dataclass(frozen=True)
class Actor:
    account: str | None = None  # operator or admin account ("cli:root", "admin@tenant")
    serial: str | None = None  # client certificate serial when authenticated by mTLS
    client_ip: str | None = None
    request_id: str = dataclasses.field(default_factory=new_request_id)


SYSTEM = Actor(account="system")
