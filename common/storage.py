"""Storage modes and the schema of every table a run stores: the one place that spells them.

A run stores its activations in one of two modes (`storage.mode`):
  - dense: every activation of the real tokens, one Arrow IPC table per layer-site and
    micro-batch (`activations`); the analysis finds the exceedances when it scans them.
  - exceedances: per stage and micro-batch, only the entries with |x| >= floor
    (`exceedances`) and per-(layer, site, dim) statistics of all of them (`stats`).

Beside them, whatever the mode: the run's tokens, and the capture tables (routing, experts,
expert_dims, histograms). The writers build every table with `table`, and the scan and the
views read the columns named here, so a new column is added here (and where it is computed).
No torch, Polars or Ray: the config validation and every package import this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from common.config import choice

DENSE, EXCEEDANCES = "dense", "exceedances"
MODES = (DENSE, EXCEEDANCES)
# The table kinds, each a folder of the run (common/layout.py). The exceedance mode's kept
# entries are the kind EXCEEDANCES.
ACTIVATIONS, STATS, TOKENS = "activations", "stats", "tokens"
ROUTING, EXPERTS, EXPERT_DIMS, HISTOGRAMS = "routing", "experts", "expert_dims", "histograms"
# One table per stage and micro-batch (the capture kinds only when captured).
STAGE_KINDS = (EXCEEDANCES, STATS, ROUTING, EXPERTS, EXPERT_DIMS, HISTOGRAMS)


@dataclass(frozen=True)
class StorageConfig:
    """The `storage:` config section: where a run's tables go, and which."""

    output: str = "runs/latest"
    """Run directory: a local path or a pyarrow filesystem URI (s3://..., gs://...)."""
    mode: str = DENSE
    """dense: every activation; exceedances: entries with |x| >= floor plus per-dim stats."""
    floor: float = 3.0
    """Smallest |x| kept in exceedances mode; analysis thresholds must be >= floor."""

    def __post_init__(self):
        is_dense(self.mode)


def is_dense(name: str) -> bool:
    """Whether a run of mode `name` holds every activation (dense tables), rather than only the
    entries with |x| >= its floor (exceedances and stats, so thresholds must be >= the floor);
    ConfigError naming the modes for any other name."""
    choice("storage.mode", name, list(MODES))
    return name == DENSE


_KEY = [("layer", pa.int32()), ("site", pa.string())]
_TOKEN = [("seq", pa.int64()), ("pos", pa.int32())]

SCHEMAS = {
    TOKENS: pa.schema([*_TOKEN, ("token_id", pa.int32())]),
    EXCEEDANCES: pa.schema([*_KEY, *_TOKEN, ("dim", pa.int32()), ("value", pa.float32())]),
    STATS: pa.schema([*_KEY, ("dim", pa.int32()), ("count", pa.int64()), ("max_abs", pa.float64()),
                      ("sum", pa.float64()), ("sum_sq", pa.float64())]),
    ROUTING: pa.schema([("layer", pa.int32()), *_TOKEN, ("rank", pa.int32()), ("expert", pa.int32()),
                        ("weight", pa.float32())]),
    EXPERTS: pa.schema([("layer", pa.int32()), ("expert", pa.int32()), ("tokens", pa.int64()),
                        ("max_abs", pa.float32()), ("dim", pa.int32()), *_TOKEN]),
    EXPERT_DIMS: pa.schema([("layer", pa.int32()), ("expert", pa.int32()), ("dim", pa.int32()),
                            ("count", pa.int64()), ("max_abs", pa.float32())]),
    HISTOGRAMS: pa.schema([("layer", pa.int32()), ("bin", pa.int32()), ("count", pa.int64())]),
}
"""Every stored table but the dense one, whose `act` width is the model's (`dense_schema`)."""


def dense_schema(hidden: int, values: pa.DataType) -> pa.Schema:
    """A dense table: the token columns and `act`, the hidden state of each real token."""
    return pa.schema([*SCHEMAS[TOKENS], ("act", pa.list_(values, hidden))])


def table(kind: str, **values) -> pa.Table:
    """A `kind` table from one array per column (numpy or Arrow), in the schema's order and types.

    A column missing or not in the schema is a bug of the caller: it fails here, not in a reader."""
    schema = SCHEMAS[kind]
    if set(values) != set(schema.names):
        raise ValueError(f"{kind} table: columns {sorted(values)}, schema has {schema.names}")
    return pa.table([_array(values[f.name], f.type) for f in schema], schema=schema)


def dense_table(tokens: pa.Table, values: np.ndarray) -> pa.Table:
    """A dense table: `tokens` (a TOKENS table, one row per real token, built once per
    micro-batch) and `act` from `values` # [rows, hidden]."""
    act = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    return tokens.append_column("act", act)


def _array(values, kind: pa.DataType) -> pa.Array:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values if values.type == kind else values.cast(kind)
    return pa.array(np.asarray(values), type=kind)
