"""Load directions and concepts by name: the one resolver.

>>> from p2pz_directions import directions
>>> d = directions.load("cat->dog")                                   # doctest: +SKIP
>>> d = directions.load("cat->dog", model="CompVis/stable-diffusion-v1-4")   # doctest: +SKIP
>>> directions.list("cat*")                                           # doctest: +SKIP
['cat->dog', 'cat->horse', 'cat->zebra']

Resolution: the name is parsed once (`naming`), the encoder chosen by ``model=`` / ``encoder=``
(or by what is stored), then each side is looked up among the packs in scope. When more than one
encoder or pack could serve and none was named, an `AmbiguousNameError` lists them; an unknown
name raises `NotFoundError` with close matches.
"""

from __future__ import annotations

import builtins
import difflib
import fnmatch
import os
import re
from collections import defaultdict
from typing import Any

from p2pz_directions.core import naming
from p2pz_directions.core.concept import Concept, Direction
from p2pz_directions.core.errors import AmbiguousNameError, ConceptNotForEncoderError, NotFoundError
from p2pz_directions.core.store import Entry, LocalStore, default_store
from p2pz_directions.editing.models import encoder_for

__all__ = ["load", "load_concept", "list", "concepts", "resolve_encoder_id", "resolve_entries"]


def _encoder_info(model: Any = None, encoder: str | os.PathLike | None = None):
    """The `EncoderInfo` of ``model`` (an id, a folder, or a loaded diffusers pipeline) or ``encoder``."""
    if model is not None and encoder is None and not isinstance(model, (str, os.PathLike)):
        from p2pz_directions.editing.editors import _encoder_of_pipe  # noqa: PLC0415 - editors imports this module's users

        return _encoder_of_pipe(model)
    return encoder_for(model=model, encoder=encoder)


def resolve_encoder_id(model: Any = None, encoder: str | os.PathLike | None = None) -> str | None:
    """The encoder id that ``model=`` (an id, a folder or a loaded pipeline) / ``encoder=`` select,
    or None when neither is given (or a pipeline's encoder cannot be identified)."""
    if model is None and encoder is None:
        return None
    info = _encoder_info(model, encoder)
    return None if info.id.startswith("unknown/") else info.id


def _scope_packs(store: LocalStore, pack: str | naming.PackRef | None) -> builtins.list[str] | None:
    """Pack names in scope (None = every pack). A Hub pack is pulled on first use when possible."""
    if pack is None:
        return None
    ref = naming.parse_pack(pack) if isinstance(pack, str) else pack
    if ref.is_hub:
        try:
            from p2pz_directions import hub  # noqa: PLC0415 - optional, written by the Hub registry
        except ImportError:
            hub = None
        if hub is not None and hasattr(hub, "ensure_pack"):
            return [hub.ensure_pack(ref, store)]
        if ref.revision:
            raise NotFoundError(f"pack {ref} is not installed, and this install cannot pull from the Hub")
    if not store.pack_dir(ref.name).is_dir():
        raise NotFoundError(
            f"no pack {ref.name!r} is installed in {store.root}. Installed packs: "
            f"{', '.join(store.pack_names()) or 'none'}."
            + (f" Pull it with `p2pz pull {ref}`." if ref.is_hub else "")
        )
    return [ref.name]


def _entries(
    store: LocalStore, packs: builtins.list[str] | None, encoder_id: str | None, name: str | None = None
):
    if packs is None:
        return store.entries(encoder=encoder_id, name=name)
    out: builtins.list[Entry] = []
    for p in packs:
        out.extend(store.entries(pack=p, encoder=encoder_id, name=name))
    return out


def _suggest(query: str, store: LocalStore, names: builtins.list[str]) -> builtins.list[str]:
    close = difflib.get_close_matches(query, names, n=5, cutoff=0.6)
    try:
        from p2pz_directions import search  # noqa: PLC0415 - optional semantic suggestions

        for s in search.suggest(query, store, k=3):
            if s not in close:
                close.append(s)
    except Exception:  # noqa: BLE001 - suggestions are a courtesy and must never hide the real error
        pass
    return close


def _not_found(
    what: str, query: str, store: LocalStore, names: builtins.list[str], scope: str
) -> NotFoundError:
    sugg = _suggest(query, store, names)
    msg = f"no {what} {query!r} {scope}."
    if sugg:
        msg += f" Did you mean: {', '.join(sugg)}?"
    elif not names:
        msg += (
            " The registry is empty: import concepts with `p2pz import-pt`, build them with `p2pz build`, "
            "or pull a pack with `p2pz pull`."
        )
    return NotFoundError(msg, sugg)


def _scope_text(store: LocalStore, packs, encoder_id) -> str:
    parts = []
    if packs:
        parts.append(f"in pack {', '.join(packs)}")
    if encoder_id:
        parts.append(f"for encoder {encoder_id}")
    parts.append(f"(registry {store.root})")
    return " ".join(parts)


def _pick(entries: builtins.list[Entry], ref: naming.ConceptRef, label: str) -> Entry:
    """Choose the version ``ref`` asks for among entries of one (pack, encoder, name)."""
    if ref.version is None:
        return max(entries, key=lambda e: e.version)
    for e in entries:
        if e.version == ref.version:
            return e
    have = ", ".join(f"@{e.version}" for e in sorted(entries, key=lambda e: e.version))
    raise NotFoundError(f"{label} has no version {ref.version}; available: {have}")


def _group(entries: builtins.list[Entry]) -> dict[tuple[str, str], builtins.list[Entry]]:
    groups: dict[tuple[str, str], builtins.list[Entry]] = defaultdict(builtins.list)
    for e in entries:
        groups[(e.pack, e.encoder.id)].append(e)
    return groups


def _resolve_side_entry(
    store: LocalStore, ref: naming.ConceptRef, packs, encoder_id: str, label: str
) -> Entry:
    groups = _group(_entries(store, packs, encoder_id, ref.name))
    if len(groups) > 1:
        cands = sorted(f"{p}:{ref.name}" for p, _ in groups)
        raise AmbiguousNameError(
            f"concept {ref.name!r} for {encoder_id} exists in several packs: {', '.join(cands)}. "
            f"Name one with a prefix, e.g. {cands[0].split(':')[0]}:{label}, or choose the pack with "
            f"pack='{cands[0].split(':')[0]}'",
            cands,
        )
    (((pack, _), entries),) = groups.items()
    return _pick(entries, ref, f"{pack}:{ref.name} ({encoder_id})")


def _resolve_side(store: LocalStore, ref: naming.ConceptRef, packs, encoder_id: str, label: str) -> Concept:
    return store.load(_resolve_side_entry(store, ref, packs, encoder_id, label))


def resolve_entries(
    name: str,
    *,
    model: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    pack: str | None = None,
    store: LocalStore | None = None,
) -> builtins.list[Entry]:
    """The stored versions a name resolves to, as `load` / `load_concept` would pick them, without
    reading any tensor: ``[source, target]`` for a direction, ``[concept]`` for a concept."""
    store = store or default_store()
    if naming.is_direction(name):
        ref = naming.parse_direction(name)
        if ref.pack is not None and pack is not None and naming.parse_pack(pack).name != ref.pack.name:
            raise ValueError(
                f"{name!r} names pack {ref.pack.name!r} but pack={pack!r} was also given; keep one"
            )
        packs = _scope_packs(store, ref.pack if ref.pack is not None else pack)
        enc_id = _choose_encoder(
            store, [ref.source.name, ref.target.name], packs, resolve_encoder_id(model, encoder), name
        )
        return [_resolve_side_entry(store, r, packs, enc_id, name) for r in (ref.source, ref.target)]
    pref, cref = naming.parse_concept(name)
    packs = _scope_packs(store, pref if pref is not None else pack)
    enc_id = _choose_encoder(store, [cref.name], packs, resolve_encoder_id(model, encoder), name)
    return [_resolve_side_entry(store, cref, packs, enc_id, name)]


def _choose_encoder(
    store: LocalStore, names: builtins.list[str], packs, encoder_id: str | None, query: str
) -> str:
    """The one encoder holding every concept in ``names`` (or the one asked for)."""
    per_name = [{e.encoder.id for e in _entries(store, packs, encoder_id, n)} for n in names]
    all_names = sorted({e.name for e in _entries(store, packs, encoder_id)})
    for n, encs in zip(names, per_name, strict=True):
        if not encs:
            others = _entries(store, packs, None, n) if encoder_id is not None else []
            if others:  # the name exists, for another encoder: say that, not "did you mean"
                have = ", ".join(sorted({f"{e.encoder.id} (D={e.encoder.hidden_size})" for e in others}))
                raise ConceptNotForEncoderError(
                    f"{query!r}: concept {n!r} exists only for text encoder {have}, not for {encoder_id}, "
                    f"which the model uses. Build it for this model with `p2pz reencode {n} --model MODEL` "
                    f"(or `p2pz build`), or edit with a model of that encoder."
                )
            raise _not_found("concept", n, store, all_names, _scope_text(store, packs, encoder_id))
    common = set.intersection(*per_name)
    if not common:
        detail = "; ".join(f"{n}: {', '.join(sorted(e))}" for n, e in zip(names, per_name, strict=True))
        raise NotFoundError(
            f"{query!r}: its concepts exist only for different text encoders ({detail}). A direction needs both "
            f"sides from one encoder: rebuild one side with `p2pz reencode NAME --model ...`."
        )
    if len(common) > 1:
        raise AmbiguousNameError(
            f"{query!r} exists for several text encoders: {', '.join(sorted(common))}. "
            f"Choose one with model=... (the model you edit with picks its encoder, e.g. "
            f"model='CompVis/stable-diffusion-v1-4') or encoder=...",
            sorted(common),
        )
    return next(iter(common))


def load(
    name: str | Direction,
    *,
    model: str | os.PathLike | Any | None = None,
    encoder: str | os.PathLike | None = None,
    pack: str | None = None,
    store: LocalStore | None = None,
) -> Direction:
    """Load the direction ``name`` (``"cat->dog"``, ``"pack:cat@1->dog@2"``) from the registry.

    ``model`` (a diffusers model id or folder, or a loaded pipeline: ``model=pipe``) or ``encoder``
    (a text encoder id) selects the text encoder; ``pack`` limits the search to one pack (a prefix in the name does the same).
    """
    if isinstance(name, Direction):
        if model is not None and not isinstance(model, (str, os.PathLike)) and encoder is None:
            name._check_pipe(model)
        elif model is not None or encoder is not None:
            name.check_model(encoder_for(model=model, encoder=encoder), str(model or encoder))
        return name
    store = store or default_store()
    ref = naming.parse_direction(name)
    if ref.pack is not None and pack is not None and naming.parse_pack(pack).name != ref.pack.name:
        raise ValueError(f"{name!r} names pack {ref.pack.name!r} but pack={pack!r} was also given; keep one")
    packs = _scope_packs(store, ref.pack if ref.pack is not None else pack)
    enc_id = resolve_encoder_id(model, encoder)
    enc_id = _choose_encoder(store, [ref.source.name, ref.target.name], packs, enc_id, name)
    source = _resolve_side(store, ref.source, packs, enc_id, name)
    target = _resolve_side(store, ref.target, packs, enc_id, name)
    return Direction(source, target)


def load_concept(
    name: str,
    *,
    model: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    pack: str | None = None,
    store: LocalStore | None = None,
) -> Concept:
    """Load one concept (``"cat"``, ``"cat@2"``, ``"pix2pix-zero:cat"``)."""
    store = store or default_store()
    pref, ref = naming.parse_concept(name)
    packs = _scope_packs(store, pref if pref is not None else pack)
    enc_id = _choose_encoder(store, [ref.name], packs, resolve_encoder_id(model, encoder), name)
    return _resolve_side(store, ref, packs, enc_id, name)


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def concepts(
    pattern: str = "*",
    *,
    model: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    pack: str | None = None,
    store: LocalStore | None = None,
) -> builtins.list[str]:
    """Concept names matching a shell-style ``pattern`` (natural sort), like ``timm.list_models``."""
    store = store or default_store()
    packs = _scope_packs(store, pack)
    enc_id = resolve_encoder_id(model, encoder)
    names = {e.name for e in _entries_listing(store, packs, enc_id)}
    pat = _norm_pattern(pattern)
    return sorted((n for n in names if fnmatch.fnmatchcase(n, pat)), key=_natural_key)


def _entries_listing(store: LocalStore, packs, enc_id):
    if packs is None:
        return store.entries(encoder=enc_id, skip_damaged=True)
    out = []
    for p in packs:
        out.extend(store.entries(pack=p, encoder=enc_id, skip_damaged=True))
    return out


def _norm_pattern(pattern: str) -> str:
    return re.sub(r"\s*->\s*", "->", re.sub(r"\s+", " ", pattern.strip().lower())) or "*"


def list(  # noqa: A001 - mirrors timm.list_models' role under the directions namespace
    pattern: str = "*",
    *,
    model: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    pack: str | None = None,
    store: LocalStore | None = None,
) -> builtins.list[str]:
    """Direction names ``a->b`` available for one encoder (any ordered pair of its concepts),
    matching a shell-style ``pattern`` (``"cat*"``, ``"*->dog"``), natural sort."""
    store = store or default_store()
    packs = _scope_packs(store, pack)
    enc_id = resolve_encoder_id(model, encoder)
    by_enc: dict[str, set[str]] = defaultdict(set)
    for e in _entries_listing(store, packs, enc_id):
        by_enc[e.encoder.id].add(e.name)
    pat = _norm_pattern(pattern)
    out = set()
    for names in by_enc.values():
        for a in names:
            for b in names:
                if a != b and fnmatch.fnmatchcase(f"{a}->{b}", pat):
                    out.add(f"{a}->{b}")
    return sorted(out, key=_natural_key)
