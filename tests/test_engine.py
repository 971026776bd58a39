"""The static-cache engine: same answers as the general hooks, and a compiled decode step that is not re-captured
when the steering changes (checked on CPU with torch.compile's eager backend, as transformers compiles on GPUs)."""

import pytest
import torch

from test_evaluation import make_jobs, make_samples
from vulnsteer.evaluation import Decoding, evaluate
from vulnsteer.steering import Steering, SteeringEngine, decoder_layers


def steerings(lm, seed):
    g = torch.Generator().manual_seed(seed)
    vectors = {layer: torch.randn(lm.hidden_size, generator=g) * 4 for layer in (1, 2)}
    return [None, Steering(vectors, 1.5, "all"), Steering({1: vectors[1]}, -2.0, "generated"),
            Steering({2: vectors[2]}, 3.0, "prompt-last"), Steering(vectors, 1.0, "prompt")]


def mixed_jobs(lm, seed=1):
    jobs = make_jobs(make_samples(5))
    return [type(job)(job.sample, job.prompt_id, job.prompt, s) for job, s in zip(jobs, steerings(lm, seed))]


def answers(results):
    return [(r.response, r.score) for r in results]


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_engine_matches_the_general_hooks(lm, mode):
    jobs = mixed_jobs(lm)
    dynamic = evaluate(lm, jobs, Decoding(mode, max_new_tokens=8, cache="dynamic"))
    static = evaluate(lm, jobs, Decoding(mode, max_new_tokens=8, cache="static"))
    assert [r.response for r in dynamic] == [r.response for r in static]
    if mode == "score":
        assert [r.score for r in static] == pytest.approx([r.score for r in dynamic], abs=1e-4)
    assert all(not layer._forward_hooks for layer in decoder_layers(lm.model)), "engine hooks left behind"


def test_engine_grows_for_a_larger_batch_and_adds_nothing_when_unsteered(lm):
    enc = lm.tokenizer(["abc", "defgh", "x"], return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    with torch.inference_mode():
        plain = lm.model(**enc).logits
        with SteeringEngine(lm.model, max_batch=1) as engine:
            engine.set_rows([None] * 3, enc["attention_mask"])
            assert torch.equal(lm.model(**enc).logits, plain)
            assert engine.delta.shape[1] == 3


def test_compiled_decode_is_not_recaptured_when_steering_changes(lm):
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    torch._dynamo.reset()
    # On CPU, the eager backend (transformers compiles decode steps on GPUs only, unless told); on a GPU,
    # transformers' own default: inductor with CUDA graphs.
    config = CompileConfig(backend="eager") if lm.device.type == "cpu" else CompileConfig()
    config._compile_all_devices = True
    lm.model.generation_config.compile_config = config
    decoding = Decoding("generate", max_new_tokens=6, cache="static", batch_tokens=10**6)
    first = evaluate(lm, mixed_jobs(lm, seed=1), decoding)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1, "the decode step was not compiled"
    second = evaluate(lm, mixed_jobs(lm, seed=2), decoding)
    assert counters["stats"]["unique_graphs"] == graphs, "new steering re-captured the compiled step"
    reference = evaluate(lm, mixed_jobs(lm, seed=2), Decoding("generate", max_new_tokens=6))
    assert answers(second) == answers(reference)
    assert answers(first) != answers(second)
    torch._dynamo.reset()


def test_plain_path_ignores_a_model_configured_to_compile(lm):
    """Hooks added after compilation would be skipped by a compiled decode step: the plain path never compiles,
    even when the model's generation config asks for a static cache and compilation."""
    from transformers.generation.configuration_utils import CompileConfig

    torch._dynamo.reset()
    config = CompileConfig(backend="eager")
    config._compile_all_devices = True
    lm.model.generation_config.compile_config = config
    lm.model.generation_config.cache_implementation = "static"
    jobs = mixed_jobs(lm)
    evaluate(lm, make_jobs(make_samples(5)), Decoding("generate", max_new_tokens=6))  # would compile, unsteered
    steered = evaluate(lm, jobs, Decoding("generate", max_new_tokens=6))
    repeated = evaluate(lm, jobs + jobs, Decoding("generate", max_new_tokens=6))  # shared prompt prefixes too
    lm.model.generation_config.cache_implementation = None
    lm.model.generation_config.compile_config = None
    assert answers(steered) == answers(evaluate(lm, jobs, Decoding("generate", max_new_tokens=6)))
    assert answers(repeated) == answers(steered) * 2
    torch._dynamo.reset()
