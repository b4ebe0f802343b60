"""Many slides: one task per slide, in this process or on a dask cluster, with a status record per
slide, an output lock, and models loaded once per worker.

A slide task runs the whole flow (:func:`wsi_medcam.pipeline.run_slide`): its outputs appear under
their final name only when complete, so a rerun after any crash skips finished slides and redoes
the rest. ``OUT/status.jsonl`` gets one line per slide (done / skipped / failed, reason, seconds).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .ahead import Ahead
from .config import RunConfig
from .errors import OutputError, WsiMedcamError
from .pipeline import (
    Models,
    ProgressHook,
    SlideResult,
    StopCheck,
    failure_reason,
    load_models,
    output_names,
    partial_dir,
    remove_output,
    run_slide,
    run_slides,
)
from .tissue import TissueMask

LOCK_NAME = ".wsi-medcam.lock"
STATUS_NAME = "status.jsonl"
WORKER_CHECK_S = 60.0
"""Seconds without any dask worker, slides pending, before a run says that it waits for one."""
INTERRUPTED = "interrupted: finished slides are kept; the same command again does the rest"
"""What a driver says on Ctrl-C (exit status 130): outputs are complete or under a temporary name."""
STOP_WAIT_S = 60.0
"""On Ctrl-C, how long a run on a cluster waits for its running slides to stop and clean up, s (they
stop after their batch or stage: milliseconds on a GPU, seconds on a CPU)."""
_STOPPED_RUNS: set[str] = set()
"""Per worker process: the interrupted runs (:func:`run_archive` calls), whose slides stop."""
_POLL_S = 1.0  # how often a run on a cluster looks for finished slides and asks the scheduler for workers, s

log = logging.getLogger(__name__)

_WORKER_MODELS: dict[str, Models] = {}
"""Per worker process: models keyed by the config that loaded them (loaded once, reused per slide)."""
_WORKER_MODELS_LOCK = threading.Lock()  # a worker of someone else's cluster may run several tasks at once


@contextmanager
def output_lock(out_root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_root`` so two runs never interleave in one folder."""
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        fh = open(out_root / LOCK_NAME, "a+")
    except OSError as exc:
        raise OutputError(f"cannot write to the output folder {out_root}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise OutputError(f"{out_root} is in use by another wsi-medcam run ({holder}); wait for it or use another --out") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


class StatusLog:
    """Appends one JSON line per slide to ``OUT/status.jsonl``, flushed to disk at once."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, result: SlideResult) -> None:
        record = {"slide": str(result.path), "status": result.status, "reason": result.reason,
                  "seconds": round(result.seconds, 3), "tiles": result.tiles,
                  "output": str(result.output) if result.output else None, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:  # the run cannot record outcomes any more: stop it, in one line
            raise OutputError(f"cannot record {result.path.name} in {self.path}: {exc.strerror or exc}") from None


def worker_models(cfg: RunConfig) -> Models:
    """The models for ``cfg`` in this process, loaded on first use."""
    key = cfg.model_dump_json(include={"classifier", "segmenter", "inference"})
    with _WORKER_MODELS_LOCK:
        if key not in _WORKER_MODELS:
            _WORKER_MODELS[key] = load_models(cfg)
        return _WORKER_MODELS[key]


def spread_over_gpus(cfg: RunConfig, worker_name: Any, gpus: int) -> RunConfig:
    """``cfg`` for dask worker ``worker_name`` on a machine with ``gpus`` CUDA devices: a
    LocalCluster names its workers 0…N−1, and there an unnumbered CUDA device (``auto`` or ``cuda``)
    becomes ``cuda:(name mod gpus)``, so N workers share the machine's GPUs instead of all using the
    first. Workers with other names (SLURM jobs, which get their own GPUs) keep the device as it is."""
    if gpus < 2 or not isinstance(worker_name, int) or cfg.inference.device not in ("auto", "cuda"):
        return cfg
    inference = cfg.inference.model_copy(update={"device": f"cuda:{worker_name % gpus}"})
    return cfg.model_copy(update={"inference": inference})


def _stop_when(worker: Any, run_id: str) -> StopCheck:
    """Stops a slide of run ``run_id`` (between stages, after a batch) once that run was interrupted
    (:func:`_stop_slides`) or ``worker`` closes (a job's walltime): its readers and stitching
    processes are then stopped by the slide's own clean-up and its ``.partial`` removed, instead of
    the worker being killed under them."""
    from distributed.core import Status

    def check() -> None:
        if run_id in _STOPPED_RUNS:
            raise WsiMedcamError("stopped: its run was interrupted")
        if worker.status in (Status.closing, Status.closed, Status.failed):
            raise WsiMedcamError("stopped: the dask worker is closing")
    return check


def _stop_run(run_id: str) -> None:
    """Run on every worker by :func:`_stop_slides`."""
    _STOPPED_RUNS.add(run_id)


def _stop_slides(client: Any, run_id: str, futures: Sequence[Any]) -> None:
    """Stop run ``run_id``'s slides on the workers, waiting for those running to clean up (at most
    :data:`STOP_WAIT_S`; a second Ctrl-C ends the wait). Without it, an interrupted run's slides went
    on writing into ``OUT`` on a scheduler's workers after the run had released its lock, and a
    LocalCluster's workers were killed under their slides 4 s into closing (their ``.partial`` left,
    their queues' semaphores reported as leaked by Python's resource tracker)."""
    from distributed import wait

    pending = [f for f in futures if not f.done()]
    if not pending:
        return
    log.warning("stopping %d slide(s) on the dask workers (Ctrl-C again: at once)", len(pending))
    try:
        client.run(_stop_run, run_id)
        wait(pending, timeout=STOP_WAIT_S)
    except Exception as exc:  # noqa: BLE001 - the scheduler gone, or slides slower to stop: closing follows anyway
        log.warning("not all slides stopped on the dask workers (%s); the next run redoes them", failure_reason(exc))


def slide_task(path: str, out_dir: str, cfg_json: str, run_id: str) -> dict[str, Any]:
    """What a dask worker runs for one slide of run ``run_id``; returns the :class:`SlideResult` as
    a plain dict. A slide of a run that was interrupted before it started leaves its outputs alone."""
    cfg = RunConfig.model_validate_json(cfg_json)
    import torch
    from distributed import get_worker  # here: plain runs do not import dask

    worker = get_worker()
    cfg = spread_over_gpus(cfg, worker.name, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    stop = _stop_when(worker, run_id)
    try:
        stop()
        models = worker_models(cfg)
    except WsiMedcamError as exc:  # e.g. no GPU on this worker: the slide fails in one line, not a worker traceback
        result = SlideResult(Path(path), "failed", None, failure_reason(exc))
    else:
        result = run_slide(Path(path), Path(out_dir), cfg, models, stop=stop)
    return {**asdict(result), "path": str(result.path), "output": str(result.output) if result.output else None}


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its bundle and CSV paths made absolute: the workers of a scheduler started
    elsewhere run in a folder of their own, where relative paths name other files or none."""
    slide = cfg.slide.model_copy(update={"mpp_csv": tuple(Path(p).absolute() for p in cfg.slide.mpp_csv)})
    return cfg.model_copy(update={"classifier": cfg.classifier and Path(cfg.classifier).absolute(),
                                  "segmenter": cfg.segmenter and Path(cfg.segmenter).absolute(), "slide": slide})


def _task_failure(exc: BaseException) -> str:
    """One line for a slide whose dask task failed: a worker that died running it (dask's own
    message is a paragraph), or whatever kept the task from running."""
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        return (f"KilledWorker: the dask worker running this slide died ({exc.allowed_failures + 1} attempt(s), the last "
                f"on {exc.last_worker.address}); out of memory, or its job was ended? The worker's log says which")
    return f"{type(exc).__name__}: {exc}"


def _from_dict(d: dict[str, Any]) -> SlideResult:
    return SlideResult(Path(d["path"]), d["status"], Path(d["output"]) if d["output"] else None, d["reason"],
                       d["seconds"], d["tiles"], d["report"])


def _collect(client: Any, futures: dict[Any, Path], names: dict[Path, str], out_root: Path,
             record: Callable[[SlideResult], None]) -> None:
    """Record each slide of ``futures`` (future → slide path) as its task ends, asking the scheduler
    for workers while none ends."""
    from distributed import as_completed

    ready, no_workers_since, warned = as_completed(futures), None, False
    while not ready.is_empty():
        finished = ready.next_batch(block=False)
        for future in finished:
            path = futures[future]
            try:
                record(replace(_from_dict(future.result()), path=path))  # as the user named it
            except Exception as exc:  # noqa: BLE001 - a worker died or the task could not run
                # dask has given up on the slide: no worker writes its folder any more, and what a
                # worker that died left half-written goes now rather than at the next run
                try:
                    remove_output(partial_dir(out_root / names[path]))
                except OSError as err:  # the next run removes it
                    log.warning("%s: could not remove its half-written outputs: %s", path, err)
                record(SlideResult(path, "failed", None, _task_failure(exc)))
        if finished:
            continue
        time.sleep(_POLL_S)
        if client.scheduler_info(n_workers=1).get("workers"):  # one round trip; one worker will do
            no_workers_since, warned = None, False
        elif no_workers_since is None:
            no_workers_since = time.monotonic()
        elif time.monotonic() - no_workers_since > WORKER_CHECK_S and not warned:
            # every worker died, or a queue has not started them yet (which may take hours): say so, and wait
            log.warning("no dask worker has been connected to %s for %.0f s: %d slides wait for one (Ctrl-C "
                        "stops the run)", client.scheduler.address, WORKER_CHECK_S, ready.count())
            warned = True


def run_archive(
    paths: Sequence[Path],
    out_root: Path,
    cfg: RunConfig,
    *,
    client: Any = None,
    models: Models | None = None,
    progress: ProgressHook | None = None,
    on_result: Callable[[SlideResult], None] | None = None,
    ahead: Ahead[TissueMask] | None = None,
) -> list[SlideResult]:
    """Process ``paths`` into ``out_root/<name>/`` under the output lock, recording each outcome.

    ``client``: a dask ``distributed.Client``: one task per slide, models loaded once per worker;
    None runs the slides one after another here (``models`` loaded once if not given), with
    ``ahead`` (:func:`~wsi_medcam.pipeline.start_tissue_ahead`) if the caller started one.
    """
    out_root = Path(out_root)
    names = output_names([Path(p) for p in paths])
    results: list[SlideResult] = []
    with output_lock(out_root):
        status = StatusLog(out_root / STATUS_NAME)

        def record(result: SlideResult) -> None:
            status.write(result)
            results.append(result)
            if on_result:
                on_result(result)

        if client is None:
            run_slides(paths, out_root, cfg, models=models, progress=progress, on_result=record, ahead=ahead)
            return results
        resources = {"GPU": 1} if cfg.inference.device.startswith("cuda") else None
        cfg_json = absolute_paths(cfg).model_dump_json()
        run_id = uuid.uuid4().hex  # names this run's tasks (two runs' slides of one name are two tasks) and its stop
        futures = {client.submit(slide_task, str(Path(path).absolute()), str((out_root / name).absolute()), cfg_json,
                                 run_id, key=f"slide-{name}-{run_id[:8]}", pure=False, resources=resources): path
                   for path, name in names.items()}
        try:
            _collect(client, futures, names, out_root, record)
        except BaseException:  # Ctrl-C, or this loop failing: the run's slides must not go on unwatched
            _stop_slides(client, run_id, list(futures))
            raise
    return results
