"""Inputs of the bundle-writing and training commands: what they must refuse, and what they must leave alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import save_file
from typer.testing import CliRunner

from wsi_medcam import classifier_training
from wsi_medcam.bundles import (
    Bundle,
    ClassifierConfig,
    SegmenterConfig,
    import_classifier,
    load_classifier,
    load_segmenter,
    make_segmenter,
)
from wsi_medcam.classifier_training import train_classifier
from wsi_medcam.cli import app
from wsi_medcam.errors import BundleError
from wsi_medcam.medcam.train import CamTrainConfig, train_segmenter

runner = CliRunner()
TILE = 64
CLF = ClassifierConfig(arch="resnet10t", class_names=["a", "b"], mpp=0.5, tile_size=TILE)


@pytest.fixture(scope="module")
def tiles(cmu_pixels) -> np.ndarray:
    """Eight 64-px tiles of real H&E: a 2×4 block of tissue from CMU-1-Small-Region."""
    block = cmu_pixels[1500 : 1500 + 2 * TILE, 1000 : 1000 + 4 * TILE]
    return block.reshape(2, TILE, 4, TILE, 3).transpose(0, 2, 1, 3, 4).reshape(-1, TILE, TILE, 3).copy()


LABELS = np.array([0, 1] * 4)


def test_save_bundle_replaces_an_earlier_bundle_and_nothing_else(tmp_path, monkeypatch):
    cfg = SegmenterConfig(encoder="resnet18", tile_size=TILE)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match=r"precious exists and is not a bundle \(it holds notes\.txt\): refusing"):
        make_segmenter(cfg, precious)
    a_file = tmp_path / "a-file"
    a_file.write_text("mine too")
    with pytest.raises(BundleError, match=r"a-file exists and is not a bundle \(it is a file\)"):
        make_segmenter(cfg, a_file)
    result = runner.invoke(app, ["make-segmenter", "-o", str(precious), "--tile-size", str(TILE)])
    assert result.exit_code == 2 and "refusing to overwrite it" in result.output and "Traceback" not in result.output
    monkeypatch.chdir(precious)
    with pytest.raises(BundleError, match="not a bundle"):
        make_segmenter(cfg, Path("."))
    assert [p.name for p in precious.iterdir()] == ["notes.txt"] and a_file.read_text() == "mine too"
    # an earlier bundle is replaced, and nothing temporary is left beside it
    make_segmenter(cfg, tmp_path / "seg")
    make_segmenter(SegmenterConfig(encoder="resnet18", tile_size=2 * TILE), tmp_path / "seg")
    assert load_segmenter(tmp_path / "seg").config.tile_size == 2 * TILE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "precious", "seg"]


def _classifier(root: Path, seed: int, tile_size: int) -> Bundle:
    torch.manual_seed(seed)
    return load_classifier(import_classifier(CLF.model_copy(update={"tile_size": tile_size}), root / f"clf{seed}"))


def test_train_cam_resumes_only_a_checkpoint_of_the_same_classifier(tmp_path, tiles):
    small = np.ascontiguousarray(tiles[:, :32, :32])  # 32 px: each training step takes a quarter of the time
    first, other = _classifier(tmp_path, 0, 32), _classifier(tmp_path, 1, 32)
    out = tmp_path / "cam"

    def cfg(steps: int) -> CamTrainConfig:
        return CamTrainConfig(steps=steps, batch_size=2, checkpoint_every=1, device="cpu")

    train_segmenter(first, small, cfg(1), out)
    with pytest.raises(BundleError, match=rf"checkpoint was made for another classifier.*classifier_sha256 is "
                                          rf"{first.sha256}, now {other.sha256}; choose a new -o or delete"):
        train_segmenter(other, small, cfg(2), out)
    with pytest.raises(BundleError, match="its tile_size is 32, now 64"):
        train_segmenter(first, tiles, cfg(2), out)
    _, summary = train_segmenter(first, small, cfg(2), out)  # the same classifier and tiles: resumed
    assert summary["steps"] == 2
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]


def test_train_cam_killed_while_checkpointing_resumes_from_a_whole_checkpoint(tmp_path, tiles, monkeypatch):
    """Killed after writing step 3's weights but before its optimizer state (a job's time limit):
    the checkpoint still names step 2's weights, unchanged, and the resumed run logs each step once
    (step 3, logged before the kill, is run and logged again)."""
    from safetensors.torch import load_file

    from wsi_medcam.medcam import train

    small = np.ascontiguousarray(tiles[:, :32, :32])
    clf, out = _classifier(tmp_path, 0, 32), tmp_path / "cam"
    cfg = {"batch_size": 2, "checkpoint_every": 1, "val_every": 100, "device": "cpu"}
    train_segmenter(clf, small, CamTrainConfig(steps=2, **cfg), out)
    ckpt = out / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    at_step_2 = load_file(str(ckpt / state["weights"]))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while checkpointing")

    with monkeypatch.context() as patch:
        patch.setattr(train.torch, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            train_segmenter(clf, small, CamTrainConfig(steps=3, **cfg), out)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2
    for name, tensor in load_file(str(ckpt / state["weights"])).items():
        assert torch.equal(tensor, at_step_2[name]), name
    _, summary = train_segmenter(clf, small, CamTrainConfig(steps=4, **cfg), out)
    assert summary["steps"] == 4
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer-4.pt", "segmenter-4.safetensors", "state.json"]
    # a checkpoint of the layout before names had steps (one segmenter.safetensors, one optimizer.pt,
    # state.json naming neither) is resumed, and its files go with the next checkpoint
    (ckpt / "segmenter-4.safetensors").rename(ckpt / "segmenter.safetensors")
    (ckpt / "optimizer-4.pt").rename(ckpt / "optimizer.pt")
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k not in ("weights", "optimizer")}))
    _, summary = train_segmenter(clf, small, CamTrainConfig(steps=5, **cfg), out)
    assert summary["steps"] == 5
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer-5.pt", "segmenter-5.safetensors", "state.json"]


def test_train_cam_config_refuses_unknown_or_bad_loss_weights(tmp_path):
    with pytest.raises(ValidationError, match=r"weights\.aera: unknown loss weight, expected one of act, ce"):
        CamTrainConfig(weights={"aera": 5})
    with pytest.raises(ValidationError, match=r"weights\.area\s+Input should be a valid number"):
        CamTrainConfig(weights={"area": "lots"})
    with pytest.raises(ValidationError, match=r"weights\.area: Input should be greater than or equal to 0"):
        CamTrainConfig(weights={"area": -1})
    weights = CamTrainConfig(preset="minimal", weights={"area": 5}).loss_weights()
    assert weights.area == 5 and weights.tv == 100  # the rest from the preset
    config = tmp_path / "c.yaml"
    config.write_text("weights: {aera: 5}\n")
    result = runner.invoke(app, ["train-cam", "--classifier", str(tmp_path / "clf"), "--tiles", str(tmp_path),
                                 "-o", str(tmp_path / "cam"), "--config", str(config)])
    assert result.exit_code == 2 and "weights.aera: unknown loss weight" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_train_classifier_weights_must_fit_except_the_head(tmp_path, tiles):
    other_arch = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False, num_classes=2).state_dict(), str(other_arch))
    with pytest.raises(BundleError, match=r"resnet18\.safetensors: weights do not fit the architecture \("):
        train_classifier(tiles, LABELS, CLF, epochs=1, init_weights=other_arch)
    # the same architecture made for five classes: its backbone is loaded, the head is new
    five = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    torch.save(five.state_dict(), tmp_path / "five.pth")
    model = train_classifier(tiles, LABELS, CLF, epochs=1, lr=1e-12, init_weights=tmp_path / "five.pth").model
    assert model.fc.out_features == 2
    own, loaded = dict(model.named_parameters()), dict(five.named_parameters())
    assert all(torch.allclose(own[k], loaded[k], atol=1e-6) for k in loaded if not k.startswith("fc."))


def test_val_fraction_zero_holds_out_nothing(tmp_path, tiles, monkeypatch):
    trained_on: list[int] = []
    augment = classifier_training.augment
    monkeypatch.setattr(classifier_training, "augment", lambda x, gen: trained_on.append(len(x)) or augment(x, gen))
    result = train_classifier(tiles, LABELS, CLF, epochs=1, batch_size=4, val_fraction=0)
    assert sum(trained_on) == len(tiles) and math.isnan(result.val_accuracy)
    # the command records no validation accuracy (null), not 0.0 on one held-out tile
    for i, tile in enumerate(tiles):
        folder = tmp_path / "data" / "ab"[LABELS[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile).save(folder / f"t{i}.png")
    result = runner.invoke(app, ["train-classifier", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "clf"),
                                 "--arch", "resnet10t", "--tile-size", str(TILE), "--epochs", "1", "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["val_accuracy"] is None and config["train_tiles"] == len(tiles)
