"""The backend registry: `--model` prefixes pick backends (hf when there is none, so names, paths and hub ids keep
working), `--model-args` is read once into options each backend checks against its own table, and a capability a
backend lacks is refused in one line before anything loads."""

from __future__ import annotations

import pytest
from conftest import run_cli

from vulnsteer.backends import BACKENDS, backend_for, load, merge_options, parse_model_args, require
from vulnsteer.engine.api import ApiModel
from vulnsteer.errors import VulnsteerError


@pytest.mark.parametrize(
    "spec, prefix, name",
    [
        ("smollm2-135m-instruct", "hf", "smollm2-135m-instruct"),
        ("Qwen/Qwen2.5-14B-Instruct", "hf", "Qwen/Qwen2.5-14B-Instruct"),
        ("./models/run:3", "hf", "./models/run:3"),  # a path, whatever its colons
        ("hf:smollm2-135m-instruct", "hf", "smollm2-135m-instruct"),
        ("openai:gpt-4o", "openai", "gpt-4o"),
    ],
)
def test_the_prefix_picks_the_backend(spec, prefix, name):
    assert backend_for(spec) == (BACKENDS[prefix], name)


def test_an_existing_path_with_a_colon_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt:1").mkdir()
    assert backend_for("ckpt:1") == (BACKENDS["hf"], "ckpt:1")


def test_an_unknown_prefix_is_refused_with_the_known_ones():
    with pytest.raises(
        VulnsteerError,
        match=r"unknown model prefix 'foo:' in 'foo:bar'; known prefixes: hf:, "
        r"openai:",
    ):
        backend_for("foo:bar")


def test_model_args_are_key_value_pairs():
    assert parse_model_args(None) == {}
    assert parse_model_args(" base_url=http://h:1/v1?a=b , concurrency=4,") == {
        "base_url": "http://h:1/v1?a=b",
        "concurrency": "4",
    }


@pytest.mark.parametrize("text", ["concurrency", "=4", "a=1,a=2", "two words=1"])
def test_malformed_model_args_are_refused(text):
    with pytest.raises(VulnsteerError, match="--model-args takes key=value pairs"):
        parse_model_args(text)


def test_an_option_given_by_a_flag_and_by_model_args_is_refused():
    assert merge_options({"timeout": 3.0, "retries": None}, {"concurrency": "2"}) == {
        "timeout": "3.0",
        "concurrency": "2",
    }
    with pytest.raises(VulnsteerError, match="timeout is given by --timeout and by --model-args"):
        merge_options({"timeout": 3.0}, {"timeout": "4"})


def test_the_openai_backend_reads_its_options_into_the_api_model():
    model = load(
        "openai:m",
        {"base_url": "http://h/v1", "api_key_env": "K", "concurrency": "3", "timeout": "2.5", "retries": "0"},
        "score",
    )
    assert model.handle == ApiModel("m", "http://h/v1", "K", 3, 2.5, 0)
    with pytest.raises(VulnsteerError, match=r"openai:m: option concurrency='many' is not valid"):
        load("openai:m", {"base_url": "http://h/v1", "concurrency": "many"})
    with pytest.raises(
        VulnsteerError,
        match=r"takes no option 'dtype' \(its options: base_url, api_key_env, "
        r"concurrency, timeout, retries\); dtype is an option of hf:",
    ):
        load("openai:m", {"base_url": "http://h/v1", "dtype": "bfloat16"})


def test_what_a_backend_lacks_is_refused_by_the_one_check():
    assert require("openai:m", "scores", "generates") == (BACKENDS["openai"], "m")
    with pytest.raises(
        VulnsteerError,
        match=r"openai:m cannot steer \(--vectors, sweep, run\): it is served over "
        "HTTP",
    ):
        require("openai:m", "scores", "steers")


def test_steered_jobs_on_a_backend_that_cannot_steer_are_refused():
    """The library path checks too: a steered job never reaches an endpoint that would drop its steering."""
    from vulnsteer.backends import Model
    from vulnsteer.data import load_demo
    from vulnsteer.prompts import PromptResources, build_prompt
    from vulnsteer.records import Decoding, Job, Steering

    sample = load_demo()[0]
    job = Job(sample, "S1", build_prompt(sample, "S1", PromptResources()), Steering({}, strength=1.0))
    with pytest.raises(VulnsteerError, match="openai:m cannot steer"):
        Model("openai:m", BACKENDS["openai"], ApiModel("m", "http://127.0.0.1:1/v1")).evaluate([job], Decoding())


def test_model_args_reach_the_hf_backend(tmp_path, capsys):
    """`--model-args dtype=...` is the hf backend's `--dtype`; given both ways it is refused before loading."""
    args = ["eval", "--model", "no-such-model", "--limit", "2", "-o", str(tmp_path / "o")]
    code, _, err = run_cli([*args, "--model-args", "dtype=float64"], capsys)
    assert code == 1 and "unknown dtype 'float64'" in err
    code, _, err = run_cli([*args, "--dtype", "float32", "--model-args", "dtype=bfloat16"], capsys)
    assert code == 1 and "dtype is given by --dtype and by --model-args" in err


def test_an_api_model_with_vectors_is_refused_before_the_vector_file_is_read(tmp_path, capsys):
    code, _, err = run_cli(
        [
            "eval",
            "--model",
            "openai:m",
            "--model-args",
            "base_url=http://127.0.0.1:1/v1",
            "--vectors",
            str(tmp_path / "absent.safetensors"),
            "-o",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 1 and "openai:m cannot steer" in err and "not found" not in err
