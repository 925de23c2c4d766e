"""The embedder: loading through from_pretrained, the uint8 fast path, unit vectors, dimension checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.model import TINY_DIMENSION, save_tiny_clip
from image_search.embed import (
    DimensionError,
    Embedder,
    ModelInfo,
    ModelLoadError,
    _clip_geometry,
    _resize_and_crop,
    check_dimension,
)


def _pictures() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    sizes = [(300, 400), (401, 299), (32, 32), (33, 100), (1000, 37), (224, 224)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def embedder(tiny_model_dir: Path) -> Embedder:
    return Embedder.load(str(tiny_model_dir), device="cpu", dimension=TINY_DIMENSION)


def test_fast_pixel_path_equals_the_models_own_processor(embedder: Embedder) -> None:
    images = _pictures()
    reference = embedder._processor(images=images, return_tensors="pt")["pixel_values"]
    fast = embedder._pixels(images)
    assert fast.shape == reference.shape
    assert torch.allclose(fast, reference, atol=1e-5)


@pytest.mark.parametrize("processor_name", ["CLIPImageProcessor", "SiglipImageProcessor"])
def test_resize_and_crop_mirror_stock_processors(processor_name: str) -> None:
    import transformers

    processor = getattr(transformers, processor_name)()  # stock settings: CLIP 224 crop, SigLIP 224 square
    geometry = _clip_geometry(processor)
    assert geometry is not None
    mean = np.array(geometry.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.array(geometry.std, dtype=np.float32).reshape(3, 1, 1)
    for image in _pictures():
        reference = processor(images=[image], return_tensors="np")["pixel_values"][0]
        ours = (_resize_and_crop(image, geometry).transpose(2, 0, 1).astype(np.float32) * geometry.rescale - mean) / std
        assert ours.shape == reference.shape
        np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_embeddings_are_unit_float32_and_deterministic(embedder: Embedder) -> None:
    images = _pictures()
    first = embedder.embed_images(images)
    assert first.dtype == np.float32 and first.shape == (len(images), TINY_DIMENSION)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([embedder.embed_images([im]) for im in images])
    np.testing.assert_allclose(first, one_by_one, atol=1e-5)  # batching changes nothing
    assert embedder.embed_images([]).shape == (0, TINY_DIMENSION)


def test_out_of_memory_splits_the_batch_and_keeps_the_smaller_size(embedder: Embedder, monkeypatch) -> None:
    images = _pictures()
    expected = embedder.embed_images(images)
    real_forward = embedder._forward
    seen: list[int] = []

    def forward_that_fits_two(batch, truncate):  # a GPU that holds two images at a time
        seen.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(batch, truncate)

    monkeypatch.setattr(embedder, "_forward", forward_that_fits_two)
    monkeypatch.setattr(embedder, "max_batch", 64)
    np.testing.assert_allclose(embedder.embed_images(images), expected, atol=1e-5)
    assert embedder.max_batch == 2
    assert seen[0] == len(images) and max(seen[-3:]) <= 2


def test_configured_dimension_must_be_one_the_model_produces(tiny_model_dir: Path) -> None:
    with pytest.raises(DimensionError, match="'dimension' is 64.*produces 32"):
        Embedder.load(str(tiny_model_dir), device="cpu", dimension=64)
    jina = ModelInfo("jinaai/jina-clip-v2", "jina", 1024, (32, 64, 128, 256, 512, 768, 1024))
    assert check_dimension(jina, 256) == 256
    with pytest.raises(DimensionError, match="one of 32, 64"):
        check_dimension(jina, 300)
    clip = ModelInfo("clip", "clip", 512, ())
    with pytest.raises(DimensionError):
        check_dimension(clip, 256)  # plain CLIP cannot be truncated meaningfully


def test_a_model_that_cannot_be_found_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model.*HF_HUB_OFFLINE"):
        Embedder.load("no-such-org/no-such-model", device="cpu")
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="broken-model"):
        Embedder.load(str(broken), device="cpu")


def test_cuda_request_without_a_gpu_falls_back_to_cpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model = save_tiny_clip(tmp_path / "m")
    assert Embedder.load(str(model), device="cuda").device.type == "cpu"
