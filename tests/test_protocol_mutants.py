"""Tests written to kill surviving mutants of the protocol code (docs/protocol.md, "Mutation testing"): each checks
real behaviour that the existing tests left open."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

from vulnsteer import neardup
from vulnsteer.data import Sample
from vulnsteer.errors import VulnsteerError
from vulnsteer.experiments.analysis import BASELINE, path_check
from vulnsteer.experiments.sweep import SweepConfig, path_controls
from vulnsteer.neardup import jaccard, shingles, signature, tokens
from vulnsteer.protocol import check_provenance, families, pair_folds


@pytest.fixture(autouse=True)
def fresh_band_keys():
    """`band_keys` is cached: a mutation run forks its workers from a process whose tests filled the cache, so a
    mutant of the functions behind it would be read from the cache, not run."""
    neardup.band_keys.cache_clear()


def item(id_: str, code: str, source: str = "a") -> Sample:
    return Sample(
        id=id_, cwe="CWE-787", label="vulnerable", language="c", code=code, pair_id=id_, split="x", source=source
    )


def test_renaming_variables_numbers_strings_and_comments_leaves_the_tokens_as_they_were():
    code = 'int _len = 16; /* size */ if (_len < 8) Xbuf = "a"; // note\nstrcpy(Xbuf, s);'
    renamed = 'int _size = 99; if (_size < 3) Ydst = "zz";\nstrcpy(Ydst, t); /* another comment */'
    assert tokens(code) == tokens(renamed)
    assert "strcpy" in tokens(code)  # a called name is the API a flaw hinges on: kept


def test_operators_and_keywords_are_kept_so_an_off_by_one_is_other_code():
    assert tokens("if (n <= len) buf[n] = 0;") != tokens("if (n < len) buf[n] = 0;")
    assert tokens("while (v) f(v);") != tokens("if (v) f(v);")


def test_jaccard_is_the_shingle_set_overlap():
    """Shared shingles over all shingles of either: code that differs in its last token shares all but one."""
    a, b = "if ( v < v ) return ;", "if ( v < v ) return ("
    assert len(tokens(a)) == 8 and len(shingles(a)) == 4
    assert jaccard("if (a < b) return;", "if (a < b) return 1;") == pytest.approx(3 / 6)
    assert jaccard(a, b) == pytest.approx(3 / 5)
    assert jaccard("while (x) { x--; }", "return a + b * c / d;") == 0.0
    assert jaccard("", "/* nothing */") == 1.0  # no tokens on either side: the same (empty) code


def test_short_code_has_near_duplicates_and_code_without_tokens_has_none():
    assert families([item("a", "return x;"), item("b", "return y;")]) == ["a", "a"]
    assert signature("/* only a comment */") is None and neardup.band_keys("// nothing") == ()


def test_the_signature_is_the_exact_minhash_of_the_shingles():
    """(a * h + b) mod p per hash function, minimised over the shingles' 32-bit hashes: exact in uint64."""
    code = "for (i = 0; i <= n; i++) buf[i] = src[i];"
    hashes = [
        int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little") % neardup._PRIME
        for s in shingles(code)
    ]
    a, b = (row.tolist() for row in neardup._PARAMS)
    expected = [min((x * h + y) % neardup._PRIME for h in hashes) for x, y in zip(a, b)]
    got = signature(code)
    assert got is not None and got.dtype == np.uint64 and got.tolist() == expected


def test_the_path_check_reports_every_path_it_has_rows_for_and_counts_changed_verdicts():
    """Each strength-0 path arm against the baseline: the largest score change and how many verdicts changed; a
    path without rows is skipped, not the end of the table."""
    config = SweepConfig(dataset="demo", positions=["prompt-last", "prompt", "all"], mode="score")
    prompt_path, all_path = (p.id for p in path_controls(config))
    row = lambda verdict, score: SimpleNamespace(verdict=verdict, score=score)  # noqa: E731
    baseline = [row("vulnerable", 1.0), row("not_vulnerable", -1.0), row("vulnerable", 2.0)]
    moved = [row("vulnerable", 1.0), row("vulnerable", 0.5), row("vulnerable", 2.25)]
    a = SimpleNamespace(config=config, arms={BASELINE: baseline, all_path: moved})
    assert prompt_path not in a.arms
    assert path_check(a) == [["all", "1.5", "1 of 3"]]


def test_a_row_naming_vectors_the_sweep_did_not_fit_is_refused_with_its_item_and_bank():
    with pytest.raises(VulnsteerError, match="a row of a names vectors 0123abcd that this sweep did not fit"):
        check_provenance([(item("a", "return x;"), "0123abcd", [])], {})


def many_families(n: int = 12) -> list[Sample]:
    return [
        Sample(
            id=f"f{j}/{k}",
            cwe=("CWE-79", "CWE-89")[j % 2],
            label=("vulnerable", "patched")[k],
            language="c",
            code=" ".join(f"call{j}_{m}();" for m in range(6)),
            pair_id=f"f{j}",
            split="x",
            source="s",
        )
        for j in range(n)
        for k in range(2)
    ]


def test_folds_are_repeatable_from_their_seed_and_default_to_five_folds_seed_0():
    """A resumed or re-checked sweep plans its folds again: the same seed must give the same folds."""
    samples = many_families()
    assert pair_folds(samples, 4, seed=3) == pair_folds(samples, 4, seed=3)
    assert pair_folds(samples) == pair_folds(samples, 5, 0) and len(pair_folds(samples)) == 5


def test_too_few_folds_or_families_are_refused_with_the_count():
    with pytest.raises(VulnsteerError, match="at least 2 folds, got 1"):
        pair_folds(many_families(), 1)
    with pytest.raises(VulnsteerError, match="at least 2 pairs, got 1"):
        pair_folds(many_families(1), 3)


# --- selection and fitted thresholds (analysis.py) ----------------------------------------------------------------


def test_a_fold_threshold_fitted_on_its_own_rows_is_refused_and_a_score_on_the_threshold_is_not_vulnerable():
    """`fold_thresholded`: the verdict is score > threshold (as log-odds > 0 is), each item keeps its CWE, score and
    family (the intervals cluster by family), and rows of the fold itself are refused as a fitting set."""
    from test_sweep import _row

    from vulnsteer.experiments.analysis import fold_thresholded

    # Fold 1's threshold is fitted on fold 0: scores 1 (patched) and 3 (vulnerable) -> 2.0, the midpoint.
    arm = [
        _row(0, "vulnerable", "", 3.0),
        _row(1, "patched", "", 1.0),
        _row(2, "vulnerable", "", 2.0),
        _row(3, "patched", "", 2.5),
    ]
    folds = {"s00": 0, "s01": 0, "s02": 1, "s03": 1}
    items = fold_thresholded(arm, folds)
    assert [it.verdict for it in items[2:]] == ["not_vulnerable", "vulnerable"]  # 2.0 sits on the threshold
    assert [(it.cwe, it.score, it.family) for it in items] == [(r.cwe, r.score, r.family) for r in arm]
    with pytest.raises(VulnsteerError, match="threshold for fold 0 would be fitted on that fold's own rows"):
        fold_thresholded(arm, folds, fitted_on=lambda f: arm)


def test_selection_ties_go_to_the_baseline_then_the_weaker_strength_and_incomplete_configs_are_never_chosen():
    from test_sweep import _row

    from vulnsteer.experiments.analysis import nested_selection
    from vulnsteer.experiments.sweep import GridPoint

    config = SweepConfig(
        dataset="demo", limit=8, folds=3, layers=["1"], strengths=[-0.25, 0.5, 2.0], mode="score", vectors=["own"]
    )
    # The weakest, -0.25, is not the first id in string order ("+0.5" sorts before "-0.25").
    ids = {s: GridPoint("mean-diff", "1", "own", "prompt-last", s).id for s in (2.0, 0.5, -0.25)}
    n = 12
    labels = ["vulnerable" if i % 2 == 0 else "patched" for i in range(n)]
    folds = {f"s{i:02d}": i // 4 for i in range(n)}
    rows = [_row(i, labels[i], "vulnerable") for i in range(n)]  # every config says the same: all tie
    selection = {
        f: {c: {f"s{i:02d}": rows[i] for i in range(n) if i // 4 != f} for c in ids.values()} for f in range(3)
    }
    sample_ids = sorted(folds)
    arms = {BASELINE: rows, **{c: rows for c in ids.values()}}
    assert set(nested_selection(arms, sample_ids, folds, config, selection)[1].values()) == {BASELINE}
    del arms[BASELINE]
    assert set(nested_selection(arms, sample_ids, folds, config, selection)[1].values()) == {ids[-0.25]}
    # A config whose selection rows are incomplete ranks below every measured one (an id of the grid: ids that
    # are not are never candidates).
    incomplete = ids[0.5]
    arms = {incomplete: rows, BASELINE: rows}
    selection = {f: {incomplete: {}} for f in range(3)}
    assert set(nested_selection(arms, sample_ids, folds, config, selection)[1].values()) == {BASELINE}


def test_selection_rows_are_none_while_missing_and_a_chosen_config_without_them_is_refused():
    """`selection_rows` answers None (not an error) for a config without rows: no selection rows for that fold at
    all, or (with `train_dataset`) no test rows; `selected_thresholded` refuses a chosen config without them."""
    from test_sweep import _row

    from vulnsteer.experiments.analysis import Analysis, selected_thresholded, selection_rows
    from vulnsteer.experiments.sweep import GridPoint

    config = SweepConfig(dataset="demo", limit=8, folds=3, layers=["1"], strengths=[1.0], mode="score", vectors=["own"])
    steered = GridPoint("mean-diff", "1", "own", "prompt-last", 1.0).id
    folds = {f"s{i:02d}": i // 2 for i in range(6)}
    rows = [_row(i, "vulnerable" if i % 2 == 0 else "patched", "vulnerable", float(i % 2 == 0)) for i in range(6)]
    arms, sample_ids = {BASELINE: rows, steered: rows}, sorted(folds)
    assert selection_rows(arms, sample_ids, folds, config, {}, 0, steered) is None
    fitted_elsewhere = SweepConfig(**{**config.__dict__, "train_dataset": "demo"})
    assert selection_rows({BASELINE: rows}, sample_ids, folds, fitted_elsewhere, {}, 0, steered) is None
    a = Analysis({}, config, sample_ids, arms, folds, [], rows, {0: steered, 1: steered, 2: steered}, {})
    with pytest.raises(VulnsteerError, match="fold 0's chosen config .* lacks selection rows"):
        selected_thresholded(a)


# --- bank mapping and provenance (sweep.py) -----------------------------------------------------------------------


def test_check_held_out_refuses_a_bank_fitted_on_test_items_and_names_the_first():
    from vulnsteer.data import load_demo
    from vulnsteer.experiments.sweep import check_held_out
    from vulnsteer.protocol import training_keys

    samples = load_demo()[:6]
    bank = SimpleNamespace(meta={"train_keys": training_keys(samples[2:])})
    check_held_out({"mean-diff": bank}, samples[:2])  # other items: fine
    with pytest.raises(VulnsteerError, match=rf"fitted on 2 of the items .*\(e\.g\. {samples[2].id}\)"):
        check_held_out({"mean-diff": bank}, samples[:4])


def test_report_check_refuses_a_store_without_banks_or_with_items_its_dataset_lost(monkeypatch, tmp_path):
    """`report --check` on a store from an older vulnsteer (no banks recorded), or whose dataset no longer has an
    item it holds rows of: each a one-line refusal naming the cause, not a KeyError."""
    from dataclasses import asdict

    from test_sweep import _row

    from vulnsteer.experiments import sweep as sweep_module
    from vulnsteer.experiments.store import StoredSweep

    config = SweepConfig(dataset="demo", limit=4, folds=3, layers=["1"], strengths=[1.0], mode="score")
    stored = StoredSweep({"config": asdict(config)}, [("baseline", 0, _row(0, "vulnerable", "vulnerable"))], [])
    monkeypatch.setattr(sweep_module, "read_sweep", lambda out_dir: stored)
    with pytest.raises(VulnsteerError, match="records no vector banks .*nothing to check"):
        sweep_module.check_stored_provenance(tmp_path)
    stored.meta["banks"] = {}
    with pytest.raises(VulnsteerError, match=r"holds rows of items its dataset no longer has \(e\.g\. s00\)"):
        sweep_module.check_stored_provenance(tmp_path)


def test_a_steered_row_without_a_bank_id_is_refused_as_an_older_store():
    from vulnsteer.data import load_demo
    from vulnsteer.experiments.sweep import provenance_rows
    from vulnsteer.records import SteeringId

    sample = load_demo()[0]
    assert provenance_rows([(sample, None), (sample, SteeringId())], {sample.id: 0}, [sample]) == []  # unsteered
    with pytest.raises(
        VulnsteerError,
        match=rf"the row of {sample.id} under m\|1 names no vectors: its provenance "
        r"cannot be checked \(a store from an older vulnsteer\)",
    ):
        provenance_rows([(sample, SteeringId(config="m|1"))], {sample.id: 0}, [sample])


def test_a_sweep_loads_its_test_and_training_items_through_every_filter_it_is_given(tmp_path):
    """`load_sweep_samples` hands each config filter to the loader (test: split, CWE, limit, length, pairs per
    CWE; training: its own split, length and pairs, the same CWEs), and names the training data in a refusal. The
    data are made so that every filter drops something (checked first), so a filter left out changes the items."""
    import dataclasses
    import json

    from vulnsteer.data import filter_samples, load_dataset
    from vulnsteer.experiments.sweep import load_sweep_samples

    # In order: dropped by the CWE filter, by the split, by the length, kept, dropped by pairs per CWE, kept,
    # dropped by the limit (two pairs).
    plan = [
        ("CWE-89", "a", 0),
        ("CWE-22", "b", 0),
        ("CWE-22", "a", 3),
        ("CWE-22", "a", 0),
        ("CWE-22", "a", 0),
        ("CWE-77", "a", 0),
        ("CWE-79", "a", 0),
    ]

    def write(name: str, word: str, body: str) -> str:
        rows = [
            {
                "id": f"{word}{k}{label[0]}",
                "cwe": cwe,
                "label": label,
                "language": "c",
                "pair_id": f"{word}{k}",
                "source": name,
                "meta": {"split": split},
                "code": f"int {word}{k}(int x) {{ {body} {k}{'; /*pad*/' * pad}; }}"
                + ("" if label == "vulnerable" else " // fixed"),
            }
            for k, (cwe, split, pad) in enumerate(plan)
            for label in ("vulnerable", "patched")
        ]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / f"{name}.jsonl")

    test_file, train_file = write("test", "alpha", "return x *"), write("train", "omega", "while (x--) y +=")
    cwes = ["CWE-22", "CWE-77", "CWE-79"]
    test_args = dict(splits=["a"], cwes=cwes, limit=4, max_chars=60, pairs_per_cwe=1)
    train_args = dict(splits=["a"], cwes=cwes, limit=None, max_chars=60, pairs_per_cwe=1)
    for path, args in ((test_file, test_args), (train_file, train_args)):
        full = filter_samples(load_dataset(path), **args)
        for key in [k for k, v in args.items() if v is not None]:
            assert filter_samples(load_dataset(path), **{**args, key: None}) != full, f"{key} drops nothing"
    config = SweepConfig(
        dataset=test_file,
        split=["a"],
        cwe=cwes,
        limit=4,
        max_chars=60,
        pairs_per_cwe=1,
        train_dataset=train_file,
        train_split=["a"],
        train_max_chars=60,
        train_pairs_per_cwe=1,
        folds=2,
        layers=["1"],
    )
    test, train, note = load_sweep_samples(config)
    assert [s.id for s in test] == [s.id for s in filter_samples(load_dataset(test_file), **test_args)]
    expected = filter_samples(load_dataset(train_file), **train_args)
    assert train is not None and [s.id for s in train] == [s.id for s in expected] and note is None
    with pytest.raises(VulnsteerError, match=r"with the training data \(demo\)"):
        load_sweep_samples(
            dataclasses.replace(
                config,
                dataset="demo",
                split=None,
                max_chars=None,
                train_dataset="demo",
                train_split=None,
                train_max_chars=None,
            )
        )


def test_each_random_draw_steers_its_own_direction_with_the_pooled_norm():
    """`random_draws = 2` means two controls: the K-th draw's direction differs from the others' (a distribution
    of controls, not one direction twice), each with the pooled vector's norm."""
    import torch

    from vulnsteer.data import load_demo
    from vulnsteer.experiments.sweep import GridPoint, steering_for
    from vulnsteer.records import Positions, VectorChoice

    pooled = {1: torch.randn(16, generator=torch.Generator().manual_seed(0)) * 3}
    bank = SimpleNamespace(meta={"train_ids_sha256": "0" * 64}, edits={}, for_group=lambda group: pooled)
    sample = load_demo()[0]
    vectors = [
        steering_for(
            GridPoint("mean-diff", "1", VectorChoice("random", draw=k), Positions.PROMPT_LAST, 1.0),
            sample,
            0,
            {"mean-diff": bank},
            {"1": [1]},
        ).vectors[1]
        for k in (0, 1)
    ]
    assert not torch.equal(vectors[0], vectors[1])
    assert all(torch.isclose(v.norm(), pooled[1].norm()) for v in vectors)


def test_a_learned_edits_random_control_is_an_edit_of_the_same_form_in_another_subspace():
    """LoReFT's control steers: W and b of the pooled edit, R drawn at random with the same rank, at each layer."""
    import torch

    from vulnsteer.data import load_demo
    from vulnsteer.experiments.sweep import GridPoint, steering_for
    from vulnsteer.records import Positions, VectorChoice
    from vulnsteer.steering.reft import LowRankEdit

    pooled = {1: LowRankEdit(16, 2, torch.Generator().manual_seed(0))}
    bank = SimpleNamespace(meta={"train_ids_sha256": "0" * 64}, edits={"pooled": pooled})
    point = GridPoint("loreft", "1", VectorChoice("random", draw=0), Positions.PROMPT_LAST, 1.0)
    control = steering_for(point, load_demo()[0], 0, {"loreft": bank}, {"1": [1]})
    assert set(control.edits) == {1} and control.steered_layers == {1}
    made, fitted = control.edits[1].tensors(), pooled[1].tensors()
    assert torch.equal(made["W"], fitted["W"]) and torch.equal(made["b"], fitted["b"])
    assert made["R"].shape == fitted["R"].shape and not torch.allclose(made["R"], fitted["R"])


def test_the_path_check_of_a_generate_mode_sweep_counts_verdicts_without_scores():
    """Generated answers have no score: the path check still counts changed verdicts, its score cell a dash."""
    config = SweepConfig(dataset="demo", positions=["prompt-last", "all"], mode="generate")
    (all_path,) = (p.id for p in path_controls(config) if p.positions == "all")
    row = lambda verdict: SimpleNamespace(verdict=verdict, score=None)  # noqa: E731
    baseline = [row("vulnerable"), row("not_vulnerable")]
    a = SimpleNamespace(config=config, arms={BASELINE: baseline, all_path: [row("vulnerable"), row("vulnerable")]})
    assert path_check(a) == [["all", "–", "1 of 2"]]


def test_a_threshold_that_separates_nothing_is_the_middle_of_the_tie_and_the_ends_lie_one_unit_beyond_the_scores():
    """`best_threshold`'s end candidates lie 1.0 beyond the lowest and highest score, and a tie is the middle of
    the first run of best candidates: equal scores give that score itself (nothing above it is called
    vulnerable); anti-ordered scores, where only the ends reach chance, take the first end (everything vulnerable)."""
    from vulnsteer.experiments.analysis import best_threshold

    assert best_threshold(np.array([0.3, 0.3, 0.3, 0.3]), np.array([True, False, True, False])) == pytest.approx(0.3)
    assert best_threshold(np.array([0.0, 1.0]), np.array([True, False])) == pytest.approx(-1.0)
    assert best_threshold(np.array([0.0, 1.0]), np.array([False, True])) == pytest.approx(0.5)


def family_of_items(name: str, cwes: list[str]) -> list[Sample]:
    """One family (one pair id) of len(cwes) items; each family's code its own (no near-duplicates across them:
    `name` is part of the called names, so it holds letters and digits only)."""
    return [
        Sample(
            id=f"{name}/{k}",
            cwe=cwe,
            label=("vulnerable", "patched")[k % 2],
            language="c",
            code=" ".join(f"call_{name}_{m}();" for m in range(6)),
            pair_id=name,
            split="x",
            source="s",
        )
        for k, cwe in enumerate(cwes)
    ]


def folds_of(samples: list[Sample], k: int, seed: int) -> list[list[str]]:
    """Each fold's families (pair ids), in order."""
    return [sorted({samples[i].pair_id for i in test}) for _, test in pair_folds(samples, k, seed)]


@pytest.mark.parametrize("seed", range(8))
def test_a_family_counts_for_its_majority_cwe_when_the_folds_are_stratified(seed):
    """A family whose items disagree on the CWE (near-copies across CWEs) is dealt as its most common CWE's: the
    two CWE-Z families (one of them with a CWE-A item) land in different folds, as the two CWE-A ones do."""
    samples = (
        family_of_items("z1", ["CWE-Z", "CWE-Z"])
        + family_of_items("z2", ["CWE-Z", "CWE-Z", "CWE-A"])
        + family_of_items("a1", ["CWE-A", "CWE-A"])
        + family_of_items("a2", ["CWE-A", "CWE-A"])
    )
    folds = folds_of(samples, 2, seed)
    assert all(("z1" in f) != ("z2" in f) and ("a1" in f) != ("a2" in f) for f in folds)


@pytest.mark.parametrize("seed", range(8))
def test_folds_hold_as_many_items_as_the_families_allow(seed):
    """Within a CWE large families are dealt first, and among folds equal in that CWE's and all families the one
    with fewer items takes the next: 5 + 1 items of each of two CWEs make folds of 6 and 6 (small families first
    make 2 and 10); families of 3 + 1 (CWE 1), 1 + 1 (CWE 2) and 2 items (CWE 3) make 4 and 4."""
    large_first = [
        *family_of_items("asmall", ["CWE-1"]),
        *family_of_items("blarge", ["CWE-1"] * 5),
        *family_of_items("csmall", ["CWE-2"]),
        *family_of_items("dlarge", ["CWE-2"] * 5),
    ]
    cumulative = [
        *family_of_items("a", ["CWE-1"] * 3),
        *family_of_items("b", ["CWE-1"]),
        *family_of_items("c", ["CWE-2"]),
        *family_of_items("d", ["CWE-2"]),
        *family_of_items("e", ["CWE-3"] * 2),
    ]
    for samples in (large_first, cumulative):
        sizes = sorted(len(test) for _, test in pair_folds(samples, 2, seed))
        assert sizes[0] == sizes[1], sizes


@pytest.mark.parametrize("seed", range(8))
def test_folds_hold_as_many_families_of_each_cwe_and_in_all_as_they_can(seed):
    """Each CWE's families per fold differ by at most one, counted over the whole CWE (not only its last round),
    and so do all families per fold: a first CWE's large family (6 items) and a second CWE's 4 small families; or
    CWE 1's families of 6, 2 and 2 items and CWE 2's one family."""
    counted = [
        *family_of_items("a", ["CWE-1"] * 6),
        *(item for name in "bcde" for item in family_of_items(name, ["CWE-2"] * 2)),
    ]
    per_fold = [
        *family_of_items("f", ["CWE-1"] * 6),
        *family_of_items("g", ["CWE-1"] * 2),
        *family_of_items("h", ["CWE-1"] * 2),
        *family_of_items("i", ["CWE-2"] * 2),
    ]
    for samples in (counted, per_fold):
        folds = folds_of(samples, 2, seed)
        cwe_of = {s.pair_id: s.cwe for s in samples}
        for cwe in set(cwe_of.values()):
            counts = [sum(cwe_of[name] == cwe for name in fold) for fold in folds]
            assert max(counts) - min(counts) <= 1, (cwe, folds)
        assert abs(len(folds[0]) - len(folds[1])) <= 1, folds
