"""The name parser: round trips and every invalid form the issue lists (hypothesis-driven)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pz_directions.core import naming
from p2pz_directions.core.errors import InvalidNameError

WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=12)
CONCEPT = st.lists(WORD, min_size=1, max_size=4).map(" ".join)
VERSION = st.none() | st.integers(min_value=1, max_value=10**6)
PACK = (
    st.none()
    | st.from_regex(r"[a-z0-9][a-z0-9_-]{0,10}[a-z0-9]", fullmatch=True)
    | st.builds(
        lambda a, b: f"{a}/{b}",
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,8}[A-Za-z0-9]", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,8}[A-Za-z0-9]", fullmatch=True),
    )
    # any pack name with "--" is refused (tests/test_hostile_packs.py)
).filter(lambda p: p is None or "--" not in p)


@settings(max_examples=300, deadline=None)
@given(src=CONCEPT, tgt=CONCEPT, sv=VERSION, tv=VERSION, pack=PACK)
def test_direction_round_trip(src, tgt, sv, tv, pack):
    if src == tgt:
        with pytest.raises(ValueError, match="same concept"):
            naming.parse_direction(f"{src}->{tgt}")
        return
    ref = naming.DirectionRef(
        naming.ConceptRef(src, sv), naming.ConceptRef(tgt, tv), naming.PackRef(pack) if pack else None
    )
    text = str(ref)
    assert naming.parse_direction(text) == ref
    # whitespace and case do not matter
    noisy = text.replace("->", "  ->\t").upper() if pack is None else text.replace("->", " -> ")
    assert naming.parse_direction(noisy) == ref


@settings(max_examples=200, deadline=None)
@given(name=CONCEPT, v=VERSION)
def test_concept_round_trip(name, v):
    ref = naming.ConceptRef(name, v)
    assert naming.parse_concept(str(ref)) == (None, ref)
    assert naming.normalize_concept("  " + name.upper().replace(" ", "   ") + " ") == name


def test_examples():
    r = naming.parse_direction("Cat -> Dog")
    assert (r.source.name, r.target.name, r.pack) == ("cat", "dog", None)
    r = naming.parse_direction("cat->cat wearing a hat")
    assert r.target.name == "cat wearing a hat"
    r = naming.parse_direction("cat@2->dog")
    assert (r.source.version, r.target.version) == (2, None)
    r = naming.parse_direction("cat->dog@2")  # one version for the pair
    assert (r.source.version, r.target.version) == (2, 2)
    r = naming.parse_direction("cat@latest->dog@2")
    assert (r.source.version, r.target.version) == (None, 2)
    r = naming.parse_direction("pix2pix-zero:cat->dog")
    assert r.pack == naming.PackRef("pix2pix-zero")
    r = naming.parse_direction("someone/their-pack@v1.0:cat->dog@2")
    assert r.pack == naming.PackRef("someone/their-pack", "v1.0") and r.pack.is_hub
    assert (r.source.version, r.target.version) == (2, 2)


@pytest.mark.parametrize(
    "bad, why",
    [
        ("->dog", "empty"),
        ("cat->", "empty"),
        ("  -> ", "empty"),
        ("cat->../etc", r"'/'|'\.\.'"),
        ("cat->a..b", r"'\.\.'"),
        ("cat->a/b", "'/'"),
        ("cat->a\\b", "reserved"),
        ("cat->d\x00og", "control"),
        ("cat->d\x1bog", "control"),
        ("cat->do\u200bg", "control"),
        ("cat->" + "d" * 201, "limit is 200"),
        ("cat->cat", "same concept"),
        ("Cat -> CAT", "same concept"),
        ("cat", "not a direction"),
        ("cat->dog->cow", "more than one"),
        ("cat@0->dog", "positive integer"),
        ("cat@x->dog", "positive integer"),
        ("cat@1@2->dog", "more than one '@'"),
        ("Bad Pack:cat->dog", "pack name"),
        ("a/b/c:cat->dog", "owner/name"),
        ("p:q:cat->dog", "more than one ':'"),
        (":cat->dog", "pack prefix is empty"),
        ("local@v1:cat->dog", "only Hub packs"),
    ],
)
def test_invalid_names_raise_value_error(bad, why):
    with pytest.raises(ValueError, match=why) as info:
        naming.parse_direction(bad)
    assert isinstance(info.value, InvalidNameError)


@settings(max_examples=200, deadline=None)
@given(
    junk=st.text(min_size=0, max_size=30), ctrl=st.sampled_from(["\x00", "\x07", "\x1f", "\x7f", "\u2028"])
)
def test_control_characters_always_rejected(junk, ctrl):
    with pytest.raises(ValueError):
        naming.parse_direction(f"cat->{junk}{ctrl}{junk}x")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_parser_never_crashes_otherwise(text):
    """Any string either parses or raises InvalidNameError; nothing else escapes."""
    try:
        ref = naming.parse_direction(text)
    except InvalidNameError:
        return
    assert naming.parse_direction(str(ref)) == ref


def test_slug():
    assert naming.slug("openai/clip-vit-large-patch14") == "openai--clip-vit-large-patch14"
    with pytest.raises(ValueError):
        naming.slug("..")
