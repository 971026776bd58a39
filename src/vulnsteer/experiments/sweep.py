"""Held-out steering sweeps: strengths x layer sets x methods x vector choices x positions, on items the vectors
never saw.

Protocol. Vectors are fitted per fold on the other folds' items (folds grouped by family: pair, scenario and
near-duplicate code across sources; stratified by CWE over families), or once on another dataset (`train_dataset`;
a test family that shares a family, code or near-duplicate code with it is refused, or dropped with
`drop_overlap`). Every (config, item) row is therefore held out. The baseline is strength 0 on the same prompts,
decoding and items. The "selected" config that the headline reports is chosen per outer fold f on *selection
rows*: the items of every other fold g, steered with vectors fitted without f and g (or, with `train_dataset`,
the test rows of the other folds, whose vectors never saw any test item). So neither the choice nor the
vectors behind it saw fold f, and the headline is never a maximum over the test set.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence, cast

import torch

from vulnsteer.data import Sample, filter_samples, load_dataset
from vulnsteer.engine.evaluate import make_result
from vulnsteer.errors import VulnsteerError
from vulnsteer.experiments.store import SweepStore, read_sweep, read_text
from vulnsteer.extract.activations import Activations, Read, collect
from vulnsteer.extract.lora import LoraFit, LoraTraining, fit_and_score
from vulnsteer.extract.trained import Prefix, Training, prefix_pass
from vulnsteer.extract.vectors import (
    LEARNED,
    POOLED,
    Normalisation,
    VectorBank,
    check_method,
    fit,
    parse_layers,
)
from vulnsteer.metrics import GAIN_METRICS
from vulnsteer.models import DEFAULT_MODEL, LoadedModel, ModelInfo
from vulnsteer.prompts import PROMPT_IDS, Prompt, PromptResources, build_prompt
from vulnsteer.protocol import (
    bank_id,
    check_provenance,
    held_out,
    items_sha256,
    overlapping,
    pair_folds,
    training_keys,
)
from vulnsteer.records import (
    Cache,
    Job,
    Mode,
    Positions,
    Result,
    Steering,
    SteeringId,
    VectorChoice,
    Word,
)
from vulnsteer.steering.hooks import leaves_prompt_alone
from vulnsteer.steering.reft import random_edit

BASELINE = "baseline"
# Per learned method, the hyper-parameters a config may list: (the letter in fit names, `Training` field, config key).
LEARNED_GRID: dict[str, tuple[tuple[str, str, str], ...]] = {
    "trained": (("s", "steps", "learned_steps"), ("n", "max_norm", "max_norm")),
    "loreft": (("r", "rank", "rank"), ("s", "steps", "learned_steps")),
}
SELECT_METRICS = GAIN_METRICS  # a config is chosen by any metric a gain is measured in


@dataclass(frozen=True)
class MethodFit:
    """One bank a sweep fits per training set: its name in config ids, the method, how a learned one trains."""

    name: str
    method: str
    training: Training


@dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep depends on; read from TOML (same keys) or flags."""

    model: str = DEFAULT_MODEL
    dataset: str = "demo"
    split: list[str] | None = None
    cwe: list[str] | None = None
    limit: int | None = None
    train_dataset: str | None = None  # fit vectors on this dataset and test on `dataset`; None = cross-validate
    train_split: list[str] | None = None
    max_chars: int | None = None  # drop pairs with longer code (long functions cost quadratic attention memory)
    pairs_per_cwe: int | None = None
    train_max_chars: int | None = None
    train_pairs_per_cwe: int | None = None
    drop_overlap: bool = False  # with train_dataset: drop test families that overlap it (refused otherwise)
    prompt: str = "S1"
    # The best-prompt arm: these prompts ("all": the 17 SecLLMHolmes prompts and strict) each asked of every item
    # unsteered; per fold, the one best on the other folds' items gives the arm (report: "best prompt").
    prompts: list[str] | None = None
    # > 0: the LoRA ceiling arm (peft, r=8 on q,k,v,o), fitted per fold on its training items with this many steps
    lora_steps: int = 0
    # The learned methods' hyper-parameters (`LEARNED_GRID`). Each may be a list: one fit per combination, named by
    # the values that vary ("loreft-r1", "trained-s20-n0.5"), each an arm among which nested selection chooses.
    learned_steps: int | list[int] = Training().steps  # Adam steps of a `trained`/`loreft` fit
    max_norm: float | list[float] = Training().max_norm  # a trained vector's norm bound, in mean residual norms
    rank: int | list[int] = Training().rank  # of `loreft` edits (1-8)
    kl_weight: float = Training().kl_weight  # > 0: learned fits also pay weight x KL(unsteered || steered)
    mode: Mode = Mode.SCORE
    folds: int = 4
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: ["mean-diff"])
    # The defaults are the `quick` grid (GRIDS): 12 configs spanning depth, sign, vector choice and a control.
    layers: list[str] = field(default_factory=lambda: ["rel:0.5", "rel:0.25,0.5,0.75,0.98"])
    strengths: list[float] = field(default_factory=lambda: [-1.0, 1.0])
    # own: each item's CWE vector; pooled: one vector for all CWEs; random: a control, a fixed random direction with
    # the pooled vector's norm (a gain that random steering matches is not evidence); or a CWE id for every item
    vectors: list[str] = field(default_factory=lambda: list(VectorChoice.WORDS))  # `VectorChoice` words
    # prompt-last (the original experiment's position) shares each prompt's cache across configs in score mode
    positions: list[Positions] = field(default_factory=lambda: [Positions.PROMPT_LAST])
    transfer: bool = True  # also steer every item with every CWE's vector (cross-CWE transfer matrix) ...
    transfer_layers: str | None = None  # ... at this layer set (default: the first of `layers`)
    transfer_strength: float | None = None  # ... and strength (default: the largest positive one)
    random_draws: int = 1  # random-direction controls per config: a distribution, not one lucky direction
    read: Read = Read.PROMPT_LAST
    normalisation: Normalisation = Normalisation.RESIDUAL
    select_metric: str = "balanced_accuracy"
    max_new_tokens: int = 96
    batch_tokens: int | None = None  # None: what fits in free GPU memory (8192 on CPU)
    cache: Cache = Cache.DYNAMIC  # or "static": fixed-size KV cache, decode step a CUDA-graph replay on a GPU
    dtype: str = "auto"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), str(f.type))
        for name in ("methods", "layers", "strengths", "vectors", "positions"):
            value = getattr(self, name)
            if not isinstance(value, list) or not value:
                raise VulnsteerError(f"config: {name} must be a non-empty list")
        # The words typed once: stored typed (a `Word` is still its string in asdict, JSON and TOML).
        for name, word in _WORD_FIELDS.items():
            object.__setattr__(self, name, word.parse(getattr(self, name), f"value of config key {name}"))
        object.__setattr__(
            self, "positions", [Positions.parse(p, "value of config key positions") for p in self.positions]
        )
        self.vector_choices  # noqa: B018 (parsing every word of `vectors` is the check)
        if not all(_is_number(s) and math.isfinite(s) for s in self.strengths):
            raise VulnsteerError(f"config: strengths must be finite numbers, got {self.strengths}")
        if all(s == 0 for s in self.strengths):
            raise VulnsteerError("config: every strength is 0, so nothing is steered (the baseline always runs)")
        if self.select_metric == "auroc" and self.mode != Mode.SCORE:
            raise VulnsteerError("config: select_metric auroc needs mode score (generated answers have no score)")
        for method in self.methods:
            check_method(method, "value of config key methods")
        _check_choice("prompt", [self.prompt], PROMPT_IDS)
        _check_choice("prompts", self.prompts or [], (*PROMPT_IDS, "all"))
        _check_choice("select_metric", [self.select_metric], SELECT_METRICS)
        if self.mode == Mode.SCORE and Positions.GENERATED in self.positions:
            raise VulnsteerError("config: positions 'generated' steers nothing in score mode (nothing is generated)")
        if any(m in LEARNED for m in self.methods) and not self.learned_layers:
            raise VulnsteerError(
                f"config: {', '.join(m for m in self.methods if m in LEARNED)} learn one "
                "intervention per layer, each trained alone; give a single-layer set in layers "
                f"(e.g. rel:0.5), got {'; '.join(self.layers)}"
            )
        if self.transfer_strength == 0:
            raise VulnsteerError("config: transfer_strength 0 steers nothing")
        if self.batch_tokens is not None:
            _check_integer("batch_tokens", self.batch_tokens, 1)
        _check_integer("max_new_tokens", self.max_new_tokens, 1)
        _check_integer("folds", self.folds, 2 if self.train_dataset else 3)
        _check_integer("random_draws", self.random_draws, 1)
        _check_integer("lora_steps", self.lora_steps, 0)
        for key, valid, wanted in (
            ("learned_steps", lambda v: _is_int(v) and v >= 1, "integers >= 1"),
            ("max_norm", lambda v: _is_number(v) and math.isfinite(v) and v > 0, "finite numbers > 0"),
            ("rank", lambda v: _is_int(v) and 1 <= v <= 8, "1 to 8"),
        ):
            values = _values(getattr(self, key))
            if not values or not all(map(valid, values)) or len(set(values)) < len(values):
                raise VulnsteerError(f"config: {key} must be {wanted} (or a list of distinct such), got {values}")
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise VulnsteerError(f"config: kl_weight must be a finite number >= 0, got {self.kl_weight}")
        if self.lora_steps and self.mode != Mode.SCORE:
            raise VulnsteerError("config: lora_steps needs mode score (LoRA is trained and read at the answer's score)")

    @property
    def vector_choices(self) -> list[VectorChoice]:
        return [VectorChoice.parse(v, "value of config key vectors") for v in self.vectors]

    @property
    def learned_layers(self) -> list[str]:
        """The layer sets learned methods steer: the single-layer ones. Each learned intervention is optimised alone
        at its layer, for the answer it gives there; several applied at once were never trained together."""
        return [spec for spec in self.layers if "," not in spec and spec != "all"]

    def layer_sets(self, fit: str) -> list[str]:
        """The layer sets the configs of a fit (`fits`) steer."""
        return self.learned_layers if self.fits[fit].method in LEARNED else self.layers

    @property
    def fits(self) -> dict[str, MethodFit]:
        """What each method fits, by the name its configs carry: one per method, or for a learned method one per
        combination of its listed hyper-parameters (`LEARNED_GRID`), named by the values that vary."""
        first = {attr: _values(getattr(self, key))[0] for axes in LEARNED_GRID.values() for _, attr, key in axes}
        base = Training(kl_weight=float(self.kl_weight), **first)
        out = {}
        for method in self.methods:
            axes = [(letter, attr, _values(getattr(self, key))) for letter, attr, key in LEARNED_GRID.get(method, ())]
            for combo in itertools.product(*(values for _, _, values in axes)):
                name = method + "".join(
                    f"-{letter}{value:g}" for (letter, _, values), value in zip(axes, combo) if len(values) > 1
                )
                training = replace(base, **{attr: value for (_, attr, _), value in zip(axes, combo)})
                out[name] = MethodFit(name, method, training)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "SweepConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise VulnsteerError(f"config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise VulnsteerError(f"config: {exc}") from exc


# Named grids, laid under a TOML file and flags. `quick` is SweepConfig's defaults with the learned methods beside
# mean-diff: every part of the protocol (baseline, a held-out grid, learned interventions, nested selection,
# controls, transfer, side effects, report) in minutes on a 2-core CPU. 3 folds and 20 steps: each learned method
# is fitted 6 times (every fold, every pair of folds).
# `full` is the grid of the first experiments: 3 layer sets x 4 strengths x 2 positions, 3 random draws per config.
GRIDS: dict[str, dict[str, Any]] = {
    "quick": {"methods": ["mean-diff", "trained", "loreft"], "folds": 3, "learned_steps": 20},
    "full": {
        "layers": ["rel:0.25", "rel:0.5", "rel:0.25,0.5,0.75,0.98"],
        "strengths": [-1.0, -0.5, 0.5, 1.0],
        "positions": [Positions.PROMPT_LAST, Positions.ALL],
        "random_draws": 3,
    },
}


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(read_text(path))
    except FileNotFoundError as exc:
        raise VulnsteerError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise VulnsteerError(f"{path} is not valid TOML: {exc}") from exc


# The config's one-word fields: a string in TOML, parsed in `validate` into its `Word`.
_WORD_FIELDS: dict[str, type[Word]] = {"mode": Mode, "cache": Cache, "read": Read, "normalisation": Normalisation}
_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    **{w.__name__: str for w in _WORD_FIELDS.values()},
    "int": int,
    "float": (int, float),
    "bool": bool,
    "list[str]": list,
    "list[Positions]": list,
    "list[float]": list,
    "int | list[int]": (int, list),
    "float | list[float]": (int, float, list),
}


def _check_type(name: str, value: Any, annotation: str) -> None:
    """A TOML value of the wrong type (`transfer = "no"`) is refused, not read as truthy."""
    optional = annotation.endswith(" | None")
    kind: type | tuple[type, ...] = _TYPES[annotation.removesuffix(" | None")]
    if value is None and optional:
        return
    wrong_bool = isinstance(value, bool) and kind is not bool
    if wrong_bool or not isinstance(value, kind):
        raise VulnsteerError(
            f"config: {name} must be {annotation.removesuffix(' | None')}"
            f"{' or unset' if optional else ''}, got {value!r}"
        )
    if annotation.startswith(("list[str]", "list[Positions]")) and not all(
        isinstance(v, str) for v in cast(list, value)
    ):
        raise VulnsteerError(f"config: {name} must be a list of strings, got {value!r}")


def _values(value) -> list:
    """A config value that may be one value or a list of them, as a list."""
    return value if isinstance(value, list) else [value]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_integer(name: str, value, least: int) -> None:
    if not _is_int(value) or value < least:
        raise VulnsteerError(f"config: {name} must be an integer >= {least}, got {value!r}")


def _check_choice(name: str, values: list, allowed: Sequence[str]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise VulnsteerError(f"config: {name} has unknown value(s) {bad}; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class GridPoint:
    """One steering configuration of the grid; `id` names it in the store and the report."""

    method: str
    layers: str
    vectors: VectorChoice
    positions: Positions
    strength: float

    @property
    def id(self) -> str:
        return f"{self.shape}|{self.strength:+g}"

    @property
    def shape(self) -> str:
        """The config less its strength: the points of a strength curve share it."""
        return f"{self.method}|{self.layers}|{self.vectors}|{self.positions}"

    @property
    def is_random(self) -> bool:
        return self.vectors.is_random


def transfer_point(config: SweepConfig) -> GridPoint:
    """Where the cross-CWE transfer matrix is measured (its vectors field is a placeholder)."""
    strength = config.transfer_strength
    if strength is None:
        strength = max(config.strengths, key=lambda s: (s > 0, abs(s)))
    method = next(iter(config.fits))
    return GridPoint(
        method,
        config.transfer_layers or config.layer_sets(method)[0],
        VectorChoice("own"),
        config.positions[0],
        float(strength),
    )


def path_controls(config: SweepConfig) -> list[GridPoint]:
    """Strength-0 rows at each positions value whose rows take another numeric path than the baseline's (it shares
    one pass over each prompt's tokens before the last; rows steered before that token run the whole prompt): in
    float32 they equal the baseline, in bfloat16 they measure how far the path alone moves a score."""
    first = next(iter(config.fits))
    return [
        GridPoint(first, config.layer_sets(first)[0], VectorChoice("own"), p, 0.0)
        for p in config.positions
        if not leaves_prompt_alone(Steering({}, 0.0, p))
    ]


def grid(config: SweepConfig, cwes: Sequence[str]) -> list[GridPoint]:
    """The steered configs: the full grid (learned methods at single-layer sets only; each random control as
    `random_draws` directions), plus (with
    `transfer`) each CWE's vector on every item at one point, plus the strength-0 path controls."""
    points = [
        GridPoint(m, lay, choice, p, float(s))
        for m in config.fits
        for lay in config.layer_sets(m)
        for v in config.vector_choices
        for choice in ([replace(v, draw=k) for k in range(config.random_draws)] if v.is_random else [v])
        for p in config.positions
        for s in config.strengths
        if s != 0
    ]
    if config.transfer:
        at = transfer_point(config)
        points += [replace(at, vectors=VectorChoice("cwe", cwe)) for cwe in cwes]
    return points + path_controls(config)


def points_by_id(config: SweepConfig, cwes: Sequence[str] = ()) -> dict[str, GridPoint]:
    """The sweep's grid points by config id: how a stored row's id is read back as fields, never by parsing it.
    Without `cwes`, less the transfer rows (no other point depends on the items)."""
    return {p.id: p for p in grid(config, cwes)}


def candidate_points(config: SweepConfig) -> dict[str, GridPoint]:
    """The points nested selection may choose (with the baseline), by config id."""
    return {c: p for c, p in points_by_id(config).items() if is_candidate(p, config)}


def is_candidate(point: GridPoint, config: SweepConfig) -> bool:
    """The grid's real steering configs, which nested selection may choose (with the baseline); not the random
    controls, the transfer rows or the path controls."""
    return point.vectors in config.vector_choices and not point.is_random and point.strength != 0


PROMPT_ARM = "prompt:"  # the config id of a candidate prompt's unsteered rows: "prompt:S3"
LORA = "lora"  # the config id of the LoRA ceiling's rows


def prompt_candidates(config: SweepConfig) -> list[str]:
    """The best-prompt arm's prompts other than the sweep's own (whose unsteered rows are the baseline's)."""
    asked = list(PROMPT_IDS) if "all" in (config.prompts or []) else config.prompts or []
    return [p for p in dict.fromkeys(asked) if p != config.prompt]


def candidate_prompts(
    config: SweepConfig, test: Sequence[Sample], resources: PromptResources
) -> dict[str, dict[str, Prompt]]:
    """The best-prompt arm's prompts built for every item, before anything is fitted: a named prompt the dataset
    cannot ask (it lacks the few-shot files or CWE definitions) is refused at once; with "all" it is left out."""
    built, left_out = {}, []
    for prompt in prompt_candidates(config):
        try:
            built[prompt] = {s.id: build_prompt(s, prompt, resources) for s in test}
        except VulnsteerError:
            if "all" not in (config.prompts or []):
                raise
            left_out.append(prompt)
    if left_out:
        print(
            f"best prompt: {', '.join(left_out)} left out (this dataset lacks the few-shot files or CWE "
            "definitions they need)",
            file=sys.stderr,
        )
    return built


def is_grid_config(config_id: str) -> bool:
    """A steering config of the grid (or the baseline), not another arm's rows (a candidate prompt's, LoRA's)."""
    return not config_id.startswith(PROMPT_ARM) and config_id != LORA


def arm_ids(config: SweepConfig, points: Sequence[GridPoint]) -> set[str]:
    """Every config id a sweep's test rows may be stored under."""
    return {
        BASELINE,
        *(p.id for p in points),
        *(PROMPT_ARM + p for p in prompt_candidates(config)),
        *([LORA] if config.lora_steps else []),
    }


def dataset_hash(samples: Sequence[Sample]) -> str:
    digest = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.id):
        digest.update(f"{s.id}\0{s.label}\0{s.cwe}\0{s.code}\0".encode())
    return digest.hexdigest()[:16]


Banks = dict[str, VectorBank]  # method -> bank


@dataclass
class SweepPlan:
    """What a sweep will run: test items with their fold, vector banks per fold (and per outer fold and fold for
    the selection rows), and every job, those already stored (`done`, a resumed sweep's) included: they keep the
    batches an uninterrupted run gives the rest (`engine.evaluate`)."""

    samples: list[Sample]
    fold_of: dict[str, int]
    banks: dict[int, Banks]  # fold -> the vectors that steer its test rows (fitted without it)
    selection_banks: dict[tuple[int, int], Banks]  # (outer f, fold g) -> fitted without f and g
    points: list[GridPoint]
    jobs: list[Job]
    done: frozenset[int]  # indices of `jobs` whose rows are stored
    total_rows: int
    prompt: str  # the sweep's prompt: its unsteered rows are the baseline, other prompts' the best-prompt arm's
    lora_train: dict[int, list[Sample]]  # fold -> the items LoRA is fitted on for it (empty without the arm)

    @property
    def todo(self) -> list[Job]:
        """The jobs whose rows are not stored yet."""
        return [job for k, job in enumerate(self.jobs) if k not in self.done]

    @property
    def fit_seconds(self) -> dict[str, float]:
        """Seconds spent fitting each method, over every fold's and selection pair's bank."""
        seconds: dict[str, float] = {}
        for banks in {id(b): b for b in [*self.banks.values(), *self.selection_banks.values()]}.values():
            for method, bank in banks.items():
                seconds[method] = seconds.get(method, 0.0) + bank.meta.get("fit_seconds", 0.0)
        return seconds

    @property
    def bank_keys(self) -> dict[str, set[str]]:
        """Every bank's id and the leak keys of the items it was fitted on."""
        keys = {
            bank_id(b.meta): set(b.meta["train_keys"])
            for banks in [*self.banks.values(), *self.selection_banks.values()]
            for b in banks.values()
        }
        return keys | {lora_bank(items): set(training_keys(items)) for items in self.lora_train.values()}


def provenance_rows(
    rows: Sequence[tuple[Sample, SteeringId | None]], fold_of: dict[str, int], samples: Sequence[Sample]
) -> list[tuple[Sample, str, list[Sample]]]:
    """For each steered row: its item, its bank's id, and the items its bank must not have seen (the row's fold;
    for a selection row, its outer fold's too). A steered row without a bank id is refused (an older store)."""
    members: dict[int, list[Sample]] = {}
    for s in samples:
        members.setdefault(fold_of[s.id], []).append(s)
    out = []
    for sample, label in rows:
        if label is None or label.config is None:
            continue
        if label.bank is None:
            raise VulnsteerError(
                f"the row of {sample.id} under {label.config} names no vectors: its provenance "
                "cannot be checked (a store from an older vulnsteer)"
            )
        unseen = members[fold_of[sample.id]] + (members[label.outer] if label.outer is not None else [])
        out.append((sample, label.bank, unseen))
    return out


def load_sweep_samples(config: SweepConfig) -> tuple[list[Sample], list[Sample] | None, str | None]:
    """Test items, training items (with `train_dataset`), and a note on the test families dropped because they
    overlap the training data (refused unless `drop_overlap`), so that vectors fitted on another dataset are
    held out too."""
    test = filter_samples(
        load_dataset(config.dataset), config.split, config.cwe, config.limit, config.max_chars, config.pairs_per_cwe
    )
    if not config.train_dataset:
        return test, None, None
    train = filter_samples(
        load_dataset(config.train_dataset),
        config.train_split,
        config.cwe,
        None,
        config.train_max_chars,
        config.train_pairs_per_cwe,
    )
    leaked = {s.id for s in overlapping(test, set(training_keys(train)))}
    kept = held_out(test, leaked, config.drop_overlap, f"the training data ({config.train_dataset})")
    return kept.samples, train, kept.note


def plan(
    config: SweepConfig,
    lm: LoadedModel | ModelInfo,
    test: list[Sample],
    train: list[Sample] | None,
    resources: PromptResources,
    done: set[tuple[str, str]],
    selection_done: set[tuple[int, str, str]] | frozenset = frozenset(),
    activations: Callable[[Sequence[Sample]], Activations] | None = None,
) -> SweepPlan:
    """Fit the vectors each fold needs and list the jobs, marking those `done` (test rows) or `selection_done`.
    `activations(samples)` reads the samples' activations as the sweep asks its prompts (default: `collect`, cached
    on disk, without a progress bar)."""
    if activations is None:
        if not isinstance(lm, LoadedModel):
            raise TypeError("plan() reads activations itself only from a LoadedModel")
        model = lm

        def activations(samples: Sequence[Sample]) -> Activations:
            return collect(model, samples, config.prompt, resources, config.read, mode=config.mode)

    layer_sets = {spec: parse_layers(spec, lm.num_layers) for spec in config.layers}
    needed = {m: sorted({layer for spec in config.layer_sets(m) for layer in layer_sets[spec]}) for m in config.fits}
    folds = pair_folds(test, config.folds, config.seed)
    fold_of = {test[i].id: f for f, (_, held_out) in enumerate(folds) for i in held_out}
    members = {f: [test[i] for i in held_out] for f, (_, held_out) in enumerate(folds)}
    others = candidate_prompts(config, test, resources)  # unsteered: they fit nothing; the arm's choice is nested
    selection_banks: dict[tuple[int, int], Banks] = {}
    # Learned methods train on the model's answers: each training item's prompt prefix runs once for every bank.
    learned = [name for name, f in config.fits.items() if f.method in LEARNED]  # loreft-r1, loreft-r4, ...
    # each fold, and each pair of folds for selection (outer f with inner g and outer g with inner f share one)
    training_sets = 1 if train is not None else len(members) * (len(members) + 1) // 2
    fitted = _announce_fits(learned, training_sets)
    prefix = None
    if learned and isinstance(lm, LoadedModel):
        items = train if train is not None else test
        started = time.monotonic()
        prefix = prefix_pass(lm, items, config.prompt, resources)
        print(
            f"prefix pass over {len(items)} prompts, shared by every fit: {time.monotonic() - started:.0f} s",
            flush=True,
        )
    if train is None:
        acts = activations(test)

        @functools.cache
        def fit_without(excluded: frozenset[int]) -> Banks:
            part = acts.subset(lambda s: fold_of[s.id] not in excluded)
            banks = _fit(part, lm, config, needed, prefix)
            fitted()
            for f in excluded:  # the guarantee, checked on what was fitted
                check_held_out(banks, members[f])
            return banks

        banks = {f: fit_without(frozenset({f})) for f in members}
        selection_banks = {(f, g): fit_without(frozenset({f, g})) for f in members for g in members if g != f}
    else:
        shared = _fit(activations(train), lm, config, needed, prefix)
        fitted()
        check_held_out(shared, test)
        banks = {f: shared for f in members}
    points = grid(config, sorted({s.cwe for s in test}))
    lora_train = (
        {f: train if train is not None else [s for s in test if fold_of[s.id] != f] for f in members}
        if config.lora_steps
        else {}
    )
    prompts = {s.id: build_prompt(s, config.prompt, resources) for s in test}

    def job(s: Sample, point: GridPoint, banks_: Banks, outer: int | None = None) -> Job:
        return Job(s, config.prompt, prompts[s.id], steering_for(point, s, fold_of[s.id], banks_, layer_sets, outer))

    keys = [(BASELINE, s.id) for s in test] + [(PROMPT_ARM + p, s.id) for p in others for s in test]
    jobs = [Job(s, config.prompt, prompts[s.id]) for s in test] + [
        Job(s, p, others[p][s.id]) for p in others for s in test
    ]
    keys += [(p.id, s.id) for p in points for s in test]
    jobs += [job(s, p, banks[fold_of[s.id]]) for p in points for s in test]
    stored = [key in done for key in keys]
    candidates = [p for p in points if is_candidate(p, config)]
    # A CWE absent from the folds a selection bank was fitted on has no own vector there: such rows cannot be run,
    # and a config without all of its selection rows is not chosen for that fold.
    selection = [
        (f, p, s)
        for (f, g) in selection_banks
        for p in candidates
        for s in members[g]
        if p.vectors.kind != "own" or s.cwe in selection_banks[(f, g)][p.method].groups
    ]
    jobs += [job(s, p, selection_banks[(f, fold_of[s.id])], f) for f, p, s in selection]
    stored += [(f, p.id, s.id) in selection_done for f, p, s in selection]
    sweep = SweepPlan(
        test,
        fold_of,
        banks,
        selection_banks,
        points,
        jobs,
        frozenset(k for k, is_stored in enumerate(stored) if is_stored),
        len(test) * (1 + len(points) + len(others) + bool(config.lora_steps)) + len(selection),
        config.prompt,
        lora_train,
    )
    # The guarantee, checked on the rows about to run, whatever built them: no row's vectors saw its fold.
    check_provenance(
        provenance_rows([(j.sample, j.steering.label if j.steering else None) for j in jobs], fold_of, test),
        sweep.bank_keys,
    )
    return sweep


def lora_bank(items: Sequence[Sample]) -> str:
    """The id LoRA rows name for the adapters fitted on `items` (a digest of their ids, as a vector bank's)."""
    return bank_id({"train_ids_sha256": items_sha256(items)})


def lora_rows(
    lm: LoadedModel,
    config: SweepConfig,
    sweep: SweepPlan,
    resources: PromptResources,
    done: set[tuple[str, str]],
    progress: Callable[[str, int], ContextManager[Callable[[int], None]]],
) -> Iterator[tuple[int, list[Result], LoraFit]]:
    """The LoRA ceiling: per fold with rows left, adapters fitted on that fold's training items (the other folds',
    or `train_dataset`'s) score the fold's items as score mode does; each row names the adapters' training set,
    and the rows are checked like steered rows before they are stored. Folds that share a training set (every fold,
    with `train_dataset`) share one fit, whose seconds count once. The model is restored after each fit."""
    members: dict[int, list[Sample]] = {}
    for s in sweep.samples:
        members.setdefault(sweep.fold_of[s.id], []).append(s)
    by_training_set: dict[str, list[int]] = {}
    for fold, train in sorted(sweep.lora_train.items()):
        if not all((LORA, s.id) in done for s in members[fold]):
            by_training_set.setdefault(lora_bank(train), []).append(fold)
    for bank, folds in by_training_set.items():
        train = sweep.lora_train[folds[0]]
        test = [s for fold in folds for s in members[fold]]
        print(
            f"LoRA: fitting on {len(train)} items for fold(s) {', '.join(map(str, folds))} ({config.lora_steps} steps)",
            flush=True,
        )
        # a real model's fit takes hours on a CPU: `progress(description, steps)` (the pipeline's) shows its steps
        with progress("LoRA steps", config.lora_steps) as advance:
            fit = fit_and_score(lm, train, test, config.prompt, resources, LoraTraining(config.lora_steps), advance)
        for k, fold in enumerate(folds):
            label = SteeringId(config=LORA, fold=fold, bank=bank)
            rows = [
                replace(
                    make_result(
                        Job(s, config.prompt, build_prompt(s, config.prompt, resources)),
                        "score",
                        "",
                        fit.scores[s.id],
                        fit.prompt_tokens[s.id],
                        0,
                        fit.score_seconds / len(fit.scores),  # a row's share, as the engine's score rows record
                        [],
                    ),
                    steering=label,
                )
                for s in members[fold]
            ]
            check_provenance(
                provenance_rows([(s, label) for s in members[fold]], sweep.fold_of, sweep.samples), sweep.bank_keys
            )
            yield fold, rows, fit if k == 0 else replace(fit, seconds=0.0)


def check_stored_provenance(out_dir: Path) -> int:
    """Re-verify a stored sweep's steered rows (`report --check`): each names a bank whose training items, stored
    with the run, share no family or code with the row's fold (and a selection row's outer fold). Returns the
    number of rows checked; a violation is a one-line error."""
    stored = read_sweep(out_dir)
    config = SweepConfig.from_dict(stored.meta["config"])
    if "banks" not in stored.meta:
        raise VulnsteerError(f"{out_dir} records no vector banks (a store from an older vulnsteer): nothing to check")
    test, _, _ = load_sweep_samples(config)
    by_id = {s.id: s for s in test}
    fold_of = {r.sample_id: fold for _, fold, r in stored.rows}
    missing = sorted(set(fold_of) - set(by_id))
    if missing:
        raise VulnsteerError(f"{out_dir} holds rows of items its dataset no longer has (e.g. {missing[0]})")
    rows = [(by_id[r.sample_id], r.steering) for _, _, r in stored.rows]
    rows += [(by_id[r.sample_id], r.steering) for _, _, r in stored.selection]
    checked = provenance_rows(rows, fold_of, [by_id[s] for s in fold_of])
    check_provenance(checked, {bank: set(keys) for bank, keys in stored.meta["banks"].items()})
    return len(checked)


def _announce_fits(learned: list[str], training_sets: int) -> Callable[[], None]:
    """Learned methods take a while to fit: a line per training set, with the time so far."""
    if not learned:
        return lambda: None
    print(
        f"fitting {', '.join(learned)} on {training_sets} training sets (every fold's, and for nested selection "
        "every pair of folds')",
        flush=True,
    )
    start, done = time.monotonic(), 0

    def fitted() -> None:
        nonlocal done
        done += 1
        print(f"fitted {done}/{training_sets} training sets, {time.monotonic() - start:.0f} s", flush=True)

    return fitted


def check_held_out(banks: Banks, test: Sequence[Sample]) -> None:
    """Refuse vectors whose training items share a family or (normalised) code with `test`."""
    for bank in banks.values():
        leaked = overlapping(test, set(bank.meta["train_keys"]))
        if leaked:
            raise VulnsteerError(
                f"vectors were fitted on {len(leaked)} of the items they would be tested on "
                f"(e.g. {leaked[0].id}); refusing a result that is not held out"
            )


def _fit(
    acts,
    lm: LoadedModel | ModelInfo,
    config: SweepConfig,
    layers: dict[str, list[int]],
    prefix: Prefix | None = None,
) -> Banks:
    """One bank per fit (`SweepConfig.fits`), at the layers its configs steer. Learned methods train on `prefix`
    (the plan's one prefix pass, built with the dataset's prompt resources)."""
    return {
        name: fit(acts, lm, f.method, layers[name], config.normalisation, prefix=prefix, training=f.training)
        for name, f in config.fits.items()
    }


def steering_for(
    point: GridPoint,
    sample: Sample,
    fold: int,
    banks: Banks,
    layer_sets: dict[str, list[int]],
    outer: int | None = None,
) -> Steering:
    bank = banks[point.method]
    layers = layer_sets[point.layers]
    label = SteeringId(config=point.id, fold=fold, outer=outer, bank=bank_id(bank.meta))
    positions = point.positions
    if point.is_random:
        draw = point.vectors.draw or 0
        if bank.edits:  # the pooled edit's form in a random subspace of its rank
            edits = {layer: random_edit(bank.edits[POOLED][layer], 1000 * draw + layer) for layer in layers}
            return Steering({}, point.strength, positions, label, edits=edits)
        vectors = {layer: random_direction(bank.for_group(POOLED)[layer], 1000 * draw + layer) for layer in layers}
        return Steering(vectors, point.strength, positions, label)
    group = point.vectors.group(sample.cwe)
    return bank.steering(group, layers, point.strength, positions, label)


def random_direction(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed random direction with the norm of `like`: the control that any perturbation of that size gives."""
    vector = torch.randn(like.shape, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm() * like.norm()


def config_of(result: Result, prompt: str) -> str:
    """A row's config id: its grid point; unsteered, the baseline (the sweep's `prompt`) or a candidate prompt."""
    if result.steering and result.steering.config:
        return result.steering.config
    return BASELINE if result.prompt_id == prompt else PROMPT_ARM + result.prompt_id


def store_row(store: SweepStore, sweep: SweepPlan, result: Result) -> None:
    """A test row, or (steering labelled with an outer fold) a selection row."""
    fold = sweep.fold_of[result.sample_id]
    if result.steering and result.steering.outer is not None:
        store.add_selection(result.steering.outer, config_of(result, sweep.prompt), fold, result)
    else:
        store.add(config_of(result, sweep.prompt), fold, result)


RUN_IDENTITY = (
    "model",
    "config_hash",
    "weights",
    "dtype",
    "device",
    "torch",
    "transformers",
    "dataset_hash",
    "train_dataset_hash",
    "config",
    "config_sha256",
)


def config_sha256(config: SweepConfig) -> str:
    return hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()


def load_config(path: Path | None, overrides: dict, grid: str | None = None) -> SweepConfig:
    """A config from a named grid (`grid`, else the TOML's `grid` key, else quick), then the TOML file, then the
    flags on top (flags left unset are None and do not override)."""
    base = read_toml(path) if path else {}
    base.pop("cluster", None)  # where the sweep runs, not what it is (`ClusterOptions.from_settings`)
    name = grid or base.pop("grid", None) or "quick"
    base.pop("grid", None)
    if name not in GRIDS:
        raise VulnsteerError(f"unknown grid {name!r}; known: {', '.join(GRIDS)}")
    return SweepConfig.from_dict({**GRIDS[name], **base, **{k: v for k, v in overrides.items() if v is not None}})


def config_from_store(out_dir: Path) -> SweepConfig:
    """The stored configuration of a sweep to resume; refused when it was edited after the sweep began."""
    meta = read_sweep(out_dir, with_rows=False).meta
    if "config" not in meta:
        raise VulnsteerError(f"{out_dir} has no sweep configuration to resume")
    if "config_sha256" not in meta:
        raise VulnsteerError(
            f"{out_dir} was written by an older vulnsteer without a run identity; start a new sweep in another folder"
        )
    config = SweepConfig.from_dict(meta["config"])
    if meta["config_sha256"] != config_sha256(config):
        raise VulnsteerError(
            f"{out_dir}: the stored sweep configuration was changed after the sweep began; "
            "its rows belong to another experiment, so it cannot be resumed"
        )
    return config
