"""The DER writer (``ca.der``) against asn1crypto's decoder: times and OIDs as we emit them in
CRLs and OCSP responses."""

from __future__ import annotations

import datetime as dt

import pytest
from asn1crypto import core as asn1

from ca import der

JST = dt.timezone(dt.timedelta(hours=9))


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2026, 11, 26, 11, 6, 7, 999_999, tzinfo=dt.UTC),
        dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
        dt.datetime(2050, 1, 1, 0, 0, 0, tzinfo=dt.UTC),
        dt.datetime(2050, 1, 1, 8, 59, 59, tzinfo=JST),  # still 2049 in UTC
        dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
        dt.datetime(1, 1, 1, 0, 0, 0, tzinfo=dt.UTC),
        dt.datetime(1949, 12, 31, 23, 59, 59, tzinfo=dt.UTC),  # UTCTime would read as 2049
        dt.datetime(1950, 1, 1, 0, 0, 0, tzinfo=dt.UTC),
    ],
)
def test_times_decode_to_the_same_utc_second(value: dt.datetime) -> None:
    utc = value.astimezone(dt.UTC).replace(microsecond=0)
    gen = der.generalized_time(value)
    assert gen[:2] == b"\x18\x0f" and gen.endswith(b"Z")
    assert asn1.GeneralizedTime.load(gen).native == utc
    # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050.
    either = der.time(value)
    if 1950 <= utc.year < 2050:
        assert either[:2] == b"\x17\x0d"
        assert asn1.UTCTime.load(either).native == utc
    else:
        assert either == gen


@pytest.mark.parametrize(
    "dotted",
    ["1.3.6.1.5.5.7.48.1.1", "1.3.6.1.5.5.7.48.1.2", "2.5.29.20", "2.999.1", "1.2.840.10045.4.3.2"],
)
def test_oids_round_trip_and_cached_values_stay_right(dotted: str) -> None:
    first = der.oid(dotted)
    assert asn1.ObjectIdentifier.load(first).dotted == dotted
    assert der.oid(dotted) == first  # from the cache


@pytest.mark.parametrize("dotted", ["1", "3.1", "1.40", "0.40.1", "1.-2"])
def test_invalid_oids_are_refused(dotted: str) -> None:
    with pytest.raises(ValueError, match="OBJECT IDENTIFIER"):
        der.oid(dotted)


def test_leading_cuts_a_concatenation_after_its_first_tlvs() -> None:
    long = der.sequence(der.octet_string(b"y" * 70000))
    items = [der.integer(1), der.octet_string(b"x" * 200), long]
    joined = b"".join(items)
    for count in range(4):
        assert der.leading(joined, count) == b"".join(items[:count])
    assert der.leading(joined, 3) is joined and der.leading(joined, 9) is joined
    assert der.leading(bytearray(joined), 2) == joined[: len(items[0]) + len(items[1])]
    indefinite = b"\x30\x80" + der.integer(1) + b"\x00\x00"  # BER, never ours
    for broken in (joined[:-1], joined[: len(items[0]) + 1], indefinite):
        with pytest.raises(ValueError):
            der.leading(broken, 3)
