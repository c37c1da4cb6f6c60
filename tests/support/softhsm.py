"""A throwaway SoftHSM2 for the tests: a token directory under a temporary directory, a
``softhsm2.conf`` naming it, and tokens initialised with ``softhsm2-util`` (the real tool).

SoftHSM reads ``SOFTHSM2_CONF`` once, when the module is initialised in a process, and sees the
tokens present then: :func:`start` sets the variable and creates every token the session
needs before any test loads the module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hsm.pkcs11 import Pkcs11Backend

MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
SO_PIN = "so-secret-8765"
USER_PIN = "user-secret-4321"
TIMEOUT = 60.0


def module_path() -> str | None:
    return next((m for m in MODULES if os.path.isfile(m)), None)


def spy_module() -> str | None:
    """OpenSC's pkcs11-spy: logs every PKCS#11 call (tests count C_Login with it)."""
    found = sorted(glob.glob("/usr/lib/*/pkcs11-spy.so"))
    return found[0] if found else None


def available() -> str | None:
    if module_path() is None:
        return "SoftHSM2 is not installed (apt-get install softhsm2)"
    if shutil.which("softhsm2-util") is None:
        return "softhsm2-util is not on PATH"
    return None


@dataclasses.dataclass
class SoftHsm:
    base: Path
    module: str
    pin_file: Path

    @property
    def conf(self) -> Path:
        return self.base / "softhsm2.conf"

    @property
    def tokens(self) -> Path:
        return self.base / "tokens"

    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def init_token(self, label: str) -> None:
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label,
             "--so-pin", SO_PIN, "--pin", USER_PIN],
            env={**os.environ, **self.env()}, check=True, capture_output=True, timeout=TIMEOUT,
        )  # fmt: skip

    def token_dir(self, label: str) -> Path:
        """The directory SoftHSM keeps one token in (found by its label in token.object)."""
        for path in self.tokens.iterdir():
            obj = path / "token.object"
            if obj.is_file() and label.encode() in obj.read_bytes():
                return path
        raise FileNotFoundError(f"no SoftHSM token directory for {label!r}")

    def settings(self, token: str, prefix: str) -> dict[str, object]:
        """Sekisho settings for the pkcs11 backend on ``token``."""
        return {
            "key_backend": "pkcs11",
            "pkcs11_module": self.module,
            "pkcs11_token": token,
            "pkcs11_pin_file": str(self.pin_file),
            "pkcs11_label_prefix": prefix,
        }

    def write_settings(self, data_dir: Path, token: str, prefix: str) -> None:
        """``data_dir/sekisho.toml`` with the pkcs11 backend on ``token`` (the PIN file's path,
        never the PIN)."""
        data_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{k} = {json.dumps(v)}" for k, v in self.settings(token, prefix).items()]
        (data_dir / "sekisho.toml").write_text("[sekisho]\n" + "\n".join(lines) + "\n")

    @contextlib.contextmanager
    def token_away(self, label: str) -> Iterator[None]:
        """The token's directory replaced by an empty one (the token is gone) inside the
        block; put back afterwards, dropping whatever the module wrote meanwhile."""
        token_dir = self.token_dir(label)
        away = self.base / f"away-{token_dir.name}"
        shutil.move(token_dir, away)
        token_dir.mkdir()
        try:
            yield
        finally:
            shutil.rmtree(token_dir)
            shutil.move(away, token_dir)

    @contextlib.contextmanager
    def backend(self, token: str, prefix: str) -> Iterator[Pkcs11Backend]:
        """A backend on ``token`` whose key labels start with ``prefix`` and a random part (a
        test's keys never meet another's), closed after the block."""
        from hsm.pkcs11 import Pkcs11Backend

        backend = Pkcs11Backend(
            self.module, token, USER_PIN, label_prefix=f"{prefix}{secrets.token_hex(3)}-"
        )
        try:
            yield backend
        finally:
            backend.close()

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def start(tokens: tuple[str, ...]) -> SoftHsm:
    """Create the configuration and ``tokens``, and point this process at them."""
    module = module_path()
    assert module is not None, available()
    base = Path(tempfile.mkdtemp(prefix="sekisho-softhsm-"))
    (base / "tokens").mkdir()
    (base / "softhsm2.conf").write_text(
        f"directories.tokendir = {base / 'tokens'}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    pin_file = base / "user-pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(USER_PIN + "\n")
    hsm = SoftHsm(base, module, pin_file)
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    for label in tokens:
        hsm.init_token(label)
    return hsm
