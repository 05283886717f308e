"""p2pz-directions: edit directions for zero-shot image editing with Stable Diffusion.

>>> from p2pz_directions import directions
>>> d = directions.load("cat->dog")      # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "directions": "p2pz_directions.core.directions",
    "editors": "p2pz_directions.editing.editors",
    "hub": "p2pz_directions.packs.hub",
    "search": "p2pz_directions.packs.search",
    "store": "p2pz_directions.core.store",
}


#: imported on first use, so that `p2pz --help`, `list` and `show` start without torch
_FROM_CONCEPT = ("Concept", "Direction", "EncoderInfo")


def __getattr__(name: str) -> Any:
    if name in _FROM_CONCEPT:
        return getattr(importlib.import_module("p2pz_directions.core.concept"), name)
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    if name == "build":
        return importlib.import_module("p2pz_directions.builder.pipeline").build
    raise AttributeError(f"module 'p2pz_directions' has no attribute {name!r}")


__all__ = ["Concept", "Direction", "EncoderInfo", "__version__", "build", *_LAZY]
