"""Small sampling helpers shared by the built-in editors (pix2pix-zero, DiffEdit, SDEdit).

Each is a plain function over diffusers' building blocks and mirrors what diffusers' Stable
Diffusion pipelines do at that step, so an editor built from them reproduces the pipeline:

- `encode_prompt`       - ``StableDiffusionPipeline.encode_prompt`` (clip_skip, attention mask)
- `image_processor`     - diffusers' ``VaeImageProcessor`` for the model's VAE scale factor
- `encode_image`        - VAE-encode an image, ``latent_dist.sample(generator) * scaling_factor``
- `decode_latents`      - VAE-decode latents and post-process to ``output_type``
- `randn`               - diffusers' ``randn_tensor`` (a CPU generator gives the same noise on any device)
- `cfg`                 - classifier-free guidance ``uncond + g * (cond - uncond)``
- `epsilon_from_output` - the noise a UNet output stands for (epsilon, sample or v-prediction)
- `make_generator`      - a seeded ``torch.Generator`` (CPU by default, as diffusers recommends)
- `ddim_schedulers`     - the DDIM and DDIM-inverse schedulers built from a model's scheduler config

>>> from p2pz_plugins._common import make_generator, cfg
>>> g = make_generator(0)
"""

from __future__ import annotations

from typing import Any

import torch

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


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A ``torch.Generator`` seeded with ``seed`` (None for no seed)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def randn(shape: tuple[int, ...], generator: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise as diffusers' ``randn_tensor`` draws it (on the generator's device, then moved)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def vae_scale_factor(vae: Any) -> int:
    """How much the VAE downsamples: ``2 ** (len(block_out_channels) - 1)`` (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def image_processor(vae: Any):
    """diffusers' ``VaeImageProcessor`` for ``vae`` (resizing, [-1, 1] scaling, post-processing)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae))


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
    """``[len(prompts), 77, D]`` text embeddings, as ``StableDiffusionPipeline.encode_prompt`` makes them."""
    if isinstance(prompts, str):
        prompts = [prompts]
    inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    ids = inputs.input_ids.to(device)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = inputs.attention_mask.to(device)
    if clip_skip is None:
        emb = text_encoder(ids, attention_mask=mask)[0]
    else:
        out = text_encoder(ids, attention_mask=mask, output_hidden_states=True)
        emb = text_encoder.text_model.final_layer_norm(out[-1][-(clip_skip + 1)])
    return emb.to(dtype=dtype or text_encoder.dtype, device=device)


@torch.no_grad()
def encode_image(vae: Any, image: Any, generator: Any = None, *, sample: bool = True) -> torch.Tensor:
    """Scaled VAE latents of ``image`` (a PIL image, or a ``[B, 3, H, W]`` tensor in [-1, 1]).

    ``sample=True`` draws from the latent distribution with ``generator`` (as diffusers'
    pix2pix-zero and DiffEdit pipelines do); ``sample=False`` takes its mode.
    """
    if not isinstance(image, torch.Tensor):
        image = image_processor(vae).preprocess(image)
    image = image.to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(image).latent_dist
    latents = dist.sample(generator) if sample else dist.mode()
    return vae.config.scaling_factor * latents


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, output_type: str = "pil") -> Any:
    """Decode latents and post-process: ``"pil"`` (list of images), ``"np"``, ``"pt"`` or ``"latent"``."""
    if output_type == "latent":
        return latents
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return image_processor(vae).postprocess(image, output_type=output_type)


def cfg(noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a batch ``[uncond; cond]``: ``uncond + g * (cond - uncond)``."""
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def epsilon_from_output(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor | float, prediction_type: str
) -> torch.Tensor:
    """The noise ``eps`` a UNet output stands for, whatever the model predicts.

    ``epsilon``: itself; ``sample``: ``(x - sqrt(a) x0) / sqrt(1 - a)``; ``v_prediction``:
    ``sqrt(a) v + sqrt(1 - a) x``.
    """
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
    if prediction_type == "v_prediction":
        return alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    raise ValueError(f"prediction_type {prediction_type!r} must be one of epsilon, sample, v_prediction")


def ddim_schedulers(scheduler_or_config: Any) -> tuple[Any, Any]:
    """``(DDIMScheduler, DDIMInverseScheduler)`` built from a model's scheduler (or its config)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    return DDIMScheduler.from_config(config), DDIMInverseScheduler.from_config(config)
