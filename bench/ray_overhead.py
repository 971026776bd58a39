"""What Ray adds per shard: the same score-mode rows (demo files x 2 prompt strategies, packaged
smollm2-135m-instruct, float32, CPU) evaluated three ways, side by side, after a warm-up run of each: the local
engine on all rows at once; the local engine on the shards a cluster run cuts, one after another (what sharding
alone costs: batches never span shards); one Ray worker holding the same model with the machine's CPUs (sharding
plus Ray's scheduling, serialisation and streaming). Model loading and actor start are left out (once per worker
per sweep).

    python bench/ray_overhead.py [--repeats 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile

import torch
from common import timed

from vulnsteer.data import load_demo
from vulnsteer.experiments.backends import LocalBackend
from vulnsteer.experiments.cluster import SHARDS_PER_WORKER, ClusterOptions, RayBackend, job_cost, shards
from vulnsteer.models import load_model, random_model
from vulnsteer.pipeline import make_jobs
from vulnsteer.prompts import PromptResources
from vulnsteer.records import Decoding, Mode

MODEL = "smollm2-135m-instruct"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: a tiny random model saved to a temporary folder, 4 items, 1 repeat (checks the "
        "script runs; its numbers mean nothing)",
    )
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    resources = PromptResources.from_dataset_root(None)
    items = load_demo()[:4] if args.smoke else load_demo()
    jobs = [job for prompt in ("S1", "S2") for job in make_jobs(items, prompt, resources)]
    decoding = Decoding(Mode.SCORE, batch_tokens=8192)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            tiny = random_model("qwen2")
            tiny.model.save_pretrained(tmp)
            tiny.tokenizer.save_pretrained(tmp)
            model, repeats = tmp, 1
        else:
            model, repeats = MODEL, args.repeats
        local = LocalBackend(load_model(model, dtype=torch.float32, device="cpu"))
        cut = shards([job_cost(j, decoding) for j in jobs], [j.sample.id for j in jobs], SHARDS_PER_WORKER)

        def sharded() -> None:
            for shard in cut:
                local.evaluate([jobs[i] for i in shard], decoding)

        runs = {
            "local": timed(lambda: local.evaluate(jobs, decoding), repeats, warm_up=True),
            "local_sharded": timed(sharded, repeats, warm_up=True),
        }
        cluster = RayBackend(ClusterOptions("local", workers=1), str(model), {"dtype": "float32"}, "score")
        try:
            runs["ray_1_worker"] = timed(lambda: cluster.evaluate(jobs, decoding), repeats, warm_up=True)
        finally:
            cluster.close()
    median = {name: statistics.median(times) for name, times in runs.items()}
    print(
        json.dumps(
            {
                "rows": len(jobs),
                "shards": len(cut),
                "repeats": repeats,
                "torch_threads": torch.get_num_threads(),
                "smoke": args.smoke,
                "seconds": {name: [round(t, 2) for t in times] for name, times in runs.items()},
                "ratio_sharded_to_local": round(median["local_sharded"] / median["local"], 3),
                "ratio_ray_to_local_sharded": round(median["ray_1_worker"] / median["local_sharded"], 3),
                "ray_overhead_per_shard_ms": round(
                    1000 * (median["ray_1_worker"] - median["local_sharded"]) / len(cut), 1
                ),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
