"""``sekisho ocsp export DIR``: the pre-signed responses laid out for a static server or CDN.

RFC 5019 5 / RFC 6960 A.1: a GET request is ``<responder URL>/<url-encoding of the base64 of
the DER OCSPRequest>``; clients use the standard alphabet (``+``, ``/``, ``=``) and percent-
encode it or not. For each stored, unexpired response this writes the bytes at the path
nginx sees once it has percent-decoded the URI:

* ``DIR/ocsp/<standard base64>``: a ``/`` in the base64 becomes a directory level, exactly
  as the decoded URI names it (``//`` is one level: nginx's ``merge_slashes`` and POSIX path
  resolution both collapse it). A name that cannot exist as a file (it ends in ``/``, or
  collides with another request's directory) is skipped and counted; that client falls back
  to the live responder (``try_files``, see docs/ocsp-nginx.md).
* ``DIR/ocsp/<URL-safe base64>`` (``-``, ``_``), hard-linked to the same bytes, when it
  differs: some clients send that alphabet.

The request is the one an RFC 5019 client builds: one SHA-1 CertID (hash parameters NULL, as
OpenSSL, Firefox and Go write it), no nonce, no extensions. Each file's mtime is the
response's thisUpdate, so nginx's ``Last-Modified`` is thisUpdate. The tree is written into
a staging directory and swapped in with renames, so a server never sees half an export.
``DIR/ocsp-manifest.json`` records when, how many and the earliest nextUpdate (re-export well
before it).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from ocsp import core
from ocsp.index import StoredLike, rfc5019_request
from sekisho.errors import ConfigError
from sekisho.files import replace_synced


@dataclasses.dataclass
class ExportResult:
    directory: Path
    written: int = 0
    expired: int = 0
    unknown_issuer: int = 0
    skipped_paths: int = 0
    earliest_next_update: dt.datetime | None = None

    def as_dict(self) -> dict[str, object]:
        doc = dataclasses.asdict(self)
        doc["directory"] = str(self.directory)
        if self.earliest_next_update is not None:
            doc["earliest_next_update"] = self.earliest_next_update.isoformat()
        return doc


def standard_path(request_der: bytes) -> str:
    return base64.b64encode(request_der).decode("ascii")


def urlsafe_path(request_der: bytes) -> str:
    return base64.urlsafe_b64encode(request_der).decode("ascii")


def _write(root: Path, relative: str, data: bytes, mtime: float) -> Path | None:
    if relative.endswith("/") or relative.startswith("/"):
        return None
    parts = [p for p in relative.split("/") if p]
    target = root.joinpath(*parts)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as fh:  # a collision is refused, never overwritten
            fh.write(data)
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        return None
    os.utime(target, (mtime, mtime))
    return target


def export_responses(
    issuers: Mapping[int, core.Issuer],
    responses: Iterable[StoredLike],
    directory: Path,
    now: dt.datetime,
) -> ExportResult:
    """Write ``DIR/ocsp/...`` for every unexpired response of a loaded issuer."""
    directory = Path(directory)
    staging = directory / f".ocsp-staging-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()  # (in a directory that exists but cannot be written: refused here)
    except OSError as exc:
        raise ConfigError(f"cannot create {directory}: {exc.strerror}") from None
    result = ExportResult(directory=directory)
    try:
        for stored in responses:
            issuer = issuers.get(stored.issuer_id)
            if issuer is None:
                result.unknown_issuer += 1
                continue
            next_update = stored.next_update
            if next_update.tzinfo is None:
                next_update = next_update.replace(tzinfo=dt.UTC)
            if next_update <= now:
                result.expired += 1
                continue
            this_update = stored.this_update
            if this_update.tzinfo is None:
                this_update = this_update.replace(tzinfo=dt.UTC)
            request = rfc5019_request(issuer, stored.serial)
            mtime = this_update.timestamp()
            first = _write(staging, standard_path(request), stored.der, mtime)
            safe = urlsafe_path(request)
            if safe != standard_path(request):
                target = staging / safe
                if first is not None and not target.exists():
                    os.link(first, target)
                elif _write(staging, safe, stored.der, mtime) is None and first is None:
                    result.skipped_paths += 1
                    continue
            elif first is None:
                result.skipped_paths += 1
                continue
            result.written += 1
            if result.earliest_next_update is None or next_update < result.earliest_next_update:
                result.earliest_next_update = next_update
        staging.chmod(0o755)
        live = directory / "ocsp"
        old = directory / f".ocsp-old-{os.getpid()}"
        if live.exists():
            live.rename(old)
        staging.rename(live)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest = {"generated_at": now.isoformat(), **result.as_dict()}
    # Renamed over the old one: never written through a link planted in its place (the
    # directory is often a web server's); readable by that server, as the responses are.
    replace_synced(
        directory / "ocsp-manifest.json", (json.dumps(manifest, indent=2) + "\n").encode(), 0o644
    )
    return result
