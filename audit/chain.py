"""The hash chain: canonical record encoding, chaining and checkpoint bodies.

h_0 = 32 zero bytes; h_i = SHA-256(h_{i-1} || canonical(record_i)). ``canonical`` is UTF-8
JSON with sorted keys, no whitespace, every field present (null when empty), the time as
RFC 3339 UTC with microseconds. A checkpoint signs the body
``<origin>\\n<seq>\\n<base64 head hash>\\n`` (the C2SP tlog-checkpoint note layout), so a
verifier needs only the body, the signature and the public key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Mapping
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


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


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


def checkpoint_body(origin: str, seq: int, head_hex: str) -> str:
    b64 = base64.b64encode(bytes.fromhex(head_hex)).decode("ascii")
    return f"{origin}\n{seq}\n{b64}\n"


def parse_checkpoint_body(body: str) -> tuple[str, int, str]:
    """(origin, seq, head hash hex) from a checkpoint body; ValueError when malformed."""
    lines = body.split("\n")
    if len(lines) != 4 or lines[3] != "":
        raise ValueError("checkpoint body must have three lines")
    origin, seq_text, b64 = lines[:3]
    if not seq_text.isdigit():
        raise ValueError("checkpoint sequence number is not a number")
    raw = base64.b64decode(b64, validate=True)
    if len(raw) != 32:
        raise ValueError("checkpoint hash is not 32 bytes")
    return origin, int(seq_text), raw.hex()
