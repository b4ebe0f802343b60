"""Tissue detection on a low-resolution RGB image (a slide thumbnail or a tile).

Sizes come from :class:`~wsi_medcam.config.TissueConfig` in physical units (µm, µm²) and are
converted to pixels with the image's resolution ``mpp`` (µm/px), so one configuration means the same
thing on a thumbnail at 8 µm/px and on a tile at 0.5 µm/px.

Hues below are in degrees. H&E stains tissue pink to purple, about 260°-345°. Pen ink is recognised
in two steps: unambiguous ink (green, cyan or blue; or red-orange and very saturated) seeds a region
that then grows over the colours ink takes where it is pale, mixed with stain, or laid on thickly
(dark maroon red ink). Those colours also occur in tissue (blood is dark red), so they count as ink
only when connected to unambiguous ink.

The image operations are OpenCV's (colour conversion, median, closing, erosion, connected
components): on a 100k² slide's 6250² thumbnail at 8 µm/px, scikit-image's and SciPy's took ~10 s on
one core, most of a GPU run's serial time; OpenCV's take a fraction of a second.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from skimage.filters import threshold_otsu
from skimage.morphology import disk

from .config import TissueConfig
from .cpus import usable_cores
from .slide import Slide, composite_on_white

_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=np.uint8)
_BAND = 256
"""Rows per band of the per-pixel work done on one thread per core (numpy and OpenCV release the
GIL): on a 100k² slide's 6250² thumbnail, thresholding the planes took 0.13 s on one thread."""


def pen_mask(hsv: np.ndarray) -> np.ndarray:
    """Find pen ink (green, cyan, blue, red, orange) in an HSV image.

    Parameters
    ----------
    hsv : np.ndarray
        HxWx3 float HSV as returned by :func:`skimage.color.rgb2hsv`: hue, saturation and value
        each in [0, 1] (hue 1.0 = 360°).

    Returns
    -------
    np.ndarray
        HxW bool, True on ink.
    """
    return _grow_ink(*_ink_colours(hsv))


def _ink_colours(hsv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: (unambiguous ink, a colour ink may take), both HxW bool."""
    hue = hsv[..., 0] * 360.0
    sat, value = hsv[..., 1], hsv[..., 2]
    red = (hue >= 350.0) | (hue <= 30.0)
    cool = (hue >= 70.0) & (hue <= 235.0)
    sure = (cool & (sat >= 0.15)) | (red & (sat >= 0.7))
    # Pale or stain-mixed ink: any hue outside H&E's 260°-345° with a tint of colour.
    off_stain = ((hue >= 345.0) | (hue <= 260.0)) & (sat >= 0.1)
    # Thickly laid red ink turns dark maroon, the colour of blood.
    dark_red = ((hue >= 300.0) | (hue <= 30.0)) & (sat >= 0.3) & (value < 0.5)
    return sure, sure | off_stain | dark_red


def _grow_ink(sure: np.ndarray, maybe: np.ndarray) -> np.ndarray:
    """Ink: the 8-connected regions of ``maybe`` that hold an eroded seed of ``sure``. Without a seed
    (most slides) there is nothing to label: 0.2 of a 100k² slide's ~1.2 s of mask (2-core VM)."""
    # Eroding the seeds ignores isolated pixels (a saturated red blood cell, a speck of dust); beyond
    # the border there is no ink.
    seeds = cv2.erode(sure.view(np.uint8), _EIGHT_NEIGHBOURS, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    if not cv2.countNonZero(seeds):
        return np.zeros(sure.shape, dtype=bool)
    _, labels = cv2.connectedComponents(maybe.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    seeded = np.zeros(int(labels.max()) + 1, dtype=bool)
    seeded[labels[seeds.view(bool)]] = True
    seeded[0] = False
    return _lookup(seeded, labels)


def _lookup(table: np.ndarray, labels: np.ndarray, band: int = 512) -> np.ndarray:
    """``table[labels]`` for a label image, ``band`` rows at a time on one thread per core (numpy's
    take releases the GIL): on a 100k² slide's 6250² thumbnail 0.05 s on 2 cores, against 0.13 s
    for the fancy index."""
    out = np.empty(labels.shape, table.dtype)

    def take(y: int) -> None:
        np.take(table, labels[y : y + band], out=out[y : y + band])

    _on_bands(take, labels.shape[0], band)
    return out


def _on_bands(fn: Callable[[int], None], height: int, band: int) -> None:
    """``fn(y)`` for each band of ``band`` rows starting at ``y``, on one thread per core."""
    with ThreadPoolExecutor(min(usable_cores(), max(1, -(-height // band))), thread_name_prefix="wsi-medcam-tissue") as pool:
        list(pool.map(fn, range(0, height, band)))


def tissue_mask_from_rgb(rgb: np.ndarray, mpp: float, cfg: TissueConfig) -> np.ndarray:
    """Detect tissue on a low-resolution RGB image.

    HSV saturation is median-filtered and thresholded with Otsu's method (never below
    ``cfg.saturation_floor``); near-black pixels, glass and, with ``cfg.reject_pen``, pen ink are
    removed; the result is closed with a disk and cleaned of small islands and small holes.

    Parameters
    ----------
    rgb : np.ndarray
        HxWx3 uint8 RGB composited on white, or HxWx4 uint8 RGBA (composited onto white here).
    mpp : float
        Resolution of ``rgb``, µm/px.
    cfg : TissueConfig
        Thresholds and physical sizes (µm, µm²); ``cfg.mpp`` is not used, ``mpp`` is.

    Returns
    -------
    np.ndarray
        HxW bool, True on tissue.
    """
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or 0 in rgb.shape:
        raise ValueError(f"expected a non-empty HxWx3 or HxWx4 uint8 image, got {rgb.dtype} {rgb.shape}")
    sat, sat8, value, sure, maybe = _colour_planes(rgb)
    pen = _grow_ink(sure, maybe) if cfg.reject_pen else np.zeros(sat.shape, dtype=bool)

    size = _odd(cfg.median_um / mpp)
    if size > 1:  # at the border, the edge pixels stand in for the ones beyond
        sat8 = cv2.medianBlur(sat8, size)
    # Otsu separates tissue from glass; ink would pull the threshold up, so it is left out. On the
    # histogram of the rest: the same threshold as on its pixels, without copying them.
    counts = cv2.calcHist([sat8], [0], (~pen).view(np.uint8), [256], [0, 256]).reshape(-1)
    otsu = threshold_otsu(hist=counts) / 255.0 if np.count_nonzero(counts) > 1 else 0.0
    threshold = max(otsu, cfg.saturation_floor)

    mask = np.empty(sat.shape, bool)

    def classify(y: int) -> None:
        rows = slice(y, y + _BAND)
        glass = (value[rows] > cfg.max_value) & (sat[rows] < threshold)
        mask[rows] = (sat8[rows] >= threshold * 255.0) & (value[rows] >= cfg.min_value) & ~glass & ~pen[rows]

    _on_bands(classify, mask.shape[0], _BAND)
    radius = (_odd(cfg.close_um / mpp) - 1) // 2
    if radius:
        # Pixels beyond the border count as tissue for the erosion (OpenCV's default border for
        # morphology), so tissue touching the border is kept. The closing may bridge over ink:
        # ink is removed again.
        closed = cv2.morphologyEx(mask.view(np.uint8), cv2.MORPH_CLOSE, disk(radius).astype(np.uint8))

        def unink(y: int) -> None:
            rows = slice(y, y + _BAND)
            mask[rows] = closed[rows].view(bool) & ~pen[rows]

        _on_bands(unink, mask.shape[0], _BAND)
    mask = _drop_small(mask, cfg.min_object_um2 / mpp**2, connectivity=8)
    return ~_drop_small(~mask, cfg.min_hole_um2 / mpp**2, connectivity=4)


def _colour_planes(rgb: np.ndarray, band: int = _BAND) -> tuple[np.ndarray, ...]:
    """(saturation, saturation as uint8 levels, value, unambiguous ink, possible ink) of ``rgb``,
    converted to HSV ``band`` rows at a time: a whole float HSV copy of a 100k² slide's thumbnail
    and its temporaries cost over 500 MB, the planes 4 bytes and 3 bytes per pixel. Bands are
    converted on one thread per core (OpenCV and numpy release the GIL)."""
    height, width = rgb.shape[:2]
    sat, value = (np.empty((height, width), np.float32) for _ in range(2))
    sat8 = np.empty((height, width), np.uint8)
    sure, maybe = (np.empty((height, width), bool) for _ in range(2))

    def convert(y: int) -> None:
        hsv = _hsv(composite_on_white(rgb[y : y + band]))
        sat[y : y + band], value[y : y + band] = hsv[..., 1], hsv[..., 2]
        sat8[y : y + band] = np.rint(hsv[..., 1] * 255.0)
        sure[y : y + band], maybe[y : y + band] = _ink_colours(hsv)

    _on_bands(convert, height, band)
    return sat, sat8, value, sure, maybe


def _hsv(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 float32 HSV of uint8 RGB, each channel in [0, 1] (hue 1.0 = 360°) as
    :func:`skimage.color.rgb2hsv` gives it (to within 1e-5), 100× faster."""
    hsv = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)
    hsv[..., 0] /= 360.0
    return hsv


def tissue_fraction(mask: np.ndarray) -> float:
    """Fraction of a bool mask that is tissue, in [0, 1]; 0.0 for an empty mask."""
    return float(mask.mean()) if mask.size else 0.0


def _odd(length_px: float) -> int:
    """Round a length in pixels to an odd integer, at least 1."""
    return max(1, 2 * int(round((length_px - 1.0) / 2.0)) + 1)


def _drop_small(mask: np.ndarray, min_px: float, connectivity: int) -> np.ndarray:
    """Remove the ``connectivity``-connected (4 or 8) components of ``mask`` with fewer than
    ``min_px`` pixels."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(mask).view(np.uint8),
                                                           connectivity=connectivity, ltype=cv2.CV_32S)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return _lookup(keep, labels)


@dataclass(frozen=True)
class TissueMask:
    """Tissue mask of a whole slide and the thumbnail it was computed on.

    ``mask`` (bool) and ``thumbnail`` (RGB uint8) cover the slide's level-0 extent at ``mpp`` µm/px.
    """

    mask: np.ndarray
    thumbnail: np.ndarray
    mpp: float


def detect_tissue(slide: Slide, cfg: TissueConfig) -> TissueMask:
    """Read the slide at about ``cfg.mpp`` µm/px (block by block) and find its tissue."""
    thumbnail, mpp = slide.read_thumbnail(cfg.mpp)
    return TissueMask(tissue_mask_from_rgb(thumbnail, mpp, cfg), thumbnail, mpp)
