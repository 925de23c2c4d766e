"""The contact sheet: one JPEG that shows a search's answer at a glance.

Layout: a heading line, then a grid of cells, up to ``MAX_COLUMNS`` (5) a row. The first cell is the
query (the picture itself, or its words rendered large); then the top-k processed images in rank
order, each fitted into a ``THUMB`` (256) px square keeping its aspect ratio and captioned with its
rank, its similarity and its file name. Five columns of 280 px cells make a 1,400 px wide sheet:
a laptop screen shows it whole. A processed image that is missing is a grey placeholder cell that
says so; an empty index gives the query cell and a cell saying the index holds no images yet.

Font: Noto Sans JP, Noto Sans KR, Noto Sans SC and Noto Sans TC (SIL Open Font License 1.1), from
the PyPI package ``justmytype-intl-cjk`` (about 50 MB installed; the fonts come from Google Fonts).
Noto Sans JP draws Latin, Greek, Cyrillic, kana and the Japanese kanji; a character it lacks is
drawn with the first of KR (Hangul), SC, TC that has it. Scripts none of them covers (Arabic,
Hebrew, Devanagari, Thai, emoji...) come out as boxes: the file name is still right in the JSONL.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import ExitCode, ImageSearchError, describe
from .names import escape
from .preprocess import THUMBNAIL_SIZE, thumbnail_path_for
from .hits import Hit

THUMB = THUMBNAIL_SIZE  # the square each picture is fitted into (the indexer stores thumbnails of this size)
PADDING = 12
CAPTION_LINE = 22
CELL_WIDTH = THUMB + 2 * PADDING
CELL_HEIGHT = PADDING + THUMB + 8 + 2 * CAPTION_LINE + PADDING
GAP = 8  # between cells
HEADING_HEIGHT = 40
MAX_COLUMNS = 5
# The hits a query's sheet shows at most (20 rows, 6,900 px high). A JPEG holds at most 65,500 px a side:
# a top-k of 960 or more, which a query may ask for, made a sheet none could be written as.
MOST_SHEET_HITS = 99
JPEG_QUALITY = 85  # a sheet is for looking at; 85 keeps 1,400 px under about 300 KB

BACKGROUND = (236, 236, 236)
CELL = (255, 255, 255)
INK = (25, 25, 25)
MUTED = (110, 110, 110)
QUERY_ACCENT = (30, 100, 200)
PLACEHOLDER = (205, 205, 205)

# Font files inside justmytype-intl-cjk, in fallback order (JP first: it also has Latin and Cyrillic).
_FONT_PACKAGE = "justmytype_intl_cjk"
_FONT_FILES = ("fonts/ofl/notosansjp/NotoSansJP[wght].ttf", "fonts/ofl/notosanskr/NotoSansKR[wght].ttf",
               "fonts/ofl/notosanssc/NotoSansSC[wght].ttf", "fonts/ofl/notosanstc/NotoSansTC[wght].ttf")
REGULAR, BOLD = 400, 700  # the fonts are variable; their default instance is Thin (100)


class FontUnavailable(ImageSearchError):
    """The sheet's fonts cannot be found or read (the justmytype-intl-cjk package is missing or broken)."""

    exit_code = ExitCode.FONTS


@dataclass(frozen=True)
class _Face:
    path: str
    codepoints: frozenset[int]


@functools.cache
def _faces() -> tuple[_Face, ...]:
    from fontTools.ttLib import TTFont

    faces = []
    try:
        root = importlib.resources.files(_FONT_PACKAGE)
        for relative in _FONT_FILES:
            path = str(root.joinpath(relative))
            faces.append(_Face(path, frozenset(TTFont(path, lazy=True)["cmap"].getBestCmap())))
    except (ModuleNotFoundError, OSError) as exc:
        raise FontUnavailable(
            f"the contact sheet's fonts cannot be loaded ({describe(exc)}); "
            "reinstall the package justmytype-intl-cjk (uv sync)"
        ) from None
    return tuple(faces)


@functools.cache
def _font(face: int, size: int, weight: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.truetype(_faces()[face].path, size)
    font.set_variation_by_axes([weight])
    return font


def warm_up() -> None:
    """Load the main font at every size the sheet uses now (under a second), so that the first
    search does not pay for it. The Korean and Chinese fallbacks load when first needed."""
    for style in (_CAPTION, _RANK, _HEADING, _NOTE):
        _font(0, style.size, style.weight)
    for size in _QUERY_TEXT_SIZES:
        _font(0, size, REGULAR)


@dataclass(frozen=True)
class _Style:
    size: int
    weight: int
    colour: tuple[int, int, int]


_CAPTION = _Style(15, REGULAR, INK)
_RANK = _Style(16, BOLD, INK)
_HEADING = _Style(18, BOLD, INK)
_NOTE = _Style(16, REGULAR, MUTED)
_QUERY_TEXT_SIZES = (30, 26, 22, 19, 16, 14)  # the largest that fits the query cell is used
_MOST_QUERY_CHARACTERS_SHOWN = 600  # more than a 256 px cell holds even at 14 px (about 450)


def _runs(text: str, style: _Style) -> list[tuple[str, ImageFont.FreeTypeFont]]:
    """``text`` split into runs, each drawn with the first font that has its characters."""
    faces = _faces()
    runs: list[tuple[str, int]] = []
    for char in text:
        face = next((i for i, f in enumerate(faces) if ord(char) in f.codepoints), 0)
        if runs and runs[-1][1] == face:
            runs[-1] = (runs[-1][0] + char, face)
        else:
            runs.append((char, face))
    return [(run, _font(face, style.size, style.weight)) for run, face in runs]


def _width(text: str, style: _Style) -> float:
    return sum(font.getlength(run) for run, font in _runs(text, style))


def _draw(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, style: _Style) -> None:
    x, y = xy
    for run, font in _runs(text, style):
        draw.text((x, y), run, font=font, fill=style.colour)
        x += font.getlength(run)


def _fit_line(text: str, style: _Style, width: float, *, keep_end: int = 0) -> str:
    """``text`` on one line of at most ``width`` px, shortened with an ellipsis in the middle (so a
    file name keeps its ``keep_end`` last characters, its extension) when it does not fit."""
    text = " ".join(text.split())
    if _width(text, style) <= width:
        return text
    tail = text[len(text) - keep_end:] if keep_end else ""
    room = width - _width("…" + tail, style)
    if room <= 0:  # not even the kept end fits: shorten that instead
        return _fit_line(tail, style, width) if tail else "…"
    used, kept = 0.0, 0  # the longest start of the text that fits (per-character widths: linear)
    for char in text[: len(text) - len(tail)]:
        used += _advance(char, style.size, style.weight)
        if used > room:
            break
        kept += 1
    return text[:kept] + "…" + tail


def _fit_end(text: str, style: _Style, width: float) -> str:
    """``text`` on one line of at most ``width`` px: its longest end that fits, after an ellipsis."""
    text = " ".join(text.split())
    if _width(text, style) <= width:
        return text
    used, kept = _width("…", style), 0
    for char in reversed(text):
        used += _advance(char, style.size, style.weight)
        if used > width:
            break
        kept += 1
    return "…" + text[len(text) - kept:]


@functools.lru_cache(maxsize=16384)
def _advance(char: str, size: int, weight: int) -> float:
    """How far one character moves the pen, in the font that draws it."""
    ((_, font),) = _runs(char, _Style(size, weight, INK))
    return font.getlength(char)


def _wrap(text: str, style: _Style, width: float) -> list[str]:
    """Greedy wrapping that breaks at spaces where it can and anywhere in a word that has none
    (Japanese and Chinese are written without spaces). Widths add up per character (kerning is
    ignored: a few pixels, so callers leave a small margin); linear in the length of the text."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        start, used, space = 0, 0.0, -1  # the current line: where it begins, its width, its last space
        for i, char in enumerate(paragraph):
            advance = _advance(char, style.size, style.weight)
            if used + advance > width and i > start:
                if char == " ":  # the line ends here; the space itself is dropped
                    lines.append(paragraph[start:i].rstrip())
                    start, used, space = i + 1, 0.0, -1
                    continue
                if space > start:  # break at the last space
                    lines.append(paragraph[start:space].rstrip())
                    start = space + 1
                else:  # no space to break at: break inside the word
                    lines.append(paragraph[start:i])
                    start = i
                used, space = sum(_advance(c, style.size, style.weight) for c in paragraph[start:i]), -1
            if char == " ":
                space = i
            used += advance
        lines.append(paragraph[start:].rstrip())
    return lines


def _text_block(text: str, box: tuple[int, int]) -> Image.Image:
    """The query's words, as large as fits the box (30 px down to 14 px; beyond that, cut with …)."""
    block = Image.new("RGB", box, CELL)
    draw = ImageDraw.Draw(block)
    # The cell shows a few hundred characters at most: wrapping a 64 KiB query whole would cost seconds.
    text = text[:_MOST_QUERY_CHARACTERS_SHOWN]
    for size in _QUERY_TEXT_SIZES:
        style = _Style(size, REGULAR, INK)
        line_height = round(size * 1.35)
        lines = _wrap(text, style, box[0] - 4)
        if len(lines) * line_height <= box[1] or size == _QUERY_TEXT_SIZES[-1]:
            break
    fits = box[1] // line_height
    if len(lines) > fits:  # even the smallest size is too big: show the start, and say there is more
        last = lines[fits - 1]
        while last and _width(last + "…", style) > box[0]:
            last = last[:-1]
        lines = lines[: fits - 1] + [last + "…"]
    top = (box[1] - len(lines) * line_height) // 2
    for i, line in enumerate(lines):
        _draw(draw, ((box[0] - _width(line, style)) / 2, top + i * line_height), line, style)
    return block


def _thumbnail(path: Path) -> Image.Image | None:
    """The processed image fitted into THUMB x THUMB (aspect kept), from its stored thumbnail when there
    is one; None if it cannot be read."""
    small = thumbnail_path_for(path)
    if small.is_file():
        path = small
    try:
        with Image.open(path, formats=("JPEG",)) as im:  # processed images are always our own JPEGs
            # Decode at 1/2, 1/4 or 1/8 size (most of the speed): ask for the fitted size, not the
            # square, or a 4:3 picture would need twice the pixels to cover the square's height.
            scale = min(THUMB / im.width, THUMB / im.height, 1.0)
            im.draft("RGB", (max(1, round(im.width * scale)), max(1, round(im.height * scale))))
            im = ImageOps.exif_transpose(im.convert("RGB"))
            im.thumbnail((THUMB, THUMB), Image.Resampling.BICUBIC)
            return im
    except (OSError, ValueError, Image.DecompressionBombError):  # UnidentifiedImageError is an OSError
        return None  # gone, unreadable or not a JPEG: the cell says so


@functools.cache
def _decoders() -> ThreadPoolExecutor:
    # Reading the hits' JPEGs is most of a sheet's cost (entropy decoding is paid in full even at 1/4
    # scale); Pillow decodes without the GIL, so a few threads cut it by up to their number of cores.
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="sheet-decode")


def _fitted(picture: Image.Image) -> Image.Image:
    picture = picture.convert("RGB") if picture.mode != "RGB" else picture
    if picture.width <= THUMB and picture.height <= THUMB:
        return picture
    copy = picture.copy()
    copy.thumbnail((THUMB, THUMB), Image.Resampling.BICUBIC)
    return copy


@functools.lru_cache(maxsize=64)
def _placeholder(message: str) -> Image.Image:
    """A grey cell saying ``message``; shared between cells (only ever pasted: never change it)."""
    block = Image.new("RGB", (THUMB, THUMB), PLACEHOLDER)
    draw = ImageDraw.Draw(block)
    lines = _wrap(message, _NOTE, THUMB - 2 * PADDING)
    top = (THUMB - len(lines) * CAPTION_LINE) // 2
    for i, line in enumerate(lines):
        _draw(draw, ((THUMB - _width(line, _NOTE)) / 2, top + i * CAPTION_LINE), line, _NOTE)
    return block


@dataclass(frozen=True)
class _Cell:
    picture: Image.Image  # at most THUMB x THUMB
    first_line: str
    second_line: str
    accent: bool = False  # the query cell is framed


def _paste_cell(sheet: Image.Image, draw: ImageDraw.ImageDraw, cell: _Cell, left: int, top: int) -> None:
    draw.rectangle([left, top, left + CELL_WIDTH - 1, top + CELL_HEIGHT - 1], fill=CELL,
                   outline=QUERY_ACCENT if cell.accent else None, width=3 if cell.accent else 0)
    pic = cell.picture
    sheet.paste(pic, (left + PADDING + (THUMB - pic.width) // 2, top + PADDING + (THUMB - pic.height) // 2))
    text_top = top + PADDING + THUMB + 8
    width = CELL_WIDTH - 2 * PADDING
    first_style = _Style(_RANK.size, _RANK.weight, QUERY_ACCENT if cell.accent else INK)
    _draw(draw, (left + PADDING, text_top), _fit_line(cell.first_line, first_style, width), first_style)
    # A caption with folders (copies that share a name, ``duplicates._captions``) is told apart by its
    # end, the folder nearest the file: shortened at its start. A name alone keeps its start and extension.
    name = (_fit_end(cell.second_line, _CAPTION, width) if "/" in cell.second_line
            else _fit_line(cell.second_line, _CAPTION, width, keep_end=_extension_length(cell.second_line)))
    _draw(draw, (left + PADDING, text_top + CAPTION_LINE), name, _CAPTION)


def _extension_length(name: str) -> int:
    match = re.search(r"\.[^./\s]{1,5}$", name)
    return len(match.group(0)) + 4 if match else 6  # the extension and a few characters before it


def render_contact_sheet(hits: Sequence[Hit], *, query_name: str, query_picture: Image.Image | None = None,
                         query_text: str | None = None, query_label: str = "Text query", heading: str = "",
                         no_hits: str | None = None) -> Image.Image:
    """The sheet as an RGB image.

    ``query_picture``: the query image (any size; fitted), or ``query_text``: the words of a text
    query; with neither, the query cell says the picture could not be shown. ``query_name`` is the
    query cell's caption (its file name, or "text query") and ``query_label`` the label of a text cell
    (a query document's terms and filters are one too); ``heading`` the line above the grid;
    ``no_hits`` why there are no hits when the index is not simply empty (filters, a floor).
    """
    if query_text is not None:
        query_cell = _Cell(_text_block(query_text, (THUMB, THUMB)), query_label, escape(query_name), accent=True)
    elif query_picture is not None:
        query_cell = _Cell(_fitted(query_picture), "Query", escape(query_name), accent=True)
    else:
        query_cell = _Cell(_placeholder("the query picture cannot be shown"), "Query", escape(query_name), accent=True)
    cells = [query_cell]
    shown = hits if len(hits) <= MOST_SHEET_HITS else hits[:MOST_SHEET_HITS - 1]
    pictures = list(_decoders().map(_thumbnail, [Path(hit.processed_path) for hit in shown]))
    for hit, picture in zip(shown, pictures, strict=True):
        cells.append(_Cell(picture if picture is not None else _placeholder("processed image missing"),
                           f"#{hit.rank} · similarity {hit.similarity:.4f}", escape(hit.file_name)))
    if len(shown) < len(hits):
        more = len(hits) - len(shown)
        cells.append(_Cell(_placeholder(f"{more} more hits, each in the .jsonl beside this sheet."),
                           f"#{shown[-1].rank + 1}-#{hits[-1].rank}", f"{more} more in the .jsonl"))
    if not hits and no_hits is not None:
        cells.append(_Cell(_placeholder(no_hits[:1].upper() + no_hits[1:] + "."), "No results", no_hits))
    elif not hits:
        cells.append(_Cell(_placeholder("The index holds no images yet: nothing to compare with."),
                           "No results", "the index is empty"))
    columns = min(MAX_COLUMNS, len(cells))
    rows = -(-len(cells) // columns)
    width = GAP + columns * (CELL_WIDTH + GAP)
    height = HEADING_HEIGHT + rows * (CELL_HEIGHT + GAP)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if heading:
        _draw(draw, (GAP + 4, (HEADING_HEIGHT - _HEADING.size) // 2 - 2),
              _fit_line(heading, _HEADING, width - 2 * GAP - 8), _HEADING)
    for index, cell in enumerate(cells):
        row, column = divmod(index, columns)
        _paste_cell(sheet, draw, cell, GAP + column * (CELL_WIDTH + GAP), HEADING_HEIGHT + row * (CELL_HEIGHT + GAP))
    return sheet


def cell_box(index: int, cell_count: int) -> tuple[int, int, int, int]:
    """Where cell ``index`` (0: the query, 1: rank 1...) of a sheet of ``cell_count`` cells puts its
    picture's THUMB x THUMB square: (left, top, right, bottom). For tests and tools that read sheets."""
    columns = min(MAX_COLUMNS, cell_count)
    row, column = divmod(index, columns)
    left = GAP + column * (CELL_WIDTH + GAP) + PADDING
    top = HEADING_HEIGHT + row * (CELL_HEIGHT + GAP) + PADDING
    return left, top, left + THUMB, top + THUMB


def save_contact_sheet(sheet: Image.Image, path: Path) -> None:
    sheet.save(path, format="JPEG", quality=JPEG_QUALITY, optimize=False)


@dataclass(frozen=True)
class Tile:
    """One cell of a sheet of tiles (``render_tiles``): a processed picture (None: a placeholder saying
    ``missing``), two caption lines, and whether it is marked (framed, its first line in the accent)."""

    processed_path: Path | None
    first_line: str
    second_line: str
    marked: bool = False
    missing: str = "processed image missing"


def render_tiles(rows: Sequence[Sequence[Tile]], *, heading: str = "") -> Image.Image:
    """A sheet of rows of at most ``MAX_COLUMNS`` tiles each (a row shorter than the others stays
    short): how the duplicates report shows its groups, the one to keep marked."""
    if any(len(row) > MAX_COLUMNS for row in rows):
        raise ValueError(f"a row of a sheet holds at most {MAX_COLUMNS} tiles")
    tiles = [tile for row in rows for tile in row]
    paths = [tile.processed_path for tile in tiles if tile.processed_path is not None]
    pictures = dict(zip(paths, _decoders().map(_thumbnail, paths)))
    columns = max((len(row) for row in rows), default=1)
    width = GAP + columns * (CELL_WIDTH + GAP)
    sheet = Image.new("RGB", (width, HEADING_HEIGHT + len(rows) * (CELL_HEIGHT + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if heading:
        _draw(draw, (GAP + 4, (HEADING_HEIGHT - _HEADING.size) // 2 - 2),
              _fit_line(heading, _HEADING, width - 2 * GAP - 8), _HEADING)
    for row_number, row in enumerate(rows):
        for column, tile in enumerate(row):
            picture = pictures.get(tile.processed_path) if tile.processed_path is not None else None
            cell = _Cell(picture if picture is not None else _placeholder(tile.missing), tile.first_line,
                         tile.second_line, accent=tile.marked)
            _paste_cell(sheet, draw, cell, GAP + column * (CELL_WIDTH + GAP), HEADING_HEIGHT + row_number * (CELL_HEIGHT + GAP))
    return sheet
