"""Sekisho: a private PKI and certificate-lifecycle service with an mTLS access gateway."""

__version__ = "0.1.0"
