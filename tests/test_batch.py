"""Many slides: dask LocalCluster against one process, kill -9 and resume, hostile inputs, the output lock."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr
from typer.testing import CliRunner

from conftest import CMU, SLIDES, needs_data, write_pyramid
from wsi_medcam.batch import output_lock
from wsi_medcam.cli import app
from wsi_medcam.pipeline import output_names

pytestmark = needs_data
runner = CliRunner()


def _status(out: Path) -> dict[str, dict]:
    return {Path(r["slide"]).name: r for r in map(json.loads, (out / "status.jsonl").read_text().splitlines())}


def _same_outputs(a: Path, b: Path) -> None:
    """Same tiles, probabilities, evidence arrays and reports (timings and paths aside)."""
    rows_a, rows_b = (list(csv.DictReader(open(p / "tiles.csv"))) for p in (a, b))
    assert [r["prediction"] for r in rows_a] == [r["prediction"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert ra["x"] == rb["x"] and ra["y"] == rb["y"]
        assert abs(float(ra["prob_tumor"]) - float(rb["prob_tumor"])) < 1e-4
    if (a / "evidence.ome.zarr").exists():
        ea = zarr.open_group(str(a / "evidence.ome.zarr"), mode="r")["0"][:]
        eb = zarr.open_group(str(b / "evidence.ome.zarr"), mode="r")["0"][:]
        assert np.abs(ea.astype(int) - eb.astype(int)).max() <= 1
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    for r in (ra, rb):
        r.pop("timings_s")
        r["parameters"].pop("config")
    assert ra["tiles"] == rb["tiles"] and ra["slide"] == rb["slide"]
    assert (a / "tiles.geojson").read_text() == (b / "tiles.geojson").read_text()


@pytest.fixture(scope="module")
def slide_set(tmp_path_factory, cmu_pixels):
    """Real shared slides plus built pyramids, including two with the same stem in different folders."""
    root = tmp_path_factory.mktemp("slides")
    (root / "a").mkdir()
    (root / "b").mkdir()
    write_pyramid(root / "a" / "part.tif", cmu_pixels[:1200, :1000], mpp=0.5, levels=2)
    write_pyramid(root / "b" / "part.tif", cmu_pixels[1200:2400, 1000:2000], mpp=0.5, levels=2)
    return [CMU, SLIDES / "OS-1-detail.ome.tif", root / "a" / "part.tif", root / "b" / "part.tif"]


def _model_args(bundles: tuple[Path, Path]) -> list[str]:
    """Classifier and segmenter, fp32, no reader processes: what the reference and the runs it checks share."""
    clf, seg = bundles
    return ["--classifier", str(clf), "--segmenter", str(seg), "--precision", "fp32", "--workers", "0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_bundles, slide_set) -> Path:
    """Outputs of one uninterrupted run over the first three slides, against which interrupted and
    failed runs are checked (per slide folder, so any of them may check one slide of the three)."""
    out = tmp_path_factory.mktemp("reference")
    result = runner.invoke(app, ["run", *map(str, slide_set[:3]), "-o", str(out), *_model_args(small_bundles)])
    assert result.exit_code == 0, result.output
    return out


def test_local_cluster_matches_one_process(tmp_path, small_bundles, slide_set, reference):
    """Four slides over a LocalCluster of 2 workers give the one-process reference's outputs for
    the three it ran; the two part.tif get distinct folders."""
    common = _model_args(small_bundles)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    start = time.perf_counter()
    result = runner.invoke(app, ["run", *map(str, slide_set), "-o", str(tmp_path / "dask"), *common, "--dask", "local:2"])
    assert result.exit_code == 0, result.output
    print(f"\nLocalCluster(2) over {len(slide_set)} slides: {time.perf_counter() - start:.1f} s")
    # the cluster the run started went with it: no worker process (each holding the models) is left
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())]
    assert not left, [" ".join(p.cmdline())[:100] for p in left]
    names, alone = output_names(slide_set), output_names(slide_set[:3])
    assert sorted(p.name for p in (tmp_path / "dask").iterdir() if p.is_dir()) == sorted(names.values())
    assert len(set(names.values())) == 4  # the two part.tif got distinct folders
    for path in slide_set[:3]:
        _same_outputs(reference / alone[path], tmp_path / "dask" / names[path])
    assert {r["status"] for r in _status(tmp_path / "dask").values()} == {"done"}


def test_a_worker_killed_mid_slide_leaves_nothing_half_written(tmp_path, small_bundles):
    """A dask worker killed while it writes a slide (the OOM killer, a job's time limit): once dask
    gives up on the slide (here at once: allowed-failures 0) it fails in one line, and its
    half-written folder is removed then, not at the next run."""
    import threading

    import dask
    from distributed import Client, LocalCluster

    from wsi_medcam.batch import run_archive
    from wsi_medcam.config import RunConfig

    clf, seg = small_bundles
    cfg = RunConfig.from_dict({"classifier": str(clf), "segmenter": str(seg),
                               "inference": {"device": "cpu", "workers": 0, "precision": "fp32"}})
    out = tmp_path / "out"
    killed = threading.Event()
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        pid, = client.run(os.getpid).values()

        def kill_once_half_written() -> None:
            deadline = time.time() + 300
            while time.time() < deadline and not killed.is_set():
                if out.is_dir() and any(p.name.endswith(".partial") for p in out.iterdir()):
                    os.kill(pid, signal.SIGKILL)
                    killed.set()
                time.sleep(0.02)

        killer = threading.Thread(target=kill_once_half_written, daemon=True)
        killer.start()
        results = run_archive([CMU], out, cfg, client=client)
        killed.set()
        killer.join()
    assert [r.status for r in results] == ["failed"], results
    assert results[0].reason.startswith("KilledWorker: the dask worker running this slide died") and "\n" not in results[0].reason
    assert _status(out)[CMU.name]["status"] == "failed"
    assert sorted(p.name for p in out.iterdir()) == [".wsi-medcam.lock", "status.jsonl"]  # nothing half-written


def test_an_interrupted_cluster_run_stops_its_slides_before_it_returns(tmp_path, small_bundles, monkeypatch):
    """Ctrl-C on a run over a cluster: the slide a worker is running stops after its batch, cleans up
    (no .partial) before the run lets go of OUT, and a slide of that run that had not started leaves
    the outputs it finds alone. Before, a scheduler's workers went on writing into OUT after the run
    had released its lock, and a LocalCluster's were killed under their slides."""
    import threading

    from distributed import Client, LocalCluster

    from wsi_medcam import batch
    from wsi_medcam.config import RunConfig
    from wsi_medcam.errors import WsiMedcamError

    clf, seg = small_bundles
    cfg = RunConfig.from_dict({"classifier": str(clf), "segmenter": str(seg),
                               "inference": {"device": "cpu", "workers": 0, "precision": "fp32", "batch_size": 4}})
    out = tmp_path / "out"
    mid, calls, stopped = threading.Event(), [], []
    stop_when = batch._stop_when

    def counted(worker, run_id):
        check = stop_when(worker, run_id)

        def count() -> None:  # 6 stage starts, one call per batch of 4 of the slide's 50 tiles (13), 4 stages
            calls.append(1)
            if len(calls) == 9:  # 3 batches in
                mid.set()
            try:
                check()
            except WsiMedcamError:
                stopped.append(len(calls))
                raise
        return count

    def interrupted(*args) -> None:  # Ctrl-C while the slide streams
        assert mid.wait(300)
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "_stop_when", counted)
    monkeypatch.setattr(batch, "_collect", interrupted)
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(KeyboardInterrupt):
            batch.run_archive([CMU], out, cfg, client=client)
        assert stopped and stopped[0] < 16, (stopped, len(calls))  # a batch or two after the interrupt; the last batch's is call 19 of 23
        assert sorted(p.name for p in out.iterdir()) == [".wsi-medcam.lock"]  # no .partial: cleaned up before returning
        # a slide of an interrupted run that had not started yet
        earlier = out / CMU.stem
        earlier.mkdir()
        (earlier / "from-an-earlier-run.txt").write_text("kept")
        batch._stop_run("run-1")
        task = client.submit(batch.slide_task, str(CMU), str(earlier), batch.absolute_paths(cfg).model_dump_json(), "run-1")
        result = task.result(timeout=120)
    assert result["status"] == "failed" and result["reason"] == "stopped: its run was interrupted"
    assert [p.name for p in earlier.iterdir()] == ["from-an-earlier-run.txt"]


def test_a_gpu_task_on_a_local_cluster_is_scheduled(tmp_path, small_bundles):
    """Slide tasks for --device cuda ask for a GPU resource, so local workers must offer one: without
    it the run waited forever. Here (no CUDA) the slide is scheduled and fails in one line."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    clf, _ = small_bundles
    proc = subprocess.run([sys.executable, "-m", "wsi_medcam.cli", "run", str(CMU), "--classifier", str(clf),
                           "-o", str(tmp_path), "--device", "cuda", "--dask", "local:1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _status(tmp_path)[CMU.name]["reason"].startswith("--device cuda: no CUDA device here")
    assert "Traceback" not in proc.stdout + proc.stderr and "INFO" not in proc.stdout + proc.stderr


def test_local_cluster_workers_share_the_gpus():
    """LocalCluster workers are named 0..N-1: on a 4-GPU machine worker k takes cuda:k mod 4 unless a
    device is numbered or chosen as the CPU; named workers (SLURM jobs own their GPUs) keep theirs."""
    from wsi_medcam.batch import spread_over_gpus
    from wsi_medcam.config import RunConfig

    def device(name, gpus, chosen="auto"):
        return spread_over_gpus(RunConfig.from_dict({"inference": {"device": chosen}}), name, gpus).inference.device

    assert [device(k, 4) for k in range(6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert [device(k, 2, "cuda") for k in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert device(3, 4, "cuda:2") == "cuda:2" and device(3, 4, "cpu") == "cpu"
    assert device(3, 1) == "auto" and device(3, 0) == "auto" and device("SLURMCluster-3", 4) == "auto"


def _recorded_task(path: str, out_dir: str, cfg_json: str, run_id: str) -> dict:
    """Stands in for :func:`wsi_medcam.batch.slide_task`: a "done" slide that names what it was given."""
    cfg = json.loads(cfg_json)
    return {"path": path, "status": "done", "output": out_dir, "seconds": 0.0, "tiles": 0,
            "reason": json.dumps([path, out_dir, cfg["classifier"], cfg["segmenter"], cfg["slide"]["mpp_csv"]]),
            "report": {}}


def test_cluster_tasks_get_absolute_paths_and_a_run_without_workers_says_so(tmp_path, monkeypatch, caplog):
    """Workers of a scheduler started elsewhere run in a folder of their own: every path a task gets
    is absolute (relative ones failed every slide: "bundles/clf: not a bundle directory"). With no
    worker connected the run says so once, then goes on when one comes (it waited without a word)."""
    import threading

    from distributed import Client, LocalCluster

    from wsi_medcam import batch
    from wsi_medcam.config import RunConfig

    monkeypatch.setattr(batch, "slide_task", _recorded_task)
    monkeypatch.setattr(batch, "WORKER_CHECK_S", 0.5)
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig.from_dict({"classifier": "bundles/clf", "segmenter": "bundles/seg", "slide": {"mpp_csv": ["m.csv"]}})
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        results: list = []
        run = threading.Thread(target=lambda: results.extend(batch.run_archive([Path("s/a.svs")], Path("out"), cfg,
                                                                                client=client)))
        with caplog.at_level("WARNING", logger="wsi_medcam.batch"):
            run.start()
            deadline = time.monotonic() + 60
            while "no dask worker" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "no dask worker" in caplog.text and "1 slides wait for one" in caplog.text
            cluster.scale(1)
            run.join(60)
    assert not run.is_alive() and [r.status for r in results] == ["done"]
    assert results[0].path == Path("s/a.svs")  # reported as the user named it
    given = json.loads(results[0].reason)
    assert given == [str(tmp_path / "s/a.svs"), str(tmp_path / "out/a"), str(tmp_path / "bundles/clf"),
                     str(tmp_path / "bundles/seg"), [str(tmp_path / "m.csv")]]


def test_slurm_workers_are_non_daemonic_and_run_one_slide_at_a_time(tmp_path):
    """The job script itself must make the worker non-daemonic (this process's dask config does not
    reach a SLURM node) and leave it one thread, whatever ``cores`` says."""
    pytest.importorskip("dask_jobqueue")
    from wsi_medcam.distributed import SlurmConfig, slurm_cluster

    cluster = slurm_cluster(SlurmConfig(cores=8, gpus=2, jobs=1))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "export DASK_DISTRIBUTED__WORKER__DAEMON=False" in script
    command = next(line for line in script.splitlines() if "distributed.cli.dask_worker" in line).split()
    nthreads = [command[i + 1] for i, arg in enumerate(command) if arg == "--nthreads"]
    assert nthreads[-1] == "1", command  # click keeps the last value
    assert "--resources" in command and command[command.index("--resources") + 1] == "GPU=2"
    assert "#SBATCH --gres=gpu:2" in script


def _run_cli(args: list[str], results) -> None:
    """The CLI in this (daemonic) process; its exit code and output go back through ``results``."""
    result = CliRunner().invoke(app, args)
    results.put((result.exit_code, result.output + (repr(result.exception) if result.exception else "")))


def test_a_daemonic_dask_worker_runs_slides_without_child_processes(tmp_path, small_bundles):
    """An existing dask cluster's workers are daemonic unless configured otherwise, and Python forbids
    daemonic processes children: asked for a reader and a stitching process, a slide there still
    runs, reading and stitching in the process itself, and says so in its report."""
    import multiprocessing

    clf, seg = small_bundles
    ctx = multiprocessing.get_context("forkserver")
    results = ctx.Queue()
    args = ["run", str(CMU), "-o", str(tmp_path), "--classifier", str(clf), "--segmenter", str(seg),
            "--precision", "fp32", "--workers", "1", "--stitchers", "1", "--batch-size", "8"]
    proc = ctx.Process(target=_run_cli, args=(args, results), daemon=True)
    proc.start()
    code, output = results.get(timeout=600)
    proc.join(60)
    assert code == 0, output
    report = json.loads((tmp_path / CMU.stem / "report.json").read_text())
    assert report["parameters"]["readers"] == 0 and report["parameters"]["stitching_processes"] == 0
    assert report["tiles"]["count"] > 8  # more than one batch: a reader would have been started
    assert (tmp_path / CMU.stem / "evidence.ome.zarr").is_dir()


def test_kill_9_then_rerun_redoes_only_the_interrupted_slide(tmp_path, small_bundles, slide_set, reference):
    slides = [str(p) for p in slide_set[:3]]
    args = [sys.executable, "-m", "wsi_medcam.cli", "run", *slides, *_model_args(small_bundles)]
    out = tmp_path / "out"
    proc = subprocess.Popen([*args, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once the first slide is done and the second one is under way
        if (out / "status.jsonl").exists() and any(p.name.endswith(".partial") for p in out.iterdir()):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = _status(out)
    assert [r["status"] for r in first.values()] == ["done"]
    half = [p for p in out.iterdir() if p.name.endswith(".partial")]
    assert half, "the kill should leave a half-written slide behind"
    rerun = subprocess.run([*args, "-o", str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    lines = [json.loads(line) for line in (out / "status.jsonl").read_text().splitlines()]
    second = {Path(r["slide"]).name: r["status"] for r in lines[1:]}
    assert second[Path(slides[0]).name] == "skipped"
    assert all(second[Path(s).name] == "done" for s in slides[1:])
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    names = sorted(p.name for p in reference.iterdir() if p.is_dir())
    assert names == sorted(p.name for p in out.iterdir() if p.is_dir()) and len(names) == 3
    for name in names:
        _same_outputs(reference / name, out / name)


def test_hostile_inputs_each_fail_alone_with_one_line(tmp_path, small_bundles, cmu_pixels):
    clf, _ = small_bundles
    d = tmp_path / "in put ünïcode"
    d.mkdir()
    truncated = d / "truncated.svs"
    truncated.write_bytes(CMU.read_bytes()[: CMU.stat().st_size // 3])
    (d / "notes.svs").write_text("this is not a slide")
    (d / "empty.svs").touch()
    write_pyramid(d / "nompp.tif", cmu_pixels[:600, :600], mpp=None, levels=1, aperio=False)
    write_pyramid(d / "blank.tif", np.full((1500, 1500, 3), 250, np.uint8), mpp=0.5, levels=2)
    write_pyramid(d / "coarse.tif", cmu_pixels[:800, :800], mpp=2.0, levels=1)
    shutil.copy(SLIDES / "format-fixtures" / "small.svs", d / "tiny.svs")
    good = d / "good slide é.svs"
    shutil.copy(CMU, good)
    result = runner.invoke(app, ["run", str(d), "--classifier", str(clf), "-o", str(tmp_path / "out"), "--workers", "0"])
    assert result.exit_code == 1
    status = _status(tmp_path / "out")
    assert status["good slide é.svs"]["status"] == "done"
    assert status["blank.tif"]["status"] == "done" and status["blank.tif"]["tiles"] == 0  # no tissue: valid, empty
    assert status["tiny.svs"]["status"] == "done" and status["tiny.svs"]["tiles"] == 0  # smaller than one tile
    expected = {"truncated.svs": "", "notes.svs": "not a readable slide", "empty.svs": "empty file",
                "nompp.tif": "--mpp", "coarse.tif": "refusing to upsample"}
    for name, words in expected.items():
        assert status[name]["status"] == "failed", name
        assert words in status[name]["reason"] and "\n" not in status[name]["reason"]
        assert f"failed {d / name}" in result.output.replace("\n", " ") or name in result.output
    assert not (tmp_path / "out" / "truncated").exists()
    report = json.loads((tmp_path / "out" / "blank" / "report.json").read_text())
    assert report["tiles"]["count"] == 0


def test_second_run_on_a_locked_output_is_refused(tmp_path, small_bundles):
    clf, _ = small_bundles
    out = tmp_path / "out"
    with output_lock(out):
        result = runner.invoke(app, ["run", str(CMU), "--classifier", str(clf), "-o", str(out)])
    assert result.exit_code == 2 and "in use by another wsi-medcam run" in result.output
    assert not (out / CMU.stem).exists()


def test_unwritable_output_fails_the_slide_cleanly(tmp_path, small_bundles):
    clf, _ = small_bundles
    out = tmp_path / "out"
    out.mkdir()
    (out / CMU.stem).write_text("not a folder")  # the slide's folder cannot be created
    (out / f".{CMU.stem}.partial").write_text("nor its temporary one")
    result = runner.invoke(app, ["run", str(CMU), "--classifier", str(clf), "-o", str(out)])
    assert result.exit_code == 1
    status = _status(out)
    assert status[CMU.name]["status"] == "failed"
    assert (out / CMU.stem).read_text() == "not a folder"  # nothing marked done, nothing clobbered


def test_manifest_csv_with_mpp(tmp_path, small_bundles, cmu_pixels):
    clf, _ = small_bundles
    write_pyramid(tmp_path / "nompp.tif", cmu_pixels[:900, :900], mpp=None, levels=1, aperio=False)
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"path,mpp\nnompp.tif,0.5\n{CMU},\n")
    result = runner.invoke(app, ["run", str(manifest), "--classifier", str(clf), "-o", str(tmp_path / "out"),
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "nompp" / "report.json").read_text())
    assert report["slide"]["mpp"] == {"x": 0.5, "y": 0.5, "source": "csv"}
    assert (tmp_path / "out" / CMU.stem / "report.json").is_file()


def test_every_manifest_and_the_mpp_csv_give_mpps(tmp_path, small_bundles, cmu_pixels):
    """Two manifests and --mpp-csv: each slide takes its mpp from whichever lists it, --mpp-csv first
    (only the first manifest's column counted before, and none of them with --mpp-csv)."""
    clf, _ = small_bundles
    for name in ("a", "b", "c"):
        write_pyramid(tmp_path / f"{name}.tif", cmu_pixels[:600, :600], mpp=None, levels=1, aperio=False)
    (tmp_path / "m1.csv").write_text("path,mpp\na.tif,0.5\nb.tif,\n")
    (tmp_path / "m2.csv").write_text("path,mpp\nb.tif,0.49\nc.tif,0.52\n")
    (tmp_path / "extra.csv").write_text(f"{tmp_path / 'c.tif'},0.51\n")
    result = runner.invoke(app, ["run", str(tmp_path / "m1.csv"), str(tmp_path / "m2.csv"), "--mpp-csv",
                                 str(tmp_path / "extra.csv"), "--classifier", str(clf), "-o", str(tmp_path / "out"),
                                 "--workers", "0", "--min-tissue", "0.01"])
    assert result.exit_code == 0, result.output
    mpps = {n: json.loads((tmp_path / "out" / n / "report.json").read_text())["slide"]["mpp"]["x"] for n in "abc"}
    assert mpps == {"a": 0.5, "b": 0.49, "c": 0.51}


def test_read_error_in_the_middle_of_a_slide_fails_that_slide_only(tmp_path, bundles, cmu_pixels):
    """A corrupt JPEG tile deep inside level 0 (which 224-px tiles at 0.5 µm/px read): OpenSlide
    latches the error, the slide fails with the position in its reason, and the next slide still runs."""
    import tifffile

    clf, _ = bundles
    # three levels: tissue detection reads the intact level 2, only the tile reads meet the corrupt tile
    path = write_pyramid(tmp_path / "corrupt.svs", cmu_pixels[:1536, :1536], mpp=0.5, levels=3)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        middle = len(page.dataoffsets) // 2 + 3
        offset, count = page.dataoffsets[middle], page.databytecounts[middle]
    with open(path, "r+b") as fh:
        fh.seek(offset + count // 4)
        fh.write(b"\x00\xff" * (count // 4))
    result = runner.invoke(app, ["run", str(path), str(CMU), "--classifier", str(clf), "-o", str(tmp_path / "out"),
                                 "--workers", "0"])
    assert result.exit_code == 1
    status = _status(tmp_path / "out")
    assert status["corrupt.svs"]["status"] == "failed"
    assert "read failed at level 0" in status["corrupt.svs"]["reason"]
    assert "size=(224, 224)" in status["corrupt.svs"]["reason"]  # a tile read, after tissue and tiling
    assert status[CMU.name]["status"] == "done"
    assert not (tmp_path / "out" / "corrupt").exists()


def _private_mount_prefix(probe_dir: Path) -> list[str] | None:
    """A command prefix that runs in a private mount namespace where a tmpfs can be mounted (as root,
    or through a user namespace); None when this machine allows neither."""
    if not shutil.which("unshare"):
        return None
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe_dir)],
                               capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


def test_disk_full_fails_the_slide_cleanly_and_a_rerun_with_space_completes(tmp_path, small_bundles, reference):
    """A real full filesystem (a 256 KiB tmpfs): the slide fails with ENOSPC in one line, nothing is
    left half-written or marked done; after the filesystem grows, the rerun redoes it and matches a
    run that never ran out of space."""
    out, keep = tmp_path / "out", tmp_path / "keep"
    out.mkdir()
    keep.mkdir()
    prefix = _private_mount_prefix(out)
    if prefix is None:
        pytest.skip("needs a private mount namespace (root or user namespaces) to mount a small tmpfs")
    args = [sys.executable, "-m", "wsi_medcam.cli", "run", str(CMU), *_model_args(small_bundles)]
    run = " ".join(f"'{a}'" for a in args) + f" -o '{out}'"
    script = f"""
mount -t tmpfs -o size=256k tmpfs '{out}' || exit 99
{run} > '{keep}/first.log' 2>&1; echo $? > '{keep}/first.rc'
ls -A '{out}' > '{keep}/first.ls'; cp '{out}/status.jsonl' '{keep}/first.jsonl'
mount -o remount,size=64m '{out}'
{run} > '{keep}/second.log' 2>&1; echo $? > '{keep}/second.rc'
cp -r '{out}/.' '{keep}/final'
"""
    done = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (keep / "first.rc").read_text().strip() == "1"
    first = [json.loads(line) for line in (keep / "first.jsonl").read_text().splitlines()]
    assert [r["status"] for r in first] == ["failed"]
    assert "No space left on device" in first[0]["reason"] and "\n" not in first[0]["reason"]
    assert "Traceback" not in (keep / "first.log").read_text()
    assert sorted((keep / "first.ls").read_text().split()) == [".wsi-medcam.lock", "status.jsonl"]  # nothing half-written
    assert (keep / "second.rc").read_text().strip() == "0", (keep / "second.log").read_text()
    second = [json.loads(line) for line in (keep / "final" / "status.jsonl").read_text().splitlines()]
    assert [r["status"] for r in second] == ["failed", "done"]
    _same_outputs(reference / CMU.stem, keep / "final" / CMU.stem)


def _chattr(flag: str, *paths: Path) -> bool:
    return shutil.which("chattr") is not None and subprocess.run(
        ["chattr", flag, *map(str, paths)], capture_output=True).returncode == 0


def test_permission_denied_on_the_output(tmp_path, small_bundles, cmu_pixels):
    """Root ignores mode bits, so the immutable attribute (chattr +i) makes the denial real for anyone.
    A leftover slide folder that cannot be cleared fails that slide only, untouched and not marked done;
    an output folder that cannot be written stops the run with one line."""
    clf, _ = small_bundles
    other = write_pyramid(tmp_path / "other.tif", cmu_pixels[:1200, :1000], mpp=0.5, levels=2)
    out, locked = tmp_path / "out", tmp_path / "locked"
    stale = out / CMU.stem
    stale.mkdir(parents=True)
    (stale / "leftover.txt").write_text("someone else's")
    locked.mkdir()
    if not _chattr("+i", stale, locked):
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        result = runner.invoke(app, ["run", str(CMU), str(other), "--classifier", str(clf), "-o", str(out), "--workers", "0"])
        refused = runner.invoke(app, ["run", str(CMU), "--classifier", str(clf), "-o", str(locked)])
    finally:
        _chattr("-i", stale, locked)
    assert result.exit_code == 1
    status = _status(out)
    assert status[CMU.name]["status"] == "failed" and "Operation not permitted" in status[CMU.name]["reason"]
    assert status["other.tif"]["status"] == "done"
    assert [p.name for p in stale.iterdir()] == ["leftover.txt"]  # untouched, not marked done
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    assert refused.exit_code == 2 and "cannot write to the output folder" in refused.output
    assert "Traceback" not in refused.output and list(locked.iterdir()) == []


def test_the_archive_script_refuses_usage_errors_in_one_line(tmp_path, small_bundles):
    """pipelines/archive.py, like `run`: no slides, or a bad config, is one line and exit 2 before a
    cluster starts (a traceback; and an empty folder was "0 ok, 0 failed", exit 0)."""
    from conftest import ROOT

    clf, _ = small_bundles
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text("inference:\n  batchsize: 4\n")
    for args, wanted in (([str(tmp_path / "empty")], "no slides matched"),
                         ([str(CMU), "--config", str(bad)], "inference.batchsize")):
        proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "archive.py"), *args, "-o", str(tmp_path / "out"),
                               "--classifier", str(clf)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.startswith("error: ") and wanted in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
