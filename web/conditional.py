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
(412) rather than pass, a garbled If-None-Match never yields a 304. The evaluation itself is
:func:`sekisho.httpfields.evaluate`, which ``ocsp serve`` runs too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from flask import Response, request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import PreconditionFailed

from sekisho.httpfields import evaluate

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

__all__ = ["NotModified", "conditional_response", "evaluate", "http_date"]


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
