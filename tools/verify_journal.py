#!/usr/bin/env python3
"""Verify a Sekisho audit journal, or a proof about it, without Sekisho.

Standalone on purpose: it imports nothing from Sekisho (the Python standard library and the
``cryptography`` package only), so an auditor can check what Sekisho exported with code
Sekisho's bugs cannot reach. What it implements, it re-implements from the documented
formats (docs/decisions.md, Journal; ``audit/chain.py``):

- canonical(record): UTF-8 JSON, keys sorted, no whitespace, every field present (null when
  empty), the time RFC 3339 UTC with microseconds; ``detail`` is the canonical JSON text of
  the detail object, as a JSON string. The fields are the exported record's keys but ``hash``.
- chain: h_0 = 32 zero bytes, h_i = SHA-256(h_{i-1} || canonical(record_i)).
- Merkle tree (RFC 6962 / RFC 9162 §2.1): leaf = SHA-256(0x00 || canonical(record)), node =
  SHA-256(0x01 || left || right), leaves in seq order.
- checkpoint body: origin, seq, base64 chain head, then extension lines ``time ...``,
  ``previous <seq> <base64 SHA-256 of the previous body>`` and ``root <seq> <base64 root>``
  (older bodies lack the last, or all three); signed with the audit key: Ed25519 over the
  body; ECDSA with SHA-384 on P-384, else SHA-256; RSA PKCS#1 v1.5 with SHA-384 from 4096
  bits, else SHA-256.

Usage::

    verify_journal.py journal RECORDS.jsonl CHECKPOINTS.jsonl --public-key audit-key.pem
    verify_journal.py proof PROOF.json --public-key audit-key.pem

``journal`` takes an unfiltered ``sekisho audit export`` (JSONL; after a purge with
``--tombstones``: a line ``{"seq", "purged": true, "time", "leaf_hash", "hash", "purge_seq"}``
stands for each removed record, its leaf and chain hash taken as given, and the
``audit.purge`` record it names must follow it and name exactly those seqs: count, first,
last, SHA-256 of the seqs in decimal, one per line, ascending) and ``sekisho audit
checkpoints export``; it recomputes the chain and the Merkle root at every checkpoint and
checks every checkpoint's signature and link. ``proof`` takes the document of ``sekisho
audit prove inclusion`` or ``prove consistency``. Exit 0: intact / the proof holds; 1: it
does not (the first bad sequence number is named); 2: usage or an unreadable file.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import hashlib
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

ZERO = bytes(32)
MIN_RETENTION = dt.timedelta(days=730)  # the least audit_retention_days Sekisho accepts
CLOCK_AHEAD = dt.timedelta(minutes=5)  # how far one appender's clock may trail another's
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class Bad(Exception):
    """Verification failed at ``seq``."""

    def __init__(self, seq: int, message: str) -> None:
        super().__init__(f"first bad seq {seq}: {message}")
        self.seq = seq


class Unreadable(Exception):
    """An input that is not what it claims to be (exit 2)."""


# -- formats ---------------------------------------------------------------------------------
def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(record: dict[str, Any]) -> bytes:
    doc = {name: value for name, value in record.items() if name != "hash"}
    detail = doc.get("detail")
    if not isinstance(detail, str):  # exported parsed; hashed as its canonical text
        doc["detail"] = canonical_json(detail)
    return canonical_json(doc).encode("utf-8")


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def b64_hash(text: Any, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"{what} is not a base64 SHA-256 hash")
    return raw


def parse_time(text: Any, what: str) -> dt.datetime:
    """RFC 3339 UTC with microseconds, exactly as Sekisho writes it."""
    try:
        value = dt.datetime.strptime(text, TIME_FORMAT).replace(tzinfo=dt.UTC)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not RFC 3339 UTC with microseconds") from None
    if value.strftime(TIME_FORMAT) != text:
        raise ValueError(f"{what} is not RFC 3339 UTC with microseconds")
    return value


def decimal(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit() or (text != "0" and text.startswith("0")):
        raise ValueError(f"{what} is not a number")
    return int(text)


class Body:
    """A parsed checkpoint body."""

    def __init__(self, text: str) -> None:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "" or "" in lines[:-1]:
            raise ValueError("a checkpoint body is three or more lines, each ending in a newline")
        self.origin = lines[0]
        self.seq = decimal(lines[1], "the body's seq")
        self.head = b64_hash(lines[2], "the body's head hash")
        self.previous: tuple[int, bytes] | None = None
        self.root: bytes | None = None
        self.time: dt.datetime | None = None  # signed; None in the three-line form
        extensions = lines[3:-1]
        if extensions and extensions[0].startswith("time "):
            self.time = parse_time(extensions[0].removeprefix("time "), "the signed time")
            if len(extensions) < 2 or not extensions[1].startswith("previous "):
                raise ValueError("a time line without a previous line")
            parts = extensions[1].split(" ")
            if len(parts) != 3:
                raise ValueError("the previous line is not a seq and a hash")
            self.previous = (decimal(parts[1], "the previous seq"), b64_hash(parts[2], "previous"))
        roots = [line for line in extensions if line.startswith("root ")]
        if len(roots) > 1:
            raise ValueError("more than one root line")
        if roots:
            parts = roots[0].split(" ")
            if len(parts) != 3 or decimal(parts[1], "the tree size") != self.seq:
                raise ValueError("the root line is not <seq> <hash>")
            self.root = b64_hash(parts[2], "the root")


def load_key(path: Path) -> Any:
    try:
        return serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise Unreadable(f"{path}: not a PEM public key ({exc})") from None


def signature_ok(key: Any, signature: bytes, body: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, body)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            algorithm = hashes.SHA384() if key.curve.name == "secp384r1" else hashes.SHA256()
            key.verify(signature, body, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            algorithm = hashes.SHA384() if key.key_size >= 4096 else hashes.SHA256()
            key.verify(signature, body, padding.PKCS1v15(), algorithm)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def checked_checkpoint(doc: Any, key: Any, where: str) -> Body:
    """The body of a signed checkpoint document, once its signature holds."""
    if not isinstance(doc, dict) or not isinstance(doc.get("body"), str):
        raise Unreadable(f"{where}: not a checkpoint document")
    seq = doc.get("seq")
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else 0
    try:
        signature = base64.b64decode(doc.get("signature") or "", validate=True)
        body = Body(doc["body"])
    except (binascii.Error, ValueError) as exc:
        raise Bad(seq, f"{where}: {exc}") from None
    if body.seq != seq:
        raise Bad(min(seq, body.seq) or 1, f"{where}: its seq is not the one its body signs")
    if not signature_ok(key, signature, doc["body"].encode("utf-8")):
        raise Bad(seq, f"{where}: the signature does not verify with the public key given")
    return body


# -- the journal -----------------------------------------------------------------------------
def jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except (ValueError, RecursionError):
                        raise Unreadable(f"{path} line {n}: not JSON") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Unreadable(f"{path}: {exc}") from None


def verify_journal(records: Path, checkpoints: Path, key: Any) -> str:
    signed: dict[int, tuple[Body, str]] = {}
    origin = None
    for n, doc in jsonl(checkpoints):
        body = checked_checkpoint(doc, key, f"{checkpoints.name} line {n}")
        if origin is not None and body.origin != origin:
            raise Bad(body.seq, f"its origin {body.origin!r} is not {origin!r}")
        origin = body.origin
        if body.seq in signed and signed[body.seq][1] != doc["body"]:
            raise Bad(body.seq, "two different checkpoints at this seq")
        signed[body.seq] = (body, doc["body"])
    if not signed:
        raise Bad(1, f"{checkpoints.name} holds no checkpoint")
    order = sorted(signed)
    for i, seq in enumerate(order):
        body = signed[seq][0]
        if body.previous is None:
            continue  # older bodies sign no link
        previous, digest = body.previous
        if previous >= seq:
            raise Bad(seq, f"the checkpoint at {seq} names {previous} as the one before it")
        if i and previous != order[i - 1]:
            raise Bad(
                order[i - 1] + 1,
                f"the checkpoint at {seq} follows {previous}, not "
                f"the exported one at {order[i - 1]}: one is missing or slipped in",
            )
        if previous == 0 and digest != ZERO:
            raise Bad(seq, "the first checkpoint names a previous body")
        if previous in signed:
            if hashlib.sha256(signed[previous][1].encode("utf-8")).digest() != digest:
                raise Bad(
                    previous + 1,
                    f"the checkpoint at {previous} is not the one the "
                    f"checkpoint at {seq} signs that it follows",
                )

    head, tree_size = ZERO, 0
    stack: list[bytes] = []  # the tree's right-edge subtree hashes, largest first
    last_signed = 0
    purges: dict[int, list[int]] = {}  # purge record's seq -> the purged seqs naming it
    unsigned: list[tuple[int, int, dt.datetime]] = []  # (first removed, purge seq, limit)
    for n, record in jsonl(records):
        seq = tree_size + 1
        if not isinstance(record, dict) or not isinstance(record.get("hash"), str):
            raise Bad(seq, f"{records.name} line {n}: not a journal record")
        if record.get("seq") != seq:
            raise Bad(
                seq,
                f"record {seq} is missing (line {n} holds {record.get('seq')!r}): "
                "an export with filters cannot be verified (after a purge, export with "
                "--tombstones)",
            )
        if record.get("purged") is True:
            leaf, head = tombstone(record, seq, purges)
        else:
            data = canonical(record)
            head = hashlib.sha256(head + data).digest()
            if head.hex() != record["hash"]:
                raise Bad(seq, "the record does not match its chain hash")
            leaf = leaf_hash(data)
            purged = purges.pop(seq, None)
            if purged is not None:
                unsigned.append(check_purge(record, purged, signed))
        node, size = leaf, tree_size
        while size & 1:
            node = node_hash(stack.pop(), node)
            size >>= 1
        stack.append(node)
        tree_size = seq
        if seq in signed:
            body = signed[seq][0]
            for first, purge_seq, limit in unsigned if body.time is not None else ():
                if body.time + CLOCK_AHEAD < limit + MIN_RETENTION:
                    raise Bad(
                        first,
                        f"record {first} was removed, but the purge at {purge_seq} names a "
                        f"limit less than {MIN_RETENTION.days} days before the checkpoint "
                        f"at {seq} signed it",
                    )
            unsigned = [] if body.time is not None else unsigned
            if body.head != head:
                raise Bad(
                    last_signed + 1,
                    f"records after {last_signed} differ from the signed checkpoint at {seq}",
                )
            if body.root is not None:
                root = stack[-1]
                for subtree in reversed(stack[:-1]):
                    root = node_hash(subtree, root)
                if root != body.root:
                    raise Bad(
                        seq,
                        f"the checkpoint at {seq} signs a Merkle root that is not "
                        f"the root of records 1 to {seq}",
                    )
            last_signed = seq
    if purges:
        purge_seq, seqs = min(purges.items(), key=lambda item: item[1][0])
        raise Bad(seqs[0], f"record {seqs[0]} was removed, but record {purge_seq} is no purge")
    beyond = [seq for seq in order if seq > tree_size]
    if beyond:
        raise Bad(
            tree_size + 1,
            f"truncated: a checkpoint signs seq {beyond[-1]}, the last record is {tree_size}",
        )
    roots = sum(1 for body, _ in signed.values() if body.root is not None)
    return (
        f"journal intact: {tree_size} records, {len(signed)} checkpoints verified "
        f"({roots} with a Merkle root); {tree_size - last_signed} records after the newest "
        "checkpoint are signed by none"
    )


def tombstone(line: dict[str, Any], seq: int, purges: dict[int, list[int]]) -> tuple[bytes, bytes]:
    """(leaf hash, chain hash) of a purged record's tombstone line; the purge it names is
    checked when its record comes (it follows what it removes)."""
    hashes = (line.get("leaf_hash"), line.get("hash"))
    # 64 lowercase hex digits, as Sekisho writes and its own verify accepts (bytes.fromhex
    # would take upper case and spaces too: the two verifiers must accept the same exports).
    if not all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes):
        raise Bad(seq, "the tombstone's hashes are not SHA-256 in lowercase hex")
    leaf, head = (bytes.fromhex(str(h)) for h in hashes)
    purge_seq = line.get("purge_seq")
    if not isinstance(purge_seq, int) or isinstance(purge_seq, bool) or purge_seq <= seq:
        raise Bad(seq, f"record {seq} was removed, but no purge after it names it")
    purges.setdefault(purge_seq, []).append(seq)
    return leaf, head


def check_purge(
    record: dict[str, Any], seqs: list[int], signed: dict[int, tuple[Body, str]]
) -> tuple[int, int, dt.datetime]:
    """The record tombstones name must be a purge (``audit.purge``) naming exactly their
    seqs: count, first, last, and SHA-256 of the seqs in decimal, one per line, ascending;
    and ``through``, a checkpoint after them (before the purge) signing a time no later than
    the purge's ``limit``. Returns (first seq removed, purge seq, limit): the checkpoint that
    first signs the purge must be at least two years after that limit (a purge forged in the
    unsigned tail, then signed, would otherwise remove any record)."""
    detail = record.get("detail")
    if record.get("action") != "audit.purge" or not isinstance(detail, dict):
        raise Bad(seqs[0], f"record {seqs[0]} was removed, but record {record['seq']} is no purge")
    listed = "".join(f"{seq}\n" for seq in sorted(seqs)).encode("ascii")

    def number(key: str) -> Any:
        value = detail.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    if (
        number("count") != len(seqs)
        or number("first") != min(seqs)
        or number("last") != max(seqs)
        or detail.get("seqs_sha256") != hashlib.sha256(listed).hexdigest()
    ):
        raise Bad(
            seqs[0],
            f"records removed are not those the purge at {record['seq']} names",
        )
    try:
        limit = parse_time(detail.get("limit"), "the purge's limit")
    except ValueError as exc:
        raise Bad(seqs[0], f"the purge at {record['seq']}: {exc}") from None
    through = number("through")
    body = signed[through][0] if through in signed else None
    if (
        through is None
        or not max(seqs) <= through < record["seq"]
        or body is None
        or body.time is None
        or body.time > limit
    ):
        raise Bad(
            seqs[0],
            f"record {seqs[0]} was removed, but the purge at {record['seq']} names no "
            "checkpoint signed by its limit that covers it",
        )
    return seqs[0], record["seq"], limit


# -- proofs ----------------------------------------------------------------------------------
def root_from_path(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes | None:
    """RFC 9162 §2.1.3.2."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return r if sn == 0 else None


def consistent(m: int, n: int, first: bytes, second: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2."""
    if not 0 < m <= n:
        return False
    if m == n:
        return not proof and first == second
    if not proof:
        return False
    path = ([first] if m & (m - 1) == 0 else []) + list(proof)
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr == first and sr == second and sn == 0


def hashes_of(value: Any, what: str, seq: int) -> list[bytes]:
    if not isinstance(value, list):
        raise Bad(seq, f"{what} is not a list")
    try:
        return [b64_hash(v, what) for v in value]
    except ValueError as exc:
        raise Bad(seq, str(exc)) from None


def verify_proof(path: Path, key: Any) -> str:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Unreadable(f"{path}: not a JSON document ({exc})") from None
    kind = doc.get("format") if isinstance(doc, dict) else None
    if kind == "sekisho-inclusion-proof/1":
        body = checked_checkpoint(doc.get("checkpoint"), key, "the checkpoint")
        if body.root is None:
            raise Bad(body.seq, "the checkpoint signs no Merkle root")
        if doc.get("tree_size") != body.seq:
            raise Bad(body.seq, "tree_size is not the size the checkpoint signs")
        entries = doc.get("entries")
        if not isinstance(entries, list) or not entries:
            raise Unreadable(f"{path}: no entries")
        for entry in entries:
            record = entry.get("record") if isinstance(entry, dict) else None
            if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
                raise Unreadable(f"{path}: an entry without its record")
            seq = record["seq"]
            if entry.get("leaf_index") != seq - 1 or entry.get("seq") != seq:
                raise Bad(seq, "the leaf index is not the record's seq - 1")
            audit_path = hashes_of(entry.get("audit_path"), "the audit path", seq)
            leaf = leaf_hash(canonical(record))
            if root_from_path(seq - 1, body.seq, leaf, audit_path) != body.root:
                raise Bad(
                    seq,
                    f"record {seq} is not proven included in the tree of "
                    f"{body.seq} the checkpoint signs",
                )
        seqs = ", ".join(str(e["record"]["seq"]) for e in entries)
        return f"inclusion proven: record(s) {seqs} in the signed tree of {body.seq} records"
    if kind == "sekisho-consistency-proof/1":
        first = checked_checkpoint(doc.get("first_checkpoint"), key, "the first checkpoint")
        second = checked_checkpoint(doc.get("second_checkpoint"), key, "the second checkpoint")
        for body in (first, second):
            if body.root is None:
                raise Bad(body.seq, "the checkpoint signs no Merkle root")
        if first.origin != second.origin:
            raise Bad(second.seq, "the two checkpoints are of different journals")
        if (doc.get("first_size"), doc.get("second_size")) != (first.seq, second.seq):
            raise Bad(second.seq, "the sizes are not those the checkpoints sign")
        proof = hashes_of(doc.get("proof"), "the proof", second.seq)
        assert first.root is not None and second.root is not None
        if not consistent(first.seq, second.seq, first.root, second.root, proof):
            raise Bad(
                second.seq,
                f"the tree signed at {second.seq} is not proven consistent "
                f"with the one signed at {first.seq}: a fork, or a bad proof",
            )
        return (
            f"consistency proven: the tree of {first.seq} is a prefix of the tree of {second.seq}"
        )
    raise Unreadable(f"{path}: not a Sekisho proof document")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    journal = commands.add_parser("journal", help="verify records and checkpoints exported")
    journal.add_argument("records", type=Path, help="`sekisho audit export` output (JSONL)")
    journal.add_argument("checkpoints", type=Path, help="`audit checkpoints export` output")
    proof = commands.add_parser("proof", help="verify a `sekisho audit prove` document")
    proof.add_argument("document", type=Path)
    for sub in (journal, proof):
        sub.add_argument("--public-key", type=Path, required=True, help="audit public key, PEM")
    args = parser.parse_args(argv)
    try:
        key = load_key(args.public_key)
        if args.command == "journal":
            message = verify_journal(args.records, args.checkpoints, key)
        else:
            message = verify_proof(args.document, key)
    except Bad as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    except Unreadable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
