"""The CA hierarchy: a self-signed root, issuing CAs under it, and the offline root.

Issuing CAs are issued through the normal issuance path (profile ``sub-ca``), so their
certificates get a store row, rules, and a journal entry like any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from audit.events import Category, Event, Outcome, by_actor, refused
from ca.issuance import CaService, IssueRequest
from ca.models import CaKind, CertificateAuthority
from ca.registry import ca_row, check_ca_name
from ca.rules import check_public_key, ends_in_top_level_domain, is_dns_name, is_mailbox
from ca.subject import check_value
from ca.tbs import new_serial, serial_hex
from hsm.base import CA_KEY_TYPES, KeyType, key_type_of, signature_hash
from hsm.software import SoftwareBackend, pem_unwrap
from sekisho.context import Actor
from sekisho.errors import (
    ConfigError,
    Conflict,
    InputError,
    KeyBackendError,
    PolicyViolation,
    SekishoError,
    WrongPassphrase,
    shown,
)

ROOT_VALIDITY = dt.timedelta(days=20 * 365)
ISSUING_VALIDITY = dt.timedelta(days=10 * 365)


@dataclasses.dataclass(frozen=True)
class NameConstraintSpec:
    """RFC 5280 4.2.1.10 subtrees for an issuing CA; a value that cannot mean what was typed
    is refused here, before any key or row exists."""

    permitted_dns: tuple[str, ...] = ()
    permitted_email: tuple[str, ...] = ()
    excluded_dns: tuple[str, ...] = ()
    # IPv4 or IPv6 networks in CIDR form ("10.20.0.0/16"): an iPAddress SAN must lie in one
    # permitted (when any is given) and in none excluded.
    permitted_ip: tuple[str, ...] = ()
    excluded_ip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for what, values, valid, form in (
            ("permitted DNS", self.permitted_dns, _is_permitted_dns, _DNS_FORM),
            ("permitted email", self.permitted_email, _is_email_subtree, _EMAIL_FORM),
            ("excluded DNS", self.excluded_dns, is_dns_name, _DNS_FORM),
            ("permitted IP", self.permitted_ip, _is_network, _IP_FORM),
            ("excluded IP", self.excluded_ip, _is_network, _IP_FORM),
        ):
            for value in values:
                if not value.strip():
                    # An unset shell variable, most likely; as a zero-length dNSName it would
                    # permit every name, or (excluded) forbid every DNS name.
                    raise InputError(f"{what} name constraint is empty")
                if not valid(value):
                    raise InputError(f"{what} name constraint {shown(value)} refused: {form}")

    def extension(self) -> x509.NameConstraints | None:
        permitted: list[x509.GeneralName] = [x509.DNSName(d) for d in self.permitted_dns]
        permitted += [x509.RFC822Name(e) for e in self.permitted_email]
        permitted += [x509.IPAddress(ipaddress.ip_network(n)) for n in self.permitted_ip]
        excluded: list[x509.GeneralName] = [x509.DNSName(d) for d in self.excluded_dns]
        excluded += [x509.IPAddress(ipaddress.ip_network(n)) for n in self.excluded_ip]
        if not permitted and not excluded:
            return None
        return x509.NameConstraints(
            permitted_subtrees=permitted or None, excluded_subtrees=excluded or None
        )


_DNS_FORM = (
    "a lower-case DNS name such as example.com (it covers its subdomains), without a "
    "leading dot or wildcard, ending in a top-level domain (permitted ones); IDNs as A-labels"
)
_EMAIL_FORM = "an address (a@example.com), a host (example.com) or a domain (.example.com)"
_IP_FORM = (
    "an IPv4 or IPv6 network in CIDR form with no host bits set, such as 10.20.0.0/16 or "
    "2001:db8::/32 (a single address: 10.20.0.7/32)"
)


def _is_network(value: str) -> bool:
    """A network in CIDR form, as typed: a prefix length, no host bits, no zone, ASCII."""
    if "/" not in value or not value.isascii() or "%" in value or value != value.strip():
        return False
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError:
        return False
    return True


def _is_permitted_dns(value: str) -> bool:
    """A DNS subtree under which the CA can issue: one that ends in no top-level domain
    (``lab.b2``) would make a CA that issues no DNS name at all (``ca.rules``)."""
    return is_dns_name(value) and ends_in_top_level_domain(value)


def _is_email_subtree(value: str) -> bool:
    """RFC 5280 4.2.1.10: one mailbox, all mailboxes on a host, or (leading dot) all mailboxes
    in a domain's subdomains, under a top-level domain as for DNS subtrees."""
    if "@" in value:
        return is_mailbox(value) and ends_in_top_level_domain(value.rsplit("@", 1)[1])
    return _is_permitted_dns(value.removeprefix(".").lower())


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def root_subject(organization: str) -> x509.Name:
    return _subject(f"{organization.strip()} Root CA", organization)


def issuing_subject(name: str, organization: str) -> x509.Name:
    return _subject(f"{organization.strip()} {name.capitalize()} Issuing CA", organization)


def _subject(common_name: str, organization: str) -> x509.Name:
    """A CA's subject, refused (InputError) before any key exists: an empty organization,
    attributes over their X.520 upper bounds (64 characters for O and CN), or a value no
    certificate may carry (``ca.subject.check_value``: control, bidirectional or invisible
    characters). The root is signed without the profile rules: without this check it was made
    with such a name, and only its issuing CAs refused it (an init that could never finish)."""
    if not organization.strip():
        raise InputError("the organization (O) of a CA must not be empty")
    try:
        subject = _name(common_name, organization.strip())
    except ValueError as exc:
        raise InputError(f"CA subject refused: {exc}") from None
    for attr in subject:
        check_value(attr.oid, attr.value)
    return subject


def _check_ca_key_type(key_type: KeyType) -> None:
    if key_type not in CA_KEY_TYPES:
        raise PolicyViolation("key-type", f"{key_type.value} is not allowed for a CA")


def _ca_key(
    service: CaService, name: str, key_type: KeyType, adopt: str | None
) -> tuple[str, KeyType]:
    """A new key in the backend, or an existing one adopted by reference (PKCS#11 URI): its
    reference and key type (an adopted key's type is read from its public key)."""
    if adopt is None:
        return service.backend.generate(ca_key_label(name), key_type), key_type
    return check_adoptable(service, adopt)


def check_adoptable(service: CaService, ref: str) -> tuple[str, KeyType]:
    """An existing key (PKCS#11 URI) fit to be a CA key: its reference and key type."""
    adopter = getattr(service.backend, "adopt", None)
    if adopter is None:
        raise ConfigError(f"the {service.backend.name} key backend cannot adopt existing keys")
    adopted = str(adopter(ref))
    public_key = service.backend.public_key(adopted)
    adopted_type = key_type_of(public_key)
    _check_ca_key_type(adopted_type)
    check_public_key(public_key)  # a root's key meets no certificate rule
    return adopted, adopted_type


def _ca_recorded(service: CaService, name: str) -> bool:
    """Whether a CA row of ``name`` exists; True when the store cannot say (keep the key)."""
    try:
        with service.db.read_scope() as session:
            return (
                session.scalar(
                    select(CertificateAuthority.id).where(CertificateAuthority.name == name)
                )
                is not None
            )
    except SekishoError:
        return True


def discard_new_key(service: CaService, ref: str) -> None:
    """A software key file this call made for a CA (or an OCSP responder) that was not issued
    (the journal or the store refused): removed, so that no key outlives its refused
    certificate unrecorded and a retry under the name is not a conflict. A token key stays
    (keys on a token are not deleted behind the operator's back; `init` adopts it when
    resumed)."""
    if isinstance(service.backend, SoftwareBackend):
        with contextlib.suppress(KeyBackendError):
            service.backend.remove(ref)


def ca_key_label(name: str) -> str:
    return f"ca-{name}"


def create_root(
    service: CaService,
    name: str,
    organization: str,
    key_type: KeyType,
    actor: Actor,
    validity: dt.timedelta = ROOT_VALIDITY,
    *,
    key_ref: str | None = None,
) -> CertificateAuthority:
    """The root CA, self-signed, with a new key (or the existing token key ``key_ref``)."""
    check_ca_name(name)
    _check_ca_key_type(key_type)
    subject = root_subject(organization)
    now = service.clock()
    with service.db.scope() as session:
        if session.scalar(select(CertificateAuthority.id).where(CertificateAuthority.name == name)):
            raise Conflict(f"a CA named {shown(name)} already exists")
    ref, key_type = _ca_key(service, name, key_type, key_ref)
    key = service.backend.signing_key(ref)
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder(
            issuer_name=subject,
            subject_name=subject,
            public_key=public_key,
            serial_number=new_serial(),
            not_valid_before=now,
            not_valid_after=now + validity,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    try:
        cert = builder.sign(key, signature_hash(key_type))  # type: ignore[arg-type]
        if service.linter is not None:  # the lint gate: for a root, once signed (ca/lint.py)
            service.linter.check_certificate(cert.public_bytes(serialization.Encoding.DER))
    except BaseException as exc:
        if key_ref is None:  # refused (the lint gate) or failed: no key outlives it
            discard_new_key(service, ref)
        if isinstance(exc, PolicyViolation):  # journalled as a refused issuance is
            event = refused(
                actor, Category.CA, "ca.create", exc, object_dn=subject.rfc4514_string(),
                detail={"ca": name, "kind": "root"},
            )  # fmt: skip
            with service.db.scope() as session:
                service.journal.append(session, event, service.clock())
        raise
    return _record_ca(
        service, cert, actor, now, name=name, kind=CaKind.ROOT, parent_id=None,
        subject=subject, ref=ref, key_type=key_type,
        detail={"kind": "root", "key_type": key_type.value, "key_ref": ref},
    )  # fmt: skip


def create_issuing(
    service: CaService,
    name: str,
    parent: str,
    organization: str | None,
    key_type: KeyType,
    actor: Actor,
    constraints: NameConstraintSpec = NameConstraintSpec(),
    validity: dt.timedelta | None = None,
    *,
    key_ref: str | None = None,
) -> CertificateAuthority:
    """An issuing CA under ``parent``, with a new key (or the existing token key
    ``key_ref``); ``organization`` None: the parent's (its subject's O, else "Sekisho")."""
    check_ca_name(name)
    subject = issuing_subject(name, organization) if organization is not None else None
    with service.db.scope() as session:
        if session.scalar(select(CertificateAuthority.id).where(CertificateAuthority.name == name)):
            raise Conflict(f"a CA named {shown(name)} already exists")
        parent_row = ca_row(session, parent)
        if not parent_row.key_online:
            raise Conflict(f"the key of CA {parent} is offline; bring it online first")
        parent_id = parent_row.id
        if subject is None:
            above = x509.load_der_x509_certificate(parent_row.certificate_der).subject
            orgs = above.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
            subject = issuing_subject(name, str(orgs[0].value) if orgs else "Sekisho")
    ref, key_type = _ca_key(service, name, key_type, key_ref)
    try:
        cert = service.issue(
            IssueRequest(
                ca=parent,
                profile="sub-ca",
                subject=subject,
                public_key=service.backend.public_key(ref),
                validity=validity or ISSUING_VALIDITY,
                owner_kind="ca",
                owner_id=name,
                name_constraints=constraints.extension(),
                key_generated_here=key_ref is None,
            ),
            actor,
        )
    except BaseException:
        if key_ref is None:
            discard_new_key(service, ref)
        raise
    try:
        return _record_ca(
            service, cert, actor, service.clock(), name=name, kind=CaKind.ISSUING,
            parent_id=parent_id, subject=subject, ref=ref, key_type=key_type,
            detail={"kind": "issuing", "parent": parent, "key_type": key_type.value,
                    "key_ref": ref},
        )  # fmt: skip
    except BaseException:
        # Its certificate is issued (and journalled), but no CA row names the key: removed,
        # so that the certificate is of a key nobody holds and a retry is no conflict. Not
        # when the row is there after all (a commit reported failed that went through).
        if key_ref is None and not _ca_recorded(service, name):
            discard_new_key(service, ref)
        raise


def _record_ca(
    service: CaService,
    cert: x509.Certificate,
    actor: Actor,
    now: dt.datetime,
    *,
    name: str,
    kind: CaKind,
    parent_id: int | None,
    subject: x509.Name,
    ref: str,
    key_type: KeyType,
    detail: dict[str, object],
) -> CertificateAuthority:
    """A new CA's row and its ``ca.create`` entry, in one transaction."""
    with service.db.scope() as session:
        row = CertificateAuthority(
            name=name,
            kind=kind,
            parent_id=parent_id,
            subject_dn=subject.rfc4514_string(),
            key_ref=ref,
            key_type=key_type.value,
            serial=serial_hex(cert.serial_number),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            certificate_der=cert.public_bytes(serialization.Encoding.DER),
            active=True,
            key_online=True,
            crl_number=0,
            revocation_epoch=0,
            created_at=now,
        )
        session.add(row)
        service.journal.append(session, _ca_event("ca.create", actor, cert, name, detail), now)
    return row


def _ca_event(
    action: str, actor: Actor, cert: x509.Certificate | None, name: str, detail: dict[str, object]
) -> Event:
    return by_actor(
        actor,
        Category.CA,
        action,
        Outcome.SUCCESS,
        object_dn=cert.subject.rfc4514_string() if cert is not None else None,
        object_serial=serial_hex(cert.serial_number) if cert is not None else None,
        detail={"ca": name, **detail},
    )


def software_backend(service: CaService) -> SoftwareBackend:
    if not isinstance(service.backend, SoftwareBackend):
        raise KeyBackendError("offline export/import applies to the software key backend")
    return service.backend


def export_key(service: CaService, name: str, actor: Actor) -> bytes:
    """The CA key as encrypted PKCS#8 PEM (PBES2, under the backend passphrase)."""
    backend = software_backend(service)
    with service.db.scope() as session:
        row = ca_row(session, name)
        pem = backend.export_encrypted(row.key_ref)
        service.journal.append(
            session,
            _ca_event("ca.key.export", actor, None, name, {"key_ref": row.key_ref}),
            service.clock(),
        )
    return pem


def take_offline(service: CaService, name: str, actor: Actor) -> None:
    """Remove the CA key from the online store (export it first: this cannot be undone
    without the exported file)."""
    backend = software_backend(service)
    # Held until the file is gone: a `ca online` deciding meanwhile that the file is a
    # leftover (the store already says offline) cannot write one this call then removes.
    with backend.exclusive():
        with service.db.scope() as session:
            row = ca_row(session, name)
            session.refresh(row, with_for_update=True)
            if not row.key_online:
                raise Conflict(f"the key of CA {name} is already offline")
            row.key_online = False
            service.journal.append(
                session,
                _ca_event("ca.key.offline", actor, None, name, {"key_ref": row.key_ref}),
                service.clock(),
            )
            key_ref = row.key_ref
        # Only once the store says "offline" is the key removed: a failed commit leaves the key
        # in place and the CA online, never a CA that claims a key it no longer has.
        backend.remove(key_ref)


def bring_online(service: CaService, name: str, pem: bytes, actor: Actor) -> None:
    """Re-import an exported CA key; it must match the CA certificate's public key.

    The key file is written last in the transaction that marks the CA online and journals
    it, and removed again if that transaction fails: no key file outlives a failed
    bring-online. A key file found while the store says offline was left by a bring-online
    (or a take-offline) that stopped half-way: the store does not record it, so it is
    replaced. The keys directory's lock (``SoftwareBackend.exclusive``) is held throughout,
    and the CA row's, so that no other `ca online` or `ca offline` sees or removes a file
    this call has not settled."""
    backend = software_backend(service)
    try:
        encrypted = pem_unwrap(pem, "ENCRYPTED PRIVATE KEY")
        # Before the transaction: the KDF's fraction of a second is not spent holding locks.
        key = backend.decrypt(encrypted)
    except WrongPassphrase:
        raise
    except KeyBackendError as exc:  # the file given is damaged or weak, not the key store
        raise InputError(str(exc)) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    with backend.exclusive():
        written: str | None = None
        try:
            with service.db.scope() as session:
                row = ca_row(session, name)
                session.refresh(row, with_for_update=True)
                if row.key_online:
                    raise Conflict(f"the key of CA {name} is already online")
                cert = x509.load_der_x509_certificate(row.certificate_der)
                if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
                    raise InputError(f"that key does not belong to CA {name}")
                detail: dict[str, object] = {"key_ref": row.key_ref}
                if backend.has_key(row.key_ref):
                    backend.remove(row.key_ref)
                    detail["replaced_unrecorded_key_file"] = True
                row.key_online = True
                service.journal.append(
                    session, _ca_event("ca.key.online", actor, None, name, detail), service.clock()
                )
                session.flush()
                backend.store(row.key_ref, encrypted)
                written = row.key_ref
        except BaseException:
            if written is not None:  # the commit failed: the store says offline
                # Should the removal fail too, the next `ca online` replaces the file.
                with contextlib.suppress(KeyBackendError):
                    backend.remove(written)
            raise


def rewrap_keys(service: CaService, actor: Actor) -> list[dict[str, object]]:
    """Re-encrypt every software key file that is not encrypted as new ones are
    (``SoftwareBackend.rewrapped``); one entry per key file (``key_ref``, the ``ca`` whose key
    it is or None, ``rewrapped``, how it ``was``), then one per CA whose key is offline: its
    exported file is not in reach (``offline``), and stays as it was exported.

    Each file is replaced inside the transaction that journals it (``ca.key.rewrap``), as
    the last step before the commit, and put back as it was if the commit fails: a rewrap is
    on disk if and only if it is in the journal (short of the put-back failing too). The keys
    directory's lock is held throughout, so that no `ca online` or `ca offline` acts on a
    file between its read and its replacement."""
    backend = software_backend(service)
    done: list[dict[str, object]] = []
    with backend.exclusive():
        # Under the lock: no `ca online` or `ca offline` moves a key between this and the files.
        with service.db.scope() as session:
            cas = {row.key_ref: (row.name, row.key_online) for row in session.scalars(
                select(CertificateAuthority).order_by(CertificateAuthority.name))}  # fmt: skip
        for label in backend.labels():
            ref = backend.reference(label)
            name = cas.get(ref, (None, True))[0]
            change = backend.rewrapped(ref)
            was = None
            if change is not None:
                was = f"{change.was.scheme} {change.was.kdf} {change.was.cost} {change.was.cipher}"
                replaced = False
                try:
                    detail: dict[str, object] = {"key_ref": ref, "was": was}
                    if name is not None:
                        detail["ca"] = name  # (an OCSP responder's or the journal's key: none)
                    with service.db.scope() as session:
                        event = by_actor(actor, Category.CA, "ca.key.rewrap", Outcome.SUCCESS,
                                         detail=detail)  # fmt: skip
                        service.journal.append(session, event, service.clock())
                        session.flush()
                        # Set first: a replacement that fails after its rename (the directory's
                        # sync) has put the new file in place all the same.
                        replaced = True
                        backend.replace(ref, change.new)
                except BaseException:
                    if replaced:  # the journal does not have it: the old file goes back
                        with contextlib.suppress(KeyBackendError):
                            backend.replace(ref, change.old)
                    raise
            done.append(_rewrap_entry(ref, name, offline=False, was=was))
        done += [_rewrap_entry(ref, name, offline=True, was=None)
                 for ref, (name, online) in cas.items() if not online]  # fmt: skip
    return done


def _rewrap_entry(ref: str, ca: str | None, *, offline: bool, was: str | None) -> dict[str, object]:
    return {"key_ref": ref, "ca": ca, "offline": offline, "rewrapped": was is not None, "was": was}
