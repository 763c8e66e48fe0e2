"""Benchmarks: `python -m bench` measures the pipeline against a plain forward and the
approach it replaces, on one machine, one model and one set of tokens (bench/README in
bench/RESULTS.md). `bench/gpu.py` is the single-GPU variant, runnable without Ray or Polars.
"""
