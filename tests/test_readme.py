"""The README's Python example runs as written, on a tiny model saved to a folder in place of the catalogue model."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import tiny_lm

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(tmp_path, capsys, monkeypatch):
    code = python_example()
    assert '"smollm2-135m-instruct"' in code
    tiny = tiny_lm("qwen2")
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "model")
    namespace: dict = {}
    monkeypatch.chdir(tmp_path)  # the example writes runs/steered and held.safetensors where it runs
    exec(
        compile(code.replace('"smollm2-135m-instruct"', repr(str(tmp_path / "model"))), "README.md", "exec"), namespace
    )
    baseline, steered = namespace["baseline"]["all"], namespace["with_vector"]["all"]
    assert baseline.n == steered.n == len(namespace["test"]) > 0
    assert not {s.cwe for s in namespace["test"]} & {s.cwe for s in namespace["train"]}, "the example is held out"
    assert namespace["logits"].shape[0] == 2
    # `vulnsteer eval --vectors` as a library call: the file's training items dropped, the rest steered and written.
    run = namespace["run"]
    rows = run.results
    assert run.summaries["all"].n == len(rows) and run.out_dir == Path("runs/steered")
    steered_ids = {r.sample_id for r in rows}
    assert {s.id for s in namespace["test"]} <= steered_ids and not steered_ids & {s.id for s in namespace["train"]}
    assert all(r.steering and r.steering.strength == -0.5 for r in rows)
    assert (tmp_path / "runs" / "steered" / "samples.jsonl").exists()
    assert capsys.readouterr().out.strip(), "the example prints its two balanced accuracies"
