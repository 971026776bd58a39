"""Sweeps on a Ray cluster the tests start themselves (`ray.init(num_cpus=2)`), with tiny models saved to disk:
the same rows as a local sweep, a worker killed mid-sweep, a driver killed with SIGKILL and resumed."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from conftest import tiny_lm
from test_sweep import table

from vulnsteer.errors import VulnsteerError
from vulnsteer.experiments.cluster import ClusterOptions, shards
from vulnsteer.experiments.sweep import SweepConfig
from vulnsteer.models import load_model
from vulnsteer.pipeline import run_sweep

SETTINGS = dict(
    dataset="demo",
    limit=8,
    folds=3,
    layers=["1", "0,2"],
    strengths=[-2.0, 2.0],
    mode="generate",
    max_new_tokens=8,
    transfer=False,
    dtype="float32",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local two-CPU Ray cluster for the module (workers inherit this environment, so the cache is set first)."""
    before = os.environ.get("VULNSTEER_CACHE")
    os.environ["VULNSTEER_CACHE"] = str(tmp_path_factory.mktemp("ray-cache"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if before is None:
        os.environ.pop("VULNSTEER_CACHE", None)
    else:
        os.environ["VULNSTEER_CACHE"] = before


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    lm = tiny_lm("qwen2")
    folder = tmp_path_factory.mktemp("tiny-model")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def local_rows(model_dir, tmp_path_factory):
    """rows.csv of the same sweep in this process: what every cluster run must reproduce."""
    out = tmp_path_factory.mktemp("local")
    run_sweep(SweepConfig(**SETTINGS, model=str(model_dir)), out, lm=load_model(str(model_dir)))
    return table(out / "rows.csv")


def test_shards_have_near_equal_cost_keep_groups_whole_and_keep_order():
    costs = [5, 1, 1, 8, 2, 2, 3, 9, 1, 4]
    groups = ["a", "b", "b", "c", "d", "d", "e", "f", "g", "h"]
    cut = shards(costs, groups, 3)
    assert sorted(i for shard in cut for i in shard) == list(range(len(costs)))
    assert all(shard == sorted(shard) for shard in cut)
    for group in set(groups):
        assert sum(any(groups[i] == group for i in shard) for shard in cut) == 1
    loads = [sum(costs[i] for i in shard) for shard in cut]
    assert max(loads) - min(loads) <= max(costs) and max(loads) <= sum(costs) / 3 + max(costs)
    assert len(shards([1, 1], ["a", "a"], 4)) == 1  # never an empty shard


def _ray_workers() -> list[int]:
    """PIDs of the processes running a ModelWorker actor (Ray titles them ray::ModelWorker...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ray::ModelWorker" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _kill_a_worker_after(db: Path, rows: int, killed: list[int]) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            done = sqlite3.connect(db).execute("SELECT COUNT(*) FROM rows").fetchone()[0] if db.exists() else 0
        except sqlite3.OperationalError:
            done = 0
        if done >= rows and _ray_workers():
            pid = _ray_workers()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.05)


def test_cluster_sweep_with_a_worker_killed_midway_equals_the_local_sweep(
    cluster, model_dir, local_rows, tmp_path, capsys
):
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after, args=(tmp_path / "sweep.sqlite", 20, killed))
    killer.start()
    run_sweep(SweepConfig(**SETTINGS, model=str(model_dir)), tmp_path, cluster=ClusterOptions("auto", workers=2))
    killer.join()
    out = capsys.readouterr().out
    assert killed and "a worker died" in out, "no worker was killed mid-sweep"
    assert out.count("worker 2:") == 1  # the replacement loaded the model
    rows = sqlite3.connect(tmp_path / "sweep.sqlite").execute("SELECT COUNT(*) FROM rows").fetchone()[0]
    assert rows == len(local_rows[1])  # none lost, none doubled (the key would refuse a double; so count)
    assert table(tmp_path / "rows.csv") == local_rows


def test_driver_killed_with_sigkill_then_resumed_on_the_cluster_equals_the_local_sweep(
    cluster, model_dir, local_rows, tmp_path
):
    env = {**os.environ, "RAY_ADDRESS": cluster}
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--model",
        str(model_dir),
        "--dataset",
        "demo",
        "--limit",
        "8",
        "--folds",
        "3",
        "--layers",
        "1;0,2",
        "--strengths",
        "-2,2",
        "--methods",
        "mean-diff",
        "--mode",
        "generate",
        "--max-new-tokens",
        "8",
        "--no-transfer",
        "--dtype",
        "float32",
        "-o",
        str(out),
        "--ray",
        "auto",
        "--workers",
        "2",
    ]
    driver = subprocess.Popen(
        [sys.executable, "-m", "vulnsteer.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    db, done, deadline = out / "sweep.sqlite", 0, time.time() + 300
    while time.time() < deadline and driver.poll() is None and done < 30:
        try:
            done = sqlite3.connect(db).execute("SELECT COUNT(*) FROM rows").fetchone()[0] if db.exists() else 0
        except sqlite3.OperationalError:
            done = 0
        time.sleep(0.05)
    assert driver.poll() is None, "the sweep finished before its driver could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert 0 < done < len(local_rows[1])

    resumed = subprocess.run(
        [sys.executable, "-m", "vulnsteer.cli", "sweep", "--resume", str(out), "--ray", "auto", "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "already done" in resumed.stdout
    assert table(out / "rows.csv") == local_rows


def test_a_worker_that_cannot_load_the_model_is_one_clear_error(cluster, tmp_path):
    with pytest.raises(VulnsteerError, match="a worker could not load the model: .*missing-model"):
        run_sweep(
            SweepConfig(**SETTINGS, model=str(tmp_path / "missing-model")),
            tmp_path / "out",
            cluster=ClusterOptions("auto", workers=1),
        )
    assert not (tmp_path / "out" / "sweep.sqlite").exists()


def test_cluster_flags_and_unreachable_clusters_are_one_line_errors(tmp_path):
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    base = [
        sys.executable,
        "-m",
        "vulnsteer.cli",
        "sweep",
        "--limit",
        "2",
        "--methods",
        "mean-diff",
        "-o",
        str(tmp_path / "out"),
    ]
    cases = [
        (["--ray", "127.0.0.1:1"], "cannot reach the Ray cluster at '127.0.0.1:1'"),
        (["--workers", "2"], "--workers needs --ray"),
        (["--ray", "auto", "--workers", "0"], ""),
    ]  # typer refuses 0 itself (exit 2)
    for flags, message in cases:
        result = subprocess.run([*base, *flags], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr
    config = tmp_path / "sweep.toml"
    config.write_text('limit = 2\n[cluster]\nray = "local"\nworkers = "two"\n')
    result = subprocess.run([*base, "--config", str(config)], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "workers an integer" in result.stderr
    with pytest.raises(VulnsteerError, match="workers"):
        ClusterOptions("auto", workers=0)


def test_learned_fits_on_ray_are_refused_in_one_line_before_connecting(tmp_path):
    """trained, loreft and LoRA train on the model, which the Ray driver never loads: refused before any connection
    (the address below is unreachable, and the refusal names the methods, not the address)."""
    for flags in ({"methods": ["mean-diff", "trained"]}, {"lora_steps": 1}):
        config = SweepConfig(**{**SETTINGS, "mode": "score", **flags})
        with pytest.raises(VulnsteerError, match="fitted on the model's answers in this process"):
            run_sweep(config, tmp_path, cluster=ClusterOptions("127.0.0.1:1"))


def test_a_worker_loads_through_the_backend_registry_with_the_sweeps_model_options(tmp_path):
    """A Ray worker loads its model as a local run does (backends.load): `--model-args` reach it, an option the
    backend does not take and a backend that cannot steer are refused there in one line."""
    from vulnsteer.experiments.cluster import ModelWorker

    lm = tiny_lm("qwen2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    assert ModelWorker(str(tmp_path), {"dtype": "float32"}, "score").error is None
    assert "colour" in (ModelWorker(str(tmp_path), {"colour": "red"}, "score").error or "")
    assert "cannot steer" in (ModelWorker("openai:gpt", {}, "score").error or "")
