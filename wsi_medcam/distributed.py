"""Where slides run: one process, a dask LocalCluster, an existing scheduler, or SLURM workers.

One small function per backend. A slide task uses many cores itself (readers, stitching
processes, torch threads), so each worker runs one slide at a time, and a task that asks for a GPU
(``--device cuda``) takes the worker's ``GPU`` resource. Workers we start are non-daemonic, so a
task may start reader and stitching processes: LocalCluster's through dask's config, SLURM's
through the job script's environment (the config of this process does not reach them). Workers of
an existing scheduler may be daemonic; slides still run there, without child processes
(:func:`wsi_medcam.cpus.may_start_processes`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import dask
import torch
from distributed import Client, LocalCluster
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import RunConfig, format_validation_error, read_yaml_mapping
from .errors import ConfigError, WsiMedcamError


class SlurmConfig(BaseModel):
    """``configs/slurm.yaml``: one SLURM job = one dask worker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue: str | None = None
    account: str | None = None
    cores: int = Field(8, ge=1, description="CPU cores per job (DataLoader readers + torch threads)")
    memory: str = Field("32GB", description="memory per job")
    walltime: str = "04:00:00"
    gpus: int = Field(1, ge=0, description="GPUs per job (--gres=gpu:N)")
    jobs: int = Field(2, ge=1, description="how many jobs (workers) to start")
    job_extra_directives: list[str] = Field(default_factory=list)
    local_directory: str | None = None

    @classmethod
    def from_yaml(cls, path: Path) -> "SlurmConfig":
        try:
            return cls.model_validate(read_yaml_mapping(path))
        except ValidationError as exc:
            raise ConfigError(f"{path}: {format_validation_error(exc)}") from None


def parse_local(spec: str) -> int:
    """``local`` → 2 workers, ``local:N`` → N workers."""
    name, _, count = spec.partition(":")
    if name != "local" or (count and not count.isdigit()) or (count and int(count) < 1):
        raise ConfigError(f"--dask expects 'local' or 'local:N', got '{spec}'")
    return int(count) if count else 2


def split_local_cores(spec: str, cfg: RunConfig) -> RunConfig:
    """``cfg`` for the workers of a ``local[:N]`` cluster on this machine, which share its cores: on
    a CPU each runs cores ÷ N model streams of one torch thread (each worker left to its default
    would run one stream per core, N× as many threads as cores). Unchanged where ``cfg`` sets
    threads or streams, or runs on CUDA: there the GPU sets the pace and a stream is a CUDA stream
    (2 by default); split by cores, a 16-core machine gave each worker 8, with up to 24 batches of
    256 tiles in flight on the GPU per worker."""
    inference = cfg.inference
    on_cuda = inference.device.startswith("cuda") or (inference.device == "auto" and torch.cuda.is_available())
    if on_cuda or inference.threads is not None or inference.streams is not None:
        return cfg
    split = {"threads": 1, "streams": max(1, (os.cpu_count() or 1) // parse_local(spec))}
    return cfg.model_copy(update={"inference": inference.model_copy(update=split)})


@contextmanager
def ctrl_c_spares_children() -> Iterator[None]:
    """Processes started meanwhile ignore SIGINT (an ignored signal stays ignored across exec); a
    Ctrl-C meanwhile is raised here as the block ends.

    Ctrl-C goes to every process of the terminal's foreground group: with ``--dask local`` the
    workers, their nannies' processes and the workers' reader and stitching processes each printed a
    traceback (about 70 lines) before this process closed the cluster anyway. Started under this,
    they leave Ctrl-C to this process alone, which closes the cluster, and the workers with it.
    This process ignores SIGINT meanwhile too (the disposition is the process's), so a witness
    started before, in the same group, takes a Ctrl-C for it: ignored alone, a Ctrl-C while the
    workers started (seconds: each imports torch) was lost, and the whole archive ran. Outside the
    main thread, or where SIGINT's handler was not set from Python, nothing changes."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    # exits 0 when its stdin closes; a Ctrl-C (KeyboardInterrupt, or SIGINT before Python's handler) otherwise
    try:
        witness = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:  # no interpreter to start (an embedded Python): Ctrl-C meanwhile is lost, as before
        witness = None
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if witness is not None:
            witness.stdin.close()
        interrupted = witness is not None and witness.wait() != 0
    if interrupted:
        signal.raise_signal(signal.SIGINT)  # to the handler that is back: KeyboardInterrupt from Python's


def local_client(n_workers: int) -> Client:
    """A LocalCluster of ``n_workers`` non-daemonic processes, one slide at a time each, each with
    one ``GPU`` resource (without it a task asking for a GPU would wait forever), deaf to Ctrl-C
    (:func:`ctrl_c_spares_children`); closed again where Ctrl-C came while it started."""
    cluster = None
    try:
        with dask.config.set({"distributed.worker.daemon": False}), ctrl_c_spares_children():
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, resources={"GPU": 1})
        return Client(cluster)
    except BaseException:
        if cluster is not None:
            _close_cluster(cluster)
        raise


def scheduler_client(address: str) -> Client:
    """Connect to an existing dask scheduler, e.g. ``tcp://host:8786``. One that cannot be reached
    within dask's connect timeout (``distributed.comm.timeouts.connect``), or a malformed address,
    is one line naming the address instead of distributed's traceback."""
    client = Client.__new__(Client)  # kept, to close it here if it fails half-started
    try:
        client.__init__(address)
        return client
    except (OSError, ValueError) as exc:  # OSError covers TimeoutError: "Timed out trying to connect"
        # a malformed address leaves the client half-started; left to its __del__, it is closed
        # whenever the garbage collector runs, and that takes the one lock all of distributed's loop
        # runners share: run inside another's start, it deadlocked (a test hung for 900 s)
        with suppress(Exception):
            client.close()
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WsiMedcamError(f"cannot connect to the dask scheduler at {address}: {reason}") from None


def slurm_cluster(cfg: SlurmConfig) -> Any:
    """A dask-jobqueue ``SLURMCluster`` (no jobs submitted yet): one worker per job, non-daemonic,
    one slide at a time (``--nthreads 1`` after jobqueue's own ``--nthreads cores``: the last one
    counts), GPU jobs advertising ``GPU=N``."""
    from dask_jobqueue import SLURMCluster

    extra = list(cfg.job_extra_directives)
    worker_args = ["--nthreads", "1"]
    if cfg.gpus:
        extra.append(f"--gres=gpu:{cfg.gpus}")
        worker_args += ["--resources", f"GPU={cfg.gpus}"]
    kwargs: dict[str, Any] = dict(queue=cfg.queue, account=cfg.account, cores=cfg.cores, memory=cfg.memory,
                                  walltime=cfg.walltime, processes=1, job_extra_directives=extra,
                                  worker_extra_args=worker_args, local_directory=cfg.local_directory,
                                  job_script_prologue=["export DASK_DISTRIBUTED__WORKER__DAEMON=False"])
    return SLURMCluster(**{k: v for k, v in kwargs.items() if v is not None})


def slurm_client(cfg: SlurmConfig) -> Client:
    """:func:`slurm_cluster` with ``cfg.jobs`` jobs submitted, once SLURM has accepted the job
    script: dask-jobqueue submits in a background task and only logs a failed ``sbatch`` (not
    installed, unknown partition or account), and the run then waited forever for workers that
    never came. A job that SLURM accepts but takes long to start is waited for (a busy queue may
    legitimately take hours): the progress bar shows the run at 0 slides meanwhile."""
    if shutil.which("sbatch") is None:
        raise WsiMedcamError("--slurm needs SLURM's sbatch on PATH: run wsi-medcam on a login node of the cluster")
    cluster = slurm_cluster(cfg)
    try:
        check_job_script(cluster.job_script())
    except BaseException:  # the cluster's scheduler (and Ctrl-C during sbatch) must not outlive the refusal
        cluster.close()
        raise
    cluster.scale(jobs=cfg.jobs)
    return Client(cluster)


def check_job_script(script: str, timeout_s: float = 120) -> None:
    """Ask SLURM whether it would accept ``script`` (``sbatch --test-only``, which validates the
    partition, account, resources and time limit without submitting anything); raise
    :class:`ConfigError` with sbatch's reason if it would not."""
    try:
        proc = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WsiMedcamError(f"cannot check the SLURM job script with sbatch --test-only: {exc}") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise ConfigError(f"SLURM refuses the worker job: {lines[-1] if lines else f'sbatch exit status {proc.returncode}'}")


def close_client(client: Client) -> None:
    """Close ``client`` and the cluster it was made on, where this module started one (LocalCluster,
    SLURMCluster): ``Client(cluster).close()`` leaves the cluster running, and so did each run with
    ``--dask local:N`` (its worker processes, each holding the models, lived on until the process
    ended) and with ``--slurm`` (its jobs until their walltime or the process's exit). A client of an
    existing scheduler (``client.cluster`` is None) only disconnects."""
    cluster = client.cluster
    client.close()
    if cluster is not None:
        _close_cluster(cluster)


def _close_cluster(cluster: Any) -> None:
    """Close a cluster this module started, without the nanny's warning that closing kills workers."""
    nanny = logging.getLogger("distributed.nanny")
    level = nanny.level
    nanny.setLevel(logging.ERROR)  # "Worker process still alive after 4.0 seconds, killing": what closing asks for
    try:
        cluster.close()
    finally:
        nanny.setLevel(level)


def client_for(*, dask_spec: str | None = None, scheduler: str | None = None, slurm: Path | None = None) -> Client | None:
    """The client for the first of ``scheduler``, ``slurm`` (a YAML path) and ``dask_spec``
    (``local[:N]``) that is given; None (run in this process) when none is. Close it with
    :func:`close_client`."""
    if scheduler:
        return scheduler_client(scheduler)
    if slurm:
        return slurm_client(SlurmConfig.from_yaml(slurm))
    if dask_spec:
        return local_client(parse_local(dask_spec))
    return None
