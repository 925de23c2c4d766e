"""Third-party warnings and log records come out in our log format, never as raw stderr lines.

Each story runs a real Python process whose stderr is a file (as under systemd, where it is the
journal), so that nothing pytest does to warnings can hide a raw line.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog

from tests.support.logs import logging_to, parse_log_line

# What a model load prints today: timm's deprecation on import (a real import of the real module),
# jina's attention fallbacks (warnings.warn, as in its remote code), a remote-code logger's warning.
PROGRAM = textwrap.dedent("""
    import logging, warnings
    from image_search.logs import configure_logging
    configure_logging("info")
    import timm.models.layers  # FutureWarning: Importing from timm.models.layers is deprecated
    warnings.warn("Flash attention requires CUDA, disabling")
    warnings.warn("xFormers requires CUDA, disabling")
    logging.getLogger("transformers_modules.jinaai.jina-clip-implementation.modeling_clip").warning(
        "Please install apex to use fused layer norm, ignoring")
    logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IHDR' 16 13")  # library chatter stays out
""")


def run(tmp_path: Path, *, journal: bool) -> list[str]:
    err_path = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "PYTHONWARNINGS")}
    with open(err_path, "w") as err:
        if journal:  # stderr "is the journal": JOURNAL_STREAM names its device and inode
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.run([sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, stderr=err, env=env,
                              text=True, timeout=120)
    assert proc.returncode == 0
    return err_path.read_text().splitlines()


@pytest.mark.e2e
def test_plain_lines_one_per_warning_with_category_and_source(tmp_path: Path) -> None:
    lines = run(tmp_path, journal=False)
    assert len(lines) == 4, lines
    assert all(line.startswith("timestamp=") and " event=" in line for line in lines), lines  # no raw line
    timm_line, flash, xformers, apex = lines
    assert "level='info'" in timm_line and "category='FutureWarning'" in timm_line
    assert "Importing from timm.models.layers is deprecated" in timm_line and "layers/__init__.py:" in timm_line
    assert "level='warning'" in flash and "'Flash attention requires CUDA, disabling'" in flash
    assert "category='UserWarning'" in xformers and "xFormers requires CUDA, disabling" in xformers
    assert "event='library_log'" in apex and "logger='transformers_modules.jinaai" in apex
    assert not any("STREAM" in line for line in lines)


@pytest.mark.e2e
def test_under_the_journal_each_line_carries_its_priority(tmp_path: Path) -> None:
    lines = run(tmp_path, journal=True)
    assert len(lines) == 4, lines
    assert lines[0].startswith("<6>event='python_warning'")  # a deprecation notice: info
    assert all(line.startswith("<4>event=") for line in lines[1:]), lines  # real warnings: warning


@pytest.mark.parametrize(("formatted", "message"), [
    ("no location at all", "no location at all"),
    ("f.py:x: Odd: text", "f.py:x: Odd: text"),
    ("a warning\nover  three\n  lines\n", "a warning over three lines"),
    ("f.py:x: Odd:\ttext\r\nand more", "f.py:x: Odd: text and more"),
])
def test_a_warning_in_an_unexpected_shape_is_still_one_line(formatted: str, message: str) -> None:
    from image_search.logs import StdlibToStructlog

    method, event, fields = StdlibToStructlog._warning_fields(formatted)
    assert (method, event) == ("warning", "python_warning") and fields["message"]
    assert fields["message"] == message  # all of its words, on one line


def test_a_formatted_warning_over_several_lines_is_one_line_without_its_source_line() -> None:
    from image_search.logs import StdlibToStructlog

    formatted = "/x/y.py:12: UserWarning: first line\nsecond line\n  warnings.warn(text)\n"
    method, _, fields = StdlibToStructlog._warning_fields(formatted)
    assert method == "warning" and fields == {"category": "UserWarning", "message": "first line second line",
                                              "source": "/x/y.py:12"}


def test_pillows_warning_about_a_broken_exif_block_is_a_debug_line() -> None:
    """Pillow warns as it opens a JPEG whose EXIF it cannot read; the picture is good. It was a warning line
    at every indexing and every query with that picture; the README promises one debug line."""
    import io
    import struct
    import warnings

    from PIL import Image

    from image_search.logs import StdlibToStructlog

    plain = io.BytesIO()
    Image.new("RGB", (40, 20)).save(plain, format="JPEG")
    payload = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x13" * 40
    data = plain.getvalue()
    broken = data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Image.open(io.BytesIO(broken)).close()
    [warning] = caught
    formatted = warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno)
    method, event, fields = StdlibToStructlog._warning_fields(formatted)
    assert (method, event) == ("debug", "exif_unreadable") and fields["error"].startswith("Corrupt EXIF data.")


# --- secrets: masked by key; counts and other fields shown ----------------------------------------


def logged_line(**fields: object) -> str:
    """The line the service's logging writes for a ``probe`` event with ``fields``."""
    with logging_to(io.StringIO()) as stream:
        structlog.get_logger("test").info("probe", **fields)
    return stream.getvalue()


@pytest.mark.parametrize("key", ["password", "postgres_password", "postgres-password", "PGPASSWORD", "passwd",
                                 "secret", "client_secret", "token", "auth_token", "accessToken", "api.token",
                                 "credentials", "dsn", "postgres_dsn"])
def test_a_secret_field_is_masked(key: str) -> None:
    line = logged_line(**{key: "hunter2-Secret!"})
    assert "hunter2" not in line and f"{key}='***'" in line, line


@pytest.mark.parametrize(("key", "value"), [("tokens", 90), ("max_tokens", 77), ("tokenizer", "xlm-roberta"),
                                            ("secretary", "Ann"), ("limit", 77)])
def test_a_field_that_only_contains_a_secret_word_is_shown(key: str, value: object) -> None:
    """``text_query_truncated tokens=90 limit=77``: how many tokens a query had is no credential."""
    line = logged_line(**{key: value})
    assert f"{key}={value!r}" in line, line


# --- lines written where a stop must not be cut short ----------------------------------------------


class ClosedTerminal(io.TextIOBase):
    """stderr once the terminal of a foreground run is closed: every write fails with EIO."""

    def write(self, text: str) -> int:
        raise OSError(5, "Input/output error")


def test_a_line_the_closed_terminal_refuses_is_dropped_and_the_caller_goes_on() -> None:
    with logging_to(ClosedTerminal()):
        structlog.get_logger("test").info("service_stopping", signal="SIGHUP")  # no OSError
        structlog.get_logger("test").error("service_failed", reason="x")


def test_a_signal_handlers_line_has_the_same_shape_as_the_others(tmp_path: Path) -> None:
    """Written past structlog (whose lock the interrupted main thread may hold), but rendered alike."""
    from image_search.logs import log_from_signal_handler

    with open(tmp_path / "stderr.txt", "w") as stream, logging_to(stream):
        structlog.get_logger("test").info("service_ready", pending_images=0)
        log_from_signal_handler("stop_already_under_way", signal="SIGINT", password="hunter2")
    ready, handler = (parse_log_line(line) for line in (tmp_path / "stderr.txt").read_text().splitlines())
    assert handler == {"timestamp": handler["timestamp"], "level": "info", "event": "stop_already_under_way",
                       "signal": "SIGINT", "password": "***"}
    assert set(ready) - {"pending_images"} == set(handler) - {"signal", "password"}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_line_logged_under_a_progress_bar_gets_a_line_of_its_own_and_the_bar_is_drawn_again() -> None:
    """`index` on a terminal: its tqdm bar is drawn on stderr, and a picture skipped meanwhile is logged there."""
    from tqdm import tqdm

    terminal = Terminal()
    with logging_to(terminal), tqdm(total=10, desc="indexing", file=terminal, ncols=60, mininterval=0) as bar:
        bar.update(5)
        structlog.get_logger("test").warning("image_skipped", path="/images/a.jpg", reason="not a supported image")
        drawn_before_the_line = terminal.getvalue()
        bar.update(1)
    before, line, after = drawn_before_the_line.rpartition("image_skipped")[0], "image_skipped", terminal.getvalue()
    # What the terminal shows on the line's row: the text after its last carriage return holds no bar.
    row = (before + line).split("\n")[-1].split("\r")[-1]
    assert "indexing" not in row and "warning" in row, repr(row)
    # The bar is drawn again below the line at once, not at the next update only.
    assert "indexing:  50%" in drawn_before_the_line.rpartition(line)[2], repr(drawn_before_the_line)
    assert "indexing:  60%" in after
