#!/usr/bin/env bash
# The CPU figures of docs/performance.md's first section, regenerated in one call (about 8 minutes on 2 cores):
# the main job's wall time, rows/s against the FLOP bound with prefix reuse side by side, and the cost of a
# learned intervention's training step. JSON and logs under bench/results/<date>/; run from the repository root
# with the project installed and the main job's model pulled (`vulnsteer models pull smollm2-135m-instruct`).
set -euo pipefail
# As the command line does for itself: OpenMP threads that sleep rather than spin (spinning makes timings on 2
# cores swing threefold). OpenMP reads it when torch loads, so it is set before any benchmark starts.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
out=bench/results/$(date -u +%Y-%m-%d)
mkdir -p "$out"
{ date -u; lscpu | grep -E "Model name|^CPU\(s\)"; python -c "import torch, transformers; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'threads', torch.get_num_threads())"
  git rev-parse HEAD; } | tee "$out/machine.txt"
start=$SECONDS
vulnsteer run -o "$out/main" > "$out/main.log" 2>&1
echo "vulnsteer run: $((SECONDS - start)) s" | tee "$out/main-time.txt"
python bench/flops.py --model smollm2-135m-instruct --items 16 --k 8 --repeats 3 --output "$out/flops.json"
python bench/learned.py --model smollm2-135m-instruct --items 24 --layers 15 --steps 5 --repeats 3 \
    --output "$out/learned-k1.json"
python bench/learned.py --model smollm2-135m-instruct --items 24 --layers 7,15,22,29 --steps 5 --repeats 3 \
    --output "$out/learned-k4.json"
