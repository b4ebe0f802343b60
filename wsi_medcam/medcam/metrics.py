"""Honest faithfulness and localisation metrics for evidence masks and saliency heatmaps.

Conventions
-----------
- ``classifier`` is a frozen module in eval mode mapping normalised (B, 3, H, W) images to
  (B, C) logits; every forward pass runs under ``torch.no_grad``.
- ``x`` is (B, 3, H, W), normalised with ``mean``/``std`` (0–1 units) like the classifier's input.
- Masks and heatmaps are (B, H, W) torch tensors or numpy arrays. A mask is 1 where the evidence
  is *kept*; binary masks may be bool or 0/1 floats, soft masks any value in [0, 1].
- Fills are the kinds of :func:`wsi_medcam.medcam.fills.make_fill`, made in normalised space.
- Sufficiency is ``argmax f(m·x + (1 − m)·b)`` agreeing with the target; it is *not*
  ``quantus.Sufficiency`` (Dasgupta et al.), which is a different metric.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .fills import compose, make_fill

ArrayLike = torch.Tensor | np.ndarray
RGB = tuple[float, float, float]


def _to_numpy(a: ArrayLike | Sequence[int] | float) -> np.ndarray:
    """A numpy view or copy of ``a`` (any shape)."""
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _mask_like(masks: ArrayLike, x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) masks as a (B, 1, H, W) tensor with ``x``'s dtype and device."""
    m = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks))
    if m.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"masks of shape {tuple(m.shape)} do not match images {tuple(x.shape)}")
    return m.to(device=x.device, dtype=x.dtype)[:, None]


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are; the CPU for a module without any (a fixed function)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


FORWARD_BATCH = 64
"""Tiles per forward pass without gradients (:func:`in_batches`)."""


def in_batches(model: nn.Module, x: torch.Tensor, size: int = FORWARD_BATCH) -> torch.Tensor:
    """``model(x)`` without gradients, ``size`` tiles at a time: the activations are then those of
    ``size`` tiles however many are evaluated (a U-Net/resnet18 takes ~17.5 MiB a tile at 224 px,
    so ``eval`` on a folder of 1,000 tiles would take ~17 GiB in one pass)."""
    with torch.no_grad():
        if len(x) <= size:
            return model(x)
        return torch.cat([model(x[i : i + size]) for i in range(0, len(x), size)])


def _probs(classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C) float32 softmax probabilities of ``classifier`` on ``x``, without gradients."""
    if classifier.training:
        raise ValueError("put the classifier in eval mode: train-mode batch norm would change it")
    return in_batches(classifier, x).float().softmax(dim=-1)


def _target(classifier: nn.Module, x: torch.Tensor, target: ArrayLike | Sequence[int] | None) -> torch.Tensor:
    """(B,) int64 target classes on ``x``'s device: ``target``, or argmax f(x) when ``None``."""
    if target is None:
        return _probs(classifier, x).argmax(dim=-1)
    return torch.as_tensor(_to_numpy(target), dtype=torch.int64, device=x.device).reshape(x.shape[0])


def predict(classifier: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and predicted class.

    Returns
    -------
    probs : numpy.ndarray
        (B, C) float32 softmax probabilities.
    pred : numpy.ndarray
        (B,) int64 argmax class.
    """
    probs = _probs(classifier, x)
    return probs.cpu().numpy(), probs.argmax(dim=-1).cpu().numpy()


def sufficiency(
    classifier: nn.Module,
    x: torch.Tensor,
    masks: ArrayLike,
    fills: Sequence[str],
    *,
    mean: RGB,
    std: RGB,
    target: ArrayLike | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Does the kept evidence alone keep the decision, under each fill?

    Parameters
    ----------
    masks
        (B, H, W) kept-evidence masks (1 = keep).
    fills
        Fill kinds replacing the removed pixels; include at least one never seen in training.
    target
        (B,) classes to keep; default argmax f(x).
    generator
        For the random fills (noise, uniform, colour).

    Returns
    -------
    dict[str, numpy.ndarray]
        Per fill, (B,) bool: ``argmax f(m·x + (1 − m)·b) == target``.
    """
    y = _target(classifier, x, target)
    m = _mask_like(masks, x)
    out = {}
    for kind in fills:
        b = make_fill(kind, x, mean=mean, std=std, generator=generator)
        out[kind] = (_probs(classifier, compose(x, m, b)).argmax(dim=-1) == y).cpu().numpy()
    return out


def null_mask_sufficiency(
    classifier: nn.Module,
    x: torch.Tensor,
    fills: Sequence[str],
    *,
    mean: RGB,
    std: RGB,
    target: ArrayLike | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, np.ndarray]:
    """The control for :func:`sufficiency`: an empty mask, i.e. the fill alone.

    Where the fill by itself is classified as the target (a mean fill often is), a mask being
    "sufficient" under that fill proves nothing for those images.

    Returns
    -------
    dict[str, numpy.ndarray]
        Per fill, (B,) bool: ``argmax f(b) == target`` (default argmax f(x)).
    """
    empty = torch.zeros((x.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device)
    return sufficiency(classifier, x, empty, fills, mean=mean, std=std, target=target, generator=generator)


def necessity(
    classifier: nn.Module,
    x: torch.Tensor,
    masks: ArrayLike,
    fill: str,
    *,
    mean: RGB,
    std: RGB,
    target: ArrayLike | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, np.ndarray | float]:
    """What removing the mask region costs the decision: ``(1 − m)·x + m·b``.

    Parameters
    ----------
    masks
        (B, H, W) evidence masks; the region where they are 1 is replaced by the fill.
    fill
        Fill kind for the removed region.
    target
        (B,) classes y; default argmax f(x).

    Returns
    -------
    dict
        ``drop``: (B,) float32, p_y(x) − p_y(removed) (probability units, may be negative);
        ``flipped``: (B,) bool, argmax f(removed) != y;
        ``mean_drop``: float, the mean of ``drop``; ``flip_rate``: float, the mean of ``flipped``.
    """
    y = _target(classifier, x, target)
    m = _mask_like(masks, x)
    b = make_fill(fill, x, mean=mean, std=std, generator=generator)
    p_full = _probs(classifier, x)
    p_removed = _probs(classifier, compose(x, 1 - m, b))
    rows = torch.arange(x.shape[0], device=x.device)
    drop = (p_full[rows, y] - p_removed[rows, y]).cpu().numpy()
    flipped = (p_removed.argmax(dim=-1) != y).cpu().numpy()
    return {"drop": drop, "flipped": flipped, "mean_drop": float(drop.mean()), "flip_rate": float(flipped.mean())}


def _rank_pixels(saliency: ArrayLike, tiebreak: ArrayLike | None = None) -> np.ndarray:
    """Each pixel's rank (0 = most salient) by descending (saliency, tiebreak), then raster order.

    Parameters
    ----------
    saliency
        (B, H, W) scores.
    tiebreak
        (B, H, W) secondary scores ordering pixels of equal saliency, or ``None``.

    Returns
    -------
    numpy.ndarray
        (B, H·W) int64 ranks, a permutation of 0 … H·W − 1 per image.
    """
    s = _to_numpy(saliency).astype(np.float64)
    flat = s.reshape(s.shape[0], -1)
    tb = None if tiebreak is None else _to_numpy(tiebreak).astype(np.float64).reshape(flat.shape)
    pixels = np.arange(flat.shape[1])
    ranks = np.empty(flat.shape, dtype=np.int64)
    for i, row in enumerate(flat):
        order = np.argsort(-row, kind="stable") if tb is None else np.lexsort((pixels, -tb[i], -row))
        ranks[i, order] = pixels
    return ranks


def _trapezoid(curve: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Area under (steps + 1, B) curves over ``fractions`` (steps + 1,) by the trapezoid rule."""
    widths = np.diff(fractions)[:, None]
    return ((curve[1:] + curve[:-1]) / 2 * widths).sum(axis=0)


def deletion_insertion_curves(
    classifier: nn.Module,
    x: torch.Tensor,
    saliency: ArrayLike,
    *,
    steps: int = 20,
    fill: str = "mean",
    mean: RGB,
    std: RGB,
    tiebreak: ArrayLike | None = None,
    target: ArrayLike | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RISE deletion and insertion curves of p_y against the fraction of pixels changed.

    At step k the top ``round(k / steps · H·W)`` pixels by saliency (ties: ``tiebreak``, then
    raster order) are replaced by the fill (deletion) or revealed on the fill (insertion). The
    same fill tensor is used at every step.

    Returns
    -------
    fractions : numpy.ndarray
        (steps + 1,) fractions of pixels, 0 … 1.
    deletion, insertion : numpy.ndarray
        (steps + 1, B) float32 p_y at each fraction.
    """
    y = _target(classifier, x, target)
    ranks = torch.as_tensor(_rank_pixels(saliency, tiebreak), device=x.device)
    b = make_fill(fill, x, mean=mean, std=std, generator=generator)
    n_pix = ranks.shape[1]
    rows = torch.arange(2 * x.shape[0], device=x.device)
    y2 = torch.cat([y, y])
    curves = []
    for k in range(steps + 1):
        top = (ranks < round(k / steps * n_pix)).to(x.dtype).view(x.shape[0], 1, *x.shape[2:])
        both = torch.cat([compose(x, 1 - top, b), compose(x, top, b)])
        curves.append(_probs(classifier, both)[rows, y2].cpu().numpy())
    deletion, insertion = np.split(np.stack(curves), 2, axis=1)
    return np.linspace(0.0, 1.0, steps + 1), deletion, insertion


def deletion_insertion_auc(
    classifier: nn.Module,
    x: torch.Tensor,
    saliency: ArrayLike,
    *,
    steps: int = 20,
    fill: str = "mean",
    mean: RGB,
    std: RGB,
    tiebreak: ArrayLike | None = None,
    target: ArrayLike | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image deletion AUC (lower is better) and insertion AUC (higher is better).

    See :func:`deletion_insertion_curves`. For a binary mask pass the soft mask as ``tiebreak``
    so that pixels inside the mask are ordered by it.

    Returns
    -------
    deletion_auc, insertion_auc : numpy.ndarray
        (B,) areas under p_y over the pixel fraction in [0, 1] (trapezoid rule), each in [0, 1].
    """
    fractions, deletion, insertion = deletion_insertion_curves(
        classifier, x, saliency, steps=steps, fill=fill, mean=mean, std=std,
        tiebreak=tiebreak, target=target, generator=generator,
    )
    return _trapezoid(deletion, fractions), _trapezoid(insertion, fractions)


def binarise_at_area(heatmap: ArrayLike, area: ArrayLike | float) -> np.ndarray:
    """Keep each heatmap's top pixels, exactly ``round(area · H·W)`` of them.

    A percentile threshold rather than a value one: Grad-CAM outputs are min-max normalised per
    image, so equal values mean different things in different images. Ties (flat zero regions,
    the maximum) are broken in raster order, so the area is exact and the result deterministic.

    Parameters
    ----------
    heatmap
        (B, H, W) scores.
    area
        (B,) fractions in [0, 1] (e.g. the Med-CAM masks' :func:`area_fraction`), or one fraction.

    Returns
    -------
    numpy.ndarray
        (B, H, W) bool.
    """
    h = _to_numpy(heatmap)
    a = np.broadcast_to(_to_numpy(area).astype(np.float64), (h.shape[0],))
    if np.any((a < 0) | (a > 1)):
        raise ValueError(f"area fractions must lie in [0, 1], got {a}")
    ranks = _rank_pixels(h)
    keep = ranks < np.round(a * ranks.shape[1])[:, None]
    return keep.reshape(h.shape)


def area_fraction(masks: ArrayLike) -> np.ndarray:
    """(B,) float fraction of each (B, H, W) mask's pixels that are kept (the mean of the mask).

    Pass the hard mask (soft p > 0.5) for the hard area; a soft mask gives its expected area.
    """
    m = _to_numpy(masks).astype(np.float64)
    return m.reshape(m.shape[0], -1).mean(axis=1)


def iou(pred_masks: ArrayLike, gt_masks: ArrayLike) -> np.ndarray:
    """(B,) intersection over union of (B, H, W) masks, each binarised at > 0.5.

    Two empty masks agree perfectly: their IoU is 1.
    """
    p = _to_numpy(pred_masks) > 0.5
    g = _to_numpy(gt_masks) > 0.5
    inter = (p & g).reshape(p.shape[0], -1).sum(axis=1)
    union = (p | g).reshape(p.shape[0], -1).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def pointing_game(heatmaps: ArrayLike, gt_masks: ArrayLike) -> np.ndarray:
    """(B,) bool: is each heatmap's maximum inside its ground-truth region (gt > 0.5)?

    Among tied maxima the first in raster order is the one that points (numpy ``argmax``), so a
    flat heatmap points at its top-left pixel rather than hitting any region it touches.
    """
    h = _to_numpy(heatmaps)
    g = _to_numpy(gt_masks) > 0.5
    flat = h.reshape(h.shape[0], -1).argmax(axis=1)
    return g.reshape(g.shape[0], -1)[np.arange(h.shape[0]), flat]
