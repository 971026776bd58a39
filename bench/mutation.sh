#!/usr/bin/env bash
# Mutation testing of the held-out protocol (docs/protocol.md, "Mutation testing"). Needs the `mutation` extra
# (pip install -e '.[mutation]'); CI does not run it. Mutates the protocol's functions only: fold planning and leak
# keys, bank provenance checks, nested selection and its thresholds, the path check and the verdict parser.
# Extra arguments go to `mutmut run` (e.g. --max-children 1). Results: `mutmut results`, `mutmut show NAME`.
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH  # mutmut puts its mutated copy (mutants/src) first on the path itself
nice -n 10 mutmut run "$@" \
  "vulnsteer.protocol.*" \
  "vulnsteer.experiments.sweep.x_check_held_out__mutmut_*" \
  "vulnsteer.experiments.sweep.x_provenance_rows__mutmut_*" \
  "vulnsteer.experiments.sweep.x_check_stored_provenance__mutmut_*" \
  "vulnsteer.experiments.sweep.x_is_candidate__mutmut_*" \
  "vulnsteer.experiments.analysis.x_best_threshold__mutmut_*" \
  "vulnsteer.experiments.analysis.x_fold_thresholded__mutmut_*" \
  "vulnsteer.experiments.analysis.x_selection_rows__mutmut_*" \
  "vulnsteer.experiments.analysis.x__check_selection_rows__mutmut_*" \
  "vulnsteer.experiments.analysis.x_nested_selection__mutmut_*" \
  "vulnsteer.experiments.analysis.x_selected_thresholded__mutmut_*" \
  "vulnsteer.experiments.analysis.x_path_check__mutmut_*" \
  "vulnsteer.experiments.analysis.x__is_candidate__mutmut_*" \
  "vulnsteer.verdicts.*"
