"""A tiny random-weight Flan-T5 stand-in with a locally built word-level tokenizer.

``make_tiny_t5(path)`` saves a `T5ForConditionalGeneration` (d_model 32, 2 layers) and a
`T5Tokenizer` (a Unigram vocabulary of whole words, no training data needed) with
``save_pretrained``; the captioner loads them back with the real ``from_pretrained``. The
shared embedding is scaled down so that sampling spreads over many words (random T5 weights put
almost all mass on one token otherwise), except the end-of-sequence row, so samples do end. Its captions are word salad, so tests that need the
concept mentioned bias those words with ``sequence_bias``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

WORDS = (
    "a an the of in on at with and photo painting picture cat dog horse zebra sitting running street "
    "field park house garden small big black white brown cute sleeping playing grass two near under tree "
    "sky window bed sofa water beach snow red blue green"
).split()
PROMPT_WORDS = (
    "Provide provide caption for images containing captions should be English english no longer than "
    "150 characters . The"
).split()


def make_tokenizer(path: str | os.PathLike):
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen: set[str] = set()
    for w in WORDS + PROMPT_WORDS:
        if w not in seen:
            seen.add(w)
            vocab.append(("\u2581" + w, -5.0))
    for c in "abcdefghijklmnopqrstuvwxyz.,":
        vocab.append((c, -12.0))
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.save_pretrained(str(path))
    return tok


def make_tiny_t5(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny T5 seq2seq model + tokenizer folder to ``path`` and return it."""
    from transformers import T5Config, T5ForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        d_kv=16,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.shared.weight.mul_(0.05)
        model.shared.weight[tok.eos_token_id] *= 10.0  # so that some samples end before max_new_tokens
    model.save_pretrained(str(path))
    return path


def word_bias(path: str | os.PathLike, words: dict[str, float]) -> dict[tuple[int, ...], float]:
    """``sequence_bias`` for generate(): raise the logits of whole words of the tiny vocabulary."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    out = {}
    for w, b in words.items():
        tid = tok.convert_tokens_to_ids("\u2581" + w)
        assert tid != tok.unk_token_id, w
        out[(tid,)] = float(b)
    return out


def caption_bias(path: str | os.PathLike) -> dict[tuple[int, ...], float]:
    """The bias the tests sample with: 'cat' and 'dog' often, and an end token now and then."""
    bias = word_bias(path, {"cat": 2.5, "dog": 2.5})
    bias[(1,)] = 1.0  # </s>
    return bias
