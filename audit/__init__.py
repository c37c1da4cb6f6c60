"""The audit journal: append-only, hash-chained, signed checkpoints, search, export, verify."""
