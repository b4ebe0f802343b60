"""Training a timm patch classifier from scratch (or from local weights) on labelled tiles.

Augmentation fit for H&E: flips, 90° rotations and mild colour jitter (stain varies, orientation
means nothing). A held-out split gives the validation accuracy stored with the bundle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .bundles import ClassifierConfig, build_classifier, load_state_into, read_state_dict
from .inference import cpu_supports_bf16

log = logging.getLogger("wsi_medcam")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def read_tile(path: Path, tile_size: int) -> np.ndarray:
    """An image file as RGB uint8 (tile_size, tile_size, 3), resized with an area filter if needed."""
    img = Image.open(path).convert("RGB")
    if img.size != (tile_size, tile_size):
        img = img.resize((tile_size, tile_size), Image.Resampling.BOX)
    return np.asarray(img)


def load_image_folder(root: Path, tile_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """ImageFolder layout (one sub-folder per class) → (images (N, S, S, 3) uint8, labels, class names).

    Images are resized to ``tile_size`` with an area filter when they differ.
    """
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if len(classes) < 2:
        raise ValueError(f"{root}: expected one sub-folder per class (at least two)")
    images, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            images.append(read_tile(path, tile_size))
            labels.append(index)
    if not images:
        raise ValueError(f"{root}: no images found")
    return np.stack(images), np.asarray(labels, np.int64), classes


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips, 90° rotations and ±8 % brightness/contrast/saturation on float (B, 3, H, W) in 0–1."""
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(3)
    x = torch.rot90(x, int(torch.randint(4, (), generator=generator)), dims=(2, 3))
    b = x.shape[0]

    def jitter() -> torch.Tensor:
        return 1 + (torch.rand((b, 1, 1, 1), generator=generator) - 0.5) * 0.16

    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * jitter()  # saturation
    x = x.mean(dim=(1, 2, 3), keepdim=True) + (x - x.mean(dim=(1, 2, 3), keepdim=True)) * jitter()  # contrast
    return (x * jitter()).clamp(0, 1)  # brightness


def normalise(x01: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """0–1 RGB → the classifier's normalised input."""
    m = torch.tensor(mean, dtype=x01.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - m) / s


def uint8_tiles(images: np.ndarray) -> torch.Tensor:
    """uint8 tiles (N, H, W, 3) as a uint8 tensor (N, 3, H, W) sharing their memory (a copy where
    the array is read-only, e.g. from PIL, which torch would only warn about).

    Raises
    ------
    TypeError
        for anything but uint8 (N, H, W, 3): floats (already scaled or normalised) would be scaled
        again and read as near-black tiles without a word; one tile needs its batch axis.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise TypeError(f"expected uint8 RGB tiles (N, H, W, 3), got {images.dtype} {images.shape}")
    images = np.ascontiguousarray(images)
    return torch.from_numpy(images if images.flags.writeable else images.copy()).permute(0, 3, 1, 2)


def to_input(images: np.ndarray, cfg: ClassifierConfig) -> torch.Tensor:
    """uint8 (N, H, W, 3) → normalised float (N, 3, H, W); see :func:`uint8_tiles`."""
    return normalise(uint8_tiles(images).float() / 255, cfg.mean, cfg.std)


@dataclass(frozen=True)
class ClassifierTraining:
    """The trained model and its held-out accuracy (0–1; NaN when nothing was held out, which a
    bundle's ``config.json`` records as null)."""

    model: torch.nn.Module
    val_accuracy: float
    history: list[dict[str, float]]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / max(len(x), 1)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    cfg: ClassifierConfig,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    val_fraction: float = 0.2,
    seed: int = 0,
    init_weights: Path | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> ClassifierTraining:
    """Train ``cfg.arch`` on uint8 tiles; returns the model (eval mode) and held-out accuracy.

    ``val_fraction`` of the tiles (at least one, unless it is 0 or there are 4 tiles or fewer) is held
    out. ``init_weights`` must fit ``cfg.arch`` except for the classification head, which is trained
    anew where it was made for another number of classes.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    order = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(n * val_fraction))) if n > 4 and val_fraction > 0 else 0
    val_idx, train_idx = order[:n_val], order[n_val:]
    x_all = uint8_tiles(images)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    model = build_classifier(cfg)
    if init_weights is not None:
        load_state_into(model, read_state_dict(init_weights), str(init_weights), new_head=True)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(1, epochs * -(-len(train_idx) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    amp = cpu_supports_bf16()
    x_val = normalise(x_all[val_idx].float() / 255, cfg.mean, cfg.std)
    history = []
    for epoch in range(epochs):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        total, seen = 0.0, 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            x = normalise(augment(x_all[idx].float() / 255, gen), cfg.mean, cfg.std)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)).float(), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        record = {"epoch": epoch + 1, "loss": total / max(seen, 1),
                  "val_accuracy": accuracy(model, x_val, y_all[val_idx]) if n_val else float("nan")}
        history.append(record)
        log.info("epoch %d loss %.4f val acc %.3f", record["epoch"], record["loss"], record["val_accuracy"])
        if on_epoch:
            on_epoch(record)
    model.eval()
    return ClassifierTraining(model, history[-1]["val_accuracy"] if history else float("nan"), history)
