"""What the journal records: one ``Event`` per CA, system or authentication action."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from sekisho.context import Actor
from sekisho.errors import SekishoError


class Category(enum.StrEnum):
    CA = "ca"
    SYSTEM = "system"
    AUTH = "auth"


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"


def normalise_mac(value: str | None) -> str | None:
    """``00-1A-2b-...`` / ``001a.2b..`` / ``001A2B...`` -> ``00:1a:2b:...`` (search and store),
    for EUI-48 (12 hex digits) and EUI-64 (16) alike."""
    if value is None:
        return None
    bare = "".join(ch for ch in value.strip().lower() if ch not in ":-. ")
    if len(bare) in (12, 16) and all(ch in "0123456789abcdef" for ch in bare):
        return ":".join(bare[i : i + 2] for i in range(0, len(bare), 2))
    return value.strip().lower()


@dataclasses.dataclass(frozen=True)
class Event:
    """An auditable action. ``detail`` must be JSON-serialisable (str, int, bool, None, lists,
    dicts); it is stored as canonical JSON and covered by the hash chain."""

    category: Category
    action: str
    outcome: Outcome
    actor_account: str | None = None
    actor_serial: str | None = None
    client_ip: str | None = None
    object_dn: str | None = None
    object_serial: str | None = None
    device_id: str | None = None
    device_mac: str | None = None
    request_id: str | None = None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


def refused(
    actor: Actor,
    category: Category,
    action: str,
    exc: SekishoError,
    *,
    object_dn: str | None = None,
    object_serial: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Event:
    """The failure event of ``action`` refused with ``exc``: ``detail`` plus the error's code,
    its message (``reason``, at most 500 characters) and the rule it names, if any."""
    why: dict[str, Any] = {**(detail or {}), "code": exc.code, "reason": exc.message[:500]}
    rule = getattr(exc, "rule", None)
    if rule:
        why["rule"] = rule
    return by_actor(
        actor,
        category,
        action,
        Outcome.FAILURE,
        object_dn=object_dn,
        object_serial=object_serial,
        detail=why,
    )


def by_actor(
    actor: Actor,
    category: Category,
    action: str,
    outcome: Outcome = Outcome.SUCCESS,
    *,
    object_dn: str | None = None,
    object_serial: str | None = None,
    device_id: str | None = None,
    device_mac: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Event:
    """The event of ``action`` done by ``actor`` (account, certificate serial, client IP and
    request ID carried over)."""
    return Event(
        category=category,
        action=action,
        outcome=outcome,
        actor_account=actor.account,
        actor_serial=actor.serial,
        client_ip=actor.client_ip,
        request_id=actor.request_id,
        object_dn=object_dn,
        object_serial=object_serial,
        device_id=device_id,
        device_mac=device_mac,
        detail=detail if detail is not None else {},
    )
