"""Enrollment: invitations, CSR intake, server-side key generation + PKCS#12, EST (later)."""
