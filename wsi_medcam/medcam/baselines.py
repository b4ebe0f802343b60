"""The Grad-CAM family as baselines for Med-CAM, computed through the ``grad-cam`` package.

Every heatmap is min-max normalised per image by the package, so compare heatmaps with binary
masks by area (percentile), never by value: see :func:`wsi_medcam.medcam.metrics.binarise_at_area`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, score_cam
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .metrics import binarise_at_area, model_device


class QuietScoreCAM(ScoreCAM):
    """grad-cam's ScoreCAM without the tqdm bar it draws for every image (tqdm reads
    ``TQDM_DISABLE`` only when it is imported): ``run --explainer scorecam`` printed a line per
    tile under the run's own progress bar. Its module's ``tqdm`` is swapped while it scores."""

    def get_cam_weights(self, *args: Any, **kwargs: Any) -> np.ndarray:
        bars = score_cam.tqdm
        score_cam.tqdm = SimpleNamespace(tqdm=lambda iterable, *_, **__: iterable)
        try:
            return super().get_cam_weights(*args, **kwargs)
        finally:
            score_cam.tqdm = bars


CAM_METHODS: dict[str, type] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "scorecam": QuietScoreCAM,
}

ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


def vit_reshape_transform(model: VisionTransformer) -> ReshapeTransform:
    """Tokens (B, P + gh·gw, C) → feature map (B, C, gh, gw), dropping the P prefix tokens.

    P is ``model.num_prefix_tokens`` (class, distillation and register tokens) and (gh, gw) is
    ``model.patch_embed.grid_size``, i.e. (H/16, W/16) for a /16 model at its native input size.
    """
    prefix = model.num_prefix_tokens
    gh, gw = model.patch_embed.grid_size

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        if patches.shape[1] != gh * gw:
            raise ValueError(
                f"{patches.shape[1]} patch tokens do not fill the {gh}×{gw} patch grid; "
                "run the ViT at the input size it was built for"
            )
        return patches.reshape(tokens.shape[0], gh, gw, tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _nhwc_to_nchw(t: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) → (B, C, H, W), for timm models whose ``output_fmt`` is NHWC (e.g. Swin)."""
    return t.permute(0, 3, 1, 2)


def cam_target(model: nn.Module, arch: str) -> tuple[list[nn.Module], ReshapeTransform | None]:
    """The Grad-CAM target layer of ``model`` and the reshape transform its output needs.

    Chosen by the timm class, not by name:

    - ``ResNet`` (resnet*, resnext*, seresnet*…): ``layer4[-1]``;
    - ``ConvNeXt``: ``stages[-1]``;
    - ``EfficientNet`` (efficientnet*, mobilenetv2*): ``bn2``, the normalised and activated output
      of ``conv_head`` — the last spatial feature map before pooling;
    - ``MobileNetV3``: ``blocks[-1]`` (its ``conv_head`` runs after global pooling, so has no
      spatial extent);
    - ``VisionTransformer`` (vit*, deit*): ``blocks[-1].norm1`` with :func:`vit_reshape_transform`;
    - anything else with timm ``feature_info``: the last listed module, permuted to NCHW when the
      model's ``output_fmt`` is NHWC (Swin).

    Parameters
    ----------
    model
        The classifier.
    arch
        Its timm name, used in the error message.

    Raises
    ------
    ValueError
        when no rule applies.
    """
    if isinstance(model, VisionTransformer):
        return [model.blocks[-1].norm1], vit_reshape_transform(model)
    if isinstance(model, ResNet):
        return [model.layer4[-1]], None
    if isinstance(model, ConvNeXt):
        return [model.stages[-1]], None
    if isinstance(model, EfficientNet):
        return [model.bn2], None
    if isinstance(model, MobileNetV3):
        return [model.blocks[-1]], None
    feature_info = getattr(model, "feature_info", None)
    if feature_info:
        layer = model.get_submodule(feature_info[-1]["module"])
        nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        return [layer], _nhwc_to_nchw if nhwc else None
    raise ValueError(f"no Grad-CAM target layer known for '{arch}' ({type(model).__name__})")


def _check_targets(targets: Sequence[int] | None, batch: int, num_classes: int | None) -> None:
    """Reject B ≠ len(targets), and classes ``ClassifierOutputTarget`` would misread (negative) or fail on."""
    if targets is None:
        return
    if len(targets) != batch:
        raise ValueError(f"{len(targets)} targets for a batch of {batch} images")
    bad = [t for t in targets if t < 0 or (num_classes is not None and t >= num_classes)]
    if bad:
        raise ValueError(f"target classes {bad} out of range for {num_classes} classes")


def cam_heatmaps(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    targets: Sequence[int] | None,
    *,
    arch: str,
    batch_size: int = 32,
) -> np.ndarray:
    """Grad-CAM-family heatmaps at input resolution.

    Parameters
    ----------
    model
        The classifier; its parameters may be frozen (gradients flow from the input instead).
        Afterwards it carries no hooks and keeps its train/eval modes, ``requires_grad`` flags and
        ``.grad`` tensors.
    x
        (B, 3, H, W) input, normalised as the classifier expects.
    method
        One of :data:`CAM_METHODS`.
    targets
        B class indices, or ``None`` for each image's predicted class.
    arch
        The timm name of ``model``, see :func:`cam_target`.
    batch_size
        Images per CAM call; ScoreCAM takes one image per call (it holds a masked copy of the image
        per channel of the target layer, 308 MB for resnet18's 512 at 224 px: a GPU batch of 256
        would need 79 GB) and scores the copies in batches of this size.

    Returns
    -------
    numpy.ndarray
        (B, H, W) float32 in [0, 1], min-max normalised per image.

    Raises
    ------
    ValueError
        for an unknown ``method``, or targets of the wrong length or out of range.
    RuntimeError
        for an ``IndexError`` inside grad-cam (e.g. a target past a model without ``num_classes``),
        which the package's context manager would otherwise print and swallow.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method '{method}', expected one of {', '.join(CAM_METHODS)}")
    _check_targets(targets, x.shape[0], getattr(model, "num_classes", None))
    target_layers, reshape = cam_target(model, arch)
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.grad for p in model.parameters()}
    device = model_device(model)
    out = []
    try:
        with CAM_METHODS[method](model=model, target_layers=target_layers, reshape_transform=reshape) as cam:
            cam.batch_size = batch_size
            per_call = 1 if method == "scorecam" else batch_size
            for start in range(0, x.shape[0], per_call):
                chunk = x[start : start + per_call].detach().to(device).requires_grad_(True)
                out.append(_call_cam(cam, chunk, _cam_targets(targets, start, per_call)))
    finally:
        for m, training in modes.items():
            m.train(training)
        for p, g in grads.items():
            p.grad = g
    return np.concatenate(out).astype(np.float32, copy=False)


def cam_evidence(heat: np.ndarray, area: float) -> np.ndarray:
    """Heatmaps (B, H, W) in [0, 1] as soft evidence for a 0.5 threshold: each one's top ``area``
    fraction of px (:func:`~wsi_medcam.medcam.metrics.binarise_at_area`, by rank: the heatmaps are
    min-max normalised per tile, so a value threshold keeps an arbitrary area per tile) maps to
    [0.51, 1], the rest to [0, 0.49]; the order within each part is kept, so the stitched map still
    shows the heat, and ``> 0.5`` and ``>= 0.5`` cut the same px."""
    hard = binarise_at_area(heat, area)
    return np.where(hard, 0.51 + 0.49 * heat, 0.49 * heat).astype(np.float32)


def _cam_targets(targets: Sequence[int] | None, start: int, size: int) -> list[ClassifierOutputTarget] | None:
    """The package's target objects for ``targets[start:start + size]`` (``None``: predicted class)."""
    if targets is None:
        return None
    return [ClassifierOutputTarget(int(t)) for t in targets[start : start + size]]


def _call_cam(cam: BaseCAM, x: torch.Tensor, targets: list[ClassifierOutputTarget] | None) -> np.ndarray:
    """One CAM call, with ``IndexError`` re-raised: the package's ``__exit__`` would swallow it."""
    try:
        return cam(input_tensor=x, targets=targets)
    except IndexError as exc:
        raise RuntimeError(f"grad-cam failed: {exc}") from exc
