"""A stand-in for jina-clip-implementation's modeling_clip.py: ``JinaCLIPModel`` with the methods the
embedder relies on. ``get_image_features(pixel_values)`` is ``visual_projection(vision_model(x=...))``
as in the remote code; ``encode_image`` (the remote per-image PIL loop) must never be called."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_clip import JinaCLIPConfig
from .eva_model import EVAVisionTransformer


class JinaCLIPModel(PreTrainedModel):
    config_class = JinaCLIPConfig

    def __init__(self, config: JinaCLIPConfig) -> None:
        super().__init__(config)
        self.vision_model = EVAVisionTransformer(config.image_size, config.patch_size, config.width, config.heads)
        self.visual_projection = nn.Identity()
        self.image_feature_calls = 0

    def _init_weights(self, module: nn.Module) -> None:
        """The modules' own random initialisation is kept (weights are saved and loaded by the tests)."""

    def get_image_features(self, pixel_values: torch.Tensor | None = None, *_: object, **__: object) -> torch.Tensor:
        self.image_feature_calls += 1
        return self.visual_projection(self.vision_model(x=pixel_values))

    def encode_image(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("encode_image preprocesses image by image: the embedder must not call it")
