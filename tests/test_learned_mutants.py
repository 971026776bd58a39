"""Tests written to kill surviving mutants of the learned code (docs/protocol.md, "Mutation testing"): each checks
real behaviour that the existing tests left open."""

from __future__ import annotations

import pytest
import torch

from vulnsteer.data import load_demo
from vulnsteer.errors import VulnsteerError
from vulnsteer.extract.lora import _last_token_log_odds, fit_and_score
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
    assert torch.allclose(together, alone, atol=1e-4) and torch.allclose(alone, scored, atol=1e-4)


def test_lora_refuses_a_test_item_it_would_train_on_and_names_it():
    sample = load_demo()[0]
    with pytest.raises(VulnsteerError, match=f"1 of the items it is tested on \\(e.g. {sample.id}\\)"):
        fit_and_score(random_model("llama"), [sample], [sample], "S1", None)
