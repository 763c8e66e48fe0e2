"""Stage metrics for the Ray dashboard and Prometheus, through `ray.util.metrics`.

Exported by every node's metrics agent as (Prometheus names, `ray_` prefixed):

    ray_moe_outliers_tokens_total              tokens run through the stage's layers
    ray_moe_outliers_micro_batches_total       micro-batches whose files the stage has written
    ray_moe_outliers_bytes_written_total       table bytes the stage's writer has written
    ray_moe_outliers_busy_seconds_total        seconds spent in `forward`, of which
    ray_moe_outliers_layers_seconds_total        running the layers
    ray_moe_outliers_tables_seconds_total        preparing the tables
    ray_moe_outliers_write_seconds_total       seconds spent writing files (writer thread, or inline)
    ray_moe_outliers_write_queue_depth         micro-batches waiting for the writer (gauge)

each tagged `stage="r<k>/stage-<i> [layers a-b]"`, the actor's name in the dashboard, and
`replica="<k>"`, so `sum by (replica)` gives each pipeline's rate.
Without Ray (in-process tests, the GPU bench machine) every call is a no-op, and
Ray is never imported from here.
"""

from __future__ import annotations

from common.runtime import ray_running

PREFIX = "moe_outliers_"


# counter: the key of its running total in StageActor.stats
TOTALS = {"bytes_written": "bytes_written", "busy_seconds": "busy_s", "layers_seconds": "layers_s",
          "tables_seconds": "tables_s", "write_seconds": "write_s"}


class StageMetrics:
    """Counters of one stage; `observe` after each forward updates them."""

    def __init__(self, stage: str, replica: int = 0):
        self.stage = stage
        self.replica = str(replica)
        self.metrics = _make() if ray_running() else None
        self._totals = dict.fromkeys(TOTALS, 0)

    def observe(self, tokens: int, written: int, stats: dict, queue_depth: int) -> None:
        """Add one forward's tokens and micro-batches written; of the stage's running totals
        (`StageActor.stats`), the counters add what is new."""
        if self.metrics is None:
            return
        tags = {"stage": self.stage, "replica": self.replica}
        totals = {name: stats[key] for name, key in TOTALS.items()}
        counters = {"tokens": tokens, "micro_batches": written,
                    **{name: totals[name] - self._totals[name] for name in TOTALS}}
        for name, value in counters.items():
            if value > 0:  # Counter.inc rejects non-positive values
                self.metrics[name].inc(value, tags=tags)
        self._totals = totals
        self.metrics["write_queue_depth"].set(queue_depth, tags=tags)


def _make() -> dict:
    from ray.util.metrics import Counter, Gauge

    keys = ("stage", "replica")
    return {
        "tokens": Counter(PREFIX + "tokens", "Tokens run through the stage's layers.", tag_keys=keys),
        "micro_batches": Counter(PREFIX + "micro_batches",
                                 "Micro-batches whose activation files the stage has written.",
                                 tag_keys=keys),
        "bytes_written": Counter(PREFIX + "bytes_written", "Table bytes written by the stage.",
                                 tag_keys=keys),
        "busy_seconds": Counter(PREFIX + "busy_seconds", "Seconds the stage spent in forward.",
                                tag_keys=keys),
        "layers_seconds": Counter(PREFIX + "layers_seconds", "Seconds of forward spent running the layers.",
                                  tag_keys=keys),
        "tables_seconds": Counter(PREFIX + "tables_seconds", "Seconds of forward spent preparing tables.",
                                  tag_keys=keys),
        "write_seconds": Counter(PREFIX + "write_seconds", "Seconds the stage's writer spent writing files.",
                                 tag_keys=keys),
        "write_queue_depth": Gauge(PREFIX + "write_queue_depth",
                                   "Micro-batches waiting for the stage's writer.", tag_keys=keys),
    }
