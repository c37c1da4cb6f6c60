"""Settings: a TOML file, then ``SEKISHO_*`` environment overrides, validated at start.

Precedence (last wins): built-in defaults < ``<data_dir>/sekisho.toml`` (or the file named by
``--config`` / ``SEKISHO_CONFIG``) < ``SEKISHO_<FIELD>`` environment variables < explicit
overrides from the command line. Secrets are never values here: settings name a *file* or an
*environment variable* that holds them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sekisho.errors import ConfigError, shown
from sekisho.files import FileRefused, read_regular, replace_synced

log = logging.getLogger("sekisho.settings")
ENV_PREFIX = "SEKISHO_"
CONFIG_NAME = "sekisho.toml"
MAX_SETTINGS_FILE = 1024 * 1024
# Service terms, item 4: customer data may be stored in Japan only.
ALLOWED_DATA_LOCATIONS = frozenset({"JP"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The first line of every checkpoint body (C2SP tlog-checkpoint): printable ASCII, no spaces.
AUDIT_ORIGIN = re.compile(r"[\x21-\x7e]{1,255}")
# `audit purge` keeps records this many days at least (BR 5.4.3: two years), at most a century.
MIN_RETENTION_DAYS = 730
MAX_RETENTION_DAYS = 36500


@dataclasses.dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("var")
    base_url: str = "http://127.0.0.1:8080"
    # repr=False: a URL may carry a password, and a Settings printed or logged must not show it.
    database_url: str = dataclasses.field(default="", repr=False)
    # PostgreSQL: the schema owner's connection. When set, migrations run through it and then
    # grant the role of database_url what Sekisho uses, and no more (sekisho.roles).
    database_owner_url: str = dataclasses.field(default="", repr=False)
    bind_host: str = "127.0.0.1"
    bind_port: int = 8080
    workers: int = 2
    key_backend: str = "software"
    key_passphrase_file: str = ""
    key_passphrase_env: str = ""
    crl_next_update_days: float = 7.0
    delta_crl_next_update_hours: float = 24.0
    # Delta CRLs (RFC 5280 5.2.4) and the full CRL's Freshest CRL pointer to them; off for
    # relying parties that misread a delta as a whole list (docs/relying-parties.md).
    crl_deltas: bool = True
    # Every to-be-signed certificate goes through pkilint before the CA signs it (ca/lint.py;
    # BR 4.3.1.2); off only where the issuance rate matters more (docs/decisions.md).
    lint_before_signing: bool = True
    crl_debounce_seconds: float = 2.0
    # CRLs whose nextUpdate passed longer ago than this are deleted (each CA's newest full and
    # delta CRL are kept whatever their age).
    crl_keep_days: float = 90.0
    # `serve`: a refresher process whose loop has not gone round for this long is killed and
    # started again; /healthz calls it stale after half of it.
    refresher_stuck_seconds: float = 300.0
    audit_checkpoint_every: int = 1000
    audit_checkpoint_minutes: float = 5.0
    audit_origin: str = ""
    # `audit purge`: how long journal records are kept (BR 5.4.3: two years at least, after the
    # event, the certificate's expiry, or the CA certificate's expiry for CA key events).
    audit_retention_days: int = 730
    data_location: str = "JP"
    max_request_bytes: int = 65536
    request_body_seconds: float = 10.0  # a request body must arrive within this (else 408)
    # `serve`: connections one client address may hold in each worker (0: no cap, for behind a
    # reverse proxy, whose own address every connection then has).
    max_connections_per_client: int = 128
    log_level: str = "INFO"
    # OCSP: validity of each response (BR 4.9.10: 8 h .. 10 d), the share of it after which
    # a pre-signed response is re-signed, and whether the CA key signs instead of a delegate.
    ocsp_validity_hours: float = 72.0
    ocsp_refresh_fraction: float = 0.5
    ocsp_sign_with_ca: bool = False
    # PKCS#11 key backend (key_backend = "pkcs11"): the module (shared library), the token's
    # label, where the user PIN comes from (a 0600 file or a named environment variable), and
    # the label prefix of the objects we create.
    pkcs11_module: str = ""
    pkcs11_token: str = ""
    pkcs11_pin_file: str = ""
    pkcs11_pin_env: str = ""
    pkcs11_label_prefix: str = "sekisho-"

    # Derived values -------------------------------------------------------------------
    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'sekisho.db').resolve()}"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def passphrase_path(self) -> Path | None:
        if self.key_passphrase_env:
            return None
        if self.key_passphrase_file:
            return Path(self.key_passphrase_file)
        return self.data_dir / "secrets" / "ca-passphrase"

    @property
    def ocsp_validity(self) -> dt.timedelta:
        return dt.timedelta(hours=self.ocsp_validity_hours)

    @property
    def crl_next_update(self) -> dt.timedelta:
        return dt.timedelta(days=self.crl_next_update_days)

    @property
    def crl_keep(self) -> dt.timedelta:
        return dt.timedelta(days=self.crl_keep_days)

    @property
    def delta_crl_next_update(self) -> dt.timedelta:
        """A delta CRL never outlives the full CRL's validity: capped to it (with the default
        24 h, a full CRL of 12 h gives deltas of 12 h rather than a settings error)."""
        return min(dt.timedelta(hours=self.delta_crl_next_update_hours), self.crl_next_update)

    @property
    def journal_origin(self) -> str:
        return self.audit_origin or f"{urlsplit(self.base_url).hostname}/sekisho/audit"

    def public_url(self, path: str) -> str:
        return self.base_url.rstrip("/") + "/" + path.lstrip("/")

    def validate(self) -> Settings:
        """Raise ConfigError with a message naming the setting at fault."""
        if not 1 <= self.bind_port <= 65535:  # first: an unset base_url is made from it
            raise ConfigError(f"bind_port out of range: {self.bind_port}")
        try:
            parts = urlsplit(self.base_url)
            hostname = parts.hostname
        except ValueError as exc:  # "http://[::1", a host NFKC makes into a delimiter
            raise ConfigError(f"base_url is not a URL: {shown(self.base_url)} ({exc})") from None
        if parts.scheme not in {"http", "https"} or not hostname:
            raise ConfigError(
                f"base_url must be an http(s) URL with a host, got {shown(self.base_url)}"
            )
        if parts.query or parts.fragment:
            raise ConfigError("base_url must not carry a query or fragment")
        if parts.username is not None or parts.password is not None:
            # It is written into every certificate's CRL distribution point and AIA.
            raise ConfigError("base_url must not carry a user name or password")
        try:
            parts.port  # noqa: B018  (property that validates the port)
        except ValueError:
            raise ConfigError(f"base_url has a bad port: {shown(self.base_url)}") from None
        if any(ch.isspace() or ord(ch) < 0x21 for ch in self.base_url):
            # It ends up in CRL distribution points and AIA of every certificate.
            raise ConfigError(
                f"base_url must not contain spaces or control characters: {shown(self.base_url)}"
            )
        if self.data_dir.resolve() == Path("/"):
            raise ConfigError("data_dir must not be the root directory")
        if self.data_location.upper() not in ALLOWED_DATA_LOCATIONS:
            raise ConfigError(
                f"data_location {shown(self.data_location)} is not allowed: the service terms keep "
                "customer data in Japan (JP)"
            )
        if self.key_backend not in {"software", "pkcs11"}:
            raise ConfigError(
                f"key_backend must be 'software' or 'pkcs11', not {shown(self.key_backend)}"
            )
        if self.key_backend == "pkcs11":
            if not self.pkcs11_module:
                raise ConfigError("key_backend = pkcs11 needs pkcs11_module (the library path)")
            if not self.pkcs11_token:
                raise ConfigError("key_backend = pkcs11 needs pkcs11_token (the token label)")
            if not (self.pkcs11_pin_file or self.pkcs11_pin_env):
                raise ConfigError(
                    "key_backend = pkcs11 needs pkcs11_pin_file or pkcs11_pin_env (the PIN "
                    "never goes on the command line)"
                )
        if not re.fullmatch(r"[A-Za-z0-9._-]{0,32}", self.pkcs11_label_prefix):
            raise ConfigError("pkcs11_label_prefix: at most 32 of A-Z a-z 0-9 . _ -")
        if not 1 / 24 <= self.crl_next_update_days <= 10:
            # BR 4.9.7 / 7.2: nextUpdate at most 10 days; an hour is the sane floor.
            raise ConfigError("crl_next_update_days must be between 1/24 (1 hour) and 10")
        if not 1 <= self.delta_crl_next_update_hours <= 240:
            raise ConfigError(
                "delta_crl_next_update_hours must be between 1 and 240 (it is capped to the "
                "full CRL's validity, crl_next_update_days)"
            )
        if not 0 <= self.crl_debounce_seconds <= 60:
            raise ConfigError("crl_debounce_seconds must be between 0 and 60")
        if not 0 <= self.crl_keep_days <= 3650:
            raise ConfigError("crl_keep_days must be between 0 and 3650")
        if not 10 <= self.refresher_stuck_seconds <= 3600:
            raise ConfigError("refresher_stuck_seconds must be between 10 and 3600")
        if self.audit_origin and not AUDIT_ORIGIN.fullmatch(self.audit_origin):
            # A line break in it would split every checkpoint body it is written into.
            raise ConfigError(
                f"audit_origin {shown(self.audit_origin)} refused: 1 to 255 printable ASCII "
                "characters without spaces (such as pki.example.com/sekisho/audit)"
            )
        if self.audit_checkpoint_every < 1:
            raise ConfigError("audit_checkpoint_every must be a positive number of records")
        # NaN compares false with everything: test finiteness first (timedelta refuses it).
        if not math.isfinite(self.audit_checkpoint_minutes) or not (
            0 < self.audit_checkpoint_minutes <= 24 * 60
        ):
            raise ConfigError("audit_checkpoint_minutes must be between 0 and 1440 (one day)")
        if not MIN_RETENTION_DAYS <= self.audit_retention_days <= MAX_RETENTION_DAYS:
            raise ConfigError(
                f"audit_retention_days must be between {MIN_RETENTION_DAYS} (two years, the "
                f"least CA/Browser Forum BR 5.4.3 allows) and {MAX_RETENTION_DAYS}"
            )
        if not math.isfinite(self.ocsp_validity_hours) or not (
            8 <= self.ocsp_validity_hours <= 240
        ):
            raise ConfigError("ocsp_validity_hours must be between 8 and 240 (10 days)")
        if not math.isfinite(self.ocsp_refresh_fraction) or not (
            0.1 <= self.ocsp_refresh_fraction <= 0.9
        ):
            raise ConfigError("ocsp_refresh_fraction must be between 0.1 and 0.9")
        if not 1024 <= self.max_request_bytes <= 16 * 1024 * 1024:
            raise ConfigError("max_request_bytes must be between 1 KiB and 16 MiB")
        if not 1.0 <= self.request_body_seconds <= 300.0:
            raise ConfigError("request_body_seconds must be between 1 and 300")
        if not 0 <= self.max_connections_per_client <= 1000:
            raise ConfigError("max_connections_per_client must be between 0 and 1000 (0: no cap)")
        if self.workers < 1 or self.workers > 64:
            raise ConfigError("workers must be between 1 and 64")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        database = (
            _check_database_url("database_url", self.database_url) if self.database_url else ""
        )
        if self.database_owner_url:
            owner = _check_database_url("database_owner_url", self.database_owner_url)
            if owner != "postgresql" or database != "postgresql":
                # SQLite has no roles: whoever may write the file owns the schema.
                raise ConfigError(
                    "database_owner_url is for PostgreSQL: it and database_url must both be "
                    "postgresql:// URLs (the schema owner's and the application's)"
                )
        return self


def _check_database_url(setting: str, url: str) -> str:
    """The database a URL setting names (``sqlite`` or ``postgresql``). Messages name the
    setting and never quote the URL, which may carry a password."""
    # Caught here, a bad URL names its setting; caught by SQLAlchemy later, it is a traceback.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        driver = make_url(url).drivername
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigError(
            f"{setting} is not a database URL (sqlite:/// or postgresql://)"
        ) from None
    database = driver.split("+", 1)[0]
    if database not in {"sqlite", "postgresql"}:
        raise ConfigError(f"{setting}: unsupported database {shown(driver)} (sqlite or postgresql)")
    return database


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
# Settings whose value may carry a password: no message quotes them.
URL_SETTINGS = frozenset({"database_url", "database_owner_url"})


def _coerce(name: str, raw: Any) -> Any:
    target = _FIELDS[name].type
    try:
        if isinstance(raw, str) and "\x00" in raw:
            # A path with one cannot be opened (ValueError deep inside a later step); no
            # setting has a use for one.
            raise ValueError("holds a NUL character")
        if target in ("Path", Path):
            if not isinstance(raw, str | os.PathLike):
                raise ValueError(f"expected a path, not {type(raw).__name__}")
            if not str(raw).strip():
                raise ValueError("empty (write . for the current directory)")
            return Path(raw)
        if target in ("int", int):
            # int(2.5) would silently drop the fraction; bool is an int subclass.
            if isinstance(raw, bool) or not isinstance(raw, int | str):
                raise ValueError(f"expected an integer, not {type(raw).__name__}")
            return int(raw)
        if target in ("bool", bool):
            if isinstance(raw, bool):
                return raw
            text = raw.strip().lower() if isinstance(raw, str) else None
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if target in ("float", float):
            if isinstance(raw, bool) or not isinstance(raw, int | float | str):
                raise ValueError(f"expected a number, not {type(raw).__name__}")
            return float(raw)
        if not isinstance(raw, str):
            # str(["x"]) would turn a TOML list or table into a plausible-looking string.
            raise ValueError(f"expected a string, not {type(raw).__name__}")
        return raw
    except (TypeError, ValueError) as exc:
        value = "its value" if name in URL_SETTINGS else shown(raw)  # a URL's password
        raise ConfigError(f"setting {name!r}: cannot use {value} ({exc})") from None


def _check_trusted_file(path: Path, st: os.stat_result) -> None:
    """The settings decide where keys live and what URLs go into certificates: a file another
    user owns or may write is refused (e.g. planted in a data directory someone else created)."""
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(f"settings file {path} belongs to another user (uid {st.st_uid})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"settings file {path} is writable by others; chmod go-w it")


def config_path(config_file: Path | None, data_dir: Path, env: Mapping[str, str]) -> Path:
    """The settings file read: ``--config``, else ``SEKISHO_CONFIG``, else the data
    directory's ``sekisho.toml`` (which need not exist)."""
    if config_file is not None:
        return config_file
    named = env.get(ENV_PREFIX + "CONFIG")
    return Path(named) if named else data_dir / CONFIG_NAME


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated settings. Unknown keys are errors: a typo must not pass silently."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    data_dir = (overrides or {}).get("data_dir") or env.get(ENV_PREFIX + "DATA_DIR") or "var"
    path = config_path(config_file, Path(data_dir), env)
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. a name too long for the file system
        raise ConfigError(f"cannot use settings file {path}: {exc.strerror or exc}") from None
    if exists:
        try:
            raw_file = read_regular(
                path, MAX_SETTINGS_FILE, check=lambda st: _check_trusted_file(path, st)
            )
            doc = tomllib.loads(raw_file.decode("utf-8"))
        except FileRefused as exc:
            raise ConfigError(f"settings file {path} {exc}") from None
        except (OSError, ValueError) as exc:  # TOMLDecodeError and UnicodeDecodeError included
            raise ConfigError(f"cannot read settings file {path}: {exc}") from None
        section = doc.get("sekisho", doc)
        if not isinstance(section, dict):
            raise ConfigError(f"[sekisho] in {path} must be a table of settings")
        for key, raw in section.items():
            if key not in _FIELDS:
                raise ConfigError(f"unknown setting {shown(key)} in {path}")
            values[key] = _coerce(key, raw)
    elif config_file is not None:
        raise ConfigError(f"settings file {config_file} does not exist")
    for name in _FIELDS:
        raw_env = env.get(ENV_PREFIX + name.upper())
        if raw_env is not None:
            values[name] = _coerce(name, raw_env)
    for key, raw in (overrides or {}).items():
        if raw is not None:
            if key not in _FIELDS:
                raise ConfigError(f"unknown setting {shown(key)}")
            values[key] = _coerce(key, raw)
    values.setdefault("data_dir", Path(data_dir))
    if "base_url" not in values:
        # Unset: where `serve` listens, so that the URLs written into certificates (CDP, AIA)
        # follow a changed port (it stayed :8080 while serving elsewhere).
        host = str(values.get("bind_host", Settings.bind_host))
        if host in ("", "0.0.0.0", "::"):  # noqa: S104 - a wildcard is not a URL host
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        values["base_url"] = f"http://{host}:{values.get('bind_port', Settings.bind_port)}"
    settings = Settings(**values).validate()
    _warn_unknown_env(env, settings)
    return settings


# SEKISHO_* variables read outside the settings: the settings file, the data directory, the
# log level (sekisho.cli) and the weak-key lists' directory (ca.weakkeys).
OTHER_ENV = frozenset({"CONFIG", "DATA_DIR", "LOG_LEVEL", "WEAK_KEY_LISTS"})
_warned: set[str] = set()
_read_by_name: set[str] = set()


def note_env_read(name: str) -> None:
    """Variable ``name`` is read by the name a command was given (``issue --password-env``):
    never reported unknown, whatever its prefix."""
    _read_by_name.add(name)


def unknown_env(env: Mapping[str, str], settings: Settings) -> list[str]:
    """The ``SEKISHO_*`` variables in ``env`` that nothing reads (a mistyped
    ``SEKISHO_DATABSE_URL`` left the store on the embedded default, silently), sorted. The
    variables the settings name for the passphrase and the PIN, and those a command was told
    to read (:func:`note_env_read`), are read, whatever their names."""
    known = {ENV_PREFIX + name.upper() for name in (*_FIELDS, *OTHER_ENV)}
    known |= {settings.key_passphrase_env, settings.pkcs11_pin_env, *_read_by_name}
    return sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known)


def _warn_unknown_env(env: Mapping[str, str], settings: Settings) -> None:
    """Log each unknown ``SEKISHO_*`` variable once per process: its name, never its value. A
    warning, not an error as an unknown key in the settings file is: the environment is shared
    (an orchestrator adds SEKISHO_PORT and SEKISHO_SERVICE_HOST for a service called sekisho)."""
    for name in unknown_env(env, settings):
        if name not in _warned:
            _warned.add(name)
            log.warning(
                "unknown environment variable ignored: no setting is called so",
                extra={"variable": name},  # the JSON log line escapes what it must
            )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(ch) < 0x20 for ch in escaped):
        raise ConfigError("a setting value must not contain control characters")
    return f'"{escaped}"'


def with_setting(text: str, key: str, value: Any) -> str:
    """A settings file's ``text`` with ``key`` set to ``value``: its line dropped and one
    appended, every other setting kept as it was (checked by reading both). ConfigError when
    that cannot be done so (a value over several lines, a table after the settings)."""
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot read the settings file: {exc}") from None
    try:
        kept = "".join(
            line
            for line in text.splitlines(keepends=True)
            if not re.match(rf"\s*{re.escape(key)}\s*=", line)
        )
        if kept and not kept.endswith("\n"):
            kept += "\n"
        kept += f"{key} = {_toml_value(value)}\n"
        after = tomllib.loads(kept)
    except tomllib.TOMLDecodeError:
        after = None
    wanted = {**before.get("sekisho", before), key: value}
    if after is None or after.get("sekisho", after) != wanted:
        raise ConfigError(f"cannot set {key} in the settings file: edit it by hand")
    return kept


def persist_settings(path: Path, values: Mapping[str, Any]) -> list[str]:
    """Record ``values`` in the settings file ``path`` (its ``[sekisho]`` table), so later
    commands find them without repeating options. A key already set there to another value is
    a ConfigError (the operator decides); returns the keys written."""
    existing: dict[str, Any] = {}
    text = ""
    if path.exists():
        text = path.read_text()
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"cannot read settings file {path}: {exc}") from None
        if set(doc) - {"sekisho"}:
            raise ConfigError(f"{path} has tables other than [sekisho]: add the settings by hand")
        existing = dict(doc.get("sekisho", {}))
    written = []
    lines = []
    for key, value in values.items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {shown(key)}")
        if key in existing:
            if _coerce(key, existing[key]) != _coerce(key, value):
                raise ConfigError(f"{path} already sets {key} to another value")
            continue
        lines.append(f"{key} = {_toml_value(value)}\n")
        written.append(key)
    if lines:
        if not text:
            text = "[sekisho]\n"
        elif "[sekisho]" not in text:
            raise ConfigError(f"{path} has no [sekisho] table: add the settings by hand")
        if not text.endswith("\n"):
            text += "\n"
        _replace_file(path, (text + "".join(lines)).encode())
    return written


def _replace_file(path: Path, data: bytes) -> None:
    """``path`` replaced by a file holding ``data``, owner-only (0600) whatever the umask:
    ``load_settings`` refuses a settings file others may write (0664 under umask 002)."""
    try:
        replace_synced(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write settings file {path}: {exc.strerror or exc}") from None
