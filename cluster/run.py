"""One extraction run, start to finish: prepare, plan, place, extract, analyse, record.

The run's record (cluster.ledger) says, at every point, which micro-batches are
committed, so a run stopped anywhere can be resumed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from actors.anatomy import Anatomy, anatomy
from actors.background import WriteError
from actors.shard import ShardSpec, checkpoint_dir, load_config, text_config
from actors.stage import StageSpec
from actors.batch import MicroBatch
from analysis.pool import EarlyStart, wanted
from cluster import placement
from cluster.config import RunConfig
from cluster.data import load_texts, pack_sequences, shuffle_documents
from cluster.ledger import Ledger, new_record, open_ledger
from cluster.plan import PlanError, describe, plan_micro_batches, plan_stages, stage_bytes
from cluster.progress import Progress
from cluster.tiny_model import build_tiny
from common import files
from common.layout import RunLayout
from common.record import RunRecord

log = logging.getLogger(__name__)


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
    body = anatomy(path, model_config, config.model.dtype, config.model.experts_implementation, config.capture)
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
            writer=pipe.writer,
            num_threads=pipe.threads_per_stage or max(1, int(pipe.cpus_per_stage)),
            last=index == len(prepared.stages) - 1,
            warm_up=(pipe.micro_batch_size, config.data.seq_len),
            storage=config.storage.mode,
            floor=config.storage.floor,
            capture=config.capture,
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


def write_tokens(layout: RunLayout, tokens: torch.Tensor) -> None:
    """seq, pos, token_id of every token of the run # tokens [num_sequences, seq_len] (packed: no padding)."""
    import pyarrow as pa

    seq, pos = torch.meshgrid(torch.arange(tokens.shape[0]), torch.arange(tokens.shape[1]), indexing="ij")
    files.write_table(layout.fs, layout.tokens, pa.table({
        "seq": pa.array(seq.reshape(-1).numpy()), "pos": pa.array(pos.reshape(-1).int().numpy()),
        "token_id": pa.array(tokens.reshape(-1).int().numpy())}))


def place_stages(config: RunConfig, prepared: Prepared, ledger: Ledger):
    """Connect to Ray and reserve one bundle per stage; returns (group, bundles)."""
    import ray

    pipe = config.pipeline
    how = placement.connect()
    log.info("ray: %s a cluster with %s", how, placement.describe_resources(ray.cluster_resources()))
    bundles = placement.stage_bundles(len(prepared.stages), pipe.cpus_per_stage, pipe.device)
    strategy = placement.choose_strategy(bundles, pipe.placement)
    group = placement.reserve(bundles, pipe.placement_timeout_s, strategy)
    ledger.record.placement = {"strategy": strategy, "bundle_nodes": placement.bundle_nodes(group)}
    return group, bundles


def expected_table_bytes(config: RunConfig, prepared: Prepared) -> int:
    """About how many bytes of tables the run will write (dense: every value at 2 or 4 bytes;
    exceedances: the per-dim statistics alone, the kept entries being unknown in advance)."""
    body, sites = prepared.anatomy, 2 + config.capture.residual
    if config.storage.mode == "dense":
        width = 4 if body.dtype == "float32" else 2
        return prepared.tokens.numel() * body.num_layers * sites * body.hidden_size * width
    batches = len(plan_micro_batches(len(prepared.tokens), config.pipeline.micro_batch_size))
    return batches * body.num_layers * sites * body.hidden_size * 40  # NOTE: 5 columns of 8 bytes


def early_analysis(config: RunConfig, prepared: Prepared, progress: Progress) -> EarlyStart | None:
    """What starts the scan actors near the end of the extraction, for a run big enough to want them."""
    settings = config.analysis
    if not wanted(expected_table_bytes(config, prepared), settings.scan_actors_from_mb):
        return None
    return EarlyStart(settings.num_actors, progress.eta_s)


def extract(config: RunConfig, prepared: Prepared, ledger: Ledger, quiet: bool = False) -> EarlyStart | None:
    """Place the stages, load them and run every uncommitted micro-batch through them; returns
    the scan actors' early start, if the run wants them (closed here if the extraction fails)."""
    import ray

    from cluster.pipeline import StageLost, StageStartError, drive, loaded, start_stages

    timings = ledger.record.timings
    mark = time.perf_counter()
    group, bundles = place_stages(config, prepared, ledger)
    timings["cluster_start_s"] = time.perf_counter() - mark
    specs = stage_specs(config, prepared, config.storage.output)
    names = [spec.name for spec in specs]
    stages, early = [], None
    try:
        mark = time.perf_counter()
        stages = start_stages(specs, group, bundles)
        ledger.placed(loaded(stages, specs), names)
        timings["load_s"] = time.perf_counter() - mark
        log.info("%s", placement.describe_placement(ledger.record.plan, ledger.record.placement["strategy"]))

        mark = time.perf_counter()
        todo = micro_batches(prepared.tokens, config.pipeline.micro_batch_size, ledger.record.committed())
        progress = Progress({b.index: int(b.attention_mask.sum()) for b in todo}, quiet=quiet)
        early = early_analysis(config, prepared, progress)
        commit = progress.wrap(ledger.commit)
        if early:
            commit = early.after(commit)
        drive(stages, todo, config.pipeline.in_flight, commit, revive_timeout_s=config.pipeline.placement_timeout_s)
        timings["extract_s"] = time.perf_counter() - mark
        # Stages restarted after a fault may now live elsewhere: record where they ended.
        ray.get([s.close.remote() for s in stages])
        ledger.placed(ray.get([s.info.remote() for s in stages]), names)
        ledger.record.stage_stats = ray.get([s.stats.remote() for s in stages])
    except BaseException as err:
        if early:
            early.close()
        if isinstance(err, (StageLost, StageStartError, WriteError)):
            ledger.record.status = "stopped"
            ledger.save()
        raise
    finally:
        for stage in stages:
            ray.kill(stage)
        ray.util.remove_placement_group(group)
    return early


def execute(config: RunConfig, resume: bool = False, quiet: bool = False) -> dict:
    """Run extraction and analysis; returns {"record": RunRecord, "summary": dict}."""
    from analysis import analyse

    started = time.perf_counter()
    prepared = prepare(config)
    layout = RunLayout.of(config.storage.output)
    with layout.lock():
        ledger = open_ledger(layout, new_record(config, prepared), resume)
        write_tokens(layout, prepared.tokens)
        log.info("model %s (%d layers, hidden %d)", prepared.model_path, ledger.record.num_layers,
                 ledger.record.hidden_size)
        log.info("%s", describe(prepared.stages, prepared.stage_bytes))
        early = extract(config, prepared, ledger, quiet)

        # NOTE: analysis_s ends when summary.json is written; the plots after it are report_s.
        timings, mark = ledger.record.timings, time.perf_counter()
        summarised = lambda _: timings.update(analysis_s=time.perf_counter() - mark)  # noqa: E731
        try:
            summary = analyse(config.storage.output, config.analysis.criteria(), config.analysis.num_actors,
                              pool=early.pool if early else None, on_summary=summarised)
        finally:
            if early:
                early.close()
        timings["report_s"] = time.perf_counter() - mark - timings["analysis_s"]
        timings["total_s"] = time.perf_counter() - started
        ledger.record.status = "complete"
        ledger.save()
    record: RunRecord = ledger.record
    return {"record": record, "summary": summary}
