"""vulnsteer: measure and steer vulnerability detection in language models.

The public API is the dozen names below; each is imported on first use, so `import vulnsteer` (and the command
line's start) stays fast. Everything else lives in its module: `vulnsteer.engine`, `vulnsteer.steering`,
`vulnsteer.extract`, `vulnsteer.experiments` and the ground floor (`data`, `prompts`, `models`, `metrics`, ...).
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": ("vulnsteer.models", "load_model"),
    "LoadedModel": ("vulnsteer.models", "LoadedModel"),
    "load_dataset": ("vulnsteer.data", "load_dataset"),
    "filter_samples": ("vulnsteer.data", "filter_samples"),
    "Sample": ("vulnsteer.data", "Sample"),
    "build_prompt": ("vulnsteer.prompts", "build_prompt"),
    "Job": ("vulnsteer.records", "Job"),
    "Decoding": ("vulnsteer.records", "Decoding"),
    "Result": ("vulnsteer.records", "Result"),
    "Steering": ("vulnsteer.records", "Steering"),
    "evaluate": ("vulnsteer.engine.evaluate", "evaluate"),
    "steer": ("vulnsteer.steering.hooks", "steer"),
    "collect_activations": ("vulnsteer.pipeline", "collect_activations"),
    "fit_vectors": ("vulnsteer.extract.vectors", "fit"),
    "summarise_results": ("vulnsteer.experiments.summary", "summarise_results"),
    "SweepConfig": ("vulnsteer.experiments.sweep", "SweepConfig"),
    "run_sweep": ("vulnsteer.pipeline", "run_sweep"),
    "run_local_eval": ("vulnsteer.pipeline", "run_local_eval"),
    "held_out_for": ("vulnsteer.pipeline", "held_out_for"),
    "save_vectors": ("vulnsteer.extract.vectors", "save"),
    "SteerWith": ("vulnsteer.pipeline", "SteerWith"),
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vulnsteer' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = getattr(import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
