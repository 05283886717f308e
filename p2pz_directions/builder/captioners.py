"""Caption sources for the direction builder: Flan-T5, templates, or a file.

A captioner is a small callable object: called with a concept, it yields batches of raw captions
(filtering happens elsewhere, in `p2pz_directions.builder.filtering`) until the caller stops asking.
Each one describes itself with ``name`` and ``settings()`` (stored in the concept's provenance so a
build can be repeated). New kinds register a factory with `register_captioner`, or come from a
plugin's ``p2pz_register_captioners`` hook (`p2pz_directions.editing.hookspecs`): an object with
``generate(concept, n, seed=0) -> list[str]`` is adapted automatically, and the built-in
captioners offer that ``generate`` too.

>>> from p2pz_directions.builder.captioners import get_captioner
>>> cap = get_captioner("templates")
>>> batch = next(cap("cat", n=4, seed=0))
>>> len(batch), all("cat" in c for c in batch)
(4, True)

Built in:

- ``flan-t5``: the paper's recipe, as in diffusers' docs ("Generate source and target
  embeddings"): a seq2seq model (default ``google/flan-t5-xl``) sampled with temperature 0.8 and
  top-k 10 from the prompt ``"Provide a caption for images containing a {concept}. The captions
  should be in English and should be no longer than 150 characters."`` -- for *both* concepts
  (the docs' snippet passes the bare target word for the target side; that is a bug we do not
  copy). Batches are generated until the caller has enough usable captions; every batch is seeded
  from ``seed`` and its index, so the same seed gives the same captions on the same device.
- ``templates``: no model; a deterministic, seeded mix of styles, views and scenes
  ("a photo of a cat sitting on the street", "a watercolor painting of a cat in a field", ...).
- ``file``: one caption per line (as the authors' ``make_edit_direction.py`` reads them).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from p2pz_directions.core.errors import P2PZError

__all__ = [
    "CAPTIONERS",
    "DEFAULT_FLAN_T5",
    "DEFAULT_PROMPT",
    "Captioner",
    "CaptionerError",
    "FileCaptioner",
    "FlanT5Captioner",
    "TemplateCaptioner",
    "available_captioners",
    "get_captioner",
    "read_caption_file",
    "register_captioner",
]

DEFAULT_FLAN_T5 = "google/flan-t5-xl"
#: the prompt of the paper's recipe (diffusers docs, "Generate source and target embeddings")
DEFAULT_PROMPT = (
    "Provide a caption for images containing a {concept}. "
    "The captions should be in English and should be no longer than 150 characters."
)


class CaptionerError(P2PZError, ValueError):
    """A captioner cannot be made or cannot produce captions (unknown name, bad file, no model)."""


@runtime_checkable
class Captioner(Protocol):
    """What the builder needs from a caption source.

    ``__call__(concept, n=..., seed=...)`` yields batches (lists) of raw caption strings; it may
    be endless (a sampling model) or finite (a file). ``n`` is how many usable captions the
    caller wants in the end: a hint for batch sizes, not a promise. An optional ``dropped``
    attribute (a `collections.Counter`) may count captions the source discarded itself, by
    reason, for the current call; the builder adds it to its filter report.
    """

    name: str

    def __call__(self, concept: str, *, n: int, seed: int = 0) -> Iterator[list[str]]: ...

    def settings(self) -> dict[str, Any]: ...


class _CaptionerBase:
    """Shared by the built-in captioners: the plugin hook's ``generate`` on top of ``__call__``."""

    def generate(self, concept: str, n: int, seed: int = 0) -> list[str]:
        """The first ``n`` raw captions for ``concept`` (the ``p2pz_register_captioners`` contract)."""
        out: list[str] = []
        for batch in self(concept, n=n, seed=seed):  # type: ignore[operator]
            out.extend(batch)
            if len(out) >= n:
                break
        return out[:n]


# --------------------------------------------------------------------------------------------------
# flan-t5
# --------------------------------------------------------------------------------------------------
def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: Any, device: str):
    from p2pz_directions.core.dtypes import torch_dtype

    return torch_dtype(dtype, device)


class FlanT5Captioner(_CaptionerBase):
    """Sample captions from a seq2seq language model (Flan-T5 by default).

    >>> cap = FlanT5Captioner("google/flan-t5-xl", device="cuda")      # doctest: +SKIP
    >>> first = next(cap("cat", n=1000, seed=0))                        # doctest: +SKIP
    >>> len(first)                                                      # doctest: +SKIP
    512

    The model loads on first use. Each batch is ``batch_size`` samples of one prompt (the encoder
    runs once, ``num_return_sequences`` expands it); batch ``i`` of a call is seeded with
    ``seed * 1_000_003 + i`` inside a forked RNG, so global random state is left alone and the
    output depends only on the inputs. Samples that reach ``max_new_tokens`` without an
    end-of-sequence token are cut-off captions: they are discarded and counted in
    ``dropped["truncated"]`` (``keep_truncated=True`` keeps them, e.g. to time generation with a
    fixed number of new tokens).
    """

    name = "flan-t5"

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_FLAN_T5,
        *,
        prompt: str = DEFAULT_PROMPT,
        temperature: float = 0.8,
        top_k: int | None = 10,
        top_p: float | None = None,
        max_new_tokens: int = 64,
        batch_size: int | None = None,
        device: str | None = None,
        dtype: Any = None,
        generate_kwargs: dict[str, Any] | None = None,
        keep_truncated: bool = False,
    ):
        if "{concept}" not in prompt:
            raise CaptionerError(f"the caption prompt must contain '{{concept}}'; got {prompt!r}")
        if temperature <= 0:
            raise CaptionerError(f"temperature must be > 0 for sampling, got {temperature}")
        if max_new_tokens < 1:
            raise CaptionerError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model_id = str(model)
        self.prompt = prompt
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = top_p
        self.max_new_tokens = int(max_new_tokens)
        self.device = str(device) if device is not None else _default_device()
        self.dtype = _resolve_dtype(dtype, self.device)
        if batch_size is None:
            batch_size = 512 if self.device.startswith("cuda") else 32
        if batch_size < 1:
            raise CaptionerError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.generate_kwargs = dict(generate_kwargs or {})
        self.keep_truncated = bool(keep_truncated)
        self.dropped: Counter[str] = Counter()
        self._model = None
        self._tokenizer = None
        self._last_texts: list[str] = []

    def settings(self) -> dict[str, Any]:
        return {
            "captioner": self.name,
            "model": self.model_id,
            "prompt": self.prompt,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "device_type": self.device.split(":")[0],
            "dtype": str(self.dtype).removeprefix("torch."),
            "generate_kwargs": _jsonable(self.generate_kwargs),
            "keep_truncated": self.keep_truncated,
        }

    def format_prompt(self, concept: str) -> str:
        """The prompt for ``concept`` (the same template on both sides of a direction)."""
        return self.prompt.replace("{concept}", concept)

    def load(self) -> None:
        """Load the tokenizer and model now (otherwise done on the first call)."""
        if self._model is not None:
            return
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.model_id)
            kwargs: dict[str, Any] = {"dtype": self.dtype}
            if self.device.startswith("cuda"):
                kwargs["device_map"] = self.device  # load straight onto the GPU
            model = AutoModelForSeq2SeqLM.from_pretrained(self.model_id, **kwargs)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CaptionerError(
                f"cannot load caption model {self.model_id!r} ({first}). Check the id or path; offline, "
                "download it first or pass a local folder, or use --captioner templates (no model) or "
                "--source-captions/--target-captions files"
            ) from None
        self._tokenizer = tok
        self._model = model.to(self.device).eval()

    def close(self) -> None:
        """Free the model (and its GPU memory)."""
        self._model = None
        self._tokenizer = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - freeing memory is best effort
            pass

    def sample(self, concept: str, num: int, seed: int) -> list[str | None]:
        """One batch of ``num`` samples for ``concept``; cut-off samples come back as None."""
        import torch

        self.load()
        tok, model = self._tokenizer, self._model
        ids = tok(self.format_prompt(concept), return_tensors="pt").input_ids.to(self.device)
        kwargs: dict[str, Any] = {
            "do_sample": True,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "num_return_sequences": num,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        kwargs.update(self.generate_kwargs)
        devices: list[int] = []
        if self.device.startswith("cuda"):
            idx = torch.device(self.device).index
            devices = [torch.cuda.current_device() if idx is None else idx]
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = model.generate(ids, **kwargs)
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if eos_ids:
            ended = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
            for e in eos_ids:
                ended |= (out[:, 1:] == e).any(dim=1)
            ended = ended.tolist()
        else:
            ended = [True] * out.shape[0]
        texts = tok.batch_decode(out, skip_special_tokens=True)
        self._last_texts = texts
        return [t if ok else None for t, ok in zip(texts, ended, strict=True)]

    def __call__(self, concept: str, *, n: int, seed: int = 0) -> Iterator[list[str]]:
        self.dropped = Counter()
        i = 0
        while True:
            batch = self.sample(concept, self.batch_size, seed * 1_000_003 + i)
            if self.keep_truncated:
                yield [t if t is not None else text for t, text in zip(batch, self._last_texts, strict=True)]
            else:
                cut = sum(1 for t in batch if t is None)
                if cut:
                    self.dropped["truncated"] += cut
                yield [t for t in batch if t is not None]
            i += 1


# --------------------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------------------
_STYLES = (
    "a photo of {x}",
    "a close-up photo of {x}",
    "a painting of {x}",
    "an oil painting of {x}",
    "a watercolor painting of {x}",
    "a pencil sketch of {x}",
    "a black and white photo of {x}",
    "a blurry photo of {x}",
    "a cartoon drawing of {x}",
    "a 3d render of {x}",
    "a photo taken from above of {x}",
    "a side view of {x}",
    "a picture of {x}",
    "an illustration of {x}",
    "a vintage photograph of {x}",
    "{x}",
)
_SUBJECTS = ("a {c}", "the {c}", "a small {c}", "a large {c}")
_SCENES = (
    "sitting on the street",
    "in a field",
    "in the park",
    "on the grass",
    "in a living room",
    "on the beach",
    "in the snow",
    "in a forest",
    "next to a house",
    "at night",
    "in the rain",
    "on a sunny day",
    "in a garden",
    "near a river",
    "in the city",
    "on a wooden table",
    "in front of a white wall",
    "under a tree",
    "on a mountain",
    "in a kitchen",
    "by the sea",
    "at sunset",
    "in the fog",
    "on a road",
    "in a studio",
    "next to a window",
    "in the desert",
    "on a boat",
    "in a barn",
    "on a bed",
    "in autumn leaves",
    "in a meadow with flowers",
    "on a bridge",
    "in a parking lot",
    "by a lake",
    "in a crowded market",
    "on a rooftop",
    "in a library",
    "in the mountains at dawn",
    "in a museum",
    "on a frozen lake",
    "near a fence",
    "in a small village",
    "in front of a red door",
    "on a sandy path",
    "in tall grass",
    "on a stone wall",
    "in a backyard",
    "next to a bicycle",
    "in the jungle",
    "on a busy sidewalk",
    "in a cozy cabin",
    "on a farm",
    "in a sunflower field",
    "near a waterfall",
    "on a snowy mountain road",
    "in a train station",
    "at the zoo",
    "on a porch",
    "in an empty street at dawn",
    "under a blue sky",
    "in a neon-lit alley",
    "on a carpet",
    "in a swimming pool",
    "next to a campfire",
    "in a greenhouse",
    "on a hill covered with wildflowers",
    "in a classroom",
    "on a wooden dock",
    "in the savanna",
    "in a cave",
    "on a balcony",
    "in a vineyard",
    "under the stars",
    "in a thunderstorm",
    "on a ship deck",
    "in a bamboo forest",
    "at a picnic",
    "in front of a castle",
    "on a palm beach",
    "in a toy store",
    "in a misty valley",
    "next to a vintage car",
    "on a pile of books",
    "in a tulip field",
    "near a lighthouse",
    "on a frosty morning",
    "in a cafe",
    "by a fireplace",
    "in a space station",
    "on a red sofa",
    "in shallow water",
    "on a country road",
    "in a flower pot",
    "in a subway car",
    "at a birthday party",
    "on a glacier",
    "in an old temple",
    "under an umbrella",
    "in a hayfield",
)


def _with_article(phrase: str) -> str:
    if phrase.startswith("a ") and phrase[2:3].lower() in "aeiou":
        return "an " + phrase[2:]
    return phrase


class TemplateCaptioner(_CaptionerBase):
    """Deterministic captions from style x subject x scene templates; no model, works offline.

    >>> caps = next(TemplateCaptioner()("horse", n=3, seed=1))
    >>> len(caps)
    3

    The candidate set (a few thousand per concept) is shuffled with ``random.Random(seed)`` and
    yielded in batches of ``n``; it is finite, so asking for more than it holds ends early.
    """

    name = "templates"

    def __init__(
        self,
        styles: Sequence[str] = _STYLES,
        subjects: Sequence[str] = _SUBJECTS,
        scenes: Sequence[str] = _SCENES,
    ):
        self.styles = tuple(styles)
        self.subjects = tuple(subjects)
        self.scenes = tuple(scenes)
        for s in self.styles:
            if "{x}" not in s:
                raise CaptionerError(f"template style {s!r} must contain '{{x}}'")
        for s in self.subjects:
            if "{c}" not in s:
                raise CaptionerError(f"template subject {s!r} must contain '{{c}}'")
        self.dropped: Counter[str] = Counter()

    def settings(self) -> dict[str, Any]:
        blob = "\n".join(["|".join(self.styles), "|".join(self.subjects), "|".join(self.scenes)])
        return {
            "captioner": self.name,
            "num_templates": len(self.styles) * len(self.subjects) * (len(self.scenes) + 1),
            "templates_sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest(),
        }

    def candidates(self, concept: str, seed: int = 0) -> list[str]:
        """Every template caption for ``concept``, in the seeded order."""
        out: list[str] = []
        seen: set[str] = set()
        for style in self.styles:
            for subject in self.subjects:
                x = _with_article(subject.replace("{c}", concept))
                base = style.replace("{x}", x)
                base = _with_article(base)
                for scene in ("", *self.scenes):
                    cap = f"{base} {scene}".strip()
                    if cap not in seen:
                        seen.add(cap)
                        out.append(cap)
        random.Random(seed).shuffle(out)
        return out

    def __call__(self, concept: str, *, n: int, seed: int = 0) -> Iterator[list[str]]:
        self.dropped = Counter()
        cands = self.candidates(concept, seed)
        step = max(1, int(n))
        for i in range(0, len(cands), step):
            yield cands[i : i + step]


# --------------------------------------------------------------------------------------------------
# file
# --------------------------------------------------------------------------------------------------
def read_caption_file(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped. Empty or non-UTF-8 files are refused.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "cats.txt"
    >>> _ = p.write_text("a cat\\n\\n a cat on a mat \\n", "utf-8")
    >>> read_caption_file(p)
    ['a cat', 'a cat on a mat']
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise CaptionerError(f"caption file {p} does not exist") from None
    except IsADirectoryError:
        raise CaptionerError(
            f"caption file {p} is a folder; give a text file with one caption per line"
        ) from None
    except OSError as e:
        raise CaptionerError(f"cannot read caption file {p}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CaptionerError(
            f"caption file {p} is not UTF-8 text (bad byte 0x{raw[e.start]:02x} on line {line}); "
            "save it as UTF-8 with one caption per line"
        ) from None
    if "\x00" in text:
        raise CaptionerError(f"caption file {p} holds NUL bytes: it looks binary, not one caption per line")
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise CaptionerError(f"caption file {p} is empty: write one caption per line")
    return lines


class FileCaptioner(_CaptionerBase):
    """Captions given up front: a text file (one per line) or a list of strings.

    >>> next(FileCaptioner(["a cat", "a cat on a mat"])("cat", n=10))
    ['a cat', 'a cat on a mat']
    """

    name = "file"

    def __init__(self, source: str | os.PathLike | Sequence[str]):
        if isinstance(source, (str, os.PathLike)):
            self.path: str | None = str(source)
            self.captions = read_caption_file(source)
        else:
            self.path = None
            caps = [str(c) for c in source]
            if not any(c.strip() for c in caps):
                raise CaptionerError("the caption list is empty: give at least one caption")
            self.captions = caps
        self.dropped: Counter[str] = Counter()

    def settings(self) -> dict[str, Any]:
        blob = "\n".join(self.captions).encode("utf-8")
        return {
            "captioner": self.name,
            "file": os.path.basename(self.path) if self.path else None,
            "lines": len(self.captions),
            "sha256": hashlib.sha256(blob).hexdigest(),
        }

    def __call__(self, concept: str, *, n: int, seed: int = 0) -> Iterator[list[str]]:
        self.dropped = Counter()
        step = max(int(n), 256)  # in chunks, so a long file stops once n captions are usable
        for i in range(0, len(self.captions), step):
            yield self.captions[i : i + step]


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------
#: captioner name -> factory(**options) returning a `Captioner`
CAPTIONERS: dict[str, Callable[..., Captioner]] = {
    "flan-t5": FlanT5Captioner,
    "templates": TemplateCaptioner,
    "file": FileCaptioner,
}


def register_captioner(name: str, factory: Callable[..., Captioner], *, replace: bool = False) -> None:
    """Make ``factory`` available as ``get_captioner(name)`` (and ``--captioner NAME``)."""
    key = name.strip().lower()
    if not key:
        raise CaptionerError("a captioner needs a non-empty name")
    if key in CAPTIONERS and not replace:
        raise CaptionerError(f"captioner {key!r} is already registered; pass replace=True to override it")
    CAPTIONERS[key] = factory


def _plugin_captioners() -> dict[str, Callable[..., Any]]:
    """Caption generators registered by plugins (``p2pz_register_captioners``); never raises."""
    try:
        from p2pz_directions.editing import plugins

        return {str(k).strip().lower(): v for k, v in plugins.captioners().items()}
    except Exception:  # noqa: BLE001 - a broken plugin must not break the built-in captioners
        return {}


class _HookCaptioner:
    """Adapts a plugin's ``generate(concept, n, seed) -> list[str]`` object to `Captioner`."""

    def __init__(self, name: str, obj: Any):
        self.name = name
        self.obj = obj
        self.dropped: Counter[str] = Counter()

    def settings(self) -> dict[str, Any]:
        own = self.obj.settings() if callable(getattr(self.obj, "settings", None)) else {}
        return {"captioner": self.name, "plugin": type(self.obj).__module__, **_jsonable(dict(own))}

    def __call__(self, concept: str, *, n: int, seed: int = 0) -> Iterator[list[str]]:
        self.dropped = Counter()
        yield [str(c) for c in self.obj.generate(concept, n, seed=seed)]

    def close(self) -> None:
        close = getattr(self.obj, "close", None)
        if callable(close):
            close()


def available_captioners() -> list[str]:
    """Names accepted by `get_captioner` (built-in, registered, and from plugins)."""
    return sorted(set(CAPTIONERS) | set(_plugin_captioners()))


def get_captioner(name: str, **options: Any) -> Captioner:
    """Make the captioner ``name`` with ``options``; unknown names raise `CaptionerError`.

    >>> get_captioner("templates").name
    'templates'
    """
    key = str(name).strip().lower()
    factory = CAPTIONERS.get(key)
    if factory is None:
        factory = _plugin_captioners().get(key)
    if factory is None:
        import difflib

        close = difflib.get_close_matches(key, available_captioners(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise CaptionerError(
            f"unknown captioner {name!r}; available: {', '.join(available_captioners())}.{hint}"
        )
    try:
        obj = factory(**options)
    except TypeError as e:
        raise CaptionerError(f"captioner {key!r} does not take these options: {e}") from None
    if not (callable(obj) and callable(getattr(obj, "settings", None))) and callable(
        getattr(obj, "generate", None)
    ):
        obj = _HookCaptioner(key, obj)
    return obj


def _jsonable(obj: Any) -> Any:
    """A JSON-safe copy of generation options (tuples to lists, dict keys to strings)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)
