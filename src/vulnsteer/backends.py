"""Model kinds, chosen by the `--model` prefix: `hf:` (the default: a catalogue name, a .gguf file, a model folder or
a hub id, run in this process by transformers) and `openai:NAME` (an OpenAI-compatible endpoint). Each kind is a
`Backend`, registered under its prefix with `@register_backend`, that states what it can do as `Capabilities`; a
command that needs what a backend lacks is refused by `require`, the one check, before anything loads.

Backend-only settings come as one `--model-args "k=v,k2=v2"` string (as lm-evaluation-harness takes them), parsed
once by `parse_model_args`; each backend names the keys it takes and how to read them (`Backend.options`), and an
unknown key is refused with that list. Backends from other packages register through the `vulnsteer.backends` entry
point group (docs/extending.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence

from vulnsteer.errors import VulnsteerError
from vulnsteer.records import Decoding, Job, Result

Progress = Callable[[int], None]
OnResult = Callable[[Result], None]
DEFAULT = "hf"
PLUGINS = "vulnsteer.backends"  # the entry point group of backends from other packages


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. `hidden_states` and `steers` promise that its loaded model is a `LoadedModel` (the
    activation reads and steering hooks run on it)."""

    scores: bool = False  # --mode score: yes/no log-odds
    generates: bool = False  # --mode generate: a free answer, parsed
    hidden_states: bool = False  # extract, probe, --judge-model
    steers: bool = False  # eval --vectors, sweep, run


# How a refusal names what was asked for, per capability.
ASKED_FOR = {
    "scores": "score (--mode score)",
    "generates": "generate (--mode generate)",
    "hidden_states": "give hidden states (extract, probe, --judge-model)",
    "steers": "steer (--vectors, sweep, run)",
}
MODE_NEEDS = {"score": "scores", "generate": "generates"}  # what each --mode asks of a backend


class Backend(Protocol):
    """A kind of model: how to load one from the name after the prefix, and how to answer jobs on it."""

    capabilities: Capabilities
    about: str  # why it lacks what it lacks, for refusals (e.g. "it is served over HTTP, without hidden states")
    options: Mapping[str, Callable[[str], Any]]  # the --model-args keys it takes, each with how to read its value

    def load(self, name: str, options: Mapping[str, Any], mode: str) -> Any:
        """The model `name`, given its options (read already, only keys it takes) and the mode it will run in."""
        ...

    def evaluate(
        self,
        model: Any,
        jobs: Sequence[Job],
        decoding: Decoding,
        progress: Progress | None = None,
        on_result: OnResult | None = None,
        done: Collection[int] = frozenset(),
    ) -> list[Result]:
        """Rows of every job but those at the indices `done` (stored already), each given to `on_result`."""
        ...

    def meta(self, model: Any) -> dict:
        """What identifies the model in result files (never a key)."""
        ...


BACKENDS: dict[str, Backend] = {}


def register_backend(prefix: str) -> Callable[[type], type]:
    """Class decorator: `--model PREFIX:NAME` loads NAME with (an instance of) this class."""

    def register(cls: type) -> type:
        BACKENDS[prefix] = cls()
        return cls

    return register


@dataclass(frozen=True)
class Model:
    """A loaded model and the backend that runs it."""

    spec: str
    backend: Backend
    handle: Any  # what the backend loaded: a `LoadedModel` for hf

    def evaluate(
        self,
        jobs: Sequence[Job],
        decoding: Decoding,
        progress: Progress | None = None,
        on_result: OnResult | None = None,
        done: Collection[int] = frozenset(),
    ) -> list[Result]:
        if any(job.steering for job in jobs):
            require(self.spec, "steers")
        return self.backend.evaluate(self.handle, jobs, decoding, progress, on_result, done)

    @property
    def meta(self) -> dict:
        return self.backend.meta(self.handle)


def _load_plugins() -> None:
    """Import the backends other packages declare (their decorators register them)."""
    for entry in entry_points(group=PLUGINS):
        if entry.name not in BACKENDS:
            entry.load()


def backend_for(spec: str) -> tuple[Backend, str]:
    """The backend a `--model` spec names and the name it loads. No known prefix: hf, so catalogue names, paths
    and hub ids (which hold a "/", never a ":") keep working; an unknown word before a ":" is refused."""
    prefix, colon, name = spec.partition(":")
    if colon and prefix not in BACKENDS:
        _load_plugins()
    if colon and prefix in BACKENDS:
        return BACKENDS[prefix], name
    if colon and re.fullmatch(r"[A-Za-z][\w.-]*", prefix) and not Path(spec).exists():
        known = ", ".join(f"{p}:" for p in sorted(BACKENDS))
        raise VulnsteerError(
            f"unknown model prefix {prefix + ':'!r} in {spec!r}; known prefixes: {known} (none: "
            f"{DEFAULT}, a catalogue name, .gguf file, model folder or hub id)"
        )
    return BACKENDS[DEFAULT], spec


def require(spec: str, *needs: str) -> tuple[Backend, str]:
    """The one capability check: `spec`'s backend and name, or a refusal naming the first capability it lacks."""
    backend, name = backend_for(spec)
    for need in needs:
        if not getattr(backend.capabilities, need):
            raise VulnsteerError(f"{spec} cannot {ASKED_FOR[need]}: {backend.about}")
    return backend, name


def load(
    spec: str, options: Mapping[str, str] | None = None, mode: str = "score", needs: Collection[str] = ()
) -> Model:
    """Load `spec` with its backend, refused first if it lacks any of `needs` or is given an option it does not
    take."""
    backend, name = require(spec, *needs)
    return Model(spec, backend, backend.load(name, read_options(spec, backend, options or {}), mode))


def parse_model_args(text: str | None) -> dict[str, str]:
    """`--model-args "k=v,k2=v2"` as a dict (a value keeps any "=" after the first)."""
    options: dict[str, str] = {}
    for item in (text or "").split(","):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not item.strip():
            continue
        if not equals or not re.fullmatch(r"[A-Za-z_]\w*", key) or key in options:
            raise VulnsteerError(
                f"--model-args takes key=value pairs separated by commas, each key once, "
                f"e.g. base_url=http://127.0.0.1:8080/v1,concurrency=4; got {item.strip()!r}"
            )
        options[key] = value.strip()
    return options


def merge_options(flags: Mapping[str, object], model_args: Mapping[str, str]) -> dict[str, str]:
    """The options of flags given (not None) and of `--model-args`, refused when one key comes both ways."""
    given = {key: str(value) for key, value in flags.items() if value is not None}
    twice = sorted(set(given) & set(model_args))
    if twice:
        raise VulnsteerError(f"{twice[0]} is given by --{twice[0].replace('_', '-')} and by --model-args; give it once")
    return {**given, **model_args}


def read_options(spec: str, backend: Backend, options: Mapping[str, str]) -> dict[str, Any]:
    """`options` read as `backend` reads them; a key it does not take is refused with the ones it does."""
    read = {}
    for key, value in options.items():
        if key not in backend.options:
            elsewhere = sorted(f"{p}:" for p, other in BACKENDS.items() if key in other.options)
            hint = f"; {key} is an option of {', '.join(elsewhere)}" if elsewhere else ""
            raise VulnsteerError(f"{spec} takes no option {key!r} (its options: {', '.join(backend.options)})" + hint)
        try:
            read[key] = backend.options[key](value)
        except ValueError as exc:
            raise VulnsteerError(f"{spec}: option {key}={value!r} is not valid ({exc})") from exc
    return read


# --- the built-in backends -----------------------------------------------------------------------------------------


@register_backend("hf")
class HfBackend:
    """Weights in this process (transformers): everything, steering included."""

    capabilities = Capabilities(scores=True, generates=True, hidden_states=True, steers=True)
    about = "it runs in this process"
    options: Mapping[str, Callable[[str], Any]] = {"dtype": str, "device": str}  # as --dtype and --device

    def load(self, name: str, options: Mapping[str, Any], mode: str) -> Any:
        from vulnsteer.models import default_device, load_model, resolve_dtype

        device = options.get("device") or default_device()
        return load_model(name, dtype=resolve_dtype(options.get("dtype", "auto"), mode, device), device=device)

    def evaluate(self, model, jobs, decoding, progress=None, on_result=None, done=frozenset()) -> list[Result]:
        from vulnsteer.engine.evaluate import evaluate

        return evaluate(model, jobs, decoding, progress=progress, on_result=on_result, done=done)

    def meta(self, model) -> dict:
        return {
            "model": model.model_id,
            "config_hash": model.config_hash,
            "weights": model.fingerprint,
            "dtype": str(model.model.dtype),
        }


@register_backend("openai")
class OpenAIBackend:
    """An OpenAI-compatible endpoint (`engine.api`): answers and yes/no log-probabilities over HTTP."""

    capabilities = Capabilities(scores=True, generates=True)
    about = "it is served over HTTP, without hidden states: only `eval` (unsteered) can use it"
    options: Mapping[str, Callable[[str], Any]] = {
        "base_url": str,
        "api_key_env": str,
        "concurrency": int,
        "timeout": float,
        "retries": int,
    }

    def load(self, name: str, options: Mapping[str, Any], mode: str) -> Any:
        from vulnsteer.engine.api import ApiModel

        return ApiModel(name, **options)

    def evaluate(self, model, jobs, decoding, progress=None, on_result=None, done=frozenset()) -> list[Result]:
        from vulnsteer.engine.api import evaluate_api

        todo = [job for k, job in enumerate(jobs) if k not in done]
        return evaluate_api(model, todo, decoding, progress=progress, on_result=on_result)

    def meta(self, model) -> dict:
        return model.meta
