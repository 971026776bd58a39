"""Against the real llama.cpp (`llama-server`, built once from llama-cpp-python's vendored source when none is
given, see `vulnsteer.extract.llama_cpp`) serving the packaged SmolLM2-135M-Instruct GGUF file (Q4_1):

- llama.cpp loading our exported control vector moves the next-token log-probabilities as our hooks do on the
  same weights, within the gap the quantised arithmetic leaves without steering, and only with our layer numbering;
- `eval --model openai:NAME --base-url` through its OpenAI-compatible endpoint gives the local model's prompts and
  scores, resumes, retries, keeps the key out of every file, and fails in one line.

Slow (a few minutes the first time: the model download and the llama-server build are cached).
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from vulnsteer.data import load_demo
from vulnsteer.extract.activations import collect
from vulnsteer.extract.llama_cpp import LlamaServer, free_port, hook_logprobs, mean_gap, server_binary
from vulnsteer.extract.vectors import export_gguf, fit
from vulnsteer.models import gguf_path, load_model, pull
from vulnsteer.prompts import PromptResources, build_prompt, render

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
KEY = "sk-vulnsteer-test-0123456789"
CACHE = Path(os.environ.get("VULNSTEER_TEST_CACHE") or Path.home() / ".cache" / "vulnsteer")


@pytest.fixture(scope="module")
def persistent_cache():
    """The cache kept between runs (model, its conversion, the llama-server build), as test_integration uses."""
    before = dict(os.environ)
    os.environ["VULNSTEER_CACHE"] = str(CACHE)
    os.environ["VULNSTEER_LLAMA_SERVER"] = str(server_binary())
    pull(MODEL, quiet=True)
    lm = load_model(MODEL, dtype=torch.float32, device="cpu")
    yield lm
    os.environ.clear()
    os.environ.update(before)


@pytest.fixture
def lm(persistent_cache, monkeypatch):
    monkeypatch.setenv("VULNSTEER_CACHE", str(CACHE))  # conftest gave this test its own
    return persistent_cache


def token_ids(lm, samples) -> list[list[int]]:
    resources = PromptResources.from_dataset_root(None)
    return [
        lm.tokenizer(render(lm.tokenizer, list(build_prompt(s, "S1", resources).messages)), add_special_tokens=False)[
            "input_ids"
        ]
        for s in samples
    ]


def test_llama_cpp_steers_with_our_control_vector_as_our_hooks_do(lm, tmp_path):
    demo = load_demo()
    bank = fit(collect(lm, demo, "S1", PromptResources.from_dataset_root(None)), lm, "mean-diff", [10, 20])
    export_gguf(bank, "pooled", tmp_path / "cv.gguf")
    vectors = bank.for_group("pooled")
    prompts = token_ids(lm, demo[:3])
    with LlamaServer(gguf_path(MODEL)) as server:
        base = [server.next_token_logprobs(ids) for ids in prompts]
    noise = sum(mean_gap(b, hook_logprobs(lm, ids, {}, 0.0)) for b, ids in zip(base, prompts)) / len(prompts)
    for strength in (0.5, 1.0):
        with LlamaServer(gguf_path(MODEL), [(tmp_path / "cv.gguf", strength)]) as server:
            steered = [server.next_token_logprobs(ids) for ids in prompts]
        moved = sum(mean_gap(s, hook_logprobs(lm, ids, {}, 0.0)) for s, ids in zip(steered, prompts)) / len(prompts)
        gaps = {}
        for offset in (-1, 0, 1):  # our layer = llama.cpp's block index + offset
            shifted = {layer + offset: v for layer, v in vectors.items()}
            gaps[offset] = sum(
                mean_gap(s, hook_logprobs(lm, ids, shifted, strength)) for s, ids in zip(steered, prompts)
            ) / len(prompts)
        print(
            f"strength {strength}: unsteered gap {noise:.3f}, steering moved llama.cpp by {moved:.3f}, "
            f"steered gap by offset {gaps}"
        )
        assert moved > 4 * noise  # the vector did something far beyond the quantisation noise
        assert gaps[0] < 1.5 * noise + 0.02  # and ours did the same, to within that noise
        assert gaps[-1] > 3 * gaps[0] and gaps[1] > 3 * gaps[0]  # only with the same layer numbering


def _eval(args, capsys) -> tuple[int, str, str]:
    return run_cli(["eval", *args], capsys)


def _rows(folder: Path) -> dict[str, dict]:
    return {r["sample_id"]: r for r in map(json.loads, (folder / "samples.jsonl").read_text().splitlines())}


def test_api_model_gives_the_local_models_prompts_and_scores_and_resumes(lm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    data = ["--dataset", "demo", "--limit", "6"]
    code, _, err = _eval(
        ["--model", MODEL, *data, "--mode", "score", "--device", "cpu", "-o", str(tmp_path / "local")], capsys
    )
    assert code == 0, err
    with LlamaServer(gguf_path(MODEL), api_key=KEY) as server:
        api = ["--model", "openai:smollm2", "--base-url", f"{server.url}/v1", *data]
        code, _, err = _eval([*api, "--mode", "score", "-o", str(tmp_path / "api")], capsys)
        assert code == 0, err
        local, remote = _rows(tmp_path / "local"), _rows(tmp_path / "api")
        assert local.keys() == remote.keys()
        for sample_id, row in remote.items():
            assert row["prompt_tokens"] == local[sample_id]["prompt_tokens"]  # the same prompt, token for token
            assert abs(row["score"] - local[sample_id]["score"]) < 0.3  # Q4_1 arithmetic vs float32 dequantised
        code, out, err = _eval([*api, "--mode", "score", "-o", str(tmp_path / "api")], capsys)
        assert code == 0 and "resuming: 6 of 6 rows" in out, err

        code, _, err = _eval(
            [
                *api,
                "--limit",
                "2",
                "--mode",
                "generate",
                "--max-new-tokens",
                "12",
                "--concurrency",
                "2",
                "-o",
                str(tmp_path / "api-generate"),
            ],
            capsys,
        )
        assert code == 0, err
        for row in _rows(tmp_path / "api-generate").values():
            assert row["response"] and 0 < row["new_tokens"] <= 12 and row["final_score"] is not None
    for folder in ("api", "api-generate"):
        for path in (tmp_path / folder).iterdir():
            assert KEY not in path.read_text(), f"the key was written to {path}"


class FlakyProxy(http.server.ThreadingHTTPServer):
    """Answers the first `failures` requests with 503, then forwards to the real server: retries must cross it."""

    def __init__(self, target: str, failures: int):
        self.target, self.failures, self.requests = target, failures, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(handler):
                self.requests += 1
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                if self.requests <= self.failures:
                    handler.send_response(503)
                    handler.send_header("Retry-After", "0")
                    handler.end_headers()
                    return
                request = urllib.request.Request(
                    self.target + handler.path,
                    data=body,
                    headers={"Content-Type": "application/json", "Authorization": handler.headers["Authorization"]},
                )
                with urllib.request.urlopen(request) as response:
                    answer = response.read()
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(answer)))
                handler.end_headers()
                handler.wfile.write(answer)

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)


def test_api_errors_are_one_line_and_5xx_are_retried(lm, tmp_path, capsys, monkeypatch):
    data = ["--dataset", "demo", "--limit", "2", "--mode", "score"]
    with LlamaServer(gguf_path(MODEL), api_key=KEY) as server:
        base = ["--model", "openai:smollm2", "--base-url", f"{server.url}/v1", *data]
        monkeypatch.setenv("OPENAI_API_KEY", "wrong-key")
        code, _, err = _eval([*base, "-o", str(tmp_path / "a")], capsys)
        assert code == 1 and "refused the key in $OPENAI_API_KEY (HTTP 401)" in err and "Traceback" not in err
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        code, _, err = _eval([*base, "--timeout", "0.001", "--retries", "0", "-o", str(tmp_path / "b")], capsys)
        assert code == 1 and "did not answer within --timeout" in err

        proxy = FlakyProxy(server.url, failures=2)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            flaky = ["--model", "openai:smollm2", "--base-url", f"http://127.0.0.1:{proxy.server_port}/v1", *data]
            code, _, err = _eval([*flaky, "--concurrency", "1", "--retries", "0", "-o", str(tmp_path / "c")], capsys)
            assert code == 1 and "answered HTTP 503" in err  # no retries: the first 503 ends the run
            proxy.requests, proxy.failures = 0, 2
            code, _, err = _eval([*flaky, "--concurrency", "1", "--retries", "3", "-o", str(tmp_path / "d")], capsys)
            assert code == 0, err
            assert proxy.requests == 2 + 2  # two refused, then one request per row
        finally:
            proxy.shutdown()
    cases = [
        (
            ["--model", "openai:smollm2", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--retries", "0"],
            "cannot connect to",
        ),
        (["--model", "openai:smollm2"], "needs --base-url"),
        (
            ["--model", "openai:smollm2", "--base-url", "http://127.0.0.1:1/v1", "--vectors", str(tmp_path / "v")],
            "is served over HTTP",
        ),
        (["--model", MODEL, "--base-url", "http://127.0.0.1:1/v1"], "base_url is an option of openai:"),
        (["--model", "openai:smollm2", "--base-url", "http://127.0.0.1:1/v1", "--strength", "2"], "--vectors"),
    ]
    for args, message in cases:
        code, _, err = _eval([*args, *data, "-o", str(tmp_path / "e")], capsys)
        assert code == 1 and message in err and "Traceback" not in err, err
    code, _, err = run_cli(["sweep", "--model", "openai:smollm2", "--limit", "2", "-o", str(tmp_path / "s")], capsys)
    assert code == 1 and "only `eval` (unsteered)" in err
