"""Benchmarks for distkfac (run them as modules, e.g. ``python -m benchmarks.step_time``)."""
