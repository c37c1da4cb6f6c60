"""OCSP over HTTP (RFC 6960 appendix A, RFC 5019 section 5) as a Flask blueprint.

* ``POST /ocsp`` with ``Content-Type: application/ocsp-request``; anything else is 415, a body
  over 64 KiB is 413 before it is read (Content-Length) or as soon as it is (chunked); bad
  framing is 400 and a body that does not arrive in time 408 (``web.body``).
* ``GET /ocsp/<base64>``: standard or URL-safe alphabet, percent-encoded or not, padding
  optional. Text that is not base64 is 400 with the malformedRequest OCSP response.
* Every answer is an ``application/ocsp-response`` (OCSP errors are OCSP responses, not
  problem documents); a crash is answered with internalError, never a 500. Successful GET
  answers carry ``Cache-Control: max-age`` (until nextUpdate, capped), ``ETag``,
  ``Last-Modified`` (thisUpdate) and ``Expires`` (nextUpdate); conditional GETs are answered
  as for CRLs (:mod:`web.conditional`: 304, or 412 as a problem document).
* Who signs is decided CA by CA, under the standalone server's rules
  (:class:`ocsp.store.Signers`): one CA whose responder key cannot be loaded keeps its last
  good responder while that one may sign, then gets ``tryLater`` for live answers (its stored
  answers are still served); the other CAs are answered as usual.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from ocsp import core
from sekisho.errors import SekishoError
from web import services_of
from web.body import read_body
from web.conditional import conditional_response, http_date
from web.errors import problem

log = logging.getLogger("sekisho.ocsp")

bp = Blueprint("ocsp", __name__)
MIME_REQUEST = "application/ocsp-request"
MIME_RESPONSE = "application/ocsp-response"
MAX_BODY = core.HTTP_MAX_BODY


def _ocsp(body: bytes, status: int = 200) -> Response:
    response = Response(body, status=status, mimetype=MIME_RESPONSE)
    return response


def _answer(der: bytes) -> bytes:
    services = services_of(current_app)
    try:
        return services.ocsp.answer(der, services.clock())
    except SekishoError as exc:  # the lint gate refused the answer (rule pkilint)
        log.error("ocsp answer not signed", extra={"code": exc.code, "detail": exc.message})
        return core.INTERNAL_ERROR
    except Exception as exc:  # an OCSP client gets an OCSP answer, never a 500
        log.error("ocsp answer crashed", exc_info=exc)
        return core.INTERNAL_ERROR


@bp.post("/ocsp")
@bp.post("/ocsp/")
def post() -> Response:
    if request.mimetype != MIME_REQUEST:
        return problem(415, "unsupported-media-type", f"send the request as {MIME_REQUEST}")
    try:
        body = read_body(MAX_BODY, services_of(current_app).settings.request_body_seconds)
    except RequestEntityTooLarge:
        return problem(413, "request-too-large", f"an OCSP request is at most {MAX_BODY} octets")
    response = _ocsp(_answer(body))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/ocsp/<path:encoded>")
def get(encoded: str) -> Response:
    der = core.decode_get_path(encoded)
    if der is None:
        response = _ocsp(core.MALFORMED_REQUEST, 400)
        response.headers["Cache-Control"] = "no-store"
        return response
    # Signed before the preconditions are evaluated, even for "If-None-Match: *": a 304 must
    # carry the ETag of the answer (the hash of its bytes), and only the answer tells whether
    # it is a cacheable success or a tryLater (docs/decisions.md, "An answer signed live").
    body = _answer(der)
    response = _ocsp(body)
    times = core.response_times(body)
    if times is None:
        response.headers["Cache-Control"] = "no-store"
        return response
    this_update, next_update = times
    now = services_of(current_app).clock()
    max_age = max(0, min(int((next_update - now).total_seconds()), core.CACHE_MAX_AGE))
    cache = {
        "Cache-Control": f"max-age={max_age}, public, no-transform, must-revalidate",
        "Expires": http_date(next_update),
    }
    etag = core.entity_tag(body)
    # Validated by the entity-tag only: a "good" answer and the "revoked" one that replaced
    # it may have the same thisUpdate second, and a cache revalidating with If-Modified-Since
    # alone was told 304 and kept "good" (as the standalone server, which never read it).
    return conditional_response(
        body, MIME_RESPONSE, etag, this_update, now, cache, modified_since=False
    )
