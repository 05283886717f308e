"""DiffEdit (Couairon et al., ICLR 2023, arXiv 2210.11427): what only DiffEdit needs on top of the loops.

The paper's three steps (section 3.2, Figure 2), as diffusers' ``StableDiffusionDiffEditPipeline``
computes them (``generate_mask`` / ``invert`` / ``__call__``):

1. **Mask** (step 1, eq. 3-4): noise the image latents to ``mask_encode_strength`` ``n`` times
   (`draw_latents`, `noise_to_strength`), predict the noise under the source and the target text
   (`mask_noise_preds`), average ``|eps_target - eps_source|`` over the draws and the channels
   (`mask_guidance_map`), clamp at ``mask_thresholding_ratio`` times its mean, rescale to [0, 1]
   and binarize at 0.5 (`threshold_mask`). `diffedit_mask` chains them; its predictions are one UNet
   batch (diffusers' way) or, through the edit's own predictor, one call per draw
   (`mask_noise_preds_by_draw`: the edit's CUDA graph, no batch shape of its own).
2. **Encode** (step 2): DDIM-invert the image latents up to the encoding ratio ``inpaint_strength``,
   keeping every intermediate latent (`inverse_timesteps`, `inversion_predictor` over
   ``sampling.invert``; pix2pix-zero's regularizers optional, as diffusers offers them).
3. **Decode with mask guidance** (step 3, eq. 5: ``y_t = M y_t + (1 - M) x_t``): denoise from the
   most-noised inverted latent and, after each step, put the inverted latents back outside the
   mask (`mask_blend`, `mask_guidance_callback` over ``sampling.denoise``).

Schedulers (`diffedit_schedulers`): the pipeline's ``scheduler`` and ``inverse_scheduler`` exactly
as configured, DDIM + DDIM-inverse or DPM-Solver++ multistep + its inverse (what diffusers' DiffEdit
tests run); anything else is an `UnsupportedSchedulerError` naming those.

>>> from p2pz_directions.sampling.diffedit import threshold_mask
>>> import torch
>>> threshold_mask(torch.tensor([[[0.0, 1.0], [0.1, 2.0]]]), 1.0).tolist()
[[[0.0, 1.0], [0.0, 1.0]]]
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from p2pz_directions.sampling.guidance import cfg
from p2pz_directions.sampling.loop import StepEndCallback, cfg_predictor
from p2pz_directions.sampling.pix2pix_zero import regularize_noise_pred
from p2pz_directions.sampling.runner import UNetRunner
from p2pz_directions.sampling.schedulers import (
    UnsupportedSchedulerError,
    check_scheduler,
    copy_scheduler,
    is_scheduler,
    scheduler_class,
)

__all__ = [
    "DIFFEDIT_SCHEDULERS",
    "diffedit_mask",
    "diffedit_schedulers",
    "diffedit_timesteps",
    "draw_latents",
    "inverse_timesteps",
    "inversion_predictor",
    "mask_blend",
    "mask_guidance_callback",
    "mask_guidance_map",
    "mask_noise_preds",
    "mask_noise_preds_by_draw",
    "noise_to_strength",
    "threshold_mask",
]

#: the scheduler pairs DiffEdit runs: forward scheduler -> its inverse
DIFFEDIT_SCHEDULERS = {
    "DDIMScheduler": "DDIMInverseScheduler",
    "DPMSolverMultistepScheduler": "DPMSolverMultistepInverseScheduler",
}
_PIPELINE = "DiffEdit (StableDiffusionDiffEditPipeline)"


def diffedit_schedulers(scheduler: Any, inverse_scheduler: Any = None) -> tuple[Any, Any]:
    """Copies of a pipeline's ``scheduler`` and ``inverse_scheduler`` (``copy.deepcopy``: the objects as
    they are, even where a config no longer says it - ``DDIMInverseScheduler(set_alpha_to_zero=False)``
    records ``set_alpha_to_one=True``), checked.

    Without an ``inverse_scheduler`` (a plain Stable Diffusion folder has none) the inverse of the
    scheduler's class is made with the scheduler's settings, as diffusers' docs do
    (``DDIMInverseScheduler.from_config(pipe.scheduler.config)``). A pair DiffEdit does not run is an
    `UnsupportedSchedulerError` that names the pairs it does.
    """
    pairs = ", ".join(f"{a} + {b}" for a, b in DIFFEDIT_SCHEDULERS.items())
    check_scheduler(scheduler, tuple(DIFFEDIT_SCHEDULERS), pipeline=_PIPELINE)
    fwd = next(n for n in DIFFEDIT_SCHEDULERS if is_scheduler(scheduler, n))
    want = DIFFEDIT_SCHEDULERS[fwd]
    if inverse_scheduler is None:
        return copy.deepcopy(scheduler), copy_scheduler(scheduler, scheduler_class(want, like=scheduler))
    if not is_scheduler(inverse_scheduler, want):
        raise UnsupportedSchedulerError(
            f"{_PIPELINE} runs {fwd} with {want} as its inverse_scheduler, not "
            f"{type(inverse_scheduler).__name__}; the pairs it runs: {pairs}. Set e.g. "
            f"pipe.inverse_scheduler = {want}.from_config(pipe.scheduler.config)"
        )
    return copy.deepcopy(scheduler), copy.deepcopy(inverse_scheduler)


def diffedit_timesteps(
    scheduler: Any, num_inference_steps: int, strength: float, device: Any = None
) -> torch.Tensor:
    """The last ``int(steps * strength)`` timesteps of the schedule (the pipeline's ``get_timesteps``;
    unlike img2img it does not set the scheduler's begin index, and neither do we)."""
    scheduler.set_timesteps(num_inference_steps, device=device)
    t_start = max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)
    return scheduler.timesteps[t_start * scheduler.order :]


def inverse_timesteps(
    inverse_scheduler: Any, num_inference_steps: int, strength: float, device: Any = None
) -> torch.Tensor:
    """The first ``int(steps * strength)`` timesteps of an inverse schedule (``get_inverse_timesteps``):
    inversion stops at the encoding ratio."""
    inverse_scheduler.set_timesteps(num_inference_steps, device=device)
    t_start = max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)
    ts = inverse_scheduler.timesteps
    return ts if t_start == 0 else ts[:-t_start]


def draw_latents(encoded: Any, repeats: int, generator: Any, scaling_factor: float) -> torch.Tensor:
    """``repeats`` samples per image of a VAE ``encode`` output, scaled: ``[B * repeats, C, h, w]``.

    The same numbers as encoding every image ``repeats`` times and calling ``latent_dist.sample``
    with ``generator`` (diffusers' mask step), for one VAE pass. A VAE without a distribution
    (``AutoencoderTiny``) gives its latents, repeated.
    """
    from p2pz_directions.sampling.latents import randn

    def rep(
        x: torch.Tensor,
    ) -> torch.Tensor:  # repeats == 1 keeps the VAE's memory format (the UNet rounds alike)
        return x if repeats == 1 else x.repeat_interleave(repeats, dim=0)

    dist = getattr(encoded, "latent_dist", None)
    if dist is None:
        return scaling_factor * rep(encoded.latents)
    mean, std = rep(dist.mean), rep(dist.std)
    eps = randn(mean.shape, generator, mean.device, mean.dtype)
    return scaling_factor * (mean + std * eps)


def noise_to_strength(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, num_inference_steps: int, strength: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` at the first timestep ``strength`` keeps (DDPM eq. 4;
    DiffEdit's mask encodes to ``mask_encode_strength``). Returns ``(x_t, t)``."""
    t = diffedit_timesteps(scheduler, num_inference_steps, strength, latents.device)[0]
    # one timestep per row: DPMSolverMultistepScheduler.add_noise cannot take a 0-d one (diffusers'
    # generate_mask fails there); DDIM gives the same numbers either way
    return scheduler.add_noise(latents, noise, t.repeat(latents.shape[0])), t


@torch.no_grad()
def mask_noise_preds(
    unet: Any,
    scheduler: Any,
    noisy: torch.Tensor,
    t: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    source_negative: torch.Tensor | None = None,
    target_negative: torch.Tensor | None = None,
    guidance_scale: float = 7.5,
    cross_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided noise predictions ``(eps_source, eps_target)`` of DiffEdit's mask, in one UNet batch.

    All embeddings have one row per row of ``noisy``. With guidance on, the unconditional branch is
    run once when both negatives are equal (the default ``""``): 3 instead of 4 rows per draw.
    """
    guided = guidance_scale > 1.0
    if guided and (source_negative is None or target_negative is None):
        raise ValueError("guidance_scale > 1 needs source_negative and target_negative embeddings")
    shared = guided and (source_negative is target_negative or torch.equal(source_negative, target_negative))
    if not guided:
        parts = [source, target]
    elif shared:
        parts = [source_negative, source, target]
    else:
        parts = [source_negative, source, target_negative, target]
    model_in = scheduler.scale_model_input(torch.cat([noisy] * len(parts)), t)
    kw = {} if cross_attention_kwargs is None else {"cross_attention_kwargs": cross_attention_kwargs}
    pred = unet(model_in, t, encoder_hidden_states=torch.cat(parts), return_dict=False, **kw)[0].chunk(
        len(parts)
    )
    if not guided:
        return pred[0], pred[1]
    if shared:
        return cfg(torch.cat(pred[:2]), guidance_scale), cfg(torch.cat([pred[0], pred[2]]), guidance_scale)
    return cfg(torch.cat(pred[:2]), guidance_scale), cfg(torch.cat(pred[2:]), guidance_scale)


def mask_guidance_map(eps_source: torch.Tensor, eps_target: torch.Tensor, num_maps: int) -> torch.Tensor:
    """DiffEdit eq. 3-4: ``|eps_target - eps_source|`` averaged over the ``num_maps`` noise draws of each
    image and over the latent channels: ``[B, h, w]``."""
    diff = (eps_target - eps_source).abs()
    return diff.reshape(-1, num_maps, *diff.shape[-3:]).mean([1, 2])


def threshold_mask(guidance_map: torch.Tensor, mask_thresholding_ratio: float = 3.0) -> torch.Tensor:
    """DiffEdit's binarization: clamp at ``ratio * mean`` (the mean over the whole batch, as diffusers),
    rescale to [0, 1], 1 where above 0.5. Float 0/1, the shape of ``guidance_map``."""
    clamp = guidance_map.mean() * mask_thresholding_ratio
    return ((guidance_map.clamp(0, clamp) / clamp) > 0.5).to(guidance_map.dtype)


@torch.no_grad()
def mask_noise_preds_by_draw(
    predict: Callable[..., torch.Tensor],
    scheduler: Any,
    noisy: torch.Tensor,
    t: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    num_maps: int,
    source_negative: torch.Tensor | None = None,
    target_negative: torch.Tensor | None = None,
    guided: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask_noise_preds` one noise draw at a time, through a sampler's ``predict(x, t, i, tensors)``
    (`cfg_predictor`, its guidance scale the mask's): ``2 * num_maps`` calls on ``B`` rows each (the
    draw ``d`` of every image), source and target apart - the batch shape of the edit's own steps.

    Through a `UNetRunner` in ``graphs`` / ``compile`` mode those calls replay the edit's CUDA graph
    (or compiled step) instead of running the UNet eagerly on ``3-4 x B x num_maps`` rows, whose
    first pass pays a cuDNN / cuBLAS plan for every layer at a batch size used nowhere else; the
    mask's memory stays that of one edit step. ``noisy`` and the embeddings are image-major
    (``[B * num_maps, ...]``, draws of image 0 first), as `draw_latents` gives them.
    """
    if guided and (source_negative is None or target_negative is None):
        raise ValueError("guidance needs source_negative and target_negative embeddings")
    model_in = scheduler.scale_model_input(noisy, t)
    eps_src, eps_tgt = torch.empty_like(noisy), torch.empty_like(noisy)
    for d in range(num_maps):
        x = model_in[d::num_maps]
        for i, (out, cond, neg) in enumerate(
            ((eps_src, source, source_negative), (eps_tgt, target, target_negative))
        ):
            embeds = torch.cat([neg[d::num_maps], cond[d::num_maps]]) if guided else cond[d::num_maps]
            out[d::num_maps] = predict(x, t, 2 * d + i, {"prompt_embeds": embeds})
        if progress is not None:
            progress(d + 1, num_maps)
    return eps_src, eps_tgt


def diffedit_mask(
    unet: Any,
    scheduler: Any,
    image_latents: torch.Tensor,
    noise: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    num_maps: int,
    num_inference_steps: int = 50,
    mask_encode_strength: float = 0.5,
    mask_thresholding_ratio: float = 3.0,
    guidance_scale: float = 7.5,
    source_negative: torch.Tensor | None = None,
    target_negative: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    predict: Callable[..., torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffEdit step 1: ``(mask [B, h, w] float 0/1, guidance map [B, h, w])``.

    ``image_latents`` and ``noise`` are ``[B * num_maps, C, h, w]`` (`draw_latents` and a Gaussian
    draw); the embeddings have one row per draw (or one row for all). Without ``predict`` the noise
    predictions are one UNet batch (`mask_noise_preds`, diffusers' way); with a predictor of
    ``guidance_scale`` (`cfg_predictor`) they are one call per draw and side
    (`mask_noise_preds_by_draw`): the same numbers up to the rounding of another batch size.
    """
    noisy, t = noise_to_strength(scheduler, image_latents, noise, num_inference_steps, mask_encode_strength)

    def rows(e: torch.Tensor | None) -> torch.Tensor | None:  # one row for all draws -> one per draw
        return e if e is None or e.shape[0] != 1 else e.expand(noisy.shape[0], *e.shape[1:])

    source, target, source_negative, target_negative = map(
        rows, (source, target, source_negative, target_negative)
    )
    if predict is not None:
        eps_src, eps_tgt = mask_noise_preds_by_draw(
            predict, scheduler, noisy, t, source, target, num_maps=num_maps, source_negative=source_negative,
            target_negative=target_negative, guided=guidance_scale > 1.0, progress=progress,
        )  # fmt: skip
    else:
        eps_src, eps_tgt = mask_noise_preds(
            unet, scheduler, noisy, t, source, target, source_negative=source_negative,
            target_negative=target_negative, guidance_scale=guidance_scale,
            cross_attention_kwargs=cross_attention_kwargs,
        )  # fmt: skip
    gmap = mask_guidance_map(eps_src, eps_tgt, num_maps)
    return threshold_mask(gmap, mask_thresholding_ratio), gmap


def inversion_predictor(
    unet: Any,
    inverse_scheduler: Any,
    *,
    guidance_scale: float = 7.5,
    runner: UNetRunner | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    num_reg_steps: int = 0,
    lambda_auto_corr: float = 20.0,
    lambda_kl: float = 20.0,
    num_auto_corr_rolls: int = 5,
    generator: Any = None,
) -> Callable[..., torch.Tensor]:
    """The predictor of DiffEdit's inversion (step 2): classifier-free guided UNet output on
    ``tensors["prompt_embeds"]``, then, with ``num_reg_steps > 0``, pix2pix-zero's regularization of
    the noise (``regularize_noise_pred``; the random rolls drawn from ``generator`` step by step, as
    diffusers). The regularizer sees the un-doubled latents (diffusers passes the guidance-doubled
    batch, which only changes anything for v- or sample-prediction models with guidance on).

    The UNet step is `cfg_predictor`'s under its default name: with the edit's guidance scale (the
    default) the inversion, the mask (`mask_noise_preds_by_draw`) and the edit replay one CUDA graph
    (or compiled step) of one runner, captured once."""
    guided = cfg_predictor(
        unet, guidance_scale=guidance_scale, runner=runner, cross_attention_kwargs=cross_attention_kwargs,
    )  # fmt: skip
    if num_reg_steps <= 0:
        return guided
    pred_type = inverse_scheduler.config.prediction_type

    def predict(x: torch.Tensor, t: Any, i: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        eps = guided(x, t, i, tensors)
        alpha = inverse_scheduler.alphas_cumprod[int(t)]
        return regularize_noise_pred(
            eps, x, alpha, pred_type, lambda_auto_corr=lambda_auto_corr, lambda_kl=lambda_kl,
            num_reg_steps=num_reg_steps, num_auto_corr_rolls=num_auto_corr_rolls, generator=generator,
        )  # fmt: skip

    return predict


def mask_blend(latents: torch.Tensor, mask: torch.Tensor, inverted: torch.Tensor) -> torch.Tensor:
    """DiffEdit eq. 5: ``M * y_t + (1 - M) * x_t`` - the edit inside the mask, the inverted image outside."""
    return latents * mask + inverted * (1 - mask)


def mask_guidance_callback(
    mask: torch.Tensor, inverted: torch.Tensor, callback_on_step_end: StepEndCallback | None = None
) -> StepEndCallback:
    """A ``callback_on_step_end`` for ``sampling.denoise`` that applies `mask_blend` after step ``i``
    with ``inverted[i]`` (``[T, B, C, h, w]``, the inverted latents per step, most-noised first),
    then calls the user's callback (which sees the blended latents, as diffusers' legacy callback)."""

    def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kwargs = dict(kwargs)
        kwargs["latents"] = mask_blend(kwargs["latents"], mask, inverted[i])
        if callback_on_step_end is not None:
            out = callback_on_step_end(pipe, i, t, dict(kwargs))
            if out:
                kwargs.update(out)
        return kwargs

    return on_step_end
