"""Cross-validated probe AUROC on synthetic activations, and the pair-grouped folds it relies on."""

import numpy as np
import pytest
import torch

import vulnsteer.extract.probe as probe_module
from vulnsteer.data import Sample, family
from vulnsteer.errors import VulnsteerError
from vulnsteer.extract.activations import Activations
from vulnsteer.extract.probe import (
    ProbeRow,
    auroc_or_none,
    fixed_direction_auroc,
    out_of_fold_scores,
    probe,
)
from vulnsteer.extract.vectors import direction
from vulnsteer.protocol import pair_folds

CWES = ("CWE-22", "CWE-79", "CWE-787")
HIDDEN = 32


def pair_samples(cwes=CWES, pairs_per_cwe=6, only_vulnerable=()):
    samples = []
    for cwe in cwes:
        for p in range(pairs_per_cwe):
            for label in ("vulnerable", "patched"):
                if label == "patched" and cwe in only_vulnerable:
                    continue
                samples.append(
                    Sample(
                        id=f"{cwe}/{p}/{label}",
                        cwe=cwe,
                        label=label,
                        language="c",
                        code=f"c{cwe[4:]}_{p}(x);",
                        pair_id=f"{cwe}/{p}",
                        split="train",
                        source="test",
                    )
                )
    return samples


def planted_acts(samples, seed=0, hidden=HIDDEN, vary=False):
    """Layer 0: vulnerable samples shifted by 2 (or, with `vary`, by 1..4 at random) along a planted unit direction
    (separable); layer 1: pure noise."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(hidden, generator=g)
    d = d / d.norm()
    labels = torch.tensor([s.is_vulnerable for s in samples])
    shift = (1 + 3 * torch.rand(len(samples), 1, generator=g)) if vary else 2.0
    signal = torch.randn(len(samples), hidden, generator=g) * 0.3 + shift * labels[:, None] * d
    noise = torch.randn(len(samples), hidden, generator=g)
    return Activations(samples, {0: signal, 1: noise}, "prompt-last", "S1"), d


def auroc(labels, scores):
    return auroc_or_none(np.asarray(labels), np.asarray(scores))


# --- out_of_fold_scores -----------------------------------------------------------------------------------


@pytest.mark.parametrize("per_cwe", [False, True])
def test_direction_never_fitted_on_scored_items(monkeypatch, per_cwe):
    """Record what every direction is fitted on (rows are unique, so they identify items) and match the calls
    to the folds in order: each fit uses exactly the fold's training part (of one CWE when per_cwe), never an
    item of the fold it scores, nor the twin of one."""
    samples = pair_samples()
    acts, _ = planted_acts(samples)
    row_index = {tuple(row.tolist()): i for i, row in enumerate(acts.by_layer[0])}
    assert len(row_index) == len(samples)
    folds_seen, fits = [], []
    real_folds = probe_module.pair_folds

    def spy_folds(*args, **kwargs):
        folds = real_folds(*args, **kwargs)
        folds_seen.extend(folds)
        return folds

    def spy_direction(x, vulnerable, pair_ids, method):
        if x.shape[1] == HIDDEN and tuple(x[0].tolist()) in row_index:  # layer 0 only (layer 1 rows differ)
            fits.append(sorted(row_index[tuple(r.tolist())] for r in x))
        return direction(x, vulnerable, pair_ids, method)

    monkeypatch.setattr(probe_module, "pair_folds", spy_folds)
    monkeypatch.setattr(probe_module, "direction", spy_direction)
    scores = out_of_fold_scores(acts, [0, 1], "mean-diff", per_cwe=per_cwe, k=3)
    expected = []
    for train, test in folds_seen:
        groups = sorted({samples[i].cwe for i in test}) if per_cwe else [None]
        for group in groups:
            expected.append(sorted(i for i in train if group is None or samples[i].cwe == group))
        test_pairs = {samples[i].pair_id for i in test}
        assert not test_pairs & {samples[i].pair_id for i in train}
    assert fits == expected
    assert len(folds_seen) == 3
    for layer in (0, 1):
        assert not np.isnan(scores[layer]).any()


def test_no_leakage_with_pair_specific_offsets():
    """Each pair differs only along its own random direction u_j (vulnerable = base + u_j, patched = base - u_j):
    nothing generalises across pairs. A direction fitted with the item's own pair would memorise u_j and score
    the pair perfectly; out of fold, the score must be at chance."""
    n_pairs, hidden = 30, 256
    samples = pair_samples(cwes=("CWE-79",), pairs_per_cwe=n_pairs)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(n_pairs, hidden, generator=g)
    base = torch.randn(n_pairs, hidden, generator=g)
    x = torch.stack(
        [base[j] + (u[j] if s.is_vulnerable else -u[j]) for j, s in zip([i // 2 for i in range(2 * n_pairs)], samples)]
    )
    acts = Activations(samples, {0: x}, "prompt-last", "S1")
    labels = acts.labels.numpy()
    # fitted on everything (leaky), the same direction separates almost perfectly
    leaky = direction(x, acts.labels, [s.pair_id for s in samples], "mean-diff")
    assert auroc(labels, ((x - x.mean(0)) @ leaky).numpy()) > 0.95
    for k in (5, 100):  # k-fold and leave-one-pair-out
        oof = out_of_fold_scores(acts, [0], "mean-diff", per_cwe=False, k=k)[0]
        assert not np.isnan(oof).any()
        assert abs(auroc(labels, oof) - 0.5) < 0.2


@pytest.mark.parametrize(
    "method,vary",
    [("mean-diff", False), ("probe", False), ("mean-diff", True), ("pca", True), ("probe", True), ("pca", False)],
)
def test_probe_auroc_signal_and_noise_layers(method, vary):
    samples = pair_samples(pairs_per_cwe=8)
    acts, _ = planted_acts(samples, vary=vary)
    rows = probe(acts, [0, 1], method=method, k=4)
    assert all(isinstance(r, ProbeRow) for r in rows)
    by = {(r.layer, r.group): r for r in rows}
    assert set(by) == {(layer, g) for layer in (0, 1) for g in ("pooled", *CWES)}
    assert [(r.layer, r.group) for r in rows] == [(layer, g) for layer in (0, 1) for g in ("pooled", *sorted(CWES))]
    assert all(isinstance(r.group, str) for r in rows)
    assert by[0, "pooled"].auroc > 0.97
    assert by[0, "pooled"].n == len(samples)
    for cwe in CWES:
        assert by[0, cwe].auroc > 0.9
        assert by[0, cwe].n == 16 and by[1, cwe].n == 16
    assert abs(by[1, "pooled"].auroc - 0.5) < 0.25
    noise = by[1, "pooled"]  # pooled rows carry a pair-bootstrap interval around the estimate; CWE rows do not
    assert noise.low <= noise.auroc <= noise.high and noise.high - noise.low > 0.05
    assert by[1, CWES[0]].low is None


def test_probe_cwe_without_both_classes_in_training_gets_none():
    """A CWE with a single pair: whenever that pair is held out, its CWE has nothing to fit on, so its own-direction
    scores are NaN and its row has no AUROC; pooled scoring still covers it."""
    samples = pair_samples(pairs_per_cwe=4) + pair_samples(cwes=("CWE-416",), pairs_per_cwe=1)
    acts, _ = planted_acts(samples)
    own = out_of_fold_scores(acts, [0], "mean-diff", per_cwe=True, k=3)[0]
    lonely = [i for i, s in enumerate(samples) if s.cwe == "CWE-416"]
    assert np.isnan(own[lonely]).all()
    assert not np.isnan(np.delete(own, lonely)).any()
    pooled = out_of_fold_scores(acts, [0], "mean-diff", per_cwe=False, k=3)[0]
    assert not np.isnan(pooled).any()
    rows = {(r.layer, r.group): r for r in probe(acts, [0], k=3)}
    assert rows[0, "CWE-416"].auroc is None and rows[0, "CWE-416"].n == 2
    assert rows[0, "pooled"].auroc > 0.95


def test_out_of_fold_scores_are_projections_from_other_folds():
    """Recompute the scores by hand from the folds: (x - mean of training rows) @ mean-diff of training rows."""
    samples = pair_samples(pairs_per_cwe=3)
    acts, _ = planted_acts(samples)
    scores = out_of_fold_scores(acts, [0], "mean-diff", per_cwe=False, k=3, seed=7)[0]
    x, labels = acts.by_layer[0], acts.labels
    for train, test in pair_folds(samples, 3, 7):
        d = x[train][labels[train]].mean(0) - x[train][~labels[train]].mean(0)
        np.testing.assert_allclose(scores[test], ((x[test] - x[train].mean(0)) @ d).numpy(), rtol=1e-5, atol=1e-5)


def test_fixed_direction_auroc():
    samples = pair_samples(pairs_per_cwe=5)
    acts, d = planted_acts(samples)
    result = fixed_direction_auroc(acts, {0: d, 1: d})
    assert set(result) == {0, 1}
    assert result[0] == pytest.approx(1.0)
    assert abs(result[1] - 0.5) < 0.25
    assert fixed_direction_auroc(acts, {0: -d})[0] == pytest.approx(0.0)
    assert fixed_direction_auroc(acts, {0: d.double()})[0] == pytest.approx(1.0)
    only_vulnerable = acts.subset(lambda s: s.is_vulnerable)
    assert fixed_direction_auroc(only_vulnerable, {0: d}) == {0: None}


def test_auroc_or_none():
    assert auroc_or_none(np.array([True, False]), np.array([1.0, 0.0])) == 1.0
    assert auroc_or_none(np.array([True, False, True]), np.array([0.2, np.nan, 0.1])) is None  # one class left
    assert auroc_or_none(np.array([True, False, False]), np.array([np.nan, np.nan, 1.0])) is None
    assert auroc_or_none(np.array([True, True]), np.array([1.0, 0.0])) is None
    assert auroc_or_none(np.array([True, False, True, False]), np.array([0.9, np.nan, 0.1, 0.5])) == 0.5


# --- pair_folds -------------------------------------------------------------------------------------------


def check_partition(samples, folds):
    n = len(samples)
    tested = sorted(i for _, test in folds for i in test)
    assert tested == list(range(n)), "every index is tested exactly once"
    for train, test in folds:
        assert sorted(train + test) == list(range(n))
        assert not set(train) & set(test)
        assert not {family(samples[i]) for i in train} & {family(samples[i]) for i in test}
        assert not {samples[i].pair_id for i in train} & {samples[i].pair_id for i in test}  # whatever `family` says
        assert test, "no empty fold"


@pytest.mark.parametrize("k", [2, 3, 5])
def test_pair_folds_keep_pairs_together(k):
    samples = pair_samples(pairs_per_cwe=4)
    folds = pair_folds(samples, k)
    assert len(folds) == k
    check_partition(samples, folds)
    assert pair_folds(samples, k) == folds  # deterministic for a seed


def test_pair_folds_stratify_by_cwe():
    samples = pair_samples(pairs_per_cwe=4)
    for train, test in pair_folds(samples, 2):
        assert {samples[i].cwe for i in test} == set(CWES)
        assert {samples[i].cwe for i in train} == set(CWES)


def test_pair_folds_leave_one_out():
    samples = pair_samples(pairs_per_cwe=2)  # 6 pairs
    for k in (6, 7, 50):
        folds = pair_folds(samples, k)
        assert len(folds) == 6
        check_partition(samples, folds)
        for _, test in folds:
            assert len(test) == 2 and len({samples[i].pair_id for i in test}) == 1


def test_pair_folds_unpaired_items_are_their_own_groups():
    samples = pair_samples(pairs_per_cwe=3, only_vulnerable=("CWE-79",))
    folds = pair_folds(samples, 3)
    check_partition(samples, folds)


def test_pair_folds_keep_augmented_copies_with_their_scenario():
    """SecLLMHolmes augmented copies of hand-crafted scenario N (and its patched twin) share one fold."""
    samples = []
    for n in range(1, 5):
        for prefix in ("hand-crafted/dataset", "augmented/dataset/trivial/rename", "augmented/dataset/x/swap"):
            for stem in (str(n), f"p_{n}"):
                samples.append(
                    Sample(
                        id=f"{prefix}/CWE-79/{stem}.c",
                        cwe="CWE-79",
                        label="patched" if stem.startswith("p_") else "vulnerable",
                        language="c",
                        code=f"s{n}(x);",
                        pair_id=f"{prefix}/CWE-79/{n}",
                        split=prefix.split("/")[0],
                        source="secllmholmes",
                    )
                )
    assert len({family(s) for s in samples}) == 4
    folds = pair_folds(samples, 2)
    check_partition(samples, folds)
    for _, test in folds:
        scenarios = {family(samples[i]) for i in test}
        assert sum(1 for s in samples if family(s) in scenarios) == len(test)


def test_pair_folds_need_two_pairs():
    with pytest.raises(VulnsteerError, match="at least 2 pairs, got 1"):
        pair_folds(pair_samples(cwes=("CWE-79",), pairs_per_cwe=1), 5)
    with pytest.raises(VulnsteerError, match="at least 2 pairs, got 0"):
        pair_folds([], 5)
    assert len(pair_folds(pair_samples(cwes=("CWE-79",), pairs_per_cwe=2), 5)) == 2


@pytest.mark.parametrize("k", [1, 0])
def test_pair_folds_refuse_fewer_than_two_folds(k):
    with pytest.raises(VulnsteerError):
        pair_folds(pair_samples(pairs_per_cwe=4), k)
