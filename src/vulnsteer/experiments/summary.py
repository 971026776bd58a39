"""Summaries of one evaluation run: summary.json, summary.md and the console table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from vulnsteer.errors import VulnsteerError
from vulnsteer.experiments.tables import markdown_table
from vulnsteer.metrics import (
    Interval,
    Judged,
    Summary,
    clustered_proportion,
    summarise,
    summarise_by_cwe,
)
from vulnsteer.records import Result
from vulnsteer.verdicts import is_english

COLUMNS = (
    ("accuracy", "acc (unknown = wrong)"),
    ("answered_accuracy", "acc answered (SecLLMHolmes)"),
    ("balanced_accuracy", "balanced acc"),
    ("pair_accuracy", "pair acc"),
    ("answer_rate", "answer rate"),
    ("auroc", "AUROC"),
    ("pair_ordering", "pair ordering"),
    ("yes_rate", "yes-rate"),
)


def judged(results: Sequence[Result]) -> list[Judged]:
    return [Judged(r.pair_id, r.cwe, r.label == "vulnerable", r.verdict, r.score, r.family) for r in results]


def summarise_results(results: Sequence[Result], n_boot: int = 2000, seed: int = 0) -> dict[str, Summary]:
    """Overall (key "all") and per-CWE summaries."""
    items = judged(results)
    return {"all": summarise(items, n_boot=n_boot, seed=seed), **summarise_by_cwe(items, n_boot=n_boot, seed=seed)}


def fmt(interval: Interval | None) -> str:
    if interval is None or interval.value != interval.value:
        return "–"
    return f"{interval.value:.3f} [{interval.low:.2f},{interval.high:.2f}]"


def rows(summaries: dict[str, Summary]) -> list[list[str]]:
    """One table row per group: name, n, pairs, then each metric with its 95% interval."""
    return [
        [name, str(s.n), str(s.n_pairs), *(fmt(getattr(s, key)) for key, _ in COLUMNS)] for name, s in summaries.items()
    ]


def summary_table(summaries: dict[str, Summary]) -> str:
    return markdown_table(["group", "n", "pairs", *(title for _, title in COLUMNS)], rows(summaries))


def print_table(summaries: dict[str, Summary], title: str, console: Console | None = None) -> None:
    table = Table(title=title + " · 95% intervals")
    for column in ["group", "n", "pairs", *(title for _, title in COLUMNS)]:
        table.add_column(column, justify="left" if column == "group" else "right", no_wrap=True)
    for row in rows(summaries):
        table.add_row(*row)
    (console or Console(width=200)).print(table)


def write_summary(out_dir: Path, summaries: dict[str, Summary], meta: dict, sections: Sequence[Section] = ()) -> None:
    """summary.json (metrics with intervals, run settings) and summary.md (the same, for people); each extra
    section adds its data under its key in summary.json and its markdown at the end of summary.md."""
    (out_dir / "summary.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "metrics": {name: s.to_dict() for name, s in summaries.items()},
                **{section.key: section.data for section in sections},
            },
            indent=2,
        )
    )
    settings = "\n".join(f"- {key}: `{value}`" for key, value in meta.items())
    (out_dir / "summary.md").write_text(
        f"# vulnsteer eval\n\n{settings}\n\n{summary_table(summaries)}\n\n"
        "Intervals are 95% and count families (a pair with its augmented copies) as the unit: Wilson at the "
        "design-effect sample size for proportions, a family bootstrap for balanced accuracy, Obuchowski's "
        "clustered variance for AUROC. "
        "`acc answered` counts only items with a verdict (the SecLLMHolmes definition); `acc` counts "
        "unknown verdicts as wrong.\n" + "".join(f"\n{section.markdown.rstrip()}\n" for section in sections)
    )


# --- extra sections ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """An extra part of the summary: `data` goes to summary.json under `key`, `markdown` (the titled body) to
    summary.md. The title stays apart from the body so that the sweep report can give the body its own heading."""

    key: str
    data: dict
    title: str
    body: str

    @property
    def markdown(self) -> str:
        return f"## {self.title}\n\n{self.body}"


def _rate(rate: dict) -> str:
    """A reasoning.py rate dict ({k, n, value, low, high}) as "0.500 [0.24,0.76] (4/8)"."""
    if not rate["n"]:
        return "–"
    return f"{fmt(Interval(rate['value'], rate['low'], rate['high']))} ({rate['k']}/{rate['n']})"


def reasoning_markdown(data: dict) -> str:
    """The body of the reasoning section: one table per measure, a row per condition, a column per CWE."""
    conditions = data["conditions"]
    cwes = sorted(
        {c for cond in conditions.values() for c in cond["reasoning_correct"]} - {"all"}, key=lambda c: (len(c), c)
    )
    t = data.get("thresholds", {})
    lines = [
        f"Correct reasoning: majority of the votes of ROUGE-1 recall of the ground truth ≥ "
        f"{t.get('rouge1_recall')}, MiniLM cosine ≥ {t.get('cosine')}"
        f"{', local judge' if t.get('judge') else ''}; with two votes both must pass. Rate among correct "
        "verdicts on samples with a ground-truth explanation (the SecLLMHolmes reasoning rate), 95% Wilson.",
        "",
    ]
    for key, title in (("reasoning_correct", "correct reasoning | correct verdict"), ("names_cwe", "names the CWE")):
        lines += [
            f"**{title}**",
            "",
            markdown_table(
                ["condition", "all", *cwes],
                [
                    [name, *(_rate(c[key][g]) if g in c[key] else "–" for g in ["all", *cwes])]
                    for name, c in conditions.items()
                ],
            ),
            "",
        ]
    lines.append(
        markdown_table(
            ["condition", "answers", "scored", "mean new tokens", "mean words", "mean ROUGE-1 recall", "mean cosine"],
            [
                [
                    name,
                    *(
                        str(c[k])
                        for k in (
                            "answers",
                            "scored",
                            "mean_new_tokens",
                            "mean_words",
                            "mean_rouge1_recall",
                            "mean_cosine",
                        )
                    ),
                ]
                for name, c in conditions.items()
            ],
        )
    )
    for name, d in data.get("vs_baseline", {}).items():
        lines += [
            "",
            f"{name} minus baseline: " + ", ".join(f"{k} {v:+}" if v is not None else f"{k} –" for k, v in d.items()),
        ]
    return "\n".join(lines) + "\n"


def reasoning_section(
    results: Sequence[Result],
    samples,
    *,
    embedder=None,
    judge_lm=None,
    rouge_threshold: float | None = None,
    cosine_threshold: float | None = None,
    scores: list | None = None,
) -> Section | None:
    """Score and summarise the reasoning of generate-mode results (None when there are none: score mode has no
    text to judge). `samples`: the run's samples (a list, or a dict by id) carrying ground-truth reasoning.
    Pass `scores` (from `reasoning.score_reasoning`, aligned with `results`) to skip scoring here."""
    from vulnsteer.experiments import reasoning

    keep = [i for i, r in enumerate(results) if r.mode == "generate"]
    if not keep:
        return None
    if scores is not None:
        if len(scores) != len(results):
            raise VulnsteerError(f"{len(scores)} reasoning scores for {len(results)} results")
        scores = [scores[i] for i in keep]
    results = [results[i] for i in keep]
    rouge_threshold = reasoning.ROUGE_THRESHOLD if rouge_threshold is None else rouge_threshold
    cosine_threshold = reasoning.COSINE_THRESHOLD if cosine_threshold is None else cosine_threshold
    if scores is None:
        scores = reasoning.score_reasoning(
            results,
            samples,
            embedder=embedder,
            judge_lm=judge_lm,
            rouge_threshold=rouge_threshold,
            cosine_threshold=cosine_threshold,
        )
    data = {
        "thresholds": {
            "rouge1_recall": rouge_threshold,
            "cosine": cosine_threshold,
            "judge": judge_lm is not None or any(s is not None and s.judge is not None for s in scores),
        },
        **reasoning.summarise_reasoning(results, scores),
    }
    return Section("reasoning", data, "Reasoning", reasoning_markdown(data))


def language_section(results: Sequence[Result]) -> Section | None:
    """Generate mode: how many free answers are in a language other than English, which the parser (English rules)
    mostly reads as no answer; their verdicts count as given. None in score mode."""
    answers = [r for r in results if r.mode == "generate"]
    if not answers:
        return None
    other = [r.sample_id for r in answers if not is_english(r.response)]
    return Section(
        "languages",
        {"other": len(other), "n": len(answers), "samples": other},
        "Languages",
        f"Answers in a language other than English: {len(other)} of {len(answers)}.\n",
    )


def final_answer_section(arms: dict[str, Sequence[Result]]) -> Section | None:
    """Generate mode: the forced final yes/no verdict (log-odds, no parser) per arm, beside the parsed one, with
    how often the two agree (among all rows, and among rows the parser could read). None without such rows."""
    data, lines = {}, []
    for name, results in arms.items():
        rows = [r for r in results if r.final_verdict is not None]
        if not rows:
            continue
        forced = summarise(
            [Judged(r.pair_id, r.cwe, r.is_vulnerable, str(r.final_verdict), r.final_score, r.family) for r in rows]
        )
        read = [r for r in rows if r.verdict != "unknown"]
        agree = clustered_proportion([r.final_verdict == r.verdict for r in rows], [r.family for r in rows])
        agree_read = clustered_proportion([r.final_verdict == r.verdict for r in read], [r.family for r in read])
        data[name] = {
            "metrics": forced.to_dict(),
            "agreement": agree.to_dict(),
            "agreement_where_parsed": agree_read.to_dict(),
            "n": len(rows),
            "n_parsed": len(read),
        }
        lines.append(
            [
                name,
                str(len(rows)),
                *map(
                    fmt,
                    (forced.accuracy, forced.balanced_accuracy, forced.pair_accuracy, forced.auroc, agree, agree_read),
                ),
            ]
        )
    if not data:
        return None
    body = (
        "After its free answer the model is asked for a final yes or no, scored by log-odds (> 0: vulnerable): "
        "a verdict that needs no parser.\n\n"
        + markdown_table(
            ["arm", "n", "acc", "balanced acc", "pair acc", "AUROC", "agrees with the parser", "agrees where parsed"],
            lines,
        )
        + "\n"
    )
    return Section("final_answer", data, "Forced final answer", body)


def side_effects_section(effects: Sequence) -> Section:
    """What the run's steering costs on the items' own code (`side_effects.code_side_effects`)."""
    body = (
        "Each item's code (no prompt) read unsteered and steered at every token: mean KL divergence of the "
        "next-token distribution and change in negative log-likelihood of the code's next token, nats per token, "
        "95% family-bootstrap intervals.\n\n"
        + markdown_table(
            ["steering", "items", "tokens", "KL(unsteered ‖ steered)", "Δ NLL per token"],
            [[e.config, str(e.items), str(e.tokens), fmt(e.kl), fmt(e.nll_change)] for e in effects],
        )
        + "\n"
    )
    return Section("side_effects", {"configs": [e.to_dict() for e in effects]}, "Side effects on plain code", body)
