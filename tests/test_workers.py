"""The preprocessing pool: worker processes must give exactly what ``preprocess_image`` gives in-process.

Each test is a promise the indexer relies on: same identity and bytes, the same refusal for a bad file,
one crashing file costs that file only, outcomes in input order, and no process left behind.
The model_input callables below are top-level functions of this module so that workers can import them.
"""

from __future__ import annotations

import functools
import io
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import structlog
from PIL import ExifTags, Image

from tests.support.files import claimed_folders, save_picture
from tests.support.logs import logged_events, logging_to
from image_search.preprocess import (
    IncompleteFile,
    PreparedImage,
    PreprocessError,
    md5_hex,
    normalised_pixels,
    preprocess_image,
    processed_path_for,
    save_processed,
    thumbnail_path_for,
)
from image_search.launcher import LAUNCHER
from image_search.workers import PoolError, PreprocessPool, PreprocessSettings, ProcessedFolders, preprocess_file

pytestmark = pytest.mark.integration

BOX = (128, 128)
LIMIT = 50_000_000
CRASH_MARK = (255, 0, 255)  # a pure magenta PNG: the file the crashing model_input dies on


# --- model_input callables, imported by the workers ---------------------------------------------------

def centre_square(image: Image.Image, *, side: int) -> np.ndarray:
    """A stand-in for the model's resize+crop: deterministic, and different from the image itself."""
    short = min(image.size)
    left, top = (image.width - short) // 2, (image.height - short) // 2
    crop = image.crop((left, top, left + short, top + short)).resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(crop, dtype=np.uint8)


def _is_crash_mark(image: Image.Image) -> bool:
    return image.getpixel((0, 0)) == CRASH_MARK


def exit_on_mark(image: Image.Image) -> np.ndarray:
    if _is_crash_mark(image):
        os._exit(3)  # no cleanup, no exception: the way a process vanishes
    return normalised_pixels(image)


def segfault_on_mark(image: Image.Image) -> np.ndarray:
    if _is_crash_mark(image):
        os.kill(os.getpid(), signal.SIGSEGV)
    return normalised_pixels(image)


def raise_on_mark(image: Image.Image) -> np.ndarray:
    if _is_crash_mark(image):
        raise ValueError("cannot handle magenta")
    return normalised_pixels(image)


def logs_a_thousand_warnings(image: Image.Image) -> np.ndarray:
    """A header that makes the code log one warning per tag, a thousand tags."""
    for tag in range(1000):
        structlog.get_logger("tests.workers").warning("odd_header_tag", tag=tag)
    return normalised_pixels(image)


def warns_as_a_decoder_does(image: Image.Image) -> np.ndarray:
    warnings.warn("Possibly corrupt EXIF data", UserWarning, stacklevel=1)
    return normalised_pixels(image)


class WarnsWhenLoaded:
    """A model input whose loading in the worker (as it reads its settings, before any file) logs a line,
    as a module it imports may."""

    def __init__(self) -> None:
        self.loaded_in = "the test"

    def __setstate__(self, state: dict) -> None:
        structlog.get_logger("tests.workers").warning("model_input_loaded", detail="a warning at import")
        self.__dict__.update(state)

    def __call__(self, image: Image.Image) -> np.ndarray:
        return normalised_pixels(image)


def wait_for_gate(image: Image.Image, *, gate: str) -> np.ndarray:
    """Holds its worker until the file ``gate`` exists: lets a test keep batches unfinished."""
    while not os.path.exists(gate):
        time.sleep(0.01)
    return normalised_pixels(image)


def loaded_modules(image: Image.Image) -> np.ndarray:
    """What the worker has imported, as an array (the only thing a model_input may return)."""
    return np.array(sorted(name for name in ("torch", "transformers", "image_search.embed") if name in sys.modules))


# --- files -----------------------------------------------------------------------------------------------

def crash_mark(path: Path) -> Path:
    Image.new("RGB", (40, 30), CRASH_MARK).save(path, format="PNG")
    return path


def rotated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(7)
    im = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((320, 160), Image.Resampling.NEAREST)
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, format="JPEG", exif=exif.tobytes())
    return path


def taken_on(path: Path, date: str, offset: str | None = None) -> Path:
    """A JPEG whose EXIF says it was taken on ``date`` (``DateTimeOriginal``), at ``offset``."""
    exif = Image.Exif()
    taken = exif.get_ifd(ExifTags.IFD.Exif)
    taken[0x9003] = date
    if offset is not None:
        taken[0x9011] = offset
    Image.new("RGB", (40, 20), (200, 30, 30)).save(path, format="JPEG", exif=exif.tobytes())
    return path


def transparent_png(path: Path) -> Path:
    im = Image.new("RGBA", (90, 60), (10, 200, 30, 0))
    im.paste((200, 10, 30, 255), (0, 0, 45, 60))
    im.save(path, format="PNG")
    return path


@pytest.fixture()
def good_files(tmp_path: Path) -> list[Path]:
    return good_pictures(tmp_path)


def good_pictures(tmp_path: Path) -> list[Path]:
    """Real files of several kinds: large and small JPEGs, PNG, WebP, EXIF-rotated, transparent."""
    return [
        save_picture(tmp_path / "large.jpg", 1, size=(1200, 900)),
        save_picture(tmp_path / "small.jpg", 2, size=(64, 48)),
        save_picture(tmp_path / "tall.png", 3, size=(150, 400)),
        save_picture(tmp_path / "picture.webp", 4, size=(300, 200)),
        rotated_jpeg(tmp_path / "rotated.jpg"),
        transparent_png(tmp_path / "alpha.png"),
        save_picture(tmp_path / "really-a-png.jpg", 5, size=(200, 100), fmt="PNG"),
    ]


def _bilevel_png(width: int, height: int) -> bytes:
    """A genuine 1-bit PNG whose header claims a huge size, a few KB on disk."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    stream = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


@pytest.fixture()
def bad_files(tmp_path: Path) -> dict[str, Path]:
    """One file per rejection reason the pipeline has, keyed by a word its reason must contain."""
    empty = tmp_path / "empty.jpg"
    empty.touch()
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("these are my holiday notes, not a picture\n" * 10)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bilevel_png(8_000, 8_000))  # 64 MP: above LIMIT (and below Pillow's own warning), refused from the header
    return {"empty": empty, "truncated": truncated, "not a supported image": not_image,
            "decompression bomb": bomb, "disappeared": tmp_path / "never-existed.jpg"}


def reference(path: Path, model_input=None) -> PreparedImage | PreprocessError:
    """What the in-process path gives for ``path``."""
    try:
        prepared = preprocess_image(path, max_size=BOX, max_pixels=LIMIT)
    except PreprocessError as exc:
        return exc
    return PreparedImage(path=path, jpeg_bytes=prepared.jpeg_bytes, file_hash=prepared.file_hash,
                            width=prepared.width, height=prepared.height, source_width=prepared.source_width,
                            source_height=prepared.source_height, thumbnail_jpeg=prepared.thumbnail_jpeg,
                            pixels=None if model_input is None else model_input(prepared.image))


def assert_same(actual: PreparedImage | PreprocessError, expected: PreparedImage | PreprocessError) -> None:
    assert type(actual) is type(expected), f"{actual!r} vs {expected!r}"
    if isinstance(expected, PreprocessError):
        assert (actual.path, actual.reason, str(actual)) == (expected.path, expected.reason, str(expected))
        return
    assert actual.path == expected.path
    assert actual.file_hash == expected.file_hash
    assert actual.jpeg_bytes == expected.jpeg_bytes
    assert actual.thumbnail_jpeg == expected.thumbnail_jpeg
    assert (actual.width, actual.height, actual.source_width, actual.source_height) == (
        expected.width, expected.height, expected.source_width, expected.source_height)
    if expected.pixels is None:
        assert actual.pixels is None
    else:
        assert actual.pixels.dtype == np.uint8 and actual.pixels.shape == expected.pixels.shape
        assert np.array_equal(actual.pixels, expected.pixels)


def pool(model_input=None, workers: int = 2, **kwargs) -> PreprocessPool:
    return PreprocessPool(max_size=BOX, max_pixels=LIMIT, model_input=model_input, workers=workers, **kwargs)


def processes_below_this_one() -> set[int]:
    """Live (non-zombie) children of this process, and theirs."""
    found = children_of_this_process()
    for pid in list(found):
        found |= children_of_this_process(pid)
    return found


def children_of_this_process(me: int | None = None) -> set[int]:
    """Live (non-zombie) children (of ``me``, this process where None), read from /proc."""
    me = os.getpid() if me is None else me
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == me and state != "Z":
            found.add(int(entry.name))
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- equivalence -------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_input", [None, normalised_pixels, functools.partial(centre_square, side=32)],
                         ids=["no-pixels", "normalised", "centre-square"])
def test_workers_give_exactly_what_preprocess_image_gives(good_files, model_input):
    with pool(model_input) as workers:
        outcomes = workers.submit(good_files).results()
    assert len(outcomes) == len(good_files)
    for path, outcome in zip(good_files, outcomes, strict=True):
        assert_same(outcome, reference(path, model_input))


def test_normalised_pixels_rebuild_the_exact_image_the_embedder_gets_today(good_files):
    with pool(normalised_pixels) as workers:
        outcomes = workers.submit(good_files).results()
    for path, outcome in zip(good_files, outcomes, strict=True):
        prepared = preprocess_image(path, max_size=BOX, max_pixels=LIMIT)
        rebuilt = Image.fromarray(outcome.pixels)
        assert rebuilt.mode == "RGB" and rebuilt.size == prepared.image.size
        assert rebuilt.tobytes() == prepared.image.tobytes()


def test_a_pool_result_is_saved_like_a_prepared_image(tmp_path, good_files):
    with pool() as workers:
        [outcome] = workers.submit(good_files[:1]).results()
    processed = tmp_path / "processed" / "large.jpg.jpg"
    save_processed(outcome, processed)
    assert processed.read_bytes() == outcome.jpeg_bytes
    assert md5_hex(good_files[0].read_bytes()) == outcome.file_hash  # the source's identity


def test_the_workers_save_each_processed_copy_where_the_indexer_records_it(tmp_path, good_files, monkeypatch):
    """Issue 16: the copies are written by the workers, not by this process (whose save_processed counts)."""
    import image_search.preprocess
    import image_search.workers

    here: list[Path] = []
    for module in (image_search.preprocess, image_search.workers):
        monkeypatch.setattr(module, "save_processed", lambda prepared, path: here.append(path))
    nested = save_picture(tmp_path / "trip" / "day 2" / "beach.png", 6, size=(180, 120))
    paths = [*good_files, nested]
    folders = claimed_folders(tmp_path, tmp_path / "processed")
    with pool(processed=folders) as workers:
        outcomes = workers.submit(paths).results()

    assert here == []
    for path, outcome in zip(paths, outcomes, strict=True):
        processed = processed_path_for(path, tmp_path, tmp_path / "processed")
        assert outcome.saved_to == processed, path
        expected = reference(path)
        assert processed.read_bytes() == expected.jpeg_bytes
        assert thumbnail_path_for(processed).read_bytes() == expected.thumbnail_jpeg
        # Saved: the bytes stay in the files, not sent back again; nothing else changed.
        assert outcome.jpeg_bytes == b"" and outcome.thumbnail_jpeg == b""
        assert_same(replace(outcome, jpeg_bytes=expected.jpeg_bytes, thumbnail_jpeg=expected.thumbnail_jpeg), expected)
    assert (tmp_path / "processed" / "trip" / "day 2" / "beach.png.jpg").is_file()


def test_a_copy_a_worker_cannot_write_is_left_to_the_indexer(tmp_path, good_files):
    """A failed write is not the file's fault: the picture comes back unsaved (``saved_to`` None), and the
    indexer's own write then says what is wrong with the folder (tests/test_failures.py: a full disk)."""
    folders = claimed_folders(tmp_path, tmp_path / "processed")
    blocked = [processed_path_for(path, tmp_path, folders.processed) for path in good_files[:2]]
    for copy in blocked:
        (copy / "notes.txt").parent.mkdir(parents=True)  # a folder of the user's where the copy goes
        (copy / "notes.txt").write_text("mine\n")
    with pool(processed=folders) as workers:
        outcomes = workers.submit(good_files[:2]).results()
    for path, outcome in zip(good_files[:2], outcomes, strict=True):
        assert isinstance(outcome, PreparedImage) and outcome.saved_to is None
        assert_same(outcome, reference(path))
    assert all((copy / "notes.txt").read_text() == "mine\n" for copy in blocked)


def test_the_workers_write_no_copy_into_a_processed_folder_without_its_record(tmp_path, good_files):
    """The processed folder's disk unmounted: in its place the empty mount point on the disk under it (or no
    folder at all). Copies written there would fill the wrong disk; the pictures come back unsaved, and the
    indexer's own write names the outage (test_unmounted_processed_folder.py)."""
    mount_point, gone = tmp_path / "processed", tmp_path / "disk" / "processed"
    mount_point.mkdir()
    for processed in (mount_point, gone):
        with pool(processed=ProcessedFolders(source=tmp_path, processed=processed)) as workers:
            outcomes = workers.submit(good_files[:2]).results()
        for path, outcome in zip(good_files[:2], outcomes, strict=True):
            assert isinstance(outcome, PreparedImage) and outcome.saved_to is None
            assert_same(outcome, reference(path))
    assert list(mount_point.iterdir()) == [] and not (tmp_path / "disk").exists()


def test_without_processed_folders_the_workers_save_nothing(tmp_path, good_files):
    with pool() as workers:
        outcomes = workers.submit(good_files).results()
    assert all(outcome.saved_to is None for outcome in outcomes)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in good_files)


def test_every_rejection_reason_comes_back_word_for_word(bad_files, good_files):
    paths = [good_files[0], *bad_files.values(), good_files[1]]
    with pool() as workers:
        outcomes = workers.submit(paths).results()
    for path, outcome in zip(paths, outcomes, strict=True):
        assert_same(outcome, reference(path))
    for word, path in bad_files.items():
        refused = outcomes[paths.index(path)]
        assert isinstance(refused, PreprocessError) and word in refused.reason, (word, refused)
        # The kind survives the process boundary: the service waits for an incomplete file, fails the rest.
        assert isinstance(refused, IncompleteFile) == (word in ("empty", "truncated")), (word, type(refused))
    assert isinstance(outcomes[0], PreparedImage) and isinstance(outcomes[-1], PreparedImage)


def test_in_process_mode_gives_the_same_outcomes(good_files, bad_files):
    paths = [*good_files, *bad_files.values()]
    with pool(normalised_pixels, workers=0) as in_process:
        assert in_process.worker_pids() == []
        outcomes = in_process.submit(paths).results()
    for path, outcome in zip(paths, outcomes, strict=True):
        assert_same(outcome, reference(path, normalised_pixels))


def test_preprocess_file_is_the_in_process_job(good_files):
    settings = PreprocessSettings(max_size=BOX, max_pixels=LIMIT, model_input=normalised_pixels)
    assert_same(preprocess_file(good_files[0], settings), reference(good_files[0], normalised_pixels))


def test_an_exception_in_model_input_costs_that_file_with_the_thread_paths_wording(tmp_path, good_files):
    mark = crash_mark(tmp_path / "mark.png")
    with pool(raise_on_mark) as workers:
        outcomes = workers.submit([good_files[0], mark, good_files[1]]).results()
        assert workers.crashes == 0
    assert isinstance(outcomes[1], PreprocessError) and outcomes[1].path == mark
    assert outcomes[1].reason == "unexpected decoder error (ValueError: cannot handle magenta)"
    assert_same(outcomes[0], reference(good_files[0], normalised_pixels))
    assert_same(outcomes[2], reference(good_files[1], normalised_pixels))


# --- order ---------------------------------------------------------------------------------------------

def test_outcomes_follow_input_order_whatever_finishes_first(tmp_path):
    # Big files first, tiny ones after: with two workers the tiny ones finish long before the big ones.
    big = [save_picture(tmp_path / f"big{i}.jpg", i, size=(2400, 1800)) for i in range(3)]
    tiny = [save_picture(tmp_path / f"tiny{i}.png", 10 + i, size=(16, 12)) for i in range(12)]
    paths = [*big, *tiny, big[0], tmp_path / "missing.jpg", tiny[0]]  # repeats and a bad file too
    with pool(workers=2) as workers:
        first = workers.submit(paths)
        second = workers.submit(list(reversed(paths)))
        second_outcomes, first_outcomes = second.results(), first.results()
    assert [o.path for o in first_outcomes] == paths
    assert [o.path for o in second_outcomes] == list(reversed(paths))
    for path, outcome in zip(paths, first_outcomes, strict=True):
        assert_same(outcome, reference(path))


def test_empty_batch_is_done_at_once():
    with pool() as workers:
        handle = workers.submit([])
        assert handle.done() and handle.results() == []


# --- crashes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("crasher", "how"), [(exit_on_mark, "exited with status 3"),
                                              (segfault_on_mark, "killed by SIGSEGV")])
def test_a_crashing_worker_costs_only_the_file_it_died_on(tmp_path, good_files, crasher, how):
    mark = crash_mark(tmp_path / "mark.png")
    paths = [*good_files[:3], mark, *good_files[3:]]
    with pool(crasher, workers=2) as workers:
        before = set(workers.worker_pids())
        outcomes = workers.submit(paths).results()
        assert workers.crashes == 1
        workers.wait_ready()  # the replacement may still be starting when the batch is done
        after = set(workers.worker_pids())
        # The pool is whole again: still two workers, one of them new.
        assert len(after) == 2 and len(after - before) == 1
        again = workers.submit(good_files).results()
    crashed = outcomes[3]
    assert isinstance(crashed, PreprocessError) and crashed.path == mark
    assert crashed.reason == f"decoder crashed (worker process {how})"
    for path, outcome in zip(paths, outcomes, strict=True):
        if path != mark:
            assert_same(outcome, reference(path, normalised_pixels))
    for path, outcome in zip(good_files, again, strict=True):
        assert_same(outcome, reference(path, normalised_pixels))


def test_several_crashes_in_one_batch_with_one_worker_cost_only_those_files(tmp_path, good_files):
    marks = [crash_mark(tmp_path / f"mark{i}.png") for i in range(3)]
    paths = [marks[0], good_files[0], marks[1], marks[2], good_files[1], good_files[2]]
    with pool(exit_on_mark, workers=1) as workers:
        outcomes = workers.submit(paths).results()
        assert workers.crashes == 3
    for path, outcome in zip(paths, outcomes, strict=True):
        if path in marks:
            assert isinstance(outcome, PreprocessError) and outcome.reason.startswith("decoder crashed")
        else:
            assert_same(outcome, reference(path, normalised_pixels))


def test_a_worker_killed_while_idle_is_replaced_and_no_file_is_blamed(good_files):
    with pool(workers=2) as workers:
        workers.wait_ready()
        victim = workers.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30  # only how long we wait before calling it a failure
        while victim in workers.worker_pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        workers.wait_ready()  # the replacement is started after the dead one is removed
        assert victim not in workers.worker_pids() and len(workers.worker_pids()) == 2
        outcomes = workers.submit(good_files).results()
        assert workers.crashes == 0
    for path, outcome in zip(good_files, outcomes, strict=True):
        assert_same(outcome, reference(path))


def test_a_worker_that_cannot_start_fails_the_batch_instead_of_blaming_files(good_files, monkeypatch):
    # A model_input the parent can pickle (its module is in sys.modules) but no worker can import.
    ghost = types.ModuleType("ghost_module_only_in_the_parent")
    exec("def pixels(image):\n    return None\n", ghost.__dict__)
    monkeypatch.setitem(sys.modules, ghost.__name__, ghost)
    with pool(ghost.pixels, workers=2) as workers:
        with pytest.raises(PoolError, match="could not start.*ghost_module_only_in_the_parent"):
            workers.submit(good_files).results()  # submit raises once the failed start is known
        with pytest.raises(PoolError, match="could not start"):
            workers.wait_ready()
        with pytest.raises(PoolError):
            workers.submit(good_files)
        assert workers.crashes == 0


def test_an_unpicklable_model_input_is_refused_before_any_worker_starts():
    before = children_of_this_process()
    with pytest.raises(Exception, match="pickle"):
        pool(lambda image: np.zeros(1))
    assert children_of_this_process() == before


# --- signals, lifetime, bounded memory ---------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_workers_ignore_interrupt_and_terminate(good_files, signum):
    with pool(workers=2) as workers:
        workers.wait_ready()
        pids = workers.worker_pids()
        for pid in pids:
            os.kill(pid, signum)
        outcomes = workers.submit(good_files).results()
        assert workers.worker_pids() == pids and workers.crashes == 0
    for path, outcome in zip(good_files, outcomes, strict=True):
        assert_same(outcome, reference(path))


def test_close_leaves_no_worker_process(good_files):
    """The workers are gone; what stays is the template they were forked from (launcher.py), kept for
    the process's next pool."""
    before = processes_below_this_one()
    workers = pool(workers=2)
    pids = workers.worker_pids()
    assert set(pids) <= processes_below_this_one()
    workers.submit(good_files).results()
    workers.close()
    assert not any(is_running(pid) for pid in pids)
    assert processes_below_this_one() - before <= {LAUNCHER._template.process.pid}
    workers.close()  # idempotent
    with pytest.raises(PoolError, match="closed"):
        workers.submit(good_files)


def test_close_during_a_batch_fails_it_and_stops_busy_workers(tmp_path, good_files):
    gate = tmp_path / "gate"  # never opened: the workers are busy when close() comes
    before = children_of_this_process()
    workers = pool(functools.partial(wait_for_gate, gate=str(gate)), workers=2)
    handle = workers.submit(good_files)
    workers.close()
    with pytest.raises(PoolError, match="closed before this batch finished"):
        handle.results()
    assert children_of_this_process() == before


def test_workers_leave_when_the_parent_dies(tmp_path, good_files):
    """A parent killed with SIGKILL cannot call close(): its workers see their connection close and exit."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        from image_search.workers import PreprocessPool
        pool = PreprocessPool(max_size=(64, 64), max_pixels=10**8, workers=2)
        pool.submit([{str(good_files[0])!r}]).results()
        print(*pool.worker_pids(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr
    pids = [int(pid) for pid in run.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 30  # not a speed check: only how long we wait before calling it a leak
    while any(is_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(is_running(pid) for pid in pids)


def test_workers_never_import_torch_even_when_the_parent_main_module_does(tmp_path, good_files):
    """multiprocessing's spawn would re-import the parent's __main__ (the CLI, which imports torch) in every
    worker; these workers start from a bare interpreter."""
    script = tmp_path / "main_with_torch.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import torch  # as image_search.cli -> embed does at import
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from tests.test_workers import loaded_modules
        from image_search.workers import PreprocessPool
        with PreprocessPool(max_size=(64, 64), max_pixels=10**8, model_input=loaded_modules, workers=1) as pool:
            [outcome] = pool.submit([{str(good_files[0])!r}]).results()
        print("parent:", "torch" in sys.modules, "worker:", list(outcome.pixels))
    """))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "parent: True worker: []"


def test_no_more_than_two_batches_are_in_flight(tmp_path, good_files):
    gate = tmp_path / "gate"
    with pool(functools.partial(wait_for_gate, gate=str(gate)), workers=1) as workers:
        first, second = workers.submit(good_files[:2]), workers.submit(good_files[2:4])
        third: list = []
        submitter = threading.Thread(target=lambda: third.append(workers.submit(good_files[4:])))
        submitter.start()
        submitter.join(timeout=1.0)
        # Both earlier batches are held at the gate: the third submit must still be waiting.
        assert submitter.is_alive() and third == [] and not first.done() and not second.done()
        gate.touch()
        submitter.join(timeout=120)
        assert not submitter.is_alive()
        outcomes = first.results() + second.results() + third[0].results()
    for path, outcome in zip(good_files, outcomes, strict=True):
        assert_same(outcome, reference(path, normalised_pixels))


def test_a_pipelined_caller_that_collects_late_never_blocks(good_files):
    """submit() waits for batches to be processed, never for the caller to collect them."""
    with pool(workers=2) as workers:
        handles = [workers.submit([path]) for path in good_files]  # 7 batches, collected only at the end
        outcomes = [handle.results()[0] for handle in handles]
    for path, outcome in zip(good_files, outcomes, strict=True):
        assert_same(outcome, reference(path))


# --- the benchmark module stays runnable ---------------------------------------------------------------

def test_preprocess_benchmark_runs_and_reports_every_key(tmp_path, monkeypatch):
    """A smoke test only: tiny sizes, no timing asserted (the numbers are for the benchmark's reader)."""
    import importlib.util

    module_path = Path(__file__).parent / "benchmarks" / "preprocess.py"
    spec = importlib.util.spec_from_file_location("preprocess_benchmark", module_path)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # its dataclasses look their module up there
    spec.loader.exec_module(benchmark)
    report = benchmark.run(images=3, rounds=1, batch_size=2, cores=2, work_dir=tmp_path)
    for key in ("preprocess_img_s_one_core", "preprocess_img_s_all_cores", "preprocess_scaling",
                "preprocess_img_s_threads", "preprocess_scaling_cpu_bound"):
        assert isinstance(report[key], float) and report[key] > 0, (key, report[key])
    assert report["preprocess_cores"] == 2 and report["preprocess_scaling_target"] == 1.6
    assert sorted(p.name for p in (tmp_path / f"preprocess-v{benchmark.GEN_VERSION}").iterdir()) == [
        "photo-0000.jpg", "photo-0001.jpg", "photo-0002.jpg"]


# --- what the workers log ----------------------------------------------------------------------------

def test_what_a_workers_code_logs_about_a_picture_is_in_the_main_process_log_with_its_file(tmp_path):
    """metadata.py says at info that a date is out of range, at debug that another is malformed: a pool
    started at the service's info level sends the first, naming the file, and does not even build the
    second, whatever the main process's level becomes later."""
    far = taken_on(tmp_path / "far.jpg", "9999:12:31 23:59:59", "-12:00")  # year 10000 in UTC
    garbled = taken_on(tmp_path / "garbled.jpg", "garbage")
    with logging_to(io.StringIO()), pool(workers=1) as at_info:  # the service at --log-level info
        at_info.wait_ready()
        with logging_to(io.StringIO(), level="debug") as stream:  # a debug line sent would be shown now
            outcomes = at_info.submit([far, garbled]).results()
    assert all(isinstance(o, PreparedImage) for o in outcomes)
    lines = [(e["event"], e["level"], e["path"]) for e in logged_events(stream.getvalue())]
    assert lines == [("exif_date_out_of_range", "info", str(far))]


def test_at_debug_level_a_workers_debug_lines_are_shown_with_their_file(tmp_path):
    garbled = taken_on(tmp_path / "garbled.jpg", "garbage")
    with logging_to(io.StringIO(), level="debug") as stream, pool(workers=1) as at_debug:
        at_debug.submit([garbled]).results()
    (line,) = [e for e in logged_events(stream.getvalue()) if e["event"] == "exif_date_malformed"]
    assert (line["level"], line["path"]) == ("debug", str(garbled)) and "garbage" in line["error"]


def test_what_a_worker_logs_as_it_starts_is_logged_once_and_blames_no_file(tmp_path):
    pictures = [save_picture(tmp_path / f"{n}.png", seed=n) for n in range(2)]
    with logging_to(io.StringIO()) as stream, pool(model_input=WarnsWhenLoaded(), workers=1) as started:
        started.wait_ready()
        outcomes = started.submit(pictures).results()
    assert all(isinstance(o, PreparedImage) for o in outcomes)
    (line,) = [e for e in logged_events(stream.getvalue()) if e["event"] == "model_input_loaded"]
    assert line["level"] == "warning" and "path" not in line, line


def test_a_file_that_makes_a_worker_log_a_thousand_lines_costs_twenty_and_a_count(tmp_path):
    picture = save_picture(tmp_path / "odd.jpg", 1, size=(64, 48))
    with logging_to(io.StringIO()) as stream, pool(model_input=logs_a_thousand_warnings, workers=1) as flooded:
        (outcome,) = flooded.submit([picture]).results()
    assert isinstance(outcome, PreparedImage)
    events = logged_events(stream.getvalue())
    assert [e["tag"] for e in events if e["event"] == "odd_header_tag"] == list(range(20))
    assert {(e["level"], e["path"]) for e in events if e["event"] == "odd_header_tag"} == {("warning", str(picture))}
    (dropped,) = [e for e in events if e["event"] == "worker_log_lines_dropped"]
    assert (dropped["level"], dropped["path"], dropped["dropped"]) == ("warning", str(picture), 980)


def test_a_python_warning_in_a_worker_is_one_line_naming_the_file_not_raw_stderr(tmp_path):
    picture = save_picture(tmp_path / "exif.jpg", 2, size=(64, 48))
    with logging_to(io.StringIO()) as stream, pool(model_input=warns_as_a_decoder_does, workers=1) as warned:
        warned.submit([picture]).results()
    (line,) = [e for e in logged_events(stream.getvalue()) if e["event"] == "python_warning"]
    assert (line["level"], line["path"], line["category"]) == ("warning", str(picture), "UserWarning")
    assert line["message"] == "Possibly corrupt EXIF data"


# --- the service's query pictures (inbox.QueryPictures) ---------------------------------------------------

@pytest.fixture
def query_config(tmp_path: Path):
    from image_search.config import load_config
    from tests.support.files import write_config

    return load_config(write_config(tmp_path / "tree", Path("unused-model")))


def test_a_query_picture_that_decodes_too_long_fails_its_query_and_the_watchdog_hears_from_the_loop(
        query_config, good_files, tmp_path, monkeypatch) -> None:
    """A query's picture was decoded in the service's own process: a JPEG of 16,000 scans held the loop
    101 s, the watchdog unpinged (systemd kills at 60 s, and the query, still in the inbox, again at every
    start). Now it is read in a worker of its own: past the limit the worker is killed and the query fails
    with the ingest's reason, the loop pinging the watchdog meanwhile; the next query is answered."""
    from image_search import workers
    from image_search.inbox import QueryPictures

    monkeypatch.setattr(workers, "FILE_SECONDS_LIMIT", 2.0)
    gate = tmp_path / "gate"
    beats: list[float] = []
    pictures = QueryPictures(query_config, functools.partial(wait_for_gate, gate=str(gate)),
                             lambda: beats.append(time.monotonic()))
    try:
        started = time.monotonic()
        with pytest.raises(PreprocessError, match="took longer than 2 s, so it was stopped"):
            pictures(good_files[0], None)
        assert time.monotonic() - started < 10
        assert len(beats) >= 2  # about once a second while it waited
        gate.touch()
        answered = pictures(good_files[0], None)
        expected = preprocess_image(good_files[0], max_size=(query_config.resize_width, query_config.resize_height),
                                    max_pixels=query_config.max_image_pixels)
        assert answered.file_hash == expected.file_hash and answered.jpeg_bytes == expected.jpeg_bytes
        assert answered.image is None  # embedded from the worker's pixels, as the index's pictures are
    finally:
        pictures.close()


def test_a_query_picture_that_crashes_its_decoder_fails_its_query_not_the_service(query_config, good_files,
                                                                                  tmp_path) -> None:
    from image_search.inbox import QueryPictures

    pictures = QueryPictures(query_config, segfault_on_mark, lambda: None)
    try:
        with pytest.raises(PreprocessError, match="decoder crashed"):
            pictures(crash_mark(tmp_path / "crash.png"), None)
        assert pictures(good_files[0], None).jpeg_bytes
    finally:
        pictures.close()


def test_a_batch_is_read_by_its_own_link_rule_where_it_has_one(good_files, tmp_path) -> None:
    """A query's picture is read by the rule of the folder it is in (the inbox's, source-directory's),
    not the pool's."""
    from image_search.entries import FollowLinks, LinkPolicy

    link = tmp_path / "link.png"
    link.symlink_to(good_files[0])
    no_links = LinkPolicy(FollowLinks.NONE, tmp_path, key="inbox-directory")
    with pool(workers=1) as p:  # the pool's rule: any link
        [as_pool, own] = [p.submit([link]).results()[0], p.submit([link], links=no_links).results()[0]]
    assert isinstance(as_pool, PreparedImage)
    assert isinstance(own, PreprocessError) and "link" in own.reason


def test_one_querys_pictures_share_one_limit(query_config, good_files, monkeypatch) -> None:
    """A query document may name 64 pictures, each read within the per-file limit: 64 minutes of the loop.
    Once the query's own limit has gone, the next picture fails the query unread."""
    import types

    from image_search import inbox
    from image_search.inbox import QUERY_PICTURES_LIMIT_S, QueryPictures

    now = [1000.0]
    monkeypatch.setattr(inbox, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    pictures = QueryPictures(query_config, normalised_pixels, lambda: None)
    try:
        read = pictures.for_one_query()
        read(good_files[0], None)
        now[0] += QUERY_PICTURES_LIMIT_S - 1
        read(good_files[1], None)  # begun within the limit: read in full
        now[0] += 2
        with pytest.raises(PreprocessError, match=f"took longer than {QUERY_PICTURES_LIMIT_S:g} s to read in all"):
            read(good_files[2], None)
        assert pictures.for_one_query()(good_files[2], None).jpeg_bytes  # the next query: a limit of its own
    finally:
        pictures.close()
