"""The batching engine: `evaluate` plans each run's batches (`planner`) and runs each on its execution path
(`runners`, the static decoder in `static`), sharing work that does not depend on a row's config (`trunk`,
`prompt_pass`)."""

from vulnsteer.engine.evaluate import evaluate

__all__ = ["evaluate"]
