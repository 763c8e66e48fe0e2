"""Turn one micro-batch's captured activations into Parquet tables, off the critical path.

Layout (hive-partitioned, one file per micro-batch and layer-site):
    RUN/activations/layer=<L>/site=<S>/mb-<index>.parquet
    columns: seq int64, pos int32, token_id int32, act fixed_size_list<float>[hidden]

Padding positions are never written. Encoding of `act` is lossless:
float32 models store float32. bfloat16 models store float16 when every value of the
file survives bf16 -> fp16 -> bf16 unchanged (true for 2^-14 <= |x| <= 65504 and zero),
otherwise float32 for that file (every bf16 value is exact in float32). Readers cast
to float32; the encoding is also in the file's schema metadata.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from actors import storage


@dataclass
class MicroBatch:
    """What travels from stage to stage: token metadata plus the hidden states."""

    index: int                   # micro-batch number, the unit of commit
    seqs: list[int]              # global sequence index of each row
    input_ids: torch.Tensor      # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq] 1 = token, 0 = padding
    hidden: torch.Tensor | None = None  # [batch, seq, hidden]; None before stage 0


def part_path(root: str, layer: int, site: str, index: int) -> str:
    return f"{root}/activations/layer={layer}/site={site}/mb-{index:06d}.parquet"


def encode(acts: torch.Tensor) -> tuple[np.ndarray, str]:
    """Lossless numpy values for `acts` # [rows, hidden], and the encoding's name."""
    if acts.dtype == torch.bfloat16:
        wide = acts.float().numpy()
        with np.errstate(over="ignore"):  # overflow shows up as a mismatch below
            narrow = wide.astype(np.float16)
        if np.array_equal(narrow.astype(np.float32), wide):
            return narrow, "float16"
        return wide, "float32"
    return acts.numpy(), str(acts.dtype).removeprefix("torch.")


class ActivationWriter:
    """Writes the dense activation tables of one stage's micro-batches."""

    def __init__(self, output: str):
        self.fs, self.root = storage.resolve(output)
        self.bytes_written = 0

    def write(self, batch: MicroBatch, captured: dict[tuple[int, str], torch.Tensor]) -> None:
        keep = batch.attention_mask.bool().cpu()  # [batch, seq]
        rows, pos = keep.nonzero(as_tuple=True)
        columns = {
            "seq": pa.array(np.asarray(batch.seqs, dtype=np.int64)[rows.numpy()]),
            "pos": pa.array(pos.numpy().astype(np.int32)),
            "token_id": pa.array(batch.input_ids.cpu()[keep].numpy().astype(np.int32)),
        }
        for (layer, site), acts in sorted(captured.items()):
            values, encoding = encode(acts.cpu()[keep])  # [rows, hidden]
            act = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
            table = pa.table({**columns, "act": act}).replace_schema_metadata(
                {"encoding": encoding, "model_dtype": str(acts.dtype).removeprefix("torch.")}
            )
            path = part_path(self.root, layer, site, batch.index)
            self.bytes_written += storage.write_table(self.fs, path, table)


class BackgroundWriter:
    """Runs a writer on its own thread behind a bounded queue.

    `submit` blocks when `depth` micro-batches are waiting (back-pressure, so a slow
    disk slows the pipeline instead of filling memory). A micro-batch is reported by
    `committed()` only once all of its files are in place; a writer failure is raised
    on the next call from the stage.
    """

    def __init__(self, writer: ActivationWriter, depth: int = 2):
        self.writer = writer
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._done: list[int] = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="activation-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            batch, captured = job
            try:
                if self._error is None:
                    self.writer.write(batch, captured)
                    with self._lock:
                        self._done.append(batch.index)
            except BaseException as err:  # surfaced to the stage by _raise_if_failed
                self._error = err
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"activation writer failed: {self._error!r}") from self._error

    def submit(self, batch: MicroBatch, captured: dict) -> None:
        self._raise_if_failed()
        self._jobs.put((batch, captured))

    def committed(self) -> list[int]:
        """Micro-batches fully written since the last call."""
        self._raise_if_failed()
        with self._lock:
            done, self._done = self._done, []
        return done

    def flush(self) -> list[int]:
        """Wait for every submitted micro-batch; return those not yet reported."""
        self._jobs.join()
        return self.committed()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
