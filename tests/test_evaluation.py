"""The evaluation engine on tiny random Llama and Qwen2 models: job order, batching invariance, both modes,
multi-turn prompts, steering labels, and the helpers (batches, render, answer_token_ids)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import byte_tokenizer, forward_pass_tokens

from vulnsteer.architecture import decoder_layers, hidden_of, takes_additive_masks
from vulnsteer.data import Sample
from vulnsteer.engine.evaluate import evaluate
from vulnsteer.engine.planner import batch_cost, batches
from vulnsteer.engine.runners import (
    Scorer,
    answer_token_ids,
    default_runners,
    prompt_cache,
)
from vulnsteer.errors import VulnsteerError
from vulnsteer.prompts import Prompt, build_prompt, render
from vulnsteer.records import Decoding, Job, Result, Steering

VERDICTS = {"vulnerable", "not_vulnerable", "unknown"}

CODES = [
    "int main(int c, char **v) { char b[4]; strcpy(b, v[1]); return 0; }",
    "x = 1",
    "def f(p):\n    return open(p).read()",
    "void g(int *p) { free(p); *p = 2; }",
    "q = 'SELECT * FROM t WHERE id=' + uid",
]


def make_samples(n: int = 5) -> list[Sample]:
    samples = []
    for i in range(n):
        label = "vulnerable" if i % 2 == 0 else "patched"
        samples.append(
            Sample(
                id=f"s{i}",
                cwe="CWE-787",
                label=label,
                language="c",
                code=CODES[i % len(CODES)],
                pair_id=f"p{i // 2}",
                split="unit",
                source="test",
            )
        )
    return samples


def make_jobs(samples, prompt_id: str = "S1", steering=None) -> list[Job]:
    return [Job(s, prompt_id, build_prompt(s, prompt_id), steering) for s in samples]


def comparable(result: Result) -> dict:
    """Everything of a row except its timing."""
    d = result.to_dict()
    d.pop("seconds")
    return d


# --- generate mode ------------------------------------------------------------------------------


def test_generate_returns_one_result_per_job_in_order(lm):
    samples = make_samples()
    jobs = make_jobs(samples)
    seen = []
    results = evaluate(lm, jobs, Decoding("generate", max_new_tokens=6), on_result=seen.append)
    assert [r.sample_id for r in results] == [s.id for s in samples]
    assert sorted(r.sample_id for r in seen) == sorted(s.id for s in samples)  # each reported exactly once
    for result, sample in zip(results, samples):
        assert result.verdict in VERDICTS
        assert result.mode == "generate"
        assert result.score is None
        assert result.label == sample.label and result.pair_id == sample.pair_id and result.cwe == sample.cwe
        assert 0 <= result.new_tokens <= 6
        assert result.prompt_tokens > 0
        assert result.seconds >= 0
        assert result.steering is None and result.turns == []


def test_generate_prompt_tokens_match_the_rendered_prompt(lm):
    samples = make_samples(3)
    results = evaluate(lm, make_jobs(samples), Decoding("generate", max_new_tokens=2))
    for result, sample in zip(results, samples):
        text = render(lm.tokenizer, build_prompt(sample, "S1").messages)
        assert result.prompt_tokens == len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_progress_counts_every_job(lm):
    counts = []
    evaluate(
        lm, make_jobs(make_samples(4)), Decoding("generate", max_new_tokens=2, batch_tokens=1), progress=counts.append
    )
    assert sum(counts) == 4
    assert len(counts) == 4  # one row per batch with a tiny budget


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_batching_does_not_change_results(lm, mode):
    jobs = make_jobs(make_samples())
    one_by_one = evaluate(lm, jobs, Decoding(mode, max_new_tokens=8, batch_tokens=1))
    all_at_once = evaluate(lm, jobs, Decoding(mode, max_new_tokens=8, batch_tokens=10**6))
    for a, b in zip(one_by_one, all_at_once):
        assert a.sample_id == b.sample_id
        assert a.response == b.response
        assert a.prompt_tokens == b.prompt_tokens
        assert a.new_tokens == b.new_tokens
        if mode == "score":
            assert a.score == pytest.approx(b.score, abs=1e-4)
            assert a.verdict == b.verdict


# --- score mode ---------------------------------------------------------------------------------


def test_score_mode_gives_finite_scores_and_the_sign_is_the_verdict(lm):
    samples = make_samples()
    results = evaluate(lm, make_jobs(samples), Decoding("score"))
    assert [r.sample_id for r in results] == [s.id for s in samples]
    scores = [r.score for r in results]
    for r in results:
        assert r.mode == "score"
        assert isinstance(r.score, float) and math.isfinite(r.score)
        assert r.verdict == ("vulnerable" if r.score > 0 else "not_vulnerable")
        assert r.new_tokens == 0 and r.response == ""
    assert len(set(scores)) > 1, "different prompts should not all score the same"


def test_score_is_the_yes_no_log_odds_after_the_answer_prefix(lm):
    sample = make_samples(1)[0]
    [result] = evaluate(lm, make_jobs([sample]), Decoding("score"))
    text = render(lm.tokenizer, build_prompt(sample, "S1").messages, "Answer:")
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(lm.device)
    with torch.inference_mode():
        logp = lm.model(**ids).logits[0, -1].float().log_softmax(-1)
    yes, no = answer_token_ids(lm.tokenizer)
    expected = float(logp[yes].logsumexp(-1) - logp[no].logsumexp(-1))
    assert result.score == pytest.approx(expected, abs=1e-4)
    assert result.prompt_tokens == ids["input_ids"].shape[1]


# --- multi-turn ---------------------------------------------------------------------------------


def _multi_turn_job(sample: Sample, followups: tuple[str, ...]) -> Job:
    prompt = Prompt([{"role": "user", "content": f'Code: """\n{sample.code}\n"""\n\nDescribe it.'}], followups)
    return Job(sample, "R3", prompt)


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_multi_turn_prompts_record_earlier_replies(lm, mode):
    samples = make_samples(3)
    followups = ("Which parts could be risky?", "So, is it vulnerable?")
    jobs = [_multi_turn_job(s, followups) for s in samples]
    results = evaluate(lm, jobs, Decoding(mode, max_new_tokens=5))
    assert [r.sample_id for r in results] == [s.id for s in samples]
    for r in results:
        assert len(r.turns) == len(followups)
        assert all(isinstance(t, str) for t in r.turns)
        assert r.verdict in VERDICTS
        if mode == "score":
            assert math.isfinite(r.score)


def test_multi_turn_first_turn_is_the_single_turn_answer(lm):
    """The recorded first turn is exactly what the model answers to the first question alone."""
    samples = make_samples(2)
    single = evaluate(lm, [_multi_turn_job(s, ()) for s in samples], Decoding("generate", max_new_tokens=5))
    multi = evaluate(lm, [_multi_turn_job(s, ("And then?",)) for s in samples], Decoding("generate", max_new_tokens=5))
    for one, two in zip(single, multi):
        assert one.turns == []
        assert two.turns == [one.response]


def test_jobs_with_different_numbers_of_turns_in_one_run(lm):
    samples = make_samples(3)
    jobs = [
        _multi_turn_job(samples[0], ()),
        _multi_turn_job(samples[1], ("Next?",)),
        _multi_turn_job(samples[2], ("Next?", "Last?")),
    ]
    results = evaluate(lm, jobs, Decoding("generate", max_new_tokens=4))
    assert [len(r.turns) for r in results] == [0, 1, 2]
    assert [r.sample_id for r in results] == ["s0", "s1", "s2"]


def test_score_mode_with_different_numbers_of_turns_in_one_batch(lm):
    samples = make_samples(2)
    jobs = [_multi_turn_job(samples[0], ()), _multi_turn_job(samples[1], ("Next?",))]
    results = evaluate(lm, jobs, Decoding("score", max_new_tokens=4, batch_tokens=10**6))
    assert all(math.isfinite(r.score) for r in results)


# --- steering -----------------------------------------------------------------------------------


def test_steered_jobs_record_their_label_and_change_the_answer(lm):
    samples = make_samples(4)
    g = torch.Generator().manual_seed(3)
    vector = torch.randn(lm.hidden_size, generator=g) * 8.0
    label = {"vectors": "CWE-787", "layers": [1], "strength": 4.0, "positions": "all", "method": "test"}
    steering = Steering({1: vector}, 4.0, "all", label=label)
    # Alternate steered and plain jobs so the batch mixes both.
    jobs = [Job(s, "S1", build_prompt(s, "S1"), steering if i % 2 else None) for i, s in enumerate(samples)]
    plain = evaluate(lm, make_jobs(samples), Decoding("score"))
    mixed = evaluate(lm, jobs, Decoding("score"))
    for i, (p, m) in enumerate(zip(plain, mixed)):
        if i % 2:
            assert m.steering == label
            assert m.score != pytest.approx(p.score, abs=1e-4), "steering at this strength should move the score"
        else:
            assert m.steering is None
            assert m.score == pytest.approx(p.score, abs=1e-4)


def test_steered_generation_records_label(lm):
    samples = make_samples(2)
    steering = Steering({0: torch.ones(lm.hidden_size)}, 0.5, "generated", label={"strength": 0.5})
    results = evaluate(lm, make_jobs(samples, steering=steering), Decoding("generate", max_new_tokens=3))
    assert [r.steering for r in results] == [{"strength": 0.5}] * 2


# --- batches ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [1, 50, 300, 10**6])
@pytest.mark.parametrize("cost", [0, 40, 10**9])
def test_batches_respect_the_budget_and_cover_every_index_once(seed, budget, cost):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 40))]
    groups = batches(lengths, budget, cost)
    flat = [i for group in groups for i in group]
    assert sorted(flat) == list(range(len(lengths)))
    for group in groups:
        assert group
        width = max(lengths[i] for i in group)
        assert len(group) == 1 or len(group) * width <= budget
    if budget >= sum(lengths) * max(lengths) and cost == 10**9:
        assert len(groups) == 1  # batches cost more than any padding
    if budget == 1:
        assert all(len(g) == 1 for g in groups)
    if cost == 0:
        assert all(len({lengths[i] for i in g}) == 1 for g in groups)  # padding is all there is to save


def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first], *partition]
        for k in range(len(partition)):
            yield [*partition[:k], [first, *partition[k]], *partition[k + 1 :]]


@pytest.mark.parametrize("seed", range(30))
def test_batches_cost_no_more_than_any_grouping(seed):
    """Against every partition of up to 7 rows into batches within the budget."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 7))]
    budget, cost = rng.choice([60, 120, 10**6]), rng.choice([0, 5, 30, 200])

    def total(groups):
        widths = [max(lengths[i] for i in g) for g in groups]
        if any(len(g) > 1 and len(g) * w > budget for g, w in zip(groups, widths)):
            return float("inf")
        return sum(len(g) * w + cost for g, w in zip(groups, widths))

    best = min(total(p) for p in set_partitions(list(range(len(lengths)))))
    assert total(batches(lengths, budget, cost)) == best


def test_batches_group_similar_lengths():
    lengths = [10, 100, 11, 99, 12, 98]
    groups = batches(lengths, 300, 50)
    assert [sorted(lengths[i] for i in g) for g in groups] == [[98, 99, 100], [10, 11, 12]]


def test_scoring_batches_pad_less_and_generating_batches_stay_few(lm):
    """SecLLMHolmes-like lengths under a budget that fits them all: scoring (one forward pass per batch) splits
    them to cut padding, generating (a forward pass per new token) keeps one batch."""
    lengths = [629, 618, 490, 482, 465, 413, 389, 332, 306, 290, 250, 234, 209, 198, 145, 113]
    budget = 10**6
    scored = batches(lengths, budget, batch_cost(lm.model, 1))
    generated = batches(lengths, budget, batch_cost(lm.model, 192))
    padded = sum(len(g) * max(lengths[i] for i in g) for g in scored)
    assert len(generated) == 1
    assert len(scored) > 1 and padded < 0.75 * len(lengths) * max(lengths)


def test_batches_of_nothing():
    assert batches([], 100, 10) == []


# --- render -------------------------------------------------------------------------------------

NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_render_keeps_the_system_role_when_the_template_supports_it():
    tok = byte_tokenizer()
    text = render(tok, [{"role": "system", "content": "SYS"}, {"role": "user", "content": "USR"}], "Answer:")
    assert text == "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nUSR<|im_end|>\n<|im_start|>assistant\nAnswer:"


def test_render_folds_the_system_prompt_for_templates_without_a_system_role():
    tok = byte_tokenizer()
    tok.chat_template = NO_SYSTEM_TEMPLATE
    messages = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "USR"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    with pytest.raises(Exception):  # noqa: B017 (templates raise their own exception types)
        tok.apply_chat_template(messages, tokenize=False)  # the template really rejects it
    text = render(tok, messages)
    assert "system" not in text
    assert text == (
        "<|im_start|>user\nSYS\n\nUSR<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_reraises_template_errors_without_a_system_prompt():
    tok = byte_tokenizer()
    tok.chat_template = "{{ raise_exception('broken template') }}"
    with pytest.raises(Exception, match="broken template"):
        render(tok, [{"role": "user", "content": "USR"}])


def test_evaluate_works_with_a_template_without_system_role(lm):
    lm.tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    sample = make_samples(1)[0]
    [result] = evaluate(lm, make_jobs([sample], "strict"), Decoding("score"))  # strict has a system prompt
    assert math.isfinite(result.score)


# --- answer tokens ------------------------------------------------------------------------------


def test_answer_token_ids_finds_single_token_yes_and_no():
    tok = byte_tokenizer()
    yes, no = answer_token_ids(tok)
    assert set(yes) == set(tok.convert_tokens_to_ids(["Ġyes", "yes"]))
    assert set(no) == set(tok.convert_tokens_to_ids(["Ġno", "no"]))
    assert not set(yes) & set(no)
    for i in yes:
        assert tok.decode([i]).strip() == "yes"
    for i in no:
        assert tok.decode([i]).strip() == "no"


def test_answer_token_ids_refuses_a_tokenizer_without_single_token_answers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    with pytest.raises(ValueError, match="single-token"):
        answer_token_ids(fast)


@pytest.fixture
def one_batch(monkeypatch):
    """Batches cost more than any padding: each as large as the budget allows (one, here), as these tests need."""
    forward_pass_tokens(monkeypatch, 1e9)


def test_out_of_memory_splits_the_batch_and_loses_nothing(lm, monkeypatch, one_batch):
    """A batch that does not fit is halved and retried until it does; results equal an unconstrained run."""
    jobs = make_jobs(make_samples(5))
    expected = evaluate(lm, jobs, Decoding("score", batch_tokens=10**6))
    tried, ran = [], []

    class SmallDevice(Scorer):
        def run(self, lm_, texts, steerings):
            tried.append(len(texts))
            if len(texts) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            ran.append(len(texts))
            return super().run(lm_, texts, steerings)

    results = evaluate(lm, jobs, Decoding("score", batch_tokens=10**6), runners={"score": SmallDevice()})
    assert tried[0] == 5 and max(ran) <= 2 and sum(ran) == 5
    assert [r.sample_id for r in results] == [r.sample_id for r in expected]
    for a, b in zip(results, expected):
        assert a.score == pytest.approx(b.score, abs=1e-4) and a.prompt_tokens == b.prompt_tokens


SHARED_PREFIX_MODES = [("score", "sdpa"), ("score", "eager"), ("generate", "sdpa")]


@pytest.mark.parametrize("mode, attention", SHARED_PREFIX_MODES, ids=["-".join(m) for m in SHARED_PREFIX_MODES])
def test_shared_prefix_rows_equal_full_batches(lm, monkeypatch, mode, attention):
    """Rows of repeated prompts steered from their last token on share one unsteered pass over each prompt (several
    prompts of different lengths in one batch: such a batch pays padding once per prompt, not per row, and is
    planned so); their answers equal full passes of each job alone. Scoring, a prompt's rows then run as tokens
    side by side in one row of the batch, the prompt's cache never copied."""
    lm.model.config._attn_implementation = attention
    calls, shapes = [], []
    path = f"{mode}-shared-prefix"
    shared_runner = default_runners(8)[path]

    class Observed:
        def run(self, lm_, texts, steerings):
            calls.append(texts)
            return shared_runner.run(lm_, texts, steerings)

    g = torch.Generator().manual_seed(3)
    vector = {1: torch.randn(lm.hidden_size, generator=g) * 4}
    samples = make_samples(3)
    base = make_jobs(samples)
    configs = [
        None,
        Steering(vector, 2.0, "prompt-last"),
        Steering(vector, -1.0, "prompt-last"),
        Steering(vector, 3.0, "generated"),
        Steering(vector, 1.0, "all"),
    ]  # "all" takes the ordinary path
    jobs = [Job(j.sample, j.prompt_id, j.prompt, c) for j in base for c in configs]
    del jobs[-4]  # the last prompt has one row fewer: its place among the side-by-side tokens stays empty
    decoding = Decoding(mode, max_new_tokens=8)
    layer = decoder_layers(lm.model)[0]
    handle = layer.register_forward_hook(lambda m, a, out: shapes.append(tuple(hidden_of(out).shape[:2])))
    try:
        shared = evaluate(lm, jobs, decoding, runners={path: Observed()})
    finally:
        handle.remove()
    assert len(calls) == 1 and len(calls[0]) == 11 and len(set(calls[0])) == 3, "one batch, three distinct prompts"
    assert len({len(lm.tokenizer(t)["input_ids"]) for t in calls[0]}) == 3, "the prompts should need padding"
    if mode == "score":  # the prompts minus their last token, then each prompt's 4 rows as 4 tokens of one row
        assert (3, 4) in shapes and shapes[shapes.index((3, 4)) - 1][0] == 3
    one_by_one = [evaluate(lm, [job], decoding)[0] for job in jobs]  # a single job never shares
    assert [r.prompt_tokens for r in shared] == [r.prompt_tokens for r in one_by_one]
    if mode == "score":
        assert [r.score for r in shared] == pytest.approx([r.score for r in one_by_one], abs=1e-4)
        assert shared[0].score != pytest.approx(shared[1].score, abs=1e-3), "steering at the last token did nothing"
    else:
        assert [r.response for r in shared] == [r.response for r in one_by_one]
        assert [r.new_tokens for r in shared] == [r.new_tokens for r in one_by_one]
        assert len({r.response for r in shared[:4]}) > 1, "steering changed no answer"


def test_scoring_shares_no_prompt_pass_with_attention_that_takes_no_prepared_mask(lm, monkeypatch):
    """Side-by-side scoring needs a 4-D mask taken as given; other attention kernels (flash attention) score each
    row in full, with the same scores."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    vector = {1: torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(4)) * 4}
    jobs = [
        Job(j.sample, j.prompt_id, j.prompt, Steering(vector, s, "prompt-last"))
        for j in make_jobs(make_samples(2))
        for s in (-1.0, 1.0)
    ]
    expected = evaluate(lm, jobs, Decoding("score"))
    # An attention kernel of another name (as flash attention is), computing what SDPA computes.
    monkeypatch.setitem(AttentionInterface._global_mapping, "test_kernel", sdpa_attention_forward)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "test_kernel", sdpa_mask)
    monkeypatch.setattr(lm.model.config, "_attn_implementation", "test_kernel")
    assert not takes_additive_masks(lm.model)

    class Refused:
        def run(self, *args):
            raise AssertionError("side-by-side scoring with a kernel that takes no prepared mask")

    scores = [r.score for r in evaluate(lm, jobs, Decoding("score"), runners={"score-shared-prefix": Refused()})]
    assert scores == pytest.approx([r.score for r in expected], abs=1e-4)


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_a_sliding_window_model_answers_a_sweep_as_each_job_alone(mode):
    """A prepared 4-D mask would bypass a sliding window, and such a cache keeps only the window: scoring, these
    models run a sweep's rows in full passes; generating, they share each prompt's pass in the model's own cache,
    and the layers below each row's first steered one in it. Either way, each job's own answers (the prompts here
    are longer than the window)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vulnsteer.models import prepare

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=0,
    )
    lm = prepare(Qwen2ForCausalLM(config).float().eval(), tokenizer, "tiny-window", "cpu")
    vector = {1: torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(2)) * 4}
    # prompt-last rows share the prompt's pass; "all" rows share layer 0 with it (its window cache copied back)
    jobs = [
        Job(j.sample, j.prompt_id, j.prompt, Steering(vector, s, positions))
        for j in make_jobs(make_samples(2))
        for s in (-1.0, 1.0)
        for positions in ("prompt-last", "all")
    ]
    decoding = Decoding(mode, max_new_tokens=6)
    together = evaluate(lm, jobs, decoding)
    alone = [evaluate(lm, [job], decoding)[0] for job in jobs]
    if mode == "score":
        assert [r.score for r in together] == pytest.approx([r.score for r in alone], abs=1e-4)
    else:
        assert [r.response for r in together] == [r.response for r in alone]


def test_cheap_and_full_batches_run_at_the_same_pace():
    """A sweep's rows that share a prompt's pass are cheap: they are spread among the full ones by rows (each list
    in its order), so that a progress bar's rate holds from the start rather than racing through them first."""
    from vulnsteer.engine.planner import Batch, interleave

    cheap = [Batch(list(range(k * 10, k * 10 + 10)), True, True) for k in range(4)]
    full = [Batch([100 + k], True) for k in range(2)]
    merged = interleave(cheap, full)
    assert merged == [cheap[0], full[0], cheap[1], cheap[2], full[1], cheap[3]]
    assert interleave([], full) == full and interleave(cheap, []) == cheap


def test_automatic_batch_budget_fits_free_memory():
    """On a GPU the budget comes from free memory: Qwen2.5-14B's KV cache on an H200 holds all 48 hand-crafted
    files in one batch (one read of the weights per decode step); less memory or more new tokens, fewer rows."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vulnsteer.engine.planner import CPU_BATCH_TOKENS, auto_batch_tokens

    config = Qwen2Config(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    assert auto_batch_tokens(model, 192, 113) == CPU_BATCH_TOKENS  # not on a GPU, no memory figure given
    h200_free = 139 * 2**30 - 30 * 10**9  # after 29.5 GB of weights
    budget = auto_batch_tokens(model, 200, 113, free_bytes=h200_free)
    assert budget >= 48 * 629, "the 48 files (longest 629 tokens) should make one batch"
    kv_per_token = 2 * 48 * 8 * 128 * 2
    # The decoder's cache for prompt and new tokens, and the prompt pass's own copy of the prompt's (held until the
    # decoder's cache has it), fit.
    assert budget * kv_per_token * (2 + 200 / 113) < h200_free, "the batch's KV caches alone would not fit"
    assert auto_batch_tokens(model, 200, 113, free_bytes=h200_free // 4) < budget
    assert auto_batch_tokens(model, 800, 113, free_bytes=h200_free) < budget
    assert auto_batch_tokens(model, 0, 113, free_bytes=h200_free) > budget  # scoring keeps no new tokens
    assert auto_batch_tokens(model, 200, 300, free_bytes=1) == 300  # at least one row


def test_batch_budget_must_be_positive(lm):
    with pytest.raises(VulnsteerError, match="at least 1"):
        evaluate(lm, make_jobs(make_samples(2)), Decoding("score", batch_tokens=0))


@pytest.mark.parametrize("prompts", [1, 3])
def test_generating_rows_of_one_prompt_share_the_layers_below_their_own_first_steered_one(
    lm, one_batch, prompts, monkeypatch
):
    """Generating, the prompt pass shares those layers too, and gives every row the keys and values of the layers
    it shared, so that the decode steps run every row as its own: one prompt (one group), or prompts of three
    lengths (a group each, their caches merged)."""
    from functools import partial

    import vulnsteer.engine.runners as runners
    from vulnsteer.engine.prompt_pass import length_groups

    # One batch (`one_batch`), whose prompt pass runs a group per length.
    monkeypatch.setattr(runners, "length_groups", partial(length_groups, cost=0.0))
    g = torch.Generator().manual_seed(7)
    vectors = {layer: torch.randn(lm.hidden_size, generator=g) * 4 for layer in (1, 2, 3)}
    configs = [
        Steering({2: vectors[2]}, 1.5, "all"),
        Steering({1: vectors[1]}, -2.0, "prompt"),
        Steering({3: vectors[3]}, -1.0, "all"),
        Steering({1: vectors[1]}, 0.0, "all"),
    ]  # strength 0: none
    jobs = [Job(j.sample, j.prompt_id, j.prompt, c) for j in make_jobs(make_samples(prompts)) for c in configs]
    layers = decoder_layers(lm.model)
    prompt_rows = {k: [] for k in range(len(layers))}

    def record(k):
        def hook(module, args, out):
            if out.shape[1] > 1:  # prompt passes, not decode steps
                prompt_rows[k].append(out.shape[0])

        return hook

    handles = [layers[k].mlp.register_forward_hook(record(k)) for k in prompt_rows]
    decoding = Decoding("generate", max_new_tokens=8, batch_tokens=10**6, final_answer=False)  # its prompt passes only
    try:
        shared = evaluate(lm, jobs, decoding)
    finally:
        for handle in handles:
            handle.remove()
    # Per prompt: layer 0 runs one row; layer 1 the "prompt" row and one row for the others; each later layer adds
    # the row steered there (the row of strength 0 never forks).
    assert len(prompt_rows[0]) == prompts
    assert [sum(prompt_rows[k]) for k in range(4)] == [prompts, 2 * prompts, 3 * prompts, 4 * prompts]
    one_by_one = [evaluate(lm, [job], decoding)[0] for job in jobs]
    assert [r.response for r in shared] == [r.response for r in one_by_one]
    assert len({r.response for r in shared[: len(configs)]}) > 1, "steering changed no answer"
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers), "hooks left behind"
    # Tokens alone would not show keys given to the wrong rows (tiny random models attend almost uniformly): the
    # prompt pass's cache equals the one each row computes for itself.
    enc = lm.tokenizer(
        [render(lm.tokenizer, job.prompt.messages) for job in jobs],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    ids, mask = enc["input_ids"][:, :-1], enc["attention_mask"][:, :-1]
    args = (
        lm.model,
        ids,
        mask,
        (mask.cumsum(-1) - 1).clamp(min=0),
        [job.steering for job in jobs],
        length_groups(lm.model, mask, cost=0.0),
    )
    prompts = [tuple(row) for row in enc["input_ids"].tolist()]
    with torch.inference_mode():
        trunk = [(layer.keys, layer.values) for layer in prompt_cache(*args, prompts).layers]
        own = [(layer.keys, layer.values) for layer in prompt_cache(*args).layers]  # no row shares
    for (keys, values), (own_keys, own_values) in zip(trunk, own):
        assert torch.allclose(keys, own_keys, atol=1e-5) and torch.allclose(values, own_values, atol=1e-5)


def test_scoring_rows_of_one_prompt_share_the_layers_below_their_own_first_steered_one(lm, one_batch):
    """Configs that steer a whole prompt cannot share its cache, but below its own first steered layer each row
    computes what its prompt computes unsteered: there a layer runs the rows that have forked plus one row per
    prompt for the rest, and scores equal each job alone."""
    from vulnsteer.architecture import decoder_layers

    g = torch.Generator().manual_seed(5)
    vectors = {layer: torch.randn(lm.hidden_size, generator=g) * 4 for layer in (1, 2, 3)}
    configs = [
        Steering({2: vectors[2], 3: vectors[3]}, 1.5, "all"),
        Steering({3: vectors[3]}, -2.0, "prompt"),
        Steering({2: vectors[2]}, 0.5, "all"),
        Steering({1: vectors[1]}, 0.0, "all"),
    ]  # strength 0: none
    samples = make_samples(3)
    jobs = [Job(j.sample, j.prompt_id, j.prompt, c) for j in make_jobs(samples) for c in configs]
    jobs.append(Job(samples[0], "S1", build_prompt(samples[0], "S1"), None))  # one unsteered row
    layers = decoder_layers(lm.model)
    rows_seen = {k: [] for k in range(len(layers))}
    handles = [
        layers[k].mlp.register_forward_hook(lambda m, a, out, k=k: rows_seen[k].append(out.shape[0])) for k in rows_seen
    ]  # inside the layer: the rows it computes
    try:
        shared = evaluate(lm, jobs, Decoding("score", batch_tokens=10**6))
    finally:
        for handle in handles:
            handle.remove()
    # Layers 0-1: one row per prompt. Layer 2: the 2 configs steered there x 3 prompts, plus one row per prompt
    # for its rows steered at 3 or not at all. Layer 3: the 3 steered configs x 3 prompts, plus one row per prompt
    # for the 4 rows left unsteered (the 3 of strength 0 and prompt 0's unsteered row).
    assert rows_seen == {0: [3], 1: [3], 2: [9], 3: [12]}
    one_by_one = [evaluate(lm, [job], Decoding("score"))[0] for job in jobs]
    assert [r.score for r in shared] == pytest.approx([r.score for r in one_by_one], abs=1e-4)
    assert shared[0].score != pytest.approx(shared[-1].score, abs=1e-3), "steering should change the score"
    assert shared[3].score == pytest.approx(shared[-1].score, abs=1e-4), "strength 0 should not steer"
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers), "hooks left behind"


def test_generate_mode_adds_a_forced_final_answer_scored_without_a_parser(lm):
    """After each free answer, the final yes/no turn is the conversation so far plus FINAL_QUESTION, scored as
    score mode scores, under the row's own steering; its verdict sits beside the parsed one."""
    from vulnsteer.engine.runners import yes_no_log_odds
    from vulnsteer.prompts import ANSWER_PREFIX, FINAL_QUESTION

    samples = make_samples(3)
    vector = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(3)) * 8
    steered = Steering({1: vector}, 2.0, "all")
    jobs = make_jobs(samples) + make_jobs(samples, steering=steered)
    results = evaluate(lm, jobs, Decoding("generate", max_new_tokens=6))
    plain = evaluate(lm, jobs, Decoding("generate", max_new_tokens=6, final_answer=False))
    assert [r.response for r in results] == [r.response for r in plain]  # the free answers are untouched
    assert all(r.final_score is None and r.final_verdict is None for r in plain)
    for job, r in zip(jobs[:3], results[:3]):
        messages = [
            *job.prompt.messages,
            {"role": "assistant", "content": r.response},
            {"role": "user", "content": FINAL_QUESTION},
        ]
        encoded = lm.tokenizer(
            [render(lm.tokenizer, messages, ANSWER_PREFIX)], return_tensors="pt", add_special_tokens=False
        )
        with torch.inference_mode():
            expected = yes_no_log_odds(lm, encoded)[0]
        assert r.final_score == pytest.approx(expected, abs=1e-4)
        assert r.final_verdict == ("vulnerable" if r.final_score > 0 else "not_vulnerable")
        assert r.new_tokens > 0 and r.turns == []
    assert [r.final_score for r in results[:3]] != [r.final_score for r in results[3:]], "final turn unsteered"


def test_a_resumed_run_computes_each_row_in_the_batch_an_uninterrupted_run_gives_it(lm):
    """Rows already stored (`done`) are planned with the rest: a batch of only stored rows is skipped, any other
    batch runs whole, so every row left sees the companions (and so the float results) of an uninterrupted run."""
    from vulnsteer.engine.runners import default_runners
    from vulnsteer.records import SteeringId

    batches: list[tuple[str, list[tuple[str, str]]]] = []  # (path, [(text, row)]); generating, then final turns

    class Observed:
        def __init__(self, path, inner):
            self.path, self.inner = path, inner

        def run(self, lm_, texts, steerings):
            batches.append((self.path, [(text, steering.label.config) for text, steering in zip(texts, steerings)]))
            return self.inner.run(lm_, texts, steerings)

    vector = {1: torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(5)) * 4}
    jobs = [
        Job(j.sample, j.prompt_id, j.prompt, Steering(vector, s, "all", SteeringId(config=f"{j.sample.id}{s}")))
        for s in (-1.0, 1.0, 2.0)
        for j in make_jobs(make_samples(5))
    ]
    decoding = Decoding("generate", max_new_tokens=4, batch_tokens=400)
    runners = {path: Observed(path, runner) for path, runner in default_runners(4).items()}

    full = evaluate(lm, jobs, decoding, runners=runners)
    full_batches, batches[:] = list(batches), []
    row = {r.steering.config: k for k, r in enumerate(full)}
    generating = [[row[config] for _, config in rows] for path, rows in full_batches if path != "score"]
    assert len(generating) >= 3, "the test needs several batches"
    # A finished batch and half of the next, as a kill leaves them
    done = set(generating[0]) | set(generating[1][: len(generating[1]) // 2])

    written: list[Result] = []
    resumed = evaluate(lm, jobs, decoding, runners=runners, done=done, on_result=written.append)
    assert batches == [b for b in full_batches if not done.issuperset(row[config] for _, config in b[1])], (
        "the resumed rows ran in other batches than an uninterrupted run's"
    )
    left = [r for k, r in enumerate(full) if k not in done]
    assert [comparable(r) for r in resumed] == [comparable(r) for r in left]
    assert sorted(r.steering.config for r in written) == sorted(r.steering.config for r in left)
