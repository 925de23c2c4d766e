"""GPU: is the model fed? The forward pass alone, ``embed_pixels``, and ``index`` end to end, one run.

    uv run python -m tests.benchmarks.run --gpu [--only gpu]

Builds a random-weight CLIP ViT-L/14 at 224 px locally (transformers' ``CLIPConfig``, saved with
``save_pretrained``: no download; throughput does not depend on the weights) and measures, on the GPU:

- ``gpu_model_only_img_s``: ``get_image_features`` on a uint8 batch already on the device, normalised
  there, in forward passes of the size the embedder chose at load (its memory probe): the ceiling;
- ``gpu_embed_img_s``: ``Embedder.embed_pixels`` on model-ready uint8 pictures in host memory (what
  the preprocessing workers hand the main thread): upload, normalise, forward, download;
- ``gpu_ingest_img_s``: ``Indexer.index_folder`` end to end on generated 12 MP camera JPEGs (decode,
  orient, fit, JPEG, MD5 and the model's resize in worker processes; the forward pass; the rows);
- ``gpu_embed_efficiency`` and ``gpu_ingest_efficiency``: each divided by the forward pass alone.

Targets (issue "Feed the GPU"): embed >= 0.85, ingest >= 0.5 with CPU decode on 16 cores. Without
CUDA the section runs on the CPU with the tiny model and small sizes (a smoke test of this code only;
its numbers mean nothing). Nothing here asserts a timing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tests.benchmarks.common import Bench, Metric, Report, Section, fresh_dir, link_or_copy, say, warm_page_cache
from tests.benchmarks.photos import ensure_jpegs
from tests.support.files import write_config
from tests.support.model import TINY_DIMENSION

CAMERA_12MP = (4000, 3000)
VIT_L14_DIMENSION = 768


def save_clip_vit_l14(directory: Path) -> Path:
    """CLIP ViT-L/14 @224 with random weights, saved like any checkpoint (the sizes of openai/clip-vit-large-patch14)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12},
        vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                       "num_hidden_layers": 24, "image_size": 224, "patch_size": 14},
        projection_dim=VIT_L14_DIMENSION,
    )
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(directory)
    return directory


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _images_per_s(count: int, work) -> float:
    _synchronize()
    started = time.perf_counter()
    work()
    _synchronize()
    return count / (time.perf_counter() - started)


def run(bench: Bench) -> Report:
    import torch

    from image_search.config import load_config
    from image_search.embed import Embedder
    from image_search.indexer import Indexer
    from image_search.store import Database

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        model_dir, dimension = save_clip_vit_l14(bench.work / "clip-vit-l14"), VIT_L14_DIMENSION
    else:
        say("gpu: no CUDA device: a smoke run on the CPU with the tiny model (the numbers mean nothing)")
        model_dir, dimension = bench.model_dir, TINY_DIMENSION
    n_pixels, n_files = int(bench.sizes["gpu_pixels"]), int(bench.sizes["gpu_files"])
    embedder = Embedder.load(str(model_dir), device="cuda" if on_gpu else "cpu", dimension=dimension)
    assert embedder.pixel_spec is not None
    width, height = embedder.pixel_spec.output_size
    batch = embedder.max_batch
    say(f"gpu: {torch.cuda.get_device_name(0) if on_gpu else 'cpu'}, forward passes of {batch}, "
        f"dtype {str(embedder.dtype).removeprefix('torch.')}")
    pixels = np.random.default_rng(0).integers(0, 256, (n_pixels, height, width, 3), dtype=np.uint8)

    # 1. The ceiling: the model alone on input already on the device.
    model = embedder._model  # noqa: SLF001 - the benchmark measures the model without our plumbing
    on_device = torch.from_numpy(pixels[:batch]).to(embedder.device).permute(0, 3, 1, 2).to(embedder.dtype)
    passes = max(1, n_pixels // batch)
    with torch.inference_mode():
        model.get_image_features(pixel_values=on_device)  # warm-up (kernels, allocator)
        model_only = _images_per_s(passes * batch, lambda: [model.get_image_features(pixel_values=on_device)
                                                            for _ in range(passes)])
    say(f"gpu: model alone {model_only:.0f} img/s")

    # 2. embed_pixels: host uint8 in, unit vectors out.
    embedder.embed_pixels(pixels[:batch])  # warm-up
    embed = _images_per_s(n_pixels, lambda: embedder.embed_pixels(pixels))
    say(f"gpu: embed_pixels {embed:.0f} img/s")

    # 3. index end to end on camera JPEGs.
    camera = ensure_jpegs(bench.cache / "camera12mp", "cam", n_files, CAMERA_12MP if on_gpu else (1600, 1200),
                          seed=7, bases=8)
    root = fresh_dir(bench.work / "gpu-ingest")
    cfg = load_config(write_config(root, model_dir, device="cuda" if on_gpu else "cpu", dimension=dimension,
                                   resize_width=1024, resize_height=1024, batch_size=128))
    for p in camera:
        link_or_copy(p, cfg.source_directory / p.name)
    database = Database(cfg)
    try:
        store = database.open_store(dimension=dimension)
        indexer = Indexer(cfg, embedder, store)
        try:
            warm_page_cache(camera)
            started = time.perf_counter()
            summary = indexer.index_folder(show_progress=False)
            ingest = summary.embedded / (time.perf_counter() - started)
        finally:
            indexer.close()
        store.close()
    finally:
        database.close()
    if summary.embedded != len(camera):
        raise RuntimeError(f"index_folder embedded {summary.embedded} of {len(camera)} images")
    say(f"gpu: index end to end {ingest:.0f} img/s over {len(camera)} files")
    return {
        "gpu_device": torch.cuda.get_device_name(0) if on_gpu else "cpu (smoke run)",
        "gpu_forward_batch": batch,
        "gpu_model_only_img_s": model_only,
        "gpu_embed_img_s": embed,
        "gpu_ingest_img_s": ingest,
        "gpu_embed_efficiency": embed / model_only,
        "gpu_ingest_efficiency": ingest / model_only,
        "gpu_ingest_files": len(camera),
    }


SECTION = Section(
    name="gpu",
    run=run,
    full_sizes={"gpu_pixels": 2048, "gpu_files": 1000},
    quick_sizes={"gpu_pixels": 64, "gpu_files": 8},
    metrics=(
        Metric("GPU: model alone", "gpu_model_only_img_s", "{:.0f} img/s"),
        Metric("GPU: embed_pixels / model alone", "gpu_embed_efficiency", "{:.2f}", ">= 0.85", lambda v, r: v >= 0.85),
        Metric("GPU: index end to end / model alone", "gpu_ingest_efficiency", "{:.2f}", ">= 0.5",
               lambda v, r: v >= 0.5),
    ),
    report_keys=("gpu_model_only_img_s", "gpu_embed_img_s", "gpu_ingest_img_s", "gpu_embed_efficiency",
                 "gpu_ingest_efficiency"),
)
