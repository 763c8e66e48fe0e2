"""One extraction run, start to finish: prepare, plan, place, extract, analyse, record.

The run's record (cluster.ledger) says, at every point, which micro-batches are
committed, so a run stopped anywhere can be resumed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from actors.anatomy import Anatomy, anatomy
from actors.background import WriteError
from actors.shard import ShardSpec
from actors.checkpoint import checkpoint_dir, load_config, text_config
from actors.stage import StageSpec
from actors.handoff import MicroBatch
from analysis.pool import EarlyStart, repays_actors
from cluster import placement
from cluster.config import RunConfig
from cluster.data import load_texts, pack_sequences, shuffle_documents
from cluster.ledger import Ledger, new_record, open_ledger, previous
from cluster.dispatch import Dispatcher, StageLost
from cluster.executor import Hardware, make_executor
from cluster.pipeline import StageStartError
from cluster.plan import PlanError, plan_micro_batches
from cluster.shape import Activations, Shape, activations, check_fits, describe, fewest_stages, fixed_shape
from cluster.progress import Progress
from cluster.tiny_model import build_tiny
from common import files, storage
from common.layout import RunLayout
from common.record import RunRecord

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything known before the stages load: the model, the tokens, and (once the hardware is
    known: `plan_shape`) the stages of one pipeline."""

    model_path: str
    model_config: object
    anatomy: Anatomy
    tokens: torch.Tensor        # [num_sequences, seq_len]
    shape: Shape | None = None

    @property
    def stages(self) -> list[range]:
        return self.shape.stages

    @property
    def stage_bytes(self) -> list[int]:
        return self.shape.weights


def model_path(config: RunConfig) -> str:
    model = config.model
    if model.tiny is not None:
        return build_tiny(model.tiny, str(Path(model.cache_dir).expanduser()))
    return checkpoint_dir(model.path)


def prepare(config: RunConfig) -> Prepared:
    """Resolve the checkpoint and tokenize the data; plan the stages when their number is given."""
    path = model_path(config)
    model_config = load_config(path)
    parts = anatomy(path, model_config, config.model.dtype, config.model.experts_implementation, config.capture)
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
    prepared = Prepared(path, model_config, parts, tokens)
    if config.pipeline.num_stages != "auto":
        prepared.shape = plan_shape(config, prepared, Hardware(gpus=0, gpu_bytes=None))
    return prepared


def headroom(config: RunConfig, prepared: Prepared) -> Activations:
    """What one micro-batch occupies on a stage besides its weights (cluster/shape.py)."""
    sites = 2 + config.capture.residual
    return activations(text_config(prepared.model_config), prepared.anatomy.dtype,
                       config.pipeline.micro_batch_size, config.data.seq_len, sites)


def plan_shape(config: RunConfig, prepared: Prepared, hardware: Hardware) -> Shape:
    """The stages of one pipeline for `hardware`: `pipeline.num_stages`, or under `auto` the fewest
    that fit one GPU; refused in one line if they cannot fit."""
    model, stages = prepared.anatomy, config.pipeline.num_stages
    sizes = (list(model.layer_bytes), model.embed_bytes, model.shared_bytes)
    if stages != "auto" or hardware.one_device:  # stages sharing one device: more of them fit no better
        shape = fixed_shape(*sizes, 1 if stages == "auto" else stages, headroom(config, prepared))
    elif hardware.gpu_bytes:
        shape = fewest_stages(*sizes, hardware.gpu_bytes, headroom(config, prepared))
    elif hardware.gpus:
        raise PlanError("pipeline.num_stages=auto needs the memory of one GPU, and torch on the cluster's GPU "
                        "node sees no GPU; set pipeline.gpu_memory_gib.")
    else:  # CPU stages: one process holds the model, as a plain forward would
        shape = fixed_shape(*sizes, 1, headroom(config, prepared))
    weights = f"weights: the {model.quantization} release loaded dequantized to {model.dtype}" \
        if model.quantization else "weights"
    check_fits(shape, hardware.gpu_bytes, hardware.gpus, auto=stages == "auto", weights=weights,
               one_device=hardware.one_device)
    return replace(shape, gpu_bytes=hardware.gpu_bytes if hardware.gpus else None)


def stage_specs(config: RunConfig, prepared: Prepared, output: str, replica: int = 0,
                local: bool = False) -> list[StageSpec]:
    """One replica's stages. A stage actor runs as many torch threads as it has CPUs; stages
    chained in one process (`local`) leave torch's own count, unless threads_per_stage says."""
    pipe = config.pipeline
    return [
        StageSpec(
            index=index,
            replica=replica,
            shard=ShardSpec(
                prepared.model_path, layers, prepared.anatomy.dtype,
                config.model.experts_implementation, config.model.attn_implementation,
            ),
            storage=replace(config.storage, output=output),
            capture=config.capture,
            pipeline=pipe.stage_part(),
            num_threads=pipe.threads_per_stage or (None if local else max(1, int(pipe.cpus_per_stage))),
            warm_up=(pipe.micro_batch_size, config.data.seq_len),
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

    seq, pos = torch.meshgrid(torch.arange(tokens.shape[0]), torch.arange(tokens.shape[1]), indexing="ij")
    files.write_table(layout.fs, layout.tokens, storage.table(
        storage.TOKENS, seq=seq.reshape(-1).numpy(), pos=pos.reshape(-1).numpy(), token_id=tokens.reshape(-1).numpy()))


def expected_table_bytes(config: RunConfig, prepared: Prepared) -> int:
    """About how many bytes of tables the run will write (dense: every value at 2 or 4 bytes;
    exceedances: the per-dim statistics alone, the kept entries being unknown in advance)."""
    model, sites = prepared.anatomy, 2 + config.capture.residual
    if storage.is_dense(config.storage.mode):
        width = 4 if model.dtype == "float32" else 2
        return prepared.tokens.numel() * model.num_layers * sites * model.hidden_size * width
    batches = len(plan_micro_batches(len(prepared.tokens), config.pipeline.micro_batch_size))
    return batches * model.num_layers * sites * model.hidden_size * 40  # NOTE: 5 columns of 8 bytes


def early_analysis(config: RunConfig, prepared: Prepared, progress: Progress) -> EarlyStart | None:
    """What starts the scan actors near the end of the extraction, for a run big enough to want them."""
    settings = config.analysis
    if not repays_actors(expected_table_bytes(config, prepared), settings.scan_actors_from_mb):
        return None
    return EarlyStart(settings.num_actors, progress.eta_s)


def extract(config: RunConfig, prepared: Prepared, ledger: Ledger, runner, quiet: bool = False) -> EarlyStart | None:
    """Load the placed replicas' stages and run every uncommitted micro-batch through them; returns
    the scan actors' early start, if the run wants them (closed here if the extraction fails)."""
    timings, replicas = ledger.record.timings, len({entry.replica for entry in ledger.record.plan})
    todo = micro_batches(prepared.tokens, config.pipeline.micro_batch_size, ledger.record.committed())
    specs = [stage_specs(config, prepared, config.storage.output, r, local=runner.kind == "local")
             for r in range(replicas)]
    log.info("%s", describe(prepared.shape, replicas))
    early = None
    try:
        mark = time.perf_counter()
        ledger.placed(runner.start(specs))
        timings["load_s"] = time.perf_counter() - mark
        log.info("%s", placement.describe_placement(ledger.record.plan))

        mark = time.perf_counter()
        tokens = {b.index: int(b.attention_mask.sum()) for b in todo}
        dispatcher = Dispatcher(list(tokens), replicas, len(prepared.stages), runner.in_flight(len(prepared.stages)),
                                tokens=tokens)
        progress = Progress(tokens, quiet=quiet, replicas=dispatcher.replicas)
        early = early_analysis(config, prepared, progress) if runner.kind == "ray" else None
        commit = progress.wrap(ledger.commit)
        if early:
            commit = early.after(commit)
        runner.run(todo, dispatcher, commit)
        timings["extract_s"] = time.perf_counter() - mark
        ledger.record.placement["dropped"] = [r.index for r in dispatcher.replicas if r.state == "dropped"]
        infos, ledger.record.stage_stats = runner.finish()
        ledger.placed(infos)
    except BaseException as err:
        if early:
            early.close()
        if isinstance(err, (StageLost, StageStartError, WriteError)):
            ledger.record.status = "stopped"
            ledger.save()
        raise
    return early


def execute(config: RunConfig, resume: bool = False, quiet: bool = False, executor: str = "ray",
            visual: bool = True) -> dict:
    """Run extraction and analysis on `executor` ("ray" or "local"), with the plots and report.html
    unless not `visual`; returns {"record": RunRecord, "summary": dict}."""
    from analysis.steps import analyse

    started = time.perf_counter()
    prepared = prepare(config)
    layout = RunLayout.of(config.storage.output)
    runner = make_executor(executor, config.pipeline)
    with layout.lock():
        old = previous(layout, config.to_dict(), resume)  # a taken output is refused before the cluster starts
        try:
            mark = time.perf_counter()
            prepared.shape = plan_shape(config, prepared, runner.hardware(config.pipeline.num_stages == "auto"))
            done = old.committed() if old else set()
            todo = len(plan_micro_batches(len(prepared.tokens), config.pipeline.micro_batch_size)) - len(done)
            replicas = runner.place(len(prepared.stages), todo)  # reserved before any record is written
            cluster_s = time.perf_counter() - mark
            ledger = open_ledger(layout, new_record(config, prepared), resume)
            ledger.replicate(replicas, runner.placement)
            ledger.record.timings["cluster_start_s"] = cluster_s
            write_tokens(layout, prepared.tokens)
            log.info("model %s (%d layers, hidden %d)", prepared.model_path, ledger.record.num_layers,
                     ledger.record.hidden_size)
            early = extract(config, prepared, ledger, runner, quiet)
        finally:
            runner.close()
        summary = analyse_run(config, ledger, early, partial(analyse, visual=visual), started)
    record: RunRecord = ledger.record
    return {"record": record, "summary": summary}


def analyse_run(config: RunConfig, ledger: Ledger, early: EarlyStart | None, analyse, started: float) -> dict:
    """The analysis of the extracted run, its timings recorded and the run marked complete."""
    # NOTE: analysis_s ends when summary.json is written; the plots after it are report_s.
    timings, mark = ledger.record.timings, time.perf_counter()
    summarised = lambda _: timings.update(analysis_s=time.perf_counter() - mark)  # noqa: E731
    try:
        summary = analyse(config.storage.output, config.analysis.criteria(), config.analysis.num_actors,
                          pool=early.pool if early else None, on_summary=summarised)
    finally:
        if early:
            early.close()
    timings["report_s"] = time.perf_counter() - mark - timings["analysis_s"]  # 0 without the visual report
    timings["total_s"] = time.perf_counter() - started
    ledger.record.status = "complete"
    ledger.save()
    return summary
