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
* Bootstrap intervals resample *clusters* with replacement: an item's
  ``family`` (a pair plus the augmented copies of its scenario, which are not
  independent evidence), or its ``pair_id`` when it has none, with all of its
  members, so the two halves of a pair never get separated.  Wilson intervals
  (accuracy, answer rate, pair accuracy) count items or pairs as independent.
  Bootstrap intervals are percentile intervals of the replicates; replicates
  where the statistic is undefined (e.g. a resample with no patched item) are
  dropped.
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
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from vulnsteer.errors import VulnsteerError

Verdict = Literal["vulnerable", "not_vulnerable", "unknown"]
GainMetric = Literal["balanced_accuracy", "accuracy", "pair_accuracy", "auroc"]
VERDICTS = ("vulnerable", "not_vulnerable", "unknown")
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

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe dict (NaN becomes ``None``)."""
        out: dict[str, object] = {}
        for name in ("n", "n_pairs", "n_vulnerable", "n_patched", "n_unknown", "n_scored"):
            out[name] = getattr(self, name)
        for name in ("accuracy", "answered_accuracy", "answer_rate", "balanced_accuracy", "pair_accuracy", "auroc"):
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
            raise MetricsError(f"pair {it.pair_id!r} is split across families {family_of[it.pair_id]!r} and "
                               f"{it.cluster!r}")
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
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(successes / n, float(ci.low), float(ci.high))


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


def _stat_pair_accuracy(a: _Arrays, W: np.ndarray) -> np.ndarray:
    weights = W[:, a.pair_cluster]  # a pair counts as often as its cluster is drawn
    return _safe_div(weights @ _pairs_right(a).astype(float), weights @ a.is_pair.astype(float))


def _stat_auroc(a: _Arrays, W: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUROC (ties count 1/2), vectorised over resamples.

    Equals ``sklearn.metrics.roc_auc_score(y, score, sample_weight=w)``; written
    out only so that thousands of bootstrap replicates cost one matrix pass.
    """
    m = ~np.isnan(a.score)
    if not m.any():
        return np.full(W.shape[0], np.nan)
    order = np.argsort(a.score[m], kind="stable")
    score, y, cl = a.score[m][order], a.y[m][order], a.cluster[m][order]
    starts = np.flatnonzero(np.r_[True, score[1:] != score[:-1]])  # ascending tie groups
    out = np.empty(W.shape[0])
    chunk = max(1, 4_000_000 // score.size)  # bound memory at ~4M floats per block
    for lo in range(0, W.shape[0], chunk):
        w = W[lo : lo + chunk][:, cl]  # per-item weights, (b, n_scored)
        P = np.add.reduceat(w * y, starts, axis=1)  # weighted positives per tie group
        N = np.add.reduceat(w * ~y, starts, axis=1)
        n_below = np.cumsum(N, axis=1) - N
        num = (P * (n_below + 0.5 * N)).sum(axis=1)
        out[lo : lo + chunk] = _safe_div(num, P.sum(axis=1) * N.sum(axis=1))
    return out


_STATS = {
    "accuracy": _stat_accuracy,
    "balanced_accuracy": _stat_balanced_accuracy,
    "pair_accuracy": _stat_pair_accuracy,
    "auroc": _stat_auroc,
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
    n_correct = int(a.correct.sum())
    n_answered = int(a.answered.sum())
    n_pairs = int(a.is_pair.sum())
    pairs_right = int(_pairs_right(a).sum())
    W = _cluster_weights(a.n_clusters, n_boot, _rng(seed))

    au = auroc(items)
    auroc_iv = None
    if au is not None:
        boot = _bootstrap(a, "auroc", W, confidence)
        assert boot is not None
        auroc_iv = Interval(au, boot.low, boot.high)  # point estimate straight from sklearn

    return Summary(
        n=n,
        n_pairs=n_pairs,
        n_vulnerable=int(a.y.sum()),
        n_patched=int((~a.y).sum()),
        n_unknown=n - n_answered,
        n_scored=int((~np.isnan(a.score)).sum()),
        accuracy=wilson_interval(n_correct, n, confidence),
        answered_accuracy=wilson_interval(n_correct, n_answered, confidence) if n_answered else None,
        answer_rate=wilson_interval(n_answered, n, confidence),
        balanced_accuracy=_bootstrap(a, "balanced_accuracy", W, confidence),
        pair_accuracy=wilson_interval(pairs_right, n_pairs, confidence) if n_pairs else None,
        auroc=auroc_iv,
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
    """:func:`mcnemar_exact` on two aligned item lists (validated like :func:`bootstrap_gain`)."""
    base, steer = _validate(baseline_items), _validate(steered_items)
    _check_aligned(base, steer)
    return mcnemar_exact([it.correct for it in base], [it.correct for it in steer])


def bootstrap_gain(
    baseline_items: Sequence[Judged],
    steered_items: Sequence[Judged],
    metric: GainMetric = "balanced_accuracy",
    n_boot: int = 2000,
    seed: int | np.random.Generator | None = 0,
    confidence: float = 0.95,
) -> Interval:
    """Gain ``metric(steered) - metric(baseline)`` with a paired pair-bootstrap interval.

    The two lists must be aligned item by item (same length, same ``pair_id``,
    family, ground truth and CWE at each position).  Each replicate resamples
    clusters once and applies the same resample to both arms.  Raises
    :class:`MetricsError` when the metric is undefined for either arm.
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
    ones = np.ones((1, a_base.n_clusters))
    stat = _STATS[metric]
    observed_base, observed_steer = float(stat(a_base, ones)[0]), float(stat(a_steer, ones)[0])
    if not (math.isfinite(observed_base) and math.isfinite(observed_steer)):
        raise MetricsError(f"{metric} is undefined on these items (a class or pairs are missing)")
    W = _cluster_weights(a_base.n_clusters, n_boot, _rng(seed))
    reps = stat(a_steer, W) - stat(a_base, W)
    return Interval(observed_steer - observed_base, *_percentiles(reps, confidence))
