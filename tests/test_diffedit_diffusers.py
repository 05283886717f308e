"""diffusers' own fast tests of ``StableDiffusionDiffEditPipeline``, re-run against our DiffEdit editor.

Each case builds diffusers' dummy components (``get_dummy_components`` of
``tests/pipelines/stable_diffusion_diffedit/test_stable_diffusion_diffedit.py``: a 32-px UNet with
linear projections, VAE, CLIP text model, DDIM + DDIM-inverse schedulers; our tokenizer is built
offline), runs ``generate_mask`` / ``invert`` / ``__call__`` with the test's inputs, then our editor
on the same pipeline object (``pipe=``), and asserts max abs diff < 1e-4 on CPU fp32 (masks: equal).
The builders shared with the other ported fast tests are in tests/diffusers_dummies.py.
"""

from __future__ import annotations

import random

import diffusers_dummies
import numpy as np
import pytest
import torch
from diffusers_dummies import SCHED_ARGS, floats_tensor, frozen, random_direction
from PIL import Image

from p2pz_directions import editors
from p2pz_directions.core.concept import Direction, EncoderInfo

TOL = 1e-4
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:cannot tell which text encoder"),
]


def dummy_components(tokenizer) -> dict:
    """DiffEdit's: linear projections and head dims (2, 4), a GELU text encoder, DDIM + DDIM-inverse."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    return diffusers_dummies.dummy_components(
        tokenizer,
        unet={"attention_head_dim": (2, 4), "use_linear_projection": True},
        vae={"sample_size": 128},
        text_encoder={"hidden_act": "gelu", "projection_dim": 512},
        scheduler=DDIMScheduler(**SCHED_ARGS, clip_sample=False, set_alpha_to_one=False),
        inverse_scheduler=DDIMInverseScheduler(**SCHED_ARGS, clip_sample=False, set_alpha_to_zero=False),
    )


def dummy_image(seed: int = 0) -> Image.Image:
    """diffusers' test image: floats in [0, 1) cast to uint8 (so almost black); we add a gradient."""
    x = floats_tensor((1, 3, 32, 32), random.Random(seed)).permute(0, 2, 3, 1)[0].numpy()
    return Image.fromarray(np.uint8(x * 255)).convert("RGB")


def make_pipe(components: dict, scheduler=None, inverse_scheduler=None):
    from diffusers import StableDiffusionDiffEditPipeline

    pipe = StableDiffusionDiffEditPipeline(**components, requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = scheduler
    if inverse_scheduler is not None:
        pipe.inverse_scheduler = inverse_scheduler
    return frozen(pipe)


def direction(dim: int = 32) -> Direction:
    return random_direction(EncoderInfo("unknown/clip_text_model-d32", dim, "clip_text_model-d32"))


def editor(pipe):
    return editors.get("diffedit", pipe=pipe, device="cpu", dtype=torch.float32)


def dpm_pipe(tokenizer):
    from diffusers import DPMSolverMultistepInverseScheduler, DPMSolverMultistepScheduler

    return make_pipe(
        dummy_components(tokenizer),
        scheduler=DPMSolverMultistepScheduler(**SCHED_ARGS),
        inverse_scheduler=DPMSolverMultistepInverseScheduler(**SCHED_ARGS),
    )


# --- the fast tests of diffusers ----------------------------------------------------------------
def test_mask(tokenizer):
    pipe = make_pipe(dummy_components(tokenizer))
    img = dummy_image()
    kw = {
        "num_inference_steps": 2,
        "num_maps_per_mask": 2,
        "mask_encode_strength": 1.0,
        "guidance_scale": 6.0,
    }
    ref = pipe.generate_mask(
        image=img,
        source_prompt="a cat and a frog",
        target_prompt="a dog and a newt",
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    )
    res = editor(pipe).edit(
        img,
        direction(),
        source_prompt="a cat and a frog",
        target_prompt="a dog and a newt",
        generator=torch.Generator().manual_seed(0),
        mask_only=True,
        **kw,
    )
    assert ref.shape == (1, 16, 16)
    assert np.array_equal(res.extra["latent_mask"][0, 0].numpy(), ref[0])


@pytest.mark.parametrize("sched", ["ddim", "dpm"])
def test_inversion(tokenizer, sched):
    pipe = make_pipe(dummy_components(tokenizer)) if sched == "ddim" else dpm_pipe(tokenizer)
    img = dummy_image()
    kw = {"num_inference_steps": 2, "inpaint_strength": 1.0, "guidance_scale": 6.0}
    ref = pipe.invert(
        image=img,
        prompt="a cat and a frog",
        generator=torch.Generator().manual_seed(0),
        decode_latents=True,
        output_type="np",
        **kw,
    )
    res = editor(pipe).edit(
        img,
        direction(),
        prompt="a cat and a frog",
        mask=np.ones((16, 16), np.float32),
        generator=torch.Generator().manual_seed(0),
        decode_latents=True,
        output_type="np",
        **kw,
    )
    assert ref.images.shape == (2, 32, 32, 3)
    assert (res.inverted_latents - ref.latents).abs().max().item() < TOL
    assert np.abs(np.asarray(res.extra["inversion_images"]) - ref.images).max() < TOL


@pytest.mark.parametrize("sched", ["ddim", "dpm"])
def test_call_with_mask_and_latents(tokenizer, sched):
    """diffusers' get_dummy_inputs: a random (non-binary) mask and random inverted latents."""
    pipe = make_pipe(dummy_components(tokenizer)) if sched == "ddim" else dpm_pipe(tokenizer)
    mask = floats_tensor((1, 16, 16), random.Random(0))
    latents = floats_tensor((1, 2, 4, 16, 16), random.Random(0))
    kw = {"num_inference_steps": 2, "inpaint_strength": 1.0, "guidance_scale": 6.0, "output_type": "np"}
    ref = pipe(
        prompt="a dog and a newt",
        mask_image=mask.clone(),
        image_latents=latents.clone(),
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).images
    res = editor(pipe).edit(
        dummy_image(),
        direction(),
        target_prompt="a dog and a newt",
        negative_prompt="",
        mask=mask.clone(),
        image_latents=latents.clone(),
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    assert ref.shape == (1, 32, 32, 3)
    assert np.abs(np.asarray(res.images) - ref).max() < TOL


# --- the whole recipe, on each scheduler pair it takes --------------------------------------------
def _recipe_reference(pipe, img, d, gen, mask=None, **kw):
    mask = (
        mask
        if mask is not None
        else pipe.generate_mask(
            image=img,
            source_prompt_embeds=d.source_embeds,
            target_prompt_embeds=d.target_embeds,
            num_maps_per_mask=2,
            num_inference_steps=kw["num_inference_steps"],
            generator=gen,
        )
    )
    inv = pipe.invert(
        image=img,
        prompt_embeds=d.source_embeds,
        num_inference_steps=kw["num_inference_steps"],
        inpaint_strength=kw["inpaint_strength"],
        generator=gen,
    ).latents
    out = pipe(
        prompt_embeds=d.target_embeds,
        negative_prompt_embeds=d.source_embeds,
        mask_image=mask,
        image_latents=inv,
        generator=gen,
        **kw,
    ).images
    return mask, inv, out


@pytest.mark.parametrize("sched", ["ddim", "dpm", "ddim_custom_inverse"])
def test_recipe_matches_on_each_scheduler_pair(tokenizer, sched):
    from diffusers import DDIMInverseScheduler

    if sched == "dpm":
        pipe = dpm_pipe(tokenizer)
    elif sched == "ddim":
        pipe = make_pipe(dummy_components(tokenizer))
    else:  # an inverse scheduler configured unlike the forward one: it must be used as it is
        inv = DDIMInverseScheduler(**SCHED_ARGS, clip_sample=False, timestep_spacing="trailing")
        pipe = make_pipe(dummy_components(tokenizer), inverse_scheduler=inv)
    img = dummy_image()
    d = direction()
    kw = {"num_inference_steps": 5, "inpaint_strength": 0.8, "output_type": "np", "eta": 0.0}
    # diffusers' generate_mask fails with DPMSolverMultistepScheduler (see the next test): a given mask there
    given = _half_mask() if sched == "dpm" else None
    ref_mask, ref_inv, ref = _recipe_reference(
        pipe, img, d, torch.Generator().manual_seed(1), mask=given, **kw
    )
    res = editor(pipe).edit(
        img, d, num_maps_per_mask=2, generator=torch.Generator().manual_seed(1), mask=given, **kw
    )
    assert np.array_equal(res.extra["latent_mask"][0, 0].numpy(), ref_mask[0])
    assert (res.inverted_latents - ref_inv).abs().max().item() < TOL
    assert np.abs(np.asarray(res.images) - ref).max() < TOL


def _half_mask() -> np.ndarray:
    m = np.zeros((1, 16, 16), np.float32)
    m[:, :, 8:] = 1.0
    return m


def test_dpm_mask_works_where_diffusers_fails(tokenizer):
    """diffusers' generate_mask passes a 0-d timestep to DPMSolverMultistepScheduler.add_noise, which
    fails; we add noise with one timestep per row, which DDIM computes identically."""
    pipe = dpm_pipe(tokenizer)
    with pytest.raises(TypeError, match="0-d tensor"):
        pipe.generate_mask(
            image=dummy_image(), source_prompt="a cat", target_prompt="a dog", num_inference_steps=2
        )
    res = editor(pipe).edit(
        dummy_image(), direction(), mask_only=True, num_inference_steps=4, num_maps_per_mask=2, seed=0
    )
    assert res.extra["latent_mask"].shape == (1, 1, 16, 16) and res.mask.size == (32, 32)
    assert torch.isfinite(res.extra["mask_map"]).all() and res.extra["mask_map"].max() > 0


def test_num_images_per_prompt(tokenizer):
    pipe = make_pipe(dummy_components(tokenizer))
    mask = floats_tensor((1, 16, 16), random.Random(0))
    latents = floats_tensor((1, 2, 4, 16, 16), random.Random(0))
    kw = {"num_inference_steps": 2, "inpaint_strength": 1.0, "output_type": "np", "eta": 1.0}
    ref = pipe(
        prompt="a dog and a newt",
        mask_image=mask.clone(),
        image_latents=latents.clone(),
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).images
    res = editor(pipe).edit(
        dummy_image(),
        direction(),
        target_prompt="a dog and a newt",
        negative_prompt="",
        mask=mask.clone(),
        image_latents=latents.clone(),
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    assert ref.shape == (2, 32, 32, 3)
    assert np.abs(np.asarray(res.images) - ref).max() < TOL


def test_batch_of_images(tokenizer):
    """Two images: diffusers with lists of prompts (its batch), ours with a list of images."""
    pipe = make_pipe(dummy_components(tokenizer))
    imgs = [dummy_image(0), dummy_image(1).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gen = torch.Generator().manual_seed(2)
    steps = {"num_inference_steps": 4}
    mask = pipe.generate_mask(
        image=imgs,
        source_prompt=["a cat"] * 2,
        target_prompt=["a dog"] * 2,
        num_maps_per_mask=2,
        generator=gen,
        **steps,
    )
    inv = pipe.invert(image=imgs, prompt=["a cat"] * 2, generator=gen, **steps).latents
    ref = pipe(
        prompt=["a dog"] * 2,
        negative_prompt=["a cat"] * 2,
        mask_image=torch.from_numpy(mask).float(),
        image_latents=inv,
        generator=gen,
        output_type="np",
        **steps,
    ).images
    res = editor(pipe).edit(
        imgs,
        direction(),
        source_prompt="a cat",
        target_prompt="a dog",
        num_maps_per_mask=2,
        generator=torch.Generator().manual_seed(2),
        output_type="np",
        **steps,
    )
    assert np.array_equal(res.extra["latent_mask"][:, 0].numpy(), mask)
    assert (res.inverted_latents - inv).abs().max().item() < TOL
    assert np.abs(np.asarray(res.images) - ref).max() < TOL


@pytest.mark.parametrize("output_type", ["pil", "pt", "latent"])
def test_output_types(tokenizer, output_type):
    pipe = make_pipe(dummy_components(tokenizer))
    mask = floats_tensor((1, 16, 16), random.Random(0))
    latents = floats_tensor((1, 2, 4, 16, 16), random.Random(0))
    kw = {"num_inference_steps": 2, "inpaint_strength": 1.0, "output_type": output_type}
    ref = pipe(prompt="a dog", mask_image=mask.clone(), image_latents=latents.clone(), **kw).images
    res = editor(pipe).edit(
        dummy_image(),
        direction(),
        target_prompt="a dog",
        negative_prompt="",
        mask=mask.clone(),
        image_latents=latents.clone(),
        **kw,
    )
    if output_type == "pil":
        assert [np.asarray(i).tolist() for i in res.images] == [np.asarray(i).tolist() for i in ref]
    else:
        ours = res.images[0] if isinstance(res.images, list) else res.images
        assert (torch.as_tensor(ours).reshape(ref.shape) - ref).abs().max().item() < TOL


def test_unsupported_scheduler_is_refused_by_name(tokenizer):
    from diffusers import EulerDiscreteScheduler

    from p2pz_directions.core.errors import P2PZError

    pipe = make_pipe(dummy_components(tokenizer), scheduler=EulerDiscreteScheduler(**SCHED_ARGS))
    with pytest.raises(P2PZError, match="DDIMScheduler") as e:
        editor(pipe).edit(dummy_image(), direction(), num_inference_steps=2, num_maps_per_mask=1)
    assert "EulerDiscreteScheduler" in str(e.value) and "DPMSolverMultistepScheduler" in str(e.value)
