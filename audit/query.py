"""Searching and exporting the journal for security officers.

Exports escape every control character (C0, DEL, C1, the Unicode line/paragraph separators)
and the invisible characters that reorder or hide text (bidi marks, embeddings, overrides and
isolates, zero-width characters, the byte order mark) as ``\\xNN`` / ``\\uNNNN``, so a crafted
DN or account name cannot forge lines, or disguise itself, in a log viewer; CSV cells that a
spreadsheet would run as a formula (= + - @ or their fullwidth forms, after any leading spaces)
get a leading quote (as do cells that already start with one, so removing one leading quote
always restores the value).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import heapq
import io
import ipaddress
import json
import re
from collections.abc import Iterator
from typing import IO, Any, TypeVar

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from audit.chain import FIELDS, format_time
from audit.events import normalise_mac
from audit.models import JournalRecord, PurgedRecord
from ca.tbs import parse_serial, serial_hex
from sekisho.errors import InputError

PAGE = 2000
_Row = TypeVar("_Row", JournalRecord, PurgedRecord)


@dataclasses.dataclass(frozen=True)
class Filter:
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    category: str | None = None
    action: str | None = None
    outcome: str | None = None
    actor: str | None = None  # account, or certificate serial of the actor
    serial: str | None = None  # object or actor certificate serial (hex)
    dn: str | None = None  # substring of the object DN, any case
    ip: str | None = None
    mac: str | None = None
    device: str | None = None


def _statement(f: Filter) -> Select[JournalRecord]:
    stmt = select(JournalRecord)
    R = JournalRecord
    if f.since is not None:
        stmt = stmt.where(R.time >= f.since)
    if f.until is not None:
        stmt = stmt.where(R.time < f.until)
    if f.category:
        stmt = stmt.where(R.category == f.category)
    if f.action:
        stmt = stmt.where(R.action == f.action)
    if f.outcome:
        stmt = stmt.where(R.outcome == f.outcome)
    if f.actor:
        stmt = stmt.where(or_(R.actor_account == f.actor, R.actor_serial == _serial(f.actor)))
    if f.serial:
        s = _serial(f.serial)
        stmt = stmt.where(or_(R.object_serial == s, R.actor_serial == s))
    if f.dn:
        # Case-insensitive on both stores (DN attributes compare ignoring case, RFC 4517
        # caseIgnoreMatch): ILIKE on PostgreSQL, lower() LIKE lower() on SQLite. DNs are
        # stored as RFC 4514 strings, where a value's , + " ; < > and backslash carry a
        # backslash: the text is looked for as given (an RFC 4514 fragment such as
        # "Smith\, John") and as a value with those characters escaped ("Smith, John").
        forms = dict.fromkeys([f.dn, _RFC4514_SPECIALS.sub(r"\\\g<0>", f.dn)])
        stmt = stmt.where(
            or_(*(R.object_dn.ilike(f"%{_like_escaped(form)}%", escape="\\") for form in forms))
        )
    if f.ip:
        stmt = stmt.where(R.client_ip == _ip(f.ip))
    if f.mac:
        stmt = stmt.where(R.device_mac == normalise_mac(f.mac))
    if f.device:
        stmt = stmt.where(R.device_id == f.device)
    return stmt


_RFC4514_SPECIALS = re.compile(r'[\\,+";<>]')


def _like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _ip(text: str) -> str:
    """Addresses are recorded as the socket gave them, in RFC 5952 form (lower case, the
    longest run of zeros compressed): any other spelling of the same address finds them."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return text


def _serial(text: str) -> str:
    """A certificate serial as stored (40 lower-case hex digits), read as `cert show` reads
    one (``ca.tbs.parse_serial``: any case, ':', 0x, leading zeros, short forms); ``text``
    itself when it is none (an account name given as the actor)."""
    try:
        return serial_hex(parse_serial(text))
    except InputError:
        return text


def search(
    session: Session, f: Filter, *, limit: int | None = None, after: int | None = None
) -> Iterator[JournalRecord]:
    """Matching records in sequence order (those after seq ``after`` if given), paged
    (bounded memory for large exports). Every stored record is found, one slipped in at seq
    0 or below too (`audit verify` reports it)."""
    return _paged(session, _statement(f), JournalRecord, limit=limit, after=after)


def _paged(
    session: Session,
    stmt: Select[_Row],
    model: type[_Row],
    *,
    limit: int | None = None,
    after: int | None = None,
) -> Iterator[_Row]:
    """The rows of ``stmt`` (of ``model``) in seq order, a page at a time (bounded memory:
    each page is let go of before the next), ``limit`` at most, those after ``after``."""
    remaining = limit
    while remaining is None or remaining > 0:
        page = PAGE if remaining is None else min(PAGE, remaining)
        paged = stmt.order_by(model.seq).limit(page)
        if after is not None:
            paged = paged.where(model.seq > after)
        rows = list(session.scalars(paged))
        if not rows:
            return
        yield from rows
        after = rows[-1].seq
        if remaining is not None:
            remaining -= len(rows)
        session.expunge_all()


def latest(session: Session, f: Filter, limit: int) -> Iterator[JournalRecord]:
    """The ``limit`` newest matching records, in sequence order (what ``tail`` would show),
    paged as ``search`` is: the seq of the ``limit``-th newest match first, then the
    matches from there on (no more than ``limit``, whatever was appended meanwhile)."""
    first = session.scalar(
        _statement(f)
        .with_only_columns(JournalRecord.seq)
        .order_by(JournalRecord.seq.desc())
        .offset(limit - 1)
        .limit(1)
    )
    return search(session, f, limit=limit, after=None if first is None else first - 1)


def as_document(row: JournalRecord) -> dict[str, Any]:
    doc: dict[str, Any] = {name: getattr(row, name) for name in FIELDS}
    doc["time"] = format_time(row.time)
    try:
        doc["detail"] = json.loads(row.detail)
    except ValueError:
        doc["detail"] = row.detail
    doc["hash"] = row.hash
    return doc


# Escaped besides the C0/C1 controls (as \xNN): every character a viewer shows as nothing,
# or that reorders or hides the text around it, or that a viewer shows as an ordinary
# space, so that no DN reads as another. That is what str.isprintable() refuses (format
# characters such as bidi controls, zero-width joiners, soft hyphen, tag characters; line
# and paragraph separators; private-use, surrogate and unassigned code points; the spaces
# of category Zs but the ideographic space, which is part of many Japanese names and shows
# as itself), plus the default-ignorable code points of other categories: combining
# grapheme joiner, Hangul fillers, Khmer inherent vowels, Mongolian and other variation
# selectors (Unicode DerivedCoreProperties, Default_Ignorable_Code_Point).
# As \uNNNN, or \UNNNNNNNN beyond the Basic Multilingual Plane.
IGNORABLE_VISIBLE = frozenset(
    [
        0x034F,
        0x115F,
        0x1160,
        0x17B4,
        0x17B5,
        *range(0x180B, 0x1810),
        0x3164,
        *range(0xFE00, 0xFE10),
        0xFFA0,
        *range(0xE0100, 0xE01F0),
    ]
)


_IDEOGRAPHIC_SPACE = "\u3000"


def _hidden(ch: str) -> bool:
    if ch.isprintable():
        return ord(ch) in IGNORABLE_VISIBLE
    return ch != _IDEOGRAPHIC_SPACE


def escape_controls(text: str) -> str:
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to escape
    out = []
    for ch in text:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif code >= 0xA0 and _hidden(ch):
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


# What makes a spreadsheet run a cell as a formula, also after leading spaces (which Excel
# and LibreOffice skip): = + - @, and their fullwidth forms, which Japanese input methods
# type and spreadsheets in Japanese locales read as the ASCII ones. Tab and CR are already
# escaped (\x09, \x0d) by then.
_FORMULA_START = frozenset("=+-@\uff1d\uff0b\uff0d\uff20")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        value = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    text = escape_controls(value)
    # A leading quote is also quoted, so a reader strips exactly one to get the value back.
    if text[:1] == "'" or text.lstrip()[:1] in _FORMULA_START:
        text = "'" + text
    return text


def tombstones(session: Session) -> Iterator[dict[str, Any]]:
    """The tombstone of every purged record (``audit purge``), in seq order, paged, as the
    line ``audit export --tombstones`` writes in the record's place."""
    for row in _paged(session, select(PurgedRecord), PurgedRecord):
        yield {
            "seq": row.seq,
            "purged": True,
            "time": format_time(row.time),
            "action": row.action,
            "object_serial": row.object_serial,
            "leaf_hash": row.leaf_hash,
            "hash": row.hash,
            "purge_seq": row.purge_seq,
        }


def with_tombstones(
    rows: Iterator[JournalRecord], stones: Iterator[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """Record documents and tombstones merged in seq order."""
    return heapq.merge((as_document(row) for row in rows), stones, key=lambda doc: int(doc["seq"]))


def write_jsonl(rows: Iterator[JournalRecord | dict[str, Any]], out: IO[str]) -> int:
    """One JSON object per line; JSON escapes all C0 controls and we force ASCII for the rest.
    ``rows``: records, or documents made already (``with_tombstones``)."""
    n = 0
    for row in rows:
        doc = row if isinstance(row, dict) else as_document(row)
        out.write(json.dumps(doc, sort_keys=True, ensure_ascii=True) + "\n")
        n += 1
    return n


CSV_COLUMNS = (*FIELDS, "hash")


def write_csv(rows: Iterator[JournalRecord], out: IO[str]) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    n = 0
    for row in rows:
        doc = as_document(row)
        writer.writerow([_csv_cell(doc[c]) for c in CSV_COLUMNS])
        n += 1
    return n


def render_line(row: JournalRecord) -> str:
    """A one-line human view for ``audit search`` (escaped like the exports). A field value
    with a space, ``=`` or ``"`` in it is quoted, so a DN such as ``CN=x serial=1`` cannot
    show a forged ``serial=`` field."""
    parts = [
        f"{row.seq:>8}",
        format_time(row.time),
        *(escape_controls(text) for text in (row.category, row.action, row.outcome)),
    ]
    for label, value in (
        ("actor", row.actor_account),
        ("actor_serial", row.actor_serial),
        ("ip", row.client_ip),
        ("dn", row.object_dn),
        ("serial", row.object_serial),
        ("device", row.device_id),
        ("mac", row.device_mac),
    ):
        if value:
            parts.append(f"{label}={_quoted(escape_controls(value))}")
    return " ".join(parts)


def _quoted(text: str) -> str:
    """``text`` (already escaped: every backslash doubled) in double quotes, with ``\\"`` for
    a quote inside, when it holds a space, ``=`` or ``"``; otherwise as it is."""
    if any(ch.isspace() or ch in '="' for ch in text):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def to_string(rows: Iterator[JournalRecord], fmt: str) -> str:
    buf = io.StringIO()
    (write_csv if fmt == "csv" else write_jsonl)(rows, buf)
    return buf.getvalue()
