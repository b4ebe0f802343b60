"""Tissue detection: real labelled tiles, pen-marked slide crops, and small synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2hsv

from wsi_medcam.config import TissueConfig
from wsi_medcam.slide import composite_on_white
from wsi_medcam.tissue import pen_mask, tissue_fraction, tissue_mask_from_rgb

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TILES = DATA / "tiles" / "tissue-detection"
needs_tiles = pytest.mark.skipif(not TILES.is_dir(), reason=f"labelled tissue-detection tiles not found at {TILES}")

# A tile is "tissue" when at least this fraction of it is. The labels fix the range: almost-white-2
# (not tissue) has a sliver of tissue in one corner, about 5 % of the tile; high-nuclei-score-level2
# (tissue) has tissue along its top edge, about 1/7 of the tile.
TISSUE_TILE_FRACTION = 0.1

# The defaults are for thumbnails at ~8 µm/px. Tiles are 0.25-2 µm/px: a 512 px level-0 tile spans
# 128 µm (16 400 µm²), less than the default 20 000 µm² minimum island, and a 24 µm median would wipe
# out the thin septa of fat at 1 µm/px. So tiles get smaller physical sizes; everything else default.
TILE_CFG = TissueConfig(median_um=8.0, min_object_um2=1000.0, min_hole_um2=1000.0)

# Slide crops with pen marks, and their µm/px judged from the pixels: in the two TCGA crops single
# nuclei (~7 µm) are 3-4 px and fat cells (~60 µm) about 30 px, so ~2 µm/px; wsi-blue-pen is a whole
# section of a few mm in 174 px, a real thumbnail, taken as 32 µm/px.
PEN_THUMBNAILS = {"tcga-green-pen.png": 2.0, "tcga-red-pen.png": 2.0, "wsi-blue-pen.png": 32.0}


def tile_mpp(name: str) -> float:
    """µm/px of a labelled tile, guessed from its name and look (the files carry no resolution).

    ``level0``: a 512 px crop of a ~0.25 µm/px scan. ``level1``: 4× down, 1 µm/px (fat cells of
    50-100 µm are 50-100 px). ``level2``: 4096 level-0 px in 512 px, 2 µm/px. The no-tissue pen tiles:
    the ink lies on the coverslip, out of focus, its edges blurred over ~50 px; defocus blur is tens
    to hundreds of µm, so 2 µm/px (at level 0 the blur would be 12 µm and one stroke would fill the
    tile). Blank glass gives no scale; 1 µm/px. ``test_tile_classification`` also runs at double
    these values.
    """
    for key, mpp in (("level0", 0.25), ("level1", 1.0), ("level2", 2.0), ("-pen", 2.0)):
        if key in name:
            return mpp
    return 1.0


def tile_label(name: str) -> bool | None:
    """True for tissue, False for no tissue, None for the unlabelled pen thumbnails."""
    if name.startswith(("no-tissue", "almost-white")):
        return False
    if name.startswith("tissue-") or "-nuclei-score-" in name:
        return True
    return None


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def ink_pixels(rgba: np.ndarray) -> np.ndarray:
    """Pen ink by a plain RGB rule, independent of :func:`pen_mask`'s HSV rules.

    Haematoxylin and eosin both absorb green more than red, so H&E never has G > R: green and blue
    ink do. Red ink is far redder than eosin pink: R exceeds both G and B by over 100.
    """
    r, g, b = (rgba[..., i].astype(int) for i in range(3))
    return (g > r + 20) | (r - np.maximum(g, b) > 100)


@pytest.fixture(scope="module")
def tiles() -> dict[str, tuple[np.ndarray, bool]]:
    """The labelled tiles by file name: RGBA pixels and whether they show tissue."""
    found = {p.name: (load(p), tile_label(p.name)) for p in sorted(TILES.glob("*.png"))}
    return {name: (rgba, label) for name, (rgba, label) in found.items() if label is not None}


# --- real tiles -----------------------------------------------------------------------------------


@needs_tiles
@pytest.mark.parametrize("mpp_scale", [1.0, 2.0])
def test_tile_classification(tiles, mpp_scale):
    labels = [label for _, label in tiles.values()]
    assert len(tiles) >= 14 and sum(labels) >= 5 and labels.count(False) >= 5, "expected the labelled tile set"

    wrong, pen_called_tissue = [], []
    for name, (rgba, label) in tiles.items():
        fraction = tissue_fraction(tissue_mask_from_rgb(rgba, tile_mpp(name) * mpp_scale, TILE_CFG))
        called = fraction >= TISSUE_TILE_FRACTION
        print(f"  {name:45s} tissue fraction {fraction:.3f} -> {'tissue' if called else 'no tissue'}")
        if called != label:
            wrong.append(f"{name} ({fraction:.3f})")
        if name.startswith("no-tissue") and "pen" in name and called:
            pen_called_tissue.append(name)
    accuracy = 1.0 - len(wrong) / len(tiles)
    print(f"tile accuracy at {mpp_scale}x the chosen µm/px: {accuracy:.3f} ({len(tiles) - len(wrong)}/{len(tiles)})")
    assert not pen_called_tissue, f"pen tiles called tissue: {pen_called_tissue}"
    assert accuracy >= 0.9, f"misclassified: {wrong}"


@needs_tiles
def test_pen_mask_stays_off_stained_tissue(tiles):
    for name, (rgba, label) in tiles.items():
        if label and "pen" not in name:
            assert pen_mask(rgb2hsv(rgba[..., :3])).mean() < 0.01, name


# --- pen-marked thumbnails ------------------------------------------------------------------------


@needs_tiles
@pytest.mark.parametrize("name", sorted(PEN_THUMBNAILS))
def test_pen_ink_is_not_tissue(name):
    rgba = load(TILES / name)
    mpp = PEN_THUMBNAILS[name]
    ink = ink_pixels(rgba)
    assert ink.mean() > 0.01, "the thumbnail should show pen ink"

    mask = tissue_mask_from_rgb(rgba, mpp, TissueConfig())
    overlap = (ink & mask).sum() / ink.sum()
    print(f"{name}: tissue {tissue_fraction(mask):.3f}, ink {ink.mean():.3f}, ink called tissue {overlap:.4f}")
    assert overlap < 0.05
    assert tissue_fraction(mask) > 0.02
    # pen_mask finds the ink the plain RGB rule finds.
    assert (pen_mask(rgb2hsv(rgba[..., :3])) & ink).sum() / ink.sum() > 0.9
    # Without pen rejection the ink would be tissue: the check above has teeth.
    unfiltered = tissue_mask_from_rgb(rgba, mpp, TissueConfig(reject_pen=False))
    assert (ink & unfiltered).sum() / ink.sum() > 0.5


# --- synthetic images -----------------------------------------------------------------------------

WHITE = (255, 255, 255)
EOSIN_PINK = (225, 140, 185)
HAEMATOXYLIN_PURPLE = (110, 70, 150)
GREEN_INK = (60, 170, 130)
BLUE_INK = (40, 90, 200)
RED_INK = (230, 20, 30)
THUMB_MPP = 8.0


def canvas(shape: tuple[int, int] = (160, 160), colour: tuple[int, int, int] = WHITE) -> np.ndarray:
    return np.tile(np.array(colour, np.uint8), (*shape, 1))


def disk_mask(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def with_noise(rgb: np.ndarray, sigma: float = 3.0, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def test_white_and_noisy_glass_give_no_tissue():
    cfg = TissueConfig()
    assert not tissue_mask_from_rgb(canvas(), THUMB_MPP, cfg).any()
    # Otsu splits pure noise somewhere; the saturation floor keeps it from being called tissue.
    glass = with_noise(canvas(colour=(238, 236, 240)), sigma=4.0)
    assert not tissue_mask_from_rgb(glass, THUMB_MPP, cfg).any()


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # black and fully transparent
    rgba[0, 0] = (0, 0, 0, 128)
    rgba[1, 1] = (10, 20, 30, 255)
    rgb = composite_on_white(rgba)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    assert (rgb[2:, 2:] == 255).all()
    assert np.abs(rgb[0, 0].astype(int) - 127).max() <= 1
    assert rgb[1, 1].tolist() == [10, 20, 30]


def test_transparent_pixels_are_not_tissue():
    pink = canvas(colour=EOSIN_PINK)
    transparent = np.dstack([pink, np.zeros(pink.shape[:2], np.uint8)])
    assert not tissue_mask_from_rgb(transparent, THUMB_MPP, TissueConfig()).any()
    opaque = np.dstack([pink, np.full(pink.shape[:2], 255, np.uint8)])
    assert tissue_mask_from_rgb(opaque, THUMB_MPP, TissueConfig()).all()


@pytest.mark.parametrize(
    ("colour", "is_tissue"),
    [(EOSIN_PINK, True), (HAEMATOXYLIN_PURPLE, True), (GREEN_INK, False), (BLUE_INK, False), (RED_INK, False)],
    ids=["eosin", "haematoxylin", "green-ink", "blue-ink", "red-ink"],
)
def test_stain_blob_is_tissue_and_ink_blob_is_not(colour, is_tissue):
    rgb = canvas()
    blob = disk_mask(rgb.shape[:2], (80, 80), 40)  # 80 px across at 8 µm/px: 640 µm
    rgb[blob] = colour
    mask = tissue_mask_from_rgb(with_noise(rgb), THUMB_MPP, TissueConfig())
    if is_tissue:
        assert mask[blob].mean() > 0.95
        assert not mask[~disk_mask(rgb.shape[:2], (80, 80), 44)].any()
    else:
        assert not mask.any()
        assert tissue_mask_from_rgb(with_noise(rgb), THUMB_MPP, TissueConfig(reject_pen=False))[blob].mean() > 0.95


def test_tissue_next_to_ink_survives():
    rgb = canvas()
    rgb[20:140, 20:80] = EOSIN_PINK
    rgb[20:140, 80:140] = GREEN_INK
    mask = tissue_mask_from_rgb(with_noise(rgb), THUMB_MPP, TissueConfig())
    assert mask[25:135, 25:75].all()
    assert not mask[:, 82:].any()


def test_near_black_is_not_tissue():
    rgb = canvas()
    rgb[40:120, 40:120] = (20, 5, 10)  # saturated in HSV terms, but value 0.08
    assert not tissue_mask_from_rgb(rgb, THUMB_MPP, TissueConfig()).any()
    assert tissue_mask_from_rgb(rgb, THUMB_MPP, TissueConfig(min_value=0.0))[50:110, 50:110].all()


def test_bright_unsaturated_pixels_are_glass():
    rgb = canvas(colour=EOSIN_PINK)
    rgb[80, 80] = WHITE  # the 3 px median hands it the saturation of the pink around it
    sizes = dict(median_um=24.0, close_um=0.0, min_hole_um2=0.0)
    assert not tissue_mask_from_rgb(rgb, THUMB_MPP, TissueConfig(**sizes))[80, 80]
    assert tissue_mask_from_rgb(rgb, THUMB_MPP, TissueConfig(**sizes, max_value=1.0))[80, 80]  # rule off


def test_min_object_area_is_physical():
    cfg = TissueConfig(median_um=0.0, close_um=0.0, min_object_um2=20000.0, min_hole_um2=0.0)
    rgb = canvas()
    rgb[70:90, 70:90] = EOSIN_PINK  # 20 x 20 px
    # 400 px are 25 600 µm² at 8 µm/px (kept) but 6 400 µm² at 4 µm/px (dropped).
    assert tissue_mask_from_rgb(rgb, 8.0, cfg).sum() == 400
    assert not tissue_mask_from_rgb(rgb, 4.0, cfg).any()
    # One physical square of 160 µm (25 600 µm²) is kept at both resolutions.
    finer = canvas((320, 320))
    finer[140:180, 140:180] = EOSIN_PINK
    assert tissue_mask_from_rgb(finer, 4.0, cfg).sum() == 1600


def test_small_holes_are_filled_and_large_ones_kept():
    cfg = TissueConfig(median_um=0.0, close_um=0.0, min_hole_um2=20000.0)
    rgb = canvas(colour=EOSIN_PINK)
    rgb[20:30, 20:30] = WHITE  # 100 px = 6 400 µm² at 8 µm/px: filled
    rgb[80:120, 80:120] = WHITE  # 1 600 px = 102 400 µm²: kept
    mask = tissue_mask_from_rgb(rgb, THUMB_MPP, cfg)
    assert mask[20:30, 20:30].all()
    assert not mask[80:120, 80:120].any()


def test_holes_are_4_connected_as_the_tissue_is_8_connected():
    """A one-pixel diagonal crack does not cut tissue that touches across its corners (8-connected),
    so it is not one 60-px hole but 60 holes of one pixel (4-connected), each far below the minimum
    and filled; a hole of the same 60 px in a straight line is kept."""
    cfg = TissueConfig(median_um=0.0, close_um=0.0, min_object_um2=0.0, min_hole_um2=1000.0)  # 15.6 px
    rgb = canvas(colour=EOSIN_PINK)
    diagonal = (np.arange(50, 110), np.arange(50, 110))
    rgb[diagonal] = WHITE
    rgb[20, 50:110] = WHITE
    mask = tissue_mask_from_rgb(rgb, THUMB_MPP, cfg)
    assert mask[diagonal].all()
    assert not mask[20, 50:110].any()


def test_closing_bridges_gaps_narrower_than_the_disk():
    cfg = TissueConfig(median_um=0.0, close_um=32.0, min_object_um2=0.0, min_hole_um2=0.0)
    rgb = canvas()
    rgb[40:120, 20:50] = EOSIN_PINK
    rgb[40:120, 52:90] = EOSIN_PINK  # 2 px = 16 µm from the first block: bridged by a 32 µm disk
    rgb[40:120, 96:140] = EOSIN_PINK  # 6 px = 48 µm from the second: left open
    mask = tissue_mask_from_rgb(rgb, THUMB_MPP, cfg)
    assert mask[45:115, 50:52].all()
    assert not mask[45:115, 91:95].any()


def test_pen_mask_grows_from_ink_only():
    rgb = canvas((60, 120))
    maroon = (85, 25, 45)  # dark red: thick red ink, or blood
    rgb[10:50, 5:25] = RED_INK
    rgb[10:50, 25:45] = maroon  # touches the red ink
    rgb[10:50, 75:95] = maroon  # alone
    pen = pen_mask(rgb2hsv(rgb))
    assert pen[10:50, 5:45].all()
    assert not pen[:, 60:].any()
    assert not pen[rgb.sum(axis=2) == 3 * 255].any()


def test_tissue_fraction():
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    assert tissue_fraction(mask) == pytest.approx(0.25)
    assert tissue_fraction(np.zeros((0, 0), bool)) == 0.0


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        tissue_mask_from_rgb(np.zeros((8, 8, 3), np.float32), THUMB_MPP, TissueConfig())
    with pytest.raises(ValueError):
        tissue_mask_from_rgb(np.zeros((8, 8), np.uint8), THUMB_MPP, TissueConfig())
    with pytest.raises(ValueError):
        tissue_mask_from_rgb(canvas(), 0.0, TissueConfig())


@needs_tiles
def test_colour_planes_converted_band_by_band_on_threads_equal_one_conversion():
    """Bands (here 7 rows, on one thread per core) give exactly the planes of converting the whole
    image at once: a real pen-marked crop, RGBA composited on white as a whole image would be."""
    from wsi_medcam.tissue import _colour_planes, _hsv, _ink_colours

    rgba = load(TILES / "tcga-green-pen.png").copy()
    rgba[::5, ::3, 3] = 0  # some transparent pixels: composited on white, band by band
    hsv = _hsv(composite_on_white(rgba))
    want = (hsv[..., 1], np.rint(hsv[..., 1] * 255.0).astype(np.uint8), hsv[..., 2], *_ink_colours(hsv))
    got = _colour_planes(rgba, band=7)
    assert rgba.shape[0] > 7 * 8, "enough bands for every thread"
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
    assert got[3].any() and got[4].any(), "the crop's ink is found"


@needs_tiles
@pytest.mark.parametrize("name", ["tcga-green-pen.png", "tcga-red-pen.png", "medium-nuclei-score-green-pen-level1.png"])
def test_hsv_is_scikit_images_to_within_float32_rounding(name):
    """OpenCV's conversion stands in for :func:`skimage.color.rgb2hsv`, the definition the
    thresholds were chosen on: every channel agrees to 1e-5 on real stained and inked pixels."""
    from wsi_medcam.tissue import _hsv

    rgb = composite_on_white(load(TILES / name))
    want = rgb2hsv(rgb.astype(np.float32) / 255.0)
    got = _hsv(rgb)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.ptp(want[..., 0]) > 0.5, "hues spread over the circle, ink and stain"


def test_lookup_by_bands_on_threads_is_the_fancy_index():
    """The label-table lookup that tissue cleaning runs band by band on threads gives ``table[labels]``,
    bands not dividing the height included."""
    from wsi_medcam.tissue import _lookup

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 50, (101, 37), dtype=np.int32)
    table = rng.random(50) > 0.5
    got = _lookup(table, labels, band=8)
    assert got.dtype == table.dtype and got.any() and not got.all()
    np.testing.assert_array_equal(got, table[labels])


def test_closing_does_not_bridge_over_ink():
    """A 3 px ink line (the narrowest that seeds ink: seeds are eroded by 3×3) between two pieces of
    tissue is a gap the closing would fill: the ink is taken out again after it."""
    cfg = TissueConfig(median_um=0.0, close_um=32.0, min_object_um2=0.0, min_hole_um2=0.0)
    rgb = canvas()
    rgb[40:120, 20:50] = EOSIN_PINK
    rgb[40:120, 50:53] = BLUE_INK
    rgb[40:120, 53:90] = EOSIN_PINK
    mask = tissue_mask_from_rgb(rgb, THUMB_MPP, cfg)
    assert mask[40:120, 20:50].all() and mask[40:120, 53:90].all()
    assert not mask[40:120, 50:53].any()
    pink = canvas()  # the same gap without ink is bridged: the check has teeth
    pink[40:120, 20:50] = pink[40:120, 53:90] = EOSIN_PINK
    assert tissue_mask_from_rgb(pink, THUMB_MPP, cfg)[45:115, 50:53].all()
