"""Summaries of one evaluation run: summary.json, summary.md and the console table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from vulnsteer.evaluation import Result
from vulnsteer.metrics import Interval, Judged, Summary, summarise, summarise_by_cwe

COLUMNS = (
    ("accuracy", "acc (unknown = wrong)"),
    ("answered_accuracy", "acc answered (SecLLMHolmes)"),
    ("balanced_accuracy", "balanced acc"),
    ("pair_accuracy", "pair acc"),
    ("answer_rate", "answer rate"),
    ("auroc", "AUROC"),
)


def judged(results: Sequence[Result]) -> list[Judged]:
    return [Judged(r.pair_id, r.cwe, r.label == "vulnerable", r.verdict, r.score) for r in results]


def summarise_results(results: Sequence[Result], n_boot: int = 2000, seed: int = 0) -> dict[str, Summary]:
    """Overall (key "all") and per-CWE summaries."""
    items = judged(results)
    return {"all": summarise(items, n_boot=n_boot, seed=seed), **summarise_by_cwe(items, n_boot=n_boot, seed=seed)}


def fmt(interval: Interval | None) -> str:
    if interval is None or interval.value != interval.value:
        return "–"
    return f"{interval.value:.3f} [{interval.low:.2f}, {interval.high:.2f}]"


def rows(summaries: dict[str, Summary]) -> list[list[str]]:
    """One table row per group: name, n, pairs, then each metric with its 95% interval."""
    return [[name, str(s.n), str(s.n_pairs), *(fmt(getattr(s, key)) for key, _ in COLUMNS)]
            for name, s in summaries.items()]


def markdown_table(summaries: dict[str, Summary]) -> str:
    header = ["group", "n", "pairs", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(summaries)]
    return "\n".join(lines)


def print_table(summaries: dict[str, Summary], title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    for column in ["group", "n", "pairs", *(title for _, title in COLUMNS)]:
        table.add_column(column, justify="left" if column == "group" else "right")
    for row in rows(summaries):
        table.add_row(*row)
    (console or Console()).print(table)


def write_summary(out_dir: Path, summaries: dict[str, Summary], meta: dict) -> None:
    """summary.json (metrics with intervals, run settings) and summary.md (the same, for people)."""
    (out_dir / "summary.json").write_text(json.dumps(
        {"meta": meta, "metrics": {name: s.to_dict() for name, s in summaries.items()}}, indent=2))
    settings = "\n".join(f"- {key}: `{value}`" for key, value in meta.items())
    (out_dir / "summary.md").write_text(
        f"# vulnsteer eval\n\n{settings}\n\n{markdown_table(summaries)}\n\n"
        "Intervals are 95%: Wilson for proportions, bootstrap over pairs for balanced accuracy and AUROC. "
        "`acc answered` counts only items with a verdict (the SecLLMHolmes definition); `acc` counts "
        "unknown verdicts as wrong.\n")
