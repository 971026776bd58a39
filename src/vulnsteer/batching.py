"""How rows are grouped into batches: a token budget from the free memory, and the grouping by length that wastes
least on padding for what each batch costs."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

CPU_BATCH_TOKENS = 8192


def auto_batch_tokens(model, max_new_tokens: int, width: int, free_bytes: int | None = None) -> int:
    """Prompt tokens per batch (rows x padded width) that fit in `free_bytes` (on a GPU: what is free now) with a
    fifth to spare: each row's KV cache for its prompt and new tokens, plus the prefill's transient activations,
    and when generating, one more copy of the prompt's keys and values (a prompt pass in groups, or one that shares
    layers among a prompt's rows, fills a cache of its own before the decoder's holds it).
    `width` is the shortest prompt, whose rows carry the most new tokens per prompt token. On CPU, without
    `free_bytes`: 8192, as larger batches buy little there. An estimate: a batch that still runs out of memory is
    halved and retried. On a GPU it usually means one batch for a whole dataset, so that every decode step reads
    the weights once for all rows."""
    parameter = next(model.parameters())
    if free_bytes is None:
        if parameter.device.type != "cuda":
            return CPU_BATCH_TOKENS
        free_bytes = torch.cuda.mem_get_info(parameter.device)[0]
    config = model.config.get_text_config()
    kv_heads, head_dim = key_value_heads(model)
    kv_bytes = 2 * config.num_hidden_layers * kv_heads * head_dim * parameter.element_size()
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    activation_bytes = (4 * config.hidden_size + 2 * intermediate) * parameter.element_size()
    held = 1 if max_new_tokens == 0 else 2  # the decoding cache's prompt slots, and the prompt pass's own copy
    per_prompt_token = kv_bytes * (held + max_new_tokens / max(width, 1)) + activation_bytes
    return max(int(0.8 * free_bytes / per_prompt_token), width)  # at least one row


def key_value_heads(model) -> tuple[int, int]:
    """Key/value heads per layer and their size, from the model's config."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return getattr(config, "num_key_value_heads", None) or heads, head_dim


# The fixed work of one forward pass, in prompt tokens of work. On a GPU: the tokens its FLOP rate processes while
# the weights stream from memory once (an H200: ~800 TFLOP/s over ~4.2 TB/s, ~190 tokens), plus kernel launches;
# on CPU, the per-call overhead of the layers. Rough figures: they only weigh padding against the number of batches.
FORWARD_PASS_TOKENS = {"cuda": 256, "cpu": 64}


def batch_cost(model, forward_passes: int) -> float:
    """What one more batch costs, in prompt tokens: its forward passes (one to score, one per new token to
    generate) times the fixed work of each."""
    device = next(model.parameters()).device.type
    return forward_passes * FORWARD_PASS_TOKENS.get(device, FORWARD_PASS_TOKENS["cpu"])


def padded_tokens(groups: Sequence[Sequence[int]], lengths: Sequence[int]) -> int:
    """Prompt tokens a grouping computes, padding included."""
    return sum(len(group) * max(lengths[i] for i in group) for group in groups)


def batches(lengths: Sequence[int], batch_tokens: int, cost: float) -> list[list[int]]:
    """Indices grouped by length (longest first) into batches of at most `batch_tokens` rows x padded width (a
    longer row goes alone) that minimise padded tokens + `cost` per batch: padding is work done on every row,
    and each batch adds fixed work (`batch_cost`). Scoring, where a batch is one forward pass, this cuts the padding
    of one big batch by about half on SecLLMHolmes-like lengths; generating, where a batch costs a forward pass per
    new token, it keeps batches few. Exact among groupings of the length-sorted rows (dynamic programming), which
    hold an optimal grouping."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    widths = np.array([lengths[i] for i in order], dtype=np.float64)
    best = np.zeros(len(order) + 1)  # best[j]: least cost of the j longest rows
    start = np.zeros(len(order) + 1, dtype=np.int64)  # where the last batch of that grouping starts
    for j in range(1, len(order) + 1):
        # The last batch holds rows first..j-1 and is as wide as row `first`; rows further back cannot fit.
        first = np.arange(max(0, j - max(1, int(batch_tokens // widths[j - 1]))), j)
        padded = (j - first) * widths[first]
        total = best[first] + padded + cost
        total[(padded > batch_tokens) & (first < j - 1)] = np.inf
        start[j] = first[int(np.argmin(total))]
        best[j] = total[start[j] - first[0]]
    groups, j = [], len(order)
    while j:
        groups.append(order[start[j]:j])
        j = int(start[j])
    return groups[::-1]
