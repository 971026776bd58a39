"""One runner per execution path, behind one interface: `run(lm, texts, steerings) -> Answers` for a batch of
rendered prompts, row i steered by `steerings[i]` (None: not at all).

- `Scorer`: one forward pass per batch, the yes/no log-odds of the next token; rows of one prompt share the layers
  below their own first steered one (`shared_trunk`).
- `SharedPrefixScorer`: rows that repeat prompts and are steered from the last prompt token on; each distinct
  prompt minus its last token runs once, unsteered, then the prompt's rows run as copies of that token side by side.
- `Generator`: greedy `generate` under `steer()` hooks, its prompt pass in groups of similar length.
- `SharedPrefixGenerator`: as `SharedPrefixScorer`, then each row decodes from a copy of its prompt's cache.
- `StaticGenerator`: the static decoder (`StaticDecoder`), which shares repeated prompts by itself.

`run_halving` gives any runner the one out-of-memory policy: a batch that does not fit is halved and retried.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import ContextManager, Protocol, Sequence

import torch

from vulnsteer.architecture import cache_argument
from vulnsteer.engine.prompt_pass import grouped_prompt_pass, length_groups, prompt_keys
from vulnsteer.engine.static import StaticDecoder
from vulnsteer.engine.trunk import shared_trunk
from vulnsteer.models import LoadedModel
from vulnsteer.records import Steering
from vulnsteer.steering.buffers import SteeringEngine
from vulnsteer.steering.hooks import leaves_prompt_alone, prompt_steering, steer, steer_tokens

Steerings = Sequence[Steering | None] | None  # None: no row of the batch is steered


@dataclass
class Answers:
    """What a batch gives back, one entry per row (replies are empty when scoring, scores None when generating)."""

    replies: list[str]
    scores: list[float | None]
    new_tokens: list[int]
    prompt_tokens: list[int]

    def __add__(self, other: Answers) -> Answers:
        return Answers(
            self.replies + other.replies,
            self.scores + other.scores,
            self.new_tokens + other.new_tokens,
            self.prompt_tokens + other.prompt_tokens,
        )


class Runner(Protocol):
    def run(self, lm: LoadedModel, texts: list[str], steerings: Steerings) -> Answers: ...


def run_halving(runner: Runner, lm: LoadedModel, texts: list[str], steerings: Steerings) -> Answers:
    """`runner.run`, and on out-of-memory the batch split in halves and retried, so that a batch too large for the
    device costs time, never results."""
    try:
        return runner.run(lm, texts, steerings)
    except torch.cuda.OutOfMemoryError:
        if len(texts) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(texts) // 2
        return run_halving(runner, lm, texts[:half], steerings and steerings[:half]) + run_halving(
            runner, lm, texts[half:], steerings and steerings[half:]
        )


def encode(lm: LoadedModel, texts: list[str]):
    """The left-padded batch of `texts` on the model's device."""
    return lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)


def eos_ids(lm: LoadedModel) -> list[int]:
    """The tokenizer's end token and the model's (chat models often end turns with another token)."""
    ids = lm.model.generation_config.eos_token_id
    return sorted({lm.tokenizer.eos_token_id, *(ids if isinstance(ids, list) else [ids])} - {None})


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


def log_odds(tokenizer, last_logits: torch.Tensor) -> list[float]:
    """log P(yes) - log P(no) of each row's next token."""
    yes, no = answer_token_ids(tokenizer)
    logp = last_logits.float().log_softmax(-1)
    return (logp[:, yes].logsumexp(-1) - logp[:, no].logsumexp(-1)).tolist()


def yes_no_log_odds(lm: LoadedModel, encoded) -> list[float]:
    """log P(yes) - log P(no) of the next token after each (left-padded) row of `encoded`."""
    return log_odds(lm.tokenizer, lm.model(**encoded, logits_to_keep=1, use_cache=False).logits[:, -1, :])


def _scored(scores: list[float], prompt_tokens: list[int]) -> Answers:
    return Answers([""] * len(scores), list(scores), [0] * len(scores), prompt_tokens)


def _generated(lm: LoadedModel, generated: torch.Tensor, prompt_tokens: list[int]) -> Answers:
    """Answers of a generated batch: the decoded text and tokens per row, the end token included (padding after it,
    which may equal it, is not)."""
    ended = torch.isin(generated, torch.tensor(eos_ids(lm), device=generated.device))
    first_end = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, generated.shape[1])
    replies = lm.tokenizer.batch_decode(generated, skip_special_tokens=True)
    return Answers(replies, [None] * len(replies), first_end.tolist(), prompt_tokens)


class Scorer:
    """Scoring in full passes, steered by `steer()` hooks, or through a static decoder's `engine` where a run
    also generates (its hooks stay installed for the whole run)."""

    def __init__(self, engine: SteeringEngine | None = None):
        self.engine = engine

    def run(self, lm: LoadedModel, texts: list[str], steerings: Steerings) -> Answers:
        encoded = encode(lm, texts)
        with torch.inference_mode():
            hooks: ContextManager = nullcontext()
            if self.engine is not None:
                self.engine.set_rows(steerings or [None] * len(texts), encoded["attention_mask"])
            elif steerings:
                hooks = steer(lm.model, steerings, encoded["attention_mask"])
            with hooks, shared_trunk(lm.model, texts, steerings):
                scores = yes_no_log_odds(lm, encoded)
        return _scored(scores, encoded["attention_mask"].sum(dim=1).tolist())


def generate(lm: LoadedModel, encoded, max_new_tokens: int) -> torch.Tensor:
    """transformers' greedy `generate`: the new tokens of each row."""
    # Hooks added after transformers compiles a decode step are invisible to it: never compile here (the static
    # decoder is the fast path). Rows that bring their own cache (a shared prompt prefix) keep it.
    given = any(key in encoded for key in ("cache", "past_key_values"))
    cache = {"cache_implementation": None if given else "dynamic", "disable_compile": True}
    out = lm.model.generate(  # type: ignore[operator]
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=eos_ids(lm),
        pad_token_id=lm.tokenizer.pad_token_id,
        **cache,
    )
    return out[:, encoded["input_ids"].shape[1] :]


def prompt_cache(model, ids, mask, positions, steerings, groups: list[list[int]], prompts: list | None = None):
    """The KV cache of a left-padded batch of prompts, computed in groups of similar length (`grouped_prompt_pass`),
    row i steered by `steerings[i]` (None: not at all); rows of one prompt (equal `prompts[i]`) share the layers
    below their own first steered one (`prompts` None: no row shares)."""

    def steered(group: list[int], group_mask: torch.Tensor):
        rows = [steerings[i] for i in group]
        hooks = ExitStack()
        if any(rows):
            hooks.enter_context(steer(model, rows, group_mask))
        if prompts is not None:
            hooks.enter_context(shared_trunk(model, [prompts[i] for i in group], rows))
        return hooks

    return grouped_prompt_pass(model, ids, mask, positions, groups, steered)[1]


class Generator:
    """Greedy generation over a dynamic cache, steered by `steer()` hooks. Prompts of very different lengths, or
    repeated ones (a sweep's configs), first run up to their last token on their own (`prompt_cache`): in groups of
    similar length, so that the prompt pass computes less padding, and sharing each prompt's layers below each
    row's first steered one."""

    def __init__(self, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens

    def run(self, lm: LoadedModel, texts: list[str], steerings: Steerings) -> Answers:
        encoded = encode(lm, texts)
        with torch.inference_mode():
            generated = self.generate(lm, encoded, steerings)
        return _generated(lm, generated, encoded["attention_mask"].sum(dim=1).tolist())

    def generate(self, lm: LoadedModel, encoded, steerings: Steerings) -> torch.Tensor:
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        hooks = steer(lm.model, steerings, mask) if steerings else nullcontext()
        groups = length_groups(lm.model, mask[:, :-1]) if ids.shape[1] > 1 else []
        prompts = prompt_keys(ids, mask)
        repeated = len(set(prompts)) < len(prompts)  # a sweep's configs: their prompt pass shares layers
        if not groups or (len(groups) == 1 and not repeated):
            with hooks:
                return generate(lm, encoded, self.max_new_tokens)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Only rows steered before their last prompt token are steered in that pass (prompt-last is the next call).
        before_last = [None if leaves_prompt_alone(row) else row for row in steerings or [None] * len(ids)]
        cache = prompt_cache(lm.model, ids[:, :-1], mask[:, :-1], positions[:, :-1], before_last, groups, prompts)
        with hooks:
            return generate(
                lm, {"input_ids": ids, "attention_mask": mask, cache_argument(lm.model): cache}, self.max_new_tokens
            )


class StaticGenerator:
    """Generation through a `StaticDecoder` (a fixed-size cache; on a GPU each decode step a CUDA-graph replay)."""

    def __init__(self, decoder: StaticDecoder, max_new_tokens: int):
        self.decoder, self.max_new_tokens = decoder, max_new_tokens

    def run(self, lm: LoadedModel, texts: list[str], steerings: Steerings) -> Answers:
        encoded = encode(lm, texts)
        with torch.inference_mode():
            generated = self.decoder.generate(
                encoded["input_ids"], encoded["attention_mask"], self.max_new_tokens, steerings or [None] * len(texts)
            )
        return _generated(lm, generated, encoded["attention_mask"].sum(dim=1).tolist())


def _distinct(texts: list[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct texts in order of appearance, and for each row the index of its text among them."""
    distinct = list(dict.fromkeys(texts))
    index = {text: i for i, text in enumerate(distinct)}
    return distinct, torch.tensor([index[t] for t in texts])


class _SharedPrefix:
    """Rows that repeat prompts and are steered from the last prompt token on: each distinct prompt minus its last
    token runs once, unsteered, and `finish` runs the rest from that cache."""

    def run(self, lm: LoadedModel, texts: list[str], steerings: Steerings) -> Answers:
        distinct, of_row = _distinct(texts)
        encoded = encode(lm, distinct)
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as `generate` counts them, padding on the left
        of_row = of_row.to(ids.device)
        prompt_tokens = mask.sum(dim=1)[of_row].tolist()
        with torch.inference_mode():
            cache = prompt_cache(
                lm.model,
                ids[:, :-1],
                mask[:, :-1],
                positions[:, :-1],
                [None] * len(distinct),
                length_groups(lm.model, mask[:, :-1]),
                distinct,
            )
            return self.finish(lm, cache, ids, mask, positions, of_row, steerings, prompt_tokens)

    def finish(self, lm, cache, ids, mask, positions, of_row, steerings, prompt_tokens) -> Answers:
        raise NotImplementedError


class SharedPrefixScorer(_SharedPrefix):
    """Each prompt's rows run as copies of its last token side by side in one sequence, at the same position, each
    seeing the prompt and itself only (a 4-D mask). The prompt's cache is read once for all its rows instead of
    being copied to each, which a K-config sweep would otherwise do K times."""

    def finish(self, lm, cache, ids, mask, positions, of_row, steerings, prompt_tokens) -> Answers:
        model = lm.model
        tokens: list[list[Steering | None]] = [[] for _ in ids]  # per prompt, what each of its rows steers
        slot = []  # each row's place among its prompt's tokens
        for row, prompt in enumerate(of_row.tolist()):
            steering = steerings[row] if steerings else None
            slot.append(len(tokens[prompt]))
            tokens[prompt].append(prompt_steering(steering))
        width = max(map(len, tokens))
        additive = side_by_side_mask(mask[:, :-1], width, next(model.parameters()).dtype)
        with steer_tokens(model, tokens):
            logits = model(
                input_ids=ids[:, -1, None].expand(-1, width),
                attention_mask=additive[:, None],
                position_ids=positions[:, -1, None].expand(-1, width),
                use_cache=True,
                **{cache_argument(model): cache},
            ).logits
        last = logits[of_row, torch.tensor(slot, device=of_row.device)]
        return _scored(log_odds(lm.tokenizer, last), prompt_tokens)


def side_by_side_mask(prefix_mask: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask [rows, width, prefix + width] of `width` copies of each row's last token run side
    by side after its cached prefix (`prefix_mask`, left padded): each copy sees the prefix's real tokens and
    itself, not the other copies."""
    own = torch.eye(width, dtype=torch.bool, device=prefix_mask.device).expand(len(prefix_mask), -1, -1)
    visible = torch.cat([prefix_mask[:, None, :].bool().expand(-1, width, -1), own], dim=-1)
    return torch.zeros(visible.shape, dtype=dtype, device=prefix_mask.device).masked_fill(
        ~visible, torch.finfo(dtype).min
    )


class SharedPrefixGenerator(_SharedPrefix):
    """Each prompt's cache is copied to its rows, which run the last token and every new token with their own
    steering, all in one batch."""

    def __init__(self, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens

    def finish(self, lm, cache, ids, mask, positions, of_row, steerings, prompt_tokens) -> Answers:
        cache.batch_select_indices(of_row)
        ids, mask = ids[of_row], mask[of_row]
        with steer(lm.model, steerings, mask) if steerings else nullcontext():
            generated = generate(
                lm, {"input_ids": ids, "attention_mask": mask, cache_argument(lm.model): cache}, self.max_new_tokens
            )
        return _generated(lm, generated, prompt_tokens)


def default_runners(max_new_tokens: int, decoder: StaticDecoder | None = None) -> dict[str, Runner]:
    """The runner of each batch path (`Batch.path`). With a static decoder, generating batches go through it (it
    shares repeated prompts itself) and scoring steers through its engine."""
    if decoder is not None:
        static = StaticGenerator(decoder, max_new_tokens)
        return {"score": Scorer(decoder.steering), "generate": static, "generate-shared-prefix": static}
    return {
        "score": Scorer(),
        "score-shared-prefix": SharedPrefixScorer(),
        "generate": Generator(max_new_tokens),
        "generate-shared-prefix": SharedPrefixGenerator(max_new_tokens),
    }
