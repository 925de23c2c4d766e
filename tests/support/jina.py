"""Stand-ins for jina-clip (jinaai/jina-clip-v2 and its remote code, jinaai/jina-clip-implementation),
for tests without a download: its published preprocessor configuration, its image processor rebuilt
from that configuration, and a tiny model saved as a remote-code checkpoint (tests/support/jina_remote_code/)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from tests.support.jina_remote_code.configuration_clip import JinaCLIPConfig
from tests.support.jina_remote_code.modeling_clip import JinaCLIPModel

REMOTE_CODE = Path(__file__).resolve().parent / "jina_remote_code"
REMOTE_CODE_FILES = ("configuration_clip.py", "modeling_clip.py", "eva_model.py")

# jina-clip-v2's preprocessor_config.json as published (huggingface.co/jinaai/jina-clip-v2, main).
JINA_CLIP_V2_PREPROCESSOR_CONFIG = {
    "auto_map": {
        "AutoImageProcessor": "jinaai/jina-clip-implementation--processing_clip.JinaCLIPImageProcessor",
        "AutoProcessor": "jinaai/jina-clip-implementation--processing_clip.JinaCLIPProcessor",
    },
    "fill_color": 0,
    "image_processor_type": "JinaCLIPImageProcessor",
    "interpolation": "bicubic",
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "processor_class": "JinaCLIPProcessor",
    "resize_mode": "shortest",
    "size": 512,
    "std": [0.26862954, 0.26130258, 0.27577711],
}


def jina_stand_in_model(image_size: int = 32, seed: int = 0) -> JinaCLIPModel:
    """A tiny JinaCLIPModel (two EVA attention blocks, 32-dimensional output, Matryoshka 8/16/32), in eval mode."""
    torch.manual_seed(seed)
    return JinaCLIPModel(JinaCLIPConfig(image_size=image_size)).eval()


def save_jina_stand_in(directory: Path, image_size: int = 32) -> Path:
    """The stand-in saved as jina-clip-v2 is published: weights, a config.json whose auto_map points at
    remote code in the directory, that code, and jina's preprocessor_config.json at the tiny size."""
    model = jina_stand_in_model(image_size)
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_clip.JinaCLIPConfig", "AutoModel": "modeling_clip.JinaCLIPModel"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in REMOTE_CODE_FILES:
        shutil.copy(REMOTE_CODE / name, directory / name)
    preprocessor = {**JINA_CLIP_V2_PREPROCESSOR_CONFIG, "size": image_size}
    del preprocessor["auto_map"]  # jina's processor code is not among the stand-in's files
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return directory


def jina_stand_in_processor(config: dict) -> Any:
    """jina's JinaCLIPImageProcessor as its remote code builds it (a transformers BaseImageProcessor
    whose transform is open_clip's eval ``image_transform``), from the same configuration values:
    for resize_mode "shortest" and a square size that is torchvision's Resize(size) on the short
    side, CenterCrop(size), RGB, ToTensor, Normalize(mean, std)."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
    from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

    class JinaCLIPImageProcessor(BaseImageProcessor):
        model_input_names = ["pixel_values"]

        def __init__(self, size: int, mean, std, resize_mode: str, interpolation: str, fill_color: int, **kwargs):
            super().__init__(**kwargs)
            assert resize_mode == "shortest"
            mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
            self.transform = Compose([Resize(size, interpolation=mode), CenterCrop(size),
                                      lambda im: im.convert("RGB"), ToTensor(), Normalize(mean=mean, std=std)])

        def preprocess(self, images, **kwargs) -> BatchFeature:
            return BatchFeature(data={"pixel_values": torch.stack([self.transform(im) for im in images])})

    settings = {k: v for k, v in config.items() if k not in ("auto_map", "image_processor_type", "processor_class")}
    return JinaCLIPImageProcessor(**settings)
