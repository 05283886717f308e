"""A contact sheet: one row per input image, the input then one column per direction × editor.

>>> grid = make_grid([cat1, cat2], {"cat->dog": [dog1, dog2]})      # doctest: +SKIP
>>> grid.save("eval.png")                                          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw

from p2pz_directions.eval.preprocess import as_pil

LABEL_H = 18


def _thumb(img: Any, cell: int) -> Image.Image:
    im = as_pil(img)
    w, h = im.size
    s = cell / max(w, h)
    im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    canvas = Image.new("RGB", (cell, cell), (255, 255, 255))
    canvas.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    return canvas


def make_grid(
    inputs: Sequence[Any],
    columns: Mapping[str, Sequence[Any | None]],
    *,
    cell: int = 192,
    row_labels: Sequence[str] | None = None,
) -> Image.Image:
    """``inputs`` down the side; each column of ``columns`` (``{label: one edit per input}``) beside them.
    A missing edit (None) is left grey."""
    labels = ["input", *columns]
    cols = [list(inputs), *[list(v) for v in columns.values()]]
    for lab, col in zip(labels, cols, strict=True):
        if len(col) != len(inputs):
            raise ValueError(f"grid column {lab!r} has {len(col)} images for {len(inputs)} inputs")
    grid = Image.new("RGB", (cell * len(cols), LABEL_H + cell * len(inputs)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, lab in enumerate(labels):
        draw.text((j * cell + 4, 3), lab[: max(4, cell // 7)], fill=(0, 0, 0))
    for i in range(len(inputs)):
        for j, col in enumerate(cols):
            y, x = LABEL_H + i * cell, j * cell
            if col[i] is None:
                grid.paste(Image.new("RGB", (cell, cell), (200, 200, 200)), (x, y))
            else:
                grid.paste(_thumb(col[i], cell), (x, y))
        if row_labels:
            draw.text((4, LABEL_H + i * cell + cell - 14), row_labels[i][:24], fill=(255, 255, 255))
    return grid
