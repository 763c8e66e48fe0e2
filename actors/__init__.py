"""Per-GPU workers: shard loading, the pipeline stage, activation capture and writing.

Nothing here imports Ray: the Ray wrappers live in `cluster/`, so these classes run
in-process in tests and benchmarks.
"""
