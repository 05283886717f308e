"""DiffEdit (Couairon et al., ICLR 2023, arXiv 2210.11427) on diffusers' building blocks.

Three plain steps, each a small function below, the loop visible in one place:

1. `diffedit_mask` - noise the image latents ``num_maps_per_mask`` times to ``mask_encode_strength``,
   predict the noise under the source and the target conditioning, average ``|eps_target - eps_source|``
   over draws and channels, clamp at ``mask_thresholding_ratio`` times its mean and binarize at 0.5.
2. `ddim_invert` - DDIM inversion of the image latents up to ``inpaint_strength``, keeping every
   intermediate latent (optionally with pix2pix-zero's auto-correlation / KL regularization).
3. `diffedit_denoise` - DDIM denoising from the most-noised inverted latent with the target (and the
   source as negative), replacing the latents outside the mask by the inverted ones after each step.

They reproduce ``StableDiffusionDiffEditPipeline.generate_mask`` / ``invert`` / ``__call__`` of diffusers
(the tests prove equality on tiny models) with three differences, all noted where they happen:
the image is VAE-encoded once instead of ``num_maps_per_mask + 1`` times; the unconditional branch of the
mask is run once when source and target share their negative conditioning; classifier-free guidance of
the mask is the usual ``uncond + g * (cond - uncond)`` (diffusers swaps the two halves, which gives the
same mask when both negatives are equal, the default, and a different one otherwise).

The editor class `DiffEditEditor` wraps them: a direction's concept embeddings stand in for prompts
(mask from source vs target, inversion conditioned on the source, edit with the target and the source
as negative), and the plugin hook makes it discoverable as ``diffedit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "auto_corr_loss",
    "cfg_noise_pred",
    "ddim_invert",
    "diffedit_denoise",
    "diffedit_mask",
    "kl_divergence",
    "mask_guidance_map",
    "strength_timesteps",
    "threshold_mask",
]

StepCallback = Callable[[int, Any, torch.Tensor], None]


# ---------------------------------------------------------------------------------------------------
# small pure pieces
# ---------------------------------------------------------------------------------------------------
def check_strength(value: float, name: str) -> float:
    """``value`` as a float in (0, 1], else a ValueError that says what to pass.

    >>> check_strength(0.8, "inpaint_strength")
    0.8
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], not {value!r}") from None
    if not 0.0 < v <= 1.0:
        raise ValueError(
            f"{name}={value} is outside (0, 1]: it is the fraction of the schedule that is re-noised "
            f"(0.8 means 80% of the steps). Pass a value such as 0.5 or 0.8."
        )
    return v


def strength_timesteps(timesteps: torch.Tensor, num_inference_steps: int, strength: float, order: int = 1):
    """The tail of a descending schedule that a ``strength`` keeps, and where it starts.

    Same rule as diffusers' ``get_timesteps``: ``int(steps * strength)`` steps are run, the first
    ``t_start = steps - that`` are skipped. Returns ``(timesteps, t_start)``.

    >>> ts = torch.arange(10, 0, -1)
    >>> strength_timesteps(ts, 10, 0.5)[0].tolist()
    [5, 4, 3, 2, 1]
    """
    init = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init, 0)
    return timesteps[t_start * order :], t_start


def cfg_noise_pred(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    t: torch.Tensor | int,
    embeds: torch.Tensor,
    guidance_scale: float,
    *,
    scheduler: Any = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    timestep_cond: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """One UNet call with classifier-free guidance.

    ``embeds`` is ``cat([negative, positive])`` when ``guidance_scale > 1`` (one batched call), else
    just the positive embeddings. Returns ``uncond + g * (cond - uncond)`` (or the plain prediction).
    """
    do_cfg = guidance_scale > 1.0
    model_in = torch.cat([latents] * 2) if do_cfg else latents
    if scheduler is not None:
        model_in = scheduler.scale_model_input(model_in, t)
    kwargs: dict[str, Any] = {"encoder_hidden_states": embeds, "return_dict": False}
    if cross_attention_kwargs is not None:
        kwargs["cross_attention_kwargs"] = cross_attention_kwargs
    if timestep_cond is not None:
        kwargs["timestep_cond"] = timestep_cond
    if added_cond_kwargs is not None:
        kwargs["added_cond_kwargs"] = added_cond_kwargs
    pred = unet(model_in, t, **kwargs)[0]
    if do_cfg:
        uncond, cond = pred.chunk(2)
        pred = uncond + guidance_scale * (cond - uncond)
    return pred


def mask_guidance_map(noise_source: torch.Tensor, noise_target: torch.Tensor, num_maps: int) -> torch.Tensor:
    """``|eps_target - eps_source|`` averaged over the ``num_maps`` draws and the channels: ``[B, h, w]``."""
    diff = (noise_target - noise_source).abs()
    return diff.reshape(-1, num_maps, *diff.shape[-3:]).mean([1, 2])


def threshold_mask(guidance_map: torch.Tensor, mask_thresholding_ratio: float = 3.0) -> torch.Tensor:
    """DiffEdit's binarization: clamp at ``ratio * mean``, normalize, 1 where above 0.5 (float 0/1).

    >>> threshold_mask(torch.tensor([[[0.0, 1.0], [0.1, 2.0]]]), 1.0).tolist()
    [[[0.0, 1.0], [0.0, 1.0]]]
    """
    clamp = guidance_map.mean() * mask_thresholding_ratio
    normalized = guidance_map.clamp(0, clamp) / clamp
    return (normalized > 0.5).to(guidance_map.dtype)


def kl_divergence(x: torch.Tensor) -> torch.Tensor:
    """KL of N(mean(x), var(x)) from N(0, 1), up to a constant (pix2pix-zero's regularizer)."""
    # var() is evaluated twice on purpose: the gradient then sums the same two terms, in the same
    # order, as the reference implementation (one shared node rounds differently).
    return x.var() + x.mean() ** 2 - 1 - torch.log(x.var() + 1e-7)


def auto_corr_loss(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sum of squared auto-correlations of ``x`` at random rolls, over a pyramid of 2x poolings.

    One random roll per level (drawn from ``generator``, as pix2pix-zero does); stops at 8x8.
    """
    loss = x.new_zeros(())
    dev = generator.device if generator is not None else None
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            level = x[i : i + 1, j : j + 1]
            while True:
                roll = int(torch.randint(level.shape[2] // 2, (1,), generator=generator, device=dev).item())
                loss = loss + (level * torch.roll(level, shifts=roll, dims=2)).mean() ** 2
                loss = loss + (level * torch.roll(level, shifts=roll, dims=3)).mean() ** 2
                if level.shape[2] <= 8:
                    break
                level = torch.nn.functional.avg_pool2d(level, kernel_size=2)
    return loss


def _epsilon(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor, pred_type: str):
    beta_prod_t = 1 - alpha_prod_t
    if pred_type == "epsilon":
        return model_output
    if pred_type == "sample":
        return (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
    if pred_type == "v_prediction":
        return alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    raise ValueError(f"prediction_type {pred_type!r} must be 'epsilon', 'sample' or 'v_prediction'")


def regularize_noise_pred(
    noise_pred: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    pred_type: str,
    *,
    num_reg_steps: int,
    lambda_auto_corr: float = 20.0,
    lambda_kl: float = 20.0,
    num_auto_corr_rolls: int = 5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Push a noise prediction towards i.i.d. standard normal noise (pix2pix-zero's inversion trick).

    Gradient steps on the auto-correlation and KL losses of the implied epsilon. ``sample`` is the
    (unbatched-for-guidance) latent the prediction belongs to; diffusers passes the guidance-doubled
    batch there, which only matters for v-/sample-prediction with guidance on.
    """
    for _ in range(num_reg_steps):
        if lambda_auto_corr > 0:
            for _ in range(num_auto_corr_rolls):
                with torch.enable_grad():
                    var = noise_pred.detach().clone().requires_grad_(True)
                    loss = auto_corr_loss(_epsilon(var, sample.detach(), alpha_prod_t, pred_type), generator)
                    (grad,) = torch.autograd.grad(loss, var)
                noise_pred = noise_pred - lambda_auto_corr * (grad / num_auto_corr_rolls)
        if lambda_kl > 0:
            with torch.enable_grad():
                var = noise_pred.detach().clone().requires_grad_(True)
                loss = kl_divergence(_epsilon(var, sample.detach(), alpha_prod_t, pred_type))
                (grad,) = torch.autograd.grad(loss, var)
            noise_pred = noise_pred - lambda_kl * grad
        noise_pred = noise_pred.detach()
    return noise_pred


def _call_back(
    callback: StepCallback | None, callback_steps: int, i: int, t: Any, latents: torch.Tensor
) -> None:
    if callback is not None and i % callback_steps == 0:
        callback(i, t, latents)


# ---------------------------------------------------------------------------------------------------
# the three steps
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def diffedit_mask(
    unet: torch.nn.Module,
    scheduler: Any,
    image_latents: torch.Tensor,
    noise: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    source_negative: torch.Tensor | None = None,
    target_negative: torch.Tensor | None = None,
    num_inference_steps: int = 50,
    mask_encode_strength: float = 0.5,
    mask_thresholding_ratio: float = 3.0,
    guidance_scale: float = 7.5,
    cross_attention_kwargs: dict[str, Any] | None = None,
    return_map: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """DiffEdit's mask for one image, at latent resolution: ``[1, h, w]`` float 0/1.

    ``image_latents`` ``[N, C, h, w]`` are N draws of the scaled VAE latents of the image and ``noise``
    N standard normal draws (``N = num_maps_per_mask``). ``source`` / ``target`` ``[1, L, D]`` condition
    the two predictions; ``*_negative`` (same shape, needed when ``guidance_scale > 1``) are their
    unconditional branches. With ``return_map`` also returns the continuous guidance map.

    >>> mask = diffedit_mask(unet, scheduler, lat, noise, src, tgt,                  # doctest: +SKIP
    ...                      source_negative=uncond, target_negative=uncond)
    """
    n = image_latents.shape[0]
    scheduler.set_timesteps(num_inference_steps, device=image_latents.device)
    timesteps, _ = strength_timesteps(scheduler.timesteps, num_inference_steps, mask_encode_strength)
    t = timesteps[0]
    noisy = scheduler.add_noise(image_latents, noise, t)
    do_cfg = guidance_scale > 1.0

    def rep(e: torch.Tensor) -> torch.Tensor:
        return e.expand(n, *e.shape[1:]) if e.shape[0] == 1 else e.repeat_interleave(n, dim=0)

    if do_cfg:
        if source_negative is None or target_negative is None:
            raise ValueError("guidance_scale > 1 needs source_negative and target_negative embeddings")
        shared = source_negative is target_negative or torch.equal(source_negative, target_negative)
        # one unconditional branch when both negatives are the same: 3N instead of 4N UNet rows
        parts = (
            [source_negative, source, target]
            if shared
            else [source_negative, source, target_negative, target]
        )
    else:
        parts = [source, target]
    embeds = torch.cat([rep(p) for p in parts])
    model_in = scheduler.scale_model_input(torch.cat([noisy] * len(parts)), t)
    kwargs: dict[str, Any] = {"encoder_hidden_states": embeds, "return_dict": False}
    if cross_attention_kwargs is not None:
        kwargs["cross_attention_kwargs"] = cross_attention_kwargs
    pred = unet(model_in, t, **kwargs)[0].chunk(len(parts))
    if not do_cfg:
        eps_src, eps_tgt = pred
    elif len(parts) == 3:
        eps_src = pred[0] + guidance_scale * (pred[1] - pred[0])
        eps_tgt = pred[0] + guidance_scale * (pred[2] - pred[0])
    else:
        eps_src = pred[0] + guidance_scale * (pred[1] - pred[0])
        eps_tgt = pred[2] + guidance_scale * (pred[3] - pred[2])
    gmap = mask_guidance_map(eps_src, eps_tgt, n)
    mask = threshold_mask(gmap, mask_thresholding_ratio)
    return (mask, gmap) if return_map else mask


@torch.no_grad()
def ddim_invert(
    unet: torch.nn.Module,
    inverse_scheduler: Any,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    *,
    num_inference_steps: int = 50,
    inpaint_strength: float = 0.8,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    num_reg_steps: int = 0,
    lambda_auto_corr: float = 20.0,
    lambda_kl: float = 20.0,
    num_auto_corr_rolls: int = 5,
    cross_attention_kwargs: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    callback_steps: int = 1,
) -> torch.Tensor:
    """DDIM inversion of clean ``latents`` ``[B, C, h, w]`` up to ``inpaint_strength``.

    ``embeds`` is ``cat([negative, positive])`` when ``guidance_scale > 1``, else the positive ones.
    Returns every intermediate latent, most-noised first: ``[B, T, C, h, w]`` with
    ``T = int(num_inference_steps * inpaint_strength)`` (diffusers' ``invert(...).latents``).
    """
    inverse_scheduler.set_timesteps(num_inference_steps, device=latents.device)
    timesteps = inverse_scheduler.timesteps
    _, t_start = strength_timesteps(timesteps, num_inference_steps, inpaint_strength)
    if t_start > 0:
        timesteps = timesteps[:-t_start]
    pred_type = inverse_scheduler.config.prediction_type
    out = []
    for i, t in enumerate(timesteps):
        noise_pred = cfg_noise_pred(
            unet,
            latents,
            t,
            embeds,
            guidance_scale,
            scheduler=inverse_scheduler,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        if num_reg_steps > 0:
            alpha = inverse_scheduler.alphas_cumprod[int(t)]
            sample = inverse_scheduler.scale_model_input(latents, t)
            noise_pred = regularize_noise_pred(
                noise_pred,
                sample,
                alpha,
                pred_type,
                num_reg_steps=num_reg_steps,
                lambda_auto_corr=lambda_auto_corr,
                lambda_kl=lambda_kl,
                num_auto_corr_rolls=num_auto_corr_rolls,
                generator=generator,
            )
        latents = inverse_scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        out.append(latents)
        _call_back(callback, callback_steps, i, t, latents)
    return torch.stack(out[::-1], 1)


@torch.no_grad()
def diffedit_denoise(
    unet: torch.nn.Module,
    scheduler: Any,
    image_latents: torch.Tensor,
    mask: torch.Tensor,
    embeds: torch.Tensor,
    *,
    num_inference_steps: int = 50,
    inpaint_strength: float = 0.8,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    callback_steps: int = 1,
) -> torch.Tensor:
    """DDIM denoising inside ``mask``, the inverted latents kept outside it.

    ``image_latents`` ``[B, T, C, h, w]`` come from `ddim_invert` (most-noised first), ``mask`` is
    ``[B, 1, h, w]`` with 1 where the image is repainted. Starts from ``latents`` if given, else from
    ``image_latents[:, 0]``. After step ``i`` the latents outside the mask are replaced by
    ``image_latents[:, i]``, as diffusers does. Returns the final latents ``[B, C, h, w]``.
    """
    scheduler.set_timesteps(num_inference_steps, device=image_latents.device)
    timesteps, _ = strength_timesteps(
        scheduler.timesteps, num_inference_steps, inpaint_strength, scheduler.order
    )
    if image_latents.shape[1] != len(timesteps):
        raise ValueError(
            f"image_latents hold {image_latents.shape[1]} inverted steps but num_inference_steps="
            f"{num_inference_steps} with inpaint_strength={inpaint_strength} runs {len(timesteps)}: invert "
            f"with the same two settings."
        )
    per_step = image_latents.transpose(0, 1).contiguous()
    x = per_step[0].clone() if latents is None else latents.to(per_step.dtype)
    step_kwargs = _step_kwargs(scheduler, eta, generator)
    keep = 1 - mask
    for i, t in enumerate(timesteps):
        noise_pred = cfg_noise_pred(
            unet,
            x,
            t,
            embeds,
            guidance_scale,
            scheduler=scheduler,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        x = scheduler.step(noise_pred, t, x, **step_kwargs, return_dict=False)[0]
        x = x * mask + per_step[i] * keep
        _call_back(callback, callback_steps, i, t, x)
    return x


def _step_kwargs(scheduler: Any, eta: float, generator: torch.Generator | None) -> dict[str, Any]:
    import inspect

    params = set(inspect.signature(scheduler.step).parameters)
    out: dict[str, Any] = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params:
        out["generator"] = generator
    return out
