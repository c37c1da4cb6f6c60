"""Errors mapped once: domain errors and HTTP errors become RFC 9457 problem documents.

Nothing reaches the client as a traceback; unexpected exceptions are logged with the request
ID and answered with a bare 500 problem. Problems are never stored by caches (``no-store``):
an error about one request must not be served for another.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import HTTPException

from sekisho.errors import SekishoError

log = logging.getLogger("sekisho.web")


def _problem_response(doc: dict[str, object], status: int) -> Response:
    response = jsonify({**doc, "request_id": g.get("request_id")})
    response.status_code = status
    response.mimetype = "application/problem+json"
    response.headers["Cache-Control"] = "no-store"
    return response


def problem(status: int, code: str, detail: str) -> Response:
    doc: dict[str, object] = {
        "type": f"urn:sekisho:error:{code}",
        "title": code.replace("-", " "),
        "status": status,
        "detail": detail,
    }
    return _problem_response(doc, status)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(SekishoError)
    def _domain(exc: SekishoError) -> Response:
        doc = exc.as_problem()
        if exc.http_status >= 500:
            doc = {k: doc[k] for k in ("type", "title", "status")}  # nothing else of the error
            log.warning(
                "request failed",
                extra={"code": exc.code, "detail": exc.message, "request_id": g.get("request_id")},
            )
            # The message is the operator's (in the log): a store's or a key file's path, a
            # driver's error. The client learns what kind of failure, and the request ID.
            doc["detail"] = (
                f"the service cannot answer now ({exc.code}); quote the request ID to the operator"
            )
        return _problem_response(doc, exc.http_status)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = (exc.name or "error").lower().replace(" ", "-")
        response = problem(status, code, exc.description or exc.name or "error")
        # Keep the headers the exception carries: Allow on 405 (RFC 9110 15.5.6),
        # Content-Range on 416, WWW-Authenticate on 401.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.error("unexpected error", exc_info=exc, extra={"request_id": g.get("request_id")})
        return problem(500, "internal", "internal error; quote the request ID to the operator")
