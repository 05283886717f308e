"""The Editor base class and images.py: names, encoders, options, images of any mode and size."""

from __future__ import annotations

import dataclasses
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz_directions import editors
from p2pz_directions.core.concept import Concept, Direction, EncoderInfo
from p2pz_directions.core.errors import EncoderMismatchError, NotFoundError
from p2pz_directions.core.store import LocalStore
from p2pz_directions.editing import plugins
from p2pz_directions.editing.editors import Editor, EditorError, EditorOptionError, EditResult, parse_dtype
from p2pz_directions.editing.hookspecs import hookimpl
from p2pz_directions.editing.images import (
    ImageError,
    ImageResizedWarning,
    fit_to_multiple,
    load_image,
    prepare_image,
    side_by_side,
)
from p2pz_directions.editing.models import encoder_for


def publish_pair(folder, names=("cat", "dog"), pack="local", seed=0) -> Direction:
    """Concepts with random [77, D] embeddings for the tiny model's encoder, published; their direction."""
    enc = encoder_for(model=str(folder))
    g = torch.Generator().manual_seed(seed)
    store = LocalStore()
    cs = [
        store.publish(Concept(n, torch.randn(77, enc.hidden_size, generator=g), enc), pack=pack)
        for n in names
    ]
    return Direction(cs[0], cs[1])


class Recorder(Editor):
    """Records what run() got; refuses to load models (so tests see whether model work started)."""

    name = "recorder"
    phases = ("edit",)
    memory_advice = "try the smaller-memory option XYZ"

    def run(self, image, direction, *, seed: int = 0, strength: float = 0.5, oom: bool = False):
        if oom:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.progress("edit", 1, 1)
        return EditResult(image=image, original=image, extra={"got": (image, direction, seed, strength)})

    def load_components(self, names=None):  # pragma: no cover - must not be reached in these tests
        raise AssertionError("model work started")


@pytest.fixture
def recorder():
    class P:
        @hookimpl
        def p2pz_register_editors(self):
            return [Recorder]

    plugins.reset()
    plugins.register(P(), name="recorder-plugin")
    yield
    plugins.reset()


def test_available_and_unknown_editor():
    assert "pix2pix-zero" in editors.available()
    with pytest.raises(NotFoundError) as ei:
        editors.get("pix2pix-zer0", model="x")
    assert "installed editors" in str(ei.value) and "pix2pix-zero" in str(ei.value)
    assert ei.value.suggestions[0] == "pix2pix-zero"


def test_editor_needs_a_model():
    with pytest.raises(EditorOptionError, match="needs a model"):
        editors.get("pix2pix-zero")


def test_unknown_constructor_option_is_refused(tiny_sd1):
    with pytest.raises(EditorOptionError, match="when created"):
        Recorder(str(tiny_sd1), colour="red")


def test_direction_by_name_and_image_conversion(tiny_sd1, recorder):
    publish_pair(tiny_sd1)
    ed = editors.get("recorder", model=str(tiny_sd1), device="cpu")
    assert ed.encoder_info == encoder_for(model=str(tiny_sd1))
    rgba = Image.new("RGBA", (37, 45), (255, 0, 0, 0))
    calls = []
    with pytest.warns(ImageResizedWarning, match="37x45 -> 32x40"):
        res = ed.edit(rgba, "cat->dog", seed=3, progress=lambda *a: calls.append(a))
    image, direction, seed, strength = res.extra["got"]
    assert image.mode == "RGB" and image.size == (32, 40)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert (
        isinstance(direction, Direction) and direction.source.name == "cat" and direction.target.name == "dog"
    )
    assert (seed, strength) == (3, 0.5)
    assert res.extra["notes"] == ["resized 37x45 -> 32x40 (sides must be multiples of 8)"]
    assert res.extra["editor"] == "recorder" and res.extra["direction"] == direction.name
    assert calls == [("edit", 1, 1)]


def test_unknown_direction_suggests_close_names(tiny_sd1, recorder):
    publish_pair(tiny_sd1, names=("cat", "dog", "horse"))
    ed = editors.get("recorder", model=str(tiny_sd1), device="cpu")
    with pytest.raises(NotFoundError) as ei:
        ed.edit(Image.new("RGB", (16, 16)), "cat->dgo")
    assert "dog" in str(ei.value)


def test_encoder_mismatch_is_refused_before_model_work(tiny_sd1, tiny_sd2):
    d2 = publish_pair(tiny_sd2)  # concepts of the sd2 text encoder
    ed = editors.get("pix2pix-zero", model=str(tiny_sd1), device="cpu")

    def boom(*a, **k):
        raise AssertionError("model work started")

    ed.load_components = boom
    with pytest.raises(EncoderMismatchError, match="was built for text encoder"):
        ed.edit(Image.new("RGB", (32, 32)), d2, prompt="a cat")
    # a direction of a different encoder with the same name: resolution by name also refuses
    with pytest.raises((EncoderMismatchError, NotFoundError)):
        ed.edit(Image.new("RGB", (32, 32)), "cat->dog", prompt="a cat")


def test_misspelt_option_says_what_it_takes(tiny_sd1, recorder):
    d = publish_pair(tiny_sd1)
    ed = editors.get("recorder", model=str(tiny_sd1), device="cpu")
    with pytest.raises(EditorOptionError, match=r"'strenght' \(did you mean 'strength'\?\)"):
        ed.edit(Image.new("RGB", (16, 16)), d, strenght=0.3)


def test_out_of_memory_says_what_lowers_memory(tiny_sd1, recorder):
    d = publish_pair(tiny_sd1)
    ed = editors.get("recorder", model=str(tiny_sd1), device="cpu")
    with pytest.raises(EditorError, match="out of memory.*smaller-memory option XYZ"):
        ed.edit(Image.new("RGB", (16, 16)), d, oom=True)


def test_pipe_identity_and_unknown_pipe(tiny_sd1, recorder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(tiny_sd1), safety_checker=None, requires_safety_checker=False
    )
    ed = editors.get("recorder", pipe=pipe)
    assert ed.encoder_info == encoder_for(model=str(tiny_sd1))
    assert ed.device == pipe.device and ed.dtype == pipe.dtype
    assert "pipeline" in ed.model_label

    class Anonymous:  # a pipeline whose origin we cannot tell
        device = torch.device("cpu")
        dtype = torch.float32
        text_encoder = pipe.text_encoder

    saved = pipe.text_encoder.config._name_or_path
    pipe.text_encoder.config._name_or_path = ""
    try:
        ed = editors.get("recorder", pipe=Anonymous())
        assert ed.encoder_info.id.startswith("unknown/") and ed.encoder_info.hidden_size == 32
        d = publish_pair(tiny_sd1)
        with pytest.warns(UserWarning, match="only its size was checked"):
            ed.edit(Image.new("RGB", (16, 16)), d)
        bad = Direction(
            Concept("a", torch.zeros(77, 64), EncoderInfo("x", 64)),
            Concept("b", torch.zeros(77, 64), EncoderInfo("x", 64)),
        )
        with pytest.raises(EncoderMismatchError, match="D=64"):
            ed.edit(Image.new("RGB", (16, 16)), bad)
    finally:
        pipe.text_encoder.config._name_or_path = saved


def test_parse_dtype():
    assert parse_dtype("fp16") is torch.float16
    assert parse_dtype("torch.bfloat16") is torch.bfloat16
    assert parse_dtype(None) is None
    with pytest.raises(EditorOptionError, match="unknown dtype"):
        parse_dtype("int8")


# -- images -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (16, 24), 128),
        lambda: Image.new("LA", (16, 24), (10, 255)),
        lambda: Image.new("1", (16, 24), 1),
        lambda: Image.new("CMYK", (16, 24), (0, 0, 0, 0)),
        lambda: Image.new("I;16", (16, 24), 65535),
        lambda: Image.new("F", (16, 24), 0.5),
        lambda: Image.new("RGB", (16, 24), (1, 2, 3)).convert("P"),
    ],
    ids=["L", "LA", "1", "CMYK", "I16", "F", "P"],
)
def test_any_mode_becomes_rgb(make, tmp_path):
    img = make()
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (16, 24)
    if img.mode in ("I;16", "1"):
        assert out.getpixel((0, 0)) == (255, 255, 255)
    if img.mode != "CMYK":  # file round trip too
        path = tmp_path / "x.png" if img.mode != "F" else tmp_path / "x.tiff"
        img.save(path)
        assert load_image(path).mode == "RGB"


def test_palette_with_transparency_is_laid_on_white(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (200, 10, 10)


def test_arrays_and_tensors():
    arr = np.zeros((16, 8, 3), np.uint8)
    arr[..., 0] = 255
    assert load_image(arr).getpixel((0, 0)) == (255, 0, 0)
    t = torch.zeros(1, 3, 16, 8)
    t[:, 1] = 1.0
    assert load_image(t).getpixel((0, 0)) == (0, 255, 0)
    assert load_image(np.full((4, 4), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(ImageError, match=r"\[H, W\]"):
        load_image(np.zeros((2, 2, 2, 2)))
    with pytest.raises(ImageError, match="cannot use a dict"):
        load_image({})


def test_not_an_image(tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("hello, I am text", "utf-8")
    with pytest.raises(ImageError, match="is not an image .a text file."):
        load_image(txt)
    binary = tmp_path / "blob.jpg"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ImageError, match="not an image format Pillow can read"):
        load_image(binary)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    trunc = tmp_path / "trunc.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:60])
    with pytest.raises(ImageError, match="cannot read image|not an image"):
        load_image(trunc)


def test_odd_sizes_are_resized_with_a_note():
    img = Image.new("RGB", (515, 300))
    with pytest.warns(ImageResizedWarning):
        out, note = fit_to_multiple(img, 8)
    assert out.size == (512, 296)
    assert note == "resized 515x300 -> 512x296 (sides must be multiples of 8)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same, none = prepare_image(Image.new("RGB", (64, 32)))
    assert same.size == (64, 32) and none is None
    with pytest.raises(ImageError, match="at least 8 pixels"):
        fit_to_multiple(Image.new("RGB", (5, 64)))


def test_side_by_side():
    a, b = Image.new("RGB", (10, 20), "red"), Image.new("RGB", (5, 10), "blue")
    s = side_by_side([a, b], gap=2)
    assert s.size == (10 + 2 + 10, 20)
    assert s.getpixel((15, 5)) == (0, 0, 255)


# -- editors with an options dataclass -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Opts:
    strength: float = dataclasses.field(default=0.5, metadata={"help": "how much"})
    steps: int = dataclasses.field(default=10, metadata={"help": "steps"})
    mode: str | None = dataclasses.field(default=None, metadata={"help": "a name"})


class OptRecorder(Editor):
    """Records what run() got (options dataclass style)."""

    name = "opt-recorder"
    options = _Opts

    def run(self, images, direction, o):
        return EditResult(image=images, extra={"got": (images, direction, o)})


@pytest.fixture
def opt_recorder():
    class P:
        @hookimpl
        def p2pz_register_editors(self):
            return [OptRecorder]

    plugins.reset()
    plugins.register(P(), name="opt-recorder-plugin")
    yield
    plugins.reset()


def test_options_dataclass_names_and_types(tiny_sd1, opt_recorder):
    d = publish_pair(tiny_sd1)
    ed = editors.get("opt-recorder", model=str(tiny_sd1), device="cpu")
    assert ed.option_names() == ["strength", "steps", "mode"]
    assert {f.name: f.metadata["help"] for f in dataclasses.fields(ed.options)}["strength"] == "how much"
    images, direction, o = ed.edit(Image.new("RGB", (16, 16)), d, strength=1, mode="x").extra["got"]
    assert o == _Opts(strength=1, steps=10, mode="x") and len(images) == 1
    with pytest.raises(
        EditorOptionError, match=r"'strenght' \(did you mean 'strength'\?\); it takes: strength, steps, mode"
    ):
        ed.edit(None, d, strenght=0.3)
    with pytest.raises(
        EditorOptionError, match="option 'steps' of editor 'opt-recorder' must be int, not float"
    ):
        ed.edit(None, d, steps=2.5)
    with pytest.raises(EditorOptionError, match="must be float, not str"):
        ed.edit(None, d, strength="0.3")
    with pytest.raises(EditorOptionError, match="must be str | None, not int"):
        ed.edit(None, d, mode=3)


def test_lists_of_images_and_directions(tiny_sd1, opt_recorder, tmp_path):
    d = publish_pair(tiny_sd1)
    e = publish_pair(tiny_sd1, names=("day", "night"), seed=1)
    ed = editors.get("opt-recorder", model=str(tiny_sd1), device="cpu")
    path = tmp_path / "p.png"
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(path)
    arr = np.zeros((16, 16, 3), np.float32)
    images, direction, _ = ed.edit([path, arr, torch.zeros(3, 16, 16)], ["cat->dog", e]).extra["got"]
    assert images[0].mode == "RGB" and images[1] is arr and images[2].shape == (3, 16, 16)  # arrays untouched
    assert torch.equal(direction.delta, d.delta + e.delta)
    with pytest.raises(EditorOptionError, match="at least one direction"):
        ed.edit(None, [])


def test_legacy_editor_edits_a_list_one_by_one(tiny_sd1, recorder):
    d = publish_pair(tiny_sd1)
    ed = editors.get("recorder", model=str(tiny_sd1), device="cpu")
    res = ed.edit([Image.new("RGB", (16, 16)), Image.new("RGB", (24, 16))], d)
    assert [im.size for im in res.image] == [(16, 16), (24, 16)] and len(res.images) == 2


def _docs_example() -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text("utf-8")
    block = text.split("<!-- example: nudge-editor -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_docs_plugins_example_editor_runs_and_equals_img2img(tiny_sd1, monkeypatch):
    """docs/plugins.md's 40-line editor on p2pz_directions.sampling: it runs as a plugin, and equals
    diffusers' StableDiffusionImg2ImgPipeline given prompt + delta as its prompt embeddings."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from p2pz_directions.sampling import encode_prompt

    code = _docs_example()
    body = code.split("class NudgeEditor", 1)[1]
    assert len([ln for ln in body.splitlines() if ln.strip()]) <= 40
    module = types.ModuleType("nudge_example")
    monkeypatch.setitem(sys.modules, "nudge_example", module)  # dataclasses look their module up
    exec(compile(code, "docs/plugins.md", "exec"), module.__dict__)  # noqa: S102 - our own docs
    plugins.reset()
    plugins.register(module, name="nudge-example")
    try:
        d = publish_pair(tiny_sd1)
        ed = editors.get("nudge", model=str(tiny_sd1), device="cpu", dtype=torch.float32)
        img = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
        kw = dict(prompt="a cat", strength=0.7, num_inference_steps=4, seed=0, output_type="np")
        res = ed.edit(img, "cat->dog", **kw)
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            str(tiny_sd1), safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        pos, neg = encode_prompt(
            pipe.tokenizer, pipe.text_encoder, "a cat", "cpu", do_classifier_free_guidance=True
        )
        expected = pipe(
            image=img, prompt_embeds=pos + d.delta, negative_prompt_embeds=neg, strength=0.7, num_inference_steps=4,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images  # fmt: skip
        assert res.image.shape == expected.shape == (1, 32, 32, 3)
        assert float(np.abs(res.image - expected).max()) < 1e-4
        assert float(np.abs(ed.edit(img, d * 0.0, **kw).image - expected).max()) > 1e-3  # the direction acts
    finally:
        plugins.reset()
