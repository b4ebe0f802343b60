"""One slide end to end, reading as the data flow: open → tissue → tiles → batches → models →
stitched stores, GeoJSON, tables, overview and report. And many slides, one after another, with
skip-if-done, atomic outputs and per-slide failure isolation.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import json
import logging
import multiprocessing
import os
import platform
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from importlib import metadata
from multiprocessing.process import BaseProcess
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, TypeVar

import numpy as np
import torch
from PIL import Image
from shapely.geometry import box

from .ahead import Ahead
from .batching import (PREFETCH_BATCHES, TileDataset, make_loader, reserve_pinned_batches, shared_with_readers,
                       start_shared_memory_manager)
from .bundles import Bundle, load_classifier, load_segmenter
from .config import RunConfig
from .cpus import may_start_processes
from .errors import OutputError, WsiMedcamError
from .export.geojson import EvidenceEncoder, write_evidence
from .export.ome_zarr import EvidenceStore, write_probabilities
from .export.overview import class_heatmap, shrink_for_overview, write_handed_thumbnails, write_overview, write_thumbnails
from .export.tiles import TileBatch, TileWriter, write_tile_batches
from .folding import fold_batchnorms
from .handoff import hand_over
from .heap import release_freed_memory, use_one_arena
from .inference import BatchResult, Predictor, default_batch_size, default_workers, resolve_device
from .levels import HARD
from .slide import MppOverrides, Slide, SlideRef, open_slide, read_mpp_csvs
from .stitch_processes import StitchingProcesses, default_stitchers, ordered_map, start_process, start_server
from .stitching import EvidenceStitcher
from .tiling import plan_tiles
from .tissue import TissueMask, detect_tissue

log = logging.getLogger("wsi_medcam")

REPORT_NAME = "report.json"
PARTIAL_SUFFIX = ".partial"
ProgressHook = Callable[[str, int, int], None]
"""Called as (slide name, tiles done so far, total tiles), from the writer thread."""
StopCheck = Callable[[], None]
"""Raises to stop a slide (e.g. its dask worker is closing); called as each stage starts and after
each batch, so the slide's clean-up (processes stopped, ``.partial`` removed) runs within a batch."""
T = TypeVar("T")


@dataclass(frozen=True)
class Models:
    """What a worker loads once and reuses for every slide."""

    classifier: Bundle
    segmenter: Bundle | None
    predictor: Predictor
    share_by_name: bool = False
    """Whether readers hand batches over by name (:func:`~wsi_medcam.batching.make_loader`): on CUDA,
    where torch's shared-memory manager could be started."""
    refine_from: tuple[Bundle, Bundle] | None = None
    """(classifier, segmenter) for per-image refinement, on the run's device, in float32: the
    segmenter as trained (batch norms not folded), whose copies it trains; None unless
    ``inference.refine``."""


def load_models(cfg: RunConfig) -> Models:
    """Load the bundles named in ``cfg`` onto the configured device. For a CPU, this process's
    threads share one malloc arena from now on (:func:`~wsi_medcam.heap.use_one_arena`): the models'
    activations are then in host memory, and its peak no longer depends on which thread freed what.
    The models' batch norms are folded into their convolutions (:mod:`wsi_medcam.folding`). With
    ``inference.refine``, copies are kept for per-image refinement (:attr:`Models.refine_from`): the
    segmenter's unfolded, so the tiles it does not refine get exactly the evidence of a run without
    it; the classifier's on a GPU, where the predictor's may be running another slide's batches."""
    if cfg.classifier is None:
        raise WsiMedcamError("no classifier bundle given: pass --classifier DIR")
    device = resolve_device(cfg.inference.device)
    if device.type == "cuda" and device.index is not None:
        # made this thread's current device, on which the loader's pin-memory thread works: left at
        # GPU 0, each dask worker given cuda:k (batch.spread_over_gpus) would open a CUDA context there too
        torch.cuda.set_device(device)
    if stitching_processes(cfg, device.type):
        start_server()  # its imports (~3.4 s on an H200 machine) overlap the models' loading
    if device.type == "cpu":
        use_one_arena()
    # for the readers, which share their batches by name on a GPU
    share_by_name = (device.type == "cuda" and cfg.inference.workers != 0 and may_start_processes()
                     and start_shared_memory_manager())
    if cfg.inference.threads:
        torch.set_num_threads(cfg.inference.threads)
    classifier = load_classifier(cfg.classifier)
    segmenter = load_segmenter(cfg.segmenter) if cfg.segmenter else None
    # the classifier is only ever evaluated here; per-image refinement trains copies of the segmenter
    fold_batchnorms(classifier.model)
    refine_from = None
    if segmenter is not None:
        if cfg.inference.refine:
            own = classifier if device.type == "cpu" else replace(classifier, model=copy.deepcopy(classifier.model).to(device))
            refine_from = (own, replace(segmenter, model=copy.deepcopy(segmenter.model).to(device)))
        fold_batchnorms(segmenter.model)
    predictor = Predictor(classifier, segmenter, cfg.inference)
    if device.type == "cuda":
        _reserve_pinned_batches(cfg, classifier, predictor)
    return Models(classifier, segmenter, predictor, share_by_name, refine_from)


def _reserve_pinned_batches(cfg: RunConfig, classifier: Bundle, predictor: Predictor) -> None:
    """Pinned host blocks for as many batches as a slide's loader and models hold at once (readers'
    read-ahead, the models' batches running and queued, one being handed over): see
    :func:`~wsi_medcam.batching.reserve_pinned_batches`."""
    _, tile_size = tile_geometry(cfg, classifier, quiet=True)
    batch_size = cfg.inference.batch_size or default_batch_size(predictor.device)
    workers = default_workers(predictor.device) if cfg.inference.workers is None else cfg.inference.workers
    count = workers * PREFETCH_BATCHES + 2 * predictor.streams + 1
    start = time.perf_counter()
    reserve_pinned_batches(count, batch_size * 3 * tile_size * tile_size)
    log.debug("%d pinned batch blocks reserved in %.2f s", count, time.perf_counter() - start)


def stitching_processes(cfg: RunConfig, device_type: str) -> int:
    """Stitching processes per slide: the configured number, else the device's default; none where
    the run gives no evidence (no segmenter, no Grad-CAM explainer) or this process may not have
    children."""
    explains = cfg.segmenter is not None or cfg.inference.explainer != "medcam"
    n = default_stitchers(device_type) if cfg.output.stitchers is None else cfg.output.stitchers
    return n if explains and may_start_processes() else 0


def open_configured(path: Path, cfg: RunConfig) -> Slide:
    """``path`` opened with the run's backend and µm/px overrides (``--mpp``, ``--mpp-csv``)."""
    overrides = MppOverrides(cfg.slide.mpp, read_mpp_csvs(cfg.slide.mpp_csv))
    return open_slide(path, backend=cfg.slide.backend, overrides=overrides)


def find_tissue(path: Path, cfg: RunConfig) -> TissueMask:
    """The tissue of the slide at ``path``, opened for this alone: what :func:`run_slides` does a slide ahead."""
    with open_configured(path, cfg) as slide:
        return detect_tissue(slide, cfg.tissue)


def tile_geometry(cfg: RunConfig, classifier: Bundle, *, quiet: bool = False) -> tuple[float, int]:
    """Tile µm/px and size: the classifier's, unless the config overrides them (with a warning,
    unless ``quiet``)."""
    ccfg = classifier.config
    warn = (lambda *_: None) if quiet else log.warning
    mpp, size = ccfg.mpp, ccfg.tile_size
    if cfg.tiling.mpp is not None and abs(cfg.tiling.mpp - mpp) > 1e-9:
        warn("tile mpp %.4g overrides the classifier's %.4g µm/px: predictions may degrade", cfg.tiling.mpp, mpp)
        mpp = cfg.tiling.mpp
    if cfg.tiling.tile_size is not None and cfg.tiling.tile_size != size:
        warn("tile size %d overrides the classifier's %d px", cfg.tiling.tile_size, size)
        size = cfg.tiling.tile_size
    return mpp, size


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
    """Output folder name per slide: its stem, or, where another slide of the run has the same stem
    (``a/x.svs`` and ``b/x.svs``, or ``x.tif`` beside ``x.svs``), the stem plus a short hash of the
    slide's own resolved path (of its folder, x.tif and x.svs shared one folder, and the second was
    then skipped as done). A name depends on the other slides only through such a collision, and the
    same list always gives the same names. A name still taken (a slide whose own stem is another's
    hashed name, or two hashes alike) gets -2, -3 ... in the order given, so no two slides share a folder."""
    stems: dict[str, int] = {}
    for p in paths:
        stems[_stem(p)] = stems.get(_stem(p), 0) + 1
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for p in paths:
        name = _stem(p)
        if stems[name] > 1:
            name = f"{name}-{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]}"
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        taken.add(unique)
        names[p] = unique
    return names


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("wsi-medcam", "torch", "timm", "segmentation-models-pytorch", "openslide-python", "openslide-bin",
                 "tiffslide", "zarr", "ome-zarr", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


class _Timer:
    """Seconds per stage; ``stop()`` (which raises to stop the slide) is called as each stage starts."""

    def __init__(self, stop: StopCheck | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.stop = stop

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.stop is not None:
            self.stop()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class SlideResult:
    """Outcome of one slide: ``status`` is done, skipped or failed."""

    path: Path
    status: str
    output: Path | None = None
    reason: str = ""
    seconds: float = 0.0
    tiles: int = 0
    report: dict[str, Any] = field(default_factory=dict)


def consume_behind(results: Iterable[T], consume: Callable[[T], None], *, depth: int = 2) -> None:
    """Hand each result to ``consume`` on one background thread, in order, while the next one is
    being computed; at most ``depth`` results wait. The models release the GIL, so stitching, chunk
    compression and tracing overlap with them (on a GPU, the device no longer idles while the CPU
    stitches). An error in ``consume`` is raised here and stops the loop."""
    with ThreadPoolExecutor(1, thread_name_prefix="wsi-medcam-writer") as pool:
        pending: deque[Future[None]] = deque()
        for item in results:
            pending.append(pool.submit(consume, item))
            while pending and (len(pending) > depth or pending[0].done()):
                pending.popleft().result()
        while pending:
            pending.popleft().result()


def process_slide(
    path: Path, work_dir: Path, cfg: RunConfig, models: Models, *, progress: ProgressHook | None = None,
    ahead: Ahead[TissueMask] | None = None, stop: StopCheck | None = None,
) -> dict[str, Any]:
    """Run the whole flow for one slide, writing every output into ``work_dir``; returns the report.

    Some writes run beside the slide's main line on a thread of their own (PNG and zarr encoding
    release the GIL): the thumbnails beside tiling and setup (with stitching processes, in a process
    of their own beside the tiles), the pyramid's top levels beside the GeoJSON and then the overview
    (drawn from the pyramid's coarsest level) beside the probabilities. Returning waits for
    them, failing stops them, so nothing is written into ``work_dir`` afterwards. With ``ahead``,
    the slide's tissue may have been found while the slide before it streamed, and once this
    slide's readers have forked, the next slide's is found meanwhile."""
    Image.preinit()  # PIL's format plugins imported here, not on that thread while readers fork
    with ThreadPoolExecutor(1, thread_name_prefix="wsi-medcam-beside") as beside, ExitStack() as cleanup:
        return _process_slide(path, work_dir, cfg, models, beside, cleanup, progress, ahead, stop)


def _process_slide(path: Path, work_dir: Path, cfg: RunConfig, models: Models, beside: ThreadPoolExecutor,
                   cleanup: ExitStack, progress: ProgressHook | None, ahead: Ahead[TissueMask] | None,
                   stop: StopCheck | None) -> dict[str, Any]:
    """:func:`process_slide`, with ``beside`` for the writes that run beside it and ``cleanup`` for
    the processes to stop if it fails."""
    timer = _Timer(stop)
    start = time.perf_counter()
    ccfg = models.classifier.config
    class_names, colors = list(ccfg.class_names), ccfg.class_colors()
    mpp, tile_size = tile_geometry(cfg, models.classifier)
    processes_ok = may_start_processes()
    stitchers = stitching_processes(cfg, models.predictor.device.type)
    if stitchers:
        start_server()  # already up when load_models started it; else its imports overlap tissue detection
    with timer.stage("open"):
        slide = open_configured(path, cfg)
    with slide:
        downsample = slide.downsample_for(mpp, cfg.slide.level_tolerance)
        slide_key = f"{path.name}:{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
        out_mpp = cfg.output.mask_mpp or slide.mpp.mean
        if out_mpp < slide.mpp.mean * (1 - 1e-6):
            raise WsiMedcamError(f"{path.name}: --mask-mpp {out_mpp} is finer than the slide's {slide.mpp.mean:.4g} µm/px")
        dimensions = slide.dimensions
        width0, height0 = dimensions
        out_shape = (max(1, round(height0 * slide.mpp.mean / out_mpp)), max(1, round(width0 * slide.mpp.mean / out_mpp)))
        # the evidence store's ~20 zarr arrays (0.16 s on a 100k² slide, 2-core VM) are made beside the tissue
        creating = (beside.submit(EvidenceStore, work_dir / "evidence.ome.zarr", shape=out_shape, mpp=out_mpp,
                                  chunk=cfg.output.chunk_size, min_size=cfg.output.min_pyramid_size,
                                  class_names=class_names, colors=colors, name=path.name)
                    if models.predictor.explains else None)
        with timer.stage("tissue"):  # with ``ahead``: found while the slide before streamed, or waited for
            tissue = ahead.take(path) if ahead is not None else None
            found_ahead = tissue is not None
            if tissue is None:
                tissue = detect_tissue(slide, cfg.tissue)
        description = slide.describe()
        ref = SlideRef.of(slide)
    if stitchers:  # the forkserver is up: PNG encoding (~1.5 s on a 100k² slide) goes beside the tiles
        handed = hand_over(work_dir, thumbnail=tissue.thumbnail, mask=tissue.mask)
        cleanup.callback(shutil.rmtree, handed, ignore_errors=True)  # after the process has stopped
        writer = start_process(write_handed_thumbnails, (work_dir, handed), name="wsi-medcam-thumbnails")
        cleanup.callback(_stop, writer)
        thumbnails = beside.submit(_joined, writer, "writing thumbnail.png and tissue.png")
    else:
        thumbnails = beside.submit(_write_thumbnails, work_dir, [tissue.thumbnail, tissue.mask])
    with timer.stage("tiling"):
        grid = plan_tiles(dimensions, downsample, tissue.mask, cfg.tiling, mpp=mpp, tile_size=tile_size)
    tissue_stats = {"mpp": tissue.mpp, "fraction": float(tissue.mask.mean()) if tissue.mask.size else 0.0,
                    "found_ahead": found_ahead}
    overview_thumb, overview_tissue = shrink_for_overview(tissue.thumbnail, tissue.mask)
    del tissue  # full-size thumbnail and mask grow with the slide's area; the overview needs only these
    with timer.stage("setup"):  # the stitching created (its processes start with the readers), the store waited for
        if not processes_ok:
            log.warning("%s: this is a daemonic process (a dask worker without distributed.worker.daemon: False), "
                        "so tiles are read and stitched in it, without reader or stitching processes", path.name)
        store = stitcher = None
        # the evidence GeoJSON's polygons: merged, simplified by half a tile px, clipped to the slide
        encoder = EvidenceEncoder(simplify_px=grid.downsample * 0.5, clip=box(0, 0, width0, height0), class_names=class_names,
                                  colors=colors, mpp=slide.mpp.mean, slide_key=slide_key)
        if creating is not None:
            store = creating.result()
            # stitching processes encode their polygons while tiles stream; not where refined tiles
            # will cut polygons afterwards (shapes are needed for that)
            stitcher = (StitchingProcesses(grid, store, processes=stitchers, spool_dir=work_dir, strip_px=cfg.output.strip_px,
                                           encoder=None if cfg.inference.refine else encoder, start=False)
                        if stitchers else EvidenceStitcher(grid, store, spool_dir=work_dir, strip_px=cfg.output.strip_px))

        grid_probs = np.zeros((len(class_names), *grid.grid_shape), np.float32)
        counts = np.zeros(len(class_names), np.int64)
        evidence_fractions: list[float] = []
        kept_counts = {f: 0 for f in cfg.inference.certify_fills}
        refine = cfg.inference.refine if stitcher is not None and models.segmenter is not None else 0
        top: list[list[tuple[float, int]]] = [[] for _ in class_names]  # per class: K (confidence, tile) heaps
        batch_size = cfg.inference.batch_size or default_batch_size(models.predictor.device)
        workers = default_workers(models.predictor.device) if cfg.inference.workers is None else cfg.inference.workers
        workers = min(workers, max(0, len(grid) // batch_size))  # no idle readers on a small slide
        workers = workers if processes_ok else 0
        order = stitcher.order() if stitcher is not None else None
        loader = make_loader(TileDataset(ref, grid, tolerance=cfg.slide.level_tolerance, order=order), batch_size=batch_size,
                             workers=workers, pin_memory=models.predictor.device.type == "cuda",
                             share_by_name=models.share_by_name)
    # Reader processes fork from this one when the tiles start, and whatever it holds then stays
    # theirs too once it frees it: the thumbnails are written (beside tiling and setup), or handed
    # to their process, and the heap trimmed first. A 100k² slide's 6250² thumbnail and mask at
    # 0.5 µm/px are ~150 MiB.
    with timer.stage("thumbnails"):
        if not stitchers:
            thumbnails.result()
        release_freed_memory()  # with the thumbnail's read blocks and the mask's temporaries
    cleanup.enter_context(shared_with_readers())  # until the slide is done; the readers are gone by then
    done = 0
    first_at = last_at = stage_at = time.perf_counter()  # when the first and last batch's outputs were taken in
    with timer.stage("inference+stitching"), tile_records(
        work_dir, bool(stitchers), slide_key=slide_key, extent=dimensions, class_names=class_names, colors=colors,
        certify_fills=tuple(cfg.inference.certify_fills) if models.predictor.explains else ()
    ) as write_tiles:

        def consume(result: BatchResult) -> None:
            """One batch's outputs into the stitcher, the grids, the counts and the tile records:
            per batch with numpy, not per tile, as it shares the model process's GIL with the models."""
            nonlocal done, first_at, last_at
            if not done:
                first_at = time.perf_counter()
            idx = result.indices
            preds = result.probs.argmax(1)
            fractions = None
            if result.evidence is not None and stitcher is not None:
                stitcher.add_batch(idx, result.evidence, preds, result.probs[np.arange(len(preds)), preds])
                # the hard evidence's share of each tile; counted tile by tile, numpy's popcount, where
                # counting along axes sums booleans: 1.6 against 5.4 ms per batch of 256 (2-core VM)
                fractions = np.array([np.count_nonzero(hard) for hard in result.evidence >= HARD]) / result.evidence[0].size
                evidence_fractions.extend(fractions.tolist())
                if refine:
                    for i, pred, p in zip(idx.tolist(), preds.tolist(), result.probs[np.arange(len(preds)), preds].tolist()):
                        (heapq.heappush if len(top[pred]) < refine else heapq.heappushpop)(top[pred], (p, i))
            grid_probs[:, grid.rows[idx], grid.cols[idx]] = result.probs.T
            counts[:] += np.bincount(preds, minlength=len(counts))
            for f, v in result.kept.items():
                kept_counts[f] += int(np.count_nonzero(v))
            write_tiles(TileBatch(idx, *grid.origins_level0(idx), grid.size_level0, grid.tissue_fraction[idx], result.probs,
                                  preds, fractions, result.kept))
            done += len(idx)
            last_at = time.perf_counter()
            if progress:
                progress(path.name, done, len(grid))
            if stop:
                stop()

        try:
            batches = iter(loader) if len(grid) else iter(())  # the readers fork and start reading
            if isinstance(stitcher, StitchingProcesses):  # meanwhile
                stitcher.start()
            if ahead is not None:  # the readers have forked: the next slide's tissue beside the tiles
                ahead.start_after(path)
            consume_behind(models.predictor.run(batches), consume)
            if stitcher is not None:
                stitcher.finish()
            # where the stage's time goes: until the first batch is out (readers starting, the first
            # batches read and run), batches streaming, the stitching processes' last strips after
            inference_parts = {"to_first_batch": first_at - stage_at, "batches": last_at - first_at,
                               "stitching_tail": time.perf_counter() - last_at}
        finally:
            if stitcher is not None:
                stitcher.close()
    refined = 0
    if refine and stitcher is not None:
        with timer.stage("refine"):
            refined = refine_tiles(stitcher, ref, [(c, i) for c, heap in enumerate(top) for _, i in heap], models,
                                   cfg.inference.refine_steps, cfg.slide.level_tolerance)

    attrs = {"slide": path.name, "slide_mpp": slide.mpp.mean, "tile_mpp": mpp, "tile_size": tile_size,
             "classes": class_names, "config": cfg.model_dump(mode="json")}
    evidence_stats: dict[str, Any] = {}
    rows = min(grid.grid_shape[0], max(1, round(height0 / grid.downsample / grid.stride)))
    cols = min(grid.grid_shape[1], max(1, round(width0 / grid.downsample / grid.stride)))
    heatmap = class_heatmap(grid_probs[:, :rows, :cols], colors)

    def draw_overview() -> None:
        write_overview(work_dir / "overview.png", overview_thumb, overview_tissue, heatmap,
                       store.coarsest() if store is not None else None)

    overview = None
    if store is not None and stitcher is not None:
        pyramid = beside.submit(store.finalize, attrs)  # beside the GeoJSON (shapely and json)
        overview = beside.submit(draw_overview)  # from the finished pyramid, beside the probabilities
        with timer.stage("evidence-geojson"):
            n_polygons, per_class = _write_polygons(work_dir / "evidence.geojson", stitcher, encoder, class_names,
                                                    stitchers)
        with timer.stage("pyramid"):  # what is left of it once the GeoJSON is written
            pyramid.result()
        evidence_stats = {
            "explainer": cfg.inference.explainer,
            "refined_tiles": refined,
            "certified_fraction": {f: c / len(grid) if len(grid) else 0.0 for f, c in kept_counts.items()},
            "mean_tile_evidence_fraction": float(np.mean(evidence_fractions)) if evidence_fractions else 0.0,
            "median_tile_evidence_fraction": float(np.median(evidence_fractions)) if evidence_fractions else 0.0,
            "polygons": n_polygons,
            "per_class": per_class,
            "level0_chunks_written": stitcher.chunks_written,
            "store_levels": len(store.shapes),
            "store_level0_shape": list(out_shape),
            "store_mpp": out_mpp,
        }
    with timer.stage("probabilities"):
        write_probabilities(work_dir / "probabilities.ome.zarr", grid_probs, pixel_um=grid.stride * mpp,
                            offset_um=(grid.tile_size - grid.stride) / 2 * mpp, class_names=class_names,
                            colors=colors, attrs=attrs)
    with timer.stage("overview"):  # with evidence: drawn beside, waited for here
        if overview is not None:
            overview.result()
        else:
            draw_overview()
    thumbnails.result()  # written by their process meanwhile
    report = {
        "slide": description,
        "parameters": {"tile_mpp": mpp, "tile_size": tile_size, "stride": grid.stride, "downsample": downsample,
                       "batch_size": batch_size, "readers": workers, "streams": models.predictor.streams,
                       "stitching_processes": stitcher.shard[1] if isinstance(stitcher, StitchingProcesses) else 0,
                       "device": str(models.predictor.device),
                       "precision": str(models.predictor.dtype or "fp32"), "config": cfg.model_dump(mode="json")},
        "models": {name: {"path": str(b.path), "sha256": b.sha256, "config": b.config.model_dump(mode="json")}
                   for name, b in (("classifier", models.classifier), ("segmenter", models.segmenter)) if b},
        "tissue": tissue_stats,
        "tiles": {"grid_shape": list(grid.grid_shape), "count": len(grid),
                  "per_class": {n: int(c) for n, c in zip(class_names, counts)}},
        "evidence": evidence_stats,
        "timings_s": {**{k: round(v, 3) for k, v in timer.seconds.items()},
                      "total": round(time.perf_counter() - start, 3)},
        "inference_stage_parts_s": {k: round(v, 3) for k, v in inference_parts.items()},
        "versions": _versions(),
    }
    (work_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


@contextmanager
def tile_records(work_dir: Path, in_process: bool, **writer: Any) -> Iterator[Callable[[TileBatch], None]]:
    """A function that writes a :class:`TileBatch` into ``tiles.csv`` and ``tiles.geojson`` (with
    :class:`TileWriter`'s keyword arguments ``writer``), in this process or, ``in_process``, through
    a pipe to a process of its own (:func:`write_tile_batches`): with stitching processes, on a GPU.
    The files are complete when the block ends; if it fails, the process is stopped."""
    paths = (work_dir / "tiles.csv", work_dir / "tiles.geojson")
    if not in_process:
        with TileWriter(*paths, **writer) as out:
            yield out.write
        return
    what = "writing tiles.csv and tiles.geojson"
    receive, send = multiprocessing.Pipe(duplex=False)
    proc = start_process(write_tile_batches, (receive, *paths, writer), name="wsi-medcam-tiles")
    receive.close()

    def write(batch: TileBatch) -> None:
        try:
            send.send(batch)
        except OSError:  # the process is gone: say how
            _joined(proc, what)
            raise

    try:
        yield write
        send.send(None)
    except BaseException:
        _stop(proc)
        raise
    finally:
        send.close()
    _joined(proc, what)


def _write_thumbnails(work_dir: Path, images: list[np.ndarray]) -> None:
    """:func:`write_thumbnails` on a thread, from ``images`` (thumbnail, mask), which are taken out
    of the list: a thread pool keeps a task's arguments a moment after its result is ready, and the
    caller waits for this to free them."""
    thumbnail, mask = images
    images.clear()
    write_thumbnails(work_dir, thumbnail, mask)


def _joined(proc: BaseProcess, what: str) -> None:
    """Wait for ``proc``; OutputError if it failed."""
    proc.join()
    if proc.exitcode:
        raise OutputError(f"{what} failed in process {proc.name} (exit code {proc.exitcode})")


def _stop(proc: BaseProcess) -> None:
    """End ``proc`` now if it still runs (its slide failed)."""
    if proc.is_alive():
        proc.terminate()
    proc.join()


def _write_polygons(path: Path, stitcher: EvidenceStitcher, encoder: EvidenceEncoder, class_names: list[str],
                    processes: int) -> tuple[int, dict[str, dict[str, float]]]:
    """The evidence GeoJSON: the polygons still to finish and encode, batch by batch in ``processes``
    processes (0: here), then the parts the stitching processes encoded while tiles streamed;
    (polygons written, their count and area per class)."""
    if processes:  # a slide may hold millions of polygons: ~1 CPU ms per tile of blob-like evidence
        encoded = chain.from_iterable(ordered_map(encoder, stitcher.polygons.final_batches(wkb=True), processes))
    else:
        encoded = chain.from_iterable(encoder(c, g) for c, g in stitcher.polygons.final_batches())
    parts = stitcher.polygons.encoded_parts
    count, per_class = write_evidence(path, encoded, parts=parts)
    for part, _ in parts:
        part.unlink()
    return count, {class_names[c]: {"polygons": n, "area_um2": a} for c, (n, a) in per_class.items()}


def refine_tiles(stitcher: EvidenceStitcher, ref: SlideRef, chosen: list[tuple[int, int]], models: Models,
                 steps: int, tolerance: float) -> int:
    """Per-image Med-CAM refinement (from the amortised weights) of the chosen (class, tile) pairs,
    written over their streamed evidence; returns how many tiles were refined."""
    from .medcam.explain import PerImageOptions, explain_batch

    if not chosen or models.refine_from is None:
        return 0
    grid = stitcher.grid
    with ref.open() as slide:
        tiles = np.stack([slide.read_region_at(grid.xy_level0(i), grid.tile_size, grid.mpp, tolerance=tolerance)
                          for _, i in chosen])
    classifier, segmenter = models.refine_from
    soft, records = explain_batch(classifier, tiles, segmenter=segmenter,
                                  per_image=PerImageOptions(steps=steps, lr=1e-4, patience=10, min_steps=min(10, steps)))
    names = classifier.config.class_names
    refined = 0
    for (class_index, i), mask, record in zip(chosen, soft[:, 0].numpy(), records):
        # refinement explains the class of its float32 copy; where that differs from the class the
        # tile was streamed with (bf16, a borderline tile among a rare class's top K), the refined
        # mask would explain the other class under this one's label: the streamed evidence stays
        if record["prediction"] != names[class_index]:
            log.debug("tile %d: refined as %s, streamed as %s; not refined", i, record["prediction"], names[class_index])
            continue
        stitcher.replace(i, mask, class_index)
        refined += 1
    return refined


def failure_reason(exc: BaseException) -> str:
    """One line for the console and status records; unexpected errors keep their type name."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if "DataLoader worker" in first and len(text) > 1:  # the worker's own message is the last line
        first = text[-1]
    return first if isinstance(exc, WsiMedcamError) else f"{type(exc).__name__}: {first}"


def partial_dir(out_dir: Path) -> Path:
    """Where a slide's outputs are written before they are renamed to ``out_dir``."""
    return out_dir.with_name(f".{out_dir.name}{PARTIAL_SUFFIX}")


def remove_output(path: Path) -> None:
    """Delete a half-written output (folder or stray file); nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def is_complete(out_dir: Path) -> bool:
    """A slide folder counts as finished only once it was renamed into place with its report."""
    return (out_dir / REPORT_NAME).is_file()


def run_slide(
    path: Path, out_dir: Path, cfg: RunConfig, models: Models, *, progress: ProgressHook | None = None,
    ahead: Ahead[TissueMask] | None = None, stop: StopCheck | None = None,
) -> SlideResult:
    """Process one slide into ``out_dir`` atomically: a ``.partial`` sibling is renamed when complete.

    Finished folders are skipped unless ``cfg.output.overwrite``; half-finished ones are removed.
    Errors of this package are caught and reported in the result, never raised.
    """
    start = time.perf_counter()
    partial = partial_dir(out_dir)
    if is_complete(out_dir) and not cfg.output.overwrite:
        remove_output(partial)
        return SlideResult(path, "skipped", out_dir, "already done (use --overwrite to redo)")
    if out_dir.exists() and not out_dir.is_dir():
        return SlideResult(path, "failed", None, f"{out_dir} exists and is not a folder; move it or choose another --out")
    try:
        remove_output(partial)  # left by an interrupted run
        if out_dir.is_dir() and not is_complete(out_dir):  # unfinished: clear it now, not after the work
            remove_output(out_dir)
        partial.mkdir(parents=True)
    except OSError as exc:
        return SlideResult(path, "failed", None, str(OutputError(f"cannot prepare {out_dir}: {exc}")))
    try:
        report = process_slide(path, partial, cfg, models, progress=progress, ahead=ahead, stop=stop)
        remove_output(out_dir)
        os.replace(partial, out_dir)
    except Exception as exc:  # noqa: BLE001 - one bad slide must not stop the others
        log.debug("%s failed", path, exc_info=True)
        shutil.rmtree(partial, ignore_errors=True)
        return SlideResult(path, "failed", None, failure_reason(exc), time.perf_counter() - start)
    except BaseException:  # Ctrl-C: the next run redoes the slide; nothing half-written stays meanwhile
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        release_freed_memory()  # a worker runs slide after slide
    return SlideResult(path, "done", out_dir, "", time.perf_counter() - start, report["tiles"]["count"], report)


def run_slides(
    paths: Sequence[Path],
    out_root: Path,
    cfg: RunConfig,
    *,
    models: Models | None = None,
    progress: ProgressHook | None = None,
    on_result: Callable[[SlideResult], None] | None = None,
    tissue_ahead: bool | None = None,
    ahead: Ahead[TissueMask] | None = None,
) -> list[SlideResult]:
    """Process ``paths`` one after another into ``out_root/<name>/``; one bad slide never stops the rest.

    ``tissue_ahead``: find each slide's tissue while the slide before it streams its tiles
    (:class:`~wsi_medcam.ahead.Ahead`); default where slides stitch in processes of their own (a
    GPU), whose cores wait on the device. On a CPU the cores are the models', and the next slide's
    thumbnail would add to the run's memory. Without ``models``, the first slide's tissue is found
    while they load; ``ahead``, from :func:`start_tissue_ahead`, is that done by the caller (it is
    closed here)."""
    if ahead is None and models is None:
        ahead = start_tissue_ahead(paths, out_root, cfg, tissue_ahead=tissue_ahead)
    try:
        models = models or load_models(cfg)
        out_root = Path(out_root)
        out_root.mkdir(parents=True, exist_ok=True)
        outputs, todo = _to_do(paths, out_root, cfg)
        if ahead is None and _finds_tissue_ahead(cfg, models.predictor.device.type, tissue_ahead) and len(todo) > 1:
            ahead = Ahead(todo, lambda path: find_tissue(path, cfg))
        results = []
        for path, out_dir in outputs.items():
            result = run_slide(path, out_dir, cfg, models, progress=progress, ahead=ahead)
            results.append(result)
            if on_result:
                on_result(result)
    finally:
        if ahead is not None:
            ahead.close()
    return results


def start_tissue_ahead(paths: Sequence[Path], out_root: Path, cfg: RunConfig, *,
                       tissue_ahead: bool | None = None) -> Ahead[TissueMask] | None:
    """:func:`run_slides`'s ``ahead`` for ``paths``, already finding the first slide's tissue: made
    before :func:`load_models`, whose seconds on a GPU (CUDA's start, the pinned blocks, the
    forkserver's imports beside them) then hide that slide's tissue detection as well (0.81 s of a
    100k² slide's run on an H200 machine). None where run_slides finds no tissue ahead (a CPU, by
    default) or has no slide to do."""
    _, todo = _to_do(paths, Path(out_root), cfg)
    if not todo or not _finds_tissue_ahead(cfg, resolve_device(cfg.inference.device).type, tissue_ahead):
        return None
    ahead: Ahead[TissueMask] = Ahead(todo, lambda path: find_tissue(path, cfg))
    ahead.start(todo[0])
    return ahead


def _to_do(paths: Sequence[Path], out_root: Path, cfg: RunConfig) -> tuple[dict[Path, Path], list[Path]]:
    """(each slide's output folder, the slides not done yet or to be redone)."""
    outputs = {path: out_root / name for path, name in output_names([Path(p) for p in paths]).items()}
    return outputs, [p for p, out in outputs.items() if cfg.output.overwrite or not is_complete(out)]


def _finds_tissue_ahead(cfg: RunConfig, device_type: str, tissue_ahead: bool | None) -> bool:
    """``tissue_ahead``, by default where slides stitch in processes of their own (see :func:`run_slides`)."""
    return stitching_processes(cfg, device_type) > 0 if tissue_ahead is None else tissue_ahead
