"""Writing pyramidal slides: tiled JPEG TIFF in the Aperio layout that OpenSlide and tiffslide read.

Level 0 first, a small stripped thumbnail page second, then each 2× reduced level as its own page
(not SubIFDs, which OpenSlide shows as one level), with an Aperio description carrying ``MPP`` and
matching resolution tags. Used by the demo, the tests and the benchmarks to build slides from real
pixels. Levels are produced tile by tile from a callable, so a gigapixel slide never exists in
memory as a whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

TileFn = Callable[[int, int, int, int], np.ndarray]
"""(x, y, width, height) in level-0 px → RGB uint8 (height, width, 3)."""


def _level_tiles(read: TileFn, width: int, height: int, factor: int, tile: int) -> Iterator[np.ndarray]:
    """Tiles of the level ``factor``× smaller than level 0, each made from level-0 pixels."""
    lw, lh = max(1, width // factor), max(1, height // factor)
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            w, h = min(tile, lw - tx), min(tile, lh - ty)
            src = read(tx * factor, ty * factor, w * factor, h * factor)
            if factor > 1:
                src = np.asarray(Image.fromarray(src).resize((w, h), Image.Resampling.BOX))
            out = np.full((tile, tile, 3), 255, np.uint8)
            out[:h, :w] = src
            yield out


def array_reader(level0: np.ndarray) -> TileFn:
    """A :data:`TileFn` over an in-memory RGB array (white beyond its edges)."""
    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, np.uint8)
        part = level0[y : y + h, x : x + w]
        out[: part.shape[0], : part.shape[1]] = part
        return out
    return read


def write_pyramid(
    path: Path,
    read: TileFn,
    width: int,
    height: int,
    *,
    mpp: float | None,
    levels: int = 3,
    aperio: bool = True,
    tile: int = 256,
    quality: int = 90,
) -> Path:
    """Write a ``levels``-level pyramid of the ``width`` × ``height`` slide that ``read`` describes.

    ``mpp=None`` writes no resolution at all (a slide without metadata); ``aperio=False`` writes a
    generic tiled TIFF (resolution tags only).
    """
    desc = f"Aperio Image Library v12.0.16\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
    if mpp is not None:
        desc += f"|AppMag = 20|MPP = {mpp}"
    extra = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": quality}, metadata=None, **extra)
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tif:
        for level in range(levels):
            factor = 2**level
            shape = (max(1, height // factor), max(1, width // factor), 3)
            tif.write(_level_tiles(read, width, height, factor, tile), shape=shape, dtype=np.uint8, tile=(tile, tile),
                      description=desc if aperio or level == 0 else None, subfiletype=0 if level == 0 else 1, **common)
            if level == 0 and aperio:
                tif.write(_thumbnail(read, width, height, max(1, max(width, height) // 512)), description=desc, **common)
    return Path(path)


def _thumbnail(read: TileFn, width: int, height: int, factor: int, tile: int = 8) -> np.ndarray:
    """The ``factor``× reduced slide, assembled from ``tile``-px pieces so that no read is larger
    than (``tile`` · ``factor``)² level-0 px (a 100k² slide is never read at once)."""
    th, tw = max(1, height // factor), max(1, width // factor)
    out = np.empty((-(-th // tile) * tile, -(-tw // tile) * tile, 3), np.uint8)
    pieces = _level_tiles(read, width, height, factor, tile)
    for ty in range(0, th, tile):
        for tx in range(0, tw, tile):
            out[ty : ty + tile, tx : tx + tile] = next(pieces)
    return out[:th, :tw]
