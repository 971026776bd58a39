"""Trained steering vectors (`--method trained`): the cached-prefix gradient is the full pass's, training moves the
answer as its loss asks within the norm bound, and the vectors reach files, sweeps and the held-out checks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_evaluation import make_samples

from vulnsteer.engine.runners import answer_token_ids, encode
from vulnsteer.errors import VulnsteerError
from vulnsteer.extract.activations import collect
from vulnsteer.extract.trained import Training, answer_log_odds, prefix_pass, score_text, train_vectors
from vulnsteer.extract.vectors import POOLED, fit
from vulnsteer.prompts import PromptResources
from vulnsteer.records import Steering
from vulnsteer.steering.hooks import steer


def full_pass_log_odds(lm, samples, vector, layer):
    """The plain way: every prompt in full, steered at its last token by `vector` at `layer`."""
    encoded = encode(lm, [score_text(lm, s, "S1", None) for s in samples])
    mask = encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with steer(lm.model, [Steering({layer: vector}, 1.0, "prompt-last")] * len(samples), mask):
        logits = lm.model(**encoded, position_ids=positions).logits[:, -1]
    yes, no = answer_token_ids(lm.tokenizer)
    logp = logits.float().log_softmax(-1)
    return logp[:, yes].logsumexp(-1) - logp[:, no].logsumexp(-1)


def sharpen(lm, factor: float = 8.0):
    """Random weights attend almost uniformly, so positions barely matter; larger query and key weights make
    attention sharp, so that a position or mask error shows in the scores."""
    with torch.no_grad():
        for name, parameter in lm.model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(factor)
    return lm


def test_the_cached_prefix_gives_the_full_pass_scores_and_gradient(lm):
    """Float32: scores within 1e-5, the gradient of the cross-entropy within 1e-4 relative, on prompts of different
    lengths (left padding) and at two layers."""
    sharpen(lm)
    samples = make_samples(4)
    labels = torch.tensor([float(s.is_vulnerable) for s in samples])
    prefix = prefix_pass(lm, samples)
    for layer in (1, lm.num_layers - 1):
        vector = (torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(layer)) * 2).requires_grad_()
        full = full_pass_log_odds(lm, samples, vector, layer)
        (full_grad,) = torch.autograd.grad(torch.nn.functional.binary_cross_entropy_with_logits(full, labels), vector)
        cached = answer_log_odds(lm, prefix, [[Steering({layer: vector}, 1.0)]] * len(samples))[:, 0]
        (cached_grad,) = torch.autograd.grad(
            torch.nn.functional.binary_cross_entropy_with_logits(cached, labels), vector)
        assert (cached - full).abs().max() < 1e-5
        assert torch.allclose(cached_grad, full_grad, rtol=1e-4, atol=1e-6) and full_grad.norm() > 0
    length = prefix.cache.get_seq_length()
    answer_log_odds(lm, prefix, [[None, None]] * len(samples))
    assert prefix.cache.get_seq_length() == length  # the copies' keys were dropped again


def test_training_moves_the_answer_as_asked_within_the_norm_bound(lm):
    """Every item labelled vulnerable: the trained pooled vector must raise the log-odds of yes on them, and stay
    within max_norm residual norms."""
    samples = [replace(s, label="vulnerable") for s in make_samples(6)]
    prefix = prefix_pass(lm, samples)
    norms = {1: 3.0, 2: 3.0}
    settings = Training(steps=25, learning_rate=0.1, max_norm=0.5)
    vectors = train_vectors(lm, prefix, samples, [POOLED], [1, 2], norms, POOLED, settings)
    with torch.no_grad():
        before = answer_log_odds(lm, prefix, [[None]] * len(samples))[:, 0]
        for layer in (1, 2):
            after = answer_log_odds(lm, prefix, [[Steering({layer: vectors[POOLED][layer]}, 1.0)]] * len(samples))
            assert after[:, 0].mean() > before.mean() + 0.1, (layer, before, after)
            assert vectors[POOLED][layer].norm() <= 0.5 * norms[layer] + 1e-4


def test_training_refuses_a_prefix_holding_other_items_than_its_training_items(lm):
    """The fold's test items must not reach the loss: the held-out check reads the bank's training items, so the
    prefix the vectors train on must hold exactly those."""
    train, test = make_samples(6), make_samples(8)[6:]
    wider = prefix_pass(lm, [*train, *test])
    with pytest.raises(VulnsteerError, match="other items than the training items"):
        train_vectors(lm, wider, train, [POOLED], [1], {1: 1.0}, POOLED, Training(steps=1))
    train_vectors(lm, wider.select([s.id for s in train]), train, [POOLED], [1], {1: 1.0}, POOLED, Training(steps=1))


def test_fit_trains_per_cwe_and_pooled_and_records_how(lm):
    samples = make_samples(8)
    acts = collect(lm, samples, "S1", PromptResources(), mode="score")
    bank = fit(acts, lm, "trained", [1, 2], training=Training(steps=3))
    assert set(bank.groups) == {POOLED, *{s.cwe for s in samples}}
    assert bank.meta["method"] == "trained" and bank.meta["training"]["steps"] == 3
    assert all(set(by_layer) == {1, 2} for by_layer in bank.vectors.values())
    # The same bank from a prefix of more items, selected down to the training items (as the sweep reuses one).
    wider = prefix_pass(lm, make_samples(10))
    again = fit(acts, lm, "trained", [1, 2], training=Training(steps=3), prefix=wider)
    for group, by_layer in bank.vectors.items():
        for layer, vector in by_layer.items():
            cosine = torch.nn.functional.cosine_similarity(vector, again.vectors[group][layer], dim=0)
            assert cosine > 0.95  # equal up to the float noise of another padding width


def test_a_sweep_runs_trained_vectors_beside_mean_diff_held_out(tmp_path, monkeypatch):
    """`methods = ["mean-diff", "trained"]`: one prefix pass serves every fold's training; every bank, trained ones
    included, passes the held-out check on its fold; the trained configs have their rows and reach the report."""
    from vulnsteer.experiments import sweep as sweep_module
    from vulnsteer.experiments.analysis import analyse
    from vulnsteer.experiments.sweep import SweepConfig
    from vulnsteer.models import random_model
    from vulnsteer.pipeline import run_sweep

    checked: list[str] = []
    check = sweep_module.check_held_out

    def counting(banks, test):
        checked.extend(bank.meta["method"] for bank in banks.values())
        check(banks, test)

    passes = []
    prefix_pass_ = sweep_module.prefix_pass
    monkeypatch.setattr(sweep_module, "check_held_out", counting)
    monkeypatch.setattr(sweep_module, "prefix_pass", lambda *a, **k: passes.append(1) or prefix_pass_(*a, **k))
    config = SweepConfig(dataset="demo", limit=8, folds=3, layers=["1"], strengths=[-1.0, 1.0], mode="score",
                         methods=["mean-diff", "trained"], vectors=["pooled"], transfer=False)
    report = run_sweep(config, tmp_path, lm=random_model("llama"))
    assert len(passes) == 1
    assert checked.count("trained") == checked.count("mean-diff") > 0
    a = analyse(tmp_path)
    trained = [c for c in a.arms if c.startswith("trained|")]
    assert trained and all(len(a.arms[c]) == len(a.sample_ids) for c in trained)
    assert report.exists() and "trained|1|pooled|prompt-last" in (tmp_path / "report.md").read_text()
