"""Shared fixtures: a tiny CLIP model saved to disk (no network) and config files in temp trees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_DIMENSION = 32


def save_tiny_clip(directory: Path, *, projection_dim: int = TINY_DIMENSION, image_size: int = 32, seed: int = 0) -> Path:
    """A randomly initialised CLIP with tiny towers, saved like any checkpoint (config, weights, processor)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                     "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                       "num_hidden_layers": 2, "image_size": image_size, "patch_size": 8},
        projection_dim=projection_dim,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def save_picture(path: Path, seed: int, size: tuple[int, int] = (96, 72), fmt: str | None = None) -> Path:
    """A distinct picture per seed: blocks of random colours (not noise, so JPEG keeps it recognisable)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def write_config(root: Path, model_dir: Path | None = None, **overrides: object) -> Path:
    """A config for a tree under ``root`` (images/, inbox/, output/, processed/, state/); keys as in JSON."""
    for name in ("images", "inbox", "output", "processed", "state"):
        (root / name).mkdir(parents=True, exist_ok=True)
    cfg: dict[str, object] = {
        "source-directory": str(root / "images"),
        "inbox-directory": str(root / "inbox"),
        "output-directory": str(root / "output"),
        "processed-directory": str(root / "processed"),
        "state-directory": str(root / "state"),
        "device": "cpu",
        "dimension": TINY_DIMENSION,
        "resize-width": 256,
        "resize-height": 256,
        "batch-size": 8,
        "settle-seconds": 0.3,
    }
    if model_dir is not None:
        cfg["model-name"] = str(model_dir)
    cfg.update({k.replace("_", "-"): v for k, v in overrides.items()})
    path = root / "config.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path
