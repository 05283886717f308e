"""Captioners: flan-t5 (tiny random T5 through the real generate path), templates, caption files."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from p2pz_directions.builder import captioners
from p2pz_directions.builder.captioners import (
    DEFAULT_PROMPT,
    Captioner,
    CaptionerError,
    FileCaptioner,
    FlanT5Captioner,
    TemplateCaptioner,
    get_captioner,
    read_caption_file,
    register_captioner,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    from tiny_t5 import make_tiny_t5

    return make_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


def _bias(path):
    from tiny_t5 import caption_bias

    return caption_bias(path)


# -- templates ---------------------------------------------------------------------------------------
def test_templates_deterministic_varied_and_about_the_concept():
    cap = TemplateCaptioner()
    a = next(cap("horse", n=50, seed=0))
    b = next(TemplateCaptioner()("horse", n=50, seed=0))
    c = next(cap("horse", n=50, seed=1))
    assert a == b and a != c
    assert len(a) == 50 and len(set(a)) == 50
    assert all("horse" in x for x in a)
    styles = {x.split(" of ")[0] for x in a if " of " in x}
    assert len(styles) >= 5  # photos, paintings, sketches...


def test_templates_articles_and_finite():
    cands = TemplateCaptioner().candidates("elephant")
    assert "a photo of an elephant in a field" in cands
    assert not any(" a elephant" in c for c in cands)
    batches = list(TemplateCaptioner()("elephant", n=1000, seed=0))
    assert sum(len(b) for b in batches) == len(cands) and len(batches) == -(-len(cands) // 1000)


def test_templates_bad_template_refused():
    with pytest.raises(CaptionerError, match=r"\{x\}"):
        TemplateCaptioner(styles=["a photo"])


# -- files -------------------------------------------------------------------------------------------
def test_file_lines_trimmed_blank_skipped_bom(tmp_path):
    p = tmp_path / "cats.txt"
    p.write_bytes("\ufeffa cat\n\n   a cat on a mat  \r\nsmall cat\n".encode())
    assert read_caption_file(p) == ["a cat", "a cat on a mat", "small cat"]
    cap = FileCaptioner(p)
    assert list(cap("cat", n=1)) == [["a cat", "a cat on a mat", "small cat"]]
    s = cap.settings()
    assert s["captioner"] == "file" and s["lines"] == 3 and s["file"] == "cats.txt" and len(s["sha256"]) == 64


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"\n  \n\t\n", "empty"),
        (b"a cat\n\xff\xfe dog\n", r"not UTF-8.*line 2"),
        (b"a\x00b", "NUL"),
    ],
)
def test_file_bad_contents(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(CaptionerError, match=match):
        FileCaptioner(p)


def test_file_missing_or_folder(tmp_path):
    with pytest.raises(CaptionerError, match="does not exist"):
        read_caption_file(tmp_path / "nope.txt")
    with pytest.raises(CaptionerError, match="folder"):
        read_caption_file(tmp_path)


def test_file_from_list():
    assert next(FileCaptioner(["a cat", "two cats"])("cat", n=5)) == ["a cat", "two cats"]
    with pytest.raises(CaptionerError, match="empty"):
        FileCaptioner(["", "  "])


# -- registry ----------------------------------------------------------------------------------------
def test_registry_unknown_and_plugins(monkeypatch):
    with pytest.raises(CaptionerError, match=r"unknown captioner 'flan-t4'.*Did you mean 'flan-t5'"):
        get_captioner("flan-t4")
    monkeypatch.setattr(captioners, "CAPTIONERS", dict(captioners.CAPTIONERS))

    class Fixed:
        name = "fixed"

        def __init__(self, word="x"):
            self.word = word

        def settings(self):
            return {"captioner": "fixed", "word": self.word}

        def __call__(self, concept, *, n, seed=0):
            yield [f"{self.word} {concept}"] * n

    register_captioner("fixed", Fixed)
    cap = get_captioner("Fixed", word="a")
    assert isinstance(cap, Captioner) and next(cap("cat", n=2)) == ["a cat", "a cat"]
    assert "fixed" in captioners.available_captioners()
    with pytest.raises(CaptionerError, match="already registered"):
        register_captioner("fixed", Fixed)
    with pytest.raises(CaptionerError, match="does not take"):
        get_captioner("fixed", colour="red")
    assert isinstance(TemplateCaptioner(), Captioner) and isinstance(FileCaptioner(["a"]), Captioner)


# -- flan-t5 -----------------------------------------------------------------------------------------
def test_flan_prompt_is_the_full_sentence_for_both_sides(tiny_t5):
    cap = FlanT5Captioner(str(tiny_t5), batch_size=4, max_new_tokens=4)
    assert cap.format_prompt("dog") == DEFAULT_PROMPT.replace("{concept}", "dog")
    assert cap.format_prompt("dog").startswith("Provide a caption for images containing a dog. The captions")
    cap.load()
    seen = []
    real = cap._tokenizer

    class Spy:
        def __getattr__(self, k):
            return getattr(real, k)

        def __call__(self, text, **kw):
            seen.append(text)
            return real(text, **kw)

    cap._tokenizer = Spy()
    for concept in ("cat", "dog"):
        next(cap(concept, n=4, seed=0))
    assert seen == [DEFAULT_PROMPT.format(concept="cat"), DEFAULT_PROMPT.format(concept="dog")]


def test_flan_generate_is_seeded_and_leaves_global_rng_alone(tiny_t5):
    kw = dict(batch_size=16, max_new_tokens=12, generate_kwargs={"sequence_bias": _bias(tiny_t5)})
    a = FlanT5Captioner(str(tiny_t5), **kw)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    g = a("cat", n=10, seed=7)
    first, second = next(g), next(g)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = FlanT5Captioner(str(tiny_t5), **kw)
    g2 = b("cat", n=10, seed=7)
    assert next(g2) == first and next(g2) == second
    assert first != second  # batches get their own seeds
    assert next(FlanT5Captioner(str(tiny_t5), **kw)("cat", n=10, seed=8)) != first
    assert sum("cat" in c.split() for c in first) >= 4
    assert a.dropped["truncated"] == 32 - len(first) - len(second)


def test_flan_truncated_samples_are_counted_not_returned(tiny_t5):
    cap = FlanT5Captioner(str(tiny_t5), batch_size=8, max_new_tokens=2)
    batch = next(cap("cat", n=8, seed=0))
    assert isinstance(cap.dropped, Counter)
    assert cap.dropped["truncated"] + len(batch) == 8 and cap.dropped["truncated"] > 0


def test_flan_settings_are_json_and_validated(tiny_t5):
    cap = FlanT5Captioner(
        str(tiny_t5), temperature=0.5, top_k=5, generate_kwargs={"sequence_bias": {(4,): 1.0}}, batch_size=3
    )
    s = json.loads(json.dumps(cap.settings()))
    assert (
        s["temperature"] == 0.5 and s["top_k"] == 5 and s["batch_size"] == 3 and s["prompt"] == DEFAULT_PROMPT
    )
    assert s["dtype"] == "float32" and s["device_type"] == "cpu"
    with pytest.raises(CaptionerError, match=r"\{concept\}"):
        FlanT5Captioner(str(tiny_t5), prompt="a caption please")
    with pytest.raises(CaptionerError, match="temperature"):
        FlanT5Captioner(str(tiny_t5), temperature=0)


def test_flan_missing_model_is_a_clear_error(tmp_path):
    cap = FlanT5Captioner(str(tmp_path / "no-such-model"))
    with pytest.raises(CaptionerError, match="cannot load caption model .*--captioner templates"):
        next(cap("cat", n=4))


def test_flan_keep_truncated_for_fixed_length_timing(tiny_t5):
    cap = FlanT5Captioner(
        str(tiny_t5),
        batch_size=8,
        max_new_tokens=5,
        generate_kwargs={"min_new_tokens": 5},
        keep_truncated=True,
    )
    batch = next(cap("cat", n=8, seed=0))
    assert len(batch) == 8 and cap.dropped["truncated"] == 0 and cap.settings()["keep_truncated"] is True


def test_captioner_from_a_plugin_hook():
    from p2pz_directions.editing import plugins
    from p2pz_directions.editing.hookspecs import hookimpl

    class Echo:
        name = "echo"

        def __init__(self, prefix="a photo of"):
            self.prefix = prefix

        def generate(self, concept, n, seed=0):
            return [f"{self.prefix} {concept} {i + seed}" for i in range(n)]

    class Plugin:
        @hookimpl
        def p2pz_register_captioners(self):
            return [Echo]

    name = plugins.register(Plugin(), name="test-echo-captioner")
    try:
        assert "echo" in captioners.available_captioners()
        cap = get_captioner("echo", prefix="a drawing of")
        assert isinstance(cap, Captioner)
        assert next(cap("cat", n=2, seed=1)) == ["a drawing of cat 1", "a drawing of cat 2"]
        assert cap.settings()["captioner"] == "echo"
    finally:
        plugins.unregister(name)
    assert "echo" not in captioners.available_captioners()
    # the built-ins honour the hook's contract too
    assert TemplateCaptioner().generate("cat", 3, seed=0) == TemplateCaptioner().candidates("cat", 0)[:3]
    assert FileCaptioner(["a cat", "b cat", "c cat"]).generate("cat", 2) == ["a cat", "b cat"]
