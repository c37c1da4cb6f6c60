"""Flask app factory and thin blueprints. Services are built once and injected."""

from __future__ import annotations

from flask import Flask, Response, abort, g, request

from sekisho.context import new_request_id
from sekisho.services import Services

# On every answer, the app's and the server's own error pages (``web.worker``) alike.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'",
}


def create_app(services: Services) -> Flask:
    # No static route: nothing is served from files.
    app = Flask(__name__, static_folder=None)
    # "/crl//admin.crl" is not found rather than redirected: werkzeug's redirect to the merged
    # path took its Location from the Host header and was cacheable (a poisoned cache sends
    # every client elsewhere). Trailing slashes stay strict ("/healthz/" is not found); a rule
    # ending in "/" would redirect to add one: tests/web check that no path of ours redirects.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = services.settings.max_request_bytes
    app.config["SEKISHO"] = services
    app.json.sort_keys = False  # type: ignore[attr-defined]

    from web.errors import register_error_handlers
    from web.ocsp import bp as ocsp_bp
    from web.pki import bp as pki_bp

    register_error_handlers(app)
    app.register_blueprint(pki_bp)
    app.register_blueprint(ocsp_bp)

    @app.before_request
    def _request_id() -> None:
        g.request_id = new_request_id()
        # werkzeug's routing drops leading slashes: "//crl/admin.crl" was served as
        # "/crl/admin.crl", another spelling of a URL written exactly into certificates.
        if request.environ.get("PATH_INFO", "").startswith("//"):
            abort(404)

    @app.after_request
    def _headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers["X-Request-Id"] = g.get("request_id", "")
        if request.is_secure:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response

    return app


def services_of(app: Flask) -> Services:
    services: Services = app.config["SEKISHO"]
    return services
