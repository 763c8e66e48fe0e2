"""The benchmark workload: one seeded MoE checkpoint and one set of tokens, shared by every row.

Default: 8 layers, hidden 256, 16 experts top-2 (expert size 512), bfloat16, 32 sequences
x 512 tokens of standard-library docstrings, with the default planted outlier dims.
`--quick` shrinks the tokens, not the model, so every row still has 8 layers to split.
Every row is sized for the 2-core reference machine: 1 stage gets both cores (2 torch
threads), 2 stages one each, whatever the machine running the bench has.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from cluster.plants import default_plants
from common.storage import DENSE

FLOOR = 3.0  # exceedance mode keeps |x| >= FLOOR; the analysis threshold (6.0) is above it
CORES = 2  # the reference machine's: what the stages of every row share


@dataclass(frozen=True)
class Workload:
    num_layers: int = 8
    hidden_size: int = 256
    num_experts: int = 16
    top_k: int = 2
    expert_size: int = 512
    num_sequences: int = 32
    seq_len: int = 512
    dtype: str = "bfloat16"
    cache_dir: str = "~/.cache/moe-outliers/bench"

    def tiny(self) -> dict:
        plants = default_plants(self.num_layers, self.hidden_size)
        return {
            "arch": "qwen3_moe", "num_layers": self.num_layers, "hidden_size": self.hidden_size,
            "num_experts": self.num_experts, "top_k": self.top_k, "expert_size": self.expert_size,
            "num_heads": 8, "num_kv_heads": 4, "vocab_size": 1024, "seed": 0,
            "plants": [{"dim": p.dim, "layers": list(p.layers), "scale": p.scale} for p in plants],
        }

    def config(self, output: str, num_stages: int = 1, mode: str = DENSE, capture: dict | None = None,
               replicas: int = 1, **pipeline) -> dict:
        """A run config (dict) for `cluster.run.execute` over this workload: the stages of every
        replica share CORES, each with as many torch threads as whole cores."""
        cpus = CORES / (num_stages * replicas)
        return copy.deepcopy({
            "model": {"tiny": self.tiny(), "dtype": self.dtype, "cache_dir": self.cache_dir},
            "data": {"source": "stdlib", "num_sequences": self.num_sequences, "seq_len": self.seq_len},
            "pipeline": {"num_stages": num_stages, "num_replicas": replicas, "micro_batch_size": 1,
                         "cpus_per_stage": cpus,
                         "threads_per_stage": max(1, int(cpus)), **pipeline},
            "storage": {"output": output, "mode": mode, "floor": FLOOR},
            "capture": capture or {},
            "analysis": {"threshold": 6.0, "num_actors": 1},
        })

    def describe(self) -> str:
        return (f"{self.num_layers} layers, hidden {self.hidden_size}, {self.num_experts} experts "
                f"top-{self.top_k} (size {self.expert_size}), {self.dtype}, "
                f"{self.num_sequences} x {self.seq_len} tokens")


QUICK = Workload(num_sequences=4, seq_len=256)


def prepared(workload: Workload):
    """(checkpoint dir, tokens # [num_sequences, seq_len]) exactly as a run prepares them."""
    from cluster.config import load_config
    from cluster.run import prepare

    ready = prepare(load_config(workload.config("unused")))
    return ready.model_path, ready.tokens
