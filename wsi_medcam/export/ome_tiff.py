"""A stitched NGFF store as a pyramidal OME-TIFF, for viewers without Zarr (QuPath 0.5 and older).

The OME-TIFF pyramid layout (the OME data model's, which Bio-Formats and QuPath read): level 0 as
the image's page, every coarser level as a SubIFD of it, 512² tiles, deflate, physical pixel size
in µm in the OME-XML. The levels are the store's own (read from its ``multiscales`` metadata, never
assumed), copied tile row by tile row, so memory holds one row of one level however large the
slide. Written under a temporary name and renamed when complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile
import zarr

from ..errors import OutputError
from ..replaced import replaced

TILE = 512


def _levels(group: zarr.Group, store: Path) -> list[tuple[zarr.Array, float]]:
    """The pyramid's arrays, finest first, each with its µm/px, from NGFF 0.4 ``multiscales``."""
    multiscales = group.attrs.get("multiscales")
    if not multiscales:
        raise OutputError(f"{store}: not an NGFF image (no multiscales metadata); was its run finished?")
    levels = []
    for dataset in multiscales[0]["datasets"]:
        scale = next(t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale")
        levels.append((group[dataset["path"]], float(scale[-1])))
    return levels


def _tiles(array: zarr.Array, progress: Callable[[int], None]) -> Iterator[np.ndarray]:
    """``array`` (1, H, W) as TILE² tiles in TIFF order (row-major, padded with 0), read one tile
    row at a time (counted as read: tifffile stops asking after the last tile)."""
    _, height, width = array.shape
    for y in range(0, height, TILE):
        band = np.asarray(array[0, y : y + TILE])
        progress(band.shape[0])
        for x in range(0, width, TILE):
            tile = np.zeros((TILE, TILE), array.dtype)
            piece = band[:, x : x + TILE]
            tile[: piece.shape[0], : piece.shape[1]] = piece
            yield tile


def write_ome_tiff(store: Path, out: Path, *, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the NGFF image at ``store`` (e.g. ``evidence.ome.zarr``, or its ``labels/evidence``) to
    ``out`` as a pyramidal OME-TIFF; ``progress(rows, total)`` is called as bands of rows are copied
    (``total``: the rows of every level). Returns ``out``."""
    try:
        group = zarr.open_group(str(store), mode="r")
    except (OSError, ValueError, zarr.errors.GroupNotFoundError) as exc:
        raise OutputError(f"cannot open {store} as a Zarr image: {exc}") from None
    levels = _levels(group, Path(store))
    mpp = levels[0][1]
    total = sum(level.shape[1] for level, _ in levels)
    done = lambda rows: progress(rows, total) if progress else None  # noqa: E731
    out = Path(out)
    metadata = {"axes": "YX", "Name": group.attrs["multiscales"][0].get("name") or Path(store).name,
                "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}
    options = {"tile": (TILE, TILE), "compression": "zlib", "photometric": "minisblack", "resolutionunit": "CENTIMETER"}
    try:
        with replaced(out) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            for i, (level, level_mpp) in enumerate(levels):
                shape, dtype = level.shape[1:], level.dtype
                extra = {"subifds": len(levels) - 1, "metadata": metadata} if i == 0 else {"subfiletype": 1}
                tif.write(_tiles(level, done), shape=shape, dtype=dtype,
                          resolution=(1e4 / level_mpp, 1e4 / level_mpp), **extra, **options)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out
