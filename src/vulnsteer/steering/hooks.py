"""Add `strength x vector` to the residual stream with plain PyTorch forward hooks.

Sign convention: vectors point from patched towards vulnerable code (vulnerable minus patched), so a positive
strength pushes the model towards answering "vulnerable" and a negative one away from it.

Every row of a batch carries its own steering (or none): the hooks add a per-row delta, so one batch can mix
unsteered rows with rows of several strengths, layers or vectors. Padding (from the attention mask) is never
steered, and positions count from the KV cache's length, so decode steps that see one token are steered exactly
like recomputation without a cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch

from vulnsteer.architecture import (
    Hooks,
    base_model,
    decoder_layers,
    given_cache,
    hidden_of,
    with_hidden,
)
from vulnsteer.errors import VulnsteerError
from vulnsteer.records import Edit, Positions, Steering


def leaves_prompt_alone(row: Steering | None) -> bool:
    """Whether a row leaves its prompt up to the last token alone: rows of one prompt that do can share that pass."""
    return row is None or row.leaves_prompt_alone


def steered_layers(rows: Iterable[Steering | None]) -> set[int]:
    """The layers that some row steers (rows of strength 0 steer nothing)."""
    return {layer for row in rows if row for layer in row.steered_layers}


def prompt_steering(row: Steering | None) -> Steering | None:
    """What a row steers in a pass over its whole prompt: nothing for rows steered only at generated tokens."""
    return None if row is None or row.positions.prompt_tokens == "none" else row


PROMPT_RULES = ("none", "last", "all")  # the values of `Positions.prompt_tokens`, as rows of the tracker's stack


class _PositionTracker:
    """Knows, per row, which tokens of the current forward call are prompt, generated or padding: positions come
    from the KV cache's length (0 without a cache), padding from the attention mask. The prompt width is the
    sequence length of the first call inside the context (the prefill)."""

    def __init__(
        self,
        positions: Sequence[Positions],
        device: torch.device,
        dtype: torch.dtype,
        prompt_mask: torch.Tensor | None = None,
    ):
        self.prompt_rule = torch.tensor([PROMPT_RULES.index(p.prompt_tokens) for p in positions], device=device)
        self.generated = torch.tensor([p.generated_tokens for p in positions], device=device)[:, None]
        self.prompt_mask = None if prompt_mask is None else prompt_mask.to(device).bool()
        self.dtype = dtype
        self.prompt_width: int | None = None
        self.masks: torch.Tensor | None = None  # [batch, tokens in this call, 1], 1 where steered

    def pre_hook(self, module, args, kwargs):
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds", args[0] if args else None)
        batch, new = tokens.shape[:2]
        cache = given_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        width = past + new
        if self.prompt_width is None:
            self.prompt_width = width
        absolute = torch.arange(past, width, device=tokens.device)  # positions of this call's tokens
        real = torch.ones(batch, new, dtype=torch.bool, device=tokens.device)
        attention = kwargs.get("attention_mask")  # 2-D, None when no row is padded, or prepared 4-D masks
        if self.prompt_mask is not None:
            in_prompt = absolute < self.prompt_mask.shape[1]
            real[:, in_prompt] = self.prompt_mask[:, absolute[in_prompt]]
        elif isinstance(attention, torch.Tensor) and attention.dim() == 2:
            real = attention[:, -new:].bool()
        is_prompt = absolute < self.prompt_width
        in_prompt = torch.stack([torch.zeros_like(is_prompt), absolute == self.prompt_width - 1, is_prompt])
        steered = in_prompt[self.prompt_rule] | (self.generated & ~is_prompt)
        self.masks = (steered & real).unsqueeze(-1).to(self.dtype)


def _check_layers(layers: Iterable[int], n_layers: int) -> None:
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise VulnsteerError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")


def layer_edits(rows: Sequence[Steering | None], n_layers: int) -> dict[int, list[tuple[int, float, Edit]]]:
    """Per layer, the rows with a learned edit there: (row, strength, edit)."""
    edits: dict[int, list[tuple[int, float, Edit]]] = {}
    for i, row in enumerate(rows):
        if row and row.strength != 0:
            for layer, edit in row.edits.items():
                edits.setdefault(layer, []).append((i, row.strength, edit))
    _check_layers(edits, n_layers)
    return edits


def edited(hidden: torch.Tensor, entries: list[tuple[int, float, Edit]]) -> torch.Tensor:
    """What the edits add to `hidden` [rows, ...]: `strength * edit(h)` on their rows, zero elsewhere."""
    by_row = {i: (strength, edit) for i, strength, edit in entries}
    return torch.stack(
        [by_row[i][0] * by_row[i][1](h) if i in by_row else torch.zeros_like(h) for i, h in enumerate(hidden)]
    )


def layer_deltas(rows: Sequence[Steering | None], hidden_size: int, n_layers: int) -> dict[int, torch.Tensor]:
    """Per steered layer, a [batch, hidden] matrix of what each row adds (zero rows for unsteered rows)."""
    layers = sorted({layer for row in rows if row for layer in row.vectors})
    _check_layers(layers, n_layers)
    deltas = {}
    for layer in layers:
        delta = torch.zeros(len(rows), hidden_size)
        for i, row in enumerate(rows):
            if row and layer in row.vectors and row.strength != 0:
                vector = row.vectors[layer].float()
                if vector.shape != (hidden_size,):
                    raise VulnsteerError(
                        f"vector for layer {layer} has shape {tuple(vector.shape)}, "
                        f"the model's hidden size is {hidden_size}"
                    )
                delta[i] = row.strength * vector
        if delta.any():
            deltas[layer] = delta
    return deltas


@contextmanager
def steer(model, rows: Sequence[Steering | None], attention_mask: torch.Tensor | None = None) -> Iterator[None]:
    """Steer one batch (row i gets `rows[i]`) for the duration of one `generate` or forward call.

    Padding is read from the model's 2-D attention mask on each call; pass the batch's `attention_mask` as well
    when the model may receive prepared masks instead (a static cache does that for some architectures).

    Hooks are removed on exit, even after an exception; nothing about the model changes for good. Rows whose
    strength is 0, and layers no row steers, get no hook at all, so they are bit-identical to an unsteered run.
    """
    layers = decoder_layers(model)
    deltas = layer_deltas(rows, model.config.hidden_size, len(layers))
    edits = layer_edits(rows, len(layers))
    if not deltas and not edits:
        yield
        return
    parameter = next(model.parameters())
    tracker = _PositionTracker(
        [row.positions if row else Positions.ALL for row in rows], parameter.device, parameter.dtype, attention_mask
    )
    deltas = {k: v.to(parameter.device, parameter.dtype) for k, v in deltas.items()}

    def add_delta(layer: int):
        def hook(module, args, output):
            hidden = hidden_of(output)
            if hidden.shape[0] != len(rows):
                raise VulnsteerError(f"steering was set up for {len(rows)} rows but the batch has {hidden.shape[0]}")
            change = deltas[layer].unsqueeze(1) if layer in deltas else 0
            if layer in edits:
                change = change + edited(hidden, edits[layer])
            return with_hidden(output, hidden + change * tracker.masks)

        return hook

    with Hooks() as installed:
        installed.add(base_model(model).register_forward_pre_hook(tracker.pre_hook, with_kwargs=True))
        for layer in sorted({*deltas, *edits}):
            installed.add(layers[layer].register_forward_hook(add_delta(layer)))
        yield


@contextmanager
def steer_tokens(model, rows: Sequence[Sequence[Steering | None]]) -> Iterator[None]:
    """Steer one forward call token by token: token t of row b gets `rows[b][t]` at each of its layers, whatever
    its positions say (the caller decides which tokens a config steers). For `evaluate`'s scoring of a sweep,
    where each token of a row is one job's last prompt token. Shorter rows leave their last tokens unsteered."""
    layers = decoder_layers(model)
    width = max((len(row) for row in rows), default=0)
    flat = [row[t] if t < len(row) else None for row in rows for t in range(width)]
    deltas = layer_deltas(flat, model.config.hidden_size, len(layers))
    edits = layer_edits(flat, len(layers))
    parameter = next(model.parameters())
    deltas = {k: v.view(len(rows), width, -1).to(parameter.device, parameter.dtype) for k, v in deltas.items()}

    def add_delta(layer: int):
        def hook(module, args, output):
            hidden = hidden_of(output)
            if hidden.shape[:2] != (len(rows), width):
                raise VulnsteerError(
                    f"steering was set up for {len(rows)} rows of {width} tokens but the batch "
                    f"has {hidden.shape[0]} of {hidden.shape[1]}"
                )
            change = deltas[layer] if layer in deltas else 0
            if layer in edits:  # token t of row b is entry b * width + t of the flat list
                change = change + edited(hidden.flatten(0, 1), edits[layer]).view_as(hidden)
            return with_hidden(output, hidden + change)

        return hook

    with Hooks() as installed:
        for layer in sorted({*deltas, *edits}):
            installed.add(layers[layer].register_forward_hook(add_delta(layer)))
        yield
