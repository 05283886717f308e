"""Recipes: the official pack as code.

Each file in ``registry/recipes/*.toml`` (installed as the ``p2pz_registry`` package) says how one
concept of the official pack is built: its caption prompt, the captioner and its sampling
settings, how many captions, the seed, the filters, and the models (text encoders) it is built
for. ``build_recipes`` rebuilds the pack from them, so the stored embeddings are a reproducible
output of these files, not a hand-made artifact.

>>> from p2pz_directions import recipes
>>> r = recipes.get_recipe("cat")
>>> r.n, r.seed, r.captioner
(1000, 0, 'flan-t5')
>>> "{concept}" in r.prompt
True

A recipe file::

    name = "cat"
    description = "..."
    models = ["CompVis/stable-diffusion-v1-4", "stabilityai/stable-diffusion-2-1"]

    [captions]
    captioner = "flan-t5"          # or "templates"
    model = "google/flan-t5-xl"
    prompt = "Provide a caption for images containing a {concept}. ..."
    n = 1000
    seed = 0
    temperature = 0.8
    top_k = 10
    max_new_tokens = 64

    [filter]
    min_captions = 16
    max_chars = 150
    require_mention = true
    mention = "cat"                # words that must appear (default: the name)
    near_duplicate_threshold = 0.95
"""

from __future__ import annotations

import json
import os
import tomllib as _toml
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pz_directions.builder.captioners import DEFAULT_FLAN_T5, DEFAULT_PROMPT, get_captioner
from p2pz_directions.core import naming
from p2pz_directions.core.concept import Concept
from p2pz_directions.core.errors import FormatError, NotFoundError

__all__ = [
    "OFFICIAL_PACK",
    "Recipe",
    "build_recipes",
    "get_recipe",
    "load_recipe",
    "official_recipes",
    "recipes_dir",
]

#: the local pack name the official recipes build into by default
OFFICIAL_PACK = "official"

_TOP_KEYS = {"name", "description", "models", "captions", "filter"}
_CAPTION_KEYS = {
    "captioner",
    "model",
    "prompt",
    "n",
    "seed",
    "temperature",
    "top_k",
    "top_p",
    "max_new_tokens",
    "batch_size",
}
_FILTER_KEYS = {"min_captions", "max_chars", "require_mention", "mention", "near_duplicate_threshold"}


@dataclass(frozen=True)
class Recipe:
    """How one concept is built. ``path`` is the file it came from (None if made in code)."""

    name: str
    description: str = ""
    models: tuple[str, ...] = ()
    captioner: str = "flan-t5"
    captioner_model: str = DEFAULT_FLAN_T5
    prompt: str = DEFAULT_PROMPT
    n: int = 1000
    seed: int = 0
    min_captions: int = 16
    sampling: dict[str, Any] = field(default_factory=dict)
    filter: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def captioner_options(self) -> dict[str, Any]:
        """Options for `p2pz_directions.builder.captioners.get_captioner` (flan-t5 gets prompt and sampling)."""
        if self.captioner == "flan-t5":
            return {"model": self.captioner_model, "prompt": self.prompt, **self.sampling}
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "captioner": self.captioner,
            "captioner_model": self.captioner_model if self.captioner == "flan-t5" else None,
            "prompt": self.prompt if self.captioner == "flan-t5" else None,
            "n": self.n,
            "seed": self.seed,
            "min_captions": self.min_captions,
            "sampling": dict(self.sampling),
            "filter": dict(self.filter),
            "file": self.path.name if self.path else None,
        }


def _expect(cond: bool, path: Path, msg: str) -> None:
    if not cond:
        raise FormatError(f"recipe {path}: {msg}")


def _int(v: Any, path: Path, key: str, lo: int = 0) -> int:
    _expect(
        isinstance(v, int) and not isinstance(v, bool) and v >= lo,
        path,
        f"'{key}' must be an integer >= {lo}",
    )
    return int(v)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate one recipe file; errors name the file and the key."""
    p = Path(path)
    try:
        data = _toml.loads(p.read_text("utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"recipe file {p} does not exist") from None
    except (UnicodeDecodeError, _toml.TOMLDecodeError) as e:
        raise FormatError(f"recipe {p}: not valid UTF-8 TOML ({e})") from None
    unknown = set(data) - _TOP_KEYS
    _expect(not unknown, p, f"unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    _expect(isinstance(data.get("name"), str), p, "'name' (the concept name) is required")
    name = naming.normalize_concept(data["name"])
    models = data.get("models", [])
    _expect(
        isinstance(models, list) and all(isinstance(m, str) for m in models),
        p,
        "'models' must be a list of ids",
    )
    caps = data.get("captions", {})
    _expect(isinstance(caps, dict), p, "[captions] must be a table")
    unknown = set(caps) - _CAPTION_KEYS
    _expect(
        not unknown, p, f"unknown keys in [captions]: {sorted(unknown)}; allowed: {sorted(_CAPTION_KEYS)}"
    )
    flt = data.get("filter", {})
    _expect(isinstance(flt, dict), p, "[filter] must be a table")
    unknown = set(flt) - _FILTER_KEYS
    _expect(not unknown, p, f"unknown keys in [filter]: {sorted(unknown)}; allowed: {sorted(_FILTER_KEYS)}")
    captioner = str(caps.get("captioner", "flan-t5")).strip().lower()
    _expect(
        captioner in ("flan-t5", "templates"), p, f"captioner {captioner!r} must be 'flan-t5' or 'templates'"
    )
    prompt = caps.get("prompt", DEFAULT_PROMPT)
    _expect(
        isinstance(prompt, str) and "{concept}" in prompt, p, "'prompt' must be a string containing {concept}"
    )
    sampling: dict[str, Any] = {}
    for key in ("temperature", "top_p"):
        if key in caps:
            _expect(
                isinstance(caps[key], (int, float)) and caps[key] > 0, p, f"'{key}' must be a positive number"
            )
            sampling[key] = float(caps[key])
    for key in ("top_k", "max_new_tokens", "batch_size"):
        if key in caps:
            sampling[key] = _int(caps[key], p, key, 1)
    n = _int(caps.get("n", 1000), p, "n", 1)
    min_captions = _int(flt.get("min_captions", 16), p, "min_captions", 1)
    _expect(min_captions <= n, p, f"min_captions ({min_captions}) is larger than n ({n})")
    filt = {k: v for k, v in flt.items() if k != "min_captions"}
    if "max_chars" in filt:
        filt["max_chars"] = _int(filt["max_chars"], p, "max_chars", 1)
    if "require_mention" in filt:
        _expect(isinstance(filt["require_mention"], bool), p, "'require_mention' must be true or false")
    if "mention" in filt:
        _expect(
            isinstance(filt["mention"], str) and filt["mention"].strip(),
            p,
            "'mention' must be a non-empty string",
        )
    if "near_duplicate_threshold" in filt:
        t = filt["near_duplicate_threshold"]
        _expect(isinstance(t, (int, float)) and 0 < t <= 1, p, "'near_duplicate_threshold' must be in (0, 1]")
    return Recipe(
        name=name,
        description=str(data.get("description", "")),
        models=tuple(models),
        captioner=captioner,
        captioner_model=str(caps.get("model", DEFAULT_FLAN_T5)),
        prompt=prompt,
        n=n,
        seed=_int(caps.get("seed", 0), p, "seed", 0),
        min_captions=min_captions,
        sampling=sampling,
        filter=filt,
        path=p,
    )


def recipes_dir() -> Path:
    """The folder of the official recipes (``registry/recipes`` in a checkout)."""
    try:
        from importlib.resources import files

        d = Path(str(files("p2pz_registry") / "recipes"))
        if d.is_dir():
            return d
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "registry" / "recipes"


def official_recipes(folder: str | os.PathLike | None = None) -> dict[str, Recipe]:
    """Every recipe in ``folder`` (default: the official ones), by concept name."""
    d = Path(folder) if folder is not None else recipes_dir()
    out: dict[str, Recipe] = {}
    for f in sorted(d.glob("*.toml")):
        r = load_recipe(f)
        if r.name in out:
            raise FormatError(f"recipe {f}: concept {r.name!r} is also defined in {out[r.name].path}")
        out[r.name] = r
    return out


def get_recipe(name: str, folder: str | os.PathLike | None = None) -> Recipe:
    """The recipe of concept ``name``; unknown names raise `NotFoundError` with close matches."""
    import difflib

    key = naming.normalize_concept(name)
    all_ = official_recipes(folder)
    if key not in all_:
        close = difflib.get_close_matches(key, list(all_), n=3)
        raise NotFoundError(
            f"no recipe for {key!r}; recipes: {', '.join(sorted(all_)) or 'none'}"
            + (f". Did you mean: {', '.join(close)}?" if close else ""),
            close,
        )
    return all_[key]


def build_recipes(
    names: Sequence[str] | None = None,
    *,
    model: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    pack: str = OFFICIAL_PACK,
    folder: str | os.PathLike | None = None,
    captioner: str | None = None,
    n: int | None = None,
    device: str | None = None,
    dtype: Any = None,
    batch_size: int = 1024,
    store: Any = None,
    progress: Callable[..., None] | None = None,
) -> list[Concept]:
    """Build the concepts of the recipes ``names`` (default: all) for one model, into ``pack``.

    ``captioner`` / ``n`` override every recipe (e.g. ``captioner="templates"`` offline); the
    model defaults to each recipe's first listed model. One text encoder and one caption model
    (per distinct setting) are loaded for the whole run.

    >>> build_recipes(["cat", "dog"], model="CompVis/stable-diffusion-v1-4")   # doctest: +SKIP
    [Concept('official:cat@1', ...), Concept('official:dog@1', ...)]
    """
    from p2pz_directions.builder.encoders import TextEncoder, resolve_device_dtype
    from p2pz_directions.builder.pipeline import build_concept

    allr = official_recipes(folder)
    chosen = [get_recipe(n_, folder) for n_ in names] if names else list(allr.values())
    if not chosen:
        raise NotFoundError(f"no recipes found in {folder or recipes_dir()}")
    if model is None and encoder is None:
        firsts = {r.models[0] for r in chosen if r.models}
        if len(firsts) != 1:
            raise ValueError("these recipes list different models: pass model=... (--model)")
        model = firsts.pop()
    dev, dt = resolve_device_dtype(device, dtype)
    te = TextEncoder.from_pretrained(model, encoder=encoder, device=dev, dtype=dt)
    captioners: dict[str, Any] = {}
    out: list[Concept] = []
    try:
        for r in chosen:
            cap_name = captioner or r.captioner
            opts = r.captioner_options() if cap_name == r.captioner else {}
            if cap_name == "flan-t5":
                opts = {**opts, "device": dev, "dtype": dt}
            key = cap_name + json.dumps(opts, sort_keys=True, default=str)
            if key not in captioners:
                captioners[key] = get_captioner(cap_name, **opts)
            want = n if n is not None else r.n
            out.append(
                build_concept(
                    r.name,
                    model=model,
                    encoder=encoder,
                    n=want,
                    captioner=captioners[key],
                    seed=r.seed,
                    device=dev,
                    dtype=dt,
                    pack=pack,
                    batch_size=batch_size,
                    min_captions=min(r.min_captions, want),
                    progress=progress,
                    store=store,
                    filter_options=dict(r.filter),
                    text_encoder=te,
                    extra_provenance={"recipe": r.to_dict()},
                )
            )
    finally:
        for cap in captioners.values():
            close = getattr(cap, "close", None)
            if close is not None:
                close()
    return out
