"""The Python API behind the CLI commands: each function glues data, prompts, model and engine, and writes files."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vulnsteer import __version__
from vulnsteer.data import Sample
from vulnsteer.evaluation import Decoding, Job, Result, evaluate
from vulnsteer.models import LoadedModel
from vulnsteer.prompts import PromptResources, build_prompt
from vulnsteer.steering import Steering
from vulnsteer.store import SampleWriter, open_run, read_samples, result_key, row_key
from vulnsteer.summary import print_table, summarise_results, write_summary


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), transient=False)


def make_jobs(samples: Sequence[Sample], prompt_id: str, resources: PromptResources,
              steering_for: Callable[[Sample], Steering | None] = lambda s: None) -> list[Job]:
    return [Job(s, prompt_id, build_prompt(s, prompt_id, resources), steering_for(s)) for s in samples]


def run_jobs(lm: LoadedModel, jobs: Sequence[Job], decoding: Decoding, description: str,
             on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Evaluate with a progress bar."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(jobs))
        return evaluate(lm, jobs, decoding, progress=lambda n: bar.advance(task, n), on_result=on_result)


def run_eval(lm: LoadedModel, jobs: Sequence[Job], decoding: Decoding, out_dir: Path, meta: dict,
             n_boot: int = 2000) -> list[Result]:
    """Evaluate into `out_dir` (resumable: rows already in samples.jsonl are kept and skipped), then summarise."""
    meta = {**meta, "vulnsteer": __version__, "decoding": asdict(decoding)}
    done = open_run(out_dir, meta)
    todo = [job for job in jobs if _job_key(job, decoding) not in done]
    if done:
        print(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} rows already in {out_dir / 'samples.jsonl'}")
    writer = SampleWriter(out_dir / "samples.jsonl", list(done.values()))
    start = time.perf_counter()
    try:
        if todo:
            run_jobs(lm, todo, decoding, "eval", on_result=writer.write)
    finally:
        writer.close()
    by_key = {result_key(r): r for r in read_samples(out_dir / "samples.jsonl")}
    results = [by_key[_job_key(job, decoding)] for job in jobs]
    summaries = summarise_results(results, n_boot=n_boot)
    write_summary(out_dir, summaries, {**meta, "rows": len(results), "seconds": round(time.perf_counter() - start, 1)})
    print_table(summaries, title=f"{meta.get('model')} · prompt {meta.get('prompt')} · {decoding.mode}")
    return results


def _job_key(job: Job, decoding: Decoding) -> str:
    return row_key(job.sample.id, job.prompt_id, decoding.mode, job.steering.label if job.steering else None)
