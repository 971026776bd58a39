"""Near-duplicate families on real data (docs/protocol.md): per dataset the pairs' families against the families
across sources and their largest size, the seconds `families` takes, and, per train/test combination, how many
test items a sweep with `--train-dataset` would refuse (or drop with `--drop-overlap`).

    python bench/families.py ../shared/datasets
    python bench/families.py --smoke      # the built-in demo only: that the script runs
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from vulnsteer.data import Sample, family, load_dataset, load_demo
from vulnsteer.protocol import families, overlapping, training_keys, with_families


def describe(name: str, items: list[Sample]) -> None:
    start = time.perf_counter()
    groups = Counter(families(items))
    seconds = time.perf_counter() - start
    print(
        f"{name}: {len(items)} items, {len({family(s) for s in items})} pair families, {len(groups)} families "
        f"across sources (largest {max(groups.values())} items), {seconds:.1f} s"
    )


def overlap(train_name: str, train: list[Sample], test_name: str, test: list[Sample]) -> None:
    leaked = {s.id for s in overlapping(test, set(training_keys(train)))}
    print(
        f"train {train_name}, test {test_name}: {len(leaked)} of {len(test)} test items overlap; "
        f"{len(with_families(test, leaked))} with their families"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "datasets",
        nargs="?",
        type=Path,
        default=Path("../shared/datasets"),
        help="the folder holding secllmholmes/ and sven/sven.jsonl",
    )
    p.add_argument("--smoke", action="store_true", help="the built-in demo only")
    args = p.parse_args()
    if args.smoke:
        demo = load_demo()
        describe("demo", demo)
        overlap("demo's first half", demo[: len(demo) // 2], "demo", demo)
        return
    holmes = load_dataset(str(args.datasets / "secllmholmes"))
    sven = load_dataset(str(args.datasets / "sven" / "sven.jsonl"))
    hand = [s for s in holmes if s.split == "hand-crafted"]
    describe("SecLLMHolmes", holmes)
    describe("SVEN", sven)
    overlap("SVEN", sven, "SecLLMHolmes hand-crafted", hand)
    overlap(
        "SecLLMHolmes augmented",
        [s for s in holmes if s.split.startswith("augmented")],
        "SecLLMHolmes hand-crafted",
        hand,
    )
    overlap("SecLLMHolmes", holmes, "SVEN", sven)


if __name__ == "__main__":
    main()
