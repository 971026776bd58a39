"""One writer per output folder, refused starts that leave nothing behind: with real processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

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
        args = [command, "--model", str(model_dir), "--dataset", "demo", "--limit", "8", "--mode", "score", "-o",
                str(out)]
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
