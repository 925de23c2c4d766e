"""The tiny random CLIP the tests and the benchmark load through the real ``from_pretrained`` path."""

from __future__ import annotations

from pathlib import Path

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
