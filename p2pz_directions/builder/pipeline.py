"""Build concepts and directions: captions -> filter -> text encoder -> mean -> registry.

The paper's "discover edit directions" step as one reproducible call:

>>> from p2pz_directions import build
>>> d = build("cat", "dog", model="CompVis/stable-diffusion-v1-4", n=1000, seed=0)   # doctest: +SKIP
>>> d.delta.shape                                                                    # doctest: +SKIP
torch.Size([1, 77, 768])

Both concepts are published together (all or nothing) in the local registry; the captions and
every setting are stored with them, so `reencode` can embed the same captions for another model
without a caption model. The same inputs and seed give the same captions and the same content
hash on the same device and dtype.

Stages (each reports through the optional ``progress(stage, concept, done, total)`` callback):
``generate`` (raw captions made; total unknown for a sampling model), ``filter`` (usable captions
kept, out of ``n``) and ``encode`` (captions embedded).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pz_directions import __version__
from p2pz_directions.builder.captioners import (
    DEFAULT_FLAN_T5,
    Captioner,
    CaptionerError,
    FileCaptioner,
    get_captioner,
)
from p2pz_directions.builder.filtering import CaptionFilter, FilterReport, NotEnoughCaptionsError
from p2pz_directions.core import naming
from p2pz_directions.core.concept import Concept, Direction, EncoderInfo
from p2pz_directions.core.errors import AmbiguousNameError, FormatError, NotFoundError, P2PZError

__all__ = [
    "DEFAULT_MODEL",
    "BuildError",
    "BuildResult",
    "CaptionSet",
    "build",
    "build_concept",
    "collect_captions",
    "reencode",
    "run_build",
]

#: the model of the paper's released embeddings, used when neither model= nor encoder= is given
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"

#: progress callback: (stage, concept, done, total or None)
Progress = Callable[[str, str, int, "int | None"], None]

CaptionSource = str | os.PathLike | Sequence[str]


class BuildError(P2PZError, ValueError):
    """The build inputs are unusable (same concepts, missing caption files, bad counts)."""


@dataclass
class CaptionSet:
    """The captions chosen for one concept, and how they were chosen."""

    name: str
    captions: list[str]
    report: FilterReport
    captioner: dict[str, Any]
    filter: dict[str, Any]
    seed: int
    n: int
    seconds: float = 0.0
    concept: Concept | None = None  # set once encoded (and published)

    def provenance(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """What goes into the stored concept's provenance (no paths, no times: reproducible)."""
        rep = self.report.to_dict()
        rep.pop("examples", None)
        prov: dict[str, Any] = {
            "method": "build",
            "builder": {"tool": "p2pz build", "version": __version__, "n": self.n, "seed": self.seed},
            "captioner": dict(self.captioner),
            "filter": {**self.filter, "report": rep},
        }
        if extra:
            prov.update(extra)
        return prov


@dataclass
class BuildResult:
    """Everything a build produced: both caption sets, the direction, where it went, timings."""

    source: CaptionSet
    target: CaptionSet
    direction: Direction | None
    encoder: EncoderInfo | None
    pack: str
    store_root: Path | None
    dry_run: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def delta_norm(self) -> float | None:
        if self.direction is None:
            return None
        return float(self.direction.delta.norm())

    def to_dict(self, captions: bool = False) -> dict[str, Any]:
        """A JSON-ready summary (``captions=True`` adds the captions themselves)."""

        def side(cs: CaptionSet) -> dict[str, Any]:
            d: dict[str, Any] = {
                "name": cs.name,
                "kept": len(cs.captions),
                "report": cs.report.to_dict(),
                "captioner": cs.captioner,
                "seconds": round(cs.seconds, 3),
            }
            if cs.concept is not None:
                d.update(
                    ref=cs.concept.ref,
                    version=cs.concept.version,
                    content_hash=cs.concept.content_hash,
                )
            if captions:
                d["captions"] = list(cs.captions)
            return d

        out: dict[str, Any] = {
            "direction": f"{self.source.name}->{self.target.name}",
            "dry_run": self.dry_run,
            "pack": self.pack,
            "encoder": self.encoder.to_dict() if self.encoder else None,
            "source": side(self.source),
            "target": side(self.target),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }
        if self.direction is not None:
            out["delta_norm"] = round(self.delta_norm or 0.0, 4)
            out["store"] = str(self.store_root)
        return out


# --------------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------------
def _make_captioner(
    captioner: str | Captioner,
    *,
    captioner_model: str | os.PathLike | None,
    device: str | None,
    dtype: Any,
    options: dict[str, Any] | None,
) -> Captioner | None:
    """A captioner instance from a name (``file`` gives None: the caller needs files per side)."""
    if not isinstance(captioner, str):
        if not callable(captioner) or not hasattr(captioner, "settings"):
            raise CaptionerError(f"{captioner!r} is not a captioner (needs __call__ and settings())")
        return captioner
    name = captioner.strip().lower()
    opts = dict(options or {})
    if name == "file":
        return None
    if name == "flan-t5":
        opts.setdefault("model", str(captioner_model or DEFAULT_FLAN_T5))
        opts.setdefault("device", device)
        opts.setdefault("dtype", dtype)
    return get_captioner(name, **opts)


def collect_captions(
    concept: str,
    captioner: Captioner,
    *,
    n: int = 1000,
    seed: int = 0,
    tokenizer: Any = None,
    filter_options: dict[str, Any] | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    max_raw: int | None = None,
    patience: int = 5,
) -> CaptionSet:
    """Ask ``captioner`` for batches and filter them until ``n`` captions are usable.

    Stops early when the captioner runs dry, after ``patience`` batches in a row that add no
    usable caption, or after ``max_raw`` raw captions (default ``max(20 n, 2000)``). Keeps the
    first ``n`` usable captions in generation order.
    """
    name = naming.normalize_concept(concept)
    fopts = dict(filter_options or {})
    fopts.setdefault("device", device)
    flt = CaptionFilter(name, tokenizer=tokenizer, **fopts)
    max_raw = max_raw if max_raw is not None else max(20 * n, 2000)
    t0 = time.perf_counter()
    raw = 0
    stall = 0
    gen = captioner(name, n=n, seed=seed)
    try:
        for batch in gen:
            raw += len(batch)
            if progress:
                progress("generate", name, raw, None)
            added = flt.add(batch)
            if progress:
                progress("filter", name, min(len(flt.kept), n), n)
            stall = 0 if added else stall + 1
            if len(flt.kept) >= n or raw >= max_raw or stall >= patience:
                break
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()
    dropped = getattr(captioner, "dropped", None) or {}
    for reason, count in dict(dropped).items():
        if count:
            flt.report.drop(reason, "", int(count))
            flt.report.seen += int(count)
    flt.truncate(n)
    return CaptionSet(
        name=name,
        captions=list(flt.kept),
        report=flt.report,
        captioner=captioner.settings(),
        filter=flt.settings(),
        seed=seed,
        n=n,
        seconds=time.perf_counter() - t0,
    )


def _check_enough(sets: Sequence[CaptionSet], min_captions: int) -> None:
    short = [cs for cs in sets if len(cs.captions) < min_captions]
    if short:
        detail = "; ".join(f"{cs.name!r}: {cs.report.summary()}" for cs in short)
        raise NotEnoughCaptionsError(
            f"too few usable captions (need at least {min_captions}): {detail}. Nothing was published. "
            "Ask for more (--n), use another captioner or caption file, or relax the filters "
            "(--min-captions, --no-mention-check, --near-duplicates)"
        )


# --------------------------------------------------------------------------------------------------
# encoder
# --------------------------------------------------------------------------------------------------
def _load_encoder(model, encoder, device, dtype):
    from p2pz_directions.builder.encoders import TextEncoder

    return TextEncoder.from_pretrained(model, encoder=encoder, device=device, dtype=dtype)


def _encode(te, cs: CaptionSet, batch_size: int, progress: Progress | None, extra: dict[str, Any]) -> Concept:
    cb = (lambda done, total: progress("encode", cs.name, done, total)) if progress else None
    emb = te.encode(cs.captions, batch_size=batch_size, progress=cb)
    prov = cs.provenance({"encoding": {**te.settings(), "batch_size": batch_size}, **extra})
    return Concept(name=cs.name, embedding=emb, encoder=te.info, captions=list(cs.captions), provenance=prov)


def _model_label(model, encoder) -> dict[str, Any]:
    from p2pz_directions.builder.encoders import _describe_source

    return {
        "model": _describe_source(str(model)) if model is not None else None,
        "encoder_source": _describe_source(str(encoder)) if encoder is not None else None,
    }


# --------------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------------
def _side_captioner(
    name: str, captions: CaptionSource | None, shared: Captioner | None, captioner_name: str
) -> Captioner:
    if captions is not None:
        return FileCaptioner(captions)
    if shared is None:
        raise BuildError(
            f"--captioner {captioner_name} needs caption files for both sides: no captions were given for {name!r} "
            "(--source-captions / --target-captions)"
        )
    return shared


def run_build(
    source: str,
    target: str,
    *,
    model: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    n: int = 1000,
    captioner: str | Captioner = "flan-t5",
    captioner_model: str | os.PathLike | None = DEFAULT_FLAN_T5,
    source_captions: CaptionSource | None = None,
    target_captions: CaptionSource | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: Any = None,
    pack: str = "local",
    batch_size: int = 1024,
    min_captions: int = 16,
    dry_run: bool = False,
    progress: Progress | None = None,
    store: Any = None,
    captioner_options: dict[str, Any] | None = None,
    filter_options: dict[str, Any] | None = None,
    text_encoder: Any = None,
) -> BuildResult:
    """`build`, returning the full `BuildResult` (reports, timings, where it was stored)."""
    from p2pz_directions.builder.encoders import load_tokenizer, resolve_device_dtype

    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    src_name = naming.normalize_concept(source)
    tgt_name = naming.normalize_concept(target)
    if src_name == tgt_name:
        raise BuildError(
            f"source and target are the same concept ({src_name!r}): a direction needs two different concepts"
        )
    if n < 1:
        raise BuildError(f"n must be at least 1, got {n}")
    if min_captions < 1:
        raise BuildError(f"min_captions must be at least 1, got {min_captions}")
    if n < min_captions:
        raise BuildError(
            f"n ({n}) is below min_captions ({min_captions}): ask for more captions or lower the minimum"
        )
    if batch_size < 1:
        raise BuildError(f"batch_size must be at least 1, got {batch_size}")
    pack_name = naming.parse_pack(pack).name
    dev, dt = resolve_device_dtype(device, dtype)
    cap_name = (
        captioner if isinstance(captioner, str) else getattr(captioner, "name", type(captioner).__name__)
    )
    shared = _make_captioner(
        captioner, captioner_model=captioner_model, device=dev, dtype=dt, options=captioner_options
    )
    side_caps = [
        _side_captioner(src_name, source_captions, shared, str(cap_name)),
        _side_captioner(tgt_name, target_captions, shared, str(cap_name)),
    ]

    # the text encoder first: a model without one fails before any caption is generated
    te = text_encoder
    tokenizer = te.tokenizer if te is not None else None
    if te is None and not dry_run:
        if model is None and encoder is None:
            model = DEFAULT_MODEL
        t0 = time.perf_counter()
        te = _load_encoder(model, encoder, dev, dt)
        tokenizer = te.tokenizer
        timings["load_encoder"] = time.perf_counter() - t0
    elif te is None and (model is not None or encoder is not None):
        tokenizer = load_tokenizer(model, encoder)

    sets: list[CaptionSet] = []
    t0 = time.perf_counter()
    try:
        for name, cap in zip((src_name, tgt_name), side_caps, strict=True):
            sets.append(
                collect_captions(
                    name,
                    cap,
                    n=n,
                    seed=seed,
                    tokenizer=tokenizer,
                    filter_options=filter_options,
                    device=dev,
                    progress=progress,
                )
            )
    finally:
        for cap in {id(c): c for c in side_caps}.values():
            close = getattr(cap, "close", None)
            if close is not None:
                close()
    timings["captions"] = time.perf_counter() - t0
    _check_enough(sets, min_captions)
    src_set, tgt_set = sets

    if dry_run:
        timings["total"] = time.perf_counter() - t_all
        return BuildResult(src_set, tgt_set, None, None, pack_name, None, dry_run=True, timings=timings)

    from p2pz_directions.core.store import default_store

    store = store or default_store()
    t0 = time.perf_counter()
    extra = _model_label(model if model is not None or encoder is not None else te.source, encoder)
    concepts = [_encode(te, cs, batch_size, progress, extra) for cs in sets]
    timings["encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stored = store.publish_many(concepts, pack=pack_name)
    timings["publish"] = time.perf_counter() - t0
    src_set.concept, tgt_set.concept = stored
    direction = Direction(stored[0], stored[1])
    timings["total"] = time.perf_counter() - t_all
    return BuildResult(
        src_set, tgt_set, direction, te.info, pack_name, store.pack_dir(pack_name), timings=timings
    )


def build(
    source: str,
    target: str,
    *,
    model: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    n: int = 1000,
    captioner: str | Captioner = "flan-t5",
    captioner_model: str | os.PathLike | None = DEFAULT_FLAN_T5,
    source_captions: CaptionSource | None = None,
    target_captions: CaptionSource | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: Any = None,
    pack: str = "local",
    batch_size: int = 1024,
    min_captions: int = 16,
    dry_run: bool = False,
    progress: Progress | None = None,
    store: Any = None,
    captioner_options: dict[str, Any] | None = None,
    filter_options: dict[str, Any] | None = None,
    text_encoder: Any = None,
) -> Direction | BuildResult:
    """Build the concepts ``source`` and ``target``, publish both, return the `Direction`.

    Args:
        source, target: concept names (``"cat"``, ``"dog"``); used in the caption prompt and as
            the stored names (normalised: lower case, single spaces).
        model: diffusers model id or folder whose ``text_encoder``/``tokenizer`` embed the
            captions (default ``CompVis/stable-diffusion-v1-4``); or ``encoder``: a CLIP id/folder.
        n: usable captions per concept (file captions are capped at ``n`` too).
        captioner: ``"flan-t5"`` (default), ``"templates"``, ``"file"`` or a captioner object.
        captioner_model: the seq2seq model of ``flan-t5`` (default ``google/flan-t5-xl``).
        source_captions, target_captions: a caption file (one per line) or a list of strings
            for that side; it then ignores ``captioner``.
        seed: seeds the captioner (the same seed for both concepts, so a concept's captions do
            not depend on what it is paired with).
        device, dtype: where to run (CUDA and float16 when available, else CPU float32).
        pack: the local pack to publish into.
        batch_size: captions per text-encoder forward pass.
        min_captions: fewer usable captions than this on either side is an error.
        dry_run: make and filter captions only; return the `BuildResult` (nothing encoded or stored).
        progress: ``progress(stage, concept, done, total)`` callback.
        captioner_options: extra options of the captioner (``temperature``, ``top_k``, ``prompt``,
            ``max_new_tokens``, ``batch_size``, ``generate_kwargs`` for flan-t5).
        filter_options: options of `p2pz_directions.builder.filtering.CaptionFilter` (``max_chars``,
            ``require_mention``, ``near_duplicate_threshold``).
        text_encoder: an already loaded `p2pz_directions.builder.encoders.TextEncoder` to use instead
            of loading the one of ``model``.

    Returns:
        The `Direction` ``source->target`` made of the two published concepts; its
        ``build_result`` attribute holds the `BuildResult`. With ``dry_run=True``, the
        `BuildResult` itself.

    >>> d = build("cat", "dog", model="CompVis/stable-diffusion-v1-4", captioner="templates")  # doctest: +SKIP
    >>> d.build_result.source.report.summary()                                                # doctest: +SKIP
    'kept 1000 of 1412; dropped 412 near_duplicate'
    """
    result = run_build(
        source,
        target,
        model=model,
        encoder=encoder,
        n=n,
        captioner=captioner,
        captioner_model=captioner_model,
        source_captions=source_captions,
        target_captions=target_captions,
        seed=seed,
        device=device,
        dtype=dtype,
        pack=pack,
        batch_size=batch_size,
        min_captions=min_captions,
        dry_run=dry_run,
        progress=progress,
        store=store,
        captioner_options=captioner_options,
        filter_options=filter_options,
        text_encoder=text_encoder,
    )
    if result.direction is None:
        return result
    result.direction.build_result = result  # type: ignore[attr-defined]
    return result.direction


def build_concept(
    concept: str,
    *,
    model: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    n: int = 1000,
    captioner: str | Captioner = "flan-t5",
    captioner_model: str | os.PathLike | None = DEFAULT_FLAN_T5,
    captions: CaptionSource | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: Any = None,
    pack: str = "local",
    batch_size: int = 1024,
    min_captions: int = 16,
    progress: Progress | None = None,
    store: Any = None,
    captioner_options: dict[str, Any] | None = None,
    filter_options: dict[str, Any] | None = None,
    text_encoder: Any = None,
    extra_provenance: dict[str, Any] | None = None,
) -> Concept:
    """Build and publish one concept (as one side of `build`); returns the stored `Concept`.

    ``text_encoder`` may be a loaded `p2pz_directions.builder.encoders.TextEncoder` to reuse across calls.

    >>> c = build_concept("zebra", model="CompVis/stable-diffusion-v1-4", pack="mine")   # doctest: +SKIP
    """
    from p2pz_directions.builder.encoders import resolve_device_dtype

    name = naming.normalize_concept(concept)
    if n < min_captions:
        raise BuildError(f"n ({n}) is below min_captions ({min_captions})")
    pack_name = naming.parse_pack(pack).name
    dev, dt = resolve_device_dtype(device, dtype)
    if text_encoder is None:
        if model is None and encoder is None:
            model = DEFAULT_MODEL
        text_encoder = _load_encoder(model, encoder, dev, dt)
    shared = _make_captioner(
        captioner, captioner_model=captioner_model, device=dev, dtype=dt, options=captioner_options
    )
    cap = _side_captioner(name, captions, shared, str(captioner))
    cs = collect_captions(
        name,
        cap,
        n=n,
        seed=seed,
        tokenizer=text_encoder.tokenizer,
        filter_options=filter_options,
        device=dev,
        progress=progress,
    )
    _check_enough([cs], min_captions)
    extra = {**_model_label(model, encoder), **(extra_provenance or {})}
    concept_obj = _encode(text_encoder, cs, batch_size, progress, extra)
    from p2pz_directions.core.store import default_store

    store = store or default_store()
    return store.publish_many([concept_obj], pack=pack_name)[0]


# --------------------------------------------------------------------------------------------------
# reencode
# --------------------------------------------------------------------------------------------------
def _encoder_id_of(text: str | os.PathLike) -> str:
    """An encoder id from a model id/folder or an encoder id (stored ids pass through)."""
    from p2pz_directions.editing.models import encoder_for

    try:
        return encoder_for(model=text).id
    except (FormatError, ValueError, OSError):
        return encoder_for(encoder=text).id


def reencode(
    concept_name: str,
    *,
    model: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    from_encoder: str | os.PathLike | None = None,
    pack: str | None = None,
    device: str | None = None,
    dtype: Any = None,
    batch_size: int = 1024,
    progress: Progress | None = None,
    store: Any = None,
) -> Concept:
    """Embed the stored captions of ``concept_name`` with another text encoder and publish it.

    No caption model is needed: the captions come from the stored concept (any encoder, or the
    one named by ``from_encoder``, a model or encoder id). The new version goes to ``pack``
    (default: the pack the captions came from).

    >>> c = reencode("cat", model="stabilityai/stable-diffusion-2-1")   # doctest: +SKIP
    >>> c.encoder.id                                                     # doctest: +SKIP
    'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'
    """
    from p2pz_directions.builder.encoders import TextEncoder
    from p2pz_directions.core.store import default_store

    store = store or default_store()
    pref, ref = naming.parse_concept(concept_name)
    src_pack = pref.name if pref is not None else None
    if src_pack is not None and not store.pack_dir(src_pack).is_dir():
        raise NotFoundError(
            f"no pack {src_pack!r} in {store.root}; installed: {', '.join(store.pack_names()) or 'none'}"
        )
    enc_filter = _encoder_id_of(from_encoder) if from_encoder is not None else None
    entries = store.entries(pack=src_pack, encoder=enc_filter, name=ref.name)
    if ref.version is not None:
        entries = [e for e in entries if e.version == ref.version]
    if not entries:
        where = f" for encoder {enc_filter}" if enc_filter else ""
        raise NotFoundError(
            f"no stored concept {str(ref)!r}{where} in {store.root}: build it first with `p2pz build`"
        )
    with_caps = [e for e in entries if e.num_captions]
    if not with_caps:
        raise BuildError(
            f"concept {ref.name!r} is stored without captions (imported from a .pt file?), so it cannot be re-encoded. "
            "Build it from captions with `p2pz build` (or --source-captions FILE)"
        )
    # latest version per (pack, encoder); distinct caption sets must be chosen between explicitly
    latest: dict[tuple[str, str], Any] = {}
    for e in with_caps:
        key = (e.pack, e.encoder.id)
        if key not in latest or e.version > latest[key].version:
            latest[key] = e
    loaded = [store.load(e) for e in latest.values()]
    distinct: dict[tuple[str, ...], Concept] = {}
    for c in loaded:
        distinct.setdefault(tuple(c.captions or ()), c)
    if len(distinct) > 1:
        cands = sorted(f"{c.pack}:{c.name}@{c.version} ({c.encoder.id})" for c in distinct.values())
        raise AmbiguousNameError(
            f"concept {ref.name!r} is stored with different captions: {', '.join(cands)}. Choose one with "
            "a pack prefix and version (pack:name@N) or from_encoder= (--from-encoder)",
            cands,
        )
    base = next(iter(distinct.values()))
    out_pack = naming.parse_pack(pack).name if pack is not None else (base.pack or "local")
    if model is None and encoder is None:
        raise BuildError("reencode needs the model (or encoder) to embed for: pass model=... (--model)")
    te = TextEncoder.from_pretrained(model, encoder=encoder, device=device, dtype=dtype)
    cb = (lambda done, total: progress("encode", base.name, done, total)) if progress else None
    emb = te.encode(base.captions, batch_size=batch_size, progress=cb)
    prov = {k: v for k, v in (base.provenance or {}).items() if k not in ("package_version",)}
    prov.update(_model_label(model, encoder))
    prov["encoding"] = {**te.settings(), "batch_size": batch_size}
    prov["method"] = "reencode"
    prov["reencoded_from"] = {
        "pack": base.pack,
        "name": base.name,
        "version": base.version,
        "encoder": base.encoder.id,
        "content_hash": base.content_hash,
    }
    new = Concept(
        name=base.name, embedding=emb, encoder=te.info, captions=list(base.captions), provenance=prov
    )
    return store.publish_many([new], pack=out_pack)[0]
