"""Residual-stream activations (decoder-layer outputs) of prompts, read at one position per row.

Read positions: `prompt-last` (the last prompt token, where the answer is decided: in score mode the "Answer:" that
scoring and prompt-last steering act at, in generate mode the end of the chat template) or `code-mean` (the mean over
the tokens of the code inside the prompt). Both come from each row's attention mask and token offsets, never from
the padded width. Activations of every layer are cached on disk per (model weights, sample, prompt, mode, read
position), so a later run that asks for other layers or other vectors does not run the model again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from vulnsteer.architecture import decoder_layers, hidden_of
from vulnsteer.data import Sample
from vulnsteer.engine.planner import batch_cost, batches
from vulnsteer.errors import VulnsteerError
from vulnsteer.models import LoadedModel, cache_dir
from vulnsteer.prompts import ANSWER_PREFIX, PromptResources, build_prompt, render
from vulnsteer.records import Mode, Word


class Read(Word):
    """Where activations are read: the prompt's last token, or the mean over the code's tokens."""

    PROMPT_LAST = "prompt-last"
    CODE_MEAN = "code-mean"


@dataclass
class Activations:
    """Row i of `by_layer[layer]` is the activation of `samples[i]` at that layer ([n_samples, hidden], float32)."""

    samples: list[Sample]
    by_layer: dict[int, torch.Tensor]
    read: str
    prompt_id: str
    mode: str = "generate"  # the prompt as asked in this mode (score mode: with "Answer:")

    def subset(self, keep: Callable[[Sample], bool]) -> "Activations":
        index = [i for i, s in enumerate(self.samples) if keep(s)]
        return Activations(
            [self.samples[i] for i in index],
            {k: v[index] for k, v in self.by_layer.items()},
            self.read,
            self.prompt_id,
            self.mode,
        )

    def of_cwe(self, cwe: str) -> Activations:
        return self.subset(lambda s: s.cwe == cwe)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([s.is_vulnerable for s in self.samples])


def cache_file(lm: LoadedModel, text: str, read: str) -> Path:
    """Keyed by the model's source and weights, the rendered prompt and its token ids, so another checkpoint or a
    change of prompt text, few-shot files, definitions or tokenizer is a miss."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    key = hashlib.sha256(
        "\0".join([lm.source, lm.fingerprint, lm.config_hash, str(lm.model.dtype), text, read, str(ids)]).encode()
    )
    folder = cache_dir() / "activations" / f"{lm.model_id.replace('/', '--')}-{lm.fingerprint or lm.config_hash}"
    return folder / f"{key.hexdigest()[:24]}.safetensors"


def code_token_mask(tokenizer, text: str, code: str, width: int) -> torch.Tensor:
    """Which of the (left-padded, `width`-wide) tokens of `text` overlap the code's characters."""
    start = text.rfind(code)
    if start < 0:
        raise VulnsteerError("the code does not appear verbatim in the rendered prompt; use --read prompt-last")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    inside = [a < start + len(code) and b > start for a, b in offsets]
    mask = torch.zeros(width, dtype=torch.bool)
    mask[width - len(inside) :] = torch.tensor(inside)
    return mask


def collect(
    lm: LoadedModel,
    samples: Sequence[Sample],
    prompt_id: str,
    resources: PromptResources | None,
    read: Read = Read.PROMPT_LAST,
    batch_tokens: int = 8192,
    use_cache: bool = True,
    progress: Callable[[int], None] | None = None,
    mode: Mode = Mode.GENERATE,
) -> Activations:
    """One forward pass per batch records every decoder layer's output at the read position of each row, on the
    prompt as `mode` asks it (score mode ends it with "Answer:", where scoring reads the model's yes/no)."""
    read = Read.parse(read, "read position")  # the Python API's edge (the CLI's and a sweep's parse first)
    prefix = ANSWER_PREFIX if mode == Mode.SCORE else ""
    texts = [render(lm.tokenizer, list(build_prompt(s, prompt_id, resources).messages), prefix) for s in samples]
    paths = [cache_file(lm, text, read) for text in texts]
    rows: dict[int, torch.Tensor] = {}
    for i, path in enumerate(paths):
        if use_cache and path.exists():
            rows[i] = load_file(path)["activations"]
    todo = [i for i in range(len(samples)) if i not in rows]
    if progress and len(rows):
        progress(len(rows))
    lengths = [len(lm.tokenizer(texts[i], add_special_tokens=False)["input_ids"]) for i in todo]
    for group in batches(lengths, batch_tokens, batch_cost(lm.model, 1)):
        index = [todo[g] for g in group]
        for i, acts in zip(index, read_batch(lm, [texts[i] for i in index], [samples[i] for i in index], read)):
            rows[i] = acts
            if use_cache:
                paths[i].parent.mkdir(parents=True, exist_ok=True)
                save_file({"activations": acts.contiguous()}, str(paths[i]))
        if progress:
            progress(len(index))
    stacked = torch.stack([rows[i] for i in range(len(samples))])  # [n, layers, hidden]
    return Activations(
        list(samples), {layer: stacked[:, layer] for layer in range(stacked.shape[1])}, read, prompt_id, mode
    )


def read_batch(lm: LoadedModel, texts: list[str], samples: list[Sample], read: str) -> torch.Tensor:
    """[rows, layers, hidden] float32 activations of one batch."""
    encoded = lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    width = encoded["input_ids"].shape[1]
    if read == Read.PROMPT_LAST:
        weights = torch.zeros(len(texts), width)
        weights[:, -1] = 1.0  # left padding puts every row's last prompt token in the last column
    else:
        masks = torch.stack([code_token_mask(lm.tokenizer, t, s.code, width) for t, s in zip(texts, samples)])
        weights = masks.float() / masks.sum(dim=1, keepdim=True).clamp(min=1)
    weights = weights.to(lm.device)
    outputs: list[torch.Tensor] = []

    def record(module, args, output):
        outputs.append(torch.einsum("bt,bth->bh", weights, hidden_of(output).float()).cpu())

    handles = [layer.register_forward_hook(record) for layer in decoder_layers(lm.model)]
    try:
        with torch.inference_mode():
            lm.model(**encoded, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(outputs, dim=1)
