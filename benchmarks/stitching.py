"""Stitching alone, in the model process against N stitching processes, measured in one run.

    python benchmarks/stitching.py SLIDE --classifier DIR --segmenter DIR [--stitchers 0 2 4] [--batch-size 256]

The models run once, on the slide's first batch of tiles; their real masks (so chunks and polygons
are realistic) are then replayed for every tile of the slide's grid, batch by batch in the
stitcher's order, into a fresh evidence store each time: level-0 chunks, pyramid, polygons merged
and read back (as for the GeoJSON). Readers and models are out of the way, so the figures are what
stitching alone allows. For each setting it prints tiles/s and the *model process's* CPU ms per
tile: that process also has to feed the GPU, and its GIL is shared with the stitching threads
when they run in it. The ratios are against stitching in the model process (``--stitchers 0``),
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_medcam.export.ome_zarr import EvidenceStore
from wsi_medcam.stitch_processes import StitchingProcesses
from wsi_medcam.stitching import EvidenceStitcher


def stitch_once(grid, store_args: dict, outputs: tuple[np.ndarray, np.ndarray], batch: int, stitchers: int,
                strip_px: int) -> dict[str, float]:  # noqa: ANN001
    """Replay ``outputs`` (probabilities, evidence levels) for every tile into a new store; the figures."""
    probs, evidence = outputs
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        store = EvidenceStore(Path(tmp) / "evidence.ome.zarr", **store_args)
        stitcher = (StitchingProcesses(grid, store, processes=stitchers, spool_dir=Path(tmp), strip_px=strip_px)
                    if stitchers else EvidenceStitcher(grid, store, spool_dir=Path(tmp), strip_px=strip_px))
        order = stitcher.order()
        try:
            for first in range(0, len(order), batch):
                indices = order[first : first + batch]
                k = np.arange(len(indices)) % len(probs)
                preds = probs[k].argmax(1)
                stitcher.add_batch(indices, evidence[k], preds, probs[k, preds])
            stitcher.finish()
        finally:
            stitcher.close()
        streamed = time.perf_counter() - start
        store.finalize({})
        pyramid = time.perf_counter() - start - streamed
        polygons = sum(1 for _ in stitcher.polygons.merged(simplify_px=grid.downsample * 0.5))
        wall = time.perf_counter() - start
        main_cpu, other_cpu = time.process_time() - cpu, getattr(stitcher, "processes_cpu_s", 0.0)
    n = len(grid)
    processes = stitcher.shard[1] if stitchers else 0  # at most one per strip
    return {"stitchers": processes, "strips": len(stitcher._strips), "tiles_per_s": n / wall,
            "streaming_tiles_per_s": n / streamed, "pyramid_top_s": pyramid, "polygons_s": wall - streamed - pyramid,
            "model_process_cpu_ms_per_tile": main_cpu / n * 1e3, "stitching_processes_cpu_ms_per_tile": other_cpu / n * 1e3,
            "polygons": polygons, "level0_chunks": stitcher.chunks_written}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide", type=Path)
    ap.add_argument("--classifier", type=Path, required=True)
    ap.add_argument("--segmenter", type=Path, required=True)
    ap.add_argument("--stitchers", type=int, nargs="+", default=[0, 2], help="settings to compare; 0 = in the model process")
    ap.add_argument("--batch-size", type=int, help="tiles per batch (default: the device's, as in the pipeline)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--strip-px", type=int, default=4096)
    ap.add_argument("--masks", choices=["model", "dark"], default="model",
                    help="replay the segmenter's masks, or Med-CAM-like ones made from the tiles (see throughput.py)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds over the settings; medians are reported")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # imported here, not at the top: each stitching process imports this script as its __main__
    import torch

    from wsi_medcam.batching import TileDataset
    from wsi_medcam.config import RunConfig
    from wsi_medcam.inference import default_batch_size
    from wsi_medcam.pipeline import load_models, tile_geometry
    from wsi_medcam.slide import SlideRef, open_slide
    from wsi_medcam.tiling import plan_tiles
    from wsi_medcam.tissue import detect_tissue

    cfg = RunConfig.from_dict({"classifier": str(args.classifier), "segmenter": str(args.segmenter),
                               "inference": {"device": args.device}})
    models = load_models(cfg)
    batch = args.batch_size or default_batch_size(models.predictor.device)
    mpp, tile_size = tile_geometry(cfg, models.classifier)
    with open_slide(args.slide) as slide:
        downsample = slide.downsample_for(mpp, cfg.slide.level_tolerance)
        grid = plan_tiles(slide.dimensions, downsample, detect_tissue(slide, cfg.tissue).mask, cfg.tiling, mpp=mpp,
                          tile_size=tile_size)
        ref, slide_mpp, (width, height) = SlideRef.of(slide), slide.mpp.mean, slide.dimensions
    dataset = TileDataset(ref, grid)
    sample = torch.stack([dataset[k][0] for k in range(min(len(grid), 64))])
    probs, evidence, _ = models.predictor.predict(sample)
    if args.masks == "dark":
        from throughput import dark_masks  # this folder's

        evidence = dark_masks(sample)
    ccfg = models.classifier.config
    store_args = {"shape": (height, width), "mpp": slide_mpp, "chunk": cfg.output.chunk_size,
                  "min_size": cfg.output.min_pyramid_size, "class_names": list(ccfg.class_names),
                  "colors": ccfg.class_colors(), "name": args.slide.name}
    runs: dict[int, list[dict[str, float]]] = {s: [] for s in args.stitchers}
    for _ in range(args.repeats):  # alternating, so a drifting machine load hits every setting
        for s in args.stitchers:
            runs[s].append(stitch_once(grid, store_args, (probs, evidence), batch, s, args.strip_px))
    figures = {s: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for s, rs in runs.items()}
    base = figures.get(0)
    if args.json:
        print(json.dumps({"tiles": len(grid), "batch_size": batch, "settings": figures}, indent=2))
        return
    print(f"{args.slide.name}: {len(grid)} tiles, batch {batch}, strips of {args.strip_px} px; medians of {args.repeats}")
    for s, f in figures.items():
        where = "in the model process" if s == 0 else f"{f['stitchers']:.0f} stitching processes"
        ratio = f" ({f['tiles_per_s'] / base['tiles_per_s']:.2f}× in-process)" if base and s else ""
        print(f"{where:>24}: {f['tiles_per_s']:7.1f} tiles/s{ratio} ({f['strips']:.0f} strips), streaming "
              f"{f['streaming_tiles_per_s']:7.1f}, then pyramid top {f['pyramid_top_s']:.2f} s, polygons "
              f"{f['polygons_s']:.2f} s; "
              f"model process {f['model_process_cpu_ms_per_tile']:.2f} CPU ms/tile, stitching processes "
              f"{f['stitching_processes_cpu_ms_per_tile']:.2f}; {f['polygons']:.0f} polygons, "
              f"{f['level0_chunks']:.0f} level-0 chunks")


if __name__ == "__main__":
    main()
