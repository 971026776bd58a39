"""Where a sweep's model work runs: `LocalBackend` on a model in this process, or `cluster.RayBackend` on Ray
workers that each hold a `LocalBackend`. The sweep plans, fits and stores the same way over either."""

from __future__ import annotations

from typing import Callable, Collection, Protocol, Sequence

from vulnsteer.data import Sample
from vulnsteer.engine.evaluate import evaluate
from vulnsteer.engine.planner import auto_batch_tokens
from vulnsteer.experiments.side_effects import SideEffect, code_side_effects
from vulnsteer.extract.activations import Activations, collect
from vulnsteer.models import LoadedModel, ModelInfo
from vulnsteer.prompts import PromptResources
from vulnsteer.records import Decoding, Job, Result, Steering

Progress = Callable[[int], None]
SteeringOf = Callable[[Sample], Steering | None]


class Backend(Protocol):
    info: ModelInfo

    def local_model(self) -> LoadedModel | None:
        """The model when it is in this process (learned methods fit on it), else None."""
        ...

    def batch_tokens(self, max_new_tokens: int, shortest_prompt: int) -> int: ...

    def activations(
        self,
        samples: Sequence[Sample],
        prompt_id: str,
        resources: PromptResources,
        read: str,
        mode: str,
        progress: Progress | None = None,
    ) -> Activations: ...

    def evaluate(
        self,
        jobs: Sequence[Job],
        decoding: Decoding,
        progress: Progress | None = None,
        on_result: Callable[[Result], None] | None = None,
        done: Collection[int] = frozenset(),
    ) -> None:
        """Run `jobs` but those at the indices `done` (already stored), each row reaching `on_result`."""
        ...

    def side_effects(
        self, samples: Sequence[Sample], configs: dict[str, SteeringOf], progress: Progress | None = None
    ) -> list[SideEffect]: ...


class LocalBackend:
    """The sweep's model work on `lm`, in this process."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.info = lm.info

    def local_model(self) -> LoadedModel | None:
        return self.lm

    def batch_tokens(self, max_new_tokens: int, shortest_prompt: int) -> int:
        return auto_batch_tokens(self.lm.model, max_new_tokens, shortest_prompt)

    def activations(self, samples, prompt_id, resources, read, mode, progress=None) -> Activations:
        return collect(self.lm, samples, prompt_id, resources, read, progress=progress, mode=mode)

    def evaluate(self, jobs, decoding, progress=None, on_result=None, done=frozenset()) -> None:
        evaluate(self.lm, jobs, decoding, progress=progress, on_result=on_result, done=done)

    def side_effects(self, samples, configs, progress=None) -> list[SideEffect]:
        return code_side_effects(self.lm, samples, configs, progress=progress)
