"""Evaluation helpers: models, data, benchmarks (needs the `eval` extra)."""
