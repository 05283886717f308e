"""Scorers: what measures an edit. Each is a plugin (hook ``p2pz_register_scorers``).

A scorer is a class (or factory) with a ``name`` and ``metrics`` (a tuple of `Metric`), built as
``factory(model=None, device=None, dtype=None)``; its ``score(inputs, edits, *, source_texts,
target_texts, masks)`` returns ``{metric name: [one float (or None where it does not apply) per
pair]}``. The built-in ones (`p2pz_directions.eval.builtin`) are the paper's metrics:

- ``clip``: CLIP accuracy and CLIP directional similarity (CLIP ViT-B/32 by default);
- ``dino-structure``: DINO ViT self-similarity structure distance (DINO ViT-B/8 by default);
- ``background-ssim``: SSIM between input and edit outside the editor's mask (needs no model).

>>> from p2pz_directions.eval import scorers
>>> scorers.available()                                               # doctest: +SKIP
['background-ssim', 'clip', 'dino-structure']
>>> clip = scorers.get("clip", model="openai/clip-vit-base-patch32")   # doctest: +SKIP
>>> clip.score([cat], [dog], source_texts=["a photo of a cat"], target_texts=["a photo of a dog"])
{'clip_accuracy': [1.0], 'clip_directional_similarity': [0.21]}      # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from p2pz_directions.core.errors import NotFoundError, P2PZError

__all__ = [
    "Metric",
    "Scorer",
    "ScorerError",
    "ScorerModelError",
    "available",
    "get",
    "metric_info",
]


class ScorerError(P2PZError, RuntimeError):
    """A scorer could not score (bad inputs, a broken plugin)."""


class ScorerModelError(P2PZError, ValueError):
    """A scorer was given a model of the wrong kind (a DINO ViT where CLIP is needed, ...) or none that loads."""


@dataclass(frozen=True)
class Metric:
    """One number a scorer computes per edited image."""

    name: str
    higher_is_better: bool
    description: str
    #: the value range, for display (None = unbounded)
    range: tuple[float, float] | None = None


class Scorer:
    """Base class of scorers. Subclasses set ``name``, ``metrics`` and implement `score`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    metrics: ClassVar[tuple[Metric, ...]] = ()
    #: the model loaded when none is given (None: the scorer needs no model)
    default_model: ClassVar[str | None] = None

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model_id = os.fspath(model) if model is not None else self.default_model
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.float32

    def settings(self) -> dict[str, Any]:
        """What identifies this scorer's numbers (stored in evaluation records)."""
        return {"model": self.model_id}

    def score(
        self,
        inputs: Sequence[Any],
        edits: Sequence[Any],
        *,
        source_texts: Sequence[str],
        target_texts: Sequence[str],
        masks: Sequence[Any | None] | None = None,
    ) -> dict[str, list[float | None]]:
        """Score each ``(inputs[i], edits[i])`` pair; returns one list per metric, one value per pair."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(...)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, model={self.model_id!r}, device={self.device})"


def check_batch(
    inputs: Sequence[Any],
    edits: Sequence[Any],
    source_texts: Sequence[str],
    target_texts: Sequence[str],
    masks,
) -> None:
    """Every list one entry per pair; raise `ScorerError` saying which does not fit."""
    n = len(inputs)
    lens = {"edits": len(edits), "source_texts": len(source_texts), "target_texts": len(target_texts)}
    if masks is not None:
        lens["masks"] = len(masks)
    bad = {k: v for k, v in lens.items() if v != n}
    if bad:
        raise ScorerError(
            f"score(): {n} inputs but "
            + ", ".join(f"{v} {k}" for k, v in bad.items())
            + "; give one per pair"
        )


def _ensure_builtin() -> None:
    """Register the built-in scorers in-process when their entry point is not installed (a source
    checkout whose ``pip install -e .`` predates them)."""
    from p2pz_directions.editing import plugins

    pm = plugins.get_plugin_manager()
    if pm.has_plugin("p2pz-scorers") or any(
        getattr(p, "__name__", "") == "p2pz_directions.eval.builtin" for p in pm.get_plugins()
    ):
        return
    from p2pz_directions.eval import builtin

    plugins.register(builtin, name="p2pz-scorers")


def _registry() -> dict[str, Callable[..., Any]]:
    from p2pz_directions.editing import plugins

    _ensure_builtin()
    return plugins.scorers()


def available() -> list[str]:
    """Names of the installed scorers, sorted."""
    return sorted(_registry())


def metric_info() -> dict[str, tuple[str, Metric]]:
    """``{metric name: (scorer name, Metric)}`` over every installed scorer."""
    out: dict[str, tuple[str, Metric]] = {}
    for sname, factory in _registry().items():
        for m in getattr(factory, "metrics", ()) or ():
            out.setdefault(m.name, (sname, m))
    return out


def get(
    name: str,
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Scorer:
    """The scorer ``name`` (``model`` overrides its default model: a Hub id or a local folder)."""
    found = _registry()
    if name not in found:
        close = difflib.get_close_matches(name, sorted(found), n=3, cutoff=0.5)
        msg = f"unknown scorer {name!r}; installed scorers: {', '.join(sorted(found)) or '(none)'}"
        if close:
            msg += f". Did you mean {' or '.join(repr(c) for c in close)}?"
        raise NotFoundError(msg, suggestions=close)
    scorer = found[name](model=model, device=device, dtype=dtype)
    if not hasattr(scorer, "score") or not getattr(scorer, "metrics", None):
        raise ScorerError(
            f"scorer plugin {name!r} returned {type(scorer).__name__}, which has no score()/metrics"
        )
    return scorer
