"""PKCS#11 URIs (RFC 7512), the subset a key reference needs.

``pkcs11:token=Sekisho%20CA;object=sekisho-ca-admin;id=%4a%1f...;type=private``

Path attributes are ``;``-separated ``name=value`` pairs, values percent-encoded (UTF-8 for
text, raw octets for ``id``). We read ``token``, ``manufacturer``, ``serial``, ``model``,
``object``, ``id`` and ``type``; any other path attribute is refused (a reference should not
silently match more than its author meant). Query attributes (``?pin-source=...``) are
refused too: the PIN comes from the settings (a file or a named environment variable), never
from a key reference that ends up in the database and in logs.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import quote, unquote_to_bytes

from sekisho.errors import ConfigError, shown

SCHEME = "pkcs11:"
_TEXT = ("token", "manufacturer", "serial", "model", "object", "type")
_KNOWN = (*_TEXT, "id")
_TYPES = ("private", "public", "cert", "secret-key", "data")
# RFC 7512 2.3: unreserved characters plus a few that need no escaping in a path value.
_SAFE = "-._~:[]@!$'()*+,&"


@dataclasses.dataclass(frozen=True)
class Pkcs11Uri:
    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None

    def __str__(self) -> str:
        parts = []
        for name in ("token", "manufacturer", "serial", "model", "object"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={quote(value, safe=_SAFE)}")
        if self.id is not None:
            parts.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        if self.type is not None:
            parts.append(f"type={self.type}")
        return SCHEME + ";".join(parts)

    def with_token(self, token: str) -> Pkcs11Uri:
        return dataclasses.replace(self, token=token)


def is_pkcs11_uri(ref: str) -> bool:
    return ref.startswith(SCHEME)


def parse(ref: str) -> Pkcs11Uri:
    """Parse a key reference; ConfigError names what is wrong."""
    if not ref.startswith(SCHEME):
        raise ConfigError(f"not a PKCS#11 URI (RFC 7512): {shown(ref)}")
    body = ref[len(SCHEME) :]
    if "?" in body:
        raise ConfigError(
            "PKCS#11 URI query attributes (pin-value, pin-source, module-path) are not "
            "accepted in key references; the PIN and the module come from the settings"
        )
    values: dict[str, str | bytes] = {}
    for part in body.split(";") if body else []:
        name, sep, raw = part.partition("=")
        if not sep or name not in _KNOWN:
            raise ConfigError(f"PKCS#11 URI attribute {shown(name)} is not supported")
        if name in values:
            raise ConfigError(f"PKCS#11 URI attribute {shown(name)} given twice")
        decoded = unquote_to_bytes(raw)
        if name == "id":
            if not decoded:
                raise ConfigError("PKCS#11 URI id is empty")
            values[name] = decoded
            continue
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"PKCS#11 URI attribute {name!r} is not UTF-8") from None
        if name == "type" and text not in _TYPES:
            raise ConfigError(f"PKCS#11 URI type {shown(text)} is not one of {', '.join(_TYPES)}")
        values[name] = text
    uri = Pkcs11Uri(**values)  # type: ignore[arg-type]
    if uri.object is None and uri.id is None:
        raise ConfigError("a PKCS#11 key reference needs an object label or an id")
    return uri
