"""The hash chain: canonical record encoding, chaining and checkpoint bodies.

h_0 = 32 zero bytes; h_i = SHA-256(h_{i-1} || canonical(record_i)). ``canonical`` is UTF-8
JSON with sorted keys, no whitespace, every field present (null when empty), the time as
RFC 3339 UTC with microseconds.

A checkpoint signs a C2SP tlog-checkpoint note body: the origin, the seq and the base64 head
hash, then two extension lines, so that what verification relies on is signed, not merely
stored beside the signature::

    <origin>
    <seq>
    <base64 head hash>
    time <RFC 3339 UTC, microseconds>
    previous <seq of the previous checkpoint> <base64 SHA-256 of its body>

``previous 0`` with 32 zero bytes marks the journal's first checkpoint. Bodies written before
these lines existed have only the first three (they still verify, without a signed time or
link). Other extension lines are allowed and ignored, as C2SP says: the signature covers them,
so nobody without the key can add one, and a later version may add lines this one does not
know. A verifier needs only the body, the signature and the public key.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

GENESIS = "0" * 64

FIELDS = (
    "seq",
    "time",
    "category",
    "action",
    "outcome",
    "actor_account",
    "actor_serial",
    "client_ip",
    "object_dn",
    "object_serial",
    "device_id",
    "device_mac",
    "request_id",
    "detail",
)


def format_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# What json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False) builds on
# every call, built once (an encoder keeps no state between calls).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> str:
    return _CANONICAL.encode(value)


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes hashed for one record. ``detail`` is the stored canonical JSON text."""
    doc: dict[str, Any] = {}
    for name in FIELDS:
        value = record.get(name)
        if name == "time" and isinstance(value, dt.datetime):
            value = format_time(value)
        doc[name] = value
    return canonical_json(doc).encode("utf-8")


def chain_hash(previous_hex: str, record: Mapping[str, Any]) -> str:
    return hashlib.sha256(bytes.fromhex(previous_hex) + canonical(record)).hexdigest()


# ``audit purge`` (``audit.retention``): the record each batch appends, naming what it removed.
PURGE_ACTION = "audit.purge"


def seqs_digest(seqs: Iterable[int]) -> str:
    """What an ``audit.purge`` record names: SHA-256 of the removed seqs, ascending, each in
    decimal followed by a newline."""
    digest = hashlib.sha256()
    for seq in sorted(seqs):
        digest.update(b"%d\n" % seq)
    return digest.hexdigest()


_TIME = "time "
_PREVIOUS = "previous "
_DECIMAL = re.compile(r"0|[1-9][0-9]*")  # C2SP: ASCII decimal, no leading zeroes


@dataclasses.dataclass(frozen=True)
class CheckpointBody:
    """A parsed checkpoint body. ``time`` and ``previous`` are None for the three-line form of
    before, which signs neither."""

    origin: str
    seq: int
    head_hash: str  # hex
    time: dt.datetime | None = None
    previous: tuple[int, str] | None = None  # (seq, SHA-256 hex of its body); (0, GENESIS)


def body_digest(body: str) -> str:
    """What a checkpoint's ``previous`` line names: SHA-256 of the previous body (hex)."""
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def checkpoint_body(
    origin: str, seq: int, head_hex: str, time: dt.datetime, previous: tuple[int, str]
) -> str:
    """The body a checkpoint signs at ``time``; ``previous`` is (seq, body digest) of the
    checkpoint before it, (0, GENESIS) for the first."""
    previous_seq, previous_hex = previous
    return (
        f"{origin}\n{seq}\n{_b64(head_hex)}\n"
        f"{_TIME}{format_time(time)}\n{_PREVIOUS}{previous_seq} {_b64(previous_hex)}\n"
    )


def _hash_line(text: str, what: str) -> str:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 32:
        raise ValueError(f"checkpoint {what} is not 32 bytes")
    return raw.hex()


def _seq_line(text: str, what: str) -> int:
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"checkpoint {what} is not a number")
    return int(text)


def _time_line(text: str) -> dt.datetime:
    # Exactly the form ``format_time`` writes: one instant, one spelling.
    try:
        value = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    except ValueError:
        raise ValueError("checkpoint time is not RFC 3339 UTC with microseconds") from None
    if format_time(value) != text:
        raise ValueError("checkpoint time is not RFC 3339 UTC with microseconds")
    return value


def parse_checkpoint_body(body: str) -> CheckpointBody:
    """A checkpoint body, parsed; ValueError when malformed. A fourth line starting ``time ``
    makes it the signed-time form: line 5 must then be the ``previous`` line."""
    lines = body.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise ValueError("checkpoint body must have at least three lines, each ending in a newline")
    lines.pop()
    if "" in lines:
        raise ValueError("checkpoint body has an empty line")
    origin, seq_text, b64 = lines[:3]
    seq = _seq_line(seq_text, "sequence number")
    head_hash = _hash_line(b64, "hash")
    extensions = lines[3:]
    if not extensions or not extensions[0].startswith(_TIME):
        return CheckpointBody(origin, seq, head_hash)  # the three-line form (or unknown lines)
    time = _time_line(extensions[0].removeprefix(_TIME))
    if len(extensions) < 2 or not extensions[1].startswith(_PREVIOUS):
        raise ValueError("checkpoint body has a time line but no previous line")
    parts = extensions[1].removeprefix(_PREVIOUS).split(" ")
    if len(parts) != 2:
        raise ValueError("checkpoint previous line must be a seq and a hash")
    previous = (_seq_line(parts[0], "previous seq"), _hash_line(parts[1], "previous hash"))
    return CheckpointBody(origin, seq, head_hash, time, previous)
