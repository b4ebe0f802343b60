"""What the user hands a run: slide lists (globs, DICOM files, manifests), config sections, output
names, and where slides run (scheduler, SLURM). Bad input is one line, never a traceback or a hang."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import dask
import pytest
from typer.testing import CliRunner

from conftest import SLIDES, needs_data
from wsi_medcam.cli import app
from wsi_medcam.config import InferenceConfig, RunConfig, TissueConfig
from wsi_medcam.errors import ConfigError, WsiMedcamError
from wsi_medcam.inputs import expand_slides
from wsi_medcam.pipeline import output_names
from wsi_medcam.slide import read_mpp_csv

runner = CliRunner()
FIXTURES = SLIDES / "format-fixtures"


@needs_data
def test_dicom_instances_named_one_by_one_are_one_slide():
    """A glob or a list of a DICOM series' instance files is one slide, as the folder is (the glob
    ran boxes_0 and boxes_1, the same slide twice)."""
    first = FIXTURES / "boxes_0.dcm"
    assert expand_slides([str(FIXTURES / "*.dcm")])[0] == [first]
    assert expand_slides([str(first), str(FIXTURES / "boxes_1.dcm")])[0] == [first]
    assert expand_slides([str(FIXTURES)])[0] == expand_slides([str(FIXTURES / "*")])[0]


def test_excel_csvs_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the header is still a header, in manifests and mpp CSVs."""
    manifest = tmp_path / "bom.csv"
    manifest.write_text("path,mpp\na.svs,0.5\n", encoding="utf-8-sig")
    assert expand_slides([str(manifest)]) == ([tmp_path / "a.svs"], [manifest])
    assert read_mpp_csv(manifest) == {str(tmp_path / "a.svs"): 0.5, "a.svs": 0.5}


def test_a_csv_that_is_not_utf8_is_one_line(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("path\nsché.svs\n".encode("latin-1"))
    for read in (lambda: expand_slides([str(latin)]), lambda: read_mpp_csv(latin)):
        with pytest.raises(ConfigError, match=f"{latin}: it is not UTF-8 text"):
            read()
    for command in (["run", str(latin), "-o", str(tmp_path / "out")], ["info", str(latin)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.output.strip() == f"error: cannot read the manifest {latin}: it is not UTF-8 text (save it as CSV UTF-8)"


def test_empty_config_sections_are_defaults(tmp_path):
    """``inference:`` with nothing under it is the defaults, also when a flag sets one of its keys
    (was a TypeError); a section that is not a mapping is one line naming it."""
    config = tmp_path / "c.yaml"
    config.write_text("inference:\ntissue:\n")
    cfg = RunConfig.from_yaml(config, {"inference.device": "cpu"})
    assert cfg.inference == InferenceConfig(device="cpu") and cfg.tissue == TissueConfig()
    config.write_text("inference: 5\n")
    for overrides in ({}, {"inference.device": "cpu"}):
        with pytest.raises(ConfigError, match=f"config {config}: inference must be a mapping of inference settings, not 5"):
            RunConfig.from_yaml(config, overrides)


def test_output_names_are_unique_and_plain_without_collisions(tmp_path):
    """x.tif and x.svs in one folder got one folder (the hash was of their folder), and the second
    slide was skipped as done. Names stay deterministic, and plain stems where nothing collides."""
    paths = [tmp_path / "coll" / "x.tif", tmp_path / "coll" / "x.svs", tmp_path / "other" / "x.svs",
             tmp_path / "coll" / "y.svs", tmp_path / "z.ome.tif"]
    names = output_names(paths)
    assert len(set(names.values())) == len(paths)
    assert names[paths[3]] == "y" and names[paths[4]] == "z"
    assert all(names[p].startswith("x-") for p in paths[:3])
    assert output_names(paths) == names
    # a slide whose own stem is another's hashed name still gets a folder of its own
    lookalike = tmp_path / "third" / f"{names[paths[0]]}.svs"
    more = output_names([*paths, lookalike])
    assert len(set(more.values())) == len(paths) + 1 and more[lookalike] == f"{names[paths[0]]}-2"


def test_an_unreachable_scheduler_is_one_line():
    """Was distributed's traceback ending in 'OSError: Timed out trying to connect'."""
    from wsi_medcam.distributed import client_for

    with (dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
          pytest.raises(WsiMedcamError, match="cannot connect to the dask scheduler at tcp://127.0.0.1:9: Timed out")):
        client_for(scheduler="tcp://127.0.0.1:9")
    with pytest.raises(WsiMedcamError, match="cannot connect to the dask scheduler at nohost:port"):
        client_for(scheduler="nohost:port")
    # and no half-started client is left for the garbage collector to close at some later moment,
    # under the lock every loop runner shares (it deadlocked a later test's SLURMCluster for 900 s)
    import gc

    from distributed import Client

    assert not [c for c in gc.get_objects() if type(c) is Client and c.status not in ("closed", "newly-created")]


def _slurm_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "slurm.yaml"
    path.write_text("queue: nosuchpartition\njobs: 1\ngpus: 0\n")
    return path


def test_slurm_without_sbatch_is_one_line(tmp_path, monkeypatch):
    """Without sbatch the run logged a FileNotFoundError per job and then waited forever for workers."""
    pytest.importorskip("dask_jobqueue")
    from wsi_medcam.distributed import client_for

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(WsiMedcamError, match="--slurm needs SLURM's sbatch on PATH"):
        client_for(slurm=_slurm_yaml(tmp_path))


def test_a_job_slurm_refuses_is_one_line(tmp_path, monkeypatch):
    """A job sbatch refuses (here an unknown partition) failed in dask-jobqueue's background task,
    and the run waited forever: it is now refused before any job is submitted, with sbatch's reason."""
    pytest.importorskip("dask_jobqueue")
    from wsi_medcam.distributed import client_for

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\ncat > /dev/null\necho 'sbatch: error: invalid partition specified: nosuchpartition' >&2\n"
                      "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\nexit 1\n")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ConfigError, match="SLURM refuses the worker job: sbatch: error: Batch job submission failed: "
                                          "Invalid partition name specified"):
        client_for(slurm=_slurm_yaml(tmp_path))
