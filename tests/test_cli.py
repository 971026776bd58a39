"""The command line: bad input ends as one `vulnsteer: error:` line and a non-zero exit (never a traceback), and
`vulnsteer eval` writes, resumes and repairs its result files. Models are the tiny random ones of conftest, put in
place of `load_lm`, so nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_lm

from vulnsteer.cli import main

REQUIRED_FIELDS = {
    "sample_id",
    "pair_id",
    "cwe",
    "label",
    "split",
    "source",
    "prompt_id",
    "mode",
    "response",
    "verdict",
    "score",
    "prompt_tokens",
    "new_tokens",
    "seconds",
    "steering",
    "turns",
}


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `vulnsteer ARGS` in this process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["vulnsteer", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, match: str | None = None) -> str:
    assert code != 0, f"expected a failure; stdout: {out!r}"
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    assert lines[0].startswith("vulnsteer: error:")
    if match is not None:
        assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def tiny(monkeypatch):
    """`load_lm` returns a tiny random Llama; records how often it was called."""
    from vulnsteer.pipeline import local

    calls = []

    def fake_load_lm(model, *settings):
        calls.append(model)
        return local(tiny_lm("llama"))

    monkeypatch.setattr("vulnsteer.cli.load_lm", fake_load_lm)
    return calls


@pytest.fixture
def no_model(monkeypatch):
    """For errors that must be found before any model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model should not be loaded for this error")

    monkeypatch.setattr("vulnsteer.cli.load_lm", refuse)


def fake_holmes(
    root: Path,
    vulnerable: bytes = b"int main(void) { char b[2]; b[5] = 1; }\n",
    patched: bytes = b"int main(void) { char b[8]; b[5] = 1; }\n",
) -> Path:
    folder = root / "hand-crafted" / "dataset" / "CWE-787"
    folder.mkdir(parents=True)
    (folder / "1.c").write_bytes(vulnerable)
    (folder / "p_1.c").write_bytes(patched)
    return root


# --- bad input ----------------------------------------------------------------------------------


def test_missing_dataset_folder(monkeypatch, capsys, tmp_path, no_model):
    code, out, err = run_cli(
        monkeypatch, capsys, "eval", "--dataset", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")
    )
    assert_one_line_error(code, out, err, "not found")


def test_empty_dataset_folder(monkeypatch, capsys, tmp_path, no_model):
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(
        monkeypatch, capsys, "eval", "--dataset", str(tmp_path / "empty"), "-o", str(tmp_path / "out")
    )
    assert_one_line_error(code, out, err, "no SecLLMHolmes code files")


def test_unknown_split(monkeypatch, capsys, tmp_path, no_model):
    code, out, err = run_cli(
        monkeypatch, capsys, "eval", "--cwe", "CWE-79", "--split", "nonexistent", "-o", str(tmp_path / "out")
    )
    assert_one_line_error(code, out, err, "nonexistent")


def test_filters_that_leave_nothing(monkeypatch, capsys, tmp_path, no_model):
    root = fake_holmes(tmp_path / "holmes")
    other = root / "augmented" / "trivial" / "A1" / "dataset" / "CWE-79"
    other.mkdir(parents=True)
    (other / "1.py").write_text("print(request.args['q'])\n")
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "eval",
        "--dataset",
        str(root),
        "--split",
        "hand-crafted",
        "--cwe",
        "CWE-79",
        "-o",
        str(tmp_path / "out"),
    )
    assert_one_line_error(code, out, err, "no samples left")


@pytest.mark.parametrize("cwe", ["CWE-999", "not-a-cwe"])
def test_unknown_cwe(monkeypatch, capsys, tmp_path, no_model, cwe):
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--cwe", cwe, "-o", str(tmp_path / "out"))
    assert_one_line_error(code, out, err, cwe)


def test_unknown_prompt_id(monkeypatch, capsys, tmp_path, no_model):
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--prompt", "Z9", "--limit", "2", "-o", str(tmp_path / "out"))
    assert_one_line_error(code, out, err, "Z9")


def test_unknown_mode(monkeypatch, capsys, tmp_path, no_model):
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--mode", "guess", "-o", str(tmp_path / "out"))
    assert_one_line_error(code, out, err, "guess")


def test_non_utf8_code_file(monkeypatch, capsys, tmp_path, no_model):
    root = fake_holmes(tmp_path / "holmes", vulnerable=b"int x = 1; /* \xff\xfe caf\xe9 */\n")
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--dataset", str(root), "-o", str(tmp_path / "out"))
    line = assert_one_line_error(code, out, err, "UTF-8")
    assert "1.c" in line


def test_empty_code_file(monkeypatch, capsys, tmp_path, no_model):
    root = fake_holmes(tmp_path / "holmes", patched=b"  \n")
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--dataset", str(root), "-o", str(tmp_path / "out"))
    line = assert_one_line_error(code, out, err, "empty")
    assert "p_1.c" in line


def test_nonsense_model_name(monkeypatch, capsys, tmp_path):
    """The real `load_lm`: a name that is no catalogue entry, file, folder or hub id fails without a download."""
    code, out, err = run_cli(
        monkeypatch, capsys, "eval", "--model", "no such model", "--limit", "1", "-o", str(tmp_path / "out")
    )
    assert_one_line_error(code, out, err, "unknown model")
    assert not (tmp_path / "out" / "samples.jsonl").exists()


def test_garbage_vector_file(monkeypatch, capsys, tmp_path, tiny):
    vectors = tmp_path / "v.safetensors"
    vectors.write_bytes(b"this is not a safetensors file\x00\x01")
    code, out, err = run_cli(
        monkeypatch, capsys, "eval", "--limit", "1", "--vectors", str(vectors), "-o", str(tmp_path / "out")
    )
    assert_one_line_error(code, out, err, "not a vulnsteer vector file")
    assert not tiny  # found before the model loads


def test_missing_vector_file(monkeypatch, capsys, tmp_path, tiny):
    code, out, err = run_cli(
        monkeypatch, capsys, "eval", "--limit", "1", "--vectors", str(tmp_path / "no.st"), "-o", str(tmp_path / "out")
    )
    assert_one_line_error(code, out, err, "not found")


def _save_bank(path: Path, hidden: int, layers: int, model: str = "other"):
    from vulnsteer.extract.vectors import VectorBank, save

    g = torch.Generator().manual_seed(0)
    vectors = {
        group: {layer: torch.randn(hidden, generator=g) for layer in range(layers)} for group in ("CWE-22", "pooled")
    }
    meta = {"model": model, "hidden_size": hidden, "num_layers": layers, "method": "mean-diff"}
    save(VectorBank(vectors, meta), path)


def test_vectors_from_a_model_of_another_shape(monkeypatch, capsys, tmp_path, tiny):
    vectors = tmp_path / "other.safetensors"
    _save_bank(vectors, hidden=32, layers=2)
    code, out, err = run_cli(
        monkeypatch, capsys, "eval", "--limit", "1", "--vectors", str(vectors), "-o", str(tmp_path / "out")
    )
    assert_one_line_error(code, out, err, "hidden size 32")
    assert not (tmp_path / "out" / "samples.jsonl").exists()


# --- the real entry point, in a subprocess --------------------------------------------------------


def run_subprocess(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vulnsteer.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=300,
    )


def test_subprocess_missing_dataset(tmp_path):
    proc = run_subprocess("eval", "--dataset", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "not found")


def test_subprocess_unknown_hub_model_offline(tmp_path):
    """A hub-id-shaped name that is not in the catalogue, offline: a clear error, not a traceback."""
    proc = run_subprocess(
        "eval",
        "--model",
        "vulnsteer-tests/no-such-model-xyz",
        "--dataset",
        "demo",
        "--limit",
        "1",
        "-o",
        str(tmp_path / "out"),
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "no-such-model-xyz")
    assert not (tmp_path / "out" / "samples.jsonl").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--no-such-flag"], "No such option"),
        (["eval", "--limit", "abc"], "Invalid value"),
        (["eval", "--batch-tokens", "0"], "--batch-tokens"),
        (["eval", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["no-such-command"], "No such command"),
    ],
)
def test_bad_flags_are_usage_errors(tmp_path, args, message):
    """Bad flags get the usual usage error (exit 2) naming the problem, never a traceback."""
    proc = run_subprocess(*args, "-o", str(tmp_path / "out")) if args[0] == "eval" else run_subprocess(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert message in proc.stderr


# --- eval: outputs, resume, refusal, repair -------------------------------------------------------


def eval_args(out: Path, *extra: str) -> list[str]:
    return ["eval", "--dataset", "demo", "--limit", "4", "--max-new-tokens", "4", "-o", str(out), *extra]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_writes_samples_and_summaries(monkeypatch, capsys, tmp_path, tiny):
    out = tmp_path / "out"
    code, stdout, err = run_cli(monkeypatch, capsys, *eval_args(out))
    assert code == 0, err
    assert tiny == ["smollm2-135m-instruct"]  # the default model was asked for
    rows = read_rows(out / "samples.jsonl")
    assert len(rows) == 4
    assert len({r["sample_id"] for r in rows}) == 4
    for row in rows:
        assert REQUIRED_FIELDS <= set(row)
        assert row["mode"] == "generate" and row["prompt_id"] == "S1"
        assert row["verdict"] in {"vulnerable", "not_vulnerable", "unknown"}
        assert row["new_tokens"] <= 4
    assert {r["label"] for r in rows} == {"vulnerable", "patched"}  # whole pairs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["all"]["n"] == 4
    assert summary["meta"]["rows"] == 4
    assert summary["meta"]["prompt"] == "S1"
    assert summary["meta"]["model"] == "tiny-llama"
    md = (out / "summary.md").read_text()
    assert "| group |" in md and "| all |" in md
    run = json.loads((out / "run.json").read_text())
    assert run["decoding"]["max_new_tokens"] == 4


def test_eval_score_mode(monkeypatch, capsys, tmp_path, tiny):
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, *eval_args(out, "--mode", "score"))
    assert code == 0, err
    rows = read_rows(out / "samples.jsonl")
    assert len(rows) == 4
    for row in rows:
        assert row["mode"] == "score"
        assert row["verdict"] == ("vulnerable" if row["score"] > 0 else "not_vulnerable")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["all"]["auroc"] is not None


def test_eval_resumes_without_duplicates(monkeypatch, capsys, tmp_path, tiny):
    out = tmp_path / "out"
    assert run_cli(monkeypatch, capsys, *eval_args(out))[0] == 0
    first = (out / "samples.jsonl").read_bytes()
    code, stdout, err = run_cli(monkeypatch, capsys, *eval_args(out))
    assert code == 0, err
    assert "resuming: 4 of 4" in stdout
    assert (out / "samples.jsonl").read_bytes() == first  # nothing redone, nothing duplicated
    assert json.loads((out / "summary.json").read_text())["meta"]["rows"] == 4


def test_eval_with_other_settings_in_the_same_folder_is_refused(monkeypatch, capsys, tmp_path, tiny):
    out = tmp_path / "out"
    assert run_cli(monkeypatch, capsys, *eval_args(out))[0] == 0
    before = (out / "samples.jsonl").read_bytes()
    code, stdout, err = run_cli(monkeypatch, capsys, *eval_args(out, "--prompt", "S2"))
    assert_one_line_error(code, stdout, err, "prompt")
    assert (out / "samples.jsonl").read_bytes() == before


def test_eval_repairs_a_row_cut_by_a_crash(monkeypatch, capsys, tmp_path, tiny):
    out = tmp_path / "out"
    assert run_cli(monkeypatch, capsys, *eval_args(out))[0] == 0
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 4
    cut = "".join(lines[:3]) + lines[3][: len(lines[3]) // 2]  # the last row half written, no newline
    (out / "samples.jsonl").write_text(cut)
    code, stdout, err = run_cli(monkeypatch, capsys, *eval_args(out))
    assert code == 0, err
    assert "resuming: 3 of 4" in stdout
    repaired = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    assert len(repaired) == 4
    assert repaired[:3] == lines[:3]  # the finished rows are kept as they were
    redone = json.loads(repaired[3])
    original = json.loads(lines[3])
    assert redone["sample_id"] == original["sample_id"]
    assert {k: v for k, v in redone.items() if k != "seconds"} == {k: v for k, v in original.items() if k != "seconds"}


def test_eval_steered_rows_record_the_steering(monkeypatch, capsys, tmp_path, tiny):
    vectors = tmp_path / "tiny.safetensors"
    _save_bank(vectors, hidden=64, layers=4, model="tiny-llama")
    out = tmp_path / "out"
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        *eval_args(
            out,
            "--mode",
            "score",
            "--vectors",
            str(vectors),
            "--layers",
            "1,2",
            "--strength",
            "3",
            "--cwe-vector",
            "pooled",
        ),
    )
    assert code == 0, err
    rows = read_rows(out / "samples.jsonl")
    assert len(rows) == 4
    for row in rows:
        assert row["steering"]["vectors"] == "pooled"
        assert row["steering"]["layers"] == [1, 2]
        assert row["steering"]["strength"] == 3.0
    run = json.loads((out / "run.json").read_text())
    assert run["strength"] == 3.0 and run["layers"] == "1,2"


def test_eval_with_a_judge_model_adds_the_third_reasoning_vote(monkeypatch, capsys, tmp_path, tiny):
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, *eval_args(out, "--judge-model", "judge-model"))
    assert code == 0, err
    assert tiny == ["smollm2-135m-instruct", "judge-model"]  # evaluated model, then the judge
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["judge_model"] == "judge-model"
    assert summary["reasoning"]["thresholds"]["judge"] is True


def test_probe_scores_a_vector_file_only_on_items_it_was_not_fitted_on(monkeypatch, capsys, tmp_path, tiny):
    vectors = tmp_path / "v.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--dataset", "demo", "--limit", "8", "-o", str(vectors))
    assert code == 0, err
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "probe",
        "--dataset",
        "demo",
        "--limit",
        "16",
        "--folds",
        "2",
        "--vectors",
        str(vectors),
        "-o",
        str(tmp_path / "probe"),
    )
    assert code == 0, err
    assert "scored on 8 of 16 items (the other 8 share a family or code with its training set)" in out
    saved = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert saved["vector_file_held_out"] == 8
    assert set(saved["vector_file_auroc"]) == {str(layer) for layer in range(4)}
    # The file's column differs from the cross-validated one (they score different directions on other items).
    cv = {r["layer"]: r["auroc"] for r in saved["rows"] if r["group"] == "pooled"}
    assert any(cv[layer] != saved["vector_file_auroc"][str(layer)] for layer in range(4))


def test_eval_with_vectors_refuses_or_drops_the_items_they_were_fitted_on(monkeypatch, capsys, tmp_path, tiny):
    vectors = tmp_path / "v.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--dataset", "demo", "--limit", "4", "-o", str(vectors))
    assert code == 0, err
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        *eval_args(
            tmp_path / "out",
            "--limit",
            "8",
            "--mode",
            "score",
            "--vectors",
            str(vectors),
            "--strength",
            "1",
            "--cwe-vector",
            "pooled",
        ),
    )
    assert_one_line_error(code, _, err, "4 of the 8 test items are in families that share")  # refused by default
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        *eval_args(
            tmp_path / "out",
            "--limit",
            "8",
            "--mode",
            "score",
            "--vectors",
            str(vectors),
            "--strength",
            "1",
            "--cwe-vector",
            "pooled",
            "--drop-overlap",
        ),
    )
    assert code == 0, err
    assert "dropped 4 of 8 test items" in err
    assert len(read_rows(tmp_path / "out" / "samples.jsonl")) == 4
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["meta"]["held_out"].startswith("dropped 4 of 8 test items (whole families)")
    assert "dropped 4 of 8 test items" in (tmp_path / "out" / "summary.md").read_text()
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        *eval_args(tmp_path / "out2", "--mode", "score", "--vectors", str(vectors), "--drop-overlap"),
    )
    assert_one_line_error(code, out, err, "nothing is held out")


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--strength", "5", "--layers", "999"], "steer with --vectors"),
    ],
)
def test_bad_combinations_fail_before_the_model_loads(monkeypatch, capsys, tmp_path, no_model, args, message):
    code, out, err = run_cli(monkeypatch, capsys, *args, "--dataset", "demo", "--limit", "2")
    assert_one_line_error(code, out, err, message)


def test_probe_on_one_class_is_refused(monkeypatch, capsys, tmp_path, no_model):
    data = tmp_path / "only.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"v{i}",
                    "cwe": "CWE-787",
                    "label": "vulnerable",
                    "language": "c",
                    "code": f"int f{i}(void) {{ return {i}; }}",
                    "pair_id": f"p{i}",
                }
            )
            + "\n"
            for i in range(4)
        )
    )
    code, out, err = run_cli(monkeypatch, capsys, "probe", "--dataset", str(data))
    assert_one_line_error(code, out, err, "all vulnerable")


@pytest.mark.parametrize("layers", ["rel:2", "rel:-1", "999"])
def test_layers_outside_the_model_are_refused(monkeypatch, capsys, tmp_path, tiny, layers):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "extract",
        "--dataset",
        "demo",
        "--limit",
        "4",
        "--layers",
        layers,
        "-o",
        str(tmp_path / "v.safetensors"),
    )
    assert_one_line_error(code, out, err, "outside 0..1" if layers.startswith("rel") else "out of range")


@pytest.mark.parametrize("method", ["pca", "probe"])
def test_pca_and_probe_from_one_pair_are_refused(monkeypatch, capsys, tmp_path, tiny, method):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "extract",
        "--dataset",
        "demo",
        "--limit",
        "2",
        "--method",
        method,
        "-o",
        str(tmp_path / "v.safetensors"),
    )
    assert_one_line_error(code, out, err, "at least 2 pairs")


@pytest.mark.parametrize(
    "tensor, message",
    [
        (torch.ones(64, dtype=torch.int64), "1-D float"),
        (torch.ones(2, 64), "1-D float"),
        (torch.ones(32), "hidden size 64"),
        ("layer 999", "outside the model"),
    ],
)
def test_malformed_vector_files_are_refused_by_export(monkeypatch, capsys, tmp_path, tensor, message):
    import json as json_

    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    key, value = ("pooled/999", torch.ones(64)) if isinstance(tensor, str) else ("pooled/1", tensor)
    save_file({key: value}, str(path), metadata={"vulnsteer": json_.dumps({"hidden_size": 64, "num_layers": 4})})
    code, out, err = run_cli(monkeypatch, capsys, "vectors", "export", str(path), "-o", str(tmp_path / "x.gguf"))
    assert_one_line_error(code, out, err, message)


def test_progress_in_a_log_is_plain_lines(capsys):
    """Output that is not a terminal (a batch job's log) gets plain progress lines, throttled, and the last one."""
    from vulnsteer.pipeline import progress

    with progress("sweep", 10, log_every=3600) as advance:
        for _ in range(10):
            advance(1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sweep: 10/10 (100%), ") and lines[0].endswith("eta 0 s")
    with progress("activations", 4, log_every=0) as advance:
        advance(1)
        advance(3)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == ["activations: 1/4 (25%)", "activations: 4/4 (100%)"]


def test_extract_fits_a_learned_method_as_its_flags_say(monkeypatch, capsys, tmp_path, tiny):
    from vulnsteer.extract.vectors import load

    path = tmp_path / "edits.safetensors"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "extract",
        "--dataset",
        "demo",
        "--limit",
        "4",
        "--method",
        "loreft",
        "--layers",
        "1",
        "--steps",
        "2",
        "--rank",
        "2",
        "--kl-weight",
        "0.5",
        "--mode",
        "score",
        "-o",
        str(path),
    )
    assert code == 0, err
    bank = load(path)
    training = bank.meta["training"]
    assert (training["steps"], training["rank"], training["kl_weight"], training["max_norm"]) == (2, 2, 0.5, 1.0)
    assert {edit.learned.weight.shape[0] for by_layer in bank.edits.values() for edit in by_layer.values()} == {2}
    path = tmp_path / "vectors.safetensors"
    flags = ("--dataset", "demo", "--limit", "4", "--layers", "1", "--steps", "2", "--mode", "score", "-o", str(path))
    code, out, err = run_cli(monkeypatch, capsys, "extract", "--method", "trained", "--max-norm", "0.25", *flags)
    assert code == 0, err
    assert load(path).meta["training"]["max_norm"] == 0.25


@pytest.mark.parametrize("words, expected", [(["--drop-overlap"], True), (["--refuse-overlap"], False), ([], None)])
def test_the_sweeps_switches_take_no_value(monkeypatch, capsys, words, expected):
    """`--drop-overlap` / `--refuse-overlap` (and `--transfer` / `--no-transfer`) are switches: the next flag is not
    read as their value."""
    from vulnsteer import cli

    seen = {}
    monkeypatch.setattr(cli, "_sweep", lambda config, out, resume, flags, default: seen.update(flags))
    code, out, err = run_cli(monkeypatch, capsys, "sweep", *words, "--no-transfer", "--folds", "4")
    assert code == 0, err
    assert (seen["drop_overlap"], seen["transfer"], seen["folds"]) == (expected, False, 4)
