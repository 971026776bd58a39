"""Steering for fast generation: hooks installed once, settings written in place into fixed buffers."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from vulnsteer.architecture import Hooks, decoder_layers, hidden_of, with_hidden
from vulnsteer.errors import VulnsteerError
from vulnsteer.records import Positions, Steering
from vulnsteer.steering.hooks import layer_deltas, prompt_steering, steered_layers


class SteeringEngine:
    """Steering for fast generation (`vulnsteer.engine.static.StaticDecoder`): hooks installed once on every decoder
    layer, and each batch's settings written in place into buffers that keep their addresses (a vector bank per
    layer, a per-row mask for decode steps and one for the prefill). A CUDA-graph-captured (or compiled) decode step
    is therefore reused across configs, never re-captured, and unsteered rows add exact zeros.

    Unlike `steer()`, it assumes KV-cached generation: a prefill over the whole prompt, then one token per step.
    Install it before a decode step is captured or compiled: hooks added afterwards are not seen by the graph (the
    reason `evaluate` disables transformers' automatic compilation on the plain path).
    """

    def __init__(self, model, max_batch: int = 64):
        self.model = model
        self.layers = decoder_layers(model)
        self._allocate(max_batch)
        self.prefill_layers: set[int] = set()  # layers that a prompt pass of the current batch steers
        self.hooks = Hooks()
        for i, layer in enumerate(self.layers):
            self.hooks.add(layer.register_forward_hook(self._hook(i)))

    def _allocate(self, max_batch: int) -> None:
        """Buffers for up to `max_batch` rows; a larger batch reallocates them (on a GPU, one new capture)."""
        parameter = next(self.model.parameters())
        like = dict(device=parameter.device, dtype=parameter.dtype)
        self.delta = torch.zeros(len(self.layers), max_batch, self.model.config.hidden_size, **like)
        self.decode_mask = torch.zeros(max_batch, 1, 1, **like)
        self.prefill_mask = torch.zeros(max_batch, 1, 1, **like)

    def _hook(self, index: int):
        def hook(module, args, output):
            hidden = hidden_of(output)
            rows, tokens = hidden.shape[:2]
            if tokens == 1:  # a decode step: the same work at every layer, whatever the config, for the capture
                return with_hidden(output, hidden + self.delta[index, :rows].unsqueeze(1) * self.decode_mask[:rows])
            if index not in self.prefill_layers:  # a prompt pass, which may run fewer rows here (`shared_trunk`)
                return output
            if rows != self.prefill_mask.shape[0]:
                raise VulnsteerError(
                    f"steering was set up for {self.prefill_mask.shape[0]} rows but the batch has {rows}"
                )
            return with_hidden(output, hidden + self.delta[index, :rows].unsqueeze(1) * self.prefill_mask)

        return hook

    def set_rows(self, rows: Sequence[Steering | None], attention_mask: torch.Tensor) -> None:
        """Load one batch: row i gets `rows[i]`; `attention_mask` is the batch's left-padded prompt mask."""
        batch, width = attention_mask.shape
        if any(row and row.edits for row in rows):
            raise VulnsteerError(
                "learned edits (loreft) depend on the hidden state and cannot be written into the "
                "static decoder's buffers; use --cache dynamic"
            )
        if batch > self.delta.shape[1]:
            self._allocate(batch)
        deltas = layer_deltas(rows, self.delta.shape[2], len(self.layers))
        self.prefill_layers = steered_layers(map(prompt_steering, rows))
        self.delta.zero_()
        for layer, delta in deltas.items():
            self.delta[layer, :batch].copy_(delta)
        modes = [row.positions if row else Positions.ALL for row in rows]
        self.decode_mask.zero_()
        self.decode_mask[:batch, 0, 0] = torch.tensor([m.generated_tokens for m in modes], dtype=self.decode_mask.dtype)
        real = attention_mask.to(self.delta.device).bool()
        last = torch.zeros_like(real)
        last[:, -1] = True
        by_rule = {"last": last, "all": real, "none": torch.zeros_like(real)}
        prefill = torch.stack([by_rule[m.prompt_tokens][i] for i, m in enumerate(modes)])
        self.prefill_mask = prefill.unsqueeze(-1).to(self.delta.dtype)

    @contextmanager
    def at_last_prompt_token(self) -> Iterator[None]:
        """Steer one-token calls as the prompt's last token rather than as a generated one, for a decoder that runs
        that token apart from the rest of the prompt."""
        rows = self.prefill_mask.shape[0]
        decode = self.decode_mask[:rows].clone()
        self.decode_mask[:rows].copy_(self.prefill_mask[:, -1:])
        try:
            yield
        finally:
            self.decode_mask[:rows].copy_(decode)

    def close(self) -> None:
        self.hooks.remove()

    def __enter__(self) -> "SteeringEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
