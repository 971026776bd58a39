"""How rows become batches: a token budget from the free memory, the grouping by length that wastes least on
padding for what each batch costs, and the plan of one phase of an evaluation as plain `Batch` records (which rows,
on which execution path)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from vulnsteer.architecture import key_value_heads

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
        groups.append(order[start[j] : j])
        j = int(start[j])
    return groups[::-1]


@dataclass(frozen=True)
class Batch:
    """Rows of a run (indices into its jobs) that run together, and on which path: scoring or generating, and
    whether they repeat prompts steered from the last token on, so that each prompt's pass runs once for all."""

    rows: list[int]
    score: bool
    shared_prefix: bool = False

    @property
    def path(self) -> str:
        """The runner that takes it (`vulnsteer.engine.runners`)."""
        return ("score" if self.score else "generate") + ("-shared-prefix" if self.shared_prefix else "")


def plan_phase(
    texts: dict[int, str],
    lengths: dict[int, int],
    leaves_prompt_alone: dict[int, bool],
    score: bool,
    sharing: bool,
    budget: int,
    cost: float,
) -> list[Batch]:
    """The batches of one phase of a run (its rows are the keys of `texts`, each with its rendered text, token
    count and whether its steering leaves the prompt before its last token alone). With `sharing`, rows that
    repeat such a prompt go into shared-prefix batches: scoring, a prompt's rows cost one pass over it plus a token
    each, so the prompts are planned; generating, each row keeps its own copy of the prompt's cache but pays its
    padding once per prompt. The others are planned by length. `cost` is one more batch's fixed work
    (`batch_cost`)."""
    rows = list(texts)
    shared = prefix_shared_rows(rows, texts, leaves_prompt_alone) if sharing else []
    rest = sorted(set(rows) - set(shared), key=lambda i: texts[i])  # a prompt's rows side by side
    if score:
        by_prompt: dict[str, list[int]] = {}
        for i in shared:
            by_prompt.setdefault(texts[i], []).append(i)
        prompts = list(by_prompt.values())
        sharing_groups = [
            [i for g in group for i in prompts[g]]
            for group in batches([lengths[rows_[0]] for rows_ in prompts], budget, cost)
        ]
    else:
        rows_per_prompt = len(shared) / max(1, len({texts[i] for i in shared}))
        sharing_groups = [
            [shared[g] for g in group]
            for group in batches([lengths[i] for i in shared], budget, cost * rows_per_prompt)
        ]
    full_groups = [[rest[g] for g in group] for group in batches([lengths[i] for i in rest], budget, cost)]
    return interleave([Batch(g, score, True) for g in sharing_groups], [Batch(g, score, False) for g in full_groups])


def prefix_shared_rows(rows: list[int], texts: dict[int, str], leaves_prompt_alone: dict[int, bool]) -> list[int]:
    """Rows whose prompt repeats (a sweep asks each prompt under many configs) and whose steering starts at the
    last prompt token or later: everything before that token is the same unsteered computation for all of them.
    Returned with each prompt's rows side by side, so that batches keep them together."""
    eligible = [i for i in rows if leaves_prompt_alone[i]]
    counts: dict[str, int] = {}
    for i in eligible:
        counts[texts[i]] = counts.get(texts[i], 0) + 1
    return sorted((i for i in eligible if counts[texts[i]] > 1), key=lambda i: texts[i])


def interleave(first: list[Batch], second: list[Batch]) -> list[Batch]:
    """Both lists of batches in their order, merged so that each list's rows run at the same pace: rows that share a
    prompt's pass cost a fraction of full ones, and a progress bar's rate (and ETA) should hold from the start."""

    def paced(batches_: list[Batch]) -> list[tuple[float, Batch]]:
        total, done, keyed = sum(len(b.rows) for b in batches_), 0, []
        for batch in batches_:
            keyed.append((done / total, batch))
            done += len(batch.rows)
        return keyed

    return [batch for _, batch in sorted(paced(first) + paced(second), key=lambda pair: pair[0])]


def prompt_tokens_estimate(job) -> float:
    """A job's prompt tokens without tokenising it: 4 characters a token (planning needs only proportions)."""
    return sum(len(message["content"]) for message in job.prompt.messages) / 4


def row_costs(jobs: Sequence, decoding, num_layers: int) -> list[float]:
    """Tokens of work each row adds, for an estimate of time left that holds from the first rows on (rows differ
    tenfold in cost, so counting rows misleads). A prompt's tokens are paid once by the rows that leave it alone
    (unsteered, or steered from its last token on: they share one pass over it); a row steered over its prompt pays
    the layers from its first steered one up (the layers below are shared); every row pays its own answer. Prompts
    count 4 characters a token (`prompt_tokens_estimate`)."""
    answer = decoding.max_new_tokens if decoding.mode == "generate" else 1
    paid: set[tuple[str, str]] = set()
    costs = []
    for job in jobs:
        prompt = prompt_tokens_estimate(job)
        row = job.steering
        if row is None or row.leaves_prompt_alone:
            key = (job.sample.id, job.prompt_id)
            costs.append(answer + (0.0 if key in paid else prompt))
            paid.add(key)
        else:
            first = min(row.steered_layers, default=num_layers)
            costs.append(answer + prompt * (num_layers - first) / num_layers)
    return costs
