"""diffusers' dummy components for the Stable Diffusion fast tests, for the tests that re-run those
fast tests against our editors (tests/test_*_diffusers.py).

Our versions of ``get_dummy_components`` / ``floats_tensor`` in diffusers' ``tests/pipelines/``:
the same tiny configs (a 32-px UNet ``(32, 64)`` with cross-attention dim 32, a two-block VAE, a
five-layer CLIP text model of hidden size 32), each built after ``torch.manual_seed(0)`` as there, so
a pipeline made from them holds diffusers' weights. A test passes what its pipeline's test sets
differently (``use_linear_projection=True`` for DiffEdit, ``time_cond_proj_dim`` for LCM, ...).
The tokenizer is built offline (`tiny_sd.make_tokenizer`; conftest's ``tokenizer`` fixture).

>>> comps = dummy_components(tokenizer, scheduler=PNDMScheduler(skip_prk_steps=True))  # doctest: +SKIP
>>> pipe = frozen(StableDiffusionImg2ImgPipeline(**comps, requires_safety_checker=False))  # doctest: +SKIP
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from p2pz_directions.core.concept import Concept, Direction, EncoderInfo

__all__ = [
    "SCHED_ARGS",
    "dummy_components",
    "dummy_text_encoder",
    "dummy_unet",
    "dummy_vae",
    "floats_tensor",
    "frozen",
    "random_direction",
]

#: the beta schedule of diffusers' DiffEdit and scheduler tests (Stable Diffusion's)
SCHED_ARGS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
}
VAE = {
    "block_out_channels": [32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
}
CLIP_TEXT = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "pad_token_id": 1,
    "vocab_size": 1000,
}


def dummy_unet(**config: Any) -> Any:
    """diffusers' dummy ``UNet2DConditionModel`` (seed 0, eval mode), with ``config`` changed or added."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**{**UNET, **config}).eval()


def dummy_vae(**config: Any) -> Any:
    """diffusers' dummy ``AutoencoderKL`` (seed 0, eval mode), with ``config`` changed or added."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**{**VAE, **config}).eval()


def dummy_text_encoder(**config: Any) -> Any:
    """diffusers' dummy ``CLIPTextModel`` (seed 0, eval mode), with ``config`` changed or added."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(**{**CLIP_TEXT, **config})).eval()


def dummy_components(
    tokenizer: Any,
    *,
    unet: dict[str, Any] | None = None,
    vae: dict[str, Any] | None = None,
    text_encoder: dict[str, Any] | None = None,
    **components: Any,
) -> dict[str, Any]:
    """``get_dummy_components()``: UNet, VAE, text encoder (each with its config changes),
    ``tokenizer``, no safety checker or feature extractor, and ``components`` (schedulers, and any
    other component a pipeline takes)."""
    return {
        "unet": dummy_unet(**(unet or {})),
        "vae": dummy_vae(**(vae or {})),
        "text_encoder": dummy_text_encoder(**(text_encoder or {})),
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        **components,
    }


def frozen(pipe: Any) -> Any:
    """``pipe`` with every module in eval mode without gradients (as ``from_pretrained`` leaves
    them, and as the editors use them) and no progress bar."""
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def floats_tensor(shape: tuple[int, ...], rng: random.Random) -> torch.Tensor:
    """diffusers' ``floats_tensor``: uniform floats in [0, 1) from a ``random.Random``."""
    n = int(np.prod(shape))
    return torch.tensor([rng.random() for _ in range(n)], dtype=torch.float32).view(shape)


def random_direction(
    encoder: EncoderInfo, seed: int = 0, scale: float = 1.0, names: tuple[str, str] = ("cat", "dog")
) -> Direction:
    """A direction between two random ``[77, D]`` concepts for ``encoder`` (source drawn first)."""
    g = torch.Generator().manual_seed(seed)
    src, tgt = (torch.randn(77, encoder.hidden_size, generator=g) * scale for _ in range(2))
    return Direction(Concept(names[0], src, encoder), Concept(names[1], tgt, encoder))
