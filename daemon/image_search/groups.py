"""Grouping pictures that belong together: complete-linkage groups over candidate pairs, and the pairs of
the two kinds that need searching for (near-copies by perceptual hash, similar pictures by embedding).

Pure and deterministic: items are numbered 0..n-1 by the caller (in an order of its choosing, e.g. by
file_hash), and the same input always gives the same groups.

Complete linkage: every pair of a group meets the threshold, so a group never chains (A like B and B
like C with A unlike C is no group of three). Each item is in at most one group; a group has two
members or more. The candidate pairs must be every pair that meets the threshold (the searches below
find them all, no sampling), so "meets the threshold" is "is a candidate pair".

Groups are grown greedily, strongest pair first (ties by item number): two groups merge when the pair
joining them is the strongest left and every cross pair meets the threshold. Which of two overlapping
groups a contested item joins thus follows its strongest link.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .config import MOST_NEAR_COPY_DISTANCE
from .phash import HASH_BITS

# Items compared at once in the embedding search: a block of at most BLOCK_FLOATS similarities in float32
# (128 MB), BLOCK rows of dated items by as many of their time window's, or undated items by every item.
BLOCK = 1024
BLOCK_FLOATS = 1 << 25
# The most near-copy distance ``near_copy_pairs`` searches for (config.py validates the key against it):
# its pigeonhole search cuts the hash into max-distance + 1 chunks, and chunks shorter than about 14 bits
# would make every bucket crowded.

# Called every so often by the searches below (between blocks, every CHECK_EVERY pairs): a report that
# must end (the service is stopping) raises there. Well under a second of work lies between two calls,
# but for the one sort of all the pairs: seconds when nearly every pair is one (10 million, measured here).
Checkpoint = Callable[[], None]
CHECK_EVERY = 1 << 16


def go_on() -> None:
    """The checkpoint of a search nothing stops."""


def complete_linkage(pairs: np.ndarray, strength: np.ndarray,
                     checkpoint: Checkpoint = go_on) -> list[tuple[int, ...]]:
    """Complete-linkage groups from ``pairs`` ((m, 2) item numbers: every pair that meets the threshold)
    and their ``strength`` ((m,), higher is closer: a similarity, or minus a distance). Groups of two or
    more, each as its items in ascending order, the groups ordered by their first item."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    strength = np.asarray(strength, dtype=np.float64).reshape(-1)
    low, high = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
    keep = low != high
    low, high, strength = low[keep], high[keep], strength[keep]
    neighbours: dict[int, set[int]] = {}
    for n, (a, b) in enumerate(zip(low.tolist(), high.tolist())):
        if n % CHECK_EVERY == 0:
            checkpoint()
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    label: dict[int, int] = {}  # item -> its group's label (the group's first item); absent: alone
    members: dict[int, list[int]] = {}
    # Pairs of groups (by label) that cannot merge. Groups only grow, so that stays true, and in a large
    # tight cluster the same two groups are tried again for each of their many pairs (2,000 pictures with
    # a few pairs missing took minutes); a label once merged away never names a group again.
    apart: set[tuple[int, int]] = set()
    checkpoint()
    for n, k in enumerate(np.lexsort((high, low, -strength)).tolist()):
        if n % CHECK_EVERY == 0:
            checkpoint()
        a, b = int(low[k]), int(high[k])
        group_a, group_b = label.get(a, a), label.get(b, b)
        if group_a == group_b:
            continue
        keep_label, gone = min(group_a, group_b), max(group_a, group_b)
        if (keep_label, gone) in apart:
            continue
        these, those = members.get(group_a, [a]), set(members.get(group_b, [b]))
        if any(not neighbours[x].issuperset(those) for x in these):
            apart.add((keep_label, gone))
            continue  # some cross pair fails the threshold: merging would chain
        merged = sorted([*these, *those])
        members.pop(gone, None)
        members[keep_label] = merged
        for item in merged:
            label[item] = keep_label
    return sorted(tuple(group) for group in members.values())


def _pairs_in_buckets(keys: np.ndarray) -> np.ndarray:
    """Every pair (i < j) of items whose ``keys`` are equal, as an (m, 2) array."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    out = []
    for size in np.unique(sizes[sizes > 1]).tolist():  # buckets of one size at a time, vectorised
        first = starts[sizes == size]
        i, j = np.triu_indices(size, k=1)
        block = order[first[:, None, None] + np.stack([i, j], axis=1)[None, :, :]]  # (buckets, pairs, 2)
        out.append(np.sort(block.reshape(-1, 2), axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def _chunk_keys(words: np.ndarray, chunks: int) -> list[np.ndarray]:
    """The hashes ((n, 4) uint64 words, ``phash.as_words``) cut into ``chunks`` runs of bits (at most 62
    each), each run as an int64 key per item."""
    bits = np.unpackbits(words.astype(">u8").view(np.uint8).reshape(len(words), -1), axis=1)[:, -HASH_BITS:]
    bounds = np.linspace(0, HASH_BITS, chunks + 1).round().astype(int)
    keys = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        weights = (1 << np.arange(stop - start - 1, -1, -1, dtype=np.int64))
        keys.append(bits[:, start:stop].astype(np.int64) @ weights)
    return keys


def near_copy_pairs(words: np.ndarray, max_distance: int,
                    checkpoint: Checkpoint = go_on) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of hashes ((n, 4) uint64, ``phash.as_words``) within ``max_distance`` bits, and their
    distances. Multi-index hashing: cut into max_distance + 1 chunks, two hashes that close agree
    exactly on one chunk at least (pigeonhole), so only items sharing a chunk are compared."""
    if not 0 <= max_distance <= MOST_NEAR_COPY_DISTANCE:
        raise ValueError(f"near-copy distance {max_distance} is outside 0..{MOST_NEAR_COPY_DISTANCE}")
    words = np.asarray(words, dtype=np.uint64).reshape(-1, 4)
    if len(words) < 2:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
    # More chunks than max_distance + 1 keep the guarantee; five at least keep each key within 62 bits.
    found: list[np.ndarray] = []
    for keys in _chunk_keys(words, max(max_distance + 1, 5)):
        checkpoint()
        found.append(_pairs_in_buckets(keys))
    candidates = np.unique(np.concatenate(found), axis=0)
    if not len(candidates):
        return candidates, np.zeros(0, dtype=np.int64)
    dist = np.bitwise_count(words[candidates[:, 0]] ^ words[candidates[:, 1]]).sum(axis=1, dtype=np.int64)
    close = dist <= max_distance
    return candidates[close], dist[close]


def similar_pairs(embeddings: np.ndarray, taken: np.ndarray, min_similarity: float,
                  burst_seconds: float, checkpoint: Checkpoint = go_on) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of unit ``embeddings`` ((n, d)) whose cosine similarity is at least ``min_similarity``
    and, where both have a date taken (``taken``: (n,) seconds, NaN where unknown), taken within
    ``burst_seconds`` of each other; and their similarities. Exact: dated items are compared with those
    in their time window (sorted by date, in blocks); undated ones with every item (block products)."""
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    taken = np.asarray(taken, dtype=np.float64).reshape(-1)
    dated = np.flatnonzero(~np.isnan(taken))
    dated = dated[np.argsort(taken[dated], kind="stable")]
    undated = np.flatnonzero(np.isnan(taken))
    found: list[tuple[np.ndarray, np.ndarray]] = []
    times = taken[dated]
    # A time window holds every dated item where burst-seconds is long (a year, a library taken in one):
    # its columns are taken a block at a time, or one block of 300,000 items of 1,024 dimensions held 1.2 GB
    # of similarities and as much again of gathered vectors.
    cols_at_once = max(BLOCK, BLOCK_FLOATS // BLOCK)
    for start in range(0, len(dated), BLOCK):
        stop = min(start + BLOCK, len(dated))
        end = int(np.searchsorted(times, times[stop - 1] + burst_seconds, side="right"))
        these = vectors[dated[start:stop]]
        for first in range(start, end, cols_at_once):
            checkpoint()
            sims = these @ vectors[dated[first:min(first + cols_at_once, end)]].T
            rows, cols = np.nonzero(sims >= min_similarity)
            at = first + cols  # the column's place among the dated items
            later = at > start + rows  # each pair once, and no item with itself
            rows, cols, at = rows[later], cols[later], at[later]
            within = times[at] - times[start + rows] <= burst_seconds
            rows, cols, at = rows[within], cols[within], at[within]
            found.append((np.stack([dated[start + rows], dated[at]], axis=1), sims[rows, cols]))
    rows_at_once = max(1, min(BLOCK, BLOCK_FLOATS // max(1, len(vectors))))
    for start in range(0, len(undated), rows_at_once):
        checkpoint()
        these = undated[start:start + rows_at_once]
        sims = vectors[these] @ vectors.T
        rows, cols = np.nonzero(sims >= min_similarity)
        # An undated pair once (the lower number first); a dated partner is found from this side only.
        once = (cols != these[rows]) & (np.isfinite(taken[cols]) | (cols > these[rows]))
        rows, cols = rows[once], cols[once]
        found.append((np.stack([these[rows], cols], axis=1), sims[rows, cols]))
    return _joined(found)


def _joined(found: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not found:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    pairs = np.concatenate([p for p, _ in found]).astype(np.int64).reshape(-1, 2)
    return np.sort(pairs, axis=1), np.concatenate([s for _, s in found]).astype(np.float32)
