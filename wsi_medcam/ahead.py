"""One slide ahead: a slide's first stage done on a thread while the slide before it streams tiles.

On a GPU the cores mostly wait on the device while tiles stream, and each slide's tissue detection
(on an H200 machine 0.81 s of a 100k² slide's 21.2 s, 0.25 s of a 32768² slide's 3.5 s) held the
GPU idle before its tiles. A run over many slides finds the next slide's tissue meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

R = TypeVar("R")


class Ahead(Generic[R]):
    """``work(path)`` for the slide after a given one, on one thread of its own.

    :meth:`start_after` is called by the slide before, once its reader processes have forked, and
    :meth:`take` by the next slide before its own readers fork: no process is forked from this one
    while ``work`` runs on the thread (a fork copies only the forking thread, so a lock held there
    would stay held in the child). :meth:`start` begins with the first slide while the models load
    (:func:`~wsi_medcam.pipeline.start_tissue_ahead`), which starts its helper processes (the
    forkserver, torch's shared-memory manager) by fork and exec: nothing runs in the child before
    the exec. A ``work`` that fails gives None: the slide then does the work itself and reports the
    error as any slide would.
    """

    def __init__(self, paths: Sequence[Path], work: Callable[[Path], R]):
        self._next = dict(zip(paths, paths[1:]))
        self._work = work
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wsi-medcam-ahead")
        self._pending: dict[Path, Future[R]] = {}

    def start(self, path: Path | None) -> None:
        """Start the work for ``path`` (None: nothing), unless it is started already."""
        if path is not None and path not in self._pending:
            self._pending[path] = self._pool.submit(self._work, path)

    def start_after(self, path: Path) -> None:
        """``path``'s readers have forked: start the work for the slide after it, if any."""
        self.start(self._next.get(path))

    def take(self, path: Path) -> R | None:
        """The work done ahead for ``path`` (waiting for it), or None where there is none or it failed."""
        future = self._pending.pop(path, None)
        if future is None:
            return None
        try:
            return future.result()
        except Exception:  # noqa: BLE001 - the slide does it again itself and reports the error
            log.debug("%s: the work done ahead failed; the slide does it itself", path, exc_info=True)
            return None

    def close(self) -> None:
        """Drop work not started and wait for the running one."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
