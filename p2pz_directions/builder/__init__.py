"""Building concepts: captioners, text encoders, caption filtering, recipes, diagnostics and the `build` pipeline."""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:  # `build` without importing torch at package import
    if name == "build":
        return importlib.import_module("p2pz_directions.builder.pipeline").build
    raise AttributeError(f"module 'p2pz_directions.builder' has no attribute {name!r}")
