"""Deterministic train/val/test splits that never let one item appear in two splits.

Exact duplicates are removed before anything else (BBC News alone holds 101), otherwise a copy
in train and its twin in test inflate test accuracy; near-copies can be kept together by a group
key (BBC News: 28 stories appear in two versions). Then an optional stratified slice
(`max_samples`) and a stratified split; sklearn's `train_test_split` does the stratification and
we fall back to a plain random split when a class is too small to stratify. Split sizes are
computed here as integers, so every split is non-empty when asked for and the same seed and
config always give the same indices.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from fullchain.config import DataConfig
from fullchain.errors import UserError


@dataclass(frozen=True)
class Split:
    """Sorted indices into the item arrays the split was planned over."""

    train: np.ndarray
    val: np.ndarray | None
    test: np.ndarray


def text_key(text: str) -> str:
    """Texts that differ only in case or whitespace count as one document."""
    return " ".join(text.casefold().split())


def array_keys(items: np.ndarray) -> list[bytes]:
    """One digest per item (row along axis 0) of a C-contiguous array."""
    items = np.ascontiguousarray(items)
    return [hashlib.blake2b(item, digest_size=16).digest() for item in items]


def deduplicate(keys: Sequence[Hashable], exclude: Collection[Hashable] = ()) -> np.ndarray:
    """Indices of the first occurrence of every key, skipping keys in ``exclude``."""
    seen = set(exclude)
    keep = []
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def take(indices: np.ndarray, labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``size`` of ``indices`` (stratified by label when every class allows it): (rest, drawn)."""
    if size <= 0:
        return indices, indices[:0]
    if size >= len(indices):
        return indices[:0], indices
    from sklearn.model_selection import train_test_split  # scikit-learn takes most of a second to import

    try:
        rest, drawn = train_test_split(indices, test_size=size, stratify=labels[indices], random_state=seed)
    except ValueError:  # a class with one member, or fewer drawn items than classes
        rest, drawn = train_test_split(indices, test_size=size, random_state=seed)
    return np.sort(rest), np.sort(drawn)


def fraction_size(n: int, fraction: float) -> int:
    """``round(n * fraction)``, but at least one item for any positive fraction."""
    return max(1, round(n * fraction)) if fraction > 0 else 0


def split_indices(
    indices: np.ndarray, labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> Split:
    """Split ``indices`` into train/val/test; ``val`` is None when ``val_fraction`` is 0."""
    n = len(indices)
    n_test, n_val = fraction_size(n, test_fraction), fraction_size(n, val_fraction)
    if n - n_test - n_val < 1:
        raise UserError(
            f"{n} distinct samples are too few for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}; add data or raise data.max_samples"
        )
    rest, test = take(indices, labels, n_test, seed)
    train, val = take(rest, labels, n_val, seed)
    return Split(train, val if n_val else None, test)


def plan_splits(
    keys: Sequence[Hashable],
    labels: np.ndarray,
    cfg: DataConfig,
    seed: int,
    groups: Sequence[Hashable] | None = None,
) -> Split:
    """Deduplicate the items named by ``keys``, slice to ``cfg.max_samples`` and split them.

    ``groups`` (e.g. a news story's headline) keeps the items of one group in one split, so
    near-copies that exact deduplication misses cannot sit in train with their twin in test.
    Groups are then the unit that is sliced (``max_samples`` counts groups) and split.
    """
    labels = np.asarray(labels)
    kept = deduplicate(keys)
    units = kept if groups is None else kept[deduplicate([groups[i] for i in kept])]
    if cfg.max_samples is not None:
        units = take(units, labels, cfg.max_samples, seed)[1]
    split = split_indices(units, labels, cfg.val_fraction, cfg.test_fraction, seed)
    if groups is None:
        return split
    members = defaultdict(list)
    for i in kept:
        members[groups[i]].append(i)

    def expand(idx: np.ndarray | None) -> np.ndarray | None:
        if idx is None:
            return None
        return np.sort(np.fromiter((m for i in idx for m in members[groups[i]]), dtype=np.int64))

    return Split(expand(split.train), expand(split.val), expand(split.test))


def plan_official_splits(
    keys: Sequence[Hashable], labels: np.ndarray, official_test: np.ndarray, cfg: DataConfig, seed: int
) -> Split:
    """Splits for a set with a published test set (e.g. Fashion-MNIST's t10k), marked by ``official_test``.

    The published test items form the test split untouched (so results compare with published
    ones); training items that copy one of them, or each other, are dropped; val is
    ``cfg.val_fraction`` of the remaining training pool. With ``max_samples`` the test split
    gets a ``test_fraction`` share of it.
    """
    labels = np.asarray(labels)
    test = np.flatnonzero(official_test)
    pool = np.flatnonzero(~official_test)
    pool = pool[deduplicate([keys[i] for i in pool], exclude={keys[i] for i in test})]
    if cfg.max_samples is not None:
        n_test = fraction_size(cfg.max_samples, cfg.test_fraction)
        test = take(test, labels, n_test, seed)[1]
        pool = take(pool, labels, cfg.max_samples - n_test, seed)[1]
    pool_split = split_indices(pool, labels, cfg.val_fraction, 0.0, seed)
    return Split(pool_split.train, pool_split.val, test)
