"""End to end on the real CMU-1-Small-Region.svs and on a multi-level pyramid built from its pixels."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from conftest import CMU, needs_data
from qupath_rules import check_qupath_geojson
from wsi_medcam.cli import app

pytestmark = needs_data
runner = CliRunner()


def _run(*args: str):
    result = runner.invoke(app, ["run", *map(str, args)])
    return result


@pytest.fixture(scope="module")
def cmu_run(tmp_path_factory, bundles):
    clf, seg = bundles
    out = tmp_path_factory.mktemp("run")
    result = _run(CMU, "--classifier", clf, "--segmenter", seg, "-o", out, "--workers", "2")
    assert result.exit_code == 0, result.output
    return out / CMU.stem, clf, seg


def _tiles(folder: Path) -> list[dict]:
    with open(folder / "tiles.csv") as fh:
        return list(csv.DictReader(fh))


def test_all_outputs_written(cmu_run):
    folder, _, _ = cmu_run
    for name in ("evidence.ome.zarr", "probabilities.ome.zarr", "tiles.geojson", "evidence.geojson", "tiles.csv",
                 "overview.png", "report.json", "tissue.png"):
        assert (folder / name).exists(), name
    assert not list(folder.parent.glob(".*partial"))


def test_stores_validate_as_ngff_04_and_overlay_the_slide(cmu_run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v04.image import Image
    from ome_zarr_models.v04.image_label import ImageLabel

    folder, _, _ = cmu_run
    root = zarr.open_group(str(folder / "evidence.ome.zarr"), mode="r")
    assert root.metadata.zarr_format == 2
    image = Image.from_zarr(root)  # raises on any NGFF 0.4 violation
    ms = image.attributes.multiscales[0]
    assert ms.version == "0.4"
    assert [a.name for a in ms.axes] == ["c", "y", "x"] and ms.axes[1].unit == "micrometer"
    paths = [d.path for d in ms.datasets]
    level0 = root[paths[0]]
    import openslide

    with openslide.OpenSlide(str(CMU)) as s:
        width, height = s.dimensions
        mpp = float(s.properties[openslide.PROPERTY_NAME_MPP_X])
    assert level0.shape == (1, height, width)
    scales = [d.coordinateTransformations[0].scale for d in ms.datasets]
    assert scales[0][1:] == pytest.approx([mpp, mpp])
    for prev, nxt, p in zip(scales, scales[1:], paths[1:]):
        assert nxt[1] == pytest.approx(2 * prev[1])
        assert root[p].shape[1] == -(-root[paths[paths.index(p) - 1]].shape[1] // 2)
    assert max(root[paths[-1]].shape[1:]) < 512
    label = ImageLabel.from_zarr(root["labels"]["evidence"])
    assert label.attributes.image_label.version == "0.4"
    # the labels overlay the evidence: the same µm/px (and placement) at every level, not level 0's throughout
    label_ms = root["labels"]["evidence"].attrs["multiscales"][0]["datasets"]
    image_ms = root.attrs["multiscales"][0]["datasets"]
    assert len(label_ms) == len(image_ms) == len(paths) >= 3
    for lab, img in zip(label_ms, image_ms):
        assert lab["path"] == img["path"]
        assert lab["coordinateTransformations"] == img["coordinateTransformations"], f"level {img['path']}"
    assert root["labels"]["evidence"][paths[0]].shape == level0.shape
    nodes = list(Reader(parse_url(str(folder / "evidence.ome.zarr")))())
    assert nodes[0].data[0].shape == (1, height, width)

    probs = zarr.open_group(str(folder / "probabilities.ome.zarr"), mode="r")
    pimg = Image.from_zarr(probs)
    grid_scale = pimg.attributes.multiscales[0].datasets[0].coordinateTransformations[0].scale
    assert grid_scale[1] == pytest.approx(224 * 0.5)
    assert probs["0"].shape[0] == 3


def test_probability_store_holds_each_tiles_probabilities_at_its_cell(cmu_run):
    """probabilities.ome.zarr channel k at the cell under a tile's centre (placed by the store's own
    scale and translation) is that tile's prob_<class k> in tiles.csv, for every tile."""
    import openslide

    folder, _, _ = cmu_run
    with openslide.OpenSlide(str(CMU)) as s:
        slide_mpp = float(s.properties[openslide.PROPERTY_NAME_MPP_X])
    probs = zarr.open_group(str(folder / "probabilities.ome.zarr"), mode="r")
    transforms = {t["type"]: t for t in probs.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]}
    sy, sx = transforms["scale"]["scale"][1:]
    ty, tx = transforms.get("translation", {"translation": [0.0, 0.0, 0.0]})["translation"][1:]
    names = [c["label"] for c in probs.attrs["omero"]["channels"]]
    grid = probs["0"][:]
    tiles = _tiles(folder)
    assert names == [k[len("prob_"):] for k in tiles[0] if k.startswith("prob_")]
    table = np.array([[float(t[f"prob_{n}"]) for n in names] for t in tiles])
    assert len(tiles) > 10 and np.abs(table[:, 0] - table[:, -1]).max() > 0.01  # channels in another order must show
    cells = set()
    for t in tiles:
        cx_um = (int(t["x"]) + float(t["size"]) / 2) * slide_mpp  # the tile's centre, µm
        cy_um = (int(t["y"]) + float(t["size"]) / 2) * slide_mpp
        row, col = int(np.floor((cy_um - ty) / sy)), int(np.floor((cx_um - tx) / sx))
        cells.add((row, col))
        np.testing.assert_allclose(grid[:, row, col], [float(t[f"prob_{n}"]) for n in names], atol=1e-5,
                                   err_msg=f"tile {t['tile']}")
    assert len(cells) == len(tiles)
    # positions without a tile are 0
    empty = np.ones(grid.shape[1:], bool)
    empty[tuple(np.array(sorted(cells)).T)] = False
    assert not grid[:, empty].any()


def test_evidence_only_inside_tissue_tiles(cmu_run):
    folder, _, _ = cmu_run
    root = zarr.open_group(str(folder / "evidence.ome.zarr"), mode="r")
    evidence = root["0"][0]
    labels = root["labels"]["evidence"]["0"][0]
    covered = np.zeros(evidence.shape, bool)
    tiles = _tiles(folder)
    assert tiles, "the real slide must have tissue tiles"
    for t in tiles:
        x, y, size = int(t["x"]), int(t["y"]), float(t["size"])
        covered[y : y + int(np.ceil(size)) + 1, x : x + int(np.ceil(size)) + 1] = True
        assert float(t["tissue_fraction"]) >= 0.25
    assert evidence.any()
    assert not evidence[~covered].any()
    assert not labels[~covered].any()
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    # hard labels exactly where the soft evidence is >= 0.5 (value 128 of 255)
    assert np.array_equal(labels > 0, evidence >= 128)
    # the per-tile evidence fraction in the table agrees with the stored level 0 for that tile
    t = max(tiles, key=lambda r: float(r["evidence_fraction"]))
    x, y, size = int(t["x"]), int(t["y"]), int(float(t["size"]))
    assert (labels[y : y + size, x : x + size] > 0).mean() == pytest.approx(float(t["evidence_fraction"]), abs=0.02)


def test_geojson_follows_qupath_rules(cmu_run):
    folder, _, _ = cmu_run
    report = json.loads((folder / "report.json").read_text())
    width, height = report["slide"]["dimensions"]
    tiles = check_qupath_geojson(folder / "tiles.geojson", width=width, height=height)
    assert len(tiles) == report["tiles"]["count"] == len(_tiles(folder))
    assert {f["properties"]["objectType"] for f in tiles} == {"tile"}
    assert "prob tumor" in tiles[0]["properties"]["measurements"]
    evidence = check_qupath_geojson(folder / "evidence.geojson", width=width, height=height)
    assert {f["properties"]["objectType"] for f in evidence} == {"annotation"}
    assert len(evidence) == report["evidence"]["polygons"] > 0
    # polygons are merged: their total area matches the stored hard mask within simplification error
    from shapely.geometry import shape

    area = sum(shape(f["geometry"]).area for f in evidence)
    root = zarr.open_group(str(folder / "evidence.ome.zarr"), mode="r")
    hard = (root["labels"]["evidence"]["0"][0] > 0).sum()
    assert area == pytest.approx(hard, rel=0.1)


def test_export_tiff_writes_the_stores_pyramids_as_ome_tiff(cmu_run, tmp_path):
    """QuPath 0.5 and older read no Zarr: the evidence and labels as pyramidal OME-TIFFs hold the same
    levels, pixel for pixel, as SubIFDs of level 0 with the µm/px in the OME-XML; a second reader
    (tiffslide) sees the pyramid and the resolution too. The run's folder is copied: the module's
    other tests read it."""
    import shutil

    import tifffile
    import tiffslide

    folder = tmp_path / cmu_run[0].name
    shutil.copytree(cmu_run[0], folder)
    result = runner.invoke(app, ["export-tiff", str(tmp_path), "--labels"])
    assert result.exit_code == 0, result.output
    store = zarr.open_group(str(folder / "evidence.ome.zarr"), mode="r")
    mpp = store.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][-1]
    for name, group in (("evidence.ome.tif", store), ("evidence-labels.ome.tif", store["labels/evidence"])):
        with tifffile.TiffFile(folder / name) as tif:
            assert tif.is_ome and len(tif.series) == 1 and len(tif.pages) == 1  # coarser levels are SubIFDs
            levels = tif.series[0].levels
            assert len(levels) == len(group.attrs["multiscales"][0]["datasets"]) >= 3
            for i, level in enumerate(levels):
                np.testing.assert_array_equal(level.asarray(), group[str(i)][0], err_msg=f"{name} level {i}")
            assert f'PhysicalSizeX="{mpp}"' in tif.ome_metadata
        with tiffslide.TiffSlide(folder / name) as slide:
            assert slide.level_count == len(levels)
            assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(mpp)
    assert not list(folder.glob(".*partial"))
    assert runner.invoke(app, ["export-tiff", str(tmp_path / "nothing")]).exit_code == 2


def test_report_records_slide_models_and_counts(cmu_run):
    folder, clf, seg = cmu_run
    report = json.loads((folder / "report.json").read_text())
    assert report["slide"]["mpp"]["source"] == "metadata"
    assert report["slide"]["backend"] == "openslide"
    assert sum(report["tiles"]["per_class"].values()) == report["tiles"]["count"]
    import hashlib

    assert report["models"]["classifier"]["sha256"] == hashlib.sha256((clf / "model.safetensors").read_bytes()).hexdigest()
    assert report["models"]["segmenter"]["sha256"] == hashlib.sha256((seg / "model.safetensors").read_bytes()).hexdigest()
    timings = report["timings_s"]
    assert {"open", "tissue", "thumbnails", "tiling", "setup", "inference+stitching", "pyramid", "total"} <= set(timings)
    assert sum(v for k, v in timings.items() if k != "total") >= 0.8 * timings["total"], "an untimed stage"
    parts = report["inference_stage_parts_s"]  # consecutive spans within the inference stage
    assert set(parts) == {"to_first_batch", "batches", "stitching_tail"} and min(parts.values()) >= 0
    assert parts["to_first_batch"] > 0 and 0.5 * timings["inference+stitching"] <= sum(parts.values()) <= timings["inference+stitching"] + 0.01
    assert "torch" in report["versions"]
    from wsi_medcam.cpus import usable_cores

    on_cpu = report["parameters"]["device"] == "cpu"  # default: a single-threaded stream per core, two on CUDA
    assert report["parameters"]["streams"] == (usable_cores() if on_cpu else 2)


def test_overview_is_drawn_from_the_finished_outputs(cmu_run, tmp_path):
    _assert_overview_drawn_from_outputs(cmu_run[0], tmp_path)


def _assert_overview_drawn_from_outputs(folder: Path, tmp_path: Path) -> None:
    """overview.png is drawn beside the run's last stages: its panels must be those of the finished
    thumbnail, tissue mask, probabilities and evidence pyramid, not of one still being built."""
    from PIL import Image

    from wsi_medcam.export.overview import class_heatmap, write_overview

    report = json.loads((folder / "report.json").read_text())
    width0, height0 = report["slide"]["dimensions"]
    params = report["parameters"]
    probabilities = zarr.open_group(str(folder / "probabilities.ome.zarr"), mode="r")
    probs = probabilities["0"][:]
    rows = min(probs.shape[1], max(1, round(height0 / params["downsample"] / params["stride"])))
    cols = min(probs.shape[2], max(1, round(width0 / params["downsample"] / params["stride"])))
    colors = [tuple(int(c["color"][i : i + 2], 16) for i in (0, 2, 4)) for c in probabilities.attrs["omero"]["channels"]]
    evidence = zarr.open_group(str(folder / "evidence.ome.zarr"), mode="r")
    coarsest = evidence[evidence.attrs["multiscales"][0]["datasets"][-1]["path"]][0]
    assert coarsest.any(), "no evidence: the panel would not tell a finished pyramid from an empty one"
    write_overview(tmp_path / "expected.png", np.asarray(Image.open(folder / "thumbnail.png")),
                   np.asarray(Image.open(folder / "tissue.png")), class_heatmap(probs[:, :rows, :cols], colors), coarsest)
    assert np.array_equal(np.asarray(Image.open(folder / "overview.png")), np.asarray(Image.open(tmp_path / "expected.png")))


def test_rerun_skips_and_overwrite_redoes(cmu_run):
    folder, clf, seg = cmu_run
    out = folder.parent
    before = (folder / "report.json").stat().st_mtime_ns
    stale = out / f".{folder.name}.partial"
    stale.mkdir()
    (stale / "junk").write_text("half-finished")
    result = _run(CMU, "--classifier", clf, "--segmenter", seg, "-o", out)
    assert result.exit_code == 0 and "skipped" in result.output
    assert (folder / "report.json").stat().st_mtime_ns == before
    assert not stale.exists()
    result = _run(CMU, "--classifier", clf, "--segmenter", seg, "-o", out, "--overwrite")
    assert result.exit_code == 0 and "done" in result.output
    assert (folder / "report.json").stat().st_mtime_ns != before


def test_a_slide_folder_without_its_report_is_redone_not_skipped(tmp_path, monkeypatch):
    """A slide's folder counts as done only with its report.json: one without (left by an interrupted
    --overwrite, say) is cleared and the slide redone; one with it is skipped. The slide's work is
    stubbed: only the resume decision is under test."""
    from wsi_medcam import pipeline
    from wsi_medcam.config import RunConfig

    def fake_process(path, work_dir, cfg, models, **kwargs):
        (work_dir / "report.json").write_text("{}")
        return {"tiles": {"count": 0}}

    monkeypatch.setattr(pipeline, "process_slide", fake_process)
    out_dir = tmp_path / "out" / CMU.stem
    out_dir.mkdir(parents=True)
    (out_dir / "junk").write_text("from an interrupted run")
    cfg = RunConfig()
    result = pipeline.run_slide(CMU, out_dir, cfg, models=None)
    assert result.status == "done", result.reason
    assert (out_dir / "report.json").is_file() and not (out_dir / "junk").exists()
    assert pipeline.run_slide(CMU, out_dir, cfg, models=None).status == "skipped"


def test_classify_only_on_a_built_multilevel_pyramid(tmp_path, bundles, built_pyramid):
    clf, _ = bundles
    result = _run(built_pyramid, "--classifier", clf, "-o", tmp_path, "--workers", "0", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    folder = tmp_path / built_pyramid.stem
    report = json.loads((folder / "report.json").read_text())
    assert len(report["slide"]["levels"]) == 3
    assert report["parameters"]["downsample"] == pytest.approx(2.0)
    assert report["tiles"]["count"] > 0
    assert not (folder / "evidence.ome.zarr").exists() and not (folder / "evidence.geojson").exists()
    rows = _tiles(folder)
    assert all(r["evidence_fraction"] == "" for r in rows)
    probs = np.array([[float(r[f"prob_{c}"]) for c in ("tumor", "stroma", "other")] for r in rows])
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-3)


def test_failed_slide_is_reported_and_others_run(tmp_path, bundles):
    clf, _ = bundles
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00garbage")
    result = _run(bad, CMU, "--classifier", clf, "-o", tmp_path / "out", "--workers", "0")
    assert result.exit_code == 1
    assert "broken.svs" in result.output and "not a readable slide" in result.output
    assert (tmp_path / "out" / CMU.stem / "report.json").is_file()
    assert not (tmp_path / "out" / "broken").exists()


def test_a_mask_finer_than_the_scan_fails_that_slide_in_one_line(tmp_path, bundles):
    """Checked once the slide is open, before any work: nothing is left of it."""
    clf, seg = bundles
    result = _run(CMU, "--classifier", clf, "--segmenter", seg, "-o", tmp_path / "out", "--workers", "0",
                  "--mask-mpp", "0.1")
    assert result.exit_code == 1
    assert "--mask-mpp 0.1 is finer than the slide's 0.499 µm/px" in result.output and "Traceback" not in result.output
    assert not [p for p in (tmp_path / "out").iterdir() if p.is_dir()]  # neither the slide's folder nor a .partial


def test_tissue_found_a_slide_ahead_gives_the_same_outputs(tmp_path, monkeypatch, small_bundles, built_pyramid):
    """With ``tissue_ahead`` a slide's tissue is found while the slide before it streams, and used
    when its turn comes: the same outputs as without (the last slide, found ahead, differs from the
    one before it, so another slide's tissue would show). A slide whose work ahead fails still
    fails on its own, in one line, and the slides after it run. The full-size thumbnail found ahead
    is freed before the slide's tiles stream, as one the slide finds itself is."""
    import shutil
    import weakref

    from wsi_medcam import pipeline
    from wsi_medcam.config import RunConfig
    from wsi_medcam.pipeline import load_models, run_slides

    found_ahead: dict[str, weakref.ref] = {}  # slide name → its thumbnail, found ahead

    def find_and_watch(path, cfg):
        tissue = find_tissue(path, cfg)
        found_ahead[path.name] = weakref.ref(tissue.thumbnail)
        return tissue

    held_while_streaming = set()

    def progress(name, done, total):
        if name in found_ahead and found_ahead[name]() is not None:
            held_while_streaming.add(name)

    find_tissue = pipeline.find_tissue
    monkeypatch.setattr(pipeline, "find_tissue", find_and_watch)

    clf, _ = small_bundles
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00garbage")
    copy = tmp_path / "copy" / CMU.name
    copy.parent.mkdir()
    shutil.copy(CMU, copy)
    cfg = RunConfig.from_dict({"classifier": str(clf), "inference": {"device": "cpu", "workers": 0, "precision": "fp32"}})
    models = load_models(cfg)
    slides = [CMU, bad, copy, built_pyramid]
    runs = {ahead: run_slides(slides, tmp_path / f"ahead-{ahead}", cfg, models=models, tissue_ahead=ahead,
                              progress=progress)
            for ahead in (False, True)}
    assert list(found_ahead) == [built_pyramid.name] and not held_while_streaming
    for results in runs.values():
        assert [r.status for r in results] == ["done", "failed", "done", "done"]
        assert "broken.svs" in results[1].reason and "not a readable slide" in results[1].reason
    # the first slide has none before it, the broken one stops the chain, the last one is found ahead
    found = {ahead: [r.report["tissue"]["found_ahead"] for r in results if r.status == "done"] for ahead, results in runs.items()}
    assert found == {False: [False, False, False], True: [False, False, True]}
    assert runs[False][3].report["tissue"]["fraction"] != runs[False][2].report["tissue"]["fraction"]
    for plain, ahead in zip(runs[False], runs[True]):
        if plain.status == "done":
            assert plain.report["tissue"]["fraction"] == ahead.report["tissue"]["fraction"] > 0
            assert plain.report["tiles"]["count"] == ahead.report["tiles"]["count"] > 0
            assert (plain.output / "tiles.csv").read_bytes() == (ahead.output / "tiles.csv").read_bytes()
            assert (plain.output / "tissue.png").read_bytes() == (ahead.output / "tissue.png").read_bytes()


def test_the_first_slides_tissue_is_found_while_the_models_load(tmp_path, monkeypatch, small_bundles):
    """run_slides without models finds the first slide's tissue beside load_models (on a GPU, by
    default): the slide takes it from there, and its outputs are those of a run that found it itself."""
    from wsi_medcam import pipeline
    from wsi_medcam.config import RunConfig
    from wsi_medcam.pipeline import run_slides, start_tissue_ahead

    clf, _ = small_bundles
    cfg = RunConfig.from_dict({"classifier": str(clf), "inference": {"device": "cpu", "workers": 0, "precision": "fp32"}})
    assert start_tissue_ahead([CMU], tmp_path / "cpu", cfg) is None  # a CPU's cores are the models'
    started, seen_by_models = threading.Event(), []
    find_tissue, load_models = pipeline.find_tissue, pipeline.load_models

    def finding(*args):
        started.set()
        return find_tissue(*args)

    def loading(*args):  # the tissue detection must start while the models are still loading
        seen_by_models.append(started.wait(60))
        return load_models(*args)

    monkeypatch.setattr(pipeline, "find_tissue", finding)
    monkeypatch.setattr(pipeline, "load_models", loading)
    ahead, = run_slides([CMU], tmp_path / "ahead", cfg, tissue_ahead=True)
    assert seen_by_models == [True]
    plain, = run_slides([CMU], tmp_path / "plain", cfg, tissue_ahead=False)
    assert ahead.report["tissue"]["found_ahead"] and not plain.report["tissue"]["found_ahead"]
    for name in ("tiles.csv", "tissue.png"):
        assert (ahead.output / name).read_bytes() == (plain.output / name).read_bytes(), name


def test_coarser_mask_mpp_with_overlapping_tiles(tmp_path, bundles, built_pyramid):
    """--mask-mpp writes a coarser level 0 covering the same extent; overlapping tiles blend without seams."""
    clf, seg = bundles
    result = _run(built_pyramid, "--classifier", clf, "--segmenter", seg, "-o", tmp_path, "--workers", "0",
                  "--mask-mpp", "1.0", "--overlap", "32")
    assert result.exit_code == 0, result.output
    folder = tmp_path / built_pyramid.stem
    report = json.loads((folder / "report.json").read_text())
    width, height = report["slide"]["dimensions"]
    root = zarr.open_group(str(folder / "evidence.ome.zarr"), mode="r")
    assert root["0"].shape == (1, round(height * 0.25), round(width * 0.25))
    scale = root.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale[1:] == [1.0, 1.0]
    assert report["parameters"]["stride"] == 224 - 32
    assert root["0"][0].any()
    evidence = check_qupath_geojson(folder / "evidence.geojson", width=width, height=height)
    # areas in µm² at the slide's 0.25 µm/px (built_pyramid), not the tiles' 0.5: coordinates are level-0 px
    from shapely.geometry import shape

    slide_mpp = 0.25
    assert evidence
    polygons = [shape(f["geometry"]) for f in evidence]
    areas_px = np.array([p.area for p in polygons])
    areas_um2 = np.array([f["properties"]["measurements"]["Area µm^2"] for f in evidence])
    # the file's coordinates are rounded to 0.1 px: within 0.1 px times the perimeter of the exact area
    slack_px = np.array([0.1 * p.length for p in polygons])
    assert np.all(np.abs(areas_um2 / slide_mpp**2 - areas_px) <= slack_px + 1e-6)
    assert areas_um2.sum() == pytest.approx(areas_px.sum() * slide_mpp**2, rel=0.01)
    # the probability grid: one cell per stride, its pixels centred on the tiles' centres (overlap / 2 in)
    tile_mpp, tile_size, overlap = report["parameters"]["tile_mpp"], 224, 32
    assert tile_mpp == pytest.approx(0.5) and report["parameters"]["tile_size"] == tile_size
    probs = zarr.open_group(str(folder / "probabilities.ome.zarr"), mode="r")
    transforms = {t["type"]: t for t in probs.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]}
    assert transforms["scale"]["scale"] == pytest.approx([1.0, (tile_size - overlap) * tile_mpp, (tile_size - overlap) * tile_mpp])
    assert transforms["translation"]["translation"] == pytest.approx([0.0, overlap / 2 * tile_mpp, overlap / 2 * tile_mpp])
    # the grid's last row reaches past the slide (the CSV keeps the square read), its QuPath tiles are cut to it
    tiles = _tiles(folder)
    assert max(int(t["y"]) + float(t["size"]) for t in tiles) > height
    assert len(check_qupath_geojson(folder / "tiles.geojson", width=width, height=height)) == len(tiles)


def test_narrow_strips_change_the_tile_order_not_the_outputs(tmp_path, small_bundles):
    """The stitcher finishes the slide in vertical strips (memory bounded by their width): strips of
    128 px at the tiles' 1 µm/px, about 9 across the real slide with chunks of 256 (at its 0.5 µm/px),
    must give the outputs of one strip, and so must those strips stitched in 2 processes (every
    other strip each)."""
    clf, seg = small_bundles
    runs = {}
    for name, strip_px, stitchers in (("one", 4096, 0), ("many", 128, 0), ("processes", 128, 2)):
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"output:\n  chunk_size: 256\n  strip_px: {strip_px}\n  stitchers: {stitchers}\n")
        result = _run(CMU, "--classifier", clf, "--segmenter", seg, "-o", tmp_path / name, "--workers", "0",
                      "--precision", "fp32", "--config", config)
        assert result.exit_code == 0, result.output
        runs[name] = tmp_path / name / CMU.stem
    one = runs["one"]
    orders = [[int(t["tile"]) for t in _tiles(runs[name])] for name in ("many", "processes")]
    assert orders[0] != sorted(orders[0]), "strips must change the order tiles are read in"
    assert orders[1] != orders[0], "two stitching processes take two strips at a time"
    for many in (runs["many"], runs["processes"]):
        _assert_same_outputs(one, many)
    # with processes the tile records are written by a process of their own, fed through a pipe
    fields = ("tile", "x", "y", "size", "tissue_fraction", "prediction")
    records = [sorted(tuple(t[k] for k in fields) for t in _tiles(runs[name])) for name in ("many", "processes")]
    report = json.loads((runs["processes"] / "report.json").read_text())
    assert records[0] == records[1] and len(records[1]) == report["tiles"]["count"] > 0
    width, height = report["slide"]["dimensions"]
    assert len(check_qupath_geojson(runs["processes"] / "tiles.geojson", width=width, height=height)) == len(records[1])
    # and the thumbnails by one of their own, handed the images as files
    assert sorted(p.name for p in runs["processes"].iterdir()) == sorted(p.name for p in one.iterdir())
    for name in ("thumbnail.png", "tissue.png"):
        assert (runs["processes"] / name).read_bytes() == (one / name).read_bytes(), name
    # the pyramid's top levels are built after the last tile there, the overview from them
    _assert_overview_drawn_from_outputs(runs["processes"], tmp_path)


def _assert_same_outputs(one: Path, many: Path) -> None:
    """Same predictions, evidence within 1 at every level, the same polygons (up to fp32 ties)."""
    from shapely.geometry import shape
    from shapely.ops import unary_union

    by_tile = [sorted(_tiles(f), key=lambda t: int(t["tile"])) for f in (one, many)]
    assert [t["prediction"] for t in by_tile[0]] == [t["prediction"] for t in by_tile[1]]
    stores = [zarr.open_group(str(f / "evidence.ome.zarr"), mode="r") for f in (one, many)]
    assert len(stores[0]["labels/evidence"]) == len(stores[1]["labels/evidence"]) >= 3
    for level in stores[0]["labels/evidence"].array_keys():
        a, b = (s[level][0].astype(int) for s in stores)
        assert a.any() and np.abs(a - b).max() <= 1, f"evidence level {level}"
        la, lb = (s["labels/evidence"][level][0] for s in stores)
        assert np.mean(la != lb) < 1e-3, f"labels level {level}"
    polygons = []
    for f in (one, many):
        feats = json.loads((f / "evidence.geojson").read_text())["features"]
        polygons.append(unary_union([shape(ft["geometry"]) for ft in feats]))
        assert feats
    assert polygons[0].area > 0
    assert polygons[0].symmetric_difference(polygons[1]).area < 1e-3 * polygons[0].area
    counts = [json.loads((f / "report.json").read_text())["evidence"]["polygons"] for f in (one, many)]
    assert abs(counts[0] - counts[1]) <= 0.01 * counts[0], counts


def test_load_models_starts_the_forkserver_when_slides_will_stitch_in_processes(bundles):
    """Its imports (seconds) then overlap the models' loading, not the first slide. One process
    loads the models for in-process stitching (no forkserver), then for a stitching process."""
    import subprocess
    import sys

    clf, seg = bundles
    code = (
        "import psutil\n"
        "from wsi_medcam.config import RunConfig\nfrom wsi_medcam.pipeline import load_models\n"
        "for stitchers in (0, 1):\n"
        f"    load_models(RunConfig.from_dict({{'classifier': {str(clf)!r}, 'segmenter': {str(seg)!r},\n"
        "        'inference': {'device': 'cpu'}, 'output': {'stitchers': stitchers}}))\n"
        "    print(any('forkserver' in ' '.join(p.cmdline()) for p in psutil.Process().children()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "True"]


def test_refinement_keeps_the_streamed_evidence_where_its_class_differs(tmp_path, monkeypatch, cmu_pixels):
    """Refinement explains the class of its float32 copy of the classifier; a tile streamed (bf16)
    as the other class (a borderline tile among a rare class's top K) keeps its streamed evidence,
    not a mask that explains one class under the other's label."""
    from types import SimpleNamespace

    import torch

    from conftest import write_pyramid
    from wsi_medcam.medcam import explain
    from wsi_medcam.pipeline import refine_tiles
    from wsi_medcam.slide import SlideRef, open_slide

    path = write_pyramid(tmp_path / "s.svs", cmu_pixels[:448, :448], mpp=0.5, levels=1)
    with open_slide(path) as slide:
        ref = SlideRef.of(slide)
        tile_3 = slide.read_region_at((224, 224), 224, 0.5)
    read = []

    def explained(classifier, tiles, **kwargs):  # per-image Med-CAM, as far as refine_tiles sees it
        read.append(tiles)
        return (torch.full((len(tiles), 1, 224, 224), 0.9),
                [{"prediction": "tumour"}, {"prediction": "tumour"}])

    monkeypatch.setattr(explain, "explain_batch", explained)
    replaced = []
    grid = SimpleNamespace(tile_size=224, mpp=0.5, xy_level0=lambda i: (224 * (i % 2), 224 * (i // 2)))
    stitcher = SimpleNamespace(grid=grid, replace=lambda i, mask, c: replaced.append((i, c)))
    classifier = SimpleNamespace(config=SimpleNamespace(class_names=["tumour", "normal"]))
    models = SimpleNamespace(refine_from=(classifier, None))
    # tile 0 streamed as tumour, tile 3 as normal; refined, both came out tumour
    assert refine_tiles(stitcher, ref, [(0, 0), (1, 3)], models, steps=1, tolerance=0.02) == 1
    assert replaced == [(0, 0)]
    assert np.array_equal(read[0][1], tile_3)  # tile 3's own pixels were refined
