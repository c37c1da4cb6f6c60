"""Shared fixtures: a real initialised deployment per test (software keys; the store on SQLite
and on a real PostgreSQL), and a key backend that records every signature.

An initialised deployment is built once per session per database and copied for each test:
key derivation (scrypt) is deliberately slow, tests should not pay it each
time. SQLite: the data directory (keys + ``sekisho.db``) is copied. PostgreSQL: the data
directory (keys) is copied and the database is cloned with ``CREATE DATABASE ... TEMPLATE``;
the copy's ``sekisho.toml`` names that database, so anything that loads settings from the data
directory (CLI, web app) uses it too.

Every test that uses ``settings`` / ``services`` / ``data_dir`` runs once per database
(ids ``[sqlite]`` and ``[postgres]``; the latter is marked ``postgres``). A missing PostgreSQL
fails those tests; set ``TEST_SKIP_PG=1`` to skip them instead (or ``-m "not postgres"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from hsm.base import KeyBackend, KeyType
from hsm.observed import observed
from sekisho.bootstrap import InitPlan, initialise
from sekisho.context import Actor
from sekisho.services import (
    AUDIT_KEY_LABEL,
    Services,
    build_services,
    ensure_data_dir,
    open_backend,
)
from sekisho.settings import Settings, load_settings
from tests.support import pg
from tests.support import softhsm as softhsm_support


def _remember_decrypted_keys() -> None:
    """Every test copies the same initialised deployment, so each in-process test would decrypt
    the same key files again with a deliberately slow KDF (0.1 s each on a slow machine; about
    a fifth of the suite's time). The software backend's decryption is therefore remembered
    here, per process, by the exact encrypted bytes and passphrase: the first decryption of each
    file runs the real derivation, a different file, a re-encrypted one or a wrong passphrase is
    a different key (a wrong one fails the real way), and tests that call ``hsm.pbes2``
    themselves, the CLI and servers run as child processes, and production are untouched
    (child processes that import the tests' modules, the chaos test's workers, remember too)."""
    import hsm.software

    real = hsm.software.decrypt_private_key
    known: dict[tuple[bytes, bytes], object] = {}
    lock = threading.Lock()

    def decrypt_private_key(der: bytes, passphrase: bytes):  # type: ignore[no-untyped-def]
        with lock:
            key = known.get((der, passphrase))
        if key is None:
            key = real(der, passphrase)
            with lock:
                known[(der, passphrase)] = key
        return key

    hsm.software.decrypt_private_key = decrypt_private_key  # type: ignore[assignment]


_remember_decrypted_keys()

BASE_URL = "http://pki.example.com"
TEST_ACTOR = Actor(account="test:operator", client_ip="127.0.0.1")


class RecordingBackend:
    """Wraps a real backend; every ``sign()`` through any key it hands out is recorded as
    (key_ref, signed bytes). Proves the one signing seam."""

    def __init__(self, inner: KeyBackend) -> None:
        self.inner = inner
        self.name = f"recording({inner.name})"
        self.calls: list[tuple[str, bytes]] = []

    def generate(self, label: str, key_type: KeyType) -> str:
        return self.inner.generate(label, key_type)

    def signatures_but_checkpoints(self) -> list[tuple[str, bytes]]:
        """The calls but the audit key's: a checkpoint is signed at any journal append once
        the checkpoint interval has passed, which a long test run reaches at any moment."""
        audit = self.reference(AUDIT_KEY_LABEL)
        return [call for call in self.calls if call[0] != audit]

    def reference(self, label: str) -> str:
        return self.inner.reference(label)

    def public_key(self, ref: str):  # type: ignore[no-untyped-def]
        return self.inner.public_key(ref)

    def signing_key(self, ref: str) -> CertificateIssuerPrivateKeyTypes:
        return observed(self.inner.signing_key(ref), lambda data: self.calls.append((ref, data)))

    def has_key(self, ref: str) -> bool:
        return self.inner.has_key(ref)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> object:  # export/import capabilities pass through
        return getattr(self.inner, name)


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "base_url": BASE_URL,
        "audit_checkpoint_every": 50,
    }
    values.update(overrides)
    return load_settings(env={}, overrides=values)


def _initialise(settings: Settings) -> None:
    ensure_data_dir(settings, create=True)
    services = build_services(settings)
    try:
        initialise(services, InitPlan(organization="Example Corp"), TEST_ACTOR)
    finally:
        services.close()


@pytest.fixture(scope="session")
def template_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised SQLite deployment (data directory with keys and ``sekisho.db``)."""
    data_dir = tmp_path_factory.mktemp("template") / "data"
    _initialise(make_settings(data_dir))
    return data_dir


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg.PgCluster]:
    """One throwaway PostgreSQL server for the session, stopped (by PID) at the end."""
    if os.environ.get("TEST_SKIP_PG") == "1":
        pytest.skip("PostgreSQL tests skipped (TEST_SKIP_PG=1)")
    reason = pg.available()
    if reason is not None:
        pytest.fail(f"{reason}; set TEST_SKIP_PG=1 to skip the PostgreSQL tests", pytrace=False)
    with pg.PgCluster() as cluster:
        yield cluster


PG_TEMPLATE_DB = "sekisho_template"


@pytest.fixture(scope="session")
def pg_template(
    pg_cluster: pg.PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """An initialised PostgreSQL deployment: (data directory with the keys, template db)."""
    data_dir = tmp_path_factory.mktemp("pg-template") / "data"
    url = pg_cluster.create_database(PG_TEMPLATE_DB)
    # All connections are closed again by _initialise: a template must have none.
    _initialise(make_settings(data_dir, database_url=url))
    return data_dir, PG_TEMPLATE_DB


@dataclasses.dataclass(frozen=True)
class Deployment:
    backend: str  # "sqlite" or "postgres"
    data_dir: Path
    database_url: str  # "" for the embedded SQLite default


_DB_NUMBERS = itertools.count(1)


@pytest.fixture
def db_backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgres`` (parametrized below)."""
    return str(request.param)


@pytest.fixture
def key_backend(request: pytest.FixtureRequest) -> str:
    """``software``, unless the test module opts in to the PKCS#11 runs (see below)."""
    return str(getattr(request, "param", "software"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test on a deployment runs on SQLite and on PostgreSQL with software keys (ids
    ``[sqlite]``, ``[postgres]``). A module that sets ``KEY_BACKENDS = ("software",
    "pkcs11")`` runs each once more on SQLite with every key on a SoftHSM2 token
    (``[sqlite-pkcs11]``)."""
    if "db_backend" not in metafunc.fixturenames:
        return
    params = [
        pytest.param("sqlite", "software", id="sqlite"),
        pytest.param("postgres", "software", id="postgres", marks=pytest.mark.postgres),
    ]
    if "pkcs11" in getattr(metafunc.module, "KEY_BACKENDS", ("software",)):
        params.append(
            pytest.param("sqlite", "pkcs11", id="sqlite-pkcs11", marks=pytest.mark.pkcs11)
        )
    if "key_backend" in metafunc.fixturenames:
        metafunc.parametrize(("db_backend", "key_backend"), params, indirect=True)
    else:
        metafunc.parametrize(
            "db_backend",
            [pytest.param(*p.values[:1], id=p.id, marks=p.marks) for p in params[:2]],
            indirect=True,
        )


TEST_TOKEN = "sekisho-test"  # the keys of the pkcs11 template deployment
FAULT_TOKEN = "sekisho-fault"  # a token the fault-injection tests take away and bring back


@pytest.fixture(scope="session")
def softhsm() -> Iterator[softhsm_support.SoftHsm]:
    """A SoftHSM2 token directory for the session, with the tokens the tests use."""
    reason = softhsm_support.available()
    if reason is not None:
        pytest.fail(f"{reason}; `make test` installs it", pytrace=False)
    hsm = softhsm_support.start((TEST_TOKEN, FAULT_TOKEN))
    yield hsm
    hsm.remove()


@pytest.fixture(scope="session")
def pkcs11_template_dir(
    softhsm: softhsm_support.SoftHsm, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An initialised SQLite deployment whose keys (CAs, OCSP responders, audit) are on the
    SoftHSM token; its ``sekisho.toml`` carries the backend settings (PIN file, not the PIN)."""
    data_dir = tmp_path_factory.mktemp("pkcs11-template") / "data"
    softhsm.write_settings(data_dir, TEST_TOKEN, "t-")
    _initialise(make_settings(data_dir))
    return data_dir


@pytest.fixture
def deployment(
    db_backend: str, key_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Deployment]:
    """A fresh copy of the initialised deployment for this test, on ``db_backend`` (keys in
    software, or on the SoftHSM token for ``key_backend == "pkcs11"``)."""
    with copied_deployment(request, tmp_path / "data", db_backend, key_backend) as copy:
        yield copy


@contextlib.contextmanager
def copied_deployment(
    request: pytest.FixtureRequest, target: Path, db_backend: str, key_backend: str = "software"
) -> Iterator[Deployment]:
    """A copy of the initialised deployment in ``target`` (its PostgreSQL database dropped on
    the way out), for the ``deployment`` fixture and for fixtures of a wider scope."""
    if key_backend == "pkcs11":
        assert db_backend == "sqlite"
        shutil.copytree(request.getfixturevalue("pkcs11_template_dir"), target)
        yield Deployment("sqlite", target, "")
        return
    if db_backend == "sqlite":
        shutil.copytree(request.getfixturevalue("template_dir"), target)
        yield Deployment("sqlite", target, "")
        return
    cluster: pg.PgCluster = request.getfixturevalue("pg_cluster")
    template_data, template_db = request.getfixturevalue("pg_template")
    shutil.copytree(template_data, target)
    name = f"t{os.getpid()}_{next(_DB_NUMBERS)}"
    url = cluster.create_database(name, template=template_db)
    (target / "sekisho.toml").write_text(f'[sekisho]\ndatabase_url = "{url}"\n')
    try:
        yield Deployment("postgres", target, url)
    finally:
        # FORCE ends sessions a test left open (services it built and never closed).
        cluster.drop_database(name)


@pytest.fixture
def data_dir(deployment: Deployment) -> Path:
    return deployment.data_dir


@pytest.fixture
def settings(deployment: Deployment) -> Settings:
    if deployment.database_url:
        return make_settings(deployment.data_dir, database_url=deployment.database_url)
    return make_settings(deployment.data_dir)


@pytest.fixture
def recording_backend(settings: Settings) -> RecordingBackend:
    return RecordingBackend(open_backend(settings))


@pytest.fixture
def services(settings: Settings, recording_backend: RecordingBackend) -> Iterator[Services]:
    svc = build_services(settings, backend=recording_backend)
    yield svc
    svc.close()


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start.replace(microsecond=0)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += dt.timedelta(**kwargs)
