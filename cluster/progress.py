"""Extraction progress in the driver: committed micro-batches, tokens/s and ETA.

The progress line is the one thing written to the terminal directly, not through logging.
On a terminal it is redrawn in place; otherwise (`ray job logs`, CI, files) a plain line
is printed at most every `every_s` seconds and once at the end, so logs stay short and
readable. `quiet` shows nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Callable


def bar(fraction: float, width: int = 24) -> str:
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts committed micro-batches of this session (`tokens` maps index -> tokens); with
    several `replicas` (cluster.dispatch.Replica, which count their own committed tokens) the
    line ends with each one's tokens/s."""

    def __init__(self, tokens: dict[int, int], quiet: bool = False, stream=None,
                 every_s: float = 5.0, clock=time.perf_counter, replicas: list | None = None):
        self.tokens = tokens
        self.replicas = replicas or []
        self.total = sum(tokens.values())
        self.done = 0
        self.batches = 0
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self.every_s = every_s
        self.clock = clock
        self.started = clock()
        self.shown = -float("inf")
        # NOTE: in-place redraw only when we own a terminal; `ray job logs` gets plain lines.
        self.live = self.stream.isatty()

    def eta_s(self) -> float:
        """Seconds left at the rate so far (infinite before the first commit)."""
        rate = self.done / max(self.clock() - self.started, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else (0.0 if self.done >= self.total else float("inf"))

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        left = self.eta_s()
        eta = duration(left) if left != float("inf") else "?"
        fraction = self.done / self.total if self.total else 1.0
        line = (f"extract {bar(fraction)} {100 * fraction:5.1f}%  "
                f"{self.batches}/{len(self.tokens)} micro-batches  {self.done}/{self.total} tokens  "
                f"{rate:,.0f} tokens/s  ETA {eta}")
        if len(self.replicas) > 1:
            line += "  (" + " ".join(f"r{r.index} {r.tokens / elapsed:,.0f}" for r in self.replicas) + ")"
        return line

    def update(self, indices: list[int]) -> None:
        """Count newly committed micro-batches and show the line when due."""
        for index in indices:
            self.done += self.tokens.get(index, 0)
            self.batches += index in self.tokens
        finished = self.batches >= len(self.tokens)
        if self.quiet:
            return
        if self.live:
            self.stream.write("\r" + self.line() + ("\n" if finished else ""))
        elif finished or self.clock() - self.shown >= self.every_s:
            self.shown = self.clock()
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def wrap(self, on_commit: Callable[[list[int]], None]) -> Callable[[list[int]], None]:
        """`on_commit` followed by a progress update, for `drive`."""
        def commit(indices: list[int]) -> None:
            on_commit(indices)
            self.update(indices)
        return commit
