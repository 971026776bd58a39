"""The analysis of a sweep: every number its report shows, computed from the store with no rendering. Arms are
configs with all their rows; the headline's selected arm is chosen by nested selection on selection rows."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from vulnsteer.data import Sample, augmentation_group, augmentation_id
from vulnsteer.errors import VulnsteerError
from vulnsteer.experiments.store import read_sweep
from vulnsteer.experiments.summary import judged
from vulnsteer.experiments.sweep import (
    BASELINE,
    PROMPT_ARM,
    SweepConfig,
    candidate_points,
    is_grid_config,
    path_controls,
    transfer_point,
)
from vulnsteer.metrics import (
    Interval,
    Judged,
    bootstrap_gain,
    clustered_proportion,
    clustered_ratio,
    mcnemar_items,
    summarise,
)
from vulnsteer.records import Result, VectorChoice

N_BOOT = 1000


@dataclass(frozen=True)
class ConfigStats:
    config: str
    value: float  # the selection metric
    gain: Interval
    b: int  # baseline right, steered wrong
    c: int  # baseline wrong, steered right
    p_value: float
    auroc: float  # score mode: threshold-free, so it moves when verdicts at the 0 threshold do not


@dataclass
class Analysis:
    """Everything the report shows, computed from the store."""

    meta: dict
    config: SweepConfig
    sample_ids: list[str]
    arms: dict[str, list[Result]]  # config id -> results aligned with sample_ids (complete configs only)
    folds: dict[str, int]
    stats: list[ConfigStats]
    selected: list[Result]
    selected_by_fold: dict[int, str]
    # outer fold -> config -> sample id -> the selection row (vectors fitted without the outer fold and the row's)
    selection: dict[int, dict[str, dict[str, Result]]]
    others: dict[str, list[Result]] = field(default_factory=dict)  # arms beside the grid's (candidate prompts)


def metric_value(items: Sequence[Judged], metric: str) -> float:
    value = getattr(summarise(items, n_boot=1), metric)
    return float("nan") if value is None else value.value


def analyse(out_dir: Path) -> Analysis:
    stored = read_sweep(out_dir)
    meta = stored.meta
    if "config" not in meta:
        raise VulnsteerError(f"{out_dir} has no sweep configuration")
    config = SweepConfig.from_dict(meta["config"])
    by_config: dict[str, dict[str, Result]] = {}
    folds: dict[str, int] = {}
    for config_id, fold, result in stored.rows:
        by_config.setdefault(config_id, {})[result.sample_id] = result
        folds[result.sample_id] = fold
    if BASELINE not in by_config:
        raise VulnsteerError(f"{out_dir} has no baseline rows yet; resume the sweep first")
    sample_ids = sorted(by_config[BASELINE])
    complete = {c: [rows_[s] for s in sample_ids] for c, rows_ in by_config.items() if set(rows_) >= set(sample_ids)}
    arms = {c: rows_ for c, rows_ in complete.items() if is_grid_config(c)}
    selection: dict[int, dict[str, dict[str, Result]]] = {}
    for outer, config_id, result in stored.selection:
        selection.setdefault(outer, {}).setdefault(config_id, {})[result.sample_id] = result
    base = judged(arms[BASELINE])
    metric = config.select_metric
    stats = []
    for config_id in arms:
        if config_id == BASELINE:
            continue
        steered = judged(arms[config_id])
        test = mcnemar_items(base, steered)
        gain = bootstrap_gain(base, steered, metric, n_boot=N_BOOT, seed=0)
        stats.append(
            ConfigStats(
                config_id,
                metric_value(steered, metric),
                gain,
                test.b,
                test.c,
                test.p_value,
                metric_value(steered, "auroc"),
            )
        )
    selected, selected_by_fold = nested_selection(arms, sample_ids, folds, config, selection)
    return Analysis(
        meta,
        config,
        sample_ids,
        arms,
        folds,
        sorted(stats, key=lambda s: -s.gain.value),
        selected,
        selected_by_fold,
        selection,
        {c: rows_ for c, rows_ in complete.items() if c not in arms},
    )


def _is_candidate(config_id: str, config: SweepConfig) -> bool:
    return config_id == BASELINE or config_id in candidate_points(config)


def control_of(config_id: str, config: SweepConfig) -> list[str]:
    """The random-direction controls (one per draw) at the same method, layers, positions and strength."""
    if config_id == BASELINE:
        return [BASELINE] * config.random_draws
    point = candidate_points(config)[config_id]
    return [replace(point, vectors=VectorChoice("random", draw=k)).id for k in range(config.random_draws)]


SCORE_RESOLUTION = 1e-4  # log-odds closer than this are one value to a threshold: float noise never decides it


def best_threshold(scores: np.ndarray, vulnerable: np.ndarray) -> float:
    """The score threshold with the highest balanced accuracy (0 if one class). Candidates are the midpoints
    between the distinct scores at SCORE_RESOLUTION and one unit beyond either end; a tie is broken exactly, by the
    middle of the first run of best candidates (so two runs whose scores differ by float noise, as a resumed one may,
    fit one threshold; scores that separate nothing give their own middle)."""
    if vulnerable.all() or not vulnerable.any():
        return 0.0
    values = np.unique(np.round(scores / SCORE_RESOLUTION) * SCORE_RESOLUTION)
    candidates = np.concatenate([[values[0] - 1.0], (values[1:] + values[:-1]) / 2, [values[-1] + 1.0]])
    predicted = scores[None, :] > candidates[:, None]
    balanced = (predicted[:, vulnerable].mean(1) + (~predicted[:, ~vulnerable]).mean(1)) / 2
    best = np.flatnonzero(balanced == balanced.max())
    last = best[0]
    while last + 1 < len(candidates) and balanced[last + 1] == balanced.max():
        last += 1
    return float((candidates[best[0]] + candidates[last]) / 2)


def fold_thresholded(arm: list[Result], folds: dict[str, int], fitted_on=None) -> list[Judged]:
    """Score-mode verdicts at a threshold fitted for each fold f on `fitted_on(f)` (default: the other folds' rows
    of the same arm), never on fold f's own rows."""
    if fitted_on is None:
        fitted_on = lambda f: [r for r in arm if folds[r.sample_id] != f]  # noqa: E731
    thresholds = {}
    for f in sorted({folds[r.sample_id] for r in arm}):
        rows = fitted_on(f)
        if any(folds[r.sample_id] == f for r in rows):  # an error, not an assert: `python -O` keeps it
            raise VulnsteerError(f"the threshold for fold {f} would be fitted on that fold's own rows")
        thresholds[f] = best_threshold(
            np.array([r.score for r in rows], dtype=float), np.array([r.label == "vulnerable" for r in rows])
        )
    return [
        Judged(
            r.pair_id,
            r.cwe,
            r.is_vulnerable,
            "vulnerable" if float(r.score) > thresholds[folds[r.sample_id]] else "not_vulnerable",  # type: ignore[arg-type]
            r.score,
            r.family,
        )
        for r in arm
    ]


def selection_rows(
    arms: dict[str, list[Result]],
    sample_ids: list[str],
    folds: dict[str, int],
    config: SweepConfig,
    selection,
    fold: int,
    config_id: str,
) -> list[Result] | None:
    """The rows that choosing for `fold` may look at: every other fold's items under `config_id`, steered by
    vectors that never saw `fold` (the selection rows; with `train_dataset`, the test rows, whose vectors saw no
    test item; the baseline has no vectors). None while they are incomplete."""
    others = [i for i, s in enumerate(sample_ids) if folds[s] != fold]
    if config_id == BASELINE or config.train_dataset:
        chosen = [arms[config_id][i] for i in others] if config_id in arms else None
    else:
        by_sample = selection.get(fold, {}).get(config_id, {})
        chosen = [by_sample[sample_ids[i]] for i in others] if all(sample_ids[i] in by_sample for i in others) else None
    if chosen is not None:
        _check_selection_rows(chosen, folds, fold, config_id)
    return chosen


def _check_selection_rows(rows: list[Result], folds: dict[str, int], fold: int, config_id: str) -> None:
    """The guarantee of nested selection, checked on the rows it reads: none is an item of the fold being chosen
    for, and each steered one was planned for that fold's choice (its outer fold), or is a test row whose vectors
    never saw a test item (`train_dataset`)."""
    for row in rows:
        if folds[row.sample_id] == fold:
            raise VulnsteerError(
                f"choosing a config for fold {fold} would read its own test row {row.sample_id}: "
                "refusing a selection that is not nested"
            )
        outer = row.steering.outer if row.steering else None
        if outer is not None and outer != fold:
            raise VulnsteerError(
                f"choosing a config for fold {fold} would read a selection row planned for fold "
                f"{outer} ({config_id}, {row.sample_id}): its vectors may have seen fold {fold}"
            )


def nested_selection(
    arms: dict[str, list[Result]], sample_ids: list[str], folds: dict[str, int], config: SweepConfig, selection
) -> tuple[list[Result], dict[int, str]]:
    """For each fold, pick the config (baseline included) with the best metric on its selection rows, and take its
    test rows on this fold. Ties go to the baseline, then to the weaker strength."""
    points = candidate_points(config)
    candidates = sorted(
        c for c in {*arms, *(c for by_config in selection.values() for c in by_config)} if c == BASELINE or c in points
    )
    chosen: dict[int, str] = {}
    for fold in sorted(set(folds[s] for s in sample_ids)):

        def rank(config_id: str, fold: int = fold):
            rows = selection_rows(arms, sample_ids, folds, config, selection, fold, config_id)
            value = float("nan") if rows is None else metric_value(judged(rows), config.select_metric)
            strength = 0.0 if config_id == BASELINE else abs(points[config_id].strength)
            return (-(value if value == value else -1.0), config_id != BASELINE, strength, config_id)

        chosen[fold] = min((c for c in candidates if c in arms), key=rank)
    return [arms[chosen[folds[s]]][i] for i, s in enumerate(sample_ids)], chosen


@dataclass
class MethodArm:
    """A method's arm: its rows (aligned with the analysis' sample ids) and per fold the config chosen for them."""

    rows: list[Result]
    chosen: dict[int, str]


def method_arms(a: Analysis) -> dict[str, MethodArm]:
    """Per method of the sweep, the arm nested selection gives when it may choose only that method's configs (or
    the baseline): the methods side by side under one protocol."""
    out = {}
    points = candidate_points(a.config)
    for method in a.config.fits:

        def own(config_id: str, method: str = method) -> bool:
            return config_id == BASELINE or config_id in points and points[config_id].method == method

        arms = {c: rows for c, rows in a.arms.items() if own(c)}
        selection = {f: {c: rows for c, rows in by_config.items() if own(c)} for f, by_config in a.selection.items()}
        out[method] = MethodArm(*nested_selection(arms, a.sample_ids, a.folds, a.config, selection))
    return out


def arm_side_effect(a: Analysis, effects: dict, chosen: dict[int, str]) -> Interval | None:
    """The side effect (mean KL per token on plain code, `side_effects.json`) of an arm that steers each fold's
    items with the config chosen for that fold: each item's KL under its fold's config (0 under the baseline),
    pooled over items with a family bootstrap. None when a chosen config's side effects were not measured."""
    measured = {e["config"]: e["per_item"] for e in effects.get("configs", []) if e.get("per_item", {}).get("kl")}
    sample_ids = effects.get("sample_ids")
    steered = {c for c in chosen.values() if c != BASELINE}
    if not steered:
        return Interval(0.0, 0.0, 0.0)  # the prompt alone in every fold
    if sample_ids is None or not steered <= set(measured):
        return None
    family = {r.sample_id: r.family for r in a.arms[BASELINE]}
    tokens = measured[min(steered)]["tokens"]
    kl = [
        0.0 if chosen[a.folds[s]] == BASELINE else measured[chosen[a.folds[s]]]["kl"][k]
        for k, s in enumerate(sample_ids)
    ]
    return clustered_ratio(kl, tokens, [family[s] for s in sample_ids])


@dataclass
class PromptChoice:
    """The best-prompt arm: per fold, the prompt chosen and the items it was chosen on (never the fold's own)."""

    rows: list[Result]  # aligned with the analysis' sample_ids
    chosen: dict[int, str]
    chosen_on: dict[int, list[str]]
    candidates: list[str]


def best_prompt(a: Analysis) -> PromptChoice | None:
    """Per fold f, the prompt (the sweep's own among them) whose unsteered rows on the other folds' items score best
    in the selection metric, and its rows on fold f: a prompt fitted on training folds only, as a vector is. Ties go
    to the sweep's own prompt. None without candidate prompts."""
    arms = {a.config.prompt: a.arms[BASELINE]}
    arms |= {c.removeprefix(PROMPT_ARM): rows for c, rows in a.others.items() if c.startswith(PROMPT_ARM)}
    if len(arms) < 2:
        return None
    chosen, chosen_on = {}, {}
    for fold in sorted(set(a.folds.values())):
        training = [i for i, s in enumerate(a.sample_ids) if a.folds[s] != fold]

        def rank(prompt: str, fold: int = fold, training: list[int] = training):
            rows = [arms[prompt][i] for i in training]
            _check_selection_rows(rows, a.folds, fold, PROMPT_ARM + prompt)  # the guarantee, on the rows read
            value = metric_value(judged(rows), a.config.select_metric)
            return (-(value if value == value else -1.0), prompt != a.config.prompt, prompt)

        chosen[fold] = min(arms, key=rank)
        chosen_on[fold] = [a.sample_ids[i] for i in training]
    rows = [arms[chosen[a.folds[s]]][i] for i, s in enumerate(a.sample_ids)]
    return PromptChoice(rows, chosen, chosen_on, sorted(arms))


def selected_thresholded(a: Analysis) -> list[Judged]:
    """The selected arm judged at thresholds fitted, for each fold, on the selection rows of the config chosen
    for that fold: neither the threshold nor the vectors behind it saw the fold."""

    def fitted_on(fold: int) -> list[Result]:
        rows = selection_rows(a.arms, a.sample_ids, a.folds, a.config, a.selection, fold, a.selected_by_fold[fold])
        if rows is None:
            raise VulnsteerError(f"fold {fold}'s chosen config {a.selected_by_fold[fold]} lacks selection rows")
        return rows

    return fold_thresholded(a.selected, a.folds, fitted_on)


def control_arms(a: Analysis) -> list[list[Result]]:
    """Per random draw, each fold's selected config replaced by that draw's random-direction control ([] without
    controls)."""
    arms = []
    for k in range(a.config.random_draws):
        controls = {fold: control_of(c, a.config)[k] for fold, c in a.selected_by_fold.items()}
        if not all(c in a.arms for c in controls.values()):
            return []
        arms.append([a.arms[controls[a.folds[s]]][i] for i, s in enumerate(a.sample_ids)])
    return arms


def path_check(a: Analysis) -> list[list[str]]:
    """Strength-0 rows on each other numeric path against the baseline: how much the path alone moves scores and
    verdicts (nothing, in float32)."""
    rows = []
    for point in path_controls(a.config):
        arm = a.arms.get(point.id)
        if arm is None:
            continue
        differ = sum(r.verdict != b.verdict for r, b in zip(arm, a.arms[BASELINE]))
        scores = [
            abs(r.score - b.score) for r, b in zip(arm, a.arms[BASELINE]) if r.score is not None and b.score is not None
        ]
        rows.append([point.positions, f"{max(scores):.3g}" if scores else "–", f"{differ} of {len(arm)}"])
    return rows


def transfer_matrix(a: Analysis) -> tuple[list[str], dict[tuple[str, str], Interval], str] | None:
    """Gain in accuracy on CWE j's items when CWE i's vector steers them (the diagonal: each CWE's own vector),
    with a 95% family-bootstrap interval, at the sweep's transfer point."""
    if not a.config.transfer:
        return None
    at = transfer_point(a.config)
    base = a.arms[BASELINE]
    cwes = sorted({r.cwe for r in base})
    cells = {}
    for vector in cwes:
        arm = a.arms.get(replace(at, vectors=VectorChoice("cwe", vector)).id)
        for target in cwes:
            if arm is not None:
                index = [k for k, r in enumerate(base) if r.cwe == target]
                cells[(vector, target)] = bootstrap_gain(
                    judged([base[k] for k in index]), judged([arm[k] for k in index]), "accuracy", n_boot=N_BOOT
                )
    return cwes, cells, f"{at.method}, layers {at.layers}, positions {at.positions}, strength {at.strength:+g}"


def flip_rates(a: Analysis) -> dict[str, dict[str, Interval | int]] | None:
    """Share of augmented files whose verdict differs from their reference (trivial: the hand-crafted original;
    non-trivial: the `_0` version), baseline vs the selected configs, with intervals clustered by family. None
    without augmented data."""

    def sample_of(r: Result) -> Sample:
        return Sample(
            r.sample_id, r.cwe, "vulnerable" if r.is_vulnerable else "patched", "", "", r.pair_id, r.split, r.source
        )

    out: dict[str, dict[str, Interval | int]] = {}
    for name, arm in (("baseline", a.arms[BASELINE]), ("selected", a.selected)):
        groups: dict[str, list[Result]] = {}
        for r in arm:
            key = augmentation_group(sample_of(r))
            if key:
                groups.setdefault(key, []).append(r)
        for kind in ("trivial", "non-trivial"):
            flips: list[tuple[bool, str]] = []  # (flipped, family)
            for members in groups.values():
                ids = {augmentation_id(sample_of(r)): r for r in members}
                if kind == "trivial" and None in ids:
                    flips += [(r.verdict != ids[None].verdict, r.family) for k, r in ids.items() if k and "_" not in k]
                if kind == "non-trivial":
                    flips += [
                        (ids[k].verdict != ids[k[:-2] + "_0"].verdict, ids[k].family)
                        for k in ids
                        if k and k.endswith("_1") and k[:-2] + "_0" in ids
                    ]
            if flips:
                out.setdefault(kind, {})[name] = clustered_proportion([f for f, _ in flips], [c for _, c in flips])
                out[kind]["n"] = len(flips)
    return out or None


def examples(a: Analysis, k: int = 6) -> list[list[str]]:
    """Items where the verdict changed first, then others; answer text in generate mode, score in score mode."""
    pairs = list(zip(a.arms[BASELINE], a.selected))
    pairs.sort(key=lambda p: p[0].verdict == p[1].verdict)

    def show(r: Result) -> str:
        return f"{r.verdict} (score {r.score:+.2f})" if r.score is not None else f"{r.verdict}: {r.response[:300]}"

    return [[b.sample_id, b.label, show(b), show(s)] for b, s in pairs[:k]]


def answer_costs(a: Analysis) -> list[tuple[str, float, Interval]]:
    """Generate mode, per arm (baseline, selected): mean new tokens, and the share of answers the verdict parser
    cannot read, with an interval clustered by family."""
    return [
        (
            name,
            float(np.mean([r.new_tokens for r in arm])),
            clustered_proportion([r.verdict == "unknown" for r in arm], [r.family for r in arm]),
        )
        for name, arm in (("baseline", a.arms[BASELINE]), ("selected", a.selected))
    ]
