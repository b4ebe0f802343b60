"""Driving the classifier and the Med-CAM segmenter over batches of tiles.

One process owns the models. Tiles arrive as uint8 and are normalised on the device (less to copy
than float32), in channels-last layout, under bf16 autocast where the hardware supports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from .bundles import Bundle
from .config import InferenceConfig


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (AMX or AVX512-BF16), where autocast pays."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def default_batch_size(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 32


@dataclass(frozen=True)
class BatchResult:
    """Model outputs for one batch, on the CPU.

    indices : tile indices into the grid.
    probs : (B, classes) softmax probabilities.
    soft : (B, H, W) segmenter evidence in [0, 1] at tile resolution, or None without a segmenter.
    """

    indices: np.ndarray
    probs: np.ndarray
    soft: np.ndarray | None


class Predictor:
    """Classifier (+ optional segmenter) on one device, ready for batches of uint8 tiles."""

    def __init__(self, classifier: Bundle, segmenter: Bundle | None, cfg: InferenceConfig):
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_precision(cfg.precision, self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.classifier = classifier.model.to(self.device, memory_format=self.memory_format).eval()
        self.segmenter = (
            segmenter.model.to(self.device, memory_format=self.memory_format).eval() if segmenter else None
        )
        ccfg = classifier.config
        self._mean = torch.tensor(ccfg.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(ccfg.std, device=self.device).view(1, 3, 1, 1) * 255
        scfg = segmenter.config if segmenter else None
        if scfg is not None and scfg.mean is not None and scfg.std is not None:
            self._seg_mean = torch.tensor(scfg.mean, device=self.device).view(1, 3, 1, 1) * 255
            self._seg_std = torch.tensor(scfg.std, device=self.device).view(1, 3, 1, 1) * 255
        else:
            self._seg_mean, self._seg_std = self._mean, self._std

    def _autocast(self):  # noqa: ANN202 - context manager
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def predict(self, tiles_uint8: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (B, C), soft evidence (B, H, W) or None) for uint8 tiles (B, 3, H, W)."""
        x = tiles_uint8.to(self.device, non_blocking=True).float()
        x_cls = ((x - self._mean) / self._std).contiguous(memory_format=self.memory_format)
        with self._autocast():
            probs = torch.softmax(self.classifier(x_cls).float(), dim=1)
            soft = None
            if self.segmenter is not None:
                x_seg = x_cls if self._seg_mean is self._mean else (x - self._seg_mean) / self._seg_std
                soft = torch.sigmoid(self.segmenter(x_seg.contiguous(memory_format=self.memory_format)).float())[:, 0]
        return probs.cpu().numpy(), None if soft is None else soft.cpu().numpy()

    def run(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[BatchResult]:
        """Results batch by batch, in the loader's order."""
        for tiles, indices in batches:
            probs, soft = self.predict(tiles)
            yield BatchResult(indices.numpy(), probs, soft)
