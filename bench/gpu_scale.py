"""How the evaluation engine scales to the original experiment's model size on one GPU, and how far from the
hardware's limit it runs.

Builds Qwen2.5-14B's architecture (hidden 5120, 48 layers, 40 heads, 8 KV heads, intermediate 13824, vocab 152064)
with random bf16 weights directly on the GPU (no checkpoint, nothing through CPU RAM) and runs 48 prompts whose
lengths are those of the SecLLMHolmes hand-crafted files (random token ids), 200 new tokens per row (EOS is
suppressed with `min_new_tokens`, so every row generates all 200: a real model stops some rows earlier), timing:

* one-at-a-time `generate` (the original experiment's way): only `--one-items` items (spread over the length
  distribution), extrapolated to 48 (mean per item x 48): printed as such;
* batched `generate` exactly as `vulnsteer.engine.evaluate` groups rows (`batches(lengths, batch_tokens, cost)`,
  left padding), without and with per-row steering at 4 layers (relative depths 0.25/0.5/0.75/last =
  [12, 24, 36, 47] of 48, through `vulnsteer.steering.hooks.steer`);
* the static decoder (`vulnsteer.engine.static.StaticDecoder`, `--cache static`), steered: each decode step a CUDA-graph
  replay; the first pass (with the capture) is reported apart, later passes change the steering without re-capture,
  and its tokens are compared with the plain steered path's; then, for comparison, one pass without the capture,
  and one captured pass each with transformers' own decode attention instead of the packed heads and with one
  prompt pass over the whole padded batch instead of groups of similar length;
* the score pass (one forward per batch, last-token logits only, as `evaluate(mode="score")` does), in the
  scoring batches `evaluate` makes (padding-aware) and in the generate batches (fewer, padded more);
* last, a sweep of `--k` configs at the last prompt token through the static decoder: one pass whose rows ask every
  prompt under every config, against K separate passes.

Each arm's figures are written to `--output` as soon as it ends. An arm that fails (a failed capture, an
out-of-memory) is recorded with its error, the others still run, and the exit status is 1.

In the same run it measures the hardware: dense bf16 matmul TFLOP/s and device-to-device copy bandwidth GB/s
(read + written bytes), and prints the lower bound of a batched run:
    decode steps x weight bytes / bandwidth  +  prefill FLOPs / matmul rate
with decode steps = 200 x (number of batches): every batch re-reads every weight at every decode step.

Usage on a GPU machine (from the repository root):
    python bench/gpu_scale.py --output bench/results/qwen14b-arch-h200.json
CPU-side check of the logic with a tiny model (no GPU needed; numbers meaningless):
    python bench/gpu_scale.py --tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from common import run_info, write_report

from vulnsteer.engine.planner import (
    auto_batch_tokens,
    batch_cost,
    batches,
    padded_tokens,
)
from vulnsteer.engine.static import StaticDecoder
from vulnsteer.extract.vectors import relative_layer
from vulnsteer.records import Positions, Steering
from vulnsteer.steering.hooks import steer

# Prompt lengths (tokens) of the 48 SecLLMHolmes hand-crafted files (datasets/hand-crafted/dataset, in the order
# `vulnsteer.data.load_secllmholmes` returns them), as rendered with prompt S1 through the chat template of
# smollm2-135m-instruct and counted by its tokenizer (total 14,012). The Qwen tokenizer is not available offline;
# Qwen2.5's template adds a slightly longer default system prompt (~14.3k in total), so these are a close,
# slightly low stand-in. Reproduce with:
#   render(tok, build_prompt(s, "S1", PromptResources.from_dataset_root(root)).messages) for each sample s.
HANDCRAFTED_S1_LENGTHS = (
    209,
    245,
    233,
    249,
    283,
    287,
    297,
    389,
    372,
    456,
    413,
    465,
    198,
    230,
    629,
    198,
    235,
    618,
    281,
    317,
    290,
    332,
    371,
    306,
    171,
    197,
    459,
    250,
    287,
    490,
    145,
    482,
    309,
    134,
    482,
    328,
    220,
    193,
    222,
    227,
    206,
    231,
    114,
    189,
    234,
    113,
    192,
    234,
)
assert len(HANDCRAFTED_S1_LENGTHS) == 48 and sum(HANDCRAFTED_S1_LENGTHS) == 14012

QWEN25_14B: dict[str, Any] = dict(
    hidden_size=5120,
    num_hidden_layers=48,
    num_attention_heads=40,
    num_key_value_heads=8,
    intermediate_size=13824,
    vocab_size=152064,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=160,
    vocab_size=1000,
    max_position_embeddings=4096,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
DEPTHS = (0.25, 0.5, 0.75, 1.0)
PAD_ID = 0
EOS_ID = 1


class Clock:
    """Wall time of a block, synchronising the device on both ends so queued kernels are counted."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start
        return False


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# --- hardware limits -------------------------------------------------------------------------------


def matmul_tflops(device, dtype, n: int, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    clock = Clock(device)
    with clock:
        for _ in range(iters):
            a @ b
    return 2 * n**3 * iters / clock.seconds / 1e12


def copy_gbps(device, nbytes: int, iters: int) -> float:
    """Device-to-device copy: (bytes read + bytes written) per second, the DRAM traffic a weight read sees."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    clock = Clock(device)
    with clock:
        for _ in range(iters):
            dst.copy_(src)
    return 2 * nbytes * iters / clock.seconds / 1e9


# --- model and workload ----------------------------------------------------------------------------


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """Random weights allocated and initialised on `device` (the default device), never in CPU RAM."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**shape, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=EOS_ID, use_cache=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return model


def prompts(lengths, vocab: int, device, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=gen).to(device) for n in lengths]


def left_pad(rows: list[torch.Tensor], device) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def random_steering(hidden: int, layers: list[int], strength: float, positions: Positions = Positions.ALL) -> Steering:
    gen = torch.Generator().manual_seed(0)
    vectors = {}
    for layer in layers:
        v = torch.randn(hidden, generator=gen)
        vectors[layer] = v / v.norm()
    return Steering(vectors, strength, positions)


def generate(model, encoded: dict, new_tokens: int) -> torch.Tensor:
    # As the engine's Generator does: dynamic cache, never compiled (hooks would be invisible to it).
    return model.generate(
        **encoded,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        cache_implementation="dynamic",
        disable_compile=True,
    )


def run_batched(
    model,
    groups,
    tokens,
    device,
    new_tokens: int,
    steering: Steering | None,
    decoder: StaticDecoder | None = None,
    keep: dict | None = None,
) -> int:
    """Dynamic cache + `steer()` hooks, or (with `decoder`) the static decoder, whose decode step is a CUDA-graph
    replay steered through the engine's fixed buffers. `keep` collects each item's new tokens."""
    produced = 0
    for group in groups:
        enc = left_pad([tokens[i] for i in group], device)
        rows = [steering] * len(group)
        with torch.inference_mode():
            if decoder is not None:
                new = decoder.generate(enc["input_ids"], enc["attention_mask"], new_tokens, rows)
            else:
                with steer(model, rows) if steering else nullcontext():
                    new = generate(model, enc, new_tokens)[:, enc["input_ids"].shape[1] :]
        produced += new.numel()
        if keep is not None:
            keep.update(zip(group, new.tolist()))
    return produced


def agreement(a: dict, b: dict) -> dict:
    """How far two arms' greedy tokens agree, item by item: identical rows, and the mean length of the common
    prefix (bf16 kernels that differ in rounding may flip a near-tie, after which the rows diverge)."""

    def common(x, y):
        return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))

    prefixes = [common(a[i], b[i]) for i in a]
    return {
        "identical_rows": sum(a[i] == b[i] for i in a),
        "rows": len(a),
        "mean_common_prefix_tokens": statistics.mean(prefixes),
    }


def run_score(model, groups, tokens, device) -> int:
    rows = 0
    for group in groups:
        enc = left_pad([tokens[i] for i in group], device)
        with torch.inference_mode():
            logits = model(**enc, logits_to_keep=1).logits[:, -1, :].float().log_softmax(-1)
        rows += logits.shape[0]
    return rows


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ""


def spread(lengths, k: int) -> list[int]:
    """Indices of `k` items at evenly spaced quantiles of the length distribution."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if k >= len(order):
        return order
    return [order[round(j * (len(order) - 1) / max(1, k - 1))] for j in range(k)]


def prefill_flops(n_params_matmul: int, lengths, layers: int, hidden: int) -> float:
    """2 x matmul parameters per token, plus causal attention (QK^T and AV: 2 x 2 x L^2 x hidden / 2 per layer)."""
    dense = 2 * n_params_matmul * sum(lengths)
    attention = sum(2 * n * n * hidden * layers for n in lengths)
    return float(dense + attention)


# --- main ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tiny",
        "--smoke",
        dest="tiny",
        action="store_true",
        help="tiny config on CPU: checks the logic, numbers meaningless",
    )
    p.add_argument("--new-tokens", type=int, default=None, help="default 200 (8 with --tiny)")
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="padded prompt tokens per batch, as Decoding.batch_tokens (default: the engine's automatic "
        "budget, what fits in free GPU memory)",
    )
    p.add_argument("--one-items", type=int, default=3, help="items timed one at a time (then extrapolated)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each batched arm (interleaved)")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--k", type=int, default=4, help="configs of the K-config sweep arm (the last arm)")
    p.add_argument("--skip-hw", action="store_true", help="skip the matmul / bandwidth measurement")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.k < 1 or args.one_items < 1:
        p.error("--repeats, --k and --one-items must be at least 1")

    if args.tiny:
        device, dtype, shape = torch.device("cpu"), torch.float32, TINY
        lengths = tuple(max(4, n // 20) for n in HANDCRAFTED_S1_LENGTHS)
        new_tokens = args.new_tokens or 8
        mm_n, mm_iters, copy_bytes, copy_iters = 256, 5, 1 << 24, 5
    else:
        if not torch.cuda.is_available():
            print(
                "gpu_scale.py needs a CUDA GPU (torch.cuda.is_available() is False on this machine); "
                "nothing was run. Use --tiny to check the script's logic on CPU.",
                file=sys.stderr,
            )
            return 2
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, QWEN25_14B
        lengths = HANDCRAFTED_S1_LENGTHS
        new_tokens = args.new_tokens or 200
        mm_n, mm_iters, copy_bytes, copy_iters = 8192, 50, 4 << 30, 20

    wall = time.perf_counter()
    info = {
        **run_info(),
        "tiny": args.tiny,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
    }
    report: dict = {"machine": info}

    hw = {}
    if not args.skip_hw:
        hw["matmul_tflops_bf16" if dtype == torch.bfloat16 else "matmul_tflops"] = matmul_tflops(
            device, dtype, mm_n, mm_iters
        )
        hw["copy_gbps"] = copy_gbps(device, copy_bytes, copy_iters)
        hw["matmul_n"], hw["copy_bytes"] = mm_n, copy_bytes
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["hardware"] = hw

    with Clock(device) as build_clock:
        model = build_model(shape, device, dtype)
    n_layers, hidden = shape["num_hidden_layers"], shape["hidden_size"]
    embed = model.get_input_embeddings().weight
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # A decode step reads every weight except the input embedding (only the rows of the new tokens).
    read_bytes = param_bytes - embed.numel() * embed.element_size()
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2) - embed.numel()
    tokens = prompts(lengths, shape["vocab_size"], device)
    budget = args.batch_tokens or auto_batch_tokens(model, new_tokens, min(lengths))
    groups = batches(list(lengths), budget, batch_cost(model, new_tokens))
    # Scoring batches as `evaluate` makes them (one forward pass each: padding weighs more than the batch count).
    score_budget = args.batch_tokens or auto_batch_tokens(model, 0, min(lengths))
    score_groups = batches(list(lengths), score_budget, batch_cost(model, 1))
    layers = sorted({relative_layer(d, n_layers) for d in DEPTHS})
    steering = random_steering(hidden, layers, args.strength)
    report["workload"] = {
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": param_bytes,
        "decode_read_bytes": read_bytes,
        "prompts": len(lengths),
        "prompt_tokens": sum(lengths),
        "new_tokens": new_tokens,
        "batch_tokens": budget,
        "batches": [len(g) for g in groups],
        "score_batches": [len(g) for g in score_groups],
        "padded_prompt_tokens": padded_tokens(groups, lengths),
        "score_padded_prompt_tokens": padded_tokens(score_groups, lengths),
        "steered_layers": layers,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "build_s": round(build_clock.seconds, 1),
    }

    # Warm-up: kernels, allocator, cuBLAS handles.
    with torch.inference_mode():
        generate(model, left_pad([tokens[i] for i in groups[0][:2]], device), 2)

    # Sanity: the steered arm really steers (hooks installed on the right layers change the logits).
    probe = left_pad([tokens[i] for i in groups[0][:2]], device)
    with torch.inference_mode():
        base_logits = model(**probe, logits_to_keep=1).logits.float()
        with steer(model, [random_steering(hidden, layers, 4.0)] * 2):
            steered_logits = model(**probe, logits_to_keep=1).logits.float()
    report["workload"]["steering_changes_logits"] = bool((base_logits - steered_logits).abs().max() > 0)
    if not report["workload"]["steering_changes_logits"]:
        raise SystemExit("steering left the logits unchanged: the hooks did not attach")

    arms: dict = {}
    report["arms"] = arms

    def measure(run, *names: str) -> None:
        """Runs the arms `names` (`run` returns each one's figures) and saves the report so far, so a run cut short
        by a time limit keeps what it finished. Arms that fail (a failed capture, an out-of-memory) are recorded
        with the error and the others still run: on a device lent for minutes, one broken arm must not cost the
        rest."""
        try:
            arms.update(run() if len(names) > 1 else {names[0]: run()})
        except Exception as error:  # noqa: BLE001 (an arm's failure is a result to report, not the run's end)
            message = f"{type(error).__name__}: {first_line(error)}"
            arms.update({name: {"error": message} for name in names})
            print(f"{', '.join(names)} failed: {message}", file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write_report(report, args.output)

    def expect_all_tokens(name: str, produced: int) -> None:
        if produced != new_tokens * len(lengths):
            raise RuntimeError(f"{name}: {produced} new tokens, expected {new_tokens * len(lengths)}")

    def one_at_a_time() -> dict:
        """A few items, extrapolated."""
        picked = spread(lengths, args.one_items)
        per_item = []
        reset_peak(device)
        for i in picked:
            enc = left_pad([tokens[i]], device)
            with Clock(device) as c, torch.inference_mode():
                generate(model, enc, new_tokens)
            per_item.append(c.seconds)
        return {
            "measured_items": len(picked),
            "measured_lengths": [lengths[i] for i in picked],
            "measured_s": [round(s, 3) for s in per_item],
            "extrapolated_s": statistics.mean(per_item) * len(lengths),
            "extrapolated": True,
            "peak_gib": peak_gib(device),
        }

    plain_tokens: dict = {}  # the steered plain path's tokens, to compare with the static decoder's

    def batched_generate() -> dict:
        """Plain and steered `generate`, interleaved run by run so that drift hits both alike."""
        times: dict[str, list[float]] = {"batched_generate": [], "batched_generate_steered": []}
        peaks: dict[str, float | None] = {}
        for _ in range(max(1, args.repeats)):
            for name, rows in (("batched_generate", None), ("batched_generate_steered", steering)):
                reset_peak(device)
                with Clock(device) as c:
                    produced = run_batched(
                        model, groups, tokens, device, new_tokens, rows, keep=plain_tokens if rows else None
                    )
                expect_all_tokens(name, produced)
                times[name].append(c.seconds)
                peaks[name] = max(peaks.get(name) or 0, peak_gib(device) or 0) or None
        return {name: {**timed(runs), "peak_gib": peaks[name]} for name, runs in times.items()}

    def score(plan) -> dict:
        times = []
        reset_peak(device)
        for _ in range(max(1, args.repeats)):
            with Clock(device) as c:
                run_score(model, plan, tokens, device)
            times.append(c.seconds)
        return timed(times)

    def static_graph_steered() -> dict:
        """The static decoder, steered through the engine's buffers: the first pass pays the CUDA-graph capture (one
        per batch shape); later passes with other steering replay the captured steps. No end token, so every row
        runs to `new_tokens` as the plain path's min_new_tokens makes it."""
        with StaticDecoder(model, [], PAD_ID, max_batch=max(len(g) for g in groups)) as decoder:
            engine_tokens: dict = {}
            with Clock(device) as c:
                run_batched(model, groups, tokens, device, new_tokens, steering, decoder, keep=engine_tokens)
            capture_s = c.seconds
            times = []
            reset_peak(device)
            for k in range(max(1, args.repeats)):
                other = random_steering(hidden, layers, args.strength * (1 + k))  # a new config each pass
                with Clock(device) as c:
                    produced = run_batched(model, groups, tokens, device, new_tokens, other, decoder)
                expect_all_tokens("static", produced)
                times.append(c.seconds)
        return {
            **timed(times),
            "first_pass_with_capture_s": round(capture_s, 2),
            "graphs_captured": decoder.captures,
            "buffer_sets": decoder.allocations,
            "tokens_vs_plain_steered": agreement(plain_tokens, engine_tokens) if plain_tokens else None,
        }

    def static_variant(**settings) -> dict:
        """One pass of the static decoder with `settings`, after a pass that pays any capture."""
        reset_peak(device)
        with StaticDecoder(model, [], PAD_ID, max_batch=max(len(g) for g in groups), **settings) as decoder:
            if settings.get("capture", True):
                run_batched(model, groups, tokens, device, new_tokens, steering, decoder)
            with Clock(device) as c:
                run_batched(model, groups, tokens, device, new_tokens, steering, decoder)
        return timed([c.seconds])

    def k_configs() -> dict:
        """A sweep of `--k` configs at the last prompt token (the original experiment's position) through the static
        decoder: one pass whose rows ask every prompt under every config (each prompt's pass shared, every row
        decoding in the same steps) against K separate passes, one config each. A warm-up pass of each pays the
        captures."""
        configs = [
            random_steering(hidden, layers, args.strength * (1 + j), Positions.PROMPT_LAST) for j in range(args.k)
        ]
        width = args.k * max(len(g) for g in groups)

        def combined(decoder, keep: dict | None = None) -> int:
            produced = 0
            for group in groups:
                rows = [(i, j) for i in group for j in range(len(configs))]
                enc = left_pad([tokens[i] for i, _ in rows], device)
                with torch.inference_mode():
                    new = decoder.generate(enc["input_ids"], enc["attention_mask"], new_tokens, configs * len(group))
                produced += new.numel()
                if keep is not None:
                    keep.update(zip(rows, new.tolist()))
            return produced

        def separate(decoder, keep: dict | None = None) -> int:
            produced = 0
            for j, config in enumerate(configs):
                mine: dict = {}
                produced += run_batched(model, groups, tokens, device, new_tokens, config, decoder, keep=mine)
                if keep is not None:
                    keep.update({(i, j): row for i, row in mine.items()})
            return produced

        times: dict[str, list[float]] = {"combined": [], "separate": []}
        kept: dict[str, dict] = {"combined": {}, "separate": {}}
        with StaticDecoder(model, [], PAD_ID, max_batch=width) as decoder:
            for name, run in (("combined", combined), ("separate", separate)):
                run(decoder, kept[name])
            reset_peak(device)
            for _ in range(max(1, args.repeats)):
                for name, run in (("combined", combined), ("separate", separate)):
                    with Clock(device) as c:
                        produced = run(decoder)
                    if produced != args.k * new_tokens * len(lengths):
                        raise RuntimeError(
                            f"k_configs {name}: {produced} new tokens, expected {args.k * new_tokens * len(lengths)}"
                        )
                    times[name].append(c.seconds)
        return {
            "k": args.k,
            **timed(times["combined"]),
            "separate_median_s": statistics.median(times["separate"]),
            "separate_runs_s": [round(t, 3) for t in times["separate"]],
            "tokens_combined_vs_separate": agreement(kept["separate"], kept["combined"]),
        }

    def timed(times: list[float]) -> dict:
        return {
            "median_s": statistics.median(times),
            "runs_s": [round(t, 3) for t in times],
            "peak_gib": peak_gib(device),
        }

    # The goals first (steered generation, then the score pass), then the diagnostic arms: what the CUDA
    # graph buys (the decoder without the capture), and the captured decoder with one optimisation off at a time:
    # transformers' own decode attention instead of the packed heads (nothing to gain from transformers 5.23 on,
    # which packs too; releases before copy the KV cache per query head), or one prompt pass over the whole padded
    # batch instead of groups of similar length.
    measure(one_at_a_time, "one_at_a_time")
    measure(batched_generate, "batched_generate", "batched_generate_steered")
    measure(static_graph_steered, "static_graph_steered")
    measure(lambda: score(score_groups), "score")
    measure(lambda: score(groups), "score_in_generate_batches")
    measure(lambda: static_variant(capture=False), "static_eager_steered")
    measure(lambda: static_variant(packed_attention=False), "static_graph_transformers_attention")
    measure(lambda: static_variant(grouped_prefill=False), "static_graph_whole_prefill")
    measure(k_configs, "k_configs_static_prompt_last")

    report["derived"] = derived_figures(
        arms, hw, lengths, groups, layers, new_tokens, read_bytes, matmul_params, n_layers, hidden
    )
    report["failed_arms"] = [name for name, arm in arms.items() if "error" in arm]
    report["wall_s"] = round(time.perf_counter() - wall, 1)

    print_report(report)
    write_report(report, args.output)
    return 1 if report["failed_arms"] else 0


def derived_figures(
    arms: dict,
    hw: dict,
    lengths,
    groups,
    layers,
    new_tokens: int,
    read_bytes: int,
    matmul_params: int,
    n_layers: int,
    hidden: int,
) -> dict:
    """Ratios and the hardware bound, each only where the arms it needs ran."""

    def seconds(name: str) -> float | None:
        arm = arms.get(name, {})
        return arm.get("median_s", arm.get("extrapolated_s"))

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    plain, steered = seconds("batched_generate"), seconds("batched_generate_steered")
    static = seconds("static_graph_steered")
    derived: dict[str, Any] = {
        "one_at_a_time_extrapolated / batched": ratio(seconds("one_at_a_time"), plain),
        "batched / score": ratio(plain, seconds("score")),
        "steering_overhead_pct": 100 * (steered - plain) / plain if plain and steered else None,
        "steering_us_per_layer_per_step": (
            1e6 * (steered - plain) / (len(layers) * new_tokens * len(groups)) if plain and steered else None
        ),
        "decode_tokens_per_s_batched": ratio(new_tokens * len(lengths), plain),
    }
    if hw:
        rate = float(hw.get("matmul_tflops_bf16") or hw["matmul_tflops"]) * 1e12
        bw = hw["copy_gbps"] * 1e9
        flops = prefill_flops(matmul_params, lengths, n_layers, hidden)
        bound_engine = new_tokens * len(groups) * read_bytes / bw + flops / rate
        derived.update(
            {
                "prefill_flops": flops,
                "bound_s_single_batch": new_tokens * read_bytes / bw + flops / rate,
                "bound_s_engine_batches": bound_engine,
                "bound_note": "decode steps x weight bytes / copy bandwidth + prefill FLOPs / matmul rate; "
                "KV-cache reads and decode FLOPs are left out (a lower bound); engine_batches counts "
                f"{len(groups)} batches x {new_tokens} steps",
                "batched / bound_engine_batches": ratio(plain, bound_engine),
                "static_graph_steered / bound_engine_batches": ratio(static, bound_engine),
                "static_eager / static_graph": ratio(seconds("static_eager_steered"), static),
                "static_transformers_attention / static_graph": ratio(
                    seconds("static_graph_transformers_attention"), static
                ),
                "static_whole_prefill / static_graph": ratio(seconds("static_graph_whole_prefill"), static),
                "score / prefill_bound": ratio(seconds("score"), flops / rate),
                "score_in_generate_batches / score": ratio(seconds("score_in_generate_batches"), seconds("score")),
            }
        )
    sweep = arms.get("k_configs_static_prompt_last", {})
    derived["k_configs: separate / combined"] = ratio(sweep.get("separate_median_s"), sweep.get("median_s"))
    return derived


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    w = report["workload"]
    console.print(
        f"[bold]{'TINY (CPU logic check) ' if report['machine']['tiny'] else ''}Qwen2-architecture "
        f"{w['params'] / 1e9:.2f}B params[/] on {report['machine']['device']}, "
        f"{w['prompts']} prompts / {w['prompt_tokens']} tokens, {w['new_tokens']} new tokens, "
        f"batches {w['batches']} ({w['padded_prompt_tokens']} padded tokens), scoring batches "
        f"{w['score_batches']} ({w['score_padded_prompt_tokens']})"
    )
    table = Table(title="timings")
    table.add_column("arm")
    table.add_column("seconds", justify="right")
    table.add_column("peak GiB", justify="right")
    table.add_column("note")
    for name, arm in report["arms"].items():
        if "error" in arm:
            table.add_row(name, "FAILED", "", arm["error"])
        elif name == "one_at_a_time":
            table.add_row(
                name,
                f"{arm['extrapolated_s']:.2f}",
                str(arm["peak_gib"]),
                f"EXTRAPOLATED: mean of {arm['measured_items']} items x {w['prompts']}",
            )
        else:
            note = f"median of {len(arm['runs_s'])}"
            for key, other in (
                ("tokens_vs_plain_steered", "plain steered path"),
                ("tokens_combined_vs_separate", "K separate passes"),
            ):
                if arm.get(key):
                    same = arm[key]
                    note += (
                        f"; tokens = {other} in {same['identical_rows']}/{same['rows']} rows, "
                        f"common prefix {same['mean_common_prefix_tokens']:.1f} tokens on average"
                    )
            if "separate_median_s" in arm:
                note += f"; K={arm['k']} separate passes {arm['separate_median_s']:.2f} s"
            table.add_row(name, f"{arm['median_s']:.2f}", str(arm["peak_gib"]), note)
    console.print(table)
    derived = Table(title="hardware and derived")
    derived.add_column("quantity")
    derived.add_column("value", justify="right")
    for key, value in {**report["hardware"], **report["derived"]}.items():
        if key.endswith("note"):
            continue
        derived.add_row(
            key, f"{value:.4g}" if isinstance(value, float) else "n/a (an arm failed)" if value is None else str(value)
        )
    console.print(derived)
    if "bound_note" in report["derived"]:
        console.print(report["derived"]["bound_note"])


if __name__ == "__main__":
    sys.exit(main())
