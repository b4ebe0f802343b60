"""Validated, frozen configuration for every stage of ``wsi-medcam run``.

Defaults live here and only here; ``configs/default.yaml`` mirrors them so users see every knob.
Each stage receives only its own slice (``cfg.tissue``, ``cfg.tiling`` ...). Unknown keys, wrong
types and out-of-range values are rejected with one readable message naming the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


def check_device_name(value: str) -> str:
    """``value`` if it names a device this tool drives (whether it is present is checked when
    models are placed, :func:`wsi_medcam.inference.resolve_device`)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError(f"'{value}' is not auto, cpu, cuda or cuda:N")
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SlideConfig(_Frozen):
    """How slides are opened and how their resolution is established."""

    backend: Literal["auto", "openslide", "tiffslide"] = "auto"
    mpp: float | None = Field(None, gt=0, description="µm/px for every slide of the run whose metadata gives none")
    mpp_csv: tuple[Path, ...] = Field((), description="CSVs of path,mpp per slide, for slides whose metadata "
                                      "gives none (manifests too); the first that gives a slide an mpp wins")
    level_tolerance: float = Field(0.02, ge=0, le=0.25, description="relative slack when matching a level downsample")

    @field_validator("mpp_csv", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        """One path (the form before manifests counted too) or none is a tuple of them."""
        return () if value is None else (value,) if isinstance(value, (str, Path)) else value


class TissueConfig(_Frozen):
    """Tissue detection on a low-resolution thumbnail; sizes are physical (µm, µm²)."""

    mpp: float = Field(8.0, gt=0, description="thumbnail resolution, µm/px")
    saturation_floor: float = Field(0.07, ge=0, le=1, description="minimum HSV saturation threshold (Otsu is raised to it)")
    median_um: float = Field(24.0, ge=0, description="median filter size on the saturation channel, µm")
    min_value: float = Field(0.12, ge=0, le=1, description="pixels darker than this HSV value are not tissue")
    max_value: float = Field(0.97, ge=0, le=1, description="pixels brighter than this (and unsaturated) are glass")
    close_um: float = Field(32.0, ge=0, description="closing disk diameter, µm")
    min_object_um2: float = Field(20000.0, ge=0, description="smaller tissue islands are dropped, µm²")
    min_hole_um2: float = Field(20000.0, ge=0, description="smaller holes are filled, µm²")
    reject_pen: bool = True


class TilingConfig(_Frozen):
    """The tile grid at the model's resolution; None means 'take it from the classifier bundle'."""

    mpp: float | None = Field(None, gt=0, description="tile resolution, µm/px")
    tile_size: int | None = Field(None, ge=16, le=4096, description="tile edge, px at the tile resolution")
    overlap: int = Field(0, ge=0, description="overlap between neighbouring tiles, px at the tile resolution")
    min_tissue: float = Field(0.25, ge=0, le=1, description="minimum tissue fraction for a tile to be kept (at 0, any "
                              "tissue: a tile without any is never kept)")


class InferenceConfig(_Frozen):
    """How the models are driven."""

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    batch_size: int | None = Field(None, ge=1, description="tiles per batch; None: 256 on CUDA, 4 per stream on CPU")
    workers: int | None = Field(None, ge=0, le=64, description="DataLoader reader processes; None: 1 per 4 CPU cores on CPU (at least 1), 3/8 of the cores (at most 8) on CUDA")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    threads: int | None = Field(None, ge=1, description="torch CPU threads (per stream when streams > 1); None: torch's "
                                "default, or 1 per stream")
    streams: int | None = Field(None, ge=1, le=256, description="batches in the models at once; None: on a CPU one per "
                                "`threads` cores (one per core by default), on CUDA 2 (each on its own CUDA stream); "
                                "always 1 with Grad-CAM explainers")
    cuda_graphs: bool = Field(False, description="on CUDA, replay each model stream's batches of `batch_size` as one "
                              "CUDA graph of the models (Med-CAM, without random certification fills): one call from "
                              "Python per batch instead of ~1,500; costs a copy of the activations per stream")
    explainer: Literal["medcam", "gradcam", "gradcam++", "hirescam", "layercam", "scorecam"] = "medcam"
    cam_area: float = Field(0.1, gt=0, le=1, description="Grad-CAM explainers: fraction of each tile kept as hard "
                            "evidence (their heatmaps are min-max normalised per tile, so they are cut by rank, "
                            "not at a value)")
    refine: int = Field(0, ge=0, description="refine the K most confident tiles per class with per-image Med-CAM")
    refine_steps: int = Field(40, ge=1, description="per-image steps of each refined tile")
    certify_fills: tuple[Literal["mean", "white", "blur", "noise", "uniform", "colour"], ...] = Field(
        ("mean", "white"), description="fills under which each tile's hard evidence is re-classified")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device_name(value)


class OutputConfig(_Frozen):
    """What is written per slide."""

    mask_mpp: float | None = Field(None, gt=0, description="µm/px of the evidence store's level 0; None: the slide's level 0")
    chunk_size: int = Field(1024, ge=64, le=8192, description="zarr chunk edge, px")
    min_pyramid_size: int = Field(512, ge=16, description="stop the pyramid when the longer side is below this")
    strip_px: int = Field(4096, ge=64, description="stitching strip width, px at the tile resolution: the stitcher's "
                          "memory grows with it, never with the slide's width")
    stitchers: int | None = Field(None, ge=0, le=64, description="stitching processes, each taking every N-th strip; "
                                  "0: stitch in the model process; None: 5/8 of the CPU cores on CUDA, 0 on CPU")
    overwrite: bool = False


class RunConfig(_Frozen):
    """Everything ``wsi-medcam run`` needs besides the slide paths."""

    classifier: Path | None = None
    segmenter: Path | None = None
    slide: SlideConfig = SlideConfig()
    tissue: TissueConfig = TissueConfig()
    tiling: TilingConfig = TilingConfig()
    inference: InferenceConfig = InferenceConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _refine_needs_a_segmenter(self) -> "RunConfig":
        if self.inference.refine and self.segmenter is None:
            raise ValueError("inference.refine refines Med-CAM masks: it needs a segmenter (--segmenter)")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Validate a nested dict; raise :class:`ConfigError` with one readable line per problem."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from None

    @classmethod
    def sections(cls) -> list[str]:
        """The fields that are sections of settings (``slide``, ``tissue`` ...), not single values."""
        return [name for name, field in cls.model_fields.items()
                if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)]

    @classmethod
    def from_yaml(cls, path: Path | None = None, overrides: dict[str, Any] | None = None) -> "RunConfig":
        """Load ``path`` (or the defaults), then apply dotted ``overrides`` such as ``{"tiling.overlap": 32}``.
        A section left empty (``inference:`` with nothing under it, which YAML reads as null) means
        its defaults; a section that is not a mapping (``inference: 5``) is one line naming it."""
        data = read_yaml_mapping(path) if path is not None else {}
        for section in cls.sections():
            if section in data and data[section] is None:
                del data[section]
            elif section in data and not isinstance(data[section], dict):
                raise ConfigError(f"config {path}: {section} must be a mapping of {section} settings, not {data[section]!r}")
        for dotted, value in (overrides or {}).items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return cls.from_dict(data)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (empty file: {}); anything else is one :class:`ConfigError`
    line naming the file, and for a syntax error the line and column (PyYAML's own message spans
    several lines)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config {path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return loaded


def validation_lines(exc: ValidationError, *, prefix: str = "", unknown: str = "unknown key") -> list[str]:
    """One ``prefix + field.path: message`` line per pydantic error; ``unknown`` for a key the model
    does not have."""
    lines = []
    for err in exc.errors():
        msg = unknown if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        lines.append(f"{prefix}{'.'.join(str(p) for p in err['loc'])}: {msg}" if err["loc"] else msg)
    return lines


def format_validation_error(exc: ValidationError) -> str:
    """Turn a pydantic error into ``field.path: message`` lines a user can act on."""
    return "invalid config: " + "; ".join(validation_lines(exc))
