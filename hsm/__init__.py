"""Key backends. Every CA signature goes through ``KeyBackend.signing_key()``."""
