"""The hash chain: canonical record encoding, chaining and checkpoint bodies.

h_0 = 32 zero bytes; h_i = SHA-256(h_{i-1} || canonical(record_i)). ``canonical`` is UTF-8
JSON with sorted keys, no whitespace, every field present (null when empty), the time as
RFC 3339 UTC with microseconds. The fields are those of ``FIELDS`` (an ``audit export``
record's keys but ``hash``); ``seq`` is a number, ``detail`` the stored canonical JSON text of
the event's detail object as a JSON string (an export shows it parsed: its canonical encoding
is that text again), every other value a string or null. Strings are JSON-escaped as Python's
``json`` does with ``ensure_ascii=False``: ``"`` and ``\\`` backslash-escaped, control
characters as ``\\n``, ``\\t``... or ``\\u00XX``, everything else as its UTF-8 bytes.

A checkpoint signs a C2SP tlog-checkpoint note body: the origin, the seq and the base64 head
hash, then extension lines, so that what verification relies on is signed, not merely
stored beside the signature::

    <origin>
    <seq>
    <base64 head hash>
    time <RFC 3339 UTC, microseconds>
    previous <seq of the previous checkpoint> <base64 SHA-256 of its body>
    root <seq> <base64 Merkle tree hash of records 1..seq>

``previous 0`` with 32 zero bytes marks the journal's first checkpoint. The ``root`` line
signs the RFC 6962 tree head over the same records (``audit.merkle``), so that a record's
inclusion, and a checkpoint's consistency with an earlier one, can be proved without the
whole journal. Bodies written before it have no root line, and bodies written before the
time and link only the first three lines: they still verify, without those guarantees. Other
extension lines are allowed and ignored, as C2SP says: the signature covers them, so nobody
without the key can add one, and a later version may add lines this one does not know. A
verifier needs only the body, the signature and the public key.
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
_ROOT = "root "
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
    root: str | None = None  # Merkle tree hash (hex) of records 1..seq; None: not signed


def body_digest(body: str) -> str:
    """What a checkpoint's ``previous`` line names: SHA-256 of the previous body (hex)."""
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def checkpoint_body(
    origin: str,
    seq: int,
    head_hex: str,
    time: dt.datetime,
    previous: tuple[int, str],
    root: bytes | None = None,
) -> str:
    """The body a checkpoint signs at ``time``; ``previous`` is (seq, body digest) of the
    checkpoint before it, (0, GENESIS) for the first; ``root`` the Merkle tree hash of records
    1..seq (None: no root line)."""
    previous_seq, previous_hex = previous
    root_line = "" if root is None else f"{_ROOT}{seq} {_b64(root.hex())}\n"
    return (
        f"{origin}\n{seq}\n{_b64(head_hex)}\n"
        f"{_TIME}{format_time(time)}\n{_PREVIOUS}{previous_seq} {_b64(previous_hex)}\n"
        f"{root_line}"
    )


def _hash_line(text: str, what: str) -> str:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error
        raise ValueError(f"checkpoint {what} is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"checkpoint {what} is not 32 bytes")
    return raw.hex()


def _seq_line(text: str, what: str) -> int:
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"checkpoint {what} is not a number")
    return int(text)


def parse_time(text: str) -> dt.datetime:
    """A time in exactly the form ``format_time`` writes (one instant, one spelling);
    ValueError for anything else."""
    try:
        value = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    except ValueError:
        raise ValueError("not RFC 3339 UTC with microseconds") from None
    if format_time(value) != text:
        raise ValueError("not RFC 3339 UTC with microseconds")
    return value


def _time_line(text: str) -> dt.datetime:
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError("checkpoint time is not RFC 3339 UTC with microseconds") from None


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
    root = _root_line(extensions, seq)
    if not extensions or not extensions[0].startswith(_TIME):
        # the three-line form (or unknown lines)
        return CheckpointBody(origin, seq, head_hash, root=root)
    time = _time_line(extensions[0].removeprefix(_TIME))
    if len(extensions) < 2 or not extensions[1].startswith(_PREVIOUS):
        raise ValueError("checkpoint body has a time line but no previous line")
    parts = extensions[1].removeprefix(_PREVIOUS).split(" ")
    if len(parts) != 2:
        raise ValueError("checkpoint previous line must be a seq and a hash")
    previous = (_seq_line(parts[0], "previous seq"), _hash_line(parts[1], "previous hash"))
    return CheckpointBody(origin, seq, head_hash, time, previous, root)


def _root_line(extensions: list[str], seq: int) -> str | None:
    """The Merkle root a ``root <size> <base64>`` line signs (hex), None without one. The size
    must be the checkpoint's seq: the tree covers records 1..seq, no other."""
    found = [line for line in extensions if line.startswith(_ROOT)]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError("checkpoint body has more than one root line")
    parts = found[0].removeprefix(_ROOT).split(" ")
    if len(parts) != 2:
        raise ValueError("checkpoint root line must be a tree size and a hash")
    if _seq_line(parts[0], "tree size") != seq:
        raise ValueError(f"checkpoint root line names tree size {parts[0]}, not its seq {seq}")
    return _hash_line(parts[1], "root hash")
