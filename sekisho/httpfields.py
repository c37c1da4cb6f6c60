"""HTTP header fields both servers read (the Flask app's conditional GETs in
:mod:`web.conditional`, and ``ocsp serve``'s own HTTP/1.1): HTTP-dates and entity-tag lists
as RFC 9110 defines them. No Flask here: ``ocsp serve`` does not load it."""

from __future__ import annotations

import datetime as dt
import re

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DAY = "(?:" + "|".join(_DAYS) + ")"
_WEEKDAY = "(?:" + "|".join(_WEEKDAYS) + ")"
_MONTH = "(?P<m>" + "|".join(_MONTHS) + ")"
_CLOCK = r"(?P<H>\d\d):(?P<M>\d\d):(?P<S>\d\d)"
_HTTP_DATES = (  # RFC 9110 5.6.7, case-sensitive
    re.compile(rf"{_DAY}, (?P<d>\d\d) {_MONTH} (?P<y>\d{{4}}) {_CLOCK} GMT", re.ASCII),
    re.compile(rf"{_WEEKDAY}, (?P<d>\d\d)-{_MONTH}-(?P<y>\d\d) {_CLOCK} GMT", re.ASCII),
    re.compile(rf"{_DAY} {_MONTH} (?P<d>\d\d| \d) {_CLOCK} (?P<y>\d{{4}})", re.ASCII),
)
# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE; etagc = %x21 / %x23-7E / obs-text (RFC 9110 8.8.3)
_ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
_OWS = " \t"
_SPACE = re.compile(r"[ \t]*")
_DELIMITERS = re.compile(r"[ \t]*(?:,[ \t]*)*")  # OWS, then commas, each with OWS after it


def parse_http_date(value: str | None, now: dt.datetime) -> dt.datetime | None:
    """The instant an HTTP-date names, or None when ``value`` is not exactly one. A two-digit
    rfc850 year more than 50 years ahead of ``now`` is the century before (RFC 9110 5.6.7)."""
    if value is None:
        return None
    for form in _HTTP_DATES:
        match = form.fullmatch(value.strip(_OWS))
        if match is not None:
            break
    else:
        return None
    year = int(match["y"])
    if len(match["y"]) == 2:
        year += now.year - now.year % 100
        if year > now.year + 50:
            year -= 100
    try:
        return dt.datetime(
            year,
            _MONTHS.index(match["m"]) + 1,
            int(match["d"]),
            int(match["H"]),
            int(match["M"]),
            min(int(match["S"]), 59),  # a leap second (60) is the second before
            tzinfo=dt.UTC,
        )
    except ValueError:  # 31 Feb, hour 25 ...
        return None


def entity_tags(value: str) -> list[tuple[bool, str]] | None:
    """(weak, opaque-tag) of each member of an entity-tag list, or None when ``value`` is not
    one. Empty members are allowed (RFC 9110 5.6.1)."""
    # Matched in place, never sliced: a field of gunicorn's 100 lines of 8 KiB each (repeated
    # lines arrive joined) took seconds of CPU when each step copied the rest of it.
    tags: list[tuple[bool, str]] = []
    end = len(value)
    pos = _past(_DELIMITERS, value, 0)
    while pos < end:  # each turn consumes at least one character
        match = _ENTITY_TAG.match(value, pos)
        if match is None:
            return None
        tags.append((match[1] is not None, match[2]))
        pos = _past(_SPACE, value, match.end())
        if pos < end and value[pos] != ",":
            return None
        pos = _past(_DELIMITERS, value, pos)
    return tags


def _past(pattern: re.Pattern[str], value: str, pos: int) -> int:
    """Where ``pattern``, which also matches nothing, stops matching from ``pos``."""
    match = pattern.match(value, pos)
    assert match is not None  # an empty match is a match
    return match.end()


def etag_matches(field: str, etag: str, *, weak: bool) -> bool:
    """Whether an If-Match (``weak=False``: strong comparison) or If-None-Match (weak
    comparison) field matches the current representation, whose strong tag is ``etag``."""
    if field.strip(_OWS) == "*":
        return True  # the representation exists
    tags = entity_tags(field)
    return tags is not None and any(tag == etag and (weak or not is_weak) for is_weak, tag in tags)
