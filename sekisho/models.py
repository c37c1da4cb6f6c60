"""Imports every package's tables so ``Base.metadata`` is complete (migrations, tests)."""

from __future__ import annotations

import audit.models
import ca.models
import ocsp.models
from sekisho.db import Base

__all__ = ["Base", "audit", "ca", "ocsp"]
