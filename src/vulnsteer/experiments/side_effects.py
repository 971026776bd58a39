"""What steering costs the model: how far it moves the next-token distribution on plain code, away from the
detection task.

Each item's code (no prompt around it) is read by the model unsteered and steered, with the steering added at every
token (the most a config can change; configs that steer one position change less). Per config, over every
predicted token: the mean KL divergence KL(unsteered || steered) of the next-token distribution, and the change in
negative log-likelihood of the code's own next token (steered minus unsteered, nats per token). A config that raises
detection while it rewrites the model's view of ordinary code has a cost to report beside its gain. Intervals come
from a bootstrap over families.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from vulnsteer.data import Sample, family
from vulnsteer.engine.planner import batch_cost, batches
from vulnsteer.engine.trunk import shared_trunk
from vulnsteer.metrics import Interval, clustered_ratio
from vulnsteer.models import LoadedModel
from vulnsteer.records import Positions, Steering
from vulnsteer.steering.hooks import steer

MAX_TOKENS = 256  # tokens of each file read; longer files are cut (the cost is quadratic in attention)
# float32 values of one batch's logits (1 GiB; a few such tensors are alive at once): with a 152k-token vocabulary
# (Qwen) five configs share each unsteered row, instead of one at 256 MiB (half the passes)
LOGITS_BUDGET = 2**28


@dataclass(frozen=True)
class SideEffect:
    """One steering config's cost on plain code, pooled over items (per predicted token)."""

    config: str
    kl: Interval  # mean KL(unsteered || steered) of the next-token distribution, nats
    nll_change: Interval  # mean NLL of the code's next token, steered minus unsteered, nats
    tokens: int  # predicted tokens the KL is averaged over
    items: int
    # per item, in the order of the samples measured: the KL summed over its tokens, and its token count (an arm
    # that steers each fold with another config pools these: `analysis.arm_side_effect`)
    item_kl: tuple[float, ...] = ()
    item_tokens: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "kl": self.kl.to_dict(),
            "nll_change": self.nll_change.to_dict(),
            "tokens": self.tokens,
            "items": self.items,
            "per_item": {"kl": list(self.item_kl), "tokens": list(self.item_tokens)},
        }


def code_side_effects(
    lm: LoadedModel,
    samples: Sequence[Sample],
    configs: dict[str, Callable[[Sample], Steering | None]],
    batch_tokens: int = 8192,
    max_tokens: int = MAX_TOKENS,
    progress: Callable[[int], None] | None = None,
) -> list[SideEffect]:
    """Side effects of each config (`configs[name](sample)`: the steering that item gets, as in the run whose
    cost is measured) on the samples' code. Each item's unsteered row and its rows under the configs run in one
    forward pass, the configs' rows sharing the unsteered row's layers below their first steered one
    (`shared_trunk`): a config steering half-way up costs half a pass."""
    encoded = [lm.tokenizer(s.code, add_special_tokens=False)["input_ids"][:max_tokens] for s in samples]
    keep = [i for i, ids in enumerate(encoded) if len(ids) >= 2]
    names = list(configs)
    sums = {name: {"kl": [0.0] * len(samples), "nll": [0.0] * len(samples)} for name in names}
    tokens = [len(encoded[i]) if i in keep else 0 for i in range(len(samples))]
    vocabulary = lm.model.get_output_embeddings().weight.shape[0]
    logits_tokens = max(max_tokens, LOGITS_BUDGET // vocabulary)  # every position's logits are kept
    per_pass = max(1, min(len(names), logits_tokens // max_tokens - 1))  # configs beside the unsteered row
    chunks = [names[k : k + per_pass] for k in range(0, len(names), per_pass)]
    budget = max(max_tokens, min(batch_tokens, logits_tokens) // (1 + per_pass))
    for group in batches([len(encoded[i]) for i in keep], budget, batch_cost(lm.model, 1)):
        items = [keep[g] for g in group]
        ids, mask = _left_padded(lm, [encoded[i] for i in items])
        for chunk in chunks:
            width = 1 + len(chunk)  # rows per item: unsteered, then one per config
            steerings = [
                None if c == 0 else _everywhere(configs[chunk[c - 1]](samples[i])) for i in items for c in range(width)
            ]
            rows_ids, rows_mask = ids.repeat_interleave(width, 0), mask.repeat_interleave(width, 0)
            positions = (rows_mask.cumsum(-1) - 1).clamp(min=0)  # each row as if alone, padding on the left
            prompts = [i for i in items for _ in range(width)]
            with (
                torch.inference_mode(),
                steer(lm.model, steerings, rows_mask),
                shared_trunk(lm.model, prompts, steerings),
            ):
                logits = lm.model(input_ids=rows_ids, attention_mask=rows_mask, position_ids=positions).logits
            logp = logits.float().log_softmax(-1).unflatten(0, (len(items), width))
            for c, name in enumerate(chunk, start=1):
                kl, nll = _per_row(logp[:, 0], logp[:, c], ids, mask)
                for k, i in enumerate(items):
                    sums[name]["kl"][i], sums[name]["nll"][i] = kl[k], nll[k]
        if progress:
            progress(len(items))
    clusters = [family(s) for s in samples]
    predicted = [max(n - 1, 0) for n in tokens]
    return [
        SideEffect(
            name,
            clustered_ratio(sums[name]["kl"], tokens, clusters),
            clustered_ratio(sums[name]["nll"], predicted, clusters),
            sum(tokens),
            len(keep),
            tuple(sums[name]["kl"]),
            tuple(tokens),
        )
        for name in names
    ]


def _everywhere(row: Steering | None) -> Steering | None:
    return None if row is None else replace(row, positions=Positions.ALL)


def _left_padded(lm: LoadedModel, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    pad = lm.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=lm.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=lm.device)
    return ids, mask


def _per_row(base: torch.Tensor, steered: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """Per row: the KL summed over its real positions, and its steered-minus-unsteered NLL of the next real token
    summed over the positions that have one."""
    real = mask.bool()
    kl = (base.exp() * (base - steered)).sum(-1).masked_fill(~real, 0.0).sum(-1)
    target = ids[:, 1:, None]
    change = -(steered[:, :-1].gather(-1, target) - base[:, :-1].gather(-1, target)).squeeze(-1)
    nll = change.masked_fill(~(real[:, :-1] & real[:, 1:]), 0.0).sum(-1)
    return kl.tolist(), nll.tolist()
