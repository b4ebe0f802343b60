"""Model bundles: a directory with ``config.json`` + ``model.safetensors``, never a pickle.

A classifier bundle holds a timm model's state_dict and what the model was trained on (classes,
µm/px, tile size, normalisation); a segmenter bundle holds a segmentation-models-pytorch U-Net
with one logit channel. The JSON says how to rebuild the architecture, the safetensors file only
holds tensors, so loading a bundle never executes code from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors.torch import load_file, save_file

from .config import format_validation_error
from .errors import BundleError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClassifierConfig(BaseModel):
    """``config.json`` of a classifier bundle."""

    model_config = ConfigDict(frozen=True, extra="allow")

    kind: Literal["classifier"] = "classifier"
    arch: str = Field(description="timm model name")
    class_names: list[str] = Field(min_length=2)
    mpp: float = Field(gt=0, description="µm/px the model was trained at")
    tile_size: int = Field(ge=16, description="input edge, px")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    colors: list[tuple[int, int, int]] | None = None

    @model_validator(mode="after")
    def _check(self) -> "ClassifierConfig":
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be unique")
        if self.colors is not None and len(self.colors) != len(self.class_names):
            raise ValueError("colors must give one [r,g,b] per class")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self

    def class_colors(self) -> list[tuple[int, int, int]]:
        """One RGB colour per class, stable across runs (QuPath needs a colour with every name)."""
        if self.colors is not None:
            return [tuple(c) for c in self.colors]  # type: ignore[misc]
        palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                   (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
        return [palette[i % len(palette)] for i in range(len(self.class_names))]


def check_encoder(name: str) -> str:
    """``name`` if segmentation-models-pytorch has that encoder (or it names a timm one, ``tu-…``,
    which smp checks when it builds); else a ValueError that says so in one line (smp's own lists
    all 76 names)."""
    from segmentation_models_pytorch.encoders import encoders

    if name.startswith("tu-") or name in encoders:
        return name
    raise ValueError(f"unknown segmentation-models-pytorch encoder '{name}' (e.g. resnet18, resnet34, "
                     "efficientnet-b0, mobilenet_v2, mit_b0, or tu-<timm model name>)")


class SegmenterConfig(BaseModel):
    """``config.json`` of a Med-CAM segmenter bundle."""

    model_config = ConfigDict(frozen=True, extra="allow")

    kind: Literal["medcam-segmenter"] = "medcam-segmenter"
    arch: Literal["Unet"] = "Unet"
    encoder: str = Field(description="segmentation-models-pytorch encoder name")
    tile_size: int = Field(ge=16)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    _known_encoder = field_validator("encoder")(check_encoder)


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: the model in eval mode, its config, and the weights' SHA-256."""

    path: Path
    config: Any
    model: torch.nn.Module
    sha256: str


def build_classifier(cfg: ClassifierConfig) -> torch.nn.Module:
    """A timm model with random weights (never downloads: ``pretrained=False``)."""
    import timm

    try:
        return timm.create_model(cfg.arch, pretrained=False, num_classes=len(cfg.class_names))
    except RuntimeError as exc:
        raise BundleError(f"unknown timm architecture '{cfg.arch}': {exc}") from None


def build_segmenter(cfg: SegmenterConfig) -> torch.nn.Module:
    """A segmentation-models-pytorch U-Net from scratch, one logit channel."""
    import segmentation_models_pytorch as smp

    try:
        return smp.Unet(encoder_name=cfg.encoder, encoder_weights=None, in_channels=3, classes=1)
    except (KeyError, ValueError) as exc:
        raise BundleError(f"unknown segmentation-models-pytorch encoder '{cfg.encoder}': {exc}") from None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, *,
                     new_head: bool = False) -> None:
    """Strict load with one readable line listing what does not fit.

    ``new_head``: a timm classifier's classification head (``get_classifier()``) may be missing from
    the file or shaped for another number of classes; it keeps the model's fresh initialisation.
    Every other tensor must still match exactly.
    """
    own = model.state_dict()
    if new_head:
        head = model.get_classifier()
        prefix = next(name for name, module in model.named_modules() if module is head) + "."
        state = {**state, **{k: v for k, v in own.items()
                             if k.startswith(prefix) and (k not in state or state[k].shape != v.shape)}}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise BundleError(f"{source}: weights do not fit the architecture ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from ``.safetensors`` or a ``.pth``/``.pt`` state_dict loaded with ``weights_only=True``.

    A full pickled model, or any pickle that is not plain tensors, is refused, never executed.
    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``, a ``module.`` prefix) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise BundleError(f"{path.name}: not a valid safetensors file ({exc})") from None
    with open(path, "rb") as fh:  # torch.save writes a zip archive (a pickle before torch 1.6)
        head = fh.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise BundleError(f"{path.name}: not a PyTorch checkpoint (.pth/.pt) nor a .safetensors file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError for anything but tensors
        raise BundleError(
            f"{path.name}: refused, not a plain tensor state_dict (loaded with weights_only=True): "
            f"{str(exc).splitlines()[0]}"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BundleError(f"{path.name}: expected a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_bundle_target(out_dir: Path) -> None:
    """Refuse an ``out_dir`` that :func:`save_bundle` may not replace: anything but a missing folder,
    an empty one, or a bundle (only ``config.json`` / ``model.safetensors``). Call it before a long
    training run so that the refusal comes first."""
    out_dir = Path(out_dir)
    target = out_dir.resolve()
    if not target.exists():
        return
    if not target.is_dir():
        reason = "it is a file"
    else:
        foreign = sorted(p.name for p in target.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME) or not p.is_file())
        if not foreign:
            return
        reason = f"it holds {foreign[0]}" + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
    raise BundleError(f"{out_dir} exists and is not a bundle ({reason}): refusing to overwrite it; choose another output folder")


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """``model``'s state dict as safetensors (which wants contiguous host tensors) at ``path``."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def save_bundle(model: torch.nn.Module, config: BaseModel, out_dir: Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` as the folder ``out_dir``, never half-written.

    The files go into a temporary sibling folder that is renamed into place when complete. An
    existing ``out_dir`` is replaced only when it is an earlier bundle (see
    :func:`check_bundle_target`); nothing else is ever deleted.
    """
    out_dir = Path(out_dir)
    check_bundle_target(out_dir)
    target = out_dir.resolve()  # "." has no name to put a sibling beside; a link keeps pointing at the bundle
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        new = work / "new"
        new.mkdir()
        save_weights(model, new / WEIGHTS_NAME)
        (new / CONFIG_NAME).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
        if target.exists():  # an earlier bundle: moved aside, then deleted with the work folder
            os.replace(target, work / "old")
        os.replace(new, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _read_config(bundle_dir: Path) -> dict[str, Any]:
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: not a bundle directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (bundle_dir / name).is_file():
            raise BundleError(f"{bundle_dir}: missing {name}")
    try:
        data = json.loads((bundle_dir / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{bundle_dir / CONFIG_NAME}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{bundle_dir / CONFIG_NAME}: expected a JSON object")
    return data


def _load(bundle_dir: Path, kind: str, config_cls: type[BaseModel], build: Any) -> Bundle:
    data = _read_config(bundle_dir)
    if data.get("kind") != kind:
        raise BundleError(f"{bundle_dir}: a '{data.get('kind')}' bundle, expected '{kind}'")
    try:
        cfg = config_cls.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"{bundle_dir / CONFIG_NAME}: {format_validation_error(exc)}") from None
    with torch.random.fork_rng(devices=[]):  # the random initial weights, overwritten, leave the caller's stream alone
        model = build(cfg)
    weights = Path(bundle_dir) / WEIGHTS_NAME
    load_state_into(model, read_state_dict(weights), str(bundle_dir))
    return Bundle(Path(bundle_dir), cfg, model.eval(), _file_sha256(weights))


def load_classifier(bundle_dir: Path) -> Bundle:
    """Load a classifier bundle (see :class:`ClassifierConfig`)."""
    return _load(bundle_dir, "classifier", ClassifierConfig, build_classifier)


def load_segmenter(bundle_dir: Path) -> Bundle:
    """Load a Med-CAM segmenter bundle (see :class:`SegmenterConfig`)."""
    return _load(bundle_dir, "medcam-segmenter", SegmenterConfig, build_segmenter)


def import_classifier(cfg: ClassifierConfig, out_dir: Path, *, weights: Path | None = None) -> Path:
    """Make a classifier bundle from a user's checkpoint, or randomly initialised when ``weights`` is None."""
    model = build_classifier(cfg)
    if weights is not None:
        load_state_into(model, read_state_dict(weights), str(weights))
    return save_bundle(model, cfg, out_dir)


def make_segmenter(cfg: SegmenterConfig, out_dir: Path) -> Path:
    """A randomly initialised segmenter bundle (Med-CAM training fills it in later)."""
    return save_bundle(build_segmenter(cfg), cfg, out_dir)
