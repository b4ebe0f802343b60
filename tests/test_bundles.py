"""Model bundles: round trips, user checkpoints, and every way a bundle can be wrong."""

from __future__ import annotations

import json
import pickle

import pytest
import timm
import torch

from wsi_medcam.bundles import (
    ClassifierConfig,
    SegmenterConfig,
    import_classifier,
    load_classifier,
    load_segmenter,
    make_segmenter,
)
from wsi_medcam.errors import BundleError

CFG = ClassifierConfig(arch="resnet18", class_names=["a", "b"], mpp=0.5, tile_size=224)


def test_import_pth_state_dict_round_trip(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    ckpt = tmp_path / "model.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    bundle = load_classifier(import_classifier(CFG, tmp_path / "b", weights=ckpt))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(bundle.model(x), model.eval()(x), atol=1e-5)
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["kind"] == "classifier" and cfg["class_names"] == ["a", "b"] and cfg["mpp"] == 0.5
    assert len(bundle.sha256) == 64


def test_segmenter_bundle_outputs_one_logit_channel(tmp_path):
    bundle = load_segmenter(make_segmenter(SegmenterConfig(encoder="resnet18", tile_size=64), tmp_path / "s"))
    with torch.no_grad():
        assert bundle.model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_shape_mismatch_is_one_clear_error(tmp_path):
    wrong = timm.create_model("resnet18", pretrained=False, num_classes=5)
    ckpt = tmp_path / "five.pth"
    torch.save(wrong.state_dict(), ckpt)
    with pytest.raises(BundleError, match=r"shape mismatch.*fc\.(weight|bias)"):
        import_classifier(CFG, tmp_path / "b", weights=ckpt)
    other = timm.create_model("resnet34", pretrained=False, num_classes=2)
    torch.save(other.state_dict(), ckpt)
    with pytest.raises(BundleError, match="unexpected key"):
        import_classifier(CFG, tmp_path / "b", weights=ckpt)


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickled_objects_are_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "evil.pth"
    with open(ckpt, "wb") as fh:
        pickle.dump({"fc.weight": _Evil()}, fh)
    with pytest.raises(BundleError, match="refused"):
        import_classifier(CFG, tmp_path / "b", weights=ckpt)
    assert not (tmp_path / "PWNED").exists()
    full_model = tmp_path / "full.pt"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=2), full_model)
    with pytest.raises(BundleError, match="refused"):
        import_classifier(CFG, tmp_path / "b", weights=full_model)


def test_a_file_that_is_no_checkpoint_says_so(tmp_path):
    """Text, or a slide given by mistake, is not a checkpoint: said in those words (the unpickler's
    message was ': 101' for a text file)."""
    for name, data in (("notes.pth", b"hello\n"), ("slide.pt", b"II*\x00" + bytes(60))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BundleError, match=f"{name}: not a PyTorch checkpoint"):
            import_classifier(CFG, tmp_path / "b", weights=tmp_path / name)


def test_bad_bundles(tmp_path):
    clf = import_classifier(CFG, tmp_path / "clf")
    seg = make_segmenter(SegmenterConfig(encoder="resnet18", tile_size=64), tmp_path / "seg")
    with pytest.raises(BundleError, match="'medcam-segmenter' bundle, expected 'classifier'"):
        load_classifier(seg)
    with pytest.raises(BundleError, match="missing model.safetensors"):
        (tmp_path / "clf2").mkdir()
        (tmp_path / "clf2" / "config.json").write_text((clf / "config.json").read_text())
        load_classifier(tmp_path / "clf2")
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_classifier(tmp_path / "nothing")
    # the architecture in config.json does not match the weights
    cfg = json.loads((clf / "config.json").read_text())
    cfg["arch"] = "resnet34"
    (clf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="do not fit"):
        load_classifier(clf)
    cfg["mpp"] = -1
    (clf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="mpp"):
        load_classifier(clf)
    # a pickle renamed to .safetensors
    (clf / "model.safetensors").write_bytes(pickle.dumps({"a": 1}))
    cfg["mpp"] = 0.5
    (clf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="not a valid safetensors"):
        load_classifier(clf)
