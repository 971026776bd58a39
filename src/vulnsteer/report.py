"""The sweep report: statistics from a sweep's store, written as one self-contained HTML file (plots embedded)
and as Markdown (plots beside it), plus CSV/JSONL exports of every row."""

from __future__ import annotations

import base64
import csv
from collections import Counter
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vulnsteer.data import Sample, augmentation_group, augmentation_id  # noqa: E402
from vulnsteer.errors import VulnsteerError  # noqa: E402
from vulnsteer.evaluation import Result  # noqa: E402
from vulnsteer.metrics import (Interval, Judged, McNemar, bootstrap_gain, clustered_proportion,  # noqa: E402
                               mcnemar_items, summarise, summarise_by_cwe)
from vulnsteer.store import read_sweep  # noqa: E402
from vulnsteer.summary import fmt, judged  # noqa: E402
from vulnsteer.sweep import BASELINE, GridPoint, SweepConfig, is_candidate, path_controls, transfer_point  # noqa: E402

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


def _metric(items: Sequence[Judged], metric: str) -> float:
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
    arms = {c: [rows_[s] for s in sample_ids] for c, rows_ in by_config.items() if set(rows_) >= set(sample_ids)}
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
        stats.append(ConfigStats(config_id, _metric(steered, metric), gain, test.b, test.c, test.p_value,
                                 _metric(steered, "auroc")))
    selected, selected_by_fold = nested_selection(arms, sample_ids, folds, config, selection)
    return Analysis(meta, config, sample_ids, arms, folds, sorted(stats, key=lambda s: -s.gain.value), selected,
                    selected_by_fold, selection)


def _is_candidate(config_id: str, config: SweepConfig) -> bool:
    return config_id == BASELINE or is_candidate(GridPoint.parse(config_id), config)


def control_of(config_id: str, config: SweepConfig) -> list[str]:
    """The random-direction controls (one per draw) at the same method, layers, positions and strength."""
    if config_id == BASELINE:
        return [BASELINE] * config.random_draws
    p = GridPoint.parse(config_id)
    return [GridPoint(p.method, p.layers, f"random:{k}", p.positions, p.strength).id
            for k in range(config.random_draws)]


def best_threshold(scores: np.ndarray, vulnerable: np.ndarray) -> float:
    """The score threshold with the highest balanced accuracy (midpoints between sorted scores; 0 if one class)."""
    if vulnerable.all() or not vulnerable.any():
        return 0.0
    values = np.unique(scores)
    candidates = np.concatenate([[values[0] - 1.0], (values[1:] + values[:-1]) / 2, [values[-1] + 1.0]])
    predicted = scores[None, :] > candidates[:, None]
    balanced = (predicted[:, vulnerable].mean(1) + (~predicted[:, ~vulnerable]).mean(1)) / 2
    return float(candidates[int(np.argmax(balanced))])


def fold_thresholded(arm: list[Result], folds: dict[str, int], fitted_on=None) -> list[Judged]:
    """Score-mode verdicts at a threshold fitted for each fold f on `fitted_on(f)` (default: the other folds' rows
    of the same arm), never on fold f's own rows."""
    if fitted_on is None:
        fitted_on = lambda f: [r for r in arm if folds[r.sample_id] != f]  # noqa: E731
    thresholds = {}
    for f in sorted({folds[r.sample_id] for r in arm}):
        rows = fitted_on(f)
        assert all(folds[r.sample_id] != f for r in rows), "a threshold fitted on its own fold"
        thresholds[f] = best_threshold(np.array([r.score for r in rows], dtype=float),
                                       np.array([r.label == "vulnerable" for r in rows]))
    return [Judged(r.pair_id, r.cwe, r.label == "vulnerable",
                   "vulnerable" if r.score > thresholds[folds[r.sample_id]] else "not_vulnerable", r.score, r.family)
            for r in arm]


def selection_rows(arms: dict[str, list[Result]], sample_ids: list[str], folds: dict[str, int],
                   config: SweepConfig, selection, fold: int, config_id: str) -> list[Result] | None:
    """The rows that choosing for `fold` may look at: every other fold's items under `config_id`, steered by
    vectors that never saw `fold` (the selection rows; with `train_dataset`, the test rows, whose vectors saw no
    test item; the baseline has no vectors). None while they are incomplete."""
    others = [i for i, s in enumerate(sample_ids) if folds[s] != fold]
    if config_id == BASELINE or config.train_dataset:
        return [arms[config_id][i] for i in others] if config_id in arms else None
    rows = selection.get(fold, {}).get(config_id, {})
    if not all(sample_ids[i] in rows for i in others):
        return None
    return [rows[sample_ids[i]] for i in others]


def nested_selection(arms: dict[str, list[Result]], sample_ids: list[str], folds: dict[str, int],
                     config: SweepConfig, selection) -> tuple[list[Result], dict[int, str]]:
    """For each fold, pick the config (baseline included) with the best metric on its selection rows, and take its
    test rows on this fold. Ties go to the baseline, then to the weaker strength."""
    candidates = sorted({c for c in arms if _is_candidate(c, config)}
                        | {c for by_config in selection.values() for c in by_config})
    chosen: dict[int, str] = {}
    for fold in sorted(set(folds[s] for s in sample_ids)):
        def rank(config_id: str):
            rows = selection_rows(arms, sample_ids, folds, config, selection, fold, config_id)
            value = float("nan") if rows is None else _metric(judged(rows), config.select_metric)
            strength = 0.0 if config_id == BASELINE else abs(GridPoint.parse(config_id).strength)
            return (-(value if value == value else -1.0), config_id != BASELINE, strength, config_id)

        chosen[fold] = min((c for c in candidates if c in arms), key=rank)
    return [arms[chosen[folds[s]]][i] for i, s in enumerate(sample_ids)], chosen


def selected_thresholded(a: Analysis) -> list[Judged]:
    """The selected arm judged at thresholds fitted, for each fold, on the selection rows of the config chosen
    for that fold: neither the threshold nor the vectors behind it saw the fold."""
    def fitted_on(fold: int) -> list[Result]:
        return selection_rows(a.arms, a.sample_ids, a.folds, a.config, a.selection, fold, a.selected_by_fold[fold])
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
        scores = [abs(r.score - b.score) for r, b in zip(arm, a.arms[BASELINE])
                  if r.score is not None and b.score is not None]
        rows.append([point.positions, f"{max(scores):.3g}" if scores else "–", f"{differ} of {len(arm)}"])
    return rows


# --- figures -------------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _annotate(ax, grid: np.ndarray, limit: float, size: int) -> None:
    """Each cell's value, in white on the dark ends of the colour scale."""
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=size,
                    color="white" if abs(value) > 0.6 * limit else "black")


def gain_heatmaps(a: Analysis) -> list[tuple[str, bytes]]:
    """Gain in the selection metric over strength x layer set, one panel per method/vectors/positions."""
    by_cell: dict[tuple[str, str, str], dict[tuple[str, float], list[float]]] = {}
    for s in a.stats:
        p = GridPoint.parse(s.config)
        vectors = "random (mean of draws)" if p.is_random else p.vectors
        if (p.is_random or p.vectors in a.config.vectors) and p.strength != 0:  # not transfer rows, path controls
            by_cell.setdefault((p.method, vectors, p.positions), {}).setdefault((p.layers, p.strength), []).append(
                s.gain.value)
    by_panel = {panel: {cell: float(np.mean(v)) for cell, v in cells.items()} for panel, cells in by_cell.items()}
    figures = []
    for (method, vectors, positions), cells in sorted(by_panel.items()):
        layers = [lay for lay in a.config.layers if any(k[0] == lay for k in cells)]
        strengths = sorted({k[1] for k in cells})
        grid = np.array([[cells.get((lay, st), np.nan) for st in strengths] for lay in layers])
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(strengths), 0.9 + 0.5 * len(layers)))
        limit = max(0.05, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 0.05)
        image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(len(strengths)), [f"{s:+g}" for s in strengths])
        ax.set_yticks(range(len(layers)), layers)
        _annotate(ax, grid, limit, 8)
        ax.set_xlabel("strength")
        ax.set_title(f"gain in {a.config.select_metric}: {method}, {vectors} vectors, {positions}", fontsize=9)
        fig.colorbar(image, ax=ax)
        figures.append((f"heatmap-{method}-{vectors.split()[0]}-{positions}", _png(fig)))
    return figures


def per_cwe_bars(a: Analysis) -> bytes:
    """Balanced accuracy per CWE with 95% family-bootstrap intervals, baseline vs the nested-selected configs
    (a CWE without both classes has no bar)."""
    base = summarise_by_cwe(judged(a.arms[BASELINE]), n_boot=N_BOOT)
    chosen = summarise_by_cwe(judged(a.selected), n_boot=N_BOOT)
    cwes = list(base)
    nan = Interval(np.nan, np.nan, np.nan)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(cwes), 3.2))
    for offset, (name, summaries) in zip((-0.2, 0.2), (("baseline", base), ("selected (held-out)", chosen))):
        values = [summaries[c].balanced_accuracy or nan for c in cwes]
        errors = [[iv.value - iv.low for iv in values], [iv.high - iv.value for iv in values]]
        ax.bar(np.arange(len(cwes)) + offset, [iv.value for iv in values], 0.4, yerr=errors, capsize=3, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(cwes)), cwes, rotation=30)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("balanced accuracy")
    ax.legend(fontsize=8)
    return _png(fig)


def probe_plot(probe_rows: list[dict]) -> bytes | None:
    pooled = sorted((r["layer"], r["auroc"], r.get("low"), r.get("high")) for r in probe_rows
                    if r["group"] == "pooled" and r["auroc"] is not None)
    if not pooled:
        return None
    fig, ax = plt.subplots(figsize=(5, 2.8))
    layers, values = [p[0] for p in pooled], [p[1] for p in pooled]
    if all(p[2] is not None for p in pooled):
        ax.fill_between(layers, [p[2] for p in pooled], [p[3] for p in pooled], alpha=0.2, label="95% interval")
    ax.plot(layers, values, marker="o")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("layer")
    ax.set_ylabel("AUROC (cross-validated)")
    ax.set_title("probe: projection onto the pooled direction", fontsize=9)
    return _png(fig)


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
        arm = a.arms.get(GridPoint(at.method, at.layers, vector, at.positions, at.strength).id)
        for target in cwes:
            if arm is not None:
                index = [k for k, r in enumerate(base) if r.cwe == target]
                cells[(vector, target)] = bootstrap_gain(judged([base[k] for k in index]),
                                                         judged([arm[k] for k in index]), "accuracy",
                                                         n_boot=N_BOOT)
    return cwes, cells, f"{at.method}, layers {at.layers}, positions {at.positions}, strength {at.strength:+g}"


def transfer_plot(cwes: list[str], cells: dict[tuple[str, str], Interval], title: str) -> bytes:
    matrix = np.array([[cells[(v, t)].value if (v, t) in cells else np.nan for t in cwes] for v in cwes])
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(cwes), 1.2 + 0.6 * len(cwes)))
    limit = max(0.05, float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 0.05)
    image = ax.imshow(matrix, cmap="RdBu", vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(cwes)), cwes, rotation=45, ha="right")
    ax.set_yticks(range(len(cwes)), cwes)
    ax.set_xlabel("items of CWE")
    ax.set_ylabel("vector of CWE")
    _annotate(ax, matrix, limit, 7)
    ax.set_title(f"accuracy gain; {title}", fontsize=8)
    fig.colorbar(image, ax=ax)
    return _png(fig)


def flip_rates(a: Analysis) -> dict[str, dict[str, Interval | int]] | None:
    """Share of augmented files whose verdict differs from their reference (trivial: the hand-crafted original;
    non-trivial: the `_0` version), baseline vs the selected configs, with intervals clustered by family. None
    without augmented data."""
    def sample_of(r: Result) -> Sample:
        return Sample(r.sample_id, r.cwe, r.label, "", "", r.pair_id, r.split, r.source)

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
                    flips += [(ids[k].verdict != ids[k[:-2] + "_0"].verdict, ids[k].family) for k in ids
                              if k and k.endswith("_1") and k[:-2] + "_0" in ids]
            if flips:
                out.setdefault(kind, {})[name] = clustered_proportion([f for f, _ in flips], [c for _, c in flips])
                out[kind]["n"] = len(flips)
    return out or None


# --- writing -------------------------------------------------------------------------------------------


def protocol_text(a: Analysis) -> str:
    c = a.config
    if c.train_dataset:
        fitted = (f"fitted once on {c.train_dataset} (less its items that share a family or code with a test item) "
                  f"and tested on {c.dataset}")
        chooser = "the other folds' rows (their vectors saw no test item)"
    else:
        fitted = (f"fitted per fold on the other folds' items ({c.folds} folds grouped by pair and scenario, "
                  "stratified by CWE)")
        chooser = ("selection rows: every other fold g's items steered with vectors fitted without this fold and "
                   "g, so neither the choice nor the vectors behind it saw this fold")
    return (f"Steering vectors ({', '.join(c.methods)}, read at {c.read} of the prompt as {c.mode} mode asks it, "
            f"{c.normalisation} normalisation) were {fitted}, so every steered row is held out. Baseline rows use "
            f"the same prompt ({c.prompt}), decoding ({c.mode}, greedy) and items with no steering. The headline "
            f"'selected' arm picks, for each fold, the config (baseline included) with the best {c.select_metric} "
            f"on {chooser}, and reports it on that fold only (nested): it is not a maximum over the test set. "
            "Intervals and tests count families (a pair with the augmented copies of its scenario) as the unit of "
            "evidence: proportions by Wilson intervals at the design-effect sample size, balanced accuracy and "
            "gains by a family bootstrap, AUROC by Obuchowski's clustered variance, paired tests by an exact "
            "sign-flip test of per-family differences (exact McNemar when each family has at most one discordant "
            f"item); 95%. The random-direction control repeats each config with {c.random_draws} random directions "
            "of the same norm. In score mode the verdict is log-odds > 0; the 'threshold fitted' rows judge each "
            "fold at the threshold with the best balanced accuracy on rows that never saw the fold (the baseline's "
            "other folds; for the selected arm, the selection rows of the config chosen for that fold), for "
            "models biased to one answer. The top-configs table is descriptive: picking its first row would be "
            "selection on the test set.")


def _table(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda cell: cell.replace("|", "\\|")  # noqa: E731
    return "\n".join(["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(escape, r)) + " |" for r in rows])


def _comparison(name: str, base: list[Judged], other: list[Judged], metric: str) -> str:
    """One line: the gain with its interval and the paired family-level test."""
    gain = bootstrap_gain(base, other, metric, n_boot=N_BOOT)
    test: McNemar = mcnemar_items(base, other)
    line = (f"{name}: gain in {metric} {fmt(gain)}; paired sign-flip test by family p = {test.p_value:.3g} "
            f"(baseline-only right {test.b}, steered-only right {test.c}).")
    if gain.low <= 0 <= gain.high:
        line += " The interval includes 0: no evidence of a gain."
    return line


def write_report(out_dir: Path, show: bool = False) -> Path:
    """report.html (self-contained) and report.md (+ PNGs in report_files/), rows.csv and rows.jsonl; `show`
    also prints the headline on the console."""
    a = analyse(out_dir)
    export_rows(a, out_dir)
    base_items, chosen_items = judged(a.arms[BASELINE]), judged(a.selected)
    base, chosen = summarise(base_items, n_boot=N_BOOT), summarise(chosen_items, n_boot=N_BOOT)
    metric = a.config.select_metric
    sections: list[tuple[str, str]] = []  # (title, markdown)

    metrics = ["accuracy", "balanced_accuracy", "pair_accuracy", "answer_rate"] + (["auroc"] if a.config.mode == "score" else [])
    arms = [("baseline", base), ("selected (nested, held-out)", chosen)]
    lines = [_comparison("Selected vs baseline", base_items, chosen_items, metric)]
    controls = [judged(arm) for arm in control_arms(a)]
    if controls:
        summaries = [summarise(c, n_boot=N_BOOT) for c in controls]
        cells = []
        for m in metrics:
            values = [getattr(s_, m).value for s_ in summaries if getattr(s_, m) is not None]
            cells.append(f"{np.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})" if values else "–")
        arms_rows = [[name, *(fmt(getattr(s_, m)) for m in metrics)] for name, s_ in arms]
        arms_rows.append([f"random-direction controls of the selected configs: mean (min–max) of "
                          f"{len(controls)} draws", *cells])
        selected_value = _metric(chosen_items, metric)
        beaten = sum(_metric(c, metric) >= selected_value for c in controls)
        lines.append(f"Random-direction controls: {beaten} of {len(controls)} draws reach the selected arm's "
                     f"{metric} ({selected_value:.3f}); a gain that random steering matches is not evidence.")
    else:
        arms_rows = [[name, *(fmt(getattr(s_, m)) for m in metrics)] for name, s_ in arms]
    if a.config.mode == "score":  # a biased model sits on one side of log-odds 0: also judge at a fitted threshold
        base_thresholded = fold_thresholded(a.arms[BASELINE], a.folds)
        selected_thresholded_ = selected_thresholded(a)
        for name, items in (("baseline", base_thresholded), ("selected", selected_thresholded_)):
            arms_rows.append([f"{name}, threshold fitted on rows that never saw the fold",
                              *(fmt(getattr(summarise(items, n_boot=N_BOOT), m)) for m in metrics)])
        lines.append(_comparison("At fitted thresholds, selected vs baseline", base_thresholded,
                                 selected_thresholded_, "balanced_accuracy"))
    md = _table(["arm", *metrics], arms_rows)
    counts = Counter(a.selected_by_fold.values())
    choices = "; ".join(f"`{c}` in {n} of {len(a.selected_by_fold)} folds" for c, n in counts.most_common())
    sections.append(("Headline", f"{md}\n\n" + "\n\n".join(lines) + f"\n\nSelected: {choices}"))
    if show:
        from rich.console import Console
        from rich.markdown import Markdown

        Console(width=160).print(Markdown(f"## Headline ({len(a.sample_ids)} items)\n\n{sections[0][1]}"))

    checks = path_check(a)
    if checks:
        sections.append(("Numeric path check", "Strength-0 rows on the path that rows steered before the last "
                         "prompt token take, against the baseline (which shares one pass over each prompt). In "
                         f"float32 they agree; in {a.meta.get('dtype')} any difference is what the path alone "
                         "moves, and a gain no larger than it is noise.\n\n"
                         + _table(["positions", "max |score difference|", "verdicts that differ"], checks)))

    score_mode = a.config.mode == "score"
    top = [[s.config, f"{s.value:.3f}", fmt(s.gain), f"{s.b}/{s.c}", f"{s.p_value:.3g}"]
           + ([f"{s.auroc:.3f}"] if score_mode else []) for s in a.stats[:15]]
    base_auroc = f" (baseline {_metric(base_items, 'auroc'):.3f})" if score_mode else ""
    sections.append(("Top configs (descriptive, all held-out rows)",
                     _table(["config (method|layers|vectors|positions|strength)", metric, "gain [95%]", "b/c",
                             "sign-flip p"] + ([f"AUROC{base_auroc}"] if score_mode else []), top)))

    figures: list[tuple[str, str, bytes]] = [("Gain over strength × layer", name, png)
                                             for name, png in gain_heatmaps(a)]
    figures.append(("Balanced accuracy per CWE", "per-cwe", per_cwe_bars(a)))
    probe_path = out_dir / "probe.json"
    if probe_path.exists() and (png := probe_plot(json.loads(probe_path.read_text()))):
        figures.append(("Probe AUROC by layer", "probe", png))
    transfer = transfer_matrix(a)
    if transfer and transfer[1]:
        cwes, cells, title = transfer
        figures.append(("Cross-CWE transfer", "transfer", transfer_plot(*transfer)))
        sections.append((f"Cross-CWE transfer: accuracy gain [95%] ({title})",
                         _table(["vector of \\ items of", *cwes],
                                [[v, *(fmt(cells[(v, t)]) if (v, t) in cells else "–" for t in cwes)]
                                 for v in cwes])))

    flips = flip_rates(a)
    if flips:
        rows = [[kind, str(v["n"]), fmt(v["baseline"]), fmt(v["selected"])] for kind, v in flips.items()]
        sections.append(("Robustness: verdict flips under augmentation",
                         _table(["augmentation", "n compared", "baseline flip rate [95%]",
                                 "selected flip rate [95%]"], rows)))

    if a.config.mode == "generate":
        from vulnsteer.summary import final_answer_section

        final = final_answer_section({"baseline": a.arms[BASELINE], "selected": a.selected})
        if final:
            sections.append(("Forced final answer", final.markdown.replace("## Forced final answer\n", "", 1)))
        reasoning = _reasoning_section(a)
        if reasoning:
            sections.append(("Reasoning quality (baseline vs selected)",
                             reasoning.markdown.replace("## Reasoning\n", "", 1)))

    examples = _examples(a)
    if examples:
        sections.append(("Example answers (baseline vs selected)",
                         _table(["item", "label", "baseline", "selected"], examples)))

    return _write_files(out_dir, a, sections, figures)


def _reasoning_section(a: Analysis):
    """ROUGE/embedding reasoning scores against the dataset's ground-truth explanations (generate mode)."""
    from dataclasses import replace

    from vulnsteer.summary import reasoning_section
    from vulnsteer.sweep import load_sweep_samples

    samples, _ = load_sweep_samples(a.config)
    selected = [replace(r, steering={"config": "selected (nested)"}) for r in a.selected]
    return reasoning_section(a.arms[BASELINE] + selected, samples)


def _examples(a: Analysis, k: int = 6) -> list[list[str]]:
    """Items where the verdict changed first, then others; answer text in generate mode, score in score mode."""
    pairs = list(zip(a.arms[BASELINE], a.selected))
    pairs.sort(key=lambda p: p[0].verdict == p[1].verdict)
    show = lambda r: (f"{r.verdict} (score {r.score:+.2f})" if r.score is not None  # noqa: E731
                      else f"{r.verdict}: {r.response[:300]}")
    return [[b.sample_id, b.label, show(b), show(s)] for b, s in pairs[:k]]


def _write_files(out_dir: Path, a: Analysis, sections, figures) -> Path:
    """The Markdown report links its figures from report_files/; the HTML one, rendered from the same Markdown,
    embeds them, so it is a single file to send around."""
    import markdown

    files = out_dir / "report_files"
    files.mkdir(exist_ok=True)
    meta = a.meta
    head = (f"model `{meta.get('model')}` ({meta.get('dtype')}), dataset `{a.config.dataset}` "
            f"({len(a.sample_ids)} items), prompt {a.config.prompt}, mode {a.config.mode}, "
            f"vulnsteer {meta.get('vulnsteer')}")
    parts = [f"# vulnsteer sweep report\n\n{head}\n\n## Protocol\n\n{protocol_text(a)}\n"]
    parts += [f"## {title}\n\n{text}\n" for title, text in sections]
    embedded = list(parts)
    for title, name, png in figures:
        (files / f"{name}.png").write_bytes(png)
        parts.append(f"## {title}\n\n![{title}](report_files/{name}.png)\n")
        embedded.append(f"## {title}\n\n![{title}](data:image/png;base64,{base64.b64encode(png).decode()})\n")
    (out_dir / "report.md").write_text("\n".join(parts))
    body = markdown.markdown("\n".join(embedded), extensions=["tables"])
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}")
    (out_dir / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>vulnsteer "
                                         f"report</title><style>{style}</style></head><body>{body}</body></html>")
    return out_dir / "report.html"


def export_rows(a: Analysis, out_dir: Path) -> None:
    """rows.jsonl (every field) and rows.csv (the columns people sort by) of all complete configs."""
    fields = ["config", "fold", "sample_id", "cwe", "label", "verdict", "score", "new_tokens", "seconds"]
    with open(out_dir / "rows.jsonl", "w") as jf, open(out_dir / "rows.csv", "w", newline="") as cf:
        writer = csv.writer(cf)
        writer.writerow(fields)
        for config_id, results in a.arms.items():
            for r in results:
                jf.write(json.dumps({"config": config_id, "fold": a.folds[r.sample_id], **r.to_dict()}) + "\n")
                writer.writerow([config_id, a.folds[r.sample_id], r.sample_id, r.cwe, r.label, r.verdict, r.score,
                                 r.new_tokens, r.seconds])
