"""Measure direction quality: edit images along directions and score the edits.

The paper's metrics as scorer plugins (CLIP accuracy, DINO structure distance, plus CLIP
directional similarity and background SSIM), a runner over the editors' public API, mean ± std
per direction × editor, winners, a grid image, and evaluation records stored with the pack
(`p2pz_directions.core.records`). ``p2pz eval`` is the command line of `evaluate`.

>>> from p2pz_directions.eval import evaluate
>>> res = evaluate("cat->dog", "cats/", editor="pix2pix-zero",
...                model="CompVis/stable-diffusion-v1-4", seeds=[0, 1, 2])    # doctest: +SKIP
>>> res.rows()                                                              # doctest: +SKIP
[{'direction': 'cat->dog', 'editor': 'pix2pix-zero', 'clip_accuracy': '0.867 ± 0.340', ...}]
>>> res.grid.save("cats-eval.png")                                          # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

# imported on first use, so `p2pz show` can format recorded scores (eval.aggregate) without torch
_LAZY = {
    **dict.fromkeys(["DEFAULT_SCORERS", "EvalError", "EvalResult", "evaluate", "load_image_set"], ".runner"),
    **dict.fromkeys(["Metric", "Scorer", "ScorerError", "ScorerModelError", "available", "get"], ".scorers"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_SCORERS",
    "EvalError",
    "EvalResult",
    "Metric",
    "Scorer",
    "ScorerError",
    "ScorerModelError",
    "available",
    "evaluate",
    "get",
    "load_image_set",
]
