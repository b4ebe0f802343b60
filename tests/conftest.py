"""Shared fixtures: the real test data in ../shared/data, model bundles, and pyramids built from real pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SLIDES = DATA / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")


def write_pyramid(
    path: Path,
    level0: np.ndarray,
    *,
    mpp: float | None,
    levels: int = 3,
    aperio: bool = True,
    tile: int = 256,
) -> Path:
    """Write a tiled JPEG multi-level TIFF in the Aperio layout OpenSlide and tiffslide both read.

    Level 0 first, a small stripped thumbnail second, then each 2× reduced level as its own page.
    ``mpp=None`` writes no resolution at all (a slide without metadata).
    """
    h, w = level0.shape[:2]
    desc = f"Aperio Image Library v12.0.16\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q=90"
    if mpp is not None:
        desc += f"|AppMag = 20|MPP = {mpp}"
    extra = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    pyramid = [level0]
    for _ in range(1, levels):
        prev = pyramid[-1]
        pyramid.append(np.asarray(Image.fromarray(prev).resize((max(1, prev.shape[1] // 2), max(1, prev.shape[0] // 2)), Image.Resampling.BOX)))
    thumb = np.asarray(Image.fromarray(level0).resize((max(1, w // 16), max(1, h // 16))))
    with tifffile.TiffWriter(path) as tif:
        for i, arr in enumerate(pyramid):
            kwargs = dict(photometric="rgb", compression="jpeg", compressionargs={"level": 90}, metadata=None, **extra)
            tif.write(arr, tile=(tile, tile), description=desc if aperio or i == 0 else None,
                      subfiletype=0 if i == 0 else 1, **kwargs)
            if i == 0 and aperio:
                tif.write(thumb, photometric="rgb", compression="jpeg", metadata=None, description=desc)
    return path


@pytest.fixture(scope="session")
def cmu_pixels() -> np.ndarray:
    if not CMU.is_file():
        pytest.skip(f"{CMU} not found")
    import openslide

    with openslide.OpenSlide(str(CMU)) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))


@pytest.fixture(scope="session")
def built_pyramid(tmp_path_factory, cmu_pixels) -> Path:
    """A 3-level Aperio-style pyramid of real CMU pixels at 0.25 µm/px (so 0.5 µm/px reads level 1)."""
    return write_pyramid(tmp_path_factory.mktemp("pyr") / "cmu-pyramid.svs", cmu_pixels, mpp=0.25, levels=3)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> tuple[Path, Path]:
    """Untrained resnet18 classifier (3 classes, 0.5 µm/px, 224 px) and U-Net/resnet18 segmenter bundles."""
    import torch

    from wsi_medcam.bundles import ClassifierConfig, SegmenterConfig, import_classifier, make_segmenter

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bundles")
    clf = import_classifier(ClassifierConfig(arch="resnet18", class_names=["tumor", "stroma", "other"], mpp=0.5,
                                             tile_size=224), root / "classifier")
    seg = make_segmenter(SegmenterConfig(encoder="resnet18", tile_size=224), root / "segmenter")
    return clf, seg
