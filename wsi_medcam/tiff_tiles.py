"""Reading a TIFF-family slide's levels tile by tile, beside OpenSlide, for speed.

OpenSlide's region API costs far more than decoding the pixels: on a tiled-JPEG Aperio TIFF it
delivers ~35 megapixels/s per core, where imagecodecs (libjpeg-turbo) decodes the same tiles at
~200 (a 224² tile at level 1 of a 0.25 µm/px slide: 1.6 against ~0.3 ms). For Aperio and generic
tiled TIFFs, whose levels are plain tile grids, :class:`TiffTiles` reads the compressed tiles a
region needs with ``os.pread``, decodes them through tifffile, and keeps the most recent ones, so
tiles shared by neighbouring regions are decoded once.

It must return exactly OpenSlide's pixels, so it steps aside wherever it might not:

* only for OpenSlide's ``aperio`` and ``generic-tiff`` vendors, on levels that are tiled 8-bit RGB
  pages of exactly the level's size, with a compression tifffile decodes;
* only for reads on whole level pixels (OpenSlide interpolates at fractional positions);
* a level is trusted only after a read with more than one pixel value matched OpenSlide's
  exactly; until then every read is checked, and one mismatch or decoding error hands the level
  back to OpenSlide for good.

Outside the level, and where a tile is missing, pixels are white, as OpenSlide's transparent ones
are once composited on white. A damaged tile goes to OpenSlide, which reports it, where tifffile
fails or the tile is visibly truncated (a short read, a JPEG without its end marker). What only
libjpeg's warnings reveal (OpenSlide makes them errors; imagecodecs ignores them), such as flipped
bits inside the compressed data, decodes to damaged pixels instead of an error once a level is trusted.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

VENDORS = frozenset({"aperio", "generic-tiff"})
"""OpenSlide vendors whose levels are the TIFF's own tiled pages, one per level."""

_COMPRESSIONS = frozenset({1, 5, 7, 8, 32946})
"""TIFF compressions tifffile decodes exactly as OpenSlide's libtiff does: none, LZW, JPEG, deflate."""

Reference = Callable[[int, int, int, int, int], np.ndarray]
"""(level, x, y, width, height) in level px → RGB uint8: OpenSlide's read, to check against."""


def _usable(page: Any) -> bool:
    """A tiled, contiguous 8-bit RGB page with a decodable compression."""
    return (
        isinstance(page, tifffile.TiffPage)
        and page.is_tiled
        and page.imagedepth == 1
        and page.samplesperpixel == 3
        and not page.extrasamples
        and page.dtype == np.uint8
        and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
        and int(page.compression) in _COMPRESSIONS
    )


@dataclass(frozen=True)
class _Level:
    """What reading one tiled level needs, kept without its TIFF page: tifffile holds a page's tile
    offsets and byte counts as tuples of Python ints, ~40 B per tile each, 12 MiB for the level 0
    of a 100k² slide in every reader process, where numpy takes 16 B per tile."""

    shape: tuple[int, int]  # level px (height, width)
    tile: tuple[int, int]  # tile px (height, width)
    offsets: np.ndarray  # int64, per tile: where its bytes start in the file
    counts: np.ndarray  # int64, per tile: how many (0: the file has no such tile)
    jpeg: bool
    jpegtables: bytes | None
    decode: Callable[..., Any]  # tifffile's decoder for the page (a closure, not holding the page)

    @classmethod
    def of(cls, page: Any) -> "_Level":
        return cls(page.shape[:2], (page.tilelength, page.tilewidth), np.asarray(page.dataoffsets, np.int64),
                   np.asarray(page.databytecounts, np.int64), page.compression == 7, page.jpegtables, page.decode)


class TiffTiles:
    """Direct region reads on the tiled levels of one TIFF; use :meth:`open`, then :meth:`read`.

    cache_bytes : decoded tiles kept, bytes (OpenSlide's own default cache is 32 MiB too).
    """

    def __init__(self, path: Path, levels: dict[int, _Level], reference: Reference, *, cache_bytes: int = 32 << 20):
        # a file object, not a bare descriptor: closing it twice is harmless, and one dropped without
        # close() is closed when collected (a bare fd closed twice could close a file opened since)
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - held for the reader's life
        self._levels = levels
        self._reference = reference
        self._trusted: set[int] = set()
        self._cache: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()  # the cache only: decoding runs unlocked (it releases the GIL)

    @classmethod
    def open(cls, path: Path, vendor: str | None, level_dimensions: list[tuple[int, int]],
             reference: Reference) -> "TiffTiles | None":
        """Direct reads for ``path``'s levels (width, height as OpenSlide reports them), or None
        where no level qualifies."""
        if vendor not in VENDORS or not hasattr(os, "pread"):  # Windows has no pread: OpenSlide reads
            return None
        try:
            with tifffile.TiffFile(path) as tif:
                candidates = [p for p in tif.pages if _usable(p)]
                levels = {}
                for level, (w, h) in enumerate(level_dimensions):
                    page = next((p for p in candidates if p.shape[:2] == (h, w)), None)
                    if page is not None:
                        levels[level] = _Level.of(page)
        except Exception:  # noqa: BLE001 - OpenSlide opened it: it stays the reader
            return None
        return cls(path, levels, reference) if levels else None

    @property
    def trusted_levels(self) -> frozenset[int]:
        """Levels read directly without checking, a read with content having matched OpenSlide."""
        return frozenset(self._trusted)

    def close(self) -> None:
        """Close the file and drop the decoded tiles: a closed slide may be kept for its geometry
        (a run keeps it through the slide, in the model process that read the thumbnail through it,
        and so held up to ``cache_bytes`` of tiles there while the tiles streamed)."""
        self._file.close()
        with self._lock:
            self._cache.clear()
            self._cached = 0

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray | None:
        """RGB uint8 (height, width, 3) at ``level`` from level px (``x``, ``y``), or None where
        OpenSlide must read it (see the module docstring)."""
        lv = self._levels.get(level)  # one lookup: another thread may hand the level back meanwhile
        if lv is None:
            return None
        try:
            region = self._assemble(lv, level, x, y, width, height)
        except Exception:  # noqa: BLE001 - a tile tifffile cannot decode: OpenSlide reports it properly
            self._levels.pop(level, None)
            return None
        if level in self._trusted:
            return region
        if not np.array_equal(region, self._reference(level, x, y, width, height)):
            self._levels.pop(level, None)
            return None
        if region.min() != region.max():
            self._trusted.add(level)
        return region

    def _assemble(self, lv: _Level, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        out = np.full((height, width, 3), 255, np.uint8)
        level_h, level_w = lv.shape
        th, tw = lv.tile
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, level_w), min(y + height, level_h)
        across = -(-level_w // tw)
        for ty in range(y0 // th, (y1 - 1) // th + 1) if y0 < y1 else ():
            for tx in range(x0 // tw, (x1 - 1) // tw + 1) if x0 < x1 else ():
                tile = self._tile(lv, level, ty * across + tx)
                if tile is None:
                    continue
                ys, ye = max(y0, ty * th), min(y1, (ty + 1) * th)
                xs, xe = max(x0, tx * tw), min(x1, (tx + 1) * tw)
                out[ys - y:ye - y, xs - x:xe - x] = tile[ys - ty * th:ye - ty * th, xs - tx * tw:xe - tx * tw]
        return out

    def _tile(self, lv: _Level, level: int, index: int) -> np.ndarray | None:
        """Decoded tile ``index`` of level ``lv`` (th, tw, 3), or None where the file has none."""
        key = (level, index)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        size = int(lv.counts[index])
        tile = None
        if size:
            data = os.pread(self._file.fileno(), size, int(lv.offsets[index]))  # fileno: ValueError once closed
            # libjpeg only warns about a truncated tile and fills it in, which imagecodecs accepts
            # silently, where OpenSlide raises: refuse what a truncation leaves behind
            if len(data) < size or (lv.jpeg and not data.rstrip(b"\0").endswith(b"\xff\xd9")):
                raise ValueError(f"tile {index} of level {level} is truncated")
            tile = lv.decode(data, index, jpegtables=lv.jpegtables)[0][0]
        with self._lock:
            if key not in self._cache:  # another thread may have decoded it meanwhile
                self._cache[key] = tile
                self._cached += 0 if tile is None else tile.nbytes
            while self._cached > self._cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cached -= 0 if old is None else old.nbytes
        return tile
