"""Classifier-free guidance (Ho & Salimans 2022) and its relatives, as diffusers' pipelines compute them.

>>> import torch
>>> from p2pz_directions.sampling import cfg
>>> pred = torch.cat([torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)])   # [uncond; cond]
>>> float(cfg(pred, 7.5).mean())
7.5
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["cfg", "do_cfg", "guidance_scale_embedding", "rescale_noise_cfg"]


def rescale_noise_cfg(
    noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """Guidance rescale, Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are
    Flawed", arXiv 2305.08891), section 3.4, eq. 15-16, as diffusers' ``rescale_noise_cfg``:
    ``x_rescaled = x_cfg * std(x_pos) / std(x_cfg)``, ``x = phi * x_rescaled + (1 - phi) * x_cfg``.
    """
    std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
    std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def cfg(noise_pred: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance on a batch ``[uncond; cond]`` (Ho & Salimans 2022, eq. 6, in the
    ``w`` of Imagen eq. 2): ``eps = eps_uncond + w * (eps_cond - eps_uncond)``; then
    `rescale_noise_cfg` when ``guidance_rescale > 0``. The one guidance formula of every editor.
    """
    uncond, cond = noise_pred.chunk(2)
    out = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0.0:
        out = rescale_noise_cfg(out, cond, guidance_rescale)
    return out


def do_cfg(unet: Any, guidance_scale: float) -> bool:
    """Whether a pipeline runs classifier-free guidance: ``guidance_scale > 1`` and the UNet has no
    guidance embedding (``time_cond_proj_dim``, LCM: the scale goes in as an embedding instead)."""
    return guidance_scale > 1.0 and getattr(unet.config, "time_cond_proj_dim", None) is None


def guidance_scale_embedding(
    w: torch.Tensor | float, embedding_dim: int = 512, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale for guidance-distilled UNets (LCM, Luo et al.
    2023, following VDM / Kingma et al. 2021, appendix), as diffusers' ``get_guidance_scale_embedding``.
    Pipelines pass ``w = guidance_scale - 1``. Returns ``[len(w), embedding_dim]``.
    """
    w = torch.as_tensor(w).reshape(-1) * 1000.0
    half = embedding_dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half - 1)
    emb = torch.exp(torch.arange(half, dtype=dtype) * -emb)
    emb = w.to(dtype)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
