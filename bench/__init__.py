"""Benchmarks: every figure measured side by side in one run, saved as JSON."""
