"""``audit search``: every filter, through the query API and the command line (``--json``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shlex
from pathlib import Path

import pytest

from audit.events import Category, Event, Outcome
from audit.query import Filter, search
from sekisho.services import Services
from tests.audit.conftest import append_event, event, run_cli, sql
from tests.conftest import FakeClock

SERIAL_A = "00" * 12 + "deadbeef01234567"
SERIAL_ACTOR = "7f" + "00" * 18 + "01"


@dataclasses.dataclass(frozen=True)
class Seeded:
    start: dt.datetime
    seqs: dict[str, int]


@pytest.fixture
def seeded(journal_services: Services, clock: FakeClock) -> Seeded:
    """Named records one minute apart, after the template's 12."""
    start = clock.now
    specs = {
        "percent": event(1, object_dn="CN=100%_sure,O=Lit", device_mac="AA:BB:CC:DD:EE:FF"),
        "percent-lookalike": event(2, object_dn="CN=100 xsure,O=Lit", device_mac=None),
        "underscore": event(3, object_dn="CN=a_b,O=Lit", client_ip="198.51.100.7"),
        "underscore-lookalike": event(4, object_dn="CN=axb,O=Lit", client_ip="198.51.100.70"),
        "serial-object": event(5, object_serial=SERIAL_A, category=Category.CA),
        "serial-actor": event(6, actor_serial=SERIAL_A, actor_account=None, category=Category.AUTH),
        "actor-cert": event(7, actor_serial=SERIAL_ACTOR, actor_account="robot@tenant2"),
        "mac-dashes": event(8, device_mac="aa-bb-cc-dd-ee-ff"),
        "mac-cisco": event(9, device_mac="aabb.ccdd.eeff"),
        "system": Event(Category.SYSTEM, "system.backup", Outcome.SUCCESS, actor_account="system"),
        "backslash": event(10, object_dn="CN=back\\slash,O=Lit"),
    }
    seqs = {}
    for name, ev in specs.items():
        clock.advance(minutes=1)
        seqs[name] = append_event(journal_services, clock, ev)
    return Seeded(start, seqs)


def found(services: Services, f: Filter, limit: int | None = None) -> list[int]:
    with services.db.scope() as session:
        return [row.seq for row in search(session, f, limit=limit)]


def test_dn_wildcards_are_matched_literally(journal_services: Services, seeded: Seeded) -> None:
    s = seeded.seqs
    assert found(journal_services, Filter(dn="100%_sure")) == [s["percent"]]
    assert found(journal_services, Filter(dn="%")) == [s["percent"]]
    assert found(journal_services, Filter(dn="a_b")) == [s["underscore"]]
    assert found(journal_services, Filter(dn="_")) == [s["percent"], s["underscore"]]
    assert found(journal_services, Filter(dn="back\\slash")) == [s["backslash"]]
    # Any case, the same on SQLite and PostgreSQL.
    assert found(journal_services, Filter(dn="cn=100%_SURE")) == [s["percent"]]
    assert found(journal_services, Filter(dn="BACK\\SLASH")) == [s["backslash"]]
    assert found(journal_services, Filter(dn="O=Lit")) == [
        s["percent"],
        s["percent-lookalike"],
        s["underscore"],
        s["underscore-lookalike"],
        s["backslash"],
    ]


def test_dn_case_is_ignored_beyond_ascii(journal_services: Services, clock: FakeClock) -> None:
    """Accented and full-width letters too (SQLite: our lower(); PostgreSQL: a UTF-8
    LC_CTYPE, as the test cluster and production installs have)."""
    upper_fullwidth = "".join(chr(0xFF21 + ord(c) - ord("A")) for c in "SEKISHO")
    lower_fullwidth = "".join(chr(0xFF41 + ord(c) - ord("a")) for c in "sekisho")
    dn = f"CN=\u00c9LODIE {upper_fullwidth},O=\u95a2\u6240"  # ÉLODIE, 関所
    seq = append_event(journal_services, clock, event(11, object_dn=dn))
    assert found(journal_services, Filter(dn=f"\u00e9lodie {lower_fullwidth}")) == [seq]
    assert found(journal_services, Filter(dn="\u95a2\u6240")) == [seq]
    assert found(journal_services, Filter(dn="elodie")) == []  # no accent folding


def test_a_dn_value_with_rfc4514_specials_is_found_as_written_and_as_stored(
    journal_services: Services, clock: FakeClock
) -> None:
    """DNs are stored as RFC 4514 strings, where , + " ; < > and the backslash in a value
    carry a backslash ("CN=Smith\\, John"): a search for the value as the certificate has
    it ("Smith, John") found nothing. Both forms find it now."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    def dn(cn: str) -> str:
        return x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.USER_ID, "js")]
        ).rfc4514_string()

    smith = append_event(journal_services, clock, event(13, object_dn=dn("Smith, John")))
    ops = append_event(journal_services, clock, event(14, object_dn=dn('R&D+Ops "<1;2>"')))
    assert dn("Smith, John") == "UID=js,CN=Smith\\, John"
    for query in ("Smith, John", "smith\\, JOHN", "UID=js,CN=Smith\\, John"):
        assert found(journal_services, Filter(dn=query)) == [smith], query
    for query in ('R&D+Ops "<1;2>"', 'r&d\\+ops \\"\\<1\\;2\\>\\"', "+ops"):
        assert found(journal_services, Filter(dn=query)) == [ops], query
    assert found(journal_services, Filter(dn="js,CN=Smith, John")) == []  # not a value


def test_newest_matches_come_in_sequence_order_across_pages(
    journal_services: Services, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`audit search` (newest first by default) used to hold every match in memory before
    printing one (960 MB at 4x10^5); it now finds where the newest ``limit`` begin and pages
    forward from there: the same records, in the same order, as the tail of a full search."""
    from audit import query

    monkeypatch.setattr(query, "PAGE", 3)
    for n in range(10):
        append_event(journal_services, clock, event(20 + n, object_dn=f"CN=page{n % 2},O=P"))
    f = Filter(dn="CN=page1")
    with journal_services.db.scope() as session:
        every = [row.seq for row in search(session, Filter())]
        ones = [row.seq for row in search(session, f)]
        assert len(ones) == 5
        for limit in (1, 2, 3, 4, 5, 6, 100):
            assert [r.seq for r in query.latest(session, f, limit)] == ones[-limit:], limit
        for limit in (1, 7, len(every), len(every) + 1):
            assert [r.seq for r in query.latest(session, Filter(), limit)] == every[-limit:]


def test_mac_notations_find_the_same_records(journal_services: Services, seeded: Seeded) -> None:
    s = seeded.seqs
    expected = [s["percent"], s["mac-dashes"], s["mac-cisco"]]
    for notation in ("aa:bb:cc:dd:ee:ff", "AA-BB-CC-DD-EE-FF", "aabb.ccdd.eeff", "AABBCCDDEEFF"):
        assert found(journal_services, Filter(mac=notation)) == expected, notation
    assert found(journal_services, Filter(mac="aa:bb:cc:dd:ee:fe")) == []


def test_an_eui64_mac_is_found_in_any_notation(
    journal_services: Services, clock: FakeClock
) -> None:
    """`--mac` takes EUI-64 addresses (its check allows 16 hex digits): stored and searched
    in one notation, as EUI-48 ones are (the search found them only as written)."""
    seq = append_event(journal_services, clock, event(1, device_mac="00-11-22-FF-FE-33-44-55"))
    for notation in ("00:11:22:ff:fe:33:44:55", "0011.22ff.fe33.4455", "001122FFFE334455"):
        assert found(journal_services, Filter(mac=notation)) == [seq], notation


def test_serial_matches_object_or_actor_in_any_notation(
    journal_services: Services, seeded: Seeded
) -> None:
    s = seeded.seqs
    expected = [s["serial-object"], s["serial-actor"]]
    assert found(journal_services, Filter(serial=SERIAL_A)) == expected
    assert found(journal_services, Filter(serial="DEADBEEF01234567")) == expected
    assert found(journal_services, Filter(serial="0xdeadbeef01234567")) == expected
    assert found(journal_services, Filter(serial="de:ad:be:ef:01:23:45:67")) == expected
    assert found(journal_services, Filter(serial="deadbeef0123456")) == []


def test_actor_matches_account_or_certificate_serial(
    journal_services: Services, seeded: Seeded
) -> None:
    s = seeded.seqs
    assert found(journal_services, Filter(actor="robot@tenant2")) == [s["actor-cert"]]
    assert found(journal_services, Filter(actor=SERIAL_ACTOR.upper())) == [s["actor-cert"]]
    assert found(journal_services, Filter(actor="system")) == [s["system"]]


def test_ip_category_and_time_range(journal_services: Services, seeded: Seeded) -> None:
    s = seeded.seqs
    assert found(journal_services, Filter(ip="198.51.100.7")) == [s["underscore"]]
    system = found(journal_services, Filter(category="system"))
    assert s["system"] in system and s["serial-object"] not in system
    backups = found(journal_services, Filter(action="system.backup"))
    assert s["system"] in backups and set(backups) <= set(system)
    with journal_services.db.scope() as session:
        categories = {row.category for row in search(session, Filter(category="auth"))}
    assert categories == {"auth"}

    # Records were written at start + 1 min, + 2 min, ...: [start+3m, start+5m) is two of them.
    since = seeded.start + dt.timedelta(minutes=3)
    until = seeded.start + dt.timedelta(minutes=5)
    assert found(journal_services, Filter(since=since, until=until)) == [
        s["underscore"],
        s["underscore-lookalike"],
    ]
    assert found(journal_services, Filter(since=since, until=until, category="auth")) == []
    assert found(journal_services, Filter(since=seeded.start + dt.timedelta(minutes=11))) == [
        s["backslash"]
    ]
    assert found(journal_services, Filter(), limit=3) == [1, 2, 3]


def test_search_finds_a_record_slipped_in_below_seq_1(
    journal_services: Services, clock: FakeClock
) -> None:
    seq = append_event(journal_services, clock, event(13, actor_account="mallory@tenant"))
    sql(journal_services, "UPDATE audit_records SET seq = -3 WHERE seq = :s", {"s": seq})
    assert found(journal_services, Filter(actor="mallory@tenant")) == [-3]
    assert found(journal_services, Filter(), limit=2) == [-3, 1]


def cli_seqs(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> list[int]:
    code, out, err = run_cli(capsys, data_dir, "--json", "audit", "search", *args)
    assert code == 0, err
    return [json.loads(line)["seq"] for line in out.splitlines()]


def test_cli_search_filters(
    journal_services: Services,
    seeded: Seeded,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = seeded.seqs
    mac_records = [s["percent"], s["mac-dashes"], s["mac-cisco"]]
    for notation in ("aa:bb:cc:dd:ee:ff", "AA-BB-CC-DD-EE-FF", "aabb.ccdd.eeff"):
        assert cli_seqs(capsys, cli_data_dir, "--mac", notation) == mac_records
    assert cli_seqs(capsys, cli_data_dir, "--dn", "100%_sure") == [s["percent"]]
    assert cli_seqs(capsys, cli_data_dir, "--dn", "a_b") == [s["underscore"]]
    assert cli_seqs(capsys, cli_data_dir, "--serial", "DEADBEEF01234567") == [
        s["serial-object"],
        s["serial-actor"],
    ]
    # Leading zeros, as `cert show` takes them (and an openssl dump may print): the same serial.
    for spelling in ("00DEADBEEF01234567", "0x00" + "0" * 40 + "deadbeef01234567"):
        assert cli_seqs(capsys, cli_data_dir, "--serial", spelling) == [
            s["serial-object"],
            s["serial-actor"],
        ]
    assert cli_seqs(capsys, cli_data_dir, "--actor", "robot@tenant2") == [s["actor-cert"]]
    assert cli_seqs(capsys, cli_data_dir, "--ip", "198.51.100.70") == [s["underscore-lookalike"]]
    # A value that is no address could match nothing: a usage error, not "no records".
    bad = [("--ip", "999.1.1.1"), ("--ip", "host.example"), ("--mac", "zz"),
           ("--mac", "aa:bb:cc:dd:ee"), ("--mac", "aa:bb:cc:dd:ee:ff:00"),
           ("--serial", "zz"), ("--serial", "f" * 41), ("--serial", "0"),
           ("--serial", "0x00:00"), ("--serial", "1 2"), ("--serial", "0" * 40)]  # fmt: skip
    for option, value in bad:
        code, out, err = run_cli(capsys, cli_data_dir, "audit", "search", option, value)
        assert code == 64 and out == "" and repr(value) in err, (option, value, err)
    assert cli_seqs(capsys, cli_data_dir, "--mac", "00:11:22:ff:fe:33:44:55") == []  # EUI-64
    assert cli_seqs(capsys, cli_data_dir, "--category", "system", "--actor", "system") == [
        s["system"]
    ]
    since = (seeded.start + dt.timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    until = (seeded.start + dt.timedelta(minutes=5)).isoformat()
    assert cli_seqs(capsys, cli_data_dir, "--since", since, "--until", until) == [
        s["underscore"],
        s["underscore-lookalike"],
    ]
    # The newest matches by default (what an auditor looks at first), the first with --oldest.
    assert cli_seqs(capsys, cli_data_dir, "--limit", "2") == [s["system"], s["backslash"]]
    assert cli_seqs(capsys, cli_data_dir, "--limit", "2", "--oldest") == [1, 2]

    doc = json.loads(run_cli(capsys, cli_data_dir, "--json", "audit", "search", "--dn", "a_b")[1])
    assert doc["object_dn"] == "CN=a_b,O=Lit" and doc["client_ip"] == "198.51.100.7"
    assert doc["detail"] == {"n": 3, "note": "event 3"}

    code, out, _err = run_cli(capsys, cli_data_dir, "audit", "search", "--dn", "a_b")
    assert code == 0
    assert out.count("\n") == 1 and 'dn="CN=a_b,O=Lit"' in out and "ip=198.51.100.7" in out
    code, _out, _err = run_cli(capsys, cli_data_dir, "audit", "search", "--since", "yesterday")
    assert code == 64


@pytest.mark.parametrize(
    "option", [("--since", "0001-01-01T00:00+01:00"), ("--until", "9999-12-31T23:59-01:00")]
)
def test_cli_time_beyond_the_calendar_in_utc_is_a_usage_error(
    cli_data_dir: Path, capsys: pytest.CaptureFixture[str], option: tuple[str, str]
) -> None:
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "search", *option)
    assert code == 64
    assert f"{option[1]} is out of range in UTC" in err and out == ""


def test_cli_search_text_quotes_values_that_could_pose_as_fields(
    journal_services: Services,
    clock: FakeClock,
    cli_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dn = "CN=x serial=deadbeef ip=10.0.0.1"
    ev = event(12, object_dn=dn, actor_account='eve" dn=CN=admin', device_id="d\\ev")
    seq = append_event(journal_services, clock, ev)
    code, out, err = run_cli(capsys, cli_data_dir, "audit", "search", "--dn", dn)
    assert code == 0, err
    assert out.count("\n") == 1 and 'dn="CN=x serial=deadbeef ip=10.0.0.1"' in out
    words = shlex.split(out)
    assert int(words[0]) == seq
    fields = dict(word.split("=", 1) for word in words[5:])
    assert fields["dn"] == dn
    assert fields["actor"] == 'eve" dn=CN=admin'
    assert "device=d\\\\ev" in out and fields["device"] == "d\\ev"  # doubled, as in exports
    assert fields["serial"] == ev.object_serial and fields["ip"] == ev.client_ip


def test_an_address_is_found_whatever_its_spelling(
    journal_services: Services, clock: FakeClock
) -> None:
    """Addresses are recorded in RFC 5952 form (as sockets give them); any spelling of the
    same address finds them. Before: only the exact recorded string did."""
    seq = append_event(journal_services, clock, event(11, client_ip="2001:db8::1"))
    for spelling in ("2001:db8::1", "2001:DB8:0::1", " 2001:0db8:0000:0000:0000:0000:0000:0001"):
        assert found(journal_services, Filter(ip=spelling)) == [seq], spelling
    assert found(journal_services, Filter(ip="2001:db8::2")) == []
    assert found(journal_services, Filter(ip="not an address")) == []
