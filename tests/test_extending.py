"""docs/extending.md's worked examples run as written: a toy backend registered by its decorator (or found through
the `vulnsteer.backends` entry point group) answers `vulnsteer eval`, takes its own `--model-args`, and is refused
what it cannot do; a toy direction method registered by one line runs through `vulnsteer sweep`."""

from __future__ import annotations

import json
import re
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from conftest import run_cli, tiny_lm

from vulnsteer import backends

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def example(section: str) -> str:
    """The first python block of a section of docs/extending.md."""
    text = DOC.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.fixture
def registry(monkeypatch):
    """The backends registered when the test starts, restored after it."""
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    return backends.BACKENDS


@pytest.fixture
def yes_backend(registry):
    exec(compile(example("Add a backend"), "docs/extending.md", "exec"), {})
    return registry["yes"]


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def test_a_toy_backend_answers_eval_and_takes_its_own_options(yes_backend, tmp_path, capsys):
    data = ["--dataset", "demo", "--limit", "4"]
    code, _, err = run_cli(["eval", "--model", "yes:any", *data, "-o", str(tmp_path / "yes")], capsys)
    assert code == 0, err
    written = rows(tmp_path / "yes")
    assert len(written) == 4 and {r["response"] for r in written} == {"Yes."}
    assert {r["verdict"] for r in written} == {"vulnerable"}
    summary = json.loads((tmp_path / "yes" / "summary.json").read_text())
    assert summary["meta"]["model"] == "yes:Yes." and summary["metrics"]["all"]["n"] == 4
    assert summary["metrics"]["all"]["yes_rate"]["value"] == 1.0

    code, _, err = run_cli(
        ["eval", "--model", "yes:any", "--model-args", "answer=No.", *data, "-o", str(tmp_path / "no")], capsys
    )
    assert code == 0, err
    assert {r["verdict"] for r in rows(tmp_path / "no")} == {"not_vulnerable"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--mode", "score"], "yes:any cannot score (--mode score): it answers in words"),
        (["eval", "--vectors", "nowhere.safetensors"], "yes:any cannot steer (--vectors, sweep, run)"),
        (["sweep"], "yes:any cannot steer (--vectors, sweep, run)"),
        (["extract"], "yes:any cannot give hidden states"),
        (["eval", "--model-args", "colour=red"], "yes:any takes no option 'colour' (its options: answer)"),
        (["eval", "--base-url", "http://127.0.0.1:1/v1"], "base_url is an option of openai:"),
    ],
)
def test_a_toy_backend_is_refused_what_it_cannot_do_in_one_line(yes_backend, tmp_path, capsys, args, message):
    command, *rest = args
    code, _, err = run_cli([command, "--model", "yes:any", "--limit", "2", *rest, "-o", str(tmp_path / "o")], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "samples.jsonl").exists()


def test_a_backend_of_another_package_is_found_through_its_entry_point(registry, tmp_path, monkeypatch):
    (tmp_path / "yes_plugin.py").write_text(example("Add a backend"))
    monkeypatch.syspath_prepend(str(tmp_path))
    declared = [EntryPoint(name="yes", value="yes_plugin", group=backends.PLUGINS)]
    monkeypatch.setattr(backends, "entry_points", lambda group: declared if group == backends.PLUGINS else [])
    assert "yes" not in registry
    backend, name = backends.backend_for("yes:any")
    assert type(backend).__name__ == "YesBackend" and name == "any"
    assert backends.load("yes:any", {"answer": "No."}, "generate").handle == "No."


def test_a_toy_direction_method_runs_through_the_sweep_command(tmp_path, capsys, monkeypatch):
    from vulnsteer.experiments.analysis import analyse
    from vulnsteer.extract import vectors

    monkeypatch.setattr(vectors, "DIRECTIONS", dict(vectors.DIRECTIONS))
    exec(compile(example("Add a vector method"), "docs/extending.md", "exec"), {})
    model = tiny_lm("llama")
    model.model.save_pretrained(tmp_path / "model")
    model.tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "sweep"
    code, _, err = run_cli(
        [
            "sweep",
            "--model",
            str(tmp_path / "model"),
            "--dataset",
            "demo",
            "--limit",
            "8",
            "--folds",
            "3",
            "--layers",
            "1",
            "--strengths",
            "1",
            "--mode",
            "score",
            "--methods",
            "vulnerable-mean",
            "--vectors",
            "pooled",
            "--no-transfer",
            "--dtype",
            "float32",
            "-o",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    assert "vulnerable-mean|1|pooled|prompt-last|+1" in analyse(out).arms
