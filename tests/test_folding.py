"""Batch norms folded into convolutions: same eval outputs on real H&E tiles, and nothing folded
where it would change them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DATA
from wsi_medcam.config import RunConfig
from wsi_medcam.folding import fold_batchnorms
from wsi_medcam.pipeline import load_models

NCT = DATA / "tiles" / "nct-crc-he"


@pytest.fixture(scope="module")
def he_tiles() -> torch.Tensor:
    """The ten NCT-CRC-HE-100K tiles (one per class + one more), (10, 3, 224, 224) float, ImageNet-normalised."""
    paths = sorted(NCT.glob("*.tif"))
    if not paths:
        pytest.skip(f"no H&E tiles in {NCT}")
    import tifffile

    x = torch.from_numpy(np.stack([tifffile.imread(p)[:224, :224, :3] for p in paths])).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def _calibrated(model: nn.Module, tiles: torch.Tensor) -> nn.Module:
    """``model`` in eval mode with batch-norm statistics and affine weights that are not the
    identity: running statistics of real H&E tiles (forward passes in training mode, no weight
    update) and random affine weights, so that a wrong fold shows."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the passes
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        model.train()
        for _ in range(2):
            model(tiles)
    return model.eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_timm_resnet_and_smp_unet_keep_their_outputs_on_real_tiles(he_tiles):
    import segmentation_models_pytorch as smp
    import timm

    torch.manual_seed(0)
    for model in (timm.create_model("resnet18", pretrained=False, num_classes=9),
                  smp.Unet("resnet18", encoder_weights=None, classes=1)):
        model = _calibrated(model, he_tiles)
        with torch.no_grad():
            before = model(he_tiles)
        n = _batchnorms(model)
        assert n > 0
        assert fold_batchnorms(model) == n
        assert _batchnorms(model) == 0
        with torch.no_grad():
            after = model(he_tiles)
        assert torch.allclose(before, after, rtol=1e-4, atol=1e-4 * before.abs().max().item())
        if after.shape[1] == 9:  # the classifier: same calls on every tile
            assert torch.equal(before.argmax(1), after.argmax(1))


def test_the_activations_hooked_by_name_are_unchanged(he_tiles):
    """Activation matching reads modules by their dotted path; folding keeps the paths and values."""
    import timm

    torch.manual_seed(0)
    model = _calibrated(timm.create_model("resnet18", pretrained=False, num_classes=9), he_tiles)

    def activations() -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        handles = [model.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, o))
                   for n in ("act1", "layer1", "layer4")]
        with torch.no_grad():
            model(he_tiles[:2])
        for h in handles:
            h.remove()
        return seen

    before = activations()
    fold_batchnorms(model)
    after = activations()
    for name, value in before.items():
        assert torch.allclose(value, after[name], rtol=1e-4, atol=1e-4 * value.abs().max().item()), name


class _SharedOutput(nn.Module):
    """The convolution's output is read twice: by the BN and by the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _SharedConv(nn.Module):
    """One convolution called twice, each output with its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


class _SharedBN(nn.Module):
    """One BN called after two convolutions: folded into the first, the second would lose it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


class _DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


@pytest.mark.parametrize("model_type", [_SharedOutput, _SharedConv, _SharedBN, _DataDependent])
def test_folds_nothing_where_the_result_would_differ(model_type, he_tiles):
    torch.manual_seed(0)
    model = _calibrated(model_type(), he_tiles[:4])
    with torch.no_grad():
        before = model(he_tiles[:4])
    assert fold_batchnorms(model) == 0
    assert _batchnorms(model) == _batchnorms(model_type())
    with torch.no_grad():
        assert torch.equal(model(he_tiles[:4]), before)


def test_a_batchnorm_in_training_mode_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert fold_batchnorms(model) == 0
    assert isinstance(model[1], nn.BatchNorm2d)


@pytest.mark.parametrize("refine", [0, 2])
def test_load_models_keeps_the_segmenters_batchnorms_for_refinement(bundles, refine):
    """Per-image refinement trains copies of the segmenter, so its copy keeps its batch norms; the
    models that stream every tile are folded either way (a refined run's other tiles are a plain
    run's, exactly)."""
    clf, seg = bundles
    models = load_models(RunConfig(classifier=Path(clf), segmenter=Path(seg), inference={"device": "cpu", "refine": refine}))
    assert _batchnorms(models.classifier.model) == 0 and _batchnorms(models.segmenter.model) == 0
    assert (models.refine_from is not None) == bool(refine)
    if refine:
        classifier, segmenter = models.refine_from
        assert _batchnorms(segmenter.model) > 0 and segmenter.model is not models.segmenter.model
        assert next(classifier.model.parameters()).device.type == "cpu"
