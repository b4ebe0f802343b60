"""Writing pyramidal slides: tiled JPEG TIFF in the Aperio layout that OpenSlide and tiffslide read.

Level 0 first, a small stripped thumbnail page second, then each 2× reduced level as its own page
(not SubIFDs, which OpenSlide shows as one level), with an Aperio description carrying ``MPP`` and
matching resolution tags. Used by the demo, the tests and the benchmarks to build slides from real
pixels. Levels are produced tile by tile from a callable, so a gigapixel slide never exists in
memory as a whole. Tiles are JPEG-encoded by Pillow (libjpeg-turbo) on a thread pool and handed
to tifffile as finished segments, so writing needs no imagecodecs and a 100k² slide uses every core.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from .cpus import usable_cores

TileFn = Callable[[int, int, int, int], np.ndarray]
"""(x, y, width, height) in level-0 px → RGB uint8 (height, width, 3)."""


def _level_tile(read: TileFn, width: int, height: int, factor: int, tile: int, tx: int, ty: int) -> np.ndarray:
    """The ``tile``² piece at (``tx``, ``ty``) of the level ``factor``× smaller than level 0, made from
    level-0 pixels and padded with white beyond the level's edge."""
    lw, lh = max(1, width // factor), max(1, height // factor)
    w, h = min(tile, lw - tx), min(tile, lh - ty)
    src = read(tx * factor, ty * factor, w * factor, h * factor)
    if factor > 1:
        src = np.asarray(Image.fromarray(src).resize((w, h), Image.Resampling.BOX))
    out = np.full((tile, tile, 3), 255, np.uint8)
    out[:h, :w] = src
    return out


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _encoded_level(pool: ThreadPoolExecutor, window: int, read: TileFn, width: int, height: int, factor: int,
                   tile: int, quality: int) -> Iterator[bytes]:
    """The JPEG tiles of one level in TIFF order, made on ``pool`` with at most ``window`` in flight
    (so memory stays bounded however large the level)."""
    def encode(tx: int, ty: int) -> bytes:
        return _jpeg(_level_tile(read, width, height, factor, tile, tx, ty), quality)

    lw, lh = max(1, width // factor), max(1, height // factor)
    pending: deque = deque()
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            pending.append(pool.submit(encode, tx, ty))
            if len(pending) >= window:
                yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _accept_encoded_jpeg() -> None:
    """Let tifffile take JPEG segments that Pillow already encoded, without imagecodecs.

    tifffile looks up its own JPEG encoder even for pre-encoded segments, and that encoder comes
    from imagecodecs, which lean GPU images lack (it is never called for bytes). Where the lookup
    fails, a stand-in that refuses to encode takes its place.
    """
    try:
        tifffile.TIFF.COMPRESSORS[7]
    except KeyError:
        def refuse(*_args: object, **_kwargs: object) -> bytes:
            raise RuntimeError("slide_writer hands tifffile encoded JPEG segments only")
        tifffile.TIFF.COMPRESSORS._codecs[7] = refuse  # noqa: SLF001 - tifffile has no public registry


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
    common = dict(photometric="rgb", compression="jpeg", dtype=np.uint8, metadata=None, **extra)
    _accept_encoded_jpeg()
    threads = min(16, usable_cores())
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tif, ThreadPoolExecutor(threads) as pool:
        for level in range(levels):
            factor = 2**level
            shape = (max(1, height // factor), max(1, width // factor), 3)
            tif.write(_encoded_level(pool, 4 * threads, read, width, height, factor, tile, quality), shape=shape, tile=(tile, tile),
                      description=desc if aperio or level == 0 else None, subfiletype=0 if level == 0 else 1, **common)
            if level == 0 and aperio:
                thumb = _thumbnail(read, width, height, max(1, max(width, height) // 512))
                tif.write(iter([_jpeg(thumb, quality)]), shape=thumb.shape, rowsperstrip=thumb.shape[0],
                          description=desc, **common)
    return Path(path)


def _thumbnail(read: TileFn, width: int, height: int, factor: int, tile: int = 8) -> np.ndarray:
    """The ``factor``× reduced slide, assembled from ``tile``-px pieces so that no read is larger
    than (``tile`` · ``factor``)² level-0 px (a 100k² slide is never read at once)."""
    th, tw = max(1, height // factor), max(1, width // factor)
    out = np.empty((-(-th // tile) * tile, -(-tw // tile) * tile, 3), np.uint8)
    for ty in range(0, th, tile):
        for tx in range(0, tw, tile):
            out[ty : ty + tile, tx : tx + tile] = _level_tile(read, width, height, factor, tile, tx, ty)
    return out[:th, :tw]
