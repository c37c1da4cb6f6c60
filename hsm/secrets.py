"""Where secrets come from: a file (mode 0600 or stricter) or a named environment variable.

Never argv, never logs: callers get bytes and must not print them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from sekisho.errors import PATH_SHOWN, ConfigError, SecretUnavailable, shown
from sekisho.files import FileRefused, create_synced, read_regular

MAX_SECRET_FILE = 64 * 1024


def read_secret(
    path: Path | None,
    env_name: str = "",
    env: Mapping[str, str] | None = None,
    *,
    what: str = "key passphrase",
    min_length: int = 16,
) -> bytes:
    """The secret from the named environment variable, else from ``path``: a regular file
    (not a symlink) owned by this user or root, not accessible to group or others, checked on
    the descriptor it is read from. Shorter than ``min_length`` bytes, from either source: refused.
    ``what`` names it in errors; the value never appears."""
    env = os.environ if env is None else env
    if env_name:
        text = env.get(env_name)
        if not text:
            raise SecretUnavailable(
                f"environment variable {shown(env_name)} (named as the {what}) is not set or empty"
            )
        try:
            value = text.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{what} in {shown(env_name)} is not valid UTF-8") from None
        if len(value) < min_length:
            raise ConfigError(f"{what} in {shown(env_name)} is shorter than {min_length} bytes")
        return value
    if path is None:
        raise ConfigError(f"no {what} source configured")

    def owner_only(st: os.stat_result) -> None:
        if st.st_uid not in (os.geteuid(), 0):
            raise SecretUnavailable(
                f"{what} file {shown(path, PATH_SHOWN)} belongs to another user"
            )
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise FileRefused("is readable by others; chmod 600 it")

    try:
        raw = read_regular(path, MAX_SECRET_FILE, follow_symlinks=False, check=owner_only)
    except FileNotFoundError:
        raise SecretUnavailable(f"{what} file {shown(path, PATH_SHOWN)} does not exist") from None
    except FileRefused as exc:
        raise ConfigError(f"{what} file {shown(path, PATH_SHOWN)} {exc}") from None
    except OSError as exc:
        raise SecretUnavailable(
            f"{what} file {shown(path, PATH_SHOWN)} cannot be read: {exc.strerror or exc}"
        ) from None
    value = raw.rstrip(b"\r\n")
    if len(value) < min_length:
        raise ConfigError(f"{what} in {shown(path, PATH_SHOWN)} is shorter than {min_length} bytes")
    return value


def create_secret_file(path: Path) -> None:
    """Write a fresh random passphrase (256 bits, URL-safe text) readable by the owner only,
    on disk before any key it will protect (synced, linked into place only once whole: a
    crash or power loss never leaves the keys without it, nor an empty file in its place).
    If another process created it first, theirs is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    with contextlib.suppress(FileExistsError):
        create_synced(path, (secrets.token_urlsafe(32) + "\n").encode("ascii"))
