"""Tiny randomly initialised models (Llama and Qwen2 architectures) with a byte-level tokenizer built here,
so unit tests need no download and run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch  # noqa: E402

import vulnsteer  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HOLMES = SHARED / "secllmholmes"
# Where the `lm` fixture puts its models: "cuda" runs the steering and engine invariants on a GPU (bench/gpu_check.sh).
TEST_DEVICE = os.environ.get("VULNSTEER_TEST_DEVICE", "cpu")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(extra_merges: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer with a few merges so "yes"/"no" are single tokens, plus chat special tokens;
    `extra_merges` (two-character words) make another tokenizer of the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = []
    for word in ["Ġy", "Ġye", "Ġyes", "Ġn", "Ġno", "ye", "yes", "no", *extra_merges]:
        left, right = (word[:-1], word[-1]) if word not in ("Ġy", "Ġn") else (word[0], word[1])
        if word not in vocab:
            merges.append((left, right))
            vocab[word] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    return model.float().eval()


def tiny_lm(arch: str, seed: int = 0, device: str = "cpu"):
    from vulnsteer.models import prepare

    tokenizer = byte_tokenizer()
    model = tiny_model(arch, len(tokenizer), seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return prepare(model, tokenizer, f"tiny-{arch}", device)


@pytest.fixture(params=["llama", "qwen2"])
def lm(request):
    return tiny_lm(request.param, device=TEST_DEVICE)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own vulnsteer cache, except the packaged-model cache, shared via VULNSTEER_TEST_MODELS."""
    monkeypatch.setenv("VULNSTEER_CACHE", str(tmp_path / "cache"))


def forward_pass_tokens(monkeypatch, tokens: float) -> None:
    """Make one more batch (or prompt-pass group) cost `tokens` of work on every device: 0 plans a group per
    length, 1e9 one group as large as the budget allows."""
    from vulnsteer.engine.planner import FORWARD_PASS_TOKENS

    for device in ("cpu", "cuda"):
        monkeypatch.setitem(FORWARD_PASS_TOKENS, device, tokens)
