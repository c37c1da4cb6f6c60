"""``audit_origin`` (SEKISHO_AUDIT_ORIGIN): refused when it could not be a checkpoint's first
line, and refused at start-up when it differs from the origin the journal's checkpoints carry
(using it made an intact journal fail `audit verify`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sekisho.errors import ConfigError
from sekisho.services import build_services
from sekisho.settings import Settings, load_settings
from tests.conftest import _initialise, make_settings
from tests.test_cli import _runner

STORED = "pki.example.com/sekisho/audit"  # what the template's checkpoints carry


def _run(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> tuple[int, str]:
    result = _runner(capsys, data_dir)(*args)
    return result.code, result.out + result.err


@pytest.mark.parametrize(
    "origin",
    ["a\nb", "pki.example.com/audit\n", "pki example", "\tx", "pki.example.com/\x1b[2J",
     "pki.example.com/\u202eaudit", "é.example/audit", "x" * 256],
    ids=["newline", "trailing-newline", "space", "tab", "escape", "bidi", "non-ascii", "long"],
)  # fmt: skip
def test_an_origin_that_cannot_be_a_checkpoint_line_is_a_settings_error(
    tmp_path: Path, origin: str
) -> None:
    with pytest.raises(ConfigError, match="audit_origin"):
        load_settings(env={"SEKISHO_AUDIT_ORIGIN": origin}, overrides={"data_dir": tmp_path})
    with pytest.raises(ConfigError, match="audit_origin"):
        Settings(data_dir=tmp_path, audit_origin=origin).validate()


def test_a_plain_origin_and_the_unset_default_are_accepted(tmp_path: Path) -> None:
    for origin in ("", "example.org/audit-2", "x" * 255, "pki.example.com:8443/a_b~c"):
        env = {"SEKISHO_AUDIT_ORIGIN": origin}
        assert load_settings(env=env, overrides={"data_dir": tmp_path}).audit_origin == origin


def test_an_origin_other_than_the_journals_is_refused_at_start_up(
    settings: Settings, data_dir: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    other = make_settings(data_dir, audit_origin=f"{STORED}2", database_url=settings.database_url)
    with pytest.raises(ConfigError, match="differs from the origin") as refused:
        build_services(other, migrate=False)
    assert repr(STORED) in refused.value.message
    monkeypatch.setenv("SEKISHO_AUDIT_ORIGIN", f"{STORED}2")
    for args in (("audit", "verify"), ("audit", "checkpoint"), ("ca", "list")):
        code, text = _run(capsys, data_dir, *args)
        assert code == 78 and "differs from the origin" in text and repr(STORED) in text, text
    # The journal's own origin, given explicitly, is fine.
    monkeypatch.setenv("SEKISHO_AUDIT_ORIGIN", STORED)
    assert _run(capsys, data_dir, "audit", "checkpoint")[0] == 0
    code, text = _run(capsys, data_dir, "audit", "verify")
    assert code == 0 and "journal intact" in text, text
    monkeypatch.delenv("SEKISHO_AUDIT_ORIGIN")
    code, text = _run(capsys, data_dir, "audit", "verify")
    assert code == 0 and "journal intact" in text, text


def test_an_explicit_origin_names_a_new_journal(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", audit_origin="example.org/audit-2")
    _initialise(settings)  # its first checkpoint carries the explicit origin
    svc = build_services(settings, migrate=False)
    try:
        assert svc.journal.origin == "example.org/audit-2"
    finally:
        svc.close()
    # Unset later, the origin stays the journal's (not one derived from base_url).
    svc = build_services(make_settings(tmp_path / "data"), migrate=False)
    try:
        assert svc.journal.origin == "example.org/audit-2"
    finally:
        svc.close()
