#!/usr/bin/env bash
# The steering and engine invariants on a GPU: the same tests as on CPU (tiny fp32 Llama/Qwen2 models; steered
# tokens equal across cache types, padding, batch layouts and the shared prompt prefix), plus the static
# decoder's CUDA-graph decode step: generate's tokens, one capture for two configs, buffers at fixed addresses.
# Run from the repository root on a CUDA machine.
set -euo pipefail
VULNSTEER_TEST_DEVICE=cuda exec python3 -m pytest -q tests/test_steering.py tests/test_engine.py tests/test_evaluation.py "$@"
