"""Tests written to kill surviving mutants of the learned code (docs/protocol.md, "Mutation testing"): each checks
real behaviour that the existing tests left open."""

from __future__ import annotations

import pytest
import torch

from vulnsteer.data import load_demo
from vulnsteer.errors import VulnsteerError
from vulnsteer.extract.lora import LoraTraining, _last_token_log_odds, fit_and_score
from vulnsteer.extract.trained import answer_log_odds, prefix_pass, score_text
from vulnsteer.models import random_model


def test_the_lora_objective_reads_each_prompt_as_score_mode_does_padded_or_alone(lm):
    """LoRA trains on chunks of prompts of unequal length and is judged by score mode's log-odds: before any step
    the two agree for every prompt (the attention mask hides the pad, positions count from each prompt's first
    token), in a left-padded batch and alone."""
    samples = load_demo()[:3]
    texts = [score_text(lm, s, "S1", None) for s in samples]
    assert len({len(t) for t in texts}) > 1
    with torch.no_grad():
        together = _last_token_log_odds(lm, texts)
        alone = torch.cat([_last_token_log_odds(lm, [t]) for t in texts])
        scored = answer_log_odds(lm, prefix_pass(lm, samples), [[None]] * len(samples))[:, 0]
    # float32 agreement here is within 6e-7; counting positions from 1, or the first two tokens at one position,
    # moves the tiny models' log-odds by 1.3e-5 or more: 3e-6 tells them apart.
    assert torch.allclose(together, alone, atol=3e-6) and torch.allclose(alone, scored, atol=3e-6)


def test_lora_refuses_a_test_item_it_would_train_on_and_names_it():
    sample = load_demo()[0]
    with pytest.raises(VulnsteerError, match=f"1 of the items it is tested on \\(e.g. {sample.id}\\)"):
        fit_and_score(random_model("llama"), [sample], [sample], "S1", None)


def test_a_lora_fit_does_not_depend_on_how_the_training_set_is_chunked():
    """Chunks only bound memory: the gradients of all chunks add up to the whole training set's, each item once,
    so adapters fitted in chunks of one and in one chunk, or on the items in reverse order, score the held-out items
    alike; the settings' learning rate is the one used (at 0 nothing moves)."""
    samples = load_demo()
    pairs = sorted({s.pair_id for s in samples})
    train = [s for s in samples if s.pair_id in pairs[:3]]
    test = [s for s in samples if s.pair_id == pairs[-1]]
    lm = random_model("llama")
    fits = [
        fit_and_score(lm, train, test, "S1", None, LoraTraining(steps=2, learning_rate=0.05, batch=batch))
        for batch in (1, len(train))
    ]
    assert len(train) > 2 and fits[0].scores.keys() == {s.id for s in test}
    assert fits[0].scores == pytest.approx(fits[1].scores, abs=1e-4)
    reversed_ = fit_and_score(lm, train[::-1], test, "S1", None, LoraTraining(steps=2, learning_rate=0.05, batch=2))
    assert reversed_.scores == pytest.approx(fits[0].scores, abs=1e-4)
    unfitted = fit_and_score(lm, train, test, "S1", None, LoraTraining(steps=0))
    assert unfitted.scores != pytest.approx(fits[0].scores, abs=1e-3)  # the fit moved them: the test can fail
    still = fit_and_score(lm, train, test, "S1", None, LoraTraining(steps=2, learning_rate=0.0))
    assert still.scores == pytest.approx(unfitted.scores, abs=1e-6)


@pytest.mark.parametrize("method", ["trained", "loreft"])
def test_learned_fits_train_at_strength_1_the_strength_they_are_applied_at_and_report_each_step(monkeypatch, method):
    """A fit optimises the intervention as strength 1 applies it (the paper's LoReFT; a trained vector's own
    length), and tells its progress callback once per step."""
    from vulnsteer.extract import trained
    from vulnsteer.extract.vectors import POOLED

    lm = random_model("llama")
    samples = load_demo()[:4]
    prefix = prefix_pass(lm, samples)
    strengths: set[float] = set()
    log_odds = trained.answer_log_odds

    def spying(lm_, prefix_, tokens):
        strengths.update(s.strength for row in tokens for s in row if s is not None)
        return log_odds(lm_, prefix_, tokens)

    monkeypatch.setattr(trained, "answer_log_odds", spying)
    steps: list[int] = []
    settings = trained.Training(steps=3, rank=2)
    if method == "loreft":
        edits = trained.train_edits(lm, prefix, samples, [POOLED], [1], POOLED, settings, steps.append)
        assert not any(p.requires_grad for p in edits[POOLED][1].parameters())  # fitted: a constant from now on
    else:
        trained.train_vectors(lm, prefix, samples, [POOLED], [1], {1: 1.0}, POOLED, settings, steps.append)
    assert strengths == {1.0} and steps == [1, 1, 1]


def test_the_candidates_are_the_grids_steered_configs_at_every_nonzero_strength():
    from vulnsteer.experiments.sweep import SweepConfig, candidate_points, path_controls, points_by_id

    config = SweepConfig(
        dataset="demo",
        layers=["1"],
        strengths=[-1.0, 1.0],
        vectors=["own", "random"],
        positions=["prompt-last", "all"],
        mode="score",
    )
    candidates = candidate_points(config)
    assert sorted(candidates) == sorted(
        p.id for p in points_by_id(config).values() if str(p.vectors) == "own" and p.strength != 0
    )
    assert {p.strength for p in candidates.values()} == {-1.0, 1.0}
    assert not any(p.id in candidates for p in path_controls(config))  # strength 0: a control


def test_a_trained_vector_stays_within_its_norm_bound_at_every_step_and_reaches_it(monkeypatch):
    """The bound is `max_norm` times the layer's residual norm, projected after each step: no step ever applies a
    longer vector (the start included), and a fit pushed hard ends on the bound, not below it."""
    from vulnsteer.extract import trained
    from vulnsteer.extract.vectors import POOLED

    lm = random_model("llama")
    samples = load_demo()[:4]
    prefix = prefix_pass(lm, samples)
    applied: list[float] = []
    log_odds = trained.answer_log_odds

    def spying(lm_, prefix_, tokens):
        applied.extend(float(s.vectors[1].detach().norm()) for row in tokens for s in row if s is not None)
        return log_odds(lm_, prefix_, tokens)

    monkeypatch.setattr(trained, "answer_log_odds", spying)
    settings = trained.Training(steps=8, learning_rate=0.5, max_norm=0.5)
    vectors = trained.train_vectors(lm, prefix, samples, [POOLED], [1], {1: 3.0}, POOLED, settings)
    bound = 0.5 * 3.0
    assert max(applied) <= bound + 1e-5 and applied[0] < 0.05 * bound  # a small start, then never past the bound
    assert float(vectors[POOLED][1].norm()) == pytest.approx(bound, rel=1e-4)
    assert applied[-1] == pytest.approx(bound, rel=1e-4)
    # Inside the bound the projection leaves a vector alone: with no step taken, every step applies the start.
    applied.clear()
    trained.train_vectors(
        lm, prefix, samples, [POOLED], [1], {1: 3.0}, POOLED, trained.Training(steps=3, learning_rate=0.0, max_norm=0.5)
    )
    assert applied == pytest.approx([applied[0]] * len(applied), rel=1e-6)


def _tiny(arch: str):
    """A tiny model whose output layer is not a plain linear map over the last hidden state: Gemma 2 soft-caps its
    logits, Cohere scales them, Phi's output layer has a bias (random here, so that it matters)."""
    import transformers

    from vulnsteer.models import byte_tokenizer, prepare

    tokenizer = byte_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    config, model_class = {
        "gemma2": (transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=0.5), "Gemma2ForCausalLM"),
        "cohere": (transformers.CohereConfig(**common, logit_scale=0.5), "CohereForCausalLM"),
        "phi": (transformers.PhiConfig(**common), "PhiForCausalLM"),
    }[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).float().eval()
    if model.get_output_embeddings().bias is not None:
        torch.nn.init.normal_(model.get_output_embeddings().bias)
    return prepare(model, tokenizer, f"tiny-{arch}", "cpu")


@pytest.mark.parametrize("arch", ["gemma2", "cohere", "phi"])
def test_the_answer_log_odds_read_through_a_capped_scaled_or_biased_output_layer_equal_the_full_softmaxs(arch):
    """Training reads only the yes and no rows of the output layer where it is a plain linear map; a soft cap, a
    logit scale or a bias must still reach the log-odds (and the full log-probabilities keep their vocabulary)."""
    from vulnsteer.extract.trained import log_odds, next_token_logprobs
    from vulnsteer.records import Steering

    lm = _tiny(arch)
    samples = load_demo()[:4]
    prefix = prefix_pass(lm, samples)
    vector = 0.1 * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(1))
    tokens = [[None, Steering({1: vector}, 1.0)] for _ in samples]
    logprobs = next_token_logprobs(lm, prefix, tokens)
    assert logprobs.shape == (4, 2, len(lm.tokenizer))
    full = log_odds(lm, logprobs)
    assert torch.allclose(answer_log_odds(lm, prefix, tokens), full, atol=1e-5)
    # ... and the full softmax is the model's own: its logits at the last prompt token, unsteered.
    encoded = lm.tokenizer([score_text(lm, s, "S1", None) for s in samples], return_tensors="pt", padding=True)
    positions = (encoded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = lm.model(**encoded, position_ids=positions).logits[:, -1].float()
    assert torch.allclose(full[:, 0], log_odds(lm, logits.log_softmax(-1)), atol=1e-4)
