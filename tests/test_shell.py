"""The pipeline is the library and the command line its shell: `run_local_eval`, `run_probe` and `run_sweep` write
their files and return what they computed without printing it (only progress); `vulnsteer eval`, `probe`, `sweep`
and `report` print it."""

from __future__ import annotations

import json

from conftest import run_cli, tiny_lm

from vulnsteer.data import filter_samples, load_dataset
from vulnsteer.experiments.sweep import SweepConfig
from vulnsteer.pipeline import local, run_local_eval, run_probe, run_sweep
from vulnsteer.prompts import PromptResources
from vulnsteer.records import Decoding

TABLE = "95% intervals"  # the eval table's title ends so
SWEEP = dict(
    dataset="demo", limit=8, folds=3, layers=["1"], strengths=[1.0], mode="score", transfer=False, vectors=["pooled"]
)


def test_run_local_eval_returns_its_results_and_prints_no_table(tmp_path, capsys):
    samples = filter_samples(load_dataset("demo"), limit=4)
    run = run_local_eval(tiny_lm("llama"), samples, "S1", Decoding(mode="score"), tmp_path)
    out = capsys.readouterr().out
    assert TABLE not in out and "balanced acc" not in out, out
    assert [r.sample_id for r in run.results] == [s.id for s in samples]
    assert run.summaries["all"].n == len(samples) and run.out_dir == tmp_path
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["metrics"]["all"] == run.summaries["all"].to_dict() and written["meta"] == run.meta


def test_vulnsteer_eval_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vulnsteer.cli.load_lm", lambda *a, **k: local(tiny_lm("llama")))
    code, out, err = run_cli(["eval", "--limit", "4", "--mode", "score", "-o", str(tmp_path)], capsys)
    assert code == 0, err
    assert TABLE in out and "prompt S1 · score" in out and "balanced acc" in out


def test_run_probe_returns_its_rows_and_the_cli_prints_them(tmp_path, capsys, monkeypatch):
    samples = filter_samples(load_dataset("demo"), limit=8)
    run = run_probe(tiny_lm("llama"), samples, "S1", PromptResources(), "mean-diff", [1, 2], "prompt-last", 2, tmp_path)
    assert "probe AUROC" not in capsys.readouterr().out
    assert {(r.layer, r.group) for r in run.rows} >= {(1, "pooled"), (2, "pooled")}
    assert json.loads((tmp_path / "probe.json").read_text())["rows"][0]["layer"] == run.rows[0].layer
    monkeypatch.setattr("vulnsteer.cli.load_lm", lambda *a, **k: local(tiny_lm("llama")))
    code, out, err = run_cli(["probe", "--limit", "8", "--layers", "1,2", "--folds", "2"], capsys)
    assert code == 0, err
    assert "probe AUROC" in out and "best layers (pooled): " in out


def test_run_sweep_returns_the_report_and_prints_no_headline_the_cli_prints_it(tmp_path, capsys, monkeypatch):
    run = run_sweep(SweepConfig(**SWEEP), tmp_path, lm=tiny_lm("llama"))
    out = capsys.readouterr().out
    assert "Headline" not in out and "report:" not in out, out
    assert "sweep: " in out  # progress still shows
    report = run.report
    assert report.headline is not None and report.items == len(run.analysis.sample_ids) == 8
    assert report.headline.markdown in report.markdown.read_text() and report.html.exists()
    # The command line shows them: resuming the finished sweep rewrites and prints its report, as `report` does.
    monkeypatch.setattr("vulnsteer.pipeline.load", lambda *a, **k: local(tiny_lm("llama")))
    for args in (["sweep", "--resume", str(tmp_path)], ["report", str(tmp_path)]):
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
        assert "Headline (8 items)" in out and f"report: {report.html} and {report.markdown}" in out
