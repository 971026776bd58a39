"""The held-out guarantees, checked on the rows themselves: each test below breaks one on purpose (a patched
mapping, a patched selection) and the run must refuse; a stored sweep re-verifies with `report --check`, and a
hand-edited store fails it."""

from __future__ import annotations

import json
import sqlite3

import pytest
from conftest import run_cli

from vulnsteer.errors import VulnsteerError
from vulnsteer.experiments import analysis
from vulnsteer.experiments import sweep as sweep_module
from vulnsteer.experiments.sweep import SweepConfig
from vulnsteer.models import random_model
from vulnsteer.pipeline import run_sweep

SMALL = dict(dataset="demo", limit=8, folds=3, layers=["1"], strengths=[-1.0, 1.0], mode="score", transfer=False)


@pytest.fixture(params=[["mean-diff"], ["loreft"]], ids=["mean-diff", "loreft"])
def methods(request):
    return request.param


def recording_fits(monkeypatch) -> list[tuple[frozenset, dict]]:
    """Every bank set the plan fits, with the ids of the items it was fitted on."""
    fitted: list[tuple[frozenset, dict]] = []
    fit = sweep_module._fit

    def recording(acts, *args, **kwargs):
        banks = fit(acts, *args, **kwargs)
        fitted.append((frozenset(s.id for s in acts.samples), banks))
        return banks

    monkeypatch.setattr(sweep_module, "_fit", recording)
    return fitted


def test_test_rows_steered_by_a_bank_that_saw_their_fold_are_refused(monkeypatch, tmp_path, methods):
    """Broken on purpose: a test row gets a bank fitted with its own item (another fold's bank)."""
    fitted = recording_fits(monkeypatch)
    steering_for = sweep_module.steering_for

    def wrong_bank(point, sample, fold, banks, layer_sets, outer=None):
        if outer is None:
            banks = next(b for ids, b in fitted if sample.id in ids)
        return steering_for(point, sample, fold, banks, layer_sets, outer)

    monkeypatch.setattr(sweep_module, "steering_for", wrong_bank)
    with pytest.raises(VulnsteerError, match="fitted on .* family or code, which that row must not have seen"):
        run_sweep(SweepConfig(**SMALL, methods=methods), tmp_path, lm=random_model("llama"))
    assert not sqlite3.connect(tmp_path / "sweep.sqlite").execute("SELECT COUNT(*) FROM rows").fetchone()[0]


def test_selection_rows_steered_by_a_bank_that_saw_the_outer_fold_are_refused(monkeypatch, tmp_path, methods):
    """Broken on purpose: selection row (outer f, fold g) gets the bank fitted without g only, which saw f."""
    fitted = recording_fits(monkeypatch)
    steering_for = sweep_module.steering_for

    def without_g_only(point, sample, fold, banks, layer_sets, outer=None):
        if outer is not None:
            banks = max(((ids, b) for ids, b in fitted if sample.id not in ids), key=lambda f: len(f[0]))[1]
        return steering_for(point, sample, fold, banks, layer_sets, outer)

    monkeypatch.setattr(sweep_module, "steering_for", without_g_only)
    with pytest.raises(VulnsteerError, match="which that row must not have seen"):
        run_sweep(SweepConfig(**SMALL, methods=methods), tmp_path, lm=random_model("llama"))


def test_selection_that_reads_the_fold_it_chooses_for_or_another_folds_rows_is_refused(tmp_path):
    run_sweep(SweepConfig(**SMALL), tmp_path, lm=random_model("llama"))
    a = analysis.analyse(tmp_path)
    fold = sorted(set(a.folds.values()))[0]
    candidate = next(c for c in a.arms if analysis._is_candidate(c, a.config))
    # Broken on purpose, the way a refactor could: ranking fold f on every item, its own test rows included.
    everything = [a.arms[candidate][i] for i in range(len(a.sample_ids))]
    with pytest.raises(VulnsteerError, match="would read its own test row"):
        analysis._check_selection_rows(everything, a.folds, fold, candidate)
    # Broken on purpose: fold f's choice fed, for each item, the row planned for the third fold's choice (the
    # same config and item, complete, but steered by vectors fitted without that fold, so with fold f).
    folds = sorted(a.selection)
    shifted = {
        f: {
            c: {
                sample: a.selection[next(h for h in folds if h not in (f, a.folds[sample]))][c][sample]
                for sample in by_sample
            }
            for c, by_sample in a.selection[f].items()
            if "|pooled|" in c
        }
        for f in folds
    }
    with pytest.raises(VulnsteerError, match=r"planned for fold \d \([^,]*\|pooled\|[^,]*, demo:"):  # config, item
        analysis.nested_selection(a.arms, a.sample_ids, a.folds, a.config, shifted)
    analysis.nested_selection(a.arms, a.sample_ids, a.folds, a.config, a.selection)  # as stored: fine


def test_report_check_reverifies_a_real_store_and_fails_a_hand_edited_one(tmp_path, capsys):
    run_sweep(SweepConfig(**SMALL, methods=["mean-diff", "trained"]), tmp_path, lm=random_model("llama"))

    def report_check() -> tuple[int, str, str]:
        return run_cli(["report", str(tmp_path), "--check"], capsys)

    code, out, err = report_check()
    assert code == 0 and "steered rows re-verified" in out, err
    db = sqlite3.connect(tmp_path / "sweep.sqlite")
    rowid, fold, stored = db.execute(
        "SELECT rowid, fold, result FROM rows WHERE config != 'baseline' LIMIT 1"
    ).fetchone()
    row = json.loads(stored)
    # Another fold's bank: fitted without that fold, so with this row's.
    other_fold_bank = next(
        json.loads(r)["steering"]["bank"]
        for f, r in db.execute("SELECT fold, result FROM rows WHERE config != 'baseline'")
        if f != fold
    )
    assert other_fold_bank != row["steering"]["bank"]
    row["steering"]["bank"] = other_fold_bank
    with db:
        db.execute("UPDATE rows SET result = ? WHERE rowid = ?", (json.dumps(row), rowid))
    db.close()
    code, out, err = report_check()
    errors = [line for line in err.splitlines() if line.startswith("vulnsteer: error:")]
    assert code == 1 and len(errors) == 1 and "must not have seen" in errors[0], err


def test_augmented_copies_of_a_test_scenario_never_count_as_held_out():
    """Item 5: the family joins a hand-crafted scenario with every augmented copy of it (and near-duplicates in any
    source). Fitting on SecLLMHolmes' augmented files and testing on the hand-crafted ones holds nothing out."""
    from conftest import HOLMES

    from vulnsteer.data import family, load_secllmholmes
    from vulnsteer.protocol import held_out, overlapping, training_keys

    if not HOLMES.exists():
        pytest.skip("../shared/datasets/secllmholmes is not here")
    items = load_secllmholmes(HOLMES)
    test = [s for s in items if s.split == "hand-crafted"]
    augmented = [s for s in items if s.split.startswith("augmented")]
    assert len(augmented) >= 136 and {family(s) for s in augmented} <= {family(s) for s in test}
    leaked = {s.id for s in overlapping(test, set(training_keys(augmented)))}
    with pytest.raises(VulnsteerError, match=r"^\d+ of the 48 test items .* pass --drop-overlap"):
        held_out(test, leaked, False, "the augmented files")
    assert len(held_out(test, leaked, True, "the augmented files").samples) < len(test)


def test_clustered_intervals_are_never_narrower_than_the_plain_one():
    """Item 6: the design effect is floored at 1. Clusters whose members disagree (negative intra-cluster
    correlation) would otherwise shrink the interval below what independent units give."""
    from vulnsteer.metrics import clustered_proportion, wilson_interval

    success = [True, False] * 10  # each cluster of two: one right, one wrong
    clusters = [k // 2 for k in range(20)]
    clustered, plain = clustered_proportion(success, clusters), wilson_interval(10, 20)
    assert clustered.low == pytest.approx(plain.low) and clustered.high == pytest.approx(plain.high)


def test_the_path_check_compares_the_strength_0_rows_with_the_baseline(tmp_path):
    """Item 7: a strength-0 row whose score moved must show in the path check (comparing the control with itself
    would show nothing)."""
    run_sweep(SweepConfig(**{**SMALL, "positions": ["all"], "vectors": ["pooled"]}), tmp_path, lm=random_model("llama"))
    assert all(row[1] == "0" for row in analysis.path_check(analysis.analyse(tmp_path)))  # float32: equal
    db = sqlite3.connect(tmp_path / "sweep.sqlite")
    control = analysis.path_controls(SweepConfig(**{**SMALL, "positions": ["all"], "vectors": ["pooled"]}))[0].id
    rowid, stored = db.execute("SELECT rowid, result FROM rows WHERE config = ? LIMIT 1", (control,)).fetchone()
    row = json.loads(stored)
    row["score"] += 0.5
    with db:
        db.execute("UPDATE rows SET result = ? WHERE rowid = ?", (json.dumps(row), rowid))
    db.close()
    (checked,) = analysis.path_check(analysis.analyse(tmp_path))
    assert float(checked[1]) == pytest.approx(0.5, abs=1e-3)


def test_strength_0_rows_run_on_the_steered_path_not_the_baselines(lm):
    """Item 8: a path control (strength 0 at every position) must take the path its steered twins take (the whole
    prompt, steered), not the baseline's shared prefix; otherwise it checks nothing."""
    import torch
    from test_evaluation import make_jobs, make_samples

    from vulnsteer.engine.evaluate import evaluate
    from vulnsteer.engine.runners import default_runners
    from vulnsteer.records import Decoding, Job, Steering

    samples = make_samples(4)
    zero = Steering({1: torch.ones(lm.hidden_size)}, 0.0, "all")
    steered = Steering({1: torch.ones(lm.hidden_size)}, 1.0, "all")
    jobs = [
        *make_jobs(samples),
        *(Job(j.sample, j.prompt_id, j.prompt, zero) for j in make_jobs(samples)),
        *(Job(j.sample, j.prompt_id, j.prompt, steered) for j in make_jobs(samples)),
    ]
    seen: dict[str, list] = {}

    def spy(path, runner):
        class Spy:
            def run(self, lm_, texts, steerings):
                seen.setdefault(path, []).extend(steerings or [None] * len(texts))
                return runner.run(lm_, texts, steerings)

        return Spy()

    runners = {path: spy(path, runner) for path, runner in default_runners(0).items()}
    evaluate(lm, jobs, Decoding("score"), runners=runners)
    paths_of = {
        name: {path for path, rows in seen.items() if any(row is kind for row in rows)}
        for name, kind in (("zero", zero), ("steered", steered))
    }
    assert paths_of["zero"] == paths_of["steered"] and len(paths_of["zero"]) == 1, seen.keys()


def test_the_fitted_threshold_is_exact_under_float_noise_and_ties_take_the_middle_of_their_run():
    """Item 10: scores equal up to float noise (a resumed run's) fit one threshold; a tie between thresholds is
    broken by the middle of the first run of best ones, not by which rounding came first."""
    import numpy as np

    from vulnsteer.experiments.analysis import best_threshold

    labels = np.array([False, True, False, True, True, False])
    scores = np.array([-1.0, 0.5, 0.2, 0.2, 2.0, -0.3])
    noisy = scores + np.array([1e-6, -2e-6, 3e-6, -1e-6, 0.0, 2e-6])
    assert best_threshold(scores, labels) == best_threshold(noisy, labels)
    # Patched 1 and 3, vulnerable 3 and 4: thresholds 2 and 3.5 both reach balanced accuracy 0.75, and no
    # candidate lies between them: the tie is broken by their middle, 2.75, not by which comes first.
    tied = np.array([1.0, 3.0, 3.0, 4.0])
    assert best_threshold(tied, np.array([False, False, True, True])) == 2.75


def test_the_report_says_in_how_many_folds_each_config_could_be_chosen(tmp_path):
    """Item 9: an own-CWE config without all its selection rows in a fold cannot be chosen there; the report says
    so per config instead of listing it among the winners silently."""
    run_sweep(SweepConfig(**{**SMALL, "vectors": ["own", "pooled"]}), tmp_path, lm=random_model("llama"))
    a = analysis.analyse(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "eligible (folds)" in report
    folds = sorted(set(a.folds.values()))
    for stat in a.stats[:15]:
        n = sum(
            analysis.selection_rows(a.arms, a.sample_ids, a.folds, a.config, a.selection, f, stat.config) is not None
            for f in folds
        )
        escaped = stat.config.replace("|", "\\|")  # Markdown tables escape the bars of a config id
        line = next(line for line in report.splitlines() if line.startswith(f"| {escaped} |"))
        assert f"| {n}/{len(folds)} |" in line, line


def test_a_vector_file_drops_the_test_items_it_was_fitted_on_by_family_or_code_and_refuses_when_none_is_left(capsys):
    """`eval --vectors`: items sharing a family (the twin of a training item) or code (a copy under another id)
    with the file's training set are refused with their count, or dropped with --drop-overlap; a file without
    keys (older vulnsteer) compares ids."""
    from vulnsteer.data import Sample
    from vulnsteer.protocol import held_out, leaked_ids, training_keys

    def item(pair: str, label: str, code: str) -> Sample:
        return Sample(f"{pair}:{label}", "CWE-79", label, "c", code, pair, "t", "demo")  # type: ignore[arg-type]

    train = [item("a", "vulnerable", "int f() { return 1; }")]
    twin, copy = item("a", "patched", "int f() { return 2; }"), item("z", "vulnerable", "int  f() {return 1;}")
    fresh = [
        item("b", "vulnerable", "char *g(char *s) { return strdup(s); }"),
        item("b", "patched", "char *g(char *s) { return s ? strdup(s) : NULL; }"),
    ]
    meta = {"train_keys": training_keys(train)}
    leaked = leaked_ids([twin, *fresh, copy], meta)
    assert leaked == {twin.id, copy.id}
    with pytest.raises(VulnsteerError, match="2 of the 4 test items"):
        held_out([twin, *fresh, copy], leaked, False, "the file's training items")
    kept = held_out([twin, *fresh, copy], leaked, True, "the file's training items")
    assert kept.samples == fresh and kept.dropped == 2
    assert not leaked_ids(fresh, meta)
    assert leaked_ids([twin, *fresh], {"train_ids": [twin.id]}) == {twin.id}
    assert "compared by id only" in capsys.readouterr().err
    assert not leaked_ids(fresh, {})  # a file that records no training set: nothing to compare
    with pytest.raises(VulnsteerError, match="every one of the 2 test items shares"):
        held_out([twin, copy], leaked, True, "the file's training items")
