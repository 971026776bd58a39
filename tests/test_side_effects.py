"""Side effects of steering on plain code: zero when nothing is steered, the KL and NLL a direct computation gives,
the same in a batch as alone, larger for a stronger push."""

from __future__ import annotations

import pytest
import torch
from test_evaluation import make_samples

from vulnsteer.experiments.side_effects import code_side_effects
from vulnsteer.records import Steering


def vector(lm, seed=0):
    return {1: torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(seed)) * 4}


def test_unsteered_and_strength_zero_cost_nothing(lm):
    samples = make_samples(4)
    v = vector(lm)
    effects = code_side_effects(lm, samples, {"none": lambda s: None, "zero": lambda s: Steering(v, 0.0)})
    for effect in effects:
        assert effect.kl.value == 0.0 and effect.nll_change.value == 0.0
        assert effect.items == 4 and effect.tokens > 0


def test_kl_and_nll_change_equal_a_direct_computation_on_one_item(lm):
    from vulnsteer.steering.hooks import steer

    sample = make_samples(1)[0]
    v = vector(lm, 1)
    (effect,) = code_side_effects(lm, [sample], {"s": lambda s: Steering(v, 1.5, "prompt-last")})
    ids = torch.tensor([lm.tokenizer(sample.code, add_special_tokens=False)["input_ids"][:256]])
    with torch.inference_mode():
        p = lm.model(input_ids=ids).logits.float().log_softmax(-1)[0]
        with steer(lm.model, [Steering(v, 1.5, "all")]):  # side effects steer every token, whatever the config says
            q = lm.model(input_ids=ids).logits.float().log_softmax(-1)[0]
    kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum") / len(p)
    targets = ids[0, 1:]
    nll = (-(q[:-1].gather(-1, targets[:, None]) - p[:-1].gather(-1, targets[:, None]))).mean()
    assert effect.kl.value == pytest.approx(float(kl), rel=1e-4)
    assert effect.nll_change.value == pytest.approx(float(nll), rel=1e-4, abs=1e-6)
    assert effect.kl.value > 0


def test_a_batch_of_different_lengths_gives_each_item_what_it_gives_alone(lm):
    samples = make_samples(5)
    v = vector(lm, 2)
    configs = {"s": lambda s: Steering(v, 1.0)}
    together = code_side_effects(lm, samples, configs, batch_tokens=10**6)[0]
    alone = [code_side_effects(lm, [s], configs)[0] for s in samples]
    kl_sum = sum(e.kl.value * e.tokens for e in alone)
    assert together.tokens == sum(e.tokens for e in alone)
    assert together.kl.value == pytest.approx(kl_sum / together.tokens, rel=1e-4)


def test_a_stronger_push_costs_more(lm):
    samples = make_samples(4)
    v = vector(lm, 3)
    effects = code_side_effects(
        lm, samples, {f"{s}": (lambda s_: lambda sample: Steering(v, s_))(s) for s in (0.25, 1.0, 4.0)}
    )
    kls = [e.kl.value for e in effects]
    assert kls == sorted(kls) and kls[0] < kls[-1]
    assert all(e.kl.low <= e.kl.value <= e.kl.high for e in effects)


@pytest.mark.parametrize("logits_budget", [2**26, 1])  # every config in one pass, or one config a pass
def test_configs_side_by_side_give_what_each_gives_alone(lm, monkeypatch, logits_budget):
    """The configs' rows share one pass and the layers below their first steered one with the unsteered row:
    each config's numbers are still those of its own pass."""
    from vulnsteer.experiments import side_effects

    monkeypatch.setattr(side_effects, "LOGITS_BUDGET", logits_budget)
    samples = make_samples(4)
    g = torch.Generator().manual_seed(4)
    vectors = {layer: torch.randn(lm.hidden_size, generator=g) * 4 for layer in range(lm.num_layers)}
    configs = {
        f"{layer}:{s}": (lambda layer_, s_: lambda sample: Steering({layer_: vectors[layer_]}, s_))(layer, s)
        for layer in (0, 2, 3)
        for s in (-1.0, 1.0)
    }
    together = code_side_effects(lm, samples, configs)
    for effect in together:
        (alone,) = code_side_effects(lm, samples, {effect.config: configs[effect.config]})
        assert effect.kl.value == pytest.approx(alone.kl.value, rel=1e-4) and effect.kl.value > 0
        assert effect.nll_change.value == pytest.approx(alone.nll_change.value, rel=1e-4, abs=1e-6)


def test_a_sweep_measures_the_side_effects_of_every_config_a_methods_arm_chose(tmp_path, monkeypatch):
    """Beside the selected configs' shapes, side_effects.json holds each config a method's arm chose (the methods
    table's side-effect column reads them), each with its per-item KL and token counts."""
    import json

    from conftest import tiny_lm

    from vulnsteer.experiments import analysis
    from vulnsteer.experiments.sweep import BASELINE, SweepConfig, candidate_points
    from vulnsteer.pipeline import run_sweep

    config = SweepConfig(
        dataset="demo", limit=8, folds=3, layers=["1", "0,2"], strengths=[-2.0, 2.0], mode="score", transfer=False
    )
    forced: list[str] = []
    method_arms = analysis.method_arms

    def choosing_elsewhere(a):
        """Each method's arm as nested selection gives it, but fold 0 takes a config of a shape the headline
        selection did not measure."""
        candidates = candidate_points(a.config)
        top = [s.config for s in a.stats if s.config in candidates][:1]
        shapes = {candidates[c].shape for c in [*a.selected_by_fold.values(), *top] if c != BASELINE}
        forced[:] = [next(c for c, p in candidates.items() if p.shape not in shapes)]
        arms = method_arms(a)
        return {name: analysis.MethodArm(arm.rows, {**arm.chosen, 0: forced[0]}) for name, arm in arms.items()}

    monkeypatch.setattr(analysis, "method_arms", choosing_elsewhere)
    run_sweep(config, tmp_path, lm=tiny_lm("llama"))
    effects = json.loads((tmp_path / "side_effects.json").read_text())
    by_config = {e["config"]: e for e in effects["configs"]}
    assert forced and forced[0] in by_config
    n = len(effects["sample_ids"])
    assert n == 8 and all(len(e["per_item"]["kl"]) == len(e["per_item"]["tokens"]) == n for e in by_config.values())
