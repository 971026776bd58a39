"""What both benchmarks record about a run and how they write it: the date, the exact command, the versions and
the commit, then the report as JSON."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def git_state() -> dict:
    """Read-only: the commit and whether the tree has local changes."""

    def run(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}


def run_info() -> dict:
    import transformers

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git": git_state(),
    }


def write_report(report: dict, path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def timed(run, repeats: int, warm_up: bool = False) -> list[float]:
    """Seconds of each of `repeats` calls of `run` (after one untimed call with `warm_up`)."""
    if warm_up:
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def bench_model(name: str, smoke: bool, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The model a benchmark measures: `name`, or with `--smoke` the unit tests' tiny random one (offline, seconds;
    its figures mean nothing)."""
    from vulnsteer.models import load_model, random_model

    return random_model("qwen2", device=device) if smoke else load_model(name, dtype=dtype, device=device)
