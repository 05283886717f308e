"""Directions: equal to the authors' and diffusers' constructions on the real SD 1.4 concepts,
plus resolution rules (encoders, packs, versions) and the direction algebra."""

from __future__ import annotations

import pytest
import torch

from p2pz_directions import directions
from p2pz_directions.core.concept import Concept, Direction, EncoderInfo
from p2pz_directions.core.errors import AmbiguousNameError, EncoderMismatchError, NotFoundError
from p2pz_directions.core.store import LocalStore
from p2pz_directions.packs.legacy import import_pt

CLIP_L = "openai/clip-vit-large-patch14"
ENC = EncoderInfo("test/enc-a", 16, "test")
ENC_B = EncoderInfo("test/enc-b", 16, "test")
ENC_WIDE = EncoderInfo("test/enc-wide", 32, "test")


def concept(name, seed, enc=ENC):
    g = torch.Generator().manual_seed(seed)
    return Concept(name, torch.randn(77, enc.hidden_size, generator=g), enc)


def authors(folder, name):
    return torch.load(folder / f"{name}.pt", weights_only=True, map_location="cpu")


@pytest.fixture
def imported(authors_embeddings):
    import_pt([authors_embeddings], pack="pix2pix-zero", encoder=CLIP_L, progress=False)
    return authors_embeddings


@pytest.mark.parametrize("src,tgt", [("cat", "dog"), ("dog", "cat"), ("horse", "zebra"), ("horse", "cat")])
def test_delta_equals_authors_and_diffusers_exactly(imported, src, tgt):
    from diffusers.pipelines.deprecated import StableDiffusionPix2PixZeroPipeline

    s, t = authors(imported, src).float(), authors(imported, tgt).float()
    d = directions.load(f"{src}->{tgt}")
    authors_delta = (t.mean(0) - s.mean(0)).unsqueeze(0)  # src/utils/edit_directions.py
    diffusers_delta = StableDiffusionPix2PixZeroPipeline.construct_direction(None, s, t)
    assert d.delta.dtype == torch.float32 and d.delta.shape == (1, 77, 768)
    assert torch.equal(d.delta, authors_delta)
    assert torch.equal(d.delta, diffusers_delta)
    # what we hand the pipeline gives the direction it computes itself
    piped = StableDiffusionPix2PixZeroPipeline.construct_direction(None, d.source_embeds, d.target_embeds)
    assert torch.equal(piped, authors_delta)
    assert d.source_embeds.shape == d.target_embeds.shape == (1, 77, 768)


def test_fp16_concepts_keep_their_dtype(imported):
    c = directions.load_concept("horse")
    assert c.embedding.dtype == torch.float16
    assert torch.equal(c.embedding, authors(imported, "horse")[0])


def test_model_and_encoder_select(imported):
    a = directions.load("cat->dog", model="CompVis/stable-diffusion-v1-4")
    b = directions.load("cat->dog", encoder=CLIP_L)
    assert torch.equal(a.delta, b.delta)
    with pytest.raises(NotFoundError, match="concept 'cat'"):
        directions.load("cat->dog", model="stabilityai/stable-diffusion-2-1")


def test_list_and_concepts_with_wildcards(imported):
    assert directions.list("cat*") == ["cat->dog", "cat->horse", "cat->zebra"]
    assert directions.list("*->zebra") == ["cat->zebra", "dog->zebra", "horse->zebra"]
    assert len(directions.list()) == 12  # N * (N - 1)
    assert directions.concepts("*o*") == ["dog", "horse"]
    assert directions.list(model="stabilityai/stable-diffusion-2-1") == []


def test_algebra():
    store = LocalStore()
    store.publish_many([concept("cat", 0), concept("dog", 1), concept("photo", 2), concept("painting", 3)])
    cd = directions.load("cat->dog")
    pp = directions.load("photo->painting")
    assert torch.equal(cd.reversed().delta, -cd.delta)
    assert torch.allclose((cd * 0.5).delta, cd.delta * 0.5)
    assert torch.allclose((0.5 * cd).delta, cd.delta * 0.5)
    both = cd + pp
    assert torch.allclose(both.delta, cd.delta + pp.delta)
    assert torch.allclose(both.target_embeds - both.source_embeds, both.delta, atol=1e-5)
    assert torch.allclose((cd - cd).delta, torch.zeros_like(cd.delta))
    assert "0.5*(" in (cd * 0.5).name
    assert directions.load("dog->cat").name == cd.reversed().name


def test_combining_different_encoders_is_refused():
    store = LocalStore()
    store.publish_many([concept("cat", 0), concept("dog", 1)])
    store.publish_many([concept("photo", 2, ENC_B), concept("painting", 3, ENC_B)])
    store.publish_many([concept("day", 2, ENC_WIDE), concept("night", 3, ENC_WIDE)])
    cd = directions.load("cat->dog")
    with pytest.raises(EncoderMismatchError, match="different text encoders"):
        cd + directions.load("photo->painting")
    with pytest.raises(EncoderMismatchError, match="D=32"):
        cd + directions.load("day->night")
    with pytest.raises(EncoderMismatchError):
        Direction(concept("a", 0), concept("b", 1, ENC_WIDE))
    with pytest.raises(EncoderMismatchError, match="was built for text encoder test/enc-a"):
        cd.check_model(ENC_B, "the model")


def test_ambiguous_encoders_and_packs_list_candidates():
    store = LocalStore()
    store.publish_many([concept("cat", 0), concept("dog", 1)], pack="p1")
    store.publish_many([concept("cat", 0, ENC_B), concept("dog", 1, ENC_B)], pack="p1")
    with pytest.raises(AmbiguousNameError, match="test/enc-a, test/enc-b") as info:
        directions.load("cat->dog")
    assert info.value.candidates == ["test/enc-a", "test/enc-b"]
    assert directions.load("cat->dog", encoder="test/enc-b").encoder == ENC_B
    store.publish_many([concept("cat", 5), concept("dog", 6)], pack="p2")
    with pytest.raises(AmbiguousNameError, match="p1:cat, p2:cat"):
        directions.load("cat->dog", encoder="test/enc-a")
    d = directions.load("p2:cat->dog", encoder="test/enc-a")
    assert d.source.pack == "p2"
    assert torch.equal(directions.load("cat->dog", pack="p2", encoder="test/enc-a").delta, d.delta)


def test_cross_pack_pair_resolves_when_unique():
    store = LocalStore()
    store.publish(concept("cat", 0), pack="a")
    store.publish(concept("dog", 1), pack="b")
    d = directions.load("cat->dog")
    assert (d.source.pack, d.target.pack) == ("a", "b")


def test_versions():
    store = LocalStore()
    store.publish_many([concept("cat", 0), concept("dog", 1)])
    store.publish_many([concept("cat", 10), concept("dog", 11)])
    latest = directions.load("cat->dog")
    assert (latest.source.version, latest.target.version) == (2, 2)
    pair1 = directions.load("cat->dog@1")
    assert (pair1.source.version, pair1.target.version) == (1, 1)
    mixed = directions.load("cat@1->dog")
    assert (mixed.source.version, mixed.target.version) == (1, 2)
    only_target = directions.load("cat@latest->dog@1")
    assert (only_target.source.version, only_target.target.version) == (2, 1)
    with pytest.raises(NotFoundError, match="no version 7; available: @1, @2"):
        directions.load("cat->dog@7")


def test_unknown_names_suggest_close_matches():
    LocalStore().publish_many([concept("cat", 0), concept("dog", 1), concept("horse", 2)])
    with pytest.raises(NotFoundError, match="Did you mean: horse") as info:
        directions.load("cat->hrose")
    assert "horse" in info.value.suggestions
    with pytest.raises(NotFoundError, match="no pack 'nope'"):
        directions.load("nope:cat->dog")


def test_empty_registry_says_how_to_fill_it():
    with pytest.raises(NotFoundError, match="p2pz import-pt"):
        directions.load("cat->dog")


def test_multi_word_concepts():
    LocalStore().publish_many([concept("cat", 0), concept("cat wearing a hat", 1)])
    d = directions.load("Cat ->  Cat Wearing  a Hat")
    assert d.target.name == "cat wearing a hat"
    assert directions.list("cat->*") == ["cat->cat wearing a hat"]
