"""Experiments over many runs: presets, the job runner, results, statistics, reports,
figures, reproduce, sweep."""
