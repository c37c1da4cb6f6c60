"""Public PKI endpoints: /healthz, /crl/<ca>.crl, /crl/<ca>-delta.crl, /ca/<ca>.crt.

CRLs are served with ETag (SHA-256 of the DER), Last-Modified (thisUpdate), Expires
(nextUpdate) and a short max-age so caches pick up a new CRL within minutes. Conditional
requests are answered by :mod:`web.conditional` (RFC 9110 section 13).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, abort, current_app
from sqlalchemy import select, text

from ca.crl import freshness, latest_by_name
from ca.models import CertificateAuthority, Crl, CrlKind
from ca.registry import DELTA_SUFFIX, is_ca_name
from sekisho.settings import Settings
from sekisho.workers import heartbeat_age, heartbeat_failures
from web import services_of
from web.conditional import conditional_response, http_date

bp = Blueprint("pki", __name__)
CRL_MAX_AGE = 300


@bp.get("/healthz")
def healthz() -> tuple[dict[str, Any], int]:
    services = services_of(current_app)
    grace = dt.timedelta(seconds=services.settings.refresher_stuck_seconds)
    try:
        with services.db.read_scope() as session:
            session.execute(text("SELECT 1"))
            crls = freshness(session, services.clock(), grace)
    except Exception:  # noqa: BLE001  (health must answer, whatever broke)
        return {"status": "unavailable", "database": "down"}, 503
    doc: dict[str, Any] = {"status": "ok", "database": "ok"}
    if crls:
        # A CRL past half its validity, expired, missing, or behind status changes that an
        # offline key cannot sign: still 200 (what is served is what there is), but the probe
        # that watches this must alarm (ca.crl.freshness says what each word means).
        doc["crl"] = crls
        doc["status"] = "degraded"
    if services.journal.signer is None:
        # The audit key was missing at start: operations go on and are journalled, but no
        # checkpoint signs them, so they could be rewritten unnoticed (`audit verify` fails
        # once they wait past the interval plus an hour). Still 200: what is served is right.
        doc["audit_key"] = "missing"
        doc["status"] = "degraded"
    # Under `serve` the workers are the arbiter's children, and its refresher process (CRLs,
    # OCSP, audit checkpoints) says it went round by a file: stale, CRLs and OCSP answers
    # age while the endpoints still answer (200: these answers are still right).
    age = heartbeat_age(services.settings, os.getppid())
    if age is not None:
        fresh = age < services.settings.refresher_stuck_seconds / 2
        doc["refresher"] = "ok" if fresh else "stale"
        if not fresh:
            doc["status"] = "degraded"
        else:
            _lasting_failures(doc, services.settings)
    return doc, 200


def _lasting_failures(doc: dict[str, Any], settings: Settings) -> None:
    """What the refresher's rounds have failed to do for half ``refresher_stuck_seconds`` or
    more: a step (``refresher_failing``: step -> error code) or a CA's CRL (``crl``:
    "failing", where the CRL is not already named stale, expired, missing or pending).
    Degraded: a CRL that pkilint refuses, or a token that will not sign, is otherwise only in
    the log until the CRL goes stale, days later. Shorter failures (a database restart) are
    left to the log."""
    report = heartbeat_failures(settings, os.getppid())
    least = settings.refresher_stuck_seconds / 2
    now = time.time()

    def lasting(kind: str) -> dict[str, str]:
        found = {}
        for key, failure in report.get(kind, {}).items():
            if not isinstance(failure, dict):
                continue
            since, code = failure.get("since"), failure.get("code")
            if isinstance(since, int | float) and now - since >= least:
                found[str(key)] = str(code)
        return found

    steps, crls = lasting("steps"), lasting("crls")
    if steps:
        doc["refresher_failing"] = steps
    for ca in crls:
        doc.setdefault("crl", {}).setdefault(ca, "failing")
    if steps or crls:
        doc["status"] = "degraded"


def _cached_response(
    body: bytes | Callable[[], bytes],
    mimetype: str,
    etag: str,
    last_modified: dt.datetime,
    expires: dt.datetime | None,
    max_age: int,
    second_is_own: Callable[[], bool] | None = None,
) -> Response:
    cache = {"Cache-Control": f"public, max-age={max_age}, no-transform"}
    if expires is not None:
        cache["Expires"] = http_date(expires)
    now = services_of(current_app).clock()
    return conditional_response(body, mimetype, etag, last_modified, now, cache, second_is_own)


@bp.get("/crl/<string:filename>")
def crl(filename: str) -> Response:
    if not filename.endswith(".crl"):
        abort(404)
    stem = filename[:-4]
    kind = CrlKind.FULL
    if stem.endswith(DELTA_SUFFIX):
        stem, kind = stem.removesuffix(DELTA_SUFFIX), CrlKind.DELTA
    if not is_ca_name(stem):
        abort(404)
    services = services_of(current_app)
    if kind is CrlKind.DELTA and not services.crls.deltas:
        abort(404)  # turned off: a delta made before is based on an older full CRL
    with services.db.read_scope(snapshot=True) as session:
        # The validators first; the DER (50 MB at 10^6 entries) only if it is sent: a client
        # polling with If-None-Match gets its 304 without it. No process-wide cache: one keyed
        # by CRL number served another deployment's CRL (same name and number) under this
        # ETag.
        row = latest_by_name(session, stem, kind, der=False)
        if row is None:
            abort(404)
        crl_id, sha, this_update, next_update = row.id, row.sha256, row.this_update, row.next_update
        issuer_id, number = row.issuer_id, row.number

        def der() -> bytes:
            # The same snapshot: the row read above, even if a newer CRL landed meanwhile.
            return bytes(session.scalars(select(Crl.der).where(Crl.id == crl_id)).one())

        def second_is_own() -> bool:
            # thisUpdate never goes back, but two CRLs may share a second (a burst, a slow
            # clock): then a client holding the older one sends the same If-Modified-Since,
            # and only the ETag tells them apart.
            previous = session.scalar(
                select(Crl.this_update)
                .where(Crl.issuer_id == issuer_id, Crl.kind == kind, Crl.number < number)
                .order_by(Crl.number.desc())
                .limit(1)
            )
            return previous is None or previous.replace(microsecond=0) < this_update.replace(
                microsecond=0
            )

        now = services.clock()
        remaining = max(0, int((next_update - now).total_seconds()))
        return _cached_response(
            der,
            "application/pkix-crl",
            sha,
            this_update,
            next_update,
            min(CRL_MAX_AGE, remaining),
            second_is_own,
        )


@bp.get("/ca/<string:filename>")
def ca_certificate(filename: str) -> Response:
    if not filename.endswith(".crt") or not is_ca_name(filename[:-4]):
        abort(404)
    services = services_of(current_app)
    with services.db.read_scope() as session:
        row = session.scalar(
            select(CertificateAuthority).where(CertificateAuthority.name == filename[:-4])
        )
        if row is None:
            abort(404)
        der, created = row.certificate_der, row.not_before
    return _cached_response(
        der, "application/pkix-cert", hashlib.sha256(der).hexdigest(), created, None, 86400
    )
