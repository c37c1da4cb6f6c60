"""A small, strict DER reader for OCSP requests and certificates.

One iterative pass over the whole TLV tree refuses anything outside DER's shape (indefinite
lengths, non-minimal lengths, high tag numbers, constructed forms of primitive universal
types, invalid INTEGER/BOOLEAN/NULL/OID contents, trailing bytes) and trees deeper than
``max_depth``: 10^4 nested SEQUENCEs cost one linear scan and a refusal, never a deep
recursion. ``ocsp.core`` then reads the request's fields from that tree.

An OBJECT IDENTIFIER is at most ``MAX_OID_OCTETS`` (63) content octets, each arc at most
``MAX_ARC_OCTETS`` (19, the 128 bits of a UUID arc, X.667): the limits of ``cryptography``,
which reads and writes every certificate here, so no OID we could know is longer. Without
them one arc of 32 KB took ~70 ms of big-integer shifts to decode, and its ``str()`` broke
Python's 4,300-digit limit (a ValueError, not a malformed request).

Writing DER for responses uses :mod:`ca.der`.
"""

from __future__ import annotations

from typing import NamedTuple

MAX_LENGTH_OCTETS = 4  # 4 GiB: more than any request we accept
MAX_OID_OCTETS = 63  # OBJECT IDENTIFIER contents; cryptography (rust-asn1) refuses longer
MAX_ARC_OCTETS = 19  # one subidentifier: 133 bits, room for a 128-bit UUID arc (2.25.<uuid>)


class DerError(ValueError):
    """The input is not well-formed DER (or exceeds a limit)."""


class Tlv(NamedTuple):
    tag: int
    start: int  # offset of the identifier octet
    content_start: int
    end: int  # one past the last content octet

    def content(self, data: bytes) -> bytes:
        return data[self.content_start : self.end]

    def encoding(self, data: bytes) -> bytes:
        return data[self.start : self.end]


def read_tlv(data: bytes, pos: int, end: int) -> Tlv:
    """The TLV starting at ``pos``; it must end at or before ``end``."""
    start = pos
    if pos >= end:
        raise DerError("truncated: expected a tag")
    tag = data[pos]
    pos += 1
    if tag & 0x1F == 0x1F:
        raise DerError("high tag numbers are not used in OCSP")
    if pos >= end:
        raise DerError("truncated: expected a length")
    first = data[pos]
    pos += 1
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise DerError("indefinite length is not DER")
    else:
        count = first & 0x7F
        if count > MAX_LENGTH_OCTETS:
            raise DerError("length field too long")
        if pos + count > end:
            raise DerError("truncated: length field")
        raw = data[pos : pos + count]
        pos += count
        if raw[0] == 0:
            raise DerError("non-minimal length encoding")
        length = int.from_bytes(raw, "big")
        if length < 0x80:
            raise DerError("non-minimal length encoding")
    if length > end - pos:
        raise DerError("truncated: content shorter than its length")
    return Tlv(tag, start, pos, pos + length)


def is_constructed(tag: int) -> bool:
    return bool(tag & 0x20)


def children(data: bytes, parent: Tlv, at_most: int | None = None) -> list[Tlv]:
    """The TLVs directly inside a constructed ``parent``; with ``at_most``, DerError as soon
    as there are more (a reader that wants a few fields stops at once, not after 16,000)."""
    out: list[Tlv] = []
    pos = parent.content_start
    while pos < parent.end:
        if at_most is not None and len(out) == at_most:
            raise DerError(f"more than {at_most} elements")
        item = read_tlv(data, pos, parent.end)
        out.append(item)
        pos = item.end
    return out


# TLVs in a whole request at most: one we answer holds a few hundred (32 CertIDs of 8 each,
# extensions, a signature with its certificates). Without a bound, refusing a 32 KiB SEQUENCE
# of 16,000 NULLs read every one of them, twice: 17 ms of CPU, where a request takes a few.
MAX_TLVS = 4000


def check_structure(data: bytes, max_depth: int, max_tlvs: int = MAX_TLVS) -> Tlv:
    """Validate the whole TLV tree of ``data`` (exactly one top-level element, nothing after
    it, nesting at most ``max_depth``, at most ``max_tlvs`` elements) without recursion; return
    the top-level TLV."""
    top = read_tlv(data, 0, len(data))
    if top.end != len(data):
        raise DerError(f"{len(data) - top.end} trailing octets after the outer element")
    pending: list[tuple[int, int, int]] = []  # (pos, end, depth of the items in it)
    _check_tag(top.tag)
    if is_constructed(top.tag):
        pending.append((top.content_start, top.end, 2))
    read = 1
    while pending:
        pos, end, depth = pending.pop()
        while pos < end:
            if read == max_tlvs:
                raise DerError(f"more than {max_tlvs} elements")
            read += 1
            item = read_tlv(data, pos, end)
            _check_tag(item.tag)
            _check_primitive(data, item)
            if is_constructed(item.tag):
                if depth >= max_depth:
                    raise DerError(f"nesting deeper than {max_depth}")
                pending.append((item.content_start, item.end, depth + 1))
            pos = item.end
    return top


def _check_primitive(data: bytes, item: Tlv) -> None:
    """DER content rules of the universal primitive types a request can carry (X.690 8.2,
    8.3, 8.8, 8.19, 11.1): an invalid INTEGER would otherwise be echoed in a signed answer."""
    tag = item.tag
    if tag == 0x02:  # INTEGER: at least one octet, minimal two's complement
        content = data[item.content_start : item.end]
        if not content:
            raise DerError("empty INTEGER")
        if len(content) > 1 and (
            (content[0] == 0x00 and content[1] < 0x80)
            or (content[0] == 0xFF and content[1] >= 0x80)
        ):
            raise DerError("non-minimal INTEGER encoding")
    elif tag == 0x01:  # BOOLEAN: one octet, 0x00 or 0xFF
        if data[item.content_start : item.end] not in (b"\x00", b"\xff"):
            raise DerError("BOOLEAN is not one octet of 00 or FF")
    elif tag == 0x05:  # NULL: empty
        if item.end != item.content_start:
            raise DerError("NULL with content")
    elif tag == 0x06:  # OBJECT IDENTIFIER: bounded, subidentifiers complete, no 0x80 padding
        _check_oid(data[item.content_start : item.end])


def _check_oid(content: bytes) -> None:
    """OBJECT IDENTIFIER contents: 1..MAX_OID_OCTETS octets (judged before any is read), each
    subidentifier complete, minimal and at most MAX_ARC_OCTETS octets."""
    if len(content) > MAX_OID_OCTETS:
        raise DerError(f"OBJECT IDENTIFIER over {MAX_OID_OCTETS} octets")
    if not content or content[-1] & 0x80:
        raise DerError("truncated OBJECT IDENTIFIER")
    arc_octets = 0
    for octet in content:
        if not arc_octets and octet == 0x80:
            raise DerError("non-minimal OBJECT IDENTIFIER subidentifier")
        arc_octets += 1
        if arc_octets > MAX_ARC_OCTETS:
            raise DerError(f"OBJECT IDENTIFIER arc over {MAX_ARC_OCTETS} octets")
        if not octet & 0x80:
            arc_octets = 0


def _check_tag(tag: int) -> None:
    # Universal class, constructed: only SEQUENCE and SET exist in DER.
    if tag & 0xC0 == 0 and is_constructed(tag) and tag not in (0x30, 0x31):
        raise DerError(f"constructed encoding of primitive type (tag 0x{tag:02x})")


def oid_dotted(content: bytes) -> str:
    """Dotted form of OBJECT IDENTIFIER contents (already checked by ``check_structure``;
    checked again here, so that no caller decodes an unbounded one)."""
    _check_oid(content)
    arcs: list[int] = []
    value = 0
    for octet in content:
        value = (value << 7) | (octet & 0x7F)
        if not octet & 0x80:
            if not arcs:
                first = min(value // 40, 2)
                arcs += [first, value - 40 * first]
            else:
                arcs.append(value)
            value = 0
    if not arcs:
        raise DerError("empty OBJECT IDENTIFIER")
    return ".".join(map(str, arcs))


def expect(data: bytes, item: Tlv, tag: int, what: str) -> Tlv:
    if item.tag != tag:
        raise DerError(f"{what}: expected tag 0x{tag:02x}, found 0x{item.tag:02x}")
    return item


def only(data: bytes, tag: int, what: str) -> bytes:
    """The content of ``data``, which must be exactly one TLV with ``tag``."""
    item = read_tlv(data, 0, len(data))
    if item.end != len(data):
        raise DerError(f"{what}: trailing octets")
    return expect(data, item, tag, what).content(data)
