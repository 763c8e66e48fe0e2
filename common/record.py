"""The run's record: what was run, on what, where each stage ran, what is committed.

`RunRecord` is loaded and checked once, then passed to whoever needs it (the driver keeps
it up to date; analysis reads it; scan actors receive it). It is written atomically as
micro-batches commit. `VERSION` changes when fields change meaning; records written before
versions existed (version 1) are read, others refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from common import files, storage
from common.errors import RunError
from common.layout import RunLayout

VERSION = 2


@dataclass
class StageRecord:
    """One stage of one replica of the plan, and where it ran once loaded."""

    stage: int
    layers: list[int]            # [first, stop)
    param_bytes: int
    replica: int = 0
    name: str | None = None
    node: str | None = None      # hostname
    node_id: str | None = None   # Ray node id
    pid: int | None = None
    device: str | None = None
    cuda_visible_devices: str | None = None
    load_s: float | None = None


@dataclass
class BatchRecord:
    seqs: list[int]              # [first, stop) global sequence indices
    status: str = "pending"      # pending or committed


@dataclass
class RunRecord:
    """Everything the run record holds."""

    num_layers: int
    hidden_size: int
    tokens: int                  # tokens per layer-site (padding excluded)
    storage_mode: str = storage.DENSE
    floor: float | None = None   # exceedances: smallest |x| stored
    seq_len: int | None = None
    num_sequences: int | None = None
    status: str = "running"
    created: str | None = None
    config: dict = field(default_factory=dict)  # the run's configuration, section by section
    output: str | None = None
    model_path: str | None = None
    model_type: str | None = None
    family: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    plan: list[StageRecord] = field(default_factory=list)
    batches: dict[int, BatchRecord] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    placement: dict | None = None
    stage_stats: list[dict] = field(default_factory=list)
    version: int = VERSION

    def __post_init__(self):
        if self.storage_mode not in storage.MODES:
            raise RunError(f"run record: storage_mode={self.storage_mode!r}; analysis reads one of "
                           f"{list(storage.MODES)}.")
        if not storage.is_dense(self.storage_mode) and self.floor is None:
            raise RunError(f"run record: storage_mode={self.storage_mode!r} needs 'floor'; re-run extraction.")

    def committed(self) -> set[int]:
        return {i for i, batch in self.batches.items() if batch.status == "committed"}

    def section(self, name: str) -> dict:
        """One section of the run's configuration (empty if absent)."""
        return dict(self.config.get(name) or {})

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["batches"] = {str(i): b for i, b in data["batches"].items()}
        return data

    @classmethod
    def from_json(cls, data: dict, where: str = "the run record") -> RunRecord:
        """A record from parsed JSON: this version, or version 1 (no `version` key)."""
        if not isinstance(data, dict):
            raise RunError(f"{where}: not a run record; pass the directory an extraction run wrote.")
        version = data.get("version", 1)
        if version not in (1, VERSION):
            raise RunError(f"{where}: record version {version}, but this moe-outliers reads versions 1 and "
                           f"{VERSION}; analyse it with the version that wrote it, or re-run extraction.")
        missing = [k for k in ("num_layers", "hidden_size", "tokens") if k not in data]
        if missing:
            raise RunError(f"{where}: lacks {missing}; the run did not finish. Re-run extraction.")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["plan"] = [_build(StageRecord, s) for s in data.get("plan") or []]
        values["batches"] = {int(i): _build(BatchRecord, b) for i, b in (data.get("batches") or {}).items()}
        values["version"] = VERSION
        return cls(**values)


def _build(cls, data: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def read_record(layout: RunLayout) -> RunRecord:
    """The record of the run at `layout`, or RunError naming the problem and the fix."""
    if not files.exists(layout.fs, layout.record):
        raise RunError(f"{layout.uri}: no run record ({layout.record}). Pass the directory an extraction "
                       "run wrote.")
    try:
        data = json.loads(files.read_bytes(layout.fs, layout.record))
    except json.JSONDecodeError as err:
        raise RunError(f"{layout.record}: not valid JSON ({err}); re-run extraction.") from None
    return RunRecord.from_json(data, layout.record)


def write_record(layout: RunLayout, record: RunRecord) -> None:
    files.write_json(layout.fs, layout.record, record.to_json())
