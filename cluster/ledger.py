"""The driver's side of the run record: made at the start, kept up to date, resumed from.

The record (common.record) is rewritten atomically as micro-batches are committed (written
by every stage; at most once a second), so a run stopped at any point can be resumed from
what it records as committed.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

from cluster.plan import plan_micro_batches
from common import files, storage
from common.errors import RunError
from common.layout import RunLayout
from common.record import BatchRecord, RunRecord, StageRecord, read_record, write_record

log = logging.getLogger(__name__)

RESUME_KEYS = ("model", "data", "storage")  # what must match for committed files to be reused


class Ledger:
    """The run record of a run in progress.

    Commits are written at most every `save_every_s` seconds (and by every other save):
    rewriting a record that grows with the run after each of thousands of micro-batches
    would cost quadratic I/O. A commit not yet saved is only re-run on resume.
    """

    def __init__(self, layout: RunLayout, record: RunRecord, save_every_s: float = 1.0):
        self.layout = layout
        self.record = record
        self.save_every_s = save_every_s
        self._saved_at = float("-inf")

    def save(self) -> None:
        write_record(self.layout, self.record)
        self._saved_at = time.monotonic()

    def commit(self, indices: list[int]) -> None:
        for index in indices:
            self.record.batches[index].status = "committed"
        if time.monotonic() - self._saved_at >= self.save_every_s:
            self.save()

    def replicate(self, replicas: int, placement: dict) -> None:
        """The plan of one pipeline, as `replicas` copies of it (replica-major), and where the
        executor reserved them."""
        one = [entry for entry in self.record.plan if entry.replica == 0]
        self.record.plan = [StageRecord(stage=e.stage, layers=list(e.layers), param_bytes=e.param_bytes, replica=r)
                            for r in range(replicas) for e in one]
        self.record.placement = placement
        self.save()

    def placed(self, infos: list[dict]) -> None:
        """Merge each stage's own report (name, node, device, pid, bytes) into the stored plan."""
        entries = {(entry.replica, entry.stage): entry for entry in self.record.plan}
        for info in infos:
            entry = entries[(info["replica"], info["stage"])]
            for key, value in info.items():
                if hasattr(entry, key):
                    setattr(entry, key, value)
        self.save()


def new_record(config, prepared) -> RunRecord:
    """The record of a run about to start (`config`: a RunConfig; `prepared`: what run.prepare made)."""
    model = prepared.anatomy
    batches = plan_micro_batches(config.data.num_sequences, config.pipeline.micro_batch_size)
    return RunRecord(
        num_layers=model.num_layers, hidden_size=model.hidden_size, tokens=int(prepared.tokens.numel()),
        storage_mode=config.storage.mode,
        floor=None if storage.is_dense(config.storage.mode) else config.storage.floor,
        seq_len=config.data.seq_len, num_sequences=config.data.num_sequences,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config=config.to_dict(), output=files.absolute(config.storage.output),  # jobs run in a temp dir
        model_path=prepared.model_path, model_type=model.model_type, family=model.family, dtype=model.dtype,
        quantization=model.quantization,
        plan=[StageRecord(stage=i, layers=[r.start, r.stop], param_bytes=b)
              for i, (r, b) in enumerate(zip(prepared.stages, prepared.stage_bytes))],
        batches={i: BatchRecord(seqs=[r.start, r.stop]) for i, r in enumerate(batches)},
    )


def same_run(old: dict, new: dict) -> bool:
    """Whether a stored config produces the same micro-batches and files as `new`."""
    def key(config):
        config = json.loads(json.dumps(config, default=str))  # tuples and lists alike
        return [config.get(k) for k in RESUME_KEYS], (config.get("pipeline") or {}).get("micro_batch_size")

    return key(old) == key(new)


def previous(layout: RunLayout, config: dict, resume: bool) -> RunRecord | None:
    """The run already at `layout` that `resume` continues (None when the output holds none);
    refused in one line without --resume, or when its config makes other files than `config`."""
    if not files.exists(layout.fs, layout.record):
        return None
    old = read_record(layout)
    if not resume:
        raise RunError(
            f"storage.output={layout.uri!r} already holds a run (status {old.status!r}). "
            "Pass --resume to continue it, or choose another --output."
        )
    if not same_run(old.config, config):
        raise RunError(
            f"--resume: the run in {layout.uri!r} was made with a different model, data, storage or "
            "micro_batch_size; resume with the same config and flags, or choose another --output."
        )
    return old


def open_ledger(layout: RunLayout, record: RunRecord, resume: bool) -> Ledger:
    """A fresh ledger, or the existing one when resuming the same run."""
    ledger = Ledger(layout, record)
    old = previous(layout, record.config, resume)
    if old is not None:
        # The plan is this session's: a resume may run other numbers of stages and replicas.
        old.config, old.status, old.plan = record.config, "running", record.plan
        ledger.record = old
        removed = files.remove_debris(layout.fs, layout.root) + layout.remove_uncommitted(old.committed())
        if removed:
            log.info("resume: removed %d partial or uncommitted files left by the interrupted run", removed)
    ledger.save()
    return ledger
