"""HTTP header fields both servers read (the Flask app's conditional GETs in
:mod:`web.conditional`, and ``ocsp serve``'s own HTTP/1.1): HTTP-dates and entity-tag lists
as RFC 9110 defines them, and the evaluation of a conditional request's preconditions (13.2.2),
so that both servers answer one request alike. No Flask here: ``ocsp serve`` does not load it."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Protocol

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


class Fields(Protocol):
    """Request header fields by name (werkzeug's Headers, or a dict in tests)."""

    def get(self, key: str) -> str | None: ...


def evaluate(
    method: str,
    headers: Fields,
    etag: str,
    last_modified: dt.datetime,
    now: dt.datetime,
    second_is_own: Callable[[], bool] | None = None,
    *,
    modified_since: bool = True,
) -> int:
    """200 (answer as usual), 304 or 412 for a request to a representation with the strong
    entity-tag ``etag`` (unquoted) and ``last_modified``, by RFC 9110 13.2.2.

    ``second_is_own``, when given, says whether no earlier representation has the same
    Last-Modified (an HTTP-date names a second: two CRLs may share one). When it says no, an
    If-Modified-Since of that second proves nothing and is not answered 304.
    ``modified_since`` false: If-Modified-Since is not evaluated at all (a 200 is always a
    right answer to it), for representations that change within a second of each other
    with no order a date can tell, as OCSP answers do (signed "good", then "revoked")."""
    modified = last_modified.astimezone(dt.UTC).replace(microsecond=0)  # as Last-Modified says
    safe = method in ("GET", "HEAD")
    if_match = headers.get("If-Match")
    if if_match is not None:
        if not etag_matches(if_match, etag, weak=False):
            return 412
    else:
        unmodified_since = parse_http_date(headers.get("If-Unmodified-Since"), now)
        if unmodified_since is not None and modified > unmodified_since:
            return 412
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        if etag_matches(if_none_match, etag, weak=True):
            return 304 if safe else 412
    elif safe and modified_since:
        since = parse_http_date(headers.get("If-Modified-Since"), now)
        if since is not None and modified <= since:
            if modified < since or second_is_own is None or second_is_own():
                return 304
    return 200
