#!/usr/bin/env python
"""Chart of a benchmark report: ingest (ours vs baseline, images/s) and search (p50, index vs full scan).

    uv run python -m tests.benchmarks.chart REPORT.json OUT.png

Drawn with Pillow's ImageDraw only (no matplotlib). The search panel uses a logarithmic axis: the
index and the full scan differ by orders of magnitude.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 1100, 380
OURS, BASELINE, INK, GRID = (46, 125, 50), (158, 158, 158), (33, 33, 33), (224, 224, 224)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _tick(v: float) -> str:
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _bars(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, subtitle: str,
          bars: list[tuple[str, float, str, tuple[int, int, int]]], *, log: bool) -> None:
    """Horizontal bars inside ``box`` (left, top, right, bottom): (label, value, value text, colour)."""
    left, top, right, bottom = box
    title_font, label_font, small = _font(24), _font(18), _font(15)
    draw.text((left, top), title, font=title_font, fill=INK)
    draw.text((left, top + 32), subtitle, font=small, fill=(97, 97, 97))
    label_w = 150
    x0, x1 = left + label_w, right - 150
    y = top + 80
    values = [max(v, 1e-9) for _, v, _, _ in bars]
    if log:
        lo = 10 ** math.floor(math.log10(min(values)))
        hi = 10 ** math.ceil(math.log10(max(values)))
        hi = hi * 10 if hi == lo else hi

        def scale(v: float) -> float:
            return (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

        ticks = [lo * 10 ** i for i in range(int(round(math.log10(hi / lo))) + 1)]
    else:
        hi = max(values) * 1.1

        def scale(v: float) -> float:
            return v / hi

        magnitude = 10 ** math.floor(math.log10(hi))
        step = next(m * magnitude for m in (0.1, 0.2, 0.5, 1, 2, 5) if hi / (m * magnitude) <= 6)
        ticks = [step * i for i in range(int(hi // step) + 1)]
    bar_h, gap = 46, 24
    plot_bottom = y + len(bars) * (bar_h + gap)
    for t in ticks:
        x = x0 + scale(t) * (x1 - x0)
        draw.line([(x, y - 6), (x, plot_bottom)], fill=GRID, width=1)
        text = _tick(t)
        tw = draw.textlength(text, font=small)
        draw.text((x - tw / 2, plot_bottom + 4), text, font=small, fill=(97, 97, 97))
    for label, value, text, colour in bars:
        draw.text((left, y + bar_h / 2 - 10), label, font=label_font, fill=INK)
        w = max(2.0, scale(value) * (x1 - x0))
        draw.rectangle([x0, y, x0 + w, y + bar_h], fill=colour)
        draw.text((x0 + w + 8, y + bar_h / 2 - 10), text, font=label_font, fill=INK)
        y += bar_h + gap
    _ = bottom


def _camera_size(report: dict) -> str:
    width = report.get("sizes", {}).get("camera_width")
    return f"{width}x{width * 3 // 4}" if isinstance(width, int) else "of camera size"


def draw_chart(report: dict, path: Path) -> Path:
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    half = WIDTH // 2
    ours = float(report.get("ingest_images_per_s", 0) or 0)
    base = float(report.get("ingest_baseline_images_per_s", 0) or 0)
    speed = report.get("ingest_speedup")
    _bars(draw, (30, 30, half - 20, HEIGHT - 80), "Ingest (images/s, higher is better)",
          f"{report.get('ingest_images', '?')} camera JPEGs {_camera_size(report)}; speedup "
          + (f"{speed:.1f}x" if isinstance(speed, (int, float)) else "n/a"),
          [("ours", ours, f"{ours:.1f}/s", OURS), ("baseline", base, f"{base:.1f}/s", BASELINE)], log=False)
    p50 = float(report.get("search_p50_ms", 0) or 0)
    scan = float(report.get("search_full_scan_p50_ms", 0) or 0)
    sp = report.get("search_speedup_vs_full_scan")
    _bars(draw, (half + 20, 30, WIDTH - 30, HEIGHT - 80), "Search p50 (ms, log scale, lower is better)",
          f"{report.get('search_vectors', '?'):,} x 1024 vectors; recall@10 {report.get('recall_at_10', float('nan')):.3f}; "
          + (f"{sp:,.0f}x faster" if isinstance(sp, (int, float)) else ""),
          [("HNSW index", p50, f"{p50:.2f} ms", OURS), ("full scan", scan, f"{scan:,.0f} ms", BASELINE)], log=True)
    m = report.get("machine", {})
    foot = (f"{m.get('cores', '?')} cores, {m.get('cpu_model', '?')}, GPU: {m.get('gpu') or 'none'}; "
            f"tiny CLIP on the CPU" + ("; --quick sizes" if report.get("quick") else "")
            + f"; {report.get('started', '')}")
    draw.text((30, HEIGHT - 40), foot, font=_font(15), fill=(97, 97, 97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    draw_chart(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
