"""`python -m bench.transport`: what one hand-off of hidden states between two stage actors costs.

One actor makes a micro-batch's hidden states, another receives them, through Ray's object
store as a stage's `forward` does. Three payloads, each timed as a round trip and reported
above the same round trip carrying nothing:
  tensor  the torch tensor itself (Ray pickles its bytes into the stream),
  wire    a `MicroBatch` as the stages send it (the bytes out of band, `actors/writer.py`),
  none    no payload (the call itself).
Shapes: the bench's [1, 512, 256] and OLMoE's [1, 2048, 2048], bfloat16.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

SHAPES = [(1, 512, 256), (1, 2048, 2048)]
KINDS = ["none", "tensor", "wire"]


def payload(shape: tuple[int, ...], kind: str):
    from actors.handoff import MicroBatch

    hidden = torch.randn(*shape).to(torch.bfloat16)
    if kind == "tensor":
        return hidden
    if kind == "wire":
        ids = torch.zeros(shape[:2], dtype=torch.long)
        return MicroBatch(0, list(range(shape[0])), ids, torch.ones_like(ids), hidden)
    return None


def received(item) -> int:
    hidden = getattr(item, "hidden", item)
    return 0 if hidden is None else int(hidden.shape[-1])  # usable: unpickled (and copied) already


class Maker:
    def make(self, shape, kind):
        return payload(shape, kind)


class Taker:
    def take(self, item):
        return received(item)


def measure(repeats: int = 30) -> dict:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    maker, taker = ray.remote(num_cpus=1)(Maker).remote(), ray.remote(num_cpus=1)(Taker).remote()
    figures = {}
    for shape in SHAPES:
        for kind in KINDS:
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                ray.get(taker.take.remote(maker.make.remote(shape, kind)))
                runs.append(time.perf_counter() - start)
            figures[(shape, kind)] = statistics.median(runs[5:])
    ray.shutdown()
    return figures


def main() -> int:
    figures = measure()
    for shape in SHAPES:
        base = figures[(shape, "none")]
        cost = {k: (figures[(shape, k)] - base) * 1000 for k in KINDS if k != "none"}
        print(f"{list(shape)} bf16: round trip {base * 1000:.1f} ms with nothing; hand-off above it: "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in cost.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
