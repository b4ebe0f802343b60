"""How many CPU cores this process may use, and whether it may start processes at all, for sizing
reader, writer, stitching and tracer pools."""

from __future__ import annotations

import multiprocessing
import os


def usable_cores() -> int:
    """Cores in this process's affinity mask (what a batch scheduler or ``taskset`` grants), or
    all of the machine's where the platform has no affinity (macOS, Windows); at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def may_start_processes() -> bool:
    """False in a daemonic process, which Python forbids to have children: a dask worker started
    without ``distributed.worker.daemon: False`` (an existing cluster's, say). Reader, stitching
    and tracing processes are then left out and that work runs in the process itself."""
    return not multiprocessing.current_process().daemon
