"""CPU benchmark of vulnsteer's evaluation engine: one entry point, seven measurements.

(a) `one`: the original experiment's way (one sample per `generate` call, no batching), `batched`: one
    `evaluate` call in generate mode (length-grouped batches), `score`: one `evaluate` call in score mode
    (a single forward pass, last-token logits). Same model, same samples, same max_new_tokens; the arms are
    interleaved (A B C A B C ...) and the medians of `--repeats` runs are compared in the same process.
(b) steering overhead: the same batch through `model.generate` with `min_new_tokens = max_new_tokens` (EOS cannot
    end a row, so both arms do identical work), plain vs `Steering` at 4 layers (relative depths 0.25, 0.5,
    0.75 and the last layer, like the original experiment's [12, 24, 36, 47] of 48), arms interleaved A B A B.
    A micro-benchmark times the hooks alone (the pre-hook plus one layer hook on a decode step's tensors).
(c) K = 4 steering configs: one `evaluate` call holding the jobs of all K configs (per-row steering) vs K
    separate `evaluate` passes (`--k`, `--sweep-mode`, `--sweep-positions`, `--sweep-cache`, `--sweep-layers`).
(d) peak resident memory (VmHWM, reset before each arm through /proc/self/clear_refs; a psutil sampler where
    that is not possible) of every arm.
(e) the static decoder (`--cache static`) on the same batches as (b), steered, every row decoding max_new_tokens,
    as it runs and with each of its optimisations off in turn: transformers' decode attention instead of packed
    query heads (before transformers 5.23 it copies the KV cache once per query head at every step), and one
    prompt pass over the whole padded batch instead of groups of similar length; arms interleaved A B C A B C.
(f) length bucketing: the batches `evaluate` makes (padded tokens + a cost per batch, minimised) vs the fewest
    batches the same budget allows, for the score pass and for generation (every row decoding max_new_tokens).
(g) the plain path (`--cache dynamic`) generating, steered at 4 layers at every position: its prompt pass in groups
    of similar length up to the last prompt token vs one pass over the whole padded batch (as before), same
    batches, arms interleaved A B A B.

Usage (from the repository root):
    python bench/run.py --model smollm2-135m-instruct --limit 16 --max-new-tokens 64 --repeats 3 \
        --output bench/results/smollm2-cpu.json
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import transformers
from common import REPO, bench_model, run_info, write_report

from vulnsteer.architecture import decoder_layers
from vulnsteer.data import filter_samples, load_demo, load_secllmholmes
from vulnsteer.engine import runners
from vulnsteer.engine.evaluate import batch_budget, evaluate
from vulnsteer.engine.planner import batch_cost, batches, padded_tokens
from vulnsteer.engine.runners import yes_no_log_odds
from vulnsteer.engine.static import StaticDecoder
from vulnsteer.extract.vectors import relative_layer
from vulnsteer.models import resolve_dtype
from vulnsteer.pipeline import make_jobs
from vulnsteer.prompts import ANSWER_PREFIX, PromptResources, render
from vulnsteer.records import Cache, Decoding, Job, Mode, Positions, Steering, SteeringId
from vulnsteer.steering.hooks import steer

DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "secllmholmes"
DEPTHS = (0.25, 0.5, 0.75, 1.0)  # 1.0 -> the last layer
PARTS = ("a", "b", "c", "d", "e", "f", "g")


# --- machine and memory ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(args) -> dict:
    return {
        **run_info(),
        "cwd": os.getcwd(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "platform": platform.platform(),
        "mem_total_gib": _mem_total_gib(),
    }


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakRSS:
    """Peak resident set size of this process over a `with` block, in MiB.

    torch allocates outside Python's allocator, so tracemalloc misses it; the kernel's high-water mark (VmHWM)
    does not. VmHWM is reset on entry through /proc/self/clear_refs; without that (non-Linux, no permission) a
    psutil thread samples RSS every 2 ms, which can miss short peaks."""

    RESETTABLE = _can_reset_hwm()

    def __enter__(self):
        gc.collect()
        self.method = "VmHWM" if self.RESETTABLE else "psutil-sampling"
        self.start_mib = self._rss_mib()
        self._peak = self.start_mib
        if self.RESETTABLE:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _rss_mib(self) -> float:
        kib = _status_kib("VmRSS")
        if kib is not None:
            return kib / 1024
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    def _sample(self):
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._rss_mib())

    def __exit__(self, *exc):
        if self.RESETTABLE:
            self.peak_mib = _status_kib("VmHWM") / 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self._peak, self._rss_mib())
        return False


def _system_busy_ticks() -> int | None:
    """Busy clock ticks of all CPUs since boot (/proc/stat: user nice system irq softirq steal)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return user + nice + system + irq + softirq + steal
    except (OSError, ValueError, IndexError):
        return None


def _own_ticks() -> int | None:
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, all threads
    except (OSError, ValueError, IndexError):
        return None


class Contention:
    """How busy *other* processes kept the CPUs during a block: (system busy - own) / (elapsed x CPUs), 0..1.
    On a shared 2-core machine this is the figure that says whether a timing can be trusted."""

    def __enter__(self):
        self.sys0, self.own0, self.t0 = _system_busy_ticks(), _own_ticks(), time.perf_counter()
        self.cpu0 = time.process_time()
        return self

    def __exit__(self, *exc):
        elapsed = time.perf_counter() - self.t0
        self.cpu_s = time.process_time() - self.cpu0
        sys1, own1 = _system_busy_ticks(), _own_ticks()
        self.other = None
        if None not in (self.sys0, self.own0, sys1, own1) and elapsed > 0:
            hz = os.sysconf("SC_CLK_TCK")
            other = ((sys1 - self.sys0) - (own1 - self.own0)) / hz
            self.other = max(0.0, other / (elapsed * (os.cpu_count() or 1)))
        return False


def wait_for_idle(limit_s: float, threshold: float = 0.10, window_s: float = 2.0) -> None:
    deadline = time.perf_counter() + limit_s
    while True:
        with Contention() as load:
            time.sleep(window_s)
        if load.other is None or load.other < threshold:
            return
        if time.perf_counter() > deadline:
            print(
                f"warning: other processes still use {100 * load.other:.0f}% of the CPUs; timings will be noisy",
                file=sys.stderr,
            )
            return
        print(f"waiting: other processes use {100 * load.other:.0f}% of the CPUs", file=sys.stderr, flush=True)


def timed(fn):
    """(seconds, peak RSS MiB, RSS at start MiB, fn's return value, process CPU s, other processes' CPU share)."""
    with PeakRSS() as mem, Contention() as load:
        start = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - start
    return seconds, mem.peak_mib, mem.start_mib, value, load.cpu_s, load.other


def summarise(times: list[float]) -> dict:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs_s": [round(t, 4) for t in times],
    }


# --- workload ---------------------------------------------------------------------------------------


def load_jobs(args, lm) -> tuple[list[Job], str]:
    if args.dataset == "demo":
        samples, resources, what = load_demo(), PromptResources(), "demo"
    else:
        root = Path(args.dataset)
        samples = filter_samples(load_secllmholmes(root), [args.split], None, None)
        resources, what = PromptResources.from_dataset_root(root), f"{root} split={args.split}"
    samples = filter_samples(samples, None, None, args.limit)
    return make_jobs(samples, args.prompt, resources), what


def steering_layers(n_layers: int) -> list[int]:
    return sorted({relative_layer(d, n_layers) for d in DEPTHS})


def random_steering(
    lm, layers: list[int], strength: float, seed: int = 0, label: str = "", positions: Positions = Positions.ALL
) -> Steering:
    """Random unit vectors (a small, nonzero push: strength 0 would install no hook at all)."""
    gen = torch.Generator().manual_seed(seed)
    vectors = {}
    for layer in layers:
        v = torch.randn(lm.hidden_size, generator=gen)
        vectors[layer] = v / v.norm()
    return Steering(vectors, strength, positions, label=SteeringId(config=label, strength=strength, layers=layers))


def with_steering(jobs: list[Job], steering: Steering | None) -> list[Job]:
    return [Job(j.sample, j.prompt_id, j.prompt, steering) for j in jobs]


def new_tokens(results) -> int:
    return int(sum(r.new_tokens for r in results))


def interleaved(arms: dict, repeats: int) -> dict:
    """Run arm functions A B C A B C ... `repeats` times; per arm the times, peaks and the last return value."""
    out: dict[str, dict[str, Any]] = {
        name: {"times": [], "peaks": [], "starts": [], "cpu": [], "other": [], "value": None} for name in arms
    }
    for _ in range(repeats):
        for name, fn in arms.items():
            seconds, peak, start, value, cpu, other = timed(fn)
            rec = out[name]
            rec["times"].append(seconds)
            rec["peaks"].append(peak)
            rec["starts"].append(start)
            rec["cpu"].append(cpu)
            rec["other"].append(other)
            rec["value"] = value
    return out


def arm_record(rec: dict, **extra) -> dict:
    others = [o for o in rec["other"] if o is not None]
    return {
        **summarise(rec["times"]),
        "cpu_s_median": round(statistics.median(rec["cpu"]), 3),
        "other_procs_cpu_share_max": round(max(others), 3) if others else None,
        "peak_rss_mib": round(max(rec["peaks"]), 1),
        "rss_before_mib": round(min(rec["starts"]), 1),
        "peak_delta_mib": round(max(p - s for p, s in zip(rec["peaks"], rec["starts"])), 1),
        **extra,
    }


# --- (a) one-at-a-time vs batched generate vs score ------------------------------------------------


def part_a(lm, jobs, args) -> dict:
    gen = Decoding(mode=Mode.GENERATE, max_new_tokens=args.max_new_tokens, final_answer=False)  # the pass alone
    score = Decoding(mode=Mode.SCORE, max_new_tokens=args.max_new_tokens)
    ran: dict[str, int] = {}
    arms = {
        "one_at_a_time": lambda: [r for job in jobs for r in evaluate(lm, [job], gen)],
        "batched_generate": lambda: counting_batches(lm, jobs, gen, ran, "batched_generate"),
        "score": lambda: counting_batches(lm, jobs, score, ran, "score"),
    }
    runs = interleaved(arms, args.repeats)
    one, bat = runs["one_at_a_time"]["value"], runs["batched_generate"]["value"]
    same = sum(a.response == b.response for a, b in zip(one, bat))
    out = {
        "jobs": len(jobs),
        "arms": {
            "one_at_a_time": arm_record(runs["one_at_a_time"], new_tokens=new_tokens(one), calls=len(jobs)),
            "batched_generate": arm_record(
                runs["batched_generate"], new_tokens=new_tokens(bat), batches=ran["batched_generate"]
            ),
            "score": arm_record(runs["score"], new_tokens=0, batches=ran["score"]),
        },
        "identical_responses_one_vs_batched": same,
    }
    med = {k: v["median_s"] for k, v in out["arms"].items()}
    out["ratios"] = {
        "one_at_a_time / batched_generate": med["one_at_a_time"] / med["batched_generate"],
        "batched_generate / score": med["batched_generate"] / med["score"],
        "one_at_a_time / score": med["one_at_a_time"] / med["score"],
    }
    cpu = {k: v["cpu_s_median"] for k, v in out["arms"].items()}  # less sensitive to other processes
    out["ratios_cpu_time"] = {
        "one_at_a_time / batched_generate": cpu["one_at_a_time"] / cpu["batched_generate"],
        "batched_generate / score": cpu["batched_generate"] / cpu["score"],
        "one_at_a_time / score": cpu["one_at_a_time"] / cpu["score"],
    }
    return out


def prompt_texts(lm, jobs, decoding) -> tuple[list[str], list[int]]:
    """The jobs' prompts as `evaluate` renders them for this mode, and their lengths in tokens."""
    prefix = ANSWER_PREFIX if decoding.mode == "score" else ""
    texts = [render(lm.tokenizer, list(j.prompt.messages), prefix) for j in jobs]
    return texts, [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def plan(lm, lengths, decoding, cost: float | None = None) -> list[list[int]]:
    """The batches `evaluate` makes of prompts of these lengths (before any sharing of prompt prefixes); `cost`
    replaces its per-batch cost."""
    score = decoding.mode == "score"
    if cost is None:
        cost = batch_cost(lm.model, 1 if score else decoding.max_new_tokens)
    return batches(lengths, batch_budget(lm, decoding, lengths, score), cost)


def counting_batches(lm, jobs, decoding, into: dict, name: str) -> list:
    """`evaluate`, recording in `into[name]` how many batches it ran (its progress callback fires once per batch;
    rows that share a prompt's pass make fewer batches than their count suggests)."""
    ran = 0

    def count(finished: int) -> None:
        nonlocal ran
        ran += 1

    results = evaluate(lm, jobs, decoding, progress=count)
    into[name] = ran
    return results


def encode(lm, texts, groups) -> list:
    """Left-padded encodings of each group's texts."""
    return [
        lm.tokenizer([texts[i] for i in g], return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
        for g in groups
    ]


def forced_generate(lm, encoded, n: int, steering: Steering | None = None) -> int:
    """`model.generate` over the encoded batches, every row decoding exactly `n` tokens (EOS cannot end a row);
    the number of new tokens."""
    produced = 0
    for enc in encoded:
        rows = enc["input_ids"].shape[0]
        with torch.inference_mode(), steer(lm.model, [steering] * rows) if steering else nullcontext():
            out = lm.model.generate(
                **enc,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=lm.tokenizer.pad_token_id,
            )
        produced += (out.shape[1] - enc["input_ids"].shape[1]) * rows
    return produced


# --- (b) steering overhead -------------------------------------------------------------------------


def part_b(lm, jobs, args) -> dict:
    decoding = Decoding(max_new_tokens=args.max_new_tokens, final_answer=False)
    texts, lengths = prompt_texts(lm, jobs, decoding)
    groups = plan(lm, lengths, decoding)
    encoded = encode(lm, texts, groups)
    layers = steering_layers(lm.num_layers)
    steering = random_steering(lm, layers, args.strength, label="overhead")
    n = args.max_new_tokens

    def generate(steered: bool):
        return forced_generate(lm, encoded, n, steering if steered else None)

    runs = interleaved({"plain": lambda: generate(False), "steered": lambda: generate(True)}, args.repeats)
    plain, steered = runs["plain"], runs["steered"]
    expected = n * len(jobs)
    if plain["value"] != expected or steered["value"] != expected:
        raise SystemExit(
            f"(b): expected {expected} new tokens in both arms, got {plain['value']} and {steered['value']}"
        )
    med_p, med_s = statistics.median(plain["times"]), statistics.median(steered["times"])
    paired = [s - p for p, s in zip(plain["times"], steered["times"])]
    forward_calls = n * len(groups)  # one prefill + (n - 1) decode steps per batch
    micro = hook_microbench(lm, steering, layers, rows=len(groups[0]), past=max(lengths))
    result = {
        "jobs": len(jobs),
        "batches": len(groups),
        "new_tokens_per_row": n,
        "steered_layers": layers,
        "strength": args.strength,
        "arms": {
            "plain": arm_record(plain, new_tokens=plain["value"]),
            "steered": arm_record(steered, new_tokens=steered["value"]),
        },
        "overhead_pct": 100 * (med_s - med_p) / med_p,
        "overhead_pct_cpu_time": 100
        * (statistics.median(steered["cpu"]) - statistics.median(plain["cpu"]))
        / statistics.median(plain["cpu"]),
        "micro_overhead_pct_of_decode_step": None,
        "paired_diff_median_s": statistics.median(paired),
        "us_per_layer_per_step": 1e6 * (med_s - med_p) / (len(layers) * forward_calls),
        "us_per_layer_per_step_note": "end-to-end: (median steered - median plain) / (layers x forward calls); "
        "forward calls = max_new_tokens per batch (1 prefill + n-1 decode steps)",
        "hook_microbench": micro,
    }
    if "step_us" in micro:  # hooks' own cost per forward call relative to the plain run's mean step
        result["micro_overhead_pct_of_decode_step"] = 100 * micro["step_us"] / (1e6 * med_p / forward_calls)
    return result


class _FakeCache:
    def __init__(self, length: int):
        self.length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def hook_microbench(lm, steering: Steering, layers: list[int], rows: int, past: int, iters: int = 2000) -> dict:
    """The hooks `steer` installs, called directly on one decode step's tensors ([rows, 1, hidden]): the
    pre-hook once per step plus one layer hook per steered layer. Measures only the added work."""
    model = lm.model
    base = getattr(model, "model", model)
    blocks = decoder_layers(model)
    before_pre = set(base._forward_pre_hooks)
    before = {layer: set(blocks[layer]._forward_hooks) for layer in layers}
    dtype, device = next(model.parameters()).dtype, lm.device
    ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
    mask = torch.ones(rows, past + 1, dtype=torch.long, device=device)
    hidden = torch.randn(rows, 1, lm.hidden_size, dtype=dtype, device=device)
    kwargs = {"input_ids": ids, "attention_mask": mask, "past_key_values": _FakeCache(past), "use_cache": True}
    with torch.inference_mode(), steer(model, [steering] * rows):
        pre = [base._forward_pre_hooks[k] for k in set(base._forward_pre_hooks) - before_pre]
        post = [
            (blocks[layer], blocks[layer]._forward_hooks[k])
            for layer in layers
            for k in set(blocks[layer]._forward_hooks) - before[layer]
        ]
        if len(pre) != 1 or len(post) != len(layers):
            return {"skipped": f"found {len(pre)} pre-hooks and {len(post)} layer hooks"}

        def step():
            pre[0](base, (), kwargs)
            for module, hook in post:
                hook(module, (), hidden)

        def only_pre():
            pre[0](base, (), kwargs)

        res = {}
        for name, fn in (("pre_hook_us", only_pre), ("step_us", step)):
            for _ in range(50):
                fn()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            res[name] = 1e6 * (time.perf_counter() - start) / iters
    res["per_layer_hook_us"] = (res["step_us"] - res["pre_hook_us"]) / len(layers)
    res.update(rows=rows, past=past, layers=len(layers), iters=iters)
    return res


# --- (c) K-config sweep ----------------------------------------------------------------------------


def part_c(lm, jobs, args) -> dict:
    strengths = (
        [args.strength * f for f in (-1.0, -0.5, 0.5, 1.0)][: args.k]
        if args.k <= 4
        else [args.strength * (i + 1) for i in range(args.k)]
    )
    if args.sweep_layers == "each":  # a layer sweep: config i steers one layer, spread over the depths
        layers = [[relative_layer((i + 0.5) / args.k, lm.num_layers)] for i in range(args.k)]
        strengths = [args.strength] * args.k
    else:
        layers = [steering_layers(lm.num_layers)] * args.k
    configs = [
        random_steering(lm, layers_i, s, seed=0, label=f"k{i}", positions=args.sweep_positions)
        for i, (layers_i, s) in enumerate(zip(layers, strengths))
    ]
    decoding = Decoding(
        mode=args.sweep_mode, max_new_tokens=args.max_new_tokens, cache=args.sweep_cache, final_answer=False
    )
    per_config = [with_steering(jobs, c) for c in configs]
    combined_jobs = [job for group in per_config for job in group]
    separate_times: list[list[float]] = [[] for _ in configs]

    def separate():
        results = []
        for k, group in enumerate(per_config):
            start = time.perf_counter()
            results += evaluate(lm, group, decoding)
            separate_times[k].append(time.perf_counter() - start)
        return results

    ran: dict[str, int] = {}
    runs = interleaved(
        {
            "per_row_combined": lambda: counting_batches(lm, combined_jobs, decoding, ran, "combined"),
            "k_separate_passes": separate,
        },
        args.repeats,
    )
    comb, sep = runs["per_row_combined"], runs["k_separate_passes"]
    med_c, med_s = statistics.median(comb["times"]), statistics.median(sep["times"])
    k = len(configs)
    return {
        "k": k,
        "jobs_per_config": len(jobs),
        "mode": args.sweep_mode,
        "positions": args.sweep_positions,
        "cache": args.sweep_cache,
        "strengths": strengths,
        "steered_layers": layers[0] if args.sweep_layers == "fixed" else layers,
        "arms": {
            "per_row_combined": arm_record(comb, new_tokens=new_tokens(comb["value"]), batches=ran["combined"]),
            "k_separate_passes": arm_record(sep, new_tokens=new_tokens(sep["value"])),
        },
        "per_config": [
            {
                "strength": s,
                "layers": layers_i,
                "separate_median_s": statistics.median(t),
                "combined_share_s": med_c / k,
                "ratio_separate_over_combined_share": statistics.median(t) / (med_c / k),
            }
            for s, layers_i, t in zip(strengths, layers, separate_times)
        ],
        "ratio_separate_over_combined": med_s / med_c,
        "ratio_separate_over_combined_cpu_time": statistics.median(sep["cpu"]) / statistics.median(comb["cpu"]),
    }


# --- (e) the static decoder's attention: packed heads vs transformers' own -------------------------


STATIC_ARMS = {
    "static": {},
    "static_transformers_attention": {"packed_attention": False},
    "static_whole_prefill": {"grouped_prefill": False},
}


def part_e(lm, jobs, args) -> dict:
    """`StaticDecoder` (`--cache static`) over the generate batches, steered at 4 layers, no end token (every row
    decodes max_new_tokens), as it runs and with each of its own optimisations switched off in turn: decode
    steps attending through transformers' attention instead of the packed heads (which, before transformers 5.23,
    copies the KV cache once per query head at every step), and one prompt pass over the whole padded batch
    instead of groups of similar length."""
    decoding = Decoding(max_new_tokens=args.max_new_tokens, final_answer=False)
    texts, lengths = prompt_texts(lm, jobs, decoding)
    groups = plan(lm, lengths, decoding)
    encoded = encode(lm, texts, groups)
    steering = random_steering(lm, steering_layers(lm.num_layers), args.strength, label="static-decoder")
    n = args.max_new_tokens
    with StaticDecoder(lm.model, [], lm.tokenizer.pad_token_id, max_batch=max(map(len, groups))) as decoder:

        def decode(settings: dict) -> list[list[int]]:
            decoder.packed_attention = settings.get("packed_attention", True)
            decoder.grouped_prefill = settings.get("grouped_prefill", True)
            rows = []
            for enc, group in zip(encoded, groups):
                with torch.inference_mode():
                    new = decoder.generate(enc["input_ids"], enc["attention_mask"], n, [steering] * len(group))
                rows += new.tolist()
            return rows

        runs = interleaved(
            {name: (lambda s=settings: decode(s)) for name, settings in STATIC_ARMS.items()}, args.repeats
        )
    if any(len(row) != n for rec in runs.values() for row in rec["value"]):
        raise SystemExit(f"(e): expected {n} new tokens in every row")
    base = runs["static"]
    others = [name for name in STATIC_ARMS if name != "static"]
    return {
        "jobs": len(jobs),
        "batches": len(groups),
        "new_tokens_per_row": n,
        "transformers": transformers.__version__,
        "arms": {name: arm_record(rec, new_tokens=n * len(jobs)) for name, rec in runs.items()},
        "rows_identical_to_static": {
            name: sum(a == b for a, b in zip(base["value"], runs[name]["value"])) for name in others
        },
        "ratios": {
            f"{name} / static": statistics.median(runs[name]["times"]) / statistics.median(base["times"])
            for name in others
        },
        "ratios_cpu_time": {
            f"{name} / static": statistics.median(runs[name]["cpu"]) / statistics.median(base["cpu"]) for name in others
        },
    }


# --- (f) length bucketing: padding-aware batches vs the fewest batches ------------------------------


FEWEST_BATCHES = 1e12  # a per-batch cost that outweighs any padding: as few batches as the budget allows


def part_f(lm, jobs, args) -> dict:
    """The batches `evaluate` makes (padded tokens + a cost per batch, minimised) vs the fewest batches the same
    budget allows (how it grouped rows before), same rows, per mode: the score pass (one forward per batch, the
    yes/no log-odds as `evaluate` scores) and generation with every row decoding max_new_tokens."""
    out = {}
    for mode in (Mode.SCORE, Mode.GENERATE):
        decoding = Decoding(mode=mode, max_new_tokens=args.max_new_tokens, final_answer=False)
        texts, lengths = prompt_texts(lm, jobs, decoding)
        plans = {
            "padding_aware": plan(lm, lengths, decoding),
            "fewest_batches": plan(lm, lengths, decoding, FEWEST_BATCHES),
        }
        encoded = {name: encode(lm, texts, groups) for name, groups in plans.items()}
        if mode == "score":

            def run(batches_):
                with torch.inference_mode():
                    return [x for enc in batches_ for x in yes_no_log_odds(lm, enc)]
        else:

            def run(batches_):
                return forced_generate(lm, batches_, args.max_new_tokens)

        runs = interleaved({name: (lambda e=e: run(e)) for name, e in encoded.items()}, args.repeats)
        aware, fewest = runs["padding_aware"], runs["fewest_batches"]
        out[mode] = {
            "arms": {
                f"{mode}_{name}": arm_record(
                    runs[name],
                    batches=[len(g) for g in groups],
                    padded_tokens=padded_tokens(groups, lengths),
                    new_tokens=runs[name]["value"] if mode == "generate" else 0,
                )
                for name, groups in plans.items()
            },
            "prompt_tokens": sum(lengths),
            "ratio_fewest_over_padding_aware": statistics.median(fewest["times"]) / statistics.median(aware["times"]),
            "ratio_cpu_time": statistics.median(fewest["cpu"]) / statistics.median(aware["cpu"]),
        }
        if mode == "score":  # same rows, other batches: the scores agree up to padding's rounding
            score = {name: dict(zip([i for g in plans[name] for i in g], runs[name]["value"])) for name in plans}
            out[mode]["max_abs_score_difference"] = max(
                abs(score["padding_aware"][i] - score["fewest_batches"][i]) for i in range(len(jobs))
            )
    return {
        "arms": {k: v for res in out.values() for k, v in res["arms"].items()},
        "ratios": {
            f"{mode}: fewest batches / padding-aware": res["ratio_fewest_over_padding_aware"]
            for mode, res in out.items()
        },
        "ratios_cpu_time": {
            f"{mode}: fewest batches / padding-aware": res["ratio_cpu_time"] for mode, res in out.items()
        },
        "modes": out,
    }


# --- (g) the plain path's prompt pass in length groups ---------------------------------------------


def part_g(lm, jobs, args) -> dict:
    steered = with_steering(jobs, random_steering(lm, steering_layers(lm.num_layers), args.strength, label="g"))
    decoding = Decoding(mode=Mode.GENERATE, max_new_tokens=args.max_new_tokens, final_answer=False)

    def whole_batch(model, attention_mask):
        return [list(range(len(attention_mask)))]

    def run(grouped: bool):
        with nullcontext() if grouped else mock.patch.object(runners, "length_groups", whole_batch):
            return evaluate(lm, steered, decoding)

    runs = interleaved({"prompt_in_groups": lambda: run(True), "whole_padded_prompt": lambda: run(False)}, args.repeats)
    grouped, whole = runs["prompt_in_groups"], runs["whole_padded_prompt"]
    return {
        "arms": {name: arm_record(runs[name], new_tokens=new_tokens(runs[name]["value"])) for name in runs},
        "identical_responses": sum(a.response == b.response for a, b in zip(grouped["value"], whole["value"])),
        "ratios": {
            "whole padded prompt / in groups": statistics.median(whole["times"]) / statistics.median(grouped["times"])
        },
        "ratios_cpu_time": {
            "whole padded prompt / in groups": statistics.median(whole["cpu"]) / statistics.median(grouped["cpu"])
        },
    }


# --- output ----------------------------------------------------------------------------------------


def print_tables(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    m = report["machine"]
    console.print(
        f"[bold]{report['config']['model']}[/] ({report['config']['dtype']}) on {m['cpu_model']}, "
        f"{m['cpu_cores']} cores, torch {m['torch']}, {m['date']}"
    )
    table = Table(title="vulnsteer CPU benchmark (medians)")
    for col in ("part", "arm", "median s", "min-max s", "CPU s", "others' CPU", "new tok", "peak RSS MiB", "+MiB"):
        table.add_column(col, justify="left" if col in ("part", "arm") else "right")
    ratios = Table(title="ratios / overheads")
    ratios.add_column("part")
    ratios.add_column("quantity")
    ratios.add_column("value", justify="right")
    for part, res in report["results"].items():
        for arm, rec in res.get("arms", {}).items():
            other = rec["other_procs_cpu_share_max"]
            table.add_row(
                part,
                arm,
                f"{rec['median_s']:.2f}",
                f"{rec['min_s']:.2f}-{rec['max_s']:.2f}",
                f"{rec['cpu_s_median']:.1f}",
                "?" if other is None else f"{100 * other:.0f}%",
                str(rec.get("new_tokens", "")),
                f"{rec['peak_rss_mib']:.0f}",
                f"{rec['peak_delta_mib']:.0f}",
            )
        for name, value in res.get("ratios", {}).items():
            ratios.add_row(part, name, f"{value:.2f}x")
        for name, value in res.get("ratios_cpu_time", {}).items():
            ratios.add_row(part, f"{name} (CPU time)", f"{value:.2f}x")
        if part == "b":
            ratios.add_row(part, "steering overhead", f"{res['overhead_pct']:+.1f}%")
            ratios.add_row(part, "steering overhead (CPU time)", f"{res['overhead_pct_cpu_time']:+.1f}%")
            ratios.add_row(part, "µs / steered layer / step (end to end)", f"{res['us_per_layer_per_step']:.1f}")
            micro = res["hook_microbench"]
            if "step_us" in micro:
                ratios.add_row(part, "µs pre-hook / step (micro)", f"{micro['pre_hook_us']:.1f}")
                ratios.add_row(part, "µs / layer hook / step (micro)", f"{micro['per_layer_hook_us']:.1f}")
                ratios.add_row(
                    part, "hooks' cost / plain decode step (micro)", f"{res['micro_overhead_pct_of_decode_step']:.3f}%"
                )
        if part == "c":
            ratios.add_row(part, "K separate / per-row combined", f"{res['ratio_separate_over_combined']:.2f}x")
            ratios.add_row(
                part, "K separate / per-row combined (CPU time)", f"{res['ratio_separate_over_combined_cpu_time']:.2f}x"
            )
            for cfg in res["per_config"]:
                ratios.add_row(
                    part,
                    f"config strength {cfg['strength']:+g}, layers {cfg['layers']}: separate / (combined/K)",
                    f"{cfg['ratio_separate_over_combined_share']:.2f}x",
                )
        if part == "f":
            for mode, arm in res["modes"].items():
                aware, fewest = arm["arms"][f"{mode}_padding_aware"], arm["arms"][f"{mode}_fewest_batches"]
                ratios.add_row(
                    part,
                    f"{mode}: padded tokens (batches), padding-aware vs fewest; prompt tokens",
                    f"{aware['padded_tokens']} ({len(aware['batches'])}) vs {fewest['padded_tokens']} "
                    f"({len(fewest['batches'])}); {arm['prompt_tokens']}",
                )
    console.print(table)
    console.print(ratios)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dataset", default=str(DEFAULT_DATASET), help="SecLLMHolmes datasets/ folder, or 'demo'")
    p.add_argument("--split", default="hand-crafted")
    p.add_argument("--prompt", default="S1")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--dtype",
        default="bfloat16",
        help="float32, bfloat16 (default; what `auto` picks to generate "
        "on CPU), or auto (per mode: then all arms use bf16)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--strength", type=float, default=1.0, help="steering strength on random unit vectors")
    p.add_argument("--k", type=int, default=4, help="(c): number of steering configs")
    p.add_argument("--sweep-mode", default="generate", choices=list(Mode), help="(c): decoding mode")
    p.add_argument(
        "--sweep-positions",
        default="all",
        choices=list(Positions),
        help="(c): steered positions; score mode at prompt-last shares each prompt's cache across configs",
    )
    p.add_argument("--sweep-cache", default="dynamic", choices=list(Cache), help="(c): KV cache")
    p.add_argument(
        "--sweep-layers",
        default="fixed",
        choices=("fixed", "each"),
        help="(c): every config at the same 4 layers, or each config at one layer of its own (a layer "
        "sweep, one strength)",
    )
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated parts (d, memory, comes with every arm)")
    p.add_argument("--output", type=Path, default=None, help="JSON file (e.g. bench/results/<name>.json)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="seconds, offline: a tiny random model on 2 demo items, 1 repeat, 4 new tokens (checks that "
        "every part runs; its numbers mean nothing)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait (at most this long) until other processes use < 10%% of the CPUs",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.dataset, args.limit, args.repeats, args.max_new_tokens, args.k, args.dtype = "demo", 2, 1, 4, 2, "float32"
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}; use {','.join(PARTS)}")
    if only == {"d"}:
        only = {"a"}  # memory is measured on the arms of the other parts; (a) has the three ways
    if args.repeats < 1 or args.limit < 1 or args.max_new_tokens < 1 or args.k < 1:
        p.error("--repeats, --limit, --max-new-tokens and --k must be at least 1")

    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    wall = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    dtype = resolve_dtype(args.dtype, "generate", args.device)
    t0 = time.perf_counter()
    lm = bench_model(args.model, args.smoke, dtype, args.device)
    load_s = time.perf_counter() - t0
    jobs, data_desc = load_jobs(args, lm)
    report: dict[str, Any] = {
        "machine": machine_info(args),
        "config": {
            "model": lm.model_id,
            "dtype": str(dtype).replace("torch.", ""),
            "device": args.device,
            "dataset": data_desc,
            "prompt": args.prompt,
            "jobs": len(jobs),
            "repeats": args.repeats,
            "max_new_tokens": args.max_new_tokens,
            "num_layers": lm.num_layers,
            "hidden_size": lm.hidden_size,
            "parts": sorted(only),
            "load_s": round(load_s, 2),
            "memory_method": "VmHWM" if PeakRSS.RESETTABLE else "psutil-sampling",
        },
        "results": {},
    }
    # Warm-up (untimed): first calls pay one-off costs (oneDNN primitive creation, lazy imports).
    warm = jobs[:2]
    evaluate(lm, warm, Decoding(mode=Mode.GENERATE, max_new_tokens=4, final_answer=False))
    evaluate(lm, warm, Decoding(mode=Mode.SCORE))

    for part, fn in (("a", part_a), ("b", part_b), ("c", part_c), ("e", part_e), ("f", part_f), ("g", part_g)):
        if part in only:
            start = time.perf_counter()
            print(f"part ({part}) ...", file=sys.stderr, flush=True)
            report["results"][part] = fn(lm, jobs, args)
            report["results"][part]["wall_s"] = round(time.perf_counter() - start, 1)
    report["wall_s"] = round(time.perf_counter() - wall, 1)
    report["machine"]["loadavg_start"] = load_start
    report["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_tables(report)
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
