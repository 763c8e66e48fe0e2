"""Single-GPU benchmark: tokens/s of (a) plain forward, (c) dense capture, (d) exceedance mode.

    python bench/gpu.py                 # OLMoE-1B-7B shape, bf16, 16 x 2048 tokens (~5 min on an H100)
    python bench/gpu.py --small         # a CPU-sized model: checks the script runs anywhere

Needs torch, transformers and pyarrow only: no Ray, no Polars. The stage, capture and
writer code run in-process (`actors/`), exactly the classes the Ray stages wrap. The model
is random-init with the public OLMoE-1B-7B shape (16 layers, hidden 2048, 64 experts top-8,
expert size 1024): no download, no checkpoint on disk. Every timing starts after a warm-up
micro-batch and ends after `torch.cuda.synchronize()` and, for (c) and (d), after the writer
has flushed every file. Prints a table and writes JSON next to the run files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from common.storage import DENSE, EXCEEDANCES, StorageConfig  # noqa: E402

OLMOE = dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
             max_position_embeddings=4096)
SMALL = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, num_experts=16, num_experts_per_tok=2, vocab_size=1024,
             max_position_embeddings=1024, bos_token_id=None, eos_token_id=0, pad_token_id=1)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized model, 4 x 256 tokens")
    parser.add_argument("--sequences", type=int, help="sequences (default 16; small 4)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048; small 256)")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--floor", type=float, default=3.0, help="exceedance mode floor")
    parser.add_argument("--out", default="/tmp/moe-outliers-gpu-bench", help="run files (deleted after)")
    parser.add_argument("--keep", action="store_true", help="keep the run files")
    return parser.parse_args(argv)


def build_model(shape: dict, device: torch.device):
    """Random-init OLMoE-shaped CausalLM in bf16, built directly on `device`."""
    from transformers import AutoModelForCausalLM, OlmoeConfig

    torch.manual_seed(0)
    config = OlmoeConfig(**shape)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain(model, batches, device) -> float:
    """(a): decoder forward only, no hooks; seconds over all micro-batches after a warm-up."""
    with torch.inference_mode():
        model.model(input_ids=batches[0].input_ids.to(device))
        sync(device)
        start = time.perf_counter()
        for batch in batches:
            model.model(input_ids=batch.input_ids.to(device))
        sync(device)
    return time.perf_counter() - start


def captured(model, batches, device, out: Path, mode: str, floor: float) -> dict:
    """(c)/(d): one StageActor holding every layer, capturing and writing in `mode`."""
    import actors.stage as stage_module
    from actors.shard import ShardSpec
    from actors.stage import StageSettings, StageSpec, profile
    from cluster.executor import LocalExecutor
    from cluster.pipeline import PipelineConfig
    from common.layout import RunLayout

    # NOTE: the stage normally loads its shard from a checkpoint; here it takes the random-init
    # model already in GPU memory (writing and reading a 14 GB checkpoint would take minutes).
    stage_module.load_shard = lambda spec, device: model
    layers = range(model.config.num_hidden_layers)
    spec = StageSpec(0, ShardSpec("random-init", layers, "bfloat16"), StorageConfig(str(out / mode), mode, floor),
                     pipeline=StageSettings(device=device.type))
    executor = LocalExecutor(PipelineConfig())  # the local executor: one stage, in this process
    executor.start([[spec]])
    stage = executor.stages[0]
    executor.run_all(batches[:1])  # warm-up (its files are overwritten below)
    sync(device)
    before, start = stage.stats(), time.perf_counter()
    dispatcher = executor.run_all(batches, flush=False)
    sync(device)
    forward_s = time.perf_counter() - start
    executor.flush_all(dispatcher)
    wall_s = time.perf_counter() - start
    after = stage.stats()
    executor.finish()
    size = sum(Path(path).stat().st_size for path, _ in RunLayout.of(str(out / mode)).batch_tables())
    return {"seconds": wall_s, "until_last_forward_s": forward_s, "bytes": size, "profile": profile(after, before)}


def main(argv=None) -> int:
    args = parse(argv)
    from actors.handoff import MicroBatch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # NOTE: as the CPU stages run; extra threads only contend
    sequences = args.sequences or (4 if args.small else 16)
    seq_len = args.seq_len or (256 if args.small else 2048)
    shape = SMALL if args.small else OLMOE
    start = time.perf_counter()
    model = build_model(shape, device)
    build_s = time.perf_counter() - start
    tokens = torch.randint(0, shape["vocab_size"], (sequences, seq_len), generator=torch.Generator().manual_seed(0))
    batches = [
        MicroBatch(i, list(range(s, s + args.micro_batch)), tokens[s:s + args.micro_batch],
                   torch.ones_like(tokens[s:s + args.micro_batch]))
        for i, s in enumerate(range(0, sequences, args.micro_batch))
    ]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    rows = {"(a) plain forward": {"seconds": plain(model, batches, device)}}
    rows["(c) capture, dense"] = captured(model, batches, device, out, DENSE, args.floor)
    if not args.keep:
        shutil.rmtree(out / DENSE, ignore_errors=True)  # free the disk before the next row
    rows[f"(d) capture, exceedances >= {args.floor:g}"] = captured(
        model, batches, device, out, EXCEEDANCES, args.floor)
    report(rows, tokens.numel(), device, shape, build_s, out / "gpu_bench.json")
    if not args.keep:
        shutil.rmtree(out / EXCEEDANCES, ignore_errors=True)
    return 0


def report(rows: dict, tokens: int, device, shape: dict, build_s: float, path: Path) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; model {shape}; {tokens} tokens; model build {build_s:.1f} s")
    print("| Row | Seconds | Tokens/s | vs (a) | Bytes written | Until last forward (s) |")
    print("|-----|--------:|---------:|-------:|--------------:|-----------------------:|")
    plain_s = rows["(a) plain forward"]["seconds"]
    for label, row in rows.items():
        print(f"| {label} | {row['seconds']:.3f} | {tokens / row['seconds']:,.0f} | "
              f"{row['seconds'] / plain_s:.2f}x | {row.get('bytes', 0):,} | "
              f"{row.get('until_last_forward_s', row['seconds']):.3f} |")
    from bench.report import profile_rows

    print("\nWhere the stage's time went, ms per micro-batch:\n")
    print(profile_rows({label: [row["profile"]] for label, row in rows.items() if "profile" in row}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": name, "shape": shape, "tokens": tokens,
                                "build_s": build_s, "rows": rows}, indent=2))
    print(f"figures: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
