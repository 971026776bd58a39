"""Experiments over the engine: held-out sweeps and their store, the analysis of a sweep, its report, the summary
of one evaluation and reasoning scores."""
