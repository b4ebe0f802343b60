"""Where slides run: one process, a dask LocalCluster, an existing scheduler, or SLURM workers.

One small function per backend. Dask resources are labels only, so GPU workers also get their
device set explicitly; dask's nanny pins OMP/MKL threads to 1, so torch threads are set per worker
too. Worker processes are made non-daemonic so a DataLoader with reader processes works inside a
task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import yaml
from distributed import Client, LocalCluster
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import format_validation_error
from .errors import ConfigError


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
            return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})
        except ValidationError as exc:
            raise ConfigError(f"{path}: {format_validation_error(exc)}") from None
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None


def parse_local(spec: str) -> int:
    """``local`` → 2 workers, ``local:N`` → N workers."""
    name, _, count = spec.partition(":")
    if name != "local" or (count and not count.isdigit()) or (count and int(count) < 1):
        raise ConfigError(f"--dask expects 'local' or 'local:N', got '{spec}'")
    return int(count) if count else 2


def local_client(n_workers: int, *, threads_per_worker: int = 1) -> Client:
    """A LocalCluster of ``n_workers`` non-daemonic processes (each may start DataLoader readers)."""
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=None)
    return Client(cluster)


def scheduler_client(address: str) -> Client:
    """Connect to an existing dask scheduler, e.g. ``tcp://host:8786``."""
    return Client(address)


def slurm_client(cfg: SlurmConfig) -> Client:
    """SLURM jobs through dask-jobqueue; GPU jobs advertise ``GPU=N`` resources."""
    from dask_jobqueue import SLURMCluster

    extra = list(cfg.job_extra_directives)
    worker_args: list[str] = []
    if cfg.gpus:
        extra.append(f"--gres=gpu:{cfg.gpus}")
        worker_args = ["--resources", f"GPU={cfg.gpus}"]
    kwargs: dict[str, Any] = dict(queue=cfg.queue, account=cfg.account, cores=cfg.cores, memory=cfg.memory,
                                  walltime=cfg.walltime, processes=1, job_extra_directives=extra,
                                  worker_extra_args=worker_args, local_directory=cfg.local_directory)
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = SLURMCluster(**{k: v for k, v in kwargs.items() if v is not None})
    cluster.scale(jobs=cfg.jobs)
    return Client(cluster)


def client_for(*, dask_spec: str | None = None, scheduler: str | None = None, slurm: Path | None = None) -> Client | None:
    """The client for the first of ``scheduler``, ``slurm`` (a YAML path) and ``dask_spec``
    (``local[:N]``) that is given; None (run in this process) when none is."""
    if scheduler:
        return scheduler_client(scheduler)
    if slurm:
        return slurm_client(SlurmConfig.from_yaml(slurm))
    if dask_spec:
        return local_client(parse_local(dask_spec))
    return None
