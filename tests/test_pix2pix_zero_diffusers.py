"""diffusers' own fast tests for ``StableDiffusionPix2PixZeroPipeline``, run against the pipeline
*and* our editor on the same dummy components and inputs (CPU, fp32): max abs difference < 1e-4.

Our versions of diffusers' ``tests/pipelines/stable_diffusion/test_stable_diffusion_pix2pix_zero.py``
(``get_dummy_components`` / ``get_dummy_inputs`` / ``get_dummy_inversion_inputs``), with a tokenizer
built offline and random source/target embeddings instead of downloaded ones; plus every scheduler
the pipeline accepts, image types, batches, ``AutoencoderTiny`` and the refusals. The builders shared
with the other ported fast tests are in tests/diffusers_dummies.py.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from diffusers_dummies import dummy_components, random_direction

from p2pz_directions import editors
from p2pz_directions import sampling as S
from p2pz_directions.core.concept import Direction, EncoderInfo
from p2pz_directions.editing.editors import EditorOptionError

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]
TOL = 1e-4
ENC = EncoderInfo("test/tiny-clip-d32", 32, "clip")


def get_dummy_components(tokenizer, **replace):
    """pix2pix-zero's: DDIM + DDIM-inverse with their defaults, no captioner; ``replace`` any of them."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    comps = dummy_components(
        tokenizer, scheduler=DDIMScheduler(), inverse_scheduler=DDIMInverseScheduler(), caption_generator=None,
        caption_processor=None,
    )  # fmt: skip
    comps.update(replace)
    return comps


def make_pipe(tokenizer, **replace):
    from diffusers import StableDiffusionPix2PixZeroPipeline

    pipe = StableDiffusionPix2PixZeroPipeline(
        **get_dummy_components(tokenizer, **replace), requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_direction(seed: int = 0, scale: float = 1.0) -> Direction:
    return random_direction(ENC, seed, scale, names=(f"src{seed}", f"tgt{seed}"))


def ours(pipe, **kw):
    return editors.get("pix2pix-zero", pipe=pipe, device="cpu", dtype=torch.float32, encoder=ENC, **kw)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def dummy_inputs(d, seed=0):
    return {
        "prompt": "A painting of a squirrel eating a burger", "generator": gen(seed), "num_inference_steps": 2,
        "guidance_scale": 6.0, "cross_attention_guidance_amount": 0.15, "output_type": "np",
    }  # fmt: skip


def dummy_inversion_inputs(seed=0, input_image_type="pt", output_type="np"):
    from diffusers.image_processor import VaeImageProcessor

    rng = random.Random(seed)
    values = [rng.random() for _ in range(2 * 3 * 32 * 32)]  # diffusers' floats_tensor((2, 3, 32, 32))
    image = torch.tensor(values, dtype=torch.float32).view(2, 3, 32, 32) / 2 + 0.5
    if input_image_type in ("np", "pil"):
        image = VaeImageProcessor.pt_to_numpy(image)
    if input_image_type == "pil":
        image = VaeImageProcessor.numpy_to_pil(image)
    prompts = ["A painting of a squirrel eating a burger", "A painting of a burger eating a squirrel"]
    return {"prompt": prompts, "image": image, "num_inference_steps": 2, "guidance_scale": 6.0,
            "generator": gen(seed), "output_type": output_type}  # fmt: skip


def our_inversion_kwargs(inputs):
    kw = dict(inputs, generator=gen(0))  # a fresh generator: the pipeline used up the other one
    kw["inversion_guidance_scale"] = kw.pop("guidance_scale")
    kw.pop("image")
    return kw


def maxdiff(a, b) -> float:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- diffusers' fast tests, both sides ---------------------------------------------------------------
SCHEDULERS = {
    "ddim": lambda: __import__("diffusers").DDIMScheduler(),
    "ddpm": lambda: __import__("diffusers").DDPMScheduler(),
    "euler_ancestral": lambda: __import__("diffusers").EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ),
    "lms": lambda: __import__("diffusers").LMSDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_default_case_every_scheduler(tokenizer, scheduler):
    """test_stable_diffusion_pix2pix_zero_default_case / _euler / _ddpm (and LMS, the nightly's)."""
    pipe = make_pipe(tokenizer, scheduler=SCHEDULERS[scheduler]())
    d = make_direction()
    expected = pipe(**dummy_inputs(d), source_embeds=d.source_embeds, target_embeds=d.target_embeds).images
    res = ours(pipe).edit(None, d, **dummy_inputs(d))
    assert res.image.shape == expected.shape == (1, 64, 64, 3)
    assert maxdiff(res.image, expected) < TOL
    assert res.extra["scheduler"] == type(pipe.scheduler).__name__


def test_negative_prompt(tokenizer):
    pipe = make_pipe(tokenizer)
    d = make_direction()
    expected = pipe(**dummy_inputs(d), negative_prompt="french fries", source_embeds=d.source_embeds,
                    target_embeds=d.target_embeds).images  # fmt: skip
    res = ours(pipe).edit(None, d, negative_prompt="french fries", **dummy_inputs(d))
    assert maxdiff(res.image, expected) < TOL
    plain = ours(pipe).edit(None, d, **dummy_inputs(d))
    assert maxdiff(plain.image, expected) > 1e-3  # the negative prompt matters


@pytest.mark.parametrize("batch", [1, 2])
def test_inversion(tokenizer, batch):
    """test_stable_diffusion_pix2pix_zero_inversion and _inversion_batch: latents and decoded images."""
    pipe = make_pipe(tokenizer)
    inputs = dummy_inversion_inputs()
    inputs["image"], inputs["prompt"] = inputs["image"][:batch], inputs["prompt"][:batch]
    expected = pipe.invert(**inputs)
    inv = ours(pipe).invert(inputs["image"], return_inversion_images=True, **our_inversion_kwargs(inputs))
    assert expected.images.shape == inv.images.shape == (batch, 32, 32, 3)
    assert maxdiff(inv.latents, expected.latents) < TOL
    assert maxdiff(inv.images, expected.images) < TOL


@pytest.mark.parametrize("output_type", ["pt", "np", "pil"])
def test_inversion_output_types(tokenizer, output_type):
    """test_stable_diffusion_pix2pix_zero_inversion_pt_np_pil_outputs_equivalent, both sides."""
    pipe = make_pipe(tokenizer)
    inputs = dummy_inversion_inputs(output_type=output_type)
    expected = pipe.invert(**inputs).images
    got = (
        ours(pipe)
        .invert(inputs["image"], return_inversion_images=True, **our_inversion_kwargs(inputs))
        .images
    )
    if output_type == "pil":
        assert [im.size for im in got] == [im.size for im in expected]
        assert (
            maxdiff(np.stack([np.asarray(i) for i in got]), np.stack([np.asarray(i) for i in expected])) <= 1
        )
    else:
        assert type(got) is type(expected) and maxdiff(got, expected) < TOL


@pytest.mark.parametrize("input_image_type", ["pt", "np", "pil"])
def test_inversion_input_types(tokenizer, input_image_type):
    """test_stable_diffusion_pix2pix_zero_inversion_pt_np_pil_inputs_equivalent, both sides; and a
    list of CHW tensors / HWC arrays is the same batch."""
    pipe = make_pipe(tokenizer)
    inputs = dummy_inversion_inputs(input_image_type=input_image_type)
    expected = pipe.invert(**inputs)
    image = inputs["image"]
    if input_image_type in ("pt", "np"):
        image = list(image)  # [CHW, CHW] / [HWC, HWC]
    inv = ours(pipe).invert(image, return_inversion_images=True, **our_inversion_kwargs(inputs))
    assert maxdiff(inv.latents, expected.latents) < TOL


def test_real_image_edit_batch_equals_diffusers_row_rule(tokenizer):
    """invert + __call__ on two images and two prompts. diffusers adds the direction to row 1 of
    [uncond; cond] only (image 2's *unconditional* row); ``diffusers_direction_row=True`` reproduces
    that exactly, and our default edits each image's conditional row instead."""
    pipe = make_pipe(tokenizer)
    d = make_direction()
    inputs = dummy_inversion_inputs()
    inv = pipe.invert(**inputs).latents
    call = dict(
        num_inference_steps=2, guidance_scale=6.0, cross_attention_guidance_amount=0.15, output_type="np"
    )
    expected = pipe(inputs["prompt"], source_embeds=d.source_embeds, target_embeds=d.target_embeds, latents=inv,
                    negative_prompt=inputs["prompt"], generator=inputs["generator"], **call).images  # fmt: skip
    ed = ours(pipe)
    kw = dict(our_inversion_kwargs(inputs), **call)
    kw.update(generator=gen(0), inversion_guidance_scale=6.0)
    same = ed.edit(inputs["image"], d, diffusers_direction_row=True, **kw)
    assert same.image.shape == expected.shape == (2, 32, 32, 3)
    assert maxdiff(same.inverted_latents, inv) < TOL and maxdiff(same.image, expected) < TOL
    fixed = ed.edit(inputs["image"], d, **dict(kw, generator=gen(0)))
    zero = ed.edit(inputs["image"], d * 0.0, **dict(kw, generator=gen(0)))
    assert maxdiff(fixed.image[0], zero.image[0]) > 1e-3  # ours edits image 1 too; diffusers does not:
    none = ed.edit(inputs["image"], d * 0.0, diffusers_direction_row=True, **dict(kw, generator=gen(0)))
    assert maxdiff(same.image[0], none.image[0]) < 1e-6


def test_num_images_per_prompt(tokenizer):
    """Two images per prompt from one generator and from a list of generators."""
    pipe = make_pipe(tokenizer)
    d = make_direction()
    for generator in (lambda: gen(0), lambda: [gen(0), gen(1)]):
        inputs = dict(dummy_inputs(d), generator=generator(), num_images_per_prompt=2)
        expected = pipe(**inputs, source_embeds=d.source_embeds, target_embeds=d.target_embeds).images
        same = ours(pipe).edit(None, d, diffusers_direction_row=True, **dict(inputs, generator=generator()))
        assert same.image.shape == (2, 64, 64, 3) and maxdiff(same.image, expected) < TOL
    both = ours(pipe).edit(None, d, **dict(inputs, generator=generator()))
    zero = ours(pipe).edit(None, d * 0.0, **dict(inputs, generator=generator()))
    assert maxdiff(both.image[0], zero.image[0]) > 1e-3 and maxdiff(both.image[1], zero.image[1]) > 1e-3


def test_list_of_directions_is_their_sum(tokenizer):
    pipe = make_pipe(tokenizer)
    d1, d2 = make_direction(0), make_direction(1)
    total = d1 + d2
    expected = pipe(
        **dummy_inputs(total), source_embeds=total.source_embeds, target_embeds=total.target_embeds
    ).images
    res = ours(pipe).edit(None, [d1, d2], **dummy_inputs(total))
    assert maxdiff(res.image, expected) < TOL
    assert maxdiff(ours(pipe).edit(None, d1, **dummy_inputs(d1)).image, expected) > 1e-3


def test_save_load_optional_components_none(tokenizer, tmp_path):
    """test_save_load_optional_components: no inverse scheduler, no captioner: generated images still work."""
    from diffusers import StableDiffusionPix2PixZeroPipeline

    pipe = make_pipe(tokenizer)
    for name in pipe._optional_components:
        setattr(pipe, name, None)
    pipe.register_modules(**{name: None for name in pipe._optional_components})
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPix2PixZeroPipeline.from_pretrained(tmp_path)
    d = make_direction()
    expected = pipe(**dummy_inputs(d), source_embeds=d.source_embeds, target_embeds=d.target_embeds).images
    ed = editors.get("pix2pix-zero", model=str(tmp_path), device="cpu", dtype=torch.float32, encoder=ENC)
    assert maxdiff(ed.edit(None, d, **dummy_inputs(d)).image, expected) < TOL
    assert maxdiff(ours(loaded).edit(None, d, **dummy_inputs(d)).image, expected) < TOL
    with pytest.raises(S.UnsupportedSchedulerError, match="needs a inverse_scheduler.*DDIMInverseScheduler"):
        ours(loaded).edit(dummy_inversion_inputs()["image"][:1], d, prompt="a cat", num_inference_steps=1)


@pytest.mark.parametrize("output_type", ["np", "pt", "pil", "latent"])
def test_output_types(tokenizer, output_type):
    pipe = make_pipe(tokenizer)
    d = make_direction()
    inputs = dict(dummy_inputs(d), output_type=output_type)
    expected = pipe(**inputs, source_embeds=d.source_embeds, target_embeds=d.target_embeds).images
    got = ours(pipe).edit(None, d, **dict(inputs, generator=gen(0))).image
    if output_type == "pil":
        assert got.size == expected[0].size and maxdiff(np.asarray(got), np.asarray(expected[0])) <= 1
    else:
        assert type(got) is type(expected) and maxdiff(got, expected) < TOL


def test_autoencoder_tiny(tokenizer):
    """AutoencoderTiny: generated images equal diffusers; photos work too (diffusers' invert needs a
    latent_dist), and equal diffusers' invert given the same image latents."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(32, 32),
        decoder_block_out_channels=(32, 32), num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
    ).eval()  # fmt: skip
    pipe = make_pipe(tokenizer, vae=tiny)
    d = make_direction()
    expected = pipe(**dummy_inputs(d), source_embeds=d.source_embeds, target_embeds=d.target_embeds).images
    assert maxdiff(ours(pipe).edit(None, d, **dummy_inputs(d)).image, expected) < TOL
    inputs = dummy_inversion_inputs()
    image = inputs["image"][:1]
    with torch.no_grad():
        z = tiny.encode(image * 2 - 1).latents * tiny.config.scaling_factor
    theirs = pipe.invert(**dict(inputs, image=z, prompt=inputs["prompt"][:1])).latents
    mine = ours(pipe).invert(image, **our_inversion_kwargs(dict(inputs, prompt=inputs["prompt"][:1]))).latents
    assert maxdiff(mine, theirs) < TOL


def test_legacy_callback_equals_diffusers(tokenizer):
    pipe = make_pipe(tokenizer)
    d = make_direction()
    theirs, mine = [], []
    pipe(**dummy_inputs(d), source_embeds=d.source_embeds, target_embeds=d.target_embeds,
         callback=lambda i, t, x: theirs.append((i, int(t), x.clone())))  # fmt: skip
    ours(pipe).edit(None, d, callback=lambda i, t, x: mine.append((i, int(t), x.clone())), **dummy_inputs(d))
    assert [(i, t) for i, t, _ in mine] == [(i, t) for i, t, _ in theirs] and len(mine) == 2
    assert max(maxdiff(a[2], b[2]) for a, b in zip(mine, theirs, strict=True)) < TOL


def test_callback_on_step_end_tensors_and_interrupt(tokenizer):
    pipe = make_pipe(tokenizer)
    d = make_direction()
    ed = ours(pipe)
    seen = []

    def cb(editor, i, t, tensors):
        seen.append((editor.phase, i, sorted(tensors)))
        if editor.phase == "edit" and i == 0:
            editor._interrupt = True  # as with a diffusers pipeline
        return {"latents": tensors["latents"]}

    res = ed.edit(None, d, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=("latents", "prompt_embeds"),
                  **dummy_inputs(d))  # fmt: skip
    assert seen == [("reference", 0, ["latents", "prompt_embeds"]), ("reference", 1, ["latents", "prompt_embeds"]),
                    ("edit", 0, ["latents", "prompt_embeds"])]  # fmt: skip
    full = ed.edit(None, d, **dummy_inputs(d))
    assert maxdiff(res.image, full.image) > 1e-4  # stopped after one edit step
    with pytest.raises(EditorOptionError, match="offers: latents, prompt_embeds"):
        ed.edit(
            None, d, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=("noise",), **dummy_inputs(d)
        )


# -- refusals ----------------------------------------------------------------------------------------
def test_unsupported_schedulers_are_refused_by_name(tokenizer):
    from diffusers import DPMSolverMultistepInverseScheduler, DPMSolverMultistepScheduler

    d = make_direction()
    pipe = make_pipe(tokenizer, scheduler=DPMSolverMultistepScheduler())
    msg = "DPMSolverMultistepScheduler.*DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, LMSDiscreteScheduler"
    with pytest.raises(S.UnsupportedSchedulerError, match=msg):
        ours(pipe).edit(None, d, **dummy_inputs(d))
    pipe = make_pipe(tokenizer, inverse_scheduler=DPMSolverMultistepInverseScheduler())
    with pytest.raises(
        S.UnsupportedSchedulerError, match="inverse_scheduler; supported: DDIMInverseScheduler"
    ):
        ours(pipe).invert(dummy_inversion_inputs()["image"][:1], prompt="a cat", num_inference_steps=1)


def test_bad_options_are_refused_before_model_work(tokenizer):
    pipe = make_pipe(tokenizer)
    d = make_direction()
    ed = ours(pipe)
    with pytest.raises(
        EditorOptionError, match=r"'guidance_scal' \(did you mean 'guidance_scale'\?\).*it takes: prompt"
    ):
        ed.edit(None, d, prompt="a cat", guidance_scal=3.0)
    with pytest.raises(EditorOptionError, match="num_inference_steps.*must be int, not str"):
        ed.edit(None, d, prompt="a cat", num_inference_steps="2")
    with pytest.raises(EditorOptionError, match="2 images for 3 prompts"):
        ed.edit(list(dummy_inversion_inputs()["image"]), d, prompt=["a", "b", "c"], num_inference_steps=1)
    with pytest.raises(EditorOptionError, match="3 generators for 1 images"):
        ed.edit(None, d, prompt="a cat", num_inference_steps=1, generator=[gen(0), gen(1), gen(2)])
    with pytest.raises(EditorOptionError, match="output_type must be one of"):
        ed.edit(None, d, prompt="a cat", output_type="jpeg")
