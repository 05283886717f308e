"""What the web app does, without the web page: warm editors, edits, builds, the registry.

Everything here is plain Python (no gradio import), so it is tested directly and the page
(`p2pz_directions.app.page`) stays a thin layer of widgets over it.

- `EditorPool` keeps one warm editor per (model, editor) in the process; a lock makes a second
  job wait for the first (the page also queues one job at a time).
- `option_specs` reads an editor's own options (``dataclasses.fields(cls.options)`` when the
  editor declares them, else the keyword arguments of its ``run``) so the page can draw them.
- `Backend.edit` / `Backend.build` check their inputs before any model work and raise
  `AppInputError` with a message that says what to change; `readable_error` turns anything else
  (out of memory, NaN, a failed load) into one such message, never a traceback.

>>> from p2pz_directions.app.backend import Backend
>>> be = Backend("CompVis/stable-diffusion-v1-4")                           # doctest: +SKIP
>>> out = be.edit("cat.png", "cat->dog", "pix2pix-zero", steps=50, seed=0)  # doctest: +SKIP
>>> out.image.save("dog.png")                                               # doctest: +SKIP
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import math
import os
import tempfile
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pz_directions.core.errors import EncoderMismatchError, NotFoundError, P2PZError

__all__ = [
    "AppInputError",
    "Backend",
    "EditOutput",
    "EditorPool",
    "OptionSpec",
    "mask_overlay",
    "known_options",
    "option_specs",
    "readable_error",
]

log = logging.getLogger("p2pz_directions.app")

#: progress(fraction in 0..1, description)
Progress = Callable[[float, str], None]

#: options the page draws itself (common to every editor), not per editor
COMMON_OPTIONS = ("seed", "num_inference_steps", "cross_attention_guidance_amount", "prompt")
#: options that make no sense as a widget (objects, callbacks, batch and output plumbing)
HIDDEN_OPTIONS = frozenset(
    {
        "generator",
        "output_type",
        "num_images_per_prompt",
        "callback",
        "callback_steps",
        "callback_on_step_end",
        "callback_on_step_end_tensor_inputs",
        "inversion_callback",
        "cross_attention_kwargs",
        "timesteps",
        "sigmas",
        "latents",
        "image_latents",
        "mask",
        "mask_image",
        "mask_only",
        "decode_latents",
        "return_reconstruction",
        "height",
        "width",
    }
)


class AppInputError(P2PZError, ValueError):
    """An input of the page is unusable; the message says what to change."""


# --------------------------------------------------------------------------------------------------
# editor options -> widget specs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptionSpec:
    """One editor option as the page draws it.

    ``kind`` is ``"bool"``, ``"int"``, ``"float"``, ``"str"`` or ``"choice"`` (then ``choices``);
    ``optional`` means None is allowed (an empty field is None).
    """

    name: str
    kind: str
    default: Any
    help: str = ""
    optional: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")

    def convert(self, value: Any) -> Any:
        """The page's widget value as the editor takes it (raises `AppInputError` when it cannot)."""
        if value is None or (isinstance(value, str) and not value.strip() and self.kind != "str"):
            if self.optional:
                return None
            return self.default
        try:
            if self.kind == "bool":
                return bool(value)
            if self.kind == "int":
                f = float(value)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            if self.kind == "float":
                f = float(value)
                if not math.isfinite(f):
                    raise ValueError
                return f
        except (TypeError, ValueError):
            raise AppInputError(
                f"option {self.label!r} must be a{'n' if self.kind == 'int' else ''} {self.kind}, not {value!r}"
            ) from None
        if self.kind == "str" and self.optional and isinstance(value, str) and not value.strip():
            return None
        if self.kind == "choice" and value not in self.choices:
            raise AppInputError(
                f"option {self.label!r} must be one of {', '.join(map(str, self.choices))}, not {value!r}"
            )
        return value


_SIMPLE = {"bool": bool, "int": int, "float": float, "str": str}


def _kind_of(annotation: Any, default: Any) -> tuple[str, bool, tuple[Any, ...]] | None:
    """(kind, optional, choices) for an annotation (a type or its string) and default; None: no widget."""
    if isinstance(default, bool):
        return "bool", False, ()
    text = annotation if isinstance(annotation, str) else _annotation_text(annotation)
    parts = [p.strip() for p in text.replace("Optional[", "").rstrip("]").split("|")] if text else []
    optional = "None" in parts or default is None
    parts = [p for p in parts if p and p != "None"]
    if len(parts) == 1 and parts[0].startswith(("Literal[", "typing.Literal[")):
        try:
            choices = ast.literal_eval("(" + parts[0].split("[", 1)[1].rstrip("]") + ",)")
        except (ValueError, SyntaxError):
            choices = ()
        if choices:
            return "choice", optional, tuple(choices)
    if isinstance(default, (int, float, str)) and not isinstance(default, bool):
        kind = {int: "int", float: "float", str: "str"}[type(default)]
        if kind == "int" and "float" in parts:
            kind = "float"
        return kind, optional, ()
    if default is None and len(parts) == 1 and parts[0] in _SIMPLE:
        return parts[0], True, ()
    return None


def _annotation_text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty or annotation is dataclasses.MISSING:
        return ""
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "")
    if typing.get_origin(annotation) is typing.Literal:
        return "Literal[" + ", ".join(repr(a) for a in typing.get_args(annotation)) + "]"
    return text


def option_specs(editor_cls: type) -> list[OptionSpec]:
    """The editor's own options that the page can draw, in declaration order.

    Reads ``dataclasses.fields(editor_cls.options)`` (help text from ``metadata["help"]``) when
    the class declares an options dataclass, else the keyword arguments of ``editor_cls.run``.
    Options the page draws for every editor (`COMMON_OPTIONS`) and objects (tensors, callbacks:
    `HIDDEN_OPTIONS`, anything without a simple type) are left out.

    >>> from p2pz_plugins.sdedit import SDEditEditor                     # doctest: +SKIP
    >>> [s.name for s in option_specs(SDEditEditor)][:2]                 # doctest: +SKIP
    ['mode', 'strength']
    """
    raw: list[tuple[str, Any, Any, str]] = []
    opts = getattr(editor_cls, "options", None)
    if opts is not None and dataclasses.is_dataclass(opts):
        for f in dataclasses.fields(opts):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = None
            raw.append((f.name, f.type, default, str(f.metadata.get("help", ""))))
    else:
        run = getattr(editor_cls, "run", None)
        if run is None:
            return []
        params = list(inspect.signature(run).parameters.values())
        params = [p for p in params if p.name not in ("self", "image", "direction")]
        for p in params:
            if p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is p.empty:
                continue
            raw.append((p.name, p.annotation, p.default, ""))
    specs = []
    for name, annotation, default, help_ in raw:
        if name in COMMON_OPTIONS or name in HIDDEN_OPTIONS or "embeds" in name:
            continue
        kind = _kind_of(annotation, default)
        if kind is None:
            continue
        k, optional, choices = kind
        specs.append(OptionSpec(name, k, default, help_, optional, choices))
    return specs


def known_options(editor: Any) -> list[str] | None:
    """Every option name ``editor`` takes (None: any): its options dataclass's fields when it
    declares one, else ``editor.option_names()`` (the signature of its ``run``)."""
    opts = getattr(type(editor), "options", None)
    if opts is not None and dataclasses.is_dataclass(opts):
        return [f.name for f in dataclasses.fields(opts)]
    names = getattr(editor, "option_names", None)
    return names() if callable(names) else None


def editor_class(factory: Any) -> type | None:
    """The class behind an editor plugin's factory (None when the factory is not a class)."""
    return factory if isinstance(factory, type) else None


# --------------------------------------------------------------------------------------------------
# errors -> one readable line
# --------------------------------------------------------------------------------------------------
def readable_error(exc: BaseException, *, editor: Any = None) -> str:
    """One message for the page: what went wrong and what to do; never a traceback.

    Our own errors (`P2PZError`) already say what to do. CUDA out of memory says which options
    lower memory (the editor's ``memory_advice``); NaN / infinite values say to lower the
    guidance; anything else is named by its type and first line (the traceback goes to the log).
    """
    import torch

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        advice = getattr(editor, "memory_advice", None) or (
            "use dtype float16, a smaller image, or fewer steps; close other programs using the GPU"
        )
        first = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        return f"Out of memory ({first}). To lower memory: {advice}."
    if isinstance(exc, EncoderMismatchError):
        return (
            f"Encoder mismatch: {text} In this app: pick a direction listed for this model, or make it for this "
            f"model under 'Make your own direction'."
        )
    if isinstance(exc, P2PZError):
        return text
    if "nan" in text.lower().split() or "non-finite" in text.lower() or "infinite" in text.lower():
        return (
            f"The edit produced NaN or infinite values ({text}). Lower the cross-attention guidance or the "
            f"guidance scale, lower the edit strength, or run in float32."
        )
    log.error("edit failed", exc_info=exc)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'failed'}"


# --------------------------------------------------------------------------------------------------
# warm editors
# --------------------------------------------------------------------------------------------------
class EditorPool:
    """One warm editor per (model, editor name) in this process.

    The editor's weights load on its first edit and stay; the same editor object serves every
    later job. ``lock`` is held for the whole of a job: one job at a time per device.
    """

    def __init__(self, model: str, *, device: Any = None, dtype: Any = None, pipe: Any = None) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.pipe = pipe
        self._editors: dict[tuple[str, str], Any] = {}
        self._guard = threading.Lock()
        self.lock = threading.RLock()

    def names(self) -> list[str]:
        from p2pz_directions import editors

        return editors.available()

    def factory(self, name: str) -> Any:
        from p2pz_directions.editing import plugins

        return plugins.editors().get(name)

    def get(self, name: str) -> Any:
        """The warm editor ``name`` (created on first use; unknown names raise `NotFoundError`)."""
        from p2pz_directions import editors

        key = (self.model, name)
        with self._guard:
            ed = self._editors.get(key)
            if ed is None:
                if self.pipe is not None:
                    ed = editors.get(name, pipe=self.pipe, device=self.device, dtype=self.dtype)
                else:
                    ed = editors.get(name, model=self.model, device=self.device, dtype=self.dtype)
                self._editors[key] = ed
            return ed

    def warm(self) -> list[tuple[str, str]]:
        """The (model, editor) pairs created so far."""
        return sorted(self._editors)

    def specs(self, name: str) -> list[OptionSpec]:
        """The option widgets of editor ``name`` (from its class, or its instance's class)."""
        cls = editor_class(self.factory(name))
        if cls is None:
            cls = type(self.get(name))
        return option_specs(cls)


# --------------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------------
def mask_overlay(image: Any, mask: Any, color: tuple[int, int, int] = (255, 40, 40), alpha: float = 0.5):
    """``image`` with ``mask`` (white = edited) tinted in ``color``: DiffEdit's mask as an overlay."""
    from PIL import Image

    base = image.convert("RGB")
    m = mask if hasattr(mask, "convert") else Image.fromarray(mask)
    m = m.convert("L").resize(base.size, Image.Resampling.NEAREST)
    tint = Image.new("RGB", base.size, color)
    blend = Image.blend(base, tint, alpha)
    return Image.composite(blend, base, m)


def _as_pil(x: Any):
    if x is None or hasattr(x, "save"):
        return x
    from p2pz_directions.editing.images import load_image

    try:
        return load_image(x)
    except Exception:  # noqa: BLE001 - a panel that cannot be shown is left out, the edit stands
        return None


# --------------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------------
@dataclass
class EditOutput:
    """What the page shows after an edit."""

    image: Any
    original: Any = None
    reconstruction: Any = None
    mask: Any = None
    overlay: Any = None
    caption: str | None = None
    direction: str = ""
    editor: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    path: Path | None = None

    def summary(self) -> str:
        parts = [f"{self.editor}: {self.direction} in {self.seconds:.1f} s"]
        if self.caption:
            parts.append(f"caption: {self.caption}")
        parts.extend(f"note: {n}" for n in self.notes)
        return "\n\n".join(parts)


class Backend:
    """The app's work for one model: editors, directions, builds and the registry.

    Args:
        model: a diffusers model id or folder (or pass ``pipe=``).
        device, dtype: where the editors run (default: CUDA float16 when available, else CPU float32).
        store: the local registry (default: ``P2PZ_HOME`` / ``~/.cache/p2pz``).
        demo: the model is the tiny random-weight demo model: an empty caption becomes
            ``"a photo of a <source concept>"`` (no image captioner is downloaded).
        default_steps: the steps the page starts with.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        pipe: Any = None,
        device: Any = None,
        dtype: Any = None,
        store: Any = None,
        demo: bool = False,
        default_steps: int = 50,
        work_dir: str | os.PathLike | None = None,
    ) -> None:
        if model is None and pipe is None:
            raise AppInputError("the app needs a model: --model CompVis/stable-diffusion-v1-4 (or --demo)")
        self.model = os.fspath(model) if model is not None else getattr(pipe, "name_or_path", "pipeline")
        self.pool = EditorPool(self.model, device=device, dtype=dtype, pipe=pipe)
        self.device = device
        self.dtype = dtype
        self._store = store
        self.demo = demo
        self.default_steps = int(default_steps)
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="p2pz-app-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._text_encoder = None
        self._encoder_info = None

    # -- registry ------------------------------------------------------------------------------
    @property
    def store(self):
        from p2pz_directions.core.store import default_store

        return self._store or default_store()

    @property
    def encoder_info(self):
        """The model's text-encoder identity (no weights loaded)."""
        if self._encoder_info is None:
            names = self.pool.names()
            if not names:
                raise AppInputError("no editor plugins are installed: reinstall p2pz-directions")
            self._encoder_info = self.pool.get(names[0]).encoder_info
        return self._encoder_info

    def directions(self) -> list[str]:
        """Directions ``a->b`` available for this model's text encoder."""
        from p2pz_directions import directions

        return directions.list("*", encoder=self.encoder_info.id, store=self.store)

    def concepts(self) -> list[str]:
        """Concept names (``pack:name``) for this model's text encoder, in every installed pack."""
        entries = self.store.entries(encoder=self.encoder_info.id, skip_damaged=True)
        return sorted({f"{e.pack}:{e.name}" for e in entries})

    def concept_rows(self) -> list[list[Any]]:
        """Every installed concept (any encoder): pack, name, versions, encoder, D, captions, hash."""
        rows: dict[tuple[str, str, str], list] = {}
        for e in self.store.entries(skip_damaged=True):
            rows.setdefault((e.pack, e.encoder.id, e.name), []).append(e)
        out = []
        for (pack, enc, name), es in sorted(rows.items()):
            last = max(es, key=lambda e: e.version)
            out.append(
                [
                    pack,
                    name,
                    ",".join(str(x.version) for x in sorted(es, key=lambda e: e.version)),
                    enc,
                    last.encoder.hidden_size,
                    last.num_captions if last.num_captions is not None else 0,
                    last.content_hash[:12],
                ]
            )
        return out

    def concept_detail(self, ref: str) -> str:
        """Markdown about one concept (``pack:name``, any encoder): versions, encoder, captions, hash."""
        from p2pz_directions.core import naming

        ref = (ref or "").strip()
        if not ref:
            raise AppInputError("pick a concept in the table (or type pack:name)")
        pack, cref = naming.parse_concept(ref)
        entries = [
            e
            for e in self.store.entries(name=cref.name, skip_damaged=True)
            if pack is None or e.pack == pack.name
        ]
        if not entries:
            raise NotFoundError(f"no concept {ref!r} in the registry ({self.store.root})")
        lines = [f"### {ref}"]
        for e in sorted(entries, key=lambda e: (e.pack, e.encoder.id, e.version)):
            c = self.store.load(e)
            caps = (c.captions or [])[:5]
            method = (c.provenance or {}).get("captioner", {}).get("captioner") or (c.provenance or {}).get(
                "method", "?"
            )
            lines.append(
                f"- **{e.pack}:{e.name}@{e.version}** · encoder `{e.encoder.id}` (D={e.encoder.hidden_size}) · "
                f"{len(c.captions or [])} captions ({method}) · sha256 `{e.content_hash[:16]}` · {c.created}"
            )
            lines.extend(f"    - {_md_escape(cap)}" for cap in caps)
        return "\n".join(lines)

    def search(self, query: str, k: int = 8) -> list[tuple[str, str]]:
        """Directions and concepts by meaning: ``[(label, value)]``; value is a direction name to pick."""
        from p2pz_directions import search

        query = " ".join(str(query or "").split())
        if not query:
            raise AppInputError("type what you want to change, e.g. 'kitten into a puppy'")
        enc = self.encoder_info.id
        mine = set(self.directions())
        out = []
        for h in search.search(query, store=self.store, k=max(k * 3, 12)):
            if enc not in h.encoders:
                continue
            if h.kind == "direction" and h.name in mine:
                out.append((f"{h.ref}  ({h.score:.2f})", h.ref))
            elif h.kind == "concept":
                out.append((f"concept {h.ref}  ({h.score:.2f})", h.ref))
        return out[:k]

    # -- editing -------------------------------------------------------------------------------
    def resolve(self, direction: str, editor: Any) -> Any:
        """The `Direction` for this model, or an error saying which encoder it was built for."""
        from p2pz_directions import directions

        if not isinstance(direction, str) or not direction.strip():
            raise AppInputError("pick a direction (e.g. cat->dog), or search for one by meaning")
        name = direction.strip()
        try:
            return editor.resolve_direction(name)
        except NotFoundError as e:
            try:  # built for another encoder? say so, rather than "not found"
                other = directions.load(name, store=self.store)
            except P2PZError:
                other = None
            if other is not None:
                other.check_model(editor.encoder_info, f"this app's model ({self.model})")
            raise NotFoundError(f"unknown direction {name!r}: {e}", e.suggestions) from None

    def edit(
        self,
        image: Any,
        direction: str,
        editor: str,
        *,
        steps: int | None = None,
        xa_guidance: float | None = None,
        strength: float = 1.0,
        seed: int = 0,
        prompt: str | None = None,
        options: dict[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> EditOutput:
        """Edit ``image`` (a PIL image, array or path; None: generate from ``prompt``) along ``direction``.

        ``strength`` multiplies the direction (1: as built; 0.5: half way; -1: the reverse).
        ``options`` are the editor's own (see `option_specs`); values equal to the default are
        dropped. Raises `AppInputError` / `P2PZError` with a readable message.
        """
        if not isinstance(editor, str) or not editor.strip():
            raise AppInputError(f"pick an editor: {', '.join(self.pool.names())}")
        ed = self.pool.get(editor.strip())
        prompt = (prompt or "").strip() or None
        if image is None and prompt is None:
            raise AppInputError("upload an image to edit, or write a prompt to generate one")
        try:
            strength = float(strength)
            seed_f = float(seed)
        except (TypeError, ValueError):
            raise AppInputError("edit strength and seed must be numbers") from None
        if not math.isfinite(strength) or strength == 0:
            raise AppInputError(
                f"edit strength must be a non-zero number (1 = the direction as built), not {strength}"
            )
        if not seed_f.is_integer() or seed_f < 0:
            raise AppInputError(f"seed must be a whole number >= 0, not {seed}")
        known = known_options(ed)
        specs = {s.name: s for s in self.pool.specs(ed.name)}
        opts: dict[str, Any] = {"seed": int(seed_f)}
        if steps is not None:
            try:
                steps_f = float(steps)
            except (TypeError, ValueError):
                raise AppInputError(f"steps must be a whole number >= 1, not {steps!r}") from None
            if not steps_f.is_integer() or steps_f < 1:
                raise AppInputError(f"steps must be a whole number >= 1, not {steps}")
            opts["num_inference_steps"] = int(steps_f)
        if xa_guidance is not None and (known is None or "cross_attention_guidance_amount" in known):
            try:
                xa = float(xa_guidance)
            except (TypeError, ValueError):
                raise AppInputError(
                    f"cross-attention guidance must be a number, not {xa_guidance!r}"
                ) from None
            if not math.isfinite(xa) or xa < 0:
                raise AppInputError(f"cross-attention guidance must be a number >= 0, not {xa_guidance}")
            opts["cross_attention_guidance_amount"] = xa
        for key, value in (options or {}).items():
            spec = specs.get(key)
            if spec is None:
                if known is not None and key not in known:
                    raise AppInputError(f"editor {ed.name!r} has no option {key!r}")
                opts[key] = value
                continue
            v = spec.convert(value)
            if v != spec.default:
                opts[key] = v

        d = self.resolve(direction, ed)  # name and encoder checked before any model work
        if strength != 1.0:
            d = d * strength
        if prompt is None and self.demo and image is not None:
            prompt = f"a photo of a {d.source.name}"  # the demo has no image captioner to download
        if prompt is not None and (known is None or "prompt" in known):
            opts["prompt"] = prompt

        total_phases = max(1, len(ed.phases))

        def on_phase(phase: str, step: int, total: int) -> None:
            if progress is None:
                return
            i = ed.phases.index(phase) if phase in ed.phases else 0
            frac = (i + (step / total if total else 1.0)) / total_phases
            progress(min(frac, 1.0), f"{phase} {step}/{total}")

        with self.pool.lock:
            if progress is not None:
                progress(0.0, "loading the model" if not ed._components else "starting")
            res = ed.edit(image, d, progress=on_phase, **opts)
        out_img = _as_pil(res.image[0] if isinstance(res.image, list) else res.image)
        original = _as_pil(res.original)
        mask = _as_pil(res.mask)
        overlay = mask_overlay(original, mask) if mask is not None and original is not None else None
        path = self.work_dir / f"edit-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{id(res) % 10000}.png"
        out_img.save(path)
        return EditOutput(
            image=out_img,
            original=original,
            reconstruction=_as_pil(res.reconstruction),
            mask=mask,
            overlay=overlay,
            caption=res.caption,
            direction=d.name,
            editor=ed.name,
            seconds=float(res.extra.get("seconds", 0.0)),
            notes=[str(n) for n in res.extra.get("notes", [])],
            path=path,
        )

    # -- building ------------------------------------------------------------------------------
    def text_encoder(self):
        """The model's text encoder for builds, loaded once."""
        if self._text_encoder is None:
            from p2pz_directions.builder.encoders import TextEncoder

            self._text_encoder = TextEncoder.from_pretrained(
                self.model, device=_device_str(self.device), dtype=self.dtype
            )
        return self._text_encoder

    def build(
        self,
        source: str,
        target: str,
        *,
        captioner: str = "templates",
        n: int = 64,
        seed: int = 0,
        pack: str = "local",
        source_captions: str | os.PathLike | None = None,
        target_captions: str | os.PathLike | None = None,
        captioner_model: str | None = None,
        progress: Progress | None = None,
    ) -> tuple[str, str]:
        """Build the concepts ``source`` and ``target`` for this model and publish both.

        Returns ``(direction reference to pick, markdown summary)``.
        """
        from p2pz_directions.builder.pipeline import DEFAULT_FLAN_T5, run_build
        from p2pz_directions.core import naming

        source, target = (source or "").strip(), (target or "").strip()
        if not source or not target:
            raise AppInputError("give two concept names, e.g. source 'cat' and target 'dog'")
        captioner = (captioner or "templates").strip().lower()
        if captioner not in ("templates", "file", "flan-t5"):
            raise AppInputError(f"captioner must be templates, file or flan-t5, not {captioner!r}")
        if captioner == "file" and (not source_captions or not target_captions):
            raise AppInputError(
                "the 'file' captioner needs a caption file (one caption per line) for the source and the target"
            )
        try:
            n_f = float(n)
        except (TypeError, ValueError):
            raise AppInputError(f"number of captions must be a whole number >= 1, not {n!r}") from None
        if not n_f.is_integer() or n_f < 1:
            raise AppInputError(f"number of captions must be a whole number >= 1, not {n}")
        n = int(n_f)
        pack = naming.parse_pack((pack or "local").strip()).name
        if "/" in pack:
            raise AppInputError(f"publish into a local pack (e.g. 'local'), not the Hub repo {pack!r}")
        stages = ("generate", "filter", "encode")
        names = [naming.normalize_concept(source), naming.normalize_concept(target)]

        def on_stage(stage: str, concept: str, done: int, total: int | None) -> None:
            if progress is None:
                return
            side = names.index(concept) if concept in names else 0
            si = stages.index(stage) if stage in stages else 0
            within = (done / total) if total else 0.5
            frac = (side * len(stages) + si + min(within, 1.0)) / (2 * len(stages))
            progress(min(frac, 1.0), f"{stage} {concept} {done}" + (f"/{total}" if total else ""))

        with self.pool.lock:
            if progress is not None:
                progress(0.0, "loading the text encoder")
            te = self.text_encoder()
            res = run_build(
                source,
                target,
                model=self.model,
                n=n,
                captioner="file" if captioner == "file" else captioner,
                captioner_model=(captioner_model or "").strip() or DEFAULT_FLAN_T5,
                source_captions=source_captions if captioner == "file" else None,
                target_captions=target_captions if captioner == "file" else None,
                seed=int(seed),
                device=_device_str(self.device),
                dtype=self.dtype,
                pack=pack,
                min_captions=min(16, n),
                progress=on_stage,
                store=self.store,
                text_encoder=te,
            )
        d = res.direction
        ref = f"{pack}:{d.source.name}->{d.target.name}"
        lines = [
            f"Built **{ref}** for `{res.encoder.id}` and published it into pack `{pack}` ({self.store.root}).",
            f"- {res.source.name}: {res.source.report.summary()}, version {res.source.concept.version}",
            f"- {res.target.name}: {res.target.report.summary()}, version {res.target.concept.version}",
            f"- delta norm {res.delta_norm:.3f}, {res.timings.get('total', 0.0):.1f} s",
        ]
        return ref, "\n".join(lines)

    def pull(self, repo_id: str) -> str:
        """Pull a Hub pack ``owner/name[@revision]`` into the local registry; a summary line."""
        from p2pz_directions import hub

        repo_id = (repo_id or "").strip()
        if not repo_id or "/" not in repo_id:
            raise AppInputError("give a Hub repo id like 'someone/their-pack' (optionally @revision)")
        with self.pool.lock:
            res = hub.pull(repo_id, store=self.store)
        return f"pulled {res!r}"


def _device_str(device: Any) -> str | None:
    return None if device is None else str(device)


def _md_escape(s: str) -> str:
    out = str(s)
    for ch in "\\`*_{}[]<>#|":
        out = out.replace(ch, "\\" + ch)
    return out
