"""Certificate profiles: TOML in, validated frozen values out.

A profile says what a certificate of its kind may carry: key types, validity (default and
maximum), key usage and extended key usage, allowed SAN types and subject attributes, and which
pointer extensions (CDP, AIA) it gets. Profiles are data; the rules that enforce them live in
``ca/rules.py``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsm.base import KeyType
from sekisho.errors import ConfigError, NotFound, shown

EKU_NAMES: Mapping[str, x509.ObjectIdentifier] = {
    "client_auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "server_auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "ocsp_signing": ExtendedKeyUsageOID.OCSP_SIGNING,
}
KEY_USAGE_NAMES = frozenset(
    {
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    }
)
SAN_TYPES = frozenset({"email", "dns", "ip", "uri"})
SUBJECT_ATTRS: Mapping[str, x509.ObjectIdentifier] = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "UID": NameOID.USER_ID,
    "serialNumber": NameOID.SERIAL_NUMBER,
}
_KNOWN_KEYS = frozenset(
    {
        "description",
        "ca",
        "path_length",
        "key_types",
        "default_validity_days",
        "max_validity_days",
        "key_usage",
        "extended_key_usage",
        "san_types",
        "san_required",
        "subject_required",
        "subject_allowed",
        "ocsp_no_check",
        "crl_distribution_point",
        "authority_info_access",
    }
)


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    description: str
    key_types: frozenset[KeyType]
    default_validity: dt.timedelta
    max_validity: dt.timedelta
    key_usage: frozenset[str]
    extended_key_usage: tuple[x509.ObjectIdentifier, ...]
    san_types: frozenset[str]
    san_required: bool
    subject_required: frozenset[str]
    subject_allowed: frozenset[str]
    ca: bool = False
    path_length: int | None = None
    ocsp_no_check: bool = False
    crl_distribution_point: bool = True
    authority_info_access: bool = True

    def __post_init__(self) -> None:
        if not self.key_types:
            raise ConfigError(f"profile {self.name}: key_types is empty")
        if not (dt.timedelta(hours=1) <= self.default_validity <= self.max_validity):
            raise ConfigError(f"profile {self.name}: need 1 h <= default <= max validity")
        if self.san_required and not self.san_types:
            raise ConfigError(f"profile {self.name}: san_required without san_types")
        if not self.subject_required <= self.subject_allowed:
            raise ConfigError(f"profile {self.name}: required subject attributes not allowed")
        if self.ca and self.extended_key_usage:
            raise ConfigError(f"profile {self.name}: a CA profile carries no EKU here")
        if not self.ca and ({"key_cert_sign", "crl_sign"} & self.key_usage):
            raise ConfigError(f"profile {self.name}: keyCertSign/cRLSign on a leaf profile")
        if self.ocsp_no_check and (self.crl_distribution_point or self.san_types):
            raise ConfigError(f"profile {self.name}: OCSP signers carry no CDP and no SAN")


def _list(
    name: str,
    doc: Mapping[str, Any],
    key: str,
    allowed: frozenset[str] | None = None,
    default: list[str] | None = None,
) -> list[str]:
    value = doc.get(key, default)
    if value is None:
        raise ConfigError(f"profile {name}: {key} is required")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"profile {name}: {key} must be a list of strings")
    if allowed is not None:
        unknown = set(value) - allowed
        if unknown:
            raise ConfigError(f"profile {name}: unknown {key} {sorted(unknown)}")
    return value


def _days(name: str, doc: Mapping[str, Any], key: str) -> dt.timedelta:
    value = doc.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"profile {name}: {key} must be a positive number of days")
    return dt.timedelta(days=value)


def _flag(name: str, doc: Mapping[str, Any], key: str, default: bool) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"profile {name}: {key} must be true or false")
    return value


def profile_from_mapping(name: str, doc: Mapping[str, Any]) -> Profile:
    unknown = set(doc) - _KNOWN_KEYS
    if unknown:
        raise ConfigError(f"profile {name}: unknown keys {sorted(unknown)}")
    try:
        key_types = frozenset(KeyType(v) for v in _list(name, doc, "key_types"))
    except ValueError as exc:
        raise ConfigError(f"profile {name}: {exc}") from None
    path_length = doc.get("path_length")
    if path_length is not None and (not isinstance(path_length, int) or path_length < 0):
        raise ConfigError(f"profile {name}: path_length must be a non-negative integer")
    return Profile(
        name=name,
        description=str(doc.get("description", "")),
        key_types=key_types,
        default_validity=_days(name, doc, "default_validity_days"),
        max_validity=_days(name, doc, "max_validity_days"),
        key_usage=frozenset(_list(name, doc, "key_usage", KEY_USAGE_NAMES)),
        extended_key_usage=tuple(
            EKU_NAMES[v] for v in _list(name, doc, "extended_key_usage", frozenset(EKU_NAMES))
        ),
        san_types=frozenset(_list(name, doc, "san_types", SAN_TYPES)),
        san_required=_flag(name, doc, "san_required", False),
        subject_required=frozenset(
            _list(name, doc, "subject_required", frozenset(SUBJECT_ATTRS), [])
        ),
        subject_allowed=frozenset(_list(name, doc, "subject_allowed", frozenset(SUBJECT_ATTRS))),
        ca=_flag(name, doc, "ca", False),
        path_length=path_length,
        ocsp_no_check=_flag(name, doc, "ocsp_no_check", False),
        crl_distribution_point=_flag(name, doc, "crl_distribution_point", True),
        authority_info_access=_flag(name, doc, "authority_info_access", True),
    )


class ProfileSet:
    """The profiles in force: the built-ins, optionally overridden by an operator file."""

    def __init__(self, profiles: Mapping[str, Profile]) -> None:
        self._profiles = dict(profiles)

    def get(self, name: str) -> Profile:
        try:
            return self._profiles[name]
        except KeyError:
            raise NotFound(
                f"unknown profile {shown(name)}; known: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._profiles)


def load_profiles(extra: Path | None = None) -> ProfileSet:
    text = resources.files("ca").joinpath("profiles.toml").read_text()
    docs: dict[str, Any] = dict(tomllib.loads(text))
    if extra is not None and extra.exists():
        try:
            docs.update(tomllib.loads(extra.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{extra}: {exc}") from None
    return ProfileSet({name: profile_from_mapping(name, doc) for name, doc in docs.items()})
