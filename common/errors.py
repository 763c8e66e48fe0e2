"""One family of user errors: input a user can fix, reported in one line with exit status 2.

Every command line maps `UserError` to `error: <message>` on stderr and exit 2, and lets
anything else end in a traceback and exit 1: a traceback always means a bug of ours.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A problem with the user's input; the message names it and the fix, in one line."""


class ConfigError(UserError, ValueError):
    """A configuration value or key that cannot be used."""


class ModelError(UserError, ValueError):
    """A checkpoint (or model family) that cannot be used."""


class DataError(UserError, ValueError):
    """A text source that cannot be read or holds too little text."""


class ClusterError(UserError, RuntimeError):
    """The Ray cluster cannot host the run."""


class RunError(UserError, RuntimeError):
    """A run that cannot start, go on, be resumed or be analysed."""


def report(err: UserError) -> int:
    """Print `err` as the one line a user sees; returns exit status 2."""
    message = " ".join(str(err).split("\n")) or type(err).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2
