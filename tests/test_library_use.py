"""The stages used from Python, as a library: bad input is a clear exception, not a wrong result, and
nothing is left open or changed in the caller's process."""

from __future__ import annotations

import gc
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from wsi_medcam.batching import TileDataset
from wsi_medcam.bundles import ClassifierConfig, import_classifier, load_classifier
from wsi_medcam.classifier_training import to_input
from wsi_medcam.config import InferenceConfig, TilingConfig, TissueConfig
from wsi_medcam.errors import ConfigError, SlideReadError
from wsi_medcam.inference import Predictor
from wsi_medcam.medcam.explain import PerImageOptions, explain_batch
from wsi_medcam.medcam.layers import layer_preset
from wsi_medcam.slide import open_slide
from wsi_medcam.stitching import EvidenceStitcher
from wsi_medcam.tiling import plan_tiles
from wsi_medcam.tissue import tissue_mask_from_rgb

from conftest import CMU, needs_data

TILE = 64


@pytest.fixture(scope="module")
def small_classifier(tmp_path_factory) -> Path:
    """An untrained resnet10t on 64-px tiles: the calls, not the predictions, are under test."""
    cfg = ClassifierConfig(arch="resnet10t", class_names=["a", "b"], mpp=0.5, tile_size=TILE)
    return import_classifier(cfg, tmp_path_factory.mktemp("clf") / "classifier")


def _fds_on(path: Path) -> int:
    """This process's open file descriptors on ``path``."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path.resolve()))


@needs_data
def test_closing_a_slide_twice_closes_nothing_else():
    slide = open_slide(CMU)
    slide.read_region_at((0, 0), 224, 0.5)  # opens the direct tile reader as well
    slide.close()
    with tempfile.TemporaryFile() as mine:  # takes a descriptor number the slide freed
        slide.close()
        mine.write(b"still open")
        mine.flush()
    with pytest.raises(SlideReadError, match="closed"):
        slide.read_region_at((0, 0), 224, 0.5)
    with open_slide(CMU) as slide:
        slide.close()  # and the with block closes it again


@needs_data
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors through /proc")
def test_slides_and_datasets_dropped_unclosed_hold_no_file():
    for _ in range(3):
        slide = open_slide(CMU)
        slide.read_region_at((0, 0), 224, 0.5)
        grid = plan_tiles(slide.dimensions, slide.downsample_for(0.5), np.ones((4, 4), bool), TilingConfig(),
                          mpp=0.5, tile_size=224)
        dataset = TileDataset(slide, grid)  # an open Slide is taken for its path
        dataset[0]
        del slide, dataset
    gc.collect()
    assert _fds_on(CMU) == 0


@needs_data
def test_tile_dataset_with_a_plain_dataloader_and_close():
    with open_slide(CMU) as slide:
        grid = plan_tiles(slide.dimensions, slide.downsample_for(0.5), np.ones((4, 4), bool), TilingConfig(),
                          mpp=0.5, tile_size=224)
        expected = slide.read_region_at(grid.xy_level0(5), 224, 0.5)
    dataset = TileDataset(slide, grid)
    tiles, indices = next(iter(DataLoader(dataset, batch_size=8, collate_fn=lambda batch: batch)))
    assert tiles.dtype == torch.uint8 and tuple(tiles.shape) == (8, 3, 224, 224) and indices.tolist() == list(range(8))
    np.testing.assert_array_equal(tiles[5].permute(1, 2, 0).numpy(), expected)
    dataset.close()
    dataset.close()
    with pytest.raises(TypeError, match="Slide or SlideRef"):
        TileDataset(str(CMU), grid)


def test_predict_refuses_anything_but_uint8_tiles_and_takes_an_empty_batch(small_classifier):
    predictor = Predictor(load_classifier(small_classifier), None, InferenceConfig(device="cpu", precision="fp32"))
    tiles = torch.randint(0, 256, (2, 3, TILE, TILE), dtype=torch.uint8)
    probs, evidence, _ = predictor.predict(tiles)
    assert probs.shape == (2, 2) and evidence is None
    for bad in (tiles.float() / 255, tiles.permute(0, 2, 3, 1), tiles.numpy()):
        with pytest.raises(TypeError, match="uint8 tiles"):
            predictor.predict(bad)
    probs, _, _ = predictor.predict(tiles[:0])
    assert probs.shape == (0, 2)


def test_to_input_refuses_floats_and_takes_read_only_arrays():
    images = np.random.default_rng(0).integers(0, 256, (2, TILE, TILE, 3), dtype=np.uint8)
    cfg = ClassifierConfig(arch="resnet10t", class_names=["a", "b"], mpp=0.5, tile_size=TILE)
    with pytest.raises(TypeError, match="uint8"):
        to_input(images.astype(np.float32) / 255, cfg)
    with pytest.raises(TypeError, match="uint8"):
        to_input(images[0], cfg)  # one tile, no batch axis
    images.flags.writeable = False  # as np.asarray(PIL image) gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = to_input(images, cfg)
    assert x.shape == (2, 3, TILE, TILE) and x.dtype == torch.float32


def test_explaining_and_loading_leave_the_callers_random_stream_alone(small_classifier):
    images = np.random.default_rng(0).integers(0, 256, (1, TILE, TILE, 3), dtype=np.uint8)
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        classifier = load_classifier(small_classifier)
        explain_batch(classifier, images, per_image=PerImageOptions(steps=2, min_steps=1, patience=1), fills=("mean",))
        draws.append(torch.rand(4))
        torch.manual_seed(seed)
        assert torch.equal(draws[-1], torch.rand(4)), "the caller's stream was moved"
    assert not torch.equal(*draws)


class _Writer:
    """The part of a ChunkWriter the stitcher reads before anything is written."""

    def __init__(self, shape: tuple[int, int]):
        self.shape, self.chunk = shape, 64


def test_stitcher_refuses_a_transposed_store_and_masks_that_are_not_the_tiles():
    grid = plan_tiles((896, 224), 1.0, np.ones((4, 16), bool), TilingConfig(), mpp=0.5, tile_size=TILE)
    with pytest.raises(ValueError, match="rows"):
        EvidenceStitcher(grid, _Writer((896, 224)), threads=1, tracers=0)  # (width, height) given as (rows, cols)
    stitcher = EvidenceStitcher(grid, _Writer((224, 896)), threads=1, tracers=0)
    first = int(stitcher.order()[0])
    try:
        with pytest.raises(ValueError, match="expected the tile's"):
            stitcher.add(first, np.zeros((TILE // 2, TILE // 2), np.uint8), 0, 0.9)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            stitcher.add(first, np.full((TILE, TILE), 230.0, np.float32), 0, 0.9)  # a 0–255 heatmap as float
    finally:
        stitcher.close()


def test_plan_tiles_refuses_a_config_for_other_tiles():
    with pytest.raises(ConfigError, match="not the ones asked for"):
        plan_tiles((1000, 1000), 1.0, np.ones((4, 4), bool), TilingConfig(mpp=1.0), mpp=0.5, tile_size=224)
    with pytest.raises(ConfigError, match="not the ones asked for"):
        plan_tiles((1000, 1000), 1.0, np.ones((4, 4), bool), TilingConfig(tile_size=256), mpp=0.5, tile_size=224)
    with pytest.raises(ValueError, match="2-D"):
        plan_tiles((1000, 1000), 1.0, np.ones((4, 4, 3), bool), TilingConfig(), mpp=0.5, tile_size=224)


@needs_data
def test_region_reads_refuse_sizes_and_resolutions_that_are_not_positive():
    with open_slide(CMU) as slide:
        for size, mpp in ((0, 0.5), ((224, -3), 0.5), (224, 0.0), (224, -1.0), (22.4, 0.5)):
            with pytest.raises(ValueError, match="positive integer"):
                slide.read_region_at((0, 0), size, mpp)
        assert slide.read_region_at((0, 0), np.int64(32), 0.5).shape == (32, 32, 3)
        assert slide.read_region_at((0, 0), (40, 20), 0.5).shape == (20, 40, 3)  # (width, height)
        with pytest.raises(ValueError, match="no level 5"):
            slide.read_level((0, 0), 5, (10, 10))


def test_tissue_detection_names_the_image_it_was_given():
    with pytest.raises(ValueError, match=r"float32 \(1000, 1000, 3\)"):
        tissue_mask_from_rgb(np.zeros((1000, 1000, 3), np.float32), 8.0, TissueConfig())
    with pytest.raises(ValueError, match="non-empty"):
        tissue_mask_from_rgb(np.zeros((0, 0, 3), np.uint8), 8.0, TissueConfig())


def test_a_layer_preset_for_another_architecture_is_a_value_error(small_classifier):
    model = load_classifier(small_classifier).model
    with pytest.raises(ValueError, match="vit_small_patch16_224"):
        layer_preset(model, "vit_small_patch16_224")


def test_a_segmenter_with_its_own_normalisation_explains_tiles_as_run_does(small_classifier, tmp_path):
    """``explain``/``eval``/``--refine`` (explain_batch) feed a segmenter with its own mean/std the
    tiles normalised with them, as the run's Predictor does."""
    from wsi_medcam.bundles import SegmenterConfig, load_segmenter, make_segmenter

    torch.manual_seed(0)
    own = make_segmenter(SegmenterConfig(encoder="resnet18", tile_size=TILE, mean=(0.2, 0.3, 0.4), std=(0.5, 0.4, 0.3)),
                         tmp_path / "segmenter")
    classifier, segmenter = load_classifier(small_classifier), load_segmenter(own)
    images = np.random.default_rng(1).integers(0, 256, (3, TILE, TILE, 3), dtype=np.uint8)
    soft, _ = explain_batch(classifier, images, segmenter=segmenter, fills=("mean",))
    predictor = Predictor(classifier, segmenter, InferenceConfig(device="cpu", precision="fp32", certify_fills=()))
    _, levels, _ = predictor.predict(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    assert np.abs(np.rint(soft[:, 0].numpy() * 255) - levels.astype(int)).max() <= 1
