"""Held-out protocol: folds grouped by pair and stratified by CWE, so a vector is never fitted on an item it is
tested on, nor on the twin of that item."""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections import Counter
from typing import Sequence

from sklearn.model_selection import GroupKFold, LeaveOneGroupOut, StratifiedGroupKFold

from vulnsteer.data import Sample, family
from vulnsteer.errors import VulnsteerError


def pair_folds(samples: Sequence[Sample], k: int = 5, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(train indices, test indices) per fold. Both members of a pair (and all augmented copies of a scenario) land
    in the same fold; each CWE is spread over the folds as evenly as its pairs allow. `k` at least the number of
    pairs means leave-one-pair-out."""
    if k < 2:
        raise VulnsteerError(f"cross-validation needs at least 2 folds, got {k}")
    groups = [family(s) for s in samples]
    n_groups = len(set(groups))
    if n_groups < 2:
        raise VulnsteerError(f"cross-validation needs at least 2 pairs, got {n_groups}")
    cwes = [s.cwe for s in samples]
    if k >= n_groups:
        splitter = LeaveOneGroupOut()
    elif k <= min(Counter(cwes).values()):
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    else:  # too few items of some CWE to stratify over k folds
        splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # sklearn warns when a CWE has fewer pairs than folds; expected here
        warnings.simplefilter("ignore", UserWarning)
        splits = list(splitter.split(samples, cwes, groups))
    return [(list(train), list(test)) for train, test in splits]


def leak_keys(sample: Sample) -> tuple[str, str]:
    """What makes two items the same evidence: the family within its source (a pair with its augmented copies),
    and the code up to white space (a copy under another id or in another dataset)."""
    code = "".join(sample.code.split())
    return (_short(f"family\0{sample.source}\0{family(sample)}"), _short(f"code\0{code}"))


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def training_keys(samples: Sequence[Sample]) -> list[str]:
    """The leak keys of a training set, as stored in a vector file's metadata."""
    return sorted({key for s in samples for key in leak_keys(s)})


def overlapping(samples: Sequence[Sample], keys: set[str]) -> list[Sample]:
    """The items that share a family or code with a training set given by its keys."""
    return [s for s in samples if any(key in keys for key in leak_keys(s))]


def drop_overlap(samples: list[Sample], others: Sequence[Sample], what: str) -> list[Sample]:
    """`samples` less those that share a family or code with `others`, with a printed count; refused when none
    is left."""
    leaked = {s.id for s in overlapping(samples, set(training_keys(others)))}
    if not leaked:
        return samples
    kept = [s for s in samples if s.id not in leaked]
    if not kept:
        raise VulnsteerError(f"every one of the {what} shares a family or code with the other set: nothing is "
                             "held out")
    print(f"held out: dropped {len(leaked)} of {len(samples)} {what} that share a family or code with the other "
          "set", file=sys.stderr)
    return kept


def held_out_from(samples: list[Sample], vector_meta: dict, what: str = "items") -> list[Sample]:
    """`samples` less those whose family or code a vector file was fitted on (by id for a file from an older
    vulnsteer, which lacks the keys), with a printed count; refused when none is left."""
    if "train_keys" in vector_meta:
        keys = set(vector_meta["train_keys"])
        leaked = {s.id for s in overlapping(samples, keys)}
    else:
        leaked = {s.id for s in samples} & set(vector_meta.get("train_ids", []))
        if "train_ids" in vector_meta:
            print("held out: this vector file has no family keys (older vulnsteer); compared by id only",
                  file=sys.stderr)
    kept = [s for s in samples if s.id not in leaked]
    if not kept:
        raise VulnsteerError(f"every one of the {what} shares a family or code with the vectors' training set: "
                             "nothing is held out")
    if leaked:
        print(f"held out: dropped {len(leaked)} of {len(samples)} {what} that share a family or code with the "
              "vectors' training set", file=sys.stderr)
    return kept


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
                raise VulnsteerError(f"the row of {sample.id} is steered by vectors {bank}, fitted on {item.id}'s "
                                     "family or code, which that row must not have seen: refusing a result that is "
                                     "not held out")
