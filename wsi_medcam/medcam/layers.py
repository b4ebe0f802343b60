"""Which classifier activations the activation-matching term compares, and how to record them.

A :class:`LayerSpec` names one module of a timm classifier (its dotted path, as accepted by
``model.get_submodule``), the weight α of its distance in ``L_act = Σ α_l d_l`` and the distance
(``"cosine"`` or ``"std_mse"``, see :mod:`wsi_medcam.medcam.loss`).

Presets follow the method document:

- ResNet: stem ReLU ``act1`` and ``layer1``–``layer4``, α = 1, 2, 2, 4, 8; cosine on the two shallow
  layers, channel-standardised MSE on the three deep ones (the paper / notebook default).
- ConvNeXt: the four stage outputs ``stages.0``–``stages.3``.
- MobileNetV2: the block outputs at strides 4/8/16/32, read from ``model.feature_info``.
- ViT: the outputs of the blocks at the four quarters of the depth (``blocks.2/5/8/11`` for 12 blocks),
  token tensors (B, N, C), cosine per token, α = 1, 2, 4, 8.
- any other timm model: its ``feature_info`` stages (four evenly spaced ones for isotropic models).

For the convolutional presets and the generic rule, the first ``n // 2`` layers use cosine, the
others std_mse, and α is the ResNet preset's weight read as a function of the layer's stride
(:func:`stride_weight`: 1 at stride ≤ 2, 2 up to 8, 4 at 16, 8 beyond), so the ResNet preset is
exactly the generic rule applied to ResNet's ``feature_info``.

The method document measured that cosine matching on shallow layers punishes every removed pixel
and so fights minimality; :func:`deep_only` keeps the deep layers only, for presets meant to reach
minimal masks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn

from .metrics import model_device

Distance = Literal["cosine", "std_mse"]


@dataclass(frozen=True)
class LayerSpec:
    """One matched activation.

    Attributes
    ----------
    name
        dotted module path inside the classifier (``model.get_submodule(name)``).
    weight
        α, the weight of this layer's distance in the activation term (≥ 0).
    distance
        ``"cosine"`` (1 − mean cosine over channels per location) or ``"std_mse"`` (MSE after
        standardising each channel over space).
    tokens
        True when the module outputs channels last: ViT token tensors (B, N, C) or (B, H, W, C)
        maps. False for (B, C, H, W) feature maps.
    """

    name: str
    weight: float
    distance: Distance
    tokens: bool = False


def stride_weight(reduction: int) -> float:
    """α of a layer from its stride (input px per feature px), as in the ResNet preset.

    Stride 2 → 1, 4 and 8 → 2, 16 → 4, 32 and beyond → 8.
    """
    if reduction <= 2:
        return 1.0
    if reduction <= 8:
        return 2.0
    if reduction <= 16:
        return 4.0
    return 8.0


def _feature_dicts(model: nn.Module) -> list[dict[str, Any]]:
    """``model.feature_info`` as a list of dicts with at least 'module', 'reduction', 'num_chs'."""
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError(f"{type(model).__name__} has no feature_info: give the LayerSpecs explicitly")
    return list(info.get_dicts()) if hasattr(info, "get_dicts") else [dict(d) for d in info]


def _conv_specs(names: Sequence[str], reductions: Sequence[int], tokens: Sequence[bool] | None = None
                ) -> list[LayerSpec]:
    """Shallow half cosine, deep half std_mse, α from the stride (see :func:`stride_weight`)."""
    n = len(names)
    flags = list(tokens) if tokens is not None else [False] * n
    return [LayerSpec(name, stride_weight(r), "cosine" if i < n // 2 else "std_mse", flags[i])
            for i, (name, r) in enumerate(zip(names, reductions, strict=True))]


def _quarter_indices(depth: int) -> list[int]:
    """Indices of the blocks ending the four quarters of ``depth`` blocks (2, 5, 8, 11 for 12)."""
    return sorted({max(0, round(depth * k / 4) - 1) for k in range(1, 5)})


def _resnet(model: nn.Module) -> list[LayerSpec]:
    return _conv_specs(["act1", "layer1", "layer2", "layer3", "layer4"], [2, 4, 8, 16, 32])


def _convnext(model: nn.Module) -> list[LayerSpec]:
    return _conv_specs([f"stages.{i}" for i in range(4)], [4, 8, 16, 32])


def _mobilenetv2(model: nn.Module) -> list[LayerSpec]:
    picked = {d["reduction"]: d["module"] for d in _feature_dicts(model) if d["reduction"] in (4, 8, 16, 32)}
    if sorted(picked) != [4, 8, 16, 32]:
        raise ValueError(f"feature_info lacks a stage at one of strides 4/8/16/32: {sorted(picked)}")
    return _conv_specs([picked[r] for r in (4, 8, 16, 32)], [4, 8, 16, 32])


def _vit(model: nn.Module) -> list[LayerSpec]:
    blocks = model.get_submodule("blocks")
    idx = _quarter_indices(len(blocks))  # type: ignore[arg-type]
    return [LayerSpec(f"blocks.{i}", 2.0**k, "cosine", tokens=True) for k, i in enumerate(idx)]


def _probe_channels_last(model: nn.Module, dicts: Sequence[dict[str, Any]]) -> list[bool]:
    """Run one zero input through ``model`` and tell, per stage, whether channels are the last dim.

    Needed by the generic rule: Swin-like models output (B, H, W, C), transformers (B, N, C), and
    matching over the wrong dimension would be silently meaningless.

    Raises
    ------
    ValueError
        when a stage output has neither its first nor last non-batch dim equal to ``num_chs``.
    """
    specs = [LayerSpec(d["module"], 1.0, "cosine") for d in dicts]
    size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    x = torch.zeros((1, *size), device=model_device(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), ActivationRecorder(model, specs) as rec:
            model(x)
    finally:
        model.train(was_training)
    flags = []
    for d in dicts:
        out = rec.outputs[d["module"]]
        if out.ndim == 4 and out.shape[1] == d["num_chs"]:
            flags.append(False)
        elif out.ndim in (3, 4) and out.shape[-1] == d["num_chs"]:
            flags.append(True)
        else:
            raise ValueError(f"cannot tell the channel dim of '{d['module']}' output {tuple(out.shape)}")
    return flags


def generic_preset(model: nn.Module) -> list[LayerSpec]:
    """The rule for any timm model with ``feature_info``.

    Uses every ``feature_info`` stage; for isotropic models (all stages at one stride and more than
    five of them, e.g. ViT-like) the stages ending the four depth quarters, with α = 1, 2, 4, 8.
    Otherwise α comes from the stride. The shallow half is matched with cosine, the deep half with
    std_mse; the channel layout of each stage is found with one forward pass of a zero input.
    """
    dicts = _feature_dicts(model)
    reductions = [int(d["reduction"]) for d in dicts]
    isotropic = len(dicts) > 5 and len(set(reductions)) == 1
    if isotropic:
        dicts = [dicts[i] for i in _quarter_indices(len(dicts))]
    tokens = _probe_channels_last(model, dicts)
    specs = _conv_specs([d["module"] for d in dicts], [int(d["reduction"]) for d in dicts], tokens)
    if isotropic:
        specs = [LayerSpec(s.name, 2.0**k, s.distance, s.tokens) for k, s in enumerate(specs)]
    return specs


_FAMILIES = (
    (re.compile(r"^(resnet\d|resnext|wide_resnet|seresnext?\d)"), _resnet),
    (re.compile(r"^convnext"), _convnext),
    (re.compile(r"^mobilenetv2"), _mobilenetv2),
    (re.compile(r"^(vit_|deit_)"), _vit),
)


def check_specs(model: nn.Module, specs: Sequence[LayerSpec]) -> None:
    """Raise ``ValueError`` if a spec names a module the model does not have."""
    for s in specs:
        try:
            model.get_submodule(s.name)
        except AttributeError as exc:
            raise ValueError(f"{type(model).__name__} has no module '{s.name}'") from exc


def layer_preset(model: nn.Module, arch: str) -> list[LayerSpec]:
    """The activation-matching layers for a timm ``model`` built from the name ``arch``.

    Parameters
    ----------
    model
        the classifier (timm, ``pretrained=False`` is fine: only module names and shapes are used).
    arch
        its timm model name; the ResNet, ConvNeXt, MobileNetV2 and ViT families get the presets
        of the method document, any other name the :func:`generic_preset` rule.

    Returns
    -------
    list[LayerSpec]
        shallow to deep.

    Raises
    ------
    ValueError
        if the preset names a module the model lacks (e.g. ``arch`` does not match ``model``).
    """
    name = arch.split(".")[0].lower()
    build = next((f for pattern, f in _FAMILIES if pattern.match(name)), generic_preset)
    try:
        specs = build(model)
    except AttributeError as exc:  # a family's preset reads modules (e.g. ``blocks``) that another model lacks
        raise ValueError(f"the {type(model).__name__} model does not have the layers of the '{arch}' preset ({exc})") from None
    check_specs(model, specs)
    return specs


def deep_only(specs: Sequence[LayerSpec]) -> list[LayerSpec]:
    """The deep layers: the std_mse ones, or the last half when all use cosine (ViT)."""
    deep = [s for s in specs if s.distance == "std_mse"]
    return deep if deep else list(specs[len(specs) // 2:])


class ActivationRecorder:
    """Context manager recording the outputs of the spec modules during forward passes.

    ``outputs[name]`` holds the output of module ``name`` from the latest forward pass (with its
    autograd graph, if any). All hooks are removed on exit, also after an exception.

    Examples
    --------
    >>> with ActivationRecorder(model, specs) as rec:  # doctest: +SKIP
    ...     logits = model(x)
    >>> rec.outputs["layer4"].shape  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, specs: Sequence[LayerSpec]) -> None:
        check_specs(model, specs)
        self.model = model
        self.names = [s.name for s in specs]
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def store(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"module '{name}' returned {type(output).__name__}, expected a Tensor")
            self.outputs[name] = output
        return store

    def __enter__(self) -> "ActivationRecorder":
        if self._handles:
            raise RuntimeError("ActivationRecorder is already active")
        self.outputs = {}
        self._handles = [self.model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.names]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
