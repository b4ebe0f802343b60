"""Explaining single tiles: one forward pass of the amortised segmenter, or per-image optimisation.

Each image is resized to the classifier's tile size for the models; the masks are resized back to
the image's own size. Every explanation is checked: does the hard mask alone keep the prediction
under each evaluation fill (one of them the training fill, the others never seen in training)?
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..bundles import Bundle
from ..errors import WsiMedcamError
from ..replaced import replace_text, replaced
from ..classifier_training import to_input
from .layers import deep_only, layer_preset
from .loss import MedCamObjective, preset_weights
from .metrics import in_batches, model_device, sufficiency
from .per_image import optimise_masks

EVAL_FILLS = ("mean", "white", "blur")


@dataclass(frozen=True)
class PerImageOptions:
    """Settings of per-image mode (the paper: Adam lr 5e-5, up to 880 steps)."""

    steps: int = 880
    lr: float = 5e-5
    patience: int = 40
    min_steps: int = 100
    preset: str = "minimal"
    threshold_noise: float = 0.25
    deep_layers: bool = True

    def __post_init__(self) -> None:
        preset_weights(self.preset)
        if self.steps < 1:
            raise WsiMedcamError(f"per-image steps must be at least 1, not {self.steps}")


class _Renormalised(nn.Module):
    """A segmenter with a normalisation of its own, fed the classifier's normalised input: x·(σ_c/σ_s)
    + (μ_c − μ_s)/σ_s is the tile normalised with the segmenter's μ_s, σ_s (as ``run`` feeds it)."""

    def __init__(self, net: nn.Module, classifier: tuple[tuple[float, ...], tuple[float, ...]],
                 own: tuple[tuple[float, ...], tuple[float, ...]]):
        super().__init__()
        self.net = net
        (c_mean, c_std), (s_mean, s_std) = (tuple(torch.tensor(v).view(1, 3, 1, 1) for v in pair) for pair in (classifier, own))
        self.register_buffer("scale", c_std / s_std)
        self.register_buffer("shift", (c_mean - s_mean) / s_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.scale + self.shift)


def _segmenter_on(segmenter: Bundle, classifier: Bundle) -> nn.Module:
    """The segmenter's network, for input normalised like the classifier's."""
    scfg, ccfg = segmenter.config, classifier.config
    if scfg.mean is None or scfg.std is None:
        return segmenter.model
    net = _Renormalised(segmenter.model, (ccfg.mean, ccfg.std), (scfg.mean, scfg.std))
    return net.to(model_device(segmenter.model))


def explain_batch(
    classifier: Bundle,
    images: np.ndarray,
    *,
    segmenter: Bundle | None = None,
    per_image: PerImageOptions | None = None,
    fills: Sequence[str] = EVAL_FILLS,
) -> tuple[torch.Tensor, list[dict]]:
    """Soft masks (B, 1, S, S), on the CPU, and one record per image for uint8 tiles (B, S, S, 3) at
    the tile size.

    The work runs on the device of the classifier's weights (see :func:`models_to`); the segmenter
    must be there too. A segmenter whose bundle gives its own ``mean``/``std`` sees the tiles
    normalised with them (as in ``run``), also when per-image mode refines it."""
    ccfg = classifier.config
    clf = classifier.model.eval()
    device = model_device(clf)
    x = to_input(images, ccfg).to(device)
    start = time.perf_counter()
    probs = torch.softmax(in_batches(clf, x), 1)
    pred = probs.argmax(1)
    steps = torch.zeros(len(x), dtype=torch.long)
    if per_image is not None:
        specs = layer_preset(clf, ccfg.arch)
        specs = deep_only(specs) if per_image.deep_layers else specs
        objective = MedCamObjective(clf, specs, preset_weights(per_image.preset), mean=ccfg.mean, std=ccfg.std,
                                    threshold_noise=per_image.threshold_noise)
        result = optimise_masks(objective, x, steps=per_image.steps, lr=per_image.lr, patience=per_image.patience,
                                min_steps=per_image.min_steps,
                                init=_segmenter_on(segmenter, classifier) if segmenter else None)
        soft, steps = result.soft, result.steps
    elif segmenter is not None:
        soft = torch.sigmoid(in_batches(_segmenter_on(segmenter, classifier).eval(), x))
    else:
        raise ValueError("give a segmenter, per-image mode, or both")
    seconds = (time.perf_counter() - start) / max(len(x), 1)
    hard = (soft > 0.5).float()
    kept = sufficiency(clf, x, hard[:, 0], fills, mean=ccfg.mean, std=ccfg.std, target=pred,
                       generator=torch.Generator(device).manual_seed(0))
    records = [{
        "prediction": ccfg.class_names[int(pred[i])],
        "probability": float(probs[i, pred[i]]),
        "mask_area": float(hard[i].mean()),
        "keeps_prediction": {f: bool(kept[f][i]) for f in fills},
        "steps": int(steps[i]),
        "seconds": seconds,
    } for i in range(len(x))]
    return soft.cpu(), records


def models_to(device: torch.device, classifier: Bundle, segmenter: Bundle | None = None) -> None:
    """Move the bundles' networks to ``device`` (in place, as :meth:`torch.nn.Module.to` does), where
    :func:`explain_batch` and :func:`~wsi_medcam.medcam.evaluate.evaluate` then run: per-image mode's
    880 steps a tile are minutes on a CPU."""
    classifier.model.to(device)
    if segmenter is not None:
        segmenter.model.to(device)


def explain_files(
    classifier: Bundle,
    paths: Sequence[Path],
    out_dir: Path,
    *,
    segmenter: Bundle | None = None,
    per_image: PerImageOptions | None = None,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict]:
    """Write ``<name>.mask.png`` (0/255), ``<name>.soft.png`` (0–255) and ``<name>.json`` per image;
    images whose names would share those files are refused before anything is written.
    ``on_batch(n)`` is called once the files of each ``n`` images are written."""
    stems: dict[str, Path] = {}
    for path in paths:
        if (other := stems.setdefault(Path(path).stem, Path(path))) != Path(path):
            raise WsiMedcamError(f"{other} and {path} would write the same {Path(path).stem}.* files: "
                                 "explain them into separate folders")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = classifier.config.tile_size
    records = []
    for i in range(0, len(paths), batch_size):
        chunk = list(paths[i : i + batch_size])
        originals = [Image.open(p).convert("RGB") for p in chunk]
        tiles = np.stack([np.asarray(im.resize((size, size), Image.Resampling.BOX) if im.size != (size, size) else im)
                          for im in originals])
        soft, recs = explain_batch(classifier, tiles, segmenter=segmenter, per_image=per_image)
        for path, im, s, rec in zip(chunk, originals, soft[:, 0].numpy(), recs):
            soft_img = Image.fromarray(np.rint(s * 255).astype(np.uint8)).resize(im.size, Image.Resampling.BILINEAR)
            hard_img = Image.fromarray(((s > 0.5) * 255).astype(np.uint8)).resize(im.size, Image.Resampling.NEAREST)
            for img, kind in ((soft_img, "soft"), (hard_img, "mask")):
                with replaced(out_dir / f"{path.stem}.{kind}.png") as tmp:
                    img.save(tmp, format="PNG")
            rec = {"image": str(path), **rec}
            replace_text(out_dir / f"{path.stem}.json", json.dumps(rec, indent=2) + "\n")
            records.append(rec)
        if on_batch is not None:
            on_batch(len(chunk))
    return records
