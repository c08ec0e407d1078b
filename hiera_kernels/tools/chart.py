"""bench.png: the bench table as bars, ms per batch of every row by mode, with each
mode's GEMM floor drawn as a dashed reference line. Drawn with Pillow, which bench
imports only when it is there (it is no requirement of hiera_kernels)."""

from __future__ import annotations

from typing import TYPE_CHECKING, List

if TYPE_CHECKING:
    from .bench import Row

MARGIN, LABEL_WIDTH, PLOT_WIDTH, VALUE_WIDTH = 14, 260, 520, 150  # pixels
LINE, BAR, GAP = 16, 16, 6  # a line of text, a bar's height, the space under a bar
COLOURS = {"official": (150, 150, 150), "hiera-optim": (230, 140, 40), "hiera_kernels": (60, 110, 200)}
FLOOR_COLOUR = (200, 40, 40)


def write_chart(rows: List[Row], floor_name: str, title_lines: List[str], path: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    modes = list(dict.fromkeys(r.mode for r in rows))
    bars = {m: [r for r in rows if r.mode == m and r.name != floor_name] for m in modes}
    floors = {r.mode: r.ms for r in rows if r.name == floor_name}
    px_per_ms = PLOT_WIDTH / max(r.ms for r in rows if r.ms is not None)  # None: a failed row
    width = 2 * MARGIN + LABEL_WIDTH + PLOT_WIDTH + VALUE_WIDTH
    # Per mode: a blank line, a heading, the bars, the floor's label.
    height = 2 * MARGIN + LINE * len(title_lines) + sum(3 * LINE + len(b) * (BAR + GAP) for b in bars.values())
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    y = MARGIN
    for line in title_lines:
        draw.text((MARGIN, y), line, fill="black", font=font)
        y += LINE
    x0 = MARGIN + LABEL_WIDTH
    for m in modes:
        y += LINE
        draw.text((MARGIN, y), f"{m}: ms per batch (shorter is faster)", fill="black", font=font)
        y += LINE
        first_top = y
        tops = [first_top + i * (BAR + GAP) for i in range(len(bars[m]))]
        for r, top in zip(bars[m], tops):
            draw.text((MARGIN, top + 2), r.name, fill="black", font=font)
            if r.ms is not None:
                draw.rectangle([x0, top, x0 + r.ms * px_per_ms, top + BAR], fill=COLOURS.get(r.name.split(" ")[0], (90, 90, 90)))
        y += len(bars[m]) * (BAR + GAP)
        floor_x = x0 + floors[m] * px_per_ms
        for dash in range(first_top - 4, y, 8):
            draw.line([(floor_x, dash), (floor_x, min(dash + 4, y))], fill=FLOOR_COLOUR, width=2)
        # The figures last: over the floor line, not under it.
        for r, top in zip(bars[m], tops):
            if r.ms is not None:
                draw.text((x0 + r.ms * px_per_ms + 4, top + 2), f"{r.ms:.1f}", fill="black", font=font)
            else:
                draw.text((x0 + 4, top + 2), r.note, fill=FLOOR_COLOUR, font=font)
        label = f"{floor_name} {floors[m]:.1f}"
        draw.text((min(floor_x + 4, width - MARGIN - draw.textlength(label, font=font)), y), label, fill=FLOOR_COLOUR, font=font)
        y += LINE
    image.save(path)
