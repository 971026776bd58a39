"""The steering invariants, on tiny random Llama and Qwen2 models: they hold for every batch layout."""

import pytest
import torch

from vulnsteer.architecture import decoder_layers, hidden_of
from vulnsteer.errors import VulnsteerError
from vulnsteer.records import Steering
from vulnsteer.steering.hooks import steer, steer_tokens

PROMPTS = ["int main() { char b[4]; strcpy(b, argv[1]); }", "x = 1", "def f(p): return open(p).read()"]


def encode(lm, texts):
    return lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)


def generate(lm, texts, rows=None, use_cache=True, n=8):
    enc = encode(lm, texts)
    with torch.inference_mode(), steer(lm.model, rows) if rows else torch.no_grad():
        out = lm.model.generate(
            **enc,
            max_new_tokens=n,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=lm.tokenizer.pad_token_id,
            eos_token_id=None,
        )
    return out[:, enc["input_ids"].shape[1] :]


def random_vectors(lm, layers, seed=1, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(lm.hidden_size, generator=g) * scale for layer in layers}


def test_strength_zero_is_bit_identical(lm):
    enc = encode(lm, PROMPTS)
    with torch.inference_mode():
        plain = lm.model(**enc).logits
        with steer(lm.model, [Steering(random_vectors(lm, [1, 2]), 0.0)] * 3):
            zero = lm.model(**enc).logits
    assert torch.equal(plain, zero)
    assert torch.equal(generate(lm, PROMPTS), generate(lm, PROMPTS, [Steering(random_vectors(lm, [1]), 0.0)] * 3))


@pytest.mark.parametrize("positions", ["all", "generated", "prompt", "prompt-last"])
def test_kv_cache_equals_recomputation(lm, positions):
    rows = [Steering(random_vectors(lm, [1, 3]), 1.5, positions)] * 3
    cached = generate(lm, PROMPTS, rows, use_cache=True)
    recomputed = generate(lm, PROMPTS, rows, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert not torch.equal(cached, generate(lm, PROMPTS)), "steering should change something at this strength"


@pytest.mark.parametrize("positions", ["all", "generated", "prompt-last"])
def test_left_padded_batch_equals_each_prompt_alone(lm, positions):
    row = Steering(random_vectors(lm, [2]), 2.0, positions)
    batched = generate(lm, PROMPTS, [row] * 3)
    for i, text in enumerate(PROMPTS):
        assert torch.equal(batched[i], generate(lm, [text], [row])[0]), f"row {i} differs"


def test_mixed_batch_equals_separate_runs(lm):
    vectors = random_vectors(lm, [0, 1, 2, 3])
    configs = [None, Steering({1: vectors[1]}, 3.0, "all"), Steering({0: vectors[0], 3: vectors[3]}, -2.0, "generated")]
    mixed = generate(lm, PROMPTS, configs)
    for i, (text, config) in enumerate(zip(PROMPTS, configs)):
        alone = generate(lm, [text], [config] if config else None)
        assert torch.equal(mixed[i], alone[0]), f"row {i} differs from its separate run"


def test_hooks_removed_on_exit_even_after_an_exception(lm):
    enc = encode(lm, PROMPTS)
    with torch.inference_mode():
        before = lm.model(**enc).logits
        with pytest.raises(RuntimeError):
            with steer(lm.model, [Steering(random_vectors(lm, [1]), 5.0)] * 3):
                assert not torch.equal(lm.model(**enc).logits, before)
                raise RuntimeError("boom")
        after = lm.model(**enc).logits
    assert torch.equal(before, after)
    assert all(not layer._forward_hooks for layer in decoder_layers(lm.model))


def test_padding_is_never_steered(lm):
    seen = {}
    enc = encode(lm, PROMPTS)
    layer = decoder_layers(lm.model)[1]
    handle = layer.register_forward_hook(lambda m, a, out: seen.__setitem__("h", hidden_of(out)))
    try:
        with torch.inference_mode():
            lm.model(**enc)
            plain = seen["h"].clone()
            with steer(lm.model, [Steering(random_vectors(lm, [0]), 1.0, "all")] * 3):
                lm.model(**enc)
            steered = seen["h"]
    finally:
        handle.remove()
    pad = enc["attention_mask"] == 0
    assert pad.any()
    assert torch.equal(plain[pad], steered[pad])
    assert not torch.equal(plain[~pad], steered[~pad])


def test_bad_layer_and_shape_are_refused(lm):
    with pytest.raises(VulnsteerError, match="out of range"):
        with steer(lm.model, [Steering({99: torch.ones(lm.hidden_size)}, 1.0)]):
            pass
    with pytest.raises(VulnsteerError, match="hidden size"):
        with steer(lm.model, [Steering({1: torch.ones(7)}, 1.0)]):
            pass


def test_steer_tokens_adds_each_tokens_own_delta_at_its_layers(lm):
    """`steer_tokens` steers token by token (row 0: tokens 0 and 2 with different configs, token 1 not; row 1: only
    its first token): exactly `strength * vector` lands on each chosen token at each of its layers, nothing else
    moves at the first steered layer; a call of another shape is refused."""
    vectors = random_vectors(lm, [1, 2])
    a, b = Steering(vectors, 2.0), Steering({2: vectors[2]}, -1.0)
    enc = encode(lm, ["abc", "xyz"])
    outputs = {}  # layer k's output (steered) is what layer k + 1 receives
    handles = [
        decoder_layers(lm.model)[k + 1].register_forward_pre_hook(
            lambda m, args, k=k: outputs.__setitem__(k, args[0].clone())
        )
        for k in (1, 2)
    ]
    try:
        with torch.inference_mode():
            lm.model(**enc)
            plain = dict(outputs)
            with steer_tokens(lm.model, [[a, None, b], [b]]):
                lm.model(**enc)
                steered = dict(outputs)
                with pytest.raises(VulnsteerError, match="2 rows of 3 tokens"):
                    lm.model(**encode(lm, ["abcd", "wxyz"]))
    finally:
        for handle in handles:
            handle.remove()
    moved = steered[1] - plain[1]  # layer 1 is the first steered one: its input is unchanged
    expected = torch.zeros_like(moved)
    expected[0, 0] = 2.0 * vectors[1]
    assert torch.allclose(moved, expected, atol=1e-5)
    # at layer 2, token (0, 1) moves only through attention to the steered token before it; (1, 0) gets b's push
    assert torch.allclose(steered[2][1, 0] - plain[2][1, 0], -vectors[2], atol=1e-5)
    assert all(not layer._forward_hooks for layer in decoder_layers(lm.model))


@pytest.mark.parametrize("positions", ["all", "generated", "prompt-last"])
def test_static_cache_equals_dynamic_cache(lm, positions):
    """The fixed-size cache that compiled GPU decoding uses steers exactly like the default cache."""
    rows = [Steering(random_vectors(lm, [1, 2]), 1.5, positions)] * 3
    enc = encode(lm, PROMPTS)
    outputs = []
    for cache in ("dynamic", "static"):
        with torch.inference_mode(), steer(lm.model, rows, enc["attention_mask"]):
            out = lm.model.generate(
                **enc,
                max_new_tokens=8,
                do_sample=False,
                cache_implementation=cache,
                pad_token_id=lm.tokenizer.pad_token_id,
                eos_token_id=None,
            )
        outputs.append(out)
    assert torch.equal(*outputs)
