"""The ``sekisho`` command line.

Exit codes come from the error classes (``sekisho/errors.py``); usage errors exit 64
(EX_USAGE). ``--json`` makes every command print machine-readable output on stdout.
Secrets (passwords, passphrases) are read from files or named environment variables, never
from argv.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import json
import logging
import os
import pwd
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from sqlalchemy import select

from audit.cli import audit as audit_group
from ca.csr import MAX_CSR_BYTES, public_key_of
from ca.hierarchy import NameConstraintSpec
from ca.issuance import IssueRequest
from ca.models import BlockedKey, Certificate, CertificateAuthority, CertStatus, Crl
from ca.revocation import Reason
from ca.tbs import SanEntry, parse_serial, parse_subject, spki_sha256
from hsm.base import CA_KEY_TYPES, KeyType
from hsm.secrets import read_secret
from sekisho import __version__
from sekisho.context import Actor
from sekisho.errors import (
    PATH_SHOWN,
    ConfigError,
    Conflict,
    Discrepancies,
    InputError,
    KeyBackendError,
    NotFound,
    OutputError,
    SchemaNotCurrent,
    SekishoError,
    shown,
    tamed,
)
from sekisho.files import InputFile, NewFiles, read_input
from sekisho.logs import setup_logging
from sekisho.services import (
    Services,
    build_services,
    ensure_data_dir,
    open_backend,
    open_deployment,
)
from sekisho.settings import CONFIG_NAME, Settings, config_path, load_settings, note_env_read

if TYPE_CHECKING:
    from hsm.pkcs11 import Pkcs11Backend
    from sekisho.bootstrap import Initialised

EX_USAGE = 64
PROGRESS_SECONDS = 5.0  # how often a long command says how far it is (stderr)
EX_SOFTWARE = 70  # sysexits: an internal error
EX_IOERR = 74  # sysexits: an I/O error (here also: the output closed before all was written)


class State:
    """Lazily built settings and services, shared by the commands of one invocation."""

    def __init__(self, overrides: dict[str, Any], config: Path | None, as_json: bool) -> None:
        self.overrides = overrides
        self.config = config
        self.as_json = as_json
        self._settings: Settings | None = None
        self._services: Services | None = None
        self._writes = False  # opened by services(): the journal may have grown

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config, overrides=self.overrides)
        return self._settings

    def services(self, *, create: bool = False) -> Services:
        """For a command that writes, on an existing deployment (a missing or uninitialised
        data directory is a ConfigError naming it); only ``init`` and ``run`` pass ``create``,
        which makes the data directory and the database."""
        if self._services is None:
            self._writes = True
            ensure_data_dir(self.settings, create=create)
            if create:
                self._services = build_services(self.settings)
            else:
                self._services = open_deployment(self.settings)
        return self._services

    def read_services(self) -> Services:
        """For a command that only reads: works on a data directory this user cannot write
        (an auditor's read-only copy), and writes nothing (``open_deployment``)."""
        if self._services is None:
            self._services = open_deployment(self.settings, read_only=True)
            if self._services.db.immutable:
                click.echo(
                    "note: the database is read as an immutable file (a read-only directory "
                    "without its -shm file): if a process writes it meanwhile, the command "
                    "fails (exit 74)",
                    err=True,
                )
        return self._services

    def actor(self) -> Actor:
        return Actor(account=cli_account())

    def emit(self, doc: Any, text: str | Callable[[], str]) -> None:
        if self.as_json:
            click.echo(json.dumps(doc, indent=None, default=str))
        else:
            click.echo(text() if callable(text) else text)

    def close(self) -> None:
        """Ends the command: a command that may have written signs a checkpoint over what the
        journal holds unsigned (its own records, at least), so that a deployment run from the
        command line alone leaves no tail that could be rewritten unnoticed until the next
        append (and `audit verify` reports a tail left unsigned for long)."""
        if self._services is not None:
            if self._writes:
                from sekisho.workers import AuditCheckpointer

                AuditCheckpointer(self._services).seal(self._services.clock())
            self._services.close()


pass_state = click.make_pass_decorator(State)


def cli_account(uid: int | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Who runs this command, for the journal: the account of the process's real user ID,
    never ``$USER`` (anyone sets it: ``USER=the-auditor sekisho ...`` was journalled as the
    auditor, and cron or systemd, which set none, as "unknown"). Under sudo, root's account
    with the invoking user sudo names (only root can forge that, and root can do anything)."""
    uid = os.getuid() if uid is None else uid
    environ = os.environ if environ is None else environ
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:  # a user ID with no passwd entry (a container's arbitrary UID)
        name = f"uid {uid}"
    account = f"cli:{name}"
    invoker = environ.get("SUDO_USER")
    if uid == 0 and invoker:
        account += f" sudo:{invoker}"
    return account


def _data_dir(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Path | None:
    if value is not None and not value.strip():
        # An empty value would mean the current directory: chmod 0700, keys, a database.
        raise click.BadParameter("empty (write . for the current directory)")
    return Path(value) if value is not None else None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sekisho")
@click.option(
    "--data-dir",
    callback=_data_dir,
    envvar="SEKISHO_DATA_DIR",
    help="Data directory (default ./var).",
)
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Settings file (default <data-dir>/sekisho.toml).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR, CRITICAL.")
@click.pass_context
def cli(
    ctx: click.Context,
    data_dir: Path | None,
    config: Path | None,
    as_json: bool,
    log_level: str | None,
) -> None:
    """Sekisho: private PKI, certificate lifecycle and mTLS access gateway."""
    overrides: dict[str, Any] = {"data_dir": data_dir, "log_level": log_level}
    state = State(overrides, config, as_json)
    ctx.obj = state
    ctx.call_on_close(state.close)
    setup_logging(log_level or os.environ.get("SEKISHO_LOG_LEVEL", "WARNING"))


# -- init -------------------------------------------------------------------------------------
def _key_type(_ctx: click.Context, _param: click.Parameter, value: str | None) -> KeyType | None:
    if value is None:
        return None
    try:
        return KeyType(value)
    except ValueError:
        raise click.BadParameter(f"one of {', '.join(k.value for k in KeyType)}") from None


KEY_TYPE_HELP = "Key type: " + ", ".join(k.value for k in CA_KEY_TYPES)


def name_constraint_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The name constraints (RFC 5280 4.2.1.10) of the issuing CAs a command creates."""
    for option in reversed(
        [
            click.option("--permit-dns", multiple=True, metavar="DOMAIN",
                         help="Name constraint on issuing CAs: DNS names under DOMAIN only."),
            click.option("--permit-email", multiple=True, metavar="ADDR|HOST|.DOMAIN",
                         help="Name constraint on issuing CAs: these mailboxes only."),
            click.option("--exclude-dns", multiple=True, metavar="DOMAIN",
                         help="Name constraint on issuing CAs: no DNS name under DOMAIN."),
            click.option("--permit-ip", multiple=True, metavar="CIDR",
                         help="Name constraint on issuing CAs: IP addresses in CIDR only."),
            click.option("--exclude-ip", multiple=True, metavar="CIDR",
                         help="Name constraint on issuing CAs: no IP address in CIDR."),
        ]
    ):  # fmt: skip
        command = option(command)
    return command


@cli.command()
@click.option("--org", default="Sekisho", show_default=True, help="Organisation name in CA DNs.")
@click.option("--key-type", default="ec-p256", callback=_key_type, help=KEY_TYPE_HELP)
@click.option("--issuing", multiple=True, help="Issuing CA names (default: admin, device).")
@name_constraint_options
@click.option(
    "--key-backend",
    type=click.Choice(["software", "pkcs11"]),
    help="Where the CA keys live (recorded in <data-dir>/sekisho.toml; default software).",
)
@click.option("--pkcs11-module", help="PKCS#11 library path (pkcs11 backend).")
@click.option("--pkcs11-token", help="Token label (pkcs11 backend).")
@click.option(
    "--pkcs11-pin-file",
    type=InputFile(),
    help="File (mode 0600) holding the user PIN; or set pkcs11_pin_env in the settings.",
)
@click.option("--pkcs11-label-prefix", help="Prefix of the token objects created (sekisho-).")
@click.option(
    "--adopt-key",
    "adopt",
    multiple=True,
    metavar="CA=URI",
    help="Use an existing token key (RFC 7512 pkcs11: URI) for that CA instead of a new one.",
)
@pass_state
def init(
    state: State,
    org: str,
    key_type: KeyType,
    issuing: tuple[str, ...],
    permit_dns: tuple[str, ...],
    permit_email: tuple[str, ...],
    exclude_dns: tuple[str, ...],
    permit_ip: tuple[str, ...],
    exclude_ip: tuple[str, ...],
    key_backend: str | None,
    pkcs11_module: str | None,
    pkcs11_token: str | None,
    pkcs11_pin_file: Path | None,
    pkcs11_label_prefix: str | None,
    adopt: tuple[str, ...],
) -> None:
    """Create the data directory, the root CA, the issuing CAs and their first CRLs.

    With --key-backend pkcs11 every key (CAs, OCSP responders, audit checkpoints) is generated
    on the token; the backend settings (never the PIN) are written to <data-dir>/sekisho.toml
    so that later commands use them."""
    from sekisho.bootstrap import DEFAULT_ISSUING, InitPlan, initialise
    from sekisho.settings import persist_settings

    backend_settings = {
        key: value
        for key, value in (
            ("key_backend", key_backend),
            ("pkcs11_module", pkcs11_module),
            ("pkcs11_token", pkcs11_token),
            ("pkcs11_pin_file", str(pkcs11_pin_file.resolve()) if pkcs11_pin_file else None),
            ("pkcs11_label_prefix", pkcs11_label_prefix),
        )
        if value is not None
    }
    adopted: dict[str, str] = {}
    for item in adopt:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise InputError(f"--adopt-key wants CA=URI, not {shown(item)}")
        adopted[name] = uri
    # Checked before the data directory is touched.
    constraints = NameConstraintSpec(
        permit_dns, permit_email, exclude_dns, permitted_ip=permit_ip, excluded_ip=exclude_ip
    )
    plan = InitPlan(
        organization=org,
        key_type=key_type,
        issuing=issuing or DEFAULT_ISSUING,
        constraints=constraints,
        adopt=adopted,
    )
    plan.check()  # names, subjects, two issuing CAs: nothing created when refused
    state.overrides.update(backend_settings)
    settings = state.settings  # validated with the new options
    services = state.services(create=True)
    done = initialise(services, plan, state.actor())
    if backend_settings:
        # Only once the deployment exists: a refused init leaves the settings file alone.
        persist_settings(state.config or settings.data_dir / CONFIG_NAME, backend_settings)
    _print_init(state, services, done)


def _print_init(state: State, services: Services, done: Initialised) -> None:
    settings = services.settings
    public = (settings.data_dir / "public").resolve()
    names = [c.name for c in done.cas]
    doc = {
        "data_dir": str(settings.data_dir.resolve()),
        "cas": names,
        "resumed": done.resumed,
        "certificates": {n: str(public / f"{n}.crt") for n in names},
        "crl_urls": {n: services.registry.urls.crl(n) for n in names},
    }

    def text() -> str:
        what = "Finished the interrupted initialisation of" if done.resumed else "Initialised"
        lines = [f"{what} Sekisho in {doc['data_dir']}", "CA certificates:"]
        lines += [f"  {n:<8} {public / f'{n}.crt'}" for n in names]
        lines.append("CRLs:")
        lines += [f"  {n:<8} {services.registry.urls.crl(n)}" for n in names]
        return "\n".join(lines)

    state.emit(doc, text)


# -- ca ---------------------------------------------------------------------------------------
@cli.group()
def ca() -> None:
    """Certificate authorities: list, show, export, offline root, new issuing CAs."""


def _ca_doc(row: CertificateAuthority, revoked: Certificate | None = None) -> dict[str, Any]:
    """A CA; ``revoked``: its own certificate as its parent records it when revoked or on hold
    (``ca.registry.ca_revocation``), when the CA issues nothing."""
    held = revoked is not None and revoked.revocation_reason == Reason.CERTIFICATE_HOLD.value
    return {
        "name": row.name,
        "status": "good" if revoked is None else "on_hold" if held else "revoked",
        "revocation": None if revoked is None else _revocation_doc(revoked),
        "kind": row.kind.value,
        "subject": row.subject_dn,
        "serial": row.serial,
        "key_type": row.key_type,
        "key_ref": row.key_ref,
        "key_online": row.key_online,
        "not_before": row.not_before.isoformat(),
        "not_after": row.not_after.isoformat(),
        "crl_number": row.crl_number,
    }


def _revocation_doc(cert: Certificate) -> dict[str, Any]:
    def when(value: dt.datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "reason": cert.revocation_reason,
        "revoked_at": when(cert.revoked_at),
        "invalidity_date": when(cert.invalidity_date),
    }


@ca.command("list")
@pass_state
def ca_list(state: State) -> None:
    """List the CAs of this deployment."""
    from ca.registry import all_cas, ca_revocation

    with state.read_services().db.scope() as session:
        docs = [_ca_doc(r, ca_revocation(session, r)) for r in all_cas(session)]
    state.emit(
        docs,
        lambda: "\n".join(
            f"{d['name']:<10} {d['kind']:<8} {d['key_type']:<9} "
            f"{'online' if d['key_online'] else 'OFFLINE':<8} {d['status']:<8} {d['subject']}"
            for d in docs
        ),
    )


def _ca_status_text(doc: dict[str, Any]) -> str:
    """``good``, ``on hold (since ...)`` or ``revoked (reason, time[, invalid since ...])``."""
    revocation = doc["revocation"]
    if revocation is None:
        return str(doc["status"])
    if doc["status"] == "on_hold":
        return f"on hold (since {revocation['revoked_at']})"
    invalid = revocation["invalidity_date"]
    return (
        f"revoked ({revocation['reason']}, {revocation['revoked_at']}"
        f"{f', key invalid since {invalid}' if invalid else ''})"
    )


@ca.command("show")
@click.argument("name")
@pass_state
def ca_show(state: State, name: str) -> None:
    """Show one CA."""
    from ca.registry import ca_revocation, ca_row

    with state.read_services().db.scope() as session:
        row = ca_row(session, name)
        doc = _ca_doc(row, ca_revocation(session, row))
    text_doc = {**doc, "status": _ca_status_text(doc)}
    del text_doc["revocation"]
    state.emit(doc, lambda: "\n".join(f"{k:<11} {v}" for k, v in text_doc.items()))


@ca.command("export")
@click.argument("name")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write here instead of stdout.",
)
@click.option(
    "--key",
    "with_key",
    is_flag=True,
    help="Export the CA private key (encrypted PKCS#8 PEM) instead of its certificate.",
)
@pass_state
def ca_export(state: State, name: str, output: Path | None, with_key: bool) -> None:
    """Export a CA certificate (PEM), or with --key its encrypted private key."""
    from ca.hierarchy import export_key
    from ca.registry import ca_row

    if with_key and output is None:
        raise click.UsageError("--key needs --output (keys are never printed)")
    services = state.services()
    # The file is created before the export is journalled: a path that cannot be written
    # fails first, and leaves no "exported" entry for a key that went nowhere.
    outputs = NewFiles([output] if output is not None else [])
    try:
        if with_key:
            assert output is not None
            outputs.write(output, export_key(services.ca, name, state.actor()))
            state.emit({"ca": name, "key_file": str(output)}, f"wrote encrypted key to {output}")
            return
        with services.db.scope() as session:
            der = ca_row(session, name).certificate_der
        pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        if output:
            outputs.write(output, pem)
            state.emit({"ca": name, "file": str(output)}, f"wrote {output}")
        else:
            state.emit({"ca": name, "certificate_pem": pem.decode()}, pem.decode().rstrip("\n"))
    except BaseException:
        outputs.discard()
        raise


@ca.command("offline")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Confirm that an exported copy of the key exists.")
@pass_state
def ca_offline(state: State, name: str, yes: bool) -> None:
    """Remove a CA key (typically the root's) from the online store."""
    from ca.hierarchy import software_backend, take_offline
    from ca.registry import ca_row

    if not yes:
        raise click.UsageError("export the key first (ca export --key), then pass --yes")
    services = state.services()
    software_backend(services.ca)  # (keys on a token never leave it: refused before signing)
    with services.db.scope() as session:
        if not ca_row(session, name).key_online:
            raise Conflict(f"the key of CA {name} is already offline")
    # A last full CRL and a delta lasting as long as it: nothing renews a CA's CRLs while
    # its key is away, and the full CRL's Freshest CRL pointer must not lead to an expired
    # delta for most of its life.
    full, delta = services.crls.publish(name, services.clock(), actor=state.actor(), closing=True)
    take_offline(services.ca, name, state.actor())
    state.emit(
        {
            "ca": name,
            "key_online": False,
            "crl_number": full.number,
            "delta_crl_number": delta.number if delta else None,
            "crls_next_update": full.next_update.isoformat(),
        },
        f"key of CA {name} removed from the store; its CRLs (#{full.number}"
        + (f", delta #{delta.number}" if delta else "")
        + f") are valid until {full.next_update.isoformat()}",
    )


@ca.command("online")
@click.argument("name")
@click.option("--key-file", required=True, type=InputFile())
@pass_state
def ca_online(state: State, name: str, key_file: Path) -> None:
    """Bring an exported CA key back into the store (to sign a new CA or the root CRL)."""
    from ca.hierarchy import bring_online

    pem = read_input(key_file, "key file", 64 * 1024)
    bring_online(state.services().ca, name, pem, state.actor())
    state.emit({"ca": name, "key_online": True}, f"key of CA {name} is online")


@ca.command("create-issuing")
@click.argument("name")
@click.option("--parent", default="root", show_default=True)
@click.option("--org", default=None, help="Organisation name in its DN (default: the parent's).")
@click.option("--key-type", default="ec-p256", callback=_key_type, help=KEY_TYPE_HELP)
@name_constraint_options
@pass_state
def ca_create_issuing(
    state: State,
    name: str,
    parent: str,
    org: str | None,
    key_type: KeyType,
    permit_dns: tuple[str, ...],
    permit_email: tuple[str, ...],
    exclude_dns: tuple[str, ...],
    permit_ip: tuple[str, ...],
    exclude_ip: tuple[str, ...],
) -> None:
    """Create another issuing CA under the root (the root key must be online), its first CRL
    and its OCSP responder."""
    from ca.hierarchy import create_issuing
    from ocsp.signers import provision_new_ca
    from sekisho.bootstrap import publish_ca_files

    constraints = NameConstraintSpec(
        permit_dns, permit_email, exclude_dns, permitted_ip=permit_ip, excluded_ip=exclude_ip
    )
    services = state.services()
    row = create_issuing(services.ca, name, parent, org, key_type, state.actor(), constraints)
    services.crls.publish(name, services.clock(), actor=state.actor())
    publish_ca_files(services)
    doc = _ca_doc(row)
    text = f"created issuing CA {name} ({row.subject_dn})"
    if not services.settings.ocsp_sign_with_ca:
        try:
            made = provision_new_ca(services, row.id, services.clock(), state.actor())
        except SekishoError as exc:
            # The CA exists: its CA key signs its OCSP answers until the refresher (hourly)
            # or `ocsp responders` makes its responder.
            made = []
            text += f"; its OCSP responder could not be made ({exc.message}): run `ocsp responders`"
        doc["ocsp_responder"] = made[0].serial if made else None
        if made:
            text += f"; OCSP responder {made[0].serial}"
    state.emit(doc, text)


# -- issue / revoke ---------------------------------------------------------------------------
def _read_secret_option(file: Path | None, env_name: str | None) -> bytes | None:
    """A password from --password-file or --password-env, under the rules of every secret
    (``hsm.secrets.read_secret``: an owner-only regular file, never through a symlink); its
    strength is the caller's to judge."""
    if file is None and not env_name:
        return None
    if env_name:
        note_env_read(env_name)  # read: no "unknown environment variable" for a SEKISHO_ name
    return read_secret(file, env_name or "", what="password", min_length=1)


@cli.command()
@click.option("--ca", "ca_name", required=True, help="Issuing CA name.")
@click.option("--profile", required=True, help="Certificate profile.")
@click.option(
    "--csr",
    type=InputFile(),
    help="CSR file (PEM or DER).",
)
@click.option("--keygen", callback=_key_type, help="Generate the key here (server-side keygen).")
@click.option("--subject", help="Subject DN (RFC 4514); default: the CSR's, checked by the rules.")
@click.option("--san", multiple=True, help="dns:NAME, email:ADDR, ip:ADDR, uri:URI (repeat).")
@click.option("--days", type=click.IntRange(1, 20000), help="Validity in days.")
@click.option("--owner", help="Owner (account, device or service ID).")
@click.option("--tenant", help="Tenant the certificate belongs to.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Certificate PEM.")
@click.option(
    "--key-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="With --keygen: private key PEM (mode 0600, unencrypted).",
)
@click.option(
    "--p12",
    type=click.Path(path_type=Path, dir_okay=False),
    help="With --keygen: password-protected PKCS#12 file.",
)
@click.option(
    "--password-file",
    type=InputFile(),
    help="PKCS#12 password from this file.",
)
@click.option("--password-env", help="PKCS#12 password from this environment variable.")
@click.option("--legacy-p12", is_flag=True, help="3DES/SHA-1 PKCS#12 for old importers.")
@pass_state
def issue(
    state: State,
    ca_name: str,
    profile: str,
    csr: Path | None,
    keygen: KeyType | None,
    subject: str | None,
    san: tuple[str, ...],
    days: int | None,
    owner: str | None,
    tenant: str | None,
    out: Path | None,
    key_out: Path | None,
    p12: Path | None,
    password_file: Path | None,
    password_env: str | None,
    legacy_p12: bool,
) -> None:
    """Issue a certificate from a CSR, or with a key generated here."""
    from enrollment.pkcs12 import check_password

    if (csr is None) == (keygen is None):
        raise click.UsageError("give exactly one of --csr and --keygen")
    if keygen is None and (key_out or p12):
        raise click.UsageError("--key-out and --p12 go with --keygen")
    if not p12 and (password_file or password_env or legacy_p12):
        # A password given for a key file would be silently unused: the file is plain PKCS#8.
        raise click.UsageError("--password-file, --password-env and --legacy-p12 go with --p12")
    if keygen is not None and not (subject or "").strip():
        raise click.UsageError("--keygen needs --subject")
    if subject is not None and not subject.strip():
        # It was taken for no --subject, and the CSR's subject was certified instead.
        raise click.UsageError("--subject is empty: leave it out to certify the CSR's subject")
    given = [os.path.abspath(p) for p in (out, key_out, p12) if p is not None]
    if len(set(given)) < len(given):
        # The second would be refused as existing, naming a file that did not exist.
        raise click.UsageError("--out, --key-out and --p12 must name different files")
    if keygen is not None and not (key_out or p12):
        # The key exists only in this process: issuing without saving it makes a certificate
        # nobody can use.
        raise click.UsageError("--keygen needs --key-out or --p12 (where the key goes)")
    if profile == "sub-ca":
        raise click.UsageError("CA certificates are made by `ca create-issuing` (tracked as CAs)")
    if profile == "ocsp-signer":
        # Its certificate carries id-pkix-ocsp-nocheck: nobody would learn of its revocation,
        # so its key must never leave the key backend (a key file, a CSR's key held elsewhere).
        raise click.UsageError(
            "OCSP responder certificates are made by `ocsp responders` (their keys stay in the "
            "key backend)"
        )
    # Everything that can be refused is checked before the certificate exists: a failure
    # after issuance would leave an issued certificate whose key nobody has.
    password = _read_secret_option(password_file, password_env) if p12 else None
    if password is not None:
        check_password(password)
    outputs = NewFiles([p for p in (out, key_out, p12) if p is not None])
    try:
        services = state.services()
        actor = state.actor()
        try:
            sans = tuple(SanEntry.parse(s) for s in san) if san else None
            subject_name = parse_subject(subject) if subject else None
        except InputError as exc:  # journalled as the service's own refusals are
            services.ca.journal_rejection(ca_name, profile, None, exc, actor)
            raise
        validity = dt.timedelta(days=days) if days else None
        key = None
        if csr is not None:
            cert = services.ca.issue_from_csr(
                # Read up to 64 times the CSR limit: the service refuses (and journals) an
                # oversized CSR; only a file far beyond it is refused unread.
                read_input(csr, "CSR", 64 * MAX_CSR_BYTES),
                ca=ca_name,
                profile=profile,
                actor=actor,
                subject=subject_name,
                sans=sans,
                validity=validity,
                owner_kind="cli" if owner else None,
                owner_id=owner,
                tenant=tenant,
            )
        else:
            assert keygen is not None and subject_name is not None
            placeholder = IssueRequest(
                ca=ca_name,
                profile=profile,
                subject=subject_name,
                public_key=None,  # type: ignore[arg-type]
                sans=sans or (),
                validity=validity,
                owner_id=owner,
                owner_kind="cli" if owner else None,
                tenant=tenant,
            )
            cert, key = services.ca.issue_with_new_key(placeholder, keygen, actor)
    except BaseException:
        outputs.discard()  # nothing issued: none of the files this command created is left
        raise
    _deliver(state, services, outputs, cert, key, ca_name, out, key_out, p12, password, legacy_p12)


def _deliver(
    state: State,
    services: Services,
    outputs: NewFiles,
    cert: x509.Certificate,
    key: CertificateIssuerPrivateKeyTypes | None,
    ca_name: str,
    out: Path | None,
    key_out: Path | None,
    p12: Path | None,
    password: bytes | None,
    legacy_p12: bool,
) -> None:
    """Hand out what was issued: the files (each synced once written), then the output.

    The certificate exists from here on: a failure (disk full, Ctrl-C during the PKCS#12 key
    derivation, the reader of stdout gone) keeps every file written whole and names the
    serial. A key made here that reached no one (no key file, no PKCS#12 whose password the
    operator has) is gone with this process: its certificate is revoked, journalled, and
    the files discarded, rather than left valid with nobody to know it."""
    from enrollment.pkcs12 import pkcs12_bundle

    serial = f"{cert.serial_number:040x}"
    pem = cert.public_bytes(serialization.Encoding.PEM)
    try:
        alt_names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        alt_names = x509.SubjectAlternativeName([])
    doc: dict[str, Any] = {
        "serial": serial,
        "subject": cert.subject.rfc4514_string(),
        # Said, as the subject is: from a CSR, those not given by --san are the CSR's.
        "sans": [str(SanEntry.from_general_name(n)) for n in alt_names],
        "not_after": cert.not_valid_after_utc.isoformat(),
    }
    key_delivered = key is None  # from a CSR: the requester holds the key
    try:
        if out:
            outputs.write(out, pem)
            doc["certificate_file"] = str(out)
        if key is not None and key_out:
            outputs.write(
                key_out,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            doc["key_file"] = str(key_out)
            key_delivered = True
        if key is not None and p12:
            generated = password is None
            if password is None:
                password = secrets.token_urlsafe(18).encode()  # 144 bits
            with services.db.scope() as session:
                chain = _chain_for(session, ca_name)
            outputs.write(p12, pkcs12_bundle(key, cert, chain, password, legacy=legacy_p12))
            doc["p12_file"] = str(p12)
            if generated:
                # Shown exactly once, on the terminal of the operator who asked for it.
                doc["p12_password"] = password.decode()
            else:
                key_delivered = True
        if not out and state.as_json:
            doc["certificate_pem"] = pem.decode()  # with --json, inside the one document
        elif not out:
            click.echo(pem.decode(), nl=False)
        state.emit(
            doc,
            lambda: "\n".join(
                f"{k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in doc.items()
            ),
        )
    except BaseException as exc:
        if key_delivered:
            outputs.discard_unfinished()
            fate = "the files written whole are kept"
        else:
            outputs.discard()
            fate = _revoke_undelivered(services, ca_name, cert, state.actor())
        note = f"certificate {serial} of CA {ca_name} was issued, but not handed out: {fate}"
        if isinstance(exc, SekishoError):
            exc.message = f"{exc.message}; {note}"  # (its class, hence its exit code, kept)
            exc.args = (exc.message,)
            raise
        with contextlib.suppress(OSError):
            click.echo(f"error: {note}", err=True)  # (Ctrl-C, or stdout closed)
        raise


def _revoke_undelivered(
    services: Services, ca_name: str, cert: x509.Certificate, actor: Actor
) -> str:
    """Revoke a certificate whose key was never delivered (cessationOfOperation: it will
    never be used, and nothing suggests the key leaked); say what became of it."""
    try:
        services.revoker.revoke(ca_name, cert.serial_number, Reason.CESSATION_OF_OPERATION, actor)
    except SekishoError as exc:
        return (
            f"its key was never delivered, and revoking it failed ({exc.message}): revoke it "
            f"with `sekisho revoke --ca {ca_name} {cert.serial_number:#x}`"
        )
    return "its key was never delivered, so it was revoked (cessation_of_operation)"


def _chain_for(session: Any, ca_name: str) -> list[x509.Certificate]:
    chain = []
    row = session.scalar(select(CertificateAuthority).where(CertificateAuthority.name == ca_name))
    while row is not None:
        chain.append(x509.load_der_x509_certificate(row.certificate_der))
        row = session.get(CertificateAuthority, row.parent_id) if row.parent_id else None
    return chain


def _serial(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    try:
        return parse_serial(value)
    except InputError as exc:
        raise click.BadParameter(exc.message) from None


@cli.command()
@click.option("--ca", "ca_name", required=True)
@click.argument("serial", callback=_serial)
@click.option(
    "--reason",
    default="unspecified",
    show_default=True,
    help="RFC 5280 reason: " + ", ".join(r.value for r in Reason),
)
@click.option(
    "--invalidity-date",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"]),
    help="When the key is believed compromised (UTC).",
)
@pass_state
def revoke(
    state: State, ca_name: str, serial: int, reason: str, invalidity_date: dt.datetime | None
) -> None:
    """Revoke a certificate (certificate_hold suspends it; see `release`)."""
    services = state.services()
    when = invalidity_date.replace(tzinfo=dt.UTC) if invalidity_date else None
    done = services.revoker.revoke(ca_name, serial, Reason.parse(reason), state.actor(), when)
    cert = done.certificate
    pending = _crl_pending(services, [ca_name, *(ca for ca, _ in done.also_revoked)])

    def text() -> str:
        lines = [f"revoked {cert.serial} ({cert.revocation_reason})"]
        if done.key_blocked:
            lines.append(f"blocked its key {cert.spki_sha256}: never certified again")
        if done.also_revoked:
            lines.append(
                f"revoked {len(done.also_revoked)} other certificate(s) of the key "
                "(key_compromise):"
            )
            lines += [f"  {ca} {other}" for ca, other in done.also_revoked]
        return "\n".join(lines)

    state.emit(
        {
            "serial": cert.serial,
            "status": cert.status.value,
            "reason": cert.revocation_reason,
            "key_blocked": done.key_blocked,
            "also_revoked": [{"ca": ca, "serial": other} for ca, other in done.also_revoked],
            "crl_pending_key_offline": pending,
        },
        text,
    )


def _crl_pending(services: Services, ca_names: Sequence[str]) -> bool:
    """Whether the key of a CA that just changed a status is offline, so that no CRL can
    carry the change; said on stderr for each (a sub-CA revoked by the root, say, is on no
    CRL until the root is brought back)."""
    from ca.registry import ca_row

    with services.db.read_scope() as session:
        offline = [n for n in dict.fromkeys(ca_names) if not ca_row(session, n).key_online]
    for name in offline:
        click.echo(
            f"note: the key of CA {name} is offline: its CRLs carry this change only once "
            f"the key is back (`sekisho ca online {name}`) and a CRL is signed",
            err=True,
        )
    return bool(offline)


@cli.command()
@click.option("--ca", "ca_name", required=True)
@click.argument("serial", callback=_serial)
@pass_state
def release(state: State, ca_name: str, serial: int) -> None:
    """Release a certificate from hold."""
    services = state.services()
    cert = services.revoker.release(ca_name, serial, state.actor())
    pending = _crl_pending(services, [ca_name])
    state.emit(
        {"serial": cert.serial, "status": cert.status.value, "crl_pending_key_offline": pending},
        f"released {cert.serial} from hold",
    )


# -- key ---------------------------------------------------------------------------------------
@cli.group("key")
def key_group() -> None:
    """Compromised keys (blocked from issuance, their certificates revoked), the Debian
    weak-key lists, and re-encrypting older software key files."""


@key_group.command("block")
@click.argument("key_file", type=InputFile())
@click.option("--comment", help="Why (e.g. the report's reference); journalled.")
@pass_state
def key_block(state: State, key_file: Path, comment: str | None) -> None:
    """Block a key reported compromised: KEY_FILE is one certificate, CSR or public key (PEM
    or DER; never a private key). No certificate is issued for it again, and every
    certificate of ours that carries it is revoked for key_compromise now. Revoking a
    certificate for key_compromise blocks its key the same way."""
    key = public_key_of(read_input(key_file, "certificate, CSR or public key", 64 * 1024))
    if comment is not None and len(comment) > 500:
        raise InputError("--comment is limited to 500 characters")
    blocked, revoked = state.services().revoker.block_key(key, state.actor(), comment)
    spki = spki_sha256(key)

    def text() -> str:
        head = f"blocked key {spki}" if blocked else f"key {spki} was blocked already"
        lines = [head, f"revoked {len(revoked)} certificate(s) for key_compromise"]
        lines += [f"  {ca} {serial}" for ca, serial in revoked]
        return "\n".join(lines)

    state.emit(
        {
            "spki_sha256": spki,
            "newly_blocked": blocked,
            "revoked": [{"ca": ca, "serial": serial} for ca, serial in revoked],
        },
        text,
    )


@key_group.command("list")
@click.option("--limit", type=click.IntRange(1, 100000), default=100, show_default=True)
@pass_state
def key_list(state: State, limit: int) -> None:
    """List blocked keys (newest first)."""
    services = state.read_services()
    with services.db.read_scope() as session:
        rows = session.execute(
            select(BlockedKey, CertificateAuthority.name)
            .outerjoin(CertificateAuthority, CertificateAuthority.id == BlockedKey.issuer_id)
            .order_by(BlockedKey.id.desc())
            .limit(limit)
        ).all()
        docs = [
            {
                "spki_sha256": row.spki_sha256,
                "blocked_at": row.blocked_at.isoformat(),
                "ca": ca_name,
                "serial": row.serial,
                "comment": row.comment,
            }
            for row, ca_name in rows
        ]

    def text() -> str:
        if not docs:
            return "no blocked keys"
        return "\n".join(
            f"{d['spki_sha256']}  {d['blocked_at']}  "
            + (f"{d['ca']} {d['serial']}" if d["serial"] else "reported")
            + (f"  {shown(d['comment'])}" if d["comment"] else "")
            for d in docs
        )

    state.emit(docs, text)


@key_group.command("rewrap")
@pass_state
def key_rewrap(state: State) -> None:
    """Re-encrypt the software key files that an earlier version wrote with PBKDF2 the way new
    ones are (scrypt, AES-256): each new file is checked to hold the same key, and replaces
    the old in the transaction that journals it (ca.key.rewrap). Files already encrypted so
    are left as they are. A CA key that is offline is listed: its exported file is out of
    reach (bring it online, rewrap, export it again, take it offline). Keys on a PKCS#11
    token are the token's to protect."""
    from ca.hierarchy import rewrap_keys
    from hsm.software import SoftwareBackend

    services = state.services()
    if not isinstance(services.backend, SoftwareBackend):
        raise click.UsageError("the keys are on the PKCS#11 token: there is no file to rewrap")
    done = rewrap_keys(services.ca, state.actor())

    def line(d: dict[str, Any]) -> str:
        whose = f" (CA {d['ca']})" if d["ca"] else ""
        if d["offline"]:
            return (f"{d['key_ref']}{whose}: offline, its exported file is not rewrapped "
                    f"(ca online, key rewrap, ca export --key, ca offline)")  # fmt: skip
        return f"{d['key_ref']}{whose}: " + (
            f"rewrapped (was {d['was']})" if d["rewrapped"] else "current"
        )

    def text() -> str:
        return "\n".join(map(line, done)) if done else "no key files in the online store"

    state.emit(done, text)


@key_group.command("install-weak-lists")
@click.option(
    "--debs",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the two openssl-blacklist packages; those missing are downloaded into it.",
)
@click.option("--no-download", is_flag=True, help="Use only the packages in --debs.")
@click.option(
    "--dir",
    "target",
    type=click.Path(file_okay=False, path_type=Path),
    help="Install here (default $SEKISHO_WEAK_KEY_LISTS, else <prefix>/share/sekisho/weak-keys).",
)
@pass_state
def key_install_weak_lists(
    state: State, debs: Path | None, no_download: bool, target: Path | None
) -> None:
    """Install the Debian weak-key lists (CVE-2008-0166) that RSA-2048 and RSA-4096 keys are
    checked against; until they are, such keys received (from a CSR or a public key) are
    refused (rule weak-key-list); keys made here need no list. They come
    from Debian's openssl-blacklist packages (GPL-3 data, not shipped with Sekisho), read from
    --debs or downloaded from the Ubuntu archive, and are checked against pinned SHA-256
    digests. `make run` and `make test` run this. Nothing is replaced unless every list is
    whole; an installation that verifies is left as it is."""
    from ca import weakkeys

    if no_download and debs is None:
        raise click.UsageError("--no-download needs --debs")
    done = weakkeys.install(target, debs, not no_download, lambda line: click.echo(line, err=True))
    doc = {
        "directory": str(done.directory.resolve()),
        "tables": {f"rsa-{bits}": count for bits, count in done.tables.items()},
        "downloaded": list(done.downloaded),
        "already_installed": done.already,
    }

    def text() -> str:
        head = "already installed in" if done.already else "installed in"
        sizes = ", ".join(f"RSA-{bits} ({count} keys)" for bits, count in done.tables.items())
        return f"Debian weak-key lists {head} {doc['directory']}: {sizes}"

    state.emit(doc, text)


# -- cert -------------------------------------------------------------------------------------
@cli.group()
def cert() -> None:
    """Certificates in the store."""


def _cert_doc(row: Certificate, ca_name: str) -> dict[str, Any]:
    return {
        "ca": ca_name,
        "serial": row.serial,
        "status": row.status.value,
        "profile": row.profile,
        "subject": row.subject_dn,
        "sans": json.loads(row.sans),
        "not_before": row.not_before.isoformat(),
        "not_after": row.not_after.isoformat(),
        "reason": row.revocation_reason,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
        "owner": row.owner_id,
        "tenant": row.tenant,
    }


@cert.command("list")
@click.option("--status", type=click.Choice([s.value for s in CertStatus]))
@click.option("--ca", "ca_name", help="Issuing CA name.")
@click.option(
    "--expiring-within",
    type=click.IntRange(0, 100000),
    metavar="DAYS",
    help="Only unexpired certificates that expire within DAYS days.",
)
@click.option("--limit", type=click.IntRange(1, 100000), default=100, show_default=True)
@pass_state
def cert_list(
    state: State, status: str | None, ca_name: str | None, expiring_within: int | None, limit: int
) -> None:
    """List certificates (newest first)."""
    from ca.registry import ca_row

    services = state.read_services()
    stmt = (
        select(Certificate, CertificateAuthority.name)
        .join(CertificateAuthority, Certificate.issuer_id == CertificateAuthority.id)
        .order_by(Certificate.id.desc())
        .limit(limit)
    )
    if status:
        stmt = stmt.where(Certificate.status == CertStatus(status))
    if ca_name:
        stmt = stmt.where(CertificateAuthority.name == ca_name)
    if expiring_within is not None:
        now = services.clock()
        stmt = stmt.where(
            Certificate.not_after >= now,
            Certificate.not_after <= now + dt.timedelta(days=expiring_within),
        )
    with services.db.scope() as session:
        if ca_name:
            ca_row(session, ca_name)  # an unknown (mistyped) CA is NotFound, not "none"
        docs = [_cert_doc(row, name) for row, name in session.execute(stmt)]
    state.emit(
        docs,
        lambda: (
            "\n".join(
                f"{d['ca']:<8} {d['serial']} {d['status']:<8} {d['not_after'][:10]} {d['subject']}"
                for d in docs
            )
            or "no certificates"
        ),
    )


@cert.command("check")
@click.option("--ca", "ca_names", multiple=True, help="Only this CA (repeatable).")
@click.option(
    "--grace",
    type=click.IntRange(0, 7 * 24 * 60),
    default=15,
    show_default=True,
    metavar="MINUTES",
    help="Status changes and issuances newer than this are still on their way to the CRLs "
    "and the OCSP answers: not reported.",
)
@pass_state
def cert_check(state: State, ca_names: tuple[str, ...], grace: int) -> None:
    """Check every certificate against its DER and signature, the journal, the CRLs and the
    stored OCSP answers (reads only; docs/decisions.md, "cert check").

    Prints one line per discrepancy as it is found (with --json, one document at the end),
    progress and a summary on stderr. Exits 0 when everything agrees, 2 when anything does
    not. Run it from cron, after `audit verify`: the journal it compares with is only as
    good as that check.
    """
    from sekisho.check import StoreCheck

    services = state.read_services()
    found: list[dict[str, str]] = []
    shown_at = [time.monotonic()]

    def progress(totals: Any) -> None:
        if time.monotonic() - shown_at[0] >= PROGRESS_SECONDS:
            shown_at[0] = time.monotonic()
            click.echo(f"checked {totals.certificates} certificates...", err=True)

    with services.db.read_scope(snapshot=True) as session:
        run = StoreCheck(
            session, services.clock(), ca_names=ca_names, grace=dt.timedelta(minutes=grace)
        )
        for finding in run.findings(progress):
            if state.as_json:
                found.append(finding.as_dict())
            else:
                where = f"{finding.ca or '-'} {finding.serial or '-'}"
                click.echo(f"{where} {finding.kind}: {finding.detail}")
    totals = run.totals
    summary = (
        f"{totals.certificates} certificates of {totals.cas} CAs, {totals.ocsp_answers} OCSP "
        f"answers, {totals.crl_entries} CRL entries checked: {totals.findings} discrepancies"
    )
    if totals.rsa_keys_unlisted:
        click.echo(
            f"note: {totals.rsa_keys_unlisted} RSA keys were not looked up in the Debian "
            "weak-key lists: they are not installed (sekisho key install-weak-lists)",
            err=True,
        )
    if state.as_json:
        state.emit({"ok": not totals.findings, **totals.as_dict(), "discrepancies": found}, "")
    if totals.findings:
        raise Discrepancies(summary)
    if not state.as_json:
        click.echo(summary, err=True)


@cert.command("show")
@click.option("--ca", "ca_name", required=True)
@click.argument("serial", callback=_serial)
@click.option("--pem", is_flag=True, help="Print the certificate PEM.")
@pass_state
def cert_show(state: State, ca_name: str, serial: int, pem: bool) -> None:
    """Show one certificate."""
    from ca.registry import ca_row

    with state.read_services().db.scope() as session:
        ca_id = ca_row(session, ca_name).id
        row = session.scalar(
            select(Certificate).where(
                Certificate.issuer_id == ca_id, Certificate.serial == f"{serial:040x}"
            )
        )
        if row is None:
            raise NotFound(f"CA {ca_name} has no certificate with serial {serial:x}")
        doc = _cert_doc(row, ca_name)
        der = row.der
    if pem:
        if der is None:
            raise NotFound("this serial has no signed certificate stored")
        text = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
        state.emit({**doc, "certificate_pem": text}, text.rstrip("\n"))
        return
    state.emit(doc, lambda: "\n".join(f"{k:<11} {v}" for k, v in doc.items()))


# -- crl --------------------------------------------------------------------------------------
@cli.group()
def crl() -> None:
    """Certificate revocation lists."""


@crl.command("generate")
@click.option("--ca", "ca_names", multiple=True, help="CA name (repeat); default: every online CA.")
@click.option("--delta", is_flag=True, help="Only a delta CRL, against the latest full CRL.")
@pass_state
def crl_generate(state: State, ca_names: tuple[str, ...], delta: bool) -> None:
    """Generate CRLs now: a full CRL and a delta against it, or with --delta a delta only
    (not for a CA whose certificate expires within the hour)."""
    services = state.services()
    if not ca_names:
        ca_names = _publishing_cas(services)
    rows: list[tuple[str, Crl]] = []
    for name in ca_names:
        now = services.clock()
        if delta:
            made: tuple[Crl, ...] = (
                services.crls.generate(name, now, delta=True, actor=state.actor()),
            )
        else:
            made = tuple(
                row for row in services.crls.publish(name, now, actor=state.actor()) if row
            )
        rows.extend((name, row) for row in made)
    docs = []
    for name, row in rows:
        docs.append(
            {
                "ca": name,
                "number": row.number,
                "kind": row.kind.value,
                "entries": row.entries,
                "next_update": row.next_update.isoformat(),
            }
        )
    state.emit(
        docs,
        lambda: "\n".join(
            f"{d['ca']:<8} {d['kind']:<5} #{d['number']} entries={d['entries']} "
            f"next_update={d['next_update']}"
            for d in docs
        ),
    )


@crl.command("prune")
@pass_state
def crl_prune(state: State) -> None:
    """Delete the CRLs whose nextUpdate passed more than crl_keep_days ago (each CA's newest
    full and delta CRL always stay); `serve` does this every hour."""
    services = state.services()
    keep = services.settings.crl_keep
    deleted = services.crls.prune(services.clock(), keep, actor=state.actor())
    days = services.settings.crl_keep_days
    state.emit(
        {"deleted": deleted, "keep_days": days},
        lambda: f"deleted {deleted} CRLs whose nextUpdate passed more than {days:g} days ago",
    )


def _publishing_cas(services: Services) -> tuple[str, ...]:
    """Every online CA that can still sign a CRL; the others are named on stderr (naming one
    with --ca is refused instead, exit 75)."""
    from ca.crl import check_can_publish
    from ca.registry import all_cas

    now = services.clock()
    names = []
    with services.db.scope() as session:
        for row in all_cas(session):
            if not (row.key_online and row.active):
                continue
            try:
                check_can_publish(row.name, row.not_after, now)
            except Conflict as exc:
                click.echo(f"skipped: {exc.message}", err=True)
                continue
            names.append(row.name)
    return tuple(names)


# -- ocsp -------------------------------------------------------------------------------------
@cli.group("ocsp")
def ocsp_group() -> None:
    """OCSP responder: the standalone server and the static (CDN) export."""


def _ocsp_services(state: State) -> Services:
    # No migrations and no writes: several responders may share one database.
    if state._services is None:
        state._services = open_deployment(state.settings, migrate=False)
    return state._services


@ocsp_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8081,
    show_default=True,
    help="Port (0: pick a free one; the bound port is printed).",
)
@click.option(
    "--poll",
    type=click.FloatRange(0.05, 60.0),
    default=0.5,
    show_default=True,
    help="Seconds between reads of the store's changes.",
)
@click.option(
    "--issuers-every",
    type=click.FloatRange(0.1, 3600.0),
    default=10.0,
    show_default=True,
    help="Seconds between reloads of who signs for which CA (rotated responders, new CAs, "
    "CAs taken offline).",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(0.1, 300.0),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send one whole request (then 408 and close).",
)
@click.option(
    "--max-per-client",
    type=click.IntRange(0, 1024),
    default=128,
    show_default=True,
    help="Connections one client address may hold (0: no limit; use 0 behind a reverse "
    "proxy, whose own address every connection then has).",
)
@click.option("--no-uvloop", is_flag=True, help="Use asyncio's default event loop.")
@pass_state
def ocsp_serve(
    state: State,
    host: str,
    port: int,
    poll: float,
    issuers_every: float,
    request_timeout: float,
    max_per_client: int,
    no_uvloop: bool,
) -> None:
    """Serve OCSP (GET /ocsp/<base64>, POST /ocsp, GET /healthz) from pre-signed responses
    held in memory; follows the store's changes; never writes to the database."""
    from ocsp import store
    from ocsp.server import Responder, Server, initial_index
    from ocsp.server import run as run_server

    services = _ocsp_services(state)
    db = services.db
    if services.ocsp.linter is not None:
        services.ocsp.linter.warm()  # before the first answer, not in it
    # A CA whose signer does not load is left out here; the server reports it as it starts.
    issuers, _ = store.load_issuers_each(services)
    index, cursor = initial_index(issuers, lambda: store.snapshot(db))
    responder = Responder(index, store.lookup(services.db), validity=state.settings.ocsp_validity)

    def changes(since: object) -> tuple[list[Any], object]:
        batch, new_cursor = store.changes_since(db, since)  # type: ignore[arg-type]
        return list(batch), new_cursor

    def responses_of(issuer_ids: Iterable[int]) -> list[Any]:
        return list(store.snapshot(db, issuer_ids)[0])

    server = Server(
        responder,
        changes_since=changes,
        cursor=cursor,
        poll=poll,
        load_issuers=lambda: store.load_issuers_each(services),
        refused_signers=lambda issuers: store.refused_signers(db, issuers),
        chosen_responders=(
            None
            if services.settings.ocsp_sign_with_ca
            else lambda ids: store.chosen_responders(db, ids)
        ),
        snapshot=responses_of,
        issuers_every=issuers_every,
        request_timeout=request_timeout,
        max_per_client=max_per_client,
    )

    def ready(bound: int) -> None:
        url = f"http://{host}:{bound}/ocsp"
        doc = {"url": url, "host": host, "port": bound, "responses": len(index), "pid": os.getpid()}
        state.emit(doc, f"OCSP responder on {url} ({len(index)} responses, pid {os.getpid()})")
        sys.stdout.flush()

    try:
        run_server(server, host, port, ready=ready, use_uvloop=not no_uvloop)
    except OSError as exc:  # address in use, not ours to bind
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@ocsp_group.command("export")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@pass_state
def ocsp_export(state: State, directory: Path) -> None:
    """Write the pre-signed responses under DIRECTORY/ocsp/<base64 request> for a static
    server or CDN (see docs/ocsp-nginx.md)."""
    from ocsp import store
    from ocsp.export import export_responses

    services = _ocsp_services(state)
    issuers = store.load_issuers(services)
    responses, _ = store.snapshot(services.db)
    result = export_responses(issuers, responses, directory, services.clock())
    doc = result.as_dict()
    state.emit(
        doc,
        lambda: (
            f"exported {result.written} responses to {directory}/ocsp "
            f"(expired {result.expired}, unknown issuer {result.unknown_issuer}, "
            f"unrepresentable paths {result.skipped_paths}); earliest nextUpdate "
            f"{doc.get('earliest_next_update')}"
        ),
    )


@ocsp_group.command("responders")
@click.option(
    "--rotate",
    is_flag=True,
    help="Replace every active responder now (new key and certificate); journalled.",
)
@pass_state
def ocsp_responders(state: State, rotate: bool) -> None:
    """List the delegated OCSP responders; provision missing ones and rotate those due (all of
    them with --rotate). The serving process does the same every hour by itself."""
    from ca.registry import all_cas
    from ocsp.models import OcspResponder
    from ocsp.signers import ensure_responders

    services = state.services()
    changes = ensure_responders(services, services.clock(), state.actor(), rotate=rotate)
    with services.db.read_scope() as session:
        names = {ca.id: ca.name for ca in all_cas(session)}
        rows = list(
            session.scalars(
                select(OcspResponder).order_by(OcspResponder.issuer_id, OcspResponder.id)
            )
        )
    docs: list[dict[str, Any]] = [
        {
            "ca": names.get(row.issuer_id, str(row.issuer_id)),
            "serial": row.serial,
            "active": row.active,
            "key_ref": row.key_ref,
            "key_type": row.key_type,
            "not_before": row.not_before.isoformat(),
            "not_after": row.not_after.isoformat(),
        }
        for row in rows
    ]
    changed = [dataclasses.asdict(c) for c in changes]

    def text() -> str:
        lines = [f"{c['action']}: {c['ca']} responder {c['serial']}" for c in changed]
        lines += [
            f"{d['ca']:<10} {d['serial']} {'active  ' if d['active'] else 'inactive'} "
            f"until {d['not_after'][:19]} {d['key_ref']}"
            for d in docs
        ]
        return "\n".join(lines)

    state.emit({"changes": changed, "responders": docs}, text)


@ocsp_group.command("resign")
@pass_state
def ocsp_resign(state: State) -> None:
    """Re-sign the pre-signed response of every certificate of every served CA now (after a
    responder change, or on demand); journalled as one ``ocsp.resign`` entry. Responders
    missing, expired, revoked or due for rotation are replaced first, as the serving process
    does. Exits non-zero when a served CA's answers could not be re-signed (its key or its
    responder's away), after re-signing the others."""
    from ocsp import store
    from ocsp.signers import ensure_responders

    services = state.services()
    now = services.clock()
    failures: dict[str, SekishoError] = {}
    changes = ensure_responders(services, now, state.actor(), failures=failures)
    done = store.resign_all(services, now, state.actor())
    counts = done.counts
    doc: dict[str, Any] = {
        **counts,
        "responder_changes": [dataclasses.asdict(c) for c in changes],
        "responder_failures": {ca: exc.message for ca, exc in failures.items()},
        "not_resigned": done.not_resigned,
        "withheld_revoked_cas": list(done.revoked_cas),
    }

    def text() -> str:
        lines = [f"{c.action}: {c.ca} responder {c.serial}" for c in changes]
        lines += [f"responder of CA {ca} not made: {exc.message}" for ca, exc in failures.items()]
        lines.append(
            f"re-signed {sum(counts.values())} responses "
            f"({counts['good']} good, {counts['revoked']} revoked, {counts['unknown']} unknown)"
        )
        lines += [f"not re-signed: CA {ca}: {why}" for ca, why in done.not_resigned.items()]
        lines += [
            f"withheld: CA {ca} (revoked or held by its parent: its answers are not signed)"
            for ca in done.revoked_cas
        ]
        return "\n".join(lines)

    state.emit(doc, text)
    if done.not_resigned:
        # The exit code of why: the responder that could not be made (its key backend away,
        # exit 69 ...), else a signer that did not load or may not sign.
        cause = next((failures[ca] for ca in done.not_resigned if ca in failures), None)
        if cause is not None:
            raise cause
        names = ", ".join(done.not_resigned)
        if done.signer_down & done.not_resigned.keys():  # a responder key that did not load
            raise KeyBackendError(f"answers of CA {names} not re-signed: a signer did not load")
        raise Conflict(f"answers of CA {names} not re-signed: no signer may sign for it")


# -- hsm --------------------------------------------------------------------------------------
@cli.group("hsm")
def hsm_group() -> None:
    """The PKCS#11 key backend: token status and the keys on it."""


def _token_backend(state: State) -> Pkcs11Backend:
    from hsm.pkcs11 import Pkcs11Backend

    if state.settings.key_backend != "pkcs11":
        raise ConfigError("key_backend is not pkcs11: there is no token to look at")
    backend = open_backend(state.settings)
    assert isinstance(backend, Pkcs11Backend)
    return backend


@hsm_group.command("status")
@pass_state
def hsm_status(state: State) -> None:
    """Module, token, signing mechanisms available and how many private keys it holds."""
    backend = _token_backend(state)
    try:
        doc = backend.status()
    finally:
        backend.close()
    token = doc["token"]
    state.emit(
        doc,
        lambda: "\n".join(
            [
                f"module     {doc['module']} ({doc['library']['description']}, "
                f"{doc['library']['manufacturer']} {doc['library']['version']})",
                f"token      {token['label']} ({token['manufacturer']} {token['model']}, "
                f"serial {token['serial']})",
                f"keys       {doc['keys']} private keys",
                f"mechanisms {', '.join(doc['mechanisms'])}",
            ]
        ),
    )


@hsm_group.command("keys")
@pass_state
def hsm_keys(state: State) -> None:
    """The private keys on the token: label, id, type, URI and their protection attributes."""
    backend = _token_backend(state)
    try:
        keys = backend.keys()
    finally:
        backend.close()
    docs = [dataclasses.asdict(k) for k in keys]

    def flags(attrs: dict[str, bool | None]) -> str:
        return ",".join(f"{k}={'?' if v is None else str(v).lower()}" for k, v in attrs.items())

    state.emit(
        docs,
        lambda: (
            "\n".join(
                f"{k.label:<40} {k.key_type:<9} id={k.id} {flags(k.attributes)}\n  {k.uri}"
                for k in keys
            )
            or "no private keys on the token"
        ),
    )


# -- db ---------------------------------------------------------------------------------------
@cli.group("db")
def db_group() -> None:
    """The store's schema: the migrations it is at, and bringing it to this version's."""


@db_group.command("status")
@click.option(
    "--check",
    is_flag=True,
    help="Exit 2 unless the store is at this version's schema (for deployment scripts).",
)
@pass_state
def db_status(state: State, check: bool) -> None:
    """Show the migrations the store is at and those this version of Sekisho would apply
    (read-only: run it before an upgrade). "current" in --json says whether there are none;
    "problem" names a store this version cannot migrate (a newer version's, or damaged
    bookkeeping)."""
    from sekisho.db import Database, head_revisions, pending_migrations, schema_problem
    from sekisho.services import no_tables, require_data_dir

    settings = state.settings
    require_data_dir(settings)
    db = Database(settings.db_url, read_only=True)
    try:
        stored = db.schema_revisions()
        tables = db.has_tables()
        store = db.engine.dialect.name
    finally:
        db.dispose()
    if stored is None:
        raise no_tables(settings)
    revisions, heads = sorted(stored), sorted(head_revisions())
    problem = schema_problem(revisions, tables)
    pending = [] if problem is not None else pending_migrations(revisions)
    doc = {
        "store": store,
        "revisions": revisions,
        "heads": heads,
        "current": revisions == heads,
        "known": problem is None,
        "problem": problem,
        "pending": [{"revision": r, "description": d} for r, d in pending],
    }

    def text() -> str:
        at = ", ".join(revisions) or "no migration"
        if problem is not None:
            return f"the {store} store cannot be migrated by this version: {problem}"
        if not pending:
            return f"the {store} store is at {at}, this version's schema: nothing to migrate"
        lines = [f"the {store} store is at {at}; `sekisho db upgrade` would apply:"]
        lines += [f"  {revision}  {description}" for revision, description in pending]
        return "\n".join(lines)

    state.emit(doc, text)
    if check and revisions != heads:
        raise SchemaNotCurrent(
            problem or f"{len(pending)} migrations pending: run `sekisho db upgrade`"
        )


@db_group.command("upgrade")
@pass_state
def db_upgrade(state: State) -> None:
    """Migrate the store to this version's schema and say what changed: what every command
    that writes (and `serve`, as it starts) does by itself when it is needed, journalled as
    system.migrate. With database_owner_url, through the owner's connection, and the
    application's role is granted again what Sekisho uses."""
    from sekisho.db import head_revisions

    services = state.services()
    migrated = services.db.migrated
    heads = sorted(head_revisions())
    before = list(migrated.before) if migrated else heads
    doc = {"migrated": migrated is not None, "from": before, "to": heads}
    state.emit(
        doc,
        f"migrated the store from {', '.join(before)} to {', '.join(heads)}"
        if migrated
        else f"the store is at {', '.join(heads)} already: nothing to migrate",
    )


# -- serve ------------------------------------------------------------------------------------
@cli.command()
@click.option("--host", help="Bind address (default from settings: 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default 8080).")
@click.option("--workers", type=click.IntRange(1, 64), help="Worker processes.")
@pass_state
def serve(state: State, host: str | None, port: int | None, workers: int | None) -> None:
    """Serve the web app (CRLs, CA certificates, health) under gunicorn."""
    from web.server import serve as run_server

    settings = state.settings
    ensure_data_dir(settings)
    run_server(
        settings,
        host or settings.bind_host,
        port or settings.bind_port,
        workers or settings.workers,
    )


@cli.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Initialise on first run, then serve (what `make run` does)."""
    from sekisho.bootstrap import InitPlan, initialise, is_initialised

    state: State = ctx.obj
    services = state.services(create=True)
    if not is_initialised(services):
        _print_init(state, services, initialise(services, InitPlan(), state.actor()))
    else:
        click.echo(f"Sekisho data in {services.settings.data_dir.resolve()}", err=True)
    click.echo(
        f"Serving on http://{services.settings.bind_host}:{services.settings.bind_port}/", err=True
    )
    state.close()
    state._services = None
    ctx.invoke(serve)


cli.add_command(audit_group)


# -- backup -----------------------------------------------------------------------------------
_PUBLIC_KEY_OPTION = click.option(
    "--public-key",
    "public_key_files",
    multiple=True,
    type=InputFile(),
    help="Audit public key (PEM, `audit public-key`) the manifest must be signed with; without "
    "it, the archive's own audit key checks it is whole, not who made it.",
)


@cli.group("backup")
def backup_group() -> None:
    """Backups: one signed archive of the store, the CA keys (still encrypted) and settings."""


@backup_group.command("create")
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@pass_state
def backup_create(state: State, output: Path) -> None:
    """Write a backup of this deployment to OUTPUT, a new file (mode 0600), while it runs.

    The archive holds a consistent copy of the store (SQLite: VACUUM INTO; PostgreSQL: pg_dump
    of one snapshot), the key files it refers to (encrypted under the key passphrase, which is
    NOT in it: keep the passphrase apart from the backups), the settings file in use (--config,
    SEKISHO_CONFIG or the data directory's) and the audit public key, listed with their SHA-256
    in a manifest signed by the audit key. The backup is journalled (ca.backup)."""
    from sekisho import backup

    with _stopped_cleanly():
        services = state.services()
        config = config_path(state.config, services.settings.data_dir, os.environ)
        done = backup.create(services, output, state.actor(), _stage, config)
    state.emit(
        done,
        lambda: (
            f"wrote {shown(output, PATH_SHOWN)}: {done['size']:,} bytes, SHA-256 "
            f"{done['sha256']}\n"
            f"journal head {done['journal_head_seq']}; CAs {', '.join(done['cas'])}; "
            f"{len(done['keys'])} key files (encrypted). The key passphrase is not in the "
            "archive: keep it apart. Check the copy with `sekisho backup verify`."
        ),
    )


@backup_group.command("verify")
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@_PUBLIC_KEY_OPTION
@pass_state
def backup_verify(state: State, archive: Path, public_key_files: tuple[Path, ...]) -> None:
    """Check ARCHIVE without any secret: the manifest's signature, every member's size and
    SHA-256, the store's integrity, and its audit journal (hash chain, every checkpoint, the
    head the manifest names; of a PostgreSQL dump, only its table of contents: the journal is
    checked by `backup restore`). Exits 0 when whole; 2 when damaged or tampered with; 65
    when it is not a Sekisho backup. The store is checked in a copy under $TMPDIR."""
    from audit.cli import load_public_keys
    from sekisho import backup

    with _stopped_cleanly():
        done = backup.verify_archive(archive, load_public_keys(public_key_files), _stage)
    state.emit(done, lambda: _backup_text("backup intact", done))


def _stage(what: str) -> None:
    """A long command's progress, on stderr."""
    click.echo(f"{what}...", err=True)


@contextlib.contextmanager
def _stopped_cleanly() -> Iterator[None]:
    """SIGTERM and SIGHUP (a service manager's stop, a dropped SSH session) raise
    KeyboardInterrupt while a backup command runs, so that its clean-up runs as for Ctrl-C:
    by default they end the process at once, leaving the staging directory (the keys and
    the copied passphrase), a half-written archive and a loaded PostgreSQL database."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # handlers: main only
        yield
        return
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _backup_text(first: str, done: dict[str, Any]) -> str:
    cas = ", ".join(
        f"{ca['name']}{'' if ca['key_online'] else ' (key offline)'}" for ca in done["cas"]
    )
    journal = (
        "journal not checked (a PostgreSQL dump: `backup restore` checks it once loaded)"
        if done["journal_records"] is None
        else f"{done['journal_records']} journal records, {done['journal_checkpoints']} signed "
        "checkpoints"
    )
    return (
        f"{first}: made {done['created_at']} by Sekisho {done['sekisho_version']}; {journal}; "
        f"CAs {cas}; manifest signature checked with the {done['signature_checked_with']} "
        f"(audit key SHA-256 {done['audit_key_sha256']})"
    )


@backup_group.command("restore")
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--passphrase-file",
    type=InputFile(),
    help="The key passphrase (owner-only file), copied into the new data directory's "
    "secrets/ when the restored settings keep it there (the default).",
)
@_PUBLIC_KEY_OPTION
@click.option(
    "--unauthenticated",
    is_flag=True,
    help="Restore without --public-key: the archive is only checked to be whole, not to be "
    "this deployment's (its settings name what gets loaded, a PKCS#11 module among them).",
)
@pass_state
def backup_restore(
    state: State,
    archive: Path,
    passphrase_file: Path | None,
    public_key_files: tuple[Path, ...],
    unauthenticated: bool,
) -> None:
    """Restore ARCHIVE as the deployment of --data-dir, a new or empty directory.

    The archive is checked as `backup verify --public-key` does, and every online CA key
    against its certificate under the passphrase, before the directory appears (a failure
    leaves nothing). A PostgreSQL store is loaded into the new, empty database that
    SEKISHO_DATABASE_URL (or the restored settings' database_url) names, and its journal
    checked there. Each CA's CRL number moves on past any CRL signed after the backup, the
    restore is journalled (ca.restore), and each CA whose key is online signs fresh CRLs.
    Certificates issued and revocations made after the backup are not in it: see
    docs/decisions.md, Backup and restore."""
    from audit.cli import load_public_keys
    from sekisho import backup

    if not public_key_files and not unauthenticated:
        raise click.UsageError(
            "give --public-key FILE, the audit public key kept off the box (`audit public-key`), "
            "so that only an archive this deployment signed is restored; or --unauthenticated"
        )
    target = state.settings.data_dir
    named = config_path(state.config, target, os.environ)
    if os.path.abspath(named) != os.path.abspath(target / CONFIG_NAME):
        # The restore checks, and writes into the data directory, the archive's own settings;
        # a deployment started with this file would not run on them.
        raise ConfigError(
            f"--config or SEKISHO_CONFIG names {shown(named, PATH_SHOWN)}: a restore writes the "
            f"archive's settings to {shown(target / CONFIG_NAME, PATH_SHOWN)} and checks "
            "those; restore without them, then point them at that file or edit it"
        )
    with _stopped_cleanly():
        done = backup.restore(
            archive,
            target,
            state.actor(),
            passphrase_file=passphrase_file,
            trusted_keys=load_public_keys(public_key_files),
            step=_stage,
        )
    state.emit(
        done,
        lambda: (
            _backup_text(f"restored into {shown(target, PATH_SHOWN)}", done)
            + f"\nFresh CRLs signed for {', '.join(done['crls_signed']) or 'no CA'}"
            + (
                f"; CA {', '.join(done['crls_waiting'])} signs its next once its key is online"
                if done["crls_waiting"]
                else ""
            )
            + (
                f"; the lint gate refused the CRL of CA {', '.join(done['crls_refused'])} "
                "(`sekisho crl generate --ca NAME` says why)"
                if done["crls_refused"]
                else ""
            )
            + (
                f".\nThe OCSP responder of {', '.join(done['responders_without_key'])} has no "
                "key (it was missing when the backup was made): `sekisho ocsp responders "
                "--rotate` replaces it"
                if done["responders_without_key"]
                else ""
            )
            + f".\nNot in the backup: what happened after {done['created_at']} (certificates "
            "issued, revocations: revoke again what was revoked since)."
        ),
    )


def _show_tamed(exc: click.ClickException) -> None:
    """click's own error, its message (which may quote an argument whole, control characters
    and all) passed through ``tamed``; click declares ``message`` final, hence ``vars``."""
    message = tamed(exc.message)
    if isinstance(exc, click.NoSuchOption) and exc.option_name in _GLOBAL_OPTIONS:
        # `sekisho cert list --json`: the option exists, before the command.
        message += f" ({exc.option_name} goes before the command: sekisho {exc.option_name} ...)"
    vars(exc)["message"] = message
    exc.show()


_GLOBAL_OPTIONS = frozenset({"--json", "--data-dir", "--config", "--log-level"})


def main(argv: list[str] | None = None) -> int:
    """Entry point: map errors to exit codes once."""
    args = sys.argv[1:] if argv is None else argv
    for n, arg in enumerate(args, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 (surrogate-escaped by Python)
            click.echo(f"error: usage: argument {n} is not valid UTF-8", err=True)
            return EX_USAGE
    try:
        # click's main() minus its own handling of a closed pipe (exit 1, outside our codes).
        with cli.make_context("sekisho", list(args)) as ctx:
            cli.invoke(ctx)
    except BrokenPipeError:
        # The reader went away (`sekisho audit export | head`): nothing more to write, and
        # nothing to flush at exit either (that would report the same broken pipe again).
        _stdout_to_devnull()
        return EX_IOERR
    except EOFError:
        click.echo("aborted", err=True)
        return 130
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.UsageError as exc:
        _show_tamed(exc)
        return EX_USAGE
    except click.ClickException as exc:
        _show_tamed(exc)
        return exc.exit_code if exc.exit_code != 2 else EX_USAGE
    except SekishoError as exc:
        click.echo(f"error: {exc.code}: {exc.message}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line for the operator, the traceback in the log
        if isinstance(exc, OSError) and exc.errno in _WRITE_FAILED:
            return _write_failed(exc)
        logging.getLogger("sekisho.cli").debug("unexpected error", exc_info=exc)
        click.echo(
            f"error: internal: unexpected {type(exc).__name__} (a bug in Sekisho; run with "
            "--log-level DEBUG for details)",
            err=True,
        )
        return EX_SOFTWARE
    return 0


# Errors of a write that are the medium's, not Sekisho's: no space, quota, file too large, I/O.
_WRITE_FAILED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def _write_failed(exc: OSError) -> int:
    """A write that failed for want of room or a device (`sekisho audit export > file` on a
    full disk: stdout's ENOSPC, which exited 70 as "a bug"): an I/O error (74), as for a file
    given with -o. Stdout is left on /dev/null, so that the flush at exit cannot report it
    again."""
    _stdout_to_devnull()
    where = f" {shown(exc.filename, PATH_SHOWN)}" if exc.filename else " the output"
    with contextlib.suppress(OSError):
        click.echo(f"error: {OutputError.code}: cannot write{where}: {exc.strerror}", err=True)
    return EX_IOERR


def _stdout_to_devnull() -> None:
    """Stdout from here on is /dev/null: a write that failed is not reported again by the
    flush at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
