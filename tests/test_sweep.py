"""Sweeps on a tiny model: protocol, store, resume after SIGKILL, config validation, report files."""

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from conftest import HOLMES, tiny_lm

from vulnsteer.data import load_demo
from vulnsteer.errors import VulnsteerError
from vulnsteer.experiments.analysis import analyse
from vulnsteer.experiments.sweep import (
    BASELINE,
    GridPoint,
    SweepConfig,
    candidate_points,
    grid,
    load_config,
    points_by_id,
)
from vulnsteer.pipeline import run_sweep
from vulnsteer.protocol import pair_folds

SMALL = dict(
    dataset="demo", limit=8, folds=3, layers=["1", "0,2"], strengths=[-2.0, 2.0], mode="score", transfer_strength=2.0
)


def table(path):
    """rows.csv without the timing column, sorted: what must be equal between two runs."""
    with open(path) as f:
        rows = [r[:-1] for r in csv.reader(f)]
    return rows[0], sorted(rows[1:])


def test_folds_keep_pairs_and_scenarios_together():
    samples = load_demo()
    for train, test in pair_folds(samples, k=4):
        assert {samples[i].pair_id for i in train}.isdisjoint({samples[i].pair_id for i in test})
    assert sorted(i for _, test in pair_folds(samples, k=4) for i in test) == list(range(len(samples)))


def test_sweep_rows_are_held_out_and_complete(tmp_path):
    lm = tiny_lm("llama")
    config = SweepConfig(**SMALL)
    report = run_sweep(config, tmp_path, lm=lm).report.html
    assert report.exists() and (tmp_path / "report.md").exists()
    html = report.read_text()
    assert "data:image/png;base64," in html and "Protocol" in html and "Headline" in html
    a = analyse(tmp_path)
    n = len(a.sample_ids)
    points = grid(config, sorted({r.cwe for r in a.arms[BASELINE]}))
    assert set(a.arms) == {BASELINE, *(p.id for p in points)}
    assert all(len(rows) == n for rows in a.arms.values())
    assert {r.prompt_id for rows in a.arms.values() for r in rows} == {config.prompt}  # steered rows too
    # Every fold's nested selection has rows of every pooled candidate.
    assert set(a.selection) == set(a.folds.values())
    for by_config in a.selection.values():
        assert {c for c in candidate_points(config) if "|pooled|" in c} <= set(by_config)
    store = sqlite3.connect(tmp_path / "sweep.sqlite")
    assert store.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = store.execute("SELECT config, sample_id, fold, result FROM rows").fetchall()
    assert len(rows) == n * (1 + len(points))
    meta = dict(store.execute("SELECT key, value FROM meta"))
    assert json.loads(meta["config"])["strengths"] == [-2.0, 2.0]
    # Each steered row records the fold whose vectors steered it; that fold's training set excludes the item.
    for config_id, sample_id, fold, result in rows:
        steering = json.loads(result)["steering"]
        if config_id != BASELINE:
            assert steering["config"] == config_id and steering["fold"] == fold == a.folds[sample_id]
    # The nested selection picks per fold from the grid (or the baseline), never a control or a transfer row.
    for chosen in a.selected_by_fold.values():
        assert chosen == BASELINE or points_by_id(config)[chosen].vectors.kind in {"own", "pooled"}
    assert "random-direction control" in (tmp_path / "report.md").read_text()
    # Side effects: every strength of the shape of the top config (and of each fold's chosen one), each with a cost.
    effects = json.loads((tmp_path / "side_effects.json").read_text())["configs"]
    top = next(s.config for s in a.stats if s.config in candidate_points(config))
    shape = top.rsplit("|", 1)[0]
    assert {e["config"] for e in effects} >= {f"{shape}|{s:+g}" for s in config.strengths}
    assert all(e["kl"]["value"] > 0 and e["tokens"] > 0 for e in effects)
    assert "Side effects on plain code" in (tmp_path / "report.md").read_text()


def test_resume_is_refused_for_another_dataset(tmp_path):
    lm = tiny_lm("llama")
    run_sweep(SweepConfig(**{**SMALL, "transfer": False, "strengths": [2.0]}), tmp_path, lm=lm)
    with pytest.raises(VulnsteerError, match="another"):
        run_sweep(SweepConfig(**{**SMALL, "transfer": False, "strengths": [2.0], "limit": 4}), tmp_path, lm=lm)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"strenghts": [1]}, "unknown key"),
        ({"strengths": []}, "non-empty"),
        ({"strengths": ["a"]}, "numbers"),
        ({"methods": ["magic"]}, "unknown value"),
        ({"positions": ["generated"], "mode": "score"}, "steers nothing"),
        ({"folds": 1}, "folds"),
        ({"folds": 2}, "folds"),  # nested selection's vectors leave out two folds
        ({"transfer": "no"}, "transfer must be bool"),
        ({"strengths": [0]}, "every strength is 0"),
        ({"select_metric": "auroc", "mode": "generate"}, "needs mode score"),
        ({"random_draws": 0}, "random_draws"),
        ({"vectors": ["own", "everything"]}, "unknown value"),
        ({"batch_tokens": 0}, "batch_tokens"),
        ({"batch_tokens": "auto"}, "batch_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"prompts": ["S1", "S99"]}, "prompts has unknown value"),
        ({"lora_steps": -1}, "lora_steps"),
        ({"lora_steps": 2, "mode": "generate"}, "lora_steps needs mode score"),
    ],
)
def test_invalid_configs_are_refused(bad, message):
    with pytest.raises(VulnsteerError, match=message):
        SweepConfig.from_dict(bad)


def test_the_best_prompt_and_lora_flags_reach_the_config():
    """`--prompts all --lora-steps 3`: every prompt but the sweep's own is a candidate; LoRA runs 3 steps a fold."""
    from vulnsteer.cli import _sweep_overrides
    from vulnsteer.experiments.sweep import prompt_candidates
    from vulnsteer.prompts import PROMPT_IDS

    config = load_config(None, _sweep_overrides(prompts="all", lora_steps=3, prompt="S2"))
    assert prompt_candidates(config) == [p for p in PROMPT_IDS if p != "S2"] and config.lora_steps == 3
    assert prompt_candidates(load_config(None, _sweep_overrides(prompts="S1,S3,S3"))) == ["S3"]
    assert list(load_config(None, _sweep_overrides(rank="1,4")).fits) == [
        "mean-diff",
        "trained",
        "loreft-r1",
        "loreft-r4",
    ]
    assert list(load_config(None, _sweep_overrides(rank="2")).fits) == ["mean-diff", "trained", "loreft"]
    with pytest.raises(VulnsteerError, match="--rank must be integers"):
        _sweep_overrides(rank="1,x")
    grid = load_config(None, _sweep_overrides(learned_steps="10,40", max_norm="0.5,2", methods="trained,loreft"))
    assert {n: (f.training.steps, f.training.max_norm) for n, f in grid.fits.items() if n.startswith("trained")} == {
        "trained-s10-n0.5": (10, 0.5),
        "trained-s10-n2": (10, 2.0),
        "trained-s40-n0.5": (40, 0.5),
        "trained-s40-n2": (40, 2.0),
    }
    assert list(grid.fits)[4:] == ["loreft-s10", "loreft-s40"]  # a norm bound is not a loreft hyper-parameter
    with pytest.raises(VulnsteerError, match="--max-norm must be numbers"):
        _sweep_overrides(max_norm="0.5,big")
    with pytest.raises(VulnsteerError, match="max_norm must be finite numbers > 0"):
        load_config(None, _sweep_overrides(max_norm="0"))


def test_toml_config_and_flag_overrides(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('dataset = "demo"\nstrengths = [-1, 1]\nlayers = ["rel:0.5"]\n')
    config = load_config(path, {"strengths": [0.5], "limit": None})
    assert config.strengths == [0.5] and config.layers == ["rel:0.5"] and config.limit is None
    path.write_text("strengths = [1,")
    with pytest.raises(VulnsteerError, match="not valid TOML"):
        load_config(path, {})


def test_layers_out_of_range_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(VulnsteerError, match="out of range"):
        run_sweep(SweepConfig(**{**SMALL, "layers": ["9"]}), tmp_path, lm=tiny_lm("llama"))
    assert not (tmp_path / "sweep.sqlite").exists()


def _sweep_cmd(model_dir, out_dir, *extra):
    return [
        sys.executable,
        "-m",
        "vulnsteer.cli",
        "sweep",
        "--model",
        str(model_dir),
        "--dataset",
        "demo",
        "--limit",
        "8",
        "--folds",
        "3",
        "--layers",
        "1;0,2",
        "--strengths",
        "-2,-1,1,2",
        "--mode",
        "generate",
        "--max-new-tokens",
        "12",
        "--no-transfer",
        "--dtype",
        "float32",
        "-o",
        str(out_dir),
        *extra,
    ]


def test_sigkill_midway_then_resume_equals_uninterrupted_run(tmp_path):
    """A sweep killed with SIGKILL and resumed ends with exactly the rows of an uninterrupted run."""
    lm = tiny_lm("qwen2")
    model_dir = tmp_path / "tiny-model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    env = {**os.environ, "VULNSTEER_CACHE": str(tmp_path / "cache")}

    subprocess.run(_sweep_cmd(model_dir, tmp_path / "full"), env=env, check=True, capture_output=True)
    expected = table(tmp_path / "full" / "rows.csv")

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _sweep_cmd(model_dir, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    db, n_rows, deadline = killed / "sweep.sqlite", 0, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                n_rows = sqlite3.connect(db).execute("SELECT COUNT(*) FROM rows").fetchone()[0]
            except sqlite3.OperationalError:
                n_rows = 0
            if n_rows >= 5:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < n_rows < len(expected[1])

    resumed = subprocess.run(
        [sys.executable, "-m", "vulnsteer.cli", "sweep", "--resume", str(killed)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "already done" in resumed.stdout
    got = table(killed / "rows.csv")
    differ = sorted(set(map(tuple, got[1])) ^ set(map(tuple, expected[1])))
    assert got == expected, f"{len(differ)} rows differ, e.g. {differ[:4]}"


def test_random_control_has_the_norm_of_the_real_vector_and_is_fixed():
    import torch

    from vulnsteer.experiments.sweep import random_direction

    like = torch.randn(64) * 3
    a, b = random_direction(like, 5), random_direction(like, 5)
    assert torch.equal(a, b) and torch.isclose(a.norm(), like.norm())
    assert abs(torch.nn.functional.cosine_similarity(a, like, dim=0)) < 0.5
    assert not torch.equal(a, random_direction(like, 6))


def test_fold_thresholds_are_fitted_on_other_folds_only():
    import numpy as np

    from vulnsteer.experiments.analysis import best_threshold, fold_thresholded
    from vulnsteer.records import Result

    assert best_threshold(np.array([1.0, 2.0, 3.0, 4.0]), np.array([False, False, True, True])) == 2.5
    assert best_threshold(np.array([1.0, 2.0]), np.array([True, True])) == 0.0

    def row(i, label, score):
        return Result(f"s{i}", f"p{i // 2}", "CWE-787", label, "t", "x", "S1", "score", "", "", score, 1, 0, 0.0)

    # A biased model: every score is above 0, but vulnerable files score higher.
    arm = [
        row(i, "vulnerable" if i % 2 == 0 else "patched", 5.0 + (1.0 if i % 2 == 0 else 0.0) + 0.01 * i)
        for i in range(8)
    ]
    folds = {f"s{i}": i // 4 for i in range(8)}
    items = fold_thresholded(arm, folds)
    assert [it.verdict for it in items] == ["vulnerable", "not_vulnerable"] * 4
    # Moving one fold's scores cannot change that fold's own threshold, only the other fold's.
    shifted = [row(i, r.label, r.score + (100.0 if folds[r.sample_id] == 0 else 0.0)) for i, r in enumerate(arm)]
    assert [it.verdict for it in fold_thresholded(shifted, folds)[:4]] == ["vulnerable"] * 4


# --- the held-out guarantees, each able to fail -----------------------------------------------------------------


def test_every_bank_is_fitted_without_the_folds_it_steers(monkeypatch):
    from vulnsteer.data import family
    from vulnsteer.experiments import sweep as sweep_module
    from vulnsteer.experiments.sweep import load_sweep_samples, plan
    from vulnsteer.extract.vectors import parse_layers
    from vulnsteer.prompts import PromptResources

    config = SweepConfig(**{**SMALL, "limit": 12, "folds": 3, "read": "code-mean", "seed": 3})
    test, _, _ = load_sweep_samples(config)
    lm = tiny_lm("llama")
    # Fixed directions need no prefix pass over the prompts (only learned methods train on the model's answers).
    monkeypatch.setattr(sweep_module, "prefix_pass", lambda *a, **k: pytest.fail("a prefix pass for mean-diff"))
    sweep = plan(config, lm, test, None, PromptResources.from_dataset_root(None), set())
    by_id = {s.id: s for s in test}
    # The folds are the configured seed's.
    assert sweep.fold_of == {test[i].id: f for f, (_, held_out) in enumerate(pair_folds(test, 3, 3)) for i in held_out}
    # Every steered job steers the layers of its config's layer set, and only those.
    points = {p.id: p for p in sweep.points}  # the grid's and the transfer matrix's
    steered = [j.steering for j in sweep.jobs if j.steering is not None]
    assert {frozenset(s.vectors) for s in steered} == {frozenset({1}), frozenset({0, 2})}
    assert all(set(s.vectors) == set(parse_layers(points[s.label.config].layers, lm.num_layers)) for s in steered)
    # Every bank read its activations where and as the sweep asks (score mode's prompt, the configured position).
    every_bank = [*sweep.banks.values(), *sweep.selection_banks.values()]
    assert {(b.meta["mode"], b.meta["read"]) for banks in every_bank for b in banks.values()} == {
        ("score", "code-mean")
    }

    def families(fold_ids):
        return {family(s) for s in test if sweep.fold_of[s.id] in fold_ids}

    for fold, banks in sweep.banks.items():
        for bank in banks.values():
            assert {family(by_id[i]) for i in bank.meta["train_ids"]}.isdisjoint(families({fold}))
            assert len(bank.meta["train_ids"]) == sum(sweep.fold_of[s.id] != fold for s in test)
    assert set(sweep.selection_banks) == {(f, g) for f in range(3) for g in range(3) if f != g}
    for (f, g), banks in sweep.selection_banks.items():
        for bank in banks.values():
            assert {family(by_id[i]) for i in bank.meta["train_ids"]}.isdisjoint(families({f, g}))
    # Every selection job is steered by the bank fitted without its outer fold and its own fold.
    selection_jobs = [j for j in sweep.jobs if j.steering and j.steering.label.outer is not None]
    assert selection_jobs and all(j.steering.label.outer != sweep.fold_of[j.sample.id] for j in selection_jobs)
    # ... own-CWE configs included, wherever the bank holds the item's CWE.
    assert any(points[j.steering.label.config].vectors.kind == "own" for j in selection_jobs)
    assert sweep.total_rows == len(sweep.jobs)  # what the progress counts: every row, selection rows included


def _row(i, label, verdict, score=0.0, split="t"):
    from vulnsteer.records import Result

    return Result(f"s{i:02d}", f"p{i // 2}", "CWE-787", label, split, "x", "S1", "score", "", verdict, score, 1, 0, 0.0)


def test_nested_selection_reads_selection_rows_never_the_test_fold():
    """Config A looks best on the other folds' test rows (whose vectors saw this fold) and on this fold itself;
    config B is best on the selection rows. Choosing for fold 0 must take B."""
    from vulnsteer.experiments.analysis import nested_selection

    config = SweepConfig(**{**SMALL, "strengths": [1.0, 2.0], "layers": ["1"], "vectors": ["own"]})
    a_id, b_id = (GridPoint("mean-diff", "1", "own", "prompt-last", s).id for s in (1.0, 2.0))
    n = 12
    labels = ["vulnerable" if i % 2 == 0 else "patched" for i in range(n)]
    right = lambda i: "vulnerable" if labels[i] == "vulnerable" else "not_vulnerable"  # noqa: E731
    wrong = lambda i: "not_vulnerable" if labels[i] == "vulnerable" else "vulnerable"  # noqa: E731
    folds = {f"s{i:02d}": i // 4 for i in range(n)}
    arms = {
        BASELINE: [_row(i, labels[i], "vulnerable") for i in range(n)],
        a_id: [_row(i, labels[i], right(i)) for i in range(n)],
        b_id: [_row(i, labels[i], wrong(i)) for i in range(n)],
    }
    selection = {
        f: {
            a_id: {f"s{i:02d}": _row(i, labels[i], wrong(i)) for i in range(n) if i // 4 != f},
            b_id: {f"s{i:02d}": _row(i, labels[i], right(i)) for i in range(n) if i // 4 != f},
        }
        for f in range(3)
    }
    sample_ids = sorted(folds)
    _, chosen = nested_selection(arms, sample_ids, folds, config, selection)
    assert chosen == {0: b_id, 1: b_id, 2: b_id}
    # With vectors fitted on another dataset the other folds' test rows are clean, and are what selection reads.
    _, chosen = nested_selection(arms, sample_ids, folds, replace(config, train_dataset="demo"), {})
    assert chosen == {0: a_id, 1: a_id, 2: a_id}


def test_selected_thresholds_are_fitted_on_the_chosen_configs_selection_rows():
    from vulnsteer.experiments.analysis import Analysis, selected_thresholded

    config = SweepConfig(**{**SMALL, "strengths": [1.0, 2.0], "layers": ["1"], "vectors": ["own"]})
    a_id, b_id = (GridPoint("mean-diff", "1", "own", "prompt-last", s).id for s in (1.0, 2.0))
    n = 12
    labels = ["vulnerable" if i % 2 == 0 else "patched" for i in range(n)]
    folds = {f"s{i:02d}": i // 4 for i in range(n)}
    # Test rows: vulnerable items score 10, patched 9 (threshold 9.5 separates them).
    arm = [_row(i, labels[i], "vulnerable", 10.0 if labels[i] == "vulnerable" else 9.0) for i in range(n)]
    # B's selection rows put the best threshold near 0.5, A's test rows near 9.5.
    selection = {
        f: {
            b_id: {
                f"s{i:02d}": _row(i, labels[i], "vulnerable", 1.0 if labels[i] == "vulnerable" else 0.0)
                for i in range(n)
                if i // 4 != f
            }
        }
        for f in range(3)
    }
    a = Analysis(
        {},
        config,
        sorted(folds),
        {BASELINE: arm, a_id: arm, b_id: arm},
        folds,
        [],
        arm,
        {0: b_id, 1: b_id, 2: b_id},
        selection,
    )
    assert [it.verdict for it in selected_thresholded(a)] == ["vulnerable"] * n  # 9 and 10 are both above 0.5


def test_strength_zero_rows_on_every_path_equal_the_baseline_in_float32(tmp_path):
    config = SweepConfig(**{**SMALL, "positions": ["prompt-last", "all"], "transfer": False, "random_draws": 1})
    run_sweep(config, tmp_path, lm=tiny_lm("qwen2"))
    a = analyse(tmp_path)
    control = GridPoint("mean-diff", "1", "own", "all", 0.0).id
    assert control in a.arms
    for row, base in zip(a.arms[control], a.arms[BASELINE]):
        assert row.score == pytest.approx(base.score, abs=1e-5) and row.verdict == base.verdict
    assert "Numeric path check" in (tmp_path / "report.md").read_text()


def test_test_items_that_share_a_family_or_code_with_the_training_set_are_refused_or_dropped(tmp_path, capsys):
    from dataclasses import asdict

    from vulnsteer.experiments.sweep import load_sweep_samples

    demo = load_demo()[:8]
    copies = tmp_path / "copies.jsonl"  # the first two pairs under other ids and another source, plus one new pair
    rows = [
        {
            **asdict(s),
            "id": f"copy-{s.id}",
            "pair_id": f"copy-{s.pair_id}",
            "source": "elsewhere",
            "code": "  " + s.code.replace("\n", "\n\n"),
        }
        for s in demo[:4]
    ]
    rows += [
        {
            **asdict(s),
            "id": f"new-{s.id}",
            "pair_id": f"new-{s.pair_id}",
            "source": "elsewhere",
            "code": s.code + "\nint unrelated_helper(void) { return 7; }\n",
        }
        for s in demo[6:8]
    ]
    copies.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "reasoning"}) + "\n" for r in rows))
    config = SweepConfig(**{**SMALL, "limit": 6, "train_dataset": str(copies)})
    with pytest.raises(VulnsteerError, match="^4 of the 6 test items .* pass --drop-overlap"):
        load_sweep_samples(config)
    test, train, note = load_sweep_samples(SweepConfig(**{**asdict(config), "drop_overlap": True}))
    assert {s.id for s in test} == {s.id for s in demo[4:6]} and len(train or []) == 6
    assert note and note.startswith("dropped 4 of 6 test items") and note in capsys.readouterr().err
    with pytest.raises(VulnsteerError, match="nothing is held out"):
        load_sweep_samples(SweepConfig(**{**SMALL, "limit": None, "train_dataset": "demo", "drop_overlap": True}))


def test_resume_refuses_another_dtype_an_edited_config_and_foreign_rows(tmp_path):
    from vulnsteer.experiments.sweep import config_from_store

    config = SweepConfig(**{**SMALL, "transfer": False, "strengths": [2.0], "random_draws": 1})
    lm = tiny_lm("llama")
    run_sweep(config, tmp_path, lm=lm)
    lm.model.to(torch.bfloat16)
    with pytest.raises(VulnsteerError, match="dtype"):
        run_sweep(config, tmp_path, lm=lm)
    db = sqlite3.connect(tmp_path / "sweep.sqlite")
    stored = json.loads(db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps({**stored, "strengths": [3.0]}),))
    with pytest.raises(VulnsteerError, match="changed after the sweep began"):
        config_from_store(tmp_path)


def test_resume_with_other_flags_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vulnsteer.cli", "sweep", "--resume", str(tmp_path), "--strengths", "5"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "drop --strengths" in result.stderr and "Traceback" not in result.stderr


def test_learned_methods_steer_single_layer_sets_only_and_need_one():
    """A learned intervention is trained alone at its layer: the grid never applies several at once, and a config
    whose layer sets all hold several layers is refused for them."""
    config = SweepConfig(methods=["mean-diff", "trained", "loreft"], layers=["rel:0.5", "1,2"], transfer=False)
    points = grid(config, ["CWE-79"])
    assert {p.layers for p in points if p.method == "mean-diff"} == {"rel:0.5", "1,2"}
    assert {p.layers for p in points if p.method in ("trained", "loreft")} == {"rel:0.5"}
    with pytest.raises(VulnsteerError, match="single-layer set"):
        SweepConfig(methods=["mean-diff", "loreft"], layers=["1,2", "all"])


def test_the_quick_grid_runs_the_learned_methods_beside_mean_diff():
    quick = load_config(None, {})
    assert quick.methods == ["mean-diff", "trained", "loreft"] and quick.learned_layers == ["rel:0.5"]
    assert load_config(None, {"learned_steps": 5}).learned_steps == 5
    with pytest.raises(VulnsteerError, match="learned_steps"):
        load_config(None, {"learned_steps": 0})
    with pytest.raises(VulnsteerError, match="rank must be 1 to 8"):
        load_config(None, {"rank": 9})
    with pytest.raises(VulnsteerError, match="kl_weight"):
        load_config(None, {"kl_weight": -1.0})


def test_the_best_prompt_is_chosen_on_the_training_folds_only():
    """S3 is right on fold 0's own items and wrong elsewhere; S5 is right on the other folds' items. The prompt
    for fold 0 must be S5 (its rows on fold 0 form the arm), chosen on no item of fold 0; a prompt only as good as
    the sweep's own loses the tie to it."""
    from vulnsteer.experiments.analysis import Analysis, best_prompt

    config = SweepConfig(**{**SMALL, "prompts": ["S3", "S5", "R1"]})
    n = 12
    labels = ["vulnerable" if i % 2 == 0 else "patched" for i in range(n)]
    right = lambda i: "vulnerable" if labels[i] == "vulnerable" else "not_vulnerable"  # noqa: E731
    wrong = lambda i: "not_vulnerable" if labels[i] == "vulnerable" else "vulnerable"  # noqa: E731
    folds = {f"s{i:02d}": i // 4 for i in range(n)}
    base = [_row(i, labels[i], "vulnerable") for i in range(n)]
    others = {
        "prompt:S3": [_row(i, labels[i], right(i) if i // 4 == 0 else wrong(i)) for i in range(n)],
        "prompt:S5": [_row(i, labels[i], wrong(i) if i // 4 == 0 else right(i)) for i in range(n)],
        "prompt:R1": list(base),
    }
    a = Analysis({}, config, sorted(folds), {BASELINE: base}, folds, [], base, {}, {}, others)
    choice = best_prompt(a)
    assert choice is not None and choice.chosen[0] == "S5"
    assert choice.candidates == ["R1", "S1", "S3", "S5"]  # what the report lists: the sweep's own among them
    assert [r.verdict for r in choice.rows[:4]] == [wrong(i) for i in range(4)]  # S5's rows on fold 0
    for fold, items in choice.chosen_on.items():
        assert items and not {s for s in items if folds[s] == fold}
    # Only R1 (as good as the sweep's own S1 everywhere) and S1 left: the tie goes to S1.
    a.others = {"prompt:R1": list(base)}
    assert set(best_prompt(a).chosen.values()) == {"S1"}


def test_a_sweep_stores_the_candidate_prompts_rows_and_reports_the_best_prompt(tmp_path):
    """`prompts`: every candidate prompt's unsteered rows are stored under its own config id with its prompt (so a
    resume skips them), and the report's methods table has the best-prompt row with each fold's choice."""
    lm = tiny_lm("qwen2")
    config = SweepConfig(
        **{**SMALL, "layers": ["1"], "vectors": ["pooled"], "transfer": False, "prompts": ["S1", "S3", "strict"]}
    )
    run_sweep(config, tmp_path, lm=lm)
    a = analyse(tmp_path)
    assert set(a.others) == {"prompt:S3", "prompt:strict"}
    for config_id, rows in a.others.items():
        assert all(r.prompt_id == config_id.removeprefix("prompt:") and r.steering is None for r in rows)
    assert all(r.prompt_id == "S1" for r in a.arms[BASELINE])
    assert any(r.score != b.score for r, b in zip(a.others["prompt:S3"], a.arms[BASELINE]))  # another prompt
    text = (tmp_path / "report.md").read_text()
    assert "| best prompt (chosen on training folds) |" in text and "fold 0: " in text
    from vulnsteer.experiments.store import SweepStore
    from vulnsteer.experiments.sweep import load_sweep_samples, plan
    from vulnsteer.prompts import PromptResources

    store = SweepStore(tmp_path / "sweep.sqlite")
    test = load_sweep_samples(config)[0]
    assert plan(config, lm, test, None, PromptResources(), store.done(), store.selection_done()).todo == []
    store.close()


def test_a_candidate_prompt_the_dataset_cannot_ask_is_refused_before_any_fit(capsys):
    """The demo set has no few-shot files: S5 named is refused before a vector is fitted; "all" leaves it out."""
    from vulnsteer.experiments.sweep import candidate_prompts, load_sweep_samples, plan
    from vulnsteer.pipeline import prompt_resources

    config = SweepConfig(**{**SMALL, "prompts": ["S3", "S5"]})
    test = load_sweep_samples(config)[0]
    read = []
    with pytest.raises(VulnsteerError, match="few-shot"):
        plan(
            config,
            tiny_lm("llama"),
            test,
            None,
            prompt_resources("demo"),
            set(),
            activations=lambda samples: read.append(samples),
        )
    assert read == []
    built = candidate_prompts(SweepConfig(**{**SMALL, "prompts": ["all"]}), test, prompt_resources("demo"))
    assert "S3" in built and "S5" not in built and "S5" in capsys.readouterr().err


@pytest.mark.skipif(not HOLMES.is_dir(), reason="shared datasets not present")
def test_a_sweep_asks_every_prompt_with_its_datasets_definitions(tmp_path, capsys):
    """Prompts that quote the MITRE definition (D1 the sweep's, D2 a candidate) reach every part of a sweep that
    builds a prompt: activations, the learned fits' prefix pass, steered and selection rows, the best-prompt arm and
    the LoRA fit. Each would refuse to build its prompt without the dataset's definitions."""
    config = SweepConfig(
        dataset=str(HOLMES),
        split=["hand-crafted"],
        cwe=["CWE-787", "CWE-89", "CWE-416"],
        pairs_per_cwe=1,
        folds=3,
        prompt="D1",
        prompts=["D2"],
        methods=["mean-diff", "trained"],
        learned_steps=1,
        lora_steps=1,
        layers=["1"],
        strengths=[1.0],
        vectors=["pooled"],
        mode="score",
        transfer=False,
    )
    lm = tiny_lm("llama")
    run_sweep(config, tmp_path, lm=lm)
    # 1 steered config (pooled, +1) + the baseline, and 2 selection rows per item (one per other outer fold).
    # 2 steered configs (mean-diff, trained) + the baseline; selection: 2 configs x 2 items x 6 (outer, inner) folds.
    assert (
        "sweep: 2 steered configs + baseline × 6 items, plus 6 candidate-prompt rows, 6 LoRA rows, 24 selection rows "
        "= 54 rows (0 already done, 54 to run, mode score)"
    ) in capsys.readouterr().out
    a = analyse(tmp_path)
    assert len(a.sample_ids) == 6 and {r.prompt_id for r in a.arms[BASELINE]} == {"D1"}
    assert {r.prompt_id for r in a.others["prompt:D2"]} == {"D2"} and len(a.others["lora"]) == 6
    # `plan` with its own activations reader (the Python API's; the pipeline passes one) reads them with the
    # definitions too, and counts for the progress every row: jobs, and a LoRA row per item (fitted, not a job).
    from vulnsteer.experiments.sweep import load_sweep_samples, plan
    from vulnsteer.pipeline import prompt_resources

    test, _, _ = load_sweep_samples(config)
    sweep = plan(config, lm, test, None, prompt_resources(config.dataset), set())
    prompt_rows = sum(j.prompt_id == "D2" for j in sweep.jobs)
    assert prompt_rows == len(test) and sweep.total_rows == len(sweep.jobs) + len(test)
