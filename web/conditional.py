"""Conditional GETs of the cacheable endpoints (CRLs, CA certificates, OCSP GET), as RFC 9110
section 13 says, in place of werkzeug's ``make_conditional``.

werkzeug ignored If-Unmodified-Since, let a matching If-Match override a matching
If-None-Match (200 where 304 is due), answered 412 with the whole representation and its
public caching headers (a shared cache could store the 412 for everyone), dropped
Last-Modified from 304s and added a Date header gunicorn sends again.

Order (RFC 9110 13.2.2): If-Match (strong comparison), else If-Unmodified-Since; then
If-None-Match (weak comparison), else If-Modified-Since (GET and HEAD only). A date that is not
exactly one HTTP-date (5.6.7: IMF-fixdate, rfc850 or asctime) is ignored (13.1.3, 13.1.4). A
list that is not ``*`` or a list of entity-tags matches nothing: a garbled If-Match fails
(412) rather than pass, a garbled If-None-Match never yields a 304.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from flask import Response, request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import PreconditionFailed

from sekisho.httpfields import etag_matches, parse_http_date

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment


class Fields(Protocol):
    """Request header fields by name (werkzeug's Headers, or a dict in tests)."""

    def get(self, key: str) -> str | None: ...


def evaluate(
    method: str,
    headers: Fields,
    etag: str,
    last_modified: dt.datetime,
    now: dt.datetime,
    second_is_own: Callable[[], bool] | None = None,
    *,
    modified_since: bool = True,
) -> int:
    """200 (answer as usual), 304 or 412 for a request to a representation with the strong
    entity-tag ``etag`` (unquoted) and ``last_modified``, by RFC 9110 13.2.2.

    ``second_is_own``, when given, says whether no earlier representation has the same
    Last-Modified (an HTTP-date names a second: two CRLs may share one). When it says no, an
    If-Modified-Since of that second proves nothing and is not answered 304.
    ``modified_since`` false: If-Modified-Since is not evaluated at all (a 200 is always a
    right answer to it), for representations that change within a second of each other
    with no order a date can tell, as OCSP answers do (signed "good", then "revoked")."""
    modified = last_modified.astimezone(dt.UTC).replace(microsecond=0)  # as Last-Modified says
    safe = method in ("GET", "HEAD")
    if_match = headers.get("If-Match")
    if if_match is not None:
        if not etag_matches(if_match, etag, weak=False):
            return 412
    else:
        unmodified_since = parse_http_date(headers.get("If-Unmodified-Since"), now)
        if unmodified_since is not None and modified > unmodified_since:
            return 412
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        if etag_matches(if_none_match, etag, weak=True):
            return 304 if safe else 412
    elif safe and modified_since:
        since = parse_http_date(headers.get("If-Modified-Since"), now)
        if since is not None and modified <= since:
            if modified < since or second_is_own is None or second_is_own():
                return 304
    return 200


class NotModified(Response):
    """A 304 that keeps Last-Modified. werkzeug drops it (an "entity header" in RFC 2616);
    RFC 9110 15.4.5 allows it to guide caches updating what they hold, and a client that
    validates with If-Modified-Since alone reads it."""

    def get_wsgi_headers(self, environ: WSGIEnvironment) -> Headers:
        headers = super().get_wsgi_headers(environ)
        last_modified = self.headers.get("Last-Modified")
        if last_modified is not None and "Last-Modified" not in headers:
            headers["Last-Modified"] = last_modified
        return headers


def http_date(value: dt.datetime) -> str:
    """IMF-fixdate (RFC 9110 5.6.7)."""
    return value.astimezone(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def conditional_response(
    body: bytes | Callable[[], bytes],
    mimetype: str,
    etag: str,
    last_modified: dt.datetime,
    now: dt.datetime,
    cache_headers: Mapping[str, str],
    second_is_own: Callable[[], bool] | None = None,
    *,
    modified_since: bool = True,
) -> Response:
    """``body`` with its validators (strong ``etag``, ``last_modified``) and ``cache_headers``
    (Cache-Control, Expires), or a 304 with the same headers and no body; a failed If-Match or
    If-Unmodified-Since raises 412 (a problem document, not stored by caches). A callable
    ``body`` is called only when the body is sent (not for a 304 or a 412)."""
    headers = {"ETag": f'"{etag}"', "Last-Modified": http_date(last_modified), **cache_headers}
    status = evaluate(
        request.method,
        request.headers,
        etag,
        last_modified,
        now,
        second_is_own,
        modified_since=modified_since,
    )
    if status == 412:
        raise PreconditionFailed("the representation does not meet the request's preconditions")
    if status == 304:
        return NotModified(status=304, headers=headers)
    return Response(body() if callable(body) else body, mimetype=mimetype, headers=headers)
