"""One extraction run, start to finish: prepare, plan, place, extract, analyse, record.

`RUN/run.json` is the run's ledger. It is rewritten atomically as micro-batches are
committed (written by every stage; at most once a second), so a run stopped at any
point can be resumed from what it records as committed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from actors import storage
from actors.anatomy import Anatomy, anatomy
from actors.shard import ShardSpec, checkpoint_dir, load_config, text_config
from actors.stage import StageSpec
from actors.writer import MicroBatch
from cluster import placement
from cluster.config import RunConfig
from cluster.data import load_texts, pack_sequences, shuffle_documents
from cluster.plan import PlanError, describe, plan_micro_batches, plan_stages, stage_bytes
from cluster.progress import Progress
from cluster.tiny_model import build_tiny


class RunError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


@dataclass
class Prepared:
    """Everything known before the cluster is touched."""

    model_path: str
    model_config: object
    anatomy: Anatomy
    tokens: torch.Tensor        # [num_sequences, seq_len]
    stages: list[range]
    stage_bytes: list[int]


def model_path(config: RunConfig) -> str:
    model = config.model
    if model.tiny is not None:
        return build_tiny(model.tiny, str(Path(model.cache_dir).expanduser()))
    return checkpoint_dir(model.path)


def prepare(config: RunConfig) -> Prepared:
    """Resolve the checkpoint, tokenize the data and plan the stages."""
    path = model_path(config)
    model_config = load_config(path)
    body = anatomy(path, model_config, config.model.dtype, config.model.experts_implementation)
    limit = getattr(text_config(model_config), "max_position_embeddings", None)
    if limit and config.data.seq_len > limit:
        raise PlanError(
            f"data.seq_len={config.data.seq_len} exceeds the model's max_position_embeddings={limit}. "
            f"Use data.seq_len <= {limit}."
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = 1 << 62  # we cut the packed stream ourselves: no length warning
    texts = load_texts(config.data.source, config.data.text_field, config.data.split)
    if config.data.shuffle_seed is not None:
        texts = shuffle_documents(texts, config.data.shuffle_seed)
    tokens = pack_sequences(
        tokenizer, texts, config.data.num_sequences, config.data.seq_len,
        source=f"data.source={config.data.source!r}",
    )
    layer_bytes = list(body.layer_bytes)
    stages = plan_stages(layer_bytes, config.pipeline.num_stages, body.embed_bytes)
    return Prepared(path, model_config, body, tokens, stages,
                    stage_bytes(stages, layer_bytes, body.embed_bytes, body.shared_bytes))


def stage_specs(config: RunConfig, prepared: Prepared, output: str) -> list[StageSpec]:
    pipe = config.pipeline
    return [
        StageSpec(
            index=index,
            shard=ShardSpec(
                prepared.model_path, layers, prepared.anatomy.dtype,
                config.model.experts_implementation, config.model.attn_implementation,
            ),
            output=output,
            device=pipe.device,
            write_depth=pipe.write_depth,
            num_threads=pipe.threads_per_stage or max(1, int(pipe.cpus_per_stage)),
            last=index == len(prepared.stages) - 1,
            warm_up=(pipe.micro_batch_size, config.data.seq_len),
            storage=config.storage.mode,
            floor=config.storage.floor,
        )
        for index, layers in enumerate(prepared.stages)
    ]


def micro_batches(tokens: torch.Tensor, size: int, skip: set[int]) -> list[MicroBatch]:
    """Micro-batches of consecutive sequences, leaving out committed ones."""
    return [
        MicroBatch(index, list(seqs), tokens[seqs.start:seqs.stop], torch.ones_like(tokens[seqs.start:seqs.stop]))
        for index, seqs in enumerate(plan_micro_batches(len(tokens), size))
        if index not in skip
    ]


class Ledger:
    """run.json: the config, the plan, per-micro-batch status and timings.

    Commits are written at most every `save_every_s` seconds (and by every other save):
    rewriting a record that grows with the run after each of thousands of micro-batches
    would cost quadratic I/O. A commit not yet saved is only re-run on resume.
    """

    def __init__(self, output: str, record: dict, save_every_s: float = 1.0):
        self.fs, self.root = storage.resolve(output)
        self.record = record
        self.save_every_s = save_every_s
        self._saved_at = float("-inf")

    @property
    def path(self) -> str:
        return f"{self.root}/run.json"

    def save(self) -> None:
        storage.write_json(self.fs, self.path, self.record)
        self._saved_at = time.monotonic()

    def committed(self) -> set[int]:
        return {int(i) for i, b in self.record["batches"].items() if b["status"] == "committed"}

    def commit(self, indices: list[int]) -> None:
        for index in indices:
            self.record["batches"][str(index)]["status"] = "committed"
        if time.monotonic() - self._saved_at >= self.save_every_s:
            self.save()


def new_record(config: RunConfig, prepared: Prepared) -> dict:
    mc = prepared.model_config
    batches = plan_micro_batches(config.data.num_sequences, config.pipeline.micro_batch_size)
    from datetime import datetime, timezone

    return {
        "status": "running",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "output": storage.absolute(config.storage.output),  # jobs run in a temporary working dir
        "model_path": prepared.model_path,
        "model_type": mc.model_type,
        "family": prepared.anatomy.family,
        "num_layers": prepared.anatomy.num_layers,
        "hidden_size": prepared.anatomy.hidden_size,
        "dtype": prepared.anatomy.dtype,
        "quantization": prepared.anatomy.quantization,
        "storage_mode": config.storage.mode,
        "floor": config.storage.floor if config.storage.mode == "exceedances" else None,
        "seq_len": config.data.seq_len,
        "num_sequences": config.data.num_sequences,
        "tokens": int(prepared.tokens.numel()),
        "plan": [
            {"stage": i, "layers": [r.start, r.stop], "param_bytes": b}
            for i, (r, b) in enumerate(zip(prepared.stages, prepared.stage_bytes))
        ],
        "batches": {
            str(i): {"seqs": [r.start, r.stop], "status": "pending"} for i, r in enumerate(batches)
        },
        "timings": {},
    }


RESUME_KEYS = ("model", "data", "storage")  # what must match for committed files to be reused


def same_run(old: dict, new: dict) -> bool:
    """Whether a stored config produces the same micro-batches and files as `new`."""
    import json

    def key(config):
        config = json.loads(json.dumps(config, default=str))  # tuples and lists alike
        return [config[k] for k in RESUME_KEYS], config["pipeline"]["micro_batch_size"]

    return key(old) == key(new)


def open_ledger(config: RunConfig, prepared: Prepared, resume: bool) -> Ledger:
    """A fresh ledger, or the existing one when resuming the same run."""
    fs, root = storage.resolve(config.storage.output)
    ledger = Ledger(config.storage.output, new_record(config, prepared))
    if storage.exists(fs, ledger.path):
        old = storage.read_json(fs, ledger.path)
        if not resume:
            raise RunError(
                f"storage.output={config.storage.output!r} already holds a run "
                f"(status {old.get('status')!r}). Pass --resume to continue it, or choose another --output."
            )
        if not same_run(old["config"], ledger.record["config"]):
            raise RunError(
                f"--resume: the run in {config.storage.output!r} was made with a different "
                f"model, data, storage or micro_batch_size; resume with the same config and flags, "
                "or choose another --output."
            )
        old["config"], old["status"] = ledger.record["config"], "running"
        ledger.record = old
        removed = storage.remove_debris(fs, root)
        removed += storage.remove_uncommitted(fs, root, ledger.committed())
        if removed:
            print(f"resume: removed {removed} partial or uncommitted files left by the interrupted run")
    ledger.save()
    return ledger


def place_stages(config: RunConfig, prepared: Prepared, ledger: Ledger):
    """Connect to Ray and reserve one bundle per stage; returns (group, bundles)."""
    import ray

    pipe = config.pipeline
    how = placement.connect()
    print(f"ray: {how} a cluster with {placement.describe_resources(ray.cluster_resources())}")
    bundles = placement.stage_bundles(len(prepared.stages), pipe.cpus_per_stage, pipe.device)
    strategy = placement.choose_strategy(bundles, pipe.placement)
    group = placement.reserve(bundles, pipe.placement_timeout_s, strategy)
    ledger.record["placement"] = {"strategy": strategy, "bundle_nodes": placement.bundle_nodes(group)}
    return group, bundles


def record_placement(ledger: Ledger, infos: list[dict], specs: list[StageSpec]) -> None:
    """Merge each stage's own report (node, device, pid, bytes) into the stored plan."""
    for entry, info in zip(ledger.record["plan"], infos):
        entry.update(info, name=specs[info["stage"]].name)
    ledger.save()


def extract(config: RunConfig, prepared: Prepared, ledger: Ledger, log) -> None:
    """Place the stages, load them and run every uncommitted micro-batch through them."""
    import ray

    from cluster.pipeline import StageLost, StageStartError, drive, loaded, start_stages

    timings = ledger.record["timings"]
    mark = time.perf_counter()
    group, bundles = place_stages(config, prepared, ledger)
    timings["cluster_start_s"] = time.perf_counter() - mark
    specs = stage_specs(config, prepared, config.storage.output)
    stages = []
    try:
        mark = time.perf_counter()
        stages = start_stages(specs, group, bundles)
        record_placement(ledger, loaded(stages, specs), specs)
        timings["load_s"] = time.perf_counter() - mark
        strategy = ledger.record["placement"]["strategy"]
        log(placement.describe_placement(ledger.record["plan"], strategy))

        mark = time.perf_counter()
        todo = micro_batches(prepared.tokens, config.pipeline.micro_batch_size, ledger.committed())
        progress = Progress({b.index: int(b.attention_mask.sum()) for b in todo}, log)
        drive(stages, todo, config.pipeline.in_flight, progress.wrap(ledger.commit),
              revive_timeout_s=config.pipeline.placement_timeout_s, log=log)
        timings["extract_s"] = time.perf_counter() - mark
        # Stages restarted after a fault may now live elsewhere: record where they ended.
        record_placement(ledger, ray.get([s.info.remote() for s in stages]), specs)
        ledger.record["stage_stats"] = ray.get([s.stats.remote() for s in stages])
    except (StageLost, StageStartError) as err:
        ledger.record["status"] = "stopped"
        ledger.save()
        raise RunError(str(err)) from None
    finally:
        for stage in stages:
            ray.kill(stage)
        ray.util.remove_placement_group(group)


def execute(config: RunConfig, resume: bool = False, log=print) -> dict:
    """Run extraction and analysis; returns the final run record and the summary."""
    from analysis import analyse

    started = time.perf_counter()
    prepared = prepare(config)
    with storage.RunLock(config.storage.output):
        ledger = open_ledger(config, prepared, resume)
        log(f"model {prepared.model_path} ({ledger.record['num_layers']} layers, "
            f"hidden {ledger.record['hidden_size']})")
        log(describe(prepared.stages, prepared.stage_bytes))
        extract(config, prepared, ledger, log)

        mark = time.perf_counter()
        summary = analyse(config.storage.output, config.analysis.criteria(), config.analysis.num_actors)
        timings = ledger.record["timings"]
        timings["analysis_s"] = time.perf_counter() - mark
        timings["total_s"] = time.perf_counter() - started
        ledger.record["status"] = "complete"
        ledger.save()
    return {"record": ledger.record, "summary": summary}
