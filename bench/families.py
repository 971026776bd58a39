"""Near-duplicate families on real data (docs/protocol.md): per dataset the pairs' families against the families
across sources and their largest size, the seconds `families` takes, and, per train/test combination, how many
test items a sweep with `--train-dataset` would refuse (or drop with `--drop-overlap`).

    python bench/families.py ../shared/datasets
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

from vulnsteer.data import family, load_dataset
from vulnsteer.protocol import families, overlapping, training_keys, with_families


def main(datasets: Path) -> None:
    holmes = load_dataset(str(datasets / "secllmholmes"))
    sven = load_dataset(str(datasets / "sven" / "sven.jsonl"))
    hand = [s for s in holmes if s.split == "hand-crafted"]
    augmented = [s for s in holmes if s.split.startswith("augmented")]
    for name, items in (("SecLLMHolmes", holmes), ("SVEN", sven)):
        start = time.perf_counter()
        groups = Counter(families(items))
        seconds = time.perf_counter() - start
        print(f"{name}: {len(items)} items, {len({family(s) for s in items})} pair families, {len(groups)} "
              f"families across sources (largest {max(groups.values())} items), {seconds:.1f} s")
    for train_name, train, test_name, test in (("SVEN", sven, "SecLLMHolmes hand-crafted", hand),
                                               ("SecLLMHolmes augmented", augmented, "SecLLMHolmes hand-crafted", hand),
                                               ("SecLLMHolmes", holmes, "SVEN", sven)):
        leaked = {s.id for s in overlapping(test, set(training_keys(train)))}
        print(f"train {train_name}, test {test_name}: {len(leaked)} of {len(test)} test items overlap; "
              f"{len(with_families(test, leaked))} with their families")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets"))
