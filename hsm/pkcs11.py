"""PKCS#11 key backend (python-pkcs11): CA, OCSP responder and audit keys on a token.

Keys are addressed by RFC 7512 URIs (``pkcs11:token=...;object=...;id=...``, see
:mod:`hsm.uri`). The module path, the token label and the PIN source come from the settings;
the PIN is read from a file or a named environment variable and never logged.

Sessions
--------
One read/write session per backend, logged in with the PIN: exactly one ``C_Login`` at start;
a wrong PIN stops the start with a clear message and is never tried again by this process
(tokens lock after a few wrong PINs). python-pkcs11 initialises the module with
``C_Initialize(NULL)``, which by the standard lets a module assume it is never entered by two
threads at once (SoftHSM crashes if it is): every call into a module goes through one lock
per module and process (:func:`module_lock`). Threads and asyncio code (through a thread pool)
may call the backend concurrently; their token calls are serialised. A software-only check
(hashing, DER) happens outside.

When the token answers ``CKR_SESSION_HANDLE_INVALID``, ``CKR_SESSION_CLOSED``,
``CKR_USER_NOT_LOGGED_IN``, ``CKR_OBJECT_HANDLE_INVALID`` or ``CKR_KEY_HANDLE_INVALID``, the
session is dropped and a new one logged in with the PIN that worked before; after
``CKR_DEVICE_ERROR``, ``CKR_DEVICE_REMOVED``, ``CKR_TOKEN_NOT_PRESENT``, ``CKR_GENERAL_ERROR``,
an invalid slot, ``CKR_CRYPTOKI_NOT_INITIALIZED`` or a key that vanished, the library is
re-initialised and the token found again by its label. The operation is then tried once more;
if that fails too the caller gets :class:`KeyBackendError` (HTTP 503, exit 69) and the next
operation tries again: signing resumes without a restart once the token is back. A failed
re-initialisation leaves the library uninitialised (python-pkcs11 marks it so even when
C_Finalize or C_Initialize fails): every operation first initialises it again if so.

Signing
-------
Key objects implement ``cryptography``'s private-key interfaces, so the X.509 builders, the
OCSP core and the audit checkpoints sign through them unchanged. ECDSA uses
``CKM_ECDSA_SHA256/384/512`` when the token has them, else the hash is computed here and
signed with ``CKM_ECDSA``; the raw ``r || s`` is DER-encoded. RSA signs PKCS#1 v1.5
(``CKM_SHA*_RSA_PKCS``, or a DigestInfo with ``CKM_RSA_PKCS``) and PSS
(``CKM_SHA*_RSA_PKCS_PSS``). Ed25519 is not offered (PKCS#11 3.0 EdDSA is not widespread).

Key generation
--------------
On the token, never outside: private key ``CKA_TOKEN``, ``CKA_PRIVATE``, ``CKA_SENSITIVE``,
``CKA_SIGN`` true, ``CKA_EXTRACTABLE``, ``CKA_DECRYPT``, ``CKA_UNWRAP``, ``CKA_DERIVE``
false; a random 16-byte ``CKA_ID`` shared by the public and private objects; label
``<label_prefix><label>``. The reference returned names the token, the label and the id.
A generation tried again after a lost session first looks for that label and id: a whole pair
(the first C_GenerateKeyPair completed, its reply was lost) is kept, a partial one destroyed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
)
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo, Prehashed
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import (
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)
from pkcs11.util.rsa import encode_rsa_public_key

from hsm.base import KeyType
from hsm.uri import Pkcs11Uri, is_pkcs11_uri, parse
from sekisho.errors import ConfigError, InputError, KeyBackendError, NotFound, shown

log = logging.getLogger("sekisho.hsm")

T = TypeVar("T")
# Larger documents (a CRL with many entries) are hashed here and only the digest goes to the
# token: HSMs, network ones above all, cap single-part input.
ON_TOKEN_HASH_LIMIT = 64 * 1024

# Errors after which the session (or the whole library state) is renewed and the operation
# tried once more.
_SESSION_LOST = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.UserNotLoggedIn,
    p11e.ObjectHandleInvalid,  # the token reloaded its objects: handles we cached are stale
    p11e.KeyHandleInvalid,
)


class KeyVanished(p11e.PKCS11Error):
    """A key that signed before is not found on the token any more (the token was swapped or
    its store went away): handled as a lost device."""


class LibraryNotInitialised(p11e.PKCS11Error):
    """``CKR_CRYPTOKI_NOT_INITIALIZED`` (python-pkcs11 raises it as a plain PKCS11Error): a
    re-initialisation failed half-way (the token's store was away), or another user of the
    module finalised it. Handled as a lost device: C_Initialize again, find the token."""


_DEVICE_LOST = (
    p11e.DeviceError,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.NoSuchToken,
    p11e.SlotIDInvalid,
    p11e.GeneralError,  # "unrecoverable" per the standard: re-initialise, find the token again
    KeyVanished,
    LibraryNotInitialised,
)
RECOVERABLE = (*_SESSION_LOST, *_DEVICE_LOST)

_CURVES = {KeyType.EC_P256: ("1.2.840.10045.3.1.7", 256), KeyType.EC_P384: ("1.3.132.0.34", 384)}
_ECDSA = {
    "sha256": Mechanism.ECDSA_SHA256,
    "sha384": Mechanism.ECDSA_SHA384,
    "sha512": Mechanism.ECDSA_SHA512,
}
_RSA_PKCS = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
_RSA_PSS = {
    "sha256": (Mechanism.SHA256_RSA_PKCS_PSS, Mechanism.SHA256, pkcs11.MGF.SHA256),
    "sha384": (Mechanism.SHA384_RSA_PKCS_PSS, Mechanism.SHA384, pkcs11.MGF.SHA384),
    "sha512": (Mechanism.SHA512_RSA_PKCS_PSS, Mechanism.SHA512, pkcs11.MGF.SHA512),
}
# DER DigestInfo prefixes (RFC 8017 9.2, note 1), for CKM_RSA_PKCS on a digest.
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_HASHES: dict[str, Callable[[bytes], Any]] = {
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
}

PRIVATE_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
PUBLIC_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
}
# What `hsm keys` reads back from each private key.
REPORTED_ATTRIBUTES = (
    ("sensitive", Attribute.SENSITIVE),
    ("always_sensitive", Attribute.ALWAYS_SENSITIVE),
    ("extractable", Attribute.EXTRACTABLE),
    ("never_extractable", Attribute.NEVER_EXTRACTABLE),
    ("private", Attribute.PRIVATE),
    ("token", Attribute.TOKEN),
    ("sign", Attribute.SIGN),
    ("local", Attribute.LOCAL),
)
SIGN_MECHANISMS = (
    Mechanism.ECDSA,
    Mechanism.ECDSA_SHA256,
    Mechanism.ECDSA_SHA384,
    Mechanism.ECDSA_SHA512,
    Mechanism.RSA_PKCS,
    Mechanism.SHA256_RSA_PKCS,
    Mechanism.SHA384_RSA_PKCS,
    Mechanism.SHA512_RSA_PKCS,
    Mechanism.SHA256_RSA_PKCS_PSS,
    Mechanism.SHA384_RSA_PKCS_PSS,
    Mechanism.SHA512_RSA_PKCS_PSS,
    Mechanism.RSA_PKCS_PSS,
    Mechanism.EC_KEY_PAIR_GEN,
    Mechanism.RSA_PKCS_KEY_PAIR_GEN,
)


def _hash_name(algorithm: hashes.HashAlgorithm) -> str:
    name = algorithm.name
    if name not in _HASHES:
        raise KeyBackendError(f"hash {name} is not offered by the pkcs11 backend")
    return name


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """One private key on the token, as ``hsm keys`` reports it."""

    label: str
    id: str  # hex
    key_type: str
    uri: str
    attributes: dict[str, bool | None]


def _refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise TypeError("a token key only signs: it is never exported, exchanged or decrypted with")


class Pkcs11EcKey(ec.EllipticCurvePrivateKey):
    """An EC private key on the token (cryptography's interface; sign() calls the token)."""

    def __init__(self, backend: Pkcs11Backend, ref: str, public: ec.EllipticCurvePublicKey):
        self._backend, self._ref, self._public = backend, ref, public

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise KeyBackendError("only ECDSA signatures are offered")
        algorithm = signature_algorithm.algorithm
        raw = bytes(data)
        if isinstance(algorithm, Prehashed):
            mechanism, payload = Mechanism.ECDSA, raw
        else:
            name = _hash_name(algorithm)
            if len(raw) <= ON_TOKEN_HASH_LIMIT and self._backend.has_mechanism(_ECDSA[name]):
                mechanism, payload = _ECDSA[name], raw
            else:
                mechanism, payload = Mechanism.ECDSA, _HASHES[name](raw).digest()
        signature = encode_ecdsa_signature(self._backend.sign(self._ref, payload, mechanism, None))
        # The token's answer is checked before anyone sees it: a fault, or a private object
        # that is not the public object's pair (swapped or restored under the same label and
        # id), would otherwise put a signature nothing verifies into a certificate or a CRL.
        _verified(
            self._ref,
            lambda: self._public.verify(signature, raw, ec.ECDSA(algorithm)),
        )
        return signature

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    exchange = private_numbers = private_bytes = _refuse

    def __copy__(self) -> Pkcs11EcKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Pkcs11EcKey:
        return self

    def __repr__(self) -> str:
        return f"Pkcs11EcKey({self._ref!r})"


class Pkcs11RsaKey(rsa.RSAPrivateKey):
    """An RSA private key on the token: PKCS#1 v1.5 and PSS signatures."""

    def __init__(self, backend: Pkcs11Backend, ref: str, public: rsa.RSAPublicKey):
        self._backend, self._ref, self._public = backend, ref, public

    def sign(
        self,
        data: bytes,
        padding: rsa_padding.AsymmetricPadding,
        algorithm: Prehashed | hashes.HashAlgorithm | NoDigestInfo,
    ) -> bytes:
        raw = bytes(data)
        if isinstance(algorithm, NoDigestInfo):
            raise KeyBackendError("raw RSA signatures without DigestInfo are not offered")
        prehashed = isinstance(algorithm, Prehashed)
        hash_algorithm = algorithm._algorithm if isinstance(algorithm, Prehashed) else algorithm
        name = _hash_name(hash_algorithm)
        if isinstance(padding, rsa_padding.PKCS1v15):
            on_token = not prehashed and len(raw) <= ON_TOKEN_HASH_LIMIT
            if on_token and self._backend.has_mechanism(_RSA_PKCS[name]):
                signature = self._backend.sign(self._ref, raw, _RSA_PKCS[name], None)
            else:
                digest = raw if prehashed else _HASHES[name](raw).digest()
                signature = self._backend.sign(
                    self._ref, _DIGEST_INFO[name] + digest, Mechanism.RSA_PKCS, None
                )
            # (A faulty RSA-CRT signature also gives the key away: never hand one out.)
            _verified(self._ref, lambda: self._public.verify(signature, raw, padding, algorithm))
            return signature
        if isinstance(padding, rsa_padding.PSS):
            if prehashed:
                raise KeyBackendError("pre-hashed RSA-PSS is not offered")
            mechanism, hash_mech, mgf = _RSA_PSS[name]
            salt = _pss_salt_length(padding, self._public, hash_algorithm)
            params = (hash_mech, mgf, salt)
            if len(raw) <= ON_TOKEN_HASH_LIMIT and self._backend.has_mechanism(mechanism):
                signature = self._backend.sign(self._ref, raw, mechanism, params)
            else:
                # CKM_RSA_PKCS_PSS signs a digest computed here.
                digest = _HASHES[name](raw).digest()
                signature = self._backend.sign(self._ref, digest, Mechanism.RSA_PKCS_PSS, params)
            check = rsa_padding.PSS(rsa_padding.MGF1(hash_algorithm), salt)
            _verified(self._ref, lambda: self._public.verify(signature, raw, check, algorithm))
            return signature
        raise KeyBackendError(f"RSA padding {padding.name} is not offered")

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    decrypt = private_numbers = private_bytes = _refuse

    def __copy__(self) -> Pkcs11RsaKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Pkcs11RsaKey:
        return self

    def __repr__(self) -> str:
        return f"Pkcs11RsaKey({self._ref!r})"


class SignatureMismatch(KeyBackendError):
    """A signature the token made does not verify under the key's public object."""


def _verified(ref: str, verify: Callable[[], None]) -> None:
    """Run ``verify`` (the public key's check of a signature the token just made);
    KeyBackendError (HTTP 503, exit 69) if the signature does not verify."""
    try:
        verify()
    except InvalidSignature:
        log.error("token signature does not verify", extra={"key_ref": ref})
        raise SignatureMismatch(
            f"the token's signature with key {ref} does not verify under its public key "
            "(a token fault, or a private key object that is not the pair of the public one)"
        ) from None


def _pss_salt_length(
    pss: rsa_padding.PSS, public: rsa.RSAPublicKey, algorithm: hashes.HashAlgorithm
) -> int:
    salt = pss._salt_length
    if isinstance(salt, int):
        return salt
    if salt is rsa_padding.PSS.DIGEST_LENGTH or salt is rsa_padding.PSS.AUTO:
        return algorithm.digest_size
    if salt is rsa_padding.PSS.MAX_LENGTH:
        return (public.key_size + 7) // 8 - algorithm.digest_size - 2
    raise KeyBackendError("unsupported PSS salt length")


_MODULE_LOCKS: dict[str, threading.RLock] = {}
_MODULE_LOCKS_GUARD = threading.Lock()


def module_lock(module: str) -> threading.RLock:
    """One lock per PKCS#11 module per process. python-pkcs11 calls ``C_Initialize(NULL)``:
    by the standard the module may then assume it is never entered by two threads at once
    (SoftHSM crashes when it is), so every call into a module goes through its lock."""
    key = os.path.realpath(module)
    with _MODULE_LOCKS_GUARD:
        return _MODULE_LOCKS.setdefault(key, threading.RLock())


class Pkcs11Backend:
    """The key backend on one token of one PKCS#11 module."""

    name = "pkcs11"

    def __init__(self, module: str, token_label: str, pin: str, *, label_prefix: str = "sekisho-"):
        if not module:
            raise ConfigError("pkcs11_module is not set (the path of the PKCS#11 library)")
        if not token_label:
            raise ConfigError("pkcs11_token is not set (the label of the token)")
        if not os.path.isfile(module):
            raise ConfigError(f"PKCS#11 module {module} does not exist")
        self.module = module
        self.token_label = token_label
        self.label_prefix = label_prefix
        self._pin = pin
        self._lock = module_lock(module)
        self._session: Any = None  # the logged-in session, opened on demand
        self._keys: dict[str, Any] = {}  # ref -> private key object of that session
        self._login_refused: ConfigError | None = None
        self._public_cache: dict[str, CertificateIssuerPublicKeyTypes] = {}
        self.logins = 0  # C_Login calls made (status, tests)
        self._token: Any = None
        self._mechanisms: frozenset[Any] = frozenset()
        # None until the module's C_Initialize has succeeded once in this process: a module
        # that loads but cannot initialise (SoftHSM2 while its token directory is away, a
        # network HSM's library while the HSM is unreachable) is an outage, not a
        # configuration error: this process starts, and initialises it when it can.
        self._lib: Any = None
        with self._lock:
            try:
                self._lib = pkcs11.lib(module)
            except p11e.PKCS11Error as exc:
                if type(exc) is p11e.PKCS11Error:  # dlopen or C_GetFunctionList: not a module
                    raise ConfigError(f"cannot load PKCS#11 module {module}: {exc}") from None
                # (A CKR_* from C_Initialize or C_GetInfo; python-pkcs11 gives no message.)
                log.warning(
                    "pkcs11 token unavailable at start",
                    extra={"error": f"C_Initialize failed ({type(exc).__name__})"},
                )
                return
            except (RuntimeError, OSError) as exc:
                raise ConfigError(f"cannot load PKCS#11 module {module}: {exc}") from None
            try:
                # The one login attempt at start: a wrong PIN stops here (ConfigError).
                self._open_session()
            except (KeyBackendError, p11e.PKCS11Error) as exc:
                # The token is away (or its label is wrong): this process still starts, every
                # key operation fails with KeyBackendError and tries the token again, and
                # check() (run by `serve` before gunicorn starts) refuses to go on without it.
                detail = exc.message if isinstance(exc, KeyBackendError) else type(exc).__name__
                log.warning("pkcs11 token unavailable at start", extra={"error": detail})

    def check(self) -> None:
        """Start-up check: the token is there and we are logged in (KeyBackendError if not)."""
        self._run(lambda _session: None)

    def __repr__(self) -> str:  # never the PIN
        return f"Pkcs11Backend(module={self.module!r}, token={self.token_label!r})"

    # -- token, login, session (all under the module lock) --------------------------------
    def _find_token(self) -> Any:
        """The token by its label; the module's slots are re-read once when it is not seen
        (a token that went away and came back in this process)."""
        for attempt in range(2):
            try:
                self._ensure_initialised()
                token = self._lib.get_token(token_label=self.token_label)
            except p11e.MultipleTokensReturned:
                raise ConfigError(f"several tokens are labelled {self.token_label!r}") from None
            except p11e.PKCS11Error as exc:
                rescan = isinstance(
                    exc, p11e.NoSuchToken | p11e.GeneralError | p11e.SlotIDInvalid
                ) or self._not_initialised(exc)
                if attempt == 0 and rescan:
                    self._reinitialise()
                    continue
                if isinstance(exc, p11e.NoSuchToken):
                    raise KeyBackendError(
                        f"no PKCS#11 token labelled {self.token_label!r} in {self.module}"
                    ) from None
                raise KeyBackendError(
                    f"token {self.token_label!r} unavailable ({type(exc).__name__})"
                ) from None
            self._mechanisms = frozenset(token.slot.get_mechanisms())
            return token
        raise AssertionError("unreachable")

    def _not_initialised(self, exc: p11e.PKCS11Error) -> bool:
        """Whether ``exc`` means the library is not initialised: python-pkcs11 raises
        CKR_CRYPTOKI_NOT_INITIALIZED as a plain PKCS11Error (its flag says so too, unless
        another lib object on the same module finalised it)."""
        if isinstance(exc, LibraryNotInitialised):
            return True
        if type(exc) is not p11e.PKCS11Error:
            return False
        return self._lib is None or not self._lib.initialized or "not initialized" in str(exc)

    def _ensure_initialised(self) -> None:
        """C_Initialize when the library is not initialised (python-pkcs11 marks it so even
        when C_Finalize failed, and a C_Initialize that failed leaves it so): the session and
        the token found before are gone with it. KeyBackendError if C_Initialize fails."""
        if self._lib is not None and self._lib.initialized:
            return
        self._session = None  # its handle died with the library state: nothing to close
        self._keys.clear()
        self._token = None
        try:
            if self._lib is None:  # C_Initialize failed at start: load and initialise now
                self._lib = pkcs11.lib(self.module)
            else:
                self._lib.initialize()
        except p11e.PKCS11Error as exc:
            raise KeyBackendError(
                f"PKCS#11 module {self.module} cannot be initialised ({type(exc).__name__})"
            ) from None

    def _reinitialise(self) -> None:
        """C_Finalize + C_Initialize, which rescans the slots. Errors are ignored here: a
        library left uninitialised is initialised again by :meth:`_ensure_initialised`
        before the next token call."""
        if self._lib is None:
            return  # never initialised: _ensure_initialised loads it
        with contextlib.suppress(p11e.PKCS11Error):
            self._lib.finalize()
        with contextlib.suppress(p11e.PKCS11Error):
            self._lib.initialize()

    def _open_session(self) -> Any:
        """The read/write session we sign in, logged in with the PIN. A refused PIN is
        remembered: this process never tries it again (tokens lock after a few)."""
        self._ensure_initialised()
        if self._session is not None:
            return self._session
        if self._login_refused is not None:
            raise self._login_refused
        if self._token is None:
            self._token = self._find_token()
        try:
            self.logins += 1
            session = self._token.open(rw=True, user_pin=self._pin)
        except p11e.UserAlreadyLoggedIn:
            # Another backend of this process holds the login (it is per application).
            session = self._token.open(rw=True)
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange) as exc:
            self._login_refused = ConfigError(
                f"the PKCS#11 PIN was refused by token {self.token_label!r} "
                f"({type(exc).__name__}); no further login attempt is made (tokens lock "
                "after a few wrong PINs): fix the PIN source and restart"
            )
            raise self._login_refused from None
        except p11e.PinLocked:
            self._login_refused = ConfigError(
                f"the user PIN of token {self.token_label!r} is locked; the security officer "
                "must unlock it"
            )
            raise self._login_refused from None
        self._session = session
        return session

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        self._keys.clear()
        if session is not None:
            _close_quietly(session)  # C_Logout + C_CloseSession (errors ignored: it is gone)

    def _recover(self, exc: Exception) -> None:
        """Forget the session (and, after a device error, re-initialise the library and find
        the token again); the next call opens a new session with the PIN that worked."""
        log.warning("pkcs11 session lost; renewing", extra={"error": type(exc).__name__})
        self._drop_session()
        self._public_cache.clear()
        if isinstance(exc, _DEVICE_LOST):
            self._reinitialise()  # C_Finalize + C_Initialize: rescans the slots
            self._token = None
            self._token = self._find_token()

    def _run(self, operation: Callable[[Any], T], *, missing_is_outage: bool = False) -> T:
        """``operation(session)`` under the module lock; on a lost session or device, recover
        and try once more; then KeyBackendError (HTTP 503, exit 69).

        A key not found is looked for once more in the same session, its cached handles
        dropped, when the token still answers ``C_GetTokenInfo`` (SoftHSM2 answers every
        search with nothing while its store is away, and fails that call): no re-initialisation
        and no new login for a reference that simply does not exist. Still missing, it is
        NotFound; with ``missing_is_outage`` (a key that signed before) the token is handled as
        lost first, and KeyBackendError if the key is not there after that either."""
        last: Exception | None = None
        failure: Exception
        with self._lock:
            looked_again = recovered = False
            while True:
                try:
                    return operation(self._open_session())
                except NotFound as exc:
                    if not looked_again:
                        looked_again = True
                        self._keys.clear()
                        if self._token_answers():
                            continue  # one more C_FindObjects, in this session
                        last = failure = KeyVanished(exc.message)
                    elif missing_is_outage and not recovered:
                        last = failure = KeyVanished(exc.message)
                    elif missing_is_outage:
                        raise KeyBackendError(f"signing key unavailable: {exc.message}") from None
                    else:
                        raise
                except RECOVERABLE as exc:
                    last = failure = exc
                except p11e.PKCS11Error as exc:
                    if not self._not_initialised(exc):
                        raise KeyBackendError(f"the token refused: {type(exc).__name__}") from None
                    last = failure = LibraryNotInitialised(str(exc))
                if recovered:
                    break
                recovered = True
                try:
                    self._recover(failure)
                except (KeyBackendError, p11e.PKCS11Error) as again:
                    last = again
                    break
        if isinstance(last, KeyBackendError):
            raise KeyBackendError(last.message)
        name = type(last).__name__ if last is not None else "unknown"
        raise KeyBackendError(f"token {self.token_label!r} unavailable ({name})")

    def _token_answers(self) -> bool:
        """Whether the token answers ``C_GetTokenInfo`` (no login, no session needed)."""
        if self._token is None:
            return False
        try:
            self._token.slot.get_token()
        except p11e.PKCS11Error:
            return False
        return True

    # -- references -----------------------------------------------------------------------
    def reference(self, label: str) -> str:
        """The reference of the key ``generate(label, ...)`` makes (by label, no id)."""
        return str(Pkcs11Uri(token=self.token_label, object=self.label_prefix + label))

    def _uri(self, ref: str) -> Pkcs11Uri:
        if not is_pkcs11_uri(ref):
            raise KeyBackendError(f"the pkcs11 backend cannot use key reference {shown(ref)}")
        try:
            uri = parse(ref)
        except ConfigError as exc:
            raise KeyBackendError(str(exc)) from None
        if uri.token is not None and uri.token != self.token_label:
            raise KeyBackendError(
                f"key {shown(ref)} is on token {shown(uri.token)}, "
                f"this backend uses {self.token_label!r}"
            )
        return uri

    def _find(self, session: Any, ref: str, object_class: ObjectClass) -> Any:
        uri = self._uri(ref)
        token = self._token
        for name, have in (
            ("serial", _text(token.serial)),
            ("manufacturer", token.manufacturer_id),
            ("model", token.model),
        ):
            wanted = getattr(uri, name)
            if wanted is not None and wanted != have:
                raise KeyBackendError(f"key {ref}: this token's {name} is {have!r}")
        attrs: dict[Attribute, Any] = {Attribute.CLASS: object_class}
        if uri.object is not None:
            attrs[Attribute.LABEL] = uri.object
        if uri.id is not None:
            attrs[Attribute.ID] = uri.id
        found = list(session.get_objects(attrs))
        if not found:
            raise NotFound(f"no {object_class.name.lower()} key {ref} on the token")
        if len(found) > 1:
            raise KeyBackendError(f"key reference {ref} matches {len(found)} objects")
        return found[0]

    # -- KeyBackend protocol --------------------------------------------------------------
    def generate(self, label: str, key_type: KeyType) -> str:
        if key_type not in (*_CURVES, KeyType.RSA_2048, KeyType.RSA_3072, KeyType.RSA_4096):
            raise ConfigError(
                f"the pkcs11 backend generates EC P-256/P-384 and RSA keys, not {key_type.value}"
            )
        key_id = os.urandom(16)
        object_label = self.label_prefix + label
        tried = False

        def make(session: Any) -> None:
            nonlocal tried
            if tried and self._made_before(session, object_label, key_id):
                return
            tried = True
            private = {**PRIVATE_TEMPLATE}
            public = {**PUBLIC_TEMPLATE}
            if key_type in _CURVES:
                oid, _bits = _CURVES[key_type]
                params = session.create_domain_parameters(
                    P11KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(oid)},
                    local=True,
                )
                params.generate_keypair(
                    store=True,
                    label=object_label,
                    id=key_id,
                    public_template=public,
                    private_template=private,
                )
                return
            bits = key_type.rsa_bits
            assert bits is not None
            public[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
            session.generate_keypair(
                P11KeyType.RSA,
                bits,
                store=True,
                label=object_label,
                id=key_id,
                public_template=public,
                private_template=private,
            )

        self._run(make)
        ref = str(Pkcs11Uri(token=self.token_label, object=object_label, id=key_id))
        log.info("generated key on token", extra={"key_ref": ref, "key_type": key_type.value})
        return ref

    @staticmethod
    def _made_before(session: Any, object_label: str, key_id: bytes) -> bool:
        """Before generate() tries again: whether the first C_GenerateKeyPair completed on the
        token though its reply was lost (a network HSM, a session dropped meanwhile). A whole
        pair with our label and random id is that pair; a part of one is destroyed, so that
        the new pair is the only one the reference (label and id) matches."""
        found = {
            object_class: list(
                session.get_objects(
                    {
                        Attribute.CLASS: object_class,
                        Attribute.LABEL: object_label,
                        Attribute.ID: key_id,
                    }
                )
            )
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
        }
        if all(len(objects) == 1 for objects in found.values()):
            log.warning(
                "generated key pair found after a lost reply; kept", extra={"label": object_label}
            )
            return True
        for objects in found.values():
            for obj in objects:
                obj.destroy()
        return False

    def adopt(self, ref: str) -> str:
        """Check that an existing token key (by URI) is usable for signing; its reference.

        The URI's public and private objects are looked up separately, so they must be shown
        to be one pair: same key type, and a test value signed with the private key verifies
        under the public key (a label-only URI may match the public key of one pair and the
        private key of another). When both objects carry the same ``CKA_ID`` and the URI has
        none, the reference returned adds it, so that a pair made later under the same label
        does not turn the reference ambiguous."""
        uri = self._uri(ref).with_token(self.token_label)
        ref = str(uri)
        public = self.public_key(ref)

        def read(session: Any) -> tuple[dict[str, bool | None], Any, bytes, bytes]:
            private_obj = self._find(session, ref, ObjectClass.PRIVATE_KEY)
            public_obj = self._find(session, ref, ObjectClass.PUBLIC_KEY)
            return (
                _read_attributes(private_obj),
                private_obj.key_type,
                _object_id(private_obj),
                _object_id(public_obj),
            )

        attributes, private_type, private_id, public_id = self._run(read)
        if not attributes.get("sign"):
            raise ConfigError(f"token key {ref} cannot sign (CKA_SIGN is false)")
        if attributes.get("extractable") or not attributes.get("sensitive"):
            raise ConfigError(f"token key {ref} is extractable or not sensitive: refused")
        if not attributes.get("private"):
            # CKA_PRIVATE false: any session signs with it, no PIN (and SoftHSM2 stores it
            # unencrypted under the token directory).
            raise ConfigError(
                f"token key {ref} is not private (CKA_PRIVATE is false): it signs without the "
                "PIN; refused"
            )
        public_type = P11KeyType.EC if isinstance(public, ec.EllipticCurvePublicKey) else None
        public_type = P11KeyType.RSA if isinstance(public, rsa.RSAPublicKey) else public_type
        if private_type != public_type:
            raise InputError(
                f"token key {shown(ref)}: its public and private objects are not one key pair "
                f"(public key {_type_name(public_type)}, private key {_type_name(private_type)}); "
                "give the id of the pair in the URI"
            )
        if not self._signs_for(ref, public):
            raise InputError(
                f"token key {shown(ref)}: its public and private objects are not one key pair "
                f"(a test signature does not verify; public CKA_ID {public_id.hex() or 'none'}, "
                f"private CKA_ID {private_id.hex() or 'none'}); give the id of the pair in the URI"
            )
        if uri.id is None and private_id and private_id == public_id:
            ref = str(dataclasses.replace(uri, id=private_id))
        return ref

    def _signs_for(self, ref: str, public: CertificateIssuerPublicKeyTypes) -> bool:
        """Whether the private key of ``ref`` signs a random test value that ``public``
        verifies."""
        challenge = b"sekisho adopt check " + os.urandom(16)
        key = self.signing_key(ref)
        try:
            if isinstance(key, ec.EllipticCurvePrivateKey):
                assert isinstance(public, ec.EllipticCurvePublicKey)
                signature = key.sign(challenge, ec.ECDSA(hashes.SHA256()))
                public.verify(signature, challenge, ec.ECDSA(hashes.SHA256()))
            else:
                assert isinstance(key, rsa.RSAPrivateKey)
                assert isinstance(public, rsa.RSAPublicKey)
                pkcs1 = rsa_padding.PKCS1v15()
                signature = key.sign(challenge, pkcs1, hashes.SHA256())
                public.verify(signature, challenge, pkcs1, hashes.SHA256())
        except (InvalidSignature, SignatureMismatch):  # (the key checks its signatures too)
            return False
        return True

    def public_key(self, ref: str) -> CertificateIssuerPublicKeyTypes:
        cached = self._public_cache.get(ref)
        if cached is not None:
            return cached

        def read(session: Any) -> bytes:
            obj = self._find(session, ref, ObjectClass.PUBLIC_KEY)
            if obj.key_type == P11KeyType.EC:
                return bytes(encode_ec_public_key(obj))  # SubjectPublicKeyInfo
            if obj.key_type == P11KeyType.RSA:
                return _rsa_spki(bytes(encode_rsa_public_key(obj)))  # PKCS#1 -> SPKI
            raise KeyBackendError(f"key {ref} is neither EC nor RSA")

        key = serialization.load_der_public_key(self._run(read))
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise KeyBackendError(f"key {ref} has an unsupported public key")
        self._public_cache[ref] = key
        return key

    def signing_key(self, ref: str) -> CertificateIssuerPrivateKeyTypes:
        public = self.public_key(ref)
        if isinstance(public, ec.EllipticCurvePublicKey):
            return Pkcs11EcKey(self, ref, public)
        assert isinstance(public, rsa.RSAPublicKey)
        return Pkcs11RsaKey(self, ref, public)

    def has_key(self, ref: str) -> bool:
        if not is_pkcs11_uri(ref):
            return False
        try:
            self._run(lambda session: self._find(session, ref, ObjectClass.PRIVATE_KEY))
        except NotFound:
            return False
        return True

    def close(self) -> None:
        """Close the session (logging out); a later operation logs in again."""
        with self._lock:
            self._drop_session()

    # -- signing --------------------------------------------------------------------------
    def has_mechanism(self, mechanism: Mechanism) -> bool:
        return mechanism in self._mechanisms

    def sign(self, ref: str, data: bytes, mechanism: Mechanism, param: Any) -> bytes:
        def op(session: Any) -> bytes:
            key = self._keys.get(ref)
            if key is None:
                key = self._find(session, ref, ObjectClass.PRIVATE_KEY)
                self._keys[ref] = key
            return bytes(key.sign(data, mechanism=mechanism, mechanism_param=param))

        # It was found before (we hold its public key): missing now means the token is away.
        return self._run(op, missing_is_outage=True)

    # -- operator views -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        keys = self.keys()  # connects first when the token was away at start
        token = self._token
        return {
            "module": self.module,
            "library": {
                "manufacturer": self._lib.manufacturer_id,
                "description": self._lib.library_description,
                "version": ".".join(str(v) for v in self._lib.library_version),
            },
            "token": {
                "label": token.label,
                "manufacturer": token.manufacturer_id,
                "model": token.model,
                "serial": token.serial.decode()
                if isinstance(token.serial, bytes)
                else token.serial,
            },
            "session_open": self._session is not None,
            "logins": self.logins,
            "keys": len(keys),
            "mechanisms": sorted(m.name for m in SIGN_MECHANISMS if m in self._mechanisms),
        }

    def keys(self) -> list[KeyInfo]:
        def read(session: Any) -> list[KeyInfo]:
            out = []
            for obj in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
                label = obj.label or ""
                key_id = bytes(obj.id or b"")
                uri = Pkcs11Uri(token=self.token_label, object=label or None, id=key_id or None)
                out.append(
                    KeyInfo(
                        label=label,
                        id=key_id.hex(),
                        key_type=_describe_key(obj),
                        uri=str(uri),
                        attributes=_read_attributes(obj),
                    )
                )
            return sorted(out, key=lambda k: (k.label, k.id))

        return self._run(read)

    def private_attribute(self, ref: str, attribute: Attribute) -> Any:
        """Read one attribute of a private key (tests read CKA_VALUE to see it refused)."""
        return self._run(
            lambda session: self._find(session, ref, ObjectClass.PRIVATE_KEY)[attribute]
        )


def _read_attributes(obj: Any) -> dict[str, bool | None]:
    values: dict[str, bool | None] = {}
    for name, attribute in REPORTED_ATTRIBUTES:
        try:
            values[name] = bool(obj[attribute])
        except p11e.PKCS11Error:
            values[name] = None
    return values


def _object_id(obj: Any) -> bytes:
    """An object's CKA_ID (empty when it has none or the token will not say)."""
    try:
        return bytes(obj.id or b"")
    except p11e.PKCS11Error:
        return b""


def _type_name(key_type: Any) -> str:
    return str(getattr(key_type, "name", key_type or "unknown")).upper()


def _describe_key(obj: Any) -> str:
    try:
        if obj.key_type == P11KeyType.EC:
            params = bytes(obj[Attribute.EC_PARAMS])
            for key_type, (oid, _bits) in _CURVES.items():
                if params == encode_named_curve_parameters(oid):
                    return key_type.value
            return "ec"
        if obj.key_type == P11KeyType.RSA:
            return f"rsa-{len(bytes(obj[Attribute.MODULUS])) * 8}"
    except p11e.PKCS11Error:
        pass
    return str(getattr(obj.key_type, "name", obj.key_type)).lower()


def _rsa_spki(pkcs1: bytes) -> bytes:
    from asn1crypto import keys as asn1_keys

    info = asn1_keys.PublicKeyInfo(
        {
            "algorithm": {"algorithm": "rsa", "parameters": None},
            "public_key": asn1_keys.RSAPublicKey.load(pkcs1),
        }
    )
    der: bytes = info.dump()
    return der


def _text(value: str | bytes) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _close_quietly(session: Any) -> None:
    with contextlib.suppress(p11e.PKCS11Error, RuntimeError):
        session.close()
