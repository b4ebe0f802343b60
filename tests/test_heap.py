"""Memory hygiene: freed heap goes back to the system (glibc), threads share one arena on a CPU,
and forked readers keep sharing the parent's pages without inheriting what it was about to free."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
from PIL import Image

from wsi_medcam.batching import shared_with_readers
from wsi_medcam.heap import release_freed_memory, resident_bytes
from wsi_medcam.pipeline import _write_thumbnails


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


@pytest.mark.skipif(resident_bytes() is None, reason="/proc/self/statm is Linux's")
def test_resident_bytes_follow_the_pages_touched():
    before = resident_bytes()
    assert before == pytest.approx(psutil.Process().memory_info().rss, rel=0.05)
    block = np.ones(64 << 20, np.uint8)  # 64 MiB, every page touched
    assert resident_bytes() - before > 60 << 20
    del block


def test_objects_are_kept_from_the_collector_only_while_readers_run():
    before = gc.get_freeze_count()
    with shared_with_readers():
        assert gc.get_freeze_count() > before  # the models, modules and config exist: all frozen
        cycle: list = []
        cycle.append(cycle)  # new objects are still collected
        del cycle
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0


_ARENA_PROBE = """
import sys, threading, psutil
from wsi_medcam.heap import use_one_arena
if sys.argv[1] == "one":
    assert use_one_arena()
kept, a_done, b_done = [], threading.Event(), threading.Event()
def a():  # frees ~100 MiB of malloc'd blocks and stays alive, holding the block above them
    blocks = [bytearray(64 * 1024) for _ in range(1600)]
    kept.append(bytearray(64 * 1024))
    del blocks
    a_done.set()
    b_done.wait()
def b():
    kept.append([bytearray(64 * 1024) for _ in range(1600)])
ta = threading.Thread(target=a); ta.start(); a_done.wait()
before = psutil.Process().memory_info().rss
tb = threading.Thread(target=b); tb.start(); tb.join()
print((psutil.Process().memory_info().rss - before) / 2**20)
b_done.set(); ta.join()
"""


@pytest.mark.skipif(not release_freed_memory(), reason="malloc arenas are glibc's")
def test_threads_reuse_what_other_threads_freed_with_one_arena():
    grown = {mode: float(subprocess.run([sys.executable, "-c", _ARENA_PROBE, mode], capture_output=True, text=True,
                                        check=True).stdout) for mode in ("default", "one")}
    assert grown["default"] > 80  # a thread of its own arena: its 100 MiB come fresh from the system
    assert grown["one"] < 30  # the same arena: the other thread's freed blocks are reused


def test_thumbnails_are_freed_once_written(tmp_path):
    # the pipeline waits for this write before the readers fork: whatever it still holds then
    # stays in the readers' pages for the whole slide
    images = [np.full((300, 400, 3), 200, np.uint8), np.zeros((300, 400), bool)]
    alive = [weakref.ref(a) for a in images]
    with ThreadPoolExecutor(1) as pool:
        written = pool.submit(_write_thumbnails, tmp_path, images)
        del images
        written.result()
        assert [ref() is None for ref in alive] == [True, True]
    assert Image.open(tmp_path / "thumbnail.png").size == (400, 300)
    assert Image.open(tmp_path / "tissue.png").getextrema() == (0, 0)


def test_thumbnails_handed_to_their_process_are_not_kept_here(tmp_path):
    """With stitching processes, the thumbnails are written by a process of their own while tiles
    stream: once started, it must hold the only copy (the readers fork right after)."""
    from wsi_medcam.export.overview import write_thumbnails
    from wsi_medcam.stitch_processes import start_process

    thumbnail, mask = np.full((300, 400, 3), 200, np.uint8), np.ones((300, 400), bool)
    alive = [weakref.ref(thumbnail), weakref.ref(mask)]
    proc = start_process(write_thumbnails, (tmp_path, thumbnail, mask), name="thumbnails-test")
    del thumbnail, mask
    assert [ref() is None for ref in alive] == [True, True]
    proc.join(60)
    assert proc.exitcode == 0
    assert Image.open(tmp_path / "thumbnail.png").size == (400, 300)
    assert Image.open(tmp_path / "tissue.png").getextrema() == (255, 255)
