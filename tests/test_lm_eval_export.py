"""`vulnsteer vectors export --format lm-eval`, checked against the real lm-evaluation-harness: `lm_eval --model
steered` on a tiny local model and a local task gives the log-likelihoods vulnsteer's own hooks give under the same
steering, and others than unsteered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_lm

from vulnsteer.extract.lm_eval import continuation_log_likelihood, loglikelihood_task
from vulnsteer.extract.vectors import VectorBank, save
from vulnsteer.records import Steering

pytest.importorskip("lm_eval", reason="lm-eval is in the test extra")

DOCS = [
    {"context": "int a[4]; for (i = 0; i <= 4; i++) a[i] =", "target": " 0;"},
    {"context": "char buf[8]; strcpy(buf,", "target": " argv[1]);"},
    {"context": "free(p); p->next =", "target": " NULL;"},
]


def test_lm_eval_steered_model_reads_our_export_and_scores_as_our_hooks(tmp_path):
    lm = tiny_lm("llama")
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(5)
    vectors = {"pooled": {layer: torch.randn(lm.hidden_size, generator=g) * 3 for layer in range(lm.num_layers)}}
    meta = {
        "model": "tiny",
        "model_type": lm.model.config.model_type,
        "hidden_size": lm.hidden_size,
        "num_layers": lm.num_layers,
        "method": "mean-diff",
    }
    save(VectorBank(vectors, meta), tmp_path / "vectors.safetensors")
    steer_file = tmp_path / "steer.pt"
    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "vulnsteer.cli",
            "vectors",
            "export",
            str(tmp_path / "vectors.safetensors"),
            "--format",
            "lm-eval",
            "--layers",
            "1,2",
            "--strength",
            "1.5",
            "-o",
            str(steer_file),
        ],
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "vulnsteer_tiny.yaml").write_text(loglikelihood_task("vulnsteer_tiny", tmp_path / "docs.jsonl"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "steered",
            "--model_args",
            f"pretrained={model_dir},steer_path={steer_file},dtype=float32",
            "--tasks",
            "vulnsteer_tiny",
            "--include_path",
            str(tasks),
            "--device",
            "cpu",
            "--batch_size",
            "1",
            "--log_samples",
            "--output_path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (samples_file,) = (tmp_path / "out").rglob("samples_vulnsteer_tiny_*.jsonl")
    logged = [json.loads(line) for line in samples_file.read_text().splitlines()]
    theirs = {row["doc"]["context"]: float(row["resps"][0][0][0]) for row in logged}

    rows = [Steering({layer: vectors["pooled"][layer] for layer in (1, 2)}, 1.5, "all")]
    for doc in DOCS:
        ours = continuation_log_likelihood(lm, doc["context"], doc["target"], rows)
        unsteered = continuation_log_likelihood(lm, doc["context"], doc["target"])
        assert theirs[doc["context"]] == pytest.approx(ours, abs=1e-4)
        assert abs(theirs[doc["context"]] - unsteered) > 1e-3, "the steering changed nothing"


def test_export_refuses_a_layer_the_file_lacks_and_lm_eval_without_a_strength(tmp_path):
    meta = {"model": "tiny", "model_type": "llama", "hidden_size": 8, "num_layers": 4, "method": "mean-diff"}
    save(VectorBank({"pooled": {1: torch.ones(8)}}, meta), tmp_path / "v.safetensors")
    for extra, message in ((["--layers", "2", "--strength", "1"], "has no layer 2"), ([], "needs --strength")):
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "vulnsteer.cli",
                "vectors",
                "export",
                str(tmp_path / "v.safetensors"),
                "--format",
                "lm-eval",
                *extra,
                "-o",
                str(tmp_path / "s.pt"),
            ],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 1 and "Traceback" not in run.stderr and message in run.stderr, run.stderr
    assert not Path(tmp_path / "s.pt").exists()
