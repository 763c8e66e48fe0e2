"""Per-GPU workers: shard loading, the pipeline stage, activation capture and writing.

Nothing here imports Ray: the Ray wrappers live in `cluster/`, so these classes run
in-process in tests and benchmarks.
"""

import os

# NOTE: without this, MKL picks float32 matmul code paths by the memory alignment of the
# operands on some CPUs (seen on AMD EPYC): the same layer run twice on differently aligned
# copies then differs in the last bits, and no stage could equal a single-process forward bit
# for bit. Strict mode is alignment-independent, at no measurable cost. MKL reads it at its
# first call, so setting it here, before any layer runs, covers stages and references alike.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
