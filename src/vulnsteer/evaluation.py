"""Turn (sample, prompt, steering) jobs into verdicts, batched, in two modes.

`generate`: greedy decoding of a free-text answer, parsed into a verdict; then (`Decoding.final_answer`) a forced
final turn asks for yes or no and scores it as score mode does, a second verdict that needs no parser.
`score`: no generation; the assistant turn is prefilled with "Answer:" and the log-odds of the next token being
"yes" rather than "no" is a continuous vulnerability score (> 0 means vulnerable).

Baseline and steered rows go through the same code path: a job's steering is just a per-row setting, so one batch
may hold both, and both see exactly the same prompts and decoding.

A sweep asks each prompt under many configs, so work that does not depend on the config is done once per prompt:
rows steered from the last prompt token on share one pass over the rest of the prompt (its KV cache; scoring, the
rows then run as tokens side by side on that one cache), and rows that steer the whole prompt share with their
prompt the decoder layers below their own first steered one (scoring, in its one pass; generating, in the prompt
pass). Batches stay within the free GPU memory and group rows by length, as `vulnsteer.batching` plans them.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Sequence

import torch

from vulnsteer.batching import auto_batch_tokens, batch_cost, batches
from vulnsteer.data import Sample, family_of
from vulnsteer.errors import VulnsteerError
from vulnsteer.models import LoadedModel
from vulnsteer.prompts import Prompt
from vulnsteer.decoding import (StaticDecoder, cache_argument, grouped_prompt_pass, length_groups, prompt_keys,
                                sliding_window)
from vulnsteer.steering import Steering, steer, steer_tokens, unsteered_before_last_prompt_token
from vulnsteer.trunk import shared_trunk
from vulnsteer.verdicts import parse_verdict

Mode = Literal["generate", "score"]
MODES = ("generate", "score")
ANSWER_PREFIX = "Answer:"
FINAL_QUESTION = ("Final answer: does the code above contain the vulnerability you were asked about? "
                  "Reply with yes or no.")


@dataclass(frozen=True)
class Job:
    """One row of work: a sample asked with a prompt, optionally steered."""

    sample: Sample
    prompt_id: str
    prompt: Prompt
    steering: Steering | None = None


@dataclass
class Result:
    """One line of samples.jsonl."""

    sample_id: str
    pair_id: str
    cwe: str
    label: str
    split: str
    source: str
    prompt_id: str
    mode: str
    response: str
    verdict: str
    score: float | None
    prompt_tokens: int
    new_tokens: int
    seconds: float  # the batch's wall time divided by its rows
    steering: dict | None = None
    turns: list[str] = field(default_factory=list)  # earlier replies of multi-turn prompts
    final_score: float | None = None  # generate mode: log-odds of yes in the forced final yes/no turn
    final_verdict: str | None = None  # ... and its verdict (> 0: vulnerable), beside the parsed one

    @property
    def family(self) -> str:
        """The pair with its augmented copies: one cluster for bootstrap intervals."""
        return family_of(self.source, self.split, self.sample_id, self.pair_id)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Decoding:
    """Settings shared by every row of a run, recorded in summary.json."""

    mode: Mode = "generate"
    max_new_tokens: int = 192
    # Prompt tokens per batch (rows x padded width); bounds memory. None: as many as fit (`auto_batch_tokens`).
    batch_tokens: int | None = None
    # "dynamic": transformers' `generate`, steering by `steer()` hooks per batch. "static": `StaticDecoder`, a
    # fixed-size cache and a persistent `SteeringEngine`, so that on a GPU a decode step is one CUDA-graph replay.
    cache: str = "dynamic"
    # Generating: after the free answer, a forced final yes/no turn scored by log-odds (`Result.final_verdict`).
    final_answer: bool = True


def render(tokenizer, messages: list[dict], prefix: str = "") -> str:
    """Apply the chat template up to the assistant turn; fold the system prompt into the first user turn for
    templates that reject a system role."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates raise their own exception types (jinja2 TemplateError among them)
        if messages[0]["role"] != "system":
            raise
        system, first, *rest = messages
        merged = {"role": first["role"], "content": system["content"] + "\n\n" + first["content"]}
        text = tokenizer.apply_chat_template([merged, *rest], tokenize=False, add_generation_prompt=True)
    return text + prefix


def batch_budget(lm: LoadedModel, decoding: Decoding, lengths: Sequence[int], score: bool) -> int:
    """`decoding.batch_tokens`, or the automatic budget for prompts of these lengths."""
    if decoding.batch_tokens is not None:
        return decoding.batch_tokens
    return auto_batch_tokens(lm.model, 0 if score else decoding.max_new_tokens, min(lengths, default=1))


def _steering_of(rows: Sequence[Job]) -> list[Steering | None] | None:
    steerings = [job.steering for job in rows]
    return steerings if any(steerings) else None


def _run_batch(lm: LoadedModel, texts: list[str], fn):
    """`fn` of the left-padded encoded batch (which steers its rows itself)."""
    encoded = lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    with torch.inference_mode():
        return encoded, fn(encoded)


def _eos_ids(lm: LoadedModel) -> list[int]:
    """The tokenizer's end token and the model's (chat models often end turns with another token)."""
    return sorted({lm.tokenizer.eos_token_id, *_as_list(lm.model.generation_config.eos_token_id)} - {None})


def _generate(lm: LoadedModel, encoded, max_new_tokens: int) -> torch.Tensor:
    # Hooks added after transformers compiles a decode step are invisible to it: never compile here (the static
    # decoder is the fast path). Rows that bring their own cache (a shared prompt prefix) keep it.
    given = any(key in encoded for key in ("cache", "past_key_values"))
    cache = {"cache_implementation": None if given else "dynamic", "disable_compile": True}
    out = lm.model.generate(
        **encoded, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
        eos_token_id=_eos_ids(lm), pad_token_id=lm.tokenizer.pad_token_id, **cache,
    )
    return out[:, encoded["input_ids"].shape[1]:]


def _generated_lengths(generated: torch.Tensor, eos: list[int]) -> list[int]:
    """Tokens generated per row, the end token included (padding after it, which may equal it, is not)."""
    ended = torch.isin(generated, torch.tensor(eos, device=generated.device))
    first_end = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, generated.shape[1])
    return first_end.tolist()


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def answer_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Single tokens that begin a yes or a no answer after "Answer:" (with and without a leading space)."""
    def first_tokens(words):
        ids = set()
        for word in words:
            tokens = tokenizer.encode(word, add_special_tokens=False)
            if len(tokens) >= 1 and tokenizer.decode(tokens[:1]).strip().lower() == word.strip().lower():
                ids.add(tokens[0])
        return sorted(ids)
    yes, no = first_tokens([" yes", " Yes", "yes", "Yes", " YES"]), first_tokens([" no", " No", "no", "No", " NO"])
    if not yes or not no:
        raise ValueError("the tokenizer has no single-token 'yes'/'no'; use --mode generate")
    return yes, no


def evaluate(
    lm: LoadedModel,
    jobs: Sequence[Job],
    decoding: Decoding = Decoding(),
    progress: Callable[[int], None] | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run every job; results come back in the order of `jobs`. `on_result` sees each as soon as its batch ends
    (the store uses it to write rows as they finish, so an interrupted run loses at most one batch)."""
    if decoding.cache not in ("dynamic", "static"):
        raise VulnsteerError(f"unknown cache {decoding.cache!r}; use dynamic or static")
    if decoding.batch_tokens is not None and decoding.batch_tokens < 1:
        raise VulnsteerError(f"--batch-tokens must be at least 1, got {decoding.batch_tokens}")
    # The static cache serves generation: a run that only scores (one turn) takes the plain path, which shares
    # more of a sweep's work.
    generates = decoding.mode == "generate" or any(job.prompt.followups for job in jobs)
    static = (StaticDecoder(lm.model, _eos_ids(lm), lm.tokenizer.pad_token_id, max_batch=min(len(jobs), 64))
              if decoding.cache == "static" and generates else None)
    try:
        return _evaluate(lm, jobs, decoding, progress, on_result, static)
    finally:
        if static is not None:
            static.close()


def _evaluate(lm, jobs, decoding, progress, on_result, static) -> list[Result]:
    results: list[Result | None] = [None] * len(jobs)
    histories = [[] for _ in jobs]
    final = decoding.mode == "generate" and decoding.final_answer  # each answer then gets a forced yes/no turn
    followups = [list(job.prompt.followups) for job in jobs]
    for turn in range(1 + max(map(len, followups))):
        active = [i for i in range(len(jobs)) if turn <= len(followups[i])]
        last_turn = {i for i in active if turn == len(followups[i])}
        scoring = {i for i in last_turn if decoding.mode == "score"}
        for phase in ([i for i in active if i not in scoring], [i for i in active if i in scoring]):
            texts = _render_all(lm, jobs, phase, histories, followups, scoring)
            counts = {t: len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in set(texts.values())}
            lengths = {i: counts[texts[i]] for i in phase}
            score = bool(phase) and phase[0] in scoring
            budget = batch_budget(lm, decoding, list(lengths.values()), score)
            cost = batch_cost(lm.model, 1 if score else decoding.max_new_tokens)
            # Scoring shares through a 4-D mask, on the plain path; generating, either path shares.
            sharing = (static is None and takes_additive_masks(lm.model)) if score else True
            shared = _prefix_shared_rows(jobs, phase, texts) if sharing else []
            rest = sorted(set(phase) - set(shared), key=lambda i: texts[i])  # a prompt's rows side by side
            if score:  # a prompt's rows cost one pass over it plus a token each: plan the prompts
                by_prompt: dict[str, list[int]] = {}
                for i in shared:
                    by_prompt.setdefault(texts[i], []).append(i)
                prompts = list(by_prompt.values())
                sharing_groups = [[i for g in group for i in prompts[g]]
                                  for group in batches([lengths[rows[0]] for rows in prompts], budget, cost)]
            else:  # each row keeps its own copy of the prompt's cache, but pays its padding once per prompt
                rows_per_prompt = len(shared) / max(1, len({texts[i] for i in shared}))
                sharing_groups = [[shared[g] for g in group]
                                  for group in batches([lengths[i] for i in shared], budget, cost * rows_per_prompt)]
            full_groups = [[rest[g] for g in group] for group in batches([lengths[i] for i in rest], budget, cost)]
            groups = _at_the_same_pace([(g, True) for g in sharing_groups], [(g, False) for g in full_groups])
            for rows, shared_prefix in groups:
                start = time.perf_counter()
                replies, scores, new_tokens, prompt_tokens = _answer(
                    lm, [texts[i] for i in rows], _steering_of([jobs[i] for i in rows]), rows[0] in scoring,
                    decoding.max_new_tokens, static, shared_prefix)
                finals = _final_scores(lm, jobs, rows, replies, histories, followups, decoding, static) \
                    if final and rows[0] in last_turn else [None] * len(rows)
                seconds = (time.perf_counter() - start) / len(rows)
                for k, i in enumerate(rows):
                    if i not in last_turn:
                        histories[i].append(replies[k].strip())
                        continue
                    results[i] = _result(jobs[i], decoding.mode, replies[k].strip(), scores[k], prompt_tokens[k],
                                         new_tokens[k], seconds, histories[i], finals[k])
                    if on_result:
                        on_result(results[i])
                if progress:
                    progress(sum(1 for i in rows if i in last_turn))
    return results  # type: ignore[return-value]


def _final_scores(lm, jobs, rows: list[int], replies: list[str], histories, followups, decoding: Decoding,
                  static) -> list[float]:
    """The forced final turn of a batch's answers, right after they are generated (so that each finished row is
    written at once): the reply, then FINAL_QUESTION, scored as score mode scores, under the row's own steering."""
    texts = [_conversation_text(lm, jobs[i], histories[i] + [replies[k].strip()], followups[i] + [FINAL_QUESTION],
                                True) for k, i in enumerate(rows)]
    return _answer(lm, texts, _steering_of([jobs[i] for i in rows]), True, decoding.max_new_tokens, static)[1]


def _at_the_same_pace(first: list[tuple[list[int], bool]], second: list[tuple[list[int], bool]]) -> list:
    """Both lists of batches in their order, merged so that each list's rows run at the same pace: rows that share a
    prompt's pass cost a fraction of full ones, and a progress bar's rate (and ETA) should hold from the start."""
    def paced(batches_):
        total, done, keyed = sum(len(rows) for rows, _ in batches_), 0, []
        for batch in batches_:
            keyed.append((done / total, batch))
            done += len(batch[0])
        return keyed
    return [batch for _, batch in sorted(paced(first) + paced(second), key=lambda pair: pair[0])]


def _prefix_shared_rows(jobs: Sequence[Job], rows: list[int], texts: dict) -> list[int]:
    """Rows whose prompt repeats (a sweep asks each prompt under many configs) and whose steering starts at the
    last prompt token or later: everything before that token is the same unsteered computation for all of them.
    Returned with each prompt's rows side by side, so that batches keep them together."""
    eligible = [i for i in rows if unsteered_before_last_prompt_token(jobs[i].steering)]
    counts: dict[str, int] = {}
    for i in eligible:
        counts[texts[i]] = counts.get(texts[i], 0) + 1
    return sorted((i for i in eligible if counts[texts[i]] > 1), key=lambda i: texts[i])


def _answer(lm: LoadedModel, texts: list[str], steerings, score: bool, max_new_tokens: int,
            static: StaticDecoder | None = None, shared_prefix: bool = False):
    """Replies, scores, new-token and prompt-token counts of one batch. On out-of-memory the batch is split in
    halves and retried, so a batch too large for the device costs time, never results."""
    try:
        if shared_prefix and static is None:  # the static decoder shares repeated prompts by itself
            return _answer_shared_prefix(lm, texts, steerings, score, max_new_tokens)
        rows = steerings or [None] * len(texts)
        if score:
            def score_batch(enc):
                hooks = nullcontext()
                if static is not None:
                    static.steering.set_rows(rows, enc["attention_mask"])
                elif steerings:
                    hooks = steer(lm.model, steerings, enc["attention_mask"])
                with hooks, shared_trunk(lm.model, texts, steerings):
                    return yes_no_log_odds(lm, enc)
            encoded, scores = _run_batch(lm, texts, score_batch)
            replies, new_tokens = [""] * len(texts), [0] * len(texts)
        else:
            def generate_batch(enc):
                if static is not None:
                    return static.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens, rows)
                return _generate_steered(lm, enc, steerings, max_new_tokens)
            encoded, generated = _run_batch(lm, texts, generate_batch)
            replies, scores = _decode(lm, generated), [None] * len(texts)
            new_tokens = _generated_lengths(generated, _eos_ids(lm))
    except torch.cuda.OutOfMemoryError:
        if len(texts) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(texts) // 2
        first = _answer(lm, texts[:half], steerings and steerings[:half], score, max_new_tokens, static, shared_prefix)
        second = _answer(lm, texts[half:], steerings and steerings[half:], score, max_new_tokens, static,
                         shared_prefix)
        return tuple(a + b for a, b in zip(first, second))
    return replies, scores, new_tokens, encoded["attention_mask"].sum(dim=1).tolist()


def _generate_steered(lm: LoadedModel, encoded, steerings, max_new_tokens: int) -> torch.Tensor:
    """`_generate` under `steer()` hooks. Prompts of very different lengths, or repeated ones (a sweep's configs),
    first run up to their last token on their own (`_prompt_cache`): in groups of similar length, so that the prompt
    pass computes less padding, and sharing each prompt's layers below each row's first steered one."""
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    hooks = steer(lm.model, steerings, mask) if steerings else nullcontext()
    groups = length_groups(lm.model, mask[:, :-1]) if ids.shape[1] > 1 else []
    prompts = prompt_keys(ids, mask)
    repeated = len(set(prompts)) < len(prompts)  # a sweep's configs: their prompt pass shares layers (`shared_trunk`)
    if not groups or (len(groups) == 1 and not repeated):
        with hooks:
            return _generate(lm, encoded, max_new_tokens)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Only rows steered before their last prompt token are steered in that pass (prompt-last is the next call).
    before_last = [None if unsteered_before_last_prompt_token(row) else row for row in steerings or [None] * len(ids)]
    cache = _prompt_cache(lm.model, ids[:, :-1], mask[:, :-1], positions[:, :-1], before_last, groups, prompts)
    with hooks:
        return _generate(lm, {"input_ids": ids, "attention_mask": mask, cache_argument(lm.model): cache},
                         max_new_tokens)


def _prompt_cache(model, ids, mask, positions, steerings, groups: list[list[int]], prompts: list):
    """The KV cache of a left-padded batch of prompts, computed in groups of similar length (`grouped_prompt_pass`),
    row i steered by `steerings[i]` (None: not at all); rows of one prompt (equal `prompts[i]`) share the layers
    below their own first steered one."""
    def steered(group: list[int], group_mask: torch.Tensor):
        rows = [steerings[i] for i in group]
        hooks = ExitStack()
        if any(rows):
            hooks.enter_context(steer(model, rows, group_mask))
        hooks.enter_context(shared_trunk(model, [prompts[i] for i in group], rows))
        return hooks

    return grouped_prompt_pass(model, ids, mask, positions, groups, steered)[1]


def _answer_shared_prefix(lm: LoadedModel, texts: list[str], steerings, score: bool, max_new_tokens: int):
    """`_answer` for rows that repeat prompts and are steered from the last prompt token on: each distinct prompt
    minus its last token runs once, unsteered. Scoring, the prompt's rows then run as copies of its last token side
    by side (`_score_side_by_side`); generating, its cache is copied to the prompt's rows, which run the last token
    and every new token with their own steering, all in one batch."""
    distinct, of_row = _distinct(texts)
    encoded = lm.tokenizer(distinct, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as `generate` counts them, padding on the left
    argument = cache_argument(lm.model)
    of_row = of_row.to(ids.device)
    prompt_tokens = mask.sum(dim=1)[of_row].tolist()
    with torch.inference_mode():
        cache = _prompt_cache(lm.model, ids[:, :-1], mask[:, :-1], positions[:, :-1], [None] * len(distinct),
                              length_groups(lm.model, mask[:, :-1]), distinct)
        if score:
            logits = _score_side_by_side(lm.model, cache, ids[:, -1], mask, positions[:, -1], of_row, steerings)
            replies, scores, new_tokens = [""] * len(texts), _log_odds(lm.tokenizer, logits), [0] * len(texts)
        else:
            cache.batch_select_indices(of_row)
            ids, mask = ids[of_row], mask[of_row]
            with steer(lm.model, steerings, mask) if steerings else nullcontext():
                generated = _generate(lm, {"input_ids": ids, "attention_mask": mask, argument: cache},
                                      max_new_tokens)
            replies, scores = _decode(lm, generated), [None] * len(texts)
            new_tokens = _generated_lengths(generated, _eos_ids(lm))
    return replies, scores, new_tokens, prompt_tokens


def takes_additive_masks(model) -> bool:
    """Whether the model's attention takes a prepared 4-D additive mask as given (eager and SDPA attention) with
    nothing else to apply (a sliding window would be bypassed by such a mask)."""
    return getattr(model.config, "_attn_implementation", None) in ("eager", "sdpa") and not sliding_window(model)


def _score_side_by_side(model, cache, last_ids: torch.Tensor, mask: torch.Tensor, last_positions: torch.Tensor,
                        of_row: torch.Tensor, steerings) -> torch.Tensor:
    """The last-token logits of every row, for rows that share their prompt's cache (`cache`, the prompts minus
    their last tokens): each prompt's rows run as copies of its last token side by side in one sequence, at the
    same position, each seeing the prompt and itself only (a 4-D mask). The prompt's cache is read once for all its
    rows instead of being copied to each, which a K-config sweep would otherwise do K times."""
    tokens: list[list[Steering | None]] = [[] for _ in last_ids]  # per prompt, what each of its rows steers
    slot = []  # each row's place among its prompt's tokens
    for row, prompt in enumerate(of_row.tolist()):
        steering = steerings[row] if steerings else None
        slot.append(len(tokens[prompt]))
        tokens[prompt].append(steering if steering and steering.positions != "generated" else None)
    width = max(map(len, tokens))
    own = torch.eye(width, dtype=torch.bool, device=mask.device).expand(len(tokens), -1, -1)
    visible = torch.cat([mask[:, None, :-1].bool().expand(-1, width, -1), own], dim=-1)
    dtype = next(model.parameters()).dtype
    additive = torch.zeros(visible.shape, dtype=dtype, device=mask.device).masked_fill(~visible, torch.finfo(dtype).min)
    with steer_tokens(model, tokens):
        logits = model(input_ids=last_ids[:, None].expand(-1, width), attention_mask=additive[:, None],
                       position_ids=last_positions[:, None].expand(-1, width), use_cache=True,
                       **{cache_argument(model): cache}).logits
    return logits[of_row, torch.tensor(slot, device=of_row.device)]


def _distinct(texts: list[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct texts in order of appearance, and for each row the index of its text among them."""
    distinct = list(dict.fromkeys(texts))
    index = {text: i for i, text in enumerate(distinct)}
    return distinct, torch.tensor([index[t] for t in texts])


def _decode(lm: LoadedModel, generated: torch.Tensor) -> list[str]:
    return lm.tokenizer.batch_decode(generated, skip_special_tokens=True)


def _render_all(lm: LoadedModel, jobs: Sequence[Job], rows: list[int], histories, followups, scoring) -> dict:
    """Each row's text; a sweep asks each prompt under many configs, so each distinct conversation renders once."""
    rendered: dict[tuple, str] = {}
    texts = {}
    for i in rows:
        key = (id(jobs[i].prompt), tuple(histories[i]), i in scoring)
        if key not in rendered:
            rendered[key] = _conversation_text(lm, jobs[i], histories[i], followups[i], i in scoring)
        texts[i] = rendered[key]
    return texts


def _conversation_text(lm: LoadedModel, job: Job, history: list[str], followups: list[str], score: bool) -> str:
    """The conversation so far: the prompt, then each earlier reply with the follow-up question after it."""
    messages = list(job.prompt.messages)
    for reply, followup in zip(history, followups):
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": followup}]
    return render(lm.tokenizer, messages, ANSWER_PREFIX if score else "")


def yes_no_log_odds(lm: LoadedModel, encoded) -> list[float]:
    """log P(yes) - log P(no) of the next token after each (left-padded) row of `encoded`."""
    return _log_odds(lm.tokenizer, lm.model(**encoded, logits_to_keep=1, use_cache=False).logits[:, -1, :])


def _log_odds(tokenizer, last_logits: torch.Tensor) -> list[float]:
    yes, no = answer_token_ids(tokenizer)
    logp = last_logits.float().log_softmax(-1)
    return (logp[:, yes].logsumexp(-1) - logp[:, no].logsumexp(-1)).tolist()


def _score_verdict(score: float) -> str:
    return "vulnerable" if score > 0 else "not_vulnerable"


def _result(job: Job, mode: str, reply: str, score, prompt_tokens, new_tokens, seconds, history,
            final_score: float | None = None) -> Result:
    sample = job.sample
    if mode == "score":
        verdict = _score_verdict(score)
    else:
        verdict = parse_verdict(reply, sample.cwe)
    return Result(
        sample_id=sample.id, pair_id=sample.pair_id, cwe=sample.cwe, label=sample.label, split=sample.split,
        source=sample.source, prompt_id=job.prompt_id, mode=mode, response=reply, verdict=verdict,
        score=None if score is None else round(float(score), 6), prompt_tokens=int(prompt_tokens),
        new_tokens=int(new_tokens), seconds=round(seconds, 4),
        steering=job.steering.label if job.steering else None, turns=list(history),
        final_score=None if final_score is None else round(float(final_score), 6),
        final_verdict=None if final_score is None else _score_verdict(final_score),
    )
