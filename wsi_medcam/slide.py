"""Opening whole-slide images and reading them at a physical resolution.

OpenSlide is tried first (svs, ndpi, mrxs, scn, dicom, generic tiff ...); tiffslide covers what
OpenSlide refuses (OME-TIFF). Both expose the same API, so one thin :class:`Slide` wraps either.
Coordinates: ``xy_level0`` is always in level-0 pixels; sizes carry their resolution in the name.
Handles are never pickled: :class:`SlideRef` carries the path and opens lazily in each process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from .cpus import usable_cores
from .errors import ConfigError, MissingMetadataError, ResolutionError, SlideOpenError, SlideReadError
from .inputs import read_csv_rows
from .tiff_tiles import TiffTiles

Backend = Literal["openslide", "tiffslide"]
BACKENDS = ("auto", "openslide", "tiffslide")  # what open_slide accepts: auto tries OpenSlide, then tiffslide
MPP_RANGE = (0.05, 5.0)
"""Plausible scan resolutions, µm/px; anything outside is a metadata error, not a scanner."""


def _import_backend(name: Backend) -> Any:
    if name == "openslide":
        import openslide

        return openslide
    import tiffslide

    return tiffslide


def _open_handle(path: Path, backend: Backend) -> Any:
    module = _import_backend(backend)
    cls = module.OpenSlide if backend == "openslide" else module.TiffSlide
    return cls(str(path))


def _white_beyond(region: np.ndarray, xy_level0: tuple[int, int], downsample: float,
                  level_size: tuple[int, int]) -> np.ndarray:
    """``region`` (read at level px ``int(xy_level0 / downsample)``, as tiffslide places it) with
    every px beyond the level's ``level_size`` (w, h) white: tiffslide pads there with black, which
    a classifier takes for dark tissue, where OpenSlide gives transparent px (glass once composited)."""
    h, w = region.shape[:2]
    x, y = (int(v / downsample) for v in xy_level0)
    x0, x1 = min(max(-x, 0), w), min(max(level_size[0] - x, 0), w)
    y0, y1 = min(max(-y, 0), h), min(max(level_size[1] - y, 0), h)
    if (x0, x1, y0, y1) == (0, w, 0, h):
        return region
    out = np.full_like(region, 255)
    out[y0:y1, x0:x1] = region[y0:y1, x0:x1]
    return out


def shrink(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``rgb`` (HxWx3 uint8) reduced to ``size`` (width, height) by an area (box) mean, OpenCV's
    INTER_AREA, for thumbnails and tiles: 28× faster than PIL's BOX resize on 1024² → 512² (0.2
    against 5.7 ms), 3× faster than PIL's ``reduce()`` on 448² → 224² (0.12 against 0.38). By an
    integer factor each k×k block's mean correctly rounded (PIL's ``reduce()`` rounds ties the other
    way at times, and drifted by 2 levels for 448); other factors weigh each source px by the area
    it covers, as PIL's BOX does, to within one level."""
    return cv2.resize(np.ascontiguousarray(rgb), size, interpolation=cv2.INTER_AREA)


def composite_on_white(image: np.ndarray) -> np.ndarray:
    """Return HxWx3 uint8 RGB, compositing RGBA onto white (transparent pixels become white).

    Parameters
    ----------
    image : np.ndarray
        HxWx3 RGB or HxWx4 RGBA, uint8 (0-255).

    Returns
    -------
    np.ndarray
        HxWx3 uint8 RGB; ``image`` itself when it is already RGB.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 or HxWx4 uint8 image, got {image.dtype} {image.shape}")
    if image.shape[2] == 3:
        return image
    if image[..., 3].min() == 255:  # fully opaque, the usual case inside a scan: skip the arithmetic
        return np.ascontiguousarray(image[..., :3])
    # 255 - (255 - rgb) * alpha / 255, rounded, in integers: the product fits in uint16.
    ink = (255 - image[..., :3]).astype(np.uint16) * image[..., 3:]
    return (255 - (ink + 127) // 255).astype(np.uint8)


@dataclass(frozen=True)
class Mpp:
    """Microns per pixel at level 0 and where the value came from."""

    x: float
    y: float
    source: str

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2


def _plausible(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and MPP_RANGE[0] <= value <= MPP_RANGE[1]


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _mpp_from_resolution_tags(props: dict[str, Any]) -> tuple[float, float] | None:
    """TIFF XResolution/YResolution are pixels per unit; convert to µm/px."""
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    per_unit = {"centimeter": 10_000.0, "inch": 25_400.0}.get(unit)
    xres, yres = _as_float(props.get("tiff.XResolution")), _as_float(props.get("tiff.YResolution"))
    if per_unit is None or not xres or not yres:
        return None
    return per_unit / xres, per_unit / yres


def read_mpp_csvs(paths: Sequence[Path]) -> dict[str, float]:
    """:func:`read_mpp_csv` of each of ``paths``, merged: the first CSV that has a key wins."""
    table: dict[str, float] = {}
    for path in paths:
        for key, value in read_mpp_csv(path).items():
            table.setdefault(key, value)
    return table


def read_mpp_csv(path: Path) -> dict[str, float]:
    """Read a ``path,mpp`` CSV (header optional; relative paths are relative to the CSV) into
    {resolved path: mpp} plus {file name: mpp} as a fallback key. Rows without an mpp are skipped."""
    table: dict[str, float] = {}
    for row in read_csv_rows(path, "mpp CSV"):
        if len(row) < 2 or not row[0].strip() or not row[1].strip() or row[0].strip().lower() == "path":
            continue
        value = _as_float(row[1])
        if value is None:
            raise MissingMetadataError(f"{path}: mpp '{row[1]}' for {row[0]} is not a number")
        entry = Path(row[0].strip())
        table[str(entry if entry.is_absolute() else (Path(path).parent / entry).resolve())] = value
        table.setdefault(entry.name, value)
    return table


@dataclass(frozen=True)
class MppOverrides:
    """User-supplied resolutions, one for the run (``--mpp``) and/or per slide (CSV), for slides
    whose metadata and TIFF resolution tags give no plausible one: the last link of the lookup chain
    (a slide's own value is never replaced; where one was used, ``Slide.mpp.source`` says so)."""

    run: float | None = None
    per_slide: dict[str, float] = field(default_factory=dict)

    def lookup(self, path: Path) -> tuple[float, str] | None:
        for key in (str(path.resolve()), path.name):
            if key in self.per_slide:
                return self.per_slide[key], "csv"
        if self.run is not None:
            return self.run, "override"
        return None


class Slide:
    """An open slide: level geometry, resolution and region reads at a target µm/px.

    Use :func:`open_slide`; close with :meth:`close` or a ``with`` block.
    """

    def __init__(self, path: Path, backend: Backend, handle: Any, mpp: Mpp):
        self.path = path
        self.backend = backend
        self._handle = handle
        self.mpp = mpp
        self.closed = False

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (again: nothing). The geometry and resolution stay readable; regions do not."""
        if self.closed:
            return
        self.closed = True
        if self.__dict__.get("_tiles") is not None:
            self._tiles.close()
        self._handle.close()

    # The geometry is read once: OpenSlide answers each of these through several ctypes calls, and a
    # tile read asks for it a few times (py-spy: 8 % of a reader's time, batches of 256 at 0.5 µm/px).
    @cached_property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height), px."""
        return tuple(self._handle.dimensions)  # type: ignore[return-value]

    @cached_property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [tuple(d) for d in self._handle.level_dimensions]  # type: ignore[misc]

    @cached_property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._handle.level_downsamples]

    @cached_property
    def properties(self) -> dict[str, Any]:
        return dict(self._handle.properties)

    @property
    def vendor(self) -> str | None:
        module = _import_backend(self.backend)
        value = self.properties.get(module.PROPERTY_NAME_VENDOR)
        return str(value) if value else None

    @property
    def associated_images(self) -> list[str]:
        return sorted(self._handle.associated_images.keys())

    def best_level(self, downsample: float, tolerance: float) -> int:
        """Largest level whose downsample is <= ``downsample`` within ``tolerance`` (4.0003 counts as 4)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + tolerance):
                best = level
        return best

    @cached_property
    def _tiles(self) -> TiffTiles | None:
        """Direct tile reads where they give OpenSlide's pixels faster (see :mod:`.tiff_tiles`);
        opened on first use, so in each reader process."""
        if self.backend != "openslide":
            return None
        return TiffTiles.open(self.path, self.vendor, self.level_dimensions, self._reference_read)

    def _reference_read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The backend's read at level px (``x``, ``y``) of a level with an integer downsample."""
        ds = round(self.level_downsamples[level])
        return self._backend_read((x * ds, y * ds), level, (width, height))

    def read_level(self, xy_level0: tuple[int, int], level: int, size_level: tuple[int, int]) -> np.ndarray:
        """Raw region at ``level``: location in level-0 px, size (width, height) in that level's px;
        RGB on white, (height, width, 3)."""
        if not 0 <= level < len(self.level_dimensions):
            raise ValueError(f"{self.path.name}: no level {level}, the slide has {len(self.level_dimensions)}")
        x0, y0 = (int(v) for v in xy_level0)
        ds = self.level_downsamples[level]
        k = round(ds)
        if k == ds and x0 % k == 0 and y0 % k == 0 and self._tiles is not None:
            region = self._tiles.read(level, x0 // k, y0 // k, int(size_level[0]), int(size_level[1]))
            if region is not None:
                return region
        return self._backend_read(xy_level0, level, size_level)

    def _backend_read(self, xy_level0: tuple[int, int], level: int, size_level: tuple[int, int]) -> np.ndarray:
        """:meth:`read_level` through OpenSlide or tiffslide."""
        if self.closed:
            raise SlideReadError(f"{self.path.name}: the slide is closed")
        try:
            region = self._handle.read_region(tuple(int(v) for v in xy_level0), level, tuple(int(v) for v in size_level))
        except Exception as exc:  # noqa: BLE001 - both backends raise their own hierarchies
            raise SlideReadError(
                f"{self.path.name}: read failed at level {level}, x,y={xy_level0}, size={size_level}: {exc}"
            ) from exc
        region = composite_on_white(np.asarray(region))
        if self.backend == "tiffslide":
            region = _white_beyond(region, xy_level0, self.level_downsamples[level], self.level_dimensions[level])
        return region

    def read_region_at(
        self, xy_level0: tuple[int, int], size_px: int | tuple[int, int], mpp: float, *, tolerance: float = 0.02
    ) -> np.ndarray:
        """Read ``size_px`` pixels at ``mpp`` µm/px starting at level-0 ``xy_level0`` (x, y).

        ``size_px`` is one side of a square or (width, height); the result is RGB uint8
        (height, width, 3) on white. The finest level that needs no upsampling is read and reduced
        with an area (box) filter.

        Raises
        ------
        ValueError
            if a size is not a positive integer or ``mpp`` is not positive.
        ResolutionError
            if ``mpp`` is finer than the scan (upsampling is refused).
        SlideReadError
            if the backend fails to decode the region.
        """
        width, height = (size_px, size_px) if np.ndim(size_px) == 0 else size_px
        if not all(isinstance(v, (int, np.integer)) and v > 0 for v in (width, height)) or not mpp > 0:
            raise ValueError(f"need positive integer sizes and µm/px, got size {size_px!r} at {mpp!r} µm/px")
        width, height = int(width), int(height)
        downsample = self.downsample_for(mpp, tolerance)
        level = self.best_level(downsample, tolerance)
        scale = downsample / self.level_downsamples[level]
        if abs(scale - 1) <= tolerance:
            return self.read_level(xy_level0, level, (width, height))
        read_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = self.read_level(xy_level0, level, read_size)
        return shrink(rgb, (width, height))

    def downsample_for(self, mpp: float, tolerance: float = 0.02) -> float:
        """Level-0 pixels per pixel at ``mpp``; refuses resolutions finer than the scan."""
        downsample = mpp / self.mpp.mean
        if downsample < 1 / (1 + tolerance):
            raise ResolutionError(
                f"{self.path.name}: scanned at {self.mpp.mean:.3g} µm/px, coarser than the requested "
                f"{mpp:.3g} µm/px; refusing to upsample (use a model trained at >= {self.mpp.mean:.3g} µm/px)"
            )
        return max(downsample, 1.0)

    def read_thumbnail(self, mpp: float, *, block_level_px: int = 1024) -> tuple[np.ndarray, float]:
        """Whole slide at about ``mpp`` µm/px (never finer than the scan), read block by block.

        Returns the RGB image and its actual µm/px. Memory is bounded by the output plus one block
        per thread, so a single-level gigapixel slide does not load its level 0 at once. Blocks of
        1024² level px: on a 100k² slide whose coarsest level is 12500², 4096² blocks (64 MiB RGBA
        each, plus their copies) raised the peak by 260 MiB, 1024² blocks by 78 MiB, and read no
        slower. Blocks are read on one thread per core (decoding releases the GIL): a 100k² slide's
        6250² level took 2.2 s on one.
        """
        downsample = max(mpp / self.mpp.mean, 1.0)
        level = self.best_level(downsample, 0.02)
        level_ds = self.level_downsamples[level]
        width0, height0 = self.dimensions
        out_w, out_h = max(1, round(width0 / downsample)), max(1, round(height0 / downsample))
        level_w, level_h = self.level_dimensions[level]
        sx, sy = out_w / level_w, out_h / level_h
        out = np.full((out_h, out_w, 3), 255, np.uint8)

        def read(block: tuple[int, int]) -> None:
            bx, by = block
            bw, bh = min(block_level_px, level_w - bx), min(block_level_px, level_h - by)
            x0, x1 = round(bx * sx), round((bx + bw) * sx)
            y0, y1 = round(by * sy), round((by + bh) * sy)
            if x1 <= x0 or y1 <= y0:
                return
            region = self.read_level((round(bx * level_ds), round(by * level_ds)), level, (bw, bh))
            out[y0:y1, x0:x1] = shrink(region, (x1 - x0, y1 - y0)) if (x1 - x0, y1 - y0) != (bw, bh) else region

        blocks = [(bx, by) for by in range(0, level_h, block_level_px) for bx in range(0, level_w, block_level_px)]
        self._tiles  # noqa: B018 - opened here, once, rather than by several threads at once
        with ThreadPoolExecutor(min(usable_cores(), len(blocks)), thread_name_prefix="wsi-medcam-thumbnail") as pool:
            list(pool.map(read, blocks))
        return out, self.mpp.mean * width0 / out_w

    def describe(self) -> dict[str, Any]:
        """What ``wsi-medcam info`` prints and ``report.json`` records."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "levels": [
                {"dimensions": list(dims), "downsample": ds}
                for dims, ds in zip(self.level_dimensions, self.level_downsamples)
            ],
            "mpp": {"x": self.mpp.x, "y": self.mpp.y, "source": self.mpp.source},
            "associated_images": self.associated_images,
        }


def _resolve_mpp(path: Path, backend: Backend, props: dict[str, Any], overrides: MppOverrides) -> Mpp:
    module = _import_backend(backend)
    seen: list[str] = []
    candidates: list[tuple[float | None, float | None, str]] = [
        (_as_float(props.get(module.PROPERTY_NAME_MPP_X)), _as_float(props.get(module.PROPERTY_NAME_MPP_Y)), "metadata"),
    ]
    tags = _mpp_from_resolution_tags(props)
    if tags:
        candidates.append((tags[0], tags[1], "tiff-resolution"))
    user = overrides.lookup(path)
    if user:
        candidates.append((user[0], user[0], user[1]))
    for x, y, source in candidates:
        if x is None:
            continue
        y = y if y is not None else x
        if _plausible(x) and _plausible(y):
            return Mpp(x, y, source)
        seen.append(f"{source} says {x:.4g} µm/px")
    found = f" ({'; '.join(seen)}, outside {MPP_RANGE[0]}–{MPP_RANGE[1]} µm/px)" if seen else ""
    raise MissingMetadataError(
        f"{path.name}: no plausible microns-per-pixel{found}; pass --mpp VALUE or --mpp-csv FILE"
    )


def open_slide(
    path: str | os.PathLike[str],
    *,
    backend: Literal["auto", "openslide", "tiffslide"] = "auto",
    overrides: MppOverrides | None = None,
) -> Slide:
    """Open ``path`` with OpenSlide, falling back to tiffslide, and establish its µm/px.

    Raises
    ------
    SlideOpenError
        missing, empty or unrecognised file.
    MissingMetadataError
        no plausible µm/px from metadata, resolution tags or the user's overrides.
    """
    path = Path(path)
    if not path.exists():
        raise SlideOpenError(f"{path}: no such file")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideOpenError(f"{path.name}: empty file")
    if backend not in BACKENDS:
        raise ConfigError(f"backend '{backend}' is not {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    order: list[Backend] = ["openslide", "tiffslide"] if backend == "auto" else [backend]
    errors: list[str] = []
    for name in order:
        try:
            handle = _open_handle(path, name)
        except Exception as exc:  # noqa: BLE001 - each backend has its own error types
            errors.append(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        try:  # a lazy backend may "open" garbage and fail only on first use: touch the geometry now
            if min(min(d) for d in handle.level_dimensions) < 1 or not handle.level_count:
                raise ValueError("no image levels")
        except Exception as exc:  # noqa: BLE001
            handle.close()
            errors.append(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        try:
            return Slide(path, name, handle, _resolve_mpp(path, name, dict(handle.properties), overrides or MppOverrides()))
        except BaseException:
            handle.close()
            raise
    raise SlideOpenError(f"{path.name}: not a readable slide ({'; '.join(errors)})")


@dataclass(frozen=True)
class SlideRef:
    """A picklable recipe for a slide: what a worker process needs to open its own handle."""

    path: Path
    backend: Backend
    mpp: Mpp

    @classmethod
    def of(cls, slide: Slide) -> "SlideRef":
        return cls(slide.path, slide.backend, slide.mpp)

    def open(self) -> Slide:
        try:
            handle = _open_handle(self.path, self.backend)
        except Exception as exc:  # noqa: BLE001
            raise SlideOpenError(f"{self.path.name}: cannot reopen with {self.backend}: {exc}") from exc
        return Slide(self.path, self.backend, handle, self.mpp)
