#!/usr/bin/env bash
# Mutation testing of the held-out protocol (docs/protocol.md, "Mutation testing"). Needs the `mutation` extra
# (pip install -e '.[mutation]'); CI does not run it. Mutates the protocol's functions only, in groups run in this
# order (most important first, so a run stopped early has covered them): fold planning, families and near-duplicate
# keys; nested selection, thresholds, the best prompt and the path check; bank mapping and provenance checks; the
# learned methods' fitting code; the verdict parser. `bench/mutation.sh [GROUP...] [-- MUTMUT ARGS]` runs the named
# groups (default all), e.g. `bench/mutation.sh protocol -- --max-children 2`.
# Results: `mutmut results`, `mutmut show NAME`. On a loaded machine a group's mutants run much faster against a
# short test list: bench/mutation/fast.py (docs/protocol.md gives the lists used).
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH  # mutmut puts its mutated copy (mutants/src) first on the path itself

declare -A SETS=(
  [protocol]="vulnsteer.protocol.* vulnsteer.neardup.*"
  [analysis]="best_threshold fold_thresholded selection_rows _check_selection_rows nested_selection best_prompt
              selected_thresholded path_check _is_candidate"
  [sweep]="check_held_out provenance_rows check_stored_provenance is_candidate load_sweep_samples steering_for
           lora_bank lora_rows plan"
  [learned]="vulnsteer.extract.trained.* vulnsteer.extract.lora.*"
  [verdicts]="vulnsteer.verdicts.*"
)
ORDER=(protocol analysis sweep learned verdicts)
declare -A MODULE=([analysis]=vulnsteer.experiments.analysis [sweep]=vulnsteer.experiments.sweep)

names() {  # mutmut's mutant-name globs of a group: a module's pattern, or functions of analysis.py / sweep.py
  local group=$1 item
  for item in ${SETS[$group]}; do
    if [[ $item == *.* ]]; then echo "$item"; else echo "${MODULE[$group]}.x_${item}__mutmut_*"; fi
  done
}

chosen=()
while [[ $# -gt 0 && $1 != -- ]]; do
  [[ -n ${SETS[$1]+set} ]] || { echo "unknown group $1 (one of: ${ORDER[*]})" >&2; exit 1; }
  chosen+=("$1"); shift
done
[[ ${1:-} == -- ]] && shift
[[ ${#chosen[@]} -gt 0 ]] || chosen=("${ORDER[@]}")
for group in "${chosen[@]}"; do
  echo "== mutation group $group" >&2
  mapfile -t globs < <(names "$group")
  nice -n 10 mutmut run "$@" "${globs[@]}"
done
