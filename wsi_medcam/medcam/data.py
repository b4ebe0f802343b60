"""Where amortised training tiles come from: tissue tiles sampled from slides (through the tiler),
or image files from a folder. Both return uint8 (N, S, S, 3) at the classifier's tile size."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..classifier_training import IMAGE_SUFFIXES, read_tile
from ..config import TilingConfig, TissueConfig
from ..slide import MppOverrides, open_slide
from ..tiling import plan_tiles
from ..tissue import detect_tissue


def tiles_from_folder(root: Path, tile_size: int) -> np.ndarray:
    """Every image under ``root`` (recursively), resized to ``tile_size`` with an area filter."""
    paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{root}: no tile images found")
    return np.stack([read_tile(p, tile_size) for p in paths])


def tiles_from_slides(
    paths: Sequence[Path],
    *,
    mpp: float,
    tile_size: int,
    per_slide: int,
    tissue: TissueConfig = TissueConfig(),
    tiling: TilingConfig = TilingConfig(min_tissue=0.5),
    overrides: MppOverrides | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Up to ``per_slide`` random tissue tiles per slide at ``mpp`` µm/px."""
    rng = np.random.default_rng(seed)
    tiles = []
    for path in paths:
        with open_slide(path, overrides=overrides) as slide:
            downsample = slide.downsample_for(mpp)
            grid = plan_tiles(slide.dimensions, downsample, detect_tissue(slide, tissue).mask, tiling,
                              mpp=mpp, tile_size=tile_size)
            chosen = rng.permutation(len(grid))[:per_slide]
            tiles.extend(slide.read_region_at(grid.xy_level0(int(i)), tile_size, mpp) for i in sorted(chosen))
    if not tiles:
        raise ValueError("no tissue tiles found in the given slides")
    return np.stack(tiles)
