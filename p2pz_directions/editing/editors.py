"""Editors: apply a named direction to an image. Every editor is a plugin (see `hookspecs`).

>>> import torch
>>> from PIL import Image
>>> from p2pz_directions import editors
>>> editors.available()                                                 # doctest: +SKIP
['diffedit', 'pix2pix-zero', 'sdedit']
>>> ed = editors.get("pix2pix-zero", model="CompVis/stable-diffusion-v1-4",
...                  device="cuda", dtype=torch.float16)                # doctest: +SKIP
>>> ed = editors.get("pix2pix-zero", pipe=existing_sd_pipeline)          # doctest: +SKIP
>>> res = ed.edit(Image.open("cat.png"), "cat->dog", seed=0)            # doctest: +SKIP
>>> res = ed.edit(None, "cat->dog", prompt="a painting of a cat", seed=0)   # doctest: +SKIP
>>> res.image, res.original, res.caption, res.inverted_latents          # doctest: +SKIP

What every editor shares lives in the base class `Editor`:

- the model: a diffusers folder or Hub id (``model=``), or the components of a pipeline already
  loaded (``pipe=``); weights load lazily, on the first edit, in ``dtype`` on ``device``;
- the model's text-encoder identity (`p2pz_directions.editing.models.encoder_for`), against which a
  direction is checked *before* any model work (`EncoderMismatchError`);
- a direction given by name resolves through `p2pz_directions.core.directions.load`;
- ``edit(image_or_list, direction_or_list, **options)``: one image or a list (PIL, numpy HWC/NHWC
  in 0..1, torch CHW/NCHW in -1..1 or 0..1, paths), one direction (a `Direction` or a name) or a
  list of them (combined by `Editor.combine_directions`: summed by default);
- options: an editor declares them as a frozen dataclass in ``options`` (each field with
  ``metadata={"help": ...}``); `Editor.make_options` refuses an unknown name or a value of the
  wrong type with an `EditorOptionError` naming the valid ones, before any model work;
  CUDA out-of-memory becomes an `EditorError` that says what lowers memory.

A plugin subclasses `Editor`, sets ``name`` and ``options``, and implements
``run(images, direction, options)`` (docs/plugins.md has a whole editor in 40 lines). Editors
without ``options`` implement ``run(image, direction, **options)`` with one RGB PIL image, as before.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import json
import numbers
import os
import time
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from p2pz_directions.core import constants
from p2pz_directions.core.concept import Direction, EncoderInfo
from p2pz_directions.core.dtypes import UnknownDtypeError, torch_dtype
from p2pz_directions.core.errors import EncoderMismatchError, FormatError, NotFoundError, P2PZError

__all__ = [
    "EditResult",
    "Editor",
    "EditorError",
    "EditorOptionError",
    "ProgressCallback",
    "available",
    "get",
    "parse_dtype",
]

#: ``progress(phase, step, total)``: phase is e.g. "caption", "invert", "reference", "edit"
ProgressCallback = Callable[[str, int, int], None]


class EditorError(P2PZError, RuntimeError):
    """An edit could not be completed (NaN latents, out of memory, ...); the message says what to change."""


class EditorOptionError(P2PZError, TypeError):
    """An option this editor does not take, or a value it cannot use."""


@dataclass
class EditResult:
    """What an edit returns (as diffusers' pipelines return ``.images``).

    ``image`` and ``original`` follow ``output_type`` ("pil" by default; "np" or "pt" give arrays
    / tensors in 0..1, "latent" the latents). ``original`` is the input image (real mode) or the
    image generated from the prompt before editing (synthetic mode).
    """

    image: Any
    original: Any = None
    caption: str | None = None
    inverted_latents: torch.Tensor | None = None
    mask: Any = None
    reconstruction: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> list[Any]:
        """``[image]``, as diffusers' pipeline outputs hold them."""
        return self.image if isinstance(self.image, list) else [self.image]


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"`` / ``"float16"`` / ``torch.float16`` -> ``torch.float16`` (None stays None)."""
    try:
        return torch_dtype(dtype)
    except UnknownDtypeError as e:
        raise EditorOptionError(str(e)) from None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Editor:
    """Base class of every editor. Subclasses set ``name`` and implement `run`.

    >>> class Identity(Editor):
    ...     name = "identity"
    ...     description = "returns the input"
    ...     def run(self, image, direction, *, seed=0):
    ...         return EditResult(image=image, original=image)
    """

    #: the key users pass to ``editors.get`` and ``p2pz edit --editor``
    name: ClassVar[str] = ""
    #: one line for ``p2pz plugins``
    description: ClassVar[str] = ""
    #: the phases this editor reports through ``progress`` (for progress bars)
    phases: ClassVar[tuple[str, ...]] = ()
    #: image sides are resized down to a multiple of this
    image_multiple: ClassVar[int] = 8
    #: what lowers memory, said when CUDA runs out of it
    memory_advice: ClassVar[str] = (
        "use --dtype float16, a smaller image, or fewer images at once; close other programs using the GPU"
    )
    #: the components `load_components` loads by default
    component_names: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    #: the editor's options: a frozen dataclass (None: options read from ``run``'s signature)
    options: ClassVar[type | None] = None

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        pipe: Any = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        encoder: EncoderInfo | str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        models: str | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None and pipe is None:
            raise EditorOptionError(
                f"editor {self.name!r} needs a model: pass model='CompVis/stable-diffusion-v1-4' (a Hub id or "
                f"a local diffusers folder) or pipe=<a loaded StableDiffusionPipeline>"
            )
        if kwargs:
            raise EditorOptionError(
                f"editor {self.name!r} does not take {', '.join(sorted(kwargs))} when created; "
                f"pass edit options to .edit(...)"
            )
        self.model = os.fspath(model) if model is not None else None
        self.pipe = pipe
        self.models = constants.model_classes() if models is None else models
        if self.models not in MODEL_CLASSES:
            raise EditorOptionError(
                f"models must be one of {', '.join(map(repr, MODEL_CLASSES))}, not {self.models!r}"
            )
        #: components that could not load lean under models="auto", with the reason (diffusers' class was used)
        self.lean_fallbacks: dict[str, str] = {}
        self.revision = revision
        self.variant = variant
        dtype = parse_dtype(dtype)
        if device is None:
            device = getattr(pipe, "device", None) if pipe is not None else None
        self.device = torch.device(device) if device is not None else _default_device()
        if dtype is None and pipe is not None:
            dtype = getattr(pipe, "dtype", None)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        self._encoder_arg = encoder
        self._encoder_info: EncoderInfo | None = None
        self._components: dict[str, Any] = {}
        self._progress: ProgressCallback | None = None
        self._interrupt = False
        #: the `UNetRunner` of each loop mode (`unet_runner`): its graphs and compiled steps, kept across edits
        self.runners: dict[str, Any] = {}

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (or ``interrupt = True``) in a ``callback_on_step_end`` to stop
        the current loop after this step, as with a diffusers pipeline."""
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

    # -- identity -------------------------------------------------------------------------------
    @property
    def model_label(self) -> str:
        """How the model is named in messages."""
        if self.model is not None:
            return f"model {self.model}"
        ref = getattr(self.pipe, "name_or_path", None)
        return f"pipeline {ref}" if ref else "the given pipeline"

    @property
    def encoder_info(self) -> EncoderInfo:
        """The model's text-encoder identity (no weights are loaded to find it)."""
        if self._encoder_info is None:
            from p2pz_directions.editing.models import encoder_for

            arg = self._encoder_arg
            if isinstance(arg, EncoderInfo):
                self._encoder_info = arg
            elif arg is not None:
                self._encoder_info = encoder_for(encoder=arg)
            elif self.model is not None:
                self._encoder_info = encoder_for(model=self.model)
            else:
                self._encoder_info = _encoder_of_pipe(self.pipe)
        return self._encoder_info

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.model_label}, device={self.device}, dtype={self.dtype})"

    # -- directions -----------------------------------------------------------------------------
    def resolve_direction(self, direction: Direction | str) -> Direction:
        """A `Direction` for this model: load it by name if needed, and refuse another encoder's.

        Raises `EncoderMismatchError` before any model weights are touched.
        """
        enc = self.encoder_info
        if isinstance(direction, str):
            from p2pz_directions import directions

            if enc.id.startswith("unknown/"):  # identity unknown: any encoder, size checked below
                direction = directions.load(direction)
            else:
                direction = directions.load(direction, encoder=enc.id)
        if not isinstance(direction, Direction):
            raise EditorOptionError(
                f"direction must be a Direction or a name like 'cat->dog', not {type(direction).__name__}"
            )
        if enc.id.startswith("unknown/"):
            if direction.encoder.hidden_size != enc.hidden_size:
                raise EncoderMismatchError(
                    f"direction {direction.name!r} has D={direction.encoder.hidden_size} embeddings but "
                    f"{self.model_label} has a text encoder of D={enc.hidden_size}"
                )
            warnings.warn(
                f"cannot tell which text encoder {self.model_label} uses; only its size was checked. "
                f"Pass encoder='openai/clip-vit-large-patch14' (or the right id) to editors.get to check it.",
                UserWarning,
                stacklevel=3,
            )
        else:
            direction.check_model(enc, self.model_label)
        return direction

    # -- models ---------------------------------------------------------------------------------
    def load_components(self, names: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Load (once) and return the named components, in ``self.dtype`` on ``self.device``.

        From ``pipe=`` they are the pipeline's own objects (nothing is copied); from ``model=``
        each is loaded with its ``from_pretrained(model, subfolder=name)``, the class taken from
        ``model_index.json``; on CUDA with ``device_map``, so the weights go from the safetensors
        file straight onto the GPU in ``dtype`` (about 0.6-1 s instead of 4 s for SD 1.x on an H200).
        """
        names = names or self.component_names
        missing = [n for n in names if n not in self._components]
        if missing:
            if self.pipe is not None:
                comps = getattr(self.pipe, "components", None) or {}
                for n in missing:
                    obj = comps.get(n, getattr(self.pipe, n, None))
                    if obj is None:
                        raise EditorOptionError(
                            f"the given pipeline has no {n!r}; editor {self.name!r} needs it"
                        )
                    self._components[n] = obj
            else:
                index = _model_index(self.model, self.revision)
                self._components.update(self._load_many(missing, index))
            for n in missing:
                obj = self._components[n]
                if isinstance(obj, torch.nn.Module):
                    p = next(obj.parameters(), None)
                    if p is not None and (p.device != self.device or p.dtype != self.dtype):
                        obj.to(device=self.device, dtype=self.dtype)
                    obj.eval()
                    obj.requires_grad_(False)
        return {n: self._components[n] for n in names}

    def _load_many(self, names: list[str], index: dict[str, Any]) -> dict[str, Any]:
        """Load ``names`` from ``self.model``, one after the other. (Not in parallel threads:
        diffusers builds modules under accelerate's ``init_empty_weights``, which patches
        ``torch.nn.Module`` for the whole process, so a module built meanwhile in another thread
        gets meta tensors.)"""
        classes = {n: self._component_class(n, index.get(n)) for n in names}
        return {n: self._load_one(n, classes[n]) for n in names}

    def _lean_allowed(self, name: str, spec: Any) -> bool:
        """Whether component ``name`` loads into p2pz's lean classes (`p2pz_directions.lean`): a local
        diffusers folder (no ``revision``), ``models`` not ``"diffusers"``, and a class they stand in for."""
        from p2pz_directions.lean.loading import lean_spec

        return (
            self.models != "diffusers"
            and self.pipe is None
            and self.model is not None
            and self.revision is None
            and os.path.isdir(self.model)
            and lean_spec(name, spec)
        )

    def _component_class(self, name: str, spec: Any) -> Any:
        """A `_LeanComponent` where the lean classes may be tried, else diffusers' / transformers' class."""
        if self._lean_allowed(name, spec):
            return _LeanComponent(spec)
        return self._library_class(name, spec)

    def _library_class(self, name: str, spec: Any) -> Any:
        """The class ``model_index.json`` names for ``name`` (SD's defaults without an entry), imported."""
        defaults = {
            "unet": ("diffusers", "UNet2DConditionModel"),
            "vae": ("diffusers", "AutoencoderKL"),
            "text_encoder": ("transformers", "CLIPTextModel"),
            "tokenizer": ("transformers", "CLIPTokenizer"),
            "scheduler": ("diffusers", "DDIMScheduler"),
        }
        lib, cls_name = (
            spec if isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[0] else defaults[name]
        )
        return getattr(importlib.import_module(lib), cls_name)

    def _load_one(self, name: str, cls: Any) -> Any:
        if isinstance(cls, _LeanComponent):
            from p2pz_directions.lean import LeanUnsupported
            from p2pz_directions.lean.loading import load_component

            try:
                return load_component(
                    name, self.model, dtype=self.dtype, device=self.device, variant=self.variant
                )
            except LeanUnsupported as e:
                if self.models == "lean":
                    raise EditorError(
                        f"cannot load {name} of {self.model} into p2pz's lean classes: {e}. Use models='auto' "
                        "(or P2PZ_MODELS=auto), which then loads diffusers' / transformers' class"
                    ) from None
                self.lean_fallbacks[name] = str(e)
                cls = self._library_class(name, cls.spec)
        kw: dict[str, Any] = {"subfolder": name}
        if self.revision:
            kw["revision"] = self.revision
        if name in ("unet", "vae", "text_encoder"):
            kw["torch_dtype"] = self.dtype
            if self.variant:
                kw["variant"] = self.variant
        try:
            if self.device.type == "cuda" and "torch_dtype" in kw:
                # safetensors read straight onto the GPU in the target dtype (no float32 CPU copy)
                try:
                    return cls.from_pretrained(self.model, device_map=str(self.device), **kw)
                except (ImportError, NotImplementedError, TypeError, ValueError):
                    pass  # no accelerate, or a class without device_map: the CPU route below
            return cls.from_pretrained(self.model, **kw)
        except (OSError, ValueError) as e:
            raise EditorError(
                f"cannot load {name} of {self.model}: {e}. Check the model id or folder; offline, the model "
                f"must already be in the Hugging Face cache (HF_HUB_OFFLINE=1 is set: {constants.hf_offline()})"
            ) from None

    # -- the UNet loops -------------------------------------------------------------------------
    def loop_mode(self, loops: str = "auto", cuda_graphs: bool | None = None) -> str:
        """The `UNetRunner` mode of an edit's loops: ``loops`` is ``"eager"``, ``"graphs"`` (CUDA
        graphs, CUDA only), ``"compile"`` (``torch.compile``d steps, replayed as CUDA graphs on CUDA;
        the first run on a machine compiles for minutes, see docs/editing.md "Loops") or ``"auto"``:
        CUDA graphs on a CUDA device unless the older ``cuda_graphs=False`` says eager, eager
        elsewhere."""
        from p2pz_directions.sampling.runner import RUNNER_MODES

        if loops not in ("auto", *RUNNER_MODES):
            raise EditorOptionError(
                f"loops must be 'auto', {', '.join(map(repr, RUNNER_MODES))}; not {loops!r}"
            )
        if loops == "auto":
            return "graphs" if self.device.type == "cuda" and cuda_graphs is not False else "eager"
        if loops == "graphs" and self.device.type != "cuda":
            raise EditorOptionError(
                "loops='graphs' needs a CUDA device; use 'eager' (or 'compile') on the CPU"
            )
        return loops

    def unet_runner(self, mode: str) -> Any:
        """The editor's `UNetRunner` of ``mode``, kept across edits: the graphs it captures and the
        steps it compiles serve every later edit of the same settings and shapes."""
        from p2pz_directions.sampling.runner import UNetRunner

        if mode not in self.runners:
            self.runners[mode] = UNetRunner(mode)
        return self.runners[mode]

    def options_runner(self, o: Any) -> Any:
        """The `UNetRunner` of options ``o``: their ``loops`` (default ``"auto"``) and ``cuda_graphs``."""
        return self.unet_runner(self.loop_mode(getattr(o, "loops", "auto"), getattr(o, "cuda_graphs", None)))

    # -- progress -------------------------------------------------------------------------------
    def progress(self, phase: str, step: int, total: int) -> None:
        """Report progress of a phase to the caller's ``progress`` callback, if any."""
        if self._progress is not None:
            self._progress(phase, step, total)

    # -- the edit -------------------------------------------------------------------------------
    def edit(
        self,
        image: Any,
        direction: Direction | str | list[Direction | str],
        *,
        progress: ProgressCallback | None = None,
        **options: Any,
    ) -> EditResult:
        """Edit ``image`` (one image or a list; None for a generated image, where the editor supports
        it) along ``direction`` (one or a list, combined by `combine_directions`).

        A direction is a `Direction` or a name (``"cat->dog"``, ``"pack:cat@1->dog"``) resolved
        for this model. ``options`` are the editor's own (``dataclasses.fields(editor.options)``),
        checked before any model work. ``progress`` is called as ``progress(phase, step, total)``.
        A list of images is edited as one batch; ``result.images`` holds one output per input.
        """
        many = isinstance(direction, (list, tuple))
        resolved = [self.resolve_direction(d) for d in (direction if many else [direction])]
        if not resolved:
            raise EditorOptionError("give at least one direction")
        direction = resolved[0] if len(resolved) == 1 else self.combine_directions(resolved)
        if self.options is None:
            return self._edit_legacy(image, direction, progress, options)
        opts = self.make_options(**options)
        images, notes = None, []
        if image is not None:
            images = [self._load_image(i) for i in (image if isinstance(image, list) else [image])]
            images, notes = self._fit_images(images)
        self._interrupt = False
        return self._timed_run(lambda: self.run(images, direction, opts), direction, notes, progress)

    def _timed_run(
        self, call: Any, direction: Direction, notes: list[str], progress: ProgressCallback | None
    ) -> EditResult:
        """``call()`` with ``progress`` reported and CUDA OOM turned into advice; the result's ``extra``
        gets the editor, the direction, the seconds and any notes."""
        self._progress = progress
        t0 = time.perf_counter()
        try:
            result = call()
        except torch.OutOfMemoryError as e:
            raise self._oom(e) from None
        finally:
            self._progress = None
        result.extra.setdefault("editor", self.name)
        result.extra.setdefault("direction", direction.name)
        result.extra.setdefault("seconds", time.perf_counter() - t0)
        if notes:
            result.extra.setdefault("notes", []).extend(notes)
        return result

    def _fit_images(self, images: list[Any]) -> tuple[list[Any], list[str]]:
        """PIL images with sides that are not a multiple of ``image_multiple`` are resized down (Lanczos,
        as ``VaeImageProcessor`` does for SD's multiple of 8), with a note and an `ImageResizedWarning`."""
        from PIL import Image

        from p2pz_directions.editing.images import fit_to_multiple

        out, notes = [], []
        for im in images:
            if isinstance(im, Image.Image):
                im, note = fit_to_multiple(im, self.image_multiple)
                if note:
                    notes.append(note)
            out.append(im)
        return out, notes

    def combine_directions(self, directions: list[Direction]) -> Direction:
        """One direction from several (the sum of their deltas; all must share the encoder)."""
        return functools.reduce(lambda a, b: a + b, directions)

    @staticmethod
    def _load_image(src: Any) -> Any:
        """A path becomes an RGB PIL image, a PIL image of another mode RGB; arrays and tensors stay
        as they are (diffusers' ``VaeImageProcessor`` takes them at full precision)."""
        if isinstance(src, (str, os.PathLike)):
            from p2pz_directions.editing.images import load_image

            return load_image(src)
        from PIL import Image

        if isinstance(src, Image.Image) and src.mode != "RGB":
            from p2pz_directions.editing.images import to_rgb

            return to_rgb(src)
        return src

    def _oom(self, e: BaseException) -> EditorError:
        return EditorError(
            f"CUDA ran out of memory in editor {self.name!r} ({str(e).splitlines()[0]}). To lower memory: "
            f"{self.memory_advice}"
        )

    def _edit_legacy(
        self, image: Any, direction: Direction, progress: ProgressCallback | None, options: dict[str, Any]
    ) -> EditResult:
        """Editors without an ``options`` dataclass: ``run(image, direction, **options)``, one image at a time."""
        self._check_options(options)
        if isinstance(image, list):
            results = [self._edit_legacy(im, direction, progress, options) for im in image]
            first = results[0]
            first.image = [r.image for r in results]
            first.original = [r.original for r in results]
            first.extra["results"] = results
            return first
        notes: list[str] = []
        if image is not None:
            from p2pz_directions.editing.images import prepare_image

            image, note = prepare_image(image, self.image_multiple)
            if note:
                notes.append(note)
        return self._timed_run(lambda: self.run(image, direction, **options), direction, notes, progress)

    def run(self, image: Any, direction: Direction, *args: Any, **options: Any) -> EditResult:
        """Do the edit: ``run(images, direction, options)`` with ``images`` a list (or None) and
        ``options`` an instance of ``self.options``; for editors without ``options``,
        ``run(image, direction, **options)`` with one RGB PIL image (sides a multiple of ``image_multiple``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement run(images, direction, options)")

    # -- options --------------------------------------------------------------------------------
    def option_names(self) -> list[str] | None:
        """The options this editor takes (None when it takes any)."""
        if self.options is not None:
            return [f.name for f in dataclasses.fields(self.options)]
        sig = inspect.signature(self.run)
        params = list(sig.parameters.values())[2:]  # after image, direction
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def make_options(self, **options: Any) -> Any:
        """An instance of ``self.options`` from keyword options, each name and type checked.

        Raises `EditorOptionError` naming the valid options (and the closest one) for an unknown
        name, and the expected type for a value of another type.
        """
        self._check_options(options)
        if self.options is None:
            return options
        hints = _option_hints(self.options)
        for k, v in options.items():
            hint = hints.get(k, Any)
            if not _is_instance(v, hint):
                raise EditorOptionError(
                    f"option {k!r} of editor {self.name!r} must be {_type_name(hint)}, not {type(v).__name__} ({v!r:.60})"
                )
        try:
            opts = self.options(**options)
        except (TypeError, ValueError) as e:
            raise EditorOptionError(f"editor {self.name!r}: {e}") from None
        if hasattr(opts, "loops"):  # every editor's loop mode, checked before any model work
            self.loop_mode(opts.loops, getattr(opts, "cuda_graphs", None))
        return opts

    def _check_options(self, options: dict[str, Any]) -> None:
        known = self.option_names()
        if known is None:
            return
        bad = [k for k in options if k not in known]
        if bad:
            hints = []
            for k in bad:
                close = difflib.get_close_matches(k, known, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise EditorOptionError(
                f"editor {self.name!r} does not take option {', '.join(hints)}; it takes: {', '.join(known)}"
            )


@functools.lru_cache(maxsize=64)
def _option_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no type checks
        return {}


def _is_instance(value: Any, hint: Any) -> bool:
    """A lenient ``isinstance`` for option annotations (int for float, Optional, unions, Literal,
    list[...] / tuple[...] by their outer type; anything else is accepted)."""
    if hint is Any or hint is object:
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_is_instance(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if origin in (list, tuple, dict):
        return isinstance(value, origin) or (origin is tuple and isinstance(value, list))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # callables, protocols, ... : not checked


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


#: ``models=`` (or P2PZ_MODELS): ``auto`` loads a local SD 1.x / 2.x folder into p2pz's lean classes
#: where they fit and diffusers' / transformers' classes otherwise; ``lean`` insists; ``diffusers`` never uses them
MODEL_CLASSES = ("auto", "lean", "diffusers")


@dataclass(frozen=True)
class _LeanComponent:
    """`Editor._component_class`'s answer for a component that loads into a lean class (``spec``: its
    ``model_index.json`` entry, for the fallback)."""

    spec: Any


def _model_index(model: str | None, revision: str | None) -> dict[str, Any]:
    if model is None:
        return {}
    path = Path(model) / "model_index.json"
    try:
        if not path.is_file():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "model_index.json", revision=revision))
        return json.loads(path.read_text("utf-8"))
    except Exception:  # noqa: BLE001 - the index only picks classes; defaults are SD's
        return {}


def _encoder_of_pipe(pipe: Any) -> EncoderInfo:
    """The text-encoder identity of a loaded pipeline (from where it was loaded, else its size)."""
    from p2pz_directions.editing.models import encoder_for

    refs = [getattr(pipe, "name_or_path", None)]
    te = getattr(pipe, "text_encoder", None)
    te_cfg = getattr(te, "config", None)
    refs.append(getattr(te_cfg, "_name_or_path", None))
    for ref in refs:
        if not ref:
            continue
        try:
            return encoder_for(model=ref)
        except (FormatError, ValueError, OSError):
            continue
    hidden = int(getattr(te_cfg, "hidden_size", 0) or 0)
    family = f"{getattr(te_cfg, 'model_type', 'text-encoder')}-d{hidden}"
    return EncoderInfo(f"unknown/{family}", hidden, family)


def available() -> list[str]:
    """Names of the installed editors, sorted."""
    from p2pz_directions.editing import plugins

    return sorted(plugins.editors())


def get(
    name: str,
    model: str | os.PathLike | None = None,
    pipe: Any = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **kw: Any,
) -> Editor:
    """The editor ``name`` for a model (``model=`` id/folder, or ``pipe=`` a loaded pipeline).

    >>> ed = get("pix2pix-zero", model="CompVis/stable-diffusion-v1-4")    # doctest: +SKIP
    """
    from p2pz_directions.editing import plugins

    found = plugins.editors()
    if name not in found:
        installed = sorted(found)
        close = difflib.get_close_matches(name, installed, n=3, cutoff=0.5)
        failed = [p for p in plugins.plugin_report() if p.load_error]
        msg = f"unknown editor {name!r}; installed editors: {', '.join(installed) or '(none)'}"
        if close:
            msg += f". Did you mean {' or '.join(repr(c) for c in close)}?"
        if failed:
            msg += ". Plugins that failed to load: " + ", ".join(f"{p.name} ({p.load_error})" for p in failed)
        raise NotFoundError(msg, suggestions=close or installed)
    factory = found[name]
    editor = factory(model=model, pipe=pipe, device=device, dtype=dtype, **kw)
    if not isinstance(editor, Editor):
        raise P2PZError(f"editor plugin {name!r} returned {type(editor).__name__}, not an Editor")
    return editor
