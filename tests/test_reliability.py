"""One writer per output folder, refused starts that leave nothing behind: with real processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import run_cli

from vulnsteer.models import random_model

HOLD = """
import sys, time
from pathlib import Path
from vulnsteer.experiments.store import exclusive
with exclusive(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    lm = random_model("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def vulnsteer(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vulnsteer.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", ["sweep", "eval"])
def test_a_second_writer_on_a_folder_is_refused_with_the_holders_pid(command, model_dir, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        args = [
            command,
            "--model",
            str(model_dir),
            "--dataset",
            "demo",
            "--limit",
            "8",
            "--mode",
            "score",
            "-o",
            str(out),
        ]
        if command == "sweep":
            args += ["--folds", "3", "--layers", "1", "--strengths", "1", "--no-transfer"]
        refused = vulnsteer(*args)
        assert refused.returncode == 1, refused.stderr[-2000:]
        assert f"is in use by another vulnsteer run (pid {holder.pid})" in refused.stderr
        errors = [line for line in refused.stderr.splitlines() if line.startswith("vulnsteer: error:")]
        assert "Traceback" not in refused.stderr and len(errors) == 1
        assert not (out / "sweep.sqlite").exists() and not (out / "samples.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    started = time.monotonic()
    ran = vulnsteer(*args)  # the holder is gone (killed: the kernel released its lock), so this one runs
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert time.monotonic() - started < 600


def cli(args: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in this process; (exit status, stderr)."""
    code, _, err = run_cli(args, capsys)
    return code, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("vulnsteer: error:")]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]


SWEEP = ["--dataset", "demo", "--limit", "8", "--folds", "3", "--layers", "1", "--mode", "score", "--no-transfer"]


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf,1"])
def test_non_finite_strengths_are_refused_before_any_row_and_the_fix_runs_in_the_same_folder(
    bad, model_dir, tmp_path, capsys
):
    out = str(tmp_path / "s")
    code, err = cli(["sweep", "--model", str(model_dir), *SWEEP, "--strengths", bad, "-o", out], capsys)
    one_line_error(code, err, "finite")
    assert not (tmp_path / "s" / "sweep.sqlite").exists()
    code, err = cli(
        [
            "eval",
            "--model",
            str(model_dir),
            "--dataset",
            "demo",
            "--limit",
            "2",
            "--vectors",
            out,
            "--strength",
            bad.split(",")[0],
            "-o",
            str(tmp_path / "e"),
        ],
        capsys,
    )
    one_line_error(code, err, "finite")
    code, err = cli(["sweep", "--model", str(model_dir), *SWEEP, "--strengths", "1", "-o", out], capsys)
    assert code == 0, err


def test_a_start_refused_by_the_plan_leaves_the_folder_to_the_corrected_command(model_dir, tmp_path, capsys):
    out = str(tmp_path / "s")
    code, err = cli(
        ["sweep", "--model", str(model_dir), *SWEEP, "--strengths", "1", "--vectors", "CWE-99999", "-o", out], capsys
    )
    one_line_error(code, err, "no vector for CWE-99999")
    code, err = cli(["sweep", "--model", str(model_dir), *SWEEP, "--strengths", "1", "-o", out], capsys)
    assert code == 0, err


def test_vectors_from_other_weights_of_the_same_architecture_are_refused(tmp_path, capsys):
    import torch

    from vulnsteer.data import load_demo
    from vulnsteer.errors import VulnsteerError
    from vulnsteer.extract.activations import collect
    from vulnsteer.extract.vectors import check_compatible, fit
    from vulnsteer.prompts import PromptResources

    fitted_on, other = random_model("llama", seed=0), random_model("llama", seed=5)
    assert fitted_on.config_hash == other.config_hash  # what the old check compared: it passed
    bank = fit(collect(fitted_on, load_demo()[:8], "S1", PromptResources()), fitted_on, "mean-diff", [1])
    check_compatible(bank, fitted_on)
    same_in_bf16 = random_model("llama", seed=0)
    same_in_bf16.model.to(torch.bfloat16)
    check_compatible(bank, same_in_bf16)  # the same weights in another dtype are the same weights
    with pytest.raises(VulnsteerError, match="fitted on other weights.*--allow-other-weights"):
        check_compatible(bank, other)
    check_compatible(bank, other, allow_other_weights=True)
    assert "warning: vectors were fitted on other weights" in capsys.readouterr().err


def test_damaged_files_are_one_line_errors_that_say_how_to_recover(model_dir, tmp_path, capsys):
    import json
    import os
    import sqlite3

    out = tmp_path / "s"
    code, err = cli(["sweep", "--model", str(model_dir), *SWEEP, "--strengths", "1", "-o", str(out)], capsys)
    assert code == 0, err
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    db = (out / "sweep.sqlite").read_bytes()
    page = 4096 * (len(db) // 4096 // 2)
    (damaged / "sweep.sqlite").write_bytes(db[:page] + os.urandom(4096) + db[page + 4096 :])
    one_line_error(*cli(["report", str(damaged)], capsys), "damaged", ".recover")

    store = sqlite3.connect(out / "sweep.sqlite")
    with store:
        store.execute("UPDATE rows SET result = 'not json' WHERE rowid = (SELECT MIN(rowid) FROM rows)")
    store.close()
    one_line_error(*cli(["report", str(out)], capsys), "not a result", "sqlite3")

    ev = tmp_path / "e"
    base = ["eval", "--model", str(model_dir), "--dataset", "demo", "--limit", "4", "--mode", "score", "-o", str(ev)]
    code, err = cli(base, capsys)
    assert code == 0, err
    lines = (ev / "samples.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    (ev / "samples.jsonl").write_text("\n".join([json.dumps({**row, "score": "high"}), *lines[1:]]) + "\n")
    one_line_error(*cli(base, capsys), "samples.jsonl:1", "score must be a finite number")
    for name in ("samples.jsonl", "run.json"):
        (ev / name).write_bytes(os.urandom(300) + b"\xff")
        one_line_error(*cli(base, capsys), name, "not a text file")
        shutil_rmtree_and_rerun(ev, base, capsys)
    config = tmp_path / "config.toml"
    config.write_bytes(b"\xff\xfe" + os.urandom(64))
    one_line_error(*cli(["sweep", "-c", str(config), "-o", str(tmp_path / "c")], capsys), "not a text file")
    one_line_error(*cli([*base[:-1], str(tmp_path / "cuda"), "--device", "cuda"], capsys), "--device cuda")


def shutil_rmtree_and_rerun(folder, args, capsys) -> None:
    import shutil

    shutil.rmtree(folder)
    code, err = cli(args, capsys)
    assert code == 0, err


def test_ctrl_c_says_where_the_rows_are(model_dir, tmp_path):
    import signal

    args = [
        sys.executable,
        "-m",
        "vulnsteer.cli",
        "sweep",
        "--model",
        str(model_dir),
        *SWEEP,
        "--strengths",
        "1",
        "--mode",
        "generate",
        "--max-new-tokens",
        "64",
        "-o",
        str(tmp_path / "s"),
    ]
    run = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "s" / "sweep.sqlite").exists():
        time.sleep(0.2)
    time.sleep(2)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-2000:]
    assert "interrupted; every finished row is saved in the output folder" in err and "--resume" in err


def test_rows_reach_the_database_file_itself_not_only_the_wal(tmp_path, monkeypatch):
    import shutil

    from test_evaluation import make_jobs, make_samples

    from vulnsteer.engine.evaluate import evaluate
    from vulnsteer.experiments.store import SweepStore
    from vulnsteer.records import Decoding

    monkeypatch.setattr(SweepStore, "CHECKPOINT_ROWS", 5)
    results = evaluate(random_model("llama"), make_jobs(make_samples(12)), Decoding("score"))
    store = SweepStore(tmp_path / "sweep.sqlite")
    for result in results:
        store.add("baseline", 0, result)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(tmp_path / "sweep.sqlite", copy / "sweep.sqlite")  # the main file alone, as after kill -9
    assert len(SweepStore(copy / "sweep.sqlite").rows()) == 10  # the last checkpoint, after row 10
    store.close()


def test_a_resumed_store_whose_rows_have_other_folds_is_refused(model_dir, tmp_path, capsys):
    import hashlib
    import json
    import sqlite3

    out = tmp_path / "s"
    code, err = cli(["sweep", "--model", str(model_dir), *SWEEP, "--strengths", "1", "-o", str(out)], capsys)
    assert code == 0, err
    store = sqlite3.connect(out / "sweep.sqlite")
    config = json.loads(store.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])
    config["seed"] = 7  # another fold partition, with the checksum made to match
    with store:
        store.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps(config),))
        store.execute(
            "UPDATE meta SET value = ? WHERE key = 'config_sha256'",
            (json.dumps(hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()),),
        )
    store.close()
    one_line_error(*cli(["sweep", "--resume", str(out)], capsys), "folds are not the ones")


def test_an_eval_refused_before_its_first_row_leaves_the_folder_to_the_corrected_command(model_dir, tmp_path, capsys):
    """A LoReFT file cannot go through the static decoder: the refusal comes before any row, and the same folder
    then takes the corrected command (its settings were not kept)."""
    from vulnsteer.data import load_demo
    from vulnsteer.extract.activations import collect
    from vulnsteer.extract.trained import Training
    from vulnsteer.extract.vectors import fit, save
    from vulnsteer.prompts import PromptResources

    lm = random_model("llama")
    train = load_demo()[:8]
    save(
        fit(collect(lm, train, "S1", PromptResources()), lm, "loreft", [1], training=Training(steps=2, rank=1)),
        tmp_path / "reft.safetensors",
    )
    out = str(tmp_path / "e")
    args = [
        "eval",
        "--model",
        str(model_dir),
        "--dataset",
        "demo",
        "--limit",
        "12",
        "--vectors",
        str(tmp_path / "reft.safetensors"),
        "--layers",
        "1",
        "--strength",
        "1",
        "--cwe-vector",
        "pooled",
        "--mode",
        "generate",
        "--max-new-tokens",
        "4",
        "--drop-overlap",
        "-o",
        out,
    ]
    one_line_error(*cli([*args, "--cache", "static"], capsys), "use --cache dynamic")
    assert not (tmp_path / "e" / "run.json").exists()
    code, err = cli([*args, "--cache", "dynamic"], capsys)
    assert code == 0, err
