"""SDEdit editor: equal to diffusers' StableDiffusionImg2ImgPipeline given the same prompt embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz_directions import editors
from p2pz_directions.core.concept import Concept, Direction
from p2pz_directions.core.errors import P2PZError
from p2pz_directions.editing.editors import EditorOptionError
from p2pz_directions.editing.models import encoder_for

TOL = 1e-4
STEPS = 8


def _direction(model_dir, seed: int = 0) -> Direction:
    enc = encoder_for(model=str(model_dir))
    g = torch.Generator().manual_seed(seed)
    src = Concept("cat", torch.randn(77, enc.hidden_size, generator=g), enc)
    tgt = Concept("dog", torch.randn(77, enc.hidden_size, generator=g), enc)
    return Direction(src, tgt)


def _image(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


class FakeCaptioner:
    """Stands in for BLIP: records what it was asked, answers a fixed caption."""

    name = "fake"

    def __init__(self, text: str = "a photo of a cat"):
        self.text, self.calls = text, 0

    def caption(self, images):
        self.calls += 1
        return [self.text for _ in images]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def setup(request):
    from diffusers import StableDiffusionImg2ImgPipeline

    path = request.getfixturevalue(f"tiny_{request.param}")
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        str(path), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    cap = FakeCaptioner()
    ed = editors.get("sdedit", model=str(path), device="cpu", dtype=torch.float32, captioner=cap)
    return pipe, ed, cap, _direction(path)


def _encode(pipe, text):
    with torch.no_grad():
        return pipe.encode_prompt(text, "cpu", 1, False)[0]


def test_direction_mode_matches_img2img_with_the_edited_prompt(setup):
    """Caption (from the captioner) + delta as prompt_embeds: the same image as diffusers' img2img."""
    pipe, ed, cap, d = setup
    img = _image(32)
    ref = pipe(
        image=img,
        prompt_embeds=_encode(pipe, cap.text) + d.delta,
        strength=0.75,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    before = cap.calls
    steps = []
    res = ed.edit(
        img,
        d,
        strength=0.75,
        num_inference_steps=STEPS,
        seed=0,
        output_type="np",
        progress=lambda p, i, n: steps.append((p, i, n)),
    )
    assert cap.calls == before + 1 and res.caption == cap.text
    assert res.image.shape == ref.shape
    assert np.abs(res.image - ref).max() < TOL
    assert ("edit", int(STEPS * 0.75), int(STEPS * 0.75)) in steps and ("caption", 1, 1) in steps
    # the delta is applied: without it the image differs
    plain = pipe(
        image=img,
        prompt_embeds=_encode(pipe, cap.text),
        strength=0.75,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert np.abs(res.image - plain).max() > 1e-3


def test_target_mode_source_negative_eta_and_batch_match_img2img(setup):
    pipe, ed, cap, d = setup
    img = _image(32, seed=1)
    ref = pipe(
        image=img,
        prompt_embeds=d.target_embeds,
        negative_prompt_embeds=d.source_embeds,
        strength=0.5,
        eta=1.0,
        guidance_scale=5.0,
        num_images_per_prompt=2,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images
    res = ed.edit(
        img,
        d,
        mode="target",
        source_as_negative=True,
        strength=0.5,
        eta=1.0,
        guidance_scale=5.0,
        num_images_per_prompt=2,
        num_inference_steps=STEPS,
        seed=7,
        output_type="np",
    )
    assert res.caption is None and res.image.shape == ref.shape
    assert np.abs(res.image - ref).max() < TOL


def test_text_prompt_and_negative_prompt_match_img2img(tiny_sd1):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        str(tiny_sd1), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    d = _direction(tiny_sd1)
    ed = editors.get(
        "sdedit", model=str(tiny_sd1), device="cpu", dtype=torch.float32, captioner=FakeCaptioner()
    )
    img = _image(32, seed=2)
    ref = pipe(
        image=img,
        prompt_embeds=_encode(pipe, "a cat on a sofa") + d.delta,
        negative_prompt="blurry",
        strength=1.0,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(1),
        output_type="pt",
    ).images[0]
    res = ed.edit(
        img,
        d,
        prompt="a cat on a sofa",
        negative_prompt="blurry",
        strength=1.0,
        num_inference_steps=STEPS,
        seed=1,
        output_type="pt",
    )
    assert ed.captioner.calls == 0, "a given prompt is not re-captioned"
    assert (res.image - ref).abs().max().item() < TOL
    # a half-strength direction is a different edit
    half = ed.edit(
        img,
        d * 0.5,
        prompt="a cat on a sofa",
        strength=1.0,
        num_inference_steps=STEPS,
        seed=1,
        negative_prompt="blurry",
        output_type="pt",
    )
    assert (half.image - res.image).abs().max().item() > 1e-3


def test_callbacks_see_and_replace_latents(tiny_sd1):
    ed = editors.get("sdedit", model=str(tiny_sd1), device="cpu", dtype=torch.float32)
    d = _direction(tiny_sd1)
    seen, old = [], []

    def on_end(editor, i, t, tensors):
        seen.append(i)
        assert editor is ed
        return {"latents": torch.zeros_like(tensors["latents"])} if i == len(seen) - 1 else None

    res = ed.edit(
        _image(32),
        d,
        prompt="a cat",
        strength=0.5,
        num_inference_steps=STEPS,
        seed=0,
        output_type="latent",
        callback_on_step_end=on_end,
        callback=lambda i, t, lat: old.append(float(lat.abs().max())),
        callback_steps=2,
    )
    assert seen == list(range(int(STEPS * 0.5)))
    assert old == [0.0, 0.0], "the old-style callback sees the replaced latents every 2 steps"
    assert res.image.abs().max().item() == 0.0


def test_plugin_is_discovered():
    from p2pz_plugins.sdedit import SDEditEditor

    from p2pz_directions.editing import plugins

    assert {"diffedit", "sdedit"} <= set(editors.available())
    assert plugins.editors()["sdedit"] is SDEditEditor


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"strength": 0}, r"strength=0 is outside \(0, 1\]"),
        ({"strength": 1.01}, r"strength=1.01 is outside"),
        ({"strength": -1}, r"outside \(0, 1\]"),
        ({"strength": "much"}, r"'strength' of editor 'sdedit' must be float"),
        ({"strength": 0.1}, r"runs no step"),
        ({"mode": "sideways"}, r"mode must be 'direction' or 'target'"),
        ({"num_images_per_prompt": 0}, r"positive whole number"),
        ({"timesteps": [999, 500]}, r"does not take custom timesteps"),
        ({"callback_on_step_end_tensor_inputs": ["image"]}, r"may only hold latents, prompt_embeds"),
        ({"loops": "fast"}, r"loops must be 'auto', 'eager', 'graphs', 'compile'"),
        ({"loops": "graphs"}, r"loops='graphs' needs a CUDA device"),
    ],
)
def test_bad_option_values(tiny_sd1, opts, match):
    ed = editors.get("sdedit", model=str(tiny_sd1), device="cpu", dtype=torch.float32)
    with pytest.raises(P2PZError, match=match):  # a ValueError, or a TypeError for a value of the wrong type
        ed.edit(_image(32), _direction(tiny_sd1), prompt="a cat", num_inference_steps=STEPS, **opts)


def test_misuse_is_explained(tiny_sd1):
    ed = editors.get("sdedit", model=str(tiny_sd1), device="cpu", dtype=torch.float32)
    d = _direction(tiny_sd1)
    with pytest.raises(EditorOptionError, match="sdedit edits an existing image"):
        ed.edit(None, d, prompt="a cat")
    with pytest.raises(EditorOptionError, match="mode='target' conditions on the target concept alone"):
        ed.edit(_image(32), d, mode="target", prompt="a cat")
    with pytest.raises(EditorOptionError, match="not both"):
        ed.edit(_image(32), d, prompt="a cat", source_as_negative=True, negative_prompt="x")
    with pytest.raises(EditorOptionError, match="did you mean 'strength'"):
        ed.edit(_image(32), d, strenght=0.5)
    bad = editors.get("sdedit", model=str(tiny_sd1), device="cpu", captioner="no-such-captioner")
    with pytest.raises(EditorOptionError, match="pass prompt="):
        bad.edit(_image(32), d)
