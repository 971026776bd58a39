"""Rows that repeat a prompt share the decoder layers below their own first steered one.

A sweep asks each prompt under many configs. A config that steers the whole prompt changes the residual stream only
from its first steered layer on; below it, its row computes exactly what the prompt computes unsteered. `shared_trunk`
runs each layer on the rows that differ there and copies the result back to the others, so a layer sweep's row at
layer 20 pays for layers 20 and up only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from vulnsteer.architecture import (
    Hooks,
    decoder_layers,
    given_cache,
    hidden_of,
    with_hidden,
)
from vulnsteer.records import Steering
from vulnsteer.steering.hooks import steered_layers


@contextmanager
def shared_trunk(model, prompts: Sequence, steerings: Sequence[Steering | None] | None) -> Iterator[None]:
    """For one forward call whose row i asks `prompts[i]` (rows with equal prompts repeat one) steered by
    `steerings[i]` (None: not steered in this call). Rows of one prompt compute the same thing as their prompt
    unsteered up to their own first steered layer. So each layer runs on the rows that have forked by then (steered
    at that layer or below) plus one row per prompt for the rest, and copies its output back to every row, before
    any steering hook sees it, and its keys and values too where it writes a cache: a layer sweep's row at layer 20
    shares layers 0-19 with its prompt. For one forward pass over whole prompts (scoring, or a prompt pass before
    decoding), never for decode steps, whose rows see different tokens."""
    layers = decoder_layers(model)
    number: dict = {}
    of_row = [number.setdefault(prompt, len(number)) for prompt in prompts]
    rows = len(prompts)
    forks = [min(steered_layers([row]), default=len(layers)) for row in steerings or [None] * rows]
    steered = steered_layers(steerings or [])
    plans = [_live_rows(of_row, forks, depth) for depth in range(len(layers))] + [(list(range(rows)), [])]
    with Hooks() as installed:
        for depth, layer in enumerate(layers):
            live, source = plans[depth]
            if len(live) == rows:
                continue
            installed.add(layer.register_forward_pre_hook(_narrowing(rows, torch.tensor(live)), with_kwargs=True))
            # Back to every row where the next layer computes other rows, and where steering hooks need the batch.
            if plans[depth + 1][0] != live or depth in steered:
                installed.add(layer.register_forward_hook(_widening(torch.tensor(source)), prepend=True))
            installed.add(layer.register_forward_hook(_widening_cache(depth, torch.tensor(source)), with_kwargs=True))
        yield


def _live_rows(prompt_of_row: list[int], forks: list[int], depth: int) -> tuple[list[int], list[int]]:
    """The rows a layer at `depth` computes (those forked from their prompt, and one row per prompt for the others),
    and for every row the place of its values among them."""
    live: list[int] = []
    source: list[int] = []
    carrier: dict[int, int] = {}
    for row, (prompt, fork) in enumerate(zip(prompt_of_row, forks)):
        if fork > depth and prompt in carrier:
            source.append(carrier[prompt])
            continue
        if fork > depth:
            carrier[prompt] = len(live)
        source.append(len(live))
        live.append(row)
    return live, source


def _narrowing(rows: int, live: torch.Tensor):
    """A pre-hook that keeps the `live` rows of a layer's batch-first inputs (hidden states, masks, position
    embeddings); hidden states that the layer before left narrowed pass as they are."""

    def narrow(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == rows:
            return value[live.to(value.device)]
        return tuple(narrow(v) for v in value) if isinstance(value, tuple) else value

    def hook(module, args, kwargs):
        return tuple(narrow(a) for a in args), {k: narrow(v) for k, v in kwargs.items()}

    return hook


def _widening_cache(depth: int, source: torch.Tensor):
    """A forward hook that gives every row its keys and values back where the layer wrote them to a KV cache."""

    def hook(module, args, kwargs, output):
        cache = given_cache(kwargs)
        if cache is not None:
            layer = cache.layers[depth]
            rows = source.to(layer.keys.device)
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]

    return hook


def _widening(source: torch.Tensor):
    """A forward hook that gives every row of the batch its values back from the live rows."""

    def hook(module, args, output):
        hidden = hidden_of(output)
        return with_hidden(output, hidden[source.to(hidden.device)])

    return hook
