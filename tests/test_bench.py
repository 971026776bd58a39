"""The benchmarks: every script in bench/ answers --help and runs its --smoke mode end to end on a tiny model; and
the GPU benchmark's logic, run on CPU with its tiny model: a device session is lent for minutes, so the script
must come back with every figure it could measure, even when one of its arms fails there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
GOAL_ARMS = ["batched_generate_steered", "static_graph_steered", "score"]


@pytest.fixture
def gpu_scale(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_scale

    return gpu_scale


def run_tiny(gpu_scale, tmp_path) -> tuple[int, dict]:
    output = tmp_path / "tiny.json"
    code = gpu_scale.main(["--tiny", "--repeats", "1", "--one-items", "1", "--output", str(output)])
    return code, json.loads(output.read_text())


def test_tiny_run_measures_every_arm_and_the_static_decoders_tokens_agree(gpu_scale, tmp_path):
    code, report = run_tiny(gpu_scale, tmp_path)
    assert code == 0 and report["failed_arms"] == []
    assert set(GOAL_ARMS) <= set(report["arms"])
    assert all(arm["median_s"] > 0 for name, arm in report["arms"].items() if name != "one_at_a_time")
    same = report["arms"]["static_graph_steered"]["tokens_vs_plain_steered"]
    assert same["identical_rows"] == same["rows"] == 48  # float32 on CPU: the same greedy tokens
    assert report["derived"]["batched / score"] > 0
    sweep = report["arms"]["k_configs_static_prompt_last"]
    assert sweep["k"] == 4 and sweep["median_s"] > 0 and report["derived"]["k_configs: separate / combined"] > 0
    same = sweep["tokens_combined_vs_separate"]  # the configs' rows in one pass answer as in their own passes
    assert same["identical_rows"] == same["rows"] == 4 * 48


def test_a_failing_arm_is_reported_and_the_others_still_run(gpu_scale, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(gpu_scale.StaticDecoder, "generate", broken)
    code, report = run_tiny(gpu_scale, tmp_path)
    assert code == 1
    static = [name for name in report["arms"] if "static" in name]
    assert len(static) == 5 and report["failed_arms"] == static
    assert report["arms"]["static_graph_steered"] == {
        "error": "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    }
    # The arms after the failed one ran, and the figures that need it are left empty rather than made up.
    assert report["arms"]["score"]["median_s"] > 0
    assert report["derived"]["batched / score"] > 0
    assert report["derived"]["static_eager / static_graph"] is None
    assert report["derived"]["static_graph_steered / bound_engine_batches"] is None
    assert "static_graph_steered failed" in capsys.readouterr().err


SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")
# Extra arguments a script's --smoke run needs (an output folder); every other script runs on `--smoke` alone.
SMOKE_ARGS = {"lm_eval_agreement.py": ["{tmp}"]}


def run_script(name: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_answers_help_without_running(name, tmp_path):
    run = run_script(name, ["--help"], tmp_path)
    assert run.returncode == 0 and "usage:" in run.stdout and "--smoke" in run.stdout, run.stderr[-2000:]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_runs_its_smoke_mode(name, tmp_path):
    """What docs/performance.md tells users to run must start: each script, end to end on a tiny model."""
    args = [a.format(tmp=tmp_path / "out") for a in SMOKE_ARGS.get(name, [])]
    run = run_script(name, ["--smoke", *args], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def test_a_new_answer_collection_leaves_out_an_earlier_ones_jobs_and_answers(monkeypatch, tmp_path):
    """collect_answers --exclude: the jobs an earlier collection answered are not asked again, and no answer equal to
    an earlier one reaches the new split, so the new halves hold only new answers."""
    monkeypatch.syspath_prepend(str(BENCH))
    import collect_answers

    from vulnsteer.data import load_dataset

    jobs = collect_answers.plan_jobs(load_dataset("demo"), 2, 0, "demo", ("S1", "S2"))
    earlier = [{"model": "m", "prompt": jobs[0].prompt_id, "sample_id": jobs[0].sample.id, "answer": "Yes."}]
    asked = []

    def answer(job):
        asked.append(job)
        return SimpleNamespace(
            prompt_id=job.prompt_id,
            sample_id=job.sample.id,
            cwe=job.sample.cwe,
            response="Yes." if len(asked) == 1 else f"No, answer {len(asked)}.",
        )

    path = tmp_path / "m.jsonl"
    skip = frozenset((r["model"], r["prompt"], r["sample_id"]) for r in earlier)
    collect_answers.collect(answer, "m", jobs, path, float("inf"), skip)
    assert asked == jobs[1:]
    split = collect_answers.split_answers(collect_answers.read_rows(path), 0, earlier)
    assert sorted(r["answer"] for r in split) == [f"No, answer {k}." for k in range(2, len(jobs))]
