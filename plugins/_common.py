"""Former helpers of the built-in editors, now thin wrappers over `p2pz_directions.sampling`
(kept while DiffEdit and SDEdit move to it; new code imports `p2pz_directions.sampling`).

>>> from p2pz_plugins._common import make_generator, cfg
>>> g = make_generator(0)
"""

from __future__ import annotations

from typing import Any

import torch

from p2pz_directions.sampling import (
    cfg,
    copy_scheduler,
    decode_latents,
    encode_image,
    encode_text,
    epsilon_from_output,
    image_processor,
    make_generator,
    randn,
    vae_scale_factor,
)

__all__ = [
    "cfg",
    "ddim_schedulers",
    "decode_latents",
    "encode_image",
    "encode_prompt",
    "epsilon_from_output",
    "image_processor",
    "make_generator",
    "randn",
    "vae_scale_factor",
]


@torch.no_grad()
def encode_prompt(
    tokenizer: Any,
    text_encoder: Any,
    prompts: str | list[str],
    device: torch.device,
    *,
    clip_skip: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``[len(prompts), 77, D]`` text embeddings (`p2pz_directions.sampling.encode_text`)."""
    emb = encode_text(tokenizer, text_encoder, prompts, device, clip_skip)
    return emb.to(dtype=dtype or text_encoder.dtype, device=device)


def ddim_schedulers(scheduler_or_config: Any) -> tuple[Any, Any]:
    """``(DDIMScheduler, DDIMInverseScheduler)`` with every setting of a model's scheduler (or config)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    if not hasattr(scheduler_or_config, "config"):
        scheduler_or_config = DDIMScheduler.from_config(scheduler_or_config)
    return copy_scheduler(scheduler_or_config, DDIMScheduler), copy_scheduler(
        scheduler_or_config, DDIMInverseScheduler
    )
