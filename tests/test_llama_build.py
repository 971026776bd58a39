"""How vulnsteer builds and runs llama-server: a portable build by default, a cache keyed by what the binary was
built for, and a server killed by a signal reported in one line with the fix (no build or model needed)."""

from __future__ import annotations

import stat

import pytest

from vulnsteer.errors import VulnsteerError
from vulnsteer.extract import llama_cpp
from vulnsteer.extract.llama_cpp import BUILDS, LlamaServer, build_key, server_binary


def test_the_default_build_is_portable_and_never_targets_this_cpu(monkeypatch):
    monkeypatch.delenv("VULNSTEER_LLAMA_BUILD", raising=False)
    assert llama_cpp.build_kind() == "portable"
    assert "-DGGML_NATIVE=OFF" in BUILDS["portable"] and "-DGGML_AVX512=OFF" in BUILDS["portable"]
    # A portable binary is the same whatever CPU built it; a native one is keyed by the CPU's flags.
    assert build_key("portable", "x86_64", {"avx2"}) == build_key("portable", "x86_64", {"avx2", "avx512f", "amx"})
    assert build_key("native", "x86_64", {"avx2"}) != build_key("native", "x86_64", {"avx2", "avx512f"})
    assert build_key("portable", "x86_64") != build_key("native", "x86_64", set())
    assert build_key("portable", "x86_64") != build_key("portable", "aarch64")
    assert "portable" in build_key("portable") and llama_cpp.LLAMA_CPP_PYTHON.split("==")[1] in build_key("portable")


def test_the_cache_path_follows_the_build(monkeypatch, tmp_path):
    monkeypatch.delenv("VULNSTEER_LLAMA_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-server on PATH
    monkeypatch.setenv("VULNSTEER_LLAMA_BUILD", "portable")
    portable = server_binary(build=False)
    monkeypatch.setenv("VULNSTEER_LLAMA_BUILD", "native")
    native = server_binary(build=False)
    assert portable != native and portable.parent.parent.parent == native.parent.parent.parent
    monkeypatch.setenv("VULNSTEER_LLAMA_BUILD", "fast")
    with pytest.raises(VulnsteerError, match="expected one of portable, native"):
        server_binary(build=False)


def test_a_portable_build_is_refused_on_a_cpu_without_its_baseline(monkeypatch, tmp_path):
    monkeypatch.delenv("VULNSTEER_LLAMA_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(llama_cpp, "cpu_flags", lambda: {"sse4_2", "avx"})
    monkeypatch.setattr(llama_cpp.platform, "machine", lambda: "x86_64")
    with pytest.raises(VulnsteerError, match="lacks avx2, bmi2, f16c, fma"):
        server_binary()


def fake_server(tmp_path, body: str):
    path = tmp_path / "llama-server"
    path.write_text(f"#!/bin/sh\necho 'init: llama threadpool init, n_threads = 2'\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_a_server_killed_by_sigill_is_one_line_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("VULNSTEER_LLAMA_SERVER", str(fake_server(tmp_path, "kill -ILL $$")))
    with pytest.raises(VulnsteerError) as error:
        with LlamaServer(tmp_path / "model.gguf"):
            pass
    message = str(error.value)
    assert "\n" not in message and "SIGILL" in message and "illegal instruction" in message
    assert "VULNSTEER_LLAMA_SERVER" in message and "portable" in message
    assert "threadpool" not in message  # not the last log line, which says nothing of why


def test_a_server_that_exits_says_its_status_and_last_line(monkeypatch, tmp_path):
    monkeypatch.setenv("VULNSTEER_LLAMA_SERVER", str(fake_server(tmp_path, "echo 'error: model not found'; exit 3")))
    with pytest.raises(VulnsteerError, match="llama-server exited with 3: error: model not found"):
        with LlamaServer(tmp_path / "model.gguf"):
            pass
