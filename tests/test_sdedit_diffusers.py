"""diffusers' own fast tests of ``StableDiffusionImg2ImgPipeline``, re-run against our SDEdit editor.

Each case builds diffusers' dummy components (``get_dummy_components`` of
``tests/pipelines/stable_diffusion/test_stable_diffusion_img2img.py``: a 32-px UNet, VAE, CLIP text
model, PNDM scheduler; our tokenizer is built offline), runs the pipeline with the test's inputs,
then our editor on the same pipeline object (``pipe=``) with the same inputs and a zero direction
(so that ``prompt`` is the prompt), and asserts max abs diff < 1e-4 on CPU fp32. The builders shared
with the other ported fast tests are in tests/diffusers_dummies.py.
"""

from __future__ import annotations

import copy
import random

import diffusers_dummies
import numpy as np
import pytest
import torch
from diffusers_dummies import floats_tensor, frozen, random_direction

from p2pz_directions import editors
from p2pz_directions.core.concept import Direction, EncoderInfo

TOL = 1e-4
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:cannot tell which text encoder"),
]


def dummy_components(tokenizer, time_cond_proj_dim: int | None = None) -> dict:
    """img2img's: a PNDM scheduler; ``time_cond_proj_dim`` for the LCM cases."""
    from diffusers import PNDMScheduler

    return diffusers_dummies.dummy_components(
        tokenizer,
        unet={"time_cond_proj_dim": time_cond_proj_dim},
        scheduler=PNDMScheduler(skip_prk_steps=True),
        image_encoder=None,
    )


def dummy_inputs(seed: int = 0) -> dict:
    image = floats_tensor((1, 3, 32, 32), random.Random(seed)) / 2 + 0.5
    return {
        "prompt": "a painting of a squirrel eating a burger",
        "image": image,
        "generator": torch.Generator().manual_seed(seed),
        "num_inference_steps": 2,
        "guidance_scale": 6.0,
        "output_type": "np",
    }


def make_pipe(components: dict, scheduler=None, vae=None):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = scheduler
    if vae is not None:
        pipe.vae = vae
    return frozen(pipe)


def zero_direction(dim: int = 32) -> Direction:
    """A direction with delta 0: the editor then conditions on ``prompt`` alone, as img2img does."""
    return random_direction(EncoderInfo("unknown/clip_text_model-d32", dim, "clip_text_model-d32")) * 0.0


def run_both(pipe, inputs: dict, **ours_only):
    """(diffusers' images, ours) for the same pipeline and inputs; the inputs are copied for each side."""
    ref_inputs = copy.deepcopy(inputs)
    ref = pipe(**ref_inputs).images
    ed = editors.get("sdedit", pipe=pipe, device="cpu", dtype=torch.float32)
    mine = copy.deepcopy(inputs)
    image = mine.pop("image")
    res = ed.edit(image, zero_direction(), **mine, **ours_only)
    return ref, res.images


def assert_close(ref, ours) -> None:
    if isinstance(ref, torch.Tensor) or isinstance(ref, np.ndarray):
        a = torch.as_tensor(np.asarray(ref) if isinstance(ref, np.ndarray) else ref)
        b = torch.as_tensor(np.stack([np.asarray(x) for x in ours]) if isinstance(ours, list) else ours)
        b = b.reshape(a.shape) if b.numel() == a.numel() else b
        assert tuple(b.shape) == tuple(a.shape)
        assert (a.float() - b.float()).abs().max().item() < TOL
    else:  # lists of PIL images
        assert len(ref) == len(ours)
        for r, o in zip(ref, ours, strict=True):
            assert r.size == o.size and np.abs(np.asarray(r, np.int16) - np.asarray(o, np.int16)).max() <= 1


# --- the fast tests of diffusers ----------------------------------------------------------------
def test_default_case(tokenizer):
    pipe = make_pipe(dummy_components(tokenizer))
    ref, ours = run_both(pipe, dummy_inputs())
    assert ref.shape == (1, 32, 32, 3)
    assert_close(ref, ours)


def test_default_case_lcm(tokenizer):
    from diffusers import LCMScheduler

    comps = dummy_components(tokenizer, time_cond_proj_dim=256)
    pipe = make_pipe(comps, scheduler=LCMScheduler.from_config(comps["scheduler"].config))
    ref, ours = run_both(pipe, dummy_inputs())
    assert_close(ref, ours)


def test_default_case_lcm_custom_timesteps(tokenizer):
    from diffusers import LCMScheduler

    comps = dummy_components(tokenizer, time_cond_proj_dim=256)
    pipe = make_pipe(comps, scheduler=LCMScheduler.from_config(comps["scheduler"].config))
    inputs = dummy_inputs()
    del inputs["num_inference_steps"]
    inputs["timesteps"] = [999, 499]
    ref, ours = run_both(pipe, inputs)
    assert_close(ref, ours)


def test_negative_prompt(tokenizer):
    pipe = make_pipe(dummy_components(tokenizer))
    ref, ours = run_both(pipe, {**dummy_inputs(), "negative_prompt": "french fries"})
    assert_close(ref, ours)


def test_multiple_init_images(tokenizer):
    pipe = make_pipe(dummy_components(tokenizer))
    inputs = dummy_inputs()
    inputs["prompt"] = [inputs["prompt"]] * 2
    inputs["image"] = inputs["image"].repeat(2, 1, 1, 1)
    ref, ours = run_both(pipe, inputs)
    assert ref.shape == (2, 32, 32, 3)
    assert_close(ref, ours)


SCHEDULERS = [
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedulers(tokenizer, name):
    """k_lms is diffusers' own case; the others are the schedulers img2img takes, at strength 0.6, eta 1."""
    import diffusers

    comps = dummy_components(tokenizer)
    cls = getattr(diffusers, name)
    sched = cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = make_pipe(comps, scheduler=sched)
    inputs = {**dummy_inputs(), "num_inference_steps": 5, "strength": 0.6, "eta": 1.0}
    ref, ours = run_both(pipe, inputs)
    assert_close(ref, ours)


def test_tiny_autoencoder(tokenizer):
    from diffusers import AutoencoderTiny

    pipe = make_pipe(
        dummy_components(tokenizer), vae=AutoencoderTiny(in_channels=3, out_channels=3, latent_channels=4)
    )
    ref, ours = run_both(pipe, dummy_inputs())
    assert_close(ref, ours)


@pytest.mark.parametrize("batch, per_prompt", [(1, 2), (2, 1), (2, 2)])
def test_num_images_per_prompt(tokenizer, batch, per_prompt):
    pipe = make_pipe(dummy_components(tokenizer))
    inputs = {**dummy_inputs(), "num_images_per_prompt": per_prompt}
    if batch > 1:
        inputs["prompt"] = [inputs["prompt"], "a photo of a cat"]
    ref, ours = run_both(pipe, inputs)
    assert ref.shape == (batch * per_prompt, 32, 32, 3)
    assert_close(ref, ours)


def test_one_generator_per_image(tokenizer):
    pipe = make_pipe(dummy_components(tokenizer))
    inputs = {**dummy_inputs(), "num_images_per_prompt": 2}
    inputs["generator"] = [torch.Generator().manual_seed(s) for s in (0, 1)]
    ref, ours = run_both(pipe, inputs)
    assert_close(ref, ours)


@pytest.mark.parametrize("output_type", ["np", "pt", "pil", "latent"])
def test_output_types(tokenizer, output_type):
    pipe = make_pipe(dummy_components(tokenizer))
    ref, ours = run_both(pipe, {**dummy_inputs(), "output_type": output_type})
    assert_close(ref, ours)


@pytest.mark.parametrize("kind", ["pil", "numpy", "tensor_-1..1", "pil_list", "latents"])
def test_image_kinds(tokenizer, kind):
    from diffusers.image_processor import VaeImageProcessor

    pipe = make_pipe(dummy_components(tokenizer))
    inputs = dummy_inputs()
    t = inputs["image"]
    if kind == "pil":
        inputs["image"] = VaeImageProcessor.numpy_to_pil(t.permute(0, 2, 3, 1).numpy())[0]
    elif kind == "numpy":
        inputs["image"] = t.permute(0, 2, 3, 1).numpy()[0]
    elif kind == "tensor_-1..1":
        inputs["image"] = t * 2 - 1
    elif kind == "pil_list":
        inputs["image"] = VaeImageProcessor.numpy_to_pil(t.repeat(2, 1, 1, 1).permute(0, 2, 3, 1).numpy())
        inputs["prompt"] = [inputs["prompt"]] * 2
    else:
        inputs["image"] = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ref, ours = run_both(pipe, inputs)
    assert_close(ref, ours)


def test_callback_on_step_end_tensor_inputs(tokenizer):
    """diffusers' test_callback_inputs: the callback gets the tensors asked for and may replace them."""
    pipe = make_pipe(dummy_components(tokenizer))
    names = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    seen: dict[str, list] = {"ref": [], "ours": []}

    def callback(side):
        def cb(owner, i, t, kwargs):
            seen[side].append(sorted(kwargs))
            if i == len(seen[side]) - 1 and i >= 1:  # from the second step on: zero the latents
                kwargs["latents"] = torch.zeros_like(kwargs["latents"])
            return kwargs

        return cb

    base = {**dummy_inputs(), "num_inference_steps": 3, "output_type": "latent"}
    ref = pipe(
        **copy.deepcopy(base), callback_on_step_end=callback("ref"), callback_on_step_end_tensor_inputs=names
    )
    ed = editors.get("sdedit", pipe=pipe, device="cpu", dtype=torch.float32)
    mine = copy.deepcopy(base)
    res = ed.edit(
        mine.pop("image"),
        zero_direction(),
        **mine,
        callback_on_step_end=callback("ours"),
        callback_on_step_end_tensor_inputs=names,
    )
    assert seen["ours"] == seen["ref"] and seen["ref"][0] == sorted(names) and len(seen["ref"]) >= 2
    assert ref.images.abs().max().item() == 0.0
    assert torch.as_tensor(res.images[0]).abs().max().item() == 0.0


def test_interrupt(tokenizer):
    """diffusers' test_pipeline_interrupt: interrupting at step k returns the latents of step k."""
    pipe = make_pipe(dummy_components(tokenizer))
    base = {**dummy_inputs(), "num_inference_steps": 5, "output_type": "latent"}
    stop_at = 2

    def interrupt(owner, i, t, kwargs):
        if i == stop_at:
            owner._interrupt = True
        return kwargs

    ref = pipe(**copy.deepcopy(base), callback_on_step_end=interrupt).images
    ed = editors.get("sdedit", pipe=pipe, device="cpu", dtype=torch.float32)
    mine = copy.deepcopy(base)
    res = ed.edit(mine.pop("image"), zero_direction(), **mine, callback_on_step_end=interrupt)
    assert_close(ref, res.images)


def test_unsupported_scheduler_is_refused_by_name(tokenizer):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from p2pz_directions.core.errors import P2PZError

    pipe = make_pipe(dummy_components(tokenizer), scheduler=FlowMatchEulerDiscreteScheduler())
    ed = editors.get("sdedit", pipe=pipe, device="cpu", dtype=torch.float32)
    inputs = dummy_inputs()
    with pytest.raises(P2PZError, match="EulerDiscreteScheduler") as e:
        ed.edit(inputs.pop("image"), zero_direction(), **inputs)
    assert "FlowMatchEulerDiscreteScheduler" in str(e.value)
