"""The sweep report: the analysis of a sweep (`analysis`), written as one self-contained HTML file (plots embedded)
and as Markdown (plots beside it), plus CSV/JSONL exports of every row."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vulnsteer.experiments.analysis import (  # noqa: E402
    N_BOOT,
    Analysis,
    analyse,
    answer_costs,
    arm_side_effect,
    best_prompt,
    control_arms,
    examples,
    flip_rates,
    fold_thresholded,
    method_arms,
    metric_value,
    path_check,
    selected_thresholded,
    selection_rows,
    transfer_matrix,
)
from vulnsteer.experiments.summary import final_answer_section, fmt, judged, reasoning_section  # noqa: E402
from vulnsteer.experiments.sweep import (  # noqa: E402
    BASELINE,
    LORA,
    GridPoint,
    candidate_points,
    load_sweep_samples,
    points_by_id,
)
from vulnsteer.experiments.tables import markdown_table  # noqa: E402
from vulnsteer.metrics import (  # noqa: E402
    Interval,
    Judged,
    McNemar,
    bootstrap_gain,
    mcnemar_items,
    summarise,
    summarise_by_cwe,
)
from vulnsteer.records import SteeringId  # noqa: E402

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
            ax.text(
                j,
                i,
                f"{value:+.2f}",
                ha="center",
                va="center",
                fontsize=size,
                color="white" if abs(value) > 0.6 * limit else "black",
            )


def gain_heatmaps(a: Analysis) -> list[tuple[str, bytes]]:
    """Gain in the selection metric over strength x layer set, one panel per method/vectors/positions."""
    by_cell: dict[tuple[str, str, str], dict[tuple[str, float], list[float]]] = {}
    points = points_by_id(a.config)  # less the transfer rows, which have no cell
    for s in a.stats:
        p = points.get(s.config)
        if p is None:
            continue
        vectors = "random (mean of draws)" if p.is_random else str(p.vectors)
        if (p.is_random or p.vectors in a.config.vector_choices) and p.strength != 0:  # not path controls
            by_cell.setdefault((p.method, vectors, p.positions), {}).setdefault((p.layers, p.strength), []).append(
                s.gain.value
            )
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
    pooled = sorted(
        (r["layer"], r["auroc"], r.get("low"), r.get("high"))
        for r in probe_rows
        if r["group"] == "pooled" and r["auroc"] is not None
    )
    if not pooled:
        return None
    fig, ax = plt.subplots(figsize=(5, 2.8))
    layers, values = [p[0] for p in pooled], [p[1] for p in pooled]
    if all(p[2] is not None for p in pooled):
        ax.fill_between(
            layers, [p[2] or 0.0 for p in pooled], [p[3] or 0.0 for p in pooled], alpha=0.2, label="95% interval"
        )
    ax.plot(layers, values, marker="o")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("layer")
    ax.set_ylabel("AUROC (cross-validated)")
    ax.set_title("probe: projection onto the pooled direction", fontsize=9)
    return _png(fig)


def tradeoff_plot(
    effects: list[dict], gains: dict[str, Interval], metric: str, grid_points: dict[str, GridPoint]
) -> bytes:
    """Gain in the selection metric against mean KL on plain code: a line per config shape and sign of the strength,
    from the weakest push to the strongest (`grid_points`: the sweep's points by id)."""
    by_shape: dict[str, list[tuple[float, float, float]]] = {}
    for e in effects:
        point = grid_points[e["config"]]
        gain = gains.get(e["config"])
        if gain is not None:
            line = f"{point.shape} ({'+' if point.strength > 0 else '-'})"
            by_shape.setdefault(line, []).append((e["kl"]["value"], gain.value, point.strength))
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for shape, points in sorted(by_shape.items()):
        points.sort(key=lambda p: abs(p[2]))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=shape)
        for kl, value, strength in points:
            ax.annotate(f"{strength:+g}", (kl, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("mean KL on plain code (nats per token)")
    ax.set_ylabel(f"gain in {metric}")
    ax.legend(fontsize=6)
    return _png(fig)


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


# --- text ----------------------------------------------------------------------------------------------


def protocol_text(a: Analysis) -> str:
    c = a.config
    if c.train_dataset:
        fitted = f"fitted once on {c.train_dataset} and tested on {c.dataset}"
        dropped = a.meta.get("held_out")
        fitted += (
            f" ({dropped}, since nothing about them would be held out)"
            if dropped
            else " (no test item shares a family, code or near-duplicate code with the training data)"
        )
        chooser = "the other folds' rows (their vectors saw no test item)"
    else:
        fitted = (
            f"fitted per fold on the other folds' items ({c.folds} folds grouped by family: a pair, the "
            "augmented copies of its scenario and near-duplicate code in any source; each CWE's families "
            "spread evenly over the folds)"
        )
        chooser = (
            "selection rows: every other fold g's items steered with vectors fitted without this fold and "
            "g, so neither the choice nor the vectors behind it saw this fold"
        )
    return (
        f"Steering vectors ({', '.join(c.methods)}, read at {c.read} of the prompt as {c.mode} mode asks it, "
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
        "selection on the test set."
    )


def _comparison(name: str, base: list[Judged], other: list[Judged], metric: str) -> str:
    """One line: the gain with its interval and the paired family-level test."""
    gain = bootstrap_gain(base, other, metric, n_boot=N_BOOT)
    test: McNemar = mcnemar_items(base, other)
    line = (
        f"{name}: gain in {metric} {fmt(gain)}; paired sign-flip test by family p = {test.p_value:.3g} "
        f"(baseline-only right {test.b}, steered-only right {test.c})."
    )
    if gain.low <= 0 <= gain.high:
        line += " The interval includes 0: no evidence of a gain."
    return line


# --- sections --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """A plot: a PNG in report_files/ linked from report.md, embedded in report.html."""

    title: str
    name: str  # report_files/<name>.png
    png: bytes


@dataclass(frozen=True)
class Section:
    """One titled part of the report: its Markdown body, and figures shown with the others after the text."""

    title: str
    markdown: str
    figures: tuple[Figure, ...] = ()


@dataclass(frozen=True)
class Context:
    """What the sections share, computed once: the analysis and the files the sweep wrote beside its store."""

    a: Analysis
    base_items: list[Judged]
    chosen_items: list[Judged]
    probe: list[dict] | None  # probe.json
    side_effects: dict | None  # side_effects.json

    @property
    def metric(self) -> str:
        return self.a.config.select_metric

    @property
    def score_mode(self) -> bool:
        return self.a.config.mode == "score"


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def context(a: Analysis, out_dir: Path) -> Context:
    return Context(
        a,
        judged(a.arms[BASELINE]),
        judged(a.selected),
        _read_json(out_dir / "probe.json"),
        _read_json(out_dir / "side_effects.json"),
    )


def protocol(ctx: Context) -> Section:
    return Section("Protocol", protocol_text(ctx.a))


def headline(ctx: Context) -> Section:
    """Baseline against the nested-selected arm (and, in score mode, both at fitted thresholds), beside the
    random-direction controls; with the grid's gain heatmaps and the per-CWE bars."""
    a, metric = ctx.a, ctx.metric
    metrics = ["accuracy", "balanced_accuracy", "pair_accuracy", "answer_rate"]
    metrics += ["auroc", "pair_ordering"] if ctx.score_mode else []
    metrics += ["yes_rate"]  # a threshold shift moves it; discrimination moves pair ordering

    def row(name: str, items: list[Judged]) -> list[str]:
        summary = summarise(items, n_boot=N_BOOT)
        return [name, *(fmt(getattr(summary, m)) for m in metrics)]

    rows = [row("baseline", ctx.base_items), row("selected (nested, held-out)", ctx.chosen_items)]
    lines = [_comparison("Selected vs baseline", ctx.base_items, ctx.chosen_items, metric)]
    controls = [judged(arm) for arm in control_arms(a)]
    if controls:
        summaries = [summarise(c, n_boot=N_BOOT) for c in controls]
        cells = []
        for m in metrics:
            values = [getattr(s_, m).value for s_ in summaries if getattr(s_, m) is not None]
            cells.append(f"{np.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})" if values else "–")
        rows.append(
            [f"random-direction controls of the selected configs: mean (min–max) of {len(controls)} draws", *cells]
        )
        selected_value = metric_value(ctx.chosen_items, metric)
        beaten = sum(metric_value(c, metric) >= selected_value for c in controls)
        lines.append(
            f"Random-direction controls: {beaten} of {len(controls)} draws reach the selected arm's "
            f"{metric} ({selected_value:.3f}); a gain that random steering matches is not evidence."
        )
    if ctx.score_mode:  # a biased model sits on one side of log-odds 0: also judge at a fitted threshold
        base_thresholded = fold_thresholded(a.arms[BASELINE], a.folds)
        selected_thresholded_ = selected_thresholded(a)
        rows += [
            row(f"{name}, threshold fitted on rows that never saw the fold", items)
            for name, items in (("baseline", base_thresholded), ("selected", selected_thresholded_))
        ]
        lines.append(
            _comparison(
                "At fitted thresholds, selected vs baseline",
                base_thresholded,
                selected_thresholded_,
                "balanced_accuracy",
            )
        )
        lines.append(
            "The selected arm's AUROC pools the scores of folds whose chosen configs may differ: a pooled "
            "figure, not one config's."
        )
    counts = Counter(a.selected_by_fold.values())
    choices = "; ".join(f"`{c}` in {n} of {len(a.selected_by_fold)} folds" for c, n in counts.most_common())
    figures = [Figure("Gain over strength × layer", name, png) for name, png in gain_heatmaps(a)]
    figures.append(Figure("Balanced accuracy per CWE", "per-cwe", per_cwe_bars(a)))
    return Section(
        "Headline",
        f"{markdown_table(['arm', *metrics], rows)}\n\n" + "\n\n".join(lines) + f"\n\nSelected: {choices}",
        tuple(figures),
    )


# Parameters a method fits per group (pooled or a CWE) and steered layer, for hidden size d (LoReFT: rank r).
PARAMETERS = {"mean-diff": "d", "pca": "d", "probe": "d", "trained": "d", "loreft": "2rd + r"}


def methods(ctx: Context) -> Section:
    """One row per method, each the arm nested selection gives among that method's configs only, beside the
    baseline and the probe's read-out: the methods under one protocol, with what each fits and what fitting cost."""
    a = ctx.a
    metrics = [
        "balanced_accuracy",
        "pair_accuracy",
        *(["pair_ordering", "auroc"] if ctx.score_mode else []),
        "yes_rate",
    ]
    base = ctx.base_items
    seconds = a.meta.get("fit_seconds", {})

    def row(name: str, parameters: str, arm: list, fit_seconds: str = "–", kl: Interval | None = None) -> list[str]:
        items = judged(arm)
        gain = bootstrap_gain(base, items, ctx.metric, n_boot=N_BOOT)
        test = mcnemar_items(base, items)
        return [
            name,
            parameters,
            *(fmt(getattr(summarise(items, n_boot=N_BOOT), m)) for m in metrics),
            fmt(gain),
            f"{test.p_value:.3g}",
            fmt(kl),
            fit_seconds,
        ]

    rows = [
        [
            "baseline (the prompt alone)",
            "0",
            *(fmt(getattr(summarise(base, n_boot=N_BOOT), m)) for m in metrics),
            "–",
            "–",
            "0",
            "–",
        ]
    ]
    prompts = best_prompt(a)
    notes = ""
    if prompts is not None:
        rows.append(
            row("best prompt (chosen on training folds)", f"0 (one of {len(prompts.candidates)} prompts)", prompts.rows)
        )
        chosen = ", ".join(
            f"fold {f}: {p} (on {len(prompts.chosen_on[f])} items of the other folds)"
            for f, p in prompts.chosen.items()
        )
        notes += f"\n\nBest prompt, chosen per fold among {', '.join(prompts.candidates)}: {chosen}."
    for name, arm in method_arms(a).items():
        fit = a.config.fits[name]
        rank = f" (r = {fit.training.rank})" if fit.method == "loreft" else ""
        rows.append(
            row(
                f"{name} (nested selection among its configs)",
                f"{PARAMETERS.get(fit.method, '?')}{rank} per layer and group",
                arm.rows,
                f"{seconds[name]:.1f}" if name in seconds else "–",
                arm_side_effect(a, ctx.side_effects or {}, arm.chosen),
            )
        )
    fits = a.meta.get("lora_fits", {})
    if LORA in a.others and fits:
        counts = sorted({fit["parameters"] for fit in fits.values()})
        rows.append(
            row(
                f"LoRA r=8 on q,k,v,o (fine-tuning ceiling, {a.config.lora_steps} steps per fold)",
                " or ".join(f"{n:,}" for n in counts),
                a.others[LORA],
                f"{sum(fit['seconds'] for fit in fits.values()):.1f}",
            )
        )
        notes += (
            "\n\nLoRA is fitted once per fold on that fold's training items (no nested selection: one "
            "setting) and scores the fold's items as score mode does; its fit runs every training prompt in "
            "full each step (adapters change every position, so no prefix cache), then the base model is "
            "restored."
        )
    if ctx.probe is not None and ctx.score_mode:
        pooled = [r for r in ctx.probe if r.get("group") == "pooled" and r.get("auroc")]
        if pooled:
            best = max(pooled, key=lambda r: r["auroc"])
            cells = ["–"] * len(metrics)
            cells[metrics.index("auroc")] = f"{best['auroc']:.3f}"
            rows.append(
                [
                    f"probe read-out at layer {best['layer']} (a detector, not an intervention; best layer: "
                    "descriptive)",
                    "d + 1",
                    *cells,
                    "–",
                    "–",
                    "–",
                    "–",
                ]
            )
    png = probe_plot(ctx.probe) if ctx.probe is not None else None
    return Section(
        "Methods side by side",
        "Each method's arm is chosen per fold by nested selection among that method's configs only (or the "
        "baseline), so the rows compare methods under one protocol. The gain is in "
        f"{ctx.metric} over the baseline with a family-bootstrap interval; p is the paired sign-flip test "
        "by family; the side-effect KL is the mean KL(unsteered ‖ steered) per token on the items' plain code "
        "with each fold's items steered at every token by the config chosen for that fold (0 where the baseline "
        "was; see \"Side effects on plain code\"); fit seconds add up every fold's and selection pair's fit.\n\n"
        + markdown_table(["arm", "fitted parameters", *metrics, "gain [95%]", "p", "side-effect KL", "fit s"], rows)
        + notes,
        (Figure("Probe AUROC by layer", "probe", png),) if png else (),
    )


def discrimination(ctx: Context) -> Section:
    """Per CWE and overall, baseline vs selected: the yes-rate (which a shift of every score moves) beside pair
    ordering (which only telling a file from its patched twin moves; score mode)."""
    arms = {"baseline": ctx.base_items, "selected": ctx.chosen_items}
    by_cwe = {
        name: {"all": summarise(items, n_boot=N_BOOT), **summarise_by_cwe(items, n_boot=N_BOOT)}
        for name, items in arms.items()
    }
    header = ["CWE", *(f"{name} yes-rate" for name in arms)]
    header += [f"{name} pair ordering" for name in arms] if ctx.score_mode else []
    rows = []
    for group in by_cwe["baseline"]:
        row = [group, *(fmt(by_cwe[name][group].yes_rate) for name in arms)]
        row += [fmt(by_cwe[name][group].pair_ordering) for name in arms] if ctx.score_mode else []
        rows.append(row)
    return Section(
        "Threshold or discrimination, per CWE",
        "A fixed vector added where the answer is read moves a file and its patched twin alike: it changes "
        "the yes-rate, hardly pair ordering (the share of pairs whose vulnerable file scores above its "
        "twin, ties 1/2). A gain in balanced accuracy with pair ordering unchanged is a threshold shift.\n\n"
        + markdown_table(header, rows),
    )


def numeric_path(ctx: Context) -> Section | None:
    checks = path_check(ctx.a)
    if not checks:
        return None
    return Section(
        "Numeric path check",
        "Strength-0 rows on the path that rows steered before the last prompt token take, against the "
        "baseline (which shares one pass over each prompt). In float32 they agree; in "
        f"{ctx.a.meta.get('dtype')} any difference is what the path alone moves, and a gain no larger than "
        "it is noise.\n\n" + markdown_table(["positions", "max |score difference|", "verdicts that differ"], checks),
    )


def top_configs(ctx: Context) -> Section:
    """The best configs on all held-out rows, each with the number of folds where nested selection could pick it."""
    a = ctx.a
    folds = sorted(set(a.folds.values()))
    candidates = candidate_points(a.config)

    def eligible(config_id: str) -> str:
        """In how many folds nested selection could choose this config (all its selection rows exist); controls
        and transfer rows are never candidates."""
        if config_id not in candidates:
            return "not a candidate"
        n = sum(
            selection_rows(a.arms, a.sample_ids, a.folds, a.config, a.selection, f, config_id) is not None
            for f in folds
        )
        return f"{n}/{len(folds)}"

    top = [
        [s.config, f"{s.value:.3f}", fmt(s.gain), f"{s.b}/{s.c}", f"{s.p_value:.3g}", eligible(s.config)]
        + ([f"{s.auroc:.3f}"] if ctx.score_mode else [])
        for s in a.stats[:15]
    ]
    base_auroc = f" (baseline {metric_value(ctx.base_items, 'auroc'):.3f})" if ctx.score_mode else ""
    return Section(
        "Top configs (descriptive, all held-out rows)",
        "A config is eligible in a fold when nested selection had all its selection rows there (an "
        "own-CWE vector needs the CWE among the fold pair's training items); one eligible in no fold "
        "could never be the headline's choice.\n\n"
        + markdown_table(
            [
                "config (method|layers|vectors|positions|strength)",
                ctx.metric,
                "gain [95%]",
                "b/c",
                "sign-flip p",
                "eligible (folds)",
            ]
            + ([f"AUROC{base_auroc}"] if ctx.score_mode else []),
            top,
        ),
    )


def transfer(ctx: Context) -> Section | None:
    matrix = transfer_matrix(ctx.a)
    if not matrix or not matrix[1]:
        return None
    cwes, gains, title = matrix
    return Section(
        f"Cross-CWE transfer: accuracy gain [95%] ({title})",
        markdown_table(
            ["vector of \\ items of", *cwes],
            [[v, *(fmt(gains[(v, t)]) if (v, t) in gains else "–" for t in cwes)] for v in cwes],
        ),
        (Figure("Cross-CWE transfer", "transfer", transfer_plot(*matrix)),),
    )


def side_effects(ctx: Context) -> Section | None:
    if ctx.side_effects is None or not ctx.side_effects["configs"]:
        return None
    effects, metric = ctx.side_effects, ctx.metric
    config_gains = {st.config: st.gain for st in ctx.a.stats}
    rows = [
        [
            e["config"],
            fmt(config_gains.get(e["config"])),
            fmt(Interval.from_dict(e["kl"])),
            fmt(Interval.from_dict(e["nll_change"])),
        ]
        for e in effects["configs"]
    ]
    return Section(
        "Side effects on plain code",
        "What the chosen configs cost the model away from the task, at every strength: each item's code "
        f"(first {effects['max_tokens']} tokens, no prompt) read unsteered and steered at every token with "
        "its own fold's vectors; mean KL divergence of the next-token distribution and change in negative "
        "log-likelihood of the code's next token, nats per token, 95% family-bootstrap intervals. A gain "
        "that needs a large KL is bought with the model's general behaviour.\n\n"
        + markdown_table(["config", f"gain in {metric} [95%]", "KL(unsteered ‖ steered)", "Δ NLL per token"], rows),
        (
            Figure(
                "Gain against side effect",
                "tradeoff",
                tradeoff_plot(effects["configs"], config_gains, metric, points_by_id(ctx.a.config)),
            ),
        ),
    )


def answers(ctx: Context) -> Section | None:
    if ctx.a.config.mode != "generate":
        return None
    return Section(
        "Answers: length and readability",
        markdown_table(
            ["arm", "mean new tokens", "unreadable by the verdict parser [95%]"],
            [[name, f"{tokens:.1f}", fmt(unreadable)] for name, tokens, unreadable in answer_costs(ctx.a)],
        ),
    )


def robustness(ctx: Context) -> Section | None:
    flips = flip_rates(ctx.a)
    if not flips:
        return None
    rows = [
        [kind, str(v["n"]), fmt(cast(Interval, v["baseline"])), fmt(cast(Interval, v["selected"]))]
        for kind, v in flips.items()
    ]
    return Section(
        "Robustness: verdict flips under augmentation",
        markdown_table(["augmentation", "n compared", "baseline flip rate [95%]", "selected flip rate [95%]"], rows),
    )


def final_answer(ctx: Context) -> Section | None:
    if ctx.a.config.mode != "generate":
        return None
    final = final_answer_section({"baseline": ctx.a.arms[BASELINE], "selected": ctx.a.selected})
    return Section(final.title, final.body) if final else None


def reasoning(ctx: Context) -> Section | None:
    """ROUGE/embedding reasoning scores against the dataset's ground-truth explanations (generate mode)."""
    if ctx.a.config.mode != "generate":
        return None
    samples, _, _ = load_sweep_samples(ctx.a.config)
    selected = [replace(r, steering=SteeringId(config="selected (nested)")) for r in ctx.a.selected]
    section = reasoning_section(ctx.a.arms[BASELINE] + selected, samples)
    return Section("Reasoning quality (baseline vs selected)", section.body) if section else None


def example_answers(ctx: Context) -> Section | None:
    rows = examples(ctx.a)
    if not rows:
        return None
    return Section(
        "Example answers (baseline vs selected)", markdown_table(["item", "label", "baseline", "selected"], rows)
    )


# The report's sections in order: a new one is a function (None where it does not apply) and a line here.
SECTIONS: tuple[Callable[[Context], Section | None], ...] = (
    protocol,
    headline,
    methods,
    discrimination,
    numeric_path,
    top_configs,
    transfer,
    side_effects,
    answers,
    robustness,
    final_answer,
    reasoning,
    example_answers,
)


# --- writing ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """A written report: its two files, and its headline for a caller to show (the command line prints it)."""

    html: Path
    markdown: Path
    headline: Section | None
    items: int  # the test items the sweep scored


def write_report(out_dir: Path, analysis: Analysis | None = None) -> Report:
    """report.html (self-contained) and report.md (+ PNGs in report_files/), rows.csv and rows.jsonl. `analysis`:
    the store's analysis, when the caller has it already."""
    a = analysis or analyse(out_dir)
    export_rows(a, out_dir)
    ctx = context(a, out_dir)
    written = {section: section(ctx) for section in SECTIONS}
    sections = [s for s in written.values() if s is not None]
    head = (
        f"model `{a.meta.get('model')}` ({a.meta.get('dtype')}), dataset `{a.config.dataset}` "
        f"({len(a.sample_ids)} items), prompt {a.config.prompt}, mode {a.config.mode}, "
        f"vulnsteer {a.meta.get('vulnsteer')}"
    )
    figures = [figure for s in sections for figure in s.figures]
    files = out_dir / "report_files"
    files.mkdir(exist_ok=True)
    for figure in figures:
        (files / f"{figure.name}.png").write_bytes(figure.png)
    (out_dir / "report.md").write_text(render_markdown(head, sections, figures))
    (out_dir / "report.html").write_text(render_html(head, sections, figures))
    return Report(out_dir / "report.html", out_dir / "report.md", written[headline], len(a.sample_ids))


def render_markdown(head: str, sections: list[Section], figures: list[Figure]) -> str:
    """The sections' text, then the figures, linked from report_files/."""
    parts = [f"# vulnsteer sweep report\n\n{head}\n"]
    parts += [f"## {s.title}\n\n{s.markdown}\n" for s in sections]
    parts += [f"## {f.title}\n\n![{f.title}](report_files/{f.name}.png)\n" for f in figures]
    return "\n".join(parts)


def render_html(head: str, sections: list[Section], figures: list[Figure]) -> str:
    """The same page from templates/report.html.j2, figures embedded, so it is a single file to send around."""
    import jinja2
    import markdown

    env = jinja2.Environment(loader=jinja2.PackageLoader("vulnsteer.experiments"), autoescape=True)
    env.filters["markdown"] = lambda text: markdown.markdown(text, extensions=["tables"])
    env.filters["base64"] = lambda data: base64.b64encode(data).decode()
    return env.get_template("report.html.j2").render(head=head, sections=sections, figures=figures)


def export_rows(a: Analysis, out_dir: Path) -> None:
    """rows.jsonl (every field) and rows.csv (the columns people sort by) of all complete configs."""
    fields = ["config", "fold", "sample_id", "cwe", "label", "verdict", "score", "new_tokens", "seconds"]
    with open(out_dir / "rows.jsonl", "w") as jf, open(out_dir / "rows.csv", "w", newline="") as cf:
        writer = csv.writer(cf)
        writer.writerow(fields)
        for config_id, results in {**a.arms, **a.others}.items():
            for r in results:
                jf.write(json.dumps({"config": config_id, "fold": a.folds[r.sample_id], **r.to_dict()}) + "\n")
                writer.writerow(
                    [
                        config_id,
                        a.folds[r.sample_id],
                        r.sample_id,
                        r.cwe,
                        r.label,
                        r.verdict,
                        r.score,
                        r.new_tokens,
                        r.seconds,
                    ]
                )
