"""What a step of fitting a learned intervention costs, against one forward pass over the same items.

`trained` vectors and `loreft` edits train at the last prompt token on a cached prefix (`extract/trained.py`): each
step runs every item's last token once per (group, layer) copy, and backpropagates through those tokens only. Side
by side, in one process: the prefix pass (once per sweep), one full forward pass over the items (what scoring them
costs), and a training step of each method; reported per item-step as a ratio to one item's forward pass.

    python bench/learned.py --model smollm2-135m-instruct --items 24 --layers 15 --steps 5 \
        --output bench/results/learned.json
    python bench/learned.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import bench_model, run_info, write_report

from vulnsteer.data import filter_samples, load_demo
from vulnsteer.engine.runners import encode
from vulnsteer.extract.trained import Training, prefix_pass, score_text, train_edits, train_vectors
from vulnsteer.extract.vectors import POOLED, parse_layers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--items", type=int, default=24)
    p.add_argument("--layers", default="15", help="steered layers, as --layers takes them (one copy each)")
    p.add_argument(
        "--groups",
        choices=("pooled", "cwe+pooled"),
        default="pooled",
        help="pooled: one copy per layer; cwe+pooled: two (the item's CWE and pooled)",
    )
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="a tiny random model, 4 items, 2 steps, 1 repeat")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if min(args.items, args.steps, args.rank, args.repeats) < 1:
        p.error("--items, --steps, --rank and --repeats must be at least 1")
    if args.smoke:
        args.items, args.steps, args.repeats, args.layers = 4, 2, 1, "1"
    lm = bench_model(args.model, args.smoke)
    items = filter_samples(load_demo(), None, None, args.items)
    layers = parse_layers(args.layers, lm.num_layers)
    groups = [POOLED] + (sorted({s.cwe for s in items}) if args.groups == "cwe+pooled" else [])
    copies = len(layers) * (2 if args.groups == "cwe+pooled" else 1)
    encoded = encode(lm, [score_text(lm, s, "S1", None) for s in items])
    settings = Training(steps=args.steps, rank=args.rank)

    def forward() -> None:
        with torch.no_grad():
            lm.model(**encoded, logits_to_keep=1)

    started = time.perf_counter()
    prefix = prefix_pass(lm, items)
    prefix_s = time.perf_counter() - started
    arms: dict[str, list[float]] = {"forward": [], "trained": [], "loreft": []}
    norms = {layer: 1.0 for layer in layers}
    forward()  # warm-up
    for _ in range(args.repeats):
        for name, run in (
            ("forward", forward),
            ("trained", lambda: train_vectors(lm, prefix, items, groups, layers, norms, POOLED, settings)),
            ("loreft", lambda: train_edits(lm, prefix, items, groups, layers, POOLED, settings)),
        ):
            start = time.perf_counter()
            run()
            arms[name].append(time.perf_counter() - start)
    forward_s = statistics.median(arms["forward"])
    report: dict = {
        "machine": {**run_info(), "torch_threads": torch.get_num_threads()},
        "config": {
            "model": lm.model_id,
            "items": len(items),
            "layers": layers,
            "groups": args.groups,
            "copies_per_item": copies,
            "steps": args.steps,
            "rank": args.rank,
            "smoke": args.smoke,
            "prompt_tokens_mean": float(encoded["attention_mask"].sum(1).float().mean()),
        },
        "prefix_pass_s": prefix_s,
        "seconds": arms,
        "ratios": {},
    }
    for name in ("trained", "loreft"):
        per_step = statistics.median(arms[name]) / args.steps
        report["ratios"][f"{name}: item-step / item forward"] = per_step / forward_s
        print(
            f"{name}: {per_step:.3f} s a step over {len(items)} items x {copies} copies = "
            f"{per_step / forward_s:.2f} forward passes over the items (one pass: {forward_s:.3f} s)"
        )
    print(f"prefix pass, once for every fold and step: {prefix_s:.2f} s")
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
