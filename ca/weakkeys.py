"""Debian weak keys (CVE-2008-0166): RSA moduli looked up in Debian's openssl-blacklist lists.

From September 2006 to May 2008 Debian's OpenSSL seeded its generator with little more than
the process ID, so each key size had a few hundred thousand possible keys (every PID, for
a few architectures and states of ``~/.rnd``: 294,912 per size). CA/Browser Forum BR 6.1.1.3
requires these keys to be refused. Debian and Ubuntu published them as the
``openssl-blacklist`` packages: one file per size, each line the last 20 hex digits (80 bits)
of the SHA-1 of ``openssl rsa -noout -modulus`` output (``Modulus=<HEX>\\n``).

Those packages are GPL-3 data and are not shipped with Sekisho: ``sekisho key
install-weak-lists`` reads them (from a directory, or downloaded from the Ubuntu archive,
checked against the SHA-256 pinned below) and installs one sorted table of 10-byte records per
size under ``<sys.prefix>/share/sekisho/weak-keys`` (``SEKISHO_WEAK_KEY_LISTS`` names another
directory). ``make run`` and ``make test`` install them.

The lists cover RSA-2048 and RSA-4096, the sizes Sekisho accepts that Debian's tools
generated. A 2048- or 4096-bit key is refused, not issued, when its list is not installed or
does not match its pinned digest: an unchecked key is not taken for a good one (rule
``weak-key-list``). docs/decisions.md has the rest (RSA-3072).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import io
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sekisho.errors import InputError, OutputError, PolicyViolation, SekishoError
from sekisho.files import FileRefused, read_regular, replace_synced

RECORD = 10  # bytes kept of each SHA-1: the lists' 80 bits
ENV_DIR = "SEKISHO_WEAK_KEY_LISTS"
ARCHIVES = (
    "https://archive.ubuntu.com/ubuntu/pool/universe/o/openssl-blacklist/",
    # Where Ubuntu moves a release's pool once it leaves archive.ubuntu.com.
    "https://old-releases.ubuntu.com/ubuntu/pool/universe/o/openssl-blacklist/",
)
MAX_PACKAGE = 16 * 1024 * 1024
MAX_MEMBER = 8 * 1024 * 1024  # a list is 6.2 MB
DOWNLOAD_SECONDS = 120


class FetchError(SekishoError):
    """A package could not be downloaded (EX_UNAVAILABLE)."""

    code = "unavailable"
    http_status = 503
    exit_code = 69


@dataclasses.dataclass(frozen=True)
class Package:
    filename: str
    sha256: str  # of the .deb
    lists: dict[int, str]  # RSA size -> member path in the package's data archive


@dataclasses.dataclass(frozen=True)
class Table:
    bits: int
    sha256: str  # of the installed table: sorted, unique 10-byte records
    count: int

    @property
    def filename(self) -> str:
        return f"debian-rsa-{self.bits}.bin"


PACKAGES = (
    Package(
        "openssl-blacklist_0.5-3_all.deb",
        "bad2a36f3510d42f65a8adfd1bf8d3654b95913e72153e12fcacc39a7547c0c2",
        {2048: "./usr/share/openssl-blacklist/blacklist.RSA-2048"},
    ),
    Package(
        "openssl-blacklist-extra_0.5-3_all.deb",
        "d67924fd9e342ab7a35af432d93b1253c986bec6f00b7a7d26dc3fad615cd2ba",
        {4096: "./usr/share/openssl-blacklist/blacklist.RSA-4096"},
    ),
)
TABLES = {
    2048: Table(2048, "20d7a0c52827cc08ed881ecd7988dba162714f8e492feacb2fb950fc0a3d02ec", 294_912),
    4096: Table(4096, "e2b7ce5f6deb19671049a9af89499b09d53dab6e02be73a1cb3bb542e44cef90", 294_912),
}


def lists_dir() -> Path:
    named = os.environ.get(ENV_DIR)
    return Path(named) if named else Path(sys.prefix) / "share" / "sekisho" / "weak-keys"


def fingerprint(n: int) -> bytes:
    """The 80 bits the lists hold for modulus ``n``: the last 10 bytes of the SHA-1 of
    ``Modulus=<upper-case hex>\\n``, as ``openssl rsa -noout -modulus | sha1sum`` computes."""
    return hashlib.sha1(b"Modulus=%X\n" % n, usedforsecurity=False).digest()[-RECORD:]


def _contains(table: bytes, record: bytes) -> bool:
    """Binary search of ``record`` in ``table``, sorted records of RECORD bytes."""
    at = bisect.bisect_left(
        range(len(table) // RECORD), record, key=lambda i: table[i * RECORD : (i + 1) * RECORD]
    )
    return table[at * RECORD : (at + 1) * RECORD] == record


class _Loaded:
    """Tables read once per process and directory, checked against their pinned digests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[tuple[Path, int], bytes] = {}

    def table(self, bits: int) -> bytes:
        directory = lists_dir()
        key = (directory, bits)
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                table = _read_table(directory, TABLES[bits])
                self._tables[key] = table
            return table

    def forget(self) -> None:
        with self._lock:
            self._tables.clear()


_LOADED = _Loaded()


def _read_table(directory: Path, spec: Table) -> bytes:
    path = directory / spec.filename
    missing = (
        f"RSA-{spec.bits} keys cannot be checked against the Debian weak-key list"
        " (CVE-2008-0166) on this server, so none is accepted: use an EC key, or ask the"
        " operator to run `sekisho key install-weak-lists`"
    )
    try:
        table = read_regular(path, spec.count * RECORD)
    except FileNotFoundError:
        raise PolicyViolation("weak-key-list", missing) from None
    except (OSError, FileRefused):  # unreadable, a FIFO, a device, a directory, too large
        table = b""  # damaged: fails the digest below
    if hashlib.sha256(table).hexdigest() != spec.sha256:
        raise PolicyViolation("weak-key-list", f"{missing} (the installed list is damaged)")
    return table


def is_debian_weak(n: int) -> bool:
    """True if modulus ``n`` is on its size's list. PolicyViolation(``weak-key-list``) when
    that list is not installed or damaged; False for a size no list covers."""
    bits = n.bit_length()
    if bits not in TABLES:
        return False
    return _contains(_LOADED.table(bits), fingerprint(n))


# -- installation ------------------------------------------------------------------------------
def deb_member(deb: bytes, member: str) -> bytes:
    """One file of a Debian package: the ``ar`` archive's ``data.tar.*``, then the member.
    InputError when the package is not what it claims."""
    import tarfile  # here: the issuance path imports this module, and needs neither

    if not deb.startswith(b"!<arch>\n"):
        raise InputError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(deb):  # each turn moves on by at least 60 bytes
        header = deb[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        field = header[48:58].strip()
        if not field.isdigit() or pos + 60 + int(field) > len(deb):
            raise InputError("damaged Debian package (bad member size)")
        size = int(field)
        body = deb[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            try:
                with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                    found = tar.extractfile(member)
                    if found is None:
                        raise KeyError(member)
                    content: bytes = found.read(MAX_MEMBER + 1)
            except (tarfile.TarError, KeyError, EOFError, OSError) as exc:
                raise InputError(f"Debian package has no readable {member} ({exc})") from None
            if len(content) > MAX_MEMBER:
                raise InputError(f"{member} in the Debian package is over {MAX_MEMBER} bytes")
            return content
        pos += 60 + size + (size & 1)
    raise InputError("Debian package has no data archive")


def build_table(listing: bytes) -> bytes:
    """The installed form of one openssl-blacklist file: its 20-hex-digit lines (comments
    and blank lines skipped) as sorted, unique 10-byte records."""
    records = set()
    for number, raw in enumerate(listing.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            record = bytes.fromhex(line.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            record = b""
        if len(record) != RECORD:
            raise InputError(f"list line {number} is not {RECORD * 2} hex digits")
        records.add(record)
    return b"".join(sorted(records))


@dataclasses.dataclass(frozen=True)
class Installed:
    directory: Path
    tables: dict[int, int]  # size -> records
    downloaded: tuple[str, ...]
    already: bool


def installed_ok(directory: Path) -> bool:
    for spec in TABLES.values():
        try:
            _read_table(directory, spec)
        except PolicyViolation:
            return False
    return True


def _fetch(filename: str, progress: Callable[[str], None]) -> bytes:
    import urllib.error
    import urllib.request

    errors = []
    for base in ARCHIVES:
        url = base + filename
        progress(f"downloading {url}")
        deadline = time.monotonic() + DOWNLOAD_SECONDS
        chunks: list[bytes] = []
        size = 0
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_SECONDS) as answer:  # noqa: S310
                while size <= MAX_PACKAGE and time.monotonic() < deadline:
                    chunk = answer.read(1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                else:
                    what = "too large" if size > MAX_PACKAGE else "too slow"
                    errors.append(
                        f"{url}: {what} (at most {MAX_PACKAGE} bytes in {DOWNLOAD_SECONDS} s)"
                    )
                    continue
        except (urllib.error.URLError, OSError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
            continue
        return b"".join(chunks)
    raise FetchError(f"could not download {filename}: " + "; ".join(errors))


def _package(
    spec: Package, debs: Path | None, download: bool, progress: Callable[[str], None]
) -> tuple[bytes, bool]:
    """The package's bytes, from ``debs`` when there with the pinned digest, else downloaded
    (and kept in ``debs``). InputError for a file of the name with another digest."""
    local = debs / spec.filename if debs is not None else None
    if local is not None and os.path.lexists(local):
        try:
            data = read_regular(local, MAX_PACKAGE)
        except (OSError, FileRefused) as exc:
            raise InputError(
                f"cannot read {local}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        if hashlib.sha256(data).hexdigest() == spec.sha256:
            return data, False
        if not download:
            raise InputError(f"{local} is not {spec.filename} as published (SHA-256 differs)")
        progress(f"{local} differs from the published package; downloading it again")
    if not download:
        raise InputError(f"{spec.filename} is not in {debs}, and downloading is off")
    data = _fetch(spec.filename, progress)
    if hashlib.sha256(data).hexdigest() != spec.sha256:
        raise FetchError(f"downloaded {spec.filename} does not have the pinned SHA-256")
    if local is not None:
        _write(local, data, 0o644)
    return data, True


def _write(path: Path, data: bytes, mode: int) -> None:
    try:
        replace_synced(path, data, mode)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def install(
    directory: Path | None = None,
    debs: Path | None = None,
    download: bool = True,
    progress: Callable[[str], None] = lambda _line: None,
) -> Installed:
    """Install the tables into ``directory`` (default ``lists_dir()``) from the packages in
    ``debs`` or downloaded (into ``debs`` when given, also when the tables are installed
    already). Nothing is replaced unless every table came out with its pinned digest; an
    installation that already verifies is left as it is."""
    target = directory or lists_dir()
    fetched = []
    if installed_ok(target):
        if debs is not None and download:  # ``debs`` keeps the packages: fill it in
            for spec in PACKAGES:
                try:
                    if _package(spec, debs, download, progress)[1]:
                        fetched.append(spec.filename)
                except (FetchError, InputError, OutputError) as exc:  # lists there: not an error
                    progress(f"warning: {spec.filename} not kept in {debs}: {exc.message}")
        return Installed(target, {b: t.count for b, t in TABLES.items()}, tuple(fetched), True)
    built: dict[int, bytes] = {}
    for spec in PACKAGES:
        deb, was_fetched = _package(spec, debs, download, progress)
        if was_fetched:
            fetched.append(spec.filename)
        for bits, member in spec.lists.items():
            progress(f"building the RSA-{bits} table from {spec.filename}")
            table = build_table(deb_member(deb, member))
            if hashlib.sha256(table).hexdigest() != TABLES[bits].sha256:
                raise InputError(f"the RSA-{bits} list in {spec.filename} is not the one published")
            built[bits] = table
    for bits, table in built.items():
        _write(target / TABLES[bits].filename, table, 0o644)
    _LOADED.forget()
    return Installed(target, {b: len(t) // RECORD for b, t in built.items()}, tuple(fetched), False)
