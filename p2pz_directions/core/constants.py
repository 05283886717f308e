"""Every environment variable p2pz-directions reads, with its default: the one place that reads them.

Each setting is a function that reads the environment when it is called, not when a module is
imported, so a variable set after import (a launcher, a test's ``monkeypatch.setenv``) is honoured.
`VARIABLES` lists them all with their defaults and meaning; docs/configuration.md is the same table
for readers (a test keeps the two equal). Standard library only: ``p2pz --help`` imports this.

>>> from p2pz_directions import constants
>>> constants.lock_timeout_s()  # P2PZ_LOCK_TIMEOUT unset
120.0

Offline mode is huggingface_hub's own switch (`hf_offline`, ``HF_HUB_OFFLINE``): there is no
p2pz-only one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from p2pz_directions.core.errors import P2PZError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, its default (as written in the environment), what it does."""

    name: str
    default: str
    meaning: str
    scope: str = "package"  # "package" (the library and the CLI) or "space" (space/app.py only)


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "P2PZ_HOME",
        "$XDG_CACHE_HOME/p2pz, else ~/.cache/p2pz",
        "Folder of the local registry (the store): packs, the lock, the search index.",
    ),
    Variable(
        "P2PZ_LOCK_TIMEOUT",
        "120",
        "Seconds a store write waits for the store's lock before it gives up with a clear error.",
    ),
    Variable(
        "P2PZ_PULL_DEADLINE",
        "3600",
        "Seconds a whole `p2pz pull` / `push` / Hub search may take, however slowly the server sends.",
    ),
    Variable(
        "P2PZ_DOWNLOAD_DEADLINE",
        "300",
        "Seconds one legacy `.pt` download (`p2pz import-pt URL`) may take in all.",
    ),
    Variable(
        "P2PZ_MAX_DOWNLOAD_BYTES",
        str(64 * 1024 * 1024),
        "Largest legacy `.pt` download accepted, in bytes (checked from the headers and while streaming).",
    ),
    Variable(
        "P2PZ_DISABLE_PLUGINS",
        "(empty)",
        "Comma-separated editor/scorer entry-point names not to load (`p2pz plugins` shows them disabled).",
    ),
    Variable(
        "P2PZ_SEMANTIC_SUGGEST",
        "1",
        '`0` turns off the "did you mean" suggestions by meaning (all-MiniLM-L6-v2) for unknown names.',
    ),
    Variable(
        "P2PZ_MINILM_BACKEND",
        "auto",
        "`sentence-transformers` forces that library for the suggestion embedder; `auto` picks the light path.",
    ),
    Variable(
        "P2PZ_DEBUG",
        "0",
        "`1` (any value but `0`) makes the CLI print full tracebacks instead of one `error:` line (`p2pz --debug`).",
    ),
    Variable(
        "P2PZ_FAST_EXIT",
        "1",
        "`0` ends the `p2pz` command through Python's full shutdown (atexit handlers, coverage, profilers); "
        "by default a command that loaded torch ends with `os._exit` once its output is written and flushed.",
    ),
    Variable(
        "P2PZ_CUDA_PREWARM",
        "1",
        "`0` keeps `p2pz edit` from starting the GPU in a background thread while torch imports (the CUDA context "
        'through the driver API, then one tiny cuBLAS, cuDNN and attention call; see docs/editing.md "A one-off '
        'edit"). The thread never changes a result: captures wait for it, and a failure in it only ends it.',
    ),
    Variable(
        "P2PZ_MODELS",
        "auto",
        "Which classes an editor loads a local model folder into: `auto` (p2pz's lean UNet / VAE / CLIP / scheduler "
        "classes, which import neither diffusers nor transformers, where the folder fits them; diffusers' and "
        "transformers' classes otherwise), `lean` (those or an error), `diffusers` (always diffusers' / transformers').",
    ),
    Variable("P2PZ_MODEL", "CompVis/stable-diffusion-v1-4", "The Space's diffusers model.", "space"),
    Variable("P2PZ_DEMO", "0", "`1`: the Space runs the tiny random-weight demo model (CPU).", "space"),
    Variable("P2PZ_DEMO_DIR", "p2pz-app-demo", "Folder of the Space's demo model and registry.", "space"),
    Variable(
        "P2PZ_AUTHORS",
        "1",
        "`1`: the Space imports the pix2pix-zero authors' four SD 1.4 concepts once when none fits.",
        "space",
    ),
)

_DEFAULTS = {v.name: v.default for v in VARIABLES}


class ConfigError(P2PZError, ValueError):
    """An environment variable holds a value that cannot be used (the CLI prints it as one line)."""


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return value.strip() if value is not None and value.strip() else None


def _number(name: str, kind: type[int] | type[float]) -> int | float:
    raw = _raw(name)
    text = raw if raw is not None else _DEFAULTS[name]
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not {'an integer' if kind is int else 'a number'}; "
            f"unset it (default {_DEFAULTS[name]}) or set e.g. {name}={_DEFAULTS[name]}"
        ) from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} must be above 0; unset it for the default {_DEFAULTS[name]}")
    return value


def flag(name: str, default: bool = False) -> bool:
    """A yes/no variable: ``1/true/yes/on`` or ``0/false/no/off`` (any case); unset or empty: ``default``."""
    raw = _raw(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is neither 1/true/yes/on nor 0/false/no/off")


def text(name: str) -> str:
    """A string variable, or its default from `VARIABLES`."""
    raw = _raw(name)
    return raw if raw is not None else _DEFAULTS[name]


# -- the settings ------------------------------------------------------------------------------------
def home() -> Path:
    """``$P2PZ_HOME``, else ``$XDG_CACHE_HOME/p2pz``, else ``~/.cache/p2pz``."""
    env = _raw("P2PZ_HOME")
    if env:
        return Path(env).expanduser()
    xdg = _raw("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "p2pz"


def lock_timeout_s() -> float:
    return float(_number("P2PZ_LOCK_TIMEOUT", float))


def pull_deadline_s() -> float:
    return float(_number("P2PZ_PULL_DEADLINE", float))


def download_deadline_s() -> float:
    return float(_number("P2PZ_DOWNLOAD_DEADLINE", float))


def max_download_bytes() -> int:
    return int(_number("P2PZ_MAX_DOWNLOAD_BYTES", int))


def disabled_plugins() -> set[str]:
    return {n.strip() for n in (_raw("P2PZ_DISABLE_PLUGINS") or "").split(",") if n.strip()}


def semantic_suggest() -> bool:
    return flag("P2PZ_SEMANTIC_SUGGEST", default=True)


def minilm_backend() -> str:
    return text("P2PZ_MINILM_BACKEND")


def debug() -> bool:
    """Any value but ``0/false/no/off`` (or empty) turns tracebacks on: a debug switch never fails."""
    raw = _raw("P2PZ_DEBUG")
    return raw is not None and raw.lower() not in _FALSE


def model_classes() -> str:
    value = text("P2PZ_MODELS").lower()
    if value not in ("auto", "lean", "diffusers"):
        raise ConfigError(f"P2PZ_MODELS={value!r} must be auto, lean or diffusers; unset it for auto")
    return value


def fast_exit() -> bool:
    return flag("P2PZ_FAST_EXIT", default=True)


def cuda_prewarm() -> bool:
    return flag("P2PZ_CUDA_PREWARM", default=True)


def hf_offline() -> bool:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE``), as huggingface_hub itself sees it.

    huggingface_hub reads the variable once, at import (``huggingface_hub.constants.HF_HUB_OFFLINE``);
    that constant is what its own requests obey, so it is the one asked here. Imported on call:
    huggingface_hub is not loaded by ``p2pz --help``.
    """
    from huggingface_hub import constants as hf_constants

    return bool(hf_constants.HF_HUB_OFFLINE)
