import json
import math

import numpy as np
import pytest

from vulnsteer.metrics import (
    Interval,
    Judged,
    MetricsError,
    auroc,
    bootstrap_gain,
    clustered_auroc,
    clustered_proportion,
    mcnemar_exact,
    mcnemar_items,
    sign_flip_p_value,
    summarise,
    summarise_by_cwe,
    wilson_interval,
)

CWES = ("CWE-79", "CWE-89", "CWE-416")


def paired(n_pairs=30, verdict=lambda vulnerable, i: "vulnerable", score=None):
    items = []
    for i in range(n_pairs):
        cwe = CWES[i % len(CWES)]
        for vul in (True, False):
            items.append(
                Judged(
                    pair_id=f"p{i}",
                    cwe=cwe,
                    vulnerable=vul,
                    verdict=verdict(vul, i),
                    score=None if score is None else score(vul, i),
                )
            )
    return items


def perfect(vul, i):
    return "vulnerable" if vul else "not_vulnerable"


def noisy(p_right, seed):
    rng = np.random.default_rng(seed)
    draws = rng.random(1000)

    def verdict(vul, i):
        right = draws[2 * i + int(vul)] < p_right
        return perfect(vul, i) if right else perfect(not vul, i)

    return verdict


def inside(iv):
    return 0.0 <= iv.low <= iv.value <= iv.high <= 1.0


def test_all_vulnerable_model():
    s = summarise(paired(verdict=lambda v, i: "vulnerable"), n_boot=200)
    assert s.accuracy.value == 0.5
    assert s.balanced_accuracy.value == 0.5
    assert s.pair_accuracy.value == 0.0
    assert s.n == 60 and s.n_pairs == 30 and s.n_vulnerable == 30 and s.n_patched == 30
    assert s.n_unknown == 0 and s.answer_rate.value == 1.0
    # every resample keeps both pair members, so balanced accuracy never moves
    assert s.balanced_accuracy.low == s.balanced_accuracy.high == 0.5


def test_perfect_model():
    s = summarise(paired(verdict=perfect, score=lambda v, i: float(v) + i * 1e-3), n_boot=200)
    for iv in (s.accuracy, s.answered_accuracy, s.answer_rate, s.balanced_accuracy, s.pair_accuracy, s.auroc):
        assert iv.value == 1.0
        assert inside(iv)
    assert s.pair_accuracy.low < 1.0  # Wilson is not degenerate at 30/30


def test_unknowns_lower_accuracy_not_answered_accuracy():
    verdict = lambda v, i: "unknown" if i < 10 else perfect(v, i)  # noqa: E731
    s = summarise(paired(verdict=verdict), n_boot=200)
    assert s.n_unknown == 20
    assert s.accuracy.value == pytest.approx(40 / 60)
    assert s.answered_accuracy.value == 1.0
    assert s.answer_rate.value == pytest.approx(40 / 60)
    assert s.balanced_accuracy.value == pytest.approx(40 / 60)
    assert s.pair_accuracy.value == pytest.approx(20 / 30)


def test_all_unknown_answered_accuracy_is_none():
    s = summarise(paired(n_pairs=3, verdict=lambda v, i: "unknown"), n_boot=50)
    assert s.answered_accuracy is None
    assert s.accuracy.value == 0.0
    json.dumps(s.to_dict())


def test_wilson_known_values():
    iv = wilson_interval(8, 10)
    assert iv.value == 0.8
    assert iv.low == pytest.approx(0.4902, abs=1e-3)
    assert iv.high == pytest.approx(0.9433, abs=1e-3)
    z = wilson_interval(0, 10)
    assert z.low == 0.0 and z.high == pytest.approx(0.2775, abs=1e-3)
    assert math.isnan(wilson_interval(0, 0).value)


def test_mcnemar_exact_known_table():
    base = [True] * 1 + [False] * 9 + [True] * 5 + [False] * 3
    steer = [False] * 1 + [True] * 9 + [True] * 5 + [False] * 3
    b, c, p = mcnemar_exact(base, steer)
    assert (b, c) == (1, 9)
    assert p == pytest.approx(0.021484375)  # 2 * 11 / 1024
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0
    with pytest.raises(MetricsError):
        mcnemar_exact([True], [True, False])


def test_mcnemar_items_checks_alignment():
    base = paired(n_pairs=5, verdict=lambda v, i: "vulnerable")
    steer = paired(n_pairs=5, verdict=perfect)
    res = mcnemar_items(base, steer)
    assert (res.b, res.c) == (0, 5)
    with pytest.raises(MetricsError):
        mcnemar_items(base, list(reversed(steer)))


def test_auroc_perfect_and_reversed():
    up = paired(score=lambda v, i: float(v) + 0.01 * i)
    down = paired(score=lambda v, i: -float(v) + 0.01 * i)
    assert auroc(up) == 1.0
    assert auroc(down) == 0.0
    s_up, s_down = summarise(up, n_boot=200), summarise(down, n_boot=200)
    assert s_up.auroc == Interval(1.0, 1.0, 1.0)
    assert s_down.auroc == Interval(0.0, 0.0, 0.0)


def test_auroc_none_without_scores_or_one_class():
    assert summarise(paired(n_pairs=4), n_boot=50).auroc is None
    one_class = [Judged("a", "CWE-79", True, "vulnerable", 0.3), Judged("b", "CWE-79", True, "vulnerable", 0.9)]
    s = summarise(one_class, n_boot=50)
    assert s.auroc is None and s.balanced_accuracy is None and s.pair_accuracy is None
    assert s.n_pairs == 0
    json.dumps(s.to_dict())


def test_bootstrap_gain_contains_observed_and_reproducible():
    base = paired(n_pairs=60, verdict=noisy(0.6, 1), score=lambda v, i: 0.2 * v + np.sin(i))
    steer = paired(n_pairs=60, verdict=noisy(0.85, 2), score=lambda v, i: 1.0 * v + np.sin(i))
    for metric in ("balanced_accuracy", "accuracy", "pair_accuracy", "auroc"):
        g1 = bootstrap_gain(base, steer, metric=metric, n_boot=500, seed=7)
        g2 = bootstrap_gain(base, steer, metric=metric, n_boot=500, seed=7)
        assert g1 == g2
        assert g1.low <= g1.value <= g1.high
        observed = {
            "accuracy": lambda s: s.accuracy.value,
            "balanced_accuracy": lambda s: s.balanced_accuracy.value,
            "pair_accuracy": lambda s: s.pair_accuracy.value,
            "auroc": lambda s: s.auroc.value,
        }[metric]
        sb, ss = summarise(base, n_boot=10), summarise(steer, n_boot=10)
        assert g1.value == pytest.approx(observed(ss) - observed(sb))
    assert bootstrap_gain(base, steer, n_boot=500, seed=8) != bootstrap_gain(base, steer, n_boot=500, seed=7)
    # identical arms: zero gain, degenerate interval (same resample for both arms)
    assert bootstrap_gain(base, base, n_boot=100, seed=0) == Interval(0.0, 0.0, 0.0)


def test_bootstrap_gain_validation():
    base = paired(n_pairs=5)
    with pytest.raises(MetricsError):
        bootstrap_gain(base, base[:-1])
    with pytest.raises(MetricsError):
        bootstrap_gain(base, base, metric="f1")
    with pytest.raises(MetricsError):
        bootstrap_gain(base, base, metric="auroc")  # no scores


def test_summarise_reproducible_and_json():
    items = paired(n_pairs=40, verdict=noisy(0.7, 0), score=lambda v, i: 0.5 * v + np.cos(i))
    s1, s2 = summarise(items, n_boot=300, seed=1), summarise(items, n_boot=300, seed=1)
    assert s1 == s2
    d = json.loads(json.dumps(s1.to_dict(), allow_nan=False))
    assert d["n"] == 80 and set(d["accuracy"]) == {"value", "low", "high"}
    for iv in (s1.balanced_accuracy, s1.auroc):
        assert iv.low <= iv.value <= iv.high


def test_by_cwe_partitions_items():
    items = paired(n_pairs=30, verdict=noisy(0.7, 4))
    by = summarise_by_cwe(items, n_boot=100)
    assert list(by) == sorted(CWES)
    assert sum(s.n for s in by.values()) == len(items)
    assert sum(s.n_pairs for s in by.values()) == summarise(items, n_boot=10).n_pairs
    assert sum(s.n_vulnerable for s in by.values()) == 30
    n_correct = sum(round(s.accuracy.value * s.n) for s in by.values())
    assert n_correct == round(summarise(items, n_boot=10).accuracy.value * len(items))


def test_empty_and_bad_input():
    with pytest.raises(ValueError):
        summarise([])
    with pytest.raises(ValueError):
        summarise_by_cwe([])
    with pytest.raises(MetricsError):
        summarise([Judged("a", "CWE-79", True, "yes")])
    with pytest.raises(MetricsError):
        summarise([Judged("a", "CWE-79", True, "vulnerable", float("nan"))])


def augmented(copies: int, n_scenarios: int = 8, family: bool = True):
    """Each scenario's pair and its augmented copies: copies answer alike, so they are one piece of evidence."""
    items = []
    for s in range(n_scenarios):
        for c in range(copies):
            right = s % 2 == 0  # half the scenarios fully right, half fully wrong
            for vul in (True, False):
                verdict = (
                    ("vulnerable" if vul else "not_vulnerable")
                    if right
                    else ("not_vulnerable" if vul else "vulnerable")
                )
                items.append(
                    Judged(
                        f"s{s}/c{c}",
                        "CWE-79",
                        vul,
                        verdict,
                        score=float(vul == right),
                        family=f"s{s}" if family else None,
                    )
                )
    return items


def test_bootstrap_resamples_families_not_their_augmented_copies():
    as_pairs = summarise(augmented(copies=6, family=False), n_boot=4000, seed=1)
    as_families = summarise(augmented(copies=6), n_boot=4000, seed=1)
    one_copy = summarise(augmented(copies=1), n_boot=4000, seed=1)
    for name in ("balanced_accuracy", "auroc"):
        pairs_iv, family_iv, single_iv = (getattr(s, name) for s in (as_pairs, as_families, one_copy))
        assert family_iv.value == pairs_iv.value == single_iv.value == pytest.approx(0.5)
        # 48 "independent" pairs would claim a far narrower interval than 8 scenarios support
        assert family_iv.high - family_iv.low > 1.8 * (pairs_iv.high - pairs_iv.low)
        assert family_iv.high - family_iv.low == pytest.approx(single_iv.high - single_iv.low, abs=0.08)
    assert as_families.pair_accuracy.value == as_pairs.pair_accuracy.value == pytest.approx(0.5)
    assert as_families.n_pairs == 48


def test_gain_resamples_families_and_checks_them_aligned():
    base = augmented(copies=4)
    steered = [
        Judged(it.pair_id, it.cwe, it.vulnerable, "vulnerable" if it.vulnerable else "not_vulnerable", family=it.family)
        for it in base
    ]  # every item right
    by_family = bootstrap_gain(base, steered, "pair_accuracy", n_boot=4000, seed=2)
    by_pair = bootstrap_gain(
        [Judged(i.pair_id, i.cwe, i.vulnerable, i.verdict) for i in base],
        [Judged(i.pair_id, i.cwe, i.vulnerable, i.verdict) for i in steered],
        "pair_accuracy",
        n_boot=4000,
        seed=2,
    )
    assert by_family.value == by_pair.value == pytest.approx(0.5)
    assert by_family.low < by_pair.low
    with pytest.raises(MetricsError, match="misaligned"):
        bootstrap_gain(base, [Judged(i.pair_id, i.cwe, i.vulnerable, i.verdict) for i in steered])


def test_a_pair_split_across_families_is_refused():
    items = [
        Judged("p0", "CWE-79", True, "vulnerable", family="a"),
        Judged("p0", "CWE-79", False, "vulnerable", family="b"),
    ]
    with pytest.raises(MetricsError, match="split across families"):
        summarise(items)


def clustered_scores(rng, n_families, copies, shift, noise=0.3):
    """Families of `copies` near-identical pairs sharing a family effect: scores of copies are correlated."""
    items = []
    for f in range(n_families):
        u = rng.normal()
        pair_noise = rng.normal(0, noise, size=2)
        for c in range(copies):
            for vulnerable, e in ((True, pair_noise[0]), (False, pair_noise[1])):
                score = u + shift * vulnerable + e + rng.normal(0, 0.01)
                items.append(Judged(f"f{f}/c{c}", "CWE-787", vulnerable, "unknown", float(score), family=f"f{f}"))
    return items


def test_clustered_auroc_interval_holds_its_estimate_and_covers_the_truth():
    from scipy.stats import norm as normal

    rng = np.random.default_rng(0)
    shift, noise, families = 0.8, 0.3, 30
    between = normal.cdf(shift / math.sqrt(2 + 2 * noise**2))
    within = normal.cdf(shift / math.sqrt(2 * noise**2))
    truth = (1 - 1 / families) * between + within / families  # what the estimator estimates
    covered = 0
    for _ in range(300):
        items = clustered_scores(rng, families, copies=4, shift=shift, noise=noise)
        iv = clustered_auroc(items)
        assert iv.low <= iv.value <= iv.high and iv.value == pytest.approx(auroc(items))
        covered += iv.low <= truth <= iv.high
    assert 0.90 <= covered / 300 <= 0.99


def test_auroc_interval_counts_families_not_copies():
    rng = np.random.default_rng(1)
    items = clustered_scores(rng, 12, copies=6, shift=0.5)
    as_pairs = [Judged(it.pair_id, it.cwe, it.vulnerable, it.verdict, it.score) for it in items]
    clustered, naive = clustered_auroc(items), clustered_auroc(as_pairs)
    assert clustered.value == naive.value
    assert clustered.high - clustered.low > 1.8 * (naive.high - naive.low)
    assert summarise(items, n_boot=10).auroc == clustered


def test_sign_flip_test_is_exact_mcnemar_for_single_items_and_counts_a_family_once():
    for b, c in ((1, 9), (0, 5), (3, 3), (2, 7)):
        expected = mcnemar_exact([True] * b + [False] * c, [False] * b + [True] * c).p_value
        assert sign_flip_p_value([-1] * b + [1] * c) == pytest.approx(expected)
    assert sign_flip_p_value([0, 0]) == 1.0
    # 8 items that flip as one family of copies are one coin, not eight.
    assert sign_flip_p_value([8]) == 1.0
    base = [Judged(f"p{i}", "CWE-89", i % 2 == 0, "vulnerable", family="one") for i in range(16)]
    steer = [
        Judged(it.pair_id, it.cwe, it.vulnerable, "vulnerable" if it.vulnerable else "not_vulnerable", family="one")
        for it in base
    ]
    assert mcnemar_items(base, steer).c == 8 and mcnemar_items(base, steer).p_value == 1.0
    singles = [Judged(it.pair_id, it.cwe, it.vulnerable, it.verdict) for it in base]
    singles_steer = [Judged(it.pair_id, it.cwe, it.vulnerable, it.verdict) for it in steer]
    assert mcnemar_items(singles, singles_steer).p_value == pytest.approx(2 / 256)


def test_clustered_proportion_is_wilson_for_independent_units_and_wider_for_copies():
    independent = clustered_proportion([True] * 8 + [False] * 2, [str(i) for i in range(10)])
    plain = wilson_interval(8, 10)
    assert (independent.value, independent.low, independent.high) == pytest.approx((0.8, plain.low, plain.high))
    copies = clustered_proportion([True] * 40 + [False] * 10, [str(i // 5) for i in range(50)])
    plain = wilson_interval(40, 50)
    assert copies.value == plain.value == 0.8
    assert copies.high - copies.low > 1.8 * (plain.high - plain.low)
    once = wilson_interval(8, 10)  # 10 clusters of 5 identical copies count as 10 units
    assert (copies.low, copies.high) == pytest.approx((once.low, once.high))


def _pairs(scores: list[tuple[float, float]], shift: float = 0.0) -> list[Judged]:
    """One pair per (vulnerable score, patched score); the verdict is the score's sign."""
    items = []
    for k, (v, p) in enumerate(scores):
        for vulnerable, score in ((True, v + shift), (False, p + shift)):
            items.append(Judged(f"p{k}", "CWE-1", vulnerable, "vulnerable" if score > 0 else "not_vulnerable", score))
    return items


def test_pair_ordering_counts_pairs_whose_vulnerable_file_scores_higher_ties_half():
    s = summarise(_pairs([(2.0, 1.0), (0.5, 3.0), (1.0, 1.0), (4.0, -1.0)]), n_boot=50)
    assert s.pair_ordering.value == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert s.pair_ordering.low <= s.pair_ordering.value <= s.pair_ordering.high
    assert s.yes_rate.value == pytest.approx(7 / 8)  # every score but -1 is above 0


def test_a_shift_of_every_score_moves_the_yes_rate_not_pair_ordering():
    scores = [(2.0, 1.0), (0.5, 3.0), (1.5, 1.0), (4.0, -1.0)]
    before, after = summarise(_pairs(scores), n_boot=50), summarise(_pairs(scores, shift=-2.5), n_boot=50)
    assert before.pair_ordering.value == after.pair_ordering.value == 0.75
    assert before.yes_rate.value == 7 / 8 and after.yes_rate.value == 2 / 8
    always_yes = summarise(_pairs([(1.0, 1.0)] * 4), n_boot=50)  # calls everything vulnerable, same score
    assert always_yes.yes_rate.value == 1.0 and always_yes.pair_ordering.value == 0.5
    unscored = [Judged(f"p{k}", "CWE-1", v, "vulnerable") for k in range(2) for v in (True, False)]
    assert summarise(unscored, n_boot=50).pair_ordering is None
