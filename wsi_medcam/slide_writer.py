"""Writing pyramidal slides: tiled JPEG TIFF in the Aperio layout that OpenSlide and tiffslide read.

Level 0 first, a small stripped thumbnail page second, then each 2× reduced level as its own page
(not SubIFDs, which OpenSlide shows as one level), with an Aperio description carrying ``MPP`` and
matching resolution tags. Used by the demo, the tests and the benchmarks to build slides from real
pixels. Levels are produced tile by tile from a callable, so a gigapixel slide never exists in
memory as a whole. Tiles are JPEG-encoded by Pillow (libjpeg-turbo) on a thread pool and handed
to tifffile as finished segments, so writing needs no imagecodecs and a 100k² slide uses every core.
Written under a hidden name and renamed when complete: a killed 100k² build leaves no slide that
opens with half its tiles.
"""

from __future__ import annotations

import hashlib
import io
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from .cpus import usable_cores
from .replaced import replaced

TileFn = Callable[[int, int, int, int], np.ndarray]
"""(x, y, width, height) in level-0 px → RGB uint8 (height, width, 3)."""


def box_reduced(read: TileFn, factor: int) -> TileFn:
    """A :data:`TileFn` over the level ``factor``× smaller than ``read``'s, in that level's px:
    ``read``'s pixels averaged ``factor`` × ``factor`` at a time (Pillow's BOX filter)."""
    if factor == 1:
        return read

    def reduced(x: int, y: int, w: int, h: int) -> np.ndarray:
        src = read(x * factor, y * factor, w * factor, h * factor)
        return np.asarray(Image.fromarray(src).resize((w, h), Image.Resampling.BOX))

    return reduced


def _level_tile(read: TileFn, width: int, height: int, tile: int, tx: int, ty: int) -> np.ndarray:
    """The ``tile``² piece at (``tx``, ``ty``) of a ``width`` × ``height`` level that ``read``
    reads in its own px, padded with white beyond the level's edge."""
    w, h = min(tile, width - tx), min(tile, height - ty)
    out = np.full((tile, tile, 3), 255, np.uint8)
    out[:h, :w] = read(tx, ty, w, h)
    return out


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _encoded_level(pool: ThreadPoolExecutor, window: int, read: TileFn, lw: int, lh: int, tile: int,
                   quality: int, seen: dict[bytes, bytes] | None) -> Iterator[bytes]:
    """The JPEG tiles of the ``lw`` × ``lh`` level that ``read`` reads, in TIFF order, made on
    ``pool`` with at most ``window`` in flight (so memory stays bounded however large the level);
    with ``seen`` (digest → JPEG), a tile met before is not encoded again."""
    def encode(tx: int, ty: int) -> bytes:
        rgb = _level_tile(read, lw, lh, tile, tx, ty)
        if seen is None:
            return _jpeg(rgb, quality)
        key = hashlib.blake2b(rgb.data, digest_size=16).digest()
        if key not in seen:
            seen[key] = _jpeg(rgb, quality)
        return seen[key]

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


def pyramid_levels(width: int, height: int, level_factor: int = 2, coarsest_px: int = 4096) -> int:
    """How many levels a scanner would write: down to the first level at most ``coarsest_px`` on
    its longer side (Aperio's CMU-1.svs: 46000, 11500, 2875 px wide, levels 4× apart). A pyramid
    that stops higher makes every thumbnail read decode several times the pixels it needs."""
    levels, side = 1, max(width, height)
    while side > coarsest_px:
        side //= level_factor
        levels += 1
    return levels


def write_pyramid(
    path: Path,
    read: TileFn,
    width: int,
    height: int,
    *,
    mpp: float | None,
    levels: int = 3,
    level_factor: int = 2,
    aperio: bool = True,
    tile: int = 256,
    quality: int = 90,
    reduced: Callable[[int], TileFn] | None = None,
    repeats: bool = False,
) -> Path:
    """Write a ``levels``-level pyramid of the ``width`` × ``height`` slide that ``read`` describes,
    each level ``level_factor``× smaller than the one below (Aperio's scanners write 4: a 40× scan
    holds no 20× level, and 20× tiles are read from level 0 and halved).

    ``mpp=None`` writes no resolution at all (a slide without metadata); ``aperio=False`` writes a
    generic tiled TIFF (resolution tags only). ``reduced(f)`` reads the level ``f``× smaller in its
    own px, where the caller has it cheaper than :func:`box_reduced` (which reads every level-0
    pixel again for each level: most of the time of a 100k² slide). ``repeats``: tiles recur (a
    benchmark slide tiled from a few pieces), so each distinct one is JPEG-encoded once (a 16-byte
    BLAKE2 digest of its pixels, ~0.2 ms, against ~1.3 ms to encode a 256² tile).
    """
    desc = f"Aperio Image Library v12.0.16\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
    if mpp is not None:
        desc += f"|AppMag = 20|MPP = {mpp}"
    extra = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    common = dict(photometric="rgb", compression="jpeg", dtype=np.uint8, metadata=None, **extra)
    _accept_encoded_jpeg()

    def level_read(factor: int) -> TileFn:  # the reader of the level ``factor``× smaller, in its own px
        return read if factor == 1 else reduced(factor) if reduced else box_reduced(read, factor)

    seen: dict[bytes, bytes] | None = {} if repeats else None
    threads = min(16, usable_cores())
    with (replaced(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=width * height > 2**31) as tif,
          ThreadPoolExecutor(threads) as pool):
        for level in range(levels):
            factor = level_factor**level
            lw, lh = max(1, width // factor), max(1, height // factor)
            tif.write(_encoded_level(pool, 4 * threads, level_read(factor), lw, lh, tile, quality, seen),
                      shape=(lh, lw, 3), tile=(tile, tile), description=desc if aperio or level == 0 else None,
                      subfiletype=0 if level == 0 else 1, **common)
            if level == 0 and aperio:
                top = level_factor ** (levels - 1)  # from the smallest level: a few more of its pixels, not all of level 0's
                thumb = _thumbnail(level_read(top), max(1, width // top), max(1, height // top),
                                   max(1, max(width, height) // 512 // top))
                tif.write(iter([_jpeg(thumb, quality)]), shape=thumb.shape, rowsperstrip=thumb.shape[0],
                          description=desc, **common)
    return Path(path)


def _thumbnail(read: TileFn, width: int, height: int, factor: int, tile: int = 8) -> np.ndarray:
    """The ``width`` × ``height`` level that ``read`` reads, ``factor``× reduced, assembled from
    ``tile``-px pieces so that no read is larger than (``tile`` · ``factor``)² px (a 100k² slide is
    never read at once)."""
    th, tw = max(1, height // factor), max(1, width // factor)
    out = np.empty((-(-th // tile) * tile, -(-tw // tile) * tile, 3), np.uint8)
    reduced = box_reduced(read, factor)
    for ty in range(0, th, tile):
        for tx in range(0, tw, tile):
            out[ty : ty + tile, tx : tx + tile] = _level_tile(reduced, tw, th, tile, tx, ty)
    return out[:th, :tw]
