"""A minimal DER writer for the structures we emit in bulk (CRL entries).

``cryptography``'s CRL builder copies its entry list on every ``add_revoked_certificate`` call
(quadratic), and even its list constructor costs ~15 s at 10^6 entries. Encoding the entries
ourselves is a few lines and runs in about a third of that.
"""

from __future__ import annotations

import datetime as dt
import functools


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:  # most of what we write: tag and short-form length in one step
        return bytes((tag, n)) + content
    return bytes((tag,)) + length(n) + content


def integer(value: int) -> bytes:
    if value < 0:
        raise ValueError("negative integers are not used here")
    return tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def sequence(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def octet_string(value: bytes) -> bytes:
    return tlv(0x04, value)


def bit_string(value: bytes) -> bytes:
    return tlv(0x03, b"\x00" + value)


def explicit(tag_number: int, content: bytes) -> bytes:
    return tlv(0xA0 | tag_number, content)


def time(value: dt.datetime) -> bytes:
    """RFC 5280 4.1.2.5: UTCTime for 1950 through 2049, GeneralizedTime otherwise (a two-digit
    year reads as 1950..2049); Zulu, seconds."""
    value = value.astimezone(dt.UTC)
    if 1950 <= value.year < 2050:
        return b"\x17\x0d%02d%02d%02d%02d%02d%02dZ" % (
            value.year % 100,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
        )
    return generalized_time(value)


def generalized_time(value: dt.datetime) -> bytes:
    # Formatted by hand (years are 1..9999, so 15 octets): strftime costs three times as much.
    value = value.astimezone(dt.UTC)
    return b"\x18\x0f%04d%02d%02d%02d%02d%02dZ" % (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
    )


@functools.lru_cache(maxsize=512)
def oid(dotted: str) -> bytes:
    """The DER OBJECT IDENTIFIER; cached, as the same few OIDs are written again and again."""
    parts = [int(p) for p in dotted.split(".")]
    if len(parts) < 2 or parts[0] > 2 or (parts[0] < 2 and parts[1] > 39) or min(parts) < 0:
        raise ValueError(f"not an OBJECT IDENTIFIER: {dotted}")
    body = bytearray()
    # The first two arcs share one subidentifier, itself base 128 (2.999 is 1079: 88 37).
    for part in [40 * parts[0] + parts[1], *parts[2:]]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        body.extend(reversed(chunk))
    return tlv(0x06, bytes(body))


def extension(oid_dotted: str, value_der: bytes, critical: bool = False) -> bytes:
    parts = [oid(oid_dotted)]
    if critical:
        parts.append(b"\x01\x01\xff")
    parts.append(octet_string(value_der))
    return sequence(*parts)


def leading(items: bytes | bytearray, count: int) -> bytes | bytearray:
    """The first ``count`` TLVs of ``items``, a concatenation of DER TLVs with one-octet tags
    (``items`` itself when it holds no more). ValueError if a length runs past the end or is
    not DER's."""
    end, size = 0, len(items)
    for _ in range(count):
        if end >= size:
            return items
        if end + 2 > size:
            raise ValueError("truncated TLV")
        first = items[end + 1]
        if first < 0x80:
            end += 2 + first
        elif first == 0x80:
            raise ValueError("an indefinite length (not DER)")
        else:
            octets = first & 0x7F
            start = end + 2 + octets
            end = start + int.from_bytes(items[end + 2 : start], "big")
        if end > size:
            raise ValueError("a TLV's length runs past the end")
    return items if end == size else items[:end]
