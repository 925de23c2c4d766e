"""GPU: is the model fed? The forward pass alone, ``embed_images`` of model-sized pixels, and ``index`` end to end, one run.

    uv run python -m tests.benchmarks.run --gpu [--only gpu]

Builds a random-weight CLIP ViT-L/14 at 224 px locally (transformers' ``CLIPConfig``, saved with
``save_pretrained``: no download; throughput does not depend on the weights) and measures, on the GPU:

- ``gpu_model_only_img_s``: ``get_image_features`` on a uint8 batch already on the device, normalised
  there, in forward passes of the size the embedder chose at load (its memory probe): the ceiling;
- ``gpu_embed_img_s``: ``Embedder.embed_images`` on model-ready uint8 pictures in host memory (what
  the preprocessing workers hand the main thread): upload, normalise, forward, download;
- ``gpu_ingest_img_s``: ``Indexer.index_folder`` end to end on generated 12 MP camera JPEGs (decode,
  orient, fit, JPEG, MD5 and the model's resize in worker processes; the forward pass; the rows);
- ``gpu_ingest_gpu_decode_img_s``: the same with the JPEGs decoded in batches by nvJPEG (gpudecode.py);
- ``gpu_embed_efficiency``, ``gpu_ingest_efficiency``, ``gpu_ingest_gpu_decode_efficiency``: each divided
  by the forward pass alone;
- ``gpu_decode_diff_{444,422,420}_{max,mean}``: nvJPEG's decoded pixels against Pillow's (the CPU path's
  decoder), per chroma subsampling, in levels of 255 (nvJPEG's chroma upsampling differs from Pillow's);
- ``gpu_decode_cosine_{min,mean}``: the cosine between the embeddings of the two paths (CPU workers'
  ``preprocess_image`` against the batched decoder) for the same files, all three subsamplings;
- ``gpu_eva_*``: a jina-clip-v2-sized EVA02 tower (eva.py), naive attention against SDPA, bf16 and fp16,
  and SDPA with the blocks compiled ('compile-model'); images/s and achieved TFLOPS.

Targets (issue "Feed the GPU"): embed >= 0.85, ingest >= 0.5 with CPU decode on 16 cores and >= 0.7
with GPU decode, the EVA tower >= 2x with SDPA. Without
CUDA the section runs on the CPU with the tiny model and small sizes (a smoke test of this code only;
its numbers mean nothing). Nothing here asserts a timing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tests.benchmarks.common import (
    Bench,
    Metric,
    Report,
    Section,
    fresh_dir,
    images_per_s,
    link_or_copy,
    say,
    warm_page_cache,
)
from tests.benchmarks.photos import ensure_jpegs
from tests.support.files import write_config
from tests.support.model import TINY_DIMENSION

CAMERA_12MP = (4000, 3000)
VIT_L14_DIMENSION = 768
# Pillow's ``subsampling`` save option for each chroma subsampling the decoders are compared on.
SUBSAMPLINGS = {"444": 0, "422": 1, "420": 2}


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


def run(bench: Bench) -> Report:
    import torch

    from image_search.embed import Embedder
    from tests.benchmarks import eva

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
    on_device_batch = torch.from_numpy(pixels[:batch]).to(embedder.device).permute(0, 3, 1, 2).to(embedder.dtype)
    passes = max(1, n_pixels // batch)
    with torch.inference_mode():
        model.get_image_features(pixel_values=on_device_batch)  # warm-up (kernels, allocator)
        model_only = images_per_s(passes * batch, lambda: [model.get_image_features(pixel_values=on_device_batch)
                                                            for _ in range(passes)])
    say(f"gpu: model alone {model_only:.0f} img/s")

    # 2. embed_images of model-sized pixels: host uint8 in, unit vectors out.
    embedder.embed_images(pixels[:batch])  # warm-up
    embed = images_per_s(n_pixels, lambda: embedder.embed_images(pixels))
    say(f"gpu: embed_images {embed:.0f} img/s")

    # 3. index end to end on camera JPEGs: decoded by the CPU workers, then in batches on the device.
    camera = ensure_jpegs(bench.cache / "camera12mp", "cam", n_files, CAMERA_12MP if on_gpu else (1600, 1200),
                          seed=7, bases=8)
    ingest, _ = _index_end_to_end(bench, embedder, model_dir, camera, jpeg_decode_device=None)
    say(f"gpu: index end to end, CPU decode {ingest:.0f} img/s over {len(camera)} files")
    # On the CPU smoke run the batched path runs on torchvision's CPU decoder: the same code, no nvJPEG.
    ingest_gpu_decode, on_device = _index_end_to_end(bench, embedder, model_dir, camera,
                                                      jpeg_decode_device="auto" if on_gpu else "cpu")
    if on_device != len(camera):
        raise RuntimeError(f"the batched decoder took {on_device} of {len(camera)} camera JPEGs")
    say(f"gpu: index end to end, batched JPEG decode {ingest_gpu_decode:.0f} img/s")

    # 4. nvJPEG against Pillow: decoded pixels per chroma subsampling, and the two paths' embeddings.
    agreement = decode_agreement(bench.work / "gpu-decode-agreement", embedder,
                                 size=(1600, 1200) if on_gpu else (320, 240), per_kind=8 if on_gpu else 2)
    say("gpu: nvJPEG vs Pillow, levels max/mean: " + ", ".join(
        f"{kind} {agreement[f'gpu_decode_diff_{kind}_max']:.0f}/{agreement[f'gpu_decode_diff_{kind}_mean']:.2f}"
        for kind in SUBSAMPLINGS) + f"; embedding cosine min {agreement['gpu_decode_cosine_min']:.4f}")

    # 5. jina-clip-v2's tower: naive attention against SDPA, bf16 against fp16.
    pixels = on_device_batch = None  # freed for the tower below (del: the lambdas above would name nothing)
    tower = eva.measure(embedder.device, batch=int(bench.sizes["gpu_eva_batch"]), rounds=3)
    say(f"gpu: EVA02-L/14@512 tower naive {tower['gpu_eva_naive_img_s']:.0f}, SDPA {tower['gpu_eva_sdpa_img_s']:.0f} "
        f"(bf16, {tower['gpu_eva_sdpa_tflops']:.0f} TFLOPS), SDPA fp16 {tower['gpu_eva_sdpa_fp16_img_s']:.0f}, "
        f"SDPA bf16 compiled {tower['gpu_eva_compiled_img_s']:.0f} img/s ({tower['gpu_eva_compiled_tflops']:.0f} "
        f"TFLOPS; compiled in {tower['gpu_eva_compile_s']:.0f} s)")
    return {
        "gpu_device": torch.cuda.get_device_name(0) if on_gpu else "cpu (smoke run)",
        "gpu_forward_batch": batch,
        "gpu_model_only_img_s": model_only,
        "gpu_embed_img_s": embed,
        "gpu_ingest_img_s": ingest,
        "gpu_ingest_gpu_decode_img_s": ingest_gpu_decode,
        "gpu_embed_efficiency": embed / model_only,
        "gpu_ingest_efficiency": ingest / model_only,
        "gpu_ingest_gpu_decode_efficiency": ingest_gpu_decode / model_only,
        "gpu_ingest_files": len(camera),
        **agreement,
        **tower,
    }


def pixel_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max, mean) absolute difference of two uint8 pictures of one shape, in levels."""
    if a.shape != b.shape:
        raise ValueError(f"pictures of different shapes: {a.shape} and {b.shape}")
    difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(difference.max(initial=0)), float(difference.mean()) if difference.size else 0.0


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) arrays of vectors."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def decode_agreement(folder: Path, embedder, *, size: tuple[int, int], per_kind: int) -> dict[str, float]:
    """nvJPEG (torchvision's decoder on the embedder's device; its libjpeg-turbo one on the CPU) against
    Pillow: decoded pixels per chroma subsampling (``gpu_decode_diff_<kind>_{max,mean}``, over all files
    of that kind), and the cosine between the embeddings of the CPU path and the batched decoder's
    (``gpu_decode_cosine_{min,mean}``)."""
    import io
    from functools import partial

    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from image_search.gpudecode import BatchedJpegDecoder, read_plain_jpeg
    from image_search.pixels import to_model_pixels
    from image_search.preprocess import preprocess_image
    from tests.support.jpegs import save_jpeg

    box, limit, spec = (1024, 1024), 178_956_970, embedder.pixel_spec
    decoder = BatchedJpegDecoder(embedder.device, max_size=box, spec=spec)
    out: dict[str, float] = {}
    cpu_vectors, gpu_vectors = [], []
    try:
        for kind, subsampling in SUBSAMPLINGS.items():
            paths = [save_jpeg(folder / f"{kind}-{i}.jpg", size=size, seed=100 + i, subsampling=subsampling)
                     for i in range(per_kind)]
            worst, total = 0.0, 0.0
            for path in paths:
                data = path.read_bytes()
                with Image.open(io.BytesIO(data)) as im:
                    pillow = np.asarray(im.convert("RGB"), dtype=np.uint8)
                [decoded] = decode_jpeg([torch.frombuffer(bytearray(data), dtype=torch.uint8)], mode=ImageReadMode.RGB,
                                        device=embedder.device)
                high, mean = pixel_difference(decoded.permute(1, 2, 0).cpu().numpy(), pillow)
                worst, total = max(worst, high), total + mean
            out[f"gpu_decode_diff_{kind}_max"], out[f"gpu_decode_diff_{kind}_mean"] = worst, total / len(paths)
            batched = decoder.prepare([read_plain_jpeg(p, max_pixels=limit) for p in paths])
            if any(result is None for result in batched):
                raise RuntimeError(f"the batched decoder handed {kind} JPEGs back to the CPU path")
            cpu = [preprocess_image(p, max_size=box, max_pixels=limit, model_input=partial(to_model_pixels, spec=spec))
                   for p in paths]
            cpu_vectors.append(embedder.embed_images(cpu))
            gpu_vectors.append(embedder.embed_images(batched))
    finally:
        decoder.close()
    similarity = cosines(np.concatenate(cpu_vectors), np.concatenate(gpu_vectors))
    out["gpu_decode_cosine_min"], out["gpu_decode_cosine_mean"] = float(similarity.min()), float(similarity.mean())
    return out


def _index_end_to_end(bench: Bench, embedder, model_dir: Path, camera: list[Path], *,
                      jpeg_decode_device: str | None) -> tuple[float, int]:
    """``Indexer.index_folder`` over ``camera`` in a fresh tree and database: (images/s, decoded on the device)."""
    from image_search.config import load_config
    from image_search.indexer import Indexer
    from image_search.store import Database

    root = fresh_dir(bench.work / "gpu-ingest")
    cfg = load_config(write_config(root, model_dir, device=embedder.device.type, dimension=embedder.dimension,
                                   resize_width=1024, resize_height=1024, batch_size=128))
    for p in camera:
        link_or_copy(p, cfg.source_directory / p.name)
    database = Database(cfg)
    try:
        store = database.open_store(dimension=embedder.dimension)
        indexer = Indexer(cfg, embedder, store, jpeg_decode_device=jpeg_decode_device)
        try:
            warm_page_cache(camera)
            started = time.perf_counter()
            summary = indexer.index_folder(show_progress=False)
            rate = summary.embedded / (time.perf_counter() - started)
            on_device = indexer.decoded_on_device
        finally:
            indexer.close()
        store.close()
    finally:
        database.close()
    if summary.embedded != len(camera):
        raise RuntimeError(f"index_folder embedded {summary.embedded} of {len(camera)} images")
    return rate, on_device


SECTION = Section(
    name="gpu",
    run=run,
    full_sizes={"gpu_pixels": 2048, "gpu_files": 1000, "gpu_eva_batch": 32},
    quick_sizes={"gpu_pixels": 64, "gpu_files": 8, "gpu_eva_batch": 2},
    metrics=(
        Metric("GPU: model alone", "gpu_model_only_img_s", "{:.0f} img/s"),
        Metric("GPU: embed_images / model alone", "gpu_embed_efficiency", "{:.2f}", ">= 0.85", lambda v, r: v >= 0.85),
        Metric("GPU: index end to end, CPU decode / model alone", "gpu_ingest_efficiency", "{:.2f}", ">= 0.5",
               lambda v, r: v >= 0.5),
        Metric("GPU: index end to end, GPU decode / model alone", "gpu_ingest_gpu_decode_efficiency", "{:.2f}",
               ">= 0.7", lambda v, r: v >= 0.7),
        *(Metric(f"GPU: nvJPEG vs Pillow, {kind[0]}:{kind[1]}:{kind[2]}, {stat} levels", f"gpu_decode_diff_{kind}_{stat}",
                 "{:.2f}") for kind in SUBSAMPLINGS for stat in ("max", "mean")),
        Metric("GPU: embedding cosine, GPU decode vs CPU path (min)", "gpu_decode_cosine_min", "{:.4f}", "> 0.99",
               lambda v, r: v > 0.99),
        Metric("GPU: jina-sized EVA tower, SDPA / naive attention", "gpu_eva_sdpa_speedup", "{:.2f}x", ">= 2",
               lambda v, r: v >= 2),
        Metric("GPU: jina-sized EVA tower, compiled / SDPA", "gpu_eva_compile_speedup", "{:.2f}x"),
        Metric("GPU: jina-sized EVA tower, compiled, achieved", "gpu_eva_compiled_tflops", "{:.0f} TFLOPS"),
    ),
    report_keys=("gpu_model_only_img_s", "gpu_embed_img_s", "gpu_ingest_img_s", "gpu_ingest_gpu_decode_img_s",
                 "gpu_embed_efficiency", "gpu_ingest_efficiency", "gpu_ingest_gpu_decode_efficiency",
                 *(f"gpu_decode_diff_{kind}_{stat}" for kind in SUBSAMPLINGS for stat in ("max", "mean")),
                 "gpu_decode_cosine_min", "gpu_decode_cosine_mean",
                 "gpu_eva_naive_img_s", "gpu_eva_sdpa_img_s", "gpu_eva_sdpa_fp16_img_s", "gpu_eva_sdpa_speedup",
                 "gpu_eva_compiled_img_s", "gpu_eva_compile_speedup", "gpu_eva_compile_s", "gpu_eva_sdpa_tflops",
                 "gpu_eva_compiled_tflops"),
)
