"""How many CPU cores this process may use, for sizing reader, writer and tracer pools."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores in this process's affinity mask (what a batch scheduler or ``taskset`` grants), or
    all of the machine's where the platform has no affinity (macOS, Windows); at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
