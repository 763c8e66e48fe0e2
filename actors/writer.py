"""Turn one micro-batch's captured activations into tables, per storage mode (common/storage.py,
which spells their columns): Arrow IPC files (dense), Parquet (the rest).

`prepare` runs on the stage's own thread, right after the layers (padding removal, encoding,
selection, statistics); `write` puts the prepared tables in files, on a thread of its own or
inline (actors/background.py).

Dense mode writes one table per micro-batch and layer-site (where: common.layout). Exceedance
mode writes, per micro-batch and stage (layers a..b), only the entries with |x| >= floor as
one long table, and statistics of every entry per (layer, site, dim) as another.

Padding positions are never written. Encoding of `act` is lossless:
float32 models store float32. bfloat16 models store float16 when every value of the
file survives bf16 -> fp16 -> bf16 unchanged (true for 2^-14 <= |x| <= 65504 and zero),
or all but a few below 2^-14, whose exact values the file's `patch` holds (common.patch);
otherwise float32 for that file (every bf16 value is exact in float32). Readers cast
to float32 and apply the patch; the encoding is also in the file's schema metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from actors.handoff import MicroBatch
from actors.capture import RESIDUAL
from actors.moe import moe_tables
from actors.select import BlockSelector, select_torch
from common import files, histogram, storage
from common.patch import KEY as PATCH, pack, patchable
from common.layout import RunLayout
from common.storage import EXCEEDANCES, HISTOGRAMS, STATS, TOKENS
from common.threshold import float32_bar


def valid_rows(acts: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The non-padding rows of `acts` # [batch, seq, hidden] -> [rows, hidden], on its device."""
    if bool(keep.all()):
        return acts.reshape(-1, acts.shape[-1])  # NOTE: a view: no copy when nothing is padding
    return acts[keep.to(acts.device)]


def encode(acts: torch.Tensor) -> tuple[np.ndarray, str, bytes | None]:
    """Numpy values for `acts` # [rows, hidden], the encoding's name, and the patch that makes
    them exact, if any (common.patch).

    For bfloat16, float16 is used when it holds every value exactly, or all but a few tiny ones
    (which the patch holds), float32 otherwise. The check goes through float32, where both
    conversions are single instructions (bf16 -> f32 is exact, f32 -> f16 rounds): 5x faster
    on the CPU than a bf16 <-> f16 round trip, and the same answer, since bf16 values that f16
    rounds never round back to themselves.
    """
    if acts.dtype != torch.bfloat16:
        return acts.cpu().numpy(), str(acts.dtype).removeprefix("torch."), None
    if acts.device.type == "cpu" and acts.numel() > CHUNK:
        return _encode_in_chunks(acts)
    wide = acts.float()  # exact
    narrow = wide.to(torch.float16)
    where = rounded(narrow, wide)
    if len(where) == 0:
        return narrow.cpu().numpy(), "float16", None
    exact = wide.reshape(-1)[torch.from_numpy(where).to(wide.device)].cpu().numpy()
    if patchable(exact, wide.numel()):
        return narrow.cpu().numpy(), "float16", pack(where, exact)
    return wide.cpu().numpy(), "float32", None


def rounded(narrow: torch.Tensor, wide: torch.Tensor) -> np.ndarray:
    """The flat indices where float16 `narrow` differs from float32 `wide` (NaN always does)."""
    if wide.device.type != "cpu":
        return rounded_on_device(narrow, wide)
    # NOTE: numpy's comparison is 3x torch's speed here; one pass, as most real sites differ somewhere
    return np.flatnonzero(narrow.float().numpy().reshape(-1) != wide.numpy().reshape(-1))


def rounded_on_device(narrow: torch.Tensor, wide: torch.Tensor) -> np.ndarray:
    """`rounded` with torch where the tensors live: only the indices cross to the host."""
    return (narrow.float() != wide).reshape(-1).nonzero().squeeze(1).cpu().numpy()


CHUNK = 1 << 17  # values per step of the CPU check: its float32 temporaries stay in the core's cache


def _encode_in_chunks(acts: torch.Tensor) -> tuple[np.ndarray, str, bytes | None]:
    """`encode` of a large CPU tensor, chunk by chunk: each chunk is widened, narrowed into
    the float16 result and widened back in two small buffers, so memory sees the bf16 values
    read once and the float16 ones written once. Whole-tensor float32 temporaries cost 2x at
    [2048, 2048] and 6x at 1M values (they page-fault afresh at every micro-batch); below one
    chunk the whole-tensor check is the faster. The first chunk whose rounded values no patch
    may hold ends the check: float32 for the whole tensor."""
    flat = acts.reshape(-1)
    narrow = torch.empty(flat.shape, dtype=torch.float16)
    wide, back = torch.empty(min(CHUNK, len(flat))), torch.empty(min(CHUNK, len(flat)))
    where, exact = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for start in range(0, len(flat), CHUNK):
        part, into = flat[start:start + CHUNK], narrow[start:start + CHUNK]
        there, again = wide[:len(part)], back[:len(part)]
        there.copy_(part)  # exact
        into.copy_(there)  # rounds
        again.copy_(into)  # exact
        found = np.flatnonzero(again.numpy() != there.numpy())  # NaN never equals itself
        if len(found) == 0:
            continue
        where.append(found + start)
        exact.append(there.numpy()[found])  # a copy: `there` is reused
        if not patchable(np.concatenate(exact), len(flat)):
            return acts.float().numpy(), "float32", None
    if len(where) == 1:
        return narrow.view(acts.shape).numpy(), "float16", None
    return narrow.view(acts.shape).numpy(), "float16", pack(np.concatenate(where), np.concatenate(exact))


def residual_histogram(captured: dict, keep: torch.Tensor) -> pa.Table | None:
    """layer, bin, count of |x| of the residual site over the real tokens (common.histogram)."""
    tables = []
    for (layer, site), acts in sorted(captured.items()):
        if site != RESIDUAL:
            continue
        magnitude = valid_rows(acts, keep).float().abs().contiguous()  # [rows, hidden]
        counts = torch.bincount((magnitude.view(torch.int32) >> histogram.SHIFT).reshape(-1),
                                minlength=histogram.BINS).cpu()
        (bins,) = counts.nonzero(as_tuple=True)
        tables.append(storage.table(HISTOGRAMS, layer=np.full(len(bins), layer), bin=bins.numpy(),
                                    count=counts[bins].numpy()))
    return pa.concat_tables(tables) if tables else None


@dataclass
class Piece:
    """One file of a micro-batch, ready to write: where, what, and as Arrow IPC or Parquet."""

    path: str
    table: pa.Table
    ipc: bool = False


class Tables:
    """A stage's tables, in two halves. `prepare` runs on the stage's thread and does every piece of tensor
    work (padding removal, encoding, selection, statistics) with torch, where the activations
    live; `write` only serializes finished tables, on the writer's own thread or inline
    (actors/background.py), so it takes little CPU beside the forward."""

    def __init__(self, output: str):
        self.layout = RunLayout.of(output)
        self.bytes_written = 0

    def capture_pieces(self, batch: MicroBatch, captured: dict, moe: list | None) -> list[Piece]:
        """The capture tables (routing, experts, residual histograms), one file per kind."""
        keep = batch.attention_mask.bool()
        tables = moe_tables(moe) if moe else {}
        if (residual := residual_histogram(captured, keep)) is not None:
            tables[HISTOGRAMS] = residual
        layers = _stage_layers(captured)
        return [Piece(self.layout.stage_table(kind, layers, batch.index), table) for kind, table in tables.items()]

    def write(self, pieces: list[Piece]) -> None:
        """Write every piece, in order (each atomically)."""
        for piece in pieces:
            write = files.write_ipc if piece.ipc else files.write_table
            self.bytes_written += write(self.layout.fs, piece.path, piece.table)

    @staticmethod
    def rehearse(pieces: list[Piece]) -> int:
        """Serialise every piece as `write` would, into nowhere; the bytes it would write."""
        size = 0
        for piece in pieces:
            out = pa.MockOutputStream()
            files.ipc_into(out, piece.table) if piece.ipc else pq.write_table(piece.table, out)
            size += out.size()
        return size


def _stage_layers(captured: dict) -> range:
    layers = [layer for layer, _ in captured]
    return range(min(layers), max(layers) + 1)


class DenseTables(Tables):
    """The dense activation tables of one stage's micro-batches: one Arrow IPC file per
    layer-site (written at memory speed: the act column is one buffer of raw values)."""

    def prepare(self, batch: MicroBatch, captured: dict[tuple[int, str], torch.Tensor],
                moe: list | None = None) -> list[Piece]:
        keep = batch.attention_mask.bool().cpu()  # [batch, seq]
        rows, pos = keep.nonzero(as_tuple=True)
        tokens = storage.table(TOKENS, seq=np.asarray(batch.seqs, dtype=np.int64)[rows.numpy()], pos=pos.numpy(),
                               token_id=batch.input_ids.cpu()[keep].numpy())
        pieces = self.capture_pieces(batch, captured, moe)
        for (layer, site), acts in sorted(captured.items()):
            # NOTE: padding is dropped on the device, so only real tokens cross to the host.
            values, encoding, patch = encode(valid_rows(acts, keep))  # [rows, hidden]
            metadata = {"encoding": encoding, "model_dtype": str(acts.dtype).removeprefix("torch.")}
            table = storage.dense_table(tokens, values).replace_schema_metadata(
                metadata if patch is None else {**metadata, PATCH: patch})
            pieces.append(Piece(self.layout.dense(layer, site, batch.index), table, ipc=True))
        return pieces


class ExceedanceTables(Tables):
    """Writes, per micro-batch, the entries with |x| >= floor of every layer-site of the stage
    as one long table, and per-(layer, site, dim) statistics of all entries as another.

    One file of each per micro-batch, not per layer-site: the kept entries of one layer-site
    are a few KB, and 2 x 96 such files per micro-batch would cost more to create, list and
    open than to fill. The selection and the statistics are computed where the activations
    live (the GPU when there is one), so only the kept entries and the stats cross to the host.
    """

    CHUNK = 1 << 24  # float32 elements selected at once (64 MiB): bounds the device memory used

    def __init__(self, output: str, floor: float):
        super().__init__(output)
        self.bar = float(float32_bar(floor))
        self.selector = BlockSelector(self.bar)

    def prepare(self, batch: MicroBatch, captured: dict[tuple[int, str], torch.Tensor],
                moe: list | None = None) -> list[Piece]:
        keep = batch.attention_mask.bool().cpu()  # [batch, seq]
        rows, pos = keep.nonzero(as_tuple=True)
        seq = torch.as_tensor(batch.seqs, dtype=torch.int64)[rows]  # [tokens]
        keys = sorted(captured)
        kept, stats = [], []
        for group in chunks(keys, self.CHUNK // max(1, captured[keys[0]].numel())):
            part_kept, part_stats = self.select([valid_rows(captured[k], keep) for k in group])
            kept.append(_tagged(part_kept, group, seq, pos))
            stats.append(_tagged_stats(part_stats, group))
        layers = _stage_layers(captured)
        # NOTE: stats last: a stats file is what marks the micro-batch's layer-sites as present.
        return [*self.capture_pieces(batch, captured, moe),
                Piece(self.layout.stage_table(EXCEEDANCES, layers, batch.index), pa.concat_tables(kept)),
                Piece(self.layout.stage_table(STATS, layers, batch.index), pa.concat_tables(stats))]

    def select(self, sites: list[torch.Tensor]) -> tuple[tuple, dict]:
        """Entries >= floor as (site, token, dim, value), and per-(site, dim) stats of
        `sites` # sites x [rows, hidden]; every array on the host (actors.select)."""
        if sites[0].device.type != "cpu":
            return select_torch(torch.stack(sites).float(), self.bar)
        return self.selector(sites)


def chunks(keys: list, size: int) -> list[list]:
    """`keys` in consecutive groups of at most `size` (at least 1)."""
    size = max(1, size)
    return [keys[i:i + size] for i in range(0, len(keys), size)]


def _key_columns(group: list[tuple[int, str]], index: np.ndarray) -> dict:
    """layer and site columns for rows that belong to `group[index]`."""
    layers = np.array([layer for layer, _ in group], dtype=np.int32)
    sites = pa.array([site for _, site in group], pa.string())
    return {"layer": layers[index], "site": sites.take(pa.array(index))}


def _tagged(kept: tuple, group: list, seq: torch.Tensor, pos: torch.Tensor) -> pa.Table:
    """The long table (layer, site, seq, pos, dim, value) of one group's kept entries."""
    site, token, dim, value = kept
    return storage.table(EXCEEDANCES, **_key_columns(group, site.numpy()), seq=seq[token].numpy(),
                         pos=pos[token].numpy(), dim=dim.numpy(), value=value.numpy())


def _tagged_stats(stats: dict, group: list) -> pa.Table:
    """(layer, site, dim, count, max_abs, sum, sum_sq): one row per layer-site and dim."""
    sites, hidden = stats["count"].shape
    return storage.table(STATS, **_key_columns(group, np.repeat(np.arange(sites), hidden)),
                         dim=np.tile(np.arange(hidden, dtype=np.int32), sites),
                         **{k: v.reshape(-1) for k, v in stats.items()})


def tables_for(output: str, mode: str, floor: float) -> Tables:
    """The tables of `storage.mode`: dense activations, or exceedances plus stats."""
    return DenseTables(output) if storage.is_dense(mode) else ExceedanceTables(output, floor)
