"""How close score-mode rows come to this machine's limit, and what sharing a prompt's unsteered prefix buys.

For K steering configs (random same-norm directions at the original experiment's relative depths) on N items in
score mode (float32, as the main job scores), at positions `prompt-last` (the original experiment's) and `all`:
rows/s, and the FLOPs those rows need at the least (matmuls of every decoder layer over each prompt's tokens plus
causal attention, the language-model head at the last token; `all` rows pay the layers from their first steered one
up, the layers below being shared with the prompt), divided by the seconds, set against the float32 matmul FLOP/s
that torch reaches on this machine in the same run. Then, side by side (interleaved, same process): the engine
running each prompt's prompt-last configs on one pass over its unsteered prefix, against each config in its own
pass (the prefix recomputed K times).

    python bench/flops.py --model smollm2-135m-instruct --items 16 --k 8 --repeats 3 --output bench/results/flops.json
    python bench/flops.py --smoke      (a tiny random model: seconds; its numbers mean nothing)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import bench_model, run_info, timed, write_report

from vulnsteer.data import filter_samples, load_demo
from vulnsteer.engine.evaluate import evaluate
from vulnsteer.extract.vectors import relative_layer
from vulnsteer.models import LoadedModel
from vulnsteer.pipeline import make_jobs
from vulnsteer.prompts import PromptResources
from vulnsteer.records import Decoding, Job, Mode, Positions, Steering

DEPTHS = (0.25, 0.5, 0.75, 1.0)


def matmul_flops(n: int, iterations: int) -> float:
    """Float32 FLOP/s of an n x n matmul with torch's threads: the machine's practical peak for this work."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(iterations):
        a @ b
    return 2 * n**3 * iterations / (time.perf_counter() - start)


def linear_parameters(lm: LoadedModel) -> tuple[int, int]:
    """Weights of the decoder layers' matmuls (every token runs them), and of the language-model head."""
    head = lm.model.get_output_embeddings()
    layers = sum(
        m.weight.numel() for name, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
    )
    return layers, head.weight.numel()


def prompt_flops(lm: LoadedModel, tokens: int, from_layer: int = 0) -> float:
    """FLOPs of one pass over a prompt of `tokens` from `from_layer` up: 2 per weight per token, causal attention
    (QK^T and AV over on average half the context), the head at the last token only."""
    layers, head = linear_parameters(lm)
    share = (lm.num_layers - from_layer) / lm.num_layers
    attention = 2 * lm.num_layers * lm.hidden_size * tokens**2
    return share * (2 * layers * tokens + attention) + 2 * head


def configs(lm: LoadedModel, k: int, positions: Positions) -> list[Steering]:
    layers = sorted({relative_layer(d, lm.num_layers) for d in DEPTHS})
    g = torch.Generator().manual_seed(0)
    return [
        Steering({layer: torch.randn(lm.hidden_size, generator=g) for layer in layers}, 1.0, positions)
        for _ in range(k)
    ]


def steered(jobs: list[Job], rows: list[Steering]) -> list[list[Job]]:
    return [[Job(j.sample, j.prompt_id, j.prompt, row) for j in jobs] for row in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--items", type=int, default=16, help="demo items (whole pairs)")
    p.add_argument("--k", type=int, default=8, help="steering configs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--smoke", action="store_true", help="a tiny random model, 4 items, K=2, one repeat")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if min(args.items, args.k, args.repeats, args.matmul_n) < 1:
        p.error("--items, --k, --repeats and --matmul-n must be at least 1")
    if args.smoke:
        args.items, args.k, args.repeats, args.matmul_n = 4, 2, 1, 256
    lm = bench_model(args.model, args.smoke)
    samples = filter_samples(load_demo(), None, None, args.items)
    jobs = make_jobs(samples, "S1", PromptResources())
    decoding = Decoding(Mode.SCORE, final_answer=False)
    tokens = [r.prompt_tokens for r in evaluate(lm, jobs, decoding)]  # also the warm-up
    peak = matmul_flops(args.matmul_n, 3 if args.smoke else 20)

    report: dict = {
        "machine": {**run_info(), "torch_threads": torch.get_num_threads()},
        "config": {
            "model": lm.model_id,
            "items": len(jobs),
            "k": args.k,
            "repeats": args.repeats,
            "prompt_tokens_mean": statistics.mean(tokens),
            "smoke": args.smoke,
        },
        "matmul_flops_per_s": peak,
        "arms": {},
    }
    first = min(relative_layer(d, lm.num_layers) for d in DEPTHS)
    # prompt-last: one prefix pass per item serves its K rows; all: each row runs from its first steered layer up,
    # the layers below once per item.
    below = sum(prompt_flops(lm, t) - prompt_flops(lm, t, first) for t in tokens)
    needed = {
        "prompt-last": sum(prompt_flops(lm, t) for t in tokens),
        "all": args.k * sum(prompt_flops(lm, t, first) for t in tokens) + below,
    }
    for positions in (Positions.PROMPT_LAST, Positions.ALL):
        rows = [j for group in steered(jobs, configs(lm, args.k, positions)) for j in group]
        times = timed(lambda rows=rows: evaluate(lm, rows, decoding), args.repeats)
        seconds = statistics.median(times)
        report["arms"][positions] = {
            "rows": len(rows),
            "seconds": times,
            "rows_per_s": len(rows) / seconds,
            "flops_needed": needed[positions],
            "flops_per_s": needed[positions] / seconds,
            "share_of_matmul_peak": needed[positions] / seconds / peak,
        }

    # Prefix reuse, side by side: all K configs in one call (each prompt's prefix once) vs one call per config.
    groups = steered(jobs, configs(lm, args.k, Positions.PROMPT_LAST))
    together, separate = [], []
    for _ in range(args.repeats):
        together += timed(lambda: evaluate(lm, [j for g in groups for j in g], decoding), 1)
        separate += timed(lambda: [evaluate(lm, g, decoding) for g in groups], 1)
    report["prefix_reuse"] = {
        "shared_s": together,
        "separate_s": separate,
        "separate_over_shared": statistics.median(separate) / statistics.median(together),
    }
    for positions, arm in report["arms"].items():
        print(
            f"{positions:>12}: {arm['rows_per_s']:.1f} rows/s, {arm['flops_per_s'] / 1e9:.1f} GFLOP/s needed-work "
            f"rate = {100 * arm['share_of_matmul_peak']:.0f}% of the {peak / 1e9:.1f} GFLOP/s matmul peak"
        )
    print(
        f"prefix reuse (prompt-last, K={args.k}): separate / shared = "
        f"{report['prefix_reuse']['separate_over_shared']:.2f}x"
    )
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
