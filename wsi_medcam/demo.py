"""``wsi-medcam demo``: the whole product in a few CPU minutes, offline, on evidence whose truth is known.

It builds a small multi-level slide of real tissue pixels in which some tiles carry a planted
marker (the only class-defining evidence), trains a small classifier to detect the marker, trains an
amortised Med-CAM segmenter label-free against it, runs the full pipeline with Med-CAM and with
Grad-CAM, and scores both against the planted truth (IoU of the stitched hard evidence, pointing
game per marked tile). Real H&E comes from ``../shared/data`` beside a development checkout; a
newcomer's install falls back on the IHC image scikit-image ships (real tissue, no download).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

from .bundles import ClassifierConfig, Bundle, load_classifier, save_bundle
from .classifier_training import train_classifier
from .config import RunConfig
from .medcam.planted import load_sources, plant, planted_tiles
from .medcam.train import CamTrainConfig, train_segmenter
from .pipeline import load_models, run_slides
from .replaced import replace_text
from .slide import open_slide
from .slide_writer import array_reader, write_pyramid

log = logging.getLogger("wsi_medcam")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
Step = Callable[[str], None]


def demo_sources(tile_size: int) -> tuple[list[np.ndarray], str]:
    """Real tissue images: the shared H&E regions when present, else scikit-image's bundled IHC image."""
    he = [SHARED / "images" / n for n in ("tiatoolbox-target-he.png", "TCGA-HE-7130-01Z-00-DX1.png", "stardist-histo-he.jpg")]
    he = [p for p in he if p.is_file()]
    if he:
        sources = load_sources(he, min_side=tile_size)
        cmu = SHARED / "slides" / "CMU-1-Small-Region.svs"
        if cmu.is_file():
            with open_slide(cmu) as slide:
                sources.append(slide.read_level((0, 0), 0, slide.dimensions))
        return sources, "shared H&E regions and CMU-1-Small-Region"
    from skimage import data

    return [data.immunohistochemistry()], "scikit-image's bundled IHC image (no shared data found)"


def build_slide(path: Path, sources: list[np.ndarray], *, tile_size: int, grid: int, mpp: float, seed: int,
                marked_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """A ``grid``×``grid`` tissue slide with a one-tile white margin; returns (level-0 RGB, marker truth)."""
    rng = np.random.default_rng(seed)
    side = (grid + 2) * tile_size
    rgb = np.full((side, side, 3), 255, np.uint8)
    truth = np.zeros((side, side), bool)
    for r in range(grid):
        for c in range(grid):
            src = sources[int(rng.integers(len(sources)))]
            y = int(rng.integers(0, src.shape[0] - tile_size + 1))
            x = int(rng.integers(0, src.shape[1] - tile_size + 1))
            crop = np.rot90(src[y : y + tile_size, x : x + tile_size], int(rng.integers(4)))
            sl = (slice((r + 1) * tile_size, (r + 2) * tile_size), slice((c + 1) * tile_size, (c + 2) * tile_size))
            if rng.random() < marked_fraction:
                crop, truth[sl] = plant(crop, rng, radius=0.12 * tile_size, width=0.045 * tile_size)
            rgb[sl] = crop
    write_pyramid(path, array_reader(rgb), side, side, mpp=mpp, levels=3, tile=256)
    return rgb, truth


def score(folder: Path, truth: np.ndarray, tile_size: int) -> dict[str, float]:
    """IoU of the stitched hard evidence with the truth; pointing game over the marked tiles."""
    root = zarr.open_group(str(folder / "evidence.ome.zarr"), mode="r")
    soft = root["0"][0]
    hard = root["labels"]["evidence"]["0"][0] > 0
    inter, union = (hard & truth).sum(), (hard | truth).sum()
    hits, marked = 0, 0
    for y in range(0, truth.shape[0], tile_size):
        for x in range(0, truth.shape[1], tile_size):
            t = truth[y : y + tile_size, x : x + tile_size]
            if not t.any():
                continue
            marked += 1
            s = soft[y : y + tile_size, x : x + tile_size]
            hits += bool(t.flat[int(np.argmax(s))])
    return {"iou": float(inter / union) if union else 0.0, "pointing_game": hits / marked if marked else 0.0,
            "evidence_area": float(hard.mean()), "truth_area": float(truth.mean())}


def run_demo(out: Path, *, tile_size: int = 96, grid: int = 10, train_tiles: int = 400, epochs: int = 8,
             cam_steps: int = 200, seed: int = 0, step: Step = lambda _: None) -> dict[str, Any]:
    """Run every stage into ``out`` and return the summary (also written to ``out/demo.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mpp = 0.5
    sources, source_name = demo_sources(tile_size)
    step(f"tissue pixels: {source_name}")
    data = planted_tiles(sources, train_tiles, tile_size=tile_size, seed=seed)
    step(f"training a resnet10t classifier on {train_tiles} tiles ({epochs} epochs)")
    cfg = ClassifierConfig(arch="resnet10t", class_names=["plain", "marker"], mpp=mpp, tile_size=tile_size,
                           colors=[(120, 120, 120), (230, 25, 75)])
    trained = train_classifier(data.images, data.labels, cfg, epochs=epochs, lr=3e-3, seed=seed)
    classifier_dir = save_bundle(trained.model, cfg.model_copy(update={"val_accuracy": trained.val_accuracy}),
                                 out / "classifier")
    classifier: Bundle = load_classifier(classifier_dir)
    step(f"classifier validation accuracy {trained.val_accuracy:.3f}; training Med-CAM ({cam_steps} steps, label-free)")
    cam_cfg = CamTrainConfig(steps=cam_steps, val_every=cam_steps, checkpoint_every=cam_steps, seed=seed)
    # the classifier was trained anew, so an earlier demo's Med-CAM training is not resumed (it
    # would be refused if the classifier's weights differ at all): its checkpoint and log go
    for earlier in (out / "medcam" / "checkpoint", out / "medcam" / "train_log.jsonl"):
        if earlier.is_dir():
            shutil.rmtree(earlier)
        elif earlier.is_file():
            earlier.unlink()
    segmenter_dir, cam_summary = train_segmenter(classifier, data.images, cam_cfg, out / "medcam")
    step("building a 3-level demo slide with planted evidence")
    slide = out / "demo-slide.tif"
    _, truth = build_slide(slide, sources, tile_size=tile_size, grid=grid, mpp=mpp, seed=seed + 1)
    summary: dict[str, Any] = {"source": source_name, "classifier_val_accuracy": trained.val_accuracy,
                               "medcam_validation": cam_summary["validation"], "methods": {}}
    for explainer in ("medcam", "gradcam"):
        step(f"running the pipeline with {explainer}")
        run_cfg = RunConfig.from_dict({
            "classifier": str(classifier_dir), "segmenter": str(segmenter_dir) if explainer == "medcam" else None,
            "inference": {"explainer": explainer, "workers": 0}, "output": {"overwrite": True},
        })
        result = run_slides([slide], out / f"run-{explainer}", run_cfg, models=load_models(run_cfg))[0]
        if result.status != "done":
            raise RuntimeError(f"demo run with {explainer} failed: {result.reason}")
        summary["methods"][explainer] = {**score(result.output, truth, tile_size),
                                         "certified": result.report["evidence"]["certified_fraction"],
                                         "output": str(result.output)}
    replace_text(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    return summary
