"""The command line: info on real slides, import-classifier, config validation, bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import ROOT, SLIDES, needs_data
from wsi_medcam.cli import app
from wsi_medcam.config import RunConfig
from wsi_medcam.errors import ConfigError

runner = CliRunner()


@needs_data
def test_info_json_on_every_shared_slide():
    result = runner.invoke(app, ["info", str(SLIDES), "--json"])
    # boxes.tiff has an implausible MPP and no override: reported, the others still described
    assert result.exit_code == 1
    docs = {d["path"].split("/")[-1]: d for d in json.loads(result.stdout)}
    assert docs["CMU-1-Small-Region.svs"]["vendor"] == "aperio"
    assert docs["CMU-1-Small-Region.svs"]["associated_images"] == ["label", "macro", "thumbnail"]
    assert docs["OS-1-detail.ome.tif"]["backend"] == "tiffslide"
    assert docs["boxes_0.dcm"]["vendor"] == "dicom"
    assert "boxes_1.dcm" not in docs  # the same DICOM series (its thumbnail instance): one slide, not two
    assert "--mpp" in docs["boxes.tiff"]["error"]


@needs_data
def test_info_table():
    result = runner.invoke(app, ["info", str(SLIDES / "CMU-1-Small-Region.svs")])
    assert result.exit_code == 0
    assert "2220 × 2967" in result.stdout and "metadata" in result.stdout
    # --json is a list also for one slide: a script need not ask how many the glob matched
    result = runner.invoke(app, ["info", str(SLIDES / "CMU-1-Small-Region.svs"), "--json"])
    assert [d["vendor"] for d in json.loads(result.stdout)] == ["aperio"]


def test_wide_tables_are_whole_when_piped(capsys):
    """Piped into a file, rich assumed 80 columns and cut eval's 12-column table to '0.…' cells."""
    from wsi_medcam import cli

    fills = ["mean", "white", "blur"]
    method = {"area": 0.123456, "sufficiency": {f: 0.987 for f in fills}, "necessity_drop": 0.456789,
              "deletion_auc": 0.234567, "insertion_auc": 0.876543, "iou": 0.345678, "pointing_game": 0.75,
              "seconds_per_tile": 1.234567}
    report = {"tiles": 3, "fills": fills, "null_mask_keeps": {f: 0.25 for f in fills},
              "methods": {"medcam-per-image": method, "gradcam++": method}}
    cli.out_console.print(cli.metrics_table(report))
    out = capsys.readouterr().out
    assert "…" not in out
    for cell in ("medcam-per-image", "0.123", "0.457", "0.235", "0.877", "0.346", "0.75", "1.235", "suff white", "pointing"):
        assert cell in out, cell
    assert len([line for line in out.splitlines() if "0.123" in line]) == 2  # one line per method


def test_import_classifier_cli(tmp_path):
    out = tmp_path / "b"
    result = runner.invoke(app, ["import-classifier", "--arch", "resnet18", "--untrained", "--classes", "x,y,z",
                                 "--mpp", "0.5", "--tile-size", "224", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["class_names"] == ["x", "y", "z"]
    result = runner.invoke(app, ["import-classifier", "--arch", "resnet18", "--classes", "x,y",
                                 "--mpp", "0.5", "--tile-size", "224", "-o", str(out)])
    assert result.exit_code == 2 and "exactly one of --weights" in result.output
    result = runner.invoke(app, ["import-classifier", "--arch", "no_such_net", "--untrained", "--classes", "x,y",
                                 "--mpp", "0.5", "--tile-size", "224", "-o", str(out)])
    assert result.exit_code == 2 and "unknown timm architecture 'no_such_net'" in result.output
    assert "Traceback" not in result.output


def test_default_yaml_holds_every_default():
    data = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert RunConfig.from_dict(data) == RunConfig()
    assert data == RunConfig().model_dump(mode="json")


@pytest.mark.parametrize("overrides,field", [
    ({"tiling.overlapp": 3}, "tiling.overlapp: unknown key"),
    ({"tiling.min_tissue": 1.5}, "tiling.min_tissue"),
    ({"inference.batch_size": "many"}, "inference.batch_size"),
    ({"slide.backend": "bioformats"}, "slide.backend"),
    ({"inference.device": "gpu0"}, "inference.device: 'gpu0' is not auto, cpu, cuda or cuda:N"),
    ({"classifier": "c", "inference.refine": 2}, "inference.refine refines Med-CAM masks: it needs a segmenter"),
])
def test_bad_config_is_one_readable_message(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.", 1)):
        RunConfig.from_yaml(None, overrides)


def test_bad_config_file_through_the_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tiling:\n  overlap: -3\n")
    result = runner.invoke(app, ["run", "x.svs", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "tiling.overlap" in result.output and "Traceback" not in result.output


@needs_data
def test_a_cuda_device_that_is_not_there_is_one_line(tmp_path):
    """Refused before any slide is opened, not by torch's first kernel launch with a traceback."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from wsi_medcam.bundles import ClassifierConfig, import_classifier

    clf = import_classifier(ClassifierConfig(arch="resnet18", class_names=["a", "b"], mpp=0.5, tile_size=224),
                            tmp_path / "clf")
    result = runner.invoke(app, ["run", str(SLIDES / "CMU-1-Small-Region.svs"), "--classifier", str(clf),
                                 "-o", str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "--device cuda: no CUDA device here" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_config_and_csv_problems_are_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling: [1, 2\n")
    for args in (["run", "x.svs", "--config", str(bad)], ["train-cam", "--classifier", str(tmp_path), "--tiles",
                                                          str(tmp_path), "--config", str(bad), "-o", str(tmp_path / "o")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert f"config {bad} is not valid YAML at line 2" in result.output and len(result.output.strip().splitlines()) == 1


@needs_data
def test_a_missing_mpp_csv_fails_the_run_once(tmp_path):
    from wsi_medcam.bundles import ClassifierConfig, import_classifier

    clf = import_classifier(ClassifierConfig(arch="resnet18", class_names=["a", "b"], mpp=0.5, tile_size=224),
                            tmp_path / "clf")
    result = runner.invoke(app, ["run", str(SLIDES), "--classifier", str(clf), "-o", str(tmp_path / "out"),
                                 "--mpp-csv", str(tmp_path / "nope.csv")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: cannot read the mpp CSV {tmp_path / 'nope.csv'}: No such file or directory"


@needs_data
def test_info_refuses_an_unknown_backend_once():
    result = runner.invoke(app, ["info", str(SLIDES), "--backend", "bioformats"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --backend bioformats: use auto, openslide or tiffslide"


@needs_data
def test_train_cam_device_is_checked_before_tiles_are_sampled(tmp_path):
    import torch

    from wsi_medcam.bundles import ClassifierConfig, import_classifier

    clf = import_classifier(ClassifierConfig(arch="resnet18", class_names=["a", "b"], mpp=0.5, tile_size=224),
                            tmp_path / "clf")
    common = ["train-cam", "--classifier", str(clf), "--slides", str(SLIDES / "CMU-1-Small-Region.svs"),
              "-o", str(tmp_path / "cam")]
    result = runner.invoke(app, [*common, "--device", "tpu"])
    assert result.exit_code == 2 and "device: 'tpu' is not auto, cpu, cuda or cuda:N" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, [*common, "--device", "cuda"])
        assert result.exit_code == 2 and "--device cuda: no CUDA device here" in result.output
        assert "tiles of" not in result.output  # refused before sampling


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from wsi_medcam.bundles import ClassifierConfig, import_classifier

    return import_classifier(ClassifierConfig(arch="resnet10t", class_names=["a", "b"], mpp=0.5, tile_size=32),
                             tmp_path_factory.mktemp("tiny") / "clf")


def _one_error_line(result, *wanted: str) -> str:
    """The run's single ``error:`` line, after checking its exit status and that it names ``wanted``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(w in lines[0] for w in wanted), result.output
    return lines[0]


def test_bad_explain_and_eval_input_is_one_line_before_any_work(tmp_path, tiny_classifier):
    from PIL import Image

    for folder in ("a", "b"):  # two images named x.png: their outputs would overwrite each other
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32), (200, 100, 150)).save(tmp_path / folder / "x.png")
    common = ["--classifier", str(tiny_classifier), "-o", str(tmp_path / "out")]
    same = runner.invoke(app, ["explain", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), *common, "--per-image",
                               "--steps", "1"])
    _one_error_line(same, "a/x.png", "b/x.png")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    one = [str(tmp_path / "a" / "x.png"), *common, "--per-image"]
    _one_error_line(runner.invoke(app, ["explain", *one, "--preset", "nonsense"]), "unknown preset 'nonsense'", "minimal")
    _one_error_line(runner.invoke(app, ["explain", *one, "--steps", "0"]), "steps")
    # an output whose folder is a file: refused before the evaluation, not after it
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad_out = runner.invoke(app, ["eval", "--classifier", str(tiny_classifier), "--tiles", str(tmp_path / "a"),
                                  "-o", str(blocker / "report.json"), "--baselines", "gradcam"])
    _one_error_line(bad_out, "a-file")
    nothing = runner.invoke(app, ["eval", "--classifier", str(tiny_classifier), "--tiles", str(tmp_path / "a"),
                                  "-o", str(tmp_path / "r.json"), "--baselines", ""])
    _one_error_line(nothing, "nothing to evaluate")
    for command in (["explain", *one], ["eval", "--classifier", str(tiny_classifier), "--tiles", str(tmp_path / "a"),
                                        "-o", str(tmp_path / "r.json")]):
        _one_error_line(runner.invoke(app, [*command, "--device", "tpu"]), "'tpu' is not auto, cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            _one_error_line(runner.invoke(app, [*command, "--device", "cuda"]), "--device cuda: no CUDA device here")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "out").exists()


def test_explain_and_eval_show_their_progress_on_stderr(tmp_path, tiny_classifier):
    """Per-image mode takes minutes a tile on a CPU: explain counts images (in batches of 16), eval
    counts methods, on stderr; the results stay alone on stdout."""
    from PIL import Image

    from wsi_medcam.bundles import SegmenterConfig, make_segmenter

    seg = make_segmenter(SegmenterConfig(encoder="resnet18", tile_size=32), tmp_path / "seg")
    (tmp_path / "tiles").mkdir()
    for i in range(20):
        Image.new("RGB", (32, 32), (200, 100 + i, 150)).save(tmp_path / "tiles" / f"x{i}.png")
    models = ["--classifier", str(tiny_classifier), "--segmenter", str(seg)]
    explained = runner.invoke(app, ["explain", *map(str, sorted((tmp_path / "tiles").glob("*.png"))), *models,
                                    "-o", str(tmp_path / "out")])
    assert explained.exit_code == 0, explained.output
    assert "images" in explained.stderr and "20/20" in explained.stderr
    assert len(explained.stdout.splitlines()) == 20 and "20/20" not in explained.stdout
    evaluated = runner.invoke(app, ["eval", *models, "--tiles", str(tmp_path / "tiles"), "-o", str(tmp_path / "r.json"),
                                    "--baselines", "gradcam"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "gradcam done" in evaluated.stderr and "2/2" in evaluated.stderr


def test_explain_stopped_by_a_full_disk_leaves_whole_files(tmp_path, tiny_classifier, monkeypatch):
    """A rerun of explain that runs out of disk part-way: one error line; every mask it leaves is a
    whole PNG (the earlier run's or the new one's), none cut short, and no temporary files."""
    from PIL import Image

    from wsi_medcam.bundles import SegmenterConfig, make_segmenter

    seg = make_segmenter(SegmenterConfig(encoder="resnet18", tile_size=32), tmp_path / "seg")
    (tmp_path / "tiles").mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (200, 100 + 40 * i, 150)).save(tmp_path / "tiles" / f"x{i}.png")
    command = ["explain", *map(str, sorted((tmp_path / "tiles").glob("*.png"))), "--classifier", str(tiny_classifier),
               "--segmenter", str(seg), "-o", str(tmp_path / "out")]
    assert runner.invoke(app, command).exit_code == 0
    earlier = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert len(earlier) == 9
    save, saved = Image.Image.save, []

    def half_then_full(self, fp, *args, **kwargs):  # the 4th PNG: half its bytes reach the disk
        saved.append(fp)
        save(self, fp, *args, **kwargs)
        if len(saved) == 4:
            data = Path(fp).read_bytes()
            Path(fp).write_bytes(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_then_full)
    _one_error_line(runner.invoke(app, command), "No space left on device")
    monkeypatch.setattr(Image.Image, "save", save)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == sorted(earlier)
    for name in left:
        if name.endswith(".png"):
            Image.open(tmp_path / "out" / name).load()  # a cut-short PNG raises here
    assert (tmp_path / "out" / "x1.mask.png").read_bytes() == earlier["x1.mask.png"]  # the 4th save's target


@pytest.mark.parametrize("command", ["explain", "eval", "train-cam", "train-classifier"])
def test_ctrl_c_in_a_command_is_one_line_of_what_is_kept(command, tmp_path, tiny_classifier, monkeypatch):
    """Ctrl-C in the commands that take minutes: exit status 130 and one line saying what stays
    (typer ended them without a word)."""
    from PIL import Image

    from wsi_medcam import classifier_training
    from wsi_medcam.bundles import SegmenterConfig, make_segmenter
    from wsi_medcam.medcam import evaluate, explain, train

    for name in ("a", "b"):
        (tmp_path / "tiles" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 100, 150)).save(tmp_path / "tiles" / name / "x.png")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    seg = make_segmenter(SegmenterConfig(encoder="resnet18", tile_size=32), tmp_path / "seg")
    clf, out = ["--classifier", str(tiny_classifier)], ["-o", str(tmp_path / "out")]
    args, kept = {
        "explain": ([str(tmp_path / "tiles" / "a" / "x.png"), *clf, "--segmenter", str(seg), *out], "the images explained so far"),
        "eval": ([*clf, "--tiles", str(tmp_path / "tiles"), *out, "--baselines", "gradcam"], "no report written"),
        "train-cam": ([*clf, "--tiles", str(tmp_path / "tiles"), *out, "--device", "cpu"], "resumes from the last checkpoint"),
        "train-classifier": (["--data", str(tmp_path / "tiles"), "--tile-size", "32", *out], "no bundle written"),
    }[command]
    monkeypatch.setattr(explain, "explain_files", ctrl_c)
    monkeypatch.setattr(evaluate, "evaluate", ctrl_c)
    monkeypatch.setattr(train, "train_segmenter", ctrl_c)
    monkeypatch.setattr(classifier_training, "train_classifier", ctrl_c)
    result = runner.invoke(app, [command, *args])
    assert result.exit_code == 130, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and kept in lines[0] and "Traceback" not in result.output, result.output


def test_validation_errors_name_the_field(tmp_path):
    line = _one_error_line(runner.invoke(app, ["make-segmenter", "-o", str(tmp_path / "s"), "--tile-size", "0"]))
    assert "tile_size" in line
    line = _one_error_line(runner.invoke(app, ["import-classifier", "--arch", "resnet10t", "--untrained", "--classes", "a,b",
                                               "--mpp", "0.5", "--tile-size", "8", "-o", str(tmp_path / "c")]))
    assert "tile_size" in line


def test_names_in_brackets_and_colour_codes_reach_the_terminal_as_written(tmp_path):
    """Slide names and messages are text, not rich markup: ``case [red].svs`` keeps its brackets;
    terminal colour codes in a library's message (torch's refusals) are dropped."""
    from wsi_medcam.cli import _error_line

    broken = tmp_path / "case [red].svs"
    broken.write_bytes(b"not a slide")
    result = runner.invoke(app, ["info", str(broken)])
    assert result.exit_code == 1 and "case [red].svs" in result.output, result.output
    assert _error_line(RuntimeError("\x1b[1mWeights only load failed.\x1b[0m\nmore")) == "Weights only load failed."


@needs_data
def test_train_cam_slides_take_folders_globs_and_manifests(tmp_path, tiny_classifier):
    """``--slides`` names slides as ``run`` does (a shell-expanded glob gave 'unexpected extra
    argument'); a manifest's mpp column is the µm/px of slides without one."""
    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("a.svs", "b.svs"):
        (archive / name).symlink_to(SLIDES / "CMU-1-Small-Region.svs")
    config = tmp_path / "cam.yaml"
    config.write_text("steps: 1\nbatch_size: 2\ntiles_per_slide: 3\n")
    common = ["train-cam", "--classifier", str(tiny_classifier), "--config", str(config), "--device", "cpu"]
    for k, slides in enumerate((["--slides", str(archive)], ["--slides", str(archive / "*.svs")],
                                ["--slides", str(archive / "a.svs"), "--slides", str(archive / "b.svs")])):
        result = runner.invoke(app, [*common, *slides, "-o", str(tmp_path / f"cam{k}")])
        assert result.exit_code == 0, result.output
        assert "6 tiles of 32 px" in result.output  # 3 from each slide
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,mpp\n{archive / 'a.svs'},0.25\n")  # the slide's own 0.499 µm/px stays
    result = runner.invoke(app, [*common, "--slides", str(manifest), "-o", str(tmp_path / "cam-manifest")])
    assert result.exit_code == 0 and "3 tiles of 32 px" in result.output, result.output
    result = runner.invoke(app, [*common, "--slides", str(tmp_path / "none" / "*.svs"), "-o", str(tmp_path / "x")])
    assert _one_error_line(result, "no slides matched")
    config.write_text("steps: 1\nencoder: resnet10t\n")  # a timm name, not an smp encoder: refused before sampling
    result = runner.invoke(app, [*common, "--slides", str(archive), "-o", str(tmp_path / "y")])
    assert "tiles of" not in result.output and _one_error_line(result, "encoder", "resnet10t", "e.g. resnet18")
