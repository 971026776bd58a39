"""lm-evaluation-harness's `steered` model, reading a file from `vulnsteer vectors export --format lm-eval`, against
vulnsteer's own hooks: log-likelihoods of the last line of 16 demo files given the lines before, on the packaged
smollm2-135m-instruct model, float32, CPU.

    python bench/lm_eval_agreement.py VECTORS.safetensors OUT_DIR [STRENGTH]   (vectors with a layer-15 pooled one)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from vulnsteer.data import load_demo
from vulnsteer.extract.lm_eval import continuation_log_likelihood, loglikelihood_task
from vulnsteer.extract.vectors import load
from vulnsteer.models import load_model
from vulnsteer.records import Steering

vectors, here = Path(sys.argv[1]), Path(sys.argv[2])
here.mkdir(parents=True, exist_ok=True)
lm = load_model("smollm2-135m-instruct", device="cpu")
bank = load(vectors)
strength = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
docs = []
for s in load_demo()[:16]:
    lines = s.code.strip().splitlines()
    if len(lines) >= 3:
        docs.append({"context": "\n".join(lines[:-1]) + "\n", "target": lines[-1]})
(here / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
(here / "tasks").mkdir(exist_ok=True)
(here / "tasks" / "demo_code.yaml").write_text(loglikelihood_task("demo_code", here / "docs.jsonl"))

subprocess.run([sys.executable, "-m", "vulnsteer.cli", "vectors", "export", str(vectors),
                "--format", "lm-eval", "--layers", "15", "--strength", str(strength), "-o", str(here / "steer.pt")],
               check=True)
env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
folder = lm.source
subprocess.run([sys.executable, "-m", "lm_eval", "--model", "steered", "--model_args",
                f"pretrained={folder},steer_path={here / 'steer.pt'},dtype=float32", "--tasks", "demo_code",
                "--include_path", str(here / "tasks"), "--device", "cpu", "--batch_size", "1", "--log_samples",
                "--output_path", str(here / "out")], check=True, env=env, capture_output=True)
(samples,) = sorted((here / "out").rglob("samples_demo_code_*.jsonl"))[-1:]
logged = [json.loads(line) for line in samples.read_text().splitlines()]
theirs = {row["doc"]["context"]: float(row["resps"][0][0][0]) for row in logged}


rows = [Steering({15: bank.for_group("pooled")[15]}, strength, "all")]
diffs, moves = [], []
for d in docs:
    ours = continuation_log_likelihood(lm, d["context"], d["target"], rows)
    base = continuation_log_likelihood(lm, d["context"], d["target"])
    diffs.append(abs(theirs[d["context"]] - ours))
    moves.append(abs(ours - base))
print(json.dumps({"docs": len(docs), "strength": strength, "max_abs_diff_lm_eval_vs_vulnsteer": max(diffs),
                  "mean_abs_steering_effect": sum(moves) / len(moves), "min_abs_steering_effect": min(moves)}))
