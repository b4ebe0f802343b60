"""Soft evidence as 8-bit levels, the form in which it leaves the models.

The evidence store keeps soft evidence as uint8 (0–255), so the models' float masks are rounded to
those levels where they are made (on the GPU, beside the models) rather than by the stitchers: a
tile's mask is then a quarter of the bytes to copy off the device, to send to a stitching process,
to carry across a strip border and to accumulate, and a chunk needs no float-to-byte conversion.
A pixel's evidence is *hard* (it is in the traced polygons and the label image) from level
:data:`HARD`: ``round(255 · soft) >= 128`` exactly when ``soft >= 0.5``.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

HARD = 128
"""The first level of hard evidence (soft ≥ 0.5)."""

Masks = TypeVar("Masks")  # a numpy array or a torch tensor


def quantise(soft: Masks) -> Masks:
    """``soft`` in [0, 1] (a numpy array or a torch tensor, on any device) as uint8 levels
    ``round(255 · soft)`` (ties to even, as both libraries round)."""
    if isinstance(soft, np.ndarray):
        return np.rint(soft * 255).astype(np.uint8)
    import torch  # a tensor came, so torch is loaded; modules that only stitch need not load it

    return (soft * 255).round_().to(torch.uint8)


def as_levels(mask: np.ndarray) -> np.ndarray:
    """``mask`` as uint8 levels: as given if it already is, else soft evidence in [0, 1] quantised.

    Raises
    ------
    ValueError
        for soft evidence outside [0, 1] (e.g. a heatmap in 0–255 as float, which would wrap around).
    """
    if mask.dtype == np.uint8:
        return mask
    if mask.size and not (mask.min() >= 0 and mask.max() <= 1):  # NaN fails both
        raise ValueError(f"soft evidence must lie in [0, 1], got values in [{mask.min()}, {mask.max()}]")
    return quantise(mask)


_SPREAD = {k: (np.dtype(f"u{k}"), np.array(int("01" * k, 16), f"u{k}")) for k in (2, 4, 8)}


def repeat_across(image: np.ndarray, k: int) -> np.ndarray:
    """A uint8 ``image`` (H, W) with each pixel repeated ``k`` times across, (H, k·W): a nearest
    upsampling of levels or labels (e.g. tiles at 0.5 µm/px written at a 0.25 µm/px slide's level 0).
    For k = 2, 4, 8 a k-byte integer v·0x0101… holds k copies of byte v whatever the byte order:
    ~10× a gather on a 1024² chunk, 7× ``cv2.resize``."""
    if k in _SPREAD:
        dtype, spread = _SPREAD[k]
        return (image.astype(dtype) * spread).view(np.uint8)
    return np.repeat(image, k, axis=1)
