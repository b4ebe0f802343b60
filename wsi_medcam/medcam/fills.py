"""What replaces the pixels a mask removes. All fills live in the classifier's *normalised* space.

``mean`` (zeros: the dataset-mean colour) is the paper's training fill. The others exist so that
sufficiency is also measured under fills the segmenter never saw: white glass for H&E, a blur of
the tile itself, Gaussian or uniform noise, and a random flat colour.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

FillKind = Literal["mean", "white", "blur", "noise", "uniform", "colour"]
FILL_KINDS: tuple[str, ...] = ("mean", "white", "blur", "noise", "uniform", "colour")


def _gaussian_blur(x: torch.Tensor, sigma_px: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma_px))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma_px**2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
    pad = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(pad, k, groups=x.shape[1])
    pad = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(pad, k.transpose(2, 3), groups=x.shape[1])


def make_fill(
    kind: str,
    x: torch.Tensor,
    *,
    mean: tuple[float, float, float] | torch.Tensor,
    std: tuple[float, float, float] | torch.Tensor,
    generator: torch.Generator | None = None,
    blur_sigma_px: float = 10.0,
) -> torch.Tensor:
    """A fill tensor shaped like ``x`` (B, 3, H, W, normalised with ``mean``/``std`` in 0–1 units).
    ``mean`` and ``std`` may be tensors on ``x``'s device already: a tensor made from numbers is a
    copy to the GPU that waits for the work queued before it (on an H200, the model process's
    busiest line in py-spy).

    Raises
    ------
    ValueError
        for an unknown ``kind``.
    """
    if kind == "mean":
        return torch.zeros_like(x)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    if kind == "white":
        return ((1 - m) / s).expand_as(x).clone()
    if kind == "blur":
        return _gaussian_blur(x, blur_sigma_px)
    if kind == "noise":
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if kind == "uniform":
        return torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) * 2 - 1
    if kind == "colour":
        rgb = torch.rand((x.shape[0], 3, 1, 1), generator=generator, dtype=x.dtype, device=x.device)
        return ((rgb - m) / s).expand_as(x).clone()
    raise ValueError(f"unknown fill '{kind}', expected one of {', '.join(FILL_KINDS)}")


def compose(x: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """The explanation ``mask·x + (1 − mask)·fill``; ``mask`` is (B, 1, H, W) in [0, 1]."""
    return mask * x + (1 - mask) * fill
