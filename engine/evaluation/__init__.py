"""Measuring models: perplexity, latency and time estimates, zero-shot accuracy, offline tasks."""
