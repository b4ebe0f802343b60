"""Freed heap memory goes back to the system between stages (glibc)."""

from __future__ import annotations

import psutil
import pytest

from wsi_medcam.heap import release_freed_memory


@pytest.mark.skipif(not release_freed_memory(), reason="malloc_trim is glibc's")
def test_freed_heap_below_a_live_block_is_returned():
    proc = psutil.Process()
    blocks = [bytearray(64 * 1024) for _ in range(3000)]  # ~190 MiB of heap (under the mmap threshold)
    keep = bytearray(64 * 1024)  # above them: glibc's own trimming of the heap top cannot reach them
    del blocks
    held = proc.memory_info().rss
    assert release_freed_memory()
    assert held - proc.memory_info().rss > 100 * 2**20
    del keep
