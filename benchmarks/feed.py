"""Where the inference stage's tiles/s is lost: the pipeline with parts of it taken away, in ONE process.

    python benchmarks/feed.py SLIDE --classifier DIR --segmenter DIR [--device cuda] [--workers 6 8] [--repeats 2]

Each mode runs the whole ``run`` pipeline on the slide (readers, pin-memory thread, stitching
processes started) but changes what the models' side does with the batches, and reports the tiles
per second of the steady stream (from the first batch's arrival to the last one's), so a rate lost
in the pipeline can be pinned on one part:

- ``readers``: the batches are only taken from the loader (read, handed over, pinned on CUDA), no
  model runs, nothing is stitched: what the readers can deliver;
- ``models``: the batches go through the models, whose outputs are dropped (nothing is stitched or
  written): readers and models together;
- ``whole``: the pipeline as it is.

Beside them the bare models on in-memory tiles (as ``throughput.py`` measures them). With several
``--workers`` counts, every mode runs with each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from throughput import bare_tiles, bare_tiles_per_second
from wsi_medcam.config import RunConfig
from wsi_medcam.inference import BatchResult, default_batch_size
from wsi_medcam.pipeline import Models, load_models, run_slide

Arrival = tuple[float, int]
"""(time s, tiles so far)."""


def steady_rate(arrivals: list[Arrival]) -> float:
    """Tiles per second from the first batch to the last: the stream without its start."""
    (t0, n0), (t1, n1) = arrivals[0], arrivals[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


def run_mode(mode: str, slide: Path, cfg: RunConfig, models: Models) -> dict[str, float]:
    """One pipeline run in ``mode``: the steady tiles/s of what the models' side took in, and the
    seconds of the inference stage."""
    predictor = models.predictor
    real_run = predictor.run
    seen: list[Arrival] = []

    def noted(items: Iterable, count) -> Iterator:  # noqa: ANN001
        done = 0
        for item in items:
            done += count(item)
            seen.append((time.perf_counter(), done))
            yield item

    def drained(batches: Iterable[tuple[torch.Tensor, object]]) -> Iterator[BatchResult]:
        for _ in noted(batches, lambda b: len(b[1])):
            pass
        yield from ()

    def dropped(batches: Iterable[tuple[torch.Tensor, object]]) -> Iterator[BatchResult]:
        for _ in noted(real_run(batches), lambda r: len(r.indices)):
            pass
        yield from ()

    def whole(batches: Iterable[tuple[torch.Tensor, object]]) -> Iterator[BatchResult]:
        yield from noted(real_run(batches), lambda r: len(r.indices))

    predictor.run = {"readers": drained, "models": dropped, "whole": whole}[mode]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_slide(slide, Path(tmp) / "out", cfg, models)
    finally:
        predictor.run = real_run
    if result.status != "done":
        raise SystemExit(f"{mode}: pipeline failed: {result.reason}")
    return {"tiles_per_s": steady_rate(seen), "tiles": seen[-1][1] if seen else 0,
            "inference_stage_s": result.report["timings_s"]["inference+stitching"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide", type=Path)
    ap.add_argument("--classifier", type=Path, required=True)
    ap.add_argument("--segmenter", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--workers", type=int, nargs="+", default=[None], help="reader counts to try (default: the pipeline's)")
    ap.add_argument("--stitchers", type=int, help="stitching processes (default: the pipeline's)")
    ap.add_argument("--modes", nargs="+", default=["readers", "models", "whole"], choices=["readers", "models", "whole"])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode; medians are reported")
    ap.add_argument("--bare-seconds", type=float, default=4.0)
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()

    base = {"classifier": str(args.classifier), "segmenter": str(args.segmenter) if args.segmenter else None,
            "inference": {"device": args.device, "batch_size": args.batch_size}, "output": {"overwrite": True, "stitchers": args.stitchers}}
    models = load_models(RunConfig.from_dict(base))
    predictor = models.predictor
    batch = args.batch_size or default_batch_size(predictor.device)
    size = models.classifier.config.tile_size
    tiles = bare_tiles(predictor, batch, size)
    figures: dict[str, object] = {"device": str(predictor.device), "batch_size": batch, "streams": predictor.streams,
                                  "bare_tiles_per_s": bare_tiles_per_second(predictor, tiles, args.bare_seconds)[0]}
    for workers in args.workers:
        cfg = RunConfig.from_dict({**base, "inference": {**base["inference"], "workers": workers}})
        for mode in args.modes:
            runs = [run_mode(mode, args.slide, cfg, models) for _ in range(args.repeats)]
            key = f"{mode}, {workers if workers is not None else 'default'} readers"
            figures[key] = {"tiles_per_s": statistics.median(r["tiles_per_s"] for r in runs), "runs": runs}
            each = ", ".join(f"{r['tiles_per_s']:.0f}" for r in runs)
            print(f"{key:>28}: {figures[key]['tiles_per_s']:8.0f} tiles/s steady (runs: {each}; {runs[-1]['tiles']} tiles)",
                  flush=True)
    print(f"{'bare models':>28}: {figures['bare_tiles_per_s']:8.0f} tiles/s")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
