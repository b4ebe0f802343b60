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
contours, exactly GDAL's polygonize at 3-12× its speed: :func:`_trace`) runs in worker processes on
many-core machines. Even so, a stitcher costs its process ~2 CPU ms per tile (2-core VM, Med-CAM-like
masks of ~6-9 polygons per tile; ~4 when GDAL traced): to keep pace with a GPU,
:mod:`wsi_medcam.stitch_processes` runs several stitchers, each on every N-th strip (``shard``).
"""

from __future__ import annotations

import heapq
import math
import multiprocessing
import struct
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import cv2
import numpy as np
import shapely
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from .cpus import may_start_processes, usable_cores
from .heap import release_freed_memory
from .levels import HARD, as_levels
from .tiling import TileGrid


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


def _polygon_parts(geom: BaseGeometry) -> list[Polygon]:
    """The non-empty polygons of a (multi)polygon or collection."""
    return [g for g in getattr(geom, "geoms", [geom]) if isinstance(g, Polygon) and not g.is_empty]


def _trace(label: np.ndarray, x0: int, y0: int, scale: float, *, open_left: bool = True,
           open_right: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, polygons in level-0 px, may continue beyond the array) for the 4-connected regions of
    non-zero ``label`` (uint8), whose pixel (0, 0) lies at canvas px (``x0``, ``y0``); ``scale`` is
    level-0 px per canvas px. A region may continue where it touches the top or bottom edge, and the
    left or right edge unless ``open_left`` / ``open_right`` says nothing lies beyond it. The
    polygons are those GDAL's polygonize traces (4-connected, pixel edges), at a fraction of its cost
    (:func:`_region_rings`)."""
    label = np.asarray(label, np.uint8)  # OpenCV's dtype (a no-op for the stitcher's labels)
    h, w = label.shape
    top = int(label.max())
    values, parts = [], []
    for value in range(1, top + 1):  # each class on its own lines: classes often hold apart
        traced = _trace_mask(label if top == 1 else (label == value).view(np.uint8))
        parts.extend(traced)
        values.extend(np.full(np.count_nonzero(parent < 0), value, np.int64) for _, _, parent in traced)
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, object), np.zeros(0, bool)
    points, lengths, parent = (np.concatenate(a) for a in zip(*_offset_parents(parts)))
    xs, ys = points[:, 0], points[:, 1]
    shells = np.flatnonzero(parent < 0)
    firsts = np.cumsum(lengths) - lengths
    lo_x, hi_x = np.minimum.reduceat(xs, firsts)[shells], np.maximum.reduceat(xs, firsts)[shells]
    lo_y, hi_y = np.minimum.reduceat(ys, firsts)[shells], np.maximum.reduceat(ys, firsts)[shells]
    on_border = (lo_y <= 0) | (hi_y >= h) | (open_left & (lo_x <= 0)) | (open_right & (hi_x >= w))
    coords = (np.column_stack((xs, ys)) + (x0, y0)) * float(scale)
    return np.concatenate(values), _polygons(coords, lengths, parent), on_border


def _trace_mask(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`_region_rings` of the regions of a 0/1 uint8 ``mask``, their points mapped to the
    mask's pixel edges. Only the lines (rows, columns) with evidence are traced, with one empty line
    per gap between them: the cost follows the area traced, evidence usually covers a small part of
    a span, and one empty line keeps regions apart as all of the gap did (every adjacency is kept,
    so the polygons are those of the whole mask, their edges mapped back exactly)."""
    h, w = mask.shape
    rows, cols = _lines_to_trace(mask.any(1)), _lines_to_trace(mask.any(0))
    if not len(rows):
        return []
    if len(rows) < h // 2 or len(cols) < w // 2:
        sparse = mask[np.ix_(rows, cols)]
    else:  # little to drop: the bounding box
        rows, cols = np.arange(rows[0], rows[-1] + 1), np.arange(cols[0], cols[-1] + 1)
        sparse = np.ascontiguousarray(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    # edge k of the traced array lies on edge edge_x[k] (edge_y[k]) of the mask
    edge_x, edge_y = np.append(cols, cols[-1] + 1), np.append(rows, rows[-1] + 1)
    out = []
    for part in _apart(sparse):
        traced = _region_rings(part)
        if traced is not None:
            points, lengths, parent = traced
            out.append((np.column_stack((edge_x[points[:, 0]], edge_y[points[:, 1]])), lengths, parent))
    return out


def _region_rings(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(points (n, 2) as pixel-edge x, y; points per ring; each ring's shell, -1 for a shell) of the
    regions of a 0/1 uint8 ``mask`` in which no two regions touch only at a corner; None if empty.

    OpenCV traces the boundary *pixels* of 8-connected regions (its background 4-connected), not the
    pixel edges. On the mask doubled (each px a 2×2 block) a boundary pixel at doubled coordinate c
    is the half of px c // 2 facing the border, so the edge it marks is c / 2 for even c (the px's
    left or top edge), (c + 1) / 2 for odd c: ⌈c / 2⌉, the rings of the pixel edges, holes
    included. Without corner-only contacts between regions, 8-connected regions are the
    4-connected ones GDAL traces (:func:`_apart`)."""
    h, w = mask.shape
    dtype, spread = _SPREAD[2]
    wide = (mask.astype(dtype) * spread).view(np.uint8)  # each px twice across (7× cv2.resize's speed)
    doubled = np.stack((wide, wide), axis=1).reshape(2 * h, 2 * w)
    contours, hierarchy = cv2.findContours(doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    points = np.concatenate(contours)[:, 0, :]
    return (points + 1) >> 1, np.array([len(c) for c in contours]), hierarchy[0][:, 3]


def _apart(mask: np.ndarray) -> list[np.ndarray]:
    """``mask`` (0/1 uint8) as masks of its 4-connected regions in which no two regions touch only
    at a corner (one mask, itself, unless some do: then the regions are coloured so that no two of
    a colour touch, one mask per colour). A region touching *itself* at a corner stays whole: there
    the corner closes a hole, as under 4-connectivity."""
    if min(mask.shape) < 2:
        return [mask]
    # 2×2 windows set on one diagonal only: each px differs from its neighbours across and down
    # (OpenCV's elementwise operations: 10× numpy's on these views, 3× a hit-or-miss per diagonal)
    across = cv2.bitwise_xor(mask[:, :-1], mask[:, 1:])
    down = cv2.bitwise_xor(mask[:-1], mask[1:])
    checker = cv2.bitwise_and(cv2.bitwise_and(across[:-1], across[1:]), cv2.bitwise_and(down[:, :-1], down[:, 1:]))
    corners = _set_px(checker)
    if not len(corners):
        return [mask]
    n, region = cv2.connectedComponents(mask, connectivity=4)
    y, x = corners.T  # each window's top-left px: set, the diagonal down-right is; else down-left
    falling = mask[y, x] == 1
    first = np.where(falling, region[y, x], region[y, x + 1])
    second = np.where(falling, region[y + 1, x + 1], region[y + 1, x])
    contact = first != second
    if not contact.any():
        return [mask]
    neighbours: dict[int, set[int]] = {}
    for p, q in zip(first[contact].tolist(), second[contact].tolist()):
        neighbours.setdefault(p, set()).add(q)
        neighbours.setdefault(q, set()).add(p)
    colour = np.zeros(n, np.uint8)  # greedy colouring, most contacts first: a handful of colours
    colour[0] = 255  # the background
    given: dict[int, int] = {}
    for node in sorted(neighbours, key=lambda k: -len(neighbours[k])):
        used = {given[q] for q in neighbours[node] if q in given}
        given[node] = colour[node] = next(k for k in range(len(used) + 1) if k not in used)
    per_px = colour[region]
    return [(per_px == k).view(np.uint8) for k in range(max(given.values()) + 1)]


def _set_px(image: np.ndarray) -> np.ndarray:
    """(y, x) of the non-zero px of a uint8 ``image`` (n, 2): OpenCV's search, ~10× numpy's on a
    mostly empty image."""
    found = cv2.findNonZero(image) if image.size and cv2.countNonZero(image) else None  # the count: 30× faster
    return np.zeros((0, 2), np.int64) if found is None else found.reshape(-1, 2)[:, ::-1].astype(np.int64)


def _offset_parents(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, ...]]:
    """:func:`_region_rings` results with each ring's shell index counted across all of them."""
    offset = 0
    for points, lengths, parent in parts:
        yield points, lengths, np.where(parent < 0, -1, parent + offset)
        offset += len(lengths)


def _polygons(coords: np.ndarray, lengths: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """Polygons from rings (``lengths`` points each, in order, in ``coords``), a shell (``parent`` -1)
    with the holes naming it, built at once; repeated points (two doubled px on one edge) dropped."""
    ends = np.cumsum(lengths)
    previous = np.arange(len(coords)) - 1
    previous[ends - lengths] = ends - 1  # a ring's first point follows its last
    keep = (coords != coords[previous]).any(1)
    ring = np.repeat(np.arange(len(lengths)), lengths)
    rings = shapely.linearrings(coords[keep], indices=ring[keep])
    shell = np.where(parent < 0, np.arange(len(lengths)), parent)
    order = np.lexsort((parent >= 0, shell))  # each shell, then its holes
    _, polygon = np.unique(shell[order], return_inverse=True)
    return shapely.polygons(rings[order], indices=polygon)


def _lines_to_trace(occupied: np.ndarray) -> np.ndarray:
    """Indices of the ``occupied`` lines from the first to the last, with the first empty line of
    each gap between them."""
    lines = np.flatnonzero(occupied)
    if not len(lines):
        return lines
    run = occupied[lines[0] : lines[-1] + 1]
    return lines[0] + np.flatnonzero(run | np.r_[False, run[:-1]])


class PolygonEncoder(Protocol):
    """Finishes and encodes final polygons where they are spooled (e.g.
    :class:`wsi_medcam.export.geojson.EvidenceEncoder`)."""

    per_class: dict[int, tuple[int, float]]  # per class index: (polygons, area) written so far

    def write(self, out: IO[bytes], classes: np.ndarray, geoms: np.ndarray) -> None:
        """Append a batch of final polygons (class indices, shapely) to ``out``, encoded."""


class EvidencePolygons:
    """Traced hard-mask polygons per class index, in level-0 px, merged and spooled as rows finish.

    A polygon traced inside one span of blocks (not touching an edge it may continue across) is
    final at once. Border pieces stay *open* until :meth:`close_rows` says no later piece can reach
    them: then the open pieces are merged (shared edges dissolve) and every merged polygon out of
    reach of what is still to be traced is final too. Final polygons go to a temporary spool file
    (WKB), so memory depends on the slide's width, never on how many polygons it has. ``cuts`` are
    regions whose polygons were superseded (refined tiles); ``patches`` are the polygons that
    replace them.

    When other processes trace the strips beside some of ours, a polygon that cannot grow here but
    touches one of their ``seams`` (level-0 x) is *held* instead of final: the process that gathers
    every part merges it with theirs (:meth:`adopt`). ``spool_path`` names the spool file (kept
    for that process) instead of an anonymous one. With an ``encoder`` (and a ``spool_path``), that
    process spools its final polygons encoded, as a part of the GeoJSON (:class:`PolygonEncoder`),
    so that they are finished while tiles stream; the gathering process lists such parts in
    :attr:`encoded_parts` instead of reading them back.
    """

    _RECORD = struct.Struct("<HI")  # class index, WKB length

    def __init__(self, spool_dir: Path | None = None, *, flush_every: int = 4096, seams: Sequence[float] = (),
                 spool_path: Path | None = None, encoder: PolygonEncoder | None = None):
        if encoder is not None and spool_path is None:
            raise ValueError("encoded polygons are spooled to a named part file: give spool_path")
        self.spool_dir = spool_dir
        self.flush_every = flush_every
        self.seams = np.sort(np.asarray(seams, np.float64))
        self.spool_path = spool_path
        self.encoder = encoder
        self.encoded_parts: list[tuple[Path, dict[int, tuple[int, float]]]] = []  # adopted: (file, per class)
        self.open: dict[int, list[Polygon]] = {}
        self._merged: dict[int, int] = {}  # per class: how many open pieces (the first) are merged already
        self.held: list[tuple[int, Polygon]] = []
        self.cuts: list[Polygon] = []
        self.patches: dict[int, list[Polygon]] = {}
        self._final: list[tuple[int, Polygon]] = []
        self._spool: IO[bytes] | None = None
        self._adopted: list[Path] = []

    def add(self, class_index: int, polygon: Polygon, *, on_border: bool = True) -> None:
        if on_border:
            self.open.setdefault(class_index, []).append(polygon)
        else:
            self._finalise([(class_index, polygon)])

    def close_rows(self, y: float, x_from: float = -math.inf, seam: float = math.inf) -> None:
        """Finalise what cannot grow: from now on, pieces are traced only at ``x >= x_from`` below
        ``y``, or right of ``seam`` (level-0 px; a strip and the strips after it)."""
        for class_index, pieces in list(self.open.items()):
            merged = _merge_touching(np.array(pieces, dtype=object), self._merged.get(class_index, 0))
            bounds = shapely.bounds(merged) if len(merged) else np.zeros((0, 4))
            reaches = ((bounds[:, 3] >= y - 1e-6) & (bounds[:, 2] >= x_from - 1e-6)) | (bounds[:, 2] >= seam - 1e-6)
            done = merged[~reaches]
            held = self._touches_seam(bounds[~reaches])
            self.held.extend((class_index, g) for g in done[held])
            self._finalise([(class_index, g) for g in done[~held]])
            self.open[class_index] = list(merged[reaches])
            self._merged[class_index] = len(self.open[class_index])

    def _close_all(self) -> None:
        """Finalise every open piece, as :meth:`close_rows` at the end would, except that a group of
        touching pieces is finalised as one MultiPolygon of its pieces, which
        :func:`finish_polygons` dissolves: in the process that gathers the stitching processes'
        parts, the unions of what waited at their seams were half of the GeoJSON step (2-core VM),
        and there they are done wherever the batches are finished (in as many processes)."""
        if len(self.seams):
            raise RuntimeError("pieces held for another process's seams cannot be closed here")
        for class_index, open_pieces in self.open.items():
            pieces = np.array(open_pieces, dtype=object)
            groups = _touching_groups(pieces, self._merged.get(class_index, 0))
            self._finalise([(class_index, pieces[g[0]] if len(g) == 1 else shapely.multipolygons(pieces[g])) for g in groups])
        self.open, self._merged = {}, {}

    def _touches_seam(self, bounds: np.ndarray) -> np.ndarray:
        """Per polygon, from its ``bounds`` (n, 4): does it reach one of :attr:`seams`."""
        if not len(self.seams) or not len(bounds):
            return np.zeros(len(bounds), bool)
        nearest = np.searchsorted(self.seams, bounds[:, 0] - 1e-6)  # first seam right of each left edge
        return (nearest < len(self.seams)) & (self.seams[np.minimum(nearest, len(self.seams) - 1)] <= bounds[:, 2] + 1e-6)

    def adopt(self, spool: Path | None, held: Iterable[tuple[int, Polygon]],
              encoded: dict[int, tuple[int, float]] | None = None) -> None:
        """Take over another process's final polygons (its ``spool_path``, read and deleted by
        :meth:`merged`; or listed in :attr:`encoded_parts` if ``encoded`` gives the polygons and area
        per class its encoder wrote there) and its held ones, which are merged with what touches them."""
        if spool is not None and encoded is not None:
            self.encoded_parts.append((spool, encoded))
        elif spool is not None:
            self._adopted.append(spool)
        for class_index, polygon in held:
            self.add(class_index, polygon)

    def release(self) -> list[tuple[int, Polygon]]:
        """In a stitching process that is done: close every row, write every final polygon to
        :attr:`spool_path`, and return the held ones (what :meth:`adopt` takes, with that file)."""
        self.close_rows(math.inf)
        self._flush()
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        return self.held

    def replace_region(self, region: Polygon, class_index: int, polygons: list[Polygon]) -> None:
        """Drop what was traced inside ``region`` and use ``polygons`` there instead."""
        self.cuts.append(region)
        self.patches.setdefault(class_index, []).extend(polygons)

    def merged(self, simplify_px: float = 0.0, clip: Polygon | None = None) -> Iterator[tuple[int, Polygon]]:
        """All polygons after merging across block and tile borders, simplified by ``simplify_px``
        (level-0 px) and clipped to ``clip``, read back batch by batch."""
        for classes, geoms in self.final_batches():
            yield from finish_polygons(classes, geoms, simplify_px, clip)

    def final_batches(self, *, wkb: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(class indices, polygons) after merging across block and tile borders, batch by batch,
        before :func:`finish_polygons` (what :meth:`merged` yields, for callers that finish the
        batches elsewhere, e.g. in other processes); ``wkb``: as WKB, so that polygons read back
        from a spool go on as they were stored, never decoded here. Pieces still open are grouped
        here but dissolved by :func:`finish_polygons` (:meth:`_close_all`)."""
        self._close_all()
        cut = unary_union(self.cuts) if self.cuts else None
        redo: dict[int, list[Polygon]] = {c: list(p) for c, p in self.patches.items()}
        for classes, geoms in self._batches(decode=cut is not None or not wkb):
            if cut is not None:  # what the cut region touches is re-merged with what replaces it
                hit = shapely.intersects(geoms, cut)
                for c, g in zip(classes[hit], shapely.difference(geoms[hit], cut)):
                    redo.setdefault(int(c), []).append(g)
                classes, geoms = classes[~hit], geoms[~hit]
                geoms = shapely.to_wkb(geoms) if wkb else geoms
            yield classes, geoms
        for class_index in sorted(redo):
            geoms = np.array(_polygon_parts(unary_union(redo[class_index])), dtype=object)
            yield np.full(len(geoms), class_index), shapely.to_wkb(geoms) if wkb else geoms

    def _finalise(self, items: list[tuple[int, Polygon]]) -> None:
        self._final.extend(items)
        if len(self._final) >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        if not self._final:
            return
        if self._spool is None:
            self._spool = (open(self.spool_path, "wb+") if self.spool_path is not None  # noqa: SIM115 - kept open
                           else tempfile.TemporaryFile(dir=self.spool_dir, prefix="evidence-polygons-"))
        geoms = np.array([g for _, g in self._final], dtype=object)
        if self.encoder is not None:
            self.encoder.write(self._spool, np.array([c for c, _ in self._final]), geoms)
        else:
            wkbs = shapely.to_wkb(geoms)
            self._spool.write(b"".join(self._RECORD.pack(c, len(w)) + w for (c, _), w in zip(self._final, wkbs)))
        self._final = []

    def _batches(self, decode: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(class indices, polygons, or their WKB unless ``decode``) read back from the spool and
        the adopted ones, in batches (everything is flushed first); adopted spools are deleted once read."""
        self._flush()
        if self._spool is not None:
            yield from self._read_spool(self._spool, decode)
            self._spool.close()
            self._spool = None
        while self._adopted:
            path = self._adopted.pop(0)
            with open(path, "rb") as spool:
                yield from self._read_spool(spool, decode)
            path.unlink()

    def _read_spool(self, spool: IO[bytes], decode: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        spool.seek(0)
        head = self._RECORD.size
        while True:
            classes, wkbs = [], []
            while len(wkbs) < self.flush_every and (record := spool.read(head)):
                c, n = self._RECORD.unpack(record)
                classes.append(c)
                wkbs.append(spool.read(n))
            if not wkbs:
                break
            wkb = np.array(wkbs, dtype=object)
            yield np.array(classes), shapely.from_wkb(wkb) if decode else wkb


def _group_firsts(pieces: np.ndarray, merged: int = 0) -> np.ndarray:
    """Per piece, the index of the first piece of its group of touching pieces (its own where it
    touches none). The first ``merged`` pieces came out of a merge (none of them touch), so only the
    others are looked up: pieces that wait at a strip's seam pile up, and looking all of them up
    again for every band cost a third of what merging did. Groups are found by propagating the
    lowest index along the touching pairs, halving the paths each round: a band's few dozen pieces
    take a round or two, where scipy's connected components cost ~1.5 ms per band in checks and
    conversions alone (a stitching process, 2-core VM)."""
    n = len(pieces)
    first = np.arange(n)
    if n - merged < 1 or n < 2:
        return first
    a, b = shapely.STRtree(pieces).query(pieces[merged:], predicate="intersects")
    a += merged
    apart = a != b
    a, b = a[apart], b[apart]
    while len(a):
        before = first.copy()
        low = np.minimum(first[a], first[b])
        np.minimum.at(first, a, low)
        np.minimum.at(first, b, low)
        first = first[first]
        if np.array_equal(first, before):
            break
    return first


def _touching_groups(pieces: np.ndarray, merged: int = 0) -> list[np.ndarray]:
    """The groups of touching pieces (indices into ``pieces``, ascending), singletons included, in
    the order of their first piece (:func:`_group_firsts`)."""
    first = _group_firsts(pieces, merged)
    order = np.argsort(first, kind="stable")
    starts = np.flatnonzero(np.diff(first[order], prepend=-1))
    return np.split(order, starts[1:])


def _merge_touching(pieces: np.ndarray, merged: int = 0) -> np.ndarray:
    """Polygons of ``pieces`` with every group of touching pieces dissolved into one, in the order
    of the groups' first pieces; only groups are unioned (a union of all pieces at once costs far
    more when most touch nothing); the first ``merged`` are known apart (:func:`_group_firsts`)."""
    first = _group_firsts(pieces, merged)
    heads = np.flatnonzero(first == np.arange(len(pieces)))
    if len(heads) == len(pieces):
        return pieces
    sizes = np.bincount(first, minlength=len(pieces))[heads]
    out: list[Polygon] = list(pieces[heads])
    for k in np.flatnonzero(sizes > 1)[::-1]:  # from the last, so the earlier positions hold
        out[k : k + 1] = _polygon_parts(unary_union(pieces[first == heads[k]]))
    return np.array(out, dtype=object)


def _simplify(geoms: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker within ``tolerance`` (level-0 px); where that leaves an invalid or empty
    polygon (specks and 1-px lines collapse), the topology-preserving variant instead. On traced
    evidence (pixel staircases) the plain one is ~14× faster (blob masks of 20 % area: 1.83 ->
    0.13 s for 9,038 polygons, 1.2 M vertices) and keeps the rest valid."""
    out = shapely.simplify(geoms, tolerance, preserve_topology=False)
    redo = shapely.is_empty(out) | ~shapely.is_valid(out)
    if redo.any():
        out[redo] = shapely.simplify(geoms[redo], tolerance, preserve_topology=True)
    return out


def finish_polygons(classes: np.ndarray, geoms: np.ndarray, simplify_px: float,
                    clip: Polygon | None) -> Iterator[tuple[int, Polygon]]:
    """Dissolve the groups of touching pieces among a batch of final polygons (MultiPolygons, see
    :meth:`EvidencePolygons._close_all`), then simplify (level-0 px) and clip each polygon; one
    (class, polygon) per part."""
    groups = np.flatnonzero(shapely.get_type_id(geoms) == shapely.GeometryType.MULTIPOLYGON) if len(geoms) else []
    if len(groups):
        parts = [[g] for g in geoms]
        for k in groups:
            parts[k] = _polygon_parts(shapely.union_all(geoms[k]))
        classes = np.repeat(classes, [len(p) for p in parts])
        geoms = np.array([g for p in parts for g in p], dtype=object)
    if simplify_px > 0 and len(geoms):
        geoms = _simplify(geoms, simplify_px)
    if clip is not None and len(geoms):
        bounds, (cx0, cy0, cx1, cy1) = shapely.bounds(geoms), clip.bounds
        outside = (bounds[:, 0] < cx0) | (bounds[:, 1] < cy0) | (bounds[:, 2] > cx1) | (bounds[:, 3] > cy1)
        geoms[outside] = shapely.intersection(geoms[outside], clip)
    for class_index, geom in zip(classes, geoms):
        for part in _polygon_parts(geom):
            yield int(class_index), part


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
        x0, y0 = self.grid.xy_canvas(i)
        home = int(self._home(x0))
        if home < self._strip or (home == self._strip and y0 < self._last_row) or home % self.shard[1] != self.shard[0]:
            raise ValueError(f"tile {i} came out of order: tiles must come in EvidenceStitcher.order()")
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
        polys = list(_trace((evidence >= HARD).astype(np.uint8), x0, y0, ds)[1])
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
                jobs[-1].set_result(_trace(*args, **sides))
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
    if k in _SPREAD and len(cols) == k * image.shape[1]:
        # each pixel repeated k times across (an integer upsampling, e.g. tiles at 0.5 µm/px written
        # at a 0.25 µm/px slide's level 0): a k-byte integer v·0x0101… holds k copies of byte v,
        # whatever the byte order; 10× faster than a gather on a 1024² chunk
        dtype, spread = _SPREAD[k]
        return (out.astype(dtype) * spread).view(np.uint8)
    return out.take(cols, 1)


def _is_range(index: np.ndarray) -> bool:
    """Whether ``index`` is ``arange(a, a + n)``."""
    return int(index[-1]) - int(index[0]) == len(index) - 1 and np.array_equal(index, np.arange(index[0], index[0] + len(index)))


_SPREAD = {k: (np.dtype(f"u{k}"), np.array(int("01" * k, 16), f"u{k}")) for k in (2, 4, 8)}


_Traced = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Per traced region: label values, polygons (or their WKB), may continue beyond the traced span."""


def _trace_wkb(label: np.ndarray, x0: int, y0: int, scale: float, *, open_left: bool, open_right: bool) -> _Traced:
    """:func:`_trace` of one span in a tracing process, its polygons as WKB, which cross process
    boundaries cheaply."""
    values, polygons, on_border = _trace(label, x0, y0, scale, open_left=open_left, open_right=open_right)
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
