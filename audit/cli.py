"""``sekisho audit``: verify, search, export, checkpoint."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from sqlalchemy.exc import SQLAlchemyError

from audit import retention
from audit.chain import format_time
from audit.journal import CheckpointSigner, checkpoint_document
from audit.models import Checkpoint, JournalRecord, PurgedRecord
from audit.query import (
    Filter,
    _serial,
    as_document,
    latest,
    render_line,
    search,
    with_tombstones,
    write_csv,
    write_jsonl,
)
from audit.query import tombstones as query_tombstones
from audit.verify import TailLimit, VerifyResult, claims_from_documents, verify
from ca.tbs import parse_serial
from sekisho.db import Database, undecodable_argument, undecodable_text
from sekisho.errors import (
    AuditError,
    ConfigError,
    InputError,
    KeyBackendError,
    NotFound,
    SekishoError,
    shown,
)
from sekisho.files import InputFile, NewFiles, read_input
from sekisho.services import has_root_ca

if TYPE_CHECKING:
    from sekisho.cli import State

# The root group (``sekisho.cli``) puts its State in the context object. This module does not
# import that one: ``sekisho.cli`` imports this one to register the group.
pass_state = click.pass_obj

_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
T = TypeVar("T")
MAX_CHECKPOINTS_FILE = 512 * 1024 * 1024  # ~500,000 checkpoints


def _write_file(path: Path, write: Callable[[IO[str]], T]) -> T:
    """A new file (never an existing one, never through a symlink; mode 0600), removed again
    if writing fails: the rule of every file the command line writes (``sekisho.files``)."""
    with NewFiles([path]) as files, files.open_text(path) as fh:
        return write(fh)


def _lazy(read: Callable[..., Iterable[T]], *args: Any) -> Iterator[T]:
    """``read(*args)`` run on the first ``next``, so that a row it cannot read is reported
    by ``_readable``."""
    yield from read(*args)


def _readable(rows: Iterable[T], what: str = "record") -> Iterator[T]:
    """Rows as they come; a stored value the journal would never have written (a tampered
    row; on SQLite, text that is not UTF-8 too, read in ``undecodable_text(keep=False)``)
    stops the listing with a clear error, not a traceback."""
    iterator = iter(rows)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except (ValueError, TypeError, OverflowError) as exc:
            raise _unreadable(what, type(exc).__name__) from None
        except SQLAlchemyError as exc:
            if not undecodable_argument(exc):
                raise
            raise _unreadable(what, "UnicodeDecodeError") from None  # met by the DN filter
        yield row


def _unreadable(what: str, why: str) -> AuditError:
    return AuditError(
        f"the journal holds a {what} that cannot be read ({why}): run `sekisho audit verify`"
    )


def _when(_ctx: click.Context, _param: click.Parameter, value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return parsed.astimezone(dt.UTC)
    except ValueError:
        raise click.BadParameter("use ISO 8601, e.g. 2026-11-01 or 2026-11-01T09:00Z") from None
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00: before year 1 in UTC
        raise click.BadParameter(f"{value} is out of range in UTC") from None


def _ip_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """An address, in any spelling (the search canonicalises it): anything else could match
    no record, and an auditor would read "nothing from there" into a typo."""
    if value is None:
        return None
    try:
        ipaddress.ip_address(value.strip())
    except ValueError:
        raise click.BadParameter(f"{shown(value)} is not an IPv4 or IPv6 address") from None
    return value


def _serial_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A certificate serial in hex (any case, ':', 0x, leading zeros): anything else matched
    no record, and "no records" was read into a typo, as for --ip and --mac."""
    if value is None:
        return None
    try:
        parse_serial(value)  # as `_serial` and `cert show` read it
    except InputError:
        raise click.BadParameter(
            f"{shown(value)} is not a certificate serial (a positive number of up to 40 hex digits)"
        ) from None
    return value


def _mac_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    if not _MAC.fullmatch(value.strip()):
        raise click.BadParameter(
            f"{shown(value)} is not a MAC address (EUI-48 or EUI-64: 12 or 16 hex digits, "
            "any of : - . as separators)"
        )
    return value


# 12 (EUI-48) or 16 (EUI-64) hex digits, with the separators normalise_mac takes away.
_MAC = re.compile(r"(?:[0-9A-Fa-f][:.\- ]?){11}[0-9A-Fa-f](?:(?:[:.\- ]?[0-9A-Fa-f]){4})?")


def _filter_options(fn: Any) -> Any:
    options = [
        click.option("--since", callback=_when, help="From this time (UTC, inclusive)."),
        click.option("--until", callback=_when, help="Up to this time (UTC, exclusive)."),
        click.option(
            "--category", type=click.Choice(["ca", "system", "auth"]), help="Event category."
        ),
        click.option("--action", help="Action, e.g. ca.issue, ca.revoke."),
        click.option("--outcome", type=click.Choice(["success", "failure", "denied"])),
        click.option("--actor", help="Actor account or actor certificate serial."),
        click.option(
            "--serial",
            callback=_serial_option,
            help="Certificate serial (object or actor), hex.",
        ),
        click.option(
            "--dn",
            help="Substring of the certificate subject DN (any case; a value as the "
            "certificate has it, 'Smith, John', or in RFC 4514 form, 'Smith\\, John').",
        ),
        click.option("--ip", callback=_ip_option, help="Client IP address (any spelling)."),
        click.option(
            "--mac", callback=_mac_option, help="Device MAC address (any common notation)."
        ),
        click.option("--device", help="Device ID."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _filter(kwargs: dict[str, Any]) -> Filter:
    return Filter(**{k: v for k, v in kwargs.items() if k in Filter.__dataclass_fields__})


@click.group()
def audit() -> None:
    """The tamper-evident audit journal."""


@audit.command("verify")
@click.option(
    "--checkpoints",
    "checkpoint_files",
    multiple=True,
    type=InputFile(),
    help="Checkpoints exported earlier (JSONL); detects truncation and rewrites behind them.",
)
@click.option(
    "--public-key",
    "public_key_files",
    multiple=True,
    type=InputFile(),
    help="Audit public key (PEM, from `audit public-key`) that checkpoints must be signed "
    "with, instead of the deployment's audit key.",
)
@click.option(
    "--as-of",
    "as_of",
    callback=_when,
    help="Judge the unsigned tail as of this time (UTC) instead of now: when the copy of the "
    "store being verified was taken.",
)
@pass_state
def verify_cmd(
    state: State,
    checkpoint_files: tuple[Path, ...],
    public_key_files: tuple[Path, ...],
    as_of: dt.datetime | None,
) -> None:
    """Check the hash chain, the head and every signed checkpoint, and how long the records
    after the newest checkpoint have waited unsigned.

    Checkpoint signatures are checked with the deployment's audit key, or with --public-key;
    with neither (the key is unavailable) nothing is verified and the exit code is 69.
    Exits 0 when intact; exits 2 and names the first bad sequence number otherwise, or the
    first unsigned one when records have waited unsigned for longer than the checkpoint
    interval (audit_checkpoint_minutes) plus an hour: the journal stopped signing.
    """
    services = state.read_services()
    trusted = _trusted_keys(services.journal.signer, public_key_files)
    external = []
    for path in checkpoint_files:
        try:
            text = read_input(path, "checkpoints file", MAX_CHECKPOINTS_FILE).decode("utf-8")
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            external.extend(claims_from_documents(lines, path.name))
        except ValueError as exc:
            raise InputError(f"{path}: {exc}") from None
        except RecursionError:  # json's parser recurses once per [ or {
            raise InputError(f"{path}: a line is nested too deeply to be a checkpoint") from None
    initialised = services.journal.signer is not None or has_root_ca(services.db)
    # One snapshot for every query: what is appended meanwhile is not taken for tampering.
    with services.db.read_scope(snapshot=True) as session:
        result = verify(
            session,
            services.journal.origin,
            trusted_keys=trusted,
            external=external,
            initialised=initialised,
            tail_limit=TailLimit(as_of or services.clock(), services.journal.interval),
        )
    doc = {"ok": True, **result.as_dict()}
    state.emit(
        doc,
        lambda: (
            f"journal intact: {result.records} records, head {result.head_hash[:16]}..., "
            f"{result.checkpoints} signed checkpoints verified; {_tail_text(result)}"
            + _key_text(result)
        ),
    )


def _key_text(result: VerifyResult) -> str:
    """The key that verified, for a cron job to compare with the one kept off the box."""
    if result.checkpoint_key_sha256 is None:
        return ""
    return f"\ncheckpoint key SHA-256 {result.checkpoint_key_sha256}"


def _tail_text(result: VerifyResult) -> str:
    if result.unsigned_since is None:
        return "every record signed"
    return (
        f"{result.unsigned_records} records after the newest checkpoint unsigned since "
        f"{format_time(result.unsigned_since)}"
    )


def _trusted_keys(signer: CheckpointSigner | None, files: tuple[Path, ...]) -> set[bytes]:
    """The keys checkpoints must be signed with: the auditor's, else the deployment's. Never
    the key stored beside a checkpoint, which whoever rewrote the journal could replace."""
    if not files:
        if signer is None:
            raise KeyBackendError(
                "the audit key is unavailable, so checkpoint signatures cannot be checked: "
                "give the audit public key with --public-key FILE (PEM, `audit public-key`)"
            )
        return {signer.public_key_der}
    return load_public_keys(files)


def load_public_keys(files: Iterable[Path]) -> set[bytes]:
    """The public keys (PEM files, e.g. from `audit public-key`) as DER SubjectPublicKeyInfo."""
    keys = set()
    for path in files:
        data = read_input(path, "public key", 64 * 1024)
        blocks = data.count(b"-----BEGIN ")
        if blocks > 1:
            # Only the first would be read: with another key first, the journal or a backup
            # was reported tampered with (exit 2), a false alarm.
            raise InputError(
                f"{path}: holds {blocks} PEM blocks; give one key per --public-key (repeat it)"
            )
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            raise InputError(f"{path}: not a PEM public key") from None
        keys.add(key.public_bytes(serialization.Encoding.DER, _SPKI))
    return keys


@audit.command("public-key")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path))
@pass_state
def public_key_cmd(state: State, output: Path | None) -> None:
    """Write the audit key's public key (PEM), for `audit verify --public-key` off the box."""
    signer = state.read_services().journal.signer
    if signer is None:
        raise KeyBackendError("the audit key is unavailable")
    key = serialization.load_der_public_key(signer.public_key_der)
    pem = key.public_bytes(serialization.Encoding.PEM, _SPKI).decode("ascii")
    if output is None:
        state.emit({"public_key_pem": pem}, pem.rstrip("\n"))
    else:
        _write_file(output, lambda fh: fh.write(pem))
        state.emit({"public_key_file": str(output)}, f"wrote {output}")


@audit.command("search")
@_filter_options
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=100, show_default=True)
@click.option("--oldest", is_flag=True, help="The first --limit matches instead of the last.")
@pass_state
def search_cmd(state: State, /, limit: int, oldest: bool, **kwargs: Any) -> None:
    """Find journal records: the newest --limit matches (or with --oldest the first ones),
    in sequence order."""
    services = state.read_services()
    with services.db.read_scope() as session, undecodable_text(session, keep=False):
        f = _filter(kwargs)
        rows = search(session, f, limit=limit) if oldest else _lazy(latest, session, f, limit)
        for row in _readable(rows):
            if state.as_json:
                click.echo(json.dumps(as_document(row), sort_keys=True, ensure_ascii=True))
            else:
                click.echo(render_line(row))


@audit.command("export")
@_filter_options
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write (default stdout).",
)
@click.option(
    "--tombstones",
    is_flag=True,
    help="JSONL of the whole journal only: a line for each purged record in its place (seq, "
    '"purged": true, time, action, object_serial, leaf_hash, hash, purge_seq), so that the '
    "export verifies after a purge (tools/verify_journal.py).",
)
@pass_state
def export_cmd(
    state: State, /, fmt: str, output: Path | None, tombstones: bool, **kwargs: Any
) -> None:
    """Export matching records as JSONL or CSV (control characters escaped)."""
    _json_needs_output(state, output)
    if tombstones and (fmt != "jsonl" or any(value is not None for value in kwargs.values())):
        raise click.UsageError("--tombstones goes with a JSONL export of the whole journal")
    services = state.read_services()
    with services.db.read_scope() as session, undecodable_text(session, keep=False):
        rows: Iterator[Any] = _readable(search(session, _filter(kwargs)))
        if tombstones:
            rows = _readable(with_tombstones(rows, _readable(query_tombstones(session))))

        def export(fh: IO[str]) -> int:
            count = write_csv(rows, fh) if fmt == "csv" else write_jsonl(rows, fh)
            services.db.check_unchanged()  # before the file is kept: torn reads go with it
            return count

        count = export(sys.stdout) if output is None else _write_file(output, export)
    _exported(state, {"file": str(output), "format": fmt, "records": count}, count, "records")


def _json_needs_output(state: State, output: Path | None) -> None:
    """An export's records are its output: on stdout they are the export itself (JSONL or
    CSV), so ``--json``, whose document describes what was written, needs ``--output``."""
    if state.as_json and output is None:
        raise click.UsageError(
            "with --json, give --output: the document describes the file written (without "
            "--json the export goes to stdout)"
        )


def _exported(state: State, doc: dict[str, Any], count: int, what: str) -> None:
    """The summary of an export: with --json the document on stdout, else a line on stderr
    (stdout may be carrying the export itself)."""
    if state.as_json:
        state.emit(doc, "")
    else:
        click.echo(f"exported {count} {what}", err=True)


@audit.command("checkpoint")
@pass_state
def checkpoint_cmd(state: State) -> None:
    """Sign the current head now."""
    services = state.services()
    with services.db.scope() as session:
        row = services.journal.checkpoint(session, services.clock())
        doc = checkpoint_document(row) if row is not None else None
    state.emit(
        {"checkpoint": doc},
        lambda: f"checkpoint at seq {doc['seq']}" if doc else "head already checkpointed",
    )


@audit.command("purge")
@click.option("--dry-run", is_flag=True, help="Count what would leave and why the rest stays.")
@pass_state
def purge_cmd(state: State, dry_run: bool) -> None:
    """Remove the records whose retention has ended (BR 5.4.3; audit_retention_days, two years
    at least).

    A record stays while it is younger than the retention period; while a certificate it
    names has not expired or expired less than that ago; while the CA of a CA key lifecycle
    record does. Only records a checkpoint signed by the retention limit covers leave. Each
    leaves a tombstone (seq, time, action, certificate serial, leaf and chain hash), so `audit
    verify` still checks the chain, every checkpoint and every proof; each batch is recorded
    as an audit.purge record naming the seqs it removed, and a checkpoint is signed at the
    end. The journal is verified first: a journal that does not verify is not purged (exit 2).

    With two PostgreSQL roles the records are removed through database_owner_url: the
    application's role may not delete them.
    """
    services = state.services()
    settings = services.settings
    trusted = _trusted_keys(services.journal.signer, ())
    with services.db.read_scope(snapshot=True) as session:
        verify(session, services.journal.origin, trusted_keys=trusted, initialised=True)
    db = services.db
    if settings.database_owner_url and not dry_run:
        db = Database(settings.database_owner_url)
    elif not dry_run and db.engine.dialect.name == "postgresql" and db.journal_owned_by_another():
        raise ConfigError(
            "the journal belongs to another role (two roles): set database_owner_url to the "
            "schema owner's connection to purge; the application's role may not delete records"
        )
    try:
        result = retention.purge(
            db,
            services.journal,
            services.clock(),
            settings.audit_retention_days,
            state.actor(),
            dry_run=dry_run,
        )
    finally:
        if db is not services.db:
            db.engine.dispose()
    doc = {"dry_run": dry_run, "retention_days": settings.audit_retention_days, **result.as_dict()}

    def text() -> str:
        verb = "would purge" if dry_run else "purged"
        lines = [
            f"{verb} {result.purged} of {result.examined} records older than "
            f"{format_time(result.limit)} (signed through seq {result.through}); kept "
            f"{result.kept}"
        ]
        lines += [f"  kept: {rule}: {n}" for rule, n in sorted(result.reasons.items())]
        if result.first_kept is not None:
            lines.append(f"  first kept: seq {result.first_kept[0]}: {result.first_kept[1]}")
        if result.checkpoint is not None:
            lines.append(f"  checkpoint signed at seq {result.checkpoint}")
        return "\n".join(lines)

    state.emit(doc, text)


CHECKPOINT_BATCH = 500  # checkpoint rows read at a time by `audit checkpoints export`


@audit.group("checkpoints")
def checkpoints() -> None:
    """Signed checkpoints (export them off the box)."""


@checkpoints.command("export")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--after", type=click.IntRange(0, 2**63 - 1), default=0, help="Only checkpoints after this seq."
)
@pass_state
def checkpoints_export(state: State, output: Path | None, after: int) -> None:
    """Write signed checkpoints as JSONL (each verifiable with its public key)."""
    from sqlalchemy import select

    _json_needs_output(state, output)
    services = state.read_services()
    with services.db.read_scope() as session, undecodable_text(session, keep=False):
        # Streamed, as `audit export` is: a journal's checkpoints run to hundreds of
        # thousands, and holding them all (documents and their JSON) took 750 MB at 200,000.
        stmt = (
            select(Checkpoint)
            .where(Checkpoint.seq > after)
            .order_by(Checkpoint.seq)
            .execution_options(yield_per=CHECKPOINT_BATCH)
        )
        stored = _readable(_lazy(session.scalars, stmt), "checkpoint")

        def export(fh: IO[str]) -> int:
            count = 0
            for row in stored:
                fh.write(json.dumps(checkpoint_document(row), sort_keys=True) + "\n")
                count += 1
            services.db.check_unchanged()  # before the file is kept: torn reads go with it
            return count

        count = export(sys.stdout) if output is None else _write_file(output, export)
    _exported(state, {"file": str(output), "checkpoints": count}, count, "checkpoints")


@audit.group("prove")
def prove() -> None:
    """Proofs against signed checkpoints (RFC 6962 Merkle tree), as JSON documents a third
    party checks with the audit public key (tools/verify_journal.py proof FILE)."""


_SEQ = click.IntRange(1, 2**63 - 1)


def _emit_document(state: State, doc: dict[str, Any]) -> None:
    """The proof document on stdout: compact with --json, indented without."""
    state.emit(doc, lambda: json.dumps(doc, indent=2, sort_keys=True))


@prove.command("inclusion")
@click.option("--seq", type=_SEQ, help="The record at this sequence number.")
@click.option(
    "--serial",
    callback=_serial_option,
    help="Every record whose object is this certificate serial (hex, any case, ':').",
)
@click.option(
    "--checkpoint",
    "checkpoint_seq",
    type=_SEQ,
    help="Prove against the checkpoint at this seq (default: the newest).",
)
@pass_state
def prove_inclusion(
    state: State, seq: int | None, serial: str | None, checkpoint_seq: int | None
) -> None:
    """Print the inclusion proof (leaf index, tree size, audit path) of a record, or of every
    record about a certificate, in the tree a signed checkpoint signs, with that checkpoint.

    Exits 66 when there is no such record or checkpoint (or the record is after it), 2 when
    the stored records do not give the root the checkpoint signs."""
    from audit.prove import inclusion, serial_seqs

    if (seq is None) == (serial is None):
        raise click.UsageError("give exactly one of --seq and --serial")
    services = state.read_services()
    with services.db.read_scope(snapshot=True) as session, undecodable_text(session, keep=False):
        if serial is not None:
            seqs = serial_seqs(session, _serial(serial))
            if not seqs:
                raise NotFound(f"no record names certificate serial {_serial(serial)}")
        else:
            assert seq is not None
            seqs = [seq]
            if session.get(JournalRecord, seq) is None:
                if session.get(PurgedRecord, seq) is not None:
                    raise NotFound(f"record {seq} was purged once its retention ended")
                raise NotFound(f"no record at seq {seq}")
        doc = _proof(lambda: inclusion(session, services.journal.origin, seqs, checkpoint_seq))
    _emit_document(state, doc)


@prove.command("consistency")
@click.option("--from", "first", type=_SEQ, required=True, help="The older checkpoint's seq.")
@click.option("--to", "second", type=_SEQ, required=True, help="The newer checkpoint's seq.")
@pass_state
def prove_consistency(state: State, first: int, second: int) -> None:
    """Print the consistency proof between two signed checkpoints: the tree the older one
    signs is a prefix of the newer one's (the journal only grew in between).

    Exits 66 when either checkpoint is missing or signs no root, 2 when the stored records do
    not give the roots they sign."""
    from audit.prove import consistency

    if first > second:
        raise click.UsageError("--from must not be after --to")
    services = state.read_services()
    with services.db.read_scope(snapshot=True) as session, undecodable_text(session, keep=False):
        doc = _proof(lambda: consistency(session, services.journal.origin, first, second))
    _emit_document(state, doc)


def _proof(build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``build()``, a stored value the journal never wrote reported as such."""
    return next(_readable(_lazy(lambda: [build()]), "record"))


__all__ = ["SekishoError", "audit"]
