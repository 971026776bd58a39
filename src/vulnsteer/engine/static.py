"""Greedy decoding over a static KV cache; on a GPU, each decode step is one CUDA-graph replay.

transformers' `generate` spends a large part of each decode step in Python between kernel launches. Here a decode
step reads and advances only fixed buffers (the last token, its position, the cache length, the step counter, the
finished rows) and steering comes from the `SteeringEngine`'s fixed buffers, so every step of a batch has the same
shapes and addresses. On a GPU the step is therefore captured once per batch shape and replayed; another config
only rewrites the engine's buffers and never re-captures. On CPU the same step runs eagerly.

The tokens are `generate`'s greedy tokens, the model's repetition penalty included (Qwen2.5-Instruct sets one):
`tests/test_engine.py` checks them against the plain path.

In a sweep, rows that repeat a prompt and are steered from its last token on run the rest of the prompt once.
Decode steps attend through `packed_decode_attention`: transformers releases before 5.23 copy every layer's whole
KV cache once per query head in each masked single-token step (`repeat_kv`), which at the 14B model's scale moves
more memory per step than its weights.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import Sequence

import torch
from transformers import AttentionInterface, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vulnsteer.architecture import cache_argument, key_value_heads
from vulnsteer.engine.prompt_pass import grouped_prompt_pass, length_groups, prompt_keys
from vulnsteer.engine.trunk import shared_trunk
from vulnsteer.errors import VulnsteerError
from vulnsteer.records import Steering
from vulnsteer.steering.buffers import SteeringEngine
from vulnsteer.steering.hooks import leaves_prompt_alone, prompt_steering

# Generation-config settings that change greedy tokens and that this loop does not implement, with neutral values.
UNSUPPORTED = {
    "no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "bad_words_ids": (None, []),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None, {}),
    "encoder_repetition_penalty": (None, 1.0),
    "exponential_decay_length_penalty": (None,),
}


def unsupported_settings(generation_config) -> list[str]:
    """The settings of `generation_config` that the static decoder would ignore (empty: it decodes as `generate`)."""
    return [
        f"{name}={getattr(generation_config, name)!r}"
        for name, neutral in UNSUPPORTED.items()
        if getattr(generation_config, name, None) not in neutral
    ]


def packed_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA for one query token per row that reads each key/value head once: the query heads that share a key/value
    head are packed as that head's queries [rows, kv heads, group, dim], and the [rows, 1, 1, slots] mask broadcasts
    over them. Anything else (a prompt, a sliding window, a soft cap) goes to transformers' SDPA."""
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    plain = (
        length != 1
        or heads == kv_heads
        or attention_mask is None
        or attention_mask.shape[1] != 1
        or kwargs.get("sliding_window")
        or kwargs.get("softcap")
        or dropout
    )
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    packed = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    output = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=attention_mask, scale=scaling
    )
    return output.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


PACKED_DECODE = "vulnsteer_packed_decode"
AttentionInterface.register(PACKED_DECODE, packed_decode_attention)


@contextmanager
def decode_attention(config):
    """Route attention through `packed_decode_attention` while a model that uses SDPA runs decode steps."""
    previous = config._attn_implementation
    if previous == "sdpa":
        config._attn_implementation = PACKED_DECODE
    try:
        yield
    finally:
        config._attn_implementation = previous


class StaticDecoder:
    """Greedy generation for batches steered through `self.steering` (a `SteeringEngine`), with a static cache
    and, on a single GPU, a captured decode step. Buffers, cache and graph are kept while the batch shape repeats."""

    def __init__(
        self,
        model,
        eos_ids: list[int],
        pad_id: int,
        max_batch: int = 64,
        capture: bool = True,
        packed_attention: bool = True,
        grouped_prefill: bool = True,
        shared_prompts: bool = True,
    ):
        self.model = model
        # False, for benchmarks: transformers' own decode attention; one prompt pass over the whole padded batch;
        # one prompt pass per row even where rows repeat a prompt.
        self.packed_attention, self.grouped_prefill = packed_attention, grouped_prefill
        self.shared_prompts = shared_prompts
        self.steering = SteeringEngine(model, max_batch=max_batch)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device)
        self.pad_id = pad_id
        self.penalty = float(model.generation_config.repetition_penalty or 1.0)
        self.argument = cache_argument(model)
        devices = {p.device for p in model.parameters()}
        self.capture = capture and self.device.type == "cuda" and len(devices) == 1  # False: eager (benchmarks)
        self.key: tuple | None = None  # (rows, prompt width, new tokens, steering buffer) of the buffers below
        self.graph: torch.cuda.CUDAGraph | None = None
        self.allocations = 0  # buffer sets built (one per batch shape), for tests and benchmarks
        self.captures = 0  # decode steps captured as CUDA graphs
        self.prompt_groups: list[int] = []  # groups of each grouped prompt pass
        self.shared_prefill_rows = 0  # rows whose prompt pass they shared with other rows of their prompt

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        steerings: Sequence[Steering | None],
    ) -> torch.Tensor:
        """New tokens [rows, steps] of one left-padded batch, row i steered by `steerings[i]`; rows that ended
        are padded, and decoding stops when every row has ended, as `generate` does."""
        unsupported = unsupported_settings(self.model.generation_config)
        if unsupported:
            raise VulnsteerError(
                f"--cache static decodes greedily with at most a repetition penalty, but the model's "
                f"generation config also sets {', '.join(unsupported)}; use --cache dynamic"
            )
        rows, width = input_ids.shape
        key = (rows, width, max_new_tokens, self.steering.delta.data_ptr())
        if key != self.key:
            self._allocate(rows, width, max_new_tokens)
            self.key = key
        self._prefill(input_ids.to(self.device), attention_mask.to(self.device), steerings)
        steps = 1
        while steps < max_new_tokens and not bool(self.finished.all()):
            self._run_step(steps)
            steps += 1
        return self.tokens[:, :steps].clone()

    def _allocate(self, rows: int, width: int, new: int) -> None:
        """Fixed buffers for batches of this shape; any graph captured for another shape is dropped."""
        self.graph = None
        self.allocations += 1
        self.width = width
        # Slots for the prompt and every new token, rounded up to a multiple of 8: SDPA's memory-efficient kernel
        # copies an attention mask whose rows are not 8-aligned (per layer and step). Extra slots stay masked.
        length = -(-(width + new) // 8) * 8
        like = dict(dtype=torch.long, device=self.device)
        self.cache = StaticCache(config=self.model.config, max_cache_len=length)
        # Sliding-window layers keep Python-side counters, which a replay would not advance, and other slot layouts.
        self.plain = all(type(layer) is StaticLayer for layer in self.cache.layers)
        self.replayable = self.capture and self.plain
        self.ids = torch.zeros(rows, 1, **like)  # the token each decode step reads
        self.positions = torch.zeros(rows, 1, **like)
        self.length = torch.zeros((), **like)  # the cache slot the next token takes
        self.step = torch.zeros(1, **like)  # the column of the next token in `tokens`
        self.key_slots = torch.arange(length, device=self.device)
        self.valid = torch.ones(rows, length, dtype=torch.bool, device=self.device)  # slots that are not padding
        self.sequence = torch.zeros(rows, length, **like)  # prompt and new tokens, for the repetition penalty
        self.tokens = torch.zeros(rows, new, **like)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=self.device)

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, steerings) -> None:
        """The prompt through transformers' own masking, and the first new token; resets every buffer in place (a
        captured step keeps reading the same addresses). Rows of very different lengths run in groups of similar
        length (`_prompt_pass`), so that the prompt pass computes less padding; rows that repeat a prompt and steer
        nothing before its last token share one pass over the rest of it (`_prefill_shared`), and rows that repeat
        a prompt but steer all of it share the layers below their own first steered one (`shared_trunk`)."""
        self.cache.reset()
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.valid[:, : self.width].copy_(attention_mask.bool())
        self.sequence.copy_(input_ids[:, :1].expand_as(self.sequence))  # unfilled slots repeat a prompt token
        self.sequence[:, : self.width].copy_(input_ids)
        self.positions.copy_(positions[:, -1:])
        self.length.fill_(self.width)
        self.step.zero_()
        self.finished.zero_()
        prompts = prompt_keys(input_ids, attention_mask)
        repeated = self.plain and self.shared_prompts and len(set(prompts)) < len(prompts)
        shared = self._shared_prompts(prompts, attention_mask, steerings) if repeated else None
        if shared is not None:
            self._prefill_shared(input_ids, attention_mask, positions, steerings, *shared)
            return
        groups = self._groups(attention_mask)
        if len(groups) > 1 or repeated:
            self._hold_prompt_slots()
            logits, _ = self._prompt_pass(
                input_ids, attention_mask, positions, steerings, groups, prompts if repeated else None, into=self.cache
            )
            self.steering.set_rows(steerings, attention_mask)  # the whole batch again, for the decode steps
        else:
            self.steering.set_rows(steerings, attention_mask)
            logits = self._last_logits(input_ids, attention_mask, positions)
        self._choose(logits)

    def _groups(self, attention_mask: torch.Tensor) -> list[list[int]]:
        """Rows in groups of similar length for the prompt pass (one group: the whole batch at once)."""
        if not (self.plain and self.grouped_prefill):
            return [list(range(len(attention_mask)))]
        return length_groups(self.model, attention_mask)

    def _prompt_pass(
        self, input_ids, attention_mask, positions, steerings, groups, prompts: list | None = None, into=None
    ):
        """`grouped_prompt_pass`, each group steered through the engine; rows with equal `prompts[i]` share the
        layers below their own first steered one (None: no row shares)."""

        def steered(group: list[int], mask: torch.Tensor):
            rows = [steerings[i] for i in group]
            self.steering.set_rows(rows, mask)
            if prompts is None:
                return nullcontext()
            return shared_trunk(self.model, [prompts[i] for i in group], [prompt_steering(row) for row in rows])

        self.prompt_groups.append(len(groups))
        return grouped_prompt_pass(self.model, input_ids, attention_mask, positions, groups, steered, into)

    def _hold_prompt_slots(self) -> None:
        """Make the static cache hold the prompt's slots, as a prompt pass through it would (its length counter
        advanced, its buffers allocated), so that a grouped prompt pass can write its groups straight into it."""
        heads, head_dim = key_value_heads(self.model)
        zeros = torch.zeros((), dtype=self.dtype, device=self.device).expand(len(self.ids), heads, self.width, head_dim)
        for layer in self.cache.layers:
            layer.update(zeros, zeros)  # type: ignore[union-attr]

    def _shared_prompts(self, prompts: list, attention_mask, steerings) -> tuple[list[int], torch.Tensor] | None:
        """For a batch whose rows repeat prompts (`prompts[i]`, a sweep's configs) and steer nothing before the last
        prompt token: the first row of each distinct prompt, and each row's prompt among them. None where some row
        steers before it (or a prompt is a single token)."""
        if not all(map(leaves_prompt_alone, steerings)):
            return None
        if attention_mask.shape[1] < 2 or not bool(attention_mask[:, -2].all()):
            return None
        distinct = {prompt: None for prompt in prompts}
        number = {prompt: k for k, prompt in enumerate(distinct)}
        first = [prompts.index(prompt) for prompt in distinct]
        return first, torch.tensor([number[p] for p in prompts], device=self.device)

    def _prefill_shared(self, input_ids, attention_mask, positions, steerings, first: list[int], of_row) -> None:
        """Each distinct prompt minus its last token runs once, unsteered (in groups of similar length); its keys and
        values fill the cache of every row that asks it; then the last prompt token runs for all rows as a one-token
        step, steered as the prompt's last token, and gives the first new token."""
        self.shared_prefill_rows += len(of_row)
        index = torch.tensor(first, device=self.device)
        prefix = (input_ids[index, :-1], attention_mask[index, :-1], positions[index, :-1])
        _, cache = self._prompt_pass(*prefix, [None] * len(first), self._groups(prefix[1]))
        self._fill(cache, of_row)
        self.steering.set_rows(steerings, attention_mask)
        self.ids.copy_(input_ids[:, -1:])
        self.positions.sub_(1)  # the decode step advances it to the last prompt token's position
        self.length.fill_(self.width - 1)
        with self.steering.at_last_prompt_token():
            self._decode_step()

    def _fill(self, cache, of_row: torch.Tensor) -> None:
        """Put the distinct prompts' keys and values into the static cache, row i from `cache` row `of_row[i]`,
        releasing each layer of `cache` once copied."""
        for layer in self.cache.layers:
            part = cache.layers.pop(0)
            keys, values = part.keys[of_row], part.values[of_row]
            del part
            layer.update(keys, values)  # type: ignore[union-attr]

    def _last_logits(self, input_ids, attention_mask, positions) -> torch.Tensor:
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.argument: self.cache},
        ).logits[:, -1]

    def _choose(self, logits: torch.Tensor) -> None:
        """Pick and record the next token of every row, in place: repetition penalty, argmax, padding after
        the end, as `generate` does greedy decoding."""
        logits = logits.float()
        if self.penalty != 1.0:
            seen = logits.gather(1, self.sequence)
            logits = logits.scatter(1, self.sequence, torch.where(seen < 0, seen * self.penalty, seen / self.penalty))
        token = torch.where(self.finished, self.pad_id, logits.argmax(-1))
        self.finished.logical_or_(torch.isin(token, self.eos))
        self.tokens.index_copy_(1, self.step, token[:, None])
        self.sequence.index_copy_(1, self.step + self.width, token[:, None])
        self.ids.copy_(token[:, None])
        self.step.add_(1)

    def _decode_step(self) -> None:
        """One new token for every row: only in-place updates of fixed buffers, so that it can be captured."""
        self.positions.add_(1)
        visible = self.valid & (self.key_slots <= self.length)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)  # additive, as eager and SDPA attention take it
        with decode_attention(self.model.config) if self.packed_attention else nullcontext():
            logits = self._last_logits(self.ids, mask[:, None, None, :], self.positions)
        self.length.add_(1)
        self._choose(logits)

    def _run_step(self, step: int) -> None:
        """Eager on CPU; on a GPU the first decode step of a shape runs eagerly on a side stream (warm-up), the
        second is captured, and every later one (of this batch and of later batches of this shape) is a replay. A
        step that cannot be captured runs eagerly from then on."""
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.replayable:
            self._decode_step()
            return
        if step == 1:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._decode_step()
            torch.cuda.current_stream().wait_stream(stream)
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._decode_step()
        except Exception as error:  # a forward that cannot be captured (a host sync, say): decode eagerly
            warnings.warn(f"decode step not captured as a CUDA graph, decoding eagerly: {error}", stacklevel=2)
            self.capture = self.replayable = False
            self._decode_step()
            return
        self.graph = graph
        self.captures += 1
        graph.replay()

    def close(self) -> None:
        self.steering.close()

    def __enter__(self) -> "StaticDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
