"""The overview drawn from the panels a run keeps equals the one drawn from the full thumbnail."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import CMU, needs_data
from wsi_medcam.config import TissueConfig
from wsi_medcam.export.overview import class_heatmap, shrink_for_overview, write_overview
from wsi_medcam.slide import open_slide
from wsi_medcam.tissue import detect_tissue


@needs_data
def test_overview_from_shrunk_panels_equals_full_size(tmp_path):
    with open_slide(CMU) as slide:  # at 2 µm/px the thumbnail is larger than a 512 px panel
        tissue = detect_tissue(slide, TissueConfig(mpp=2.0))
    h, w = tissue.mask.shape
    assert max(h, w) > 512
    rng = np.random.default_rng(0)
    heatmap = class_heatmap(rng.dirichlet(np.ones(3), size=(20, 30)).transpose(2, 0, 1).astype(np.float32),
                            [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    evidence = (rng.random((h // 3, w // 3)) * 255).astype(np.uint8)

    thumb, panel = shrink_for_overview(tissue.thumbnail, tissue.mask)
    assert max(thumb.shape[:2]) == 512 and thumb.shape[:2] == panel.shape
    assert set(np.unique(panel)) <= {0, 255} and 0.05 < (panel > 0).mean() < 0.95
    write_overview(tmp_path / "full.png", tissue.thumbnail, tissue.mask, heatmap, evidence)
    write_overview(tmp_path / "kept.png", thumb, panel, heatmap, evidence)
    full, kept = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("full", "kept"))
    assert full.shape == kept.shape and np.array_equal(full, kept)


@needs_data
def test_thumbnails_written_in_their_process_from_arrays_handed_over_as_files(tmp_path):
    """GPU runs write thumbnail.png and tissue.png in a process of their own, handed the images as
    files rather than pickled through the start pipe: the same PNGs as written here, and the
    handed files are gone once the process has them."""
    from wsi_medcam.export.overview import write_handed_thumbnails, write_thumbnails
    from wsi_medcam.handoff import hand_over
    from wsi_medcam.stitch_processes import start_process

    with open_slide(CMU) as slide:
        tissue = detect_tissue(slide, TissueConfig(mpp=2.0))
    (tmp_path / "here").mkdir()
    (tmp_path / "there").mkdir()
    write_thumbnails(tmp_path / "here", tissue.thumbnail, tissue.mask)
    handed = hand_over(tmp_path / "there", thumbnail=tissue.thumbnail, mask=tissue.mask)
    assert sorted(p.name for p in handed.iterdir()) == ["mask.npy", "thumbnail.npy"]
    proc = start_process(write_handed_thumbnails, (tmp_path / "there", handed), name="test-thumbnails")
    proc.join(60)
    assert proc.exitcode == 0
    for name, image in (("thumbnail.png", tissue.thumbnail), ("tissue.png", tissue.mask.astype(np.uint8) * 255)):
        ours, theirs = (np.asarray(Image.open(tmp_path / d / name)) for d in ("here", "there"))
        assert np.array_equal(ours, image), name  # the image itself, channels in RGB order
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), name
    assert not list(handed.iterdir())


def test_class_heatmap_colours_each_cell_by_its_most_likely_class():
    """Each cell takes its argmax class's colour, scaled by that class's probability; a cell with no
    tile (all zeros) is black."""
    colors = [(200, 0, 0), (0, 100, 0), (0, 0, 250)]
    cells = {(0, 0): ((0.7, 0.2, 0.1), 0), (0, 1): ((0.1, 0.3, 0.6), 2), (0, 2): ((0.25, 0.5, 0.25), 1),
             (1, 0): ((0.0, 0.0, 1.0), 2), (1, 1): ((0.4, 0.35, 0.25), 0), (1, 2): ((0.0, 0.0, 0.0), None)}
    probs = np.zeros((3, 2, 3), np.float32)
    for (r, c), (p, _) in cells.items():
        probs[:, r, c] = p
    heat = class_heatmap(probs, colors)
    assert heat.shape == (2, 3, 3) and heat.dtype == np.uint8
    for (r, c), (p, cls) in cells.items():
        expected = np.zeros(3) if cls is None else np.asarray(colors[cls]) * p[cls]
        assert np.abs(heat[r, c].astype(int) - expected).max() <= 1, ((r, c), heat[r, c], expected)


def test_evidence_panel_reddens_the_evidence_and_leaves_the_rest_as_the_slide(tmp_path):
    """The fourth panel is the thumbnail blended towards red by 0.6 · evidence: where the evidence is
    full, 0.4 · slide + 0.6 · red; where there is none, the slide's own pixels."""
    h, w = 40, 60  # under the panel size: nothing is shrunk
    thumb = np.zeros((h, w, 3), np.uint8)
    thumb[:] = (200, 180, 160)
    thumb[:, w // 2:] = (60, 120, 240)  # two colours, and the evidence box lies on both
    evidence = np.zeros((h, w), np.uint8)
    evidence[10:30, 20:45] = 255
    write_overview(tmp_path / "overview.png", thumb, np.ones((h, w), bool), np.zeros((2, 3, 3), np.uint8), evidence)
    image = np.asarray(Image.open(tmp_path / "overview.png").convert("RGB")).astype(int)
    header, gap = 18, 8  # the layout write_overview draws: titles above, panels side by side
    assert image.shape == (header + h, 4 * w + 3 * gap, 3)
    np.testing.assert_array_equal(image[header:, :w], thumb)  # the first panel, to place the others by
    panel = image[header:, 3 * (w + gap):]
    on = evidence == 255
    reddened = 0.4 * thumb.astype(float) + 0.6 * np.array([255, 0, 0])
    assert np.abs(panel[on] - reddened[on]).max() <= 1
    np.testing.assert_array_equal(panel[~on], thumb[~on])


def test_thumbnails_that_cannot_be_written_fail_in_one_line(tmp_path):
    from wsi_medcam.errors import OutputError
    from wsi_medcam.export.overview import write_thumbnails

    with pytest.raises(OutputError, match="cannot write .*thumbnail.png"):
        write_thumbnails(tmp_path / "missing", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool))
