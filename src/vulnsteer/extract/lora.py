"""The fine-tuning ceiling beside the steering rows: LoRA (peft) on the attention projections, trained with the loss
of the learned interventions (binary cross-entropy of the answer's yes/no log-odds at score mode's answer position
against the label) on training items only, then scoring held-out items as score mode does.

Cost. A steering vector at the last prompt token leaves every earlier position alone, so `trained` and `loreft` run
each prompt's prefix once into a cache and backpropagate through one token. LoRA changes the keys and values of
every position, so nothing can be cached: each step runs every training prompt in full, with gradients.

The model is adapted in place and restored afterwards: the adapters are removed (not merged), so the base weights
are the very tensors they were, and the next fold's fit starts from the base model (tests/test_lora.py).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from vulnsteer.data import Sample
from vulnsteer.engine.runners import encode
from vulnsteer.errors import VulnsteerError
from vulnsteer.extract.trained import answer_log_odds, log_odds, prefix_pass, score_text
from vulnsteer.models import LoadedModel
from vulnsteer.prompts import PromptResources
from vulnsteer.protocol import overlapping, training_keys


@dataclass(frozen=True)
class LoraTraining:
    """Adam steps over the whole training set (in chunks of `batch` prompts, gradients accumulated)."""

    steps: int = 20
    learning_rate: float = 1e-3
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    batch: int = 4


@dataclass
class LoraFit:
    scores: dict[str, float]  # held-out item id -> the adapted model's answer log-odds
    parameters: int  # trainable (LoRA) parameters
    seconds: float  # fitting, not scoring
    prompt_tokens: dict[str, int]  # held-out item id -> its prompt's length, as a score row records it
    score_seconds: float  # scoring the held-out items, all of them


@contextmanager
def adapted(lm: LoadedModel, settings: LoraTraining) -> Iterator[list[torch.nn.Parameter]]:
    """LoRA adapters in `lm.model` (its trainable parameters yielded), removed on exit with every base parameter's
    `requires_grad` as it was."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise VulnsteerError("the LoRA arm needs peft: pip install 'vulnsteer[lora]'") from exc

    trainable = {name: p.requires_grad for name, p in lm.model.named_parameters()}
    with torch.random.fork_rng(devices=[]):  # a seeded start (peft draws A at random), so a fit is repeatable
        torch.manual_seed(0)
        peft_model = get_peft_model(
            lm.model,
            LoraConfig(
                r=settings.rank, lora_alpha=2 * settings.rank, lora_dropout=0.0, target_modules=list(settings.targets)
            ),
        )
    try:
        yield [p for p in peft_model.parameters() if p.requires_grad]
    finally:
        peft_model.unload()  # the adapters out, the base modules back in place, unmerged
        for name, p in lm.model.named_parameters():
            p.requires_grad_(trainable[name])


def fit_and_score(
    lm: LoadedModel,
    train: Sequence[Sample],
    test: Sequence[Sample],
    prompt_id: str,
    resources: PromptResources | None,
    settings: LoraTraining = LoraTraining(),
    progress: Callable[[int], None] | None = None,
) -> LoraFit:
    """LoRA fitted on `train`, the adapted model's answer log-odds on `test`; the model is left as it was. Refused
    when a test item shares a family or code with a training item."""
    leaked = overlapping(test, set(training_keys(train)))
    if leaked:
        raise VulnsteerError(
            f"LoRA would be trained on {len(leaked)} of the items it is tested on (e.g. "
            f"{leaked[0].id}); refusing a result that is not held out"
        )
    started = time.perf_counter()
    texts = [score_text(lm, s, prompt_id, resources) for s in train]
    labels = torch.tensor([float(s.is_vulnerable) for s in train])
    with adapted(lm, settings) as parameters:
        optimiser = torch.optim.Adam(parameters, lr=settings.learning_rate)
        for _ in range(settings.steps):
            optimiser.zero_grad()
            for start in range(0, len(texts), settings.batch):
                chunk = slice(start, start + settings.batch)
                scores = _last_token_log_odds(lm, texts[chunk])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    scores, labels[chunk].to(scores.device), reduction="sum"
                ) / len(texts)
                loss.backward()
            optimiser.step()
            if progress:
                progress(1)
        seconds = time.perf_counter() - started
        scoring = time.perf_counter()
        with torch.no_grad():
            prefix = prefix_pass(lm, test, prompt_id, resources)
            held_out = answer_log_odds(lm, prefix, [[None]] * len(test))[:, 0]
        count = sum(p.numel() for p in parameters)
    lengths = prefix.mask.sum(-1) + 1  # the prefix's tokens and the last one
    return LoraFit(
        {s.id: float(v) for s, v in zip(test, held_out)},
        count,
        seconds,
        {s.id: int(n) for s, n in zip(test, lengths)},
        time.perf_counter() - scoring,
    )


def _last_token_log_odds(lm: LoadedModel, texts: list[str]) -> torch.Tensor:
    """The answer's log-odds after each whole prompt (left padded), differentiable in the adapters."""
    encoded = encode(lm, texts)
    mask = encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = lm.model(
        input_ids=encoded["input_ids"], attention_mask=mask, position_ids=positions, logits_to_keep=1
    ).logits[:, -1]
    return log_odds(lm, logits.float().log_softmax(-1))
