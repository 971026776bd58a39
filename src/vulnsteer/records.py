"""The records every layer shares: what a row of work is, how it is run, and what it gives back.

They carry no machinery: the engine runs `Job`s under a `Decoding`, steering hooks read `Steering`, stores and
reports read and write `Result`s. Types that several modules name (modes, positions, verdicts) are defined here once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Callable, Literal, Mapping, Self

from vulnsteer.data import Sample, family_of
from vulnsteer.errors import VulnsteerError
from vulnsteer.prompts import Prompt

if TYPE_CHECKING:  # records are plain data: importing them must not load torch
    import torch


class Word(StrEnum):
    """A word of a fixed vocabulary that users type (flags, TOML keys' values). `parse` is the one place each is
    validated; below the edge the typed value travels, and being a `str` it is stored (JSON, TOML, CSV) as the word."""

    @classmethod
    def parse(cls, word: str, what: str | None = None) -> Self:
        try:
            return cls(word)
        except ValueError:
            raise VulnsteerError(
                f"unknown {what or cls.__name__.lower()} {word!r}; use one of {', '.join(cls)}"
            ) from None


class Mode(Word):
    """How an item is asked: generate (parse a free answer) or score (yes/no log-odds)."""

    GENERATE = "generate"
    SCORE = "score"


class Positions(Word):
    """Where a row is steered: the prompt's last token, the whole prompt, the generated tokens, or all of them."""

    PROMPT_LAST = "prompt-last"
    PROMPT = "prompt"
    GENERATED = "generated"
    ALL = "all"

    @property
    def prompt_tokens(self) -> Literal["none", "last", "all"]:
        """Which of the prompt's tokens it steers: the one place this meaning is written (hooks, the static
        decoder's buffers and the shared prompt pass all read it here)."""
        rules: dict[str, Literal["none", "last", "all"]] = {
            "prompt-last": "last",
            "prompt": "all",
            "generated": "none",
            "all": "all",
        }
        return rules[self.value]

    @property
    def generated_tokens(self) -> bool:
        """Whether it steers the tokens generated after the prompt."""
        return self in (Positions.GENERATED, Positions.ALL)


class Cache(Word):
    """The generation cache: transformers' dynamic one, or a fixed-size static one (`Decoding.cache`)."""

    DYNAMIC = "dynamic"
    STATIC = "static"


Verdict = Literal["vulnerable", "not_vulnerable", "unknown"]
VERDICTS: tuple[Verdict, ...] = ("vulnerable", "not_vulnerable", "unknown")


@dataclass(frozen=True)
class VectorChoice:
    """Which vector steers an item: its own CWE's (own), the pooled one (pooled), a named CWE's (CWE-787), or a
    random control direction with the pooled vector's norm (random; `draw` K: the K-th direction, "random:K")."""

    kind: Literal["own", "pooled", "random", "cwe"]
    cwe: str = ""
    draw: int | None = None

    WORDS = ("own", "pooled", "random")  # beside a CWE id

    @classmethod
    def parse(cls, word: str | VectorChoice, what: str = "vectors", random: bool = True) -> VectorChoice:
        """A user's word; `random=False` where no control can be asked for (`eval --cwe-vector`)."""
        allowed = [w for w in cls.WORDS if random or w != "random"]
        if isinstance(word, VectorChoice) and (random or not word.is_random):
            return word
        if isinstance(word, str) and word.startswith("CWE-"):
            return cls("cwe", word)
        if word in allowed:
            return cls(word)  # type: ignore[arg-type]
        raise VulnsteerError(f"unknown {what} {word!r}; use one of {', '.join(allowed)} or a CWE id like CWE-787")

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def group(self, cwe: str) -> str:
        """The vector file's group that steers an item of `cwe` (not for a random control)."""
        return {"own": cwe, "pooled": "pooled", "cwe": self.cwe}[self.kind]

    def __str__(self) -> str:
        if self.kind == "cwe":
            return self.cwe
        return self.kind if self.draw is None else f"{self.kind}:{self.draw}"


@dataclass(frozen=True)
class SteeringId:
    """What a row's steering was, as result files record it (fields left None are not written).

    A sweep row names its grid point (`config`), the fold it was tested in and, for a selection row, the outer
    fold whose choice it informs; a steered `eval` row names the vectors, layers, strength, positions and method.
    """

    config: str | None = None
    fold: int | None = None
    outer: int | None = None
    vectors: str | None = None
    layers: list[int] | None = None
    strength: float | None = None
    positions: str | None = None
    method: str | None = None
    bank: str | None = None  # a sweep row: the id of the vectors that steered it (`protocol.bank_id`)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, values: dict | None) -> SteeringId | None:
        if values is None:
            return None
        known = {f.name for f in fields(cls)}
        if not set(values) <= known:
            raise VulnsteerError(f"unknown steering fields {sorted(set(values) - known)}")
        return cls(**values)


Edit = Callable[["torch.Tensor"], "torch.Tensor"]  # hidden states [..., hidden] -> what to add to them


@dataclass(frozen=True)
class Steering:
    """What one row gets: at each layer, `strength * vectors[layer]` added at the chosen positions, and
    `strength * edits[layer](h)` for learned edits that depend on the hidden state h (LoReFT)."""

    vectors: dict[int, torch.Tensor]
    strength: float
    positions: Positions = Positions.ALL
    label: SteeringId | None = field(default=None, compare=False)  # what to record in result files
    edits: Mapping[int, Edit] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "positions", Positions.parse(self.positions))

    @property
    def steered_layers(self) -> set[int]:
        """The layers this row changes (none at strength 0)."""
        return set(self.vectors) | set(self.edits) if self.strength != 0 else set()

    @property
    def leaves_prompt_alone(self) -> bool:
        """Whether the prompt before its last token is unsteered: rows of one prompt that are can share that pass."""
        return self.positions.prompt_tokens != "all"


@dataclass(frozen=True)
class Job:
    """One row of work: a sample asked with a prompt, optionally steered."""

    sample: Sample
    prompt_id: str
    prompt: Prompt
    steering: Steering | None = None


@dataclass(frozen=True)
class Decoding:
    """Settings shared by every row of a run, recorded in summary.json."""

    mode: Mode = Mode.GENERATE
    max_new_tokens: int = 192
    # Prompt tokens per batch (rows x padded width); bounds memory. None: as many as fit (`auto_batch_tokens`).
    batch_tokens: int | None = None
    # "dynamic": transformers' `generate`, steering by `steer()` hooks per batch. "static": `StaticDecoder`, a
    # fixed-size cache and a persistent `SteeringEngine`, so that on a GPU a decode step is one CUDA-graph replay.
    cache: Cache = Cache.DYNAMIC
    # Generating: after the free answer, a forced final yes/no turn scored by log-odds (`Result.final_verdict`).
    final_answer: bool = True

    def __post_init__(self):
        object.__setattr__(self, "mode", Mode.parse(self.mode))
        object.__setattr__(self, "cache", Cache.parse(self.cache))
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise VulnsteerError(f"--batch-tokens must be at least 1, got {self.batch_tokens}")


@dataclass
class Result:
    """One line of samples.jsonl."""

    sample_id: str
    pair_id: str
    cwe: str
    label: str
    split: str
    source: str
    prompt_id: str
    mode: str
    response: str
    verdict: str
    score: float | None
    prompt_tokens: int
    new_tokens: int
    seconds: float  # the batch's wall time divided by its rows
    steering: SteeringId | None = None
    turns: list[str] = field(default_factory=list)  # earlier replies of multi-turn prompts
    final_score: float | None = None  # generate mode: log-odds of yes in the forced final yes/no turn
    final_verdict: str | None = None  # ... and its verdict (> 0: vulnerable), beside the parsed one

    @property
    def family(self) -> str:
        """The pair with its augmented copies: one cluster for bootstrap intervals."""
        return family_of(self.source, self.split, self.sample_id, self.pair_id)

    @property
    def is_vulnerable(self) -> bool:
        return self.label == "vulnerable"

    @property
    def correct(self) -> bool:
        """The verdict matches the ground truth; "unknown" is never correct."""
        return self.verdict != "unknown" and (self.verdict == "vulnerable") == self.is_vulnerable

    def to_dict(self) -> dict:
        return {**asdict(self), "steering": self.steering.to_dict() if self.steering else None}

    @classmethod
    def from_dict(cls, values: dict) -> Result:
        """A stored row; a score that is not a finite number (or absent) is refused, never read as a verdict."""
        for name in ("score", "final_score"):
            value = values.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                raise VulnsteerError(f"{name} must be a finite number or null, got {value!r}")
        return cls(**{**values, "steering": SteeringId.from_dict(values.get("steering"))})
