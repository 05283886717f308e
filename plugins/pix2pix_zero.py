"""pix2pix-zero (Parmar et al., SIGGRAPH 2023, arXiv 2302.03027) on diffusers' building blocks.

An edit of a real image in four phases, each a small function below with the loop in one place:

1. **caption** - BLIP names the photo (`BlipCaptioner`, ``Salesforce/blip-image-captioning-base``),
   unless ``prompt=`` is given.
2. **invert** - `ddim_invert`: deterministic DDIM inversion of the image latents under the
   caption, each noise prediction pulled toward i.i.d. Gaussian noise by `regularize_noise_pred`
   (gradient steps on `auto_corr_loss` and `kl_divergence`; ``lambda_auto_corr``, ``lambda_kl``,
   ``num_reg_steps``, ``num_auto_corr_rolls``).
3. **reference** - `sample_reference`: DDIM sampling from the inverted noise with the caption,
   recording every cross-attention map (`AttentionMaps`, installed as the UNet's attention
   processors by `attention_maps`). Decoded, it is the reconstruction.
4. **edit** - `sample_guided_edit`: DDIM sampling from the same noise with the direction added to
   the caption's embedding; at each step the latent is first moved by one gradient step
   (``cross_attention_guidance_amount``) toward cross-attention maps equal to the reference ones,
   which keeps the structure of the photo.

A synthetic image is the same from Gaussian noise drawn with ``seed`` and a ``prompt``.

It reproduces diffusers' ``StableDiffusionPix2PixZeroPipeline`` (``invert`` then ``__call__``) to
within 1e-4 per pixel on tiny models (tests/test_pix2pix_zero.py), with these differences, all on
purpose: the reference maps stay on the GPU and are indexed by step (no ``.item()`` sync, no
copy to the CPU), the guidance gradient is taken with respect to the latents only (diffusers also
computes unused gradients for the cross-attention weights), self-attention uses PyTorch's fused
``scaled_dot_product_attention``, the inverted latents are not decoded, and the direction is
added to every conditional row (diffusers adds it to row 1 only, so it edits nothing without
classifier-free guidance or with several images per prompt).

>>> from p2pz_directions import editors
>>> ed = editors.get("pix2pix-zero", model="CompVis/stable-diffusion-v1-4")   # doctest: +SKIP
>>> res = ed.edit("cat.png", "cat->dog", seed=0)                              # doctest: +SKIP
>>> res.image.save("dog.png"); res.caption                                     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from p2pz_directions.concept import Direction
from p2pz_directions.editors import Editor, EditorError, EditorOptionError, EditResult
from p2pz_directions.hookspecs import hookimpl

from ._common import (
    cfg,
    ddim_schedulers,
    decode_latents,
    encode_image,
    encode_prompt,
    epsilon_from_output,
    make_generator,
    randn,
    vae_scale_factor,
)

__all__ = [
    "AttentionMaps",
    "BlipCaptioner",
    "Pix2PixZeroEditor",
    "attention_maps",
    "auto_corr_loss",
    "ddim_invert",
    "draw_roll_shifts",
    "kl_divergence",
    "regularize_noise_pred",
    "sample_guided_edit",
    "sample_reference",
]

StepCallback = Callable[[int, Any, torch.Tensor], None]
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
NAN_ADVICE = (
    "lower the cross-attention guidance (--xa-guidance / cross_attention_guidance_amount, default 0.1); "
    "Stable Diffusion 2.x (v-prediction) models need 0.01 or less"
)


# ---------------------------------------------------------------------------------------------------
# inversion regularizers (pure functions)
# ---------------------------------------------------------------------------------------------------
def _pyramid_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """Sizes the auto-correlation loss visits: halve (avg-pool 2) while the height is over 8."""
    sizes = [(h, w)]
    while sizes[-1][0] > 8:
        h, w = sizes[-1][0] // 2, sizes[-1][1] // 2
        sizes.append((h, w))
    return sizes


def _randint(high: int, generator: torch.Generator | None) -> int:
    if generator is not None and generator.device.type != "cpu":
        return int(torch.randint(high, (1,), generator=generator, device=generator.device).item())
    return int(torch.randint(high, (1,), generator=generator).item())


def draw_roll_shifts(
    shape: tuple[int, ...], generator: torch.Generator | None, rolls: int = 1
) -> torch.Tensor:
    """Random roll amounts for ``rolls`` evaluations of `auto_corr_loss` on latents of ``shape``.

    Drawn in the order of the reference implementation (per roll, per image, per channel, per
    pyramid level, ``randint(height // 2)``), so a seeded generator gives the same shifts.
    Returns ``[rolls, levels, B * C]`` int64.
    """
    b, c, h, w = shape
    sizes = _pyramid_sizes(h, w)
    out = torch.empty(rolls, len(sizes), b * c, dtype=torch.int64)
    for r in range(rolls):
        for n in range(b * c):
            for lvl, (lh, _) in enumerate(sizes):
                out[r, lvl, n] = _randint(lh // 2, generator)
    return out


def _roll_rows(x: torch.Tensor, shifts: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.roll(x[n], shifts[n], dim)`` for every ``n`` of ``x`` ([N, 1, H, W]) at once."""
    size = x.shape[dim]
    idx = (torch.arange(size, device=x.device)[None, :] - shifts[:, None]) % size  # [N, size]
    if dim == 2:
        idx = idx[:, None, :, None].expand_as(x)
    else:
        idx = idx[:, None, None, :].expand_as(x)
    return x.gather(dim, idx)


def auto_corr_loss(eps: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Auto-correlation of noise: ``sum over channels and pyramid levels of mean(e * roll(e, s))^2``.

    ``eps`` is ``[B, C, H, W]``; ``shifts`` ``[levels, B * C]`` (one row of `draw_roll_shifts`).
    Zero for white noise in expectation; the inversion pushes its noise predictions toward it.
    """
    b, c, h, w = eps.shape
    x = eps.reshape(b * c, 1, h, w)
    shifts = shifts.to(x.device)
    total = x.new_zeros(())
    for lvl in range(shifts.shape[0]):
        s = shifts[lvl]
        total = total + ((x * _roll_rows(x, s, 2)).mean(dim=(1, 2, 3)) ** 2).sum()
        total = total + ((x * _roll_rows(x, s, 3)).mean(dim=(1, 2, 3)) ** 2).sum()
        if x.shape[2] <= 8:
            break
        x = F.avg_pool2d(x, kernel_size=2)
    return total


def kl_divergence(eps: torch.Tensor) -> torch.Tensor:
    """KL of ``N(mean, var)`` (the noise's moments) from ``N(0, 1)``, up to a factor: ``var + mean^2 - 1 - log var``."""
    mean, var = eps.mean(), eps.var()
    return var + mean**2 - 1 - torch.log(var + 1e-7)


def auto_corr_grad(eps: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``d auto_corr_loss(eps, shifts) / d eps`` in closed form (no autograd graph to build).

    For one level, ``d mean(x * roll(x, s))^2 / dx = 2 m (roll(x, s) + roll(x, -s)) / (H W)``; a
    level's gradient reaches the finer one through the average pooling (nearest upsampling / 4).
    """
    b, c, h, w = eps.shape
    x = eps.reshape(b * c, 1, h, w)
    shifts = shifts.to(x.device)
    grads: list[torch.Tensor] = []
    for lvl in range(shifts.shape[0]):
        s = shifts[lvl]
        rh, rh_back = _roll_rows(x, s, 2), _roll_rows(x, -s, 2)
        rw, rw_back = _roll_rows(x, s, 3), _roll_rows(x, -s, 3)
        m_h = (x * rh).mean(dim=(1, 2, 3), keepdim=True)
        m_w = (x * rw).mean(dim=(1, 2, 3), keepdim=True)
        n = x.shape[2] * x.shape[3]
        grads.append((m_h * (rh + rh_back) + m_w * (rw + rw_back)) * (2.0 / n))
        if x.shape[2] <= 8:
            break
        x = F.avg_pool2d(x, kernel_size=2)
    g = grads[-1]
    for finer in reversed(grads[:-1]):
        up = g.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) / 4
        up = F.pad(up, (0, finer.shape[3] - up.shape[3], 0, finer.shape[2] - up.shape[2]))
        g = finer + up
    return g.reshape(b, c, h, w)


def kl_grad(eps: torch.Tensor) -> torch.Tensor:
    """``d kl_divergence(eps) / d eps`` in closed form."""
    n = eps.numel()
    mean, var = eps.mean(), eps.var()
    return (eps - mean) * (2.0 / (n - 1)) * (1 - 1 / (var + 1e-7)) + mean * (2.0 / n)


def _d_eps_d_output(alpha_prod_t: torch.Tensor | float, prediction_type: str) -> torch.Tensor | float:
    """How the epsilon of `epsilon_from_output` changes with the model output (a scalar)."""
    if prediction_type == "epsilon":
        return 1.0
    if prediction_type == "v_prediction":
        return alpha_prod_t**0.5
    if prediction_type == "sample":
        return -(alpha_prod_t**0.5) / (1 - alpha_prod_t) ** 0.5
    raise ValueError(f"prediction_type {prediction_type!r} must be one of epsilon, sample, v_prediction")


def regularize_noise_pred(
    noise_pred: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor | float,
    prediction_type: str,
    *,
    lambda_auto_corr: float = 20.0,
    lambda_kl: float = 20.0,
    num_reg_steps: int = 5,
    num_auto_corr_rolls: int = 5,
    generator: torch.Generator | None = None,
    shifts: torch.Tensor | None = None,
    analytic: bool = False,
) -> torch.Tensor:
    """Gradient steps that make a noise prediction look more like i.i.d. standard normal noise.

    The losses are taken on the epsilon the output stands for (`epsilon_from_output`), so the
    same code serves epsilon and v-prediction models. The roll amounts of the auto-correlation
    loss are drawn from ``generator`` (`draw_roll_shifts`) unless ``shifts`` gives them.
    ``analytic=True`` takes the gradients in closed form (`auto_corr_grad`, `kl_grad`: fewer,
    lighter kernels; equal to autograd's up to rounding) instead of through autograd as the
    reference implementation does.
    """
    if analytic:
        return _regularize_analytic(
            noise_pred, sample, alpha_prod_t, prediction_type, lambda_auto_corr, lambda_kl, num_reg_steps,
            num_auto_corr_rolls, generator, shifts,
        )  # fmt: skip
    sample = sample.detach()
    if shifts is None and lambda_auto_corr > 0 and num_reg_steps > 0:
        shifts = draw_roll_shifts(tuple(noise_pred.shape), generator, num_reg_steps * num_auto_corr_rolls)
        shifts = shifts.to(noise_pred.device, non_blocking=True)
    k = 0
    for _ in range(num_reg_steps):
        if lambda_auto_corr > 0:
            for _ in range(num_auto_corr_rolls):
                var = noise_pred.detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    loss = auto_corr_loss(
                        epsilon_from_output(var, sample, alpha_prod_t, prediction_type), shifts[k]
                    )
                    (grad,) = torch.autograd.grad(loss, var)
                k += 1
                noise_pred = noise_pred - lambda_auto_corr * (grad / num_auto_corr_rolls)
        if lambda_kl > 0:
            var = noise_pred.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                loss = kl_divergence(epsilon_from_output(var, sample, alpha_prod_t, prediction_type))
                (grad,) = torch.autograd.grad(loss, var)
            noise_pred = noise_pred - lambda_kl * grad
        noise_pred = noise_pred.detach()
    return noise_pred


def _regularize_analytic(
    noise_pred,
    sample,
    alpha_prod_t,
    prediction_type,
    lambda_auto_corr,
    lambda_kl,
    num_reg_steps,
    rolls,
    generator,
    shifts,
):
    sample = sample.detach()
    if shifts is None and lambda_auto_corr > 0 and num_reg_steps > 0:
        shifts = draw_roll_shifts(tuple(noise_pred.shape), generator, num_reg_steps * rolls).to(
            noise_pred.device
        )
    d_out = _d_eps_d_output(alpha_prod_t, prediction_type)
    k = 0
    for _ in range(num_reg_steps):
        if lambda_auto_corr > 0:
            for _ in range(rolls):
                eps = epsilon_from_output(noise_pred, sample, alpha_prod_t, prediction_type)
                grad = auto_corr_grad(eps, shifts[k]) * d_out
                k += 1
                noise_pred = noise_pred - lambda_auto_corr * (grad / rolls)
        if lambda_kl > 0:
            eps = epsilon_from_output(noise_pred, sample, alpha_prod_t, prediction_type)
            noise_pred = noise_pred - lambda_kl * (kl_grad(eps) * d_out)
    return noise_pred.detach()


# ---------------------------------------------------------------------------------------------------
# cross-attention maps: one state object, installed as the UNet's attention processors
# ---------------------------------------------------------------------------------------------------
class AttentionMaps:
    """Records cross-attention probabilities, or measures how far they are from recorded ones.

    ``mode``: ``"off"`` (plain attention), ``"record"`` (append every cross-attention map of a
    forward pass to ``maps``), ``"guide"`` (add ``sum((p - ref) ** 2) / rows`` for each layer to
    ``loss``, with ``ref`` taken from ``reference`` in call order).

    With `use_buffers`, maps go to one preallocated ``[steps, ...]`` tensor per layer instead, at
    the step held by the device tensor ``step_index``: no allocation and no host sync per step,
    which is what lets a whole UNet pass be captured as a CUDA graph and replayed.
    """

    def __init__(self, store_device: torch.device | str | None = None, exact: bool = False) -> None:
        self.mode = "off"
        self.exact = exact  # explicit softmax attention in every layer (diffusers' numerics)
        self.store_device = torch.device(store_device) if store_device is not None else None
        self.maps: list[torch.Tensor] = []
        self.reference: list[torch.Tensor] = []
        self.loss: torch.Tensor | float = 0.0
        self._next = 0
        self.buffers: list[torch.Tensor] | None = None
        self.num_steps = 0
        self.step_index: torch.Tensor | None = None

    def use_buffers(self, num_steps: int, device: torch.device) -> None:
        """Keep maps in per-layer ``[num_steps, ...]`` buffers indexed by ``self.step_index``."""
        self.buffers, self.num_steps = [], num_steps
        self.step_index = torch.zeros(1, dtype=torch.int64, device=device)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        self.mode, self.maps, self._next = "record", [], 0
        try:
            yield self.maps
        finally:
            self.mode = "off"

    @contextlib.contextmanager
    def guiding(self, reference: list[torch.Tensor] | None = None) -> Iterator[AttentionMaps]:
        self.mode, self.reference, self.loss, self._next = "guide", reference, 0.0, 0
        try:
            yield self
        finally:
            self.mode, self.reference = "off", []

    def __call__(self, probs: torch.Tensor) -> None:
        if self.buffers is not None and self.mode != "off":
            self._call_buffered(probs)
        elif self.mode == "record":
            p = probs.detach()
            self.maps.append(p if self.store_device is None else p.to(self.store_device, non_blocking=True))
        elif self.mode == "guide":
            ref = self.reference[self._next].to(probs.device, non_blocking=True)
            self._next += 1
            self.loss = self.loss + ((probs - ref) ** 2).sum((1, 2)).mean(0)

    def _call_buffered(self, probs: torch.Tensor) -> None:
        i, self._next = self._next, self._next + 1
        if self.mode == "record":
            if i == len(self.buffers):  # first pass: allocate (never inside a graph capture)
                self.buffers.append(probs.new_empty((self.num_steps, *probs.shape)))
            self.buffers[i].index_copy_(0, self.step_index, probs.detach().unsqueeze(0))
        else:
            ref = self.buffers[i].index_select(0, self.step_index)[0]
            self.loss = self.loss + ((probs - ref) ** 2).sum((1, 2)).mean(0)


class _Processor:
    """Attention processor: explicit softmax probabilities for cross-attention while maps are
    recorded or guided, PyTorch's fused attention otherwise."""

    def __init__(self, maps: AttentionMaps, cross: bool) -> None:
        self.maps = maps
        self.cross = cross

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        **kwargs,
    ):
        residual = hidden_states
        batch, seq, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if self.maps.exact or (self.cross and self.maps.mode != "off"):
            mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            q, k, v = (
                attn.head_to_batch_dim(query),
                attn.head_to_batch_dim(key),
                attn.head_to_batch_dim(value),
            )
            probs = attn.get_attention_scores(q, k, mask)
            if self.cross:
                self.maps(probs)
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, v))
        else:
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
                mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            head_dim = query.shape[-1] // attn.heads
            q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            hidden_states = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
            hidden_states = (
                hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
            )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def attention_maps(
    unet: Any,
    store_device: torch.device | str | None = None,
    *,
    exact: bool = False,
    maps: AttentionMaps | None = None,
) -> Iterator[AttentionMaps]:
    """Install `AttentionMaps` processors on ``unet`` for the duration; the old ones come back after.

    ``exact=True`` computes every attention layer with an explicit softmax, as diffusers' pipeline
    does (slower; used on the CPU, where it makes results equal to the reference to ~1e-6).

    >>> with attention_maps(unet) as maps:           # doctest: +SKIP
    ...     with maps.recording() as recorded:
    ...         unet(x, t, encoder_hidden_states=emb)
    """
    old = unet.attn_processors
    maps = maps if maps is not None else AttentionMaps(store_device, exact)
    unet.set_attn_processor({name: _Processor(maps, cross="attn2" in name) for name in old})
    try:
        yield maps
    finally:
        unet.set_attn_processor(old)


# ---------------------------------------------------------------------------------------------------
# the three samplers
# ---------------------------------------------------------------------------------------------------
def _unet_eps(
    unet: Any, x: torch.Tensor, t: Any, embeds: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    do_cfg = guidance_scale > 1.0
    model_in = torch.cat([x] * 2) if do_cfg else x
    out = unet(model_in, t, encoder_hidden_states=embeds).sample
    return cfg(out, guidance_scale) if do_cfg else out


def ddim_invert(
    unet: Any,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    scheduler: Any,
    *,
    guidance_scale: float = 1.0,
    regularize: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    callback_steps: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """DDIM inversion: image latents -> noise latents, along ``scheduler`` (a `DDIMInverseScheduler`
    whose timesteps are set). ``embeds`` is ``[uncond; cond]`` when ``guidance_scale > 1``, else
    ``cond``. ``regularize`` holds the keyword arguments of `regularize_noise_pred` (None: none).
    """
    pred_type = scheduler.config.prediction_type
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        model_in = scheduler.scale_model_input(latents, t)
        noise_pred = _unet_eps(unet, model_in, t, embeds, guidance_scale)
        if regularize:
            noise_pred = regularize_noise_pred(
                noise_pred,
                model_in,
                scheduler.alphas_cumprod[t],
                pred_type,
                generator=generator,
                **regularize,
            )
        latents = scheduler.step(noise_pred, t, latents).prev_sample
        if callback is not None and i % callback_steps == 0:
            callback(i, t, latents)
        if progress is not None:
            progress(i + 1, len(timesteps))
    return latents


def sample_reference(
    unet: Any,
    maps: AttentionMaps,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    scheduler: Any,
    *,
    guidance_scale: float = 7.5,
    step_kwargs: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    callback_steps: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """DDIM sampling that records the cross-attention maps of every step.

    Returns the final latents (the reconstruction) and ``maps_per_step[i][layer]``.
    """
    recorded: list[list[torch.Tensor]] = []
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        with maps.recording() as step_maps:
            noise_pred = _unet_eps(unet, scheduler.scale_model_input(latents, t), t, embeds, guidance_scale)
        recorded.append(step_maps)
        latents = scheduler.step(noise_pred, t, latents, **(step_kwargs or {})).prev_sample
        if callback is not None and i % callback_steps == 0:
            callback(i, t, latents)
        if progress is not None:
            progress(i + 1, len(timesteps))
    return latents, recorded


def sample_guided_edit(
    unet: Any,
    maps: AttentionMaps,
    latents: torch.Tensor,
    embeds_edit: torch.Tensor,
    scheduler: Any,
    reference_maps: list[list[torch.Tensor]],
    *,
    cross_attention_guidance_amount: float = 0.1,
    guidance_scale: float = 7.5,
    step_kwargs: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    callback_steps: int = 1,
    progress: Callable[[int, int], None] | None = None,
    check_every: int = 10,
) -> torch.Tensor:
    """DDIM sampling with the edited embedding, each step preceded by one gradient step on the
    latents toward the reference cross-attention maps (the structure of the original)."""
    do_cfg = guidance_scale > 1.0
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
        x_in = x_in.detach().clone().requires_grad_(True)
        with torch.enable_grad(), maps.guiding(reference_maps[i]):
            unet(x_in, t, encoder_hidden_states=embeds_edit)  # the loss is gathered by `maps`
            (grad,) = torch.autograd.grad(maps.loss, x_in)
        x_in = x_in.detach().add(grad, alpha=-cross_attention_guidance_amount)
        reference_maps[i] = []  # free this step's maps
        noise_pred = unet(x_in, t, encoder_hidden_states=embeds_edit).sample
        latents = x_in.chunk(2)[0] if do_cfg else x_in
        if do_cfg:
            noise_pred = cfg(noise_pred, guidance_scale)
        latents = scheduler.step(noise_pred, t, latents, **(step_kwargs or {})).prev_sample
        if callback is not None and i % callback_steps == 0:
            callback(i, t, latents)
        if progress is not None:
            progress(i + 1, len(timesteps))
        if check_every and (i + 1) % check_every == 0:
            _check_finite(latents, "edit")
    return latents


# ---------------------------------------------------------------------------------------------------
# the same three loops on static tensors, so each step can be one CUDA graph replay
# ---------------------------------------------------------------------------------------------------
class _Step:
    """``fn()`` over static tensors: run eagerly, or captured once as a CUDA graph and replayed.

    A UNet pass in eager PyTorch is bound by the CPU launching ~1000 kernels (~30 ms on an H100 for
    a few ms of GPU work); a replayed graph launches them all at once.
    """

    def __init__(self, fn: Callable[[], Any], capture: bool, pool: Any = None, warmup: int = 2) -> None:
        self.fn, self.capture, self.pool, self.warmup = fn, capture, pool, warmup
        self.graph: Any = None
        self.out: Any = None

    def __call__(self) -> Any:
        if not self.capture:
            return self.fn()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    self.out = self.fn()
            except RuntimeError as e:  # e.g. an op that syncs with the host: run eagerly instead
                warnings.warn(f"CUDA graph capture failed ({e}); running this step eagerly", stacklevel=3)
                self.capture, self.out = False, None
                return self.fn()
            self.graph = graph
        self.graph.replay()
        return self.out


class StaticLoops:
    """Inversion, reference and guided edit with every per-step tensor preallocated.

    Each step copies its inputs into static tensors and runs one `_Step` (a CUDA graph replay when
    ``capture=True``); the reference maps live in per-layer ``[steps, ...]`` buffers indexed on the
    device. The math is the same as `ddim_invert`, `sample_reference` and `sample_guided_edit`
    (tests/test_pix2pix_zero.py checks ``capture=False`` against them); the DDIM updates between
    UNet passes stay eager. Built once per shape and setting and kept by the editor, so later
    edits of the same size replay the graphs captured by the first.
    """

    def __init__(
        self,
        unet: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        num_steps: int,
        latent_shape: tuple[int, ...],
        embed_dim: int,
        batch: int,
        guidance_scale: float,
        inversion_guidance_scale: float,
        cross_attention_guidance_amount: float,
        regularize: dict[str, Any] | None,
        prediction_type: str,
        capture: bool,
        compile_regularizer: bool = False,
    ) -> None:
        self.unet, self.capture = unet, capture
        self.gs, self.inv_gs, self.xa = (
            guidance_scale,
            inversion_guidance_scale,
            cross_attention_guidance_amount,
        )
        self.do_cfg, self.batch = guidance_scale > 1.0, batch
        self.regularize, self.prediction_type = regularize, prediction_type
        self.maps = AttentionMaps(exact=False)
        self.maps.use_buffers(num_steps, device)
        c, h, w = latent_shape[1:]
        n = 2 * batch if self.do_cfg else batch
        n_inv = 2 if inversion_guidance_scale > 1.0 else 1

        def z(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dt, device=device)

        self.t = z(dt=torch.int64)
        self.alpha = z(dt=torch.float32)
        self.x_inv, self.emb_inv = z(1, c, h, w), z(n_inv, 77, embed_dim)
        self.x_ref, self.emb = z(batch, c, h, w), z(n, 77, embed_dim)
        self.x_edit, self.emb_edit = z(n, c, h, w), z(n, 77, embed_dim)
        self.shifts = None
        if regularize and regularize["lambda_auto_corr"] > 0:
            rolls = regularize["num_reg_steps"] * regularize["num_auto_corr_rolls"]
            self.shifts = z(rolls, len(_pyramid_sizes(h, w)), c, dt=torch.int64)
        self.reg_round = self._reg_round
        if compile_regularizer and regularize:
            # one regularization round (all rolls + KL) fused into a few kernels; compiled on first use
            self.reg_round = torch.compile(self._reg_round, fullgraph=True, dynamic=False)
        pool = torch.cuda.graph_pool_handle() if capture else None
        self.g_inv = _Step(self._invert_fn, capture, pool)
        self.g_ref = _Step(self._reference_fn, capture, pool)
        self.g_edit = _Step(self._edit_fn, capture, pool)

    # -- what each step computes (captured as is) -----------------------------------------------
    def _reg_round(self, noise_pred: torch.Tensor, shifts: torch.Tensor | None) -> torch.Tensor:
        reg = dict(self.regularize, num_reg_steps=1)
        return regularize_noise_pred(
            noise_pred, self.x_inv, self.alpha, self.prediction_type, shifts=shifts, analytic=True, **reg
        )

    def _invert_fn(self) -> torch.Tensor:
        eps = _unet_eps(self.unet, self.x_inv, self.t, self.emb_inv, self.inv_gs)
        if self.regularize:
            rolls = self.regularize["num_auto_corr_rolls"]
            for r in range(self.regularize["num_reg_steps"]):
                shifts = self.shifts[r * rolls : (r + 1) * rolls] if self.shifts is not None else None
                eps = self.reg_round(eps, shifts)
        return eps

    def _reference_fn(self) -> torch.Tensor:
        with self.maps.recording():
            return _unet_eps(self.unet, self.x_ref, self.t, self.emb, self.gs)

    def _edit_fn(self) -> tuple[torch.Tensor, torch.Tensor]:
        x_in = self.x_edit.detach().clone().requires_grad_(True)
        with torch.enable_grad(), self.maps.guiding():
            self.unet(x_in, self.t, encoder_hidden_states=self.emb_edit)
            (grad,) = torch.autograd.grad(self.maps.loss, x_in)
        x_in = x_in.detach().add(grad, alpha=-self.xa)
        out = self.unet(x_in, self.t, encoder_hidden_states=self.emb_edit).sample
        if self.do_cfg:
            return cfg(out, self.gs), x_in.chunk(2)[0]
        return out, x_in

    # -- the loops --------------------------------------------------------------------------------
    def invert(
        self,
        latents: torch.Tensor,
        embeds: torch.Tensor,
        scheduler: Any,
        *,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
        callback_steps: int = 1,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """`ddim_invert` on static tensors."""
        self.emb_inv.copy_(embeds)
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            self.x_inv.copy_(scheduler.scale_model_input(latents, t))
            self.t.fill_(int(t))
            self.alpha.fill_(float(scheduler.alphas_cumprod[int(t)]))
            if self.shifts is not None:
                rolls = self.shifts.shape[0]
                drawn = draw_roll_shifts(tuple(self.x_inv.shape), generator, rolls).view_as(self.shifts)
                self.shifts.copy_(drawn.pin_memory() if self.capture else drawn, non_blocking=True)
            noise_pred = self.g_inv()
            latents = scheduler.step(noise_pred, t, latents).prev_sample
            if callback is not None and i % callback_steps == 0:
                callback(i, t, latents)
            if progress is not None:
                progress(i + 1, len(timesteps))
        return latents

    def reference(
        self,
        latents: torch.Tensor,
        embeds: torch.Tensor,
        scheduler: Any,
        *,
        step_kwargs: dict[str, Any] | None = None,
        callback: StepCallback | None = None,
        callback_steps: int = 1,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """`sample_reference` on static tensors (the maps go to the buffers)."""
        self.emb.copy_(embeds)
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            self.x_ref.copy_(scheduler.scale_model_input(latents, t))
            self.t.fill_(int(t))
            self.maps.step_index.fill_(i)
            noise_pred = self.g_ref()
            latents = scheduler.step(noise_pred, t, latents, **(step_kwargs or {})).prev_sample
            if callback is not None and i % callback_steps == 0:
                callback(i, t, latents)
            if progress is not None:
                progress(i + 1, len(timesteps))
        return latents

    def edit(
        self,
        latents: torch.Tensor,
        embeds_edit: torch.Tensor,
        scheduler: Any,
        *,
        step_kwargs: dict[str, Any] | None = None,
        callback: StepCallback | None = None,
        callback_steps: int = 1,
        progress: Callable[[int, int], None] | None = None,
        check_every: int = 10,
    ) -> torch.Tensor:
        """`sample_guided_edit` on static tensors."""
        self.emb_edit.copy_(embeds_edit)
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            x_in = scheduler.scale_model_input(torch.cat([latents] * 2) if self.do_cfg else latents, t)
            self.x_edit.copy_(x_in)
            self.t.fill_(int(t))
            self.maps.step_index.fill_(i)
            noise_pred, latents = self.g_edit()
            latents = scheduler.step(noise_pred, t, latents, **(step_kwargs or {})).prev_sample
            if callback is not None and i % callback_steps == 0:
                callback(i, t, latents)
            if progress is not None:
                progress(i + 1, len(timesteps))
            if check_every and (i + 1) % check_every == 0:
                _check_finite(latents, "edit")
        return latents


def _check_finite(latents: torch.Tensor, phase: str) -> None:
    if not torch.isfinite(latents).all():
        raise EditorError(f"the latents became NaN or infinite during the {phase} phase; {NAN_ADVICE}")


# ---------------------------------------------------------------------------------------------------
# BLIP captioner (an image-captioner plugin)
# ---------------------------------------------------------------------------------------------------
class BlipCaptioner:
    """Captions photos with BLIP, as diffusers' pix2pix-zero pipeline does (prompt "a photography of").

    >>> BlipCaptioner().caption([Image.open("cat.png")])      # doctest: +SKIP
    ['a photography of a cat sitting on a couch']
    """

    name = "blip"

    def __init__(
        self,
        model: str = DEFAULT_CAPTIONER,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        text: str = "a photography of",
        max_new_tokens: int = 128,
        processor: Any = None,
        generator_model: Any = None,
    ) -> None:
        self.model_id = model
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.text = text
        self.max_new_tokens = max_new_tokens
        self._processor = processor
        self._model = generator_model

    def _load(self) -> None:
        if self._model is not None and self._processor is not None:
            return
        from transformers import BlipForConditionalGeneration, BlipProcessor

        try:
            self._processor = self._processor or BlipProcessor.from_pretrained(self.model_id)
            self._model = self._model or BlipForConditionalGeneration.from_pretrained(
                self.model_id, torch_dtype=self.dtype
            )
        except (OSError, ValueError) as e:
            raise EditorError(
                f"cannot load the BLIP captioner {self.model_id}: {str(e).rstrip('.')}. Pass prompt='a photo of a cat' (a caption "
                f"of your image) to skip captioning, or make the model available offline first."
            ) from None
        self._model.to(self.device).eval()

    @torch.no_grad()
    def caption(self, images: list[Any]) -> list[str]:
        self._load()
        model = self._model
        inputs = self._processor(images, [self.text] * len(images), return_tensors="pt").to(
            device=model.device, dtype=model.dtype
        )
        out = model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [s.strip() for s in self._processor.batch_decode(out, skip_special_tokens=True)]


# ---------------------------------------------------------------------------------------------------
# the editor
# ---------------------------------------------------------------------------------------------------
class Pix2PixZeroEditor(Editor):
    """pix2pix-zero: edit a real photo (caption, invert, reference, edit) or a generated image.

    >>> ed = editors.get("pix2pix-zero", model="CompVis/stable-diffusion-v1-4", device="cuda")  # doctest: +SKIP
    >>> ed.edit("cat.png", "cat->dog", seed=0).image.save("dog.png")                          # doctest: +SKIP
    >>> ed.edit(None, "cat->dog", prompt="a painting of a cat", seed=0).image                   # doctest: +SKIP
    """

    name = "pix2pix-zero"
    description = (
        "pix2pix-zero: direction in CLIP space + cross-attention guidance (real or generated images)"
    )
    phases = ("caption", "invert", "reference", "edit")
    memory_advice = (
        "use dtype float16 (--dtype float16), keep the reference attention maps on the CPU "
        "(attention_maps_device='cpu'), edit a smaller image, or use fewer --steps (the maps kept grow with the steps)"
    )

    def __init__(
        self,
        model: Any = None,
        *,
        captioner: Any = None,
        caption_model: str = DEFAULT_CAPTIONER,
        **kw: Any,
    ) -> None:
        super().__init__(model, **kw)
        self._captioner = captioner
        self.caption_model = caption_model

    # -- parts ----------------------------------------------------------------------------------
    @property
    def captioner(self) -> Any:
        """The image captioner (BLIP unless another was given), created on first use."""
        if self._captioner is None:
            self._captioner = BlipCaptioner(self.caption_model, device=self.device, dtype=self.dtype)
        elif isinstance(self._captioner, str):
            from p2pz_directions import plugins

            found = plugins.image_captioners()
            if self._captioner not in found:
                raise EditorOptionError(
                    f"unknown image captioner {self._captioner!r}; installed: {', '.join(found) or '(none)'}"
                )
            self._captioner = found[self._captioner](device=self.device, dtype=self.dtype)
        return self._captioner

    def encode_text(self, prompts: str | list[str], clip_skip: int | None = None) -> torch.Tensor:
        """``[N, 77, D]`` embeddings of ``prompts`` with the model's text encoder."""
        c = self.load_components()
        return encode_prompt(c["tokenizer"], c["text_encoder"], prompts, self.device, clip_skip=clip_skip)

    # -- the edit -------------------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self,
        image: Any,
        direction: Direction,
        *,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        cross_attention_guidance_amount: float = 0.1,
        inversion_guidance_scale: float = 1.0,
        lambda_auto_corr: float = 20.0,
        lambda_kl: float = 20.0,
        num_reg_steps: int = 5,
        num_auto_corr_rolls: int = 5,
        eta: float = 0.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        clip_skip: int | None = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        callback_steps: int = 1,
        attention_maps_device: str | torch.device | None = None,
        attention: str = "auto",
        loops: str = "auto",
        compile_regularizer: bool = False,
        return_reconstruction: bool = True,
    ) -> EditResult:
        """Edit ``image`` (a photo) or, with ``image=None``, an image generated from ``prompt``.

        Options follow diffusers' pix2pix-zero pipeline: ``guidance_scale`` (classifier-free
        guidance of the reference and the edit), ``cross_attention_guidance_amount`` (step size of
        the structure-keeping gradient; SD 2.x needs 0.01 or less), ``inversion_guidance_scale``
        (1: none, as diffusers' ``invert``), the inversion regularizers, ``eta``, ``generator``
        (or ``seed``), ``output_type`` ("pil", "np", "pt", "latent"), and ``callback(step, t,
        latents)`` every ``callback_steps`` steps of each phase. ``negative_prompt`` defaults to
        the caption for a photo (as the authors and diffusers' docs do) and to "" otherwise.
        ``latents`` skips the inversion (real mode) or the noise draw (synthetic mode).
        ``attention``: "exact" computes every attention layer as diffusers does (bit-equal on the
        CPU), "fused" uses PyTorch's fused attention outside the recorded cross-attention, "auto"
        (default) is exact on the CPU and fused on a GPU. ``attention_maps_device="cpu"`` keeps the
        reference maps in host memory (lower GPU memory, slower). ``loops``: "graphs" replays each
        UNet step from a CUDA graph (`StaticLoops`, captured on the first edit of a size and kept),
        "static" runs the same static-tensor loops eagerly, "eager" runs `ddim_invert`,
        `sample_reference` and `sample_guided_edit`; "auto" (default) is "graphs" on a GPU (unless
        the maps are kept on the CPU) and "eager" otherwise. ``compile_regularizer=True`` (static and
        graph loops) fuses the inversion regularizer with ``torch.compile`` (faster steps; the first
        edit pays the compilation).
        """
        real = image is not None
        if num_inference_steps < 1:
            raise EditorOptionError(f"num_inference_steps must be at least 1, not {num_inference_steps}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise EditorOptionError(f"output_type must be one of pil, np, pt, latent; not {output_type!r}")
        if not real and prompt is None and prompt_embeds is None:
            raise EditorOptionError(
                "without an image, pix2pix-zero generates one from a prompt: pass prompt='a photo of a cat' "
                "(and a seed), or give an image to edit"
            )
        if generator is None and seed is not None:
            generator = make_generator(seed)
        comps = self.load_components()
        unet, vae = comps["unet"], comps["vae"]
        scheduler, inverse = ddim_schedulers(comps["scheduler"])
        device, bsz = self.device, int(num_images_per_prompt)
        if attention not in ("auto", "exact", "fused"):
            raise EditorOptionError(f"attention must be 'auto', 'exact' or 'fused', not {attention!r}")
        exact = attention == "exact" or (attention == "auto" and device.type == "cpu")
        if loops not in ("auto", "eager", "static", "graphs"):
            raise EditorOptionError(f"loops must be 'auto', 'eager', 'static' or 'graphs', not {loops!r}")
        if loops == "auto":
            loops = (
                "graphs" if device.type == "cuda" and attention_maps_device is None and not exact else "eager"
            )
        if loops == "graphs" and device.type != "cuda":
            raise EditorOptionError("loops='graphs' needs a CUDA device; use 'static' or 'eager' on the CPU")

        # 1. caption
        caption = prompt
        if real and prompt is None and prompt_embeds is None:
            self.progress("caption", 0, 1)
            caption = self.captioner.caption([image])[0]
            self.progress("caption", 1, 1)
        if negative_prompt is None:
            negative_prompt = caption if real and caption is not None else ""

        # text embeddings: [uncond; cond] for classifier-free guidance
        if prompt_embeds is None:
            cond = self.encode_text(caption, clip_skip)
        else:
            cond = prompt_embeds.to(device=device, dtype=unet.dtype)
        do_cfg = guidance_scale > 1.0
        if do_cfg and negative_prompt_embeds is None:
            uncond = self.encode_text(negative_prompt, None)
        elif do_cfg:
            uncond = negative_prompt_embeds.to(device=device, dtype=cond.dtype)

        # 2. invert (or start from noise)
        regularize = None
        if real and num_reg_steps > 0 and (lambda_auto_corr > 0 or lambda_kl > 0):
            regularize = dict(
                lambda_auto_corr=lambda_auto_corr,
                lambda_kl=lambda_kl,
                num_reg_steps=num_reg_steps,
                num_auto_corr_rolls=num_auto_corr_rolls,
            )
        if latents is not None:
            x_T = latents.to(device=device, dtype=unet.dtype)
        elif real:
            x0 = encode_image(vae, image, generator)
            inverse.set_timesteps(num_inference_steps, device="cpu")
            inv_embeds = cond
            if inversion_guidance_scale > 1.0:
                inv_embeds = torch.cat([self.encode_text("", None), cond])
            static = None
            if loops != "eager":
                static = self._static_loops(
                    unet, loops, num_inference_steps, tuple(x0.shape), bsz, guidance_scale, inversion_guidance_scale,
                    cross_attention_guidance_amount, regularize, inverse.config.prediction_type, compile_regularizer,
                )  # fmt: skip
            with attention_maps(unet, exact=exact, maps=static.maps if static else None):
                run_invert = static.invert if static else functools.partial(ddim_invert, unet)
                inv_kw = (
                    {} if static else {"guidance_scale": inversion_guidance_scale, "regularize": regularize}
                )
                x_T = run_invert(
                    x0,
                    inv_embeds,
                    inverse,
                    generator=generator,
                    **inv_kw,
                    callback=callback,
                    callback_steps=callback_steps,
                    progress=lambda i, n: self.progress("invert", i, n),
                )
            _check_finite(x_T, "inversion")
        else:
            sf = vae_scale_factor(vae)
            height = height or unet.config.sample_size * sf
            width = width or unet.config.sample_size * sf
            shape = (bsz, unet.config.in_channels, height // sf, width // sf)
            x_T = randn(shape, generator, device, unet.dtype)
        inverted = x_T.detach().clone()
        if x_T.shape[0] != bsz:
            x_T = x_T.repeat(bsz // x_T.shape[0] or 1, 1, 1, 1)
        scheduler.set_timesteps(num_inference_steps, device="cpu")
        x_T = x_T * scheduler.init_noise_sigma

        cond_b = cond.repeat_interleave(bsz, 0) if cond.shape[0] != bsz else cond
        embeds = cond_b
        if do_cfg:
            uncond_b = uncond.repeat_interleave(bsz, 0) if uncond.shape[0] != bsz else uncond
            embeds = torch.cat([uncond_b, cond_b])
        edit_embeds = embeds.clone()
        edit_embeds[-bsz:] += direction.delta.to(device=device, dtype=torch.float32)
        step_kwargs = {"eta": eta, "generator": generator}

        # 3. reference, 4. guided edit
        if loops != "eager":
            static = self._static_loops(
                unet, loops, num_inference_steps, tuple(x_T.shape), bsz, guidance_scale, inversion_guidance_scale,
                cross_attention_guidance_amount, regularize, scheduler.config.prediction_type, compile_regularizer,
            )  # fmt: skip
            with attention_maps(unet, maps=static.maps):
                kw = dict(step_kwargs=step_kwargs, callback=callback, callback_steps=callback_steps)
                x_rec = static.reference(
                    x_T, embeds, scheduler, progress=lambda i, n: self.progress("reference", i, n), **kw
                )
                _check_finite(x_rec, "reference")
                scheduler.set_timesteps(num_inference_steps, device="cpu")
                x_edit = static.edit(
                    x_T, edit_embeds, scheduler, progress=lambda i, n: self.progress("edit", i, n), **kw
                )
            _check_finite(x_edit, "edit")
            return self._result(
                vae, image, x_edit, x_rec, inverted, caption, negative_prompt, output_type, bsz, real,
                return_reconstruction, num_inference_steps, guidance_scale, cross_attention_guidance_amount, seed, loops,
            )  # fmt: skip
        with attention_maps(unet, attention_maps_device, exact=exact) as maps:
            x_rec, ref = sample_reference(
                unet,
                maps,
                x_T,
                embeds,
                scheduler,
                guidance_scale=guidance_scale,
                step_kwargs=step_kwargs,
                callback=callback,
                callback_steps=callback_steps,
                progress=lambda i, n: self.progress("reference", i, n),
            )
            _check_finite(x_rec, "reference")
            scheduler.set_timesteps(num_inference_steps, device="cpu")
            with torch.enable_grad():
                x_edit = sample_guided_edit(
                    unet,
                    maps,
                    x_T,
                    edit_embeds,
                    scheduler,
                    ref,
                    cross_attention_guidance_amount=cross_attention_guidance_amount,
                    guidance_scale=guidance_scale,
                    step_kwargs=step_kwargs,
                    callback=callback,
                    callback_steps=callback_steps,
                    progress=lambda i, n: self.progress("edit", i, n),
                )
        _check_finite(x_edit, "edit")
        return self._result(
            vae, image, x_edit, x_rec, inverted, caption, negative_prompt, output_type, bsz, real,
            return_reconstruction, num_inference_steps, guidance_scale, cross_attention_guidance_amount, seed, loops,
        )  # fmt: skip

    def _static_loops(
        self,
        unet,
        loops,
        steps,
        latent_shape,
        bsz,
        gs,
        inv_gs,
        xa,
        regularize,
        prediction_type,
        compile_reg=False,
    ) -> StaticLoops:
        """The `StaticLoops` for these settings, reused across edits (one set kept at a time)."""
        reg_key = tuple(sorted(regularize.items())) if regularize else None
        key = (
            loops,
            steps,
            latent_shape[1:],
            bsz,
            gs,
            inv_gs,
            xa,
            reg_key,
            prediction_type,
            str(unet.dtype),
            compile_reg,
        )
        cache = self.__dict__.setdefault("_static_cache", {})
        if key not in cache:
            cache.clear()  # free the previous graphs and map buffers first
            cache[key] = StaticLoops(
                unet,
                device=self.device,
                dtype=unet.dtype,
                num_steps=steps,
                latent_shape=latent_shape,
                embed_dim=unet.config.cross_attention_dim,
                batch=bsz,
                guidance_scale=gs,
                inversion_guidance_scale=inv_gs,
                cross_attention_guidance_amount=xa,
                regularize=regularize,
                prediction_type=prediction_type,
                capture=loops == "graphs",
                compile_regularizer=compile_reg,
            )
        return cache[key]

    def _result(
        self, vae, image, x_edit, x_rec, inverted, caption, negative_prompt, output_type, bsz, real,
        return_reconstruction, num_inference_steps, guidance_scale, xa, seed, loops,
    ) -> EditResult:  # fmt: skip
        out = decode_latents(vae, x_edit, output_type)
        rec = decode_latents(vae, x_rec, output_type) if (return_reconstruction or not real) else None
        single = bsz == 1 and output_type == "pil"
        return EditResult(
            image=out[0] if single else out,
            original=image if real else (rec[0] if single else rec),
            caption=caption,
            inverted_latents=inverted,
            reconstruction=(rec[0] if single else rec) if (real and rec is not None) else None,
            extra={
                "negative_prompt": negative_prompt,
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "cross_attention_guidance_amount": xa,
                "seed": seed,
                "mode": "real" if real else "synthetic",
                "loops": loops,
            },
        )


@hookimpl
def p2pz_register_editors() -> list[Any]:
    return [Pix2PixZeroEditor]


@hookimpl
def p2pz_register_image_captioners() -> list[Any]:
    return [BlipCaptioner]
