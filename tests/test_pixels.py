"""pixels.py: the processors' geometry read from preprocessor_config.json and applied in uint8, torch-free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_search.pixels import (
    PREPROCESSOR_CONFIG,
    CropRounding,
    PixelSpec,
    PixelSpecError,
    UnsupportedProcessorError,
    load_pixel_spec,
    to_model_pixels,
)
from tests.support.jina import JINA_CLIP_V2_PREPROCESSOR_CONFIG, jina_stand_in_processor

def pictures(sizes: list[tuple[int, int]], seed: int = 1) -> list[Image.Image]:
    """Random RGB pictures of the given (width, height)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def normalised(pixels: np.ndarray, spec: PixelSpec) -> np.ndarray:
    """What the embedder does on the device, here in numpy: (3, H, W) float32."""
    mean = np.array(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.array(spec.std, dtype=np.float32).reshape(3, 1, 1)
    return (pixels.transpose(2, 0, 1).astype(np.float32) * np.float32(spec.rescale) - mean) / std


@pytest.mark.parametrize("processor_name", ["CLIPImageProcessor", "SiglipImageProcessor"])
def test_spec_read_from_a_saved_processor_reproduces_it(processor_name: str, tmp_path: Path) -> None:
    import transformers

    if processor_name == "CLIPImageProcessor":  # a non-default size and crop, so defaults cannot hide a misread
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 32})
    else:
        processor = transformers.SiglipImageProcessor(size={"height": 30, "width": 44})
    processor.save_pretrained(tmp_path)
    spec = load_pixel_spec(str(tmp_path))
    for image in pictures([(300, 400), (401, 299), (32, 32), (33, 100), (1000, 37), (41, 40)]):
        reference = processor(images=[image], return_tensors="np")["pixel_values"][0]
        ours = to_model_pixels(image, spec)
        assert ours.dtype == np.uint8 and (ours.shape[1], ours.shape[0]) == spec.output_size
        np.testing.assert_allclose(normalised(ours, spec), reference, atol=1e-5)


def test_jina_clip_v2_spec_equals_its_processor() -> None:
    spec = PixelSpec.from_processor_config(JINA_CLIP_V2_PREPROCESSOR_CONFIG)
    assert spec.shortest_edge == 512 and spec.output_size == (512, 512)
    assert spec.resample == Image.Resampling.BICUBIC and spec.crop_rounding is CropRounding.HALF_EVEN
    processor = jina_stand_in_processor(JINA_CLIP_V2_PREPROCESSOR_CONFIG)
    # Long sides of 515 and 519 after the resize leave odd margins (3 and 7 pixels), where torchvision's
    # rounded offset and transformers' floored one differ by a pixel.
    images = pictures([(515, 512), (512, 519), (1030, 1024), (300, 200), (64, 64), (512, 512)])
    floored = PixelSpec(512, None, (512, 512), CropRounding.FLOOR, spec.resample, spec.rescale, spec.mean, spec.std)
    differs_with_floor = 0
    for image in images:
        reference = processor(images=[image])["pixel_values"][0].numpy()
        ours = to_model_pixels(image, spec)
        assert ours.shape == (512, 512, 3) and ours.dtype == np.uint8
        np.testing.assert_allclose(normalised(ours, spec), reference, atol=1e-5)
        differs_with_floor += not np.allclose(normalised(to_model_pixels(image, floored), spec), reference, atol=1e-5)
    assert differs_with_floor >= 2  # the test pictures do exercise the rounding


def test_spec_crosses_to_worker_processes_intact() -> None:
    import pickle

    spec = PixelSpec.from_processor_config(JINA_CLIP_V2_PREPROCESSOR_CONFIG)
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_spec_needs_exactly_one_resize_and_a_crop_that_fits() -> None:
    with pytest.raises(ValueError):
        PixelSpec(None, None, None, CropRounding.FLOOR, Image.Resampling.BICUBIC, 1 / 255, (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="centre crop"):
        PixelSpec(224, None, None, CropRounding.FLOOR, Image.Resampling.BICUBIC, 1 / 255, (0, 0, 0), (1, 1, 1))
    with pytest.raises(UnsupportedProcessorError, match="larger"):
        PixelSpec.from_processor_config({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 200},
                                         "crop_size": {"height": 224, "width": 224}})


@pytest.mark.parametrize("config", [
    {"image_processor_type": "ViTImageProcessorFast"},
    {},
    {"image_processor_type": "CLIPImageProcessor", "do_resize": False},
    {"image_processor_type": "CLIPImageProcessor", "do_center_crop": False},
    {**JINA_CLIP_V2_PREPROCESSOR_CONFIG, "resize_mode": "longest"},
    {"image_processor_type": "SiglipImageProcessor", "image_mean": [0.5, 0.5]},
])
def test_processors_not_mirrored_are_refused_clearly(config: dict) -> None:
    with pytest.raises(UnsupportedProcessorError):
        PixelSpec.from_processor_config(config)


def test_a_model_directory_without_the_file_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PixelSpecError, match=PREPROCESSOR_CONFIG) as caught:
        load_pixel_spec(str(tmp_path))
    assert "\n" not in str(caught.value) and str(tmp_path) in str(caught.value)
    (tmp_path / PREPROCESSOR_CONFIG).write_text("{not json")
    with pytest.raises(PixelSpecError, match="JSON"):
        load_pixel_spec(str(tmp_path))


@pytest.mark.e2e
def test_pixels_module_reads_dirs_and_the_hub_cache_without_importing_torch(tmp_path: Path) -> None:
    # A hub cache laid out as huggingface_hub lays it out, holding only jina-clip-v2's preprocessor config.
    snapshot = tmp_path / "hub" / "models--jinaai--jina-clip-v2" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / PREPROCESSOR_CONFIG).write_text(json.dumps(JINA_CLIP_V2_PREPROCESSOR_CONFIG))
    (tmp_path / "hub" / "models--jinaai--jina-clip-v2" / "refs").mkdir()
    (tmp_path / "hub" / "models--jinaai--jina-clip-v2" / "refs" / "main").write_text("0123abcd")
    local = tmp_path / "local-model"
    local.mkdir()
    (local / PREPROCESSOR_CONFIG).write_text(json.dumps({"image_processor_type": "SiglipImageProcessor",
                                                         "size": {"height": 16, "width": 24}}))
    script = textwrap.dedent(f"""
        import sys
        from PIL import Image
        from image_search.pixels import load_pixel_spec, to_model_pixels
        hub = load_pixel_spec("jinaai/jina-clip-v2")
        here = load_pixel_spec({str(local)!r})
        picture = Image.new("RGB", (700, 600), (10, 20, 30))
        print(to_model_pixels(picture, hub).shape, to_model_pixels(picture, here).shape)
        print(sorted(m for m in ("torch", "transformers", "torchvision") if m in sys.modules))
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["(512, 512, 3) (16, 24, 3)", "[]"]


def test_a_hub_model_missing_from_the_cache_offline_is_one_line(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    with pytest.raises(PixelSpecError, match="no-such-org/no-such-model.*preprocessor_config.json.*HF_HUB_OFFLINE"):
        load_pixel_spec("no-such-org/no-such-model")
