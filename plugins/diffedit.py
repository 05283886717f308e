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

import os
from collections.abc import Callable
from pathlib import Path
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


# ---------------------------------------------------------------------------------------------------
# user masks
# ---------------------------------------------------------------------------------------------------
def _mask_array(mask: Any) -> tuple[Any, list[str]]:
    """A user mask as a float32 numpy ``[H, W]`` in 0..1, and notes on what was converted."""
    import numpy as np
    from PIL import Image

    from p2pz_directions.images import ImageError

    notes: list[str] = []
    if isinstance(mask, (str, os.PathLike)):
        path = Path(mask)
        if not path.is_file():
            raise ImageError(f"mask file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                mask = im.copy()
        except (OSError, ValueError) as e:
            raise ImageError(
                f"{path} is not a mask image Pillow can read ({e}); give a PNG with white = edit"
            ) from None
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "1", "I", "I;16", "F"):
            notes.append(f"mask converted from mode {mask.mode} to one channel (luminance)")
            mask = mask.convert("L")
        arr = np.asarray(mask, dtype=np.float32)
        top = {"L": 255.0, "1": 1.0, "I;16": 65535.0}.get(mask.mode, 255.0 if arr.max() > 1 else 1.0)
        return arr / top, notes
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().float().numpy()
    if not isinstance(mask, np.ndarray):
        raise ImageError(
            f"cannot use a {type(mask).__name__} as a mask; give a path, PIL image, array or tensor"
        )
    arr = mask
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        chan_first = arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4)
        arr = np.moveaxis(arr, 0, -1) if chan_first else arr
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.shape[-1] in (3, 4):
            notes.append(f"mask converted from {arr.shape[-1]} channels to one (luminance)")
            arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if arr.ndim != 2:
        raise ImageError(f"a mask must be [H, W] (or [1, H, W], [H, W, 3]); got shape {list(mask.shape)}")
    if mask.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0, notes
    arr = arr.astype(np.float32)
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ImageError(
            f"mask values must lie in 0..1 (white = edit), or be 8-bit 0..255; got {arr.min():g}..{arr.max():g}"
        )
    return arr, notes


def prepare_mask(
    mask: Any, image_size: tuple[int, int], latent_size: tuple[int, int]
) -> tuple[torch.Tensor, list[str]]:
    """A user mask as DiffEdit uses it: ``[1, 1, h, w]`` float 0/1 at latent resolution, and notes.

    Accepts a path, PIL image (any mode; not single-channel -> luminance, with a note), numpy array
    or tensor. White (>= 0.5) marks what is repainted. A mask the size of the image (``image_size``
    ``(W, H)``) or of the latents (``latent_size`` ``(w, h)``) is used as is (the first averaged down
    to the latent grid); any other size is resized to the image first, with a note.
    """
    import numpy as np
    from PIL import Image

    arr, notes = _mask_array(mask)
    h, w = arr.shape
    if (w, h) != tuple(latent_size):
        im = Image.fromarray(arr.astype(np.float32), mode="F")
        if (w, h) != tuple(image_size):
            notes.append(f"mask resized {w}x{h} -> {image_size[0]}x{image_size[1]} (the image size)")
            im = im.resize(tuple(image_size), resample=Image.Resampling.BILINEAR)
        im = im.resize(tuple(latent_size), resample=Image.Resampling.BOX)
        arr = np.asarray(im, dtype=np.float32)
    out = torch.from_numpy((arr >= 0.5).astype(np.float32))[None, None]
    return out, notes


def mask_to_image(mask: torch.Tensor, size: tuple[int, int]):
    """A latent-resolution 0/1 mask as an 8-bit PIL image of ``size`` ``(W, H)``: white = edited.

    The form inpainting pipelines take as ``mask_image``.
    """
    import numpy as np
    from PIL import Image

    m = mask.detach().float().cpu().reshape(mask.shape[-2:]).numpy()
    im = Image.fromarray((m >= 0.5).astype(np.uint8) * 255, mode="L")
    return im.resize(tuple(size), resample=Image.Resampling.NEAREST)


# ---------------------------------------------------------------------------------------------------
# CUDA graphs: the same UNet forward, replayed instead of launched kernel by kernel
# ---------------------------------------------------------------------------------------------------
class CudaGraphUNet:
    """Calls ``unet`` like the samplers do, replaying one captured CUDA graph per input shape.

    A Stable Diffusion UNet step at batch 1-2 is bound by the CPU launching ~1000 small kernels
    (about 30 ms on an H100, for 1-2 ms of GPU work); replaying a graph removes that. The kernels
    are the ones eager mode runs, so results match eager mode. Used for the sampling loops (the
    mask's single big batch stays eager). Falls back to eager, with a warning, on the CPU, with
    extra UNet arguments (``cross_attention_kwargs``...), or when a capture fails.

    >>> runner = CudaGraphUNet(unet)                        # doctest: +SKIP
    >>> eps = runner(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]   # doctest: +SKIP
    """

    def __init__(self, unet: torch.nn.Module, warmup: int = 2):
        self.unet = unet
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}
        self.failed: str | None = None

    def __getattr__(self, name: str) -> Any:  # config, dtype, device ... of the wrapped UNet
        return getattr(self.__dict__["unet"], name)

    def _eager(self, sample, timestep, encoder_hidden_states, **kw):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kw)

    def __call__(self, sample, timestep, encoder_hidden_states=None, return_dict=False, **kw):
        extra = {k: v for k, v in kw.items() if v is not None}
        if extra or self.failed or sample.device.type != "cuda" or encoder_hidden_states is None:
            return self._eager(sample, timestep, encoder_hidden_states, return_dict=return_dict, **kw)
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        t = t.to(sample.device)
        ehs = encoder_hidden_states
        key = (
            tuple(sample.shape),
            sample.stride(),
            sample.dtype,
            tuple(ehs.shape),
            ehs.dtype,
            tuple(t.shape),
            t.dtype,
        )
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(sample, t, ehs)
            except Exception as e:  # noqa: BLE001 - any capture problem: run eagerly from now on
                import warnings

                self.failed = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"CUDA graph capture failed ({self.failed}); running the UNet eagerly", stacklevel=2
                )
                torch.cuda.synchronize(sample.device)
                return self._eager(sample, timestep, encoder_hidden_states, return_dict=return_dict)
            self.graphs[key] = entry
        graph, s_in, s_t, s_ehs, s_out = entry
        s_in.copy_(sample)
        s_t.copy_(t)
        s_ehs.copy_(ehs)
        graph.replay()
        return (s_out.clone(),)

    def _capture(self, sample: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor) -> tuple:
        s_in, s_t, s_ehs = sample.clone(), t.clone(), ehs.clone()  # clone keeps the memory format
        side = torch.cuda.Stream(sample.device)
        side.wait_stream(torch.cuda.current_stream(sample.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.unet(s_in, s_t, encoder_hidden_states=s_ehs, return_dict=False)
        torch.cuda.current_stream(sample.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            s_out = self.unet(s_in, s_t, encoder_hidden_states=s_ehs, return_dict=False)[0]
        return graph, s_in, s_t, s_ehs, s_out


def unet_runner(editor: Any, unet: torch.nn.Module, cuda_graphs: bool | None) -> Any:
    """``unet`` itself, or (``cuda_graphs`` on a CUDA device) its `CudaGraphUNet`, kept on the editor
    so that graphs captured by one edit serve the next ones."""
    if cuda_graphs is False or editor.device.type != "cuda":
        return unet
    cached = editor.__dict__.get("_p2pz_graphed")
    if cached is None or cached.unet is not unet:
        cached = CudaGraphUNet(unet)
        editor.__dict__["_p2pz_graphed"] = cached
    return cached


# ---------------------------------------------------------------------------------------------------
# the editor
# ---------------------------------------------------------------------------------------------------
from p2pz_directions.editors import Editor, EditorError, EditorOptionError, EditResult  # noqa: E402
from p2pz_directions.hookspecs import hookimpl  # noqa: E402


class OptionValueError(EditorOptionError, ValueError):
    """An option has a value the editor cannot use (a strength outside (0, 1], a count below 1...)."""


def _strength(value: float, name: str) -> float:
    try:
        return check_strength(value, name)
    except ValueError as e:
        raise OptionValueError(str(e)) from None


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionValueError(f"{name} must be a positive whole number, not {value!r}")
    return value


def _steps_run(num_inference_steps: int, strength: float, name: str) -> int:
    n = min(int(num_inference_steps * strength), num_inference_steps)
    if n < 1:
        raise OptionValueError(
            f"{name}={strength} with num_inference_steps={num_inference_steps} runs no step at all "
            f"(int({num_inference_steps} * {strength}) = 0); raise one of them"
        )
    return n


class TextConditioning:
    """Encodes prompts for an editor, and checks embeddings users pass, with the model's text encoder.

    As diffusers' ``encode_prompt``: ``clip_skip`` applies to positive prompts only; the empty
    prompt ``""`` is the unconditional embedding (computed once).
    """

    def __init__(self, editor: Editor, clip_skip: int | None = None):
        self.editor = editor
        self.clip_skip = clip_skip

    def encode(self, text: str, *, positive: bool = True) -> torch.Tensor:
        from p2pz_plugins._common import encode_prompt

        ed = self.editor
        comps = ed.load_components(("tokenizer", "text_encoder"))
        skip = self.clip_skip if positive else None
        cache = ed.__dict__.setdefault("_p2pz_text_cache", {})
        key = (text, skip, ed.dtype, str(ed.device))
        if key not in cache:
            cache[key] = encode_prompt(
                comps["tokenizer"], comps["text_encoder"], text, ed.device, clip_skip=skip, dtype=ed.dtype
            )
        return cache[key]

    def embeds(self, value: torch.Tensor, name: str, dim: int) -> torch.Tensor:
        ed = self.editor
        if not isinstance(value, torch.Tensor):
            raise EditorOptionError(f"{name} must be a torch.Tensor [1, 77, D], not {type(value).__name__}")
        if value.dim() == 2:
            value = value.unsqueeze(0)
        if value.dim() != 3 or value.shape[0] != 1 or value.shape[-1] != dim:
            raise OptionValueError(
                f"{name} has shape {list(value.shape)}; this model's UNet takes [1, L, {dim}] text embeddings"
            )
        return value.to(device=ed.device, dtype=ed.dtype)

    def pick(
        self,
        text: str | None,
        embeds: torch.Tensor | None,
        default: torch.Tensor | Callable[[], torch.Tensor],
        name: str,
        dim: int,
        *,
        positive: bool = True,
    ) -> torch.Tensor:
        """``embeds`` if given, else the encoding of ``text`` if given, else ``default``."""
        if text is not None and embeds is not None:
            raise EditorOptionError(f"pass {name} or {name}_embeds, not both")
        if embeds is not None:
            return self.embeds(embeds, f"{name}_embeds", dim)
        if text is not None:
            if not isinstance(text, str):
                raise EditorOptionError(f"{name} must be a string, not {type(text).__name__}")
            return self.encode(text, positive=positive)
        return default() if callable(default) else default


def _check_finite(latents: torch.Tensor, editor: str, what: str) -> None:
    if not torch.isfinite(latents).all():
        raise EditorError(
            f"{editor}: the {what} latents hold NaN or infinite values. Lower guidance_scale, or run in "
            f"float32 / bfloat16 (--dtype float32) if float16 overflowed"
        )


def _output(images: Any, n: int) -> Any:
    """One image (not a batch of one) when one was asked for."""
    if n == 1 and (isinstance(images, list) or hasattr(images, "shape")) and len(images) == 1:
        return images[0]
    return images


class DiffEditEditor(Editor):
    """DiffEdit with a direction's concepts in place of prompts.

    Default recipe (the diffusers docs' one, concepts for prompts): the mask from the source vs the
    target concept, DDIM inversion conditioned on the source, denoising with the target and the
    source as negative prompt, the inverted latents kept outside the mask.

    >>> ed = editors.get("diffedit", model="stabilityai/stable-diffusion-2-1")      # doctest: +SKIP
    >>> res = ed.edit(photo, "bowl of fruits->bowl of pears", seed=0)               # doctest: +SKIP
    >>> res.image, res.mask               # mask: white = edited, usable by inpainting pipelines
    """

    name = "diffedit"
    description = "DiffEdit: mask from source vs target noise, partial DDIM inversion, masked denoising"
    phases = ("mask", "invert", "edit")
    memory_advice = (
        "lower num_maps_per_mask (the mask runs up to 4 x num_maps_per_mask images in one UNet batch), "
        "use --dtype float16, or a smaller image"
    )

    def run(
        self,
        image: Any,
        direction: Any,
        *,
        # conditioning (default: the direction's concepts)
        source_prompt: str | None = None,
        target_prompt: str | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        source_negative_prompt: str | None = None,
        target_negative_prompt: str | None = None,
        inversion_negative_prompt: str | None = None,
        source_prompt_embeds: torch.Tensor | None = None,
        target_prompt_embeds: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        source_negative_prompt_embeds: torch.Tensor | None = None,
        target_negative_prompt_embeds: torch.Tensor | None = None,
        inversion_negative_prompt_embeds: torch.Tensor | None = None,
        # mask
        mask: Any = None,
        mask_image: Any = None,
        num_maps_per_mask: int = 10,
        mask_encode_strength: float = 0.5,
        mask_thresholding_ratio: float = 3.0,
        mask_guidance_scale: float | None = None,
        mask_only: bool = False,
        # inversion
        inpaint_strength: float = 0.8,
        inversion_guidance_scale: float | None = None,
        num_reg_steps: int = 0,
        lambda_auto_corr: float = 20.0,
        lambda_kl: float = 20.0,
        num_auto_corr_rolls: int = 5,
        image_latents: torch.Tensor | None = None,
        decode_latents: bool = False,
        inversion_callback: StepCallback | None = None,
        # edit
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        callback_steps: int = 1,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        cuda_graphs: bool | None = None,
    ) -> EditResult:
        """Mask, invert, edit. Options (diffusers' names where diffusers has them):

        - conditioning: ``source_prompt`` / ``target_prompt`` (text instead of the concepts, everywhere
          the concept is used), ``prompt`` (inversion; default the source), ``negative_prompt`` (edit;
          default the source), ``inversion_negative_prompt`` (default ``""``),
          ``source_negative_prompt`` / ``target_negative_prompt`` (mask; default ``""``); each has an
          ``*_embeds`` twin taking a ``[1, 77, D]`` tensor.
        - mask: ``mask`` (alias ``mask_image``: a path, image, array or tensor, white = edit; replaces
          the generated mask), ``num_maps_per_mask``, ``mask_encode_strength``,
          ``mask_thresholding_ratio``, ``mask_guidance_scale`` (default ``guidance_scale``),
          ``mask_only`` (stop after the mask: ``image`` is then the mask).
        - inversion: ``inpaint_strength`` (in (0, 1]), ``inversion_guidance_scale`` (default
          ``guidance_scale``), ``num_reg_steps``, ``lambda_auto_corr``, ``lambda_kl``,
          ``num_auto_corr_rolls``, ``image_latents`` (inverted latents from an earlier run: skips
          inversion), ``decode_latents`` (decode every inverted latent into ``extra``),
          ``inversion_callback``.
        - edit: ``num_inference_steps``, ``guidance_scale``, ``eta``, ``num_images_per_prompt``,
          ``latents`` (start here instead of the most-noised inverted latent), ``seed`` /
          ``generator``, ``output_type``, ``callback`` / ``callback_steps``,
          ``cross_attention_kwargs``, ``clip_skip``.
        - speed: ``cuda_graphs`` (default: on for a CUDA device; ``False`` turns it off) replays the UNet of the inversion and edit loops from CUDA
          graphs (`CudaGraphUNet`; captured on the first edit, reused by the next ones).

        The generator is used in diffusers' order (mask, then inversion, then edit), so one seeded
        generator gives the same result as ``generate_mask``, ``invert`` and ``__call__`` of
        ``StableDiffusionDiffEditPipeline`` called one after the other with it.
        """
        from p2pz_plugins._common import ddim_schedulers, image_processor, make_generator, randn
        from p2pz_plugins._common import decode_latents as vae_decode

        if image is None:
            raise EditorOptionError(
                "diffedit edits an existing image: pass one (p2pz edit IMAGE ...). For an image generated "
                "from a prompt, use the pix2pix-zero editor"
            )
        if mask is not None and mask_image is not None:
            raise EditorOptionError("pass mask or mask_image (the same option), not both")
        user_mask = mask if mask is not None else mask_image
        num_inference_steps = _positive_int(num_inference_steps, "num_inference_steps")
        inpaint_strength = _strength(inpaint_strength, "inpaint_strength")
        num_images_per_prompt = _positive_int(num_images_per_prompt, "num_images_per_prompt")
        callback_steps = _positive_int(callback_steps, "callback_steps")
        n_edit = _steps_run(num_inference_steps, inpaint_strength, "inpaint_strength")
        if user_mask is None:
            mask_encode_strength = _strength(mask_encode_strength, "mask_encode_strength")
            _steps_run(num_inference_steps, mask_encode_strength, "mask_encode_strength")
            num_maps_per_mask = _positive_int(num_maps_per_mask, "num_maps_per_mask")
            if not mask_thresholding_ratio or mask_thresholding_ratio <= 0:
                raise OptionValueError(
                    f"mask_thresholding_ratio must be positive, not {mask_thresholding_ratio!r}"
                )
        if num_reg_steps < 0 or num_auto_corr_rolls < 0:
            raise OptionValueError("num_reg_steps and num_auto_corr_rolls must be 0 or more")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise OptionValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', not {output_type!r}")
        g_mask = guidance_scale if mask_guidance_scale is None else mask_guidance_scale
        g_inv = guidance_scale if inversion_guidance_scale is None else inversion_guidance_scale

        comps = self.load_components(("unet", "vae", "scheduler"))
        unet, vae = comps["unet"], comps["vae"]
        dim = int(unet.config.cross_attention_dim)
        dev, dt = self.device, self.dtype
        text = TextConditioning(self, clip_skip)
        loop_unet = unet_runner(self, unet, cuda_graphs)

        def concept(e: torch.Tensor) -> torch.Tensor:
            return e.to(device=dev, dtype=dt)

        def uncond() -> torch.Tensor:
            return text.encode("", positive=False)

        source = text.pick(
            source_prompt,
            source_prompt_embeds,
            lambda: concept(direction.source_embeds),
            "source_prompt",
            dim,
        )
        target = text.pick(
            target_prompt,
            target_prompt_embeds,
            lambda: concept(direction.target_embeds),
            "target_prompt",
            dim,
        )
        gen = generator if generator is not None else make_generator(seed)
        proc = image_processor(vae)
        notes: list[str] = []
        extra: dict[str, Any] = {}

        # -- encode the image once; every draw below samples the same latent distribution ---------------
        x = proc.preprocess(image).to(device=dev, dtype=vae.dtype)
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        sf = vae.config.scaling_factor
        lat_shape = tuple(dist.mean.shape[1:])

        def draw(n: int) -> torch.Tensor:
            eps = randn((n, *lat_shape), gen, dev, dist.mean.dtype)
            return sf * (dist.mean + dist.std * eps)

        # -- 1. mask ------------------------------------------------------------------------------------
        latent_size = (lat_shape[2], lat_shape[1])
        if user_mask is not None:
            mask_t, mask_notes = prepare_mask(user_mask, image.size, latent_size)
            notes.extend(mask_notes)
            mask_t = mask_t.to(device=dev, dtype=dt)
            extra["mask_source"] = "user"
        else:
            self.progress("mask", 0, 1)
            src_neg = text.pick(
                source_negative_prompt,
                source_negative_prompt_embeds,
                uncond,
                "source_negative_prompt",
                dim,
                positive=False,
            )
            tgt_neg = text.pick(
                target_negative_prompt,
                target_negative_prompt_embeds,
                uncond,
                "target_negative_prompt",
                dim,
                positive=False,
            )
            lat_n = draw(num_maps_per_mask)
            noise = randn(tuple(lat_n.shape), gen, dev, lat_n.dtype)
            mask_scheduler, _ = ddim_schedulers(comps["scheduler"])
            mask_t, gmap = diffedit_mask(
                unet,
                mask_scheduler,
                lat_n,
                noise,
                source,
                target,
                source_negative=src_neg,
                target_negative=tgt_neg,
                num_inference_steps=num_inference_steps,
                mask_encode_strength=mask_encode_strength,
                mask_thresholding_ratio=mask_thresholding_ratio,
                guidance_scale=g_mask,
                cross_attention_kwargs=cross_attention_kwargs,
                return_map=True,
            )
            mask_t = mask_t[:, None]
            extra["mask_source"] = "generated"
            extra["mask_map"] = gmap.float().cpu()
            self.progress("mask", 1, 1)
        extra["latent_mask"] = mask_t.float().cpu()
        extra["notes"] = notes
        mask_pil = mask_to_image(mask_t, image.size)
        if mask_only:
            return EditResult(image=mask_pil, original=image, mask=mask_pil, extra=extra)

        # -- 2. inversion -------------------------------------------------------------------------------
        if image_latents is None:
            inv_cond = text.pick(prompt, prompt_embeds, source, "prompt", dim)
            inv_embeds = inv_cond
            if g_inv > 1.0:
                inv_neg = text.pick(
                    inversion_negative_prompt,
                    inversion_negative_prompt_embeds,
                    uncond,
                    "inversion_negative_prompt",
                    dim,
                    positive=False,
                )
                inv_embeds = torch.cat([inv_neg, inv_cond])
            _, inverse_scheduler = ddim_schedulers(comps["scheduler"])

            def on_invert(i: int, t: Any, lat: torch.Tensor) -> None:
                self.progress("invert", i + 1, n_edit)
                if inversion_callback is not None and i % callback_steps == 0:
                    inversion_callback(i, t, lat)

            self.progress("invert", 0, n_edit)
            image_latents = ddim_invert(
                loop_unet,
                inverse_scheduler,
                draw(1),
                inv_embeds,
                num_inference_steps=num_inference_steps,
                inpaint_strength=inpaint_strength,
                guidance_scale=g_inv,
                generator=gen,
                num_reg_steps=num_reg_steps,
                lambda_auto_corr=lambda_auto_corr,
                lambda_kl=lambda_kl,
                num_auto_corr_rolls=num_auto_corr_rolls,
                cross_attention_kwargs=cross_attention_kwargs,
                callback=on_invert,
            )
            _check_finite(image_latents, self.name, "inverted")
            if decode_latents:
                extra["inversion_images"] = vae_decode(vae, image_latents.flatten(0, 1), output_type)
        else:
            if not isinstance(image_latents, torch.Tensor):
                raise EditorOptionError(
                    "image_latents must be a tensor [1, T, C, h, w] from an earlier inversion"
                )
            image_latents = image_latents.to(device=dev, dtype=dt)
            if image_latents.dim() == 4:
                image_latents = image_latents.unsqueeze(0)
            want = (1, n_edit, *lat_shape)
            if tuple(image_latents.shape) != want:
                raise OptionValueError(
                    f"image_latents has shape {list(image_latents.shape)}, but this image with "
                    f"num_inference_steps={num_inference_steps} and inpaint_strength={inpaint_strength} needs "
                    f"{list(want)}: invert with the same settings"
                )

        # -- 3. edit ------------------------------------------------------------------------------------
        edit_embeds = target
        if guidance_scale > 1.0:
            edit_neg = text.pick(negative_prompt, negative_prompt_embeds, source, "negative_prompt", dim)
            edit_embeds = torch.cat([edit_neg, target])
        k = num_images_per_prompt
        if k > 1:
            edit_embeds = edit_embeds.repeat_interleave(k, dim=0)
            lat_in = image_latents.repeat_interleave(k, dim=0)
            mask_in = mask_t.repeat_interleave(k, dim=0)
            if latents is not None and latents.shape[0] == 1:
                latents = latents.repeat_interleave(k, dim=0)
        else:
            lat_in, mask_in = image_latents, mask_t

        def on_edit(i: int, t: Any, lat: torch.Tensor) -> None:
            self.progress("edit", i + 1, n_edit)
            if callback is not None and i % callback_steps == 0:
                callback(i, t, lat)

        edit_scheduler, _ = ddim_schedulers(comps["scheduler"])
        self.progress("edit", 0, n_edit)
        out = diffedit_denoise(
            loop_unet,
            edit_scheduler,
            lat_in,
            mask_in,
            edit_embeds,
            num_inference_steps=num_inference_steps,
            inpaint_strength=inpaint_strength,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=gen,
            latents=None if latents is None else latents.to(device=dev, dtype=dt),
            cross_attention_kwargs=cross_attention_kwargs,
            callback=on_edit,
        )
        _check_finite(out, self.name, "edited")
        edited = vae_decode(vae, out, output_type)
        original = image if output_type == "pil" else _output(proc.postprocess(x, output_type=output_type), 1)
        return EditResult(
            image=_output(edited, k),
            original=original if output_type != "latent" else dist.mean * sf,
            inverted_latents=image_latents,
            mask=mask_pil,
            extra=extra,
        )

    def generate_mask(self, image: Any, direction: Any, **options: Any):
        """Only the mask, as an 8-bit PIL image the size of the (prepared) image: white = edit.

        >>> ed.generate_mask(photo, "bowl of fruits->bowl of pears").save("mask.png")   # doctest: +SKIP
        """
        return self.edit(image, direction, mask_only=True, **options).mask


@hookimpl
def p2pz_register_editors() -> list[type[Editor]]:
    return [DiffEditEditor]
