"""Fault injection for the reliability tests: real faults, triggered by an environment variable.

`MOE_OUTLIERS_FAULTS` names a JSON file (re-read before every micro-batch, so a test
can arm and disarm faults while a run goes on) holding a list of faults, each
`{"kind": "kill" | "oom" | "delay" | "disk", "stage": i, "batch": m, "once": "/path/marker", ...}`
(with `"replica": r`, only that replica's stage i; without it, stage i of every replica):
  - kill: the stage's worker process sends itself SIGKILL before running micro-batch m (without
    `batch`: the first micro-batch it gets);
  - oom: running more than `max_rows` sequences at once raises torch.OutOfMemoryError;
  - delay: sleep `seconds` before every micro-batch (with `batch`: before micro-batch m only), to
    widen the window for a driver kill;
  - disk: writing micro-batch m's files fails as a full disk does (every stage; no `stage`).
`once` makes a fault fire a single time across restarts (it creates the marker file).
Unset, nothing here does anything.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time

import torch

ENV = "MOE_OUTLIERS_FAULTS"


def _faults(stage: int | None, replica: int = 0) -> list[dict]:
    """The armed faults of `stage` of `replica` (stage None: those for every stage)."""
    path = os.environ.get(ENV)
    if not path:
        return []
    with open(path) as f:
        return [fault for fault in json.load(f)
                if fault.get("stage", stage) == stage and fault.get("replica", replica) == replica]


def _claim(fault: dict) -> bool:
    """True if this fault may fire now (and, for `once`, marks it fired)."""
    marker = fault.get("once")
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def before_batch(stage: int, batch: int, replica: int = 0) -> None:
    for fault in _faults(stage, replica):
        if fault["kind"] == "delay" and fault.get("batch", batch) == batch and _claim(fault):
            time.sleep(fault["seconds"])
        elif fault["kind"] == "kill" and fault.get("batch", batch) == batch and _claim(fault):
            os.kill(os.getpid(), signal.SIGKILL)


def before_layers(stage: int, rows: int) -> None:
    for fault in _faults(stage):
        if fault["kind"] == "oom" and rows > fault.get("max_rows", 1) and _claim(fault):
            raise torch.OutOfMemoryError(f"injected: {rows} rows > {fault.get('max_rows', 1)}")


def before_write(batch: int) -> None:
    for fault in _faults(None):
        if fault["kind"] == "disk" and fault.get("batch") == batch and _claim(fault):
            raise OSError(errno.ENOSPC, "injected: no space left on device")
