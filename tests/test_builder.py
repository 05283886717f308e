"""The direction builder end to end on tiny models: build, determinism, bad inputs, reencode, recipes."""

from __future__ import annotations

import json

import pytest
import torch

from p2pz_directions import Direction, build, directions
from p2pz_directions.builder.captioners import DEFAULT_PROMPT, CaptionerError, TemplateCaptioner
from p2pz_directions.builder.encoders import EncoderLoadError, TextEncoder, encode_one_by_one
from p2pz_directions.builder.filtering import NotEnoughCaptionsError
from p2pz_directions.builder.pipeline import BuildError, BuildResult, build_concept, reencode, run_build
from p2pz_directions.core.concept import Concept
from p2pz_directions.core.errors import AmbiguousNameError, FormatError, InvalidNameError, NotFoundError
from p2pz_directions.core.store import LocalStore
from p2pz_directions.editing.models import encoder_for

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = {"near_duplicate_threshold": None}  # MiniLM is exercised in a few tests, not all


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    from tiny_t5 import make_tiny_t5

    return make_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


def flan_options(path, **extra):
    from tiny_t5 import caption_bias

    bias = caption_bias(path)
    return {"batch_size": 32, "max_new_tokens": 12, "generate_kwargs": {"sequence_bias": bias}, **extra}


def store():
    return LocalStore()


# -- the happy paths ---------------------------------------------------------------------------------
def test_build_templates_publishes_both_concepts(tiny_sd1):
    d = build("Cat", "dog", model=tiny_sd1, captioner="templates", n=24, filter_options=FAST)
    assert isinstance(d, Direction) and d.name == "local:cat@1->dog@1"
    assert d.encoder == encoder_for(model=tiny_sd1)
    assert d.delta.shape == (1, 77, 32)
    torch.testing.assert_close(d.delta[0], d.target.embedding.float() - d.source.embedding.float())
    refs = sorted(e.ref for e in store().entries())
    assert refs == ["local:cat@1", "local:dog@1"]
    loaded = directions.load("cat->dog", model=tiny_sd1)
    torch.testing.assert_close(loaded.delta, d.delta)
    cat = loaded.source
    assert len(cat.captions) == 24 and all("cat" in c for c in cat.captions)
    prov = cat.provenance
    assert prov["builder"]["seed"] == 0 and prov["builder"]["n"] == 24
    assert prov["captioner"]["captioner"] == "templates"
    assert prov["filter"]["report"]["kept"] == 24
    assert prov["encoding"]["output"].startswith("text_encoder(input_ids")
    result = d.build_result
    assert isinstance(result, BuildResult) and result.delta_norm == pytest.approx(float(d.delta.norm()))
    json.dumps(result.to_dict(captions=True))


def test_stored_embedding_is_the_authors_mean_of_its_captions(tiny_sd1):
    d = build("cat", "dog", model=tiny_sd1, captioner="templates", n=20, filter_options=FAST, batch_size=7)
    te = TextEncoder.from_pretrained(tiny_sd1)
    for c in (d.source, d.target):
        ref = encode_one_by_one(c.captions, te.tokenizer, te.text_encoder)
        torch.testing.assert_close(c.embedding, ref[0], atol=1e-5, rtol=1e-5)
        assert c.embedding.dtype == torch.float32


def test_flan_t5_build_end_to_end_and_deterministic(tiny_sd1, tiny_t5, p2pz_home, tmp_path, monkeypatch):
    kw = dict(
        model=tiny_sd1,
        captioner="flan-t5",
        captioner_model=str(tiny_t5),
        n=16,
        min_captions=16,
        seed=3,
        captioner_options=flan_options(tiny_t5),
    )
    events = []
    d1 = build("cat", "dog", progress=lambda *e: events.append(e), **kw)
    caps = d1.source.provenance["captioner"]
    assert caps["captioner"] == "flan-t5" and caps["prompt"] == DEFAULT_PROMPT and caps["top_k"] == 10
    assert caps["temperature"] == 0.8 and d1.source.provenance["builder"]["seed"] == 3
    assert all("cat" in c.lower() for c in d1.source.captions)
    assert all("dog" in c.lower() for c in d1.target.captions)
    rep = d1.build_result.source.report
    assert rep.kept == 16 and rep.dropped["truncated"] > 0 and rep.dropped["no_concept"] > 0
    stages = {(e[0], e[1]) for e in events}
    assert {("generate", "cat"), ("filter", "cat"), ("encode", "cat"), ("encode", "dog")} <= stages
    assert events[-1] == ("encode", "dog", 16, 16)
    # same inputs + seed in a fresh registry: same captions, same content hash
    monkeypatch.setenv("P2PZ_HOME", str(tmp_path / "other-home"))
    d2 = build("cat", "dog", **kw)
    assert d2.source.captions == d1.source.captions and d2.target.captions == d1.target.captions
    assert (d2.source.content_hash, d2.target.content_hash) == (
        d1.source.content_hash,
        d1.target.content_hash,
    )
    # publishing the same content again is a no-op (same versions)
    d3 = build("cat", "dog", **kw)
    assert d3.name == d2.name == "local:cat@1->dog@1"
    # another seed: other captions, a new version
    d4 = build("cat", "dog", **{**kw, "seed": 4})
    assert d4.source.captions != d1.source.captions and d4.name == "local:cat@2->dog@2"


def test_concept_does_not_depend_on_its_partner(tiny_sd1):
    a = build("cat", "dog", model=tiny_sd1, captioner="templates", n=16, filter_options=FAST)
    b = build("cat", "horse", model=tiny_sd1, captioner="templates", n=16, filter_options=FAST)
    assert a.source.content_hash == b.source.content_hash and b.source.version == 1


def test_near_duplicates_filtered_in_a_build(tiny_sd1):
    d = build("cat", "dog", model=tiny_sd1, captioner="templates", n=40)
    for c in (d.source, d.target):
        assert len(c.captions) == 40 and c.provenance["filter"]["near_duplicate_threshold"] == 0.95
    r = d.build_result
    assert r.source.report.seen >= 40


def test_caption_files_and_lists(tiny_sd1, tmp_path):
    cats = tmp_path / "cats.txt"
    cats.write_text("\n".join(f"a photo of cat number {i}" for i in range(30)) + "\n\n", "utf-8")
    dogs = [f"a dog called {n}" for n in "abcdefghijklmnopqrstu"]
    d = build(
        "cat",
        "dog",
        model=tiny_sd1,
        captioner="file",
        source_captions=cats,
        target_captions=dogs,
        n=25,
        filter_options=FAST,
    )
    assert d.source.captions == [f"a photo of cat number {i}" for i in range(25)]
    assert d.target.captions == dogs
    assert d.source.provenance["captioner"]["file"] == "cats.txt"
    # one side from a file, the other from templates
    d = build(
        "cat", "zebra", model=tiny_sd1, captioner="templates", source_captions=cats, n=20, filter_options=FAST
    )
    assert d.source.provenance["captioner"]["captioner"] == "file"
    assert d.target.provenance["captioner"]["captioner"] == "templates"


def test_dry_run_stores_nothing(tiny_sd1):
    r = build("cat", "dog", model=tiny_sd1, captioner="templates", n=16, dry_run=True, filter_options=FAST)
    assert isinstance(r, BuildResult) and r.dry_run and r.direction is None
    assert len(r.source.captions) == 16 and r.source.concept is None
    assert store().entries() == []
    # without a model the token check is skipped but captions still come
    r = build("cat", "dog", captioner="templates", n=16, dry_run=True, filter_options=FAST)
    assert r.source.filter["max_tokens"] is None and len(r.target.captions) == 16


def test_pack_option(tiny_sd1):
    d = build("cat", "dog", model=tiny_sd1, captioner="templates", n=16, pack="mine", filter_options=FAST)
    assert d.source.pack == "mine" and [e.pack for e in store().entries()] == ["mine", "mine"]


# -- bad inputs: clear errors, nothing published ------------------------------------------------------
class Spy(TemplateCaptioner):
    calls = 0

    def __call__(self, concept, *, n, seed=0):
        Spy.calls += 1
        yield from super().__call__(concept, n=n, seed=seed)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        (("", "dog"), {}, InvalidNameError, "empty"),
        (("cat", "   "), {}, InvalidNameError, "empty"),
        (("Cat", " cat "), {}, BuildError, "same concept"),
        (("cat", "dog"), {"captioner": "nope"}, CaptionerError, "unknown captioner 'nope'"),
        (("cat", "dog"), {"captioner": "file"}, BuildError, "needs caption files"),
        (("cat", "dog"), {"n": 8}, BuildError, r"n \(8\) is below min_captions \(16\)"),
        (("cat", "dog"), {"pack": "Bad Pack!"}, InvalidNameError, "pack"),
    ],
)
def test_bad_inputs(tiny_sd1, args, kwargs, exc, match):
    kw = {"model": tiny_sd1, "captioner": Spy(), **kwargs}
    Spy.calls = 0
    with pytest.raises(exc, match=match):
        build(*args, **kw)
    assert Spy.calls == 0
    assert store().entries() == []


def test_model_without_text_encoder_fails_before_captioning(tmp_path):
    bad = tmp_path / "no-te"
    (bad / "unet").mkdir(parents=True)
    (bad / "model_index.json").write_text("{}", "utf-8")
    Spy.calls = 0
    with pytest.raises(EncoderLoadError, match="no text encoder"):
        build("cat", "dog", model=bad, captioner=Spy())
    assert Spy.calls == 0 and store().entries() == []


@pytest.mark.parametrize(("content", "match"), [(b"", "empty"), (b"caf\xe9 cat\n", "not UTF-8")])
def test_bad_caption_file(tiny_sd1, tmp_path, content, match):
    f = tmp_path / "cats.txt"
    f.write_bytes(content)
    with pytest.raises(CaptionerError, match=match):
        build("cat", "dog", model=tiny_sd1, source_captions=f, captioner="templates")
    assert store().entries() == []


def test_too_few_captions_publishes_nothing(tiny_sd1):
    with pytest.raises(
        NotEnoughCaptionsError, match=r"need at least 16.*'dog': kept 3 of 5; dropped 1 duplicate"
    ):
        build(
            "cat",
            "dog",
            model=tiny_sd1,
            captioner="templates",
            n=20,
            target_captions=["a dog", "a dog", "two dogs", "a cat", "the dog"],
            filter_options=FAST,
        )
    assert store().entries() == []


# -- reencode -----------------------------------------------------------------------------------------
def test_reencode_for_another_encoder(tiny_sd1, tiny_sd2, monkeypatch):
    d = build("cat", "dog", model=tiny_sd1, captioner="templates", n=16, filter_options=FAST)

    def no_caption_model(*a, **k):
        raise AssertionError("reencode must not need a caption model")

    monkeypatch.setattr("p2pz_directions.builder.captioners.FlanT5Captioner.load", no_caption_model)
    c = reencode("cat", model=tiny_sd2)
    assert c.encoder == encoder_for(model=tiny_sd2) and c.embedding.shape == (77, 64)
    assert c.captions == d.source.captions and c.ref == "local:cat@1"
    assert c.provenance["reencoded_from"]["encoder"] == d.encoder.id
    assert c.provenance["captioner"]["captioner"] == "templates"
    te2 = TextEncoder.from_pretrained(tiny_sd2)
    torch.testing.assert_close(c.embedding, te2.encode(d.source.captions))
    reencode("dog", model=tiny_sd2, pack="sd2")
    with pytest.raises(NotFoundError):
        directions.load("cat->dog", model=tiny_sd2, pack="sd2")
    reencode("cat", model=tiny_sd2, pack="sd2", from_encoder=tiny_sd1)
    d2 = directions.load("cat->dog", model=tiny_sd2, pack="sd2")
    assert d2.encoder.hidden_size == 64


def test_reencode_errors(tiny_sd1, tiny_sd2):
    with pytest.raises(NotFoundError, match="build it first"):
        reencode("cat", model=tiny_sd2)
    enc = encoder_for(model=tiny_sd1)
    store().publish(Concept("cat", torch.zeros(77, 32), enc, captions=None), pack="imported")
    with pytest.raises(BuildError, match="without captions"):
        reencode("cat", model=tiny_sd2)
    build("cat", "dog", model=tiny_sd1, captioner="templates", n=16, filter_options=FAST, pack="a")
    build("cat", "dog", model=tiny_sd1, captioner="templates", n=16, seed=5, filter_options=FAST, pack="b")
    with pytest.raises(AmbiguousNameError, match="different captions"):
        reencode("cat", model=tiny_sd2)
    c = reencode("b:cat", model=tiny_sd2)
    assert c.pack == "b" and c.provenance["reencoded_from"]["pack"] == "b"
    with pytest.raises(BuildError, match="needs the model"):
        reencode("a:cat")


# -- building one concept / recipes -------------------------------------------------------------------
def test_build_concept_reuses_an_encoder(tiny_sd1):
    te = TextEncoder.from_pretrained(tiny_sd1)
    c = build_concept("zebra", text_encoder=te, captioner="templates", n=16, filter_options=FAST, pack="z")
    assert c.ref == "z:zebra@1" and len(c.captions) == 16 and c.encoder == te.info


def test_run_build_timings_and_json(tiny_sd1):
    r = run_build("cat", "dog", model=tiny_sd1, captioner="templates", n=16, filter_options=FAST)
    assert {"load_encoder", "captions", "encode", "publish", "total"} <= set(r.timings)
    info = json.loads(json.dumps(r.to_dict()))
    assert info["source"]["ref"] == "local:cat@1" and info["delta_norm"] > 0


def test_run_build_with_a_loaded_encoder_and_recipe_files(tiny_sd1, tmp_path):
    from p2pz_directions.builder import recipes

    te = TextEncoder.from_pretrained(tiny_sd1)
    r = run_build("cat", "dog", text_encoder=te, captioner="templates", n=16, filter_options=FAST)
    assert r.encoder == te.info and "load_encoder" not in r.timings
    official = recipes.official_recipes()
    assert {"cat", "dog", "horse", "zebra"} <= set(official)
    for rec in official.values():
        assert rec.prompt == DEFAULT_PROMPT and rec.n == 1000 and rec.captioner == "flan-t5" and rec.models
    assert official["cat wearing a hat"].filter["mention"] == "cat hat"
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "cat"\n[captions]\ncolour = "red"\n', "utf-8")
    with pytest.raises(FormatError, match=r"bad.toml: unknown keys in \[captions\]: \['colour'\]"):
        recipes.load_recipe(bad)
    bad.write_text('name = "cat"\n[captions]\nprompt = "no placeholder"\n', "utf-8")
    with pytest.raises(FormatError, match="concept"):
        recipes.load_recipe(bad)
    with pytest.raises(NotFoundError, match="Did you mean: zebra"):
        recipes.get_recipe("zebr")


def test_benchmark_tiny_smoke(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_builder.py"
    spec = importlib.util.spec_from_file_location("bench_builder", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    args = ["--tiny", "--captions", "16", "--gen-batch-size", "16", "--new-tokens", "8", "--out", str(out)]
    assert bench.main(args) == 0
    res = json.loads(out.read_text("utf-8"))
    assert res["encoding"]["max_abs_diff_vs_loop"] < 1e-5 and res["build"]["kept"] == [16, 16]
