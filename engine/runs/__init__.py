"""Runs: the run record, the results store, plans, the one runner, sweeps, cached scores, summaries."""
