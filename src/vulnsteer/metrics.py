"""Detection metrics with 95% intervals on paired vulnerable/patched data.

Every function here is pure: no I/O and no global state.  Randomness (the
bootstrap) comes only from a ``seed`` argument, which may be an ``int`` (fully
reproducible) or a ``numpy.random.Generator`` (whose state is advanced).

Conventions
-----------
* An item is *correct* when its verdict matches its ground truth; an
  ``"unknown"`` verdict is always wrong.
* A *pair* is a ``pair_id`` with at least one vulnerable and at least one
  patched member.
* Every interval and test treats an item's *cluster* as the unit of
  independent evidence: its ``family`` (a pair plus the augmented copies of its
  scenario, which are near-duplicates), or its ``pair_id`` when it has none.
  - Proportions (accuracy, answer rate, answered accuracy, pair accuracy):
    Wilson intervals at the effective sample size n / deff, with the design
    effect deff from the cluster-robust variance, never below 1 (Korn and
    Graubard 1998); with one item per cluster they are plain Wilson intervals.
  - Balanced accuracy and the gains of proportions: percentile intervals of a
    bootstrap that resamples clusters with all their members (replicates where
    the statistic is undefined are dropped).
  - AUROC and its gains: Obuchowski's (1997) nonparametric clustered AUROC
    variance, a normal interval; a cluster bootstrap would count a family's own
    comparisons w^2 times when the family is drawn w times, and shift the
    interval.
  - Paired tests (:func:`mcnemar_items`): an exact sign-flip test of the
    per-cluster differences, which is the exact McNemar test when every
    cluster holds at most one discordant item.
* A metric that is undefined on the data (no answered items, a class missing,
  no pairs, no scores) is ``None`` in a :class:`Summary`, and ``bootstrap_gain``
  raises :class:`MetricsError` for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import binomtest, norm
from sklearn.metrics import roc_auc_score

from vulnsteer.errors import VulnsteerError
from vulnsteer.records import VERDICTS

GainMetric = Literal["balanced_accuracy", "accuracy", "pair_accuracy", "auroc"]
GAIN_METRICS = ("balanced_accuracy", "accuracy", "pair_accuracy", "auroc")


class MetricsError(VulnsteerError, ValueError):
    """Invalid input to a metric (empty, misaligned, bad verdict, undefined metric)."""


@dataclass(frozen=True)
class Judged:
    """One model verdict on one code sample, with its ground truth."""

    pair_id: str
    cwe: str
    vulnerable: bool  # ground truth
    verdict: str  # "vulnerable" | "not_vulnerable" | "unknown"
    score: float | None = None  # higher = more vulnerable; score mode only
    family: str | None = None  # bootstrap cluster holding the pair (e.g. with its augmented copies); None: the pair

    @property
    def cluster(self) -> str:
        return self.family or self.pair_id

    @property
    def answered(self) -> bool:
        return self.verdict != "unknown"

    @property
    def correct(self) -> bool:
        """Verdict matches ground truth; ``"unknown"`` is never correct."""
        if self.verdict == "unknown":
            return False
        return (self.verdict == "vulnerable") == self.vulnerable


@dataclass(frozen=True)
class Interval:
    """A point estimate with a (two-sided) confidence interval; NaN when undefined."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float | None]:
        return {"value": _json_float(self.value), "low": _json_float(self.low), "high": _json_float(self.high)}

    @classmethod
    def from_dict(cls, values: dict) -> "Interval":
        """Read back `to_dict`, which writes NaN as null."""
        return cls(*(math.nan if values[k] is None else values[k] for k in ("value", "low", "high")))


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test. ``b``: baseline right, steered wrong; ``c``: baseline wrong, steered right."""

    b: int
    c: int
    p_value: float

    def __iter__(self) -> Iterator[float]:  # allows ``b, c, p = mcnemar_exact(...)``
        return iter((self.b, self.c, self.p_value))

    def to_dict(self) -> dict[str, float | int | None]:
        return {"b": self.b, "c": self.c, "p_value": _json_float(self.p_value)}


@dataclass(frozen=True)
class Summary:
    """Counts and metrics for one set of judged items. Undefined metrics are ``None``.

    * ``accuracy``: correct / n (unknown = wrong), Wilson.
    * ``answered_accuracy``: correct / answered (SecLLMHolmes definition), Wilson;
      ``None`` when nothing was answered.
    * ``answer_rate``: answered / n, Wilson.
    * ``balanced_accuracy``: mean of recall on vulnerable and on patched items
      (unknown = wrong), pair bootstrap; ``None`` when either class is missing.
    * ``pair_accuracy``: share of pairs (``n_pairs``) with every member correct,
      Wilson over pairs; ``None`` when there are no pairs.
    * ``auroc``: ROC AUC of ``score`` vs ground truth over the ``n_scored`` items
      that have a score, pair bootstrap; ``None`` without scores or with one class.
    * ``pair_ordering``: share of pairs whose vulnerable file scores higher than its patched twin (ties count
      1/2), Wilson at the family-clustered effective size; ``None`` without scored pairs. What discrimination a
      config buys, whatever the threshold: a shift of every score moves ``yes_rate``, not this.
    * ``yes_rate``: share of items answered "vulnerable", family-clustered Wilson.
    """

    n: int
    n_pairs: int
    n_vulnerable: int
    n_patched: int
    n_unknown: int
    n_scored: int
    accuracy: Interval
    answered_accuracy: Interval | None
    answer_rate: Interval
    balanced_accuracy: Interval | None
    pair_accuracy: Interval | None
    auroc: Interval | None
    pair_ordering: Interval | None = None
    yes_rate: Interval | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe dict (NaN becomes ``None``)."""
        out: dict[str, object] = {}
        for name in ("n", "n_pairs", "n_vulnerable", "n_patched", "n_unknown", "n_scored"):
            out[name] = getattr(self, name)
        for name in (
            "accuracy",
            "answered_accuracy",
            "answer_rate",
            "balanced_accuracy",
            "pair_accuracy",
            "auroc",
            "pair_ordering",
            "yes_rate",
        ):
            iv = getattr(self, name)
            out[name] = None if iv is None else iv.to_dict()
        return out


# ---------------------------------------------------------------------------
# helpers


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _validate(items: Sequence[Judged]) -> list[Judged]:
    items = list(items)
    if not items:
        raise MetricsError("no judged items: cannot compute metrics on empty input")
    for it in items:
        if it.verdict not in VERDICTS:
            raise MetricsError(f"invalid verdict {it.verdict!r} for pair {it.pair_id!r}; expected one of {VERDICTS}")
        if it.score is not None and not math.isfinite(float(it.score)):
            raise MetricsError(f"non-finite score {it.score!r} for pair {it.pair_id!r}")
    family_of: dict[str, str] = {}
    for it in items:
        if family_of.setdefault(it.pair_id, it.cluster) != it.cluster:
            raise MetricsError(
                f"pair {it.pair_id!r} is split across families {family_of[it.pair_id]!r} and {it.cluster!r}"
            )
    return items


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise MetricsError(f"confidence must be in (0, 1), got {confidence}")


def _check_n_boot(n_boot: int) -> None:
    if n_boot < 1:
        raise MetricsError(f"n_boot must be >= 1, got {n_boot}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Proportion ``successes / n`` with a Wilson score interval (NaN interval when ``n == 0``)."""
    _check_confidence(confidence)
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise MetricsError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    return _wilson(successes / n, n, confidence)


def _wilson(p: float, n_effective: float, confidence: float) -> Interval:
    """The Wilson score interval of proportion `p` as if from `n_effective` independent trials."""
    z = float(norm.ppf(0.5 + confidence / 2))
    denominator = 1 + z * z / n_effective
    centre = (p + z * z / (2 * n_effective)) / denominator
    half = z * math.sqrt(p * (1 - p) / n_effective + z * z / (4 * n_effective**2)) / denominator
    return Interval(p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))  # p inside despite rounding


def clustered_proportion(
    success: Sequence[bool] | np.ndarray, clusters: Sequence | np.ndarray, confidence: float = 0.95
) -> Interval:
    """A proportion over units grouped in clusters, with a Wilson interval at the effective sample size.

    The design effect is the cluster-robust (sandwich) variance of the ratio estimator over the binomial one,
    floored at 1 so a clustered interval is never narrower than the plain one (Korn and Graubard 1998): with every
    unit its own cluster it is the plain Wilson interval, and k identical copies of each unit count once. NaN
    interval when there are no units."""
    _check_confidence(confidence)
    y = np.asarray(success, dtype=float)
    n = y.size
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    p = float(y.mean())
    _, index = np.unique(np.asarray(clusters), return_inverse=True)
    k = int(index.max()) + 1
    deff = 1.0
    if k > 1 and 0.0 < p < 1.0:
        totals, sizes = np.bincount(index, weights=y), np.bincount(index)
        robust = float(((totals - p * sizes) ** 2).sum()) / n**2
        deff = max(1.0, robust / (p * (1 - p) / n))
    return _wilson(p, n / deff, confidence)


@dataclass(frozen=True)
class _Arrays:
    """Per-item arrays plus the item -> pair and pair -> cluster maps used by the bootstrap."""

    y: np.ndarray  # bool, ground truth vulnerable
    correct: np.ndarray  # bool
    answered: np.ndarray  # bool
    score: np.ndarray  # float, NaN where missing
    cluster: np.ndarray  # int index into cluster ids
    n_clusters: int
    pair: np.ndarray  # per item: int index into pair ids
    pair_cluster: np.ndarray  # per pair: its cluster
    is_pair: np.ndarray  # per pair: has both classes


def _arrays(items: list[Judged], cluster_ids: list[str] | None = None) -> _Arrays:
    if cluster_ids is None:
        cluster_ids = list(dict.fromkeys(it.cluster for it in items))
    index = {c: i for i, c in enumerate(cluster_ids)}
    pair_index = {p: i for i, p in enumerate(dict.fromkeys(it.pair_id for it in items))}
    y = np.array([it.vulnerable for it in items], dtype=bool)
    cluster = np.array([index[it.cluster] for it in items], dtype=np.int64)
    pair = np.array([pair_index[it.pair_id] for it in items], dtype=np.int64)
    pair_cluster = np.zeros(len(pair_index), dtype=np.int64)
    pair_cluster[pair] = cluster  # one cluster per pair (checked by _validate)
    has_vuln = np.bincount(pair, weights=y, minlength=len(pair_index)) > 0
    has_patched = np.bincount(pair, weights=~y, minlength=len(pair_index)) > 0
    return _Arrays(
        y=y,
        correct=np.array([it.correct for it in items], dtype=bool),
        answered=np.array([it.answered for it in items], dtype=bool),
        score=np.array([math.nan if it.score is None else float(it.score) for it in items], dtype=float),
        cluster=cluster,
        n_clusters=len(cluster_ids),
        pair=pair,
        pair_cluster=pair_cluster,
        is_pair=has_vuln & has_patched,
    )


def _cluster_sum(a: _Arrays, values: np.ndarray) -> np.ndarray:
    return np.bincount(a.cluster, weights=values.astype(float), minlength=a.n_clusters)


def _cluster_weights(n_clusters: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_clusters) multiplicities of each cluster in each resample."""
    return rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot).astype(float)


def _safe_div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(den) > 0, np.asarray(num, dtype=float) / np.asarray(den, dtype=float), np.nan)


# Each statistic takes cluster weights W (shape (B, K); a row of ones = the
# observed data) and returns one value per row, NaN where undefined.


def _stat_accuracy(a: _Arrays, W: np.ndarray) -> np.ndarray:
    return _safe_div(W @ _cluster_sum(a, a.correct), W @ _cluster_sum(a, np.ones_like(a.y)))


def _stat_balanced_accuracy(a: _Arrays, W: np.ndarray) -> np.ndarray:
    tpr = _safe_div(W @ _cluster_sum(a, a.correct & a.y), W @ _cluster_sum(a, a.y))
    tnr = _safe_div(W @ _cluster_sum(a, a.correct & ~a.y), W @ _cluster_sum(a, ~a.y))
    return (tpr + tnr) / 2.0


def _pairs_right(a: _Arrays) -> np.ndarray:
    """Per pair: a real pair (both classes) with every member right."""
    wrong = np.bincount(a.pair, weights=(~a.correct).astype(float), minlength=a.is_pair.size)
    return (wrong == 0) & a.is_pair


def _pair_order(a: _Arrays) -> np.ndarray:
    """Per pair: 1 when its vulnerable side's (mean) score is above its patched side's, 1/2 on a tie, 0 below;
    NaN for a pair without a score on both sides."""
    scored = ~np.isnan(a.score)
    size = a.is_pair.size

    def side_mean(side: np.ndarray) -> np.ndarray:
        keep = scored & side
        total = np.bincount(a.pair[keep], weights=a.score[keep], minlength=size)
        count = np.bincount(a.pair[keep], minlength=size)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    vulnerable, patched = side_mean(a.y), side_mean(~a.y)
    order = np.where(vulnerable > patched, 1.0, np.where(vulnerable == patched, 0.5, 0.0))
    return np.where(np.isnan(vulnerable) | np.isnan(patched), np.nan, order)


def _stat_pair_accuracy(a: _Arrays, W: np.ndarray) -> np.ndarray:
    weights = W[:, a.pair_cluster]  # a pair counts as often as its cluster is drawn
    return _safe_div(weights @ _pairs_right(a).astype(float), weights @ a.is_pair.astype(float))


def _auroc_components(a: _Arrays) -> tuple[float, np.ndarray] | None:
    """Obuchowski's clustered AUROC: the Mann-Whitney estimate over all (vulnerable, patched) comparisons (ties
    count 1/2), and per cluster its centred structural component, whose spread gives the variance:
    var = K / (K - 1) * sum_i a_i^2 over the K clusters. None when a class has no scored item."""
    m = ~np.isnan(a.score)
    positive, negative = m & a.y, m & ~a.y
    if not positive.any() or not negative.any():
        return None
    x, y = a.score[positive], a.score[negative]
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    value = float(psi.mean())
    n_pos, n_neg = x.size, y.size
    v10 = np.bincount(a.cluster[positive], weights=psi.mean(1), minlength=a.n_clusters)
    v01 = np.bincount(a.cluster[negative], weights=psi.mean(0), minlength=a.n_clusters)
    pos_count = np.bincount(a.cluster[positive], minlength=a.n_clusters)
    neg_count = np.bincount(a.cluster[negative], minlength=a.n_clusters)
    components = (v10 - pos_count * value) / n_pos + (v01 - neg_count * value) / n_neg
    return value, components[(pos_count + neg_count) > 0]


def _normal_interval(
    value: float, components: np.ndarray, confidence: float, lowest: float = 0.0, highest: float = 1.0
) -> Interval:
    """`value` +- z * sd, the variance K / (K - 1) * sum of squared per-cluster components over the K clusters
    that hold a scored item (`components` lists only those)."""
    k = components.size
    variance = k / (k - 1) * float((components**2).sum()) if k > 1 else 0.0
    half = float(norm.ppf(0.5 + confidence / 2)) * math.sqrt(variance)
    return Interval(value, max(lowest, value - half), min(highest, value + half))


def clustered_auroc(items: Sequence[Judged], confidence: float = 0.95) -> Interval | None:
    """AUROC of ``score`` with Obuchowski's (1997) clustered interval; ``None`` if undefined."""
    _check_confidence(confidence)
    a = _arrays(_validate(items))
    found = _auroc_components(a)
    return None if found is None else _normal_interval(*found, confidence)


_STATS = {
    "accuracy": _stat_accuracy,
    "balanced_accuracy": _stat_balanced_accuracy,
    "pair_accuracy": _stat_pair_accuracy,
}


def _percentiles(reps: np.ndarray, confidence: float) -> tuple[float, float]:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _bootstrap(a: _Arrays, stat: str, W: np.ndarray, confidence: float) -> Interval | None:
    value = float(_STATS[stat](a, np.ones((1, a.n_clusters)))[0])
    if not math.isfinite(value):
        return None
    return Interval(value, *_percentiles(_STATS[stat](a, W), confidence))


# ---------------------------------------------------------------------------
# public API


def auroc(items: Sequence[Judged]) -> float | None:
    """ROC AUC of ``score`` vs ground truth over scored items; ``None`` if undefined."""
    items = _validate(items)
    scored = [it for it in items if it.score is not None]
    y = [it.vulnerable for it in scored]
    if not scored or all(y) or not any(y):
        return None
    return float(roc_auc_score(y, [float(it.score) for it in scored]))  # type: ignore[arg-type]


def summarise(
    items: Sequence[Judged],
    n_boot: int = 2000,
    seed: int | np.random.Generator | None = 0,
    confidence: float = 0.95,
) -> Summary:
    """Counts and all metrics with ``confidence`` intervals; raises :class:`MetricsError` on empty input."""
    items = _validate(items)
    _check_n_boot(n_boot)
    _check_confidence(confidence)
    a = _arrays(items)
    n = len(items)
    n_answered = int(a.answered.sum())
    n_pairs = int(a.is_pair.sum())
    W = _cluster_weights(a.n_clusters, n_boot, _rng(seed))
    answered = a.answered
    pairs = a.is_pair
    found = _auroc_components(a)
    order = _pair_order(a)
    ordered = ~np.isnan(order)
    said_yes = answered & (a.correct == a.y)

    return Summary(
        n=n,
        n_pairs=n_pairs,
        n_vulnerable=int(a.y.sum()),
        n_patched=int((~a.y).sum()),
        n_unknown=n - n_answered,
        n_scored=int((~np.isnan(a.score)).sum()),
        accuracy=clustered_proportion(a.correct, a.cluster, confidence),
        answered_accuracy=clustered_proportion(a.correct[answered], a.cluster[answered], confidence)
        if n_answered
        else None,
        answer_rate=clustered_proportion(answered, a.cluster, confidence),
        balanced_accuracy=_bootstrap(a, "balanced_accuracy", W, confidence),
        pair_accuracy=clustered_proportion(_pairs_right(a)[pairs], a.pair_cluster[pairs], confidence)
        if n_pairs
        else None,
        auroc=None if found is None else _normal_interval(*found, confidence),
        pair_ordering=clustered_proportion(order[ordered], a.pair_cluster[ordered], confidence)
        if ordered.any()
        else None,
        yes_rate=clustered_proportion(said_yes, a.cluster, confidence),
    )


def summarise_by_cwe(
    items: Sequence[Judged],
    n_boot: int = 2000,
    seed: int | np.random.Generator | None = 0,
    confidence: float = 0.95,
) -> dict[str, Summary]:
    """:func:`summarise` per CWE, keys sorted. An ``int`` seed is reused for every CWE."""
    items = _validate(items)
    groups: dict[str, list[Judged]] = {}
    for it in items:
        groups.setdefault(it.cwe, []).append(it)
    return {cwe: summarise(groups[cwe], n_boot=n_boot, seed=seed, confidence=confidence) for cwe in sorted(groups)}


def mcnemar_exact(baseline_correct: Sequence[bool], steered_correct: Sequence[bool]) -> McNemar:
    """Exact two-sided McNemar test on aligned per-item correctness.

    ``b`` = baseline right & steered wrong, ``c`` = baseline wrong & steered right;
    p-value is the exact binomial test of ``b`` out of ``b + c`` at 1/2 (1.0 with
    no discordant items).  The result unpacks as ``b, c, p_value``.
    """
    base = np.asarray(baseline_correct, dtype=bool)
    steer = np.asarray(steered_correct, dtype=bool)
    if base.shape != steer.shape or base.ndim != 1:
        raise MetricsError(f"correctness vectors must be 1-D and the same length, got {base.shape} and {steer.shape}")
    b = int((base & ~steer).sum())
    c = int((~base & steer).sum())
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return McNemar(b, c, min(p, 1.0))


def _check_aligned(baseline: list[Judged], steered: list[Judged]) -> None:
    if len(baseline) != len(steered):
        raise MetricsError(f"baseline has {len(baseline)} items but steered has {len(steered)}")
    for i, (x, y) in enumerate(zip(baseline, steered)):
        if (x.pair_id, x.cluster, x.vulnerable, x.cwe) != (y.pair_id, y.cluster, y.vulnerable, y.cwe):
            raise MetricsError(
                f"item {i} is misaligned: baseline ({x.pair_id!r}, vulnerable={x.vulnerable}, {x.cwe}) vs "
                f"steered ({y.pair_id!r}, vulnerable={y.vulnerable}, {y.cwe})"
            )


def mcnemar_items(baseline_items: Sequence[Judged], steered_items: Sequence[Judged]) -> McNemar:
    """The paired test of two aligned item lists (validated like :func:`bootstrap_gain`), by cluster.

    ``b`` and ``c`` count discordant items as in :func:`mcnemar_exact`. The p-value is the exact two-sided
    sign-flip test of the per-cluster differences (c_k - b_k): under no effect each cluster's difference is as
    likely negated, whatever the correlation inside it. With at most one discordant item per cluster this is the
    exact McNemar test; augmented copies of one scenario that all flip together count as one piece of evidence.
    """
    base, steer = _validate(baseline_items), _validate(steered_items)
    _check_aligned(base, steer)
    a = _arrays(base)
    base_right = np.array([it.correct for it in base])
    steer_right = np.array([it.correct for it in steer])
    b = int((base_right & ~steer_right).sum())
    c = int((~base_right & steer_right).sum())
    differences = np.bincount(a.cluster, weights=steer_right.astype(float) - base_right, minlength=a.n_clusters)
    return McNemar(b, c, sign_flip_p_value(differences.astype(int)))


def sign_flip_p_value(differences: Sequence[int] | np.ndarray) -> float:
    """Exact two-sided p-value of |sum(differences)| when each difference's sign is a fair coin (integers; the
    distribution of the sum is built by convolution, so any number of clusters is exact)."""
    values = np.abs(np.asarray(differences, dtype=np.int64))
    values = values[values > 0]
    if values.size == 0:
        return 1.0
    total = int(values.sum())
    distribution = np.zeros(2 * total + 1)  # index = sum + total
    distribution[total] = 1.0
    for v in values:
        distribution = 0.5 * (np.roll(distribution, v) + np.roll(distribution, -v))
    observed = abs(int(np.sum(differences)))
    sums = np.arange(-total, total + 1)
    return float(min(1.0, distribution[np.abs(sums) >= observed].sum()))


def _auroc_gain(a_base: _Arrays, a_steer: _Arrays, confidence: float) -> Interval:
    """AUROC(steered) - AUROC(baseline) on the same items: the difference of the two arms' per-cluster
    Obuchowski components gives the variance of the difference, correlation between the arms included."""
    base, steer = _auroc_components(a_base), _auroc_components(a_steer)
    if base is None or steer is None:
        raise MetricsError("auroc is undefined on these items (a class is missing)")
    return _normal_interval(steer[0] - base[0], steer[1] - base[1], confidence, -1.0, 1.0)


def bootstrap_gain(
    baseline_items: Sequence[Judged],
    steered_items: Sequence[Judged],
    metric: GainMetric | str = "balanced_accuracy",
    n_boot: int = 2000,
    seed: int | np.random.Generator | None = 0,
    confidence: float = 0.95,
) -> Interval:
    """Gain ``metric(steered) - metric(baseline)`` with a paired, clustered interval.

    The two lists must be aligned item by item (same length, same ``pair_id``,
    family, ground truth and CWE at each position).  Proportions: each bootstrap
    replicate resamples clusters once and applies the same resample to both
    arms.  AUROC: the Obuchowski variance of the difference of the two
    correlated clustered AUROCs (no bootstrap).  Raises :class:`MetricsError`
    when the metric is undefined for either arm.
    """
    if metric not in GAIN_METRICS:
        raise MetricsError(f"unknown metric {metric!r}; expected one of {GAIN_METRICS}")
    _check_n_boot(n_boot)
    _check_confidence(confidence)
    base, steer = _validate(baseline_items), _validate(steered_items)
    _check_aligned(base, steer)
    if metric == "auroc":
        for name, arm in (("baseline", base), ("steered", steer)):
            if any(it.score is None for it in arm):
                raise MetricsError(f"auroc gain needs a score on every item; {name} has items without one")
    a_base = _arrays(base)
    a_steer = _arrays(steer, cluster_ids=list(dict.fromkeys(it.cluster for it in base)))
    if metric == "auroc":
        return _auroc_gain(a_base, a_steer, confidence)
    ones = np.ones((1, a_base.n_clusters))
    stat = _STATS[metric]
    observed_base, observed_steer = float(stat(a_base, ones)[0]), float(stat(a_steer, ones)[0])
    if not (math.isfinite(observed_base) and math.isfinite(observed_steer)):
        raise MetricsError(f"{metric} is undefined on these items (a class or pairs are missing)")
    W = _cluster_weights(a_base.n_clusters, n_boot, _rng(seed))
    reps = stat(a_steer, W) - stat(a_base, W)
    return Interval(observed_steer - observed_base, *_percentiles(reps, confidence))


def clustered_ratio(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    clusters: Sequence | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """sum(numerators) / sum(denominators) (a per-token mean over items of different lengths) with a percentile
    interval from a bootstrap over clusters (families), so that copies of one scenario count once."""
    _check_confidence(confidence)
    _check_n_boot(n_boot)
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if len(num) != len(den) or len(num) != len(clusters):
        raise MetricsError("numerators, denominators and clusters must have one entry per item")
    if not len(num) or den.sum() <= 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    _, index = np.unique(np.asarray(clusters, dtype=str), return_inverse=True)
    n_clusters = int(index.max()) + 1
    by_cluster = (
        np.bincount(index, weights=num, minlength=n_clusters),
        np.bincount(index, weights=den, minlength=n_clusters),
    )
    W = _cluster_weights(n_clusters, n_boot, _rng(seed))
    reps = _safe_div(W @ by_cluster[0], W @ by_cluster[1])
    low, high = _percentiles(reps, confidence)
    return Interval(float(num.sum() / den.sum()), low, high)
