"""SDEdit (Meng et al., ICLR 2022, arXiv 2108.01073): noise the image part way, denoise with new text.

The sampler is one plain function, `sdedit_sample`: add noise to the image latents at the first
timestep that ``strength`` keeps, then run the scheduler's loop with classifier-free guidance. It
reproduces ``StableDiffusionImg2ImgPipeline`` of diffusers step for step (the tests prove equality
on tiny models given the same prompt embeddings).

The editor class `SDEditEditor` chooses the conditioning from a direction:

- ``mode="direction"`` (default): the caption's embedding (BLIP, or ``prompt=``) moved along the
  direction, ``prompt_embeds + scale * delta``, as pix2pix-zero edits its prompt;
- ``mode="target"``: the target concept's embedding itself is the prompt.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["img2img_timesteps", "sdedit_sample"]


def img2img_timesteps(
    scheduler: Any,
    num_inference_steps: int | None,
    strength: float,
    *,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, int]:
    """The timesteps img2img runs at ``strength``, and how many there are.

    Sets the scheduler's schedule (``num_inference_steps``, or custom ``timesteps`` / ``sigmas``),
    keeps the last ``int(n * strength)`` steps and tells the scheduler where it begins.

    >>> from diffusers import DDIMScheduler
    >>> ts, n = img2img_timesteps(DDIMScheduler(steps_offset=1), 10, 0.5)
    >>> ts.tolist(), n
    ([401, 301, 201, 101, 1], 5)
    """
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass timesteps= or sigmas=, not both")
    params = set(inspect.signature(scheduler.set_timesteps).parameters)
    if timesteps is not None:
        if "timesteps" not in params:
            raise ValueError(
                f"{type(scheduler).__name__} does not take custom timesteps; use num_inference_steps"
            )
        scheduler.set_timesteps(timesteps=timesteps, device=device)
        num_inference_steps = len(scheduler.timesteps)
    elif sigmas is not None:
        if "sigmas" not in params:
            raise ValueError(
                f"{type(scheduler).__name__} does not take custom sigmas; use num_inference_steps"
            )
        scheduler.set_timesteps(sigmas=sigmas, device=device)
        num_inference_steps = len(scheduler.timesteps)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    init = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init, 0)
    order = getattr(scheduler, "order", 1)
    out = scheduler.timesteps[t_start * order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * order)
    return out, num_inference_steps - t_start


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32):
    """Sinusoidal embedding of the guidance scale, for UNets with ``time_cond_proj_dim`` (LCM)."""
    w = w * 1000.0
    half = embedding_dim // 2
    freq = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(dtype)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


StepEndCallback = Callable[[int, Any, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]


@torch.no_grad()
def sdedit_sample(
    unet: torch.nn.Module,
    scheduler: Any,
    image_latents: torch.Tensor,
    noise: torch.Tensor,
    embeds: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    timestep_cond: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, Any] | None = None,
    callback_on_step_end: StepEndCallback | None = None,
) -> torch.Tensor:
    """SDEdit: noise ``image_latents`` to ``timesteps[0]`` with ``noise``, then denoise.

    ``embeds`` is ``cat([negative, positive])`` when ``guidance_scale > 1``, else the positive ones;
    ``timesteps`` come from `img2img_timesteps`. ``callback_on_step_end(i, t, {"latents": ...})`` may
    return a dict whose ``"latents"`` replaces the current latents. Returns the final latents.
    """
    from p2pz_plugins.diffedit import cfg_noise_pred

    batch = image_latents.shape[0]
    x = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
    step_kwargs = _step_kwargs(scheduler, eta, generator)
    for i, t in enumerate(timesteps):
        noise_pred = cfg_noise_pred(
            unet,
            x,
            t,
            embeds,
            guidance_scale,
            scheduler=scheduler,
            cross_attention_kwargs=cross_attention_kwargs,
            timestep_cond=timestep_cond,
            added_cond_kwargs=added_cond_kwargs,
        )
        x = scheduler.step(noise_pred, t, x, **step_kwargs, return_dict=False)[0]
        if callback_on_step_end is not None:
            out = callback_on_step_end(i, t, {"latents": x})
            if out and "latents" in out:
                x = out["latents"]
    return x


def _step_kwargs(scheduler: Any, eta: float, generator: Any) -> dict[str, Any]:
    params = set(inspect.signature(scheduler.step).parameters)
    out: dict[str, Any] = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params:
        out["generator"] = generator
    return out
