"""Steering vectors learned from the answer (`--method trained`).

Fixed directions (mean-diff, PCA, probe) are fitted without looking at what the model answers. A trained vector is:
per group (each CWE and pooled) and layer, a vector optimised by gradient descent so that, added at the last prompt
token of score mode's prompt (where the answer is read), the yes/no log-odds there says the label (binary
cross-entropy), with its norm kept within `max_norm` mean residual norms of its layer (projected after every step).
Each layer's vector is trained alone at its layer, as every bank's vectors are used: one per steered layer.

Cost near a forward pass. Steering the last prompt token changes nothing before it, so each training item's prompt
less that token runs once, unsteered and without gradients, into a KV cache (`Prefix`) that every fold, group,
layer and step reuses. A step runs each item's last token once per (layer, group) side by side in one sequence over
that cache (each copy sees the prompt and itself, as the sweep's scorer runs configs) and backpropagates through
those tokens only: the gradient equals the full pass's (tests/test_trained.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache

from vulnsteer.architecture import base_model, cache_argument
from vulnsteer.data import Sample
from vulnsteer.engine.prompt_pass import length_groups
from vulnsteer.engine.runners import answer_token_ids, encode, prompt_cache, side_by_side_mask
from vulnsteer.errors import VulnsteerError
from vulnsteer.models import LoadedModel
from vulnsteer.prompts import ANSWER_PREFIX, PromptResources, build_prompt, render
from vulnsteer.records import Steering
from vulnsteer.steering.hooks import steer_tokens
from vulnsteer.steering.reft import LowRankEdit


@dataclass(frozen=True)
class Training:
    """How learned interventions are fitted: Adam steps on the whole training set; for trained vectors the learning
    rate and the norm bound are in units of the layer's mean residual norm (the unit of `residual` normalisation:
    strength 1 adds one); for LoReFT edits, the rank."""

    steps: int = 40
    learning_rate: float = 0.05
    max_norm: float = 1.0  # trained vectors
    rank: int = 4  # loreft edits (1-8)
    # Adds kl_weight x KL(unsteered || steered) of the next-token distribution where the intervention acts (the
    # prompt's last token) on the training prompts: the fit pays for moving the whole distribution, not just yes/no.
    kl_weight: float = 0.0


@dataclass
class Prefix:
    """Items' score-mode prompts less their last token, run once without gradients: the batch's KV cache (left
    padded), and what the last tokens need to run after it."""

    sample_ids: list[str]
    cache: Any  # a transformers DynamicCache (its layers' types vary by release)
    last_ids: torch.Tensor  # [n] each prompt's last token
    positions: torch.Tensor  # [n] its position (padding on the left not counted)
    mask: torch.Tensor  # [n, width - 1] the prefix's attention mask
    labels: torch.Tensor  # [n] 1.0 for vulnerable items

    def select(self, sample_ids: Sequence[str]) -> Prefix:
        """The rows of these items (a fold's training set), in that order, sharing nothing mutable with this one."""
        index_of = {sample_id: i for i, sample_id in enumerate(self.sample_ids)}
        index = torch.tensor([index_of[s] for s in sample_ids], device=self.last_ids.device)
        cache = DynamicCache()
        for k, layer in enumerate(self.cache.layers):
            cache.update(layer.keys[index], layer.values[index], k)
        return Prefix(
            list(sample_ids), cache, self.last_ids[index], self.positions[index], self.mask[index], self.labels[index]
        )


def score_text(lm: LoadedModel, sample: Sample, prompt_id: str, resources: PromptResources | None) -> str:
    """The prompt as score mode asks it (chat template, then "Answer:")."""
    return render(lm.tokenizer, list(build_prompt(sample, prompt_id, resources).messages), ANSWER_PREFIX)


def prefix_pass(
    lm: LoadedModel, samples: Sequence[Sample], prompt_id: str = "S1", resources: PromptResources | None = None
) -> Prefix:
    texts = [score_text(lm, s, prompt_id, resources) for s in samples]
    encoded = encode(lm, texts)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = prompt_cache(
            lm.model,
            ids[:, :-1],
            mask[:, :-1],
            positions[:, :-1],
            [None] * len(texts),
            length_groups(lm.model, mask[:, :-1]),
        )  # `prompts` left out: sharing layers between rows of one prompt pays off for steered copies, not here
    labels = torch.tensor([float(s.is_vulnerable) for s in samples], device=ids.device)
    return Prefix([s.id for s in samples], cache, ids[:, -1], positions[:, -1], mask[:, :-1], labels)


def answer_log_odds(lm: LoadedModel, prefix: Prefix, tokens: Sequence[Sequence[Steering | None]]) -> torch.Tensor:
    """log P(yes) - log P(no) after each item's last token, once per entry of `tokens[i]` (its steering; all rows
    as wide as the widest, unsteered where shorter): [items, width], differentiable in the steering vectors. The
    prefix's cache is left as it was. Only the yes and no rows of the output layer are computed: the softmax's
    normaliser cancels in the difference, and the full vocabulary's logits cost a quarter of a step or more."""
    yes, no = answer_token_ids(lm.tokenizer)
    logits = next_token_logits(lm, prefix, tokens, yes + no)
    return logits[..., : len(yes)].logsumexp(-1) - logits[..., len(yes) :].logsumexp(-1)


def log_odds(lm: LoadedModel, logp: torch.Tensor) -> torch.Tensor:
    """log P(yes) - log P(no) from next-token log-probabilities [..., vocab]."""
    yes, no = answer_token_ids(lm.tokenizer)
    return logp[..., yes].logsumexp(-1) - logp[..., no].logsumexp(-1)


def next_token_logprobs(lm: LoadedModel, prefix: Prefix, tokens: Sequence[Sequence[Steering | None]]) -> torch.Tensor:
    """The float32 next-token log-probabilities after each item's last token, once per entry of `tokens[i]`:
    [items, width, vocab] (see `answer_log_odds`)."""
    return next_token_logits(lm, prefix, tokens).log_softmax(-1)


def next_token_logits(
    lm: LoadedModel, prefix: Prefix, tokens: Sequence[Sequence[Steering | None]], vocabulary: list[int] | None = None
) -> torch.Tensor:
    """The float32 next-token logits after each item's last token, once per entry of `tokens[i]`: [items, width,
    vocab], or only the `vocabulary` tokens' columns, in that order, where the output layer is a plain linear map."""
    model = lm.model
    width = max(len(row) for row in tokens)
    length = prefix.cache.get_seq_length()
    additive = side_by_side_mask(prefix.mask, width, next(model.parameters()).dtype)
    inputs = dict(
        input_ids=prefix.last_ids[:, None].expand(-1, width),
        attention_mask=additive[:, None],
        position_ids=prefix.positions[:, None].expand(-1, width),
        use_cache=True,
        **{cache_argument(model): prefix.cache},
    )
    head = model.get_output_embeddings()
    plain = isinstance(head, torch.nn.Linear) and not any(
        getattr(model.config, name, None) for name in ("final_logit_softcapping", "logit_scale")
    )
    try:
        with steer_tokens(model, tokens):
            if vocabulary is None or not plain:
                logits = model(**inputs).logits
            else:
                hidden = base_model(model)(**inputs).last_hidden_state
                bias = None if head.bias is None else head.bias[vocabulary]
                logits = torch.nn.functional.linear(hidden, head.weight[vocabulary], bias)
    finally:
        for layer in prefix.cache.layers:  # the copies' keys and values were appended (crop's API varies)
            layer.keys, layer.values = layer.keys[:, :, :length].detach(), layer.values[:, :, :length].detach()
    logits = logits.float()
    return logits if vocabulary is None or plain else logits[..., vocabulary]


def train_vectors(
    lm: LoadedModel,
    prefix: Prefix,
    samples: Sequence[Sample],
    groups: Sequence[str],
    layers: Sequence[int],
    residual_norms: dict[int, float],
    pooled: str,
    settings: Training = Training(),
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[int, torch.Tensor]]:
    """A steering vector per group and layer (`--method trained`), its norm projected onto the bound each step."""
    # A tiny fixed random start: a zero vector would install no hook at all, so it would get no gradient.
    generator = torch.Generator().manual_seed(0)
    device = prefix.last_ids.device
    units = {
        g: {
            layer: (1e-3 * torch.randn(lm.hidden_size, generator=generator)).to(device).requires_grad_()
            for layer in layers
        }
        for g in groups
    }

    def steering(group: str, layer: int) -> Steering:
        return Steering({layer: units[group][layer] * residual_norms[layer]}, 1.0)

    def project() -> None:
        for by_layer in units.values():
            for u in by_layer.values():
                u.mul_((settings.max_norm / u.norm().clamp(min=1e-12)).clamp(max=1.0))

    _train(
        lm,
        prefix,
        samples,
        groups,
        layers,
        pooled,
        steering,
        [u for by_layer in units.values() for u in by_layer.values()],
        settings,
        project,
        progress,
    )
    return {
        g: {layer: (units[g][layer] * residual_norms[layer]).detach().float().cpu() for layer in layers} for g in groups
    }


def train_edits(
    lm: LoadedModel,
    prefix: Prefix,
    samples: Sequence[Sample],
    groups: Sequence[str],
    layers: Sequence[int],
    pooled: str,
    settings: Training = Training(),
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[int, LowRankEdit]]:
    """A LoReFT edit of rank `settings.rank` per group and layer (`--method loreft`), float32, R orthonormal."""
    generator = torch.Generator().manual_seed(0)
    device = prefix.last_ids.device
    edits = {
        g: {layer: LowRankEdit(lm.hidden_size, settings.rank, generator).to(device) for layer in layers} for g in groups
    }

    def steering(group: str, layer: int) -> Steering:
        return Steering({}, 1.0, edits={layer: edits[group][layer]})

    _train(
        lm,
        prefix,
        samples,
        groups,
        layers,
        pooled,
        steering,
        [p for by_layer in edits.values() for edit in by_layer.values() for p in edit.parameters()],
        settings,
        progress=progress,
    )
    return {
        g: {layer: edit.cpu().requires_grad_(False) for layer, edit in by_layer.items()}
        for g, by_layer in edits.items()
    }


def _train(
    lm: LoadedModel,
    prefix: Prefix,
    samples: Sequence[Sample],
    groups: Sequence[str],
    layers: Sequence[int],
    pooled: str,
    steering: Callable[[str, int], Steering],
    parameters: list[torch.Tensor],
    settings: Training,
    after_step: Callable[[], None] = lambda: None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Adam on the binary cross-entropy of the answer's log-odds against the label (plus the KL penalty, when
    weighted). Group `pooled` trains on every item, a CWE's group on that CWE's items, all in the same steps: each
    copy of an item's last token carries one (group, layer) intervention, and no two interventions share a
    parameter."""
    if prefix.sample_ids != [s.id for s in samples]:  # the held-out check reads the items, so they must be these
        raise VulnsteerError(
            "learned interventions: the prefix holds other items than the training items (select "
            "them first); refusing to train on items they may be tested on"
        )
    slots = [[(g, layer) for g in groups if g in (pooled, s.cwe) for layer in layers] for s in samples]
    width = max(map(len, slots))
    device = prefix.last_ids.device
    labels = prefix.labels[:, None].expand(-1, width)
    present = torch.tensor([[k < len(row) for k in range(width)] for row in slots], device=device)
    optimiser = torch.optim.Adam(parameters, lr=settings.learning_rate)
    unsteered = None
    if settings.kl_weight:
        with torch.no_grad():
            unsteered = next_token_logprobs(lm, prefix, [[None]] * len(samples))  # [n, 1, vocab]
    for _ in range(settings.steps):
        tokens = [[steering(g, layer) for g, layer in row] for row in slots]
        if unsteered is None:  # the answer's two rows of the output layer suffice
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                answer_log_odds(lm, prefix, tokens)[present], labels[present]
            )
        else:
            logp = next_token_logprobs(lm, prefix, tokens)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(log_odds(lm, logp)[present], labels[present])
            kl = (unsteered.exp() * (unsteered - logp)).sum(-1)  # KL(unsteered || steered) per copy
            loss = loss + settings.kl_weight * kl[present].mean()
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)  # the model's weights get no gradient
        for parameter, grad in zip(parameters, grads):
            parameter.grad = grad
        optimiser.step()
        with torch.no_grad():
            after_step()
        if progress:
            progress(1)
