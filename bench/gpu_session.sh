#!/usr/bin/env bash
# Everything a GPU session checks and measures, in one call (about 5-7 minutes on an H200): the Qwen2.5-14B-
# architecture benchmark, then the steering and engine tests on CUDA (pass/fail). It runs on the machine's own
# python3 and packages (nothing installed; the package comes from src/; checked against transformers 5.17 on CPU)
# and writes its logs and JSON under $OUT (bench/results without it). From the repository root:
#   bench/gpu_session.sh            (as a device run: timeout_s 570, carry nothing)
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$out/gpu_env.txt"
# The goals first; the tests capture decode steps of several tiny models, in the time left.
timeout 330 python3 bench/gpu_scale.py --repeats 3 --output "$out/qwen14b-arch-h200.json" 2>&1 | tee "$out/gpu_scale.log"
scale=${PIPESTATUS[0]}
timeout 220 bench/gpu_check.sh -q -p no:cacheprovider -rfE 2>&1 | tee "$out/gpu_check.log"
check=${PIPESTATUS[0]}
echo "gpu_check exit $check, gpu_scale exit $scale"
exit $(( check || scale ))
