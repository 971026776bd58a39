"""The sweep report as data: a list of section functions rendered to report.md and a self-contained report.html,
and Markdown tables from one helper that keeps a `|` inside a cell."""

from __future__ import annotations

import base64
import re

import markdown
import pytest
from conftest import tiny_lm

from vulnsteer.experiments import report
from vulnsteer.experiments.report import Figure, Section, render_html, render_markdown, write_report
from vulnsteer.experiments.side_effects import SideEffect
from vulnsteer.experiments.summary import side_effects_section
from vulnsteer.experiments.sweep import SweepConfig
from vulnsteer.experiments.tables import markdown_table
from vulnsteer.metrics import Interval
from vulnsteer.pipeline import run_sweep

PNG = b"\x89PNG\r\n\x1a\n not really an image"


def cells(table_markdown: str) -> list[list[str]]:
    """Each body row's cells, as python-markdown (what report.html uses) reads the table."""
    html = markdown.markdown(table_markdown, extensions=["tables"])
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", html, re.S)[1:]]


def test_a_pipe_inside_a_cell_stays_in_its_cell():
    config = "mean-diff|0,2|own|prompt-last|+2"
    assert cells(markdown_table(["config", "n"], [[config, "3"]])) == [[config, "3"]]
    # The summary's tables go through the same helper: a grid-point id is one cell of the side-effects table.
    effect = SideEffect(config, Interval(0.1, 0.05, 0.2), Interval(0.01, 0.0, 0.02), tokens=120, items=4)
    body = side_effects_section([effect]).body
    assert [row[0] for row in cells(body.split("\n\n", 1)[1])] == [config]


def test_html_is_self_contained_and_escapes_titles():
    sections = [Section("a <b> & c", "text\n\n" + markdown_table(["x"], [["1"]]), (Figure("Fig <1>", "f", PNG),))]
    page = render_html("model `m`", sections, [f for s in sections for f in s.figures])
    assert "<h2>a &lt;b&gt; &amp; c</h2>" in page and "<td>1</td>" in page and "<code>m</code>" in page
    assert f"data:image/png;base64,{base64.b64encode(PNG).decode()}" in page
    assert "report_files" not in page and not re.search(r"""(src|href)=["']?https?:""", page)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    config = SweepConfig(dataset="demo", limit=8, folds=3, layers=["1"], strengths=[2.0], mode="score", transfer=False)
    run_sweep(config, out, lm=tiny_lm("llama"))
    return out


def test_a_section_is_one_function_and_one_line(sweep_dir, monkeypatch):
    """A section appended to SECTIONS lands in both files after the others, with its figure; one returning None
    leaves no heading; the two files carry the same headings in the same order."""

    def toy(ctx: report.Context) -> Section:
        return Section(f"Toy ({len(ctx.a.sample_ids)} items)", "toy body", (Figure("Toy figure", "toy", PNG),))

    def absent(ctx: report.Context) -> None:
        return None

    monkeypatch.setattr(report, "SECTIONS", (*report.SECTIONS, absent, toy))
    write_report(sweep_dir)
    md = (sweep_dir / "report.md").read_text()
    page = (sweep_dir / "report.html").read_text()
    titles = re.findall(r"^## (.*)$", md, re.M)
    assert titles == re.findall(r"<h2>(.*?)</h2>", page)
    assert titles[:3] == ["Protocol", "Headline", "Methods side by side"]
    assert not re.search(r"^## .*\n\n\n", md, re.M)  # no heading without a body: None gives no section
    figures = titles.index("Gain over strength × layer")
    assert titles[figures - 1] == "Toy (8 items)" and titles[-1] == "Toy figure"
    assert "## Toy (8 items)\n\ntoy body\n" in md and "![Toy figure](report_files/toy.png)" in md
    assert (sweep_dir / "report_files" / "toy.png").read_bytes() == PNG
    assert base64.b64encode(PNG).decode() in page and "report_files/" not in page
    assert "Cross-CWE transfer" not in md  # no transfer rows: the transfer section gives None


def test_markdown_puts_sections_then_figures():
    sections = [Section("One", "first", (Figure("F", "f", PNG),)), Section("Two", "second")]
    assert render_markdown("head", sections, [Figure("F", "f", PNG)]) == (
        "# vulnsteer sweep report\n\nhead\n\n## One\n\nfirst\n\n## Two\n\nsecond\n\n## F\n\n![F](report_files/f.png)\n"
    )


def test_an_arms_side_effect_pools_each_items_kl_under_the_config_chosen_for_its_fold():
    """Items of fold 0 count under fold 0's config, of fold 1 under fold 1's; the baseline steers nothing (KL 0);
    an arm whose config was not measured has no figure."""
    from vulnsteer.experiments.analysis import Analysis, arm_side_effect
    from vulnsteer.experiments.sweep import BASELINE
    from vulnsteer.records import Result

    ids = ["s0", "s1", "s2", "s3"]
    rows = [
        Result(
            s,
            f"p{k // 2}",
            "CWE-787",
            ("vulnerable", "patched")[k % 2],
            "t",
            "x",
            "S1",
            "score",
            "",
            "unknown",
            0.0,
            1,
            0,
            0.0,
        )
        for k, s in enumerate(ids)
    ]
    a = Analysis({}, SweepConfig(), ids, {BASELINE: rows}, {"s0": 0, "s1": 0, "s2": 1, "s3": 1}, [], rows, {}, {})
    tokens = [10, 10, 20, 20]
    effects = {
        "sample_ids": ids,
        "configs": [
            {"config": "x", "per_item": {"kl": [1.0, 2.0, 3.0, 4.0], "tokens": tokens}},
            {"config": "y", "per_item": {"kl": [5.0, 6.0, 7.0, 8.0], "tokens": tokens}},
        ],
    }
    assert arm_side_effect(a, effects, {0: "x", 1: "y"}).value == pytest.approx((1 + 2 + 7 + 8) / 60)
    assert arm_side_effect(a, effects, {0: "y", 1: "x"}).value == pytest.approx((5 + 6 + 3 + 4) / 60)
    assert arm_side_effect(a, effects, {0: "x", 1: BASELINE}).value == pytest.approx(3 / 60)
    assert arm_side_effect(a, effects, {0: BASELINE, 1: BASELINE}).value == 0.0
    assert arm_side_effect(a, effects, {0: "x", 1: "z"}) is None
    assert arm_side_effect(a, {"configs": effects["configs"]}, {0: "x", 1: "y"}) is None  # a store from before
