"""A stage's writer on its own thread: the stage prepares each micro-batch's tables, this
thread writes them, and the stage learns which micro-batches are fully written."""

from __future__ import annotations

import queue
import threading
import time

from actors.batch import MicroBatch


class BackgroundWriter:
    """Runs a writer on its own thread behind a bounded queue.

    `submit` blocks when `depth` micro-batches are waiting (back-pressure, so a slow
    disk slows the pipeline instead of filling memory). A micro-batch is reported by
    `committed()` only once all of its files are in place; a writer failure is raised
    on the next call from the stage.
    """

    def __init__(self, writer, depth: int = 2):
        self.writer = writer
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
                    self.writer.write(pieces)
                    self.write_s += time.perf_counter() - start
                    with self._lock:
                        self._done.append(index)
            except BaseException as err:  # surfaced to the stage by _raise_if_failed
                self._error = err
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"activation writer failed: {self._error!r}") from self._error

    def submit(self, batch: MicroBatch, captured: dict, moe: list | None = None) -> None:
        """Prepare the micro-batch's tables here (the caller's thread), then queue them."""
        self._raise_if_failed()
        start = time.perf_counter()
        pieces = self.writer.prepare(batch, captured, moe)
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
