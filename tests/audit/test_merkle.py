"""The Merkle tree of ``audit.merkle`` against RFC 6962's recursive definitions, built naively
for every size 1..64 and every pair m <= n, and against the Certificate Transparency
reference vectors; tampered proofs fail."""

from __future__ import annotations

import hashlib

import pytest

from audit.merkle import (
    EMPTY_ROOT,
    Frontier,
    asked_ranges,
    consistency_proof,
    extension_node,
    inclusion_proof,
    leaf_hash,
    leaves_node,
    node_hash,
    range_hashes,
    tree_hash,
    verify_consistency,
    verify_inclusion,
)

# RFC 6962 reference inputs (certificate-transparency / trillian test data), used as data.
CT_INPUTS = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
CT_CONSISTENCY = {
    (2, 8): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}
N = 64


# -- RFC 6962 §2.1, written as the RFC defines it ---------------------------------------------
def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def naive_mth(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = _k(len(leaves))
    return node_hash(naive_mth(leaves[:k]), naive_mth(leaves[k:]))


def naive_path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*naive_path(m, leaves[:k]), naive_mth(leaves[k:])]
    return [*naive_path(m - k, leaves[k:]), naive_mth(leaves[:k])]


def naive_subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [naive_mth(leaves)]
    k = _k(n)
    if m <= k:
        return [*naive_subproof(m, leaves[:k], whole), naive_mth(leaves[k:])]
    return [*naive_subproof(m - k, leaves[k:], False), naive_mth(leaves[:k])]


LEAVES = [leaf_hash(hashlib.sha256(f"record {i}".encode()).digest()) for i in range(N)]
ROOTS = [naive_mth(LEAVES[:n]) for n in range(N + 1)]


def test_reference_vectors() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert tree_hash([]) == EMPTY_ROOT
    leaves = [leaf_hash(data) for data in CT_INPUTS]
    assert leaves[0].hex() == CT_ROOTS[0]  # the leaf of the empty input is the size-1 root
    for n in range(1, 9):
        assert tree_hash(leaves[:n]).hex() == CT_ROOTS[n - 1]
    node = leaves_node(leaves)
    for (index, size), want in CT_INCLUSION.items():
        proof = inclusion_proof(index, size, node)
        assert [p.hex() for p in proof] == want
        root = bytes.fromhex(CT_ROOTS[size - 1])
        assert verify_inclusion(index, size, leaves[index], proof, root)
    for (m, n), want in CT_CONSISTENCY.items():
        proof = consistency_proof(m, n, node)
        assert [p.hex() for p in proof] == want
        first, second = bytes.fromhex(CT_ROOTS[m - 1]), bytes.fromhex(CT_ROOTS[n - 1])
        assert verify_consistency(m, n, first, second, proof)


def test_frontier_roots_match_the_naive_tree_for_every_size() -> None:
    frontier = Frontier()
    assert frontier.root() == ROOTS[0]
    for n in range(1, N + 1):
        frontier.append(LEAVES[n - 1])
        assert frontier.size == n
        assert len(frontier.hashes) == n.bit_count() <= n.bit_length()
        assert frontier.root() == ROOTS[n], n
        again = Frontier.from_bytes(n, frontier.to_bytes())
        assert again.root() == ROOTS[n] and again.hashes == frontier.hashes


def test_a_frontier_extended_later_gives_the_same_root() -> None:
    for m in range(N + 1):
        frontier = Frontier()
        frontier.extend(LEAVES[:m])
        resumed = Frontier.from_bytes(m, frontier.to_bytes())
        resumed.extend(LEAVES[m:])
        assert resumed.root() == ROOTS[N]


def test_frontier_rejects_what_cannot_be_one() -> None:
    with pytest.raises(ValueError):
        Frontier.from_bytes(3, b"\x00" * 32)  # 3 leaves: two subtrees
    with pytest.raises(ValueError):
        Frontier.from_bytes(4, b"\x00" * 33)
    with pytest.raises(ValueError):
        Frontier(2, [b"\x00" * 31])


def test_every_inclusion_proof_matches_the_rfc_and_verifies() -> None:
    node = leaves_node(LEAVES)
    for n in range(1, N + 1):
        for i in range(n):
            proof = inclusion_proof(i, n, node)
            assert proof == naive_path(i, LEAVES[:n]), (i, n)
            assert verify_inclusion(i, n, LEAVES[i], proof, ROOTS[n])


def test_tampered_inclusion_proofs_fail() -> None:
    node = leaves_node(LEAVES)
    checked = wrong_sizes = 0
    for n in range(1, N + 1):
        for i in range(n):
            proof = inclusion_proof(i, n, node)
            root = ROOTS[n]
            other = LEAVES[(i + 1) % N]
            assert not verify_inclusion(i, n, other, proof, root)  # wrong leaf
            assert not verify_inclusion(i, n, LEAVES[i], proof, ROOTS[n - 1])  # wrong root
            assert not verify_inclusion(n, n, LEAVES[i], proof, root)  # index out of range
            assert not verify_inclusion(-1, n, LEAVES[i], proof, root)
            assert not verify_inclusion(i, n, LEAVES[i], [*proof, b"\x00" * 32], root)  # extra
            assert not verify_inclusion(i, n, LEAVES[i], [b"\x00" * 32, *proof], root)
            if i + 1 < n and LEAVES[i + 1] != LEAVES[i]:
                assert not verify_inclusion(i + 1, n, LEAVES[i], proof, root)  # wrong index
            for size in (n - 1, n + 1):
                # A wrong size fails when it gives the leaf another path length (a size with
                # the same path shape computes the same root: the signed root binds the size).
                if size > i and len(naive_path(i, LEAVES[:size])) != len(proof):
                    assert not verify_inclusion(i, size, LEAVES[i], proof, root)  # wrong size
                    wrong_sizes += 1
            if proof:
                assert not verify_inclusion(i, n, LEAVES[i], proof[:-1], root)  # missing node
                flipped = [*proof[:-1], bytes([proof[-1][0] ^ 1]) + proof[-1][1:]]
                assert not verify_inclusion(i, n, LEAVES[i], flipped, root)
                assert not verify_inclusion(i, n, LEAVES[i], [*proof[:-1], b"\x00" * 31], root)
                checked += 1
    assert checked == N * (N + 1) // 2 - 1 and wrong_sizes > 200


def test_every_consistency_proof_matches_the_rfc_and_verifies() -> None:
    node = leaves_node(LEAVES)
    for n in range(1, N + 1):
        for m in range(n + 1):
            proof = consistency_proof(m, n, node)
            want = [] if m == 0 else naive_subproof(m, LEAVES[:n], True)
            assert proof == want, (m, n)
            assert verify_consistency(m, n, ROOTS[m], ROOTS[n], proof), (m, n)


def test_consistency_proofs_from_a_frontier_and_the_leaves_after_it() -> None:
    """What ``audit verify`` does: the older tree's frontier and the leaves after it give the
    same proof as the whole tree."""
    whole = leaves_node(LEAVES)
    for n in range(1, N + 1):
        for m in range(n + 1):
            older = Frontier()
            older.extend(LEAVES[:m])
            node = extension_node(older, LEAVES[m:n])
            assert consistency_proof(m, n, node) == consistency_proof(m, n, whole), (m, n)


def test_proofs_from_one_pass_over_the_leaves_are_the_same_proofs() -> None:
    """``audit prove`` reads the leaves once and keeps a frontier per range a proof asks for:
    for every size and leaf (and every pair of sizes), the ranges it notes give the proof the
    whole list of leaves gives, and each range's hash is the tree hash of its slice."""

    def one_pass(n: int, proof):  # type: ignore[no-untyped-def]
        ranges = asked_ranges(proof)
        count, hashes = range_hashes(ranges | {(0, n)}, iter(LEAVES[:n]))
        assert count == n and hashes[(0, n)] == ROOTS[n]
        for start, end in ranges:
            assert hashes[(start, end)] == naive_mth(LEAVES[start:end]), (n, start, end)
        return proof(lambda start, end: hashes[(start, end)])

    whole = leaves_node(LEAVES)
    for n in range(1, N + 1):
        for i in range(n):
            path = one_pass(n, lambda node, i=i, n=n: inclusion_proof(i, n, node))
            assert path == inclusion_proof(i, n, whole), (i, n)
        for m in range(1, n + 1):
            proof = one_pass(n, lambda node, m=m, n=n: consistency_proof(m, n, node))
            assert proof == consistency_proof(m, n, whole), (m, n)
    # A range past the leaves read is left out; the count says how many there were.
    count, hashes = range_hashes({(0, 8), (8, 16), (2, 3)}, iter(LEAVES[:10]))
    assert count == 10 and set(hashes) == {(0, 8), (2, 3)} and hashes[(2, 3)] == LEAVES[2]


def test_tampered_consistency_proofs_fail() -> None:
    node = leaves_node(LEAVES)
    forked = [*LEAVES[:N]]
    forked[N // 3] = leaf_hash(b"rewritten")
    for n in range(2, N + 1):
        for m in range(1, n):
            proof = consistency_proof(m, n, node)
            assert proof
            first, second = ROOTS[m], ROOTS[n]
            assert not verify_consistency(m, n, first, ROOTS[n - 1], proof)  # wrong second root
            assert not verify_consistency(m, n, ROOTS[m - 1], second, proof)  # wrong first root
            assert not verify_consistency(n, m, second, first, proof)  # swapped sizes
            assert not verify_consistency(m, n, first, second, proof[:-1])  # missing node
            assert not verify_consistency(m, n, first, second, [*proof, b"\x01" * 32])  # extra
            assert not verify_consistency(m, n, first, second, [])
            flipped = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
            assert not verify_consistency(m, n, first, second, flipped)
            for size in (m - 1, m + 1):
                if 0 < size < n and ROOTS[size] != first:
                    assert not verify_consistency(size, n, first, second, proof)  # wrong size
            # A fork: the second tree rewrote a leaf the first one holds.
            if m > N // 3:
                fork = naive_mth(forked[:n])
                assert not verify_consistency(m, n, first, fork, proof)
                fork_proof = consistency_proof(m, n, leaves_node(forked))
                assert not verify_consistency(m, n, first, fork, fork_proof)


def test_degenerate_consistency() -> None:
    assert verify_consistency(4, 4, ROOTS[4], ROOTS[4], [])
    assert not verify_consistency(4, 4, ROOTS[4], ROOTS[5], [])
    assert not verify_consistency(4, 4, ROOTS[4], ROOTS[4], [ROOTS[4]])
    assert verify_consistency(0, 8, EMPTY_ROOT, ROOTS[8], [])
    assert not verify_consistency(0, 8, ROOTS[1], ROOTS[8], [])


def test_proof_generation_refuses_impossible_requests() -> None:
    node = leaves_node(LEAVES)
    for index, size in ((8, 8), (-1, 8), (0, 0)):
        with pytest.raises(ValueError):
            inclusion_proof(index, size, node)
    with pytest.raises(ValueError):
        consistency_proof(5, 3, node)
