"""Background work of the serving process: keeping CRLs and pre-signed OCSP responses fresh,
and signing an audit checkpoint over records that waited unsigned for the checkpoint interval.

The refresher polls each online CA's revocation epoch (cheap: one row) once per tick. After
a change it waits until revocations have been quiet for ``debounce`` seconds (or at most five
times that since the first change), then publishes a new full CRL and then a delta CRL against
it: a burst of revocations yields one new CRL within seconds. CRLs are also
re-issued once half their validity has passed. Changes made by other processes (the CLI, other
web workers) are seen the same way, through the database. A CA whose certificate has expired
(or is about to: ``ca.crl.check_can_publish``) is skipped, with one warning. Every
``PRUNE_EVERY``, CRLs that ended more than ``crl_keep_days`` ago are deleted (each CA's newest
full and delta CRL stay).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from audit.events import Category, by_actor
from ca.crl import check_can_publish, due, latest
from ca.models import CertificateAuthority, CrlKind
from ocsp.signers import ensure_responders, replace_revoked_responders
from sekisho.context import Actor
from sekisho.errors import AuditError, Conflict, PolicyViolation, SekishoError, StoreError
from sekisho.files import replace_synced
from sekisho.services import Services
from sekisho.settings import Settings

log = logging.getLogger("sekisho.crl")
# A CA whose CRL failed is tried again after this, or at once when its revocation state moves.
CRL_RETRY = dt.timedelta(seconds=30)
PRUNE_EVERY = dt.timedelta(hours=1)  # how often the refresher deletes CRLs past crl_keep_days


@dataclasses.dataclass
class _Pending:
    first_seen: dt.datetime
    last_change: dt.datetime
    epoch: int


class OcspRefresher:
    """The OCSP step of the refresher loop: re-sign pre-signed responses past their refresh
    point (and repair missing or stale ones) every tick, in batches; check the delegated
    responders (provision, rotate) every ``responder_every``. Every tick too: replace a
    responder whose certificate was revoked (its listener in the revoking process may have
    failed) and re-sign the answers it signed, without waiting for the next tick while any
    are left (``hurry``)."""

    def __init__(
        self,
        services: Services,
        *,
        batch: int = 500,
        responder_every: dt.timedelta = dt.timedelta(hours=1),
        journal_every: dt.timedelta = dt.timedelta(hours=1),
    ) -> None:
        self.services = services
        self.batch = batch
        self.responder_every = responder_every
        self.journal_every = journal_every
        self._responders_checked: dt.datetime | None = None
        self.signed = 0
        # Re-signing is journalled as runs, not per tick: one ``ocsp.refresh`` entry with the
        # count signed since the last one, at most every ``journal_every``.
        self._unjournalled = 0
        self._run_started: dt.datetime | None = None

    @property
    def hurry(self) -> bool:
        """Answers signed by a revoked responder are left to re-sign: tick again at once."""
        return self.services.ocsp.resigning

    def run_once(self, now: dt.datetime) -> int:
        checked = self._responders_checked
        try:
            if checked is None or now - checked >= self.responder_every:
                ensure_responders(self.services, now)
                self._responders_checked = now
            else:
                replace_revoked_responders(self.services, now)
        except (StoreError, AuditError):
            raise  # the store or the journal is away: the whole step fails (and is retried)
        except SekishoError as exc:
            # One CA's responder could not be made (its key away ...): logged per CA by
            # ocsp.signers, tried again next tick; the answers of every CA are still kept
            # signed below. Before, one CA's failure stopped them all.
            log.warning("OCSP responders not all in order", extra={"error": exc.code})
        signed = self.services.ocsp.resign_from_revoked(now, self.batch)
        signed += self.services.ocsp.refresh_due(now, self.batch)
        self.signed += signed
        if signed:
            log.info("re-signed OCSP responses", extra={"count": signed})
            if self._run_started is None:
                self._run_started = now
            self._unjournalled += signed
        started = self._run_started
        if started is not None and (signed == 0 or now - started >= self.journal_every):
            # The run is over (nothing was due this tick) or has lasted long enough.
            self._journal_run(started, now)
        return signed

    def _journal_run(self, started: dt.datetime, now: dt.datetime) -> None:
        with self.services.db.scope() as session:
            self.services.journal.append(
                session,
                by_actor(
                    Actor(account="system:ocsp"),
                    Category.CA,
                    "ocsp.refresh",
                    detail={"signed": self._unjournalled, "started": started.isoformat()},
                ),
                now,
            )
        self._unjournalled = 0
        self._run_started = None


class AuditCheckpointer:
    """The journal step of the refresher loop: sign a checkpoint over records that waited
    unsigned for the checkpoint interval (one unlocked read per tick when nothing is due)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.signed = 0

    def run_once(self, now: dt.datetime) -> bool:
        journal = self.services.journal
        with self.services.db.read_scope() as session:
            if not journal.tail_due(session, now):
                return False
        with self.services.db.scope() as session:
            signed = journal.checkpoint_if_due(session, now) is not None
        if signed:
            self.signed += 1
            log.info("signed an audit checkpoint over a quiet journal's tail")
        return signed

    def seal(self, now: dt.datetime) -> bool:
        """Sign whatever waits unsigned, due or not: a command or the refresher ending, after
        which nothing would sign it until the next append (and `audit verify` reports a tail
        left unsigned for long). A failure is logged, never raised: what was done stays done."""
        journal = self.services.journal
        if journal.signer is None:
            return False
        try:
            with self.services.db.read_scope() as session:
                if not journal.tail_unsigned(session):
                    return False
            with self.services.db.scope() as session:
                return journal.checkpoint(session, now) is not None
        except SekishoError as exc:
            log.warning(
                "the journal's last records were left unsigned",
                extra={"code": exc.code, "detail": exc.message},
            )
            return False


class CrlRefresher:
    def __init__(
        self, services: Services, *, debounce: float | None = None, tick: float = 1.0
    ) -> None:
        self.services = services
        self.debounce = dt.timedelta(
            seconds=services.settings.crl_debounce_seconds if debounce is None else debounce
        )
        self.tick = tick
        self._pending: dict[str, _Pending] = {}
        self._ended: set[str] = set()  # CAs that can sign no more CRLs, already logged
        self._ca_failing = Failures()  # CA -> why its CRL was not published, logged
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0
        self.ocsp = OcspRefresher(services)
        self.audit = AuditCheckpointer(services)
        self._failing = Failures()  # step -> the failure last logged
        self._pruned_at: dt.datetime | None = None
        self._prune_failed: Exception | None = None  # the last prune's failure, if it failed
        # CA -> (time, revocation epoch): its CRL failed; not tried again before that time
        # unless the epoch moves (a CRL the lint gate refuses, read and refused every tick).
        self._ca_retry: dict[str, tuple[dt.datetime, int]] = {}
        # Called after every round of the loop with ``failures()`` (``serve``: writes a file
        # that the arbiter watches and /healthz reads).
        self.heartbeat: Callable[[dict[str, Any]], None] | None = None
        self._beat_failed = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="crl-refresher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def poke(self, *_change: int) -> None:
        """Look now instead of at the next tick (also a revocation listener: (CA id, epoch))."""
        self._wake.set()

    def _loop(self) -> None:
        steps: list[tuple[str, Callable[[dt.datetime], object]]] = [
            # Before the CRLs: a certificate of a blocked key revoked now is on this tick's.
            ("blocked keys", self.services.revoker.revoke_blocked),
            ("crl refresh", self.run_once),
            ("crl prune", self.prune_once),
            ("ocsp refresh", self.ocsp.run_once),
            ("audit checkpoint", self.audit.run_once),
        ]
        while not self._stop.is_set():
            for name, step in steps:
                self._run_step(name, step)
            self._beat()
            # Hurry only while the OCSP step works: failing before its sweep (store or token
            # away), it would leave the flag up and the loop spinning through the outage.
            if not (self.ocsp.hurry and "ocsp refresh" not in self._failing):
                self._wake.wait(self.tick)
            self._wake.clear()
        # Stopping (serve ends): what the journal holds unsigned would wait for the next
        # append, for as long as the service is down.
        self.audit.seal(self.services.clock())

    def _beat(self) -> None:
        """Say the loop went round (``heartbeat``: the serving arbiter watches it)."""
        if self.heartbeat is None:
            return
        try:
            self.heartbeat(self.failures())
        except OSError as exc:
            if not self._beat_failed:
                self._beat_failed = True
                log.warning("refresher heartbeat not written", extra={"detail": str(exc)})
        else:
            self._beat_failed = False

    def failures(self) -> dict[str, Any]:
        """What fails as this round ends: {"steps": {step: failure}, "crls": {CA: failure}},
        each failure {"code": error code, "since": Unix time it began}; the codes only, no
        messages (/healthz shows them to anyone)."""
        return {"steps": self._failing.report(), "crls": self._ca_failing.report()}

    def _run_step(self, name: str, step: Callable[[dt.datetime], object]) -> None:
        """One step of a tick. A failure is logged when it starts (and when it changes), not
        on every tick while it lasts (a store or key away for an hour is one warning, not
        3,600); the recovery is logged too."""
        try:
            step(self.services.clock())
        except Exception as exc:
            if self._failing.record(name, exc):
                if isinstance(exc, SekishoError):
                    log.warning(
                        "refresher step failed",
                        extra={"step": name, "code": exc.code, "detail": exc.message},
                    )
                else:
                    log.error("refresher step crashed", extra={"step": name}, exc_info=exc)
            return
        if self._failing.clear(name):
            log.info("refresher step works again", extra={"step": name})

    def run_once(self, now: dt.datetime) -> list[str]:
        """One pass over every online CA; returns the names whose CRLs were published."""
        with self.services.db.scope() as session:
            cas = [
                (ca.name, ca.id, int(ca.revocation_epoch), ca.not_after)
                for ca in session.scalars(
                    select(CertificateAuthority).where(
                        CertificateAuthority.active.is_(True),
                        CertificateAuthority.key_online.is_(True),
                    )
                )
            ]
            state = {
                name: (
                    latest(session, ca_id, CrlKind.FULL, der=False),
                    latest(session, ca_id, CrlKind.DELTA, der=False),
                )
                for name, ca_id, _, _ in cas
            }
        published = []
        for name, _ca_id, epoch, not_after in cas:
            if not self._can_publish(name, not_after, now):
                continue
            full, delta = state[name]
            stale = full is None or epoch > full.epoch
            if not stale:
                # Published meanwhile (by another process): a later burst starts afresh, not
                # "overdue" from this one's first revocation.
                self._pending.pop(name, None)
            elif full is not None:
                pending = self._pending.get(name)
                if pending is None:
                    self._pending[name] = _Pending(now, now, epoch)
                    continue
                if now < pending.last_change:  # the clock stepped back: the burst starts now
                    pending.first_seen = pending.last_change = now
                if epoch != pending.epoch:
                    pending.epoch, pending.last_change = epoch, now
                quiet = now - pending.last_change >= self.debounce
                overdue = now - pending.first_seen >= self.debounce * 5
                if not (quiet or overdue):
                    continue
            # Delta CRLs turned off since the newest full CRL was made with its delta: that
            # full CRL's Freshest CRL pointer leads to a delta no longer served or renewed.
            pointing = (
                not self.services.crls.deltas
                and full is not None
                and delta is not None
                and delta.base_number == full.number
            )
            # The delta served names an older full CRL as its base (the full CRL was published
            # and its delta failed): RFC 5280 5.2.4 clients discard it, so it is due now.
            old_base = full is not None and delta is not None and delta.base_number != full.number
            retry = self._ca_retry.get(name)
            if retry is not None and retry[0] - CRL_RETRY <= now < retry[0] and epoch == retry[1]:
                continue  # failed lately (a clock stepped back does not stretch it), no change
            # A CRL the lint gate refuses is journalled once for a run of refusals, not at
            # every try (CRL_RETRY): each try after the first is refused the same way.
            journal = self._ca_failing.code(name) != PolicyViolation.code
            try:
                if stale or pointing or due(full, epoch, now):
                    self.services.crls.publish(name, now, journal_refusal=journal)
                    self._pending.pop(name, None)
                    published.append(name)
                elif self.services.crls.deltas and (
                    delta is None or old_base or due(delta, epoch, now)
                ):
                    self.services.crls.generate(name, now, delta=True, journal_refusal=journal)
                    published.append(name)
            except SekishoError as exc:
                # One CA's CRL that cannot be signed (its key away) stops no other CA's.
                self._ca_failed(name, exc)
                self._ca_retry[name] = (now + CRL_RETRY, epoch)
                continue
            self._ca_retry.pop(name, None)
            if self._ca_failing.clear(name):
                log.info("CRLs of a CA published again", extra={"ca": name})
        # A CA that left the pass (its key taken offline, made inactive) is no longer failing
        # here: /healthz says "pending" for what waits on an offline key.
        in_pass = {name for name, _, _, _ in cas}
        self._ca_failing.keep(in_pass)
        for name in self._ca_retry.keys() - in_pass:
            del self._ca_retry[name]
        self.published += len(published)
        if published:
            log.info("published CRLs", extra={"cas": ",".join(published)})
        return published

    def _ca_failed(self, name: str, exc: SekishoError) -> None:
        """Logged when it starts or changes, not every tick while it lasts."""
        if self._ca_failing.record(name, exc):
            log.warning(
                "CRL of a CA not published",
                extra={"ca": name, "code": exc.code, "detail": exc.message},
            )

    def prune_once(self, now: dt.datetime) -> int:
        """Delete the CRLs past ``crl_keep_days`` (ca.crl.CrlPublisher.prune), at most once
        every PRUNE_EVERY (and at the first tick)."""
        if self._pruned_at is not None and self._pruned_at <= now < self._pruned_at + PRUNE_EVERY:
            if self._prune_failed is not None:
                # Still failing (for /healthz) until it is tried again; without the first
                # raise's traceback, which each raise would lengthen.
                raise self._prune_failed.with_traceback(None)
            return 0
        self._pruned_at = now  # a failure is tried again in an hour, not every tick
        self._prune_failed = None
        try:
            deleted = self.services.crls.prune(now, self.services.settings.crl_keep)
        except Exception as exc:
            self._prune_failed = exc
            raise
        if deleted:
            log.info("deleted old CRLs", extra={"count": deleted})
        return deleted

    def _can_publish(self, name: str, not_after: dt.datetime, now: dt.datetime) -> bool:
        """False for a CA whose certificate ends too soon to sign a CRL: skipped without a
        generation attempt (no journal entry, no busy loop), and logged once, not every tick."""
        try:
            check_can_publish(name, not_after, now)
        except Conflict as exc:
            self._pending.pop(name, None)
            self._ca_failing.clear(name)  # it no longer tries: /healthz leaves it out too
            self._ca_retry.pop(name, None)
            if name not in self._ended:
                self._ended.add(name)
                log.warning("CRLs no longer published", extra={"ca": name, "detail": exc.message})
            return False
        self._ended.discard(name)
        return True


class Failures:
    """What is failing (a refresher step, a CA's CRL), how, and since when."""

    def __init__(self) -> None:
        self._what: dict[str, str] = {}  # key -> the failure last logged
        self._since: dict[str, tuple[str, float]] = {}  # key -> (error code, Unix time begun)

    def __contains__(self, key: object) -> bool:
        return key in self._what

    def record(self, key: str, exc: Exception) -> bool:
        """Record ``exc`` as ``key``'s failure: True when that failure starts or changes (log
        it), False while the same one lasts (a store away for an hour is one warning, not
        3,600). A failure that changes keeps the time the first began."""
        code = exc.code if isinstance(exc, SekishoError) else "internal"
        what = f"{code}: {exc.message}" if isinstance(exc, SekishoError) else type(exc).__name__
        self._since[key] = (code, self._since.get(key, ("", time.time()))[1])
        if self._what.get(key) == what:
            return False
        self._what[key] = what
        return True

    def code(self, key: str) -> str | None:
        """The error code of ``key``'s failure; None when it is not failing."""
        since = self._since.get(key)
        return since[0] if since is not None else None

    def clear(self, key: str) -> bool:
        """``key`` works (again): True if it was failing."""
        self._since.pop(key, None)
        return self._what.pop(key, None) is not None

    def keep(self, keys: set[str]) -> None:
        """Forget the failures of keys not in ``keys``."""
        for key in [k for k in self._what if k not in keys]:
            self.clear(key)

    def report(self) -> dict[str, dict[str, Any]]:
        return {key: {"code": code, "since": since} for key, (code, since) in self._since.items()}


def heartbeat_file(settings: Settings, arbiter_pid: int) -> Path:
    """The file the refresher of the arbiter ``arbiter_pid`` touches after every round of its
    loop: the arbiter restarts a refresher stuck past ``refresher_stuck_seconds``, and
    ``/healthz`` (its workers are the arbiter's children) reports its age."""
    return settings.data_dir / "run" / f"refresher-{arbiter_pid}.alive"


class HeartbeatWriter:
    """The refresher's side of the heartbeat file: touched after every round, its body the
    round's failures (JSON, ``CrlRefresher.failures``), replaced whole (``replace_synced``:
    never read half-written) only when they change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._body: bytes | None = None

    def __call__(self, failures: dict[str, Any]) -> None:
        body = json.dumps(failures, sort_keys=True).encode()
        if body == self._body:
            self.path.touch()
            return
        try:
            replace_synced(self.path, body)
        except OSError:
            # The body cannot be written (a full disk): the round still went round, and the
            # arbiter must not kill a refresher that works for it. The failure is raised (and
            # logged once by the refresher); the next round writes the body again.
            self.path.touch()
            raise
        self._body = body


def heartbeat_failures(settings: Settings, arbiter_pid: int) -> dict[str, dict[str, Any]]:
    """What that refresher's last round found failing ({"steps": ..., "crls": ...}, see
    ``CrlRefresher.failures``); empty when it has said nothing readable (not started yet)."""
    try:
        doc = json.loads(heartbeat_file(settings, arbiter_pid).read_bytes() or b"{}")
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, dict)}


def heartbeat_age(settings: Settings, arbiter_pid: int) -> float | None:
    """Seconds since that refresher last went round; None when there is none to watch."""
    try:
        return max(0.0, time.time() - heartbeat_file(settings, arbiter_pid).stat().st_mtime)
    except OSError:
        return None
