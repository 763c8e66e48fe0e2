"""Where a stage's files are written (`pipeline.writer`): the stage prepares each micro-batch's
tables (actors/writer.py), a runner writes them, and the stage learns which micro-batches are
fully written.

- `ThreadRunner`: on a thread of its own, beside the layers. For a GPU stage, whose layers
  leave the CPU free, and for object stores, whose uploads mostly wait on the network.
- `InlineRunner`: on the stage's thread, before `forward` returns. For a CPU stage writing to
  its own disk: its torch threads already use every core the stage was given, and a writer
  thread beside them slows the layers by more than the files cost (bench/RESULTS.md).
"""

from __future__ import annotations

import queue
import threading
import time

from actors import faults
from actors.handoff import MicroBatch
from common.errors import RunError, UserError


WRITE_DEPTH = 2  # micro-batches prepared and waiting for the writes, by default (`pipeline.write_depth`)


class WriteError(RunError):
    """A micro-batch's files could not be written; committed micro-batches stay valid."""


def write_pieces(tables, index: int, pieces: list) -> None:
    """Write micro-batch `index`'s `pieces`; a failure of the disk or store as a WriteError
    that says which micro-batch and what to do, anything else (a bug) as it is."""
    try:
        faults.before_write(index)
        tables.write(pieces)
    except (UserError, OSError) as err:  # common.files says which file and why, as a RunError
        raise WriteError(f"could not write the tables of micro-batch {index}: {str(err).rstrip('.')}. Committed "
                         "micro-batches are kept: rerun with --resume once the output has room (or is writable).") from err


class ThreadRunner:
    """Writes `tables`' pieces on a thread of its own, behind a bounded queue.

    `submit` blocks when `depth` micro-batches are waiting (back-pressure, so a slow
    disk slows the pipeline instead of filling memory). A micro-batch is reported by
    `committed()` only once all of its files are in place; a writer failure is raised
    on the next call from the stage.
    """

    def __init__(self, tables, depth: int):
        self.tables = tables
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._done: list[int] = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        # Seconds, for the stage's profile: tables prepared (the caller's thread), waiting for
        # room in the queue (the caller's), writing files (this thread).
        self.prepare_s = self.wait_s = self.write_s = 0.0
        self._thread = threading.Thread(target=self._run, name="activation-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            index, pieces = job
            try:
                if self._error is None:
                    start = time.perf_counter()
                    write_pieces(self.tables, index, pieces)
                    self.write_s += time.perf_counter() - start
                    with self._lock:
                        self._done.append(index)
            except BaseException as err:  # surfaced to the stage by _raise_if_failed
                self._error = err
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def _raise_if_failed(self) -> None:
        if isinstance(self._error, UserError):
            raise self._error
        if self._error is not None:
            raise RuntimeError(f"activation writer failed: {self._error!r}") from self._error

    def submit(self, batch: MicroBatch, captured: dict, moe: list | None = None) -> None:
        """Prepare the micro-batch's tables here (the caller's thread), then queue them."""
        self._raise_if_failed()
        start = time.perf_counter()
        pieces = self.tables.prepare(batch, captured, moe)
        prepared = time.perf_counter()
        self._jobs.put((batch.index, pieces))
        self.prepare_s += prepared - start
        self.wait_s += time.perf_counter() - prepared

    def depth(self) -> int:
        """Micro-batches waiting for the writer."""
        return self._jobs.qsize()

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


class InlineRunner:
    """Writes on the caller's thread: `submit` prepares and writes a micro-batch's files
    before it returns, so the stage's time waiting for the writes is its files' time."""

    def __init__(self, tables):
        self.tables = tables
        self._done: list[int] = []
        self.prepare_s = self.wait_s = self.write_s = 0.0

    def submit(self, batch: MicroBatch, captured: dict, moe: list | None = None) -> None:
        start = time.perf_counter()
        pieces = self.tables.prepare(batch, captured, moe)
        prepared = time.perf_counter()
        write_pieces(self.tables, batch.index, pieces)
        written = time.perf_counter() - prepared
        self.prepare_s += prepared - start
        self.wait_s += written
        self.write_s += written
        self._done.append(batch.index)

    def depth(self) -> int:
        return 0

    def committed(self) -> list[int]:
        done, self._done = self._done, []
        return done

    def flush(self) -> list[int]:
        return self.committed()

    def close(self) -> None:
        pass
