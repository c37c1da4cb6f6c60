"""Review fixes of the PKCS#11 backend, on a real SoftHSM2 token: the library left
uninitialised by a re-initialisation that failed while the token's store was away, a key
that simply does not exist (no re-initialisation, no new login), adopting a URI whose public
and private objects are not one pair, and a generation retried after its reply was lost."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters

from hsm.base import KeyType
from hsm.pkcs11 import Pkcs11Backend
from hsm.uri import parse
from sekisho.errors import ConfigError, InputError, KeyBackendError, NotFound
from tests.conftest import FAULT_TOKEN
from tests.support import softhsm as softhsm_support

pytestmark = pytest.mark.pkcs11
ECDSA = ec.ECDSA(hashes.SHA256())


@pytest.fixture
def backend(softhsm: softhsm_support.SoftHsm) -> Iterator[Pkcs11Backend]:
    with softhsm.backend(FAULT_TOKEN, "r") as b:
        yield b


class _FailingKey:
    """Stands in for the cached token key object and raises a PKCS#11 error on sign()."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def sign(self, *_args: object, **_kwargs: object) -> bytes:
        raise self.error


# -- the library left uninitialised -------------------------------------------------------
def test_the_whole_token_store_away_and_back_recovers_without_a_new_backend(
    backend: Pkcs11Backend, softhsm: softhsm_support.SoftHsm
) -> None:
    """C_Initialize fails while the store (a mount, a volume) is away; python-pkcs11 then
    marks the library uninitialised, and the backend initialises it again once it is back."""
    key = backend.signing_key(backend.generate("store", KeyType.EC_P256))
    key.sign(b"before", ECDSA)
    away = softhsm.base / "tokens-away"
    shutil.move(softhsm.tokens, away)
    try:
        for _ in range(2):
            with pytest.raises(KeyBackendError):
                key.sign(b"away", ECDSA)
        assert not backend._lib.initialized  # the re-initialisation failed half-way
    finally:
        shutil.move(away, softhsm.tokens)
    signature = key.sign(b"back", ECDSA)  # the first operation after the store is back
    key.public_key().verify(signature, b"back", ECDSA)
    assert backend.has_key(backend.reference("store"))


def test_library_finalised_behind_our_back_is_initialised_again(backend: Pkcs11Backend) -> None:
    key = backend.signing_key(backend.generate("finalised", KeyType.EC_P256))
    key.sign(b"warm", ECDSA)
    backend._lib.finalize()  # another user of the module in this process
    signature = key.sign(b"after", ECDSA)
    key.public_key().verify(signature, b"after", ECDSA)


def test_not_initialised_from_the_module_is_a_lost_device(backend: Pkcs11Backend) -> None:
    """CKR_CRYPTOKI_NOT_INITIALIZED comes as a plain PKCS11Error (another lib object on the
    module finalised it, our flag still says initialised): renewed like a lost device."""
    ref = backend.generate("plain", KeyType.EC_P256)
    key = backend.signing_key(ref)
    key.sign(b"warm", ECDSA)
    logins = backend.logins
    error = p11e.PKCS11Error("Initialisation error (not initialized). Should never see this.")
    backend._keys[ref] = _FailingKey(error)
    signature = key.sign(b"after", ECDSA)
    key.public_key().verify(signature, b"after", ECDSA)
    assert backend.logins == logins + 1
    # Any other plain PKCS11Error is a refusal, not retried.
    backend._keys[ref] = _FailingKey(p11e.PKCS11Error("something else"))
    with pytest.raises(KeyBackendError, match="the token refused"):
        key.sign(b"refused", ECDSA)


# -- a key that does not exist ------------------------------------------------------------
def test_a_missing_key_is_looked_for_again_without_a_new_login(
    backend: Pkcs11Backend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.check()
    logins = backend.logins
    missing = backend.reference("nothing-here")
    with caplog.at_level(logging.WARNING, logger="sekisho.hsm"):
        for _ in range(3):
            assert not backend.has_key(missing)
        with pytest.raises(NotFound):
            backend.public_key(missing)
    assert backend.logins == logins  # no C_Finalize/C_Initialize/C_Login for it
    assert backend._lib.initialized and backend._session is not None
    assert not [r for r in caplog.records if r.name == "sekisho.hsm"]


def test_a_key_looked_up_while_the_store_is_away_is_unavailable_not_missing(
    backend: Pkcs11Backend, softhsm: softhsm_support.SoftHsm
) -> None:
    """SoftHSM2 answers searches with nothing while its store is away: has_key must not say
    False then (a caller would take the key for absent), but KeyBackendError."""
    ref = backend.generate("present", KeyType.EC_P256)
    assert backend.has_key(ref)
    away = softhsm.base / "tokens-away"
    shutil.move(softhsm.tokens, away)
    try:
        with pytest.raises(KeyBackendError):
            backend.has_key(ref)
    finally:
        shutil.move(away, softhsm.tokens)
    assert backend.has_key(ref)


def test_a_signing_key_deleted_from_the_token_is_an_outage(backend: Pkcs11Backend) -> None:
    """A key that signed before and is gone: the token is handled as lost once (re-read
    after a re-initialisation), then KeyBackendError, not NotFound."""
    ref = backend.generate("deleted", KeyType.EC_P256)
    key = backend.signing_key(ref)
    key.sign(b"warm", ECDSA)
    with backend._lock:
        session = backend._open_session()
        for obj in session.get_objects({Attribute.LABEL: backend.label_prefix + "deleted"}):
            obj.destroy()
    backend._keys.clear()
    with pytest.raises(KeyBackendError, match="signing key unavailable"):
        key.sign(b"gone", ECDSA)


# -- generate() retried after a lost reply ------------------------------------------------
class _ReplyLost:
    """A session whose C_GenerateKeyPair completes on the token, and whose reply is lost
    the first time (SessionHandleInvalid, as from a network HSM that dropped it);
    ``then(public, private)`` runs on the token's objects before the error."""

    def __init__(self, session: Any, failed: list[int], then: Callable[..., object]) -> None:
        self._session, self._failed, self._then = session, failed, then

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def _lose(self, pair: tuple[Any, Any]) -> tuple[Any, Any]:
        if not self._failed:
            self._failed.append(1)
            self._then(*pair)
            raise p11e.SessionHandleInvalid()
        return pair

    def generate_keypair(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return self._lose(self._session.generate_keypair(*args, **kwargs))

    def create_domain_parameters(self, *args: Any, **kwargs: Any) -> Any:
        params = self._session.create_domain_parameters(*args, **kwargs)
        lose = self._lose

        class Params:
            def generate_keypair(self, *a: Any, **k: Any) -> tuple[Any, Any]:
                return lose(params.generate_keypair(*a, **k))

        return Params()


def _pairs(backend: Pkcs11Backend, label: str) -> list[tuple[str, str]]:
    with backend._lock:
        session = backend._open_session()
        return sorted(
            (str(obj.object_class.name), bytes(obj.id).hex())
            for obj in session.get_objects({Attribute.LABEL: backend.label_prefix + label})
        )


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_2048])
@pytest.mark.parametrize("partial", [False, True], ids=["whole-pair", "private-only"])
def test_generate_retried_after_a_lost_reply_makes_one_usable_pair(
    backend: Pkcs11Backend,
    monkeypatch: pytest.MonkeyPatch,
    key_type: KeyType,
    partial: bool,
) -> None:
    label = f"lost-{partial}-{key_type.value}"
    failed: list[int] = []
    real_open = backend._open_session

    def then(public: Any, _private: Any) -> None:
        if partial:  # only part of the pair was stored before the failure
            public.destroy()

    monkeypatch.setattr(backend, "_open_session", lambda: _ReplyLost(real_open(), failed, then))
    ref = backend.generate(label, key_type)
    monkeypatch.undo()
    assert failed  # the reply was lost once and generate() tried again
    key_id = parse(ref).id
    assert key_id is not None
    assert _pairs(backend, label) == [("PRIVATE_KEY", key_id.hex()), ("PUBLIC_KEY", key_id.hex())]
    key = backend.signing_key(ref)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key.public_key().verify(key.sign(b"one", ECDSA), b"one", ECDSA)
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        pkcs1 = padding.PKCS1v15()
        signature = key.sign(b"one", pkcs1, hashes.SHA256())
        key.public_key().verify(signature, b"one", pkcs1, hashes.SHA256())


# -- adopt(): one key pair ----------------------------------------------------------------
_P256 = encode_named_curve_parameters("1.2.840.10045.3.1.7")
_ADOPTABLE = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True}


def _pair(backend: Pkcs11Backend, label: str, key_id: bytes, *, rsa_key: bool = False) -> Any:
    """A key pair made as another tool would (no Sekisho templates); (public, private)."""
    with backend._lock:
        session = backend._open_session()
        if rsa_key:
            return session.generate_keypair(
                P11KeyType.RSA, 2048, store=True, label=label, id=key_id,
                private_template=_ADOPTABLE,
            )  # fmt: skip
        params = session.create_domain_parameters(
            P11KeyType.EC, {Attribute.EC_PARAMS: _P256}, local=True
        )
        return params.generate_keypair(
            store=True, label=label, id=key_id, private_template=_ADOPTABLE
        )


def test_adopt_refuses_a_public_key_and_a_private_key_of_two_pairs(
    backend: Pkcs11Backend,
) -> None:
    """A label-only URI matching the public key of pair B and the private key of pair A:
    the CA would carry B's public key and sign with A."""
    label = backend.label_prefix + "two-pairs"
    public_a, _private_a = _pair(backend, label, b"\x01")
    _public_b, private_b = _pair(backend, label, b"\x02")
    with backend._lock:
        public_a.destroy()
        private_b.destroy()
    with pytest.raises(InputError, match=r"not one key pair.*does not verify.*02.*01"):
        backend.adopt(f"pkcs11:object={label}")


def test_adopt_refuses_public_and_private_objects_of_different_types(
    backend: Pkcs11Backend,
) -> None:
    label = backend.label_prefix + "two-types"
    public_ec, _private_ec = _pair(backend, label, b"\x03")
    _public_rsa, private_rsa = _pair(backend, label, b"\x04", rsa_key=True)
    with backend._lock:
        public_ec.destroy()
        private_rsa.destroy()
    with pytest.raises(InputError, match=r"not one key pair \(public key RSA, private key EC\)"):
        backend.adopt(f"pkcs11:object={label}")


def test_adopt_accepts_one_pair_and_pins_its_id(backend: Pkcs11Backend) -> None:
    label = backend.label_prefix + "one-pair"
    _pair(backend, label, b"\x05\x06")
    ref = backend.adopt(f"pkcs11:object={label}")
    assert parse(ref).id == b"\x05\x06" and parse(ref).object == label
    # Another pair made later under the same label leaves the adopted reference unambiguous.
    _pair(backend, label, b"\x07")
    key = backend.signing_key(ref)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    key.public_key().verify(key.sign(b"adopted", ECDSA), b"adopted", ECDSA)
    # A URI that names the id already is returned as it was given (with the token).
    assert backend.adopt(f"pkcs11:object={label};id=%07") == str(
        parse(f"pkcs11:object={label};id=%07").with_token(FAULT_TOKEN)
    )


# -- a token key that is not what it says ---------------------------------------------------
def test_a_private_object_that_is_not_the_public_ones_pair_signs_nothing(
    backend: Pkcs11Backend,
) -> None:
    """The private object under a key's label and id replaced by another key (a token
    restored or swapped): its signatures are refused (KeyBackendError), never returned."""
    ref = backend.generate("swapped", KeyType.EC_P256)
    key = backend.signing_key(ref)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    key.public_key().verify(key.sign(b"before", ECDSA), b"before", ECDSA)
    uri = parse(ref)
    assert uri.object is not None and uri.id is not None
    other_public, other_private = _pair(backend, backend.label_prefix + "other", b"\x7f")
    with backend._lock:
        session = backend._open_session()
        original = next(
            session.get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: uri.object}
            )
        )
        original.destroy()
        other_public.destroy()
        other_private[Attribute.LABEL] = uri.object
        other_private[Attribute.ID] = uri.id
        backend._keys.clear()
    with pytest.raises(KeyBackendError, match="does not verify under its public key"):
        key.sign(b"after", ECDSA)


def test_adopt_refuses_a_private_key_any_session_may_use(backend: Pkcs11Backend) -> None:
    """CKA_PRIVATE false: the key signs in a session that never logged in (no PIN), and
    SoftHSM2 keeps such an object unencrypted in its token directory."""
    label = backend.label_prefix + "public-private"
    with backend._lock:
        session = backend._open_session()
        params = session.create_domain_parameters(
            P11KeyType.EC, {Attribute.EC_PARAMS: _P256}, local=True
        )
        params.generate_keypair(
            store=True, label=label, id=b"\x61",
            private_template={**_ADOPTABLE, Attribute.PRIVATE: False},
        )  # fmt: skip
    with pytest.raises(ConfigError, match="not private"):
        backend.adopt(f"pkcs11:object={label}")
