"""The error tree, drawn once.

Every domain error carries a stable ``code`` (used in problem documents and the journal), an
HTTP status for ``web/errors.py`` and an exit code for the CLI::

    SekishoError                      500 / exit 1
    ├── ConfigError                   500 / exit 78   settings invalid, data dir unusable
    │   └── SecretUnavailable                         a secret this user cannot have
    ├── InputError                    400 / exit 65   the caller sent something we refuse
    │   ├── MalformedInput            400             bad DER/PEM, truncated, bad base64
    │   ├── BadSignature              400             CSR proof of possession failed
    │   ├── TooLarge                  413             body or CSR over the size limit
    │   ├── UnsupportedMediaType      415
    │   └── PolicyViolation(rule)     422             a profile rule refused the request
    ├── NotFound                      404 / exit 66   unknown CA, profile, serial
    ├── Conflict                      409 / exit 75   state forbids it (re-revoke, release)
    ├── KeyBackendError               503 / exit 69   key store unreadable, token away
    │   └── WrongPassphrase           503 / exit 77
    ├── StoreError                    503 / exit 74   database write or read failed
    ├── AuditError                    503 / exit 74   the journal could not be written
    │   ├── AuditChainBroken(seq)     exit 2          verification found tampering
    │   └── AuditTailUnsigned(seq)    exit 2          records left unsigned too long
    └── Discrepancies                 exit 2          `cert check` found the store disagreeing

A check whose result must not be ignored raises one of these; it never returns a bool.
A message that quotes what the caller sent quotes it through ``shown``.
"""

from __future__ import annotations

import re

# How much of a value an error message quotes: enough to recognise a mistyped name.
MAX_SHOWN = 80
# A path is quoted whole up to 255 characters (NAME_MAX): its end is what tells files apart.
PATH_SHOWN = 255
# ``tamed`` cuts runs longer than anything ``shown`` quotes (PATH_SHOWN characters, each
# escaped to at most four, with quotes and "..."), so a value already quoted stays whole.
_TAMED_RUN = 4 * PATH_SHOWN + 16
_LONG_RUN = re.compile(rf"\S{{{_TAMED_RUN + 1},}}")
_TAMED_MESSAGE = 2 * _TAMED_RUN  # and the whole message


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """``value`` quoted for an error message: escaped as Python's ``repr`` escapes (control
    characters, line breaks, bidirectional and other invisible characters become ``\\x1b``,
    ``\\n``, ``\\u202e``), so a quoted value cannot forge a log line or reach the terminal as
    an escape sequence; cut to its first ``limit`` characters, with its length, so that a
    10,000-character value does not fill the screen, the journal or a problem document."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def tamed(text: str) -> str:
    """A library's message that may quote what the caller gave (click's usage errors) made
    fit to print on one line: every character that is not printable (line breaks, escape
    sequences, bidirectional controls) escaped as ``repr`` escapes it, and every run of
    non-blank characters too long to be a value ``shown`` quoted cut to its first
    ``MAX_SHOWN``, with its length; the whole cut to about two thousand characters."""
    escaped = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    cut = _LONG_RUN.sub(
        lambda m: f"{m.group()[:MAX_SHOWN]}... ({len(m.group())} characters)", escaped
    )
    if len(cut) > _TAMED_MESSAGE:  # long even so (a value of many short words)
        return f"{cut[:_TAMED_MESSAGE]}... ({len(text)} characters in all)"
    return cut


class SekishoError(Exception):
    code = "internal"
    http_status = 500
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def as_problem(self) -> dict[str, object]:
        """RFC 9457 style problem document body (without ``instance``)."""
        return {
            "type": f"urn:sekisho:error:{self.code}",
            "title": self.code.replace("-", " "),
            "status": self.http_status,
            "detail": self.message,
        }


class ConfigError(SekishoError):
    code = "config"
    exit_code = 78


class SecretUnavailable(ConfigError):
    """A secret's source is missing, or not this user's to read (another user's file, no
    permission, an unset variable); not a secret that is exposed. A command that only reads
    goes on without the keys it unlocks (``sekisho.services.open_deployment``)."""


class InputError(SekishoError):
    code = "bad-input"
    http_status = 400
    exit_code = 65


class MalformedInput(InputError):
    code = "malformed"


class BadSignature(InputError):
    code = "bad-signature"


class TooLarge(InputError):
    code = "too-large"
    http_status = 413


class UnsupportedMediaType(InputError):
    code = "unsupported-media-type"
    http_status = 415


class PolicyViolation(InputError):
    """A profile or CA rule refused the request; ``rule`` names the rule."""

    code = "policy-violation"
    http_status = 422

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule

    def as_problem(self) -> dict[str, object]:
        doc = super().as_problem()
        doc["rule"] = self.rule
        return doc


class NotFound(SekishoError):
    code = "not-found"
    http_status = 404
    exit_code = 66


class Conflict(SekishoError):
    code = "conflict"
    http_status = 409
    exit_code = 75


class KeyBackendError(SekishoError):
    code = "key-backend"
    http_status = 503
    exit_code = 69


class WrongPassphrase(KeyBackendError):
    code = "wrong-passphrase"
    exit_code = 77


class StoreError(SekishoError):
    code = "store"
    http_status = 503
    exit_code = 74


class OutputError(SekishoError):
    """An output file of the operator's could not be written (disk full, I/O error)."""

    code = "output"
    exit_code = 74


class DuplicateKey(StoreError):
    """A unique constraint refused a row (the caller may retry with another key)."""


class AuditError(SekishoError):
    code = "audit-unavailable"
    http_status = 503
    exit_code = 74


class AuditChainBroken(AuditError):
    """The journal failed verification; ``seq`` is the first bad sequence number."""

    code = "audit-chain-broken"
    http_status = 500
    exit_code = 2

    def __init__(self, seq: int, message: str) -> None:
        super().__init__(f"journal broken at seq {seq}: {message}")
        self.seq = seq


class AuditTailUnsigned(AuditError):
    """Verification found records after the newest checkpoint that have waited unsigned for
    longer than checkpoints allow: the journal stopped signing (its audit key missing, no
    refresher running), and records nothing signs can be rewritten unnoticed. Not proof of
    tampering, so not ``AuditChainBroken``, but a journal not to call intact either."""

    code = "audit-unsigned-tail"
    http_status = 500
    exit_code = 2

    def __init__(self, seq: int, message: str) -> None:
        super().__init__(f"journal unsigned from seq {seq}: {message}")
        self.seq = seq


class Discrepancies(SekishoError):
    """``cert check`` found certificates, CRLs, OCSP answers or the journal disagreeing."""

    code = "discrepancies"
    exit_code = 2


class SchemaNotCurrent(SekishoError):
    """``db status --check``: the store is not at this version's schema (migrations pending,
    or a store this version cannot migrate)."""

    code = "schema-not-current"
    exit_code = 2
