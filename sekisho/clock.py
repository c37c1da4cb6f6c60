"""The one place that reads the wall clock. Core code takes ``now`` as an argument."""

from __future__ import annotations

import datetime as dt

# A stored time further ahead of the present than this was set by a clock that ran ahead (a
# host out of sync, an NTP step back), not by a peer whose clock is a moment ahead or that
# read it just after us: not carried forward (CRL thisUpdate, the audit checkpoint timer).
CLOCK_AHEAD = dt.timedelta(minutes=5)


def utcnow() -> dt.datetime:
    """Current UTC time, whole seconds (certificates, CRLs and OCSP carry no fractions)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def as_utc(value: dt.datetime) -> dt.datetime:
    """Databases may hand back naive datetimes (SQLite); they are UTC by our convention."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)
