"""Learned interventions: trained steering vectors (`--method trained`) and LoReFT edits (`--method loreft`). The
cached-prefix gradient is the full pass's; training moves the answer as its loss asks (vectors within their norm
bound); LoReFT computes the paper's formula and can read a label that a fixed vector cannot; both reach files,
sweeps and the held-out checks."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from conftest import ONE_CONFIG_SWEEP
from test_evaluation import make_samples

from vulnsteer.data import filter_samples, load_demo
from vulnsteer.engine.runners import answer_token_ids, encode
from vulnsteer.errors import VulnsteerError
from vulnsteer.extract.activations import collect
from vulnsteer.extract.trained import (
    Training,
    answer_log_odds,
    log_odds,
    next_token_logprobs,
    prefix_pass,
    score_text,
    train_edits,
    train_vectors,
)
from vulnsteer.extract.vectors import POOLED, fit
from vulnsteer.prompts import PromptResources
from vulnsteer.records import Steering
from vulnsteer.steering.hooks import steer
from vulnsteer.steering.reft import LowRankEdit


def full_pass_log_odds(lm, samples, row: Steering):
    """The plain way: every prompt in full, steered at its last token by `row`."""
    encoded = encode(lm, [score_text(lm, s, "S1", None) for s in samples])
    mask = encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with steer(lm.model, [row] * len(samples), mask):
        logits = lm.model(**encoded, position_ids=positions).logits[:, -1]
    yes, no = answer_token_ids(lm.tokenizer)
    logp = logits.float().log_softmax(-1)
    return logp[:, yes].logsumexp(-1) - logp[:, no].logsumexp(-1)


def sharpen(lm, factor: float = 8.0):
    """Random weights attend almost uniformly, so positions barely matter; larger query and key weights make
    attention sharp, so that a position or mask error shows in the scores."""
    with torch.no_grad():
        for name, parameter in lm.model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(factor)
    return lm


@pytest.mark.parametrize("kind", ["vector", "loreft"])
def test_the_cached_prefix_gives_the_full_pass_scores_and_gradient(lm, kind):
    """Float32: scores within 1e-5, the gradient of the cross-entropy within 1e-4 relative, on prompts of different
    lengths (left padding), at two layers, for a steering vector and for a LoReFT edit."""
    sharpen(lm)
    samples = make_samples(4)
    labels = torch.tensor([float(s.is_vulnerable) for s in samples])
    prefix = prefix_pass(lm, samples)
    for layer in (1, lm.num_layers - 1):
        generator = torch.Generator().manual_seed(layer)
        if kind == "vector":
            vector = (torch.randn(lm.hidden_size, generator=generator) * 2).requires_grad_()
            row, parameter = Steering({layer: vector}, 1.0, "prompt-last"), vector
        else:
            edit = LowRankEdit(lm.hidden_size, 2, generator)
            with torch.no_grad():
                edit.learned.weight.normal_(generator=generator)
            row, parameter = Steering({}, 1.0, "prompt-last", edits={layer: edit}), edit.learned.weight
        full = full_pass_log_odds(lm, samples, row)
        (full_grad,) = torch.autograd.grad(
            torch.nn.functional.binary_cross_entropy_with_logits(full, labels), parameter
        )
        cached = answer_log_odds(lm, prefix, [[row]] * len(samples))[:, 0]
        (cached_grad,) = torch.autograd.grad(
            torch.nn.functional.binary_cross_entropy_with_logits(cached, labels), parameter
        )
        assert (cached - full).abs().max() < 1e-5
        assert torch.allclose(cached_grad, full_grad, rtol=1e-4, atol=1e-6) and full_grad.norm() > 0
    length = prefix.cache.get_seq_length()
    answer_log_odds(lm, prefix, [[None, None]] * len(samples))
    assert prefix.cache.get_seq_length() == length  # the copies' keys were dropped again


def test_training_moves_the_answer_as_asked_within_the_norm_bound(lm):
    """Every item labelled vulnerable: the trained pooled vector must raise the log-odds of yes on them, and stay
    within max_norm residual norms."""
    samples = [replace(s, label="vulnerable") for s in make_samples(6)]
    prefix = prefix_pass(lm, samples)
    norms = {1: 3.0, 2: 3.0}
    settings = Training(steps=25, learning_rate=0.1, max_norm=0.5)
    vectors = train_vectors(lm, prefix, samples, [POOLED], [1, 2], norms, POOLED, settings)
    with torch.no_grad():
        before = answer_log_odds(lm, prefix, [[None]] * len(samples))[:, 0]
        for layer in (1, 2):
            after = answer_log_odds(lm, prefix, [[Steering({layer: vectors[POOLED][layer]}, 1.0)]] * len(samples))
            assert after[:, 0].mean() > before.mean() + 0.1, (layer, before, after)
            assert vectors[POOLED][layer].norm() <= 0.5 * norms[layer] + 1e-4


def test_a_heavy_kl_penalty_keeps_the_trained_vector_close_to_the_unsteered_model(lm):
    """kl_weight x KL(unsteered || steered) at the steered token: with a large weight the fitted vector moves the
    next-token distribution and the answer's log-odds less than the same fit without it."""
    samples = [replace(s, label="vulnerable") for s in make_samples(6)]
    prefix = prefix_pass(lm, samples)
    norms = {2: 3.0}
    with torch.no_grad():
        before = next_token_logprobs(lm, prefix, [[None]] * len(samples))[:, 0]
    moved = {}
    for weight in (0.0, 100.0):
        settings = Training(steps=25, learning_rate=0.1, max_norm=0.5, kl_weight=weight)
        vector = train_vectors(lm, prefix, samples, [POOLED], [2], norms, POOLED, settings)[POOLED][2]
        with torch.no_grad():
            after = next_token_logprobs(lm, prefix, [[Steering({2: vector}, 1.0)]] * len(samples))[:, 0]
        kl = float((before.exp() * (before - after)).sum(-1).mean())
        moved[weight] = (kl, float((log_odds(lm, after) - log_odds(lm, before)).mean()))
    assert moved[0.0][1] > 0.1  # without the penalty the answer moves as asked
    assert moved[100.0][0] < 0.5 * moved[0.0][0] and moved[100.0][1] < moved[0.0][1], moved


def test_training_refuses_a_prefix_holding_other_items_than_its_training_items(lm):
    """The fold's test items must not reach the loss: the held-out check reads the bank's training items, so the
    prefix the vectors train on must hold exactly those."""
    train, test = make_samples(6), make_samples(8)[6:]
    wider = prefix_pass(lm, [*train, *test])
    with pytest.raises(VulnsteerError, match="other items than the training items"):
        train_vectors(lm, wider, train, [POOLED], [1], {1: 1.0}, POOLED, Training(steps=1))
    train_vectors(lm, wider.select([s.id for s in train]), train, [POOLED], [1], {1: 1.0}, POOLED, Training(steps=1))


def test_fit_trains_per_cwe_and_pooled_and_records_how(lm):
    samples = make_samples(8)
    acts = collect(lm, samples, "S1", PromptResources(), mode="score")
    bank = fit(acts, lm, "trained", [1, 2], training=Training(steps=3))
    assert set(bank.groups) == {POOLED, *{s.cwe for s in samples}}
    assert bank.meta["method"] == "trained" and bank.meta["training"]["steps"] == 3
    assert all(set(by_layer) == {1, 2} for by_layer in bank.vectors.values())
    # The same bank from a prefix of more items, selected down to the training items (as the sweep reuses one).
    wider = prefix_pass(lm, make_samples(10))
    again = fit(acts, lm, "trained", [1, 2], training=Training(steps=3), prefix=wider)
    for group, by_layer in bank.vectors.items():
        for layer, vector in by_layer.items():
            cosine = torch.nn.functional.cosine_similarity(vector, again.vectors[group][layer], dim=0)
            assert cosine > 0.95  # equal up to the float noise of another padding width


def test_a_sweep_runs_learned_interventions_beside_mean_diff_held_out(tmp_path, monkeypatch):
    """`methods = ["mean-diff", "trained", "loreft"]`: one prefix pass serves every fold's training; every bank,
    learned ones included, passes the held-out check on its fold; the learned configs and their random controls
    have their rows and reach the report."""
    from vulnsteer.experiments import sweep as sweep_module
    from vulnsteer.experiments.analysis import analyse
    from vulnsteer.experiments.sweep import SweepConfig
    from vulnsteer.models import random_model
    from vulnsteer.pipeline import run_sweep

    checked: list[str] = []
    steps: set[tuple] = set()
    check = sweep_module.check_held_out

    def counting(banks, test):
        checked.extend(bank.meta["method"] for bank in banks.values())
        steps.update(
            (t["steps"], t["rank"], t["kl_weight"])
            for t in (bank.meta["training"] for bank in banks.values() if "training" in bank.meta)
        )
        check(banks, test)

    passes = []
    prefix_pass_ = sweep_module.prefix_pass
    monkeypatch.setattr(sweep_module, "check_held_out", counting)
    monkeypatch.setattr(sweep_module, "prefix_pass", lambda *a, **k: passes.append(1) or prefix_pass_(*a, **k))
    config = SweepConfig(
        dataset="demo",
        limit=8,
        folds=3,
        layers=["1"],
        strengths=[-1.0, 1.0],
        mode="score",
        methods=["mean-diff", "trained", "loreft"],
        vectors=["pooled", "random"],
        transfer=False,
        learned_steps=3,
        rank=2,
        kl_weight=0.5,
    )
    report = run_sweep(config, tmp_path, lm=random_model("llama")).report.html
    assert len(passes) == 1
    assert steps == {(3, 2, 0.5)}  # learned_steps, rank and kl_weight reach every learned fit
    assert checked.count("trained") == checked.count("loreft") == checked.count("mean-diff") > 0
    a = analyse(tmp_path)
    for method in ("trained", "loreft"):
        arms = [c for c in a.arms if c.startswith(f"{method}|")]
        assert len(arms) == 4 and all(len(a.arms[c]) == len(a.sample_ids) for c in arms)  # pooled, random x 2
    random_rows = {r.sample_id: r.score for r in a.arms["loreft|1|random:0|prompt-last|+1"]}
    learned_rows = {r.sample_id: r.score for r in a.arms["loreft|1|pooled|prompt-last|+1"]}
    assert random_rows != learned_rows  # the control is another edit
    text = (tmp_path / "report.md").read_text()
    assert report.exists()  # (the top-configs table lists 15 of the configs by gain: the methods table below has all)
    # The methods side by side: each row's arm chosen among its own method's configs only.
    from vulnsteer.experiments.analysis import method_arms

    table = text.split("## Methods side by side")[1].split("\n## ")[0]
    header, *body = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
    kl = {cells[0].removeprefix("| "): cells[header.index("side-effect KL")] for cells in body}
    assert kl["baseline (the prompt alone)"] == "0"
    for method, arm in method_arms(a).items():
        assert f"| {method} (nested selection among its configs) |" in table
        assert {r.steering.config.split("|")[0] for r in arm.rows if r.steering} <= {method}
        # every config a method's arm chose had its side effects measured
        assert re.fullmatch(r"\d\.\d{3} \[\d\.\d\d,\d\.\d\d\]", kl[f"{method} (nested selection among its configs)"])
    assert set(a.meta["fit_seconds"]) == {"mean-diff", "trained", "loreft"}


def test_several_ranks_make_one_loreft_arm_each_chosen_among_by_nested_selection(tmp_path, monkeypatch, capsys):
    """`rank = [1, 2]`: one loreft fit per rank (its bank stores that rank), each with its own configs and row in
    the methods table; nested selection sees both as candidates like any configs."""
    from vulnsteer.experiments import sweep as sweep_module
    from vulnsteer.experiments.analysis import analyse, nested_selection
    from vulnsteer.experiments.sweep import SweepConfig, candidate_points
    from vulnsteer.models import random_model
    from vulnsteer.pipeline import run_sweep

    ranks_fitted = []
    fit_ = sweep_module.fit
    monkeypatch.setattr(
        sweep_module,
        "fit",
        lambda acts, lm, method, *a, **k: (
            ranks_fitted.append((method, k["training"].rank)) or fit_(acts, lm, method, *a, **k)
        ),
    )

    with pytest.raises(VulnsteerError, match="rank must be 1 to 8"):
        SweepConfig(methods=["loreft"], layers=["1"], rank=[1, 9])
    config = SweepConfig(**{**ONE_CONFIG_SWEEP, "methods": ["mean-diff", "loreft"], "learned_steps": 2, "rank": [1, 2]})
    assert {n: (f.method, f.training.rank) for n, f in config.fits.items()} == {
        "mean-diff": ("mean-diff", 1),
        "loreft-r1": ("loreft", 1),
        "loreft-r2": ("loreft", 2),
    }
    run_sweep(config, tmp_path, lm=random_model("llama"))
    assert "fitting loreft-r1, loreft-r2 on 6 training sets" in capsys.readouterr().out
    a = analyse(tmp_path)
    assert {c.split("|")[0] for c in a.arms if c.startswith("loreft")} == {"loreft-r1", "loreft-r2"}
    assert {r for m, r in ranks_fitted if m == "loreft"} == {1, 2}  # each training set: one fit per rank
    assert ranks_fitted.count(("loreft", 1)) == ranks_fitted.count(("loreft", 2)) == 6  # 3 folds + 3 pairs
    edits = {c: [r.score for r in rows] for c, rows in a.arms.items() if c.startswith("loreft")}
    assert edits["loreft-r1|1|pooled|prompt-last|+1"] != edits["loreft-r2|1|pooled|prompt-last|+1"]
    candidates = [c for c in a.arms if c in candidate_points(config)]
    assert {c.split("|")[0] for c in candidates} == {"mean-diff", "loreft-r1", "loreft-r2"}
    nested_selection(a.arms, a.sample_ids, a.folds, a.config, a.selection)  # every candidate had selection rows
    table = (tmp_path / "report.md").read_text().split("## Methods side by side")[1].split("\n## ")[0]
    assert "| loreft-r1 (nested selection among its configs) | 2rd + r (r = 1) per layer" in table
    assert "| loreft-r2 (nested selection among its configs) | 2rd + r (r = 2) per layer" in table
    assert set(a.meta["fit_seconds"]) == {"mean-diff", "loreft-r1", "loreft-r2"}


def test_norm_bounds_and_step_counts_make_one_trained_arm_each_fitted_at_its_own_values(tmp_path, monkeypatch):
    """`max_norm = [0.25, 1]`, `learned_steps = [1, 3]`: every training set gets one trained fit per combination, each
    with its own bound and steps (the vector's norm stays within its bound), each an arm of nested selection."""
    from vulnsteer.experiments import sweep as sweep_module
    from vulnsteer.experiments.analysis import analyse
    from vulnsteer.experiments.sweep import SweepConfig, candidate_points
    from vulnsteer.models import random_model
    from vulnsteer.pipeline import run_sweep

    fitted: list[tuple[int, float, float]] = []  # (steps, bound, the largest fitted norm in mean residual norms)
    fit_ = sweep_module.fit

    def recording_fit(acts, lm, method, *args, **kwargs):
        bank = fit_(acts, lm, method, *args, **kwargs)
        unit = {layer: acts.by_layer[layer].norm(dim=1).mean().item() for layer in acts.by_layer}  # as `fit` does
        norms = [v.norm().item() / unit[layer] for layer, v in bank.for_group("pooled").items()]
        fitted.append((kwargs["training"].steps, kwargs["training"].max_norm, max(norms)))
        return bank

    monkeypatch.setattr(sweep_module, "fit", recording_fit)
    config = SweepConfig(
        **{**ONE_CONFIG_SWEEP, "methods": ["trained"], "learned_steps": [1, 3], "max_norm": [0.25, 1.0]}
    )
    run_sweep(config, tmp_path, lm=random_model("llama"))
    assert sorted({(steps, bound) for steps, bound, _ in fitted}) == [(1, 0.25), (1, 1.0), (3, 0.25), (3, 1.0)]
    assert len(fitted) == 4 * 6  # 3 folds + 3 pairs of folds, each with every combination
    assert all(norm <= bound * (1 + 1e-4) for _, bound, norm in fitted)
    a = analyse(tmp_path)
    names = {"trained-s1-n0.25", "trained-s1-n1", "trained-s3-n0.25", "trained-s3-n1"}
    assert {c.split("|")[0] for c in a.arms if c in candidate_points(config)} == names
    assert set(a.meta["fit_seconds"]) == names


def test_with_a_training_dataset_a_learned_method_is_fitted_once_over_one_prefix_pass_of_its_items(
    tmp_path, monkeypatch, capsys
):
    """`train_dataset`: every fold shares one fit (one training set announced), trained over one prefix pass of the
    training dataset's items, not the test items'."""
    from conftest import write_jsonl_dataset

    from vulnsteer.experiments import sweep as sweep_module
    from vulnsteer.experiments.sweep import SweepConfig
    from vulnsteer.extract import vectors as vectors_module
    from vulnsteer.models import random_model
    from vulnsteer.pipeline import run_sweep

    items = load_demo()[16:24]
    train = write_jsonl_dataset(tmp_path / "train.jsonl", items)
    passes: list[list[str]] = []
    for module in (sweep_module, vectors_module):
        monkeypatch.setattr(
            module,
            "prefix_pass",
            lambda lm, samples, *a, _f=module.prefix_pass, **k: (
                passes.append(sorted(s.id for s in samples)) or _f(lm, samples, *a, **k)
            ),
        )
    config = SweepConfig(
        **{
            **ONE_CONFIG_SWEEP,
            "train_dataset": str(train),
            "drop_overlap": True,
            "folds": 2,
            "methods": ["trained"],
            "learned_steps": 1,
        }
    )
    run_sweep(config, tmp_path / "run", lm=random_model("llama"))
    out = capsys.readouterr().out
    assert "fitting trained on 1 training sets" in out
    seconds = re.search(r"prefix pass over 8 prompts, shared by every fit: (\d+) s", out)
    assert seconds and int(seconds[1]) < 60  # 8 tiny prompts: its own time, about 0 s
    assert passes == [sorted(s.id for s in items)]


def test_loreft_is_the_papers_formula_on_a_case_solved_by_hand():
    """R = the first two unit vectors, W = 0, b = (2, -1): Φ(h) = h + Rᵀ(Wh + b − Rh) sets h's first two coordinates
    to 2 and -1 and leaves the rest; R stays orthonormal through the parametrization after a gradient step."""
    edit = LowRankEdit(6, 2)
    with torch.no_grad():
        edit.rotate.weight = torch.eye(6)[:2]
        edit.learned.weight.zero_()
        edit.learned.bias.copy_(torch.tensor([2.0, -1.0]))
    h = torch.randn(3, 6, dtype=torch.float64)
    out = h + edit(h)
    assert out.dtype == torch.float64
    assert torch.allclose(out[:, :2], torch.tensor([[2.0, -1.0]] * 3, dtype=torch.float64), atol=1e-6)
    assert torch.equal(out[:, 2:], h[:, 2:])
    optimiser = torch.optim.SGD(edit.parameters(), lr=0.5)
    (edit(torch.randn(4, 6)) ** 2).sum().backward()
    optimiser.step()
    rotation = edit.rotation
    assert torch.allclose(rotation @ rotation.T, torch.eye(2), atol=1e-5) and not torch.allclose(
        rotation, torch.eye(6)[:2]
    )


def readable_pairs(prefix: str, n_pairs: int, seed: int) -> list:
    """Pairs whose twins differ by one call (gets vs fgets) inside otherwise random code: the label is linearly
    readable at the answer position (a probe reads it), but a random model does not answer it. The random words are
    called names, so pairs differ after `neardup`'s normalisation too (as parameter names they would be one
    family, and the probe's folds would have a single group)."""
    import random

    from vulnsteer.data import Sample

    rng = random.Random(seed)
    words = ["alpha", "beta", "count", "size", "len", "idx", "tmp", "ptr", "data", "value"]
    samples = []
    for k in range(n_pairs):
        a, b = rng.sample(words, 2)
        for vulnerable in (True, False):
            call = "gets(buf);" if vulnerable else "fgets(buf, n, stdin);"
            samples.append(
                Sample(
                    id=f"{prefix}{k}{'v' if vulnerable else 'p'}",
                    cwe="CWE-787",
                    label="vulnerable" if vulnerable else "patched",
                    language="c",
                    code=f"void f(int n) {{ char buf[8]; {a}({b}(n)); {b}_{a}(n); {call} }}",
                    pair_id=f"{prefix}{k}",
                    split="unit",
                    source="synthetic",
                )
            )
    return samples


def held_out_balanced_accuracy(lm, prefix, samples, row) -> float:
    with torch.no_grad():
        scores = answer_log_odds(lm, prefix, [[row]] * len(samples))[:, 0]
    said, truth = scores > 0, torch.tensor([s.is_vulnerable for s in samples])
    return float(((said & truth).sum() / truth.sum() + (~said & ~truth).sum() / (~truth).sum()) / 2)


def test_loreft_reads_a_label_the_model_does_not_answer_and_a_fixed_vector_cannot(capsys):
    """Synthetic pairs, a random model at chance: LoReFT fitted on 16 training pairs reaches held-out balanced
    accuracy >= 0.9 on 8 other pairs at the plain log-odds > 0 verdict. The trained vector's figure is printed: a
    fixed vector moves every item alike, so it mostly moves the threshold."""
    from vulnsteer.extract.probe import probe
    from vulnsteer.models import random_model

    lm = random_model("qwen2")
    train, test = readable_pairs("a", 16, 0), readable_pairs("b", 8, 1)
    acts = collect(lm, train + test, "S1", PromptResources(), mode="score")
    readable = {r.layer: r.auroc for r in probe(acts, [1, 2], "probe", 4) if r.group == POOLED}
    assert min(readable.values()) > 0.9  # the premise: linearly readable at the answer position
    train_prefix, test_prefix = prefix_pass(lm, train), prefix_pass(lm, test)
    assert held_out_balanced_accuracy(lm, test_prefix, test, None) == 0.5  # unsteered: at chance
    layer = 2
    edits = train_edits(
        lm, train_prefix, train, [POOLED], [layer], POOLED, Training(steps=120, learning_rate=0.02, rank=1)
    )
    loreft = held_out_balanced_accuracy(lm, test_prefix, test, Steering({}, 1.0, edits={layer: edits[POOLED][layer]}))
    norms = {layer: float(acts.by_layer[layer].norm(dim=1).mean())}
    vectors = train_vectors(lm, train_prefix, train, [POOLED], [layer], norms, POOLED, Training(steps=60))
    trained = held_out_balanced_accuracy(lm, test_prefix, test, Steering({layer: vectors[POOLED][layer]}, 1.0))
    print(f"held-out balanced accuracy: unsteered 0.5, loreft r=1 {loreft:.3f}, trained vector {trained:.3f}")
    assert loreft >= 0.9


def test_a_loreft_fit_is_repeatable_whatever_drew_random_numbers_before_it(lm):
    """R's parametrization completes it to a square basis with torch's global generator, and the basis shapes the
    gradient steps: two fits after different global draws must give the same edit (two main-job runs once did not)."""
    samples = make_samples(4)
    prefix = prefix_pass(lm, samples)
    fits = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        edits = train_edits(lm, prefix, samples, [POOLED], [1], POOLED, Training(steps=3, rank=2))
        fits.append(edits[POOLED][1].tensors())
    assert all(torch.equal(fits[0][k], fits[1][k]) for k in ("R", "W", "b"))


def test_a_loreft_bank_saves_loads_and_steers_as_fitted(lm, tmp_path):
    from vulnsteer.extract.vectors import load, save, steering_for_samples

    samples = make_samples(6)
    acts = collect(lm, samples, "S1", PromptResources(), mode="score")
    bank = fit(acts, lm, "loreft", [1, 2], training=Training(steps=3, rank=2))
    assert bank.vectors == {} and set(bank.groups) == {POOLED, "CWE-787"} and bank.layers == [1, 2]
    save(bank, tmp_path / "reft.safetensors")
    again = load(tmp_path / "reft.safetensors")
    prefix = prefix_pass(lm, samples)
    for group in bank.groups:
        row, reloaded = bank.steering(group, [1, 2], 1.0), again.steering(group, [1, 2], 1.0)
        with torch.no_grad():
            first = answer_log_odds(lm, prefix, [[row]] * len(samples))
            second = answer_log_odds(lm, prefix, [[reloaded]] * len(samples))
        assert torch.allclose(first, second, atol=1e-5)
    steering = steering_for_samples(again, "2", 0.5, "prompt-last")(samples[0])
    assert set(steering.edits) == {2} and steering.vectors == {} and steering.steered_layers == {2}
    with pytest.raises(VulnsteerError, match="edits, not steering vectors"):
        again.for_group(POOLED)


def test_the_static_decoder_refuses_edits_in_one_line(lm):
    from vulnsteer.steering.buffers import SteeringEngine

    edit = LowRankEdit(lm.hidden_size, 1)
    engine = SteeringEngine(lm.model)
    with pytest.raises(VulnsteerError, match="use --cache dynamic"):
        engine.set_rows([Steering({}, 1.0, edits={1: edit})], torch.ones(1, 4, dtype=torch.long))


def test_the_answer_log_odds_from_two_rows_of_the_output_layer_equal_the_full_softmaxs(lm):
    """Training reads only the yes and no rows of the output layer: the same log-odds (and gradient) as the full
    vocabulary's log-softmax."""
    from vulnsteer.extract.trained import answer_log_odds, log_odds, next_token_logprobs

    samples = filter_samples(load_demo(), None, None, 4)
    prefix = prefix_pass(lm, samples)
    vector = (0.1 * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(1))).requires_grad_()
    tokens = [[None, Steering({1: vector}, 1.0)] for _ in samples]
    fast = answer_log_odds(lm, prefix, tokens)
    full = log_odds(lm, next_token_logprobs(lm, prefix, tokens))
    assert torch.allclose(fast, full, atol=1e-5)
    (grad_fast,) = torch.autograd.grad(fast.sum(), vector)
    (grad_full,) = torch.autograd.grad(full.sum(), vector)
    assert torch.allclose(grad_fast, grad_full, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(fast[:, 0], fast[:, 1])  # the steered copy's answer moved
