"""lm-evaluation-harness interop: the steer file its `steered` model reads, and what to check it against (a local
log-likelihood task, and vulnsteer's own log-likelihood of a continuation under the same steering)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch

from vulnsteer.errors import VulnsteerError
from vulnsteer.extract.vectors import VectorBank
from vulnsteer.models import LoadedModel
from vulnsteer.records import Steering
from vulnsteer.steering.hooks import steer

# Where lm-evaluation-harness's `steered` model hooks a decoder block: module names under `model.base_model`.
_LM_EVAL_HOOKPOINTS = {"gpt2": "h.{layer}"}


def export_lm_eval(bank: VectorBank, group: str, layers: list[int], strength: float, path: Path) -> None:
    """The steering config that lm-evaluation-harness's `steered` model reads (`lm_eval --model steered
    --model_args pretrained=...,steer_path=FILE`): at each layer's decoder-block output, `strength * vector` added
    at every position, which is vulnsteer's `positions="all"` (lm-eval also adds it at padding, which its
    right-padded log-likelihood batches never read)."""
    by_layer = bank.for_group(group)
    missing = [layer for layer in layers if layer not in by_layer]
    if missing:
        raise VulnsteerError(f"the vector file has no {group} vector for layer(s) {missing}; it has {sorted(by_layer)}")
    hookpoint = _LM_EVAL_HOOKPOINTS.get(str(bank.meta.get("model_type")), "layers.{layer}")
    config = {
        hookpoint.format(layer=layer): {
            "action": "add",
            "steering_vector": by_layer[layer].float().clone(),
            "steering_coefficient": float(strength),
            "bias": None,
        }
        for layer in layers
    }
    torch.save(config, path)


def loglikelihood_task(name: str, data: Path) -> str:
    """The YAML of a local lm-eval task that scores each line `{"context": ..., "target": ...}` of the JSONL file
    `data` by the log-likelihood of its target (pass its folder to `lm_eval --include_path`)."""
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
        "metric_list:\n  - metric: acc\n"
    )


def continuation_log_likelihood(
    lm: LoadedModel, context: str, continuation: str, rows: Sequence[Steering | None] | None = None
) -> float:
    """log P(continuation | context), summed over the continuation's tokens, split as lm-eval splits a pair: the
    context's trailing white space moves to the continuation, and the continuation's tokens are those of the whole
    text after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = lm.tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = lm.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.inference_mode(), steer(lm.model, rows) if rows else nullcontext():
        logp = lm.model(input_ids=torch.tensor([whole[:-1]], device=lm.device)).logits.float().log_softmax(-1)[0]
    return float(sum(logp[p, whole[p + 1]] for p in range(len(context_ids) - 1, len(whole) - 1)))
