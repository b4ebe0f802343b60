"""Tiles of real H&E with a planted structure at a random place: evidence whose location is known.

A classifier trained to tell planted from plain tiles has exactly one piece of class-defining
evidence per positive tile, so explanations can be scored against ground truth (IoU, pointing
game) — what the demo and the learning tests need. The marker is a ring of dark, haematoxylin-like
ink: textured by the tissue beneath it, about 3 % of the tile by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

MARKER_RGB = (30, 60, 120)


@dataclass(frozen=True)
class PlantedTiles:
    """images (N, H, W, 3) uint8; labels (N,) 1 = marker planted; masks (N, H, W) bool marker pixels."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_sources(paths: Sequence[Path], *, min_side: int) -> list[np.ndarray]:
    """RGB arrays of the images at ``paths`` that are at least ``min_side`` px on both sides."""
    sources = []
    for p in paths:
        rgb = np.asarray(Image.open(p).convert("RGB"))
        if min(rgb.shape[:2]) >= min_side:
            sources.append(rgb)
    if not sources:
        raise ValueError(f"no source image of at least {min_side} px among {len(paths)} paths")
    return sources


def ring_mask(size: int, centre: tuple[float, float], radius: float, width: float) -> np.ndarray:
    """Bool (size, size) annulus of outer ``radius`` and thickness ``width``, px."""
    yy, xx = np.mgrid[0:size, 0:size]
    d = np.hypot(yy - centre[0], xx - centre[1])
    return (d <= radius) & (d >= radius - width)


def plant(tile: np.ndarray, rng: np.random.Generator, *, radius: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Draw the marker ring at a random place fully inside ``tile``; returns (new tile, marker mask)."""
    size = tile.shape[0]
    cy, cx = rng.uniform(radius + 1, size - radius - 1, size=2)
    mask = ring_mask(size, (cy, cx), radius, width)
    out = tile.astype(np.float32)
    shade = out[mask].mean(axis=1, keepdims=True) / 255  # keep the tissue's texture under the ink
    out[mask] = np.asarray(MARKER_RGB, np.float32) * (0.6 + 0.6 * shade)
    return np.clip(out, 0, 255).astype(np.uint8), mask


def planted_tiles(
    sources: Sequence[np.ndarray],
    n: int,
    *,
    tile_size: int,
    seed: int = 0,
    positive_fraction: float = 0.5,
    radius_fraction: float = 0.12,
    width_fraction: float = 0.045,
) -> PlantedTiles:
    """``n`` random crops of ``sources``; a ``positive_fraction`` of them carry the marker.

    Marker outer radius and thickness are fractions of ``tile_size`` (defaults give ≈3 % area).
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, tile_size, tile_size, 3), np.uint8)
    masks = np.zeros((n, tile_size, tile_size), bool)
    labels = (rng.random(n) < positive_fraction).astype(np.int64)
    for i in range(n):
        src = sources[int(rng.integers(len(sources)))]
        y = int(rng.integers(0, src.shape[0] - tile_size + 1))
        x = int(rng.integers(0, src.shape[1] - tile_size + 1))
        crop = src[y : y + tile_size, x : x + tile_size]
        crop = np.rot90(crop, int(rng.integers(4)))
        if labels[i]:
            crop, masks[i] = plant(crop, rng, radius=radius_fraction * tile_size, width=width_fraction * tile_size)
        images[i] = crop
    return PlantedTiles(images, labels, masks)
