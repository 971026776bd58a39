"""The LoRA ceiling (`extract/lora.py`): fitted on training items only, the base model restored bit for bit after
each fit, and what it reaches on the synthetic readable pairs of tests/test_trained.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import ONE_CONFIG_SWEEP
from test_evaluation import make_samples
from test_trained import readable_pairs

from vulnsteer.errors import VulnsteerError
from vulnsteer.extract.lora import LoraTraining, fit_and_score
from vulnsteer.extract.trained import answer_log_odds, prefix_pass
from vulnsteer.protocol import overlapping, training_keys


def unseen(samples, train):
    """`samples` less those sharing a family or code with `train` (which LoRA refuses to be tested on)."""
    leaked = {s.id for s in overlapping(samples, set(training_keys(train)))}
    return [s for s in samples if s.id not in leaked]


def test_after_a_lora_fit_the_base_model_is_bit_identical(lm):
    """No leak between folds: the adapters are gone, every weight tensor and every output is what it was."""
    samples = make_samples(6)
    before = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
    grads = {name: p.requires_grad for name, p in lm.model.named_parameters()}
    modules = [type(m) for m in lm.model.modules()]
    with torch.no_grad():
        scores = answer_log_odds(lm, prefix_pass(lm, samples), [[None]] * len(samples))
    train, test = samples[:4], unseen(samples[4:], samples[:4])
    fit = fit_and_score(lm, train, test, "S1", None, LoraTraining(steps=3, learning_rate=0.05))
    unadapted = dict(zip((s.id for s in samples), scores[:, 0].tolist()))
    assert fit.parameters > 0 and any(v != pytest.approx(unadapted[k]) for k, v in fit.scores.items())
    assert [type(m) for m in lm.model.modules()] == modules
    after = dict(lm.model.named_parameters())
    assert set(after) == set(before) and all(torch.equal(after[n], t) for n, t in before.items())
    assert {name: p.requires_grad for name, p in after.items()} == grads
    with torch.no_grad():
        again = answer_log_odds(lm, prefix_pass(lm, samples), [[None]] * len(samples))
    assert torch.equal(again, scores)


def test_lora_refuses_to_be_tested_on_its_training_items(lm):
    samples = make_samples(6)
    with pytest.raises(VulnsteerError, match="not held out"):
        fit_and_score(lm, samples, samples[4:], "S1", None, LoraTraining(steps=1))


def test_lora_on_readable_pairs_reports_its_held_out_balanced_accuracy(capsys):
    """Fitted on 16 training pairs, scored on the other pairs that share no family or code with them, at the plain
    log-odds > 0 verdict: the ceiling reads the label (the figure is printed)."""
    from vulnsteer.models import random_model

    lm = random_model("qwen2")
    train = readable_pairs("a", 16, 0)
    test = unseen(readable_pairs("b", 8, 1), train)
    fit = fit_and_score(lm, train, test, "S1", None, LoraTraining(steps=15, learning_rate=0.01))
    said = torch.tensor([fit.scores[s.id] > 0 for s in test])
    truth = torch.tensor([s.is_vulnerable for s in test])
    balanced = float(((said & truth).sum() / truth.sum() + (~said & ~truth).sum() / (~truth).sum()) / 2)
    with capsys.disabled():
        print(
            f"\nLoRA r=8 (q,k,v,o), 15 steps: held-out balanced accuracy {balanced:.3f}, "
            f"{fit.parameters} parameters, {fit.seconds:.1f} s"
        )
    assert balanced >= 0.9


def test_a_sweep_fits_lora_per_fold_on_its_training_folds_only(tmp_path, monkeypatch):
    """`lora_steps`: one fit per fold on the other folds' items, the fold's rows stored under `lora` naming that
    training set, the stored provenance re-verified, the table's LoRA row with its real parameter count; a resume
    fits nothing again."""
    from vulnsteer.data import family
    from vulnsteer.experiments import sweep as sweep_module
    from vulnsteer.experiments.analysis import analyse
    from vulnsteer.experiments.sweep import LORA, SweepConfig, check_stored_provenance
    from vulnsteer.models import random_model
    from vulnsteer.pipeline import run_sweep

    fits: list[tuple[set[str], set[str]]] = []
    fit_ = sweep_module.fit_and_score

    def recording(lm, train, test, *args, **kwargs):
        fits.append(({family(s) for s in train}, {family(s) for s in test}))
        return fit_(lm, train, test, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "fit_and_score", recording)
    config = SweepConfig(**{**ONE_CONFIG_SWEEP, "lora_steps": 2})
    lm = random_model("llama")
    run_sweep(config, tmp_path, lm=lm)
    a = analyse(tmp_path)
    assert len(fits) == 3 and all(train and test and not train & test for train, test in fits)
    rows = a.others[LORA]
    assert len(rows) == len(a.sample_ids)
    assert all(r.steering.config == LORA and r.steering.fold == a.folds[r.sample_id] for r in rows)
    assert all(0 < r.seconds < 60 for r in rows)  # each row's share of its fit's scoring time, measured
    assert check_stored_provenance(tmp_path) >= len(rows)
    parameters = {fit["parameters"] for fit in a.meta["lora_fits"].values()}
    assert len(a.meta["lora_fits"]) == 3 and all(0 < fit["seconds"] < 600 for fit in a.meta["lora_fits"].values())
    # r (in + out) per projection: q, o are 64 -> 64; k, v 64 -> 32 (2 of 4 heads); 4 layers, r = 8.
    assert parameters == {4 * 8 * (2 * (64 + 64) + 2 * (64 + 32))}
    assert f"{parameters.pop():,}" in (tmp_path / "report.md").read_text().split("LoRA r=8")[1][:200]
    run_sweep(config, tmp_path, lm=lm)
    assert len(fits) == 3  # resumed: every LoRA row was stored


def test_with_a_training_dataset_every_fold_shares_one_lora_fit(tmp_path, monkeypatch, capsys):
    """Every fold's training set is the training dataset: one fit scores them all (the progress line says so), and
    its seconds count once. Its rows are score rows of the sweep's prompt, as the baseline's are: the same prompt
    length, and each row its share of the scoring time."""
    from conftest import write_jsonl_dataset

    from vulnsteer.data import load_demo
    from vulnsteer.experiments import sweep as sweep_module
    from vulnsteer.experiments.analysis import analyse
    from vulnsteer.experiments.sweep import LORA, SweepConfig
    from vulnsteer.models import random_model
    from vulnsteer.pipeline import run_sweep

    train = write_jsonl_dataset(tmp_path / "train.jsonl", load_demo()[16:24])
    fits = []
    fit_ = sweep_module.fit_and_score
    # the fit's scoring time set by hand (0.8 s for the 8 test items): each row's share must be 0.1 s
    monkeypatch.setattr(
        sweep_module, "fit_and_score", lambda *a, **k: fits.append(1) or replace(fit_(*a, **k), score_seconds=0.8)
    )
    config = SweepConfig(
        **{**ONE_CONFIG_SWEEP, "train_dataset": str(train), "drop_overlap": True, "folds": 2, "lora_steps": 1}
    )
    run_sweep(config, tmp_path / "run", lm=random_model("llama"))
    out = capsys.readouterr().out
    assert "LoRA: fitting on 8 items for fold(s) 0, 1 (1 steps)" in out
    assert "LoRA steps: 1/1 (100%)" in out  # each step counted (in a log: a line at the end)
    a = analyse(tmp_path / "run")
    assert len(fits) == 1 and len(a.others[LORA]) == len(a.sample_ids)
    baseline = {r.sample_id: r for r in a.arms["baseline"]}
    for r in a.others[LORA]:
        assert (
            (r.prompt_id, r.mode, r.response, r.new_tokens)
            == ("S1", "score", "", 0)
            == (
                baseline[r.sample_id].prompt_id,
                baseline[r.sample_id].mode,
                baseline[r.sample_id].response,
                baseline[r.sample_id].new_tokens,
            )
        )
        assert r.prompt_tokens == baseline[r.sample_id].prompt_tokens > 1 and r.seconds == pytest.approx(0.1)
        assert r.verdict == ("vulnerable" if r.score > 0 else "not_vulnerable")
    seconds = [fit["seconds"] for fit in a.meta["lora_fits"].values()]
    assert len(seconds) == 2 and sorted(seconds)[0] == 0.0 < sorted(seconds)[1]
