"""``Direction.diffusers_kwargs(pipe)``: diffusers' own pipelines, called with them, equal our editors.

Each test runs a diffusers pipeline on a tiny model with ``**d.diffusers_kwargs(pipe)`` and the
matching editor of ours with the direction; CPU fp32; max abs diff < 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz_directions import directions, editors
from p2pz_directions.core.concept import Concept, Direction
from p2pz_directions.core.errors import EncoderMismatchError, FormatError
from p2pz_directions.core.store import LocalStore
from p2pz_directions.editing.models import encoder_for

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4


def _publish(folder, seed: int = 0) -> Direction:
    enc = encoder_for(model=str(folder))
    g = torch.Generator().manual_seed(seed)
    store = LocalStore()
    a, b = (
        store.publish(Concept(n, torch.randn(77, enc.hidden_size, generator=g), enc)) for n in ("cat", "dog")
    )
    return Direction(a, b)


def _image(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


def _load(cls, folder, **kw):
    pipe = cls.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_load_by_name_with_a_pipeline_object(tiny_sd1, tiny_sd2):
    from diffusers import StableDiffusionImg2ImgPipeline

    _publish(tiny_sd1)
    pipe = _load(StableDiffusionImg2ImgPipeline, tiny_sd1)
    d = directions.load("cat->dog", model=pipe)
    assert d.encoder.id == encoder_for(model=str(tiny_sd1)).id
    assert directions.load(d, model=pipe) is d
    other = _load(StableDiffusionImg2ImgPipeline, tiny_sd2)
    with pytest.raises(EncoderMismatchError):
        d.diffusers_kwargs(other)
    with pytest.raises(EncoderMismatchError):
        directions.load(d, model=other)
    pipe.to(torch.float64)
    kw = d.diffusers_kwargs(pipe)
    assert kw["prompt_embeds"].dtype == torch.float64 and kw["negative_prompt_embeds"].dtype == torch.float64
    assert torch.equal(kw["prompt_embeds"][0].float(), d.target.embedding.float())


def test_unknown_pipeline_and_method_are_refused(tiny_sd1):
    from diffusers import StableDiffusionDiffEditPipeline, StableDiffusionPipeline

    d = _publish(tiny_sd1)
    with pytest.raises(FormatError, match="supports"):
        d.diffusers_kwargs(StableDiffusionPipeline)
    with pytest.raises(FormatError, match="generate_mask"):
        d.diffusers_kwargs(StableDiffusionDiffEditPipeline, "encode")
    assert set(d.diffusers_kwargs(StableDiffusionDiffEditPipeline, "generate_mask")) == {
        "source_prompt_embeds",
        "target_prompt_embeds",
    }


def test_pix2pix_zero(tiny_sd1):
    from diffusers import StableDiffusionPix2PixZeroPipeline

    d = _publish(tiny_sd1)
    pipe = _load(
        StableDiffusionPix2PixZeroPipeline, tiny_sd1, caption_generator=None, caption_processor=None,
        inverse_scheduler=None, feature_extractor=None,
    )  # fmt: skip
    common = dict(num_inference_steps=2, cross_attention_guidance_amount=0.1, output_type="np")
    ref = pipe(
        "a photo of a cat", **d.diffusers_kwargs(pipe), generator=torch.Generator().manual_seed(0), height=32,
        width=32, **common,
    ).images  # fmt: skip
    ed = editors.get("pix2pix-zero", model=str(tiny_sd1), device="cpu", dtype=torch.float32)
    ours = ed.edit(None, d, prompt="a photo of a cat", seed=0, height=32, width=32, **common).image
    assert np.abs(np.asarray(ours).reshape(ref.shape) - ref).max() < TOL


def test_img2img(tiny_sd2):
    from diffusers import StableDiffusionImg2ImgPipeline

    d = _publish(tiny_sd2)
    pipe = _load(StableDiffusionImg2ImgPipeline, tiny_sd2)
    img = _image()
    kw = dict(strength=0.75, num_inference_steps=4, output_type="np")
    ref = pipe(
        image=img, **d.diffusers_kwargs(pipe), generator=torch.Generator().manual_seed(0), **kw
    ).images[0]
    ed = editors.get("sdedit", model=str(tiny_sd2), device="cpu", dtype=torch.float32)
    ours = ed.edit(img, d, mode="target", source_as_negative=True, seed=0, **kw).image
    assert np.abs(ours - ref).max() < TOL


def test_diffedit(tiny_sd1):
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline

    d = _publish(tiny_sd1)
    pipe = _load(StableDiffusionDiffEditPipeline, tiny_sd1)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.inverse_scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    img, gen, steps = _image(), torch.Generator().manual_seed(0), 6
    mask = pipe.generate_mask(
        image=img, **d.diffusers_kwargs(pipe, "generate_mask"), num_maps_per_mask=3, num_inference_steps=steps,
        generator=gen,
    )  # fmt: skip
    inv = pipe.invert(
        image=img, **d.diffusers_kwargs(pipe, "invert"), num_inference_steps=steps, generator=gen
    )
    ref = pipe(
        **d.diffusers_kwargs(pipe), mask_image=mask, image_latents=inv.latents, num_inference_steps=steps,
        generator=gen, output_type="np",
    ).images[0]  # fmt: skip
    ed = editors.get("diffedit", model=str(tiny_sd1), device="cpu", dtype=torch.float32)
    ours = ed.edit(img, d, seed=0, num_maps_per_mask=3, num_inference_steps=steps, output_type="np").image
    assert np.abs(ours - ref).max() < TOL


def test_ledits(tiny_sd1):
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusion

    d = _publish(tiny_sd1)
    pipe = _load(LEditsPPPipelineStableDiffusion, tiny_sd1)
    dpm = dict(algorithm_type="sde-dpmsolver++", solver_order=2)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **dpm)
    img = _image(64)
    pipe.invert(img, num_inversion_steps=4, skip=0.2, generator=torch.Generator().manual_seed(0))
    both = d + directions.load("dog->cat", model=pipe) * -0.5  # several terms, a negative weight
    ref = pipe(**both.diffusers_kwargs(pipe), output_type="np").images[0]
    ed = editors.get("ledits", model=str(tiny_sd1), device="cpu", dtype=torch.float32)
    comps = ed.load_components()
    ed._components["scheduler"] = DPMSolverMultistepScheduler.from_config(comps["scheduler"].config, **dpm)
    ours = ed.edit(
        img, both, use_intersect_mask=False, num_inversion_steps=4, skip=0.2, output_type="np"
    ).image
    assert np.abs(ours - ref).max() < TOL
