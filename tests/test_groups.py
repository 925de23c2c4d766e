"""Complete-linkage grouping and the pair searches it is fed by: groups never chain, each item is in one
group at most, no group of one, the same input gives the same groups, and the searches find every pair
that meets the threshold (checked against comparing every pair)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from image_search import phash
from image_search import groups as groups_module
from image_search.groups import CHECK_EVERY, complete_linkage, near_copy_pairs, similar_pairs


def test_a_chain_is_not_a_group():
    """A~B and B~C but not A~C: B joins the closer of the two, the third stays out."""
    assert complete_linkage(np.array([[0, 1], [1, 2]]), np.array([0.9, 0.95])) == [(1, 2)]
    assert complete_linkage(np.array([[0, 1], [1, 2]]), np.array([0.97, 0.95])) == [(0, 1)]


def test_a_clique_is_one_group_and_loners_are_in_none():
    pairs = np.array([[0, 1], [0, 2], [1, 2], [5, 6]])
    assert complete_linkage(pairs, np.array([0.9, 0.91, 0.92, 0.99])) == [(0, 1, 2), (5, 6)]
    assert complete_linkage(np.zeros((0, 2)), np.zeros(0)) == []


def test_two_cliques_bridged_by_one_pair_stay_two_groups():
    clique_a, clique_b = [0, 1, 2], [3, 4, 5]
    pairs = [*itertools.combinations(clique_a, 2), *itertools.combinations(clique_b, 2), (2, 3)]
    groups = complete_linkage(np.array(pairs), np.array([0.9] * 6 + [0.99]))
    members = [item for group in groups for item in group]
    assert len(members) == len(set(members))  # one group at most per item
    assert all(len(group) >= 2 for group in groups)
    for group in groups:  # every pair of a group is a pair given
        assert all(tuple(sorted(p)) in set(pairs) for p in itertools.combinations(group, 2))


def test_the_same_pairs_in_any_order_give_the_same_groups():
    rng = np.random.default_rng(3)
    pairs = rng.integers(0, 60, (400, 2))
    strength = rng.choice([0.91, 0.93, 0.95], size=400)  # ties on purpose
    expected = complete_linkage(pairs, strength)
    for seed in range(4):
        order = np.random.default_rng(seed).permutation(400)
        swapped = pairs[order][:, ::-1] if seed % 2 else pairs[order]
        assert complete_linkage(swapped, strength[order]) == expected
    assert expected and all(len(g) >= 2 for g in expected)


def _random_hashes(count: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int.from_bytes(rng.bytes(32), "big") >> 1 for _ in range(count)]


def test_near_copy_pairs_are_every_pair_within_the_distance():
    base = _random_hashes(40, 1)
    rng = np.random.default_rng(2)
    hashes = list(base)
    for value in base[:20]:  # a near twin of each of the first 20, 0 to 14 bits off
        for bit in rng.choice(phash.HASH_BITS, size=int(rng.integers(0, 15)), replace=False).tolist():
            value ^= 1 << bit
        hashes.append(value)
    for limit in (0, 6, 10, 16):
        pairs, dist = near_copy_pairs(phash.as_words(hashes), limit)
        expected = {(a, b) for a, b in itertools.combinations(range(len(hashes)), 2)
                    if phash.distance(hashes[a], hashes[b]) <= limit}
        assert {tuple(p) for p in pairs.tolist()} == expected
        assert all(d == phash.distance(hashes[a], hashes[b]) for (a, b), d in zip(pairs.tolist(), dist.tolist()))
    with pytest.raises(ValueError):
        near_copy_pairs(phash.as_words(hashes), 40)


@pytest.mark.parametrize("blocks", ["as shipped", "small"])
def test_similar_pairs_are_every_pair_above_the_similarity_within_the_time_window(monkeypatch, blocks):
    """``small``: blocks of 4 rows, 8 similarities at once, so that each time window's columns, and the undated
    items' rows, are taken a block at a time (with a burst-seconds of a year, one window held 1.2 GB)."""
    if blocks == "small":
        monkeypatch.setattr(groups_module, "BLOCK", 4)
        monkeypatch.setattr(groups_module, "BLOCK_FLOATS", 8)
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((30, 64))
    vectors = np.concatenate([centres, centres + rng.standard_normal((30, 64)) * 0.2,
                              centres[:10] + rng.standard_normal((10, 64)) * 0.2])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    taken = rng.uniform(0, 100, len(vectors))
    taken[rng.choice(len(vectors), 15, replace=False)] = np.nan
    pairs, sims = similar_pairs(vectors, taken, 0.9, 30.0)
    expected = set()
    for a, b in itertools.combinations(range(len(vectors)), 2):
        close_in_time = np.isnan(taken[a]) or np.isnan(taken[b]) or abs(taken[a] - taken[b]) <= 30.0
        if vectors[a] @ vectors[b] >= 0.9 and close_in_time:
            expected.add((a, b))
    assert len(expected) > 10
    assert {tuple(p) for p in pairs.tolist()} == expected
    assert np.allclose(sims, [vectors[a] @ vectors[b] for a, b in pairs.tolist()], atol=1e-5)


def test_many_equal_hashes_in_several_buckets_are_every_pair():
    """Buckets of one size several times over (eight copies of each of two hashes, three of a third)."""
    a, b, c = _random_hashes(3, 9)
    hashes = [a] * 8 + [b] * 8 + [c] * 3 + _random_hashes(5, 10)
    pairs, dist = near_copy_pairs(phash.as_words(hashes), 4)
    expected = {(i, j) for i, j in itertools.combinations(range(len(hashes)), 2) if hashes[i] == hashes[j]}
    assert {tuple(p) for p in pairs.tolist()} == expected and not dist.any()
    groups = complete_linkage(pairs, -dist)
    assert groups == [tuple(range(8)), tuple(range(8, 16)), (16, 17, 18)]


def test_a_checkpoint_is_called_all_along_a_long_grouping_and_what_it_raises_ends_it():
    """The service stops a duplicates report at the grouping's next checkpoint: on a library whose pictures
    are all alike (every pair a candidate), it comes every ``CHECK_EVERY`` pairs, and what it raises
    (the stop) ends the grouping there."""
    n = 700  # 244,650 pairs: nearly four rounds of CHECK_EVERY
    vectors = np.ones((n, 4), dtype=np.float32) / 2
    calls = 0

    def count() -> None:
        nonlocal calls
        calls += 1

    pairs, sims = similar_pairs(vectors, np.full(n, np.nan), 0.9, 30.0, count)
    assert len(pairs) == n * (n - 1) // 2 and calls >= 1
    calls = 0
    assert complete_linkage(pairs, sims, count) == [tuple(range(n))]
    assert calls >= 2 * (len(pairs) // CHECK_EVERY)

    class Stopped(Exception):
        pass

    def stop() -> None:
        raise Stopped

    for search in (lambda: similar_pairs(vectors, np.full(n, np.nan), 0.9, 30.0, stop),
                   lambda: complete_linkage(pairs, sims, stop),
                   lambda: near_copy_pairs(np.zeros((n, 4), dtype=np.uint64), 4, stop)):
        with pytest.raises(Stopped):
            search()
