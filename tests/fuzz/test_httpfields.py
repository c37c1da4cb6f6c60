"""Conditional request fields (``sekisho.httpfields``), read by the web app and ``ocsp serve``
from what any client sends: If-None-Match and If-Match lists and HTTP-dates never raise;
what is not one is None (ignored) or matches nothing."""

from __future__ import annotations

import datetime as dt
import email.utils

from hypothesis import given
from hypothesis import strategies as st

from sekisho.httpfields import entity_tags, etag_matches, parse_http_date
from tests.fuzz.mutate import FUZZ

NOW = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
FIELD = 'W/""*,\t =abc\x80\xff-0123456789:GMT MonSunNovFeb'
SEEDS = [
    'W/"abc", "def" ,,',
    "*",
    "Sun, 06 Nov 1994 08:49:37 GMT",
    "Sunday, 06-Nov-94 08:49:37 GMT",
    "Sun Nov  6 08:49:37 1994",
    "Mon, 29 Feb 2100 23:59:60 GMT",
]


@st.composite
def fields(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(FIELD, max_size=4)) + text[at + draw(st.integers(0, 3)) :]
    return text


@FUZZ
@given(fields() | st.text(FIELD, max_size=80) | st.text(max_size=80))
def test_conditional_fields_never_raise(value: str) -> None:
    parsed = parse_http_date(value, NOW)
    assert parsed is None or parsed.tzinfo is dt.UTC
    tags = entity_tags(value)
    assert tags is None or all(isinstance(tag, str) for _, tag in tags)
    for weak in (True, False):
        assert isinstance(etag_matches(value, "abc", weak=weak), bool)


@FUZZ
@given(st.datetimes(dt.datetime(1970, 1, 1), dt.datetime(9999, 1, 1)))
def test_an_imf_date_reads_back(when: dt.datetime) -> None:
    stamp = when.replace(microsecond=0, tzinfo=dt.UTC)
    assert parse_http_date(email.utils.format_datetime(stamp, usegmt=True), NOW) == stamp
