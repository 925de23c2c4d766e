"""The batched JPEG decoder (gpudecode.py), run here on torchvision's CPU decoder: the same code the
indexer runs on CUDA. Which files it takes, that it makes what the CPU path makes (orientation, size,
the model's input), that a file it refuses costs nothing, and that the identity never depends on it."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from structlog.testing import capture_logs

from image_search.config import load_config
from image_search.embed import Embedder
from image_search.gpudecode import (
    CHECK_CRASHED_NAME,
    CHECK_KEY,
    IN_FLIGHT_PREFIX,
    PROGRESSIVE_FRAME,
    QUARANTINE_NAME,
    BatchedJpegDecoder,
    DecodeQuarantine,
    open_gpu_reader,
    _frame_header,
    read_plain_jpeg,
)
from image_search.indexer import Indexer
from image_search.pixels import to_model_pixels
from image_search.preprocess import PreparedImage, preprocess_image, source_identity
from image_search.store import Database
from image_search.workers import PreprocessPool
from tests.support.db import database_rows
from tests.support.files import write_config
from tests.support.gpu_crash import crash_then_restart
from tests.support.held_reads import hold_reads
from tests.support.jpegs import BOX, CLIP_224, JINA_512, LIMIT, decode_one, photo, pixels_of, save_jpeg
from tests.support.model import TINY_DIMENSION

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


# --- which files it takes ---------------------------------------------------------------------------


def test_plain_baseline_jpegs_are_taken_with_their_identity(tmp_path) -> None:
    for name, options in (("baseline.jpg", {}), ("rotated.jpg", {})):
        path = save_jpeg(tmp_path / name, orientation=6 if name == "rotated.jpg" else 1, **options)
        source = read_plain_jpeg(path, max_pixels=LIMIT)
        assert source is not None, name
        assert source.file_hash == source_identity(path.read_bytes())
        assert (source.width, source.height) == (900, 600)
        assert source.orientation == (6 if name == "rotated.jpg" else 1)


def test_progressive_jpegs_are_left_to_the_cpu_workers(tmp_path) -> None:
    """nvJPEG decodes a progressive JPEG one at a time on the calling CPU thread: the workers do it better."""
    path = save_jpeg(tmp_path / "progressive.jpg", progressive=True)
    header = _frame_header(path.read_bytes())
    assert header is not None and header[0] == PROGRESSIVE_FRAME  # a real SOF2 file
    assert read_plain_jpeg(path, max_pixels=LIMIT) is None
    assert read_plain_jpeg(save_jpeg(tmp_path / "baseline.jpg"), max_pixels=LIMIT) is not None


def test_a_jpeg_in_a_colour_space_other_than_srgb_is_left_to_the_cpu_path(tmp_path) -> None:
    """nvJPEG decodes the pixels as they are; a Display P3 photo's are converted to sRGB (``colours``) by the
    CPU path. A JPEG tagged sRGB needs no conversion and stays on the device."""
    from PIL import ImageCms

    from tests.support.files import display_p3_profile

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert read_plain_jpeg(save_jpeg(tmp_path / "p3.jpg", icc_profile=display_p3_profile()), max_pixels=LIMIT) is None
    assert read_plain_jpeg(save_jpeg(tmp_path / "srgb.jpg", icc_profile=srgb), max_pixels=LIMIT) is not None


def test_everything_else_is_left_to_the_cpu_path(tmp_path) -> None:
    """Whatever the CPU path would decode differently or refuse with a reason of its own."""
    good = save_jpeg(tmp_path / "good.jpg")
    data = good.read_bytes()
    cases = {
        "truncated.jpg": data[: len(data) * 2 // 3],  # still being written: no EOI yet
        "empty.jpg": b"",
        "not-an-image.jpg": b"just some text, not a picture\xff\xd9",
        "png-named-jpg.jpg": None,
        "grey.jpg": None,
        "cmyk.jpg": None,
        "too-large.jpg": None,
    }
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    photo((40, 30)).save(tmp_path / "png-named-jpg.jpg", format="PNG")
    photo((40, 30)).convert("L").save(tmp_path / "grey.jpg", format="JPEG")
    Image.new("CMYK", (40, 30), (0, 200, 30, 0)).save(tmp_path / "cmyk.jpg", format="JPEG")
    save_jpeg(tmp_path / "too-large.jpg", size=(300, 200))
    for name in cases:
        limit = 300 * 200 - 1 if name == "too-large.jpg" else LIMIT
        assert read_plain_jpeg(tmp_path / name, max_pixels=limit) is None, name
    assert read_plain_jpeg(tmp_path / "missing.jpg", max_pixels=LIMIT) is None


def test_a_multi_picture_jpeg_is_left_to_the_cpu_path(tmp_path) -> None:
    path = tmp_path / "stereo.jpg"
    photo((320, 240), 1).save(path, format="MPO", save_all=True, append_images=[photo((320, 240), 2)])
    with Image.open(path) as im:
        assert im.format == "MPO"
    assert read_plain_jpeg(path, max_pixels=LIMIT) is None


# --- what it makes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_as_on_the_cpu_path(tmp_path, orientation) -> None:
    path = save_jpeg(tmp_path / f"o{orientation}.jpg", size=(1200, 800), orientation=orientation)
    gpu = decode_one(path)
    cpu = preprocess_image(path, max_size=BOX, max_pixels=LIMIT)
    assert gpu is not None
    assert (gpu.width, gpu.height) == (cpu.width, cpu.height)
    assert (gpu.source_width, gpu.source_height) == (cpu.source_width, cpu.source_height) == (1200, 800)
    assert gpu.file_hash == cpu.file_hash
    # Another decoder and resampler: the same picture to within JPEG noise, never a turned or mirrored one.
    difference = np.abs(pixels_of(gpu.jpeg_bytes) - np.asarray(cpu.image, dtype=np.int16))
    assert difference.mean() < 3.0, difference.mean()
    model = np.abs(gpu.pixels.numpy().astype(np.int16) - to_model_pixels(cpu.image, CLIP_224).astype(np.int16))
    assert gpu.pixels.shape == (224, 224, 3) and model.mean() < 1.5, model.mean()


def test_the_model_input_follows_jina_clip_v2s_processor(tmp_path) -> None:
    """jina's shortest-edge 512 bicubic resize and its half-to-even centre crop, from the same fitted picture."""
    path = save_jpeg(tmp_path / "wide.jpg", size=(1600, 900), seed=4)
    gpu = decode_one(path, JINA_512, box=(1024, 1024))
    cpu = preprocess_image(path, max_size=(1024, 1024), max_pixels=LIMIT)
    assert gpu is not None and gpu.pixels.shape == (512, 512, 3)
    expected = to_model_pixels(cpu.image, JINA_512).astype(np.int16)
    assert np.abs(gpu.pixels.numpy().astype(np.int16) - expected).mean() < 1.5


def test_the_thumbnail_is_sized_as_on_the_cpu_path(tmp_path) -> None:
    path = save_jpeg(tmp_path / "tall.jpg", size=(601, 1003), seed=2)
    gpu = decode_one(path)
    cpu = preprocess_image(path, max_size=BOX, max_pixels=LIMIT)
    assert gpu is not None
    with Image.open(io.BytesIO(gpu.thumbnail_jpeg)) as a, Image.open(io.BytesIO(cpu.thumbnail_jpeg)) as b:
        assert a.size == b.size and max(a.size) == 256


def test_a_file_the_decoder_refuses_costs_only_that_file(tmp_path) -> None:
    """A JPEG whose markers read well but whose data does not decode fails the chunk's one call; the chunk
    is then decoded file by file and only that file comes back as None (for the CPU path)."""
    paths = [save_jpeg(tmp_path / f"p{i}.jpg", size=(400, 300), seed=i) for i in range(3)]
    broken = bytearray(paths[1].read_bytes())
    start = broken.index(b"\xff\xda")  # the start of the scan
    broken[start + 2:start + 4] = b"\x00\x02"  # a scan header too short to be one
    paths[1].write_bytes(bytes(broken))
    sources = [read_plain_jpeg(p, max_pixels=LIMIT) for p in paths]
    assert all(s is not None for s in sources)
    results = BatchedJpegDecoder("cpu", max_size=BOX, spec=CLIP_224).prepare(sources)
    assert results[1] is None
    assert results[0] is not None and results[2] is not None
    assert [r.path for r in (results[0], results[2])] == [paths[0], paths[2]]


def test_a_chunk_the_device_cannot_finish_goes_to_the_cpu_path(tmp_path, monkeypatch) -> None:
    """Out of memory (or any kernel error) after the decode costs that chunk its GPU path, not the batch:
    its files come back as None (the CPU workers take them), later chunks are decoded as usual."""
    from image_search import gpudecode

    paths = [save_jpeg(tmp_path / f"p{i}.jpg", size=(400, 300), seed=i) for i in range(3)]
    sources = [read_plain_jpeg(p, max_pixels=LIMIT) for p in paths]
    monkeypatch.setattr(gpudecode, "DECODE_CHUNK", 2)
    real_encode, calls = gpudecode.encode_jpeg, []

    def encode_failing_first(pictures, quality):
        calls.append(len(pictures))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_encode(pictures, quality=quality)

    monkeypatch.setattr(gpudecode, "encode_jpeg", encode_failing_first)
    results = BatchedJpegDecoder("cpu", max_size=BOX, spec=CLIP_224).prepare(sources)
    assert results[:2] == [None, None]
    assert results[2] is not None and results[2].path == paths[2]


def test_chunks_are_bounded_by_files_and_by_pixels(tmp_path, monkeypatch) -> None:
    from image_search import gpudecode
    from image_search.gpudecode import PlainJpeg, _chunks

    def plain(megapixels: int) -> PlainJpeg:
        return PlainJpeg(tmp_path / "x.jpg", bytearray(), "0" * 32, megapixels * 1000, 1000, 1)

    monkeypatch.setattr(gpudecode, "DECODE_CHUNK", 3)
    monkeypatch.setattr(gpudecode, "DECODE_CHUNK_PIXELS", 10_000_000)
    sizes = [[len(c), sum(p.width for p in c) // 1000] for c in _chunks([plain(m) for m in (1, 1, 1, 1, 9, 2, 12, 1)])]
    # by count (3 files), by pixels (1 + 9 fills the 10 MP; 2 more would not fit), a picture above the
    # budget alone, and the rest
    assert sizes == [[3, 3], [2, 10], [1, 2], [1, 12], [1, 1]]


def test_the_decoder_checks_its_device_before_it_is_used(tmp_path) -> None:
    assert BatchedJpegDecoder("cpu", max_size=BOX, spec=CLIP_224).check() is None
    with PreprocessPool(max_size=BOX, max_pixels=LIMIT, workers=0) as pool:
        reader = open_gpu_reader(pool, "cpu", spec=CLIP_224, threads=1, state_directory=tmp_path / "state")
        assert reader is not None
        reader.close()
        with capture_logs() as logs:
            on_cuda = open_gpu_reader(pool, "cuda", spec=CLIP_224, threads=1, state_directory=tmp_path / "state")
        if not torch_cuda_available():
            # No GPU: asking for one answers "not here" (one log line), not a crash.
            assert on_cuda is None
            assert [e["device"] for e in logs if e["event"] == "gpu_jpeg_decode_unavailable"] == ["cuda"]
        else:
            # A GPU: nvJPEG's check passes and the reader decodes there (tests/test_gpu.py proves it decodes).
            assert on_cuda is not None and on_cuda.decoder.device.type == "cuda"
            on_cuda.close()


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --- through the indexer ------------------------------------------------------------------------------


def mixed_folder(images: Path) -> dict[str, bool]:
    """name -> whether it is indexed; the plain JPEGs are the ones the batched decoder takes."""
    for i in range(5):
        save_jpeg(images / f"plain{i}.jpg", size=(700 + 40 * i, 500), seed=i, orientation=1 + i)
    save_jpeg(images / "progressive.jpg", size=(640, 480), seed=7, progressive=True)
    photo((300, 200), 8).save(images / "drawing.png")
    Image.new("CMYK", (200, 150), (0, 200, 30, 0)).save(images / "print.jpg", format="JPEG")
    whole = save_jpeg(images / "cut.jpg", size=(600, 400), seed=9).read_bytes()
    (images / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (images / "notes.jpg").write_bytes(b"not a picture at all")
    return {"plain0.jpg": True, "plain1.jpg": True, "plain2.jpg": True, "plain3.jpg": True, "plain4.jpg": True,
            "progressive.jpg": True, "drawing.png": True, "print.jpg": True, "cut.jpg": False, "notes.jpg": False}


@pytest.fixture
def two_trees(tmp_path: Path, tiny_model_dir: Path):
    """The same files in two trees, each with its own embedded PostgreSQL."""
    trees = []
    for name in ("cpu", "batched"):
        root = tmp_path / name
        cfg = load_config(write_config(root, tiny_model_dir, batch_size=4, resize_width=512, resize_height=512))
        expected = mixed_folder(cfg.source_directory)
        trees.append((cfg, Database(cfg)))
    embedder = Embedder.load(str(tiny_model_dir), device="cpu", dimension=TINY_DIMENSION)
    yield trees, embedder, expected
    for _, database in trees:
        database.close()


def test_batched_decoding_indexes_what_the_cpu_path_indexes_with_the_same_identities(two_trees) -> None:
    (cpu_cfg, cpu_db), (gpu_cfg, gpu_db) = two_trees[0]
    embedder, expected = two_trees[1], two_trees[2]
    summaries, rows = [], []
    for cfg, database, device in ((cpu_cfg, cpu_db, None), (gpu_cfg, gpu_db, "cpu")):
        store = database.open_store(dimension=TINY_DIMENSION)
        indexer = Indexer(cfg, embedder, store, workers=1, jpeg_decode_device=device)
        try:
            summaries.append((indexer.index_folder(show_progress=False), indexer.decoded_on_device))
        finally:
            indexer.close()
            store.close()
        found = database_rows(database, ("file_name", "file_hash", "embedding::real[] AS embedding")) or []
        rows.append({r["file_name"]: r for r in found})
    (cpu_summary, cpu_on_device), (gpu_summary, gpu_on_device) = summaries
    assert cpu_on_device == 0 and gpu_on_device == 5  # five plain JPEGs; the progressive one took the CPU workers
    assert sorted(rows[0]) == sorted(rows[1]) == sorted(n for n, ok in expected.items() if ok)
    # Refusals: the same files, the same reasons, word for word.
    assert sorted((p.name, r) for p, r in cpu_summary.skipped) == sorted((p.name, r) for p, r in gpu_summary.skipped)
    assert sorted(p.name for p, _ in gpu_summary.skipped) == ["cut.jpg", "notes.jpg"]
    for name in rows[0]:
        # The identity does not depend on the decoder: an identity taken from decoded pixels or the
        # processed JPEG (as before this round) differs between the two paths and fails here.
        assert rows[0][name]["file_hash"] == rows[1][name]["file_hash"], name
        a, b = (np.asarray(r[name]["embedding"], dtype=np.float32) for r in rows)
        assert float(a @ b) > 0.99, name  # the same picture to the model, within decoder noise
    # The processed copies exist on both paths, at the same sizes.
    for name in rows[0]:
        with Image.open(cpu_cfg.processed_directory / f"{name}.jpg") as a, \
                Image.open(gpu_cfg.processed_directory / f"{name}.jpg") as b:
            assert a.size == b.size, name


def test_a_batch_waiting_for_a_slow_file_on_the_cpu_workers_says_it_lives(tmp_path, tiny_model_dir,
                                                                         monkeypatch) -> None:
    """On the device path, the files the device does not take go to the CPU workers, and the batch waited
    for them with no heartbeat: a file read for 50 s (the limit is 60) left systemd's watchdog (60 s)
    unpinged, and it would kill the service, and again at every restart. Now the wait pings as the CPU
    path's does."""
    hold_reads(monkeypatch, tmp_path / "slow-begun", slow_s=3.0)  # ``slow*`` held 3 s in its worker
    cfg = load_config(write_config(tmp_path / "tree", tiny_model_dir, batch_size=4))
    save_jpeg(cfg.source_directory / "plain.jpg", size=(640, 480), seed=1)
    photo((300, 200), 2).save(cfg.source_directory / "slow.png")
    embedder = Embedder.load(str(tiny_model_dir), device="cpu", dimension=TINY_DIMENSION)
    beats: list[float] = []
    database = Database(cfg)
    try:
        store = database.open_store(dimension=TINY_DIMENSION)
        indexer = Indexer(cfg, embedder, store, workers=1, jpeg_decode_device="cpu", heartbeat=lambda: beats.append(1))
        try:
            summary = indexer.index_folder(show_progress=False)
            assert (summary.embedded, indexer.decoded_on_device) == (2, 1)
        finally:
            indexer.close()
            store.close()
    finally:
        database.close()
    assert len(beats) >= 2  # about once a second of the three


# --- a file that crashes the decoder -------------------------------------------------------------------


def test_a_file_that_kills_the_decoder_is_decoded_by_the_cpu_workers_after_the_restart(tmp_path, tiny_model_dir) -> None:
    """nvJPEG runs in the service's process: a file it faults on kills the service, and systemd restarts it.
    The restart must not decode that file on the GPU again (a crash loop): the chunk that was in flight is
    quarantined, and the CPU workers (separate processes) take its files from then on."""
    cfg = load_config(write_config(tmp_path, tiny_model_dir, batch_size=4, resize_width=512, resize_height=512))
    # The crash (its in-flight chunk, p2 and p3, checked by the helper), then the restart on the same state directory.
    embedder = Embedder.load(str(tiny_model_dir), device="cpu", dimension=TINY_DIMENSION)
    paths, restart = crash_then_restart(cfg, embedder, "cpu")
    summary, on_device, logs = restart.summary, restart.on_device, restart.logs
    assert restart.names == [p.name for p in paths] and not summary.skipped  # every file indexed, none lost
    assert on_device == 4  # p2 and p3 went to the CPU workers
    [crashed] = [e for e in logs if e["event"] == "gpu_jpeg_decode_crashed"]
    assert crashed["log_level"] == "warning" and crashed["files"] == [str(paths[2]), str(paths[3])]
    assert not list(cfg.state_directory.glob(f"{IN_FLIGHT_PREFIX}.*"))

    # And at every later start, by content: a renamed copy of the file stays off the device.
    moved = paths[2].rename(cfg.source_directory / "renamed.jpg")
    with PreprocessPool(max_size=BOX, max_pixels=LIMIT, workers=0) as pool:
        reader = open_gpu_reader(pool, "cpu", spec=CLIP_224, threads=1, state_directory=cfg.state_directory)
        assert reader is not None
        outcomes = reader.submit([moved, paths[0]]).results()
        reader.close()
    assert all(isinstance(o, PreparedImage) for o in outcomes) and reader.decoded_on_device == 1


def test_the_quarantine_takes_what_a_dead_process_left_and_leaves_a_running_ones(tmp_path) -> None:
    """Liveness is the in-flight file's lock, which the kernel drops when its process dies: no host name or
    pid is trusted (a container on the same volume, a reused pid)."""
    state = tmp_path / "state"
    dead, running = "a" * 32, "b" * 32
    busy = DecodeQuarantine(state)  # another process that decodes now
    # A dead process's file: nobody holds its lock. Its last line was cut short by the crash.
    (state / f"{IN_FLIGHT_PREFIX}.0dead").write_text(f"{dead}\t/photos/dead.jpg\n{'c' * 31}")
    with busy.in_flight([(running, "/photos/busy.jpg")]):
        quarantine = DecodeQuarantine(state)
        assert dead in quarantine and running not in quarantine and len(quarantine) == 1
        assert (state / QUARANTINE_NAME).read_text() == f"{dead}\t/photos/dead.jpg\n"
        assert not (state / f"{IN_FLIGHT_PREFIX}.0dead").exists()
        assert len(list(state.glob(f"{IN_FLIGHT_PREFIX}.*"))) == 2  # the busy one's, and this one's own
    for q in (busy, quarantine):
        q.close()
    assert not list(state.glob(f"{IN_FLIGHT_PREFIX}.*"))  # a process that stops cleanly leaves none
    again = DecodeQuarantine(state)
    assert dead in again and len(again) == 1  # kept, not added twice
    again.close()


def test_a_crash_in_the_start_up_check_turns_gpu_decoding_off_until_its_mark_is_deleted(tmp_path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    earlier = "d" * 32
    (state / QUARANTINE_NAME).write_text(f"{earlier}\t/photos/crashed-once.jpg\n")
    (state / f"{IN_FLIGHT_PREFIX}.0dead").write_text(f"{CHECK_KEY}\t\n")
    with PreprocessPool(max_size=BOX, max_pixels=LIMIT, workers=0) as pool, capture_logs() as logs:
        assert open_gpu_reader(pool, "cpu", spec=CLIP_224, threads=1, state_directory=state) is None
        assert open_gpu_reader(pool, "cpu", spec=CLIP_224, threads=1, state_directory=state) is None  # still off
    reasons = [e["reason"] for e in logs if e["event"] == "gpu_jpeg_decode_unavailable"]
    assert len(reasons) == 2 and all(CHECK_CRASHED_NAME in r for r in reasons)
    (state / CHECK_CRASHED_NAME).unlink()  # the way back, as the warning says
    with PreprocessPool(max_size=BOX, max_pixels=LIMIT, workers=0) as pool:
        reader = open_gpu_reader(pool, "cpu", spec=CLIP_224, threads=1, state_directory=state)
        assert reader is not None
        assert earlier in reader.decoder.quarantine  # the files quarantined before stay so
        reader.close()


def test_a_check_that_fails_with_an_error_turns_gpu_decoding_off_for_this_run_only(tmp_path, monkeypatch) -> None:
    """A device without a JPEG codec (an error, not a crash) is no reason to keep it off after, say, a
    driver upgrade: only a process that died in the check is remembered."""
    from image_search import gpudecode

    def no_codec(*args, **kwargs):
        raise RuntimeError("nvjpeg is not available in this build")

    state = tmp_path / "state"
    with PreprocessPool(max_size=BOX, max_pixels=LIMIT, workers=0) as pool:
        with monkeypatch.context() as patched:
            patched.setattr(gpudecode, "decode_jpeg", no_codec)
            assert open_gpu_reader(pool, "cpu", spec=CLIP_224, threads=1, state_directory=state) is None
        assert not (state / CHECK_CRASHED_NAME).exists()
        reader = open_gpu_reader(pool, "cpu", spec=CLIP_224, threads=1, state_directory=state)
        assert reader is not None
        reader.close()


@pytest.mark.parametrize("stage", ["decode", "encode"])
def test_a_chunk_that_breaks_the_device_is_quarantined_and_no_other_failure_is(tmp_path, monkeypatch, stage) -> None:
    """A CUDA kernel fault is raised as an error and is sticky (every later call fails), so the process
    stops soon after: that chunk must not come back to the device. Out of memory, a file nvJPEG refuses,
    any other error leave the device working: those files may be tried again another time. Every failed
    chunk goes to the CPU path, and the service goes on.

    The decoder's own detection (``_device_fault``: does a device synchronisation fail?) runs; only the
    synchronisation is a stand-in here, failing from the fault on as a broken CUDA device's does (the CPU
    has none to fail). tests/test_gpu.py breaks a real CUDA device."""
    import torch

    from image_search import gpudecode

    widths = (400, 420, 440, 460, 480, 500)  # which file a call is about: its width, or its length in bytes
    paths = [save_jpeg(tmp_path / f"p{i}.jpg", size=(w, 300), seed=i) for i, w in enumerate(widths)]
    sources = [read_plain_jpeg(p, max_pixels=LIMIT) for p in paths]
    monkeypatch.setattr(gpudecode, "DECODE_CHUNK", 1)
    broken = {"device": False}
    real = getattr(gpudecode, f"{stage}_jpeg")

    def failing(items, **kwargs):
        first = items[0]
        index = ([len(s.data) for s in sources].index(len(first)) if stage == "decode"
                 else widths.index(first.shape[-1]) if first.shape[-1] in widths else None)
        if index == 0:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        if index == 1:
            raise RuntimeError("nvjpeg: the bitstream is not supported")  # the device still works
        if index == 2:
            raise ValueError("a bug of ours")
        if index == 4:
            broken["device"] = True
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(items, **kwargs)

    def synchronize(self) -> None:
        if broken["device"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpudecode, f"{stage}_jpeg", failing)
    monkeypatch.setattr(BatchedJpegDecoder, "_synchronize", synchronize)
    quarantine = DecodeQuarantine(tmp_path / "state")
    results = BatchedJpegDecoder("cpu", max_size=BOX, spec=CLIP_224, quarantine=quarantine).prepare(sources)
    # The file after the fault cannot be decoded either (the device stays broken), but it is not the
    # cause: it is not quarantined.
    assert [r is None for r in results] == [True, True, True, False, True, True]
    assert results[3].path == paths[3]
    assert [s.file_hash in quarantine for s in sources] == [False, False, False, False, True, False]
    quarantine.close()
    later = DecodeQuarantine(tmp_path / "state")
    assert sources[4].file_hash in later and len(later) == 1  # and at the next start
    later.close()


def test_failing_bookkeeping_costs_its_chunk_the_gpu_path_and_never_shifts_results(tmp_path, monkeypatch) -> None:
    """The in-flight file cannot be written (disk full) for one chunk, and cannot be emptied after
    another that decoded well: both chunks go to the CPU path, and every other file keeps its own result."""
    from image_search import gpudecode

    paths = [save_jpeg(tmp_path / f"p{i}.jpg", size=(400 + 20 * i, 300), seed=i) for i in range(4)]
    sources = [read_plain_jpeg(p, max_pixels=LIMIT) for p in paths]
    monkeypatch.setattr(gpudecode, "DECODE_CHUNK", 1)
    quarantine = DecodeQuarantine(tmp_path / "state")
    real_pwrite, real_ftruncate, calls = os.pwrite, os.ftruncate, {"pwrite": 0, "ftruncate": 0}

    def pwrite(fd, data, offset):
        calls["pwrite"] += 1
        if calls["pwrite"] == 1:
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    def ftruncate(fd, length):
        calls["ftruncate"] += 1
        if calls["ftruncate"] == 2:  # after the second chunk (the first one's failed write was emptied too)
            raise OSError(5, "Input/output error")
        return real_ftruncate(fd, length)

    monkeypatch.setattr(gpudecode.os, "pwrite", pwrite)
    monkeypatch.setattr(gpudecode.os, "ftruncate", ftruncate)
    results = BatchedJpegDecoder("cpu", max_size=BOX, spec=CLIP_224, quarantine=quarantine).prepare(sources)
    monkeypatch.undo()
    assert len(results) == 4 and results[0] is None and results[1] is None
    assert [r.path for r in results[2:]] == paths[2:]
    assert len(quarantine) == 0
    quarantine.close()


def test_an_unwritable_state_directory_leaves_decoding_to_the_cpu_workers(tmp_path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    with PreprocessPool(max_size=BOX, max_pixels=LIMIT, workers=0) as pool, capture_logs() as logs:
        assert open_gpu_reader(pool, "cpu", spec=CLIP_224, threads=1, state_directory=blocker) is None
    [event] = [e for e in logs if e["event"] == "gpu_jpeg_decode_unavailable"]
    assert "cannot hold the decoder's crash quarantine" in event["reason"] and str(blocker) in event["reason"]


# --- skipped decodes, grouped resizes, the encoder's thread -------------------------------------------


def test_the_canary_finds_an_output_the_decoder_did_not_write() -> None:
    """The decision: a picture still holding the canary pattern was skipped; a decoded one never is."""
    from image_search.gpudecode import canary, skipped_decodes

    written = torch_tensor(photo((40, 30), 1))
    assert skipped_decodes([written, canary((3, 30, 40), "cpu"), None, canary((3, 1, 7), "cpu")]) == [1, 3]
    assert skipped_decodes([written, None]) == [] and skipped_decodes([]) == []
    flat = canary((3, 30, 40), "cpu").clone()
    flat[:, -1, :] = 0  # written, even if only its last row: not skipped
    assert skipped_decodes([flat]) == []


def test_a_chunk_with_a_skipped_decode_goes_to_the_cpu_path(tmp_path, monkeypatch) -> None:
    """A fake decoder that reports success but leaves one output as it found it (filled with the canary):
    that chunk goes to the CPU path, with one warning naming the file; other chunks are decoded."""
    from image_search import gpudecode
    from image_search.gpudecode import canary

    paths = [save_jpeg(tmp_path / f"p{i}.jpg", size=(400, 300), seed=i) for i in range(3)]
    sources = [read_plain_jpeg(p, max_pixels=LIMIT) for p in paths]
    monkeypatch.setattr(gpudecode, "DECODE_CHUNK", 2)
    real_decode = gpudecode.decode_jpeg

    def decode_skipping_the_second_file(encoded, **options):
        out = real_decode(encoded, **options)
        return [canary(t.shape, "cpu") if bytes(e.numpy()) == bytes(sources[1].data) else t
                for e, t in zip(encoded, out)]

    monkeypatch.setattr(gpudecode, "decode_jpeg", decode_skipping_the_second_file)
    with capture_logs() as logs:
        results = BatchedJpegDecoder("cpu", max_size=BOX, spec=CLIP_224).prepare(sources)
    assert results[:2] == [None, None]
    assert results[2] is not None and results[2].path == paths[2]
    [skipped] = [e for e in logs if e["event"] == "gpu_jpeg_decode_skipped"]
    assert skipped["files"] == [str(paths[1])] and skipped["chunk"] == 2


def test_resizes_are_batched_per_shape_and_equal_one_by_one(monkeypatch) -> None:
    from image_search import gpudecode
    from image_search.gpudecode import resize, resize_each

    pictures = [torch_tensor(photo(size, i)) for i, size in enumerate([(64, 48), (64, 48), (48, 64), (64, 48)])]
    sizes = [(32, 24), (32, 24), (24, 32), (16, 12)]
    expected = [resize(p, s) for p, s in zip(pictures, sizes)]
    calls = []
    real = gpudecode.F.interpolate

    def counting(batch, **kwargs):
        calls.append(batch.shape[0])
        return real(batch, **kwargs)

    monkeypatch.setattr(gpudecode.F, "interpolate", counting)
    got = resize_each(pictures, sizes)
    assert sorted(calls) == [1, 1, 2]  # the two of one shape going to one size in one call
    assert all(g.equal(e) for g, e in zip(got, expected))
    monkeypatch.setattr(gpudecode, "RESIZE_GROUP_PIXELS", 64 * 48)  # one picture's pixels a call at most
    calls.clear()
    assert all(g.equal(e) for g, e in zip(resize_each(pictures, sizes), expected)) and calls == [1, 1, 1, 1]


def test_encoding_runs_off_the_calling_thread(tmp_path, monkeypatch) -> None:
    import threading

    from image_search import gpudecode

    threads = []
    real_encode = gpudecode.encode_jpeg

    def recording(pictures, quality):
        threads.append(threading.current_thread().name)
        return real_encode(pictures, quality=quality)

    monkeypatch.setattr(gpudecode, "encode_jpeg", recording)
    decoder = BatchedJpegDecoder("cpu", max_size=BOX, spec=CLIP_224)
    [result] = decoder.prepare([read_plain_jpeg(save_jpeg(tmp_path / "p.jpg"), max_pixels=LIMIT)])
    decoder.close()
    assert result is not None and len(threads) == 2
    assert all(name.startswith("jpeg-encode") for name in threads) and threading.current_thread().name not in threads


def torch_tensor(image: Image.Image):
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


# --- the --gpu benchmark's decode agreement, on the CPU -----------------------------------------------


def test_the_benchmarks_pixel_difference_and_cosine() -> None:
    from tests.benchmarks.gpu import cosines, pixel_difference

    a = np.zeros((4, 5, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0], b[1, 1, 1] = 255, 6
    high, mean = pixel_difference(a, b)
    assert high == 255 and mean == pytest.approx(261 / 60)
    assert pixel_difference(b, b) == (0.0, 0.0)
    with pytest.raises(ValueError, match="different shapes"):
        pixel_difference(a, b[:2])
    vectors = np.array([[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(cosines(vectors, np.array([[2.0, 0.0], [1.0, 1.0]])), [1.0, np.sqrt(0.5)])


def test_the_benchmarks_decode_agreement_runs_on_the_cpu(tmp_path, tiny_model_dir) -> None:
    """Every subsampling's max and mean, and the two paths' cosine: here torchvision's CPU decoder
    (libjpeg-turbo, as Pillow's) stands in for nvJPEG, so only the plumbing and the keys are checked."""
    from tests.benchmarks.gpu import SUBSAMPLINGS, decode_agreement

    embedder = Embedder.load(str(tiny_model_dir), device="cpu", dimension=TINY_DIMENSION)
    result = decode_agreement(tmp_path / "agreement", embedder, size=(96, 64), per_kind=2)
    assert sorted(result) == sorted([f"gpu_decode_diff_{k}_{s}" for k in SUBSAMPLINGS for s in ("max", "mean")]
                                    + ["gpu_decode_cosine_min", "gpu_decode_cosine_mean"])
    for kind in SUBSAMPLINGS:
        assert 0 <= result[f"gpu_decode_diff_{kind}_mean"] <= result[f"gpu_decode_diff_{kind}_max"] <= 255
        assert result[f"gpu_decode_diff_{kind}_mean"] < 3
    assert 0.99 < result["gpu_decode_cosine_min"] <= result["gpu_decode_cosine_mean"] <= 1.0 + 1e-6


def test_one_device_wide_synchronisation_per_chunk(tmp_path, monkeypatch) -> None:
    """The drain before the decode (the stream-race fix) is the chunk's one device-wide synchronisation;
    the encoder and the end of the chunk wait on events."""
    from image_search import gpudecode

    paths = [save_jpeg(tmp_path / f"p{i}.jpg", size=(400, 300), seed=i) for i in range(3)]
    monkeypatch.setattr(gpudecode, "DECODE_CHUNK", 1)
    calls = []
    monkeypatch.setattr(BatchedJpegDecoder, "_synchronize", lambda self: calls.append(1))
    decoder = BatchedJpegDecoder("cpu", max_size=BOX, spec=CLIP_224)
    results = decoder.prepare([read_plain_jpeg(p, max_pixels=LIMIT) for p in paths])
    decoder.close()
    assert all(r is not None for r in results) and len(calls) == 3


def test_the_batched_path_carries_the_metadata_the_cpu_path_reads(tmp_path) -> None:
    """The date taken, camera, upright size and format of a plain JPEG decoded in a batch (on "cpu" here)
    are the CPU path's (both read ``metadata.picture_metadata`` of the same header)."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "FUJIFILM", "X100V", 6
    exif.get_ifd(0x8769).update({0x9003: "2024:02:29 12:00:00", 0x9011: "+09:00"})
    path = tmp_path / "tagged.jpg"
    Image.new("RGB", (64, 48), (10, 120, 200)).save(path, format="JPEG", exif=exif.tobytes())
    with PreprocessPool(max_size=BOX, max_pixels=LIMIT, workers=0) as pool:
        reader = open_gpu_reader(pool, "cpu", spec=CLIP_224, threads=1, state_directory=tmp_path)
        assert reader is not None
        [batched] = reader.submit([path]).results()
        reader.close()
    assert isinstance(batched, PreparedImage) and reader.decoded_on_device == 1
    cpu = preprocess_image(path, max_size=BOX, max_pixels=LIMIT)
    assert batched.metadata == cpu.metadata
    assert batched.metadata is not None and batched.metadata.offset_minutes == 540
    assert (batched.metadata.width, batched.metadata.height, batched.metadata.format) == (48, 64, "jpeg")
    assert batched.metadata.camera_model == "X100V"
