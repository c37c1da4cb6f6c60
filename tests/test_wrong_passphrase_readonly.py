"""A wrong key passphrase and commands that only read: what needs no key works, as with a
passphrase that is unavailable; what needs the key fails with exit 77 (wrong passphrase)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli import _runner


def _run(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> tuple[int, str]:
    result = _runner(capsys, data_dir)(*args)
    return result.code, result.out + result.err


def test_a_wrong_passphrase_fails_only_what_needs_the_key(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:  # fmt: skip
    public = tmp_path / "audit.pub"
    assert _run(capsys, data_dir, "audit", "public-key", "-o", str(public))[0] == 0
    monkeypatch.setenv("SEKISHO_KEY_PASSPHRASE_ENV", "SEKISHO_TEST_WRONG_PASSPHRASE")
    monkeypatch.setenv("SEKISHO_TEST_WRONG_PASSPHRASE", "x" * 40)
    for args in (
        ("ca", "list"),
        ("audit", "search", "--limit", "1"),
        ("audit", "verify", "--public-key", str(public)),
    ):
        code, text = _run(capsys, data_dir, *args)
        assert code == 0, (args, text)
    # What needs the key says why it cannot have it.
    for args in (
        ("audit", "public-key"),
        ("audit", "verify"),
        ("crl", "generate", "--ca", "admin"),  # a command that writes, as before
    ):
        code, text = _run(capsys, data_dir, *args)
        assert code == 77 and "wrong passphrase" in text, (args, text)
