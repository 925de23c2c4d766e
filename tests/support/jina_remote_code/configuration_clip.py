"""A stand-in for jina-clip-implementation's configuration_clip.py: the settings of a tiny JinaCLIPModel."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class JinaCLIPConfig(PretrainedConfig):
    model_type = "jina_clip"

    def __init__(self, image_size: int = 32, patch_size: int = 8, width: int = 32, heads: int = 2,
                 matryoshka_dimensions: list[int] | None = None, truncate_dim: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.heads = heads
        self.matryoshka_dimensions = matryoshka_dimensions if matryoshka_dimensions is not None else [8, 16, 32]
        self.truncate_dim = truncate_dim
