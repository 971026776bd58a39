"""Detection without generation: the projection of an activation onto a direction is a vulnerability score.

AUROC is cross-validated by pair: each item's score comes from a direction fitted on the other folds, so the
direction never saw the item or its twin. `pooled` fits one direction on all CWEs; `own` fits one per CWE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from vulnsteer.data import family
from vulnsteer.extract.activations import Activations
from vulnsteer.extract.vectors import direction
from vulnsteer.metrics import Judged, summarise
from vulnsteer.protocol import pair_folds


@dataclass(frozen=True)
class ProbeRow:
    """AUROC of one (layer, group) with `group` = "pooled" (all CWEs, one direction) or a CWE (its own direction)."""

    layer: int
    group: str
    auroc: float | None
    n: int
    low: float | None = None  # 95% interval, bootstrap over pairs (pooled rows only: a CWE has few pairs)
    high: float | None = None


def out_of_fold_scores(
    acts: Activations, layers: list[int], method: str, per_cwe: bool, k: int = 5, seed: int = 0
) -> dict[int, np.ndarray]:
    """Per layer, every item's projection onto a direction fitted without its fold (NaN where a fold's training
    part lacks a class)."""
    scores = {layer: np.full(len(acts.samples), np.nan) for layer in layers}
    labels = acts.labels
    for train, test in pair_folds(acts.samples, k, seed):
        for group in sorted({acts.samples[i].cwe for i in test}) if per_cwe else [None]:
            fit_on = [i for i in train if group is None or acts.samples[i].cwe == group]
            score_on = [i for i in test if group is None or acts.samples[i].cwe == group]
            if labels[fit_on].all() or not labels[fit_on].any():
                continue
            pair_ids = [acts.samples[i].pair_id for i in fit_on]
            for layer in layers:
                x = acts.by_layer[layer]
                d = direction(x[fit_on], labels[fit_on], pair_ids, method)
                midpoint = x[fit_on].mean(0)
                scores[layer][score_on] = ((x[score_on] - midpoint) @ d).numpy()
    return scores


def auroc_or_none(labels: np.ndarray, scores: np.ndarray) -> float | None:
    keep = ~np.isnan(scores)
    if keep.sum() < 2 or len(set(labels[keep])) < 2:
        return None
    return float(roc_auc_score(labels[keep], scores[keep]))


def probe(acts: Activations, layers: list[int], method: str = "mean-diff", k: int = 5, seed: int = 0) -> list[ProbeRow]:
    """Cross-validated AUROC per layer: pooled over all items, and per CWE with each CWE's own direction."""
    labels = acts.labels.numpy()
    cwes = np.array([s.cwe for s in acts.samples])
    rows = []
    pooled = out_of_fold_scores(acts, layers, method, per_cwe=False, k=k, seed=seed)
    own = out_of_fold_scores(acts, layers, method, per_cwe=True, k=k, seed=seed)
    for layer in layers:
        low, high = _auroc_interval(acts, pooled[layer], seed)
        rows.append(ProbeRow(layer, "pooled", auroc_or_none(labels, pooled[layer]), len(labels), low, high))
        for cwe in sorted(set(cwes)):
            mask = cwes == cwe
            rows.append(ProbeRow(layer, cwe, auroc_or_none(labels[mask], own[layer][mask]), int(mask.sum())))
    return rows


def _auroc_interval(acts: Activations, scores: np.ndarray, seed: int) -> tuple[float | None, float | None]:
    items = [
        Judged(s.pair_id, s.cwe, s.is_vulnerable, "unknown", float(x), family(s))
        for s, x in zip(acts.samples, scores)
        if not np.isnan(x)
    ]
    interval = summarise(items, n_boot=1000, seed=seed).auroc if items else None
    return (interval.low, interval.high) if interval else (None, None)


def fixed_direction_auroc(acts: Activations, vectors: dict[int, torch.Tensor]) -> dict[int, float | None]:
    """AUROC of given (already fitted) directions on these activations, per layer: honest only when the
    activations were not part of the vectors' training set."""
    labels = acts.labels.numpy()
    return {layer: auroc_or_none(labels, (acts.by_layer[layer] @ v.float()).numpy()) for layer, v in vectors.items()}
