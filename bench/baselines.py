"""The two reference points: (a) a plain forward, and (b) the approach this project replaces.

(a) the floor: the whole model in one process, one decoder forward per micro-batch, no
    capture, nothing written.
(b) the replaced approach, faithfully: the whole model in one process; the layers split
    into 6 chunks (8 of 48 layers each in the original); for each chunk the FULL forward
    is re-run over every sequence with hooks on that chunk's layer norms, and each
    layer-site is saved with `torch.save`; the analysis then loads every file and walks,
    in a Python loop, every entry with |x| >= threshold to build the per-dim statistics.
Both run with the threads asked for (the floor: both cores of the reference machine; (b)
as the replaced tool did, with torch's default of every core). For the ratios both run in a
fresh process after one warm-up forward of seeded random tokens, the warm-up every stage
does: on the CPU each new matmul shape costs a kernel build, and a process that has already
run these very tokens has every expert shape built (`warm_on="tokens"`).
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from actors.capture import Capture
from actors.families import family_of
from actors.checkpoint import load_full
from actors.stage import warm_up_ids

CHUNKS = 6  # the original split its 48 layers into 6 chunks of 8


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(median seconds, all seconds) of `repeats` calls of `fn`."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), runs


def in_fresh_process(fn, *args):
    """`fn(*args)` in a new interpreter (spawned, so no kernel built here is reused there)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def warm_up(model, tokens: torch.Tensor, warm_on: str) -> None:
    """One forward before timing: of a stage's warm-up tokens ("random"), or of `tokens` itself."""
    ids = warm_up_ids(model.config.vocab_size, 1, tokens.shape[1]) if warm_on == "random" else tokens
    with torch.inference_mode():
        for row in ids.split(1):  # [1, seq]
            model.model(input_ids=row)


def plain_forward(model_path: str, dtype: str, tokens: torch.Tensor, repeats: int, threads: int,
                  warm_on: str = "random") -> dict:
    """(a): the decoder forward alone, micro-batches of one sequence, after a warm-up."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_full(model_path, dtype)
    load_s = time.perf_counter() - start

    @torch.inference_mode()
    def run():
        for row in tokens.split(1):  # [1, seq]
            model.model(input_ids=row)

    warm_up(model, tokens, warm_on)
    median, runs = timed(run, repeats)
    return {"load_s": load_s, "seconds": median, "runs": runs}


def legacy_extract(model, tokens: torch.Tensor, out: Path) -> int:
    """(b) extraction: one full forward per chunk of layers, a torch.save per layer-site."""
    layers = list(model.model.layers)
    written = 0
    for chunk in np.array_split(np.arange(len(layers)), CHUNKS):
        capture = Capture({int(i): layers[int(i)] for i in chunk}, family_of(model.config.model_type))
        taken = defaultdict(list)
        with torch.inference_mode():
            for row in tokens.split(1):  # [1, seq]
                model(input_ids=row)  # the whole model, logits included, as the original did
                for key, value in capture.pop().items():
                    taken[key].append(value)
        capture.remove()
        for (layer, site), values in taken.items():
            path = out / f"layer{layer}_{site}.pt"
            torch.save(torch.cat(values), path)  # [seqs, seq, hidden]
            written += path.stat().st_size
    return written


def legacy_analyse(out: Path, num_layers: int, threshold: float) -> dict:
    """(b) analysis: per-dim layers, tokens and counts, one Python step per entry >= threshold."""
    layers, tokens, count = defaultdict(set), defaultdict(set), defaultdict(int)
    max_abs: dict[int, float] = defaultdict(float)
    total = 0
    for path in sorted(out.glob("layer*_*.pt")):
        layer = int(path.name.removeprefix("layer").split("_")[0])
        acts = torch.load(path).float()  # [seqs, seq, hidden]
        total = acts.shape[0] * acts.shape[1]
        for dim, value in enumerate(acts.abs().amax(dim=(0, 1)).tolist()):
            max_abs[dim] = max(max_abs[dim], value)
        for seq, pos, dim in (acts.abs() >= threshold).nonzero().tolist():
            layers[dim].add(layer)
            tokens[dim].add((seq, pos))
            count[dim] += 1
    return {
        dim: {"max_abs": max_abs[dim], "layer_fraction": len(layers[dim]) / num_layers,
              "token_fraction": len(tokens[dim]) / total, "occurrences": count[dim]}
        for dim in sorted(max_abs)
    }


def legacy_features(per_dim: dict, threshold: float, min_layers=0.25, min_tokens=0.06) -> list[int]:
    return [d for d, s in per_dim.items() if s["max_abs"] >= threshold
            and s["layer_fraction"] >= min_layers and s["token_fraction"] >= min_tokens]


def legacy(model_path: str, dtype: str, tokens: torch.Tensor, out: Path, threshold: float,
           repeats: int, threads: int) -> dict:
    """(b) end to end, median of `repeats`: extraction and analysis timed apart."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_full(model_path, dtype)
    load_s = time.perf_counter() - start
    warm_up(model, tokens, "random")
    extract, analyse, found, size = [], [], [], 0
    for _ in range(repeats):
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        size = legacy_extract(model, tokens, out)
        extract.append(time.perf_counter() - start)
        start = time.perf_counter()
        per_dim = legacy_analyse(out, len(model.model.layers), threshold)
        found = legacy_features(per_dim, threshold)
        analyse.append(time.perf_counter() - start)
    return {
        "load_s": load_s, "extract_s": statistics.median(extract),
        "analysis_s": statistics.median(analyse), "extract_runs": extract, "analysis_runs": analyse,
        "seconds": statistics.median(e + a for e, a in zip(extract, analyse)),
        "bytes": size, "features": found,
    }
