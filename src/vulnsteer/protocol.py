"""Held-out protocol: folds grouped by pair and stratified by CWE, so a vector is never fitted on an item it is
tested on, nor on the twin of that item."""

from __future__ import annotations

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
