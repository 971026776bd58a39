"""Directions from synthetic activations with a planted direction, vector files, layer specs and GGUF export."""

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import ONE_CONFIG_SWEEP, tiny_lm
from safetensors.torch import save_file

from vulnsteer import __version__
from vulnsteer.data import Sample
from vulnsteer.errors import VulnsteerError
from vulnsteer.extract.activations import Activations
from vulnsteer.extract.vectors import (
    POOLED,
    Normalisation,
    VectorBank,
    check_compatible,
    direction,
    export_gguf,
    fit,
    load,
    load_vectors,
    normalise,
    parse_layers,
    relative_layer,
    save,
    steering_for_samples,
)
from vulnsteer.records import Steering, VectorChoice

HIDDEN, LAYERS = 64, 4  # the tiny models of conftest
CWES = ("CWE-22", "CWE-79", "CWE-787")


@pytest.fixture(scope="module")
def llama():
    return tiny_lm("llama")


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def planted(n_pairs=24, hidden=HIDDEN, seed=0, noise=0.1, spread=2.0):
    """Pairs (vulnerable, patched) that differ by `a_i * d` along a planted unit direction `d` (a_i in [1, 4]:
    the shift varies by pair) plus noise; each pair has its own random base point (std `spread`).
    Returns x, labels, pair_ids, d."""
    g = torch.Generator().manual_seed(seed)
    d = unit(torch.randn(hidden, generator=g))
    base = torch.randn(n_pairs, hidden, generator=g) * spread
    a = torch.rand(n_pairs, 1, generator=g) * 3 + 1
    vul = base + a * d + noise * torch.randn(n_pairs, hidden, generator=g)
    pat = base + noise * torch.randn(n_pairs, hidden, generator=g)
    x = torch.cat([vul, pat])
    labels = torch.tensor([True] * n_pairs + [False] * n_pairs)
    pair_ids = [f"p{i}" for i in range(n_pairs)] * 2
    return x, labels, pair_ids, d


def make_acts(cwes=CWES, pairs_per_cwe=6, layers=LAYERS, hidden=HIDDEN, seed=0, only_vulnerable=()):
    """Synthetic `Activations`: each CWE has its own planted direction at every layer; a vulnerable sample is its
    patched twin shifted by (1..4) x that direction, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    samples, rows = [], []
    dirs = {c: unit(torch.randn(hidden, generator=g)) for c in cwes}
    for cwe in cwes:
        for p in range(pairs_per_cwe):
            base = torch.randn(layers, hidden, generator=g)
            for label in ("vulnerable", "patched"):
                if label == "patched" and cwe in only_vulnerable:
                    continue
                sid = f"{cwe}/{p}{'' if label == 'vulnerable' else '-p'}"
                samples.append(
                    Sample(
                        id=sid,
                        cwe=cwe,
                        label=label,
                        language="c",
                        code=f"code {sid}",
                        pair_id=f"{cwe}/{p}",
                        split="train",
                        source="test",
                    )
                )
                shift = (1 + 3 * p / max(1, pairs_per_cwe - 1)) * dirs[cwe] if label == "vulnerable" else 0
                rows.append(base + shift + 0.05 * torch.randn(layers, hidden, generator=g))
    stacked = torch.stack(rows)
    return Activations(samples, {layer: stacked[:, layer] for layer in range(layers)}, "prompt-last", "S1"), dirs


# --- direction --------------------------------------------------------------------------------------------


def test_mean_diff_is_the_mean_difference():
    x, labels, pair_ids, _ = planted()
    expected = x[labels].mean(0) - x[~labels].mean(0)
    torch.testing.assert_close(direction(x, labels, pair_ids, "mean-diff"), expected)
    # a hand-computed case
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 0.0], [0.0, 4.0]])
    labels = torch.tensor([True, True, False, False])
    torch.testing.assert_close(direction(x, labels, ["a", "b", "a", "b"], "mean-diff"), torch.tensor([2.0, -1.0]))


def test_pca_recovers_planted_direction_and_sign():
    x, labels, pair_ids, d = planted()
    v = direction(x, labels, pair_ids, "pca")
    assert abs(float(v.norm()) - 1.0) < 1e-4
    assert cosine(v, d) > 0.9
    # sign: vulnerable samples project higher than their patched twins
    assert float((x[labels] @ v).mean()) > float((x[~labels] @ v).mean())
    # flipping which side is "vulnerable" flips the direction
    flipped = direction(x, ~labels, pair_ids, "pca")
    assert cosine(flipped, d) < -0.9


def test_pca_recovers_a_constant_planted_shift():
    """Every vulnerable sample is its twin shifted by the same 2 x d: the paired differences all point along d, so
    their first principal direction (uncentred) is d. Centred, only the noise would be left."""
    g = torch.Generator().manual_seed(5)
    d = unit(torch.randn(HIDDEN, generator=g))
    base = torch.randn(24, HIDDEN, generator=g) * 2
    x = torch.cat(
        [base + 2 * d + 0.1 * torch.randn(24, HIDDEN, generator=g), base + 0.1 * torch.randn(24, HIDDEN, generator=g)]
    )
    labels = torch.tensor([True] * 24 + [False] * 24)
    assert cosine(direction(x, labels, [f"p{i}" for i in range(24)] * 2, "pca"), d) > 0.9


def test_pca_uses_pairs():
    """Differences are taken within pairs: the pair-specific base points (large here) cancel."""
    x, labels, pair_ids, d = planted(n_pairs=8, noise=0.05)
    x = x.clone()
    g = torch.Generator().manual_seed(3)
    offsets = torch.randn(8, HIDDEN, generator=g) * 50  # a huge per-pair offset shared by both members
    x[:8] += offsets
    x[8:] += offsets
    assert cosine(direction(x, labels, pair_ids, "pca"), d) > 0.9


def test_pca_with_one_or_two_pairs():
    x, labels, pair_ids, d = planted(n_pairs=2, noise=0.01)
    v = direction(x, labels, pair_ids, "pca")
    assert cosine(v, d) > 0.9
    one = direction(x[[0, 2]], labels[[0, 2]], ["p0", "p0"], "pca")
    torch.testing.assert_close(one, x[0] - x[2])


def test_pca_without_pairs_falls_back_to_mean_difference():
    x, labels, _, _ = planted(n_pairs=4)
    unpaired = [f"u{i}" for i in range(len(labels))]  # no pair has both members
    v = direction(x, labels, unpaired, "pca")
    torch.testing.assert_close(v, x[labels].mean(0) - x[~labels].mean(0))


def test_probe_direction_separates_planted_data():
    x, labels, pair_ids, d = planted(n_pairs=40, noise=0.3, spread=0.5)
    v = direction(x, labels, pair_ids, "probe")
    assert v.shape == (HIDDEN,) and v.dtype == torch.float32
    scores = x @ v
    assert float(scores[labels].min()) > float(scores[~labels].max())
    assert cosine(v, d) > 0.5


def test_unknown_method():
    x, labels, pair_ids, _ = planted(n_pairs=3)
    with pytest.raises(VulnsteerError, match="unknown method 'svm'"):
        direction(x, labels, pair_ids, "svm")


def test_normalise():
    v = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(normalise(v, "unit", 123.0), torch.tensor([0.6, 0.8]))
    r = normalise(v, "residual", 7.5)
    assert abs(float(r.norm()) - 7.5) < 1e-5
    assert cosine(r, v) > 0.9999
    assert torch.isfinite(normalise(torch.zeros(3), "unit", 1.0)).all()
    with pytest.raises(VulnsteerError, match="unknown normalisation 'l1'; use one of residual, unit"):
        Normalisation.parse("l1")


# --- fit --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mean-diff", "pca", "probe"])
def test_fit_groups_and_metadata(llama, method):
    acts, dirs = make_acts()
    bank = fit(acts, llama, method=method, normalisation="unit")
    assert bank.groups == sorted([*CWES, POOLED])
    for group in bank.groups:
        assert sorted(bank.vectors[group]) == list(range(LAYERS))
        for v in bank.vectors[group].values():
            assert v.shape == (HIDDEN,)
            assert abs(float(v.norm()) - 1) < 1e-4
    for cwe in CWES:  # each CWE's vector points along its own planted direction
        assert cosine(bank.for_group(cwe)[2], dirs[cwe]) > (0.5 if method == "probe" else 0.9)
    meta = bank.meta
    ids = sorted(s.id for s in acts.samples)
    assert meta["model"] == "tiny-llama" and meta["model_type"] == "llama"
    assert meta["config_hash"] == llama.config_hash
    assert meta["hidden_size"] == HIDDEN and meta["num_layers"] == LAYERS
    assert meta["layers"] == list(range(LAYERS))
    assert meta["method"] == method and meta["read"] == "prompt-last" and meta["prompt"] == "S1"
    assert meta["normalisation"] == "unit"
    assert meta["groups"] == [*sorted(CWES), POOLED]
    assert meta["train_ids"] == ids and meta["n_train"] == len(ids)
    assert meta["train_ids_sha256"] == hashlib.sha256("\n".join(ids).encode()).hexdigest()
    assert meta["vulnsteer"] == __version__
    json.dumps(meta)  # must be storable in a safetensors header


def test_fit_mean_diff_values_and_residual_norm(llama):
    acts, _ = make_acts()
    bank = fit(acts, llama, method="mean-diff", layers=[1, 3], normalisation="residual")
    assert bank.meta["layers"] == [1, 3]
    assert sorted(bank.vectors[POOLED]) == [1, 3]
    for layer in (1, 3):
        x = acts.by_layer[layer]
        residual = float(x.norm(dim=1).mean())
        pooled = bank.vectors[POOLED][layer]
        assert abs(float(pooled.norm()) - residual) < 1e-3
        assert cosine(pooled, x[acts.labels].mean(0) - x[~acts.labels].mean(0)) > 0.9999
        cwe = acts.subset(lambda s: s.cwe == "CWE-79")
        xc = cwe.by_layer[layer]
        own = bank.vectors["CWE-79"][layer]
        assert cosine(own, xc[cwe.labels].mean(0) - xc[~cwe.labels].mean(0)) > 0.9999
        assert abs(float(own.norm()) - residual) < 1e-3  # the layer's norm over all training items


@pytest.mark.parametrize("groups,expected", [("cwe", sorted(CWES)), ("pooled", [POOLED])])
def test_fit_group_choice(llama, groups, expected):
    acts, _ = make_acts()
    assert fit(acts, llama, groups=groups).groups == expected


def test_fit_refuses_cwe_without_both_classes(llama):
    acts, _ = make_acts(only_vulnerable=("CWE-79",))
    with pytest.raises(VulnsteerError, match="CWE-79: no patched sample"):
        fit(acts, llama)
    # pooled alone still has both classes
    assert fit(acts, llama, groups="pooled").groups == [POOLED]


# --- files ------------------------------------------------------------------------------------------------


def test_save_load_round_trip(llama, tmp_path):
    acts, _ = make_acts()
    bank = fit(acts, llama, method="pca")
    path = tmp_path / "sub" / "vectors.safetensors"
    save(bank, path)
    back = load(path)
    assert back.meta == bank.meta
    assert back.groups == bank.groups
    for group in bank.groups:
        assert sorted(back.vectors[group]) == sorted(bank.vectors[group])
        for layer, v in bank.vectors[group].items():
            assert torch.equal(back.vectors[group][layer], v)
    assert load_vectors(path, llama).meta == bank.meta


def test_load_refuses_bad_files(tmp_path):
    with pytest.raises(VulnsteerError, match="not found"):
        load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file" * 10)
    with pytest.raises(VulnsteerError, match="not a vulnsteer vector file"):
        load(garbage)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(VulnsteerError, match="not a vulnsteer vector file"):
        load(empty)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    with pytest.raises(VulnsteerError, match="not found"):
        load(folder)


def test_load_refuses_missing_or_bad_metadata(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"pooled/1": torch.ones(4)}, str(plain))
    with pytest.raises(VulnsteerError, match="no vulnsteer metadata"):
        load(plain)
    bad_json = tmp_path / "bad.safetensors"
    save_file({"pooled/1": torch.ones(4)}, str(bad_json), metadata={"vulnsteer": "{oops"})
    with pytest.raises(VulnsteerError, match="not a vulnsteer vector file"):
        load(bad_json)


@pytest.mark.parametrize("key", ["pooled", "pooled/x"])
def test_load_refuses_bad_tensor_names(tmp_path, key):
    path = tmp_path / "names.safetensors"
    save_file({key: torch.ones(HIDDEN)}, str(path), metadata={"vulnsteer": json.dumps({"hidden_size": HIDDEN})})
    with pytest.raises(VulnsteerError):
        load(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_refuses_non_finite(tmp_path, bad):
    path = tmp_path / "nan.safetensors"
    v = torch.ones(HIDDEN)
    v[5] = bad
    save_file(
        {"pooled/2": v, "pooled/1": torch.ones(HIDDEN)},
        str(path),
        metadata={"vulnsteer": json.dumps({"hidden_size": HIDDEN, "num_layers": LAYERS})},
    )
    with pytest.raises(VulnsteerError, match="pooled/2 has NaN or infinite"):
        load(path)


def test_check_compatible(llama):
    acts, _ = make_acts()
    bank = fit(acts, llama)
    check_compatible(bank, llama)  # fine as fitted
    for key, value in (("hidden_size", 128), ("num_layers", 8)):
        other = VectorBank(bank.vectors, {**bank.meta, key: value})
        with pytest.raises(VulnsteerError, match="were made for a model with hidden size"):
            check_compatible(other, llama)
    out_of_range = VectorBank({POOLED: {LAYERS: torch.ones(HIDDEN)}}, bank.meta)
    with pytest.raises(VulnsteerError, match=f"layer {LAYERS} is out of range"):
        check_compatible(out_of_range, llama)
    negative = VectorBank({POOLED: {-1: torch.ones(HIDDEN)}}, bank.meta)
    with pytest.raises(VulnsteerError, match="out of range"):
        check_compatible(negative, llama)
    wrong_shape = VectorBank({POOLED: {1: torch.ones(HIDDEN + 1)}}, bank.meta)
    with pytest.raises(VulnsteerError, match="shape"):
        check_compatible(wrong_shape, llama)


def test_load_vectors_checks_compatibility(llama, tmp_path):
    acts, _ = make_acts()
    bank = fit(acts, llama)
    path = tmp_path / "v.safetensors"
    save(VectorBank(bank.vectors, {**bank.meta, "num_layers": 48}), path)
    with pytest.raises(VulnsteerError, match="48 layers"):
        load_vectors(path, llama)


# --- layer specs ------------------------------------------------------------------------------------------


def test_parse_layers():
    assert parse_layers("12,24", 48) == [12, 24]
    assert parse_layers("24,12,12", 48) == [12, 24]
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers(None, 3) == [0, 1, 2]
    assert parse_layers("", 3) == [0, 1, 2]
    assert parse_layers("all", 48, available=[30, 10]) == [10, 30]
    assert parse_layers("-1", 48) == [47]
    assert parse_layers("-1,0", 4) == [0, 3]
    assert parse_layers("rel:0.25,0.5,0.75,0.98", 48) == [12, 24, 36, 47]
    assert parse_layers("rel:1.0", 48) == [47]
    assert parse_layers("rel:0.5", 4) == [2]
    assert parse_layers("10", 48, available=[10, 20]) == [10]


@pytest.mark.parametrize("spec", ["48", "-49", "100,1"])
def test_parse_layers_out_of_range(spec):
    with pytest.raises(VulnsteerError, match="out of range"):
        parse_layers(spec, 48)


@pytest.mark.parametrize("spec", ["a,b", "1.5", "12;24", "rel:x", "12,"])
def test_parse_layers_garbage(spec):
    with pytest.raises(VulnsteerError, match="bad layer"):
        parse_layers(spec, 48)


def test_parse_layers_unavailable():
    with pytest.raises(VulnsteerError, match="has no layer 11"):
        parse_layers("10,11", 48, available=[10, 20])


def test_relative_layer():
    assert [relative_layer(d, 48) for d in (0.25, 0.5, 0.75, 0.98)] == [12, 24, 36, 47]
    assert relative_layer(0.0, 48) == 0
    assert relative_layer(1.0, 48) == 47
    assert relative_layer(0.5, 24) == 12
    assert relative_layer(1 / 3, 3) == 1  # floating error does not round 0.999.. down
    assert relative_layer(0.5, 1) == 0


# --- steering_for_samples ---------------------------------------------------------------------------------


def test_steering_for_samples(llama):
    acts, _ = make_acts()
    bank = fit(acts, llama, method="mean-diff")
    sample = next(s for s in acts.samples if s.cwe == "CWE-79")

    own = steering_for_samples(bank, "1,3", 2.5, "prompt-last")(sample)
    assert isinstance(own, Steering)
    assert sorted(own.vectors) == [1, 3]
    assert own.strength == 2.5 and own.positions == "prompt-last"
    for layer in (1, 3):
        assert torch.equal(own.vectors[layer], bank.vectors["CWE-79"][layer])
    assert own.label.to_dict() == {
        "vectors": "CWE-79",
        "layers": [1, 3],
        "strength": 2.5,
        "positions": "prompt-last",
        "method": "mean-diff",
    }

    pooled = steering_for_samples(bank, "-1", -1.0, "all", cwe_vector=VectorChoice.parse(POOLED))(sample)
    assert sorted(pooled.vectors) == [3]
    assert torch.equal(pooled.vectors[3], bank.vectors[POOLED][3])
    assert pooled.label.vectors == POOLED and pooled.label.strength == -1.0

    named = steering_for_samples(bank, None, 1.0, "generated", cwe_vector=VectorChoice.parse("CWE-22"))(sample)
    assert sorted(named.vectors) == list(range(LAYERS))
    assert torch.equal(named.vectors[0], bank.vectors["CWE-22"][0])
    assert named.label.vectors == "CWE-22"


def test_steering_for_samples_errors(llama):
    acts, _ = make_acts()
    bank = fit(acts, llama, layers=[1, 2])
    with pytest.raises(VulnsteerError, match="no vector for CWE-416"):
        steering_for_samples(bank, None, 1.0, "all", cwe_vector=VectorChoice.parse("CWE-416"))
    with pytest.raises(VulnsteerError, match="has no layer 3"):
        steering_for_samples(bank, "3", 1.0, "all")
    own = steering_for_samples(bank, None, 1.0, "all")
    stranger = Sample(
        id="x", cwe="CWE-416", label="vulnerable", language="c", code="x", pair_id="x", split="t", source="test"
    )
    with pytest.raises(VulnsteerError, match="no vector for CWE-416"):
        own(stranger)


# --- GGUF -------------------------------------------------------------------------------------------------


def test_export_gguf_reads_back(llama, tmp_path):
    from gguf import GGUFReader

    acts, _ = make_acts()
    bank = fit(acts, llama)
    path = tmp_path / "cv.gguf"
    export_gguf(bank, "CWE-787", path)
    reader = GGUFReader(str(path))
    fields = reader.fields
    assert fields["general.architecture"].contents() == "controlvector"
    assert fields["controlvector.model_hint"].contents() == "llama"
    assert fields["controlvector.layer_count"].contents() == LAYERS - 1
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert sorted(tensors) == [f"direction.{layer}" for layer in range(1, LAYERS)]  # layer 0 left out
    for layer in range(1, LAYERS):
        np.testing.assert_array_equal(tensors[f"direction.{layer}"].reshape(-1), bank.vectors["CWE-787"][layer].numpy())
        assert tensors[f"direction.{layer}"].dtype == np.float32
    with pytest.raises(VulnsteerError, match="no vector for CWE-1"):
        export_gguf(bank, "CWE-1", tmp_path / "none.gguf")


def test_a_direction_method_is_one_function_and_one_registry_line(monkeypatch, tmp_path):
    """Registering a toy direction (the vulnerable items' mean alone) makes it a method everywhere a method goes:
    fitted per group and layer, and swept under the held-out protocol."""
    from vulnsteer.experiments.analysis import analyse
    from vulnsteer.experiments.sweep import SweepConfig
    from vulnsteer.extract import vectors
    from vulnsteer.models import random_model
    from vulnsteer.pipeline import run_sweep

    def vulnerable_mean(x, vulnerable, pair_ids):
        return x[vulnerable].mean(0)

    monkeypatch.setitem(vectors.DIRECTIONS, "vulnerable-mean", vulnerable_mean)
    config = SweepConfig(**{**ONE_CONFIG_SWEEP, "methods": ["vulnerable-mean"]})
    run_sweep(config, tmp_path, lm=random_model("llama"))
    a = analyse(tmp_path)
    assert "vulnerable-mean|1|pooled|prompt-last|+1" in a.arms
    monkeypatch.delitem(vectors.DIRECTIONS, "vulnerable-mean")
    with pytest.raises(VulnsteerError, match="methods"):
        SweepConfig(methods=["vulnerable-mean"])
