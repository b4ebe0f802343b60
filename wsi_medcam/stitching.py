"""Streaming per-tile evidence into slide-level masks, chunk by chunk, in bounded memory.

The output is cut into vertical *strips* a few chunks wide, and tiles arrive strip by strip, top to
bottom within a strip (:meth:`EvidenceStitcher.order`). Their soft masks, as uint8 levels
(:mod:`wsi_medcam.levels`), are accumulated on the *tile canvas* (px at the tile resolution) in
sparse square blocks; where tiles overlap, evidence is averaged and the label comes from the most
confident tile (without overlap, the default, a block is just the tiles' levels and labels). As
soon as no later tile can touch a band of the strip's rows, the output chunks covering it are
resampled (nearest) to the output resolution and handed to the writer, the band is traced into
evidence polygons, and its blocks are freed. The part of a tile reaching into the next strip is
kept (uint8) until that strip. Memory therefore depends on the strip's width (and, for those
carried parts, on the slide's height in tiles), never on the slide's width or area, and no level-0
canvas exists.

Chunk resampling and writing (numpy, Blosc compression and file writes, which release the GIL) run
on a small thread pool and the pyramid on its own thread, a few chunk rows behind; tracing (OpenCV's
contours, exactly GDAL's polygonize at 3-12× its speed: :func:`wsi_medcam.tracing.trace_labels`) runs in worker processes on
many-core machines. Even so, a stitcher costs its process ~2 CPU ms per tile (2-core VM, Med-CAM-like
masks of ~6-9 polygons per tile; ~4 when GDAL traced): to keep pace with a GPU,
:mod:`wsi_medcam.stitch_processes` runs several stitchers, each on every N-th strip (``shard``).
"""

from __future__ import annotations

import heapq
import math
import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import shapely
from shapely.geometry import box

from .cpus import may_start_processes, usable_cores
from .evidence_polygons import EvidencePolygons, PolygonEncoder
from .heap import release_freed_memory
from .levels import HARD, as_levels, repeat_across
from .tiling import TileGrid
from .tracing import trace_labels


class ChunkWriter(Protocol):
    """Receives chunk-aligned output tiles of level 0 (evidence 0–255 and labels 0 / class+1)."""

    shape: tuple[int, int]
    chunk: int

    def write(self, y: int, x: int, evidence: np.ndarray, labels: np.ndarray,
              half: tuple[np.ndarray, np.ndarray | None] | None = None) -> None:
        """``half``: the block halved (2×2 mean of evidence rounded half up, top-left labels, None
        where ``labels`` are all 0), given when the stitcher has it for free."""

    def patch(self, y: int, x: int, evidence: np.ndarray, labels: np.ndarray) -> None: ...

    def rows_complete(self, rows: int, cols: tuple[int, int]) -> None:
        """Chunk rows ``[0, rows)`` of level 0 in chunk columns ``[cols[0], cols[1])`` are final
        (nothing more will be written there)."""


@dataclass
class _Block:
    """A square of the canvas. Without overlap every px has at most one tile: ``total`` is its
    evidence levels (uint8), ``label`` its class, and there is no ``weight`` or ``score``."""

    total: np.ndarray  # summed evidence levels (uint8 without overlap, else wide enough for the sum)
    label: np.ndarray  # class index + 1 of the most confident covering tile
    weight: np.ndarray | None  # number of tiles that covered each pixel
    score: np.ndarray | None  # that tile's confidence as 1 + round(confidence · 65534); 0: no tile yet

    @classmethod
    def empty(cls, size: int, total: np.dtype | None) -> "_Block":
        """``total``: the dtype of summed levels where tiles overlap; None without overlap."""
        if total is None:
            return cls(np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8), None, None)
        return cls(
            np.zeros((size, size), total),
            np.zeros((size, size), np.uint8),
            np.zeros((size, size), np.uint16),
            np.zeros((size, size), np.uint16),  # integer compares: float16 ones are emulated, 3× slower
        )

    def evidence(self, src: tuple[slice, slice]) -> np.ndarray:
        """Evidence levels over ``src``: the mean of the covering tiles' levels, rounded half up (0
        where no tile is); a view without overlap."""
        if self.weight is None:
            return self.total[src]
        weight = self.weight[src].astype(np.uint32)
        return ((2 * self.total[src].astype(np.uint32) + weight) // np.maximum(2 * weight, 1)).astype(np.uint8)


@dataclass(frozen=True)
class _Strip:
    """A vertical strip: output columns ``[x0, x1)`` (chunk-aligned), the canvas columns accumulated
    for them ``[start, acc1)``, and the canvas columns traced ``[start, trace1)`` (the strips' trace
    ranges partition the canvas; an accumulated range may reach one column into the next strip's)."""

    x0: int
    x1: int
    start: int
    acc1: int
    trace1: int


@dataclass
class _Piece:
    """A tile's evidence levels, or the part of them that reaches into a later strip, on the canvas."""

    x0: int
    y0: int
    evidence: np.ndarray  # uint8
    label: int  # class index + 1
    score: int  # 1 + round(confidence · 65534)
    tile_x0: int  # canvas column of the tile it is cut from

    @classmethod
    def of_tile(cls, x0: int, y0: int, mask: np.ndarray, class_index: int, confidence: float) -> "_Piece":
        """A whole tile at canvas (``x0``, ``y0``), its class and confidence in the stitcher's terms;
        ``mask``: uint8 evidence levels, or soft evidence in [0, 1] (rounded to levels here)."""
        return cls(x0, y0, as_levels(mask), class_index + 1, 1 + round(confidence * 65534), x0)

    def cut(self, x: int) -> "_Piece":
        """The part right of canvas column ``x`` (a copy: the batch it came with is not kept)."""
        cut = max(0, x - self.x0)
        return _Piece(self.x0 + cut, self.y0, self.evidence[:, cut:].copy(), self.label, self.score, self.tile_x0)

    def key(self) -> tuple[int, int]:
        """The order in which one stitcher adds the pieces of a strip: row-major by tile."""
        return self.y0, self.tile_x0


class EvidenceStitcher:
    """Accumulate tile masks and emit finished output chunks and polygons as rows complete.

    Parameters
    ----------
    grid : the tile grid (defines the tile canvas).
    writer : destination of level-0 output chunks; its ``shape`` is the output level 0 (rows, cols)
        covering the slide's level-0 extent at any resolution.
    block : accumulator block edge, canvas px.
    spool_dir : where final polygons are spooled (see :class:`EvidencePolygons`).
    threads : chunk writer threads (default: a quarter of the CPU cores, at least 1).
    tracers : tracing processes (default: a quarter of the CPU cores from 8 cores on, else none:
        on fewer cores they would take time from the models).
    trace_blocks : blocks traced together, side by side (fewer, wider traces mean fewer polygon
        pieces to merge across block borders; the width bounds the tracing memory).
    strip_px : strip width, canvas px, rounded down to a power-of-two number of output chunks (at
        least one), so the first pyramid levels complete within a strip. The accumulator holds
        2 bytes (without overlap; else about 7) per canvas px of one strip's width × (a chunk row +
        a tile) rows.
    shard : (index, count): stitch only strips ``index, index + count, …`` (one of ``count``
        stitching processes, :mod:`wsi_medcam.stitch_processes`); polygons touching the other
        strips are held for merging, and parts of tiles reaching into them are left to their owner.
    spool_path, encoder : passed to :class:`EvidencePolygons`.
    """

    def __init__(self, grid: TileGrid, writer: ChunkWriter, *, block: int = 256, spool_dir: Path | None = None,
                 threads: int | None = None, tracers: int | None = None, trace_blocks: int = 16,
                 strip_px: int = 4096, shard: tuple[int, int] = (0, 1), spool_path: Path | None = None,
                 encoder: PolygonEncoder | None = None):
        self.grid = grid
        self.writer = writer
        self.block = block
        self.trace_blocks = trace_blocks
        # summed levels: none without overlap (a px has one tile), else wide enough for every tile over a px
        cover = math.ceil(grid.tile_size / grid.stride) ** 2
        self._total = None if grid.stride >= grid.tile_size else np.dtype(np.uint16 if 255 * cover <= 0xFFFF else np.uint32)
        cores = usable_cores()
        self._pool = ThreadPoolExecutor(threads or max(1, cores // 4), thread_name_prefix="wsi-medcam-chunks")
        self._pyramid = ThreadPoolExecutor(1, thread_name_prefix="wsi-medcam-pyramid")  # rows in order
        self._pyramid_jobs: deque[Future[None]] = deque()
        tracers = (cores // 4 if cores >= 8 and may_start_processes() else 0) if tracers is None else tracers
        start = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"  # Windows: spawn
        self._tracers = ProcessPoolExecutor(tracers, mp_context=multiprocessing.get_context(start)) if tracers else None
        # per block row: its traces, and the close_rows arguments once they are in
        self._traces_in_flight: deque[tuple[tuple[float, float, float], list[Future[_Traced]]]] = deque()
        # per chunk row: rows final so far, their chunk columns, and the chunk writes still running
        self._rows_in_flight: deque[tuple[int, tuple[int, int], list[Future[bool]]]] = deque()
        width0, height0 = grid.slide_dimensions
        out_h, out_w = writer.shape
        _check_proportions((width0, height0), (out_h, out_w))
        # canvas px per output px, per axis
        self._fy = height0 / out_h / grid.downsample
        self._fx = width0 / out_w / grid.downsample
        self._strips = _strips(out_w, writer.chunk, self._fx, grid.canvas_shape[1], strip_px)
        self._acc_ends = np.array([s.acc1 for s in self._strips])
        self._starts = np.array([s.start for s in self._strips])
        self.shard = shard
        self._strip = shard[0]  # the current strip (past the last one: nothing to stitch)
        self._blocks: dict[tuple[int, int], _Block] = {}
        self._next_chunk_row = 0
        self._next_trace_row = 0  # block rows below this are traced
        self._last_row = 0  # canvas row of the latest tile: tiles come top to bottom within a strip
        # heaps by _Piece.key() of the parts of earlier strips' tiles reaching into this strip, and
        # into the strips after it
        self._carried: list[tuple[tuple[int, int], _Piece]] = []
        self._carry_in: dict[int, list[tuple[tuple[int, int], _Piece]]] = {}
        seams = [s.start * grid.downsample for s in self._strips[1:]] if shard[1] > 1 else []
        self.polygons = EvidencePolygons(spool_dir, seams=seams, spool_path=spool_path, encoder=encoder)
        self.chunks_written = 0

    @property
    def strip_chunks(self) -> int:
        """Output chunks per strip (a power of two; the last strip may have fewer)."""
        return -(-self._strips[0].x1 // self.writer.chunk)

    def strips_of(self, i: int) -> range:
        """The strips tile ``i`` reaches, its own first (strip ``s`` is stitched by stitcher
        ``s % count`` of :attr:`shard`'s ``count``)."""
        home, end = self.reach(np.array([i]))
        return range(int(home[0]), int(end[0]))

    def reach(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For tiles ``indices``: their own strips and the ends (exclusive) of the strips they
        reach, :meth:`strips_of` for a batch at once."""
        x0 = self.grid.cols[indices].astype(np.int64) * self.grid.stride
        home = self._home(x0)
        # a tile reaches every strip that starts left of its end
        return home, np.maximum(home + 1, np.searchsorted(self._starts, x0 + self.grid.tile_size, side="left"))

    def order(self) -> np.ndarray:
        """Tile indices in the order :meth:`add` takes them: strip by strip, row-major within one (a
        tile belongs to the first strip it reaches). With ``count`` stitchers, ``count`` strips side
        by side at a time, so all stitchers work at once, in blocks of about a strip's width in
        rows: each strip's block in turn, then the next blocks. A part carried into the next strip
        then arrives before that strip's tiles of the same row, and a batch of tiles covers a square
        of the slide rather than a row or two of the band, so its reader decodes the slide's tiles
        that neighbouring rows share once (a 100k² slide, 10 strips, every 6th batch of 256 read:
        1.90 TIFF tiles of 256² decoded per 224² tile in band rows, 1.36 in blocks)."""
        x0 = self.grid.cols.astype(np.int64) * self.grid.stride
        home = self._home(x0)
        count = self.shard[1]
        block_rows = max(1, round(self._strips[0].trace1 / self.grid.stride)) if count > 1 else 1
        return np.lexsort((self.grid.cols, self.grid.rows, home, self.grid.rows // block_rows, home // count))

    def _home(self, x0: np.ndarray | int) -> np.ndarray:
        """The strip whose accumulated columns first contain canvas column ``x0``."""
        return np.searchsorted(self._acc_ends, x0, side="right")

    # -- accumulation ---------------------------------------------------------------------------
    def add(self, i: int, mask: np.ndarray, class_index: int, confidence: float) -> None:
        """Add tile ``i``'s evidence (tile_size², uint8 levels, or floats in [0, 1]); tiles must
        come in :meth:`order`."""
        if mask.shape != (self.grid.tile_size,) * 2:
            raise ValueError(f"tile {i}: a mask of {mask.shape}, expected the tile's {(self.grid.tile_size,) * 2}")
        x0, y0 = self.grid.xy_canvas(i)
        home = int(self._home(x0))
        if home < self._strip or (home == self._strip and y0 < self._last_row) or home % self.shard[1] != self.shard[0]:
            raise ValueError(f"tile {i} came out of order: tiles must come in EvidenceStitcher.order() (strip by "
                             "strip, so that memory stays bounded; read them so: TileDataset(..., order=stitcher.order()))")
        while self._strip < home:
            self._close_strip()
            self._open_strip(self._strip + self.shard[1])
        self._last_row = y0
        while self._carried and self._carried[0][0][0] <= y0:  # row-major: the carried part came first
            self._place(heapq.heappop(self._carried)[1])
        self._place(_Piece.of_tile(x0, y0, mask, class_index, confidence))

    def add_batch(self, indices: np.ndarray, masks: np.ndarray, classes: np.ndarray, confidences: np.ndarray) -> None:
        """:meth:`add` for each tile of a batch: ``masks`` (B, tile_size, tile_size), ``classes`` and
        ``confidences`` (B,)."""
        for i, mask, c, conf in zip(indices.tolist(), masks, classes.tolist(), confidences.tolist()):
            self.add(i, mask, c, conf)

    def add_carried(self, i: int, mask: np.ndarray, class_index: int, confidence: float, target: int) -> None:
        """Take the part of tile ``i`` reaching into strip ``target`` (ours), after the strip another
        stitcher adds the tile to (one of ``count``); in :meth:`order`, like :meth:`add`."""
        x0, y0 = self.grid.xy_canvas(i)
        if not self._home(x0) < target < len(self._strips) or target < self._strip or target % self.shard[1] != self.shard[0]:
            raise ValueError(f"tile {i} came out of order: tiles must come in EvidenceStitcher.order()")
        self._carry(target, _Piece.of_tile(x0, y0, mask, class_index, confidence).cut(self._strips[target].start))

    def _carry(self, strip: int, piece: _Piece) -> None:
        """Keep ``piece`` for ``strip`` (the current one or a later one), in :meth:`_Piece.key` order:
        from several stitchers, pieces of a row arrive in no fixed order."""
        heapq.heappush(self._carried if strip == self._strip else self._carry_in.setdefault(strip, []), (piece.key(), piece))

    def _place(self, piece: _Piece) -> None:
        """Accumulate ``piece`` within the current strip; keep what reaches into the next one."""
        self._flush(before_canvas_row=piece.y0)
        strip = self._strips[self._strip]
        x0, y0, evidence = piece.x0, piece.y0, piece.evidence
        h, w = evidence.shape
        nxt = self._strip + 1
        if nxt < len(self._strips) and nxt % self.shard[1] == self.shard[0] and x0 + w > self._strips[nxt].start:
            self._carry(nxt, piece.cut(self._strips[nxt].start))  # the part reaching into the next strip, if ours
        xs, xe = max(x0, strip.start), min(x0 + w, strip.acc1)
        b = self.block
        for by in range(y0 // b, (y0 + h - 1) // b + 1):
            for bx in range(xs // b, (xe - 1) // b + 1) if xs < xe else ():
                blk = self._blocks.get((by, bx))
                if blk is None:
                    blk = self._blocks[(by, bx)] = _Block.empty(b, self._total)
                ys, ye = max(y0, by * b), min(y0 + h, (by + 1) * b)
                cs, ce = max(xs, bx * b), min(xe, (bx + 1) * b)
                dst = (slice(ys - by * b, ye - by * b), slice(cs - bx * b, ce - bx * b))
                src = evidence[ys - y0 : ye - y0, cs - x0 : ce - x0]
                if blk.weight is None:  # no overlap: these px have no other tile
                    blk.total[dst] = src
                    blk.label[dst] = piece.label
                    continue
                blk.total[dst] += src
                blk.weight[dst] += 1
                # label := piece.label where the piece is more confident, as uint8 arithmetic that
                # wraps (label + (new − label)·better): a masked copy into a strided view is ~20×
                # slower on a mask with edges (numpy 2.4)
                label, score = blk.label[dst], blk.score[dst]
                step = np.subtract(piece.label, label, dtype=np.uint8)
                step *= score < piece.score
                label += step
                np.maximum(score, piece.score, out=score)

    def _close_strip(self) -> None:
        """Place what is still carried into the current strip, then emit all of it."""
        if self._strip >= len(self._strips):
            return
        while self._carried:
            self._place(heapq.heappop(self._carried)[1])
        self._flush(before_canvas_row=math.inf)

    def _open_strip(self, index: int) -> None:
        release_freed_memory()  # what the last strip's temporaries left in the threads' heaps
        self._strip = index
        self._blocks = {}  # the last chunk jobs of the previous strip keep theirs
        self._next_chunk_row = self._next_trace_row = self._last_row = 0
        self._carried = self._carry_in.pop(index, [])

    def finish(self) -> None:
        """Flush everything left and wait for the chunk writers; call once after the last tile."""
        self._close_strip()
        while self._strip + self.shard[1] < len(self._strips):  # later strips: carried parts, and completion
            self._open_strip(self._strip + self.shard[1])
            self._close_strip()
        self._announce_rows(wait_until=0)
        self._collect_traces(wait_until=0)
        while self._pyramid_jobs:
            self._pyramid_jobs.popleft().result()
        self.close()

    def close(self) -> None:
        """Stop the writer threads (after :meth:`finish`, or when a slide is abandoned)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pyramid.shutdown(wait=True, cancel_futures=True)
        if self._tracers is not None:
            self._tracers.shutdown(wait=True, cancel_futures=True)

    def replace(self, i: int, mask: np.ndarray, class_index: int) -> None:
        """After :meth:`finish`: overwrite tile ``i``'s footprint with new evidence (e.g. refined
        per image; as :meth:`add` takes it), in the written level 0 and in the polygons. Overlap
        averaging is not redone."""
        x0, y0 = self.grid.xy_canvas(i)
        evidence = as_levels(mask)
        size = evidence.shape[0]
        out_h, out_w = self.writer.shape

        def span(start: int, f: float, limit: int) -> np.ndarray:
            first = max(0, math.ceil(start / f - 0.5))
            last = min(limit, math.ceil((start + size) / f - 0.5))
            return np.arange(first, last)

        ys, xs = span(y0, self._fy, out_h), span(x0, self._fx, out_w)
        if len(ys) and len(xs):
            rows = np.floor((ys + 0.5) * self._fy).astype(np.int64) - y0
            cols = np.floor((xs + 0.5) * self._fx).astype(np.int64) - x0
            tile = evidence[np.ix_(rows, cols)]
            self.writer.patch(int(ys[0]), int(xs[0]), tile, np.where(tile >= HARD, class_index + 1, 0).astype(np.uint8))
        ds = self.grid.downsample
        polys = list(trace_labels((evidence >= HARD).astype(np.uint8), x0, y0, ds)[1])
        self.polygons.replace_region(box(x0 * ds, y0 * ds, (x0 + size) * ds, (y0 + size) * ds), class_index, polys)

    # -- reading the accumulator ----------------------------------------------------------------
    def _canvas(self, y0: int, y1: int, x0: int, x1: int, blocks: dict[tuple[int, int], _Block] | None = None, *,
                evidence: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """Evidence levels (None unless ``evidence``) and hard labels on canvas rows [y0, y1) ×
        cols [x0, x1), from ``blocks`` (default: the live accumulator)."""
        b = self.block
        blocks = self._blocks if blocks is None else blocks
        levels = np.zeros((y1 - y0, x1 - x0), np.uint8) if evidence else None
        label = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for by in range(y0 // b, (y1 - 1) // b + 1):
            for bx in range(x0 // b, (x1 - 1) // b + 1):
                blk = blocks.get((by, bx))
                if blk is None:
                    continue
                ys, ye = max(y0, by * b), min(y1, (by + 1) * b)
                xs, xe = max(x0, bx * b), min(x1, (bx + 1) * b)
                src = (slice(ys - by * b, ye - by * b), slice(xs - bx * b, xe - bx * b))
                dst = (slice(ys - y0, ye - y0), slice(xs - x0, xe - x0))
                mean = blk.evidence(src)
                if levels is not None:
                    levels[dst] = mean
                np.multiply(blk.label[src], mean >= HARD, out=label[dst])  # not a masked copy: see _place
        return levels, label

    # -- flushing -------------------------------------------------------------------------------
    def _flush(self, before_canvas_row: float) -> None:
        """Emit every output chunk row and trace every block row of the current strip lying wholly
        above ``before_canvas_row``."""
        out_h, _ = self.writer.shape
        chunk = self.writer.chunk
        while self._next_chunk_row * chunk < out_h:
            y_end = min((self._next_chunk_row + 1) * chunk, out_h)
            if math.floor((y_end - 0.5) * self._fy) >= before_canvas_row:
                break
            futures = self._write_chunk_row(self._next_chunk_row * chunk, y_end)
            self._next_chunk_row += 1
            strip = self._strips[self._strip]
            cols = (strip.x0 // chunk, -(-strip.x1 // chunk))
            self._rows_in_flight.append((self._next_chunk_row, cols, futures))
        self._announce_rows(wait_until=1)
        b = self.block
        while (self._next_trace_row + 1) * b <= before_canvas_row and self._has_rows_from(self._next_trace_row):
            self._trace_block_row(self._next_trace_row)
            self._next_trace_row += 1
        if before_canvas_row == math.inf:
            while self._has_rows_from(self._next_trace_row):
                self._trace_block_row(self._next_trace_row)
                self._next_trace_row += 1
        self._collect_traces(wait_until=4)
        # blocks are needed while untraced or while an unwritten chunk row still samples them
        needed_from = math.floor((self._next_chunk_row * chunk + 0.5) * self._fy) // b
        keep_from = min(self._next_trace_row, needed_from)
        for key in [k for k in self._blocks if k[0] < keep_from]:
            del self._blocks[key]

    def _has_rows_from(self, block_row: int) -> bool:
        return any(k[0] >= block_row for k in self._blocks)

    def _announce_rows(self, wait_until: int) -> None:
        """Tell the writer which chunk rows are final, in order, on the pyramid thread: those whose
        chunks are all written, waiting for the oldest while more than ``wait_until`` rows are in
        flight (bounded memory). A writer thread's error is raised here."""
        while self._rows_in_flight:
            rows, cols, futures = self._rows_in_flight[0]
            if len(self._rows_in_flight) <= wait_until and not all(f.done() for f in futures):
                break
            self.chunks_written += sum(f.result() for f in futures)
            self._rows_in_flight.popleft()
            while self._pyramid_jobs and self._pyramid_jobs[0].done():
                self._pyramid_jobs.popleft().result()
            self._pyramid_jobs.append(self._pyramid.submit(self.writer.rows_complete, rows, cols))

    def _write_chunk_row(self, y0: int, y1: int) -> list[Future[bool]]:
        """Queue the current strip's chunks of output rows [y0, y1) that tiles touched on the
        writer threads, each with the blocks it samples (they stay alive for it after the
        accumulator drops them)."""
        rows = np.floor((np.arange(y0, y1) + 0.5) * self._fy).astype(np.int64)
        b, chunk, strip = self.block, self.writer.chunk, self._strips[self._strip]
        block_rows = range(rows[0] // b, rows[-1] // b + 1)
        blocks = {k: blk for k, blk in self._blocks.items() if k[0] in block_rows}
        block_cols = sorted({k[1] for k in blocks})
        futures = []
        for x0 in range(strip.x0, strip.x1, chunk) if block_cols else ():
            x1 = min(x0 + chunk, strip.x1)
            cols = np.floor((np.arange(x0, x1) + 0.5) * self._fx).astype(np.int64)
            if any(cols[0] // b <= c <= cols[-1] // b for c in block_cols):
                futures.append(self._pool.submit(self._write_chunk, blocks, rows, cols, y0, x0))
        return futures

    def _write_chunk(self, blocks: dict[tuple[int, int], _Block], rows: np.ndarray, cols: np.ndarray,
                     y0: int, x0: int) -> bool:
        """Resample one output chunk from the canvas (nearest) and write it; False if it is empty."""
        evidence, label = self._canvas(rows[0], rows[-1] + 1, cols[0], cols[-1] + 1, blocks)
        if not evidence.any():
            return False
        r, c = rows - rows[0], cols - cols[0]
        any_label = bool(label.any())
        labels = _nearest(label, r, c) if any_label else np.zeros((len(r), len(c)), np.uint8)
        half = None
        ky, kx = _repeats(r), _repeats(c)
        if ky % 2 == 0 and kx % 2 == 0:
            # every canvas px repeated an even number of times: the chunk halved (its 2×2 means) is
            # the canvas repeated half as often, so the pyramid's largest halving (~0.5 ms per
            # 1024² chunk) is skipped. E.g. tiles at 0.5 µm/px on a 0.25 µm/px slide: the canvas.
            hr, hc = np.arange(-(-len(r) // 2)) // (ky // 2), np.arange(-(-len(c) // 2)) // (kx // 2)
            halve = (lambda a: a) if ky == kx == 2 else (lambda a: _nearest(a, hr, hc))  # (both are ours)
            half = (halve(evidence), halve(label) if any_label else None)
        self.writer.write(y0, x0, _nearest(evidence, r, c), labels, half)
        return True

    def _trace_block_row(self, block_row: int) -> None:
        """Queue the tracing of the hard mask in one block row of the current strip. Side-by-side
        blocks are traced together (up to ``trace_blocks``), so only pieces cut by a row edge, a
        span's cut edge or the strip's edges are left to merge."""
        b, ds = self.block, self.grid.downsample
        strip = self._strips[self._strip]
        first, last = self._strip == 0, self._strip == len(self._strips) - 1
        jobs = []
        for start, stop, open_left, open_right in _spans(sorted(k[1] for k in self._blocks if k[0] == block_row),
                                                         self.trace_blocks):
            x0, x1 = max(start * b, strip.start), min(stop * b, strip.trace1)
            if x0 >= x1:
                continue
            _, label = self._canvas(block_row * b, (block_row + 1) * b, x0, x1, evidence=False)
            if not label.any():
                continue
            args = (label, x0, block_row * b, ds)
            sides = {"open_left": open_left or (x0 == strip.start and not first),
                     "open_right": open_right or (x1 == strip.trace1 and not last)}
            if self._tracers is not None:
                jobs.append(self._tracers.submit(_trace_wkb, *args, **sides))
            else:
                jobs.append(Future())
                jobs[-1].set_result(trace_labels(*args, **sides))
        seam = math.inf if last else strip.trace1 * ds
        self._traces_in_flight.append((((block_row + 1) * b * ds, strip.start * ds, seam), jobs))

    def _collect_traces(self, wait_until: int) -> None:
        """Add traced polygons per class and close their rows, in row order: every row whose spans
        are traced, waiting for the oldest while more than ``wait_until`` rows are in flight."""
        while self._traces_in_flight:
            closing, jobs = self._traces_in_flight[0]
            if len(self._traces_in_flight) <= wait_until and not all(j.done() for j in jobs):
                break
            self._traces_in_flight.popleft()
            for values, polygons, on_border in (j.result() for j in jobs):
                if len(polygons) and isinstance(polygons[0], bytes):  # from a tracing process
                    polygons = shapely.from_wkb(polygons)
                for value, poly, open_piece in zip(values, polygons, on_border):
                    self.polygons.add(int(value) - 1, poly, on_border=bool(open_piece))
            self.polygons.close_rows(*closing)


def _check_proportions(slide_dimensions: tuple[int, int], shape: tuple[int, int]) -> None:
    """Refuse an output level 0 of ``shape`` (rows, cols) that cannot cover the slide's level-0
    (width, height) with square pixels, each side rounded either way (e.g. (width, height) given
    as the shape)."""
    width0, height0 = slide_dimensions
    out_h, out_w = shape

    def downsamples(extent: int, out: int) -> tuple[float, float]:  # those for which out px cover extent ± 1 px
        return extent / (out + 1), extent / (out - 1) if out > 1 else math.inf

    (lo_x, hi_x), (lo_y, hi_y) = downsamples(width0, out_w), downsamples(height0, out_h)
    if max(lo_x, lo_y) >= min(hi_x, hi_y):
        raise ValueError(f"an output of {out_h} rows × {out_w} columns cannot cover the slide's {width0} × {height0} "
                         "(width × height) level-0 px with square pixels: the shape is (rows, columns)")


def _strips(out_w: int, chunk: int, fx: float, canvas_w: int, strip_px: int) -> list[_Strip]:
    """Cut ``out_w`` output px into strips of a power-of-two number of ``chunk``s about ``strip_px``
    canvas px wide (``fx``: canvas px per output px; ``canvas_w``: the canvas width)."""
    per_strip = 1 << max(0, math.floor(math.log2(max(1.0, strip_px / (chunk * fx)))))
    edges = [*range(0, out_w, per_strip * chunk), out_w]
    starts = [0, *(math.floor((x + 0.5) * fx) for x in edges[1:-1]), canvas_w]
    strips = []
    for s in range(len(edges) - 1):
        last = s == len(edges) - 2
        # output px x samples canvas column floor((x + 0.5) · fx)
        acc1 = canvas_w if last else max(math.floor((edges[s + 1] - 0.5) * fx) + 1, starts[s + 1])
        strips.append(_Strip(edges[s], edges[s + 1], starts[s], acc1, starts[s + 1]))
    return strips


def _repeats(index: np.ndarray) -> int:
    """k where ``index`` is ``arange(n) // k`` (each source px repeated k times, from the first), 1
    where it is ``arange(n)`` or any other sampling."""
    k = max(1, round(len(index) / (int(index[-1]) + 1)))
    return k if np.array_equal(index, np.arange(len(index)) // k) else 1


def _nearest(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``image[rows][:, cols]`` for a uint8 ``image``: a nearest-neighbour resampling (a view where
    both are plain ranges, as for tiles at the slide's own µm/px: the gather was ~9 % of stitching)."""
    if _is_range(rows) and _is_range(cols):
        return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    out = image.take(rows, 0)  # whole rows: cheap
    k = _repeats(cols)
    if k > 1 and len(cols) == k * image.shape[1]:  # each pixel repeated k times across
        return repeat_across(out, k)
    return out.take(cols, 1)


def _is_range(index: np.ndarray) -> bool:
    """Whether ``index`` is ``arange(a, a + n)``."""
    return int(index[-1]) - int(index[0]) == len(index) - 1 and np.array_equal(index, np.arange(index[0], index[0] + len(index)))


_Traced = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Per traced region: label values, polygons (or their WKB), may continue beyond the traced span."""


def _trace_wkb(label: np.ndarray, x0: int, y0: int, scale: float, *, open_left: bool, open_right: bool) -> _Traced:
    """:func:`~wsi_medcam.tracing.trace_labels` of one span in a tracing process, its polygons as WKB, which cross process
    boundaries cheaply."""
    values, polygons, on_border = trace_labels(label, x0, y0, scale, open_left=open_left, open_right=open_right)
    return values, shapely.to_wkb(polygons), on_border


def _spans(columns: list[int], most: int) -> Iterator[tuple[int, int, bool, bool]]:
    """(start, stop, open_left, open_right) for runs of consecutive block ``columns`` (sorted), cut
    every ``most`` blocks; a side is open where the run was cut there (a neighbour block exists)."""
    i = 0
    while i < len(columns):
        j = i + 1
        while j < len(columns) and j - i < most and columns[j] == columns[j - 1] + 1:
            j += 1
        yield (columns[i], columns[j - 1] + 1, i > 0 and columns[i - 1] == columns[i] - 1,
               j < len(columns) and columns[j] == columns[j - 1] + 1)
        i = j
