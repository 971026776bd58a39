"""One pass over a batch's prompts in groups of similar length, each group only as wide as its longest prompt,
written into one KV cache as a pass over the whole batch would have written it. Both generating paths (the
static decoder and `generate` over a dynamic cache) and the shared-prefix paths run their prompts through it."""

from __future__ import annotations

from typing import Callable, ContextManager

import torch
from transformers import DynamicCache

from vulnsteer.architecture import returned_cache, sliding_window
from vulnsteer.engine.planner import batch_cost, batches


def prompt_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple]:
    """Each row's prompt as a hashable key, padding left out: rows with equal keys ask the same prompt."""
    return [tuple(row) for row in input_ids.masked_fill(attention_mask == 0, -1).tolist()]


def length_groups(model, attention_mask: torch.Tensor, cost: float | None = None) -> list[list[int]]:
    """Rows of a left-padded batch in groups of similar length for one prompt pass, planned like scoring batches
    (padding against the fixed work of one more pass); one group for models with a sliding window, or where a row
    is all padding (a prompt cut before its only token). `cost`: one more pass's fixed work (default `batch_cost`)."""
    lengths = attention_mask.sum(-1).tolist()
    if sliding_window(model) or min(lengths, default=0) == 0:
        return [list(range(len(lengths)))]
    return batches(lengths, len(lengths) * attention_mask.shape[1], batch_cost(model, 1) if cost is None else cost)


def grouped_prompt_pass(
    model,
    input_ids,
    attention_mask,
    positions,
    groups: list[list[int]],
    steered: Callable[[list[int], torch.Tensor], ContextManager],
    into=None,
):
    """One prompt pass over a left-padded batch in groups of rows, each group only as wide as its longest prompt,
    with a cache of its own, and steered by `steered(group, its mask)`. Returns every row's last logits and the
    batch's KV cache: with one group and no `into`, the model's own (which may keep only a sliding window);
    otherwise all rows' keys and values right-aligned in the batch's width, as one pass over the whole batch would
    have put them (the slots before are padding, masked), written group by group into `into` (a cache whose layers
    hold every row and at least the batch's width, as `StaticDecoder` prepares its own) or into a new cache. Each
    group's own cache is released before the next group runs."""
    if len(groups) == 1:
        groups = [list(range(len(input_ids)))]  # in batch order, so that the model's cache is the batch's
    width = input_ids.shape[1]
    lengths = attention_mask.sum(-1).tolist()
    logits = None
    for group in groups:
        index = torch.tensor(group, device=input_ids.device)
        columns = slice(width - max(lengths[i] for i in group), width)
        mask = attention_mask[index, columns]
        with steered(group, mask):
            output = model(
                input_ids=input_ids[index, columns],
                attention_mask=mask,
                position_ids=positions[index, columns],
                use_cache=True,
                logits_to_keep=1,
            )
        last = output.logits[:, -1]
        logits = last.new_empty(len(input_ids), last.shape[-1]) if logits is None else logits
        logits[index] = last
        cache = returned_cache(output)
        if len(groups) == 1 and into is None:
            return logits, cache
        if into is None:
            into = DynamicCache()
            for k, layer in enumerate(cache.layers):
                shape = (len(input_ids), layer.keys.shape[1], width, layer.keys.shape[3])
                into.update(layer.keys.new_zeros(shape), layer.values.new_zeros(shape), k)
        for target, layer in zip(into.layers, cache.layers):
            target.keys[index, :, columns] = layer.keys
            target.values[index, :, columns] = layer.values
        del output, cache, last
    return logits, into
