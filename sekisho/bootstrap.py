"""First-run initialisation: audit key, root CA, issuing CAs, first CRLs, OCSP responders."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from audit.events import Category, Event, Outcome
from ca.hierarchy import (
    NameConstraintSpec,
    check_adoptable,
    create_issuing,
    create_root,
    issuing_subject,
    root_subject,
)
from ca.models import CertificateAuthority
from ca.registry import check_ca_name
from hsm.base import KeyType
from ocsp.signers import ensure_responders
from sekisho.context import Actor
from sekisho.errors import Conflict, InputError, shown
from sekisho.services import Services, audit_key_ref, enable_checkpoints, has_root_ca

DEFAULT_ISSUING = ("admin", "device")


@dataclasses.dataclass(frozen=True)
class InitPlan:
    organization: str = "Sekisho"
    root_name: str = "root"
    key_type: KeyType = KeyType.EC_P256
    issuing: tuple[str, ...] = DEFAULT_ISSUING
    constraints: NameConstraintSpec = dataclasses.field(default_factory=NameConstraintSpec)
    # CA name -> reference of an existing key to use (PKCS#11 URI) instead of a new one.
    adopt: Mapping[str, str] = dataclasses.field(default_factory=dict)


def is_initialised(services: Services) -> bool:
    return has_root_ca(services.db)


def initialise(services: Services, plan: InitPlan, actor: Actor) -> list[CertificateAuthority]:
    if is_initialised(services):
        raise Conflict("this deployment is already initialised")
    if len(set(plan.issuing)) < 2 or plan.root_name in plan.issuing:
        raise Conflict("need at least two distinct issuing CAs (administrators, devices)")
    # Every name before anything is created: a refused issuing CA name must not leave a root.
    for name in (plan.root_name, *plan.issuing):
        check_ca_name(name)
    root_subject(plan.organization)
    for name in plan.issuing:
        issuing_subject(name, plan.organization)
    unknown = set(plan.adopt) - {plan.root_name, *plan.issuing}
    if unknown:
        raise InputError(
            f"--adopt-key names no CA of this plan: {', '.join(shown(n) for n in sorted(unknown))}"
        )
    # Before anything is created: adopted keys must be usable, and a token must not already
    # hold an audit key under our label (another deployment with the same label prefix).
    for ref in plan.adopt.values():
        check_adoptable(services.ca, ref)
    audit_ref = audit_key_ref(services.backend)
    if services.settings.key_backend == "pkcs11" and services.backend.has_key(audit_ref):
        raise Conflict(
            f"the token already holds an audit key {audit_ref}: another deployment uses this "
            "label prefix; set a distinct pkcs11_label_prefix (or delete that key)"
        )
    enable_checkpoints(services)
    with services.db.scope() as session:
        services.journal.append(
            session,
            Event(
                category=Category.SYSTEM,
                action="system.init",
                outcome=Outcome.SUCCESS,
                actor_account=actor.account,
                client_ip=actor.client_ip,
                request_id=actor.request_id,
                detail={
                    "organization": plan.organization,
                    "key_type": plan.key_type.value,
                    "issuing": list(plan.issuing),
                },
            ),
            services.clock(),
        )
    created = [
        create_root(
            services.ca,
            plan.root_name,
            plan.organization,
            plan.key_type,
            actor,
            key_ref=plan.adopt.get(plan.root_name),
        )
    ]
    for name in plan.issuing:
        created.append(
            create_issuing(
                services.ca,
                name,
                plan.root_name,
                plan.organization,
                plan.key_type,
                actor,
                plan.constraints,
                key_ref=plan.adopt.get(name),
            )
        )
    now = services.clock()
    for row in created:
        services.crls.publish(row.name, now, actor=actor)
    # A delegated OCSP responder per issuing CA (its certificate is pre-signed on issuance).
    ensure_responders(services, now, actor)
    publish_ca_files(services)
    return created


def publish_ca_files(services: Services) -> None:
    """Write each CA certificate as PEM under <data_dir>/public/ for operators to pick up."""
    out = services.settings.data_dir / "public"
    out.mkdir(parents=True, exist_ok=True)
    with services.db.scope() as session:
        for row in session.scalars(select(CertificateAuthority)):
            cert = x509.load_der_x509_certificate(row.certificate_der)
            (out / f"{row.name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
