"""Steering directions from activations, and the files that hold them.

Directions point from patched towards vulnerable code. Methods:
- `mean-diff`: mean(vulnerable) - mean(patched);
- `pca`: first principal component of the paired differences (vulnerable - patched of the same pair), signed so
  vulnerable samples project higher;
- `probe`: the weight vector of a logistic-regression probe (scikit-learn) on standardised activations;
- `trained`: learned on the model's answer by gradient descent (`extract/trained.py`); its norm is what it learned,
  within a bound, not set by the normalisation;
- `loreft`: not a vector but a learned low-rank edit per group and layer (`steering/reft.py`), trained the same way;
  a bank of them holds `edits` instead of `vectors`, and steers through the same `Steering` records.
Normalisation: `unit` (norm 1) or `residual` (norm = mean residual-stream norm of that layer), so that a strength
means the same at every layer and in every model: with `residual`, strength 1 adds one typical residual norm.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from sklearn.linear_model import LogisticRegression

from vulnsteer import __version__
from vulnsteer.data import Sample
from vulnsteer.errors import VulnsteerError
from vulnsteer.extract.activations import Activations
from vulnsteer.extract.trained import Prefix, Training, prefix_pass, train_edits, train_vectors
from vulnsteer.models import LoadedModel, ModelInfo
from vulnsteer.prompts import PromptResources
from vulnsteer.protocol import items_sha256, training_keys
from vulnsteer.records import Positions, Steering, SteeringId, VectorChoice, Word
from vulnsteer.steering.reft import LowRankEdit


class Normalisation(Word):
    """How a fitted direction is scaled: to the layer's mean residual norm, or to unit length."""

    RESIDUAL = "residual"
    UNIT = "unit"


POOLED = "pooled"


def _check_classes(acts: Activations, group: str) -> None:
    labels = acts.labels
    if labels.all() or not labels.any():
        missing = "patched" if labels.all() else "vulnerable"
        raise VulnsteerError(f"{group}: no {missing} sample to fit a direction on")


def mean_diff(x: torch.Tensor, vulnerable: torch.Tensor, pair_ids: list[str]) -> torch.Tensor:
    return x[vulnerable].mean(0) - x[~vulnerable].mean(0)


def first_principal_difference(x: torch.Tensor, vulnerable: torch.Tensor, pair_ids: list[str]) -> torch.Tensor:
    """The first right singular vector of the paired differences, signed so that pairs move along it on average."""
    diffs = _paired_differences(x, vulnerable, pair_ids)
    if len(diffs) < 2:
        return diffs.mean(0)
    # Uncentred: the shift that all pairs share is the signal, so it must not be subtracted away.
    _, _, v = torch.linalg.svd(diffs, full_matrices=False)
    first = v[0]
    return first if (diffs @ first).mean() >= 0 else -first


def probe_weights(x: torch.Tensor, vulnerable: torch.Tensor, pair_ids: list[str]) -> torch.Tensor:
    """A logistic probe's weights on standardised activations, mapped back to the activations' own space."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    probe = LogisticRegression(C=0.1, max_iter=2000).fit(((x - mean) / std).numpy(), vulnerable.numpy())
    return torch.from_numpy(probe.coef_[0]).float() / std


# The methods: directions read off activations alone (a function of activations [n, hidden], boolean labels and
# pair ids: a new one is one function and one line here), and interventions fitted on the model's answers
# (`extract/trained.py`), which `fit` dispatches by name.
DIRECTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor]] = {
    "mean-diff": mean_diff,
    "pca": first_principal_difference,
    "probe": probe_weights,
}
LEARNED = ("trained", "loreft")


def methods() -> tuple[str, ...]:
    """Every method's name, registered directions included."""
    return (*DIRECTIONS, *LEARNED)


def check_method(method: str, what: str = "method") -> str:
    """`method` when it names a known method (`methods()`); else a one-line error naming them. The one check of the
    word, wherever it comes from (`extract --method`, a sweep's `methods`, a direction asked for)."""
    if method not in methods():
        raise VulnsteerError(f"unknown {what} {method!r}; use one of {', '.join(methods())}")
    return method


def direction(x: torch.Tensor, vulnerable: torch.Tensor, pair_ids: list[str], method: str) -> torch.Tensor:
    """One raw (unnormalised) direction from activations `x` [n, hidden] with boolean labels `vulnerable`."""
    if method in LEARNED:
        raise VulnsteerError(
            f"{method} vectors are fitted on the model's answers, not read off activations; use "
            f"one of {', '.join(DIRECTIONS)} here"
        )
    return DIRECTIONS[check_method(method)](x, vulnerable, pair_ids)


def _paired_differences(x: torch.Tensor, vulnerable: torch.Tensor, pair_ids: list[str]) -> torch.Tensor:
    """vulnerable - patched for every pair with both; falls back to all cross differences' mean when unpaired."""
    by_pair: dict[str, dict[bool, list[int]]] = {}
    for i, pair in enumerate(pair_ids):
        by_pair.setdefault(pair, {True: [], False: []})[bool(vulnerable[i])].append(i)
    diffs = [x[v].mean(0) - x[p].mean(0) for v, p in ((g[True], g[False]) for g in by_pair.values()) if v and p]
    if not diffs:
        return (x[vulnerable].mean(0) - x[~vulnerable].mean(0)).unsqueeze(0)
    return torch.stack(diffs)


def normalise(vector: torch.Tensor, how: Normalisation, residual_norm: float) -> torch.Tensor:
    unit = vector / vector.norm().clamp(min=1e-12)
    return unit * residual_norm if how == Normalisation.RESIDUAL else unit


@dataclass
class VectorBank:
    """Directions per group (a CWE id or "pooled") and layer, with the metadata that says where they came from; or,
    for `loreft`, learned edits per group and layer (`edits`, `vectors` empty)."""

    vectors: dict[str, dict[int, torch.Tensor]]
    meta: dict
    edits: dict[str, dict[int, LowRankEdit]] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        return sorted({*self.vectors, *self.edits})

    @property
    def layers(self) -> list[int]:
        return sorted(
            {layer for by_layer in self.vectors.values() for layer in by_layer}
            | {layer for by_layer in self.edits.values() for layer in by_layer}
        )

    def for_group(self, group: str) -> dict[int, torch.Tensor]:
        if group in self.edits:
            raise VulnsteerError(
                f"this file holds {self.meta.get('method')} edits, not steering vectors: it steers "
                "through `eval --vectors` and sweeps, but has no direction to export or project on"
            )
        if group not in self.vectors:
            raise VulnsteerError(
                f"no vector for {group} (too few training items?); there are vectors for {', '.join(self.groups)}"
            )
        return self.vectors[group]

    def steering(
        self,
        group: str,
        layers: list[int],
        strength: float,
        positions: Positions = Positions.ALL,
        label: SteeringId | None = None,
    ) -> Steering:
        """What this bank's `group` adds at `layers`: its vectors, or its edits."""
        if group in self.edits:
            return Steering({}, strength, positions, label, edits={layer: self.edits[group][layer] for layer in layers})
        by_layer = self.for_group(group)
        return Steering({layer: by_layer[layer] for layer in layers}, strength, positions, label)


def fit(
    acts: Activations,
    lm: LoadedModel | ModelInfo,
    method: str = "mean-diff",
    layers: list[int] | None = None,
    normalisation: Normalisation = Normalisation.RESIDUAL,
    groups: str = "cwe+pooled",
    prefix: Prefix | None = None,
    resources: PromptResources | None = None,
    training: Training = Training(),
    progress: Callable[[int], None] | None = None,
) -> VectorBank:
    """A vector per CWE (and/or pooled over all CWEs) and layer from training activations. `trained` vectors are
    fitted on the model itself, on `prefix` (a `trained.Prefix` holding at least the training items, reused across
    folds) or on a prefix pass over the items' prompts (`resources`: few-shot files and definitions); `progress`
    hears of each training step."""
    started = time.perf_counter()
    normalisation = Normalisation.parse(normalisation)  # the Python API's edge (the CLI's and a sweep's parse first)
    layers = layers if layers is not None else sorted(acts.by_layer)
    names = sorted({s.cwe for s in acts.samples}) if "cwe" in groups else []
    names += [POOLED] if "pooled" in groups else []
    residual_norms = {layer: float(acts.by_layer[layer].norm(dim=1).mean()) for layer in layers}
    if method in ("pca", "probe") and len({s.pair_id for s in acts.samples}) < 2:
        raise VulnsteerError(
            f"--method {method} needs at least 2 pairs to fit on (a direction from one pair is "
            "its difference; use mean-diff)"
        )
    vectors: dict[str, dict[int, torch.Tensor]] = {}
    for name in names:
        part = acts if name == POOLED else acts.of_cwe(name)
        _check_classes(part, name)
        if method in LEARNED:
            continue
        pair_ids = [s.pair_id for s in part.samples]
        vectors[name] = {
            layer: normalise(
                direction(part.by_layer[layer], part.labels, pair_ids, method), normalisation, residual_norms[layer]
            )
            for layer in layers
        }
    extra: dict = {}
    edits: dict[str, dict[int, LowRankEdit]] = {}
    if method in LEARNED:
        if not isinstance(lm, LoadedModel):
            raise VulnsteerError(
                f"--method {method} is fitted on the model's answers: it needs the model in this "
                "process (not a Ray driver's model description)"
            )
        ids = [s.id for s in acts.samples]
        prefix = prefix.select(ids) if prefix is not None else prefix_pass(lm, acts.samples, acts.prompt_id, resources)
        extra = {"training": asdict(training), "trained_at": "the last token of score mode's prompt"}
        if method == "trained":
            vectors = train_vectors(lm, prefix, acts.samples, names, layers, residual_norms, POOLED, training, progress)
            extra["normalisation_note"] = "learned norm, at most max_norm mean residual norms"
        else:
            edits = train_edits(lm, prefix, acts.samples, names, layers, POOLED, training, progress)
    meta = {
        "model": lm.model_id,
        "model_type": lm.model_type,
        "config_hash": lm.config_hash,
        "hidden_size": lm.hidden_size,
        "num_layers": lm.num_layers,
        "layers": layers,
        "method": method,
        "read": acts.read,
        "prompt": acts.prompt_id,
        "normalisation": normalisation,
        "groups": names,
        "train_ids_sha256": items_sha256(acts.samples),
        "n_train": len(acts.samples),
        "train_ids": sorted(s.id for s in acts.samples),
        "train_keys": training_keys(acts.samples),
        "mode": acts.mode,
        "vulnsteer": __version__,
        **extra,
    }
    if isinstance(lm, LoadedModel):  # the weights themselves (a Ray driver has only their description)
        meta["weights_bf16"] = lm.weights_bf16
    meta["fit_seconds"] = round(time.perf_counter() - started, 3)
    return VectorBank(vectors, meta, edits)


def save(bank: VectorBank, path: Path) -> None:
    """safetensors: one tensor "<group>/<layer>" each, metadata as JSON under the key "vulnsteer"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{g}/{layer}": v.float().contiguous() for g, by_layer in bank.vectors.items() for layer, v in by_layer.items()
    }
    tensors |= {
        f"{g}/{layer}/{part}": t
        for g, by_layer in bank.edits.items()
        for layer, edit in by_layer.items()
        for part, t in edit.tensors().items()
    }
    save_file(tensors, str(path), metadata={"vulnsteer": json.dumps(bank.meta)})


def load(path: Path) -> VectorBank:
    """Read a vector file; malformed files and non-finite values are refused with one clear line."""
    if not path.is_file():
        raise VulnsteerError(f"vector file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("vulnsteer", "null"))
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as exc:
        raise VulnsteerError(f"{path} is not a vulnsteer vector file ({str(exc).splitlines()[0]})") from exc
    if not isinstance(meta, dict):
        raise VulnsteerError(f"{path} has no vulnsteer metadata; write it with `vulnsteer extract`")
    vectors: dict[str, dict[int, torch.Tensor]] = {}
    parts: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # a learned edit's R, W and b
    for key, tensor in tensors.items():
        group, _, layer = key.rpartition("/")
        if layer in EDIT_PARTS and group.rpartition("/")[2].isdigit():
            group, _, layer = group.rpartition("/")
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise VulnsteerError(f"{path}: edit tensor {key} must be finite floats")
            parts.setdefault((group, int(layer)), {})[key.rpartition("/")[2]] = tensor
            continue
        if not group or not layer.isdigit():
            raise VulnsteerError(f"{path}: tensor {key!r} is not named <group>/<layer>")
        if not tensor.is_floating_point() or tensor.dim() != 1:
            raise VulnsteerError(
                f"{path}: vector {key} must be a 1-D float tensor, got {tensor.dim()}-D "
                f"{str(tensor.dtype).removeprefix('torch.')}"
            )
        if not torch.isfinite(tensor).all():
            raise VulnsteerError(f"{path}: vector {key} has NaN or infinite values")
        hidden, layers = meta.get("hidden_size"), meta.get("num_layers")
        if isinstance(hidden, int) and tensor.shape[0] != hidden:
            raise VulnsteerError(
                f"{path}: vector {key} has {tensor.shape[0]} values; the file says hidden size {hidden}"
            )
        if isinstance(layers, int) and not 0 <= int(layer) < layers:
            raise VulnsteerError(f"{path}: vector {key} is for layer {layer}, outside the model's 0..{layers - 1}")
        vectors.setdefault(group, {})[int(layer)] = tensor
    return VectorBank(vectors, meta, _edits(parts, meta, path))


EDIT_PARTS = ("R", "W", "b")


def _edits(
    parts: dict[tuple[str, int], dict[str, torch.Tensor]], meta: dict, path: Path
) -> dict[str, dict[int, LowRankEdit]]:
    """LoReFT edits from their stored parts, each shape checked against the file's hidden size."""
    hidden, n_layers = meta.get("hidden_size"), meta.get("num_layers")
    edits: dict[str, dict[int, LowRankEdit]] = {}
    for (group, layer), found in parts.items():
        missing = [p for p in EDIT_PARTS if p not in found]
        if missing:
            raise VulnsteerError(f"{path}: the edit {group}/{layer} lacks {', '.join(missing)}")
        rank = found["b"].shape[0] if found["b"].dim() == 1 else -1
        if rank < 1 or found["R"].shape != (rank, hidden) or found["W"].shape != (rank, hidden):
            raise VulnsteerError(
                f"{path}: the edit {group}/{layer} has shapes R {tuple(found['R'].shape)}, W "
                f"{tuple(found['W'].shape)}, b {tuple(found['b'].shape)}; expected rank x {hidden}"
            )
        if isinstance(n_layers, int) and not 0 <= layer < n_layers:
            raise VulnsteerError(f"{path}: edit {group}/{layer} is outside the model's 0..{n_layers - 1}")
        edits.setdefault(group, {})[layer] = LowRankEdit.from_tensors(found)
    return edits


def check_compatible(
    bank: VectorBank, lm: LoadedModel, source: str = "vectors", allow_other_weights: bool = False
) -> None:
    """Vectors from a model of another shape cannot steer this one; from other weights of the same shape (another
    checkpoint, a fine-tune) they are refused unless `allow_other_weights`, with a warning then."""
    meta = bank.meta
    fitted_on = meta.get("weights_bf16")
    if fitted_on and fitted_on != lm.weights_bf16:
        if not allow_other_weights:
            raise VulnsteerError(
                f"{source} were fitted on other weights than {lm.model_id}'s (same architecture, "
                f"another checkpoint: {meta.get('model')}); pass --allow-other-weights to use them "
                "anyway"
            )
        print(
            f"warning: {source} were fitted on other weights ({meta.get('model')}) than {lm.model_id}'s",
            file=sys.stderr,
        )
    if meta.get("hidden_size") != lm.hidden_size or meta.get("num_layers") != lm.num_layers:
        raise VulnsteerError(
            f"{source} were made for a model with hidden size {meta.get('hidden_size')} and "
            f"{meta.get('num_layers')} layers ({meta.get('model')}); {lm.model_id} has {lm.hidden_size} and "
            f"{lm.num_layers}"
        )
    for layer in bank.layers:
        if not 0 <= layer < lm.num_layers:
            raise VulnsteerError(f"{source}: layer {layer} is out of range (0..{lm.num_layers - 1})")
    for by_layer in bank.vectors.values():
        for layer, vector in by_layer.items():
            if not 0 <= layer < lm.num_layers:
                raise VulnsteerError(f"{source}: layer {layer} is out of range (0..{lm.num_layers - 1})")
            if vector.shape != (lm.hidden_size,):
                raise VulnsteerError(
                    f"{source}: a vector has shape {tuple(vector.shape)}, expected ({lm.hidden_size},)"
                )


def load_vectors(path: Path, lm: LoadedModel) -> VectorBank:
    bank = load(path)
    check_compatible(bank, lm, str(path))
    return bank


def parse_layers(spec: str | None, num_layers: int, available: list[int] | None = None) -> list[int]:
    """ "12,24", "all", "-1" (from the end) or "rel:0.25,0.5" (relative depths) -> sorted layer indices."""
    if spec in (None, "", "all"):
        return sorted(available) if available is not None else list(range(num_layers))
    layers = set()
    for part in spec.replace("rel:", "").split(","):
        try:
            value = float(part) if spec.startswith("rel:") else int(part)
        except ValueError as exc:
            raise VulnsteerError(f"bad layer {part!r} in {spec!r}; use e.g. 12,24 or all or rel:0.25,0.5") from exc
        if spec.startswith("rel:") and not 0 <= value <= 1:
            raise VulnsteerError(f"relative depth {part} in {spec!r} is outside 0..1")
        layer = relative_layer(value, num_layers) if spec.startswith("rel:") else int(value)
        layer = layer + num_layers if layer < 0 else layer
        if not 0 <= layer < num_layers:
            raise VulnsteerError(f"layer {part} is out of range: the model has layers 0..{num_layers - 1}")
        if available is not None and layer not in available:
            raise VulnsteerError(f"the vector file has no layer {layer}; it has {available}")
        layers.add(layer)
    return sorted(layers)


def relative_layer(depth: float, num_layers: int) -> int:
    """The layer at a relative depth: the original experiment's [12, 24, 36, 47] of 48 are depths
    [0.25, 0.5, 0.75, 0.98]; depth 1.0 is the last layer."""
    return min(num_layers - 1, int(math.floor(depth * num_layers + 1e-9)))


def steering_for_samples(
    bank: VectorBank,
    layers: str | None,
    strength: float,
    positions: Positions,
    cwe_vector: VectorChoice = VectorChoice("own"),
) -> Callable[[Sample], Steering]:
    """A function giving each sample its steering: its own CWE's vector, the pooled one, or a named CWE's."""
    chosen = parse_layers(layers, bank.meta["num_layers"], bank.layers)
    if cwe_vector.kind != "own" and cwe_vector.group("") not in bank.groups:
        bank.for_group(cwe_vector.group(""))  # says which groups there are

    def steering(sample: Sample) -> Steering:
        group = cwe_vector.group(sample.cwe)
        if group not in bank.groups:
            bank.for_group(group)
        return bank.steering(
            group,
            chosen,
            strength,
            positions,
            SteeringId(
                vectors=group, layers=chosen, strength=strength, positions=positions, method=bank.meta.get("method")
            ),
        )

    return steering


def export_gguf(bank: VectorBank, group: str, path: Path) -> None:
    """A llama.cpp control-vector file (the format repeng writes): tensors `direction.<layer>`.
    llama.cpp cannot steer layer 0, so a layer-0 vector is left out."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", str(bank.meta.get("model_type", bank.meta.get("model", ""))))
    by_layer = {layer: v for layer, v in bank.for_group(group).items() if layer > 0}
    writer.add_uint32("controlvector.layer_count", len(by_layer))
    for layer, vector in sorted(by_layer.items()):
        writer.add_tensor(f"direction.{layer}", vector.float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
