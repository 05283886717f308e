"""Concepts and directions: the two objects users hold.

A `Concept` is the mean sequence embedding ``[77, D]`` of many captions about one thing, for one
text encoder. A `Direction` is made of concepts of the same encoder: ``delta = target - source``,
shaped ``[1, 77, D]`` like the ``construct_direction`` of diffusers' pix2pix-zero pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from p2pz_directions.core.errors import EncoderMismatchError, FormatError

if TYPE_CHECKING:  # torch is imported where a tensor is checked, so listings start without it
    import torch


@dataclass(frozen=True)
class EncoderInfo:
    """Which text encoder made an embedding. ``id`` is the key that must match."""

    id: str
    hidden_size: int
    family: str = "unknown"
    revision: str | None = None
    max_length: int = 77

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "revision": self.revision,
            "hidden_size": self.hidden_size,
            "family": self.family,
            "max_length": self.max_length,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderInfo:
        return cls(
            id=str(d["id"]),
            hidden_size=int(d["hidden_size"]),
            family=str(d.get("family", "unknown")),
            revision=d.get("revision"),
            max_length=int(d.get("max_length", 77)),
        )

    def check_compatible(self, other: EncoderInfo, what: str = "these embeddings") -> None:
        """Raise `EncoderMismatchError` unless ``other`` is the same encoder."""
        if (
            self.id != other.id
            or self.hidden_size != other.hidden_size
            or self.max_length != other.max_length
        ):
            raise EncoderMismatchError(
                f"{what} come from different text encoders: {self.id} (D={self.hidden_size}) and "
                f"{other.id} (D={other.hidden_size}). Use concepts built for one encoder, or rebuild one "
                f"side with `p2pz reencode NAME --model ...`."
            )


@dataclass
class Concept:
    """The mean sequence embedding of a concept's captions, for one text encoder.

    ``embedding`` is ``[max_length, D]`` in its stored dtype (float16 or float32).
    """

    name: str
    embedding: torch.Tensor
    encoder: EncoderInfo
    captions: list[str] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    version: int | None = None
    created: str | None = None
    pack: str | None = None
    content_hash: str | None = None

    def __post_init__(self) -> None:
        import torch

        emb = self.embedding
        if not isinstance(emb, torch.Tensor):
            raise FormatError(
                f"concept {self.name!r}: embedding must be a torch.Tensor, not {type(emb).__name__}"
            )
        if emb.dim() == 3 and emb.shape[0] == 1:
            emb = emb[0]
        expected = (self.encoder.max_length, self.encoder.hidden_size)
        if tuple(emb.shape) != expected:
            raise FormatError(
                f"concept {self.name!r}: embedding has shape {list(emb.shape)}, expected {list(expected)} "
                f"for encoder {self.encoder.id}"
            )
        if emb.dtype not in (torch.float16, torch.float32, torch.bfloat16):
            raise FormatError(f"concept {self.name!r}: dtype {emb.dtype} is not float16/bfloat16/float32")
        if not torch.isfinite(emb).all():
            raise FormatError(f"concept {self.name!r}: embedding holds NaN or infinite values")
        self.embedding = emb.detach().cpu().contiguous()

    @property
    def dtype(self) -> str:
        return str(self.embedding.dtype).removeprefix("torch.")

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @property
    def ref(self) -> str:
        """``pack:name@version`` (the parts that are known)."""
        out = self.name if self.version is None else f"{self.name}@{self.version}"
        return f"{self.pack}:{out}" if self.pack else out

    def as_embeds(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[1, 77, D]`` (float32 unless ``dtype``), as diffusers' pipelines take ``source_embeds``."""
        import torch

        return self.embedding.to(dtype or torch.float32).unsqueeze(0)

    def __repr__(self) -> str:
        return (
            f"Concept({self.ref!r}, encoder={self.encoder.id!r}, shape={list(self.embedding.shape)}, "
            f"dtype={self.dtype}, captions={len(self.captions) if self.captions else 0})"
        )

    def with_(self, **changes: Any) -> Concept:
        return replace(self, **changes)


@dataclass(frozen=True)
class _Term:
    weight: float
    source: Concept
    target: Concept


class Direction:
    """An edit direction: a weighted sum of (target - source) concept differences, one encoder.

    >>> d = directions.load("cat->dog")          # doctest: +SKIP
    >>> d.delta.shape                              # doctest: +SKIP
    torch.Size([1, 77, 768])
    >>> (d.reversed() + d).delta.abs().max()       # doctest: +SKIP
    tensor(0.)
    """

    def __init__(self, source: Concept, target: Concept, *, weight: float = 1.0, name: str | None = None):
        source.encoder.check_compatible(target.encoder, f"concepts {source.name!r} and {target.name!r}")
        self._terms: tuple[_Term, ...] = (_Term(float(weight), source, target),)
        self._name = name

    @classmethod
    def _from_terms(cls, terms: tuple[_Term, ...], name: str) -> Direction:
        obj = cls.__new__(cls)
        obj._terms = terms
        obj._name = name
        return obj

    # -- identity -------------------------------------------------------------------------------
    @property
    def source(self) -> Concept:
        """The source concept of the first term (the one the edited prompt starts from)."""
        return self._terms[0].source

    @property
    def target(self) -> Concept:
        return self._terms[0].target

    @property
    def encoder(self) -> EncoderInfo:
        return self._terms[0].source.encoder

    @property
    def terms(self) -> tuple[tuple[float, Concept, Concept], ...]:
        """``((weight, source, target), ...)``: the direction is ``sum_i weight_i * (target_i - source_i)``."""
        return tuple((t.weight, t.source, t.target) for t in self._terms)

    @property
    def is_simple(self) -> bool:
        """One term with weight 1: ``source_embeds`` / ``target_embeds`` are the stored concepts."""
        return len(self._terms) == 1 and self._terms[0].weight == 1.0

    @property
    def name(self) -> str:
        if self._name:
            return self._name
        return " + ".join(_term_name(t) for t in self._terms)

    def __repr__(self) -> str:
        return f"Direction({self.name!r}, encoder={self.encoder.id!r}, D={self.encoder.hidden_size})"

    # -- tensors --------------------------------------------------------------------------------
    @property
    def delta(self) -> torch.Tensor:
        """``[1, 77, D]`` float32: ``sum_i w_i * (target_i - source_i)``."""
        out = None
        for t in self._terms:
            d = t.target.embedding.float() - t.source.embedding.float()
            if t.weight != 1.0:
                d = d * t.weight
            out = d if out is None else out + d
        return out.unsqueeze(0)

    @property
    def source_embeds(self) -> torch.Tensor:
        """``[1, 77, D]`` float32, as `StableDiffusionPix2PixZeroPipeline(source_embeds=...)` takes it."""
        return self.source.as_embeds()

    @property
    def target_embeds(self) -> torch.Tensor:
        """``[1, 77, D]`` float32 with ``target_embeds.mean(0) - source_embeds.mean(0) == delta``.

        For a plain ``a->b`` it is concept ``b`` itself (so the difference is exact); for scaled
        or summed directions it is ``source_embeds + delta``.
        """
        if self.is_simple:
            return self.target.as_embeds()
        return self.source_embeds + self.delta

    # -- algebra --------------------------------------------------------------------------------
    def reversed(self) -> Direction:
        terms = tuple(_Term(t.weight, t.target, t.source) for t in self._terms)
        return Direction._from_terms(terms, " + ".join(_term_name(t) for t in terms))

    def __neg__(self) -> Direction:
        return self * -1.0

    def __mul__(self, k: float) -> Direction:
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            return NotImplemented
        terms = tuple(_Term(t.weight * float(k), t.source, t.target) for t in self._terms)
        return Direction._from_terms(terms, " + ".join(_term_name(t) for t in terms))

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> Direction:
        return self * (1.0 / k)

    def __add__(self, other: Direction) -> Direction:
        if not isinstance(other, Direction):
            return NotImplemented
        self.encoder.check_compatible(other.encoder, f"directions {self.name!r} and {other.name!r}")
        terms = self._terms + other._terms
        return Direction._from_terms(terms, " + ".join(_term_name(t) for t in terms))

    def __sub__(self, other: Direction) -> Direction:
        if not isinstance(other, Direction):
            return NotImplemented
        return self + (-other)

    # -- hand-offs to diffusers' pipelines ---------------------------------------------------------
    def diffusers_kwargs(self, pipe_or_class: Any, method: str = "__call__") -> dict[str, Any]:
        """Keyword arguments that make a diffusers pipeline apply this direction.

        ``pipe_or_class`` is a pipeline (tensors are moved to its device and dtype, and its text
        encoder is checked against the direction's) or a pipeline class (float32 on the CPU).
        ``method`` names the pipeline method the arguments are for (DiffEdit has three).

        >>> d = directions.load("cat->dog", model=pipe)                     # doctest: +SKIP
        >>> pipe(prompt, **d.diffusers_kwargs(pipe))                         # doctest: +SKIP

        ==================================== =============== ==================================================
        pipeline                             method          arguments
        ==================================== =============== ==================================================
        StableDiffusionPix2PixZeroPipeline   ``__call__``    ``source_embeds``, ``target_embeds``
        LEditsPPPipelineStableDiffusion      ``__call__``    ``editing_prompt_embeds`` ``[target, source]`` per
                                                             term, ``reverse_editing_direction`` ``[False,
                                                             True]`` (flipped for negative weights),
                                                             ``edit_guidance_scale`` ``5 * |w|`` each, and
                                                             ``use_intersect_mask=False`` (diffusers' masks
                                                             fail on embeddings; the ``ledits`` editor has them)
        StableDiffusionImg2ImgPipeline       ``__call__``    ``prompt_embeds`` = target, ``negative_prompt_embeds``
                                                             = source (the ``sdedit`` editor's ``mode="target",
                                                             source_as_negative=True``)
        StableDiffusionDiffEditPipeline      ``generate_mask`` ``source_prompt_embeds``, ``target_prompt_embeds``
                                             ``invert``      ``prompt_embeds`` = source
                                             ``__call__``    ``prompt_embeds`` = target, ``negative_prompt_embeds``
                                                             = source
        ==================================== =============== ==================================================
        """
        cls = pipe_or_class if isinstance(pipe_or_class, type) else type(pipe_or_class)
        kind = next((k for k in _HANDOFFS if k in {c.__name__ for c in cls.__mro__}), None)
        if kind is None:
            raise FormatError(
                f"Direction.diffusers_kwargs does not know {cls.__name__}; it supports {', '.join(_HANDOFFS)}. "
                f"For another pipeline pass d.source_embeds / d.target_embeds (or d.delta) yourself"
            )
        import torch

        methods = _HANDOFFS[kind]
        if method not in methods:
            raise FormatError(f"{kind} takes the direction in {', '.join(methods)}, not {method!r}")
        device, dtype = torch.device("cpu"), torch.float32
        if not isinstance(pipe_or_class, type):
            device = getattr(pipe_or_class, "device", device)
            dtype = getattr(pipe_or_class, "dtype", dtype)
            self._check_pipe(pipe_or_class)

        def put(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=device, dtype=dtype)

        src, tgt = put(self.source_embeds), put(self.target_embeds)
        if kind == "StableDiffusionPix2PixZeroPipeline":
            return {"source_embeds": src, "target_embeds": tgt}
        if kind == "LEditsPPPipelineStableDiffusion":
            rows, reverse, scale = [], [], []
            for w, s, t in self.terms:
                rows += [t.embedding, s.embedding]
                reverse += [w < 0, w >= 0]
                scale += [5.0 * abs(w)] * 2
            embeds = put(torch.stack([r.float() for r in rows]))
            return {
                "editing_prompt_embeds": embeds,
                "reverse_editing_direction": reverse,
                "edit_guidance_scale": scale,
                "use_intersect_mask": False,
            }
        if kind == "StableDiffusionDiffEditPipeline" and method == "generate_mask":
            return {"source_prompt_embeds": src, "target_prompt_embeds": tgt}
        if kind == "StableDiffusionDiffEditPipeline" and method == "invert":
            return {"prompt_embeds": src}
        return {"prompt_embeds": tgt, "negative_prompt_embeds": src}

    def _check_pipe(self, pipe: Any) -> None:
        """Refuse a pipeline whose text encoder is not this direction's (EncoderMismatchError)."""
        from p2pz_directions.editing.editors import _encoder_of_pipe  # noqa: PLC0415 - editors imports this module

        enc = _encoder_of_pipe(pipe)
        if enc.id.startswith("unknown/"):
            if enc.hidden_size and enc.hidden_size != self.encoder.hidden_size:
                raise EncoderMismatchError(
                    f"direction {self.name!r} has D={self.encoder.hidden_size} embeddings but the pipeline's text "
                    f"encoder has D={enc.hidden_size}. Load it with directions.load(name, model=pipe)"
                )
            return
        self.check_model(enc, f"the pipeline {getattr(pipe, 'name_or_path', '') or type(pipe).__name__}")

    def check_model(self, encoder: EncoderInfo, model: str = "the model") -> None:
        """Refuse (EncoderMismatchError) before any model work if ``encoder`` is not ours."""
        if self.encoder.id != encoder.id or self.encoder.hidden_size != encoder.hidden_size:
            raise EncoderMismatchError(
                f"direction {self.name!r} was built for text encoder {self.encoder.id} "
                f"(D={self.encoder.hidden_size}), but {model} uses {encoder.id} (D={encoder.hidden_size}). "
                f"Load it for this model with directions.load(name, model=...), or build it for this encoder "
                f"with `p2pz reencode`."
            )


def _term_name(t: _Term) -> str:
    src, tgt = t.source, t.target
    if src.pack and src.pack == tgt.pack:
        base = f"{src.pack}:{src.with_(pack=None).ref}->{tgt.with_(pack=None).ref}"
    else:
        base = f"{src.ref}->{tgt.ref}"
    if t.weight == 1.0:
        return base
    return f"{t.weight:g}*({base})"


#: the pipelines `Direction.diffusers_kwargs` hands a direction to, and the methods that take it
_HANDOFFS: dict[str, tuple[str, ...]] = {
    "StableDiffusionPix2PixZeroPipeline": ("__call__",),
    "LEditsPPPipelineStableDiffusion": ("__call__",),
    "StableDiffusionImg2ImgPipeline": ("__call__",),
    "StableDiffusionDiffEditPipeline": ("__call__", "generate_mask", "invert"),
}
