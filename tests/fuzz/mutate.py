"""Shared pieces of the fuzz tests: their Hypothesis settings and a byte mutator over seeds."""

from __future__ import annotations

import os
from collections.abc import Sequence

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Deterministic in CI: derandomized, no example database, no per-example deadline (the tests
# that bound time measure it themselves, on the worst inputs, best of several runs). A longer,
# random campaign: FUZZ_EXAMPLES=20000 pytest tests/fuzz (new examples every run).
_CAMPAIGN = int(os.environ.get("FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    derandomize=not _CAMPAIGN,
    database=None,
    deadline=None,
    max_examples=_CAMPAIGN or 200,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

# Octets that move a DER parser between branches: short and long lengths, tags, sign bits.
INTERESTING = (0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x1F, 0x30, 0x7F, 0x80, 0x81, 0x82, 0x84, 0xA0)
_OPS = ("set", "flip", "insert", "delete", "duplicate", "truncate", "splice")


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes], max_steps: int = 4) -> bytes:
    """One of ``seeds`` after up to ``max_steps`` random edits (set or flip an octet, insert
    octets, delete or duplicate a range, truncate, splice in part of another seed)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, max_steps))):
        op = draw(st.sampled_from(_OPS))
        at = draw(st.integers(0, len(data)))
        if op == "set" and at < len(data):
            data[at] = draw(st.sampled_from(INTERESTING) | st.integers(0, 255))
        elif op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "duplicate":
            piece = data[at : at + draw(st.integers(1, 64))]
            data[at:at] = piece
        elif op == "truncate":
            del data[at:]
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, len(other)))
            data[at:at] = other[start : start + draw(st.integers(1, 64))]
    return bytes(data)


def any_bytes(max_size: int = 512) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=max_size)
