"""Text conditioning, as ``StableDiffusionPipeline.encode_prompt`` computes it.

>>> pos, neg = encode_prompt(tok, te, "a cat", "cpu", do_classifier_free_guidance=True)   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["encode_prompt", "encode_text"]


def _batch_size(prompt: Any, prompt_embeds: torch.Tensor | None) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0]


@torch.no_grad()
def encode_text(
    tokenizer: Any,
    text_encoder: Any,
    prompts: str | list[str],
    device: torch.device | str,
    clip_skip: int | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """``[len(prompts), 77, D]`` hidden states of the text encoder (the last layer, or ``clip_skip``
    layers before it through the final layer norm), padded to the tokenizer's maximum length.

    ``cache``: a dict the caller keeps for one piece of work (an edit encodes its caption up to three
    times: for the inversion, as the prompt and as the negative prompt); the same prompts, layer and
    encoder come back from it instead of running the encoder again. The returned tensor is shared
    with later hits: do not change it in place."""
    if isinstance(prompts, str):
        prompts = [prompts]
    key = (tuple(prompts), clip_skip, id(text_encoder), str(device))
    if cache is not None and key in cache:
        return cache[key]
    out = _encode(tokenizer, text_encoder, prompts, device, clip_skip)
    if cache is not None:
        cache[key] = out
    return out


def _encode(
    tokenizer: Any, text_encoder: Any, prompts: list[str], device: Any, clip_skip: int | None
) -> torch.Tensor:
    inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = inputs.attention_mask.to(device)
    ids = inputs.input_ids.to(device)
    if clip_skip is None:
        return text_encoder(ids, attention_mask=mask)[0]
    out = text_encoder(ids, attention_mask=mask, output_hidden_states=True)
    tower = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 has no .text_model
    return tower.final_layer_norm(out[-1][-(clip_skip + 1)])


@torch.no_grad()
def encode_prompt(
    tokenizer: Any,
    text_encoder: Any,
    prompt: str | list[str] | None,
    device: torch.device | str,
    *,
    num_images_per_prompt: int = 1,
    do_classifier_free_guidance: bool = False,
    negative_prompt: str | list[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    clip_skip: int | None = None,
    dtype: torch.dtype | None = None,
    cache: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(prompt_embeds, negative_prompt_embeds)``, each ``[B * num_images_per_prompt, 77, D]``
    (rows of a prompt adjacent), with diffusers' rules: a missing negative prompt is ``""``, a list of
    negative prompts must match the prompts, ``clip_skip`` applies to the prompt only, and the
    negative embeddings are None without classifier-free guidance. ``cache``: see `encode_text`."""
    batch_size = _batch_size(prompt, prompt_embeds)
    if prompt_embeds is None:
        prompt_embeds = encode_text(tokenizer, text_encoder, prompt, device, clip_skip, cache)
    dtype = dtype or (text_encoder.dtype if text_encoder is not None else prompt_embeds.dtype)
    prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)
    prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
    if not do_classifier_free_guidance:
        return prompt_embeds, None
    if negative_prompt_embeds is None:
        if negative_prompt is None:
            uncond = [""] * batch_size
        elif prompt is not None and type(prompt) is not type(negative_prompt):
            raise TypeError(
                f"negative_prompt should be of the same type as prompt, not {type(negative_prompt).__name__} "
                f"and {type(prompt).__name__}"
            )
        elif isinstance(negative_prompt, str):
            uncond = [negative_prompt] * batch_size  # diffusers: [negative_prompt], which breaks for batches
        elif batch_size != len(negative_prompt):
            raise ValueError(
                f"{len(negative_prompt)} negative prompts for {batch_size} prompts; give one per prompt"
            )
        else:
            uncond = negative_prompt
        negative_prompt_embeds = encode_text(tokenizer, text_encoder, uncond, device, cache=cache)
    negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
    negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
    return prompt_embeds, negative_prompt_embeds
