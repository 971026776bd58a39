"""The Python API behind the CLI commands: each function glues data, prompts, model and engine, writes the run's
files and returns what it computed; showing it is the caller's (the command line prints it). Progress while work
runs is printed here, since long work should show it whoever calls."""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection, Iterator, Mapping, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from vulnsteer import __version__
from vulnsteer.backends import BACKENDS, Model, load, merge_options, require
from vulnsteer.data import Sample
from vulnsteer.errors import VulnsteerError
from vulnsteer.experiments.backends import Backend
from vulnsteer.experiments.cluster import ClusterOptions
from vulnsteer.experiments.store import (
    SampleWriter,
    exclusive,
    job_key,
    open_run,
    read_samples,
    result_key,
)
from vulnsteer.experiments.summary import (
    Section,
    Summary,
    final_answer_section,
    language_section,
    reasoning_section,
    summarise_results,
    write_summary,
)
from vulnsteer.extract.activations import Read
from vulnsteer.models import LoadedModel
from vulnsteer.prompts import PromptResources, build_prompt
from vulnsteer.records import Decoding, Job, Mode, Positions, Result, Steering, VectorChoice

if TYPE_CHECKING:
    from vulnsteer.experiments.analysis import Analysis
    from vulnsteer.experiments.report import Report
    from vulnsteer.extract.probe import ProbeRow
    from vulnsteer.extract.trained import Training
    from vulnsteer.extract.vectors import Normalisation, VectorBank


@contextmanager
def progress(
    description: str, total: int, log_every: float = 30.0, work: float | None = None
) -> Iterator[Callable[..., None]]:
    """Yields `advance(rows, cost=None)`. On a terminal, a live bar; in a log (output not a terminal, e.g. a batch
    job), a plain line at most every `log_every` seconds and at the end, since a bar would only show once it is
    finished. Given `work`, the rows' total cost (`planner.row_costs`), time left is estimated from the cost done
    (each `advance` says its rows' cost), which holds while cheap and costly rows come in any order."""
    console = Console()
    units = float(work) if work else float(total)
    if console.is_terminal:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[rows]}/" + str(total)),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(description, total=units, rows=0)
            rows_done = 0

            def advance_bar(n: int, cost: float | None = None) -> None:
                nonlocal rows_done
                rows_done += n
                bar.update(task, advance=cost if work else n, rows=rows_done)

            yield advance_bar
        return
    start = last = time.monotonic()
    done, done_units = 0, 0.0

    def advance(n: int, cost: float | None = None) -> None:
        nonlocal done, done_units, last
        done += n
        done_units += cost if work and cost is not None else n
        now = time.monotonic()
        if now - last >= log_every or done >= total:
            last = now
            eta = f"{(now - start) / done_units * (units - done_units):.0f} s" if done_units else "?"
            print(
                f"{description}: {done}/{total} ({100 * done_units / max(units, 1):.0f}%), "
                f"{now - start:.0f} s elapsed, eta {eta}",
                flush=True,
            )

    yield advance


def prompt_resources(dataset: str) -> PromptResources:
    """Few-shot files and definitions come from the dataset folder when it is a SecLLMHolmes one."""
    folder = Path(dataset)
    return PromptResources.from_dataset_root(folder if folder.is_dir() else None)


def make_jobs(
    samples: Sequence[Sample],
    prompt_id: str,
    resources: PromptResources,
    steering_for: Callable[[Sample], Steering | None] = lambda s: None,
) -> list[Job]:
    return [Job(s, prompt_id, build_prompt(s, prompt_id, resources), steering_for(s)) for s in samples]


def run_jobs(
    lm: Model,
    jobs: Sequence[Job],
    decoding: Decoding,
    description: str,
    on_result: Callable[[Result], None] | None = None,
    done: Collection[int] = frozenset(),
) -> list[Result]:
    """Evaluate with a progress bar, with the model's backend, all jobs but those at the indices `done` (stored
    already; a local model still batches them with the rest, see `engine.evaluate`)."""
    with progress(description, len(jobs) - len(done)) as advance:
        return lm.evaluate(jobs, decoding, advance, on_result, done)


def local(lm: LoadedModel) -> Model:
    """A model loaded in this process, run by the hf backend."""
    return Model(lm.model_id, BACKENDS["hf"], lm)


@dataclass(frozen=True)
class EvalRun:
    """An evaluation's results: its rows in job order, their summaries (by group: "all", each CWE...), the settings
    written to summary.json, and the folder that holds samples.jsonl and summary.json/md."""

    results: list[Result]
    summaries: dict[str, Summary]
    meta: dict
    out_dir: Path


def run_eval(
    lm: Model,
    jobs: Sequence[Job],
    decoding: Decoding,
    out_dir: Path,
    meta: dict,
    n_boot: int = 2000,
    judge_lm: LoadedModel | None = None,
    sections: Sequence[Section] = (),
) -> EvalRun:
    """Evaluate into `out_dir` (resumable: rows already in samples.jsonl are kept and skipped), then summarise.
    `judge_lm` adds a third, model-judged vote to the reasoning scores of generated answers; `sections` are added
    to the summary."""
    with exclusive(out_dir):  # one writer per folder
        meta = {**meta, "vulnsteer": __version__, "decoding": asdict(decoding)}
        fresh = not (out_dir / "run.json").exists()
        done = open_run(out_dir, meta)
        stored = {k for k, job in enumerate(jobs) if job_key(job, decoding.mode) in done}
        if stored:
            print(f"resuming: {len(stored)} of {len(jobs)} rows already in {out_dir / 'samples.jsonl'}")
        writer = SampleWriter(out_dir / "samples.jsonl", list(done.values()))
        start = time.perf_counter()
        try:
            if len(stored) < len(jobs):
                run_jobs(lm, jobs, decoding, "eval", on_result=writer.write, done=stored)
        except BaseException:
            writer.close()
            if fresh and not writer.written:  # a refused start: leave the folder to the corrected command
                for name in ("run.json", "samples.jsonl"):
                    (out_dir / name).unlink(missing_ok=True)
            raise
        writer.close()
        by_key = {result_key(r): r for r in read_samples(out_dir / "samples.jsonl")}
        results = [by_key[job_key(job, decoding.mode)] for job in jobs]
        summaries = summarise_results(results, n_boot=n_boot)
        reasoning = reasoning_section(results, [job.sample for job in jobs], judge_lm=judge_lm)  # None in score mode
        final = final_answer_section({"all": results})
        languages = language_section(results)
        meta = {**meta, "rows": len(results), "seconds": round(time.perf_counter() - start, 1)}
        write_summary(
            out_dir,
            summaries,
            meta,
            sections=[*(section for section in (final, reasoning, languages) if section), *sections],
        )
        return EvalRun(results, summaries, meta, out_dir)


@dataclass(frozen=True)
class SteerWith:
    """`eval --vectors`: which of a vector file's vectors steer each item, where and how hard."""

    vectors: Path
    layers: str | None = None  # None: every layer in the file
    strength: float = 0.0
    positions: Positions = Positions.ALL
    cwe_vector: VectorChoice = VectorChoice("own")  # each item's own CWE's vector, "pooled", or a named CWE's
    drop_overlap: bool = False  # drop test families that overlap the file's training data (refused otherwise)
    allow_other_weights: bool = False  # vectors fitted on other weights of this architecture

    def __post_init__(self):  # the Python API's edge: words are read as the CLI reads them
        object.__setattr__(self, "positions", Positions.parse(self.positions, "positions"))
        object.__setattr__(self, "cwe_vector", VectorChoice.parse(self.cwe_vector, "cwe_vector", random=False))


@dataclass(frozen=True)
class HeldOutVectors:
    """A vector file and the samples it may steer: those whose families it was not fitted on."""

    steer: SteerWith
    bank: VectorBank
    samples: list[Sample]
    note: str | None  # how many were dropped (--drop-overlap), if any


def held_out_for(samples: Sequence[Sample], steer: SteerWith) -> HeldOutVectors:
    """Read the vector file and keep the samples it may be tested on (refused with the count, or dropped with a note,
    where a family overlaps its training data). Cheap: call it before loading the model, so a refusal costs nothing."""
    from vulnsteer.extract.vectors import load
    from vulnsteer.protocol import held_out, leaked_ids

    if not math.isfinite(steer.strength):
        raise VulnsteerError(f"--strength must be a finite number, got {steer.strength}")
    bank = load(steer.vectors)
    kept = held_out(
        samples, leaked_ids(samples, bank.meta), steer.drop_overlap, f"the training data of {steer.vectors}"
    )
    return HeldOutVectors(steer, bank, kept.samples, kept.note)


def run_local_eval(
    lm: LoadedModel | Model,
    samples: Sequence[Sample],
    prompt_id: str,
    decoding: Decoding,
    out_dir: Path,
    vectors: HeldOutVectors | None = None,
    resources: PromptResources | None = None,
    meta: dict | None = None,
    judge_lm: LoadedModel | None = None,
) -> EvalRun:
    """What `vulnsteer eval` runs: `samples` asked with `prompt_id` into `out_dir`, or, with `vectors`, the samples
    they may steer, steered (plus a side-effect section); returns the rows and their summaries. `lm`: a model loaded
    in this process, or any backend's (`backends.load`)."""
    from vulnsteer.experiments.side_effects import code_side_effects
    from vulnsteer.experiments.summary import side_effects_section
    from vulnsteer.extract.vectors import check_compatible, steering_for_samples

    model = lm if isinstance(lm, Model) else local(lm)
    resources = resources or PromptResources()
    meta = {"prompt": prompt_id, **(meta or {}), **model.meta}
    if vectors is None:
        return run_eval(model, make_jobs(samples, prompt_id, resources), decoding, out_dir, meta, judge_lm=judge_lm)
    require(model.spec, "steers")  # a steering backend's model is a LoadedModel
    loaded: LoadedModel = model.handle
    steer, bank, samples, dropped = vectors.steer, vectors.bank, vectors.samples, vectors.note
    check_compatible(bank, loaded, str(steer.vectors), steer.allow_other_weights)
    if steer.allow_other_weights and bank.meta.get("weights_bf16"):
        meta["vectors_from_other_weights_allowed"] = True
    if bank.meta.get("mode", decoding.mode) != decoding.mode:
        print(
            f"note: these vectors were read from prompts as {bank.meta['mode']} mode asks them; this run is in "
            f"{decoding.mode} mode",
            file=sys.stderr,
        )
    steering_for = steering_for_samples(bank, steer.layers, steer.strength, steer.positions, steer.cwe_vector)
    meta |= {
        "vectors": str(steer.vectors),
        "layers": steer.layers,
        "strength": steer.strength,
        "positions": steer.positions,
        "cwe_vector": str(steer.cwe_vector),
        **({"held_out": dropped} if dropped else {}),
    }
    side_effects = side_effects_section(code_side_effects(loaded, samples, {"steered": steering_for}))
    return run_eval(
        model,
        make_jobs(samples, prompt_id, resources, steering_for),
        decoding,
        out_dir,
        meta,
        judge_lm=judge_lm,
        sections=[side_effects],
    )


def collect_activations(
    lm: LoadedModel,
    samples: Sequence[Sample],
    prompt_id: str = "S1",
    resources: PromptResources | None = None,
    read: Read = Read.PROMPT_LAST,
    mode: Mode = Mode.GENERATE,
    batch_tokens: int = 8192,
):
    """Activations of every layer on the prompt as `mode` asks it, with a progress bar (cached on disk per
    sample)."""
    from vulnsteer.extract.activations import collect

    with progress("activations", len(samples)) as advance:
        return collect(lm, samples, prompt_id, resources, read, batch_tokens, progress=advance, mode=mode)


def run_extract(
    lm: LoadedModel,
    samples: Sequence[Sample],
    prompt_id: str,
    resources: PromptResources,
    method: str,
    layers: list[int],
    read: Read,
    normalisation: Normalisation,
    output: Path,
    mode: Mode = Mode.GENERATE,
    training: Training | None = None,
):
    """Fit one vector per CWE and layer plus a pooled one (learned methods as `training` says), and save them with
    their metadata."""
    from vulnsteer.extract.trained import Training
    from vulnsteer.extract.vectors import LEARNED, fit, save

    training = training or Training()
    acts = collect_activations(lm, samples, prompt_id, resources, read, mode)
    if method in LEARNED:
        with progress(f"fitting {method}", training.steps) as advance:
            bank = fit(
                acts, lm, method, layers, normalisation, resources=resources, training=training, progress=advance
            )
    else:
        bank = fit(acts, lm, method, layers, normalisation, resources=resources)
    save(bank, output)
    return bank


@dataclass(frozen=True)
class ProbeRun:
    """A probe's results, as probe.json holds them: AUROC per layer and group (`rows`), and, with a vector file,
    its own pooled directions' AUROC per layer (`vector_file_auroc`) on the `held_out` of the `items` it was not
    fitted on."""

    rows: list[ProbeRow]
    layers: list[int]
    method: str
    read: str
    mode: str
    prompt: str
    folds: int
    items: int
    vector_file_auroc: dict[int, float | None] | None  # None: no vector file
    held_out: int = 0


def run_probe(
    lm: LoadedModel,
    samples: Sequence[Sample],
    prompt_id: str,
    resources: PromptResources,
    method: str,
    layers: list[int],
    read: Read,
    folds: int,
    out_dir: Path | None,
    bank=None,
    mode: Mode = Mode.GENERATE,
) -> ProbeRun:
    """Cross-validated probe AUROC per layer (pooled and per CWE), written to probe.csv/json in `out_dir` if given.
    With a vector file (`bank`), also the AUROC of its own pooled directions on the items it was not fitted on
    (family and code compared)."""
    import csv

    from vulnsteer.extract.probe import probe

    acts = collect_activations(lm, samples, prompt_id, resources, read, mode)
    rows = probe(acts, layers, method, folds)
    fixed, n_held_out = None, 0
    if bank is not None:
        from vulnsteer.extract.probe import fixed_direction_auroc
        from vulnsteer.extract.vectors import POOLED
        from vulnsteer.protocol import leaked_ids

        leaked = leaked_ids(samples, bank.meta)
        held_out = acts.subset(lambda s: s.id not in leaked)
        n_held_out = len(held_out.samples)
        directions = {k: v for k, v in bank.for_group(POOLED).items() if k in layers}
        fixed = fixed_direction_auroc(held_out, directions) if n_held_out else {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "probe.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "group", "auroc", "low", "high", "n"])
            writer.writerows([r.layer, r.group, r.auroc, r.low, r.high, r.n] for r in rows)
        (out_dir / "probe.json").write_text(
            json.dumps(
                {
                    "model": lm.model_id,
                    "method": method,
                    "read": read,
                    "mode": mode,
                    "prompt": prompt_id,
                    "folds": folds,
                    "rows": [asdict(r) for r in rows],
                    "vector_file_auroc": fixed or {},
                    "vector_file_held_out": n_held_out,
                },
                indent=2,
            )
        )
    return ProbeRun(rows, layers, method, read, mode, prompt_id, folds, len(samples), fixed, n_held_out)


@dataclass(frozen=True)
class SweepRun:
    """A sweep's results: the analysis of its store and the report written from it (with the headline), in
    `out_dir`."""

    analysis: Analysis
    report: Report
    out_dir: Path


def run_sweep(
    config,
    out_dir: Path,
    lm: LoadedModel | None = None,
    cluster: ClusterOptions | None = None,
    model_args: Mapping[str, str] | None = None,
) -> SweepRun:
    """Run (or resume) a sweep into `out_dir/sweep.sqlite`, then write the report; returns both. The
    model work runs on `lm` (loaded here when None, with the backend options `model_args`), or with `cluster` on Ray
    workers that each load the model."""
    from vulnsteer.experiments.backends import LocalBackend
    from vulnsteer.experiments.cluster import RayBackend
    from vulnsteer.experiments.sweep import load_sweep_samples
    from vulnsteer.extract.vectors import LEARNED

    require(config.model, "steers")
    if cluster is not None:  # learned fits train on the model, which a Ray driver never loads
        in_process = [m for m in config.methods if m in LEARNED] + ["lora_steps"] * bool(config.lora_steps)
        if in_process:
            raise VulnsteerError(
                f"{', '.join(in_process)}: fitted on the model's answers in this process, which a "
                "Ray driver does not load; on Ray sweep fixed directions (e.g. --methods mean-diff) "
                "without lora_steps, or run without --ray"
            )
    test, train, dropped = load_sweep_samples(config)
    with exclusive(out_dir):  # one writer per folder, refused before the model loads
        options = merge_options({"dtype": config.dtype}, model_args or {})
        if cluster is not None:  # each worker loads the model with the same backend options
            backend: Backend = RayBackend(cluster, config.model, options, config.mode)
        else:
            if lm is None:
                lm = load(config.model, options, config.mode).handle
            backend = LocalBackend(lm)
        try:
            return _sweep_on(backend, config, test, train, out_dir, dropped)
        finally:
            if isinstance(backend, RayBackend):
                backend.close()


def _sweep_on(
    backend: Backend, config, test: list[Sample], train: list[Sample] | None, out_dir: Path, dropped: str | None = None
) -> SweepRun:
    import torch
    import transformers

    from vulnsteer.experiments.analysis import analyse
    from vulnsteer.experiments.report import write_report
    from vulnsteer.experiments.store import SweepStore
    from vulnsteer.experiments.sweep import (
        LORA,
        RUN_IDENTITY,
        arm_ids,
        config_sha256,
        dataset_hash,
        lora_rows,
        plan,
        store_row,
    )
    from vulnsteer.extract.activations import Activations
    from vulnsteer.extract.vectors import parse_layers

    info, resources = backend.info, prompt_resources(config.dataset)
    for spec in config.layers:  # a bad layer is refused before anything is written
        parse_layers(spec, info.num_layers)
    local = backend.local_model()
    store = SweepStore(out_dir / "sweep.sqlite")
    meta = {
        "model": info.model_id,
        "config_hash": info.config_hash,
        "weights": info.fingerprint,
        "dtype": info.dtype,
        "device": info.device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dataset_hash": dataset_hash(test),
        "train_dataset_hash": dataset_hash(train) if train else None,
        "config": asdict(config),
        "config_sha256": config_sha256(config),
        "vulnsteer": __version__,
    }

    read: dict[tuple[str, ...], Activations] = {}  # planning and the probe ask for the test items' alike

    def activations(samples: Sequence[Sample]) -> Activations:
        key = tuple(s.id for s in samples)
        if key not in read:
            with progress("activations", len(samples)) as advance:
                read[key] = backend.activations(samples, config.prompt, resources, config.read, config.mode, advance)
        return read[key]

    try:
        # Batches change bfloat16 results: a resumed sweep keeps the batch budget it started with. The shortest
        # code's characters / 4 undercounts its prompt's tokens, which only makes the GPU budget more cautious.
        budget = (
            store.meta().get("batch_tokens")
            or config.batch_tokens
            or backend.batch_tokens(
                config.max_new_tokens if config.mode == "generate" else 0, min(len(s.code) for s in test) // 4 + 1
            )
        )
        store.check({**meta, "batch_tokens": budget}, must_match=RUN_IDENTITY)
        sweep = plan(
            config,
            backend.local_model() or info,
            test,
            train,
            resources,
            store.done(),
            store.selection_done(),
            activations,
        )
        # Written only now that everything checkable before the first row was checked: a start refused by the
        # plan (no such vector, no patched item) leaves a folder the corrected command can use.
        moved = sorted(s for s, folds in store.folds().items() if folds != {sweep.fold_of.get(s)})
        if moved:  # checked before anything is recorded, so a refused store keeps what it held
            raise VulnsteerError(
                f"{out_dir} holds {len(moved)} items whose stored folds are not the ones its seed "
                f"and data give (e.g. {moved[0]}): the store was edited, or written by a vulnsteer "
                "that planned folds otherwise; start another --output-dir"
            )
        store.claim({**meta, "batch_tokens": budget}, must_match=RUN_IDENTITY)
        store.record("banks", {bank: sorted(keys) for bank, keys in sweep.bank_keys.items()})
        store.record("fit_seconds", sweep.fit_seconds)
        store.record("held_out", dropped)
        known = arm_ids(config, sweep.points)
        foreign = sorted({c for c, _ in store.done()} - known)
        if foreign:
            raise VulnsteerError(
                f"{out_dir} holds rows of configs this sweep does not have (e.g. {foreign[0]}); "
                "use another --output-dir"
            )
        stored = store.done()
        lora_left = sum((LORA, s.id) not in stored for s in test) if config.lora_steps else 0  # rows, not jobs
        todo = len(sweep.todo) + lora_left
        prompt_rows = sum(j.prompt_id != sweep.prompt for j in sweep.jobs)
        lora_count = len(test) * bool(config.lora_steps)
        extra = [
            f"{n} {kind} rows"
            for n, kind in (
                (prompt_rows, "candidate-prompt"),
                (lora_count, "LoRA"),
                (sweep.total_rows - len(test) * (1 + len(sweep.points)) - prompt_rows - lora_count, "selection"),
            )
            if n
        ]
        print(
            f"sweep: {len(sweep.points)} steered configs + baseline × {len(test)} items"
            f"{', plus ' + ', '.join(extra) if extra else ''} = {sweep.total_rows} rows"
            f" ({sweep.total_rows - todo} already done, {todo} to run, mode {config.mode})"
        )
        start = time.perf_counter()
        if sweep.todo:
            _run_rows(backend, sweep, Decoding(config.mode, config.max_new_tokens, budget, config.cache), store)
        if local is not None and config.lora_steps:
            fits = store.meta().get("lora_fits", {})
            for fold, rows, fit in lora_rows(local, config, sweep, resources, stored, progress):
                for row in rows:
                    store_row(store, sweep, row)
                fits[str(fold)] = {"parameters": fit.parameters, "seconds": round(fit.seconds, 3)}
                store.record("lora_fits", fits)
        print(f"sweep rows done in {time.perf_counter() - start:.1f} s")
        _write_probe(activations(sweep.samples), config, out_dir)
        analysis = analyse(out_dir)
        _write_side_effects(backend, sweep, config, analysis, out_dir)
    finally:
        store.close()
    return SweepRun(analysis, write_report(out_dir, analysis=analysis), out_dir)


def _run_rows(backend: Backend, sweep, decoding: Decoding, store, calibration_rows: int = 4) -> None:
    """Run the sweep's rows not stored yet into the store. The first few jobs (baseline rows) run alone and are
    timed, so that the time the whole sweep will take is printed before the bulk of it starts, from this machine's
    measured rate and each row's cost; the progress bar's estimate then follows the cost done. The split is made on
    every job, stored or not, so a resumed sweep batches its rows as an uninterrupted one (`engine.evaluate`)."""
    from vulnsteer.engine.planner import row_costs
    from vulnsteer.experiments.sweep import store_row

    costs = [
        0.0 if k in sweep.done else c for k, c in enumerate(row_costs(sweep.jobs, decoding, backend.info.num_layers))
    ]
    cost_of = {job_key(j, decoding.mode): c for j, c in zip(sweep.jobs, costs)}
    split = min(calibration_rows, len(sweep.jobs))
    first, rest = sweep.jobs[:split], sweep.jobs[split:]
    first_done = {k for k in sweep.done if k < split}
    rest_done = {k - split for k in sweep.done if k >= split}
    with progress("sweep", len(sweep.todo), work=sum(costs)) as advance:

        def on_result(result: Result) -> None:
            store_row(store, sweep, result)
            advance(1, cost_of[result_key(result)])

        if len(first_done) < len(first):
            started = time.perf_counter()
            backend.evaluate(first, decoding, None, on_result, first_done)
            per_unit = (time.perf_counter() - started) / max(sum(costs[:split]), 1e-9)
            if len(rest_done) < len(rest):
                print(
                    f"sweep: about {_duration(per_unit * sum(costs[split:]))} left for "
                    f"{len(rest) - len(rest_done)} rows, at the rate of the first {len(first) - len(first_done)} "
                    "on this machine",
                    flush=True,
                )
        if len(rest_done) < len(rest):
            backend.evaluate(rest, decoding, None, on_result, rest_done)


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.1f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def _write_side_effects(backend: Backend, sweep, config, a, out_dir: Path) -> None:
    """side_effects.json: what the chosen configs (each fold's, and the top descriptive one) cost on plain code, at
    every strength of the grid, each item steered by its own fold's vectors (for the report's trade-off); and the
    configs each method's arm chose (for the methods table's side-effect column)."""
    from vulnsteer.experiments.analysis import method_arms
    from vulnsteer.experiments.side_effects import MAX_TOKENS
    from vulnsteer.experiments.sweep import BASELINE, candidate_points, is_candidate, steering_for
    from vulnsteer.extract.vectors import parse_layers

    candidates = candidate_points(config)
    by_gain = [s.config for s in a.stats if s.config in candidates]
    chosen = {c for c in a.selected_by_fold.values() if c != BASELINE} | set(by_gain[:1])
    shapes = {candidates[c].shape for c in chosen}
    by_methods = {c for arm in method_arms(a).values() for c in arm.chosen.values() if c != BASELINE}
    points = [p for p in sweep.points if is_candidate(p, config) and (p.shape in shapes or p.id in by_methods)]
    layer_sets = {spec: parse_layers(spec, backend.info.num_layers) for spec in config.layers}

    def steering_of(point):
        return lambda s: steering_for(point, s, sweep.fold_of[s.id], sweep.banks[sweep.fold_of[s.id]], layer_sets)

    configs: dict[str, Callable[[Sample], Steering | None]] = {p.id: steering_of(p) for p in points}
    with progress("side effects", len(sweep.samples)) as advance:
        effects = backend.side_effects(sweep.samples, configs, advance)
    (out_dir / "side_effects.json").write_text(
        json.dumps(
            {
                "max_tokens": MAX_TOKENS,
                "sample_ids": [s.id for s in sweep.samples],
                "configs": [e.to_dict() for e in effects],
            },
            indent=2,
        )
    )


def _write_probe(acts, config, out_dir: Path) -> None:
    """Cross-validated probe AUROC per layer on the test items, for the report."""
    from vulnsteer.extract.probe import probe
    from vulnsteer.extract.vectors import DIRECTIONS

    method = next((m for m in config.methods if m in DIRECTIONS), "probe")  # a learned method has no read-out
    rows = probe(acts, sorted(acts.by_layer), method, config.folds, config.seed)
    (out_dir / "probe.json").write_text(json.dumps([asdict(r) for r in rows]))
