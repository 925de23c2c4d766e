"""What a model's image processor does to a picture, without torch: read, described and applied in uint8.

Worker processes import this module to produce the model's input at the model's size; they must
never import torch or transformers (each would cost seconds and hundreds of MB per process), so this
module reads ``preprocessor_config.json`` itself and does the geometric part (resize, centre crop)
with Pillow. The arithmetic part (rescale, mean, std) stays with the embedder, on the device, where a
uint8 batch is a quarter of the bytes of a float batch to upload.

Three processors are mirrored, each read from its saved configuration:

- transformers' ``CLIPImageProcessor``: resize the short side, centre crop (offsets floored);
- transformers' ``SiglipImageProcessor``: resize to an exact size, no crop;
- jina-clip's ``JinaCLIPImageProcessor`` (jina-clip-v1/v2 remote code): open_clip's eval transform,
  i.e. torchvision ``Resize(size)`` on the short side, ``CenterCrop(size)`` (offsets rounded half to
  even, as torchvision does), ``ToTensor``, ``Normalize(mean, std)``.

Anything else raises ``UnsupportedProcessorError``: the embedder then uses the model's own processor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import ModelError, describe
from .geometry import model_crop, model_resize

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# OpenAI CLIP's statistics: the defaults of CLIPImageProcessor and of jina's processor.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' IMAGENET_STANDARD_*: SiglipImageProcessor's defaults.
STANDARD_MEAN = (0.5, 0.5, 0.5)
STANDARD_STD = (0.5, 0.5, 0.5)


class PixelSpecError(ModelError):
    """The processor configuration cannot be found or read; the message names the file and the fix."""


class UnsupportedProcessorError(PixelSpecError):
    """The configuration describes a processor this module does not mirror (use the model's own)."""


class CropRounding(str, Enum):
    """How a centre crop places an odd margin: the two libraries differ by one pixel for some sizes."""

    FLOOR = "floor"  # transformers' center_crop: (size - crop) // 2
    HALF_EVEN = "half-even"  # torchvision's CenterCrop: int(round((size - crop) / 2)), Python's rounding


@dataclass(frozen=True)
class PixelSpec:
    """The model's image preprocessing: geometry (done here, uint8) and arithmetic (done by the embedder).

    Exactly one of ``shortest_edge`` and ``exact_size`` is set. The output of ``to_model_pixels`` is
    always ``output_size``: a shortest-edge resize is only accepted with a centre crop.
    """

    shortest_edge: int | None  # resize so the short side is this many pixels, keeping the aspect ratio
    exact_size: tuple[int, int] | None  # or resize to exactly (width, height)
    crop: tuple[int, int] | None  # then centre crop to (width, height)
    crop_rounding: CropRounding
    resample: Image.Resampling
    rescale: float  # multiply the uint8 values by this (1/255), then
    mean: tuple[float, float, float]  # subtract the mean and
    std: tuple[float, float, float]  # divide by the std, per RGB channel

    def __post_init__(self) -> None:
        if (self.shortest_edge is None) == (self.exact_size is None):
            raise ValueError("PixelSpec needs exactly one of shortest_edge and exact_size")
        if self.shortest_edge is not None and self.crop is None:
            raise ValueError("PixelSpec with a shortest-edge resize needs a centre crop (else sizes vary)")
        if self.crop is not None:
            # A crop never larger than the resized picture: the libraries pad such pictures differently.
            room = (self.shortest_edge,) * 2 if self.shortest_edge is not None else self.exact_size
            assert room is not None
            if self.crop[0] > room[0] or self.crop[1] > room[1]:
                raise ValueError(f"PixelSpec crop {self.crop} is larger than the resized picture ({room})")

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of every array ``to_model_pixels`` returns."""
        size = self.crop if self.crop is not None else self.exact_size
        assert size is not None
        return size

    @classmethod
    def from_processor_config(cls, config: dict[str, Any]) -> PixelSpec:
        """Read a ``preprocessor_config.json`` dict; ``UnsupportedProcessorError`` if it is not mirrored."""
        kind = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
        try:
            return cls._read(kind, config)
        except (ValueError, TypeError) as exc:  # e.g. a crop larger than the resize: a shape we do not mirror
            raise UnsupportedProcessorError(f"{kind}: {exc}") from None

    @staticmethod
    def _read(kind: str, config: dict[str, Any]) -> PixelSpec:
        if kind in ("CLIPImageProcessor", "CLIPFeatureExtractor"):
            return _clip_spec(config)
        if kind == "SiglipImageProcessor":
            return _siglip_spec(config)
        if kind == "JinaCLIPImageProcessor":
            return _jina_spec(config)
        # The "Fast" variants resize tensors with torchvision's antialias, not Pillow: not the same pixels.
        raise UnsupportedProcessorError(
            f"image processor '{kind or 'unnamed'}' is not one of CLIPImageProcessor, SiglipImageProcessor, "
            "JinaCLIPImageProcessor"
        )


def _pair(value: Any, what: str) -> tuple[int, int]:
    """(width, height) from an int, a {"height", "width"} dict or a [height, width] list."""
    if isinstance(value, bool):
        raise UnsupportedProcessorError(f"{what} {value!r} is not a size")
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["width"]), int(value["height"])
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[1]), int(value[0])
    raise UnsupportedProcessorError(f"{what} {value!r} is not a size this module understands")


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3  # type: ignore[return-value]
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return float(value[0]), float(value[1]), float(value[2])
    raise UnsupportedProcessorError(f"{what} {value!r} is not one value per RGB channel")


def _arithmetic(config: dict[str, Any], mean_default: tuple[float, float, float],
                std_default: tuple[float, float, float]) -> tuple[float, tuple[float, float, float], tuple[float, float, float]]:
    """Rescale factor, mean and std of a transformers image processor (1, 0 and 1 where switched off)."""
    rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
    if config.get("do_normalize", True):
        mean = _triple(config.get("image_mean", mean_default), "image_mean")
        std = _triple(config.get("image_std", std_default), "image_std")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return rescale, mean, std


def _clip_spec(config: dict[str, Any]) -> PixelSpec:
    # Defaults are CLIPImageProcessor's own, for keys an older checkpoint left out.
    if not config.get("do_resize", True):
        raise UnsupportedProcessorError("CLIPImageProcessor with do_resize false gives pictures of any size")
    size = config.get("size", {"shortest_edge": 224})
    if isinstance(size, int):  # the old format: an int means the short side
        size = {"shortest_edge": size}
    crop = _pair(config.get("crop_size", 224), "crop_size") if config.get("do_center_crop", True) else None
    rescale, mean, std = _arithmetic(config, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    resample = Image.Resampling(int(config.get("resample", Image.Resampling.BICUBIC)))
    if isinstance(size, dict) and "shortest_edge" in size:
        if crop is None:
            raise UnsupportedProcessorError("CLIPImageProcessor without a centre crop gives pictures of any size")
        return PixelSpec(int(size["shortest_edge"]), None, crop, CropRounding.FLOOR, resample, rescale, mean, std)
    return PixelSpec(None, _pair(size, "size"), crop, CropRounding.FLOOR, resample, rescale, mean, std)


def _siglip_spec(config: dict[str, Any]) -> PixelSpec:
    if not config.get("do_resize", True):
        raise UnsupportedProcessorError("SiglipImageProcessor with do_resize false gives pictures of any size")
    rescale, mean, std = _arithmetic(config, STANDARD_MEAN, STANDARD_STD)
    resample = Image.Resampling(int(config.get("resample", Image.Resampling.BICUBIC)))
    size = _pair(config.get("size", {"height": 224, "width": 224}), "size")
    return PixelSpec(None, size, None, CropRounding.FLOOR, resample, rescale, mean, std)


def _jina_spec(config: dict[str, Any]) -> PixelSpec:
    # jina's processor hands its settings to open_clip's image_transform(is_train=False). Its
    # interpolation is bilinear when it says so and bicubic otherwise ("random" included).
    resample = Image.Resampling.BILINEAR if config.get("interpolation", "bicubic") == "bilinear" else Image.Resampling.BICUBIC
    mean = _triple(config.get("mean", OPENAI_CLIP_MEAN), "mean")
    std = _triple(config.get("std", OPENAI_CLIP_STD), "std")
    size = _pair(config.get("size", 224), "size")
    mode = config.get("resize_mode", "shortest")
    if mode == "squash":  # torchvision Resize((h, w)): an exact resize, no crop
        return PixelSpec(None, size, None, CropRounding.HALF_EVEN, resample, 1 / 255, mean, std)
    if mode == "shortest" and size[0] == size[1]:  # Resize(size) on the short side, then CenterCrop(size)
        return PixelSpec(size[0], None, size, CropRounding.HALF_EVEN, resample, 1 / 255, mean, std)
    # "longest" pads with fill_color; a non-square "shortest" uses open_clip's ResizeKeepRatio.
    raise UnsupportedProcessorError(f"JinaCLIPImageProcessor with resize_mode '{mode}' and size {size} is not mirrored")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def preprocessor_config_path(model_name_or_dir: str) -> Path:
    """Where ``preprocessor_config.json`` is: in a local model directory, or in the Hugging Face cache
    (downloaded once when online). ``PixelSpecError`` with one line naming the file if it is not there."""
    local = Path(model_name_or_dir).expanduser()
    if local.is_dir():
        path = local / PREPROCESSOR_CONFIG
        if not path.is_file():
            raise PixelSpecError(f"model directory '{model_name_or_dir}' has no {PREPROCESSOR_CONFIG}: "
                                 "copy it from the model's checkpoint (it says how pictures are resized)")
        return path
    # huggingface_hub is torch-free; its cache lookup needs no network.
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(model_name_or_dir, PREPROCESSOR_CONFIG)
    if isinstance(cached, str):
        return Path(cached)
    if not _offline():
        try:
            return Path(hf_hub_download(model_name_or_dir, PREPROCESSOR_CONFIG))
        except Exception as exc:  # any hub failure (network, missing repo or file) is the same one line
            raise PixelSpecError(f"model '{model_name_or_dir}': {PREPROCESSOR_CONFIG} could not be downloaded "
                                 f"({describe(exc)})") from None
    raise PixelSpecError(f"model '{model_name_or_dir}': {PREPROCESSOR_CONFIG} is not in the local Hugging Face "
                         "cache (HF_HUB_OFFLINE is set)")


def load_pixel_spec(model_name_or_dir: str) -> PixelSpec:
    """The ``PixelSpec`` of a model (hub id or local directory), read from its ``preprocessor_config.json``.

    ``PixelSpecError`` if the file is missing or unreadable; ``UnsupportedProcessorError`` (a subclass)
    if it describes a processor this module does not mirror.
    """
    path = preprocessor_config_path(model_name_or_dir)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PixelSpecError(f"{path} cannot be read as JSON ({describe(exc)})") from None
    if not isinstance(config, dict):
        raise PixelSpecError(f"{path} is not a JSON object")
    return PixelSpec.from_processor_config(config)


def to_model_pixels(image: Image.Image, spec: PixelSpec) -> np.ndarray:
    """The picture at the model's input size: an (height, width, 3) uint8 array, resized and cropped
    exactly as the model's processor does before its arithmetic."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    # The sizes come from ``geometry``, as the batched JPEG decoder's do.
    target = model_resize(image.size, spec)
    if target != image.size:
        image = image.resize(target, resample=spec.resample)
    box = model_crop(image.size, spec)
    if box is not None:
        image = image.crop(box)
    return np.asarray(image, dtype=np.uint8)
