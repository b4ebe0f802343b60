"""Honest evaluation of explanations on held-out tiles, Med-CAM and the Grad-CAM family side by side.

Per method: hard-mask area, sufficiency under several fills (the training fill and fills the
segmenter never saw), the null-mask control (what each fill alone keeps), necessity, deletion and
insertion AUC (ties inside binary masks broken by the soft mask), an area-matched comparison (each
heatmap binarised at the Med-CAM mask's area), localisation against ground truth when given, and
seconds per tile.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..bundles import Bundle
from ..classifier_training import to_input
from .baselines import cam_heatmaps
from .explain import PerImageOptions, explain_batch
from .metrics import (
    binarise_at_area,
    deletion_insertion_auc,
    iou,
    model_device,
    necessity,
    null_mask_sufficiency,
    pointing_game,
    predict,
    sufficiency,
)

FILLS = ("mean", "white", "blur", "colour")


def _mean(a: np.ndarray) -> float:
    return float(np.mean(a)) if len(a) else float("nan")


def _scores(clf: torch.nn.Module, x: torch.Tensor, hard: np.ndarray, saliency: np.ndarray, tiebreak: np.ndarray | None,
            target: np.ndarray, gt: np.ndarray | None, *, mean: Any, std: Any, fills: Sequence[str], auc_steps: int) -> dict[str, Any]:
    gen = torch.Generator(x.device).manual_seed(0)
    suff = sufficiency(clf, x, hard, fills, mean=mean, std=std, target=target, generator=gen)
    nec = necessity(clf, x, hard, "mean", mean=mean, std=std, target=target)
    deletion, insertion = deletion_insertion_auc(clf, x, saliency, steps=auc_steps, mean=mean, std=std,
                                                 tiebreak=tiebreak, target=target)
    out: dict[str, Any] = {
        "area": _mean(hard.reshape(len(hard), -1).mean(1)),
        "sufficiency": {f: _mean(v) for f, v in suff.items()},
        "necessity_drop": nec["mean_drop"],
        "necessity_flip_rate": nec["flip_rate"],
        "deletion_auc": _mean(deletion),
        "insertion_auc": _mean(insertion),
    }
    if gt is not None:
        positive = gt.reshape(len(gt), -1).any(1)
        out["iou"] = _mean(iou(hard[positive], gt[positive]))
        ranking = tiebreak if tiebreak is not None else saliency  # a binary mask points with its soft mask
        out["pointing_game"] = _mean(pointing_game(ranking[positive], gt[positive]))
    return out


def evaluate(
    classifier: Bundle,
    images: np.ndarray,
    *,
    segmenter: Bundle | None = None,
    baselines: Sequence[str] = ("gradcam",),
    per_image: PerImageOptions | None = None,
    gt_masks: np.ndarray | None = None,
    fills: Sequence[str] = FILLS,
    auc_steps: int = 20,
    on_method: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Metrics per method on uint8 tiles (N, S, S, 3); ``gt_masks`` (N, S, S) bool enables IoU and
    pointing game. Runs on the device of the classifier's weights (and the segmenter's, which must
    be the same: :func:`~wsi_medcam.medcam.explain.models_to`). ``on_method(name)`` is called as
    each method's figures are done."""
    ccfg = classifier.config
    clf = classifier.model.eval()
    x = to_input(images, ccfg).to(model_device(clf))
    _, pred = predict(clf, x)
    gen = torch.Generator(x.device).manual_seed(0)
    report: dict[str, Any] = {
        "tiles": len(images),
        "fills": list(fills),
        "null_mask_keeps": {f: _mean(v) for f, v in null_mask_sufficiency(clf, x, fills, mean=ccfg.mean, std=ccfg.std,
                                                                          target=pred, generator=gen).items()},
        "methods": {},
    }
    reference_area = None
    medcam_runs = []
    if segmenter is not None:
        medcam_runs.append(("medcam", None))
    if per_image is not None:
        medcam_runs.append(("medcam-per-image" if segmenter is None else "medcam-refined", per_image))
    for name, options in medcam_runs:
        start = time.perf_counter()
        soft, _ = explain_batch(classifier, images, segmenter=segmenter if options is None or name == "medcam-refined" else None,
                                per_image=options)
        seconds = (time.perf_counter() - start) / len(images)
        soft_np = soft[:, 0].numpy()
        hard = soft_np > 0.5
        scores = _scores(clf, x, hard.astype(np.float32), hard.astype(np.float32), soft_np, pred, gt_masks,
                         mean=ccfg.mean, std=ccfg.std, fills=fills, auc_steps=auc_steps)
        report["methods"][name] = {**scores, "seconds_per_tile": seconds}
        if reference_area is None:
            reference_area = hard.reshape(len(hard), -1).mean(1)
        if on_method is not None:
            on_method(name)
    for method in baselines:
        start = time.perf_counter()
        heat = cam_heatmaps(clf, x, method, [int(p) for p in pred], arch=ccfg.arch)
        seconds = (time.perf_counter() - start) / len(images)
        area = reference_area if reference_area is not None else np.full(len(images), 0.1)
        hard = binarise_at_area(heat, area)
        scores = _scores(clf, x, hard.astype(np.float32), heat, None, pred, gt_masks,
                         mean=ccfg.mean, std=ccfg.std, fills=fills, auc_steps=auc_steps)
        scores["binarised_at"] = "medcam area" if reference_area is not None else "10 % area"
        report["methods"][method] = {**scores, "seconds_per_tile": seconds}
        if on_method is not None:
            on_method(method)
    return report
