"""The static-cache engine: same answers as the general hooks and as `generate`, and a decode step whose buffers
keep their addresses when the steering changes (on a GPU: captured once as a CUDA graph, then replayed)."""

import weakref

import pytest
import torch
from conftest import forward_pass_tokens
from test_evaluation import make_jobs, make_samples
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from vulnsteer.architecture import decoder_layers, hidden_of
from vulnsteer.engine import static
from vulnsteer.engine.evaluate import evaluate
from vulnsteer.engine.runners import Generator, default_runners, eos_ids
from vulnsteer.engine.static import StaticDecoder, packed_decode_attention
from vulnsteer.errors import VulnsteerError
from vulnsteer.prompts import Prompt
from vulnsteer.records import Decoding, Job, Steering
from vulnsteer.steering.buffers import SteeringEngine
from vulnsteer.steering.hooks import steer


def steerings(lm, seed):
    g = torch.Generator().manual_seed(seed)
    vectors = {layer: torch.randn(lm.hidden_size, generator=g) * 4 for layer in (1, 2)}
    return [
        None,
        Steering(vectors, 1.5, "all"),
        Steering({1: vectors[1]}, -2.0, "generated"),
        Steering({2: vectors[2]}, 3.0, "prompt-last"),
        Steering(vectors, 1.0, "prompt"),
    ]


def mixed_jobs(lm, seed=1):
    jobs = make_jobs(make_samples(5))
    return [type(job)(job.sample, job.prompt_id, job.prompt, s) for job, s in zip(jobs, steerings(lm, seed))]


def answers(results):
    return [(r.response, r.score) for r in results]


@pytest.mark.parametrize("mode, turns", [("generate", 1), ("score", 2)])
def test_engine_matches_the_general_hooks(lm, mode, turns):
    """The static engine answers as `steer()` hooks do; scoring goes through it after a generated turn (a run that
    only scores has nothing to decode and takes the plain path)."""
    jobs = mixed_jobs(lm)
    if turns > 1:
        jobs = [
            Job(job.sample, "R2", Prompt(job.prompt.messages, ("Is it vulnerable?",)), job.steering) for job in jobs
        ]
    engines = []
    real = SteeringEngine.set_rows
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SteeringEngine, "set_rows", lambda self, *a: engines.append(1) or real(self, *a))
        static = evaluate(lm, jobs, Decoding(mode, max_new_tokens=8, cache="static"))
    dynamic = evaluate(lm, jobs, Decoding(mode, max_new_tokens=8, cache="dynamic"))
    assert engines, "the static engine was not used"
    assert [r.response for r in dynamic] == [r.response for r in static]
    if mode == "score":
        assert [r.score for r in static] == pytest.approx([r.score for r in dynamic], abs=1e-4)
    assert all(not layer._forward_hooks for layer in decoder_layers(lm.model)), "engine hooks left behind"


def test_a_run_that_only_scores_builds_no_static_engine(lm, monkeypatch):
    monkeypatch.setattr(SteeringEngine, "__init__", None)  # building one would fail
    jobs = mixed_jobs(lm)
    static = evaluate(lm, jobs, Decoding("score", cache="static"))
    assert [r.score for r in static] == [r.score for r in evaluate(lm, jobs, Decoding("score"))]


def test_static_sweep_shares_each_prompt_and_answers_as_the_plain_path(lm, monkeypatch):
    """A generating sweep at the last prompt token through `--cache static`: the decoder runs each repeated prompt
    once, and the answers equal the plain path's."""
    vectors = {2: torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(6)) * 4}
    configs = [
        None,
        Steering(vectors, 2.0, "prompt-last"),
        Steering(vectors, -2.0, "prompt-last"),
        Steering(vectors, 1.0, "generated"),
    ]
    jobs = [type(job)(job.sample, job.prompt_id, job.prompt, c) for job in make_jobs(make_samples(3)) for c in configs]
    decoding = Decoding("generate", max_new_tokens=8, final_answer=False)
    with StaticDecoder(lm.model, eos_ids(lm), lm.tokenizer.pad_token_id) as decoder:
        through_static = evaluate(lm, jobs, decoding, runners=default_runners(8, decoder))
    assert decoder.shared_prefill_rows == len(jobs)
    assert [r.response for r in through_static] == [r.response for r in evaluate(lm, jobs, decoding)]


def test_engine_grows_for_a_larger_batch_and_adds_nothing_when_unsteered(lm):
    enc = lm.tokenizer(["abc", "defgh", "x"], return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    with torch.inference_mode():
        plain = lm.model(**enc).logits
        with SteeringEngine(lm.model, max_batch=1) as engine:
            engine.set_rows([None] * 3, enc["attention_mask"])
            assert torch.equal(lm.model(**enc).logits, plain)
            assert engine.delta.shape[1] == 3


def plain_generate(lm, encoded, rows, new_tokens, eos):
    """transformers' greedy `generate` with `steer()` hooks: the reference for the static decoder."""
    with torch.inference_mode(), steer(lm.model, rows, encoded["attention_mask"]):
        out = lm.model.generate(
            **encoded,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=lm.tokenizer.pad_token_id,
            disable_compile=True,
        )
    return out[:, encoded["input_ids"].shape[1] :]


def buffers(decoder) -> dict:
    """Where every tensor the decode step reads or writes lives: a captured step replays at these addresses."""
    tensors = {name: value for name, value in vars(decoder).items() if isinstance(value, torch.Tensor)}
    tensors.update(delta=decoder.steering.delta, decode_mask=decoder.steering.decode_mask)
    for k, layer in enumerate(decoder.cache.layers):
        tensors.update({f"keys{k}": layer.keys, f"values{k}": layer.values, f"length{k}": layer.cumulative_length})
    return {name: value.data_ptr() for name, value in tensors.items()}


@pytest.mark.parametrize("penalty", [None, 1.3])
def test_static_decoder_gives_generates_tokens_and_keeps_its_buffers_when_steering_changes(lm, penalty):
    """Two configs on batches of one shape: `generate`'s tokens each time (a repetition penalty included), one set
    of buffers at fixed addresses, and on a GPU one captured decode step, replayed for the second config."""
    lm.model.generation_config.repetition_penalty = penalty
    texts = ["int a[4]; a[i] = x;", "free(p); use(p);", "ok"]
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    eos = [lm.tokenizer.eos_token_id]
    decoder = StaticDecoder(lm.model, eos, lm.tokenizer.pad_token_id, max_batch=3)
    try:
        addresses = None
        for seed in (1, 2):
            rows = steerings(lm, seed)[:3]
            with torch.inference_mode():
                tokens = decoder.generate(enc["input_ids"], enc["attention_mask"], 12, rows)
            assert tokens.tolist() == plain_generate(lm, enc, rows, 12, eos).tolist()
            addresses = addresses or buffers(decoder)
            assert buffers(decoder) == addresses
    finally:
        decoder.close()
        lm.model.generation_config.repetition_penalty = None
    assert decoder.allocations == 1
    assert decoder.captures == (1 if lm.device.type == "cuda" else 0)


class OperatorTrace(TorchDispatchMode):
    """The operators a piece of code dispatches, each with its non-tensor arguments: what a CUDA graph freezes at
    capture (tensors are replayed at their addresses, which `buffers` checks)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frozen = tree_map(lambda a: "tensor" if isinstance(a, torch.Tensor) else a, (args, kwargs or {}))
        self.ops.append((func.name(), repr(frozen)))
        return func(*args, **(kwargs or {}))


# Operators that read a tensor back to the host: CUDA-graph capture refuses them.
HOST_READS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::nonzero",
    "aten::masked_select",
    "aten::is_nonzero",
    "aten::equal",
    "aten::_unique2",
    "aten::unique_consecutive",
}


def test_every_decode_step_is_the_same_capturable_work(lm):
    """A CUDA graph captured at one decode step replays every later one, so every step must dispatch the same
    operators with the same non-tensor arguments (positions, lengths and steps live in tensors, not in Python),
    and none may read a tensor back to the host. Checked here on CPU, step by step, for a steered batch."""
    enc = lm.tokenizer(["abc", "defgh", "x"], return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    traces = []
    with StaticDecoder(lm.model, [], lm.tokenizer.pad_token_id, capture=False) as decoder, torch.inference_mode():
        step = decoder._decode_step

        def traced_step():
            with OperatorTrace() as trace:
                step()
            traces.append(trace.ops)

        decoder._decode_step = traced_step
        decoder.generate(enc["input_ids"], enc["attention_mask"], 6, steerings(lm, 1)[:3])
    assert len(traces) == 5
    assert all(trace == traces[0] for trace in traces[1:]), "a decode step depends on Python-side state"
    assert not {name for name, _ in traces[0]} & HOST_READS
    assert any(name == "aten::scaled_dot_product_attention" for name, _ in traces[0])  # the trace sees the model


def test_static_decoder_prefills_rows_of_very_different_lengths_in_groups(lm, monkeypatch):
    """Long and short prompts in one batch: the prompt pass runs in groups of similar length (less padding), and
    the decoder still gives `generate`'s tokens for every kind of steered position, with its buffers in place."""
    texts = [
        "char buf[8]; strcpy(buf, argv[1]); printf(buf); free(p); free(p); " * 2,
        "ok",
        "x = y;",
        "int a[4]; for (i = 0; i <= 4; i++) a[i] = read_int(); return a[0] + a[1] + a[2] + a[3];",
        "z",
    ]
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    with StaticDecoder(lm.model, [lm.tokenizer.eos_token_id], lm.tokenizer.pad_token_id) as decoder:
        grouped = decoder.prompt_groups
        addresses = None
        for seed in (1, 2):
            rows = steerings(lm, seed)
            with torch.inference_mode():
                tokens = decoder.generate(enc["input_ids"], enc["attention_mask"], 8, rows)
            assert tokens.tolist() == plain_generate(lm, enc, rows, 8, [lm.tokenizer.eos_token_id]).tolist()
            addresses = addresses or buffers(decoder)
            assert buffers(decoder) == addresses
        assert grouped and grouped[0] > 1, "the prompt pass should have run in groups"
        # The cache holds what one whole-batch prompt pass puts there, at every slot a row can see (tiny random
        # models attend almost uniformly, so tokens alone would not show misplaced keys).
        with torch.inference_mode():
            decoder.generate(enc["input_ids"], enc["attention_mask"], 1, rows)
            in_groups = prompt_cache(decoder, enc["attention_mask"])
            forward_pass_tokens(monkeypatch, 1e9)  # one group
            decoder.generate(enc["input_ids"], enc["attention_mask"], 1, rows)
            whole = prompt_cache(decoder, enc["attention_mask"])
    assert len(grouped) == 3
    for a, b in zip(in_groups, whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_plain_path_runs_the_prompts_in_groups_with_generates_tokens(lm, monkeypatch):
    """The plain (dynamic-cache) path: long and short prompts run up to their last token in groups of similar
    length, and every row gets `generate`'s tokens over the whole padded batch, for every kind of steered position."""
    texts = [
        "char buf[8]; strcpy(buf, argv[1]); printf(buf); free(p); free(p); " * 2,
        "ok;",
        "x = y;",
        "int a[4]; for (i = 0; i <= 4; i++) a[i] = read_int(); return a[0] + a[1] + a[2] + a[3];",
        "z = 0;",
    ]
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    prompt_passes = []  # per call of the first layer: how many tokens of each row it ran
    handle = decoder_layers(lm.model)[0].register_forward_hook(
        lambda m, a, out: prompt_passes.append(hidden_of(out).shape[1])
    )
    try:
        for seed in (1, 2):
            rows = steerings(lm, seed)
            prompt_passes.clear()
            with torch.inference_mode():
                tokens = Generator(8).generate(lm, enc, rows)
            assert tokens.tolist() == plain_generate(lm, enc, rows, 8, eos_ids(lm)).tolist()
            # the prompt up to its last token in groups (calls of more than one token), then one token per step
            assert sum(width > 1 for width in prompt_passes) > 1, "the prompt pass should have run in groups"
    finally:
        handle.remove()
    assert all(not layer._forward_hooks for layer in decoder_layers(lm.model))


def test_static_decoder_runs_a_repeated_prompt_once_for_rows_steered_from_its_last_token_on(lm):
    """A sweep's batch (three prompts, each under configs steered at the last prompt token, at generated tokens or
    not at all): each prompt minus its last token runs once, its cache fills all its rows (as each row's own prompt
    pass would have filled it), and every row gets `generate`'s tokens; the buffers keep their addresses."""
    texts = ["char buf[8]; strcpy(buf, argv[1]);", "x = y;", "int a[4]; a[i] = read_int();"]
    g = torch.Generator().manual_seed(4)
    vectors = {layer: torch.randn(lm.hidden_size, generator=g) * 4 for layer in (1, 2)}
    configs = [
        None,
        Steering(vectors, 2.0, "prompt-last"),
        Steering({2: vectors[2]}, -3.0, "prompt-last"),
        Steering(vectors, 1.5, "generated"),
    ]
    rows = [config for _ in texts for config in configs][:-1]  # the last prompt has one row fewer
    enc = lm.tokenizer(
        [t for t in texts for _ in configs][:-1], return_tensors="pt", padding=True, add_special_tokens=False
    ).to(lm.device)
    eos = [lm.tokenizer.eos_token_id]
    seen = []
    handle = decoder_layers(lm.model)[0].register_forward_hook(lambda m, a, out: seen.append(hidden_of(out).shape[:2]))
    try:
        with StaticDecoder(lm.model, eos, lm.tokenizer.pad_token_id) as decoder, torch.inference_mode():
            tokens = decoder.generate(enc["input_ids"], enc["attention_mask"], 8, rows)
            addresses = buffers(decoder)
            shared = prompt_cache(decoder, enc["attention_mask"])
            decoder.generate(enc["input_ids"], enc["attention_mask"], 8, rows)
            assert buffers(decoder) == addresses
            decoder.shared_prompts = False
            decoder.generate(enc["input_ids"], enc["attention_mask"], 8, rows)
            own = prompt_cache(decoder, enc["attention_mask"])
    finally:
        handle.remove()
    assert sum(rows for rows, width in seen[:3] if width > 1) == 3, "each prompt should run once"
    assert tokens.tolist() == plain_generate(lm, enc, rows, 8, eos).tolist()
    assert len({tuple(t) for t in tokens.tolist()[:4]}) > 1, "steering changed nothing"
    for a, b in zip(shared, own):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lengths", [1, 3])
def test_static_decoder_shares_a_repeated_prompts_layers_below_each_rows_first_steered_one(lm, monkeypatch, lengths):
    """A sweep's batch whose configs steer whole prompts (one prompt, or three of different lengths, a group each):
    in the prompt pass each layer runs the rows that have forked by then plus one row per prompt; every row gets
    `generate`'s tokens, and the cache holds what each row's own prompt pass puts there."""
    forward_pass_tokens(monkeypatch, 0)  # a group per length
    texts = ["char buf[8]; strcpy(buf, argv[1]);", "x = y;", "int a[4]; for (i = 0; i <= 4; i++) a[i] = 0;"][:lengths]
    g = torch.Generator().manual_seed(9)
    vectors = {layer: torch.randn(lm.hidden_size, generator=g) * 4 for layer in (1, 2, 3)}
    configs = [
        Steering({2: vectors[2]}, 1.5, "all"),
        Steering({1: vectors[1]}, -2.0, "prompt"),
        Steering({3: vectors[3]}, -3.0, "prompt-last"),
        Steering({1: vectors[1]}, 2.0, "generated"),
        None,
        Steering({1: vectors[1]}, 0.0, "all"),
    ]  # strength 0: steers nothing
    rows = [config for _ in texts for config in configs]
    enc = lm.tokenizer(
        [t for t in texts for _ in configs], return_tensors="pt", padding=True, add_special_tokens=False
    ).to(lm.device)
    eos = [lm.tokenizer.eos_token_id]
    layers = decoder_layers(lm.model)
    prompt_rows = {k: 0 for k in range(len(layers))}

    def record(k):
        def hook(module, args, out):
            if out.shape[1] > 1:  # prompt passes, not decode steps
                prompt_rows[k] += out.shape[0]

        return hook

    handles = [layer.mlp.register_forward_hook(record(k)) for k, layer in enumerate(layers)]
    try:
        with StaticDecoder(lm.model, eos, lm.tokenizer.pad_token_id) as decoder, torch.inference_mode():
            tokens = decoder.generate(enc["input_ids"], enc["attention_mask"], 8, rows)
            counted = dict(prompt_rows)
            shared = prompt_cache(decoder, enc["attention_mask"])
            decoder.shared_prompts = False
            decoder.generate(enc["input_ids"], enc["attention_mask"], 8, rows)
            own = prompt_cache(decoder, enc["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    # Per prompt: layer 0 one row; layer 1 the "prompt" row and one for the rest; layer 2 adds the "all" row;
    # layer 3 the prompt-last row, steered at the last prompt token (the generated, unsteered and strength-0 rows
    # never fork).
    assert [counted[k] for k in range(4)] == [lengths, 2 * lengths, 3 * lengths, 4 * lengths]
    assert tokens.tolist() == plain_generate(lm, enc, rows, 8, eos).tolist()
    assert len({tuple(t) for t in tokens.tolist()[: len(configs)]}) > 1, "steering changed nothing"
    for a, b in zip(shared, own):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers), "hooks left behind"


@pytest.mark.parametrize("mode, turns", [("generate", 1), ("score", 2)])
def test_static_sweep_at_all_positions_answers_as_the_plain_path(lm, mode, turns):
    """`evaluate --cache static` on a sweep steered at all positions (its rows share their prompt's layers below
    their own first steered one), generating or scoring after a generated turn, answers as the plain path."""
    g = torch.Generator().manual_seed(3)
    vectors = {layer: torch.randn(lm.hidden_size, generator=g) * 4 for layer in (1, 3)}
    configs = [
        None,
        Steering({1: vectors[1]}, 2.0, "all"),
        Steering({3: vectors[3]}, -2.0, "all"),
        Steering(vectors, 1.0, "prompt"),
    ]
    jobs = [
        Job(job.sample, "R2", Prompt(job.prompt.messages, ("Is it vulnerable?",) * (turns - 1)), c)
        for job in make_jobs(make_samples(3))
        for c in configs
    ]
    static = evaluate(lm, jobs, Decoding(mode, max_new_tokens=8, cache="static"))
    dynamic = evaluate(lm, jobs, Decoding(mode, max_new_tokens=8, cache="dynamic"))
    assert [r.response for r in static] == [r.response for r in dynamic]
    if mode == "score":
        assert [r.score for r in static] == pytest.approx([r.score for r in dynamic], abs=1e-4)
    assert len({r.response if mode == "generate" else round(r.score, 3) for r in static[:4]}) > 1


def test_engine_refuses_a_prompt_pass_of_other_rows_than_it_was_set_up_for(lm):
    enc = lm.tokenizer(["abc", "defgh"], return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    vector = {1: torch.ones(lm.hidden_size)}
    with SteeringEngine(lm.model) as engine, torch.inference_mode():
        engine.set_rows([Steering(vector, 1.0, "all"), None], enc["attention_mask"])
        with pytest.raises(VulnsteerError, match="set up for 2 rows but the batch has 1"):
            lm.model(input_ids=enc["input_ids"][:1], attention_mask=enc["attention_mask"][:1])


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and still alive, and their peak: a storage's Python
    object lives as long as the storage does, so a finalizer on it sees the memory freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _freed(self, key: int, size: int) -> None:
        self.seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and id(value.untyped_storage()) not in self.seen:
                storage = value.untyped_storage()
                self.seen.add(id(storage))
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
        return out


def test_static_prompt_passes_hold_at_most_one_more_copy_of_the_prompts_keys_than_the_budget_counts():
    """The automatic batch budget counts, when generating, the decoder's cache plus one more copy of the prompt's
    keys and values. A model whose keys and values outweigh its activations: a prompt pass in groups writes each
    group straight into the static cache (its peak stays within half a prompt cache of one direct pass), and one
    that shares a repeated prompt's layers holds one cache of its own until the static one has it."""
    from conftest import byte_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vulnsteer.models import prepare

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=256,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=128,
        )
    ).eval()
    lm = prepare(model, tokenizer, "kv-heavy", "cpu")
    long_and_short = [f"int a[4]; a[i] = 0; free(p); {i}" * 8 for i in range(3)] + [f"x = y; {i}" * 4 for i in range(3)]
    vectors = {layer: torch.randn(lm.hidden_size) for layer in (1, 4)}
    configs = [Steering({1: vectors[1]}, 1.0, "all"), Steering({4: vectors[4]}, 1.0, "all")]

    def peak(texts, **settings) -> tuple[float, int]:
        enc = lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        rows = [configs[i % 2] for i in range(len(texts))]
        with (
            StaticDecoder(lm.model, [lm.tokenizer.eos_token_id], lm.tokenizer.pad_token_id, **settings) as decoder,
            torch.inference_mode(),
        ):
            decoder.generate(enc["input_ids"], enc["attention_mask"], 2, rows)  # buffers for this shape
            with LiveTensorBytes() as memory:
                decoder.generate(enc["input_ids"], enc["attention_mask"], 2, rows)
            layer = decoder.cache.layers[0]
            prompt_cache = 2 * layer.keys[:, :, : enc["input_ids"].shape[1]].nbytes * len(decoder.cache.layers)
        return memory.peak, prompt_cache

    direct, prompt_cache = peak(long_and_short, grouped_prefill=False, shared_prompts=False)
    grouped, _ = peak(long_and_short)
    assert grouped <= direct + 0.5 * prompt_cache, (grouped - direct) / prompt_cache
    one_prompt = [long_and_short[0]] * 6
    direct, prompt_cache = peak(one_prompt, grouped_prefill=False, shared_prompts=False)
    shared, _ = peak(one_prompt)
    assert direct + 0.5 * prompt_cache < shared <= direct + prompt_cache, (shared - direct) / prompt_cache


def prompt_cache(decoder, attention_mask) -> list[torch.Tensor]:
    """Every layer's keys and values at the prompt slots that are not padding."""
    real = attention_mask.bool()
    return [
        tensor[:, :, : real.shape[1]].transpose(1, 2)[real].clone()
        for layer in decoder.cache.layers
        for tensor in (layer.keys, layer.values)
    ]


def test_static_decoder_pads_ended_rows_and_stops_when_all_have_ended(lm):
    enc = lm.tokenizer(["abc", "defgh"], return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    rows = [None, None]
    free = plain_generate(lm, enc, rows, 6, [])
    eos = [int(free[0, 1]), int(free[1, 3])]  # row 0 ends at its second token, row 1 at its fourth (or sooner)
    with StaticDecoder(lm.model, eos, lm.tokenizer.pad_token_id) as decoder, torch.inference_mode():
        tokens = decoder.generate(enc["input_ids"], enc["attention_mask"], 6, rows)
    expected = plain_generate(lm, enc, rows, 6, eos)
    assert tokens.tolist() == expected.tolist()
    assert tokens.shape[1] <= 4 and tokens[0, 2:].eq(lm.tokenizer.pad_token_id).all()


def test_packed_decode_attention_equals_attention_over_repeated_heads():
    """One query token, 6 query heads sharing 2 key/value heads, a padding mask: the packed heads give what
    transformers' eager attention gives after copying each key/value head to its query heads."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(3, heads, length, 8, generator=g) for heads, length in ((6, 1), (2, 10), (2, 10)))
    mask = torch.zeros(3, 1, 1, 10)
    mask[0, ..., :4] = mask[2, ..., 7:] = torch.finfo(mask.dtype).min
    module = SimpleNamespace(num_key_value_groups=3, training=False)
    packed, _ = packed_decode_attention(module, query, key, value, mask, scaling=0.35)
    repeated, _ = eager_attention_forward(module, query, key, value, mask, scaling=0.35)
    assert packed.shape == repeated.shape == (3, 1, 6, 8)
    torch.testing.assert_close(packed, repeated)


def test_static_decode_steps_attend_through_packed_heads_and_leave_the_model_as_it_was(lm, monkeypatch):
    from transformers import AttentionInterface

    calls = []

    def counted(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return packed_decode_attention(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, static.PACKED_DECODE, counted)
    assert lm.model.config._attn_implementation == "sdpa"
    enc = lm.tokenizer(["abc", "defgh"], return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    with StaticDecoder(lm.model, [], lm.tokenizer.pad_token_id) as decoder, torch.inference_mode():
        tokens = decoder.generate(enc["input_ids"], enc["attention_mask"], 5, [None, None])
    assert tokens.tolist() == plain_generate(lm, enc, [None, None], 5, []).tolist()
    # The 4 decode steps after the prefill (which keeps transformers' attention); on a GPU, steps 3-4 are replays.
    in_python = 2 if decoder.replayable else 4
    assert calls == [1] * len(decoder_layers(lm.model)) * in_python
    assert lm.model.config._attn_implementation == "sdpa"


def test_static_cache_refuses_generation_settings_it_does_not_implement(lm):
    lm.model.generation_config.no_repeat_ngram_size = 2
    try:
        with pytest.raises(VulnsteerError, match="no_repeat_ngram_size=2.*--cache dynamic"):
            evaluate(lm, mixed_jobs(lm), Decoding("generate", max_new_tokens=4, cache="static"))
        assert evaluate(lm, mixed_jobs(lm), Decoding("score", cache="static"))  # scoring does not decode
    finally:
        lm.model.generation_config.no_repeat_ngram_size = 0


def test_plain_path_ignores_a_model_configured_to_compile(lm):
    """Hooks added after compilation would be skipped by a compiled decode step: the plain path never compiles,
    even when the model's generation config asks for a static cache and compilation."""
    from transformers.generation.configuration_utils import CompileConfig

    torch._dynamo.reset()
    config = CompileConfig(backend="eager")
    config._compile_all_devices = True
    lm.model.generation_config.compile_config = config
    lm.model.generation_config.cache_implementation = "static"
    jobs = mixed_jobs(lm)
    evaluate(lm, make_jobs(make_samples(5)), Decoding("generate", max_new_tokens=6))  # would compile, unsteered
    steered = evaluate(lm, jobs, Decoding("generate", max_new_tokens=6))
    repeated = evaluate(lm, jobs + jobs, Decoding("generate", max_new_tokens=6))  # shared prompt prefixes too
    lm.model.generation_config.cache_implementation = None
    lm.model.generation_config.compile_config = None
    assert answers(steered) == answers(evaluate(lm, jobs, Decoding("generate", max_new_tokens=6)))
    assert answers(repeated) == answers(steered) * 2
    torch._dynamo.reset()
