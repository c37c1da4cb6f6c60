"""Shared fixtures: a real initialised deployment per test (SQLite file, software keys),
optionally on a real PostgreSQL, and a key backend that records every signature.

An initialised data directory is built once per session and copied for each test: key
derivation at 600,000 PBKDF2 iterations is deliberately slow, tests should not pay it each time.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from hsm.base import KeyBackend, KeyType
from hsm.observed import observed
from sekisho.bootstrap import InitPlan, initialise
from sekisho.context import Actor
from sekisho.services import Services, build_services, ensure_data_dir, open_backend
from sekisho.settings import Settings, load_settings

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


@pytest.fixture(scope="session")
def template_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("template") / "data"
    settings = make_settings(data_dir)
    ensure_data_dir(settings)
    services = build_services(settings)
    initialise(services, InitPlan(organization="Example Corp"), TEST_ACTOR)
    services.close()
    return data_dir


@pytest.fixture
def data_dir(template_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(template_dir, target)
    return target


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return make_settings(data_dir)


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
