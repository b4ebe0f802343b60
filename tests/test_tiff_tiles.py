"""Direct tile reads (wsi_medcam.tiff_tiles) give exactly OpenSlide's pixels, or step aside."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile

from conftest import CMU, SLIDES, needs_data, write_pyramid
from wsi_medcam.errors import SlideReadError
from wsi_medcam.slide import open_slide
from wsi_medcam.tiff_tiles import TiffTiles

pytestmark = needs_data


def _regions(width: int, height: int, size: int, rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """Random corners, including ones straddling every edge and wholly outside the level."""
    edges = [(-size // 2, -size // 2), (width - size // 2, height - size // 2), (width - size // 3, 0),
             (0, height - size // 3), (width + 5, height + 5)]
    return edges + [(int(rng.integers(0, width - size)), int(rng.integers(0, height - size))) for _ in range(n)]


def _assert_matches_backend(slide, level: int, size: int, n: int = 40) -> None:
    ds = round(slide.level_downsamples[level])
    w, h = slide.level_dimensions[level]
    for x, y in _regions(w, h, size, np.random.default_rng(level), n):
        direct = slide.read_level((x * ds, y * ds), level, (size, size))
        reference = slide._backend_read((x * ds, y * ds), level, (size, size))
        np.testing.assert_array_equal(direct, reference, err_msg=f"level {level} at level px {x},{y}")
    assert level in slide._tiles.trusted_levels  # the direct path did serve these reads


def test_real_aperio_svs_level0_is_read_directly_with_openslides_pixels():
    """CMU-1-Small-Region: Aperio JPEG tiles in RGB colour space (not YCbCr), 240² tiles, partial
    edge tiles."""
    with open_slide(CMU) as slide:
        assert slide.backend == "openslide" and slide._tiles is not None
        _assert_matches_backend(slide, 0, 224)
        _assert_matches_backend(slide, 0, 448, n=10)


@pytest.mark.parametrize("aperio", [True, False], ids=["aperio", "generic-tiff"])
def test_exact_2x_levels_are_read_directly(tmp_path, cmu_pixels, aperio):
    """Both layouts slide_writer makes (YCbCr JPEG), on levels whose downsample is exactly 2 and 4."""
    path = write_pyramid(tmp_path / "exact.tif", cmu_pixels[:2048, :2048], mpp=0.25, levels=3, aperio=aperio)
    with open_slide(path) as slide:
        assert slide.level_downsamples == [1.0, 2.0, 4.0]
        for level in range(3):
            _assert_matches_backend(slide, level, 224, n=15)


def test_fractional_positions_go_to_openslide(tmp_path, built_pyramid, cmu_pixels):
    """Level 2 of the CMU pyramid has downsample 4.004 (741 of 2967 rows): OpenSlide interpolates
    there, so the direct path must not answer; nor at an odd level-0 x on an exact 2× level."""
    with open_slide(built_pyramid) as slide:
        assert slide.level_downsamples[2] != 4.0
        slide.read_level((800, 800), 2, (64, 64))
        assert slide._tiles is None or 2 not in slide._tiles.trusted_levels
    path = write_pyramid(tmp_path / "exact.svs", cmu_pixels[:1024, :1024], mpp=0.25, levels=2)
    with open_slide(path) as slide:
        assert slide.level_downsamples[1] == 2.0
        odd = slide.read_level((301, 401), 1, (64, 64))
        assert 1 not in slide._tiles.trusted_levels
        np.testing.assert_array_equal(odd, slide._backend_read((301, 401), 1, (64, 64)))


def test_a_mismatch_hands_the_level_back_for_good():
    """A reference that disagrees (as OpenSlide would on a format quirk) stops direct reads."""
    with open_slide(CMU) as slide:
        calls = []

        def wrong(level, x, y, w, h):
            calls.append((x, y))
            return np.zeros((h, w, 3), np.uint8)

        tiles = TiffTiles.open(CMU, slide.vendor, slide.level_dimensions, wrong)
        try:
            assert tiles.read(0, 500, 500, 64, 64) is None
            assert tiles.read(0, 600, 600, 64, 64) is None and len(calls) == 1
            assert not tiles.trusted_levels
        finally:
            tiles.close()


def test_uniform_regions_do_not_earn_trust():
    """Blank glass matches whatever the decoder does to colour: trust waits for real content."""
    with open_slide(CMU) as slide:
        tiles = TiffTiles.open(CMU, slide.vendor, slide.level_dimensions, slide._reference_read)
        try:
            w, h = slide.dimensions
            assert tiles.read(0, w + 10, h + 10, 32, 32).min() == 255  # outside: white, checked
            assert not tiles.trusted_levels
            assert tiles.read(0, 1000, 1000, 64, 64) is not None and tiles.trusted_levels == {0}
        finally:
            tiles.close()


def test_other_vendors_and_backends_never_use_it():
    with open_slide(SLIDES / "format-fixtures" / "boxes_0.dcm") as slide:
        assert slide.vendor == "dicom" and slide._tiles is None
    with open_slide(CMU, backend="tiffslide") as slide:
        assert slide._tiles is None


def test_integer_factor_reads_are_the_rounded_box_mean(tmp_path, cmu_pixels):
    """0.5 µm/px from a single-level 0.25 µm/px slide: each pixel is the mean of a 2×2 level-0
    block, rounded once (PIL's resize rounds after each axis, up to 1 off)."""
    path = write_pyramid(tmp_path / "single.tif", cmu_pixels[:1024, :1024], mpp=0.25, levels=1)
    with open_slide(path) as slide:
        level0 = slide.read_level((200, 300), 0, (448, 448)).astype(np.float64)
        tile = slide.read_region_at((200, 300), 224, 0.5)
    mean = level0.reshape(224, 2, 224, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(tile, np.floor(mean + 0.5).astype(np.uint8))


def test_a_truncated_tile_still_fails_the_read_after_trust(tmp_path):
    """The second half of one JPEG tile zeroed (an interrupted copy): libjpeg would fill it in
    silently through imagecodecs; the read must fail as OpenSlide's does, even on a trusted level."""
    path = tmp_path / "damaged.svs"
    shutil.copy(CMU, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        index = 40
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        across = -(-page.shape[1] // page.tilewidth)
        tile_y, tile_x = divmod(index, across)
        x, y = tile_x * page.tilewidth + 10, tile_y * page.tilelength + 10
    with open(path, "r+b") as fh:
        fh.seek(offset + count // 2)
        fh.write(bytes(count - count // 2))
    with open_slide(path) as slide:
        slide.read_level((1000, 1000), 0, (64, 64))  # an intact region earns trust first
        assert 0 in slide._tiles.trusted_levels
        with pytest.raises(SlideReadError, match="read failed at level 0"):
            slide.read_level((x, y), 0, (64, 64))


def test_threads_share_a_bounded_cache():
    """Readers on several threads (OpenSlide handles are thread-safe, so a Slide may be shared):
    same pixels as OpenSlide, and the cache stays within its budget with exact accounting."""
    from concurrent.futures import ThreadPoolExecutor

    with open_slide(CMU) as slide:
        tile_bytes = 240 * 240 * 3
        tiles = TiffTiles.open(CMU, slide.vendor, slide.level_dimensions, slide._reference_read)
        tiles._cache_bytes = 3 * tile_bytes  # three tiles: constant eviction
        try:
            corners = [(x, y) for y in range(0, 2700, 150) for x in range(0, 2000, 170)]
            with ThreadPoolExecutor(4) as pool:
                regions = list(pool.map(lambda c: tiles.read(0, *c, 200, 200), corners))
            for (x, y), region in zip(corners, regions):
                np.testing.assert_array_equal(region, slide._backend_read((x, y), 0, (200, 200)))
            assert tiles.trusted_levels == {0}
            assert tiles._cached == sum(t.nbytes for t in tiles._cache.values() if t is not None) <= 3 * tile_bytes
        finally:
            tiles.close()


def test_a_closed_slide_holds_no_decoded_tiles():
    """A run keeps its closed slide for the geometry while the tiles stream: the tiles the thumbnail
    was read through (here the whole of CMU-1-Small-Region's level 0, ~20 MB) are freed on closing."""
    import tracemalloc

    slide = open_slide(CMU)
    tracemalloc.start()
    try:
        thumbnail, _ = slide.read_thumbnail(slide.mpp.mean)  # level 0, through the direct reads
        assert 0 in slide._tiles.trusted_levels
        held = tracemalloc.get_traced_memory()[0] - thumbnail.nbytes
        slide.close()
        freed = held - (tracemalloc.get_traced_memory()[0] - thumbnail.nbytes)
    finally:
        tracemalloc.stop()
    decoded = slide.level_dimensions[0][0] * slide.level_dimensions[0][1] * 3
    assert held > 0.8 * decoded and freed > 0.8 * decoded
