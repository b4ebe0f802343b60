"""Tiles/s over several slides run one after another, with and without each slide's tissue found
while the slide before it streams (``run_slides(tissue_ahead=...)``), against the bare models.

    python benchmarks/archive_rate.py SLIDE [SLIDE ...] --classifier DIR --segmenter DIR [--device cuda] [--copies 3]

``--copies N`` runs each slide N times (under N folder names), so one slide makes an archive.
What a user running ``wsi-medcam run slides/*.svs`` gets: per-slide stages and start-up count here,
not only the tiles' stream.

``--cold N`` also times, N times each way and each in a fresh process, a run's start: from before
``load_models`` until the first slide's tissue is in hand, with that tissue found after the models
have loaded and beside their loading (``start_tissue_ahead``, what ``run`` does on a GPU).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


from throughput import bare_tiles, bare_tiles_per_second
from wsi_medcam.config import RunConfig
from wsi_medcam.inference import default_batch_size
from wsi_medcam.pipeline import find_tissue, load_models, run_slides, start_tissue_ahead


def cold_start(slide: Path, cfg_json: str, beside: bool) -> dict[str, float]:
    """In a fresh process (imports done): seconds to load the models, and until the first slide's
    tissue is in hand as well, found after them or ``beside`` their loading."""
    cfg = RunConfig.model_validate_json(cfg_json)
    start = time.perf_counter()
    ahead = start_tissue_ahead([slide], Path(tempfile.mkdtemp()), cfg, tissue_ahead=True) if beside else None
    load_models(cfg)
    loaded = time.perf_counter()
    if ahead is not None:
        ahead.take(slide)
        ahead.close()
    else:
        find_tissue(slide, cfg)
    return {"models_s": loaded - start, "first_tissue_s": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slides", type=Path, nargs="+")
    ap.add_argument("--classifier", type=Path, required=True)
    ap.add_argument("--segmenter", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--copies", type=int, default=1, help="runs of each slide, under as many folder names")
    ap.add_argument("--bare-seconds", type=float, default=4.0)
    ap.add_argument("--cold", type=int, default=0, help="times each way to time a run's start (fresh processes)")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()

    cfg = RunConfig.from_dict({"classifier": str(args.classifier), "segmenter": str(args.segmenter) if args.segmenter else None,
                               "inference": {"device": args.device, "batch_size": args.batch_size},
                               "output": {"overwrite": True}})
    models = load_models(cfg)
    predictor = models.predictor
    batch = args.batch_size or default_batch_size(predictor.device)
    size = models.classifier.config.tile_size
    tiles = bare_tiles(predictor, batch, size)
    bare = bare_tiles_per_second(predictor, tiles, args.bare_seconds)[0]
    figures: dict[str, object] = {"device": str(predictor.device), "bare_tiles_per_s": bare}
    with tempfile.TemporaryDirectory() as tmp:
        slides = []
        for k in range(args.copies):  # the same slide under another folder: another output name
            for slide in args.slides:
                link = Path(tmp) / f"copy{k}" / slide.name
                link.parent.mkdir(exist_ok=True)
                link.symlink_to(slide.resolve())
                slides.append(link)
        for ahead in (False, True):
            start = time.perf_counter()
            results = run_slides(slides, Path(tmp) / f"out-{ahead}", cfg, models=models, tissue_ahead=ahead)
            wall = time.perf_counter() - start
            failed = [r for r in results if r.status != "done"]
            if failed:
                raise SystemExit(f"{failed[0].path.name}: {failed[0].reason}")
            n = sum(r.tiles for r in results)
            key = "tissue found ahead" if ahead else "one slide after another"
            figures[key] = {"tiles": n, "seconds": wall, "tiles_per_s": n / wall, "ratio_to_bare": n / wall / bare,
                            "tissue_s": [r.report["timings_s"]["tissue"] for r in results]}
            print(f"{key:>24}: {n / wall:8.0f} tiles/s ({n / wall / bare:.3f} of bare {bare:.0f}); {len(results)} slides, "
                  f"{n} tiles in {wall:.1f} s; tissue s per slide: "
                  + " ".join(f"{t:.2f}" for t in figures[key]["tissue_s"]), flush=True)
    if args.cold:
        spawn = multiprocessing.get_context("spawn")
        cold: dict[str, list[dict[str, float]]] = {"after the models": [], "beside the models": []}
        for _ in range(args.cold):  # alternated, so a drifting load hits both
            for beside, key in ((False, "after the models"), (True, "beside the models")):
                # not multiprocessing.Pool: its daemonic workers may not start processes, so load_models
                # would skip the forkserver and shared-memory manager that a run starts on a GPU
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    cold[key].append(pool.submit(cold_start, args.slides[0].resolve(), cfg.model_dump_json(), beside).result())
        figures["cold start"] = cold
        for key, runs in cold.items():
            print(f"{'first tissue ' + key:>32}: models " + " ".join(f"{r['models_s']:.2f}" for r in runs)
                  + " s; with the first slide's tissue " + " ".join(f"{r['first_tissue_s']:.2f}" for r in runs) + " s",
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
