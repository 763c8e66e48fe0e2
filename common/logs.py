"""Logging: every module logs through `logging.getLogger(__name__)`; this sets where it goes.

Command lines call `configure(level, quiet)` once. A stage actor calls `for_stage(name)` in
its own worker process, so every record it logs carries the stage's name into Ray's worker
log (and, with `log_to_driver`, the driver's output). The progress line is the one thing
written to the terminal directly (cluster/progress.py).
"""

from __future__ import annotations

import logging
import sys

LEVELS = ("debug", "info", "warning", "error")
PACKAGES = ("actors", "analysis", "cluster", "common", "bench")


class _Plain(logging.Formatter):
    """Info as the plain message; other levels prefixed with theirs (`warning: ...`)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"


def add_flags(parser) -> None:
    """--log-level and --quiet, for every command line."""
    parser.add_argument("--log-level", choices=LEVELS, default="info", help="least level of messages shown")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only, no progress line")


def configure(level: str = "info", quiet: bool = False) -> None:
    """This project's records at `level` and above: information to stdout, beside the command's
    output; warnings and errors to stderr (`quiet`: only those)."""
    level = "warning" if quiet else level
    chatter = logging.StreamHandler(sys.stdout)
    chatter.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    for handler in (chatter, problems):
        handler.setFormatter(_Plain("%(message)s"))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers[:] = [chatter, problems]
        logger.setLevel(level.upper())
        logger.propagate = False


def for_stage(name: str, level: str = "info") -> None:
    """In a stage's worker process: records carry the stage's name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{name}: %(levelname)s %(name)s: %(message)s"))
    for package in ("actors", "common"):
        logger = logging.getLogger(package)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
