"""lm-evaluation-harness's `steered` model, reading a file from `vulnsteer vectors export --format lm-eval`, against
vulnsteer's own hooks: log-likelihoods of the last line of 16 demo files given the lines before, on the packaged
smollm2-135m-instruct model, float32, CPU.

    python bench/lm_eval_agreement.py VECTORS.safetensors OUT_DIR [--strength 0.5] [--layer 15]
    python bench/lm_eval_agreement.py --smoke OUT_DIR      (a tiny random model and a random vector: seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from vulnsteer.data import load_demo
from vulnsteer.extract.lm_eval import continuation_log_likelihood, loglikelihood_task
from vulnsteer.extract.vectors import VectorBank, load, save
from vulnsteer.models import LoadedModel, load_model, random_model
from vulnsteer.records import Positions, Steering


def smoke_model(here: Path) -> tuple[LoadedModel, Path, Path]:
    """A tiny random model saved where lm-eval can load it, and a random pooled vector at its layer 2."""
    lm = random_model("llama")
    folder = here / "model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    meta = {
        "model": "tiny",
        "model_type": lm.model.config.model_type,
        "hidden_size": lm.hidden_size,
        "num_layers": lm.num_layers,
        "method": "mean-diff",
    }
    vector = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(5)) * 3
    save(VectorBank({"pooled": {2: vector}}, meta), here / "vectors.safetensors")
    return lm, folder, here / "vectors.safetensors"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("vectors", type=Path, nargs="?", help="a vector file with a pooled vector at --layer")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny random model, 4 documents (its numbers mean nothing: it checks that the script runs)",
    )
    args = p.parse_args(argv)
    here = args.out_dir
    here.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        lm, folder, vectors = smoke_model(here)
        layer, n_docs = 2, 4
    elif args.vectors is None:
        p.error("give a vector file (or --smoke)")
    else:
        lm = load_model("smollm2-135m-instruct", device="cpu")
        folder, vectors, layer, n_docs = Path(lm.source), args.vectors, args.layer, 16
    bank = load(vectors)
    docs = []
    for s in load_demo()[:n_docs]:
        lines = s.code.strip().splitlines()
        if len(lines) >= 3:
            docs.append({"context": "\n".join(lines[:-1]) + "\n", "target": lines[-1]})
    (here / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (here / "tasks").mkdir(exist_ok=True)
    (here / "tasks" / "demo_code.yaml").write_text(loglikelihood_task("demo_code", here / "docs.jsonl"))

    subprocess.run(
        [
            sys.executable,
            "-m",
            "vulnsteer.cli",
            "vectors",
            "export",
            str(vectors),
            "--format",
            "lm-eval",
            "--layers",
            str(layer),
            "--strength",
            str(args.strength),
            "-o",
            str(here / "steer.pt"),
        ],
        check=True,
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "steered",
            "--model_args",
            f"pretrained={folder},steer_path={here / 'steer.pt'},dtype=float32",
            "--tasks",
            "demo_code",
            "--include_path",
            str(here / "tasks"),
            "--device",
            "cpu",
            "--batch_size",
            "1",
            "--log_samples",
            "--output_path",
            str(here / "out"),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    (samples,) = sorted((here / "out").rglob("samples_demo_code_*.jsonl"))[-1:]
    logged = [json.loads(line) for line in samples.read_text().splitlines()]
    theirs = {row["doc"]["context"]: float(row["resps"][0][0][0]) for row in logged}

    rows = [Steering({layer: bank.for_group("pooled")[layer]}, args.strength, Positions.ALL)]
    diffs, moves = [], []
    for d in docs:
        ours = continuation_log_likelihood(lm, d["context"], d["target"], rows)
        base = continuation_log_likelihood(lm, d["context"], d["target"])
        diffs.append(abs(theirs[d["context"]] - ours))
        moves.append(abs(ours - base))
    print(
        json.dumps(
            {
                "docs": len(docs),
                "strength": args.strength,
                "smoke": args.smoke,
                "max_abs_diff_lm_eval_vs_vulnsteer": max(diffs),
                "mean_abs_steering_effect": sum(moves) / len(moves),
                "min_abs_steering_effect": min(moves),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
