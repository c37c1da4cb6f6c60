"""The settings file and ``SEKISHO_*`` variables (``sekisho.settings.load_settings``): a file
or value that cannot be used is a ``ConfigError`` naming the setting (exit 78), never another
exception (exit 70, "a bug")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sekisho.errors import ConfigError
from sekisho.settings import _FIELDS, ENV_PREFIX, load_settings
from tests.fuzz.mutate import FUZZ, mutated

VALID = b"""[sekisho]
base_url = "https://pki.example.com:8443/sekisho"
bind_port = 8443
workers = 4
ocsp_validity_hours = 72.0
ocsp_sign_with_ca = false
database_url = "postgresql+psycopg://user:pw@db:5432/sekisho"
log_level = "info"
audit_origin = "pki.example.com/sekisho/audit"
"""
# TOML values of every type, and strings that have broken URL, path and number parsing.
VALUES = (
    *("1", "0", "-1", "99999999999999999999999", "1.5", "nan", "inf", "-inf", "true"),
    *("[]", '[1, "a"]', "{}", "{a = 1}", "1979-05-27T07:32:00Z", "07:32:00", "1979-05-27"),
    *(json.dumps(s) for s in ("", "/", "JP", "pkcs11", "DEBUG", " 12 ", "1e3", "NaN")),
    *(json.dumps(s) for s in ("http://[::1", "http://[v1.x]/", "http://h:99999/", "https://h/?q")),
    *(json.dumps(s) for s in ("http://u:p@h/", "http://a\uff03b/", "a\x00b", "sqlite:///x")),
    *(json.dumps(s) for s in ("postgresql://u@h:port/d", "mysql://x", "postgresql://[::1/d")),
)
NAMES = sorted(_FIELDS)


@st.composite
def settings_files(draw: st.DrawFn) -> bytes:
    lines = ["[sekisho]"] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 5))):
        key = draw(st.sampled_from(NAMES) | st.text(max_size=8).map(json.dumps))
        value = draw(st.sampled_from(VALUES) | st.text(max_size=40).map(json.dumps))
        lines.append(f"{key} = {value}")
    return ("\n".join(lines) + "\n").encode()


def load(content: bytes, directory: Path, env: dict[str, str] | None = None) -> None:
    path = directory / "sekisho.toml"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    try:
        load_settings(path, env=env or {})
    except ConfigError:
        pass


@FUZZ
@given(settings_files() | mutated([VALID], max_steps=4) | st.binary(max_size=200))
def test_a_settings_file_loads_or_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    load(content, tmp_path)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(NAMES).map(lambda n: ENV_PREFIX + n.upper()),
        st.sampled_from(VALUES).map(lambda v: v.strip('"')) | st.text(max_size=40),
        max_size=3,
    )
)
def test_environment_settings_load_or_are_a_config_error(
    tmp_path: Path, env: dict[str, str]
) -> None:
    env = {k: v for k, v in env.items() if "\x00" not in v}  # (no NUL in a real environment)
    load(b"", tmp_path, env)


@pytest.mark.parametrize("name", NAMES)
def test_every_setting_with_every_awkward_value(tmp_path: Path, name: str) -> None:
    for value in VALUES:
        load(f"[sekisho]\n{name} = {value}\n".encode(), tmp_path)


# -- regressions: found by the fuzz campaign, each a ValueError that escaped load_settings ------
@pytest.mark.parametrize(
    "content",
    [
        b'base_url = "http://[::1"\n',  # unclosed IPv6 bracket
        b'base_url = "http://a\\uff03b/"\n',  # netloc with a fullwidth '#' (NFKC)
        b'bind_host = "["\n',  # base_url made from it: "http://[[]:8080"
        b'base_url = "http://[x]/"\n',  # bracketed host that is no IP address
    ],
)
def test_regression_base_url_urlsplit_value_error(tmp_path: Path, content: bytes) -> None:
    load(content, tmp_path)


def test_regression_data_dir_nul(tmp_path: Path) -> None:
    load(b'data_dir = "a\\u0000b"\n', tmp_path)  # TOML's \u0000: a NUL in the path


def test_regression_database_url_bad_port(tmp_path: Path) -> None:
    load(b'database_url = "postgresql://u@h:abc/d"\n', tmp_path)
