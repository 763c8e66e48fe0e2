"""Whether Ray is up in this process, asked without importing it.

Stages also run where Ray is not installed (the GPU bench machine, the local executor), and
the command line must not pay Ray's import for a run that never uses it.
"""

from __future__ import annotations

import sys


def ray_running() -> bool:
    """Whether this process has imported Ray and initialised it (never imports Ray)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()
