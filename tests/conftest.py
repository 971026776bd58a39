"""Tiny randomly initialised models (Llama and Qwen2 architectures, `vulnsteer.models.random_model`) with a
byte-level tokenizer built here, so unit tests need no download and run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the command line does, before torch loads
from vulnsteer import models  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HOLMES = SHARED / "secllmholmes"
# Where the `lm` fixture puts its models: "cuda" runs the steering and engine invariants on a GPU (bench/gpu_check.sh).
TEST_DEVICE = os.environ.get("VULNSTEER_TEST_DEVICE", "cpu")

# The unit tests' tiny random models and byte-level tokenizer (the benchmarks' `--smoke` runs on the same).
byte_tokenizer = models.byte_tokenizer
tiny_lm = models.random_model


# The smallest sweep: one steered config (pooled vectors at layer 1, strength 1) on 8 demo items in 3 folds, score
# mode, no transfer matrix. Tests add what they check: `SweepConfig(**{**ONE_CONFIG_SWEEP, "methods": [...]})`.
ONE_CONFIG_SWEEP = dict(
    dataset="demo", limit=8, folds=3, layers=["1"], strengths=[1.0], mode="score", vectors=["pooled"], transfer=False
)


def write_jsonl_dataset(path: Path, samples) -> Path:
    """The samples as a JSONL dataset file (the fields `load_dataset` reads), e.g. a sweep's `train_dataset`."""
    import json
    from dataclasses import asdict

    fields = ("id", "cwe", "label", "language", "code", "pair_id", "source")
    path.write_text("".join(json.dumps({k: v for k, v in asdict(s).items() if k in fields}) + "\n" for s in samples))
    return path


@pytest.fixture(params=["llama", "qwen2"])
def lm(request):
    return tiny_lm(request.param, device=TEST_DEVICE)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own vulnsteer cache, except the packaged-model cache, shared via VULNSTEER_TEST_MODELS."""
    monkeypatch.setenv("VULNSTEER_CACHE", str(tmp_path / "cache"))


def forward_pass_tokens(monkeypatch, tokens: float) -> None:
    """Make one more batch (or prompt-pass group) cost `tokens` of work on every device: 0 plans a group per
    length, 1e9 one group as large as the budget allows."""
    from vulnsteer.engine.planner import FORWARD_PASS_TOKENS

    for device in ("cpu", "cuda"):
        monkeypatch.setitem(FORWARD_PASS_TOKENS, device, tokens)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """The CLI, run in this process as `vulnsteer ARGS`: (exit status, stdout, stderr)."""
    import sys

    from vulnsteer.cli import main

    old, sys.argv = sys.argv, ["vulnsteer", *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err
