"""Option types and checks shared by every ``p2pz`` command module, so each flag reads the same everywhere.

The checks run before any model work: a wrong device, output path, ``--opt`` value or encoder id
is refused with one ``error: ...`` line (exit 2) while nothing has been loaded or written yet.
This module imports neither torch nor any model library at import time (``p2pz --help`` stays fast).

How a command module is written: a ``register(app)`` that defines its commands inside it with
``@app.command("name")`` (``cli.py`` calls its own, then those of ``cli.COMMAND_MODULES``), and
options that more than one command takes come from here, as the ``*Opt`` aliases or, where the help
text differs, the ``*_option(help)`` factories, so a flag and its short form are written once.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
import threading
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from p2pz_directions.core.errors import P2PZError

#: the diffusers model ``edit``, ``batch``, ``eval`` and ``mask`` load when no ``--model`` is given
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


# --- options every command spells the same way ----------------------------------------------------
# Each flag (and its short form) is written once, here. A command whose help text differs uses the
# ``*_option(help)`` factory; the ``*Opt`` aliases carry the usual help. Short flags mean one thing
# everywhere: -m --model, -p --pack, -d --direction(s), -e --editor, -o --output, -q --quiet.
def model_option(help: str = "Diffusers model id or folder: picks its text encoder.") -> Any:
    return typer.Option("--model", "-m", help=help)


def pack_option(help: str = "Only this pack.") -> Any:
    return typer.Option("--pack", "-p", help=help)


def direction_option(
    help: str = "Direction name, e.g. 'cat->dog' or 'pack:cat@1->dog' (quote it). Repeat to apply several.",
) -> Any:
    return typer.Option("--direction", "-d", help=help)


def editor_option(help: str = "Editor plugin (see `p2pz plugins`).") -> Any:
    return typer.Option("--editor", "-e", help=help)


def output_option(help: str, *older: str) -> Any:
    """``--output``/``-o``; ``older`` spellings (``--out``) keep working."""
    return typer.Option("--output", *older, "-o", help=help)


def opt_option(
    help: str = "Any other editor option, KEY=VALUE (e.g. --opt lambda_kl=10). Repeatable.",
) -> Any:
    return typer.Option("--opt", help=help)


def steps_option(help: str = "Sampling steps (editor default: 50).") -> Any:
    return typer.Option("--steps", help=help)


ModelOpt = Annotated[str | None, model_option()]
#: ``--model`` of the commands that run a model (default `DEFAULT_MODEL`)
RunModelOpt = Annotated[str, model_option(f"Diffusers model id or folder (default {DEFAULT_MODEL}).")]
EncoderOpt = Annotated[
    str | None, typer.Option("--encoder", help="Text encoder id or folder (instead of --model).")
]
PackOpt = Annotated[str | None, pack_option()]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts (on stdout).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="cuda, cpu, cuda:1 ... (default: cuda if present).")
]
DtypeOpt = Annotated[
    str | None, typer.Option("--dtype", help="float16 | bfloat16 | float32 (default: float16 on GPU).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
SeedsOpt = Annotated[str, typer.Option("--seeds", help="Seeds: '0', '0,1,2', '0-3' (ranges included).")]
EditorOpt = Annotated[str, editor_option()]
EditorsOpt = Annotated[
    list[str] | None,
    editor_option("Editor plugin(s) (see `p2pz plugins`); repeatable. Default pix2pix-zero."),
]
DirectionsOpt = Annotated[list[str] | None, direction_option()]

# the editor flags `edit`, `batch` and `eval` share; `editor_kwargs` turns them into editor keywords
PromptOpt = Annotated[
    str | None,
    typer.Option("--prompt", help="Caption of the input image(s) (skips BLIP); with no image, the prompt."),
]
NegativePromptOpt = Annotated[str | None, typer.Option("--negative-prompt", help="Negative prompt.")]
StepsOpt = Annotated[int | None, steps_option()]
GuidanceScaleOpt = Annotated[
    float | None, typer.Option("--guidance-scale", help="Classifier-free guidance (default 7.5).")
]
XaGuidanceOpt = Annotated[
    float | None,
    typer.Option(
        "--xa-guidance",
        help="pix2pix-zero cross-attention guidance (default 0.1; SD 2.x needs 0.01 or less).",
    ),
]
StrengthOpt = Annotated[float | None, typer.Option("--strength", help="SDEdit: noise strength in (0, 1].")]
InpaintStrengthOpt = Annotated[
    float | None, typer.Option("--inpaint-strength", help="DiffEdit: inversion strength in (0, 1].")
]
OptOpt = Annotated[list[str] | None, opt_option()]


#: the parameter name of each shared editor flag -> the editor keyword it stands for
EDITOR_FLAGS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "xa_guidance": "cross_attention_guidance_amount",
    "strength": "strength",
    "inpaint_strength": "inpaint_strength",
}


def editor_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """The editor keywords of the shared editor flags given (a command's ``ctx.params``); flags left
    out are left out, other parameters ignored.

    >>> editor_kwargs({"steps": 20, "xa_guidance": 0.05, "prompt": None, "seeds": "0"})
    {'num_inference_steps': 20, 'cross_attention_guidance_amount': 0.05}
    """
    return {kw: params[name] for name, kw in EDITOR_FLAGS.items() if params.get(name) is not None}


class UsageError(P2PZError, ValueError):
    """A command-line option is wrong (printed as one ``error:`` line, exit 2)."""


# --- device -------------------------------------------------------------------------------------
def check_device(device: str | None) -> str | None:
    """Refuse a device this torch cannot use (``--device foo``, ``--device cuda`` on CPU-only torch)."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {device!r} is not a device; use cpu, cuda, cuda:1 (a GPU index) or mps"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise UsageError(
                f"--device {device}: no CUDA GPU is usable here (torch {torch.__version__}, {build}); "
                "use --device cpu, or install a CUDA build of torch on a machine with a GPU"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {device}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"--device {device}: MPS (Apple GPU) is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device!r}: p2pz runs on cpu, cuda or mps")
    return device


def check_dtype(dtype: str | None) -> str | None:
    """Refuse an unknown ``--dtype`` before anything loads."""
    from p2pz_directions.core.dtypes import UnknownDtypeError, dtype_name

    if dtype is None:
        return None
    try:
        dtype_name(dtype)
    except UnknownDtypeError:
        raise UsageError(f"--dtype {dtype!r}: use float32, float16 or bfloat16") from None
    return dtype


# --- output paths -------------------------------------------------------------------------------
def image_extensions() -> list[str]:
    """File extensions PIL can write (``.png``, ``.jpg``, ...)."""
    from PIL import Image

    Image.init()
    return sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)


def _writable_dir(folder: Path, flag: str, path: Path) -> None:
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{flag} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write into {probe} (permission denied); choose another path")
    if probe.is_dir():  # root passes os.access everywhere: try for real (the probe file is removed at once)
        import tempfile

        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as e:
            raise UsageError(f"{flag} {path}: cannot write into {probe} ({e.strerror or e})") from None


def check_image_output(
    path: str | Path | None, flag: str = "--output", *, folder_for_many: bool = False
) -> Path | None:
    """An image file path we can write: known extension, not a folder, in a writable place.

    Give the path as typed (a ``str``): ``Path`` drops the trailing ``/`` that marks a folder.
    """
    if path is None:
        return None
    raw = os.fspath(path)
    path = Path(raw)
    if raw.endswith(("/", os.sep)) or path.is_dir():
        raise UsageError(
            f"{flag} {raw}: is a folder; give a file name such as {Path(raw) / 'edit.png'}"
            + (" (a folder is only for several input images)" if folder_for_many else "")
        )
    exts = image_extensions()
    if path.suffix.lower() not in exts:
        common = [e for e in (".png", ".jpg", ".webp", ".tif", ".bmp") if e in exts]
        what = f"extension {path.suffix!r}" if path.suffix else "no extension"
        raise UsageError(f"{flag} {raw}: {what} is not an image format; use one of {', '.join(common)}")
    _writable_dir(path.parent if str(path.parent) else Path("."), flag, path)
    return path


def check_output_dir(path: str | Path, flag: str = "--output") -> Path:
    """A folder we can create and write images into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: with several input images, -o must be a folder (it is a file)")
    _writable_dir(path, flag, path)
    return path


def check_inputs(images: list[Path]) -> None:
    """Every input image exists and is a file."""
    for p in images:
        if not p.exists():
            raise UsageError(f"input image {p} does not exist")
        if p.is_dir():
            raise UsageError(f"input image {p} is a folder; give image files")


# --- editor options (--opt KEY=VALUE) -----------------------------------------------------------
def editor_option_types(editor: Any) -> dict[str, Any] | None:
    """``{option: type-or-default}`` of an editor: from its ``options`` dataclass when it has one,
    else from its ``run`` signature (None when it takes any keyword)."""
    import inspect

    cls = editor if isinstance(editor, type) else type(editor)
    opts = getattr(cls, "options", None)
    if opts is not None and dataclasses.is_dataclass(opts):
        try:
            hints = typing.get_type_hints(opts)
        except Exception:  # noqa: BLE001 - string annotations naming unimportable types
            hints = {}
        return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(opts)}
    try:
        sig = inspect.signature(cls.run)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())[3:]  # self, image, direction
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    out: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            out[p.name] = _annotation_kind(p.annotation, p.default)
    return out


def _annotation_kind(annotation: Any, default: Any) -> Any:
    """A scalar type (int/float/bool/str) read from an annotation (string or real) or a default."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if annotation is not None and not isinstance(annotation, str):
        text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    parts = {t.strip() for t in re.split(r"[|\[\],]", str(text)) if t.strip()} - {"None", "Optional"}
    if len(parts) == 1:
        (only,) = parts
        kind = {"int": int, "float": float, "bool": bool, "str": str}.get(only)
        if kind is not None:
            return kind
    if parts and parts <= {"int", "float"}:
        return float
    if isinstance(default, bool | int | float | str):
        return type(default)
    return Any


def _typed(key: str, value: str, kind: Any) -> Any:
    if value.strip().lower() in ("none", "null"):
        return None
    if kind is bool:
        low = value.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"--opt {key}={value}: {key} takes true or false")
    if kind is int:
        try:
            return int(value)
        except ValueError:
            raise UsageError(f"--opt {key}={value}: {key} takes a whole number, e.g. --opt {key}=5") from None
    if kind is float:
        try:
            return float(value)
        except ValueError:
            raise UsageError(f"--opt {key}={value}: {key} takes a number, e.g. --opt {key}=0.5") from None
    if kind is str:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def parse_opts(pairs: list[str] | None, editor: Any = None, flag: str = "--opt") -> dict[str, Any]:
    """``KEY=VALUE`` pairs, typed from the editor's options; unknown keys refused with a suggestion.

    Without an editor (or one that takes any keyword) values are parsed as JSON when they can be.
    """
    types = editor_option_types(editor) if editor is not None else None
    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise UsageError(f"{flag} takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if types is None:
            out[key] = _typed(key, value, Any)
            continue
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=1)
            name = getattr(editor, "name", type(editor).__name__)
            raise UsageError(
                f"{flag} {key}=...: editor {name!r} has no option {key!r}"
                + (f" (did you mean {close[0]}?)" if close else "")
                + f"; it takes: {', '.join(types)}"
            )
        out[key] = _typed(key, value, types[key])
    return out


# --- encoders -----------------------------------------------------------------------------------
def check_encoder(encoder: str | None, flag: str = "--encoder") -> str | None:
    """An encoder id we know, one the registry holds, a folder, or a cached Hub id; a near-miss of a
    known id gets a suggestion; anything else is refused (it would store concepts no model matches)."""
    if encoder is None:
        return None
    from p2pz_directions.editing.models import KNOWN_ENCODERS, validate_encoder_id

    try:
        if validate_encoder_id(encoder) is not None:
            return encoder
    except P2PZError as e:
        raise UsageError(f"{flag} {encoder}: {e}") from None
    try:
        from p2pz_directions.core.store import default_store

        stored = {e.encoder.id for e in default_store().entries(skip_damaged=True)}
    except Exception:  # noqa: BLE001 - an unreadable registry does not make an id valid
        stored = set()
    if (
        encoder in stored
        or in_hf_cache(encoder, "config.json")
        or in_hf_cache(encoder, "tokenizer_config.json")
    ):
        return encoder
    raise UsageError(
        f"{flag} {encoder}: not a text encoder p2pz knows ({', '.join(KNOWN_ENCODERS)}), none of the stored "
        "concepts uses it, it is not a folder and not in the Hugging Face cache. Check the spelling, pass a "
        "folder holding the text encoder, or use --model with the diffusers model instead"
    )


# --- network / the Hugging Face cache -------------------------------------------------------------
_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the Hugging Face Hub can be reached (False at once when ``HF_HUB_OFFLINE`` is set).

    When it cannot, ``HF_HUB_OFFLINE=1`` is set for this process so that no library retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
    except ValueError:
        port = 443
    key = f"{host}:{port}"
    if key in _REACHABLE:
        return _REACHABLE[key]
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # name lookup ignores socket timeouts
    t.start()
    t.join(timeout + 0.5)
    _REACHABLE[key] = bool(ok)
    if not ok:
        import sys

        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        constants = sys.modules.get("huggingface_hub.constants")  # read at import: set it there too
        if constants is not None:
            constants.HF_HUB_OFFLINE = True
    return bool(ok)


def offline_reason() -> str:
    """Why the Hub is not used, for messages: the variable the user set, or the failed connection."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") and not _REACHABLE:
        return "HF_HUB_OFFLINE is set (offline)"
    return "the Hub cannot be reached (offline)"


def in_hf_cache(repo_id: str, filename: str = "config.json") -> bool:
    """Whether ``filename`` of the Hub repo ``repo_id`` is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return False


def check_model_available(model: str, flag: str = "--model", filename: str = "model_index.json") -> None:
    """A local folder, a cached Hub model, or a reachable Hub: else say so at once (no retries)."""
    if os.path.isdir(model):
        if not ((Path(model) / filename).is_file() or (Path(model) / "config.json").is_file()):
            what = "no text encoder" if filename.startswith("text_encoder") else f"no {filename}"
            raise UsageError(
                f"{flag} {model}: the folder has {what} ({filename} is missing); is it a diffusers model folder?"
            )
        return
    if os.path.exists(model):
        raise UsageError(f"{flag} {model}: is a file; give a diffusers model folder or a Hub model id")
    if in_hf_cache(model, filename):
        return
    if not hub_reachable():
        raise UsageError(
            f"{flag} {model}: not a local folder and not in the Hugging Face cache, and {offline_reason()}. "
            "Download it on a connected machine first, or pass --model PATH to a local "
            "diffusers model folder (`p2pz demo` makes a tiny one in p2pz-demo/tiny-sd)"
        )


# --- hints in CLI syntax ------------------------------------------------------------------------
_PY_HINT = re.compile(r"\b(model|encoder|prompt|pack|device|dtype)=('[^']*'|\"[^\"]*\"|\.\.\.|<[^>]*>)")


def cli_syntax(message: str) -> str:
    """Library messages suggest Python keywords (``prompt='a photo'``); the CLI says ``--prompt 'a photo'``."""
    return _PY_HINT.sub(lambda m: f"--{m.group(1)} {m.group(2)}", message)


# --- tables -------------------------------------------------------------------------------------
def print_table(console: Any, table: Any) -> None:
    """Print a rich table at the width it needs, so no cell is cut (``pix2pix-ze…``) to fit 80 columns.

    On a terminal narrower than the table, lines run past the edge instead of being truncated.
    """
    from rich.measure import Measurement

    table.expand = False
    for col in table.columns:
        col.no_wrap = True
        col.overflow = "ignore"
    need = Measurement.get(console, console.options.update_width(100_000), table).maximum
    if need <= console.width:
        console.print(table)
        return
    old = console._width  # rich clamps print(width=...) to the console's width: widen it for this table
    console.width = need
    try:
        console.print(table, crop=False)
    finally:
        console._width = old


# --- quiet model loading ------------------------------------------------------------------------
def quiet_loading() -> None:
    """No "Loading weights" / "Writing model shards" bars and no library warnings while our own
    progress bars run (Hub download bars stay: a real download is worth watching).

    transformers and diffusers are not imported for this: a lean edit never loads them. Their
    verbosity comes from the environment at import; the transformers bar switch is applied when
    (if ever) ``transformers.utils.logging`` is imported (`after_import`)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    after_import("transformers.utils.logging", _quiet_transformers)
    after_import("diffusers.utils.logging", lambda m: m.set_verbosity_error())


def _quiet_transformers(tlog: Any) -> None:
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    if not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()


def after_import(name: str, action: Callable[[Any], None]) -> None:
    """Run ``action(module)`` once module ``name`` is imported: now if it already is, else right after
    its import (a cosmetic hook: an error in ``action`` is ignored)."""

    def run(module: Any) -> None:
        try:
            action(module)
        except Exception:  # noqa: BLE001 - cosmetics only
            pass

    if name in sys.modules:
        run(sys.modules[name])
        return
    _AfterImport.install().actions.setdefault(name, []).append(run)


class _AfterImport:
    """A `sys.meta_path` finder that finds nothing itself: it wraps the loader of the modules it
    watches so that their actions run after the module's code."""

    _installed: _AfterImport | None = None

    def __init__(self) -> None:
        self.actions: dict[str, list[Callable[[Any], None]]] = {}

    @classmethod
    def install(cls) -> _AfterImport:
        if cls._installed is None or cls._installed not in sys.meta_path:
            cls._installed = cls()
            sys.meta_path.insert(0, cls._installed)
        return cls._installed

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        actions = self.actions.pop(name, None)
        if actions is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_act(module: Any) -> None:
            exec_module(module)
            for act in actions:
                act(module)

        loader.exec_module = exec_and_act  # type: ignore[method-assign]
        return spec
