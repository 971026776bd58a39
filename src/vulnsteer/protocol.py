"""Held-out protocol: folds grouped by family (a pair, its augmented copies and near-duplicates in any source) and
stratified by CWE over families, so a vector is never fitted on an item it is tested on, nor on a twin or a copy of
that item."""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vulnsteer.data import Sample, family
from vulnsteer.errors import VulnsteerError
from vulnsteer.neardup import band_keys


def pair_folds(samples: Sequence[Sample], k: int = 5, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(train indices, test indices) per fold. A family (`families`: a pair, its augmented copies, and every
    near-duplicate of them in any source) lands in one fold; each CWE's families are dealt over the folds so
    that their counts per fold differ by at most one (stratified by families, not items). `k` at least the
    number of families means leave-one-family-out."""
    if k < 2:
        raise VulnsteerError(f"cross-validation needs at least 2 folds, got {k}")
    groups = families(samples)
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    if len(members) < 2:
        raise VulnsteerError(f"cross-validation needs at least 2 pairs, got {len(members)}")
    k = min(k, len(members))
    rng = np.random.default_rng(seed)
    by_cwe: dict[str, list[str]] = {}
    for group, items in members.items():
        cwe = min(Counter(samples[i].cwe for i in items).most_common(), key=lambda c: (-c[1], c[0]))[0]
        by_cwe.setdefault(cwe, []).append(group)
    per_fold = np.zeros(k, int)
    sizes = np.zeros(k, int)
    tie_break = rng.permutation(k)
    fold_of: dict[str, int] = {}
    for cwe in sorted(by_cwe):
        dealt = np.zeros(k, int)
        order = [by_cwe[cwe][j] for j in rng.permutation(len(by_cwe[cwe]))]
        for group in sorted(order, key=lambda g: -len(members[g])):  # large families first, ties in random order
            fold = min(range(k), key=lambda f: (dealt[f], per_fold[f], sizes[f], tie_break[f]))
            fold_of[group] = fold
            dealt[fold] += 1
            per_fold[fold] += 1
            sizes[fold] += len(members[group])
    folds = [[i for i, g in enumerate(groups) if fold_of[g] == f] for f in range(k)]
    return [([i for i in range(len(samples)) if fold_of[groups[i]] != f], test) for f, test in enumerate(folds)]


def leak_keys(sample: Sample) -> tuple[str, ...]:
    """What makes two items the same evidence: the family (a pair with its augmented copies; not keyed by source,
    so the same pair under two sources is one family), the code up to white space (a copy under another id or in
    another dataset), and near-duplicate code (each MinHash band of `neardup`: renamed variables, re-wrapped
    lines, another constant)."""
    code = "".join(sample.code.split())
    return (
        _short(f"family\0{family(sample)}"),
        _short(f"code\0{code}"),
        *(_short(key) for key in band_keys(sample.code)),
    )


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def families(samples: Sequence[Sample]) -> list[str]:
    """Each item's family across sources: the items linked by a shared leak key, transitively (connected
    components, so a near-duplicate of a near-duplicate is the same evidence too). Named by the smallest item id."""
    parent: dict[str, str] = {}

    def root(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for s in samples:
        for key in leak_keys(s):
            a, b = root("item\0" + s.id), root("key\0" + key)
            parent[max(a, b)] = min(a, b)
    roots = [root("item\0" + s.id) for s in samples]
    names: dict[str, str] = {}
    for s, r in zip(samples, roots):
        names[r] = min(names.get(r, s.id), s.id)
    return [names[r] for r in roots]


def training_keys(samples: Sequence[Sample]) -> list[str]:
    """The leak keys of a training set, as stored in a vector file's metadata."""
    return sorted({key for s in samples for key in leak_keys(s)})


def overlapping(samples: Sequence[Sample], keys: set[str]) -> list[Sample]:
    """The items that share a family, code or near-duplicate code with a training set given by its keys."""
    return [s for s in samples if any(key in keys for key in leak_keys(s))]


@dataclass(frozen=True)
class HeldOut:
    """Test items held out from a training set, and how many were dropped because their family overlaps it."""

    samples: list[Sample]
    dropped: int
    of: int

    @property
    def note(self) -> str | None:
        """The sentence a report prints about the dropped items; None when none was dropped."""
        if not self.dropped:
            return None
        return (
            f"dropped {self.dropped} of {self.of} test items (whole families) that share a family, code or "
            "near-duplicate code with the training data (--drop-overlap)"
        )


def with_families(test: Sequence[Sample], leaked: set[str]) -> list[Sample]:
    """The items of `test` in a family (within `test`) that holds a `leaked` item: what is not held out."""
    groups = families(test)
    hit = {g for s, g in zip(test, groups) if s.id in leaked}
    return [s for s, g in zip(test, groups) if g in hit]


def held_out(test: Sequence[Sample], leaked: set[str], drop: bool, what: str) -> HeldOut:
    """`test` less every family (within `test`) with a `leaked` item (one that shares a key with `what`, the
    training data): refused with the count unless `drop` (--drop-overlap), and refused when nothing is left."""
    gone = {s.id for s in with_families(test, leaked)}
    kept = [s for s in test if s.id not in gone]
    dropped = len(gone)
    if dropped and not drop:
        raise VulnsteerError(
            f"{dropped} of the {len(test)} test items are in families that share a family, code or "
            f"near-duplicate code with {what}: nothing about them is held out; pass --drop-overlap "
            "(sweep: drop_overlap = true) to drop them, or test on other data"
        )
    if not kept:
        raise VulnsteerError(
            f"every one of the {len(test)} test items shares a family, code or near-duplicate code "
            f"with {what}: nothing is held out"
        )
    result = HeldOut(kept, dropped, len(test))
    if result.note:
        print(f"held out: {result.note}", file=sys.stderr)
    return result


def leaked_ids(samples: Sequence[Sample], vector_meta: dict) -> set[str]:
    """The ids of `samples` that share a family, code or near-duplicate code with a vector file's training set
    (by id for a file from an older vulnsteer, which lacks the keys)."""
    if "train_keys" in vector_meta:
        return {s.id for s in overlapping(samples, set(vector_meta["train_keys"]))}
    if "train_ids" in vector_meta:
        print("held out: this vector file has no family keys (older vulnsteer); compared by id only", file=sys.stderr)
    return {s.id for s in samples} & set(vector_meta.get("train_ids", []))


def items_sha256(samples: Sequence[Sample]) -> str:
    """A digest of a training set's item ids (a vector file's `train_ids_sha256`)."""
    return hashlib.sha256("\n".join(sorted(s.id for s in samples)).encode()).hexdigest()


def bank_id(vector_meta: dict) -> str:
    """A vector bank's identity in stored rows: a digest of the items it was fitted on."""
    return vector_meta["train_ids_sha256"][:16]


def check_provenance(rows: Sequence[tuple[Sample, str, Sequence[Sample]]], bank_keys: dict[str, set[str]]) -> None:
    """Each steered row (its item, the id of the bank that steers it, and the items that bank must not have seen:
    the row's own fold, and for a selection row its outer fold too) was steered by vectors fitted on none of them,
    by family or code. Checked on the rows themselves, before they run and again from a store (`report --check`),
    so a bank mapped to the wrong fold is refused however the mapping went wrong."""
    seen: dict[tuple[str, str], bool] = {}
    for sample, bank, unseen in rows:
        if bank not in bank_keys:
            raise VulnsteerError(f"a row of {sample.id} names vectors {bank} that this sweep did not fit")
        for item in (sample, *unseen):
            if (bank, item.id) not in seen:
                seen[(bank, item.id)] = bool(overlapping([item], bank_keys[bank]))
            if seen[(bank, item.id)]:
                raise VulnsteerError(
                    f"the row of {sample.id} is steered by vectors {bank}, fitted on {item.id}'s "
                    "family or code, which that row must not have seen: refusing a result that is "
                    "not held out"
                )
