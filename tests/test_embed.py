"""The embedder: loading through from_pretrained, the uint8 fast path, unit vectors, dimension checks."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from structlog.testing import capture_logs

from tests.support.model import TINY_DIMENSION, save_tiny_clip
from image_search.embed import (
    DEFAULT_MAX_BATCH,
    DimensionError,
    Embedder,
    ModelInfo,
    ModelLoadError,
    _ModelInput,
    check_dimension,
    choose_dtype,
)
from image_search.pixels import PixelSpec, to_model_pixels
from image_search.preprocess import normalised_pixels, preprocess_image
from tests.support.jina import JINA_CLIP_V2_PREPROCESSOR_CONFIG, jina_stand_in_model, jina_stand_in_processor, save_jina_stand_in

pytestmark = pytest.mark.integration


def _pictures() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    sizes = [(300, 400), (401, 299), (32, 32), (33, 100), (1000, 37), (224, 224)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def embedder(tiny_model_dir: Path) -> Embedder:
    return Embedder.load(str(tiny_model_dir), device="cpu", dimension=TINY_DIMENSION)


def test_fast_pixel_path_equals_the_models_own_processor(embedder: Embedder, tiny_model_dir: Path) -> None:
    from transformers import CLIPImageProcessor

    assert embedder.pixel_spec is not None and embedder._processor is None  # the fast path, no processor loaded
    images = _pictures()
    reference = CLIPImageProcessor.from_pretrained(tiny_model_dir)(images=images, return_tensors="pt")["pixel_values"]
    fast = embedder._input.from_images(images)
    assert fast.shape == reference.shape
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)


def test_embeddings_are_unit_float32_and_deterministic(embedder: Embedder) -> None:
    images = _pictures()
    first = embedder.embed_images(images)
    assert first.dtype == np.float32 and first.shape == (len(images), TINY_DIMENSION)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([embedder.embed_images([im]) for im in images])
    np.testing.assert_allclose(first, one_by_one, atol=1e-5)  # batching changes nothing
    assert embedder.embed_images([]).shape == (0, TINY_DIMENSION)


def test_embed_images_of_pixels_takes_model_sized_uint8_in_passes_of_max_batch(embedder: Embedder, monkeypatch) -> None:
    images = _pictures()
    assert embedder.pixel_spec is not None
    batch = np.stack([to_model_pixels(im, embedder.pixel_spec) for im in images])
    expected = embedder.embed_images(images)
    passes: list[int] = []
    real_forward = embedder._forward

    def counting_forward(pixel_values: torch.Tensor) -> torch.Tensor:
        passes.append(len(pixel_values))
        return real_forward(pixel_values)

    monkeypatch.setattr(embedder, "_forward", counting_forward)
    monkeypatch.setattr(embedder, "max_batch", 4)
    np.testing.assert_allclose(embedder.embed_images(batch), expected, atol=1e-5)
    assert passes == [4, 2]  # the forward pass size is max_batch, not the caller's batch
    assert embedder.embed_images(batch[:0]).shape == (0, TINY_DIMENSION)
    with pytest.raises(ValueError, match="uint8"):
        embedder.embed_images(batch.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(n, 32, 32, 3\)"):
        embedder.embed_images(batch[:, :16])


def test_pixels_decoded_on_the_device_embed_as_host_pixels_do(embedder: Embedder) -> None:
    """The batched JPEG decoder hands over tensors on the model's device, the CPU workers numpy arrays,
    one batch may hold both: each gives the vector its pixels give."""
    assert embedder.pixel_spec is not None
    rows = [to_model_pixels(im, embedder.pixel_spec) for im in _pictures()]
    expected = embedder.embed_images(np.stack(rows))
    np.testing.assert_allclose(embedder.embed_images(torch.from_numpy(np.stack(rows))), expected, atol=1e-6)
    mixed = [torch.from_numpy(r.copy()) if i % 2 else r for i, r in enumerate(rows)]
    np.testing.assert_allclose(embedder.embed_images(mixed), expected, atol=1e-6)
    np.testing.assert_allclose(embedder.embed_images(rows), expected, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        embedder.embed_images(torch.from_numpy(np.stack(rows)).float())


def test_prepared_pictures_take_the_same_way_in(embedder: Embedder, tmp_path: Path) -> None:
    """``embed_images`` is the one way in: a prepared picture with the model's input (the workers', the GPU
    decoder's), one with only its image (a query's) and the PIL image itself give the same vector."""
    assert embedder.pixel_spec is not None
    path = tmp_path / "picture.png"
    _pictures()[0].save(path)
    with_image = preprocess_image(path, max_size=(64, 64), max_pixels=10**8)
    with_pixels = preprocess_image(path, max_size=(64, 64), max_pixels=10**8,
                                   model_input=functools.partial(to_model_pixels, spec=embedder.pixel_spec)).without_image()
    assert with_pixels.image is None and with_pixels.pixels is not None
    expected = embedder.embed_images([with_image.image])
    np.testing.assert_allclose(embedder.embed_images([with_image, with_pixels]), np.concatenate([expected, expected]),
                               atol=1e-5)


def test_out_of_memory_splits_the_batch_and_keeps_the_smaller_size(embedder: Embedder, monkeypatch) -> None:
    images = _pictures()
    expected = embedder.embed_images(images)
    real_forward = embedder._forward
    seen: list[int] = []

    def forward_that_fits_two(pixel_values: torch.Tensor) -> torch.Tensor:  # a GPU that holds two images at a time
        seen.append(len(pixel_values))
        if len(pixel_values) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(pixel_values)

    monkeypatch.setattr(embedder, "_forward", forward_that_fits_two)
    monkeypatch.setattr(embedder, "max_batch", 64)
    np.testing.assert_allclose(embedder.embed_images(images), expected, atol=1e-5)
    assert embedder.max_batch == 2
    assert seen[0] == len(images) and max(seen[-3:]) <= 2


def test_a_processor_not_mirrored_is_used_as_it_is(tmp_path: Path) -> None:
    from transformers import ViTImageProcessor

    model_dir = save_tiny_clip(tmp_path / "vit-processor")
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(model_dir)  # replaces the CLIP processor's preprocessor_config.json
    fallback = Embedder.load(str(model_dir), device="cpu")
    assert fallback.pixel_spec is None and fallback.max_batch == DEFAULT_MAX_BATCH
    images = _pictures()
    with torch.inference_mode():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        expected = torch.nn.functional.normalize(fallback._model.get_image_features(pixel_values=pixels), dim=-1)
    np.testing.assert_allclose(fallback.embed_images(images), expected.numpy(), atol=1e-5)
    # The workers hand such a model the normalised picture itself: the same vectors.
    from_workers = [normalised_pixels(im) for im in images]
    np.testing.assert_allclose(fallback.embed_images(from_workers), expected.numpy(), atol=1e-5)
    with pytest.raises(RuntimeError, match="embed_images"):
        fallback.embed_images(np.zeros((1, 32, 32, 3), dtype=np.uint8))


def test_jina_pixels_on_the_device_equal_its_processor() -> None:
    spec = PixelSpec.from_processor_config(JINA_CLIP_V2_PREPROCESSOR_CONFIG)
    model_input = _ModelInput.build(torch.device("cpu"), torch.float32, spec, None)
    images = [Image.fromarray(a) for a in np.random.default_rng(5).integers(0, 256, (3, 515, 600, 3), dtype=np.uint8)]
    images.append(Image.new("RGB", (700, 1400), (200, 30, 90)))
    reference = jina_stand_in_processor(JINA_CLIP_V2_PREPROCESSOR_CONFIG)(images)["pixel_values"]
    ours = model_input.from_images(images)
    assert ours.shape == reference.shape == (4, 3, 512, 512)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_jina_goes_through_get_image_features_then_truncates_then_normalises() -> None:
    config = {**JINA_CLIP_V2_PREPROCESSOR_CONFIG, "size": 32}  # the stand-in tower's input size
    spec = PixelSpec.from_processor_config(config)
    model = jina_stand_in_model(image_size=32)  # its encode_image raises
    info = ModelInfo("jina stand-in", "jina", 32, (8, 16, 32))
    jina = Embedder(model, info, torch.device("cpu"), torch.float32, check_dimension(info, 16), pixel_spec=spec)
    images = _pictures()
    vectors = jina.embed_images(images)
    assert vectors.shape == (len(images), 16) and model.image_feature_calls == 1
    with torch.inference_mode():
        full = model.get_image_features(pixel_values=jina_stand_in_processor(config)(images)["pixel_values"])
    expected = torch.nn.functional.normalize(full[:, :16], dim=-1).numpy()  # truncate first, then normalise
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert not np.allclose(vectors, torch.nn.functional.normalize(full, dim=-1)[:, :16].numpy(), atol=1e-3)


def test_a_jina_checkpoint_loads_through_the_fast_path_with_sdpa_attention(tmp_path: Path) -> None:
    """Embedder.load on a jina-style remote-code checkpoint: family jina, EVA attention patched, pixels
    from jina's preprocessor config, vectors from get_image_features (its encode_image raises). In a
    subprocess, so the remote code is cached under tmp_path and not in the user's HF_MODULES_CACHE."""
    model_dir = save_jina_stand_in(tmp_path / "jina_stand_in_checkpoint")
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from PIL import Image
        from structlog.testing import capture_logs
        from image_search.embed import Embedder
        from image_search.pixels import to_model_pixels
        with capture_logs() as logs:
            jina = Embedder.load({str(model_dir)!r}, device="cpu", dimension=16)
        pictures = [Image.new("RGB", (90, 60), (200, 10, 10)), Image.new("RGB", (33, 70), (10, 200, 10))]
        vectors = jina.embed_images(pictures)
        again = jina.embed_images(np.stack([to_model_pixels(p, jina.pixel_spec) for p in pictures]))
        attention = [m for m in jina._model.modules() if type(m).__name__ == "Attention"]
        print(json.dumps({{
            "family": jina.info.family, "native": jina.info.native_dimension,
            "matryoshka": list(jina.info.matryoshka_dimensions), "dimension": jina.dimension,
            "input": list(jina.pixel_spec.output_size), "shape": list(vectors.shape),
            "norms": np.linalg.norm(vectors, axis=1).round(5).tolist(), "same": bool(np.allclose(vectors, again, atol=1e-6)),
            "attention_modules": sorted({{type(m).__module__.rsplit(".", 1)[-1] for m in attention}}),
            "patched": [m.forward.__func__.__name__ for m in attention],
            "events": [e["event"] for e in logs if e["event"] in ("eva_attention_patched", "model_loaded")],
            "feature_calls": jina._model.image_feature_calls,
        }}))
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["family"] == "jina" and report["native"] == 32 and report["matryoshka"] == [8, 16, 32]
    assert report["dimension"] == 16 and report["input"] == [32, 32] and report["shape"] == [2, 16]
    assert report["norms"] == [1.0, 1.0] and report["same"]
    assert report["attention_modules"] == ["eva_model"] and report["patched"] == ["_sdpa_forward"] * 2
    assert report["events"] == ["eva_attention_patched", "model_loaded"]
    assert report["feature_calls"] >= 3  # the size probe at load, then the two embeddings


def test_dtype_is_float32_on_cpu_and_bfloat16_for_jina_on_ampere_and_later(monkeypatch) -> None:
    assert choose_dtype(torch.device("cpu"), "jina") == torch.float32
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert choose_dtype(cuda, "jina") == torch.bfloat16
    assert choose_dtype(cuda, "clip") == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert choose_dtype(cuda, "jina") == torch.float16


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


def test_a_model_file_the_user_may_not_read_is_named_as_such_not_as_missing() -> None:
    """Weights left readable by root alone, the service running as another user: the library said
    "FileNotFoundError: No such file or directory: .../model.safetensors" of a file that is there."""
    from tests.support.privileges import give_to_unprivileged, reachable_dir, unprivileged

    with reachable_dir() as root:
        model_dir = save_tiny_clip(root / "model")
        Embedder.load(str(model_dir), device="cpu")  # what loading imports, imported (nobody cannot read root's Python)
        give_to_unprivileged(model_dir)
        for path in model_dir.iterdir():
            give_to_unprivileged(path)
        weights = next(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
        weights.chmod(0o200)  # its owner may write it, nobody may read it
        with unprivileged():
            with pytest.raises(ModelLoadError, match=f"may not read {weights.name}\\. Give the service's user read"):
                Embedder.load(str(model_dir), device="cpu")


def test_a_model_folder_behind_one_the_user_may_not_enter_is_a_model_error_not_a_crash() -> None:
    """A model in a home folder of mode 0700 (or under /home, which the unit's ProtectHome=yes hides): the
    look at whether it is a folder raised PermissionError, a crash (exit 1, which systemd restarts for ever)."""
    from tests.support.privileges import reachable_dir, unprivileged

    with reachable_dir() as root:
        home = root / "home"
        model_dir = save_tiny_clip(home / "model")
        Embedder.load(str(model_dir), device="cpu")  # what loading imports, imported (nobody cannot read root's Python)
        home.chmod(0o700)  # root's
        with unprivileged():
            with pytest.raises(ModelLoadError, match=f"model '{model_dir}': this user may not reach it"):
                Embedder.load(str(model_dir), device="cpu")


def test_a_model_without_its_preprocessor_config_is_one_clear_error(tmp_path: Path) -> None:
    model_dir = save_tiny_clip(tmp_path / "no-processor")
    (model_dir / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match="no-processor.*preprocessor_config.json"):
        Embedder.load(str(model_dir), device="cpu")


def test_cuda_request_without_a_gpu_falls_back_to_cpu(tmp_path: Path, monkeypatch) -> None:
    # On a GPU machine too: CUDA is made unavailable, as on a host whose driver is gone.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = save_tiny_clip(tmp_path / "m")
    with capture_logs() as logs:
        assert Embedder.load(str(model), device="cuda").device.type == "cpu"
    assert [e["log_level"] for e in logs if e["event"] == "cuda_unavailable"] == ["warning"]



def test_a_loaded_model_and_its_imports_are_frozen_out_of_the_garbage_collectors_walks(tiny_model_dir: Path,
                                                                                       tmp_path: Path) -> None:
    """The service's model lives as long as the process: once it is loaded, the cyclic collector stops
    walking its objects (and torch's, and transformers') at each full collection (runtime.py)."""
    import gc

    from image_search.config import load_config
    from image_search.runtime import ModelLoading
    from tests.support.files import write_config

    cfg = load_config(write_config(tmp_path, tiny_model_dir))
    before = gc.get_freeze_count()
    loading = ModelLoading(cfg)
    embedder = loading.result()
    assert gc.get_freeze_count() > before
    # The model's own modules are among them: a full collection walks none of its parameters.
    assert gc.is_tracked(embedder._model)
    assert not any(o is embedder._model for o in gc.get_objects(generation=2))
