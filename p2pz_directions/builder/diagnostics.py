"""Embedding diagnostics of a direction, without any image: what ``p2pz show a->b`` prints.

- **delta norm per token position**: ``||target[i] - source[i]||`` for each of the 77 positions,
  so one sees which tokens the direction moves (position 0 is the start token, which CLIP
  makes almost constant; the caption words come next, then end/padding tokens);
- **cosine between the two concepts** (their flattened ``[77, D]`` embeddings) and per position;
- **caption diversity**: the mean pairwise cosine similarity of each concept's captions under
  all-MiniLM-L6-v2 (`p2pz_directions.builder.minilm`): near 1 means the captions say the same thing
  over and over (a mean over near-duplicates), lower means varied captions;
- **entanglement**: the directions in the store (same text encoder) whose deltas are most
  aligned with this one (cosine of the flattened deltas). A direction that is nearly parallel to
  ``cat->horse`` will also turn cats into horses.

>>> from p2pz_directions import diagnostics, directions
>>> diag = diagnostics.diagnose(directions.load("cat->dog"))          # doctest: +SKIP
>>> diag.cosine_source_target, diag.top_positions[:3]                 # doctest: +SKIP
(0.9312, [(5, 11.2), (6, 9.8), (4, 8.1)])
>>> diag.entangled[:2]                                                # doctest: +SKIP
[('cat->horse', 0.71), ('cat->zebra', 0.64)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from p2pz_directions.core.errors import P2PZError

__all__ = ["Diagnostics", "caption_diversity", "diagnose", "entangled_directions", "render"]

#: captions embedded per concept for the diversity figure (evenly spaced when there are more)
MAX_DIVERSITY_CAPTIONS = 512


@dataclass
class Diagnostics:
    """What `diagnose` finds (all plain numbers, JSON-ready via `to_dict`)."""

    direction: str
    encoder: str
    delta_norm: float
    token_norms: list[float]
    top_positions: list[tuple[int, float]]
    cosine_source_target: float
    token_cosine: list[float]
    caption_diversity: dict[str, float | None] = field(default_factory=dict)
    num_captions: dict[str, int] = field(default_factory=dict)
    entangled: list[tuple[str, float]] = field(default_factory=list)
    compared_with: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["top_positions"] = [{"position": p, "norm": n} for p, n in self.top_positions]
        d["entangled"] = [{"direction": n, "cosine": c} for n, c in self.entangled]
        return d


def _r(x: float, nd: int = 4) -> float:
    return round(float(x), nd)


def caption_diversity(captions: Sequence[str] | None, embedder: Any = None) -> float | None:
    """Mean pairwise cosine similarity (off-diagonal) of ``captions`` under MiniLM; None for < 2 captions.

    More than `MAX_DIVERSITY_CAPTIONS` are subsampled evenly (deterministic).
    """
    caps = [c for c in (captions or []) if isinstance(c, str)]
    if len(caps) < 2:
        return None
    if len(caps) > MAX_DIVERSITY_CAPTIONS:
        step = len(caps) / MAX_DIVERSITY_CAPTIONS
        caps = [caps[int(i * step)] for i in range(MAX_DIVERSITY_CAPTIONS)]
    if embedder is None:
        from p2pz_directions.builder import minilm

        embedder = minilm.load()
    v = F.normalize(embedder.embed(list(caps)).float().cpu(), dim=-1)
    n = v.shape[0]
    sim = v @ v.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def entangled_directions(
    direction: Any, store: Any = None, k: int = 5
) -> tuple[list[tuple[str, float]], int]:
    """The ``k`` directions of the store (same encoder, latest version of each concept) whose delta has
    the highest cosine with ``direction``'s; returns them and how many were compared.

    All N*(N-1) directions are scored from one Gram matrix of the N concept embeddings, so a store
    of hundreds of concepts costs one ``[N, 77*D]`` matrix product, not N^2 deltas.
    """
    from p2pz_directions.core.store import default_store

    store = store or default_store()
    enc = direction.encoder.id
    latest: dict[tuple[str, str], Any] = {}
    for e in store.entries(encoder=enc, skip_damaged=True):
        key = (e.pack, e.name)
        if key not in latest or e.version > latest[key].version:
            latest[key] = e
    if len(latest) < 2:
        return [], 0
    keys = sorted(latest)
    packs = {p for p, _ in keys}
    emb = torch.stack([store.load(latest[k_]).embedding.float().flatten() for k_ in keys])  # [N, L*D]
    d = direction.delta[0].float().flatten()
    v = emb @ d  # v[y] - v[x] = d . (E_y - E_x)
    gram = emb @ emb.T
    diag = gram.diagonal()
    dots = v[None, :] - v[:, None]  # [x, y]
    norms = (diag[None, :] + diag[:, None] - 2 * gram).clamp(min=0).sqrt()
    cos = dots / (norms * d.norm()).clamp(min=1e-12)
    own = {direction.source.content_hash, direction.target.content_hash}
    hashes = [latest[k_].content_hash for k_ in keys]
    out = []
    for x in range(len(keys)):
        for y in range(len(keys)):
            if x == y or {hashes[x], hashes[y]} == own:
                continue  # itself and its reverse say nothing
            if norms[x, y] < 1e-12:
                continue
            lab = (
                f"{keys[x][1]}->{keys[y][1]}"
                if len(packs) == 1
                else f"{keys[x][0]}:{keys[x][1]}->{keys[y][0]}:{keys[y][1]}"
            )
            out.append((lab, float(cos[x, y])))
    n = len(out)
    out.sort(key=lambda t: (-t[1], t[0]))
    return [(lab, _r(c)) for lab, c in out[:k]], n


def diagnose(
    direction: Any, store: Any = None, *, k: int = 5, captions: bool = True, embedder: Any = None
) -> Diagnostics:
    """Every diagnostic of one (simple) direction; ``captions=False`` skips MiniLM."""
    s = direction.source.embedding.float()
    t = direction.target.embedding.float()
    delta = direction.delta[0].float()
    tok = delta.norm(dim=-1)
    order = torch.argsort(tok, descending=True, stable=True)[:5]
    diversity: dict[str, float | None] = {}
    ncap: dict[str, int] = {}
    for side, c in (("source", direction.source), ("target", direction.target)):
        ncap[side] = len(c.captions or [])
        diversity[side] = None
        if captions and ncap[side] >= 2:
            try:
                val = caption_diversity(c.captions, embedder)
            except P2PZError:  # MiniLM not installed: the other diagnostics still stand
                val = None
            diversity[side] = None if val is None else _r(val)
    ent, n = entangled_directions(direction, store, k=k)
    return Diagnostics(
        direction=direction.name,
        encoder=direction.encoder.id,
        delta_norm=_r(delta.norm()),
        token_norms=[_r(x) for x in tok.tolist()],
        top_positions=[(int(i), _r(tok[i])) for i in order.tolist()],
        cosine_source_target=_r(F.cosine_similarity(s.flatten(), t.flatten(), dim=0), 6),
        token_cosine=[_r(x) for x in F.cosine_similarity(s, t, dim=-1).tolist()],
        caption_diversity=diversity,
        num_captions=ncap,
        entangled=ent,
        compared_with=n,
    )


_BARS = " ▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float]) -> str:
    """One character per value, scaled to the maximum (for the per-position delta norms)."""
    top = max(values) if values else 0.0
    if top <= 0:
        return " " * len(values)
    return "".join(_BARS[min(len(_BARS) - 1, round(v / top * (len(_BARS) - 1)))] for v in values)


def render(diag: Diagnostics, console: Any) -> None:
    """Print the diagnostics (``p2pz show``)."""
    from rich.table import Table

    t = Table(show_header=False, title="embedding diagnostics (no images)", title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row(f"delta norm / position 0..{len(diag.token_norms) - 1}", sparkline(diag.token_norms))
    t.add_row("most moved positions", ", ".join(f"{p}: {n:.4g}" for p, n in diag.top_positions))
    t.add_row("cos(source, target)", f"{diag.cosine_source_target:.4f}")
    for side in ("source", "target"):
        v = diag.caption_diversity.get(side)
        n = diag.num_captions.get(side, 0)
        text = (
            f"{v:.3f} mean pairwise MiniLM cosine over {n} captions (1 = all alike)"
            if v is not None
            else f"n/a ({n} captions stored)"
        )
        t.add_row(f"caption diversity ({side})", text)
    if diag.entangled:
        t.add_row(
            "most entangled",
            ", ".join(f"{n} ({c:+.3f})" for n, c in diag.entangled) + f"  [of {diag.compared_with}]",
        )
    else:
        t.add_row("most entangled", "n/a (no other directions for this encoder)")
    console.print(t)
