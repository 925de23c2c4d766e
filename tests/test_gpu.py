"""The GPU tier: on CUDA, the real paths the CPU tests stand in for (``uv run pytest -m gpu`` on a GPU machine).

- nvJPEG decode and encode make what the CPU path makes, and the device is drained around them (the
  torchvision stream races, pytorch/vision PR 9606 and PR 8929);
- progressive JPEGs go to the CPU workers; the canary lands in nvJPEG's outputs and catches an output left
  unwritten; resizes batched per shape and the encoder's thread make what the one-by-one path made;
- a real device fault is detected (``_device_fault``) and its chunk quarantined; a process killed inside
  nvJPEG has its chunk sent to the CPU workers after the restart;
- ``embed_images`` of model-sized pixels uploads from pinned host memory without blocking, and every vector is its own picture's;
- jina-clip's EVA attention runs through a fused SDPA kernel (never the N x N math path);
- the compiled vision blocks embed as the eager ones at any batch size, without compiling again;
- the ``--gpu`` benchmark's smoke run on CUDA.

Where there is no CUDA every test here is skipped with "needs CUDA", the one skip CI accepts
(tests/support/skips.py): CI machines have no GPU, so CI never counts these as run.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from structlog.testing import capture_logs

from tests.support.skips import NEEDS_CUDA

pytestmark = [pytest.mark.integration, pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)]

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")


# --- nvJPEG -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_nvjpeg_makes_what_the_cpu_path_makes(tmp_path: Path, orientation: int) -> None:
    from image_search.preprocess import preprocess_image
    from image_search.pixels import to_model_pixels
    from tests.support.jpegs import BOX, CLIP_224, LIMIT, decode_one, pixels_of, save_jpeg

    path = save_jpeg(tmp_path / f"o{orientation}.jpg", size=(1200, 800), orientation=orientation)
    gpu = decode_one(path, device="cuda")
    cpu = preprocess_image(path, max_size=BOX, max_pixels=LIMIT)
    assert gpu is not None
    assert gpu.pixels.device.type == "cuda"  # the model's input stays on the device
    assert (gpu.width, gpu.height) == (cpu.width, cpu.height)
    assert gpu.file_hash == cpu.file_hash
    # Another decoder (nvJPEG's IDCT and upsampling) and resampler: the same picture within JPEG noise,
    # never a turned or mirrored one (either would differ by tens of levels).
    difference = np.abs(pixels_of(gpu.jpeg_bytes) - np.asarray(cpu.image, dtype=np.int16))
    assert difference.mean() < 4.0, difference.mean()
    model = np.abs(gpu.pixels.cpu().numpy().astype(np.int16) - to_model_pixels(cpu.image, CLIP_224).astype(np.int16))
    assert gpu.pixels.shape == (224, 224, 3) and model.mean() < 2.5, model.mean()
    with Image.open(io.BytesIO(gpu.thumbnail_jpeg)) as thumb, Image.open(io.BytesIO(cpu.thumbnail_jpeg)) as ref:
        assert thumb.format == "JPEG" and thumb.size == ref.size


def test_progressive_jpegs_are_not_sent_to_nvjpeg(tmp_path: Path) -> None:
    """nvJPEG would decode them one at a time on the calling CPU thread: the CPU workers take them."""
    from image_search.gpudecode import GpuJpegReader, BatchedJpegDecoder, read_plain_jpeg
    from image_search.workers import PreprocessPool
    from tests.support.jpegs import BOX, CLIP_224, LIMIT, save_jpeg

    paths = [save_jpeg(tmp_path / "baseline.jpg"), save_jpeg(tmp_path / "progressive.jpg", progressive=True)]
    assert read_plain_jpeg(paths[1], max_pixels=LIMIT) is None
    with PreprocessPool(max_size=BOX, max_pixels=LIMIT, workers=0) as pool:
        reader = GpuJpegReader(pool, BatchedJpegDecoder("cuda", max_size=BOX, spec=CLIP_224), threads=1)
        outcomes = reader.submit(paths).results()
        reader.close()
    assert reader.decoded_on_device == 1 and all(o.pixels is None for o in outcomes[1:])


@pytest.mark.parametrize("kind", ["baseline", "444", "422", "restart_markers"])
def test_nvjpeg_decodes_every_plain_kind_in_one_batch(tmp_path: Path, kind: str) -> None:
    """A mixed batch of one kind: each decoded on the device, none handed back to the CPU path."""
    from image_search.gpudecode import BatchedJpegDecoder, read_plain_jpeg
    from image_search.geometry import fit_inside
    from tests.support.jpegs import BOX, CLIP_224, LIMIT, save_jpeg

    options = {"baseline": {}, "444": {"subsampling": 0},
               "422": {"subsampling": 1}, "restart_markers": {"restart_marker_blocks": 4}}[kind]
    paths = [save_jpeg(tmp_path / f"{kind}{i}.jpg", size=(640 + 16 * i, 480), seed=i, **options) for i in range(5)]
    sources = [read_plain_jpeg(p, max_pixels=LIMIT) for p in paths]
    assert all(s is not None for s in sources)
    results = BatchedJpegDecoder("cuda", max_size=BOX, spec=CLIP_224).prepare(sources)
    refused = [p.name for p, r in zip(paths, results) if r is None]
    assert not refused, f"nvJPEG handed these {kind} JPEGs back to the CPU path: {refused}"
    assert [r.path for r in results] == paths
    assert [(r.width, r.height) for r in results] == [fit_inside((640 + 16 * i, 480), BOX) for i in range(5)]
    assert all(r.pixels.device.type == "cuda" for r in results)


def test_the_decoder_and_encoder_are_ordered_after_the_callers_stream(tmp_path: Path) -> None:
    """torchvision's nvJPEG decoder and encoder run on streams of their own (pytorch/vision PR 9606, PR 8929):
    memory freed by work still queued on the caller's stream can be overwritten before that work reads it.
    The decoder drains the device before each call; here the race is set up as it happens (a stall, reads
    queued behind it, their tensors freed) and no read or encode may see another's bytes."""
    from image_search.gpudecode import BatchedJpegDecoder
    from tests.support.jpegs import CLIP_224, photo

    decoder = BatchedJpegDecoder(CUDA, max_size=(2048, 2048), spec=CLIP_224)
    width, height = 1536, 1024
    buffer = io.BytesIO()
    photo((width, height), 1).save(buffer, format="JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    count = 3 * width * height // 4  # float32 blocks the size of the decoded picture: the allocator reuses them
    corrupted = wrong = 0
    for i in range(10):
        victims = [torch.ones(count, device=CUDA) for _ in range(4)]
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)  # a stall queued on the current stream
        sums = [v.sum() for v in victims]  # reads queued behind it
        del victims  # freed while those reads are still queued
        decoder._decode([data])
        torch.cuda.synchronize()
        corrupted += sum(int(s.item() != count) for s in sums)

        value = 40 + 30 * (i % 5)
        source = torch.full((3, height, width), 2 * value, dtype=torch.uint8, device=CUDA)
        torch.cuda._sleep(100_000_000)
        picture = (source.float() * 0.5).to(torch.uint8)  # written only after the stall
        [jpeg] = decoder._encode([picture], 90)
        with Image.open(io.BytesIO(jpeg)) as im:
            wrong += int(abs(float(np.asarray(im.convert("L")).mean()) - value) > 3)
    assert (corrupted, wrong) == (0, 0)


def test_the_canary_lands_where_the_decoder_writes_and_catches_an_unwritten_output(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """The canary is written through the caching allocator into blocks of the outputs' sizes: a decoder
    that allocates its outputs and writes nothing (a skipped decode) leaves it there and is caught; the
    real nvJPEG overwrites it, so a real decode never trips it."""
    from image_search import gpudecode
    from image_search.gpudecode import BatchedJpegDecoder, read_plain_jpeg, skipped_decodes
    from tests.support.jpegs import BOX, CLIP_224, LIMIT, save_jpeg

    paths = [save_jpeg(tmp_path / f"p{i}.jpg", size=(640 + 16 * i, 480), seed=i) for i in range(4)]
    sources = [read_plain_jpeg(p, max_pixels=LIMIT) for p in paths]
    decoder = BatchedJpegDecoder(CUDA, max_size=BOX, spec=CLIP_224)
    shapes = [(3, s.height, s.width) for s in sources]
    primed_at: list[int] = []
    real_canary = gpudecode.canary

    def remembering(shape, device):
        block = real_canary(shape, device)
        primed_at.append(block.data_ptr())
        return block

    monkeypatch.setattr(gpudecode, "canary", remembering)
    real = decoder._decode([s.data for s in sources], shapes)
    assert skipped_decodes(real) == []
    # nvJPEG's outputs took the primed blocks: the pattern was where a skipped decode would have left it.
    assert sorted(t.data_ptr() for t in real) == sorted(primed_at)

    def allocate_only(encoded, **options):  # what a skipped decode leaves: outputs allocated, never written
        return [torch.empty(shape, dtype=torch.uint8, device=CUDA) for shape in shapes]

    monkeypatch.setattr(gpudecode, "decode_jpeg", allocate_only)
    unwritten = decoder._decode([s.data for s in sources], shapes)
    assert skipped_decodes(unwritten) == [0, 1, 2, 3]
    with capture_logs() as logs:
        assert decoder.prepare(sources) == [None] * 4  # the chunk goes to the CPU workers
    assert [e["event"] for e in logs if e["event"].startswith("gpu_jpeg")] == ["gpu_jpeg_decode_skipped"]
    decoder.close()


def test_batched_resizes_and_threaded_encodes_make_what_one_by_one_made(tmp_path: Path) -> None:
    """Five photos of one camera shape (one resize call each for the fit, the thumbnail and the model's
    input) and one of another: each result is what a chunk of one makes."""
    from image_search.gpudecode import BatchedJpegDecoder, read_plain_jpeg
    from tests.support.jpegs import BOX, CLIP_224, LIMIT, pixels_of, save_jpeg

    paths = [save_jpeg(tmp_path / f"p{i}.jpg", size=(1200, 800) if i < 5 else (800, 1200), seed=i)
             for i in range(6)]
    sources = [read_plain_jpeg(p, max_pixels=LIMIT) for p in paths]
    decoder = BatchedJpegDecoder(CUDA, max_size=BOX, spec=CLIP_224)
    together = decoder.prepare(sources)
    alone = [decoder.prepare([s])[0] for s in sources]
    decoder.close()
    for a, b in zip(together, alone):
        assert a is not None and b is not None and (a.width, a.height) == (b.width, b.height)
        assert torch.equal(a.pixels, b.pixels)
        assert np.abs(pixels_of(a.jpeg_bytes) - pixels_of(b.jpeg_bytes)).max() <= 1


# --- a device fault and the quarantine ----------------------------------------------------------------


def test_a_real_device_fault_quarantines_its_chunk_and_only_that_one(tmp_path: Path) -> None:
    """A kernel fault right after nvJPEG decoded a chunk: the real ``_device_fault`` sees the device broken,
    that chunk's files are quarantined, the chunks after it (which fail too: the fault is sticky) are not,
    and every file still comes out of the CPU path."""
    from image_search.gpudecode import QUARANTINE_NAME
    from image_search.preprocess import source_identity
    from tests.support.gpu_fault import FAULT_MARKER
    from tests.support.jpegs import save_jpeg

    state = tmp_path / "state"
    paths = [save_jpeg(tmp_path / "images" / f"p{i}.jpg", size=(400, 300), seed=i,
                       **({"comment": FAULT_MARKER} if i == 2 else {})) for i in range(6)]
    child = subprocess.run([sys.executable, "-m", "tests.support.gpu_fault", str(state), *map(str, paths)],
                           cwd=REPO, capture_output=True, text=True, timeout=240)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-2000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["indexable"] == [True] * 6  # none lost: the CPU path took what the device could not
    assert report["decoded_on_device"] == 2  # the chunk before the fault
    assert len(report["chunks_failed"]) == 2 and all("CUDA" in r for r in report["chunks_failed"]), report
    quarantined = dict(line.split("\t") for line in (state / QUARANTINE_NAME).read_text().splitlines())
    assert quarantined == {source_identity(p.read_bytes()): str(p) for p in paths[2:4]}


def test_a_file_that_kills_nvjpeg_is_decoded_by_the_cpu_workers_after_the_restart(tmp_path: Path,
                                                                                  tiny_model_dir: Path) -> None:
    """The process dies inside nvJPEG (SIGKILL, as a driver fault kills it); the restart, an indexer on CUDA
    over the same state directory, decodes the rest with nvJPEG and that chunk with the CPU workers."""
    from image_search.config import load_config
    from image_search.embed import Embedder
    from tests.support.files import write_config
    from tests.support.gpu_crash import crash_then_restart

    cfg = load_config(write_config(tmp_path, tiny_model_dir, batch_size=4, resize_width=512, resize_height=512))
    paths, restart = crash_then_restart(cfg, Embedder.load(str(tiny_model_dir), device="cuda"), "cuda", timeout=240)
    summary, on_device, logs = restart.summary, restart.on_device, restart.logs
    assert restart.names == [p.name for p in paths] and not summary.skipped
    assert on_device == 4  # p2 and p3 went to the CPU workers
    [crashed] = [e for e in logs if e["event"] == "gpu_jpeg_decode_crashed"]
    assert crashed["files"] == [str(paths[2]), str(paths[3])]


# --- embedding ----------------------------------------------------------------------------------------


def test_embed_images_of_pixels_uploads_from_pinned_memory_and_each_vector_is_its_own_pictures(tiny_model_dir: Path,
                                                                                     monkeypatch) -> None:
    """Many passes of a few pictures: each upload is a non-blocking copy from pinned host memory, and no
    pass reads another's bytes (a pinned buffer reused before its copy ran would). The vectors are the
    CPU's, to float16's precision."""
    from image_search.embed import Embedder

    gpu = Embedder.load(str(tiny_model_dir), device="cuda")
    cpu = Embedder.load(str(tiny_model_dir), device="cpu")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float16
    width, height = gpu.pixel_spec.output_size
    pixels = np.random.default_rng(0).integers(0, 256, (40, height, width, 3), dtype=np.uint8)
    pinned: list[bool] = []
    real_pin = torch.Tensor.pin_memory

    def pin_memory(self, *args, **kwargs):
        out = real_pin(self, *args, **kwargs)
        pinned.append(out.is_pinned())
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    gpu.max_batch = 3
    vectors = gpu.embed_images(pixels)
    assert pinned == [True] * math.ceil(len(pixels) / 3)
    expected = cpu.embed_images(pixels)
    cosines = np.sum(vectors * expected, axis=1)
    assert vectors.dtype == np.float32 and cosines.min() > 0.99, cosines.min()
    # Pictures decoded on the device (the batched decoder's rows) do not move, and embed the same.
    rows = list(torch.from_numpy(pixels[:5]).to(CUDA).unbind(0))
    np.testing.assert_allclose(gpu.embed_images(rows), vectors[:5], atol=5e-3)


def test_eva_attention_runs_a_fused_sdpa_kernel_on_cuda() -> None:
    """The patched attention in bfloat16 on CUDA: the naive formula's numbers, through a flash or
    memory-efficient kernel (the math path, which stores the N x N matrix, is not allowed here)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from image_search.eva_attention import patch_eva_attention
    from tests.support.jina_remote_code.eva_model import Attention, Rope

    torch.manual_seed(3)
    tokens, dim, heads = 257, 256, 4  # a class token and 16 x 16 patches; head_dim 64
    attention = Attention(dim, heads, qkv_bias=True, subln=True, rope=Rope(tokens - 1, dim // heads)).to(
        CUDA, torch.bfloat16).eval()
    x = torch.randn(8, tokens, dim, device=CUDA, dtype=torch.bfloat16)
    with torch.inference_mode():
        naive = attention(x).float()
    assert patch_eva_attention(attention) == 1
    with torch.inference_mode(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        fused = attention(x).float()
    torch.testing.assert_close(fused, naive, atol=5e-2, rtol=5e-2)


def test_jina_clip_loads_in_bfloat16_with_fused_attention_and_embeds_as_on_the_cpu(tmp_path: Path) -> None:
    from image_search.embed import Embedder
    from tests.support.jina import save_jina_stand_in

    model_dir = save_jina_stand_in(tmp_path / "jina")
    with capture_logs() as logs:
        gpu = Embedder.load(str(model_dir), device="cuda")
    cpu = Embedder.load(str(model_dir), device="cpu")
    expected_dtype = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    assert gpu.dtype == expected_dtype
    assert [e["modules"] for e in logs if e["event"] == "eva_attention_patched"] == [2]
    width, height = gpu.pixel_spec.output_size
    pixels = np.random.default_rng(1).integers(0, 256, (6, height, width, 3), dtype=np.uint8)
    cosines = np.sum(gpu.embed_images(pixels) * cpu.embed_images(pixels), axis=1)
    assert cosines.min() > 0.98, cosines


@pytest.mark.timeout(900)  # inductor and triton compile two models
@pytest.mark.parametrize("family", ["clip", "jina"])
def test_compiled_blocks_embed_as_the_eager_ones_on_cuda(family: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    from image_search.compiled import vision_blocks
    from image_search.embed import Embedder
    from tests.support.jina import save_jina_stand_in

    model_dir = str(tiny_model_dir if family == "clip" else save_jina_stand_in(tmp_path / "jina"))
    eager = Embedder.load(model_dir, device="cuda")
    with capture_logs() as logs:
        compiled = Embedder.load(model_dir, device="cuda", compile_model=True)
    [event] = [e for e in logs if e["event"] == "model_compiled"]
    blocks = vision_blocks(compiled._model)
    assert blocks is not None and event["blocks"] == len(blocks)
    assert all(b._compiled_call_impl is not None for b in blocks)
    width, height = compiled.pixel_spec.output_size
    pixels = np.random.default_rng(0).integers(0, 256, (7, height, width, 3), dtype=np.uint8)
    with torch.compiler.set_stance("fail_on_recompile"):  # a pass that compiles again raises here
        for size in (1, 2, 4, 7):
            np.testing.assert_allclose(compiled.embed_images(pixels[:size]), eager.embed_images(pixels[:size]),
                                       atol=2e-2, err_msg=f"batch of {size}")


# --- the --gpu benchmark ------------------------------------------------------------------------------


@pytest.mark.timeout(1500)
def test_the_gpu_benchmark_smoke_runs_on_cuda(tmp_path: Path) -> None:
    """``python -m tests.benchmarks.run --quick --gpu --only gpu`` on CUDA: a random CLIP ViT-L/14, nvJPEG
    ingest, the jina-sized EVA tower naive, SDPA and compiled. No timing is asserted: every number is there,
    positive and finite, and each path ran where it should."""
    from tests.benchmarks.gpu import SECTION

    report_path = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.run", "--quick", "--gpu", "--only", "gpu",
                           "--json", str(report_path), "--work-dir", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["gpu_device"] == torch.cuda.get_device_name(0)
    for key in SECTION.report_keys:
        value = report[key]
        # A pixel difference may be 0 (nvJPEG and Pillow agreeing exactly); every other number is positive.
        positive = value >= 0 if key.startswith("gpu_decode_diff_") else value > 0
        assert isinstance(value, (int, float)) and math.isfinite(value) and positive, (key, value)
    assert 0 < report["gpu_decode_cosine_min"] <= report["gpu_decode_cosine_mean"] <= 1 + 1e-6
    assert report["gpu_ingest_files"] == SECTION.quick_sizes["gpu_files"]
    assert report["gpu_eva_tokens"] == 1297  # jina-clip-v2's tower size, not the CPU smoke's
