"""Settings: defaults, TOML file, SEKISHO_* environment, explicit overrides, and validation
that names the setting at fault (ConfigError in-process, exit 78 and no traceback from the CLI).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sekisho.cli import main
from sekisho.errors import ConfigError
from sekisho.settings import Settings, load_settings


def write_toml(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


def test_defaults_without_file_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./var/sekisho.toml here
    s = load_settings(env={})
    assert s.data_dir == Path("var")
    assert s.base_url == "http://127.0.0.1:8080"
    assert s.bind_host == "127.0.0.1" and s.bind_port == 8080
    assert s.key_backend == "software"
    assert s.data_location == "JP"
    assert s.crl_next_update == dt.timedelta(days=7)
    assert s.delta_crl_next_update == dt.timedelta(hours=24)
    # A full CRL shorter than the delta's 24 h: the delta is capped to it, no error.
    short = load_settings(env={}, overrides={"data_dir": s.data_dir, "crl_next_update_days": 0.5})
    assert short.delta_crl_next_update == short.crl_next_update == dt.timedelta(hours=12)
    hour = load_settings(env={}, overrides={"data_dir": s.data_dir, "crl_next_update_days": 1 / 24})
    assert hour.delta_crl_next_update == dt.timedelta(hours=1)
    # Embedded SQLite under the data directory, absolute; passphrase file under secrets/.
    assert s.db_url == f"sqlite:///{(tmp_path / 'var' / 'sekisho.db').resolve()}"
    assert s.passphrase_path == Path("var") / "secrets" / "ca-passphrase"
    assert s.keys_dir == Path("var") / "keys"
    assert s.journal_origin == "127.0.0.1/sekisho/audit"


def test_file_in_data_dir_is_read(tmp_path: Path) -> None:
    data = tmp_path / "d"
    write_toml(
        data / "sekisho.toml",
        '[sekisho]\nbase_url = "https://pki.example.net"\nbind_port = 9000\n'
        "crl_next_update_days = 3\n",
    )
    s = load_settings(env={"SEKISHO_DATA_DIR": str(data)})
    assert s.data_dir == data
    assert s.base_url == "https://pki.example.net"
    assert s.bind_port == 9000
    assert s.crl_next_update_days == 3.0
    assert s.public_url("/crl/admin.crl") == "https://pki.example.net/crl/admin.crl"


def test_file_without_section_header_is_read(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path / "c.toml", "workers = 5\n")
    assert load_settings(cfg, env={}).workers == 5


def test_environment_beats_file_and_overrides_beat_environment(tmp_path: Path) -> None:
    cfg = write_toml(
        tmp_path / "s.toml",
        '[sekisho]\nbind_port = 9000\nworkers = 3\nbase_url = "https://file.example"\n',
    )
    env = {"SEKISHO_BIND_PORT": "9100", "SEKISHO_WORKERS": "4"}
    s = load_settings(cfg, env=env)
    assert (s.bind_port, s.workers, s.base_url) == (9100, 4, "https://file.example")
    s = load_settings(cfg, env=env, overrides={"workers": 7, "bind_port": None})
    # None means "not given on the command line": the environment value stays.
    assert (s.bind_port, s.workers) == (9100, 7)


def test_config_named_by_environment(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path / "elsewhere.toml", "[sekisho]\nworkers = 9\n")
    s = load_settings(env={"SEKISHO_CONFIG": str(cfg), "SEKISHO_DATA_DIR": str(tmp_path / "d")})
    assert s.workers == 9


def test_data_dir_from_environment_beats_file(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path / "s.toml", f'[sekisho]\ndata_dir = "{tmp_path / "file-dir"}"\n')
    s = load_settings(cfg, env={"SEKISHO_DATA_DIR": str(tmp_path / "env-dir")})
    assert s.data_dir == tmp_path / "env-dir"
    s = load_settings(
        cfg,
        env={"SEKISHO_DATA_DIR": str(tmp_path / "env-dir")},
        overrides={"data_dir": tmp_path / "cli-dir"},
    )
    assert s.data_dir == tmp_path / "cli-dir"


def test_passphrase_source_from_env_name_means_no_file(tmp_path: Path) -> None:
    s = load_settings(env={"SEKISHO_KEY_PASSPHRASE_ENV": "MY_PW"}, overrides={"data_dir": tmp_path})
    assert s.passphrase_path is None
    s = load_settings(
        env={"SEKISHO_KEY_PASSPHRASE_FILE": "/run/pw"}, overrides={"data_dir": tmp_path}
    )
    assert s.passphrase_path == Path("/run/pw")


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = load_settings(env={}, overrides={"data_dir": tmp_path})
    with pytest.raises(AttributeError):
        s.workers = 3  # type: ignore[misc]


BAD_VALUES: list[tuple[dict[str, object], str]] = [
    ({"base_url": "ftp://pki.example.com"}, "base_url"),
    ({"base_url": "not a url"}, "base_url"),
    ({"base_url": "https://"}, "base_url"),
    ({"base_url": "https://pki.example.com/?x=1"}, "base_url"),
    ({"base_url": "https://pki.example.com:http/"}, "base_url"),
    ({"base_url": "https://pki example.com/"}, "base_url"),
    ({"base_url": "http://admin:s3cret@pki.example.com"}, "base_url"),  # into every cert
    ({"base_url": "http://admin@pki.example.com"}, "base_url"),
    ({"data_dir": "/"}, "data_dir"),
    ({"crl_next_update_days": -1}, "crl_next_update_days"),
    ({"crl_next_update_days": 11}, "crl_next_update_days"),
    ({"crl_next_update_days": math.nan}, "crl_next_update_days"),
    ({"delta_crl_next_update_hours": -5}, "delta_crl_next_update_hours"),
    ({"delta_crl_next_update_hours": 241}, "delta_crl_next_update_hours"),
    ({"crl_next_update_days": 1 / 25}, "crl_next_update_days"),  # under an hour
    ({"crl_debounce_seconds": -0.5}, "crl_debounce_seconds"),
    ({"crl_keep_days": -1}, "crl_keep_days"),
    ({"crl_keep_days": 3651}, "crl_keep_days"),
    ({"crl_keep_days": math.nan}, "crl_keep_days"),
    ({"audit_checkpoint_every": 0}, "audit_checkpoint_every"),
    ({"audit_checkpoint_minutes": -1}, "audit_checkpoint_minutes"),
    ({"audit_checkpoint_minutes": math.nan}, "audit_checkpoint_minutes"),
    ({"audit_checkpoint_minutes": math.inf}, "audit_checkpoint_minutes"),
    ({"audit_retention_days": 729}, "audit_retention_days"),  # under BR 5.4.3's two years
    ({"audit_retention_days": 36501}, "audit_retention_days"),
    ({"audit_retention_days": "abc"}, "audit_retention_days"),
    ({"bind_port": 0}, "bind_port"),
    ({"bind_port": 70000}, "bind_port"),
    ({"bind_port": "http"}, "bind_port"),
    ({"bind_port": True}, "bind_port"),
    ({"workers": 0}, "workers"),
    ({"workers": 2.5}, "workers"),
    ({"max_request_bytes": 10}, "max_request_bytes"),
    ({"request_body_seconds": 0.1}, "request_body_seconds"),
    ({"request_body_seconds": 3600}, "request_body_seconds"),
    ({"max_connections_per_client": -1}, "max_connections_per_client"),
    ({"max_connections_per_client": 1001}, "max_connections_per_client"),
    ({"key_backend": "vault"}, "key_backend"),
    ({"data_location": "US"}, "data_location"),
    ({"log_level": "LOUD"}, "log_level"),
    ({"database_url": "garbage"}, "database_url"),
    ({"database_url": "mysql://u@h/db"}, "database_url"),
    ({"base_url": ["https://a.example"]}, "base_url"),
    ({"colour": "blue"}, "colour"),
]


@pytest.mark.parametrize(("overrides", "field"), BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_bad_value_is_refused_naming_the_field(
    tmp_path: Path, overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, overrides={"data_dir": tmp_path, **overrides})
    assert field in info.value.message
    assert info.value.exit_code == 78


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("[sekisho]\nbind_prot = 8080\n", "bind_prot"),
        ("[sekisho]\nworkers = 2.5\n", "workers"),
        ('[sekisho]\nworkers = "many"\n', "workers"),
        ("[sekisho]\nlog_level = 3\n", "log_level"),
        ('[sekisho]\nbase_url = ["x"]\n', "base_url"),
        ("[sekisho]\ndata_dir = 5\n", "data_dir"),
        ("[sekisho]\ncrl_next_update_days = true\n", "crl_next_update_days"),
        ("[sekisho]\ncrl_next_update_days = -2\n", "crl_next_update_days"),
        ("[sekisho]\nbase_url = 'http://x y'\n", "base_url"),
        ("sekisho = 5\n", "sekisho"),
        ("[sekisho\nworkers = 2\n", "s.toml"),
    ],
)
def test_bad_file_is_refused_naming_the_field(tmp_path: Path, body: str, field: str) -> None:
    cfg = write_toml(tmp_path / "s.toml", body)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={}, overrides={"data_dir": tmp_path})
    assert field in info.value.message


def test_bad_environment_value_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bind_port"):
        load_settings(env={"SEKISHO_BIND_PORT": "eighty"}, overrides={"data_dir": tmp_path})
    with pytest.raises(ConfigError, match="crl_debounce_seconds"):
        load_settings(env={"SEKISHO_CRL_DEBOUNCE_SECONDS": "-3"}, overrides={"data_dir": tmp_path})


def test_missing_named_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_validate_returns_the_same_settings() -> None:
    s = Settings()
    assert s.validate() is s


@pytest.mark.parametrize(
    ("env", "argv", "field"),
    [
        ({"SEKISHO_BASE_URL": "gopher://x"}, ["ca", "list"], "base_url"),
        ({"SEKISHO_WORKERS": "-1"}, ["ca", "list"], "workers"),
        ({"SEKISHO_CRL_NEXT_UPDATE_DAYS": "-7"}, ["ca", "list"], "crl_next_update_days"),
        ({"SEKISHO_DATABASE_URL": "nonsense"}, ["ca", "list"], "database_url"),
        ({}, ["--log-level", "LOUD", "ca", "list"], "log_level"),
    ],
)
def test_cli_exits_78_with_a_message_and_no_traceback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    env: dict[str, str],
    argv: list[str],
    field: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(["--data-dir", str(tmp_path / "d"), *argv])
    out, err = capfd.readouterr()
    assert code == 78, (out, err)
    assert field in err
    assert "Traceback" not in out + err
    assert not (tmp_path / "d").exists() or not (tmp_path / "d" / "sekisho.db").exists()


def test_cli_unknown_key_in_config_file_exits_78(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg = write_toml(tmp_path / "s.toml", "[sekisho]\nbase_ulr = 'https://x.example'\n")
    code = main(["--data-dir", str(tmp_path / "d"), "--config", str(cfg), "ca", "list"])
    _, err = capfd.readouterr()
    assert code == 78
    assert "base_ulr" in err and "Traceback" not in err


def test_settings_file_another_user_could_write_is_refused(tmp_path: Path) -> None:
    """The settings name the key store and the URLs written into certificates."""
    path = tmp_path / "sekisho.toml"
    path.write_text('base_url = "http://evil.example"\n')
    path.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by others"):
        load_settings(env={}, overrides={"data_dir": tmp_path})
    path.chmod(0o644)
    assert load_settings(env={}, overrides={"data_dir": tmp_path}).base_url == "http://evil.example"
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(path, 65534, 65534)
        with pytest.raises(ConfigError, match="another user"):
            load_settings(env={}, overrides={"data_dir": tmp_path})


def test_base_url_follows_the_serving_port_unless_set(tmp_path: Path) -> None:
    moved = load_settings(env={"SEKISHO_BIND_PORT": "8091"}, overrides={"data_dir": tmp_path})
    assert moved.base_url == "http://127.0.0.1:8091"
    v6 = load_settings(env={}, overrides={"data_dir": tmp_path, "bind_host": "::1"})
    assert v6.base_url == "http://[::1]:8080"
    explicit = load_settings(
        env={"SEKISHO_BIND_PORT": "8091", "SEKISHO_BASE_URL": "https://pki.example.com"},
        overrides={"data_dir": tmp_path},
    )
    assert explicit.base_url == "https://pki.example.com"


SECRET = "pw-never-shown"
APP_URL = f"postgresql+psycopg://app:{SECRET}@db.example/sekisho"
OWNER_URL = f"postgresql+psycopg://owner:{SECRET}@db.example/sekisho"


def test_database_owner_url_is_read_like_database_url_and_never_shown(tmp_path: Path) -> None:
    s = load_settings(
        env={"SEKISHO_DATABASE_URL": APP_URL, "SEKISHO_DATABASE_OWNER_URL": OWNER_URL},
        overrides={"data_dir": tmp_path},
    )
    assert (s.database_url, s.database_owner_url) == (APP_URL, OWNER_URL)
    assert SECRET not in repr(s) and SECRET not in str(s)


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"database_owner_url": OWNER_URL}, "database_owner_url is for PostgreSQL"),
        (
            {"database_url": "sqlite:///x.db", "database_owner_url": OWNER_URL},
            "database_owner_url is for PostgreSQL",
        ),
        (
            {"database_url": APP_URL, "database_owner_url": "sqlite:///x.db"},
            "database_owner_url is for PostgreSQL",
        ),
        (
            {"database_url": APP_URL, "database_owner_url": OWNER_URL.replace("/sekisho", ":x/")},
            "database_owner_url is not a database URL",
        ),
        (
            {
                "database_url": APP_URL,
                "database_owner_url": OWNER_URL.replace("postgresql", "mysql"),
            },
            "database_owner_url: unsupported database 'mysql+psycopg'",
        ),
        (
            {"database_url": APP_URL, "database_owner_url": OWNER_URL + "\x00"},
            "setting 'database_owner_url': cannot use its value (holds a NUL character)",
        ),
        (
            {"database_url": APP_URL + "\x00"},
            "setting 'database_url': cannot use its value (holds a NUL character)",
        ),
    ],
)
def test_a_bad_database_owner_url_is_refused_without_quoting_it(
    tmp_path: Path, values: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, overrides={"data_dir": tmp_path, **values})
    assert problem in info.value.message and SECRET not in info.value.message


def test_cli_refuses_a_bad_database_owner_url_without_quoting_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SEKISHO_DATABASE_URL", APP_URL)
    monkeypatch.setenv("SEKISHO_DATABASE_OWNER_URL", OWNER_URL.replace("/sekisho", ":x/"))
    code = main(["--data-dir", str(tmp_path / "d"), "init"])
    out, err = capfd.readouterr()
    assert code == 78 and err.startswith("error: config: database_owner_url is not a database")
    assert SECRET not in out + err and "Traceback" not in out + err


def test_unknown_sekisho_variables_are_named_in_a_warning_never_their_values(
    tmp_path: Path,
) -> None:
    """A mistyped SEKISHO_DATABSE_URL left the store on the embedded default without a word.
    Each SEKISHO_* variable that nothing reads is named in one warning (its value, which may
    hold a password, never); the settings' own, the other variables Sekisho reads and those the
    settings name for the passphrase or the PIN are not."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SEKISHO_")},
        "SEKISHO_DATABSE_URL": "postgresql://app:hunter2-secret@db.example/sekisho",
        "SEKISHO_PORT": "tcp://10.0.0.1:8080",
        "SEKISHO_LOG_LEVEL": "WARNING",
        "SEKISHO_CRL_NEXT_UPDATE_DAYS": "7",
        "SEKISHO_KEY_PASSPHRASE_ENV": "SEKISHO_VAULT_PASSPHRASE",
        "SEKISHO_VAULT_PASSPHRASE": "x" * 40,
    }
    done = subprocess.run(
        [str(Path(sys.executable).parent / "sekisho"), "--data-dir", str(tmp_path / "d"),
         "ca", "list"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    warned = [
        json.loads(line)["variable"]
        for line in done.stderr.splitlines()
        if line.startswith("{") and "unknown environment variable" in line
    ]
    assert warned == ["SEKISHO_DATABSE_URL", "SEKISHO_PORT"], done.stderr
    assert "hunter2" not in done.stderr and "10.0.0.1" not in done.stderr
    assert done.returncode == 78 and "Traceback" not in done.stderr  # no deployment there
    # A variable a command reads by the name it was given is read, whatever its prefix.
    env["SEKISHO_P12_PW"] = "correct horse battery staple"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "sekisho"), "--data-dir", str(tmp_path / "d"),
         "issue", "--ca", "admin", "--profile", "admin-client", "--keygen", "ec-p256",
         "--subject", "CN=Alice,O=Tenant One", "--p12", str(tmp_path / "a.p12"),
         "--password-env", "SEKISHO_P12_PW"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 78, done.stderr  # read the password, then found no deployment
    assert "SEKISHO_P12_PW" not in done.stderr and "SEKISHO_PORT" in done.stderr
