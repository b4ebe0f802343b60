"""Tiles/s over several slides run one after another, with and without each slide's tissue found
while the slide before it streams (``run_slides(tissue_ahead=...)``), against the bare models.

    python benchmarks/archive_rate.py SLIDE [SLIDE ...] --classifier DIR --segmenter DIR [--device cuda] [--copies 3]

``--copies N`` runs each slide N times (under N folder names), so one slide makes an archive.
What a user running ``wsi-medcam run slides/*.svs`` gets: per-slide stages and start-up count here,
not only the tiles' stream.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


from throughput import bare_tiles, bare_tiles_per_second
from wsi_medcam.config import RunConfig
from wsi_medcam.inference import default_batch_size
from wsi_medcam.pipeline import load_models, run_slides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slides", type=Path, nargs="+")
    ap.add_argument("--classifier", type=Path, required=True)
    ap.add_argument("--segmenter", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--copies", type=int, default=1, help="runs of each slide, under as many folder names")
    ap.add_argument("--bare-seconds", type=float, default=4.0)
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
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
