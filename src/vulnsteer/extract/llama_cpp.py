"""llama.cpp as a client of our files: its server (`llama-server`) loads a packaged GGUF model with a control vector
that `vulnsteer vectors export --format gguf` wrote, and answers next-token log-probabilities, so that what llama.cpp
does with our vectors can be set beside what our hooks do on the same weights. The server's OpenAI-compatible
endpoint also serves `eval --model openai:NAME` in the tests.

The binary is `$VULNSTEER_LLAMA_SERVER`, `llama-server` on PATH, or one built once into the cache from the llama.cpp
that llama-cpp-python vendors (its sdist from PyPI; cmake and a C++ compiler; minutes on 2 cores), portably unless
`VULNSTEER_LLAMA_BUILD=native` (see `BUILDS`). `python -m vulnsteer.extract.llama_cpp` builds it and prints its path.

Layer convention: llama.cpp adds `direction.<il>` to the output of block il (0-based), the residual stream our
layer il hooks; it has no slot for layer 0 (the loader refuses index 0), so exports leave layer 0 out.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from vulnsteer.errors import VulnsteerError
from vulnsteer.models import cache_dir

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # vendors llama.cpp 0c1e570 (ggml 0.25.3)
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
]  # no download at build time


# What ggml is compiled for. `portable` (the default) is x86-64-v3 (AVX2, FMA, F16C, BMI2; no AVX-512, no AMX) on
# x86 and ggml's generic build elsewhere: it runs on any machine of the last decade, including the VMs whose CPUs
# report AVX-512/AMX that the hypervisor does not allow (a `-march=native` build dies there with SIGILL). `native`
# (`VULNSTEER_LLAMA_BUILD=native`) is faster where it runs, and is keyed by this CPU's flags so it is never reused
# on another CPU.
BUILDS = {
    "portable": [
        "-DGGML_NATIVE=OFF",
        "-DGGML_SSE42=ON",
        "-DGGML_AVX=ON",
        "-DGGML_AVX2=ON",
        "-DGGML_FMA=ON",
        "-DGGML_F16C=ON",
        "-DGGML_BMI2=ON",
        "-DGGML_AVX512=OFF",
        "-DGGML_AMX_TILE=OFF",
    ],
    "native": ["-DGGML_NATIVE=ON"],
}
PORTABLE_X86_NEEDS = {"avx", "avx2", "fma", "f16c", "bmi2"}  # what the portable build executes on x86


def cpu_flags() -> set[str]:
    """This CPU's feature flags as Linux reports them (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def build_kind() -> str:
    kind = os.environ.get("VULNSTEER_LLAMA_BUILD", "portable")
    if kind not in BUILDS:
        raise VulnsteerError(f"VULNSTEER_LLAMA_BUILD={kind!r}: expected one of {', '.join(BUILDS)}")
    return kind


def build_key(kind: str, machine: str | None = None, flags: set[str] | None = None) -> str:
    """The cache folder name of a build: version, kind and a hash of what the binary was built for (the cmake
    flags and the architecture; for a native build also this CPU's flags)."""
    machine = machine or platform.machine()
    target = [LLAMA_CPP_PYTHON, machine, *CMAKE_FLAGS, *BUILDS[kind]]
    if kind == "native":
        target += sorted(cpu_flags() if flags is None else flags)
    digest = hashlib.sha256("\n".join(target).encode()).hexdigest()[:12]
    return f"{LLAMA_CPP_PYTHON.replace('==', '-')}-{kind}-{machine}-{digest}"


def server_binary(build: bool = True) -> Path:
    """The llama-server to use (see the module docstring); built into the cache when there is none."""
    given = os.environ.get("VULNSTEER_LLAMA_SERVER") or shutil.which("llama-server")
    if given:
        return Path(given)
    kind = build_kind()
    built = cache_dir() / "llama.cpp" / build_key(kind) / "bin" / "llama-server"
    if built.exists() or not build:
        return built
    missing = PORTABLE_X86_NEEDS - cpu_flags()
    if kind == "portable" and platform.machine() in ("x86_64", "AMD64") and cpu_flags() and missing:
        raise VulnsteerError(
            f"this CPU lacks {', '.join(sorted(missing))}, which the portable llama-server build "
            "needs: set VULNSTEER_LLAMA_BUILD=native, or VULNSTEER_LLAMA_SERVER=/path/to/llama-server"
        )
    folder = built.parent.parent
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        print(
            f"building llama-server ({kind}) from {LLAMA_CPP_PYTHON}'s llama.cpp into {folder} (once, minutes)",
            file=sys.stderr,
            flush=True,
        )
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp, LLAMA_CPP_PYTHON]
        )
        sdist = next(Path(tmp).glob("*.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        _run(["cmake", "-S", str(source), "-B", str(folder), *CMAKE_FLAGS, *BUILDS[kind]])
        _run(["cmake", "--build", str(folder), "--target", "llama-server", "-j", str(os.cpu_count() or 2)])
    print(f"built llama-server ({kind}) in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return built


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise VulnsteerError(f"building llama-server failed at `{' '.join(cmd[:3])}`: {tail[0]}")


def exit_message(binary: str, returncode: int, last_line: str) -> str:
    """One line on why llama-server ended: a signal (SIGILL: built for instructions this CPU does not allow) gets
    its name and the fix, an exit status the server's last log line."""
    if returncode >= 0:
        return f"llama-server exited with {returncode}: {last_line}"
    name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else f"signal {-returncode}"
    why = " (an illegal instruction: it was built for a CPU this machine is not)" if name == "SIGILL" else ""
    return (
        f"llama-server {binary} was killed by {name}{why}; point VULNSTEER_LLAMA_SERVER at a llama-server built "
        f"for this machine, or unset it to use the portable build (VULNSTEER_LLAMA_BUILD=portable)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`llama-server` on 127.0.0.1 serving `model` (a GGUF file), optionally with control vectors at scales, for
    the length of a `with` block."""

    def __init__(
        self,
        model: Path,
        control_vectors: Sequence[tuple[Path, float]] = (),
        api_key: str | None = None,
        threads: int = 2,
        context: int = 4096,
        extra: Sequence[str] = (),
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            str(server_binary()),
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-t",
            str(threads),
            "-c",
            str(context),
            "--no-webui",
            *extra,
        ]
        if control_vectors:
            self.cmd += ["--control-vector-scaled", ",".join(f"{path}:{scale:g}" for path, scale in control_vectors)]
        if api_key:
            self.cmd += ["--api-key", api_key]

    def __enter__(self) -> LlamaServer:
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                last = self.log.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise VulnsteerError(exit_message(self.cmd[0], self.process.returncode, last[0]))
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        raise VulnsteerError("llama-server did not become ready within 120 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()

    def next_token_logprobs(self, token_ids: list[int], k: int = 20) -> dict[int, float]:
        """llama.cpp's log-probabilities of the `k` likeliest next tokens after `token_ids` (no sampling applied)."""
        body = {"prompt": token_ids, "n_predict": 1, "n_probs": k, "temperature": 0, "cache_prompt": False}
        request = urllib.request.Request(
            f"{self.url}/completion", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            top = json.loads(response.read())["completion_probabilities"][0]["top_logprobs"]
        return {t["id"]: t["logprob"] for t in top}


def hook_logprobs(lm, token_ids: list[int], vectors: dict, strength: float):
    """Our side: next-token log-probabilities after `token_ids` with `strength * vectors[layer]` added by our hooks
    at every position, as llama.cpp adds a control vector."""
    import torch

    from vulnsteer.records import Positions, Steering
    from vulnsteer.steering.hooks import steer

    ids = torch.tensor([token_ids], device=lm.device)
    with torch.no_grad(), steer(lm.model, [Steering(vectors, strength, Positions.ALL)], torch.ones_like(ids)):
        return lm.model(input_ids=ids).logits[0, -1].float().log_softmax(-1).cpu()


def mean_gap(llama: dict[int, float], ours) -> float:
    """Mean |llama.cpp - ours| log-probability over llama.cpp's top tokens."""
    return sum(abs(logprob - float(ours[token])) for token, logprob in llama.items()) / len(llama)


if __name__ == "__main__":
    print(server_binary())
