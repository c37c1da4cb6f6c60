"""``persist_settings`` (``init --key-backend ...``) writes a settings file that the next
command accepts, whatever the umask."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sekisho.settings import CONFIG_NAME, load_settings, persist_settings


@pytest.fixture
def group_writable_umask() -> Iterator[None]:
    previous = os.umask(0o002)  # Debian/Ubuntu's default for a user with a private group
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("group_writable_umask")
@pytest.mark.parametrize("existing", [None, "[sekisho]\nworkers = 3\n"], ids=["new", "existing"])
def test_a_persisted_settings_file_is_owner_only_and_loads(
    tmp_path: Path, existing: str | None
) -> None:
    data_dir = tmp_path / "data"
    path = data_dir / CONFIG_NAME
    if existing is not None:
        data_dir.mkdir()
        path.write_text(existing)
        path.chmod(0o644)
    assert persist_settings(path, {"key_backend": "software"}) == ["key_backend"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(data_dir)) == [CONFIG_NAME]  # no temporary file left
    settings = load_settings(env={}, overrides={"data_dir": data_dir})
    assert settings.key_backend == "software"
    if existing is not None:
        assert settings.workers == 3
