"""Someone else's code checks every artefact: pkilint (run in-process through its own CLI entry
points, so the findings are exactly what ``lint_pkix_cert lint -s WARNING`` reports), OpenSSL
and GnuTLS (real binaries, with timeouts).

Each ``pkilint_*`` / ``openssl_*`` helper raises ``AssertionError`` carrying the tool's output
when the tool disagrees, so a failing test shows the finding.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pkilint.bin import lint_crl as _lint_crl
from pkilint.bin import lint_ocsp_response as _lint_ocsp
from pkilint.bin import lint_pkix_cert as _lint_cert
from pkilint.bin import lint_pkix_signer_signee_cert_chain as _lint_chain

TIMEOUT = 30


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)


def _pem_crl(der: bytes) -> bytes:
    return x509.load_der_x509_crl(der).public_bytes(Encoding.PEM)


def _run_pkilint(main: Callable[[list[str]], int], args: list[str], docs: Sequence[bytes]) -> None:
    with tempfile.TemporaryDirectory(prefix="pkilint-") as tmp:
        paths = []
        for i, doc in enumerate(docs):
            path = Path(tmp) / f"doc{i}.der"
            path.write_bytes(doc)
            paths.append(str(path))
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(["lint", "-s", "WARNING", "--document-format", "DER", *args, *paths])
    assert code == 0, f"pkilint findings ({code}):\n{out.getvalue()}"


def pkilint_cert(der: bytes) -> None:
    _run_pkilint(_lint_cert.main, [], [der])


def pkilint_chain(signer_der: bytes, signee_der: bytes) -> None:
    _run_pkilint(_lint_chain.main, [], [signer_der, signee_der])


def pkilint_crl(der: bytes, delta: bool = False) -> None:
    """``lint_crl -t CRL -p PKIX``. pkilint has no separate delta profile; ``delta`` is kept so
    call sites say what they lint."""
    del delta
    _run_pkilint(_lint_crl.main, ["-t", "CRL", "-p", "PKIX"], [der])


def pkilint_ocsp_response(der: bytes) -> None:
    _run_pkilint(_lint_ocsp.main, [], [der])


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=TIMEOUT, check=False)


class _Files:
    def __init__(self, tmp: str) -> None:
        self.dir = Path(tmp)
        self.n = 0

    def write(self, data: bytes, suffix: str = ".pem") -> str:
        self.n += 1
        path = self.dir / f"f{self.n}{suffix}"
        path.write_bytes(data)
        return str(path)


def _openssl_verify_run(
    leaf: bytes,
    chain: Sequence[bytes],
    crl_ders: Sequence[bytes] | None,
    purpose: str | None,
    use_deltas: bool = False,
    extended_crl: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``chain`` is root first, then intermediates (not the leaf). ``use_deltas``: combine a
    full CRL with a delta CRL among ``crl_ders`` where RFC 5280 5.2.4 allows it; with
    ``-extended_crl`` too, as docs/relying-parties.md says (``extended_crl=False`` shows why:
    OpenSSL then takes the newer of the two, the delta, for the whole list)."""
    with tempfile.TemporaryDirectory(prefix="ossl-") as tmp:
        files = _Files(tmp)
        root = files.write(_pem(chain[0]))
        cmd = ["openssl", "verify", "-x509_strict", "-CAfile", root]
        if len(chain) > 1:
            cmd += ["-untrusted", files.write(b"".join(_pem(c) for c in chain[1:]))]
        if crl_ders:
            cmd += ["-crl_check"]
            cmd += ["-CRLfile", files.write(b"".join(_pem_crl(c) for c in crl_ders))]
        if use_deltas:
            cmd += ["-use_deltas"] + (["-extended_crl"] if extended_crl else [])
        if purpose:
            cmd += ["-purpose", purpose]
        cmd.append(files.write(_pem(leaf)))
        return _run(cmd)


def openssl_verify(
    leaf: bytes,
    chain: Sequence[bytes],
    crl_ders: Sequence[bytes] | None = None,
    purpose: str | None = None,
    use_deltas: bool = False,
) -> None:
    res = _openssl_verify_run(leaf, chain, crl_ders, purpose, use_deltas)
    assert res.returncode == 0 and ": OK" in res.stdout, (
        f"openssl verify failed:\n{res.stdout}{res.stderr}"
    )


def openssl_verify_revoked(
    leaf: bytes,
    chain: Sequence[bytes],
    crl_ders: Sequence[bytes],
    purpose: str | None = None,
    use_deltas: bool = False,
) -> None:
    res = _openssl_verify_run(leaf, chain, crl_ders, purpose, use_deltas)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "certificate revoked" in text, (
        f"openssl did not report revoked:\n{text}"
    )


def openssl_crl_verify(crl_der: bytes, issuer_der: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="ossl-") as tmp:
        files = _Files(tmp)
        res = _run(
            [
                "openssl", "crl", "-noout", "-inform", "DER",
                "-in", files.write(crl_der, ".crl"),
                "-CAfile", files.write(_pem(issuer_der)),
            ]
        )  # fmt: skip
    text = res.stdout + res.stderr
    assert res.returncode == 0 and "verify OK" in text, f"openssl crl failed:\n{text}"


def gnutls_verify(
    leaf: bytes, chain: Sequence[bytes], crl_ders: Sequence[bytes] | None = None
) -> str:
    """``certtool --verify`` of leaf + intermediates against the root, CRLs loaded.
    Returns "ok", "revoked", or the tool's output when it fails otherwise."""
    with tempfile.TemporaryDirectory(prefix="gnutls-") as tmp:
        files = _Files(tmp)
        cmd = ["certtool", "--verify", "--load-ca-certificate", files.write(_pem(chain[0]))]
        if crl_ders:
            cmd += ["--load-crl", files.write(b"".join(_pem_crl(c) for c in crl_ders))]
        bundle = _pem(leaf) + b"".join(_pem(c) for c in reversed(chain[1:]))
        cmd += ["--infile", files.write(bundle)]
        res = _run(cmd)
    text = res.stdout + res.stderr
    if "revoked" in text.lower() and res.returncode != 0:
        return "revoked"
    if res.returncode == 0 and "Chain verification output: Verified" in text:
        return "ok"
    return text
