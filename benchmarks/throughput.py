"""Pipeline throughput against the bare models, measured in ONE process and one run.

    python benchmarks/throughput.py SLIDE --classifier DIR --segmenter DIR [--batch-size 32] [--workers N] [--json]

(a) the bare models on pre-made uint8 tensors in memory: classifier alone, then classifier +
segmenter (+ the certification forwards the pipeline also does), at the pipeline's batch size,
device, precision and model streams (on a CPU also one batch at a time over all cores, the
pre-streams way, for comparison); (b) the full ``run`` pipeline on the slide (reading, tissue, tiling,
inference, stitching, pyramid, GeoJSON, reports). The two alternate ``--repeats`` times, and each
pipeline run is compared with the mean of the bare measurements just before and just after it, so
a shared machine's load drifting during the run hits both; prints the median tiles/s of each, the
ratio pipeline ÷ bare models, time per stage and peak RSS (this process and its reader processes).

``--ceiling`` adds (c): the pipeline once more with the models replaced by a stub that replays, at
no cost, the models' outputs for the slide's first real batch (so masks and polygons are the real
ones), so the figure is what reading, stitching, tracing and writing alone allow: the pipeline can
never be faster than that. It also gives the CPU ms per tile of the model process, the readers and
the other processes (stitching, GeoJSON encoding): the cores a GPU's speed would need.
``--ceiling-masks dark`` replays instead masks shaped like a trained Med-CAM segmenter's whatever
the segmenter at hand: the darkest (haematoxylin-rich) 20 % of each of those tiles, smoothed over
6 px (~6 polygons per tile on H&E), so ceilings of different machines compare.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import psutil
import torch

from wsi_medcam.config import RunConfig
from wsi_medcam.inference import Outputs, Predictor, default_batch_size
from wsi_medcam.pipeline import load_models, run_slide


def cpu_seconds() -> float:
    """CPU time (user + system) of this process's threads and of its finished children (the
    DataLoader readers), s. Unlike wall time it barely moves with other tenants' load."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def bare_tiles(predictor: Predictor, batch: int, size: int) -> torch.Tensor:
    """A batch of random uint8 tiles laid out as the loader hands them over (B×3×H×W with
    channels-last strides; pinned on CUDA), for the bare models."""
    tiles = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    return tiles.pin_memory() if predictor.device.type == "cuda" else tiles


def bare_tiles_per_second(predictor: Predictor, tiles: torch.Tensor, seconds: float) -> tuple[float, float]:
    """Batches of the same in-memory tiles through ``predictor.run`` (so as many batches at once
    as its streams, like the pipeline) for about ``seconds``; (tiles/s, CPU s per tile)."""
    indices = torch.arange(len(tiles))
    for _ in predictor.run([(tiles, indices)] * predictor.streams):  # warm-up (oneDNN kernels, autocast caches)
        pass
    done, start, cpu = 0, time.perf_counter(), cpu_seconds()

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while time.perf_counter() - start < seconds:
            yield tiles, indices

    for result in predictor.run(batches()):
        done += len(result.indices)
    return done / (time.perf_counter() - start), (cpu_seconds() - cpu) / done


def pinned_blocks_made() -> dict[str, float]:
    """On CUDA, the pinned host blocks torch's allocator has made so far and the ms it took (a run
    that makes new ones pays ~40 ms each on an H200 machine: what the reserved ones are for); on a
    CPU, zeros."""
    if not torch.cuda.is_available():
        return {"blocks": 0, "ms": 0.0}
    stats = torch.cuda.host_memory_stats()
    return {"blocks": stats.get("num_host_alloc", 0), "ms": stats.get("host_alloc_time.total", 0) / 1e3}


def peak_rss_mib() -> dict[str, float]:
    """ru_maxrss of this process and of the largest finished child (DataLoader readers), MiB."""
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


@contextmanager
def first_batch_outputs(predictor: Predictor) -> Iterator[dict[str, Outputs]]:
    """While open, ``predictor`` keeps its outputs for the first batch it sees (in the dict)."""
    captured: dict[str, Outputs] = {}
    real_predict = predictor.predict

    def predict(batch: torch.Tensor) -> Outputs:
        out = real_predict(batch)
        captured.setdefault("outputs", out)
        captured.setdefault("tiles", batch)
        return out

    predictor.predict = predict
    try:
        yield captured
    finally:
        predictor.predict = real_predict


@contextmanager
def batch_arrivals(predictor: Predictor) -> Iterator[list[tuple[float, int]]]:
    """While open, ``predictor.run`` notes in the list when each batch comes out of its loader (read
    by the readers, pinned by the loader's pin-memory thread), as (time s, tiles so far), after a
    first (time s, 0) when it starts pulling batches, i.e. the readers are being started. Against
    the times the batches' outputs are taken in, this says whether a slow start is the readers'
    (batches arrive late) or the models' side (batches wait)."""
    arrivals: list[tuple[float, int]] = []
    real_run = predictor.run

    def timed(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        arrivals.append((time.perf_counter(), 0))
        done = 0
        for tiles, indices in batches:
            done += len(indices)
            arrivals.append((time.perf_counter(), done))
            yield tiles, indices

    predictor.run = lambda batches: real_run(timed(batches))
    try:
        yield arrivals
    finally:
        predictor.run = real_run


def dark_masks(tiles: torch.Tensor, sigma_px: float = 6.0, area: float = 0.2) -> np.ndarray:
    """Evidence levels (B, H, W) uint8 shaped like a trained Med-CAM segmenter's on H&E: the darkest
    ``area`` of each uint8 tile (B, 3, H, W), smoothed over ``sigma_px``, a steep ramp around it."""
    grey = tiles.float().mean(1).numpy()
    dark = np.stack([cv2.GaussianBlur(255 - g, (0, 0), sigma_px) for g in grey])
    cut = np.quantile(dark, 1 - area, axis=(1, 2), keepdims=True)
    return np.clip(128 + (dark - cut) * 8, 0, 255).astype(np.uint8)


class ProcessTreeCPU:
    """CPU seconds of this process's descendants, sampled every 0.1 s while open (a process's last
    ≤ 0.1 s may be missed): forked readers, and the rest (stitching and GeoJSON processes, which
    forkserver starts)."""

    def __init__(self) -> None:
        self.readers = self.others = 0.0
        self._seen: dict[int, tuple[float, bool]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for p in me.children(recursive=True):
                try:
                    t = p.cpu_times()
                    forked = p.ppid() == me.pid and "forkserver" not in " ".join(p.cmdline())
                    self._seen[p.pid] = (t.user + t.system, forked)
                except psutil.Error:
                    pass
            self._stop.wait(0.1)

    def __enter__(self) -> "ProcessTreeCPU":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.readers = sum(c for c, forked in self._seen.values() if forked)
        self.others = sum(c for c, forked in self._seen.values() if not forked)


def measure_ceiling(slide: Path, cfg: RunConfig, models, outputs: Outputs) -> dict[str, float]:  # noqa: ANN001
    """Tiles/s of the pipeline when each batch costs nothing on the models: the predictor replays
    ``outputs`` (real ones, so masks and polygons are realistic), tiled to each batch's length; and
    the CPU ms per tile of the model process, the readers and the other processes."""
    probs, evidence, kept = outputs
    real_predict = models.predictor.predict

    def stub(batch: torch.Tensor):  # noqa: ANN202
        n = len(batch)
        reps = -(-n // len(probs))
        return (np.tile(probs, (reps, 1))[:n], None if evidence is None else np.tile(evidence, (reps, 1, 1))[:n],
                {f: np.tile(v, reps)[:n] for f, v in kept.items()})

    models.predictor.predict = stub
    try:
        with tempfile.TemporaryDirectory() as tmp, ProcessTreeCPU() as tree:
            start, cpu = time.perf_counter(), time.process_time()
            result = run_slide(slide, Path(tmp) / "out", cfg, models)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        models.predictor.predict = real_predict
    if result.status != "done":
        sys.exit(f"pipeline failed: {result.reason}")
    n = result.tiles
    return {"whole_run": n / wall, "inference_stage": n / result.report["timings_s"]["inference+stitching"],
            "cpu_ms_per_tile": {"model_process": cpu / n * 1e3, "readers": tree.readers / n * 1e3,
                                "stitching_and_geojson_processes": tree.others / n * 1e3,
                                "all": (cpu + tree.readers + tree.others) / n * 1e3},
            "polygons": result.report["evidence"].get("polygons"), "stage_seconds": result.report["timings_s"],
            "inference_stage_parts_s": result.report["inference_stage_parts_s"]}


def per_second(taken: list[tuple[float, int]], t0: float | None = None) -> list[int]:
    """Tiles taken in during each second after ``t0`` (default: the first batch), from ``(time s,
    tiles so far)`` per batch: how fast the stream starts, holds and ends."""
    if not taken:
        return []
    t0 = taken[0][0] if t0 is None else t0
    bins = [0] * (int(taken[-1][0] - t0) + 1)
    for (_, before), (t, done) in zip([(t0, 0), *taken], taken):
        bins[int(t - t0)] += done - before
    return bins


def loader_start(arrivals: list[tuple[float, int]], taken: list[tuple[float, int]]) -> dict[str, object]:
    """From when the loader was first asked for a batch (readers starting): s until the first batch
    arrived and until its outputs were taken in, and the tiles that arrived and were taken in during
    each second."""
    if len(arrivals) < 2 or not taken:
        return {}
    t0 = arrivals[0][0]
    return {"first_batch_arrived_s": arrivals[1][0] - t0, "first_batch_taken_in_s": taken[0][0] - t0,
            "tiles_arrived_per_second": per_second(arrivals[1:], t0), "tiles_taken_in_per_second": per_second(taken, t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide", type=Path)
    ap.add_argument("--classifier", type=Path, required=True)
    ap.add_argument("--segmenter", type=Path)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--workers", type=int, help="DataLoader readers (default: the pipeline's, see inference.workers)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--streams", type=int, help="batches in the models at once (default: the pipeline's, see inference.streams)")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay the models as CUDA graphs (inference.cuda_graphs), "
                    "in the bare measurement and the pipeline alike")
    ap.add_argument("--stitchers", type=int, help="stitching processes (default: the pipeline's, see output.stitchers)")
    ap.add_argument("--bare-seconds", type=float, default=16.0, help="per bare measurement")
    ap.add_argument("--repeats", type=int, default=3, help="bare-model / pipeline pairs; medians are reported")
    ap.add_argument("--ceiling", action="store_true", help="also run the pipeline with the models stubbed out")
    ap.add_argument("--ceiling-masks", choices=["model", "dark"], default="model",
                    help="masks the stub replays: the segmenter's for the first batch, or Med-CAM-like ones made from "
                    "those tiles (the darkest 20 %%, smoothed over 6 px)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here: once before the ceiling run, "
                    "again with it (so a run cut short during the ceiling keeps the rest)")
    args = ap.parse_args()

    cfg = RunConfig.from_dict({
        "classifier": str(args.classifier), "segmenter": str(args.segmenter) if args.segmenter else None,
        "inference": {"batch_size": args.batch_size, "workers": args.workers, "precision": args.precision,
                      "device": args.device, "threads": args.threads, "streams": args.streams,
                      "cuda_graphs": args.cuda_graphs},
        "output": {"overwrite": True, "stitchers": args.stitchers},
    })
    models = load_models(cfg)
    predictor = models.predictor
    batch = cfg.inference.batch_size or default_batch_size(predictor.device)
    size = models.classifier.config.tile_size
    # laid out as the readers hand tiles over, so the bare models do the same work on the device as the pipeline's
    tiles = bare_tiles(predictor, batch, size)

    classifier_only = Predictor(models.classifier, None, cfg.inference.model_copy(update={"certify_fills": ()}))
    clf_only = bare_tiles_per_second(classifier_only, tiles, args.bare_seconds / 2)
    bare = {"classifier": clf_only[0]}
    if predictor.streams > 1:  # for comparison: one batch at a time over all cores (torch's default threads)
        one_batch = Predictor(models.classifier, models.segmenter, cfg.inference.model_copy(update={"streams": 1}))
        bare["classifier+segmenter, one batch at a time"] = bare_tiles_per_second(one_batch, tiles, args.bare_seconds / 2)[0]

    def measure_bare() -> tuple[float, float]:
        return bare_tiles_per_second(predictor, tiles, args.bare_seconds / 2) if args.segmenter else clf_only

    runs = []
    before = measure_bare()
    for _ in range(args.repeats):  # bare models and pipeline alternate, so drifting machine load hits both
        with tempfile.TemporaryDirectory() as tmp:
            start, cpu = time.perf_counter(), cpu_seconds()
            taken: list[tuple[float, int]] = []  # (s, tiles taken in so far), per batch
            pinned_before = pinned_blocks_made()
            with first_batch_outputs(predictor) as first, batch_arrivals(predictor) as arrivals:
                result = run_slide(args.slide, Path(tmp) / "out", cfg, models,
                                   progress=lambda _, done, __: taken.append((time.perf_counter(), done)))
            wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        if result.status != "done":
            sys.exit(f"pipeline failed: {result.reason}")
        after = measure_bare()  # the reference brackets the run: a load drifting during it cancels out
        reference, reference_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        before = after
        n, timings = result.tiles, result.report["timings_s"]
        runs.append({"bare_tiles_per_s": reference, "pipeline_tiles_per_s": n / wall,
                     "inference_stage_tiles_per_s": n / timings["inference+stitching"],
                     "ratio": n / wall / reference, "ratio_inference_stage": n / timings["inference+stitching"] / reference,
                     "bare_cpu_s_per_tile": reference_cpu, "pipeline_cpu_s_per_tile": cpu / n,
                     "cpu_ratio": reference_cpu / (cpu / n), "stage_seconds": timings,
                     "inference_stage_parts_s": result.report["inference_stage_parts_s"],
                     "tiles_per_second_from_first_batch": per_second(taken),
                     "from_loader_start": loader_start(arrivals, taken),
                     "pinned_blocks_made_in_run": {k: v - pinned_before[k] for k, v in pinned_blocks_made().items()}})
    if args.segmenter:
        bare["classifier+segmenter"] = statistics.median(r["bare_tiles_per_s"] for r in runs)
    median = {k: statistics.median(r[k] for r in runs)
              for k in ("pipeline_tiles_per_s", "inference_stage_tiles_per_s", "ratio", "ratio_inference_stage",
                        "cpu_ratio")}
    figures = {
        "device": str(predictor.device),
        "gpu": torch.cuda.get_device_name() if predictor.device.type == "cuda" else None,
        "precision": str(predictor.dtype or "fp32"),
        "batch_size": batch,
        "workers": result.report["parameters"]["readers"],
        "stitching_processes": result.report["parameters"]["stitching_processes"],
        "streams": predictor.streams,
        "torch_threads": predictor.threads_per_stream if predictor.streams > 1 else torch.get_num_threads(),
        "tiles": n,
        "bare_tiles_per_s": bare,
        "pipeline_tiles_per_s": median["pipeline_tiles_per_s"],
        "pipeline_inference_stage_tiles_per_s": median["inference_stage_tiles_per_s"],
        "ratio_pipeline_to_bare": median["ratio"],
        "ratio_inference_stage_to_bare": median["ratio_inference_stage"],
        "cpu_ratio_bare_to_pipeline": median["cpu_ratio"],
        "ceiling_tiles_per_s": None,
        "runs": runs,
        "stage_seconds": runs[-1]["stage_seconds"],
        "inference_stage_parts_s": runs[-1]["inference_stage_parts_s"],
        "tiles_per_second_from_first_batch": runs[-1]["tiles_per_second_from_first_batch"],
        "from_loader_start": runs[-1]["from_loader_start"],
        "pinned_blocks_made_in_run": runs[-1]["pinned_blocks_made_in_run"],
        "peak_rss_mib": peak_rss_mib(),
    }
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    if args.ceiling:
        outputs = first["outputs"]
        if args.ceiling_masks == "dark" and outputs[1] is not None:
            outputs = (outputs[0], dark_masks(first["tiles"]), outputs[2])
        figures["ceiling_tiles_per_s"] = ceiling = measure_ceiling(args.slide, cfg, models, outputs)
        if args.out:
            args.out.write_text(json.dumps(figures, indent=2))
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"device {figures['device']} {figures['gpu'] or ''} precision {figures['precision']} batch {batch} "
          f"workers {figures['workers']} stitching processes {figures['stitching_processes']} streams {figures['streams']} "
          f"threads {figures['torch_threads']}")
    for name, value in bare.items():
        print(f"bare {name:>22}: {value:8.1f} tiles/s")
    print(f"pipeline (whole run)         : {figures['pipeline_tiles_per_s']:8.1f} tiles/s  ({n} tiles)")
    print(f"pipeline (inference stage)   : {figures['pipeline_inference_stage_tiles_per_s']:8.1f} tiles/s")
    print(f"ratio pipeline ÷ bare models : {figures['ratio_pipeline_to_bare']:.3f} (whole run), "
          f"{figures['ratio_inference_stage_to_bare']:.3f} (inference stage); medians of {len(runs)} runs: "
          + ", ".join(f"{r['ratio']:.2f}" for r in runs))
    print(f"CPU s per tile, bare ÷ pipeline: {figures['cpu_ratio_bare_to_pipeline']:.3f} "
          "(the share of the pipeline's CPU work that is the models'; load-independent)")
    if args.ceiling:
        print(f"pipeline, models stubbed     : {ceiling['whole_run']:8.1f} tiles/s whole run, "
              f"{ceiling['inference_stage']:.1f} inference stage (the ceiling the other stages allow; "
              f"{args.ceiling_masks} masks, {ceiling['polygons']} polygons)")
        print("  CPU ms per tile: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in ceiling["cpu_ms_per_tile"].items()))
    print("stages of the last run (s): " + ", ".join(f"{k} {v:.2f}" for k, v in figures["stage_seconds"].items()))
    print("tiles per second from the first batch (last run): " + " ".join(map(str, figures["tiles_per_second_from_first_batch"])))
    start = figures["from_loader_start"]
    if start:
        print(f"from the loader's start: first batch arrived {start['first_batch_arrived_s']:.2f} s, taken in "
              f"{start['first_batch_taken_in_s']:.2f} s; tiles arrived per second: "
              + " ".join(map(str, start["tiles_arrived_per_second"][:12]))
              + "; taken in: " + " ".join(map(str, start["tiles_taken_in_per_second"][:12])))
    print("its inference stage (s): " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}"
                                                  for k, v in figures["inference_stage_parts_s"].items()))
    if predictor.device.type == "cuda":
        made = figures["pinned_blocks_made_in_run"]
        print(f"pinned host blocks made during the last run: {made['blocks']} ({made['ms']:.0f} ms)")
    print(f"peak RSS: {figures['peak_rss_mib']['self']:.0f} MiB (main), {figures['peak_rss_mib']['children']:.0f} MiB (largest reader)")


if __name__ == "__main__":
    main()
