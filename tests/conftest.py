"""Shared fixtures: the real test data in ../shared/data, model bundles, and pyramids built from real pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_medcam import slide_writer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SLIDES = DATA / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")


def write_pyramid(path: Path, level0: np.ndarray, **kwargs) -> Path:
    """A pyramid of an in-memory RGB array (see :func:`wsi_medcam.slide_writer.write_pyramid`)."""
    return slide_writer.write_pyramid(path, slide_writer.array_reader(level0), level0.shape[1], level0.shape[0], **kwargs)


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


def _untrained_bundles(root: Path, mpp: float, tile_size: int) -> tuple[Path, Path]:
    """Untrained resnet18 classifier (3 classes) and U-Net/resnet18 segmenter bundles for tiles of
    ``tile_size`` px at ``mpp`` µm/px, seeded so every run makes the same weights."""
    import torch

    from wsi_medcam.bundles import ClassifierConfig, SegmenterConfig, import_classifier, make_segmenter

    torch.manual_seed(0)
    clf = import_classifier(ClassifierConfig(arch="resnet18", class_names=["tumor", "stroma", "other"], mpp=mpp,
                                             tile_size=tile_size), root / "classifier")
    seg = make_segmenter(SegmenterConfig(encoder="resnet18", tile_size=tile_size), root / "segmenter")
    return clf, seg


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> tuple[Path, Path]:
    """Untrained resnet18 classifier (3 classes, 0.5 µm/px, 224 px) and U-Net/resnet18 segmenter bundles."""
    return _untrained_bundles(tmp_path_factory.mktemp("bundles"), 0.5, 224)


@pytest.fixture(scope="session")
def small_bundles(tmp_path_factory) -> tuple[Path, Path]:
    """The same models for 112-px tiles at 1.0 µm/px: the same tissue per tile as :func:`bundles`
    with a quarter of the pixels (a real slide's run about 4× faster), for tests of what happens
    around the models (resume, failures, clusters, tile order) rather than of their outputs."""
    return _untrained_bundles(tmp_path_factory.mktemp("small-bundles"), 1.0, 112)
