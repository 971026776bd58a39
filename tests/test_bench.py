"""The GPU benchmark's logic, run on CPU with its tiny model: a device session is lent for minutes, so the script
must come back with every figure it could measure, even when one of its arms fails there."""

from __future__ import annotations

import json
from pathlib import Path

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
        "error": "RuntimeError: CUDA error: operation not permitted when stream is capturing"}
    # The arms after the failed one ran, and the figures that need it are left empty rather than made up.
    assert report["arms"]["score"]["median_s"] > 0
    assert report["derived"]["batched / score"] > 0
    assert report["derived"]["static_eager / static_graph"] is None
    assert report["derived"]["static_graph_steered / bound_engine_batches"] is None
    assert "static_graph_steered failed" in capsys.readouterr().err
