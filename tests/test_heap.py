"""Memory hygiene: freed heap goes back to the system (glibc), and forked readers keep sharing the
parent's pages."""

from __future__ import annotations

import gc

import psutil
import pytest

from wsi_medcam.batching import shared_with_readers
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


def test_objects_are_kept_from_the_collector_only_while_readers_run():
    before = gc.get_freeze_count()
    with shared_with_readers():
        assert gc.get_freeze_count() > before  # the models, modules and config exist: all frozen
        cycle: list = []
        cycle.append(cycle)  # new objects are still collected
        del cycle
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0
