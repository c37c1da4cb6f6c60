"""First-run initialisation: audit key, root CA, issuing CAs, first CRLs, OCSP responders."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from audit.events import Category, Outcome, by_actor
from audit.models import JournalRecord
from ca.hierarchy import (
    NameConstraintSpec,
    ca_key_label,
    check_adoptable,
    create_issuing,
    create_root,
    issuing_subject,
    root_subject,
)
from ca.models import CertificateAuthority
from ca.registry import check_ca_name
from hsm.base import KeyType
from hsm.software import SoftwareBackend
from ocsp.signers import ensure_responders
from sekisho.context import Actor
from sekisho.errors import Conflict, InputError, shown
from sekisho.files import exclusive_lock
from sekisho.services import (
    INIT_BEGUN,
    INIT_DONE,
    InitState,
    Services,
    audit_key_ref,
    enable_checkpoints,
    init_state,
)
from sekisho.workers import AuditCheckpointer

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

    def check(self) -> None:
        """What can be refused from the plan alone (InputError): before the data directory,
        the store or any key exists."""
        for name in (self.root_name, *self.issuing):
            check_ca_name(name)  # first: a name refused is named as such
        if self.root_name in self.issuing:
            raise InputError(f"--issuing names the root, {shown(self.root_name)}: name it apart")
        if len(set(self.issuing)) < 2:
            raise InputError(
                "init needs at least two distinct issuing CAs (administrators, devices): "
                f"--issuing was {', '.join(map(shown, self.issuing))}"
            )
        root_subject(self.organization)
        for name in self.issuing:
            issuing_subject(name, self.organization)
        unknown = set(self.adopt) - {self.root_name, *self.issuing}
        if unknown:
            raise InputError(
                "--adopt-key names no CA of this plan: "
                + ", ".join(shown(n) for n in sorted(unknown))
            )


def is_initialised(services: Services) -> bool:
    return init_state(services.db) is InitState.COMPLETE


def _plan_detail(plan: InitPlan, key_backend: str) -> dict[str, Any]:
    return {
        "organization": plan.organization,
        "root": plan.root_name,
        "key_type": plan.key_type.value,
        "issuing": list(plan.issuing),
        "constraints": {
            "permitted_dns": list(plan.constraints.permitted_dns),
            "permitted_email": list(plan.constraints.permitted_email),
            "excluded_dns": list(plan.constraints.excluded_dns),
            "permitted_ip": list(plan.constraints.permitted_ip),
            "excluded_ip": list(plan.constraints.excluded_ip),
        },
        "adopt": dict(plan.adopt),
        "key_backend": key_backend,
    }


def _begun_plan(services: Services) -> InitPlan:
    """The plan of the interrupted init, as its first record holds it: what a resumed init
    finishes, whatever it was asked this time."""
    with services.db.read_scope() as session:
        detail = session.scalar(
            select(JournalRecord.detail)
            .where(JournalRecord.action == INIT_BEGUN)
            .order_by(JournalRecord.seq)
            .limit(1)
        )
    try:
        doc = json.loads(detail or "")
        constraints = doc["constraints"]
        plan = InitPlan(
            organization=str(doc["organization"]),
            root_name=str(doc["root"]),
            key_type=KeyType(doc["key_type"]),
            issuing=tuple(str(n) for n in doc["issuing"]),
            constraints=NameConstraintSpec(
                tuple(constraints["permitted_dns"]),
                tuple(constraints["permitted_email"]),
                tuple(constraints["excluded_dns"]),
                # (Not in the record of an init begun before stop 24.)
                permitted_ip=tuple(constraints.get("permitted_ip", ())),
                excluded_ip=tuple(constraints.get("excluded_ip", ())),
            ),
            adopt={str(k): str(v) for k, v in doc["adopt"].items()},
        )
        key_backend = str(doc["key_backend"])
    except (ValueError, KeyError, TypeError, AttributeError, InputError) as exc:
        raise Conflict(
            f"an interrupted init's record cannot be read ({type(exc).__name__}): run "
            "`sekisho audit verify`"
        ) from None
    if key_backend != services.settings.key_backend:
        raise Conflict(
            f"the interrupted init used the {key_backend} key backend: run `sekisho init` "
            "again with the same options to finish it"
        )
    return plan


INIT_LOCK = "init.lock"


@dataclasses.dataclass(frozen=True)
class Initialised:
    cas: list[CertificateAuthority]
    resumed: bool


def initialise(services: Services, plan: InitPlan, actor: Actor) -> Initialised:
    """Create the deployment of ``plan``, or finish an interrupted one (its own plan, from
    its first journal record): what exists is kept, what is missing is made; a CA key that
    an interrupted step left without its CA (a software key file) is replaced, one on a
    token adopted. INIT_DONE is journalled last: until then the deployment is not
    initialised, and every command but ``init`` and ``run`` says so."""
    # One init at a time on a data directory: a second waits, then finds the first's work.
    with exclusive_lock(services.settings.data_dir / INIT_LOCK):
        state = init_state(services.db)
        if state is InitState.COMPLETE:
            raise Conflict("this deployment is already initialised")
        resumed = state is InitState.INTERRUPTED
        if resumed:
            plan = _begun_plan(services)
        return Initialised(_initialise(services, plan, actor, resumed), resumed)


def _initialise(
    services: Services, plan: InitPlan, actor: Actor, resumed: bool
) -> list[CertificateAuthority]:
    # Every name before anything is created: a refused issuing CA name must not leave a root.
    plan.check()
    with services.db.read_scope() as session:
        existing = {row.name: row for row in session.scalars(select(CertificateAuthority))}
    # Before anything is created: adopted keys must be usable, and a token must not already
    # hold an audit key under our label (another deployment with the same label prefix;
    # when resuming, it is the interrupted init's own).
    for name, ref in plan.adopt.items():
        if name not in existing:
            check_adoptable(services.ca, ref)
    audit_ref = audit_key_ref(services.backend)
    key_backend = services.settings.key_backend
    if not resumed and key_backend == "pkcs11" and services.backend.has_key(audit_ref):
        raise Conflict(
            f"the token already holds an audit key {audit_ref}: another deployment uses this "
            "label prefix; set a distinct pkcs11_label_prefix (or delete that key)"
        )
    detail = _plan_detail(plan, key_backend)
    if not resumed:
        # Before any key, the audit key included: an init stopped from here on is finished by
        # the next one (a token's audit key made by it is then its own, not a conflict).
        _journal_event(services, actor, INIT_BEGUN, detail)
    enable_checkpoints(services)
    with services.db.scope() as session:
        services.journal.checkpoint(session, services.clock())  # the first record signed now
    created = []
    if plan.root_name in existing:
        created.append(existing[plan.root_name])
    else:
        created.append(
            create_root(
                services.ca,
                plan.root_name,
                plan.organization,
                plan.key_type,
                actor,
                key_ref=plan.adopt.get(plan.root_name)
                or _leftover_key(services, actor, plan.root_name, resumed),
            )
        )
    for name in plan.issuing:
        if name in existing:
            created.append(existing[name])
            continue
        created.append(
            create_issuing(
                services.ca,
                name,
                plan.root_name,
                plan.organization,
                plan.key_type,
                actor,
                plan.constraints,
                key_ref=plan.adopt.get(name) or _leftover_key(services, actor, name, resumed),
            )
        )
    now = services.clock()
    for row in created:
        services.crls.publish(row.name, now, actor=actor)
    # A delegated OCSP responder per issuing CA (its certificate is pre-signed on issuance).
    ensure_responders(services, now, actor)
    publish_ca_files(services)
    _journal_event(services, actor, INIT_DONE, {**detail, "resumed": resumed})
    # The init's own records (its CAs, CRLs, responders, INIT_DONE) signed before it returns:
    # they waited unsigned until the next append or serve's refresher, for days on a
    # deployment served later, and could be rewritten meanwhile unnoticed. INIT_DONE is
    # journalled: a failure here is logged, not raised (the init is done; a rerun would say
    # "already initialised"), and the next command or append signs them.
    AuditCheckpointer(services).seal(services.clock())
    return created


def _leftover_key(services: Services, actor: Actor, name: str, resumed: bool) -> str | None:
    """When finishing an interrupted init, a key it may have made for CA ``name`` before the
    CA's row existed: a software key file is set aside (renamed, kept: it could also be an
    older deployment's, whose database was removed) and journalled, and None returned for a
    new key; a key on the token is adopted (keys on a token are not touched behind the
    operator's back). A fresh init touches nothing: a key already there is a conflict."""
    ref = services.backend.reference(ca_key_label(name))
    if not resumed or not services.backend.has_key(ref):
        return None
    if not isinstance(services.backend, SoftwareBackend):
        return ref
    stamp = services.clock().strftime("%Y%m%dT%H%M%SZ")
    aside = services.backend.set_aside(ref, f"set-aside-{stamp}")
    _journal_event(
        services, actor, "ca.key.set_aside", {"ca": name, "key_ref": ref, "file": aside.name}
    )
    return None


def _journal_event(services: Services, actor: Actor, action: str, detail: dict[str, Any]) -> None:
    """Journal a successful CA (``ca.*``) or system event of ``actor`` in its own transaction."""
    category = Category.CA if action.startswith("ca.") else Category.SYSTEM
    with services.db.scope() as session:
        services.journal.append(
            session,
            by_actor(actor, category, action, Outcome.SUCCESS, detail=detail),
            services.clock(),
        )


def publish_ca_files(services: Services) -> None:
    """Write each CA certificate as PEM under <data_dir>/public/ for operators to pick up."""
    out = services.settings.data_dir / "public"
    out.mkdir(parents=True, exist_ok=True)
    with services.db.scope() as session:
        for row in session.scalars(select(CertificateAuthority)):
            cert = x509.load_der_x509_certificate(row.certificate_der)
            (out / f"{row.name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
