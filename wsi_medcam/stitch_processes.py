"""Stitching in several processes, so it keeps pace with a GPU.

One stitcher in the model process costs it ~2.3 CPU ms per tile (4.5 when GDAL traced), much of
it holding its GIL (accumulating, cutting chunks, tracing; ``benchmarks/stitching.py --masks dark``
on a 2-core VM), which caps a GPU run at a few hundred tiles/s whatever the GPU does. Here ``count`` processes each
stitch every ``count``-th strip
(:class:`~wsi_medcam.stitching.EvidenceStitcher` with ``shard``): tiles come ``count`` strips at a
time, row-major across them (:meth:`EvidenceStitcher.order`), so every process has work at once,
and the model process only sends each batch's masks (uint8 levels), raw over a socket, to the processes whose
strips they reach: 0.2-0.3 CPU ms per tile left in it (``benchmarks/stitching.py``, 2-core VM).

Each process writes its strips' level-0 chunks into the shared store and builds the pyramid levels
whose chunks lie within a strip; this process builds the few levels above from those, strip by
strip as the processes report them final (:meth:`EvidenceStore.adopt_columns`), the last ones
after the last tile (:meth:`EvidenceStore.adopt`). Polygons final within a process are spooled by it, given an
``encoder`` already finished and encoded as GeoJSON features while tiles stream (else as WKB, which
the GeoJSON step encodes in as many processes again, :func:`ordered_map`); those touching another
process's strip are merged here (:meth:`EvidencePolygons.adopt`). Outputs are the same as with one
stitcher: the same sums in the same order per pixel.
"""

from __future__ import annotations

import multiprocessing
import pickle
import queue
import socket
import struct
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely

from .cpus import usable_cores
from .errors import OutputError
from .evidence_polygons import PolygonEncoder
from .export.ome_zarr import EvidenceStore
from .levels import as_levels
from .stitching import EvidenceStitcher
from .tiling import TileGrid

_POLL_S = 0.5  # how often a blocked send or wait checks that the processes are alive
_WAIT_ALL = getattr(socket, "MSG_WAITALL", 0)


def default_stitchers(device_type: str) -> int:
    """Stitching processes: on a GPU, 5/8 of the CPU cores, the readers having the rest (py-spy on
    an H200 machine's 16 cores: stitching ~2.0 CPU ms per tile, reading ~1.0; on a 100k² slide 8
    readers and 8 stitchers reached 3,328 tiles/s in the inference stage, the models stubbed out
    4,189: what 8 stitchers allow; 6 and 10 reached 4,374 with the models, which alone ran 5,665);
    on a CPU none, since the models there are far slower than one stitcher and need every core."""
    return max(1, usable_cores() * 5 // 8) if device_type == "cuda" else 0


def _context() -> Any:
    """The multiprocessing context of the stitching processes: forkserver where there is one (the
    model process has CUDA and threads; a forked zarr would wait on its event-loop thread), whose
    server imports this module's dependencies once when it starts, else spawn (Windows)."""
    start = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(start)
    if start == "forkserver":
        ctx.set_forkserver_preload([__name__])
    return ctx


def start_server() -> None:
    """Start the forkserver now, without waiting for it: its imports (1.5 s on a 2-core VM, 3.4 s on
    an H200 machine) then run beside the slide's tissue detection instead of before its first
    stitching process."""
    if _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def start_process(target: Callable[..., Any], args: tuple[Any, ...], name: str) -> multiprocessing.process.BaseProcess:
    """Start ``target(*args)`` in a process of the stitching processes' kind (forkserver: it shares
    nothing with this process: no CUDA, no threads, no heap). Returns once the process has its
    arguments, so this process may free them at once (a started process keeps no reference to them)."""
    with _main_script_hidden():
        proc = _context().Process(target=target, args=args, name=name, daemon=True)
        proc.start()
    return proc


@contextmanager
def _main_script_hidden() -> Iterator[None]:
    """While open, processes started by forkserver or spawn do not import the main script.

    Such a child runs the main script (``benchmarks/throughput.py``, the ``wsi-medcam`` entry point:
    torch, the models' code...) before it reads its arguments, and ``Process.start`` waits until it has
    read them (they outgrow the pipe's 64 KiB with the tile grid): 8 stitching processes took 34 s to
    start on a 16-core GPU machine, 15 s on a 2-core VM, for a 10k-tile slide. A stitching process
    needs nothing of the main script (its target lives in this module, which the forkserver has
    imported), so the children are shown a bare ``__main__``. (Preloading ``"__main__"`` in the
    forkserver would do this, but Python 3.11 and 3.12 do not pass it the script's path.)
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def ordered_map(fn: Callable[..., Any], items: Iterable[tuple[Any, ...]], processes: int) -> Iterator[Any]:
    """``fn(*item)`` for each of ``items`` in ``processes`` processes started like the stitching
    processes (the main script hidden from them), yielded in order; at most two jobs per process
    wait, so memory does not grow with ``items``. ``fn`` and the items must pickle."""
    with _main_script_hidden(), ProcessPoolExecutor(processes, mp_context=_context()) as pool:
        pending: deque[Future[Any]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, *item))
                if len(pending) > 2 * processes:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # stopped early: the jobs not started are dropped
            for job in pending:
                job.cancel()


class StitchingProcesses(EvidenceStitcher):
    """:class:`EvidenceStitcher`'s interface (:meth:`order`, :meth:`add_batch`, :meth:`finish`,
    :meth:`replace`, :attr:`polygons`) with the strips stitched in ``processes`` processes
    (at most one per strip). ``depth`` messages (a batch's tiles for a process) may wait per
    process."""

    def __init__(self, grid: TileGrid, store: EvidenceStore, *, processes: int, spool_dir: Path, strip_px: int = 4096,
                 block: int = 256, trace_blocks: int = 16, depth: int = 2, encoder: PolygonEncoder | None = None,
                 start: bool = True):
        """With ``start=False`` the processes start at :meth:`start`: :meth:`order` is known before,
        so the readers can be started first and read their first batches meanwhile."""
        super().__init__(grid, store, block=block, spool_dir=spool_dir, tracers=0, trace_blocks=trace_blocks,
                         strip_px=strip_px)
        count = max(1, min(processes, len(self._strips)))
        self.shard = (0, count)  # for order() and strips_of(); this process stitches nothing itself
        self.store = store
        self._top = self.strip_chunks.bit_length() - 1  # the highest level whose chunks lie within a strip
        self._outbox: Any = _context().Queue()
        self._spools = [Path(spool_dir) / f".evidence-polygons-{p}.bin" for p in range(count)]
        self._options = {"block": block, "trace_blocks": trace_blocks, "strip_px": strip_px, "top": self._top,
                         "encoder": encoder}
        self._depth = depth
        self._grid_file = Path(spool_dir) / ".stitching-grid.pickle"
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._inboxes: list[_Inbox] = []
        self._done: dict[int, tuple[int, set[tuple[int, int]], np.ndarray, np.ndarray, float, dict | None]] = {}
        # the pyramid above the processes' strips, built here from each strip as it is reported final
        self._above = ThreadPoolExecutor(1, thread_name_prefix="wsi-medcam-pyramid-above")
        self._above_jobs: deque[Future[None]] = deque()
        self.processes_cpu_s = 0.0  # CPU time the stitching processes used, s (known after finish)
        if start:
            self.start()

    def start(self) -> None:
        """Start the processes (10 took 0.15 s on a 2-core VM, the forkserver forking each)."""
        # the grid goes to the processes as a file, written once: as an argument (2.4 MB for 200k
        # tiles) each start waited for its process to read it through a 64 KiB pipe, ~24 ms apiece
        self._grid_file.write_bytes(pickle.dumps(self.grid, protocol=pickle.HIGHEST_PROTOCOL))
        count = self.shard[1]
        with _main_script_hidden():
            for p in range(count):
                ours, theirs = socket.socketpair()
                self._procs.append(_context().Process(
                    target=_stitch_part, name=f"wsi-medcam-stitch-{p}", daemon=True,
                    args=(self.store.spec, self._grid_file, (p, count), self._options, self._spools[p], theirs,
                          self._outbox)))
                self._procs[-1].start()
                theirs.close()  # the process holds it now; when we are gone, it reads the end of the stream
                self._inboxes.append(_Inbox(ours, self._depth, name=f"wsi-medcam-stitch-send-{p}"))

    def add(self, i: int, mask: np.ndarray, class_index: int, confidence: float) -> None:
        self.add_batch(np.array([i]), mask[None], np.array([class_index]), np.array([confidence]))

    def add_batch(self, indices: np.ndarray, masks: np.ndarray, classes: np.ndarray, confidences: np.ndarray) -> None:
        """Send each tile (in :meth:`order`) to the process of its strip, and to those of the strips
        it reaches into; one message per process. The strips are found for the whole batch at once
        (:meth:`reach`): tile by tile they took 3.0 of this process's CPU ms per batch of 256, now
        0.9 (2-core VM), time the model threads wait for the GIL on a GPU."""
        count = self.shard[1]
        home, end = self.reach(indices)
        reach = end - home if count > 1 else np.ones_like(home)  # one process carries into its own next strip
        ks = np.repeat(np.arange(len(indices)), reach)  # a tile once per strip it reaches, in order
        strips = np.arange(len(ks)) + np.repeat(home - (np.cumsum(reach) - reach), reach)
        targets = np.where(strips == home[ks], -1, strips)
        self._check()  # strips reported final: their pyramid above is built meanwhile
        levels = np.ascontiguousarray(as_levels(masks))
        for p in range(count):
            picked = strips % count == p
            if picked.any():
                kp = ks[picked]
                self._send(p, (indices[kp], [levels[k] for k in kp.tolist()], classes[kp], confidences[kp], targets[picked]))

    def _send(self, p: int, message: Any) -> None:
        while True:
            try:
                self._inboxes[p].put(message, timeout=_POLL_S)
                return
            except queue.Full:
                self._check()

    def _check(self, wait: float = 0.0) -> None:
        """Take the processes' reports (waiting up to ``wait`` s for one); raise if one failed or died."""
        try:
            while True:
                kind, p, payload = self._outbox.get(timeout=wait) if wait else self._outbox.get_nowait()
                wait = 0.0
                if kind == "error":
                    raise OutputError(f"stitching process {p} failed: {payload}")
                if kind == "top":  # (chunk columns of the top level, their non-empty chunks)
                    while self._above_jobs and self._above_jobs[0].done():
                        self._above_jobs.popleft().result()
                    self._above_jobs.append(self._above.submit(self.store.adopt_columns, self._top, *payload))
                else:
                    self._done[p] = payload
        except queue.Empty:
            pass
        for p, proc in enumerate(self._procs):
            if p not in self._done and proc.exitcode not in (None, 0):
                raise OutputError(f"stitching process {p} ended early (exit code {proc.exitcode}): killed (out of "
                                  "memory?), or a script without `if __name__ == \"__main__\":` (it re-imports it)")

    def finish(self) -> None:
        """Tell the processes the tiles are done, wait for their strips, then take over their
        polygons, level-0 chunk counts and the chunks the pyramid above them is built from."""
        for p in range(len(self._procs)):
            self._send(p, None)
        while len(self._done) < len(self._procs):
            self._check(wait=_POLL_S)
        for proc in self._procs:
            proc.join()
        while self._above_jobs:
            self._above_jobs.popleft().result()
        tops: set[tuple[int, int]] = set()
        for p, (chunks, top_chunks, classes, wkbs, cpu_s, encoded) in sorted(self._done.items()):
            self.chunks_written += chunks
            self.processes_cpu_s += cpu_s
            tops |= top_chunks
            spool = self._spools[p] if self._spools[p].exists() else None
            self.polygons.adopt(spool, zip(classes.tolist(), shapely.from_wkb(wkbs)), encoded)
        self.store.adopt(self._top, tops)
        self.close()

    def close(self) -> None:
        """Stop the processes (after :meth:`finish`, or when a slide is abandoned)."""
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        for inbox in self._inboxes:
            inbox.close()
        self._outbox.cancel_join_thread()  # never block on data nobody will read
        self._outbox.close()
        self._above.shutdown(wait=True, cancel_futures=True)
        self._grid_file.unlink(missing_ok=True)
        super().close()


_HEAD = struct.Struct("<Q")  # bytes of a message's pickled part; 0 ends the stream


class _Inbox:
    """Messages to one stitching process over a socket, written by a thread of ours, so the models
    do not wait on one busy process while the others idle; at most ``depth`` wait. Masks go as raw
    uint8 straight from the batch's array (no pickling, no copy in this process: as float32, 0.4
    CPU ms per tile less here than through a multiprocessing.Queue, and 0.3 less in the stitching
    process), a message in one system call (:func:`_send_buffers`)."""

    def __init__(self, sock: socket.socket, depth: int, name: str):
        self._sock = sock
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._write, name=name, daemon=True)
        self._thread.start()

    def put(self, message: Any, timeout: float) -> None:
        """Queue (indices, masks, classes, confidences, targets), or None to end; queue.Full after
        ``timeout`` s."""
        self._queue.put(message, timeout=timeout)

    def _write(self) -> None:
        try:
            while (message := self._queue.get()) is not None:
                indices, masks, classes, confidences, targets = message
                head = pickle.dumps((indices, classes, confidences, targets, masks[0].shape), protocol=5)
                _send_buffers(self._sock, [_HEAD.pack(len(head)) + head, *masks])  # masks: contiguous uint8 views
            self._sock.sendall(_HEAD.pack(0))
        except OSError:  # the process is gone; _check() says why
            pass

    def close(self) -> None:
        """Close the socket; the thread ends (a send fails, or it takes the None)."""
        self._sock.close()
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # the thread is sending, and the closed socket stops it
            pass


_IOV_MAX = 1024  # buffers one sendmsg takes (Linux's IOV_MAX)


def _send_buffers(sock: socket.socket, buffers: list[Any]) -> None:
    """Write ``buffers`` (bytes-like, C-contiguous) to ``sock`` in order, in one system call where
    the platform has ``sendmsg``: a blocking stream socket takes them all at once.

    Every call that leaves Python releases the GIL and must win it back, which takes up to the
    switch interval (5 ms) while another thread runs Python, as the model threads do on a GPU. A
    batch's masks sent one call each (128 per process) then crawled: 3.7 batches of 256 a second to
    two processes with one thread of this process busy in Python, against 89 in one call (2-core
    VM; 210 and 316 with none busy); the GPU needs ~21."""
    views = [memoryview(b).cast("B") for b in buffers]
    if not hasattr(sock, "sendmsg"):  # Windows
        for view in views:
            sock.sendall(view)
        return
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


def _receive(sock: socket.socket) -> tuple[Any, ...] | None:
    """The next message from an :class:`_Inbox`, its masks read straight into one array; None at
    the end; EOFError if the model process is gone (it never sent the end)."""
    (size,) = _HEAD.unpack(_read(sock, _HEAD.size))
    if not size:
        return None
    indices, classes, confidences, targets, shape = pickle.loads(_read(sock, size))
    masks = np.empty((len(indices), *shape), np.uint8)
    _read(sock, size=masks.nbytes, into=memoryview(masks).cast("B"))
    return indices, masks, classes, confidences, targets


def _read(sock: socket.socket, size: int, into: memoryview | None = None) -> bytearray | None:
    """Exactly ``size`` bytes, into ``into`` (returns None) or a new bytearray; in one system call
    as a rule (``MSG_WAITALL``), which wins the GIL back once, not once per socket buffer's worth
    (see :func:`_send_buffers`)."""
    out = bytearray(size) if into is None else None
    view = memoryview(out) if out is not None else into
    while len(view):
        got = sock.recv_into(view, len(view), _WAIT_ALL)
        if not got:
            raise EOFError("the model process closed the stream")
        view = view[got:]
    return out


def _stitch_part(spec: dict[str, Any], grid_file: Path, shard: tuple[int, int], options: dict[str, int],
                 spool: Path, inbox: socket.socket, outbox: Any) -> None:
    """A stitching process: stitch strips ``shard`` of the store ``spec`` (the tile grid pickled in
    ``grid_file`` by the model process) from the messages in ``inbox`` until None; report (level-0
    chunks written, top-level chunks, held polygons)."""
    # OpenCV's own threads (tracing, halving) would only compete with the other stitching processes
    # and the readers for the cores, at ~30 % more CPU per call than one thread (2-core VM)
    cv2.setNumThreads(1)
    try:
        grid: TileGrid = pickle.loads(grid_file.read_bytes())
        store = EvidenceStore(**spec, part=True, top=options["top"])
        stitcher = EvidenceStitcher(grid, store, block=options["block"], trace_blocks=options["trace_blocks"],
                                    strip_px=options["strip_px"], threads=1, tracers=0, shard=shard, spool_path=spool,
                                    encoder=options["encoder"])
        try:
            while (message := _receive(inbox)) is not None:
                indices, masks, classes, confidences, targets = message
                for i, mask, c, conf, t in zip(indices.tolist(), masks, classes.tolist(), confidences.tolist(),
                                               targets.tolist()):
                    if t < 0:
                        stitcher.add(i, mask, c, conf)
                    else:
                        stitcher.add_carried(i, mask, c, conf, t)
                columns, chunks = store.completed_top()
                if columns:  # a strip is final up to the top level: the model process builds above it now
                    outbox.put(("top", shard[0], (columns, chunks)))
            stitcher.finish()
        finally:
            stitcher.close()
        held = stitcher.polygons.release()
        classes = np.array([c for c, _ in held], np.int64)
        wkbs = shapely.to_wkb(np.array([g for _, g in held], dtype=object))
        encoded = None if options["encoder"] is None else options["encoder"].per_class
        outbox.put(("done", shard[0], (stitcher.chunks_written, store.top_chunks, classes, wkbs, time.process_time(), encoded)))
    except BaseException as exc:  # noqa: BLE001 - reported to the model process, which raises it
        first = (str(exc).strip().splitlines() or [""])[0]
        outbox.put(("error", shard[0], f"{type(exc).__name__}: {first}"))
