"""Tiles as a torch Dataset, fed to the models by a prefetching DataLoader.

The dataset keeps a :class:`SlideRef` (path, backend, µm/px) and opens its own handle lazily in
each worker process, so no slide handle is ever pickled or shared across processes (a tiffslide
handle inherited by forked workers yields corrupt JPEG reads).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .slide import Slide, SlideRef
from .tiling import TileGrid

log = logging.getLogger(__name__)


class TileDataset(Dataset):
    """Item ``k`` is (uint8 tensor 3×H×W at the grid's µm/px, tile index ``order[k]``), in grid order
    unless ``order`` says otherwise (the stitcher's). Normalisation happens on the device.

    Tiles come with channels-last strides (the pixels stay as decoded, RGB per pixel): the models
    run channels-last, so no reader or device spends a copy on transposing them.

    Batches are read whole (:meth:`__getitems__`, one buffer per batch), which torch's default
    collation cannot take apart: load with :func:`make_loader`, or give a ``DataLoader`` the
    collation ``collate_fn=lambda batch: batch``. ``slide`` may be an open :class:`Slide` (only its
    path, backend and µm/px are kept) or a :class:`SlideRef`; the dataset opens its own handle in
    each process that reads, closed by :meth:`close` (or when the dataset is collected).
    """

    def __init__(self, slide: Slide | SlideRef, grid: TileGrid, *, tolerance: float = 0.02,
                 order: np.ndarray | None = None):
        if not isinstance(slide, (Slide, SlideRef)):
            raise TypeError(f"expected a Slide or SlideRef, got {type(slide).__name__}")
        self.ref = SlideRef.of(slide) if isinstance(slide, Slide) else slide
        self.grid = grid
        self.tolerance = tolerance
        self.order = order
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return len(self.grid)

    def close(self) -> None:
        """Close this process's handle on the slide (reading again reopens it)."""
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slide"] = None
        return state

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        i = self._index(k)
        return torch.from_numpy(self._read(i)).permute(2, 0, 1), i

    def __getitems__(self, ks: list[int]) -> tuple[torch.Tensor, np.ndarray]:
        """Items ``ks`` as one batch: (tiles B×3×H×W, tile indices B as numpy, which travel inside the
        batch's message rather than as a second shared-memory tensor), the tiles read straight into
        one buffer, which in a reader process is already the shared memory the batch reaches the
        model process through. Per tile that saves the transpose and the collation's copy: a
        reader's CPU time per tile went 0.81 → 0.75 ms (2-core VM, batches of 256 at 0.5 µm/px; 0.69
        with the slide's geometry cached as well)."""
        indices = np.fromiter((self._index(k) for k in ks), np.int64, len(ks))
        tiles = batch_buffer(len(ks), self.grid.tile_size)
        for slot, i in zip(tiles.numpy(), indices.tolist()):
            slot[...] = self._read(i)
        return tiles.permute(0, 3, 1, 2), indices

    def _index(self, k: int) -> int:
        return int(self.order[k]) if self.order is not None else k

    def _read(self, i: int) -> np.ndarray:
        """Tile ``i`` as H×W×3 uint8 RGB."""
        if self._slide is None:
            self._slide = self.ref.open()
        return self._slide.read_region_at(self.grid.xy_level0(i), self.grid.tile_size, self.grid.mpp,
                                          tolerance=self.tolerance)


def batch_buffer(count: int, tile_size: int) -> torch.Tensor:
    """Uninitialised uint8 tiles, ``count`` × ``tile_size`` × ``tile_size`` × 3 (RGB per pixel): in a
    reader process in shared memory, as torch's own collation allocates it there."""
    nbytes = count * tile_size * tile_size * 3
    storage = torch.UntypedStorage._new_shared(nbytes) if get_worker_info() is not None else torch.UntypedStorage(nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(count, tile_size, tile_size, 3)


def _as_read(batch: tuple[torch.Tensor, np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
    """The loader's collation: :meth:`TileDataset.__getitems__` gives whole batches."""
    return batch


def _start_reader(parent: int, share_by_name: bool, _worker: int) -> None:
    """First thing in a reader process: leave at once if ``parent`` (the process that started it)
    is gone, else set how batches are shared.

    torch's readers notice a parent that dies *after* they start (they compare the parent's pid with
    the one they saw at start). One whose parent dies while it starts saw init's pid instead, and
    waited for work for good: readers started by spawn (dask's workers start them so) import torch
    for seconds, and a worker closed then (Ctrl-C on ``run --dask local``) left them behind.

    ``share_by_name``: share batches through named shared memory (torch's ``file_system`` strategy)
    rather than by passing a file descriptor. The model process then maps a batch by its name. By
    descriptor, it fetched each one over a socket from the reader, an authenticated handshake of
    several round trips, each of which must win back the GIL from the model and stitching threads:
    with another thread busy in Python, one reader's batches of 256 arrived at 10.6 per second, by
    name at 29-30 (2-core VM, batches read in 20 ms)."""
    if os.getppid() != parent:
        os._exit(0)
    if share_by_name:
        torch.multiprocessing.set_sharing_strategy("file_system")


def start_shared_memory_manager() -> bool:
    """Start torch's shared-memory manager (``torch_shm_manager``, which removes named shared memory
    when its last user is gone) from this process, so the readers forked later use it: each reader
    that starts its own waits ~0.2 s for it before its first batch. False where it cannot start
    (a torch without it): readers then keep sharing by descriptor."""
    try:
        torch.UntypedStorage._new_using_filename_cpu(1)
    except (RuntimeError, AttributeError) as exc:
        log.warning("torch's shared-memory manager did not start (%s): readers hand batches over by file descriptor", exc)
        return False
    return True


PREFETCH_BATCHES = 4
"""Batches each reader process reads ahead (the DataLoader's ``prefetch_factor``)."""


def reserve_pinned_batches(count: int, nbytes: int) -> None:
    """Have torch's pinned host allocator hold ``count`` blocks for batches of ``nbytes`` from now on.

    On CUDA the loader's pin-memory thread copies every batch into page-locked memory, so that it
    reaches the GPU asynchronously. The allocator keeps freed blocks for reuse, but each block it
    has to make costs far more than the copy: on an H200 machine the first 38.5 MB block (a batch
    of 256 tiles at 224 px) took 145–202 ms, each further one 28–80 ms, one reused 0.004 ms. A slide's
    first batches all need new ones (the loader holds up to ``workers`` × :data:`PREFETCH_BATCHES`
    pinned batches, the models a few more), about 1.1 s of the pin-memory thread's time that the
    GPU waited for in the first seconds. Made here, once per process, they are reused by every slide.
    """
    blocks = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
    del blocks  # back to the allocator's cache, not to the system


def make_loader(dataset: Dataset, *, batch_size: int, workers: int, pin_memory: bool = False,
                share_by_name: bool = False) -> DataLoader:
    """Batches in the dataset's order (the stitcher's: it streams strip by strip, row by row), read
    ahead by ``workers`` processes. With ``share_by_name`` they reach this process by the name of
    their shared memory (see :func:`_start_reader`; this process's own setting is left alone): for
    a GPU, where ~20 batches a second reach a process whose threads compete for the GIL. It costs a
    manager process (:func:`start_shared_memory_manager`), which a CPU's few batches do not repay."""
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=PREFETCH_BATCHES, persistent_workers=False,
                      worker_init_fn=partial(_start_reader, os.getpid(), share_by_name))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_read,
        pin_memory=pin_memory,
        **kwargs,
    )


@contextmanager
def shared_with_readers() -> Iterator[None]:
    """While reader processes run: keep the objects that exist now out of the garbage collector.

    Forked readers share the parent's pages copy-on-write. A full collection in the parent writes
    to the header of every object it tracks (torch, the models, thousands of modules), so every
    page holding one is copied: on a 100k² slide the first such collection, about two minutes in,
    added ~110 MiB to the run's memory (PSS) at once. Frozen objects are skipped by collections
    (Python's advice for fork without exec); they are unfrozen when the readers are gone. No
    collection before freezing: with torch and the models loaded it takes 0.25 s per slide, and
    garbage frozen now is collected once unfrozen.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
