"""OCSP responder (RFC 6960 / RFC 5019 / RFC 9654). :mod:`ocsp.core` is the pure core."""
