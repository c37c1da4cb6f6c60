"""The journal's Merkle tree (RFC 6962 §2.1, RFC 9162 §2.1) over its records in seq order.

Leaf ``i`` (0-based) is record ``i + 1``: ``leaf = SHA-256(0x00 || canonical(record))``, the
same canonical bytes the hash chain covers (``audit.chain``); an inner node is
``SHA-256(0x01 || left || right)``; the tree of n leaves splits at the largest power of two
below n (MTH). The empty tree's hash is SHA-256 of nothing.

A ``Frontier`` is the compact state of a tree of n leaves: the hashes of its perfect subtrees
along the right edge, one per set bit of n, largest first (at most log2(n) + 1). It gives the
root and takes more leaves, so a checkpoint extends the previous one's frontier with the
records after it instead of re-reading the journal.

Proofs: the audit path of a leaf (inclusion, RFC 9162 §2.1.3) and the consistency proof
between two sizes (§2.1.4). Generation takes ``node(start, end)``, the hash of leaves
``[start, end)``: any source that can give those (all the leaves, or a frontier plus the leaves
after it) can prove. Verification follows RFC 9162's algorithms step by step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

Node = Callable[[int, int], bytes]


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class Frontier:
    """The right-edge perfect subtrees of a tree of ``size`` leaves (largest first)."""

    __slots__ = ("hashes", "size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if size < 0 or len(hashes) != size.bit_count():
            raise ValueError(f"a frontier of {size} leaves has {size.bit_count()} hashes")
        if any(len(h) != HASH_SIZE for h in hashes):
            raise ValueError("a frontier hash is not 32 bytes")
        self.size = size
        self.hashes = list(hashes)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash: it merges with every subtree of its size on the right edge."""
        node, size = leaf, self.size
        while size & 1:
            node = node_hash(self.hashes.pop(), node)
            size >>= 1
        self.hashes.append(node)
        self.size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        """The tree hash (MTH) of the ``size`` leaves."""
        if not self.hashes:
            return EMPTY_ROOT
        root = self.hashes[-1]
        for subtree in reversed(self.hashes[:-1]):
            root = node_hash(subtree, root)
        return root

    def copy(self) -> Frontier:
        return Frontier(self.size, self.hashes)

    def to_bytes(self) -> bytes:
        return b"".join(self.hashes)

    @classmethod
    def from_bytes(cls, size: int, data: bytes) -> Frontier:
        """The frontier stored as ``to_bytes`` wrote it; ValueError when it cannot be one."""
        if len(data) != HASH_SIZE * size.bit_count():
            raise ValueError(f"a frontier of {size} leaves is {HASH_SIZE * size.bit_count()} bytes")
        return cls(size, [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)])

    def node(self, start: int, end: int) -> bytes:
        """The hash of leaves ``[start, end)`` where that range is a run of the right-edge
        subtrees ending at ``size`` (what a consistency proof asks of the older tree)."""
        offset = 0
        for i, subtree_hash in enumerate(self.hashes):
            if offset == start:
                if end != self.size:
                    # One subtree only: the run must end where that subtree ends.
                    width = 1 << (self.size - offset).bit_length() - 1
                    if offset + width != end:
                        break
                    return subtree_hash
                return Frontier._fold(self.hashes[i:])
            offset += 1 << (self.size - offset).bit_length() - 1
        raise ValueError(f"leaves [{start}, {end}) are not a right-edge subtree of {self.size}")

    @staticmethod
    def _fold(hashes: Sequence[bytes]) -> bytes:
        root = hashes[-1]
        for subtree in reversed(hashes[:-1]):
            root = node_hash(subtree, root)
        return root


def tree_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH of ``leaves`` (leaf hashes)."""
    frontier = Frontier()
    frontier.extend(leaves)
    return frontier.root()


def leaves_node(leaves: Sequence[bytes]) -> Node:
    """``node(start, end)`` over a list of leaf hashes."""

    def node(start: int, end: int) -> bytes:
        return tree_hash(leaves[start:end])

    return node


def extension_node(older: Frontier, leaves: Sequence[bytes]) -> Node:
    """``node(start, end)`` for a consistency proof from ``older.size`` to
    ``older.size + len(leaves)``: ranges at or before the older size come from its frontier,
    the others from the leaves after it (a proof never asks for a range across the two)."""
    m = older.size

    def node(start: int, end: int) -> bytes:
        if end <= m:
            return older.node(start, end)
        if start < m:
            raise ValueError(f"leaves [{start}, {end}) straddle the older tree's size {m}")
        return tree_hash(leaves[start - m : end - m])

    return node


# -- inclusion (RFC 6962 §2.1.1, RFC 9162 §2.1.3) --------------------------------------------
def inclusion_proof(index: int, size: int, node: Node) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of ``size`` leaves, leaf side first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size}")
    path: list[bytes] = []
    start, end = 0, size
    # Walk down from the root, collecting the sibling at each level; reversed at the end.
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            path.append(node(start + k, end))
            end = start + k
        else:
            path.append(node(start, start + k))
            start += k
    path.reverse()
    return path


def root_from_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes | None:
    """The root the audit path leads to (RFC 9162 §2.1.3.2), None when it cannot be a path of
    leaf ``index`` in a tree of ``size``."""
    if not 0 <= index < size or any(len(p) != HASH_SIZE for p in path):
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(
    index: int, size: int, leaf: bytes, path: Sequence[bytes], root: bytes
) -> bool:
    return root_from_inclusion(index, size, leaf, path) == root


# -- consistency (RFC 6962 §2.1.2, RFC 9162 §2.1.4) ------------------------------------------
def consistency_proof(m: int, n: int, node: Node) -> list[bytes]:
    """The proof that the tree of ``m`` leaves is a prefix of the tree of ``n`` (empty for
    m == 0 or m == n, where nothing needs proving)."""
    if not 0 <= m <= n:
        raise ValueError(f"no consistency proof from {m} to {n} leaves")
    if m in (0, n):
        return []
    proof: list[bytes] = []
    start, end, whole = 0, n, True  # SUBPROOF(m, D[start:end], whole), m relative to start
    while True:
        size, sub = end - start, m - start
        if sub == size:
            if not whole:
                proof.append(node(start, end))
            break
        k = _split(size)
        if sub <= k:
            proof.append(node(start + k, end))
            end = start + k
        else:
            proof.append(node(start, start + k))
            start += k
            whole = False
    proof.reverse()
    return proof


def verify_consistency(m: int, n: int, first: bytes, second: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: ``first`` (m leaves) and ``second`` (n leaves) are one tree."""
    if not 0 <= m <= n or any(len(c) != HASH_SIZE for c in proof):
        return False
    if m == n:
        return not proof and first == second
    if m == 0:
        return not proof and first == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if m & (m - 1) == 0:  # an exact power of two: the first root is a node of the second
        path.insert(0, first)
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first and sr == second and sn == 0


# -- proofs from one pass over the leaves ----------------------------------------------------
def asked_ranges(proof: Callable[[Node], object]) -> set[tuple[int, int]]:
    """The leaf ranges ``[start, end)`` whose hashes ``proof(node)`` asks for: a proof's shape
    depends on the tree sizes alone, so it is run once with a node that only takes note."""
    asked: set[tuple[int, int]] = set()

    def node(start: int, end: int) -> bytes:
        asked.add((start, end))
        return EMPTY_ROOT

    proof(node)
    return asked


def range_hashes(
    ranges: Iterable[tuple[int, int]], leaves: Iterable[bytes]
) -> tuple[int, dict[tuple[int, int], bytes]]:
    """The hash of each range ``[start, end)`` (start < end) of ``leaves``, read once in order
    from leaf 0, holding one frontier per range being read rather than the leaves (at most
    log2(n) + 1 hashes each). Returns how many leaves there were and the hashes of the ranges
    they cover; a range past them is left out."""
    pending = sorted(set(ranges), reverse=True)  # next to open last
    reading: list[tuple[int, tuple[int, int], Frontier]] = []
    hashes: dict[tuple[int, int], bytes] = {}
    count = 0
    for index, leaf in enumerate(leaves):
        while pending and pending[-1][0] == index:
            span = pending.pop()
            reading.append((span[1], span, Frontier()))
        if reading:
            still = []
            for end, span, frontier in reading:
                frontier.append(leaf)
                if index + 1 == end:
                    hashes[span] = frontier.root()
                else:
                    still.append((end, span, frontier))
            reading = still
        count = index + 1
    return count, hashes
