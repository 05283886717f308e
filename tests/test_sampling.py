"""p2pz_directions.sampling: each piece against what diffusers' pipelines compute (tiny models, CPU fp32)."""

from __future__ import annotations

import warnings

import pytest
import torch

from p2pz_directions import sampling as S

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from p2pz_directions.editing.demo import make_components, make_tokenizer

    comps = make_components("sd1")
    comps["tokenizer"] = make_tokenizer(tmp_path_factory.mktemp("tok"))
    return comps


def _sd_pipe(parts, scheduler=None, unet=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        unet=unet or parts["unet"], scheduler=scheduler or parts["scheduler"], safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _img2img_pipe(parts, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


# -- schedulers ----------------------------------------------------------------------------------
def test_copy_scheduler_keeps_settings_a_pipeline_patched_in(parts):
    """SD pipelines patch steps_offset=1 into an old config but leave it in _use_default_values, so
    from_config drops it (timesteps 500/0 instead of 501/1); copy_scheduler keeps it."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    pipe = _sd_pipe(parts, scheduler=DDIMScheduler())  # steps_offset=0 -> patched to 1 by the pipeline
    assert pipe.scheduler.config.steps_offset == 1
    lost = DDIMScheduler.from_config(pipe.scheduler.config)
    lost.set_timesteps(2)
    assert lost.timesteps.tolist() == [500, 0]  # the bug this helper exists for
    kept = S.copy_scheduler(pipe.scheduler)
    kept.set_timesteps(2)
    assert kept.timesteps.tolist() == [501, 1] and kept is not pipe.scheduler
    inv = S.copy_scheduler(pipe.scheduler, DDIMInverseScheduler)
    assert isinstance(inv, DDIMInverseScheduler) and inv.config.steps_offset == 1
    # a setting left at the source class's default takes the target class's default, as from_config does
    from diffusers import PNDMScheduler

    pndm = PNDMScheduler.from_config(PNDMScheduler().config)
    assert (
        S.copy_scheduler(pndm, DDIMScheduler).config.set_alpha_to_one
        == DDIMScheduler.from_config(pndm.config).config.set_alpha_to_one
    )


def test_check_scheduler_names_the_supported_ones():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    ok = DDIMScheduler()
    assert S.check_scheduler(ok, ("DDIMScheduler", "LMSDiscreteScheduler")) is ok
    with pytest.raises(
        S.UnsupportedSchedulerError, match="DPMSolverMultistepScheduler.*DDIMScheduler, LMSDiscreteScheduler"
    ):
        S.check_scheduler(
            DPMSolverMultistepScheduler(), ("DDIMScheduler", "LMSDiscreteScheduler"), pipeline="pix2pix-zero"
        )
    with pytest.raises(S.UnsupportedSchedulerError, match="needs a inverse_scheduler"):
        S.check_scheduler(None, ("DDIMInverseScheduler",), role="inverse_scheduler")


@pytest.mark.parametrize(
    "name",
    ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler"],
)
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_strength_timesteps_equal_img2img(parts, name, strength):
    import diffusers

    cls = getattr(diffusers, name)
    a, b = cls.from_config(parts["scheduler"].config), cls.from_config(parts["scheduler"].config)
    pipe = _img2img_pipe(parts, a)
    pipe.scheduler.set_timesteps(10)
    expected, n_exp = pipe.get_timesteps(10, strength, "cpu")
    got, n = S.strength_timesteps(b, 10, strength)
    assert n == n_exp and torch.equal(got, expected)
    assert getattr(a, "_begin_index", None) == getattr(b, "_begin_index", None)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("LCMScheduler", {"timesteps": [999, 499, 199]}),
        ("EulerDiscreteScheduler", {"sigmas": [8.0, 3.0, 1.0, 0.3]}),
    ],
)
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_custom_strength_timesteps_equal_img2img(parts, name, kw, strength):
    """A custom schedule: img2img's retrieve_timesteps, then get_timesteps on the steps it set."""
    import diffusers
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_timesteps

    cls = getattr(diffusers, name)
    a, b = cls.from_config(parts["scheduler"].config), cls.from_config(parts["scheduler"].config)
    pipe = _img2img_pipe(parts, a)
    _, steps = retrieve_timesteps(pipe.scheduler, None, "cpu", **kw)
    expected, n_exp = pipe.get_timesteps(steps, strength, "cpu")
    got, n = S.custom_strength_timesteps(b, strength, "cpu", **kw)
    assert n == n_exp and torch.equal(got, expected)
    assert getattr(a, "_begin_index", None) == getattr(b, "_begin_index", None)


def test_custom_strength_timesteps_refusals():
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="not both"):
        S.custom_strength_timesteps(DDIMScheduler(), 0.5, timesteps=[999, 499], sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="DDIMScheduler does not take custom sigmas"):
        S.custom_strength_timesteps(DDIMScheduler(), 0.5, sigmas=[1.0, 0.5])


def test_postprocess_images_is_the_image_processors(parts):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = S.image_processor(parts["vae"]).postprocess(x, output_type="np")
    assert torch.equal(
        torch.as_tensor(S.postprocess_images(parts["vae"], x, "np")), torch.as_tensor(expected)
    )
    latents = torch.randn(1, 4, 8, 8)
    assert S.postprocess_images(parts["vae"], latents, "np") is latents  # latents come back as they are
    assert S.postprocess_images(parts["vae"], x, "latent") is x


def test_extra_step_kwargs_only_what_the_step_takes():
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, LMSDiscreteScheduler

    g = torch.Generator()
    assert S.extra_step_kwargs(DDIMScheduler(), g, 0.3) == {"eta": 0.3, "generator": g}
    assert S.extra_step_kwargs(LMSDiscreteScheduler(), g, 0.3) == {}
    assert S.extra_step_kwargs(EulerAncestralDiscreteScheduler(), g, 0.3) == {"generator": g}


# -- guidance ------------------------------------------------------------------------------------
def test_cfg_and_rescale_equal_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 4, 8, 8, generator=g)
    u, c = pred.chunk(2)
    plain = u + 7.5 * (c - u)
    assert torch.equal(S.cfg(pred, 7.5), plain)
    assert torch.allclose(S.cfg(pred, 7.5, 0.7), rescale_noise_cfg(plain, c, 0.7))
    assert not torch.allclose(S.cfg(pred, 7.5, 0.7), plain)


def test_guidance_scale_embedding_equals_diffusers(parts):
    pipe = _sd_pipe(parts)
    w = torch.tensor([6.5])
    assert torch.allclose(S.guidance_scale_embedding(w, 33), pipe.get_guidance_scale_embedding(w, 33))


# -- the denoising loop against StableDiffusionPipeline ------------------------------------------
SCHEDULERS = ["DDIMScheduler", "DDPMScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
              "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "PNDMScheduler", "HeunDiscreteScheduler"]  # fmt: skip


def _our_txt2img(parts, scheduler, prompt, steps, gs, seed, *, rescale=0.0, eta=0.0, unet=None, **loop_kw):
    unet = unet or parts["unet"]
    guided = S.do_cfg(unet, gs)
    pos, neg = S.encode_prompt(
        parts["tokenizer"], parts["text_encoder"], prompt, "cpu", do_classifier_free_guidance=guided
    )
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps, device="cpu")
    x = S.randn((pos.shape[0], 4, 32, 32), g, "cpu", torch.float32) * scheduler.init_noise_sigma
    embeds = torch.cat([neg, pos]) if guided else pos
    return S.denoise(
        S.cfg_predictor(unet, guidance_scale=gs, guidance_rescale=rescale), x, scheduler,
        tensors={"prompt_embeds": embeds}, extra_step_kwargs=S.extra_step_kwargs(scheduler, g, eta), **loop_kw,
    )  # fmt: skip


@pytest.mark.parametrize("name", SCHEDULERS)
def test_denoise_equals_stable_diffusion_pipeline(parts, name):
    import diffusers

    cls = getattr(diffusers, name)
    pipe = _sd_pipe(parts, scheduler=cls.from_config(parts["scheduler"].config))
    kw = dict(num_inference_steps=4, guidance_scale=6.0, output_type="latent", height=64, width=64)
    expected = pipe(
        ["a cat", "a dog"], generator=torch.Generator().manual_seed(0), guidance_rescale=0.3, eta=0.5, **kw
    ).images
    ours = _our_txt2img(
        parts, S.copy_scheduler(pipe.scheduler), ["a cat", "a dog"], 4, 6.0, 0, rescale=0.3, eta=0.5
    )
    assert (ours - expected).abs().max().item() < 1e-5


def test_denoise_callback_on_step_end_and_interrupt(parts):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(parts["scheduler"].config)
    pipe = _sd_pipe(parts, scheduler=sched)
    seen_theirs, seen_ours = [], []

    def make_cb(seen):
        def cb(p, i, t, kw):
            seen.append((i, int(t), sorted(kw)))
            if i == 1:
                p._interrupt = True  # what diffusers' docs tell a callback to do
            return {"latents": kw["latents"] * 0.5}

        return cb

    kw = dict(num_inference_steps=4, guidance_scale=6.0, output_type="latent", height=64, width=64)
    expected = pipe(
        "a cat", generator=torch.Generator().manual_seed(0), callback_on_step_end=make_cb(seen_theirs),
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **kw,
    ).images  # fmt: skip
    ours = _our_txt2img(
        parts, S.copy_scheduler(sched), "a cat", 4, 6.0, 0, callback_on_step_end=make_cb(seen_ours),
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )  # fmt: skip
    assert seen_ours == seen_theirs and len(seen_ours) == 2
    assert (ours - expected).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="offers: latents, prompt_embeds"):
        _our_txt2img(parts, S.copy_scheduler(sched), "a cat", 2, 6.0, 0, callback_on_step_end=make_cb([]),
                     callback_on_step_end_tensor_inputs=["add_text_embeds"])  # fmt: skip


def test_denoise_guidance_embedding_unet_equals_pipeline(parts):
    """A UNet with ``time_cond_proj_dim`` (LCM): no classifier-free guidance, the scale goes in embedded."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, time_cond_proj_dim=64, norm_num_groups=32,
    ).eval()  # fmt: skip
    sched = LCMScheduler.from_config(parts["scheduler"].config)
    pipe = _sd_pipe(parts, scheduler=sched, unet=unet)
    kw = dict(num_inference_steps=2, guidance_scale=6.0, output_type="latent", height=64, width=64)
    expected = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    ours = _our_txt2img(parts, S.copy_scheduler(sched), "a cat", 2, 6.0, 0, unet=unet)
    assert (ours - expected).abs().max().item() < 1e-5
    other = _our_txt2img(parts, S.copy_scheduler(sched), "a cat", 2, 2.0, 0, unet=unet)
    assert (other - expected).abs().max().item() > 1e-4  # the embedded scale matters


# -- inversion -------------------------------------------------------------------------------------
def test_invert_is_the_ddim_update_backwards(parts):
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    inv = S.copy_scheduler(parts["scheduler"], DDIMInverseScheduler)
    inv.set_timesteps(3)
    x0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    steps: list[torch.Tensor] = []
    xt = S.invert(S.cfg_predictor(parts["unet"], guidance_scale=1.0), x0, inv, tensors={"prompt_embeds": emb},
                  intermediates=steps)  # fmt: skip
    assert len(steps) == 3 and torch.equal(steps[-1], xt)
    # by hand: x_{t+1} = sqrt(a_{t+1}) x0_pred + sqrt(1 - a_{t+1}) eps
    x = x0
    a = inv.alphas_cumprod
    for t in inv.timesteps:
        eps = parts["unet"](x, t, encoder_hidden_states=emb).sample
        prev = int(t) - inv.config.num_train_timesteps // 3
        a_prev = a[prev] if prev >= 0 else inv.initial_alpha_cumprod
        x0_pred = (x - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
        x = a[int(t)] ** 0.5 * x0_pred + (1 - a[int(t)]) ** 0.5 * eps
    assert (xt - x).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="needs an inverse scheduler"):
        S.invert(
            S.cfg_predictor(parts["unet"], guidance_scale=1.0),
            x0,
            DDIMScheduler(),
            tensors={"prompt_embeds": emb},
        )


def test_invert_dpm_solver_inverse_scheduler_runs(parts):
    from diffusers import DPMSolverMultistepInverseScheduler

    inv = S.copy_scheduler(parts["scheduler"], DPMSolverMultistepInverseScheduler)
    inv.set_timesteps(3)
    x0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    xt = S.invert(S.cfg_predictor(parts["unet"], guidance_scale=1.0), x0, inv, tensors={"prompt_embeds": emb})
    assert xt.shape == x0.shape and torch.isfinite(xt).all() and (xt - x0).abs().max() > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", SCHEDULERS)
def test_denoise_on_gpu_equals_the_pipeline_and_never_waits_for_the_gpu(parts, name):
    """On CUDA the loop hands the scheduler host timesteps (its arithmetic on a GPU timestep would make
    the host wait for every UNet pass): the same latents as diffusers' pipeline on the GPU, for every
    scheduler, and for DDIM (DiffEdit's, SDEdit's on SD) no host-device synchronization in the loop."""
    import diffusers

    cls = getattr(diffusers, name)
    unet, te = parts["unet"].to("cuda"), parts["text_encoder"].to("cuda")
    try:
        pipe = _sd_pipe(parts, scheduler=cls.from_config(parts["scheduler"].config), unet=unet)
        pipe.text_encoder, pipe.vae = te, parts["vae"].to("cuda")
        kw = dict(num_inference_steps=4, guidance_scale=6.0, output_type="latent", height=64, width=64)
        expected = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
        sched = S.copy_scheduler(pipe.scheduler)
        pos, neg = S.encode_prompt(parts["tokenizer"], te, "a cat", "cuda", do_classifier_free_guidance=True)
        sched.set_timesteps(4, device="cuda")
        g = torch.Generator().manual_seed(0)
        x = S.randn((1, 4, 32, 32), g, "cuda", torch.float32) * sched.init_noise_sigma
        predict = S.cfg_predictor(unet, guidance_scale=6.0)
        seen = []

        def cb(p, i, t, kw):
            seen.append(t.device.type)
            return kw

        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")  # a warning for every synchronizing call
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ours = S.denoise(
                    predict, x, sched, tensors={"prompt_embeds": torch.cat([neg, pos])},
                    extra_step_kwargs=S.extra_step_kwargs(sched, g, 0.0), callback_on_step_end=cb,
                )  # fmt: skip
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchronizing" in str(w.message)]
        if name == "DDIMScheduler":  # one copy of the timesteps to the host before the first step, no more
            assert len(syncs) <= 1, [f"{w.filename}:{w.lineno}" for w in syncs]
        assert (ours - expected).abs().max().item() < 1e-4
        assert len(seen) == len(sched.timesteps) and set(seen) == {"cuda"}, (
            f"callbacks get the timesteps as the scheduler holds them (on the GPU), got {seen}"
        )
    finally:
        for m in (unet, te, parts["vae"]):
            m.to("cpu")


# -- the runner ------------------------------------------------------------------------------------
def test_runner_eager_and_errors():
    r = S.UNetRunner("eager")
    assert torch.equal(r("f", lambda x, y: x + y, torch.ones(2), torch.ones(2)), torch.full((2,), 2.0))
    assert r.resource("k", lambda: [1]) is r.resource("k", lambda: [2])
    r.clear()
    assert r.resource("k", lambda: [2]) == [2]
    with pytest.raises(ValueError, match="runner mode must be one of"):
        S.UNetRunner("fast")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        S.UNetRunner("graphs")("f", lambda x: x, torch.ones(1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runner_graphs_equal_eager_on_gpu(parts):
    unet = parts["unet"].to("cuda")
    x = torch.randn(2, 4, 32, 32, device="cuda")
    emb = torch.randn(2, 77, 32, device="cuda")
    t = torch.tensor(500, device="cuda")
    fn = lambda x, t, e: S.unet_forward(unet, x, t, e)  # noqa: E731
    eager = fn(x, t, emb)
    r = S.UNetRunner("graphs")
    a, b = r("unet", fn, x, t, emb), r("unet", fn, x * 2, t, emb)
    assert len(r.graphs) == 1 and (a - eager).abs().max() < 1e-4
    assert (b - fn(x * 2, t, emb)).abs().max() < 1e-4
    unet.to("cpu")


# -- pix2pix-zero regularizers ---------------------------------------------------------------------
def _per_call_auto_corr_grad(eps, shifts):
    """The closed form as it was written before the gather indices were shared (one ``roll`` per
    gather, its index built each time; repeat_interleave upsampling): the bit-for-bit reference."""
    import torch.nn.functional as F

    def roll(x, s, dim):
        size = x.shape[dim]
        idx = (torch.arange(size)[None, :] - s[:, None]) % size
        idx = idx[:, None, :, None] if dim == 2 else idx[:, None, None, :]
        return x.gather(dim, idx.expand_as(x))

    b, c, h, w = eps.shape
    x, grads = eps.reshape(b * c, 1, h, w), []
    for lvl in range(shifts.shape[0]):
        s = shifts[lvl]
        rh, rh_back, rw, rw_back = roll(x, s, 2), roll(x, -s, 2), roll(x, s, 3), roll(x, -s, 3)
        m_h = (x * rh).mean(dim=(1, 2, 3), keepdim=True)
        m_w = (x * rw).mean(dim=(1, 2, 3), keepdim=True)
        grads.append((m_h * (rh + rh_back) + m_w * (rw + rw_back)) * (2.0 / (x.shape[2] * x.shape[3])))
        if x.shape[2] <= 8:
            break
        x = F.avg_pool2d(x, kernel_size=2)
    g = grads[-1]
    for finer in reversed(grads[:-1]):
        up = g.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) / 4
        up = F.pad(up, (0, finer.shape[3] - up.shape[3], 0, finer.shape[2] - up.shape[2]))
        g = finer + up
    return g.reshape(b, c, h, w)


def _per_call_roll_shifts(shape, generator, rolls):
    """The reference implementation's draws: one ``randint(height // 2, (1,))`` per roll, image,
    channel and pyramid level."""
    b, c, h, _ = shape
    heights = [h]
    while heights[-1] > 8:
        heights.append(heights[-1] // 2)
    out = torch.empty(rolls, len(heights), b * c, dtype=torch.int64)
    for r in range(rolls):
        for n in range(b * c):
            g = generator[n // c] if isinstance(generator, list) else generator
            for lvl, lh in enumerate(heights):
                out[r, lvl, n] = int(torch.randint(lh // 2, (1,), generator=g).item())
    return out


@pytest.mark.parametrize(
    "shape", [(1, 4, 64, 64), (2, 4, 30, 22), (1, 4, 17, 9), (3, 4, 118, 96), (1, 4, 4, 4)]
)
@pytest.mark.parametrize("per_image", [False, True])
def test_roll_shifts_in_one_draw_are_the_per_call_draws(shape, per_image):
    """Issue 10: a step's 400 roll amounts come from one randint, not 400 (host time per inversion
    step ~5 ms -> ~0.05 ms on this machine): the same numbers, and the generators end in the same
    state, so what is drawn after them (DDIM noise, the next step) is unchanged too."""

    def gens():
        if per_image:
            return [torch.Generator().manual_seed(7 + k) for k in range(shape[0])]
        return torch.Generator().manual_seed(7)

    def states(g):
        return [x.get_state() for x in (g if per_image else [g])]

    a, b = gens(), gens()
    expected = _per_call_roll_shifts(shape, a, 25)
    got = S.draw_roll_shifts(shape, b, 25)
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    assert all(torch.equal(x, y) for x, y in zip(states(a), states(b), strict=True))
    assert got.max() > 0  # drawn, not zeros


def test_roll_shifts_without_a_generator_draw_from_the_global_one():
    torch.manual_seed(11)
    expected = _per_call_roll_shifts((1, 4, 32, 32), None, 5)
    torch.manual_seed(11)
    assert torch.equal(S.draw_roll_shifts((1, 4, 32, 32), None, 5), expected)
    with pytest.raises(IndexError):  # fewer generators than images: as the per-call draws
        S.draw_roll_shifts((2, 4, 16, 16), [torch.Generator()], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shared_gather_indices_change_no_bit_of_the_regularizer(dtype):
    """Issue 10: one gather for both rolls of a level, indices made once per step for all rolls,
    one-kernel upsampling: the same numbers bit for bit (odd pyramid sizes too), in far fewer ops."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    for shape in [(1, 4, 64, 64), (2, 4, 30, 22), (1, 4, 17, 9)]:
        x = torch.randn(shape, generator=g).to(dtype)
        shifts = S.draw_roll_shifts(shape, torch.Generator().manual_seed(1), rolls=3)
        for k in range(3):
            assert torch.equal(S.auto_corr_grad(x, shifts[k]), _per_call_auto_corr_grad(x, shifts[k]))
    x, sample = torch.randn(1, 4, 64, 64, generator=g), torch.randn(1, 4, 64, 64, generator=g)
    shifts = S.draw_roll_shifts((1, 4, 64, 64), torch.Generator().manual_seed(2), rolls=25)
    out = S.regularize_noise_pred(x, sample, 0.5, "epsilon", shifts=shifts)
    ref = x
    for _ in range(5):  # diffusers' order: 5 rounds of 5 auto-correlation steps, then the KL step
        for k in range(5 * _, 5 * _ + 5):
            ref = ref - 20.0 * (_per_call_auto_corr_grad(ref, shifts[k]) / 5)
        ref = ref - 20.0 * S.kl_grad(ref)
    assert torch.equal(out, ref)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        S.regularize_noise_pred(x, sample, 0.5, "epsilon", shifts=shifts)
    views = {"aten::unsqueeze", "aten::expand", "aten::slice", "aten::select", "aten::view", "aten::reshape"}
    ops = [
        e for e in prof.events()
        if e.name.startswith("aten::") and e.name not in views
        and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))
    ]  # fmt: skip
    assert len(ops) < 1800, f"{len(ops)} ops for one inversion step's regularizer (~3400 before)"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_closed_form_regularizer_equals_autograd(prediction_type):
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 4, 64, 64), (2, 4, 30, 22)]:  # odd pyramid sizes too
        x = torch.randn(shape, dtype=torch.float64, generator=g)
        shifts = S.draw_roll_shifts(shape, torch.Generator().manual_seed(1))[0]
        xv = x.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(S.auto_corr_loss(xv, shifts), xv)
        assert torch.allclose(S.auto_corr_grad(x, shifts), expected, rtol=1e-9, atol=1e-15)
        (expected,) = torch.autograd.grad(S.kl_divergence(xv), xv)
        assert torch.allclose(S.kl_grad(x), expected, rtol=1e-9, atol=1e-15)
    npred, sample = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 4, 32, 32, generator=g)
    alpha = torch.tensor(0.3)
    kw = dict(generator=torch.Generator().manual_seed(3))
    a = S.regularize_noise_pred(npred, sample, alpha, prediction_type, analytic=False, **kw)
    b = S.regularize_noise_pred(
        npred, sample, alpha, prediction_type, generator=torch.Generator().manual_seed(3)
    )
    assert (a - npred).abs().max() > 1e-2  # it does something
    assert (a - b).abs().max() < 1e-5


def test_regularizers_equal_the_pipelines_own():
    from diffusers import StableDiffusionPix2PixZeroPipeline

    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = StableDiffusionPix2PixZeroPipeline.auto_corr_loss(
        None, x, generator=torch.Generator().manual_seed(5)
    )
    shifts = S.draw_roll_shifts(tuple(x.shape), torch.Generator().manual_seed(5))[0]
    assert shifts.shape == (3, 8)  # levels 32, 16, 8 for 2 images x 4 channels
    assert torch.allclose(S.auto_corr_loss(x, shifts), expected, rtol=1e-5)
    assert torch.allclose(S.kl_divergence(x), StableDiffusionPix2PixZeroPipeline.kl_divergence(None, x))


def test_attention_maps_record_and_guide(parts):
    unet = parts["unet"]
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    maps = S.AttentionMaps(2)
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(501)
    with S.attention_maps(unet, maps):
        S.reference_step(unet, maps, x, t, emb, torch.tensor(1), guidance_scale=1.0)
        n_layers = len(maps.buffers)
        _, same = S.cross_attention_guided_step(
            unet, maps, x, t, emb, torch.tensor(1), amount=0.1, guidance_scale=1.0
        )
        assert float(maps.loss) == 0.0 and torch.allclose(same, x)  # same input, same maps: no gradient
        _, moved = S.cross_attention_guided_step(
            unet, maps, x, t, emb + 1, torch.tensor(1), amount=0.1, guidance_scale=1.0
        )
        assert float(maps.loss) > 0 and not torch.allclose(moved, x)
    assert n_layers == sum("attn2" in k for k in before) and maps.buffers[0].shape[0] == 2
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_compile_cache_dir_is_under_p2pz_home_unless_inductor_is_told(monkeypatch, tmp_path):
    from p2pz_directions.sampling.runner import compile_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("P2PZ_HOME", str(tmp_path / "home"))
    assert compile_cache_dir() == tmp_path / "home" / "torch-compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"


def test_an_unwritable_compile_cache_is_one_clear_error(monkeypatch, tmp_path):
    from p2pz_directions.sampling.runner import compiled

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("P2PZ_HOME", str(tmp_path / "file"))  # the cache would go under a file
    with pytest.raises(OSError, match=r"kernel cache .*torch-compile cannot be written.*set P2PZ_HOME"):
        compiled(lambda x: x)
    with pytest.raises(OSError, match="cannot be written"):
        S.UNetRunner("compile")("f", lambda x: x + 1, torch.ones(2))


@pytest.mark.slow
def test_compiled_steps_persist_their_kernels_under_p2pz_home(monkeypatch, tmp_path):
    """Issue 10: compilation is kept in a persistent cache under the p2pz cache dir, so only the first
    process on a machine pays for it (inductor's FX-graph cache lands there)."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("P2PZ_HOME", str(tmp_path / "home"))
    runner = S.UNetRunner("compile")
    x = torch.linspace(-1, 1, 16)
    y = runner("sin-cos", lambda v: torch.sin(v) * 2 + v.cos(), x)
    assert torch.allclose(y, torch.sin(x) * 2 + x.cos(), atol=1e-6)
    folder = tmp_path / "home" / "torch-compile"
    assert (folder / "fxgraph").is_dir() and any((folder / "fxgraph").rglob("*")), sorted(folder.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_mode_captures_the_compiled_step_as_a_graph_on_cuda(monkeypatch, tmp_path):
    """loops='compile' on CUDA: the step is compiled, then captured and replayed as a CUDA graph (so
    a new input gives the new result: nothing is frozen), equal to the eager step."""
    monkeypatch.setenv("P2PZ_HOME", str(tmp_path / "home"))
    runner = S.UNetRunner("compile")
    fn = lambda v, w: (torch.sin(v) * w).cumsum(0)  # noqa: E731
    a, w = torch.linspace(-1, 1, 64, device="cuda"), torch.rand(64, device="cuda")
    first = runner("f", fn, a, w)
    b = torch.linspace(0, 3, 64, device="cuda")
    second = runner("f", fn, b, w)
    (entry,) = runner.graphs.values()
    assert entry is not None, "the compiled step was captured"
    assert torch.allclose(first, fn(a, w), atol=1e-5) and torch.allclose(second, fn(b, w), atol=1e-5)


def test_randn_draws_as_diffusers_randn_tensor():
    """`randn` is written without diffusers; it must draw what ``randn_tensor`` draws."""
    from diffusers.utils.torch_utils import randn_tensor

    from p2pz_directions.sampling.latents import randn

    shape = (3, 4, 5, 6)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for make in (
            lambda: torch.Generator().manual_seed(7),
            lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)],
            lambda: [torch.Generator().manual_seed(9)],
        ):
            want = randn_tensor(
                shape if not isinstance(make(), list) or len(make()) > 1 else (1, 4, 5, 6),
                generator=make(),
                device=torch.device("cpu"),
                dtype=dtype,
            )
            got = randn(tuple(want.shape), make(), "cpu", dtype)
            assert got.dtype == dtype and torch.equal(got, want)
    torch.manual_seed(3)
    want = randn_tensor(shape, generator=None, device=torch.device("cpu"), dtype=torch.float32)
    torch.manual_seed(3)
    assert torch.equal(randn(shape, None, "cpu", torch.float32), want)


def test_denoise_steps_is_denoise_as_a_coroutine():
    from diffusers import DDIMScheduler

    from p2pz_directions import sampling as S

    def predict(x, t, i, tensors):
        return 0.1 * x + tensors["c"] * (i + 1)

    sched = DDIMScheduler()
    sched.set_timesteps(5)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    kw = dict(tensors={"c": torch.tensor(0.01)}, progress=lambda i, k: seen.append((i, k)))
    expected = S.denoise(predict, x0, sched, **kw)
    sched.set_timesteps(5)
    steps, got, requests = S.denoise_steps(x0, sched, **kw), None, []
    try:
        req = next(steps)
        while True:
            requests.append(req)
            req = steps.send(predict(*req[:4]))
    except StopIteration as stop:
        got = stop.value
    assert torch.equal(got, expected)
    assert [r.i for r in requests] == [0, 1, 2, 3, 4] and torch.equal(requests[0].latents, x0)
    assert seen == [(i, 5) for i in range(1, 6)] * 2
    with pytest.raises(TypeError, match="unexpected arguments callbak"):
        S.denoise_steps(x0, sched, callbak=print)


class _RecordingRunner:
    """A runner of some mode that runs each function eagerly and notes what it was given."""

    def __init__(self, mode: str = "compile") -> None:
        self.mode, self.calls = mode, []

    def __call__(self, name, fn, *inputs, key=()):
        self.calls.append(name)
        return fn(*inputs)


def test_the_vae_under_a_compile_runner_gives_the_eager_latents_and_images(parts):
    """Issue 10: with loops='compile' the VAE's encoder and decoder go through the runner (compiled,
    on CUDA replayed as a graph; 21 -> 9 ms a decode on an H200). What comes out is the eager path's:
    the posterior's noise is drawn from the same generators outside the compiled part, in the same
    order, one image per generator when there is a list of them."""
    vae = parts["vae"]
    g = torch.Generator().manual_seed(0)
    px = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    runner = _RecordingRunner()
    for mode in ("sample", "argmax"):
        want = S.encode_image(vae, px, torch.Generator().manual_seed(5), sample_mode=mode)
        got = S.encode_image(vae, px, torch.Generator().manual_seed(5), sample_mode=mode, runner=runner)
        assert torch.equal(got, want), mode
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    assert torch.equal(S.encode_image(vae, px, gens(), runner=runner), S.encode_image(vae, px, gens()))
    assert runner.calls == ["vae-encode"] * 4  # the generator list: one image at a time, as diffusers
    z = torch.randn(2, 4, 4, 4, generator=g)
    for ot in ("np", "pt"):
        want, got = S.decode_latents(vae, z, ot), S.decode_latents(vae, z, ot, runner=runner)
        assert (got == want).all(), ot
    assert runner.calls[4:] == ["vae-decode"] * 2
    assert S.decode_latents(vae, z, "latent", runner=runner) is z and len(runner.calls) == 6
    for mode in ("graphs", "eager"):  # a VAE run once per edit is not worth a capture: eager
        other = _RecordingRunner(mode)
        S.decode_latents(vae, z, "pt", runner=other)
        S.encode_image(vae, px, None, sample_mode="argmax", runner=other)
        assert other.calls == [], mode

    class AutoencoderTiny:  # another VAE class (its encode gives .latents, no posterior): left eager
        config, dtype, device = vae.config, vae.dtype, vae.device

        def encode(self, x):
            return type("Out", (), {"latents": vae.encode(x).latent_dist.mode()})()

        def decode(self, z, return_dict=False):
            return vae.decode(z, return_dict=False)

    tiny, third = AutoencoderTiny(), _RecordingRunner()
    assert torch.equal(
        S.encode_image(tiny, px, None, runner=third), S.encode_image(vae, px, None, sample_mode="argmax")
    )
    assert (S.decode_latents(tiny, z, "pt", runner=third) == S.decode_latents(vae, z, "pt")).all()
    assert third.calls == []


def _projection_calls(unet):
    """Forward hooks counting the calls of every attention layer's to_q / to_k / to_v."""
    calls = {"self": 0, "cross_q": 0, "cross_kv": 0}
    handles = []
    for name, m in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            kind = "self" if name.endswith("attn1") else "cross"
            for p in ("to_q", "to_k", "to_v"):
                slot = "self" if kind == "self" else ("cross_q" if p == "to_q" else "cross_kv")
                handles.append(
                    getattr(m, p).register_forward_hook(lambda *a, s=slot: calls.__setitem__(s, calls[s] + 1))
                )
    return calls, handles


@pytest.mark.parametrize("model", ["diffusers", "lean"])
def test_fused_projections_give_the_three_projections_numbers(parts, model):
    """Issue 10: under CUDA graphs / compile pix2pix-zero runs each attention layer's q, k, v
    projections as one matrix product ([k; v] for the text in cross-attention): 1-3% off a UNet pass
    on an H200, the same numbers there and here. A weight changed in place reaches the copy (in place,
    so a captured graph keeps reading valid memory); a layer that is not plain nn.Linear any more (a
    LoRA wrapper) goes back to its own projections; exact attention refuses the fusion."""
    from p2pz_directions.lean.unet import LeanUNet

    unet = parts["unet"]
    if model == "lean":
        lean = LeanUNet(dict(unet.config))
        lean.load_state_dict(unet.state_dict(), strict=True)
        unet = lean.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g)
    emb = torch.randn(2, 77, 32, generator=g)
    t, idx = torch.tensor(501), torch.tensor(0)

    def run(fused):
        maps = S.AttentionMaps(1)
        with S.attention_maps(unet, maps, fused):
            ref = S.reference_step(unet, maps, x, t, emb, idx, guidance_scale=7.5)
            eps, moved = S.cross_attention_guided_step(
                unet, maps, x, t, emb + 0.5, idx, amount=0.1, guidance_scale=7.5
            )
            plain = S.unet_forward(unet, x, t, emb[:1])
        return torch.cat([ref, eps, moved, plain])

    want = run(None)
    fused = S.FusedProjections(unet)
    n_self = sum(n.endswith("attn1") for n, _ in unet.named_modules())
    assert len(fused.weights) == len(fused.layers) == 2 * n_self
    calls, handles = _projection_calls(unet)
    got = run(fused)
    for h in handles:
        h.remove()
    assert calls["self"] == 0 and calls["cross_kv"] == 0 and calls["cross_q"] > 0  # the fused products ran
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)

    attn1 = next(m for n, m in unet.named_modules() if n.endswith("attn1"))
    name1 = next(n for n, m in unet.named_modules() if m is attn1)
    before = fused.weights[name1][0]
    with torch.no_grad():
        attn1.to_k.weight.mul_(1.5)  # an in-place change (a LoRA merged into the weights)
    try:
        changed = run(None)
        assert not torch.allclose(changed, want, atol=1e-3)
        assert fused.sync() == 1 and fused.sync() == 0  # one layer copied, then nothing to do
        assert fused.weights[name1][0] is before  # copied in place: a graph reading it stays valid
        torch.testing.assert_close(run(fused), changed, rtol=1e-4, atol=5e-5)
    finally:
        with torch.no_grad():
            attn1.to_k.weight.div_(1.5)

    class Wrapped(torch.nn.Linear):  # a LoRA-style wrapper: its forward is not the plain weight's
        def forward(self, h):
            return super().forward(h) * 2

    original = attn1.to_q
    wrapped = Wrapped(original.in_features, original.out_features, bias=original.bias is not None)
    wrapped.load_state_dict(original.state_dict())
    attn1.to_q = wrapped
    try:
        other = run(None)
        assert not torch.allclose(other, want, atol=1e-3)
        torch.testing.assert_close(run(fused), other, rtol=1e-4, atol=5e-5)  # synced: that layer unfused
        assert name1 not in fused.weights
    finally:
        attn1.to_q = original
    assert fused.sync() == 1 and name1 in fused.weights
    kept = fused.weights[name1][0]
    attn1.to(torch.float64)  # another dtype: a new copy, the old one kept alive (a graph may read it)
    try:
        assert fused.sync() == 1 and fused.weights[name1][0].dtype == torch.float64
        assert any(old[0] is kept for old in fused._retired)
    finally:
        attn1.to(torch.float32)
    assert fused.sync() == 1 and fused.weights[name1][0].dtype == torch.float32
    with (
        pytest.raises(ValueError, match="exact"),
        S.attention_maps(unet, S.AttentionMaps(1, exact=True), fused),
    ):
        pass


def test_encode_prompt_cache_runs_the_encoder_once_per_text(parts):
    """An edit's caption is its prompt, its negative prompt and the inversion's prompt: with one cache
    the text encoder runs once for it (3 x 5 ms on an H200 before), and the embeddings are those of
    separate calls. clip_skip applies to the prompt only, so it is another entry."""
    tok, te = parts["tokenizer"], parts["text_encoder"]
    runs = []
    handle = te.register_forward_hook(lambda *a: runs.append(1))
    guided = dict(do_classifier_free_guidance=True, negative_prompt=["a cat"])
    try:
        want_pos, want_neg = S.encode_prompt(tok, te, ["a cat"], "cpu", **guided)
        want_inv, _ = S.encode_prompt(tok, te, ["a cat"], "cpu")
        assert len(runs) == 3
        cache: dict = {}
        pos, neg = S.encode_prompt(tok, te, ["a cat"], "cpu", **guided, cache=cache)
        inv, _ = S.encode_prompt(tok, te, ["a cat"], "cpu", cache=cache)
        assert len(runs) == 4  # once for the three
        for a, b in ((pos, want_pos), (neg, want_neg), (inv, want_inv)):
            assert torch.equal(a, b)
        S.encode_prompt(tok, te, ["a cat"], "cpu", **guided, clip_skip=1, cache=cache)
        assert len(runs) == 5  # the prompt at another layer; the negative prompt from the cache
        S.encode_prompt(tok, te, ["a dog"], "cpu", cache=cache)
        assert len(runs) == 6
    finally:
        handle.remove()
