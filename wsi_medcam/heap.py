"""Handing freed heap memory back to the operating system between stages.

glibc keeps memory that Python and numpy freed inside its heap for reuse, and returns to the system
only what lies at the top of the heap: after a stage full of medium-sized temporaries (tissue
detection reads a slide's thumbnail in 1024² blocks) most of it stays counted against the process
even though nothing uses it. On a 100k² slide that was ~93 MiB for the rest of the run.
``malloc_trim(0)`` releases every free page, the remedy dask documents for the same "unmanaged
memory" in its workers. Elsewhere (macOS, Windows, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system; True where that was possible (glibc)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
