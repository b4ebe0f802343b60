"""Faithfulness metrics on a classifier whose answer is known, and the Grad-CAM baselines on timm models."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from wsi_medcam.medcam import baselines
from wsi_medcam.medcam.baselines import CAM_METHODS, cam_heatmaps, cam_target, vit_reshape_transform
from wsi_medcam.medcam.fills import FILL_KINDS
from wsi_medcam.medcam.metrics import (
    area_fraction,
    binarise_at_area,
    deletion_insertion_auc,
    deletion_insertion_curves,
    iou,
    necessity,
    null_mask_sufficiency,
    pointing_game,
    predict,
    sufficiency,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = 64
SQUARE = (slice(16, 32), slice(16, 32))
EVIDENCE = 4.0  # normalised intensity of the planted square
THRESHOLD = 2.8  # above white glass (≈ 2.3), any flat colour (≤ 2.4) and the blurred square (≈ 1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and oversubscribed OpenMP threads are 30× slower on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class SquareEvidence(nn.Module):
    """Class 1 iff the mean intensity inside ``SQUARE`` exceeds ``THRESHOLD``; nothing else matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, SQUARE[0], SQUARE[1]].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(s), 4 * (s - THRESHOLD)], dim=1)


def region(rows: slice, cols: slice, batch: int) -> torch.Tensor:
    """(batch, SIZE, SIZE) float mask, 1 on ``rows × cols``."""
    m = torch.zeros(batch, SIZE, SIZE)
    m[:, rows, cols] = 1
    return m


@pytest.fixture()
def clf() -> nn.Module:
    return SquareEvidence().eval()


@pytest.fixture()
def x() -> torch.Tensor:
    """Two tiles with the planted square (class 1) and one without it (class 0)."""
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(3, 3, SIZE, SIZE, generator=g)
    x[:2, :, SQUARE[0], SQUARE[1]] += EVIDENCE
    return x


def test_predict(clf, x):
    probs, pred = predict(clf, x)
    assert probs.shape == (3, 2) and np.allclose(probs.sum(1), 1)
    assert pred.tolist() == [1, 1, 0]


def test_train_mode_classifier_is_refused(x):
    with pytest.raises(ValueError, match="eval mode"):
        predict(SquareEvidence(), x)


def test_sufficiency_covering_vs_missing_the_evidence(clf, x):
    g = torch.Generator().manual_seed(1)
    kept = sufficiency(clf, x[:2], region(slice(12, 36), slice(12, 36), 2), FILL_KINDS, mean=MEAN, std=STD, generator=g)
    missed = sufficiency(clf, x[:2], region(slice(40, 60), slice(0, 64), 2), FILL_KINDS, mean=MEAN, std=STD, generator=g)
    assert set(kept) == set(FILL_KINDS)
    for kind in FILL_KINDS:
        assert kept[kind].dtype == bool and kept[kind].tolist() == [True, True], kind
        assert missed[kind].tolist() == [False, False], kind


def test_sufficiency_accepts_numpy_bool_masks_and_explicit_targets(clf, x):
    mask = region(slice(12, 36), slice(12, 36), 3).numpy().astype(bool)
    out = sufficiency(clf, x, mask, ["mean"], mean=MEAN, std=STD, target=[0, 1, 0])
    assert out["mean"].tolist() == [False, True, True]


def test_null_mask_control_exposes_a_fill_that_keeps_the_class(clf, x):
    null = null_mask_sufficiency(clf, x, ["mean", "white", "blur"], mean=MEAN, std=STD)
    # The evidence tiles lose their class to every fill; the empty tile keeps class 0 with no evidence at all.
    for kind in ("mean", "white", "blur"):
        assert null[kind].tolist() == [False, False, True], kind


def test_mask_shape_mismatch_raises(clf, x):
    with pytest.raises(ValueError, match="do not match"):
        sufficiency(clf, x, torch.ones(3, 32, 32), ["mean"], mean=MEAN, std=STD)


def test_necessity_removing_evidence_vs_elsewhere(clf, x):
    hit = necessity(clf, x[:2], region(*SQUARE, 2), "mean", mean=MEAN, std=STD)
    assert np.all(hit["drop"] > 0.9) and hit["flipped"].tolist() == [True, True]
    assert hit["flip_rate"] == 1.0 and hit["mean_drop"] == pytest.approx(hit["drop"].mean())
    away = necessity(clf, x[:2], region(slice(40, 60), slice(40, 60), 2), "white", mean=MEAN, std=STD)
    assert np.allclose(away["drop"], 0, atol=1e-6) and away["flip_rate"] == 0.0


def test_deletion_insertion_true_ranking_beats_reversed(clf, x):
    saliency = x[:2].mean(dim=1)  # the square is the brightest region
    kw = dict(steps=20, mean=MEAN, std=STD)
    del_true, ins_true = deletion_insertion_auc(clf, x[:2], saliency, **kw)
    del_rev, ins_rev = deletion_insertion_auc(clf, x[:2], -saliency, **kw)
    assert del_true.shape == (2,) and np.all((0 <= del_true) & (del_true <= 1))
    assert np.all(del_true < 0.1) and np.all(del_rev > 0.8)
    assert np.all(ins_true > 0.8) and np.all(ins_rev < 0.1)


def test_deletion_insertion_curves_endpoints(clf, x):
    fractions, deletion, insertion = deletion_insertion_curves(clf, x[:2], x[:2].mean(dim=1), steps=4, mean=MEAN, std=STD)
    probs, _ = predict(clf, x[:2])
    p_fill, _ = predict(clf, torch.zeros_like(x[:2]))
    assert fractions.tolist() == [0, 0.25, 0.5, 0.75, 1] and deletion.shape == insertion.shape == (5, 2)
    assert np.allclose(deletion[0], probs[:, 1]) and np.allclose(insertion[-1], probs[:, 1])
    assert np.allclose(deletion[-1], p_fill[:, 1]) and np.allclose(insertion[0], p_fill[:, 1])


def test_tiebreak_orders_pixels_inside_a_binary_mask(clf, x):
    # The binary mask covers rows 0–31 × cols 0–47; raster order alone reaches the square only after 768 px.
    hard = region(slice(0, 32), slice(0, 48), 2)
    soft = 0.1 + 0.5 * hard + 0.3 * region(*SQUARE, 2)
    kw = dict(steps=20, mean=MEAN, std=STD)
    del_raster, ins_raster = deletion_insertion_auc(clf, x[:2], hard, **kw)
    del_soft, ins_soft = deletion_insertion_auc(clf, x[:2], hard, tiebreak=soft, **kw)
    assert np.all(del_soft < del_raster - 0.1)
    assert np.all(ins_soft > ins_raster + 0.1)


@pytest.mark.parametrize("area", [[0.1, 0.37, 0.0, 1.0], 0.25])
def test_binarise_at_area_is_exact_with_ties(area):
    rng = np.random.default_rng(0)
    heat = np.round(rng.random((4, 30, 50)) * 2) / 2  # three levels: massive ties
    heat[2] = 0.0  # a flat Grad-CAM
    out = binarise_at_area(heat, np.asarray(area))
    expected = np.round(np.broadcast_to(area, (4,)) * 1500)
    assert out.dtype == bool and out.shape == heat.shape
    assert np.array_equal(out.reshape(4, -1).sum(1), expected)
    for h, o in zip(heat, out):
        if o.any() and (~o).any():
            assert h[o].min() >= h[~o].max()  # a percentile threshold: never a lower pixel over a higher one
    assert out[2].reshape(-1)[: int(expected[2])].all()  # a flat map keeps the first pixels in raster order
    assert np.array_equal(out, binarise_at_area(torch.as_tensor(heat), torch.as_tensor(area)))


def test_binarise_at_area_selects_the_top_pixels_and_checks_range():
    heat = np.zeros((1, 8, 8))
    heat[0, 2:4, 5:7] = 0.8
    assert np.array_equal(binarise_at_area(heat, [4 / 64])[0], heat[0] > 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binarise_at_area(heat, [1.5])


def test_area_fraction_and_iou():
    a = region(slice(16, 32), slice(16, 32), 1)
    b = region(slice(16, 32), slice(24, 40), 1)
    far = region(slice(50, 60), slice(50, 60), 1)
    empty = torch.zeros(1, SIZE, SIZE)
    assert area_fraction(torch.cat([a, empty])).tolist() == [256 / 4096, 0.0]
    assert area_fraction(a.numpy().astype(bool)).tolist() == [256 / 4096]
    got = iou(torch.cat([a, a, a, empty]), torch.cat([b, a, far, empty]))
    assert got == pytest.approx([128 / 384, 1.0, 0.0, 1.0])


def test_pointing_game_uses_the_first_argmax():
    gt = region(slice(16, 32), slice(16, 32), 4).numpy()
    heat = np.zeros((4, SIZE, SIZE), dtype=np.float32)
    heat[0, 20, 20] = 1  # inside
    heat[1, 50, 50] = 1  # outside
    heat[2, 5, 5] = heat[2, 20, 20] = 1  # tie: the first in raster order is outside
    heat[3, 20, 20] = heat[3, 50, 50] = 1  # tie: the first is inside
    assert pointing_game(heat, gt).tolist() == [True, False, False, True]


# --- Grad-CAM baselines ----------------------------------------------------------------------------


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_each_cam_method_on_a_frozen_resnet(resnet, images, method, monkeypatch, capfd):
    calls = []
    monkeypatch.setattr(baselines, "_call_cam", lambda cam, x, targets, call=baselines._call_cam:
                        calls.append((len(x), cam.batch_size)) or call(cam, x, targets))
    heat = cam_heatmaps(resnet, images, method, None, arch="resnet18", batch_size=1024)
    assert capfd.readouterr().err == ""  # ScoreCAM drew a tqdm bar per image
    # ScoreCAM holds a masked copy per channel of each image in a call: one image at a time
    assert calls == ([(1, 1024)] * 2 if method == "scorecam" else [(2, 1024)])
    assert heat.shape == (2, SIZE, SIZE) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0.5
    assert _hooks(resnet) == 0
    assert not resnet.training and not any(p.requires_grad for p in resnet.parameters())


def test_cam_state_is_restored_on_a_trainable_model_in_train_mode(images):
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).train()
    modes = [m.training for m in model.modules()]
    cam_heatmaps(model, images, "gradcam", [0, 2], arch="resnet18")
    assert [m.training for m in model.modules()] == modes
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert _hooks(model) == 0


def test_cam_batching_targets_and_non_square_input(resnet):
    x = torch.randn(3, 3, SIZE, 96, generator=torch.Generator().manual_seed(2))
    _, pred = predict(resnet, x)
    whole = cam_heatmaps(resnet, x, "gradcam", None, arch="resnet18")
    chunked = cam_heatmaps(resnet, x, "gradcam", pred.tolist(), arch="resnet18", batch_size=2)
    assert whole.shape == (3, SIZE, 96)
    assert np.allclose(whole, chunked, atol=1e-5)
    other = cam_heatmaps(resnet, x, "gradcam", ((pred + 1) % 3).tolist(), arch="resnet18")
    assert not np.allclose(whole, other, atol=1e-3)


def test_cam_rejects_unknown_methods_and_bad_targets(resnet, images):
    with pytest.raises(ValueError, match="gradcam, gradcam\\+\\+, hirescam, layercam, scorecam"):
        cam_heatmaps(resnet, images, "smoothgrad", None, arch="resnet18")
    for bad in ([0], [0, -1], [0, 3]):
        with pytest.raises(ValueError):
            cam_heatmaps(resnet, images, "gradcam", bad, arch="resnet18")
    assert _hooks(resnet) == 0


def test_out_of_range_target_is_not_swallowed_by_the_package(images):
    # grad-cam's __exit__ prints and suppresses IndexError; without num_classes nothing catches it earlier.
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    del model.num_classes
    with pytest.raises(RuntimeError, match="out of bounds"):
        cam_heatmaps(model, images, "gradcam", [0, 7], arch="resnet18")
    assert _hooks(model) == 0


def test_vit_target_and_reshape():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3).eval()
    layers, reshape = cam_target(vit, "vit_tiny_patch16_224")
    assert layers == [vit.blocks[-1].norm1]
    tokens = torch.arange(197.0)[None, :, None].expand(1, 197, 192)
    grid = reshape(tokens)
    assert grid.shape == (1, 192, 14, 14)
    assert grid[0, 0, 0, 0] == 1 and grid[0, 0, 0, 1] == 2 and grid[0, 0, 1, 0] == 15  # class token dropped
    with pytest.raises(ValueError, match="patch grid"):
        reshape(tokens[:, :100])
    heat = cam_heatmaps(vit, torch.randn(1, 3, 224, 224), "gradcam", None, arch="vit_tiny_patch16_224")
    assert heat.shape == (1, 224, 224) and 0 <= heat.min() and heat.max() <= 1
    assert _hooks(vit) == 0


def test_vit_reshape_drops_register_tokens():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, reg_tokens=4)
    assert vit.num_prefix_tokens == 5
    tokens = torch.arange(201.0)[None, :, None].expand(2, 201, 8)
    assert vit_reshape_transform(vit)(tokens)[1, 3, 0, 0] == 5


@pytest.mark.parametrize(
    ("arch", "layer"),
    [
        ("resnet18", "layer4.1"),
        ("convnext_atto", "stages.3"),
        ("mobilenetv2_050", "bn2"),
        ("efficientnet_b0", "bn2"),
        ("mobilenetv3_small_050", "blocks.5"),
        ("densenet121", "features.norm5"),
    ],
)
def test_cam_target_per_architecture(arch, layer):
    model = timm.create_model(arch, pretrained=False, num_classes=3)
    layers, reshape = cam_target(model, arch)
    assert layers == [model.get_submodule(layer)] and reshape is None


def test_cam_target_nhwc_and_unknown():
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3)
    layers, reshape = cam_target(swin, "swin_tiny_patch4_window7_224")
    assert layers == [swin.layers[-1]] and reshape(torch.zeros(1, 7, 7, 768)).shape == (1, 768, 7, 7)
    with pytest.raises(ValueError, match="no Grad-CAM target layer known for 'mine'"):
        cam_target(SquareEvidence(), "mine")


def _small_bundles() -> tuple:
    """Untrained resnet18 classifier and U-Net/resnet18 segmenter bundles for 32-px tiles, in memory."""
    from pathlib import Path

    from wsi_medcam.bundles import Bundle, ClassifierConfig, SegmenterConfig, build_classifier, build_segmenter

    torch.manual_seed(0)
    ccfg = ClassifierConfig(arch="resnet18", class_names=["a", "b"], mpp=0.5, tile_size=32)
    scfg = SegmenterConfig(encoder="resnet18", tile_size=32)
    return Bundle(Path("clf"), ccfg, build_classifier(ccfg).eval(), ""), Bundle(Path("seg"), scfg, build_segmenter(scfg).eval(), "")


def _batch_sizes(*models: nn.Module) -> list[int]:
    """A list that each forward of ``models`` appends its batch size to."""
    seen: list[int] = []
    for model in models:
        model.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    return seen


def test_evaluate_runs_the_models_a_bounded_batch_at_a_time():
    """eval ran each model on every tile at once: a folder of 1,000 tiles would take ~17 GiB of
    U-Net activations in one pass. The models now never see more than FORWARD_BATCH tiles."""
    from wsi_medcam.medcam.evaluate import evaluate
    from wsi_medcam.medcam.metrics import FORWARD_BATCH

    clf, seg = _small_bundles()
    seen = _batch_sizes(clf.model, seg.model)
    n = FORWARD_BATCH + 5
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    report = evaluate(clf, images, segmenter=seg, baselines=(), fills=("mean",), auc_steps=2)
    assert report["tiles"] == n and 0 <= report["methods"]["medcam"]["area"] <= 1
    assert seen and max(seen) <= FORWARD_BATCH


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_explain_and_evaluate_run_on_the_models_device(monkeypatch):
    """explain, eval and run --refine work where the models are (``--device auto`` puts them on a
    GPU): the same predictions and masks as on the CPU, per-image mode's random draws from a
    generator on the GPU, and the masks handed back on the CPU."""
    from wsi_medcam.medcam.evaluate import evaluate
    from wsi_medcam.medcam.explain import PerImageOptions, explain_batch, models_to

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 on both
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    clf, seg = _small_bundles()
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    per_image = PerImageOptions(steps=3, min_steps=1, patience=1)
    runs = {}
    for device in ("cpu", "cuda"):
        models_to(torch.device(device), clf, seg)
        runs[device] = [explain_batch(clf, images, segmenter=seg, fills=("mean", "colour")),
                        explain_batch(clf, images, segmenter=seg, per_image=per_image, fills=("mean",))]
        report = evaluate(clf, images, segmenter=seg, baselines=("gradcam",), fills=("mean", "colour"), auc_steps=2)
        assert set(report["methods"]) == {"medcam", "gradcam"}
    for (cpu_soft, cpu_records), (gpu_soft, gpu_records) in zip(runs["cpu"], runs["cuda"]):
        assert gpu_soft.device.type == "cpu" and gpu_soft.shape == cpu_soft.shape
        assert [r["prediction"] for r in gpu_records] == [r["prediction"] for r in cpu_records]
    torch.testing.assert_close(runs["cuda"][0][0], runs["cpu"][0][0], atol=1e-4, rtol=0)


def test_train_cam_validation_in_batches_gives_the_one_pass_figures():
    """train-cam validated its whole held-out set in one pass on the device (10 % of 10 slides'
    tiles: ~17 GiB); batch by batch, from the host, it gives the same figures."""
    from wsi_medcam.medcam.train import validate

    clf, seg = _small_bundles()
    seg.model.train()
    x = torch.randn(21, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    kwargs = dict(mean=clf.config.mean, std=clf.config.std)
    whole = validate(seg.model, clf.model, x, ["mean", "white"], batch_size=len(x), **kwargs)
    seen = _batch_sizes(seg.model)
    batched = validate(seg.model, clf.model, x, ["mean", "white"], batch_size=8, **kwargs)
    assert seen == [8, 8, 5] and seg.model.training  # and left in train mode, as it was
    assert batched.area == pytest.approx(whole.area) and 0 < whole.area < 1
    assert batched.sufficiency == pytest.approx(whole.sufficiency)
    assert batched.null_mask_keeps == pytest.approx(whole.null_mask_keeps)


def test_evaluate_scores_a_known_explanation():
    """A toy pair with known answers: the classifier says class 1 iff a square is bright, and the
    evidence is the square (soft 0.9) plus a band outside it (soft 0.6, also hard, first in raster
    order). Removing the evidence flips every tile (necessity), the evidence alone keeps the class
    under the mean fill (sufficiency), and the pointing game ranks by the soft mask: it hits the
    square, where the hard mask alone would point at the band."""
    from types import SimpleNamespace

    from wsi_medcam.medcam.evaluate import evaluate

    square = (slice(64, 128), slice(0, 64))
    band = (slice(0, 10), slice(100, 200))

    class Square(nn.Module):
        def forward(self, x):
            s = x[:, :, square[0], square[1]].mean(dim=(1, 2, 3))
            return torch.stack([torch.zeros_like(s), 8 * (s - 1)], 1)

    class Fixed(nn.Module):
        def forward(self, x):
            logits = torch.full((len(x), 1, *x.shape[2:]), -10.0)
            logits[:, :, square[0], square[1]] = 2.2
            logits[:, :, band[0], band[1]] = 0.4
            return logits

    images = np.full((3, 224, 224, 3), 128, np.uint8)
    images[:, square[0], square[1]] = 250
    truth = np.zeros((3, 224, 224), bool)
    truth[:, square[0], square[1]] = True
    config = SimpleNamespace(arch="toy", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), class_names=["plain", "square"])
    classifier = SimpleNamespace(config=config, model=Square())
    segmenter = SimpleNamespace(config=SimpleNamespace(mean=None, std=None), model=Fixed())
    report = evaluate(classifier, images, segmenter=segmenter, baselines=(), gt_masks=truth, fills=("mean",), auc_steps=4)
    medcam = report["methods"]["medcam"]
    assert medcam["necessity_flip_rate"] == 1.0 and medcam["necessity_drop"] > 0.9
    assert medcam["sufficiency"]["mean"] == 1.0 and report["null_mask_keeps"]["mean"] == 0.0
    assert medcam["area"] == pytest.approx((64 * 64 + 10 * 100) / 224**2)
    assert medcam["pointing_game"] == 1.0
    assert medcam["iou"] == pytest.approx(64 * 64 / (64 * 64 + 10 * 100))
