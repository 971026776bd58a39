"""Collect real free-text answers of local models across every prompt id, for labelling the verdict parser by hand.

Each model answers `--per-prompt` files under each of the 18 prompt ids (SecLLMHolmes S1-S6, R1-R6, D1-D5 and
strict), files taken in a seeded order that cycles through the CWEs, so prompts and CWEs are spread. The answers come
from the engine that `vulnsteer eval --mode generate` runs (appended to `<output>/<model>.jsonl` one by one, so a
rerun resumes), greedy, from the packaged GGUF weights: by default served by llama.cpp's `llama-server` (`--engine
llama`, the path of `vulnsteer eval --model openai:NAME`; far cheaper on a busy 2-core CPU), or dequantised into
torch float32 (`--engine torch`, the default path of `vulnsteer eval`). Distinct answers are then split, seeded and
stratified by model and prompt, into a tuning half and a held-out half, written unlabelled as `tuning.jsonl` and
`heldout.jsonl` in the output folder. `--report FILE...` prints the agreement table of files labelled by hand.

    nice -n 10 python bench/collect_answers.py --model smollm2-135m-instruct=8 \
        --model qwen2.5-coder-0.5b-instruct=5 -o runs/answers
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import time
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from common import bench_model

from vulnsteer.data import Sample, filter_samples, load_dataset
from vulnsteer.engine.api import ApiModel, evaluate_api
from vulnsteer.engine.evaluate import evaluate
from vulnsteer.extract.llama_cpp import LlamaServer
from vulnsteer.metrics import wilson_interval
from vulnsteer.models import gguf_path, pull
from vulnsteer.pipeline import make_jobs, prompt_resources
from vulnsteer.prompts import PROMPT_IDS, needs_resources
from vulnsteer.records import Decoding, Job, Mode, Result
from vulnsteer.verdicts import parse_verdict

SETS = ("tuning", "heldout")


def spread(samples: list[Sample], seed: int) -> list[Sample]:
    """Samples in a seeded order that takes one of each CWE in turn, so any run of picks spreads the CWEs."""
    rng = random.Random(seed)
    by_cwe: dict[str, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.id):
        by_cwe.setdefault(s.cwe, []).append(s)
    for group in by_cwe.values():
        rng.shuffle(group)
    rounds = itertools.zip_longest(*(by_cwe[c] for c in sorted(by_cwe)))
    return [s for round_ in rounds for s in round_ if s is not None]


def plan_jobs(
    samples: list[Sample], per_prompt: int, seed: int, dataset: str, prompt_ids: tuple[str, ...] = PROMPT_IDS
) -> list[Job]:
    """`per_prompt` files for each prompt id, continuing the CWE-spread order from one prompt to the next; ordered
    round by round (one job of every prompt, then the next), so a collection cut short still covers every prompt."""
    order = itertools.cycle(spread(samples, seed))
    resources = prompt_resources(dataset)
    by_prompt = [make_jobs([next(order) for _ in range(per_prompt)], p, resources) for p in prompt_ids]
    return [job for round_ in zip(*by_prompt) for job in round_]


def collect(
    answer: Callable[[Job], Result],
    model: str,
    jobs: list[Job],
    path: Path,
    deadline: float,
    skip: frozenset[tuple[str, str, str]] = frozenset(),
) -> None:
    """Answer the jobs not yet in `path` (resumable) nor in `skip` (model, prompt, sample id: answers of an earlier
    collection), appending one row per answer as it comes, until `deadline`."""
    done = {(r["prompt"], r["sample_id"]) for r in read_rows(path)} | {(p, s) for m, p, s in skip if m == model}
    with open(path, "a", encoding="utf-8") as f:
        for job in jobs:
            if (job.prompt_id, job.sample.id) in done:
                continue
            if time.monotonic() > deadline:
                print(f"{model}: time is up, {len(read_rows(path))} of {len(jobs)} answers")
                return
            r = answer(job)
            row = {"model": model, "prompt": r.prompt_id, "sample_id": r.sample_id, "cwe": r.cwe, "answer": r.response}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()


def answer_one(run: Callable, model, decoding: Decoding, job: Job) -> Result:
    """One job through an engine (`evaluate` or `evaluate_api`), so that each answer is stored as it comes."""
    return run(model, [job], decoding)[0]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_answers(rows: list[dict], seed: int, earlier: Sequence[dict] = ()) -> list[dict]:
    """Distinct answers (the first of identical texts kept, none equal to an `earlier` one), each given a `set`.
    Within each model and prompt, the answers in collection order form pairs; the answers left without one (in
    collection order) pair up among themselves; a seeded coin sends one of each pair to the tuning half and the other
    to the held-out half, and a last unpaired answer is held out. Stratified by model and prompt, and fixed for each
    answer paired within its model and prompt as soon as its pair is in, so tuning can start on a collection still
    running; an answer paired with another group's leftover can still change half, so label only the former then."""
    seen = {r["answer"] for r in earlier}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["answer"] not in seen:
            seen.add(r["answer"])
            groups.setdefault((r["model"], r["prompt"]), []).append(r)
    pairs = [(key, group[k : k + 2]) for key, group in groups.items() for k in range(0, len(group) - 1, 2)]
    left = [group[-1] for group in groups.values() if len(group) % 2]
    pairs += [(("left", str(k)), left[k : k + 2]) for k in range(0, len(left), 2)]
    out: list[dict] = []
    for key, pair in pairs:
        first = SETS[random.Random(f"{seed}/{key[0]}/{key[1]}").random() < 0.5] if len(pair) == 2 else "heldout"
        out += [{**r, "set": first if j == 0 else SETS[first == "tuning"]} for j, r in enumerate(pair)]
    return out


def keyword_verdict(text: str) -> str:
    """The original experiment's rule: any mention of "vulnerab" means yes."""
    return "vulnerable" if "vulnerab" in text.lower() else "not_vulnerable"


def report(paths: list[Path]) -> None:
    """Agreement of the parser and of the keyword rule with the hand labels of each file, per model and in all, with
    Wilson 95% intervals, and how many answers are in another language (Markdown table rows). Files named alike but for
    a trailing number (answers_heldout2, answers_heldout3: halves of two collections) are also pooled."""
    print("| set | model | n | parser right | parser share | keyword rule right | keyword share | other language |")
    print("|---|---|---|---|---|---|---|---|")
    sets = {path.stem: read_rows(path) for path in paths}
    pools: dict[str, list[str]] = {}
    for stem in sets:
        pools.setdefault(re.sub(r"\d+$", "", stem), []).append(stem)
    sets |= {
        f"{pool} (pooled)": [r for stem in stems for r in sets[stem]] for pool, stems in pools.items() if len(stems) > 1
    }
    for name, rows in sets.items():
        for model in sorted({r["model"] for r in rows}) + ["all"]:
            group = [r for r in rows if model in ("all", r["model"])]
            n = len(group)
            ours = sum(parse_verdict(r["answer"], r["cwe"]) == r["label"] for r in group)
            keyword = sum(keyword_verdict(r["answer"]) == r["label"] for r in group)
            other = sum(r["language"] != "en" for r in group)
            shares = [wilson_interval(k, n) for k in (ours, keyword)]
            print(
                f"| {name} | {model} | {n} | {ours} | {shares[0].value:.3f} [{shares[0].low:.2f},"
                f"{shares[0].high:.2f}] | {keyword} | {shares[1].value:.3f} [{shares[1].low:.2f},"
                f"{shares[1].high:.2f}] | {other} |"
            )


def parse_model(spec: str) -> tuple[str, int]:
    name, _, count = spec.partition("=")
    return name, int(count or 6)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        action="append",
        type=parse_model,
        default=[],
        help="NAME=FILES_PER_PROMPT, e.g. smollm2-135m-instruct=8 (repeatable)",
    )
    parser.add_argument("--dataset", default="../shared/datasets/secllmholmes", help="SecLLMHolmes datasets folder")
    parser.add_argument("--split", default="hand-crafted", help="dataset split the files come from")
    parser.add_argument("--demo", type=int, default=8, help="also this many files of the built-in demo set")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument(
        "--engine",
        choices=("llama", "torch"),
        default="llama",
        help="llama: llama-server on the GGUF file; torch: the weights in float32 (slow on a CPU)",
    )
    parser.add_argument("--threads", type=int, default=1, help="llama-server threads (more spin-wait on a busy CPU)")
    parser.add_argument("--minutes", type=float, default=25.0, help="stop generating after this long (rerun resumes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("runs/answers"))
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny random model on the demo set (seconds; its answers mean nothing)"
    )
    parser.add_argument("--report", type=Path, nargs="+", help="only print the agreement table of labelled files")
    parser.add_argument(
        "--exclude",
        type=Path,
        nargs="+",
        default=[],
        help="answer files of an earlier collection: their jobs and answer texts are left out, so the "
        "new answers are new and get a split of their own",
    )
    args = parser.parse_args(argv)
    if args.report:
        report(args.report)
        return

    if args.smoke:  # the unit tests' tiny random model on the demo set, the prompts that need no dataset files
        args.model, args.engine, args.max_new_tokens, args.dataset = [("smoke", 1)], "torch", 4, "demo"
    samples = load_dataset(args.dataset)
    if not args.smoke:
        samples = filter_samples(samples, splits=[args.split]) + spread(load_dataset("demo"), args.seed)[: args.demo]
    prompt_ids = tuple(p for p in PROMPT_IDS if not (args.smoke and needs_resources(p)))
    decoding = Decoding(Mode.GENERATE, args.max_new_tokens, args.batch_tokens, final_answer=False)
    deadline = time.monotonic() + 60 * args.minutes
    args.output_dir.mkdir(parents=True, exist_ok=True)
    earlier = [r for p in args.exclude for r in read_rows(p)]
    skip = frozenset((r["model"], r["prompt"], r["sample_id"]) for r in earlier)
    rows = []
    for model, per_prompt in args.model:
        jobs = plan_jobs(samples, per_prompt, args.seed, args.dataset, prompt_ids)
        path = args.output_dir / f"{model}.jsonl"
        if args.engine == "llama":
            pull(model, quiet=True)
            with LlamaServer(gguf_path(model), threads=args.threads, context=8192, extra=["-np", "1"]) as server:
                api = ApiModel(model, f"{server.url}/v1", concurrency=1, timeout=600)
                collect(partial(answer_one, evaluate_api, api, decoding), model, jobs, path, deadline, skip)
        else:
            lm = bench_model(model, args.smoke)
            collect(partial(answer_one, evaluate, lm, decoding), model, jobs, path, deadline, skip)
        rows += read_rows(path)
    split = split_answers(rows, args.seed, earlier)
    for name in SETS:
        with open(args.output_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in split:
                if r["set"] == name:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(
        f"{len(rows)} answers, {len(split)} distinct: "
        + ", ".join(f"{sum(r['set'] == n for r in split)} {n}" for n in SETS)
    )


if __name__ == "__main__":
    main()
