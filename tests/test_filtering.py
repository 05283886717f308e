"""Caption filtering: each drop reason, mention rules, and near duplicates with the real MiniLM."""

from __future__ import annotations

import pytest
import torch

from p2pz_directions.builder.filtering import (
    CaptionFilter,
    FilterReport,
    clean_caption,
    filter_captions,
    load_minilm,
    mentions,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minilm():
    return load_minilm("cpu")


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    from tiny_sd import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  a cat  ", "a cat"),
        ('"A cat on a mat."', "A cat on a mat."),
        ("- the dog's owner", "the dog's owner"),
        ("3. a dog\tin  the park", "a dog in the park"),
        ("\u201ca dog\u201d", "a dog"),
        ("   ", ""),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


@pytest.mark.parametrize(
    ("caption", "concept", "ok"),
    [
        ("Two horses in a field", "horse", True),
        ("a horseshoe on a door", "horse", False),
        ("CATS!", "cat", True),
        ("the puppies sleep", "puppy", True),
        ("three wolves howl", "wolf", True),
        ("people on a beach", "person", True),
        ("a teddy-bear on a bed", "teddy bear", True),
        ("a bear on a bed", "teddy bear", False),
        ("a cat in a red hat", "cat wearing a hat", False),
        ("a cat wearing a hat", "cat wearing a hat", True),
        ("a cat in a red hat", "cat hat", True),
        ("the dog's bowl", "dog", True),
    ],
)
def test_mentions(caption, concept, ok):
    assert mentions(caption, concept) is ok


def test_each_reason_is_reported(clip_tokenizer):
    long_tokens = "a cat " + "x" * 90  # char-level tokenizer: > 77 tokens but < 150 chars
    f = CaptionFilter("cat", tokenizer=clip_tokenizer, near_duplicate_threshold=None)
    kept = f.add(["a cat", "", "a dog on a sofa", "A cat.", "a cat " + "very " * 40, long_tokens, "two cats"])
    assert kept == ["a cat", "two cats"]
    assert f.max_tokens == 77
    assert dict(f.report.dropped) == {
        "empty": 1,
        "no_concept": 1,
        "duplicate": 1,
        "too_long": 1,
        "too_many_tokens": 1,
    }
    assert f.report.seen == 7 and f.report.kept == 2
    assert f.report.examples["no_concept"] == ["a dog on a sofa"]
    d = f.report.to_dict()
    assert list(d["dropped"]) == ["empty", "too_long", "no_concept", "duplicate", "too_many_tokens"]


def test_relaxed_filters_keep_more():
    caps = ["a dog", "a cat", "a   cat ", "x" * 200]
    kept, rep = filter_captions(
        caps, "cat", require_mention=False, near_duplicate_threshold=None, max_chars=300
    )
    assert kept == ["a dog", "a cat", "x" * 200] and rep.dropped == {"duplicate": 1}
    kept, _ = filter_captions(
        ["a cat in a hat", "a cat"], "cat wearing a hat", mention="cat hat", near_duplicate_threshold=None
    )
    assert kept == ["a cat in a hat"]


def test_near_duplicates_with_minilm(minilm):
    caps = [
        "a cat sitting next to its owner",
        "A white cat posing for a picture with a camera",
        "a cat sits next to its owner",  # paraphrase of the first
        "a cat sleeping in a cardboard box",
        "A white cat posing for a photo with a camera",  # paraphrase of the second
    ]
    f = CaptionFilter("cat", dedup_model=minilm)
    assert f.add(caps) == [caps[0], caps[1], caps[3]]
    assert f.report.dropped == {"near_duplicate": 2}
    # incremental: a paraphrase of something kept in an earlier batch is dropped too
    assert f.add(["A cat is sleeping inside a cardboard box.", "a cat chasing a red laser dot"]) == [
        "a cat chasing a red laser dot"
    ]
    assert f.report.dropped["near_duplicate"] == 3 and len(f.kept) == 4
    # a stricter threshold keeps paraphrases
    g = CaptionFilter("cat", dedup_model=minilm, near_duplicate_threshold=0.999)
    assert len(g.add(caps)) == 5
    # same inputs, same order -> same result
    h = CaptionFilter("cat", dedup_model=minilm)
    assert h.add(caps) == [caps[0], caps[1], caps[3]]


def test_default_model_is_the_offline_minilm(minilm):
    f = CaptionFilter("cat")
    assert f.model is minilm  # cached per device
    assert f.settings()["near_duplicate_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    emb = minilm.embed(["a cat", "a kitten"])
    assert emb.shape == (2, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)


def test_truncate_and_summary():
    f = CaptionFilter("cat", near_duplicate_threshold=None)
    f.add(["a cat", "two cats", "the cat", "a dog"])
    f.truncate(2)
    assert f.kept == ["a cat", "two cats"]
    assert f.report.summary() == "kept 2 of 4; dropped 1 no_concept; 1 more usable, not needed"
    assert isinstance(f.report, FilterReport) and f.report.unused == 1


def test_bad_options():
    with pytest.raises(ValueError, match="near_duplicate_threshold"):
        CaptionFilter("cat", near_duplicate_threshold=1.5)
    with pytest.raises(ValueError, match="max_chars"):
        CaptionFilter("cat", max_chars=0)
