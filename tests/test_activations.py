"""Activation collection on tiny random Llama and Qwen2 models: shapes, batch invariance (left padding), the
code-token mask, the disk cache, and agreement with transformers' own `output_hidden_states`."""

import pytest
import torch
from conftest import byte_tokenizer

import vulnsteer.extract.activations as activations
from vulnsteer.data import Sample
from vulnsteer.errors import VulnsteerError
from vulnsteer.extract.activations import (
    Activations,
    cache_file,
    code_token_mask,
    collect,
)
from vulnsteer.models import cache_dir
from vulnsteer.prompts import PromptResources, build_prompt, render

CODES = [  # different lengths, so a batch is left-padded
    "int main(int c, char **v) { char b[4]; strcpy(b, v[1]); return 0; }",
    "x = 1",
    "def f(p):\n    return open(p).read()",
    "void g(int *p) { free(p); *p = 2; }",
    "q = 'SELECT * FROM t WHERE id=' + uid",
]
RES = PromptResources()


def make_samples(n: int = 5, cwe: str = "CWE-787") -> list[Sample]:
    return [
        Sample(
            id=f"s{i}",
            cwe=cwe,
            label="vulnerable" if i % 2 == 0 else "patched",
            language="c",
            code=CODES[i % len(CODES)],
            pair_id=f"p{i // 2}",
            split="unit",
            source="test",
        )
        for i in range(n)
    ]


def text_of(lm, sample, prompt_id="S1"):
    return render(lm.tokenizer, list(build_prompt(sample, prompt_id, RES).messages))


@pytest.mark.parametrize("read", ["prompt-last", "code-mean"])
def test_collect_shapes_all_layers(lm, read):
    samples = make_samples(4)
    acts = collect(lm, samples, "S1", RES, read=read, use_cache=False)
    assert isinstance(acts, Activations)
    assert acts.read == read and acts.prompt_id == "S1"
    assert acts.samples == samples
    assert sorted(acts.by_layer) == list(range(lm.num_layers))
    for x in acts.by_layer.values():
        assert x.shape == (4, lm.hidden_size)
        assert x.dtype == torch.float32
        assert torch.isfinite(x).all()
    assert acts.labels.tolist() == [True, False, True, False]
    # different prompts give different activations (nothing is constant or shared across rows)
    assert not torch.allclose(acts.by_layer[1][0], acts.by_layer[1][1])


def test_subset_keeps_rows_aligned(lm):
    samples = make_samples(4)
    acts = collect(lm, samples, "S1", RES, use_cache=False)
    sub = acts.subset(lambda s: s.is_vulnerable)
    assert [s.id for s in sub.samples] == ["s0", "s2"]
    for layer in acts.by_layer:
        assert torch.equal(sub.by_layer[layer], acts.by_layer[layer][[0, 2]])


@pytest.mark.parametrize("read", ["prompt-last", "code-mean"])
def test_batched_equals_each_prompt_alone(lm, read):
    samples = make_samples(5)
    batched = collect(lm, samples, "S1", RES, read=read, batch_tokens=10**7, use_cache=False)
    alone = collect(lm, samples, "S1", RES, read=read, batch_tokens=1, use_cache=False)
    # the batch really was one padded batch
    lengths = {len(lm.tokenizer(text_of(lm, s))["input_ids"]) for s in samples}
    assert len(lengths) > 1
    for layer in batched.by_layer:
        torch.testing.assert_close(batched.by_layer[layer], alone.by_layer[layer], atol=1e-5, rtol=1e-5)


def testread_batch_batch_equals_single_rows(lm):
    """Directly on `read_batch`: a left-padded batch gives every row what it gets alone."""
    samples = make_samples(3)
    texts = [text_of(lm, s) for s in samples]
    for read in ("prompt-last", "code-mean"):
        batch = activations.read_batch(lm, texts, samples, read)
        assert batch.shape == (3, lm.num_layers, lm.hidden_size)
        for i in range(3):
            single = activations.read_batch(lm, [texts[i]], [samples[i]], read)[0]
            torch.testing.assert_close(batch[i], single, atol=1e-5, rtol=1e-5)


def test_code_mean_differs_from_prompt_last(lm):
    samples = make_samples(2)
    last = collect(lm, samples, "S1", RES, read="prompt-last", use_cache=False)
    mean = collect(lm, samples, "S1", RES, read="code-mean", use_cache=False)
    assert not torch.allclose(last.by_layer[2], mean.by_layer[2])


def test_code_token_mask_selects_exactly_the_code(lm):
    tok = lm.tokenizer
    for sample in make_samples(5):
        text = text_of(lm, sample)
        ids = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        n = len(ids["input_ids"])
        pad = 7
        mask = code_token_mask(tok, text, sample.code, n + pad)
        assert mask.shape == (n + pad,) and mask.dtype == torch.bool
        assert not mask[:pad].any(), "left padding columns are never code"
        inner = mask[pad:]
        chosen = [t for t, m in zip(ids["input_ids"], inner.tolist()) if m]
        decoded = tok.decode(chosen)
        assert sample.code in decoded
        assert len(decoded) <= len(sample.code) + 4  # only boundary tokens may spill over
        start = text.rfind(sample.code)
        end = start + len(sample.code)
        for (a, b), m in zip(ids["offset_mapping"], inner.tolist()):
            assert m == (a < end and b > start), (a, b, m)
        # the selected tokens are one contiguous run
        where = inner.nonzero().flatten()
        assert (where[-1] - where[0] + 1) == len(where)


def test_code_token_mask_takes_last_occurrence(lm):
    code = "abc"
    text = "abc and then the code: abc!"
    mask = code_token_mask(lm.tokenizer, text, code, len(lm.tokenizer(text)["input_ids"]))
    chosen = [t for t, m in zip(lm.tokenizer(text)["input_ids"], mask.tolist()) if m]
    assert lm.tokenizer.decode(chosen) == "abc"
    assert not mask[:3].any()


def test_code_token_mask_missing_code_raises(lm):
    with pytest.raises(VulnsteerError, match="prompt-last"):
        code_token_mask(lm.tokenizer, "no code here", "int main()", 20)


def test_unknown_read_raises(lm):
    with pytest.raises(VulnsteerError, match="unknown read position 'middle'"):
        collect(lm, make_samples(2), "S1", RES, read="middle")


def test_second_call_reads_cache(lm, monkeypatch):
    samples = make_samples(4)
    first = collect(lm, samples, "S1", RES, read="prompt-last")
    files = sorted((cache_dir() / "activations").rglob("*.safetensors"))
    assert len(files) == 4

    def boom(*args, **kwargs):
        raise AssertionError("the model ran although every row is cached")

    monkeypatch.setattr(activations, "read_batch", boom)
    seen = []
    second = collect(lm, samples, "S1", RES, read="prompt-last", progress=seen.append)
    assert seen == [4]
    for layer in first.by_layer:
        assert torch.equal(first.by_layer[layer], second.by_layer[layer])
    # use_cache=False ignores the cache and runs the model
    with pytest.raises(AssertionError, match="cached"):
        collect(lm, samples, "S1", RES, read="prompt-last", use_cache=False)


def test_partial_cache_runs_only_missing_rows(lm, monkeypatch):
    samples = make_samples(5)
    collect(lm, samples[1:3], "S1", RES)  # rows 1 and 2 cached
    real = activations.read_batch
    ran = []

    def spy(lm_, texts, samples_, read):
        ran.extend(s.id for s in samples_)
        return real(lm_, texts, samples_, read)

    monkeypatch.setattr(activations, "read_batch", spy)
    mixed = collect(lm, samples, "S1", RES)
    assert sorted(ran) == ["s0", "s3", "s4"]
    fresh = collect(lm, samples, "S1", RES, use_cache=False)
    for layer in mixed.by_layer:
        torch.testing.assert_close(mixed.by_layer[layer], fresh.by_layer[layer], atol=1e-5, rtol=1e-5)


def test_cache_key_depends_on_the_rendered_prompt_and_read(lm, monkeypatch):
    s = make_samples(1)[0]
    base = cache_file(lm, "rendered prompt", "prompt-last")
    assert base.parent.parent == cache_dir() / "activations"
    assert cache_file(lm, "rendered prompt", "prompt-last") == base
    others = [cache_file(lm, "rendered prompt ", "prompt-last"), cache_file(lm, "rendered prompt", "code-mean")]
    assert len({base, *others}) == 3
    # a tokenizer that splits the same text differently (same model id and config) is a miss too
    retrained = type(lm)(lm.model, byte_tokenizer(extra_merges=("re",)), lm.model_id, lm.config_hash)
    assert retrained.tokenizer("rendered prompt")["input_ids"] != lm.tokenizer("rendered prompt")["input_ids"]
    assert cache_file(retrained, "rendered prompt", "prompt-last") != base
    # and collect really recomputes for another prompt id or read position
    collect(lm, [s], "S1", RES, read="prompt-last")
    calls = []
    real = activations.read_batch

    def spy(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(activations, "read_batch", spy)
    collect(lm, [s], "S1", RES, read="prompt-last")
    assert calls == []
    collect(lm, [s], "S2", RES, read="prompt-last")
    collect(lm, [s], "S1", RES, read="code-mean")
    assert calls == ["prompt-last", "code-mean"]


def test_matches_output_hidden_states(lm):
    """transformers' hidden_states[0] is the embedding output and hidden_states[L + 1] the output of decoder layer
    L, except the last entry, which has the final norm applied: so layer L here is hidden_states[L + 1] for every
    non-final layer, and the final norm of the last layer's activation is hidden_states[-1]."""
    samples = make_samples(3)
    for read in ("prompt-last", "code-mean"):
        acts = collect(lm, samples, "S1", RES, read=read, use_cache=False)
        for i, sample in enumerate(samples):
            text = text_of(lm, sample)
            enc = lm.tokenizer([text], return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                hidden = lm.model(**enc, output_hidden_states=True).hidden_states
            assert len(hidden) == lm.num_layers + 1
            if read == "prompt-last":
                weights = torch.zeros(enc["input_ids"].shape[1])
                weights[-1] = 1.0
            else:
                mask = code_token_mask(lm.tokenizer, text, sample.code, enc["input_ids"].shape[1])
                weights = mask.float() / mask.sum()
            at = [weights @ h[0].float() for h in hidden]
            for layer in range(lm.num_layers - 1):
                torch.testing.assert_close(acts.by_layer[layer][i], at[layer + 1], atol=1e-5, rtol=1e-5)
            if read == "prompt-last":
                last = acts.by_layer[lm.num_layers - 1][i]
                with torch.inference_mode():
                    normed = lm.model.model.norm(last.unsqueeze(0))[0]
                torch.testing.assert_close(normed, at[-1], atol=1e-5, rtol=1e-5)
                assert not torch.allclose(last, at[-1], atol=1e-3), "the recorded last layer is pre-norm"


def test_two_checkpoints_in_folders_of_one_name_never_share_cached_activations(tmp_path):
    from conftest import tiny_lm

    from vulnsteer.models import load_model

    paths = []
    for seed, run in ((0, "run-a"), (1, "run-b")):
        lm = tiny_lm("llama", seed=seed)
        folder = tmp_path / run / "checkpoint-100"
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
        paths.append(folder)
    a, b = (load_model(str(p), device="cpu") for p in paths)
    assert a.model_id == b.model_id == "checkpoint-100" and a.config_hash == b.config_hash
    assert a.fingerprint != b.fingerprint and a.source != b.source
    assert cache_file(a, "rendered prompt", "prompt-last") != cache_file(b, "rendered prompt", "prompt-last")
    again = load_model(str(paths[0]), device="cpu")
    assert cache_file(again, "rendered prompt", "prompt-last") == cache_file(a, "rendered prompt", "prompt-last")


def test_score_mode_reads_where_the_model_is_asked(lm):
    """Score mode reads at "Answer:" (where scoring and prompt-last steering act), generate mode at the end of the
    chat template: two different positions, so two different activations."""
    samples = make_samples(2)
    score = collect(lm, samples, "S1", RES, use_cache=False, mode="score")
    generate = collect(lm, samples, "S1", RES, use_cache=False, mode="generate")
    assert score.mode == "score" and generate.mode == "generate"
    assert not torch.allclose(score.by_layer[1], generate.by_layer[1])
    text = render(lm.tokenizer, list(build_prompt(samples[0], "S1", RES).messages), "Answer:")
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hidden = lm.model(**ids, output_hidden_states=True).hidden_states
    assert torch.allclose(score.by_layer[1][0], hidden[2][0, -1].float(), atol=1e-5)
