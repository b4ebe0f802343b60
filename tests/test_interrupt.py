"""Ctrl-C and the processes a run starts: one line and exit status 130, cluster workers that leave the
interrupt to the run, readers that do not outlive a parent that died while they started; and how
local cluster workers split the machine."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_pyramid
from wsi_medcam import batch, pipeline
from wsi_medcam.batching import _start_reader
from wsi_medcam.cli import app
from wsi_medcam.config import RunConfig
from wsi_medcam.distributed import ctrl_c_spares_children, split_local_cores

IGNORES_SIGINT = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"]


def test_processes_started_for_a_cluster_leave_ctrl_c_to_the_run():
    """Ctrl-C reaches every process of the terminal's group: a LocalCluster's workers and their
    readers each printed a traceback (about 70 lines) while the run closed the cluster anyway."""
    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_spares_children():
        inside = subprocess.run(IGNORES_SIGINT, capture_output=True, text=True, check=True).stdout.strip()
    assert inside == "True"
    assert signal.getsignal(signal.SIGINT) is before  # this process still stops on Ctrl-C
    after = subprocess.run(IGNORES_SIGINT, capture_output=True, text=True, check=True).stdout.strip()
    assert after == "False"


CTRL_C_WHILE_THE_CLUSTER_STARTS = """
import os, signal, subprocess, sys, time
from wsi_medcam import distributed

class Starting:  # stands in for LocalCluster: its workers start, and Ctrl-C comes meanwhile
    def __init__(self, **kwargs):
        Starting.worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2); print('alive')"],
                                       stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)  # its Python has started
        os.killpg(0, signal.SIGINT)  # what the terminal does: to the whole foreground group
        time.sleep(0.5)  # a Ctrl-C raised here would leave the cluster half-started
        print("started", flush=True)

    def close(self):
        print("closed", flush=True)

distributed.LocalCluster = Starting
try:
    distributed.local_client(1)
except KeyboardInterrupt:
    print("interrupted", flush=True)
print(Starting.worker.communicate()[0].strip(), Starting.worker.returncode)
"""


def test_ctrl_c_while_the_cluster_starts_stops_the_run_once_it_has():
    """A Ctrl-C while a LocalCluster's workers start (seconds: each imports torch) was ignored with
    them, and the whole archive ran. Now the workers still ignore it, the run is interrupted once the
    cluster is up, and the cluster is closed again. (In a session of its own: the test sends SIGINT
    to its whole process group.)"""
    proc = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_THE_CLUSTER_STARTS], capture_output=True, text=True,
                          timeout=300, start_new_session=True)
    assert proc.stdout.split("\n") == ["started", "closed", "interrupted", "alive 0", ""], proc.stdout + proc.stderr


@pytest.mark.parametrize("while_", ["slides run", "models load"])
def test_an_interrupted_run_says_what_is_kept_and_exits_130(tmp_path, monkeypatch, while_):
    slide = write_pyramid(tmp_path / "s.tif", np.full((256, 256, 3), 200, np.uint8), mpp=0.5)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if while_ == "slides run":
        monkeypatch.setattr(batch, "run_archive", interrupted)
        monkeypatch.setattr(pipeline, "load_models", lambda cfg: None)
    else:
        monkeypatch.setattr(pipeline, "load_models", interrupted)
    monkeypatch.setattr(pipeline, "start_tissue_ahead", lambda *args, **kwargs: None)
    result = CliRunner().invoke(app, ["run", str(slide), "--classifier", str(tmp_path / "clf"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 130, result.output
    assert batch.INTERRUPTED in result.output and "Traceback" not in result.output


def _reader_start(parent: int) -> None:
    _start_reader(parent, False, 0)
    os._exit(3)  # went on to read


@pytest.mark.parametrize("parent_alive", [True, False])
def test_a_reader_whose_parent_died_while_it_started_leaves(parent_alive):
    """torch's readers compare their parent's pid with the one they saw at start: one whose parent died
    while it imported torch (spawned readers of a dask worker closed by Ctrl-C) saw init's and waited
    for work for good. _start_reader, their first step, leaves where the parent is not the one that
    started it."""
    parent = os.getpid() if parent_alive else os.getpid() + 10_000_000  # beyond any pid: gone
    proc = multiprocessing.get_context("fork").Process(target=_reader_start, args=(parent,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == (3 if parent_alive else 0)


def test_local_workers_split_the_cores_on_a_cpu_only(monkeypatch):
    cores = os.cpu_count() or 1
    cpu = split_local_cores("local:2", RunConfig.from_yaml(None, {"inference.device": "cpu"}))
    assert (cpu.inference.threads, cpu.inference.streams) == (1, max(1, cores // 2))
    # set in the config (or by flags): kept
    own = RunConfig.from_yaml(None, {"inference.device": "cpu", "inference.streams": 3})
    assert split_local_cores("local:2", own) == own
    # on CUDA a stream is a CUDA stream, two by default: 8 per worker on a 16-core node overloaded the GPU
    cuda = RunConfig.from_yaml(None, {"inference.device": "cuda:1"})
    assert split_local_cores("local:2", cuda) == cuda
    auto = RunConfig.from_yaml(None, {})
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert split_local_cores("local:2", auto) == auto
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert split_local_cores("local:2", auto).inference.threads == 1


def test_ctrl_c_mid_slide_leaves_no_partial_folder(tmp_path, small_bundles):
    """Ctrl-C while a slide streams (here from the progress hook, on the writer thread, after the
    first batch): the slide's readers and stitching stop, its .partial goes, and Ctrl-C goes on up
    to the run; the next run redoes the slide."""
    from conftest import CMU

    if not CMU.is_file():
        pytest.skip(f"{CMU} not found")
    clf, seg = small_bundles
    cfg = RunConfig.from_dict({"classifier": str(clf), "segmenter": str(seg),
                               "inference": {"device": "cpu", "workers": 1, "precision": "fp32", "batch_size": 8}})
    models = pipeline.load_models(cfg)
    seen = []

    def ctrl_c(name, done, total):
        seen.append((done, total))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run_slide(CMU, tmp_path / CMU.stem, cfg, models, progress=ctrl_c)
    assert seen and seen[-1][0] < seen[-1][1]  # mid-slide (the batches already handed to the writer are taken in)
    assert list(tmp_path.iterdir()) == []
