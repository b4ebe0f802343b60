"""The Med-CAM loss terms, layer presets and objective, on hand-made tensors and small untrained models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from pydantic import ValidationError

from wsi_medcam.medcam.fills import make_fill
from wsi_medcam.medcam.layers import ActivationRecorder, LayerSpec, deep_only, layer_preset
from wsi_medcam.medcam.loss import (
    WEIGHT_PRESETS,
    LossWeights,
    MedCamObjective,
    activation_loss,
    area_loss,
    binarisation_loss,
    ce_loss,
    cosine_distance,
    kl_loss,
    necessity_loss,
    oracle_losses,
    random_fill,
    robustness_loss,
    std_mse,
    straight_through,
    tv_loss,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _tv_reference(a: np.ndarray) -> float:
    """8-neighbour TV by explicit loops over the pixel pairs of one (H, W) image."""
    h, w = a.shape
    pairs = {"h": [], "v": [], "d": [], "a": []}
    for i in range(h):
        for j in range(w):
            if j + 1 < w:
                pairs["h"].append(abs(a[i, j + 1] - a[i, j]))
            if i + 1 < h:
                pairs["v"].append(abs(a[i + 1, j] - a[i, j]))
            if i + 1 < h and j + 1 < w:
                pairs["d"].append(abs(a[i + 1, j + 1] - a[i, j]))
                pairs["a"].append(abs(a[i + 1, j] - a[i, j + 1]))
    mean = {k: float(np.mean(v)) for k, v in pairs.items()}
    return mean["h"] + mean["v"] + (mean["d"] + mean["a"]) / math.sqrt(2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP wake-up stalls (~10 ms per op on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=3).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _meta_model(arch: str) -> torch.nn.Module:
    """A timm model on the meta device: module names and shapes only, no memory, no weights."""
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False)


def _objective(model: torch.nn.Module, **weights: float) -> MedCamObjective:
    return MedCamObjective(model, layer_preset(model, "resnet18"), LossWeights(**weights), mean=MEAN, std=STD)


def _mask_logits(shape: tuple[int, ...] = (2, 1, 64, 64), seed: int = 2) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


# ------------------------------------------------------------------------------------------ priors


def test_tv_constant_checkerboard_and_half_split():
    h, w = 6, 8
    const = torch.full((2, 1, h, w), 0.7)
    checker = torch.tensor((np.indices((h, w)).sum(0) % 2), dtype=torch.float32).view(1, 1, h, w)
    half = torch.zeros(1, 1, h, w)
    half[..., w // 2:] = 1
    assert tv_loss(const).item() == 0
    assert tv_loss(checker).item() == pytest.approx(2.0)
    assert tv_loss(checker).item() == pytest.approx(_tv_reference(checker[0, 0].numpy()))
    assert tv_loss(half).item() == pytest.approx((1 + math.sqrt(2)) / (w - 1))
    assert tv_loss(half).item() == pytest.approx(_tv_reference(half[0, 0].numpy()))
    rand = torch.rand(1, 1, 5, 7, generator=torch.Generator().manual_seed(0))
    assert tv_loss(rand).item() == pytest.approx(_tv_reference(rand[0, 0].numpy()), rel=1e-5)


def test_area_and_binarisation_on_known_mask():
    p = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]])
    assert area_loss(p).item() == pytest.approx(0.4375)
    assert binarisation_loss(p).item() == pytest.approx((0.25 + 0.1875) / 4)
    assert binarisation_loss(torch.tensor([[[[0.0, 1.0]]]])).item() == 0


def test_straight_through_is_hard_forward_identity_backward():
    p = torch.tensor([[[[0.2, 0.5, 0.51, 0.9]]]], requires_grad=True)
    m = straight_through(p)
    assert torch.equal(m.detach(), torch.tensor([[[[0.0, 0.0, 1.0, 1.0]]]]))
    w = torch.tensor([[[[1.0, -2.0, 3.0, 0.5]]]])
    (m * w).sum().backward()
    assert torch.allclose(p.grad, w)


# ----------------------------------------------------------------------------------- class keeping


def test_kl_zero_for_identical_logits_and_scaled_by_t_squared():
    a = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
    b = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, -1.0]])
    assert kl_loss(a, a).item() == pytest.approx(0, abs=1e-7)
    assert kl_loss(a, a + 5.0).item() == pytest.approx(0, abs=1e-6)  # softmax is shift-invariant
    for T in (1.0, 2.0, 4.0):
        pa = torch.softmax(a / T, 1).numpy()
        pb = torch.softmax(b / T, 1).numpy()
        manual = float(np.mean(np.sum(pa * np.log(pa / pb), axis=1)))
        assert manual > 0
        assert kl_loss(a, b, T).item() == pytest.approx(T**2 * manual, rel=1e-5)


def test_ce_and_necessity_hinge():
    logits = torch.tensor([[2.0, 0.0]])
    assert ce_loss(logits, torch.tensor([0])).item() == pytest.approx(math.log(1 + math.exp(-2)))
    z_x, target = torch.tensor([[3.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 0])
    removed = torch.tensor([[2.5, 0.0], [1.0, 0.0]])  # drops of 0.5 and 2.0
    assert necessity_loss(z_x, removed, target, margin=1.0).item() == pytest.approx(0.25)
    assert necessity_loss(z_x, removed, target, margin=0.0).item() == 0


# ----------------------------------------------------------------------------- activation distances


def test_cosine_distance_identical_negated_orthogonal():
    a = torch.randn(2, 5, 4, 3)
    a[:, :, 0, 0] = 0  # all-zero vectors, as after a ReLU: identical, so distance 0
    assert cosine_distance(a, a.clone()).item() == pytest.approx(0, abs=1e-6)
    b = torch.randn(2, 5, 4, 3)
    assert cosine_distance(b, -b).item() == pytest.approx(2, abs=1e-6)
    tokens = torch.randn(2, 7, 6)
    assert cosine_distance(tokens, tokens).item() == pytest.approx(0, abs=1e-6)
    assert cosine_distance(tokens, -tokens).item() == pytest.approx(2, abs=1e-6)
    e1, e2 = torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)
    e1[:, 0], e2[:, 1] = 1, 1
    assert cosine_distance(e1, e2).item() == pytest.approx(1)
    # per-location over channels: rescaling one location does not change the distance
    c = b.clone()
    c[:, :, 1, 1] *= 7
    assert cosine_distance(b, c).item() == pytest.approx(0, abs=1e-6)


def test_cosine_distance_gradient_finite_at_zero_vector():
    a = torch.zeros(1, 3, 2, 2, requires_grad=True)
    cosine_distance(a, torch.randn(1, 3, 2, 2)).backward()
    assert torch.isfinite(a.grad).all()


def test_std_mse_invariant_to_per_channel_affine():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g)
    scale = torch.tensor([0.5, 2.0, 3.0, 1.5]).view(1, 4, 1, 1)
    shift = torch.tensor([-1.0, 4.0, 0.0, 10.0]).view(1, 4, 1, 1)
    base = std_mse(a, b).item()
    assert base > 0.5
    assert std_mse(a * scale + shift, b).item() == pytest.approx(base, rel=1e-4)
    assert std_mse(a, a * scale + shift).item() == pytest.approx(0, abs=1e-5)
    t = torch.randn(2, 9, 4, generator=g)  # tokens: channels last
    assert std_mse(t, t * torch.tensor([2.0, 0.3, 5.0, 1.0]) - 3).item() == pytest.approx(0, abs=1e-5)


def test_activation_loss_weights_layers():
    a = torch.randn(1, 3, 4, 4)
    specs = [LayerSpec("s", 2.0, "cosine"), LayerSpec("d", 3.0, "std_mse"), LayerSpec("t", 5.0, "cosine", True)]
    tok = torch.randn(1, 6, 3)
    acts_x = {"s": a, "d": a, "t": tok}
    acts_e = {"s": -a, "d": a, "t": -tok}
    assert activation_loss(acts_x, acts_e, specs).item() == pytest.approx(2 * 2 + 0 + 5 * 2, abs=1e-5)


# ---------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize(("arch", "names"), [
    ("resnet18", ["act1", "layer1", "layer2", "layer3", "layer4"]),
    ("convnext_atto", ["stages.0", "stages.1", "stages.2", "stages.3"]),
    ("mobilenetv2_100", ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]),
    ("vit_tiny_patch16_224", ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]),
    ("efficientnet_b0", ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]),
])
def test_layer_presets_name_existing_modules(arch, names):
    model = _meta_model(arch)
    specs = layer_preset(model, arch)
    assert [s.name for s in specs] == names
    for s in specs:
        model.get_submodule(s.name)
    weights = [s.weight for s in specs]
    assert weights == sorted(weights) and weights[-1] > weights[0]
    tokens = arch.startswith("vit")
    assert all(s.tokens == tokens for s in specs)


def test_resnet_preset_matches_paper():
    specs = layer_preset(_meta_model("resnet18"), "resnet18")
    assert [s.weight for s in specs] == [1, 2, 2, 4, 8]
    assert [s.distance for s in specs] == ["cosine", "cosine", "std_mse", "std_mse", "std_mse"]
    assert [s.name for s in deep_only(specs)] == ["layer2", "layer3", "layer4"]


def test_vit_base_preset_and_deep_only():
    specs = layer_preset(_meta_model("vit_base_patch16_224"), "vit_base_patch16_224")
    assert [s.name for s in specs] == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert all(s.distance == "cosine" and s.tokens for s in specs)
    assert [s.name for s in deep_only(specs)] == ["blocks.8", "blocks.11"]


def test_generic_rule_detects_channels_last_maps():
    specs = layer_preset(_meta_model("swin_tiny_patch4_window7_224"), "swin_tiny_patch4_window7_224")
    assert [s.name for s in specs] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert all(s.tokens for s in specs)  # Swin stages are (B, H, W, C)
    assert [s.distance for s in specs] == ["cosine", "cosine", "std_mse", "std_mse"]


def test_generic_rule_on_isotropic_model_picks_depth_quarters():
    specs = layer_preset(_meta_model("vit_tiny_patch16_224"), "some_unknown_vit")
    assert [s.name for s in specs] == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert [s.weight for s in specs] == [1, 2, 4, 8]
    assert all(s.tokens for s in specs)
    assert [s.distance for s in specs] == ["cosine", "cosine", "std_mse", "std_mse"]


def test_preset_for_wrong_model_raises():
    with pytest.raises(ValueError, match="no module"):
        layer_preset(_meta_model("mobilenetv2_100"), "resnet18")


def test_activation_recorder_stores_latest_and_removes_hooks(resnet):
    specs = layer_preset(resnet, "resnet18")
    with ActivationRecorder(resnet, specs) as rec:
        resnet(torch.randn(1, 3, 64, 64))
        resnet(torch.randn(3, 3, 32, 32))
        assert rec.outputs["layer1"].shape == (3, 64, 8, 8)
        assert len(resnet.get_submodule("layer4")._forward_hooks) == 1
    assert all(len(m._forward_hooks) == 0 for m in resnet.modules())
    with pytest.raises(RuntimeError, match="boom"), ActivationRecorder(resnet, specs):
        raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in resnet.modules())


# --------------------------------------------------------------------------------------- weights


def test_loss_weights_groups_and_presets():
    assert LossWeights(min=1.5).scaled()["area"] == 150
    assert LossWeights(am=2).scaled() == {**LossWeights().scaled(), "act": 20, "ce": 30, "kl": 10}
    assert LossWeights().scaled() == {"act": 10, "ce": 15, "kl": 5, "area": 100, "bin": 1, "tv": 500,
                                      "rob": 100, "nec": 0}
    bach, ham = WEIGHT_PRESETS["paper-bach-vit"].scaled(), WEIGHT_PRESETS["paper-ham-convnext"].scaled()
    assert (bach["act"], bach["area"], bach["rob"]) == pytest.approx((10, 100, 10))
    assert (ham["act"], ham["area"], ham["rob"]) == pytest.approx((10, 150, 20))
    assert WEIGHT_PRESETS["cam-vit"].scaled()["tv"] == 57
    with pytest.raises(ValidationError):
        LossWeights(areaa=3)
    with pytest.raises(ValidationError):
        LossWeights(area=-1)
    with pytest.raises(ValidationError):
        LossWeights().area = 5  # type: ignore[misc]


# ------------------------------------------------------------------------------------- objective


def test_reference_has_no_grad_and_classifier_gets_no_gradients(resnet, x):
    obj = _objective(resnet)
    obj.train()
    assert not resnet.training  # the classifier stays in eval mode
    ref = obj.reference(x)
    assert not ref.logits_x.requires_grad and all(not a.requires_grad for a in ref.acts_x.values())
    assert torch.equal(ref.target, resnet(x).argmax(1))
    logits = _mask_logits()
    total, terms = obj(x, logits, ref, generator=torch.Generator().manual_seed(0))
    total.backward()
    assert all(p.grad is None for p in resnet.parameters())
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert set(terms) == {"act", "ce", "kl", "area", "bin", "tv", "rob", "total"}
    assert terms["total"] == pytest.approx(sum(LossWeights().scaled()[k] * v for k, v in terms.items() if k != "total"),
                                           rel=1e-5)
    assert torch.equal(obj.reference(x, target=2).target, torch.tensor([2, 2]))


def test_robustness_gradient_reaches_mask(resnet, x):
    ref_logits = resnet(x).detach()
    logits = _mask_logits()
    m = straight_through(torch.sigmoid(logits))
    robustness_loss(resnet, x, m, ref_logits, generator=torch.Generator().manual_seed(0)).backward()
    assert logits.grad.abs().sum() > 0
    # the notebook's bug: a thresholded (detached) copy of the mask trains nothing
    logits_bug = _mask_logits()
    hard = (torch.sigmoid(logits_bug) > 0.5).float()
    loss = robustness_loss(resnet, x, hard, ref_logits, kind="ce", generator=torch.Generator().manual_seed(0))
    assert not loss.requires_grad and logits_bug.grad is None


def test_rob_weight_changes_total_gradient(resnet, x):
    def grad(**w: float) -> torch.Tensor:
        obj = _objective(resnet, **w)
        logits = _mask_logits()
        total, _ = obj(x, logits, obj.reference(x), generator=torch.Generator().manual_seed(0))
        total.backward()
        return logits.grad

    g0, g1, g2 = grad(rob=0), grad(), grad(robust=2.0)
    assert not torch.allclose(g0, g1)
    assert not torch.allclose(g1, g2)
    # rob is linear in its weight: g(2·rob) − g(rob) = g(rob) − g(0)
    assert torch.allclose(g2 - g1, g1 - g0, atol=1e-5 * g1.abs().max().item())


@pytest.mark.parametrize(("weights", "calls"), [({"nec": 0}, 2), ({"nec": 1}, 3), ({"rob": 0}, 1)])
def test_forward_count_per_step(resnet, x, weights, calls):
    obj = _objective(resnet, **weights)
    ref = obj.reference(x)
    count = []
    handle = resnet.register_forward_hook(lambda *_: count.append(1))
    try:
        _, terms = obj(x, _mask_logits(), ref)
    finally:
        handle.remove()
    assert len(count) == calls
    assert ("nec" in terms) == (weights.get("nec", 0) > 0)


def test_oracle_full_mask_scores_area_only(resnet, x):
    obj = _objective(resnet)
    evidence = torch.zeros(1, 1, 64, 64)
    evidence[..., 16:32, 16:32] = 1
    out = oracle_losses(obj, x, {"full": torch.ones(1, 1, 64, 64), "empty": torch.zeros(1, 1, 64, 64),
                                 "evidence": evidence})
    full = out["full"]
    assert full["terms"]["act"] == pytest.approx(0, abs=1e-4)
    assert full["terms"]["kl"] == pytest.approx(0, abs=1e-5)
    assert full["keeps_class"] == 1.0 and full["area"] == 1.0
    assert full["total"] == pytest.approx(100 + 15 * full["terms"]["ce"], rel=1e-4)
    assert out["empty"]["area"] == 0 and out["empty"]["terms"]["act"] > 0
    assert out["evidence"]["area"] == pytest.approx(1 / 16)
    assert out["evidence"]["weighted"]["tv"] == pytest.approx(500 * out["evidence"]["terms"]["tv"])


def test_vit_token_objective():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=64).eval()
    obj = MedCamObjective(vit, layer_preset(vit, "vit_tiny_patch16_224"), LossWeights(), mean=MEAN, std=STD)
    xv = torch.randn(1, 3, 64, 64)
    ref = obj.reference(xv)
    assert ref.acts_x["blocks.11"].shape == (1, 17, 192)  # 4×4 patches + class token
    out = oracle_losses(obj, xv, {"full": torch.ones(1, 1, 64, 64), "empty": torch.zeros(1, 1, 64, 64)})
    assert out["full"]["terms"]["act"] == pytest.approx(0, abs=1e-4)
    assert out["empty"]["terms"]["act"] > 0.01


def test_threshold_noise_flips_uncertain_pixels_only_and_keeps_the_identity_gradient():
    from wsi_medcam.medcam.loss import straight_through

    p = torch.tensor([0.05, 0.45, 0.55, 0.95]).repeat(2000, 1).requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    m = straight_through(p, 0.25, gen)
    assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
    kept = m.detach().mean(dim=0)
    assert kept[0] == 0 and kept[3] == 1  # farther than the jitter from 0.5: never flipped
    assert 0.2 < kept[1] < 0.45 and 0.55 < kept[2] < 0.8  # near 0.5: kept with probability ≈ 0.5 + (p − 0.5) / 0.5
    w = torch.randn_like(p)
    (m * w).sum().backward()
    assert torch.equal(p.grad, w)
    assert torch.equal(straight_through(p.detach()), (p.detach() > 0.5).float())


# -------------------------------------------------------------- what the terms are given (mutation audit)


def _rgb(fill: torch.Tensor) -> torch.Tensor:
    """A normalised fill back in 0–1 RGB."""
    return fill * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_fills_are_the_colours_they_are_named_after():
    """'white' came out as (0.51, 0.48, 0.44) under a mutant and no test saw it: sufficiency tests use
    a classifier indifferent to every fill. White is a default certification fill of every run."""
    x = torch.zeros(4, 3, 40, 40)
    x[:, :, :, 20:] = 2.0  # a vertical edge
    x[:, :, 20:, :] += 1.0  # and a horizontal one
    assert torch.equal(make_fill("mean", x, mean=MEAN, std=STD), torch.zeros_like(x))
    assert torch.allclose(_rgb(make_fill("white", x, mean=MEAN, std=STD)), torch.ones_like(x), atol=1e-6)
    colour = _rgb(make_fill("colour", x, mean=MEAN, std=STD, generator=torch.Generator().manual_seed(0)))
    assert colour.min() >= 0 and colour.max() <= 1  # a flat RGB colour per tile, in range
    assert torch.equal(colour, colour[:, :, :1, :1].expand_as(colour)) and colour[:, :, 0, 0].std(0).min() > 0.05
    uniform = make_fill("uniform", x, mean=MEAN, std=STD, generator=torch.Generator().manual_seed(0))
    assert uniform.min() >= -1 and uniform.max() <= 1 and uniform.min() < -0.99 and uniform.max() > 0.99
    blur = make_fill("blur", x, mean=MEAN, std=STD, blur_sigma_px=3.0)[0, 0]
    # both edges are spread, each across its own axis, and the total is kept
    assert 0.2 < blur[5, 19] < blur[5, 20] < 1.8 and 0.1 < blur[19, 5] < blur[20, 5] < 0.9
    assert blur.mean() == pytest.approx(float(x[0, 0].mean()), rel=0.02)


def test_random_fill_draws_each_kind_a_third_of_the_time():
    fills = random_fill(torch.zeros(3000, 1, 8, 8), generator=torch.Generator().manual_seed(0)).flatten(1)
    zeros = (fills == 0).all(1)
    noise = fills.abs().amax(1) > 1  # 64 normal draws: some beyond 1 but for 1e-11 of tiles
    uniform = ~zeros & ~noise
    for kind in (zeros, noise, uniform):
        assert kind.float().mean() == pytest.approx(1 / 3, abs=0.04)


def test_cosine_distance_of_a_silenced_location_is_not_a_match():
    """Zero activation (masked-out ReLU) against a positive one is orthogonal, distance 1; only two
    zero vectors count as identical."""
    a, b = torch.zeros(1, 4, 1, 1), torch.ones(1, 4, 1, 1)
    assert cosine_distance(a, b).item() == pytest.approx(1)
    assert cosine_distance(b, a).item() == pytest.approx(1)


def test_every_preset_has_the_published_weights():
    """The method document's sets (act/CE/KL/area/bin/tv/rob) and the presets built on them; T = 2."""
    doc = {"cam-efficientnet": (1, 4, 0.4, 15, 0.3, 15, 6), "cam-vit": (4.5, 15, 5, 55, 1.5, 57, 45),
           "notebook": (10, 15, 5, 100, 1, 500, 100), "paper-bach-vit": (10, 15, 5, 100, 1, 500, 10),
           "paper-ham-convnext": (10, 15, 5, 150, 1.5, 750, 20), "minimal": (2, 15, 5, 300, 1, 100, 20)}
    assert set(doc) == set(WEIGHT_PRESETS)
    for name, values in doc.items():
        scaled = WEIGHT_PRESETS[name].scaled()
        assert [scaled[k] for k in ("act", "ce", "kl", "area", "bin", "tv", "rob")] == pytest.approx(values), name
        assert scaled["nec"] == 0 and WEIGHT_PRESETS[name].temperature == 2 and WEIGHT_PRESETS[name].rob_kind == "kl"


def test_the_objective_gives_each_term_what_the_method_says(resnet, x):
    """TV acts on the soft p (not the hard mask); the evidence pass sees m·x + (1−m)·b and the
    necessity pass (1−m)·x + m·b, with m the hard mask."""
    obj = _objective(resnet, nec=1, rob=0)
    ref = obj.reference(x)
    p = torch.sigmoid(_mask_logits()).detach()
    hard = (p > 0.5).float()
    seen: list[torch.Tensor] = []
    handle = resnet.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    try:
        _, terms, _ = obj.evaluate(x, p, ref)
    finally:
        handle.remove()
    assert terms["tv"].item() == pytest.approx(tv_loss(p).item()) and tv_loss(p) < tv_loss(hard)
    assert terms["area"].item() == pytest.approx(p.mean().item())
    assert len(seen) == 2  # mean fill: b = 0
    assert torch.allclose(seen[0], x * hard) and torch.allclose(seen[1], x * (1 - hard))


def test_configured_temperature_target_and_groups_reach_their_terms(resnet, x):
    """LossWeights.temperature reaches the KL term, the robustness CE is to the given target, and
    nec belongs to no group (the min multiplier leaves it alone)."""
    assert LossWeights(nec=3, min=2, am=2, robust=2).scaled()["nec"] == 3
    p = torch.sigmoid(_mask_logits()).detach()
    for T in (1.0, 4.0):
        obj = MedCamObjective(resnet, layer_preset(resnet, "resnet18"), LossWeights(temperature=T, rob=0), mean=MEAN, std=STD)
        ref = obj.reference(x)
        _, terms, logits_e = obj.evaluate(x, p, ref)
        assert terms["kl"].item() == pytest.approx(kl_loss(ref.logits_x, logits_e, T).item())
        assert terms["kl"].item() != pytest.approx(kl_loss(ref.logits_x, logits_e, 2.0).item())
    logits_x = resnet(x).detach()
    other = (logits_x.argmax(1) + 1) % logits_x.shape[1]
    m = torch.ones(2, 1, 64, 64)

    def ce(target):
        return robustness_loss(resnet, x, m, logits_x, kind="ce", target=target,
                               generator=torch.Generator().manual_seed(0)).item()

    assert ce(other) != pytest.approx(ce(None)) and ce(logits_x.argmax(1)) == pytest.approx(ce(None))
