"""Opening and reading slides: every shared slide, level choice, MPP sources and failures."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import CMU, SLIDES, needs_data, write_pyramid
from wsi_medcam.errors import MissingMetadataError, ResolutionError, SlideOpenError
from wsi_medcam.slide import MppOverrides, _mpp_from_resolution_tags, open_slide, read_mpp_csv

pytestmark = needs_data

ALL_SLIDES = sorted(p for p in SLIDES.rglob("*") if p.is_file()) if SLIDES.is_dir() else []
# boxes.tiff declares 352 µm/px (a synthetic file): implausible, so it needs an explicit --mpp.
NEEDS_OVERRIDE = {"boxes.tiff"}


@pytest.mark.parametrize("path", ALL_SLIDES, ids=lambda p: p.name)
def test_every_shared_slide_opens_and_reads(path):
    overrides = MppOverrides(run=0.5) if path.name in NEEDS_OVERRIDE else None
    with open_slide(path, overrides=overrides) as slide:
        d = slide.describe()
        assert d["levels"][0]["dimensions"] == list(slide.dimensions)
        assert 0.05 <= d["mpp"]["x"] <= 5
        assert d["mpp"]["source"] == ("override" if path.name in NEEDS_OVERRIDE else "metadata")
        w, h = slide.dimensions
        region = slide.read_level((0, 0), 0, (min(w, 64), min(h, 64)))
        assert region.shape == (min(h, 64), min(w, 64), 3) and region.dtype == np.uint8
    expected_backend = "tiffslide" if path.name.endswith(".ome.tif") else "openslide"
    assert d["backend"] == expected_backend


def test_ome_tiff_falls_back_to_tiffslide_with_physical_size():
    with open_slide(SLIDES / "OS-1-detail.ome.tif") as slide:
        assert slide.backend == "tiffslide"
        assert slide.mpp.x == pytest.approx(0.2271, abs=1e-3)


def test_dicom_through_openslide():
    with open_slide(SLIDES / "format-fixtures" / "boxes_0.dcm") as slide:
        assert slide.backend == "openslide" and slide.vendor == "dicom"


def test_implausible_mpp_is_refused_with_the_flag_to_use():
    with pytest.raises(MissingMetadataError, match=r"boxes.tiff.*352.*--mpp"):
        open_slide(SLIDES / "format-fixtures" / "boxes.tiff")


def test_best_level_counts_4_0003_as_4(built_pyramid):
    with open_slide(built_pyramid) as slide:
        # 2967 rows halve to 1483 then 741: the real downsamples are not exact powers of two
        assert len(slide.level_downsamples) == 3 and slide.level_downsamples[2] != 4.0
        assert slide.best_level(2.0, 0.02) == 1
        assert slide.best_level(4.0, 0.02) == 2
        assert slide.best_level(3.9, 0.02) == 1
    # OpenSlide's own get_best_level_for_downsample(4) picks level 0 when a level says 4.0003
    from wsi_medcam.slide import Slide

    class _Fake:
        level_downsamples = (1.0, 4.0003, 16.0012)

    fake = Slide.__new__(Slide)
    fake._handle = _Fake()
    assert fake.best_level(4.0, 0.02) == 1
    assert fake.best_level(16.0, 0.02) == 2
    assert fake.best_level(4.0, 0.0) == 0


def test_read_at_target_mpp_matches_level_and_area_filter(built_pyramid, cmu_pixels):
    """Reading 0.5 µm/px from a 0.25 µm/px pyramid uses level 1; 1 µm/px reads level 2 directly."""
    with open_slide(built_pyramid) as slide:
        tile = slide.read_region_at((400, 600), 224, 0.5)
        assert tile.shape == (224, 224, 3)
        ref = cmu_pixels[300:300 + 224, 200:200 + 224].astype(np.float32)  # level 1 = CMU pixels
        assert np.abs(tile.astype(np.float32) - ref).mean() < 12  # JPEG round trip only
        coarse = slide.read_region_at((400, 600), 112, 1.0)
        assert coarse.shape == (112, 112, 3)
        # an area-filtered 0.75 µm/px read reduces level 1 by 1.5
        mid = slide.read_region_at((0, 0), 100, 0.75)
        assert mid.shape == (100, 100, 3)
        with pytest.raises(ResolutionError, match="refusing to upsample"):
            slide.read_region_at((0, 0), 64, 0.1)


@pytest.mark.parametrize("name,backend", [("CMU-1-Small-Region.svs", "openslide"),
                                          ("CMU-1-Small-Region.svs", "tiffslide"), ("OS-1-detail.ome.tif", "auto")])
def test_outside_the_slide_is_white_not_black(name, backend):
    """Edge tiles overhang the slide: beyond it lies glass (white), whatever the backend (tiffslide
    pads with black, which looks like dark tissue to a classifier). Inside, pixels are the slide's."""
    with open_slide(SLIDES / name, backend=backend) as slide:
        w, h = slide.dimensions
        region = slide.read_level((w - 10, h - 10), 0, (40, 40))
        assert region[10:].min() == 255 and region[:, 10:].min() == 255
        assert region[:10, :10].min() < 255, "the slide's own corner pixels are kept"
        np.testing.assert_array_equal(region[:10, :10], slide.read_level((w - 10, h - 10), 0, (10, 10)))
        level = len(slide.level_dimensions) - 1  # and on a coarser level, through the level's own bounds
        lw, lh = slide.level_dimensions[level]
        ds = slide.level_downsamples[level]
        region = slide.read_level((round((lw - 5) * ds), round((lh - 5) * ds)), level, (20, 20))
        assert region[5:, 5:].min() == 255


@pytest.mark.parametrize("xy_level0,size", [((120, 80), (60, 40)),  # inside, level-0 x beyond level 1's width
                                             ((200, 40), (80, 40)),  # over the right edge
                                             ((240, 200), (40, 40))])  # over the bottom-right corner
def test_tiffslide_reads_a_coarser_level_as_openslide_does(xy_level0, size):
    """boxes.tiff has 4 levels (the shared slides read by tiffslide have one): at level 1 (2× down)
    tiffslide's region, its padding made white where it lies beyond the level, is OpenSlide's own
    read_region composited on white, pixel for pixel, inside the slide and over its edges."""
    import openslide

    path = SLIDES / "format-fixtures" / "boxes.tiff"
    with openslide.OpenSlide(str(path)) as ref:
        assert ref.level_downsamples[1] == 2.0
        rgba = np.asarray(ref.read_region(xy_level0, 1, size))
    assert set(np.unique(rgba[..., 3])) <= {0, 255}  # opaque inside, transparent beyond: no blending
    expected = np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)
    assert (expected < 255).any(axis=2).sum() > 100, "the region holds some of the boxes, not glass only"
    with open_slide(path, backend="tiffslide", overrides=MppOverrides(run=0.5)) as slide:
        assert slide.backend == "tiffslide" and len(slide.level_dimensions) > 1
        np.testing.assert_array_equal(slide.read_level(xy_level0, 1, size), expected)


def test_mpp_from_resolution_tags():
    assert _mpp_from_resolution_tags({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000",
                                      "tiff.YResolution": "20000"}) == (0.25, 0.5)
    assert _mpp_from_resolution_tags({"tiff.ResolutionUnit": "INCH", "tiff.XResolution": 50800,
                                      "tiff.YResolution": 50800}) == (0.5, 0.5)
    assert _mpp_from_resolution_tags({"tiff.ResolutionUnit": "none", "tiff.XResolution": "1"}) is None


def test_generic_tiff_mpp_comes_from_resolution_tags(tmp_path, cmu_pixels):
    path = write_pyramid(tmp_path / "generic.tif", cmu_pixels[:1024, :1024], mpp=0.3, levels=2, aperio=False)
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend=backend) as slide:
            assert slide.mpp.x == pytest.approx(0.3, rel=1e-4)


def test_missing_mpp_needs_an_override(tmp_path, cmu_pixels):
    path = write_pyramid(tmp_path / "nompp.tif", cmu_pixels[:512, :512], mpp=None, levels=1, aperio=False)
    with pytest.raises(MissingMetadataError, match=r"nompp.tif: no plausible microns-per-pixel; pass --mpp"):
        open_slide(path)
    with open_slide(path, overrides=MppOverrides(run=0.5)) as slide:
        assert (slide.mpp.x, slide.mpp.source) == (0.5, "override")
    csv = tmp_path / "mpp.csv"
    csv.write_text(f"path,mpp\n{path},0.42\n")
    with open_slide(path, overrides=MppOverrides(run=0.5, per_slide=read_mpp_csv(csv))) as slide:
        assert (slide.mpp.x, slide.mpp.source) == (0.42, "csv")


def test_not_a_slide_and_empty_file(tmp_path):
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(SlideOpenError, match="notes.svs: not a readable slide"):
        open_slide(text)
    empty = tmp_path / "empty.svs"
    empty.touch()
    with pytest.raises(SlideOpenError, match="empty file"):
        open_slide(empty)
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "missing.svs")


def test_thumbnail_is_read_in_blocks_and_matches_a_plain_resize(cmu_pixels):
    from PIL import Image

    with open_slide(CMU) as slide:
        thumb, mpp = slide.read_thumbnail(8.0, block_level_px=700)
    h, w = cmu_pixels.shape[:2]
    assert mpp == pytest.approx(0.499 * w / thumb.shape[1])
    assert abs(thumb.shape[1] - w * 0.499 / 8) <= 1
    plain = np.asarray(Image.fromarray(cmu_pixels).resize((thumb.shape[1], thumb.shape[0]), Image.Resampling.BOX))
    assert np.abs(thumb.astype(int) - plain.astype(int)).mean() < 4


def test_pyramid_writer_shortcuts_write_the_same_slide(tmp_path, cmu_pixels):
    """make_slide.py's shortcuts (each distinct tile encoded once; upper levels from a reader of its
    own instead of level 0 BOX-reduced again) change no byte of the slide, for the same pixels."""
    from wsi_medcam import slide_writer

    level0 = np.tile(cmu_pixels[:512, :512], (3, 2, 1))  # 1536 × 1024, every 256² tile repeated
    read = slide_writer.array_reader(level0)
    levels = {f: slide_writer.box_reduced(read, f)(0, 0, 1024 // f, 1536 // f) for f in (2, 4)}
    calls = []

    def reduced(f):
        calls.append(f)
        return slide_writer.array_reader(levels[f])

    plain = slide_writer.write_pyramid(tmp_path / "plain.svs", read, 1024, 1536, mpp=0.25, levels=3)
    fast = slide_writer.write_pyramid(tmp_path / "fast.svs", read, 1024, 1536, mpp=0.25, levels=3, reduced=reduced, repeats=True)
    assert sorted(set(calls)) == [2, 4]
    with tifffile.TiffFile(plain) as a, tifffile.TiffFile(fast) as b:
        assert len(a.pages) == len(b.pages) == 4
        for pa, pb in zip(a.pages, b.pages):
            assert pa.shape == pb.shape and np.array_equal(pa.asarray(), pb.asarray())
    with open_slide(fast) as slide:
        assert len(slide.level_dimensions) == 3 and "thumbnail" in slide.associated_images


def test_a_slide_build_that_fails_leaves_the_earlier_slide_and_no_partial(tmp_path, cmu_pixels):
    """A 100k² benchmark slide takes minutes to write: stopped part-way (here a read failing in
    level 1), the earlier file at that name is untouched and no half-written TIFF is left, which
    OpenSlide would open with blank tiles."""
    from wsi_medcam import slide_writer

    level0 = cmu_pixels[:1024, :1024]
    path = write_pyramid(tmp_path / "slide.svs", level0, mpp=0.25, levels=1)
    before = path.read_bytes()
    read = slide_writer.array_reader(level0)

    def fails_in_level_1(f):
        def read_level(x, y, w, h):
            raise OSError("disk gone")
        return read_level

    with pytest.raises(OSError, match="disk gone"):
        slide_writer.write_pyramid(path, read, 1024, 1024, mpp=0.25, levels=3, reduced=fails_in_level_1)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.svs"]


@pytest.mark.parametrize("size", [(224, 224), (112, 112), (149, 149), (100, 60), (112, 75), (1, 1)])
def test_shrink_is_the_box_mean_of_real_pixels(cmu_pixels, size):
    """Thumbnail blocks are shrunk by OpenCV's area mean: by an integer factor (448 → 224 or 112;
    448 → 149 is 3.007: not) each block's mean, correctly rounded (PIL's reduce() gave the same bytes
    for 2, and was off by up to 2 levels for 448); by any factor within one level of the
    area-weighted mean computed in float."""
    from wsi_medcam.slide import shrink

    src = np.ascontiguousarray(cmu_pixels[100:548, 200:648])  # 448², real H&E
    got = shrink(src, size)
    assert got.shape == (size[1], size[0], 3) and got.dtype == np.uint8
    w, h = size

    def weights(n_out):  # each source px weighted by its overlap with the output px
        edges = np.arange(n_out + 1) * 448 / n_out
        lo, hi = edges[:-1, None], edges[1:, None]
        px = np.arange(448)[None]
        return np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0, None) / (448 / n_out)

    exact = np.stack([weights(h) @ src[..., c].astype(np.float64) @ weights(w).T for c in range(3)], axis=-1)
    integer = 448 % w == 0 and 448 % h == 0 and 448 // w == 448 // h
    assert np.abs(got - exact).max() <= (0.5 if integer else 1.0) + 1e-6


def test_aperio_levels_four_apart(tmp_path, cmu_pixels):
    """Pyramids as Aperio's scanners write them (levels 4× apart): a 0.25 µm/px slide has no
    0.5 µm/px level, so those reads come from level 0, halved; 1 µm/px reads level 1 as it is."""
    src = cmu_pixels[:1024, :1024]
    path = write_pyramid(tmp_path / "aperio.svs", src, mpp=0.25, levels=3, level_factor=4)
    with open_slide(path) as slide:
        assert [tuple(d) for d in slide.level_dimensions] == [(1024, 1024), (256, 256), (64, 64)]
        assert [round(d) for d in slide.level_downsamples] == [1, 4, 16]
        assert slide.best_level(2.0, 0.02) == 0 and slide.best_level(4.0, 0.02) == 1
        half = slide.read_region_at((256, 256), 128, 0.5)
        from wsi_medcam.slide import shrink

        np.testing.assert_array_equal(half, shrink(slide.read_level((256, 256), 0, (256, 256)), (128, 128)))
        quarter = slide.read_region_at((256, 256), 64, 1.0)
        np.testing.assert_array_equal(quarter, slide.read_level((256, 256), 1, (64, 64)))
        box = src[256:512, 256:512].reshape(64, 4, 64, 4, 3).mean((1, 3))
        assert np.abs(quarter - box).mean() < 6  # level 1 is level 0's 4×4 means, through JPEG


@pytest.mark.parametrize("by_name", [False, True])
@pytest.mark.parametrize("size", [224, 512])
def test_forked_readers_shrink_tiles_after_opencv_threads_ran(tmp_path, cmu_pixels, size, by_name):
    """A 40× scan read for 20× tiles: every 0.5 µm/px tile is a 0.25 µm/px region halved by OpenCV,
    in reader processes forked from one whose OpenCV thread pool has run (tissue detection does).
    Two forked readers give the tiles read here; a reader stuck in an inherited pool would time out.
    OpenCV halves a 224² tile on the calling thread, a 512² one on its pool (in stripes of 64k px).
    Batches shared by descriptor or by name (the readers' setting; this process's is left alone)."""
    import cv2
    import torch

    from wsi_medcam.batching import TileDataset, make_loader
    from wsi_medcam.config import TilingConfig
    from wsi_medcam.slide import SlideRef, shrink
    from wsi_medcam.tiling import plan_tiles

    path = write_pyramid(tmp_path / "one-level.svs", cmu_pixels, mpp=0.25, levels=1)
    with open_slide(path) as slide:
        assert len(slide.level_dimensions) == 1
        grid = plan_tiles(slide.dimensions, 2.0, np.ones((8, 8), bool), TilingConfig(min_tissue=0.0), mpp=0.5,
                          tile_size=size)
        ref = SlideRef.of(slide)
        here = [slide.read_region_at(grid.xy_level0(i), size, 0.5) for i in range(len(grid))]
        x, y = grid.xy_level0(0)
        np.testing.assert_array_equal(here[0], shrink(slide.read_level((x, y), 0, (2 * size, 2 * size)), (size, size)))
    threads = cv2.getNumThreads()
    cv2.setNumThreads(4)
    try:
        big = np.ascontiguousarray(np.tile(cmu_pixels, (2, 2, 1)))
        cv2.resize(big, (big.shape[1] // 2, big.shape[0] // 2), interpolation=cv2.INTER_AREA)  # on the pool
        strategy = torch.multiprocessing.get_sharing_strategy()
        loader = make_loader(TileDataset(ref, grid), batch_size=2, workers=2, share_by_name=by_name)
        loader.timeout, loader.multiprocessing_context = 60, "fork"
        batches = list(loader)
        read = {int(i): t.numpy().transpose(1, 2, 0) for batch, idx in batches for t, i in zip(batch, idx)}
    finally:
        cv2.setNumThreads(threads)
    assert sorted(read) == list(range(len(grid))) and len(grid) >= 4
    assert torch.multiprocessing.get_sharing_strategy() == strategy
    # each batch is read straight into one buffer, pixel by pixel (channels-last): nothing transposed it
    assert all(batch.permute(0, 2, 3, 1).is_contiguous() for batch, _ in batches)
    for i, tile in read.items():
        np.testing.assert_array_equal(tile, here[i])


def test_torchs_shared_memory_manager_starts(monkeypatch, caplog):
    """The torch call that readers sharing by name rest on (a private one) is there in this torch
    and starts the manager; where it fails, GPU runs fall back to descriptors with a warning."""
    import torch

    from wsi_medcam.batching import start_shared_memory_manager

    assert start_shared_memory_manager() is True

    def missing(size):
        raise RuntimeError("torch_shm_manager: not found")

    monkeypatch.setattr(torch.UntypedStorage, "_new_using_filename_cpu", missing)
    assert start_shared_memory_manager() is False
    assert "torch_shm_manager: not found" in caplog.text


@pytest.mark.parametrize("width,height,factor", [(100_000, 100_000, 2), (200_000, 150_000, 4), (46_000, 32_914, 4),
                                                 (32_768, 32_768, 2), (4096, 300, 2), (4097, 10, 2), (16, 16, 4)])
def test_pyramids_go_down_to_a_level_a_thumbnail_can_be_read_from(width, height, factor):
    """Benchmark slides stop where a scanner's do: at the first level at most 4096 px on its longer
    side, and not a level later (CMU-1.svs, 46000 × 32914 at levels 4× apart, has 3)."""
    from wsi_medcam.slide_writer import pyramid_levels

    levels = pyramid_levels(width, height, factor)
    sides = [max(width, height) // factor**k for k in range(levels)]
    assert sides[-1] <= 4096
    assert all(side > 4096 for side in sides[:-1])
    if (width, height) == (46_000, 32_914):
        assert levels == 3
