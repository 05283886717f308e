"""Tiny random-weight Stable Diffusion models, built offline and saved like a real model folder.

As diffusers' own tests do with their ``get_dummy_components()``: the configs are tiny, the
weights random but seeded, the tokenizer built locally from a character vocabulary. The folder is
written with ``save_pretrained`` and everything that uses it loads it back with the real
``from_pretrained`` code.

Configs:
- ``sd1``: epsilon prediction, text hidden size 32 (stands in for CLIP ViT-L/14)
- ``sd2``: v-prediction, linear projections, attention head dims (2, 4), text hidden size 64
  (stands in for OpenCLIP ViT-H/14)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,'!?-")


def make_tokenizer(path: str | os.PathLike, max_length: int = 77):
    """A CLIP tokenizer over single characters (no merges), saved to ``path``."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for c in CHARS:
        vocab[c] = len(vocab)
    for c in CHARS:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    src = path / "_src"
    src.mkdir(exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab), "utf-8")
    (src / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    tok = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(str(path))
    return tok


def make_text_encoder(hidden_size: int = 32, seed: int = 0, vocab_size: int = 1000):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=hidden_size,
    )
    return CLIPTextModel(cfg).eval()


def make_components(config: str = "sd1", seed: int = 0) -> dict:
    """The components of a tiny StableDiffusionPipeline (unsaved)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    if config not in ("sd1", "sd2"):
        raise ValueError(f"unknown tiny config {config!r}; use 'sd1' or 'sd2'")
    sd2 = config == "sd2"
    d = 64 if sd2 else 32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=d,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    )
    text_encoder = make_text_encoder(d, seed)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def make_tiny_sd(path: str | os.PathLike, config: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny diffusers Stable Diffusion folder to ``path`` and return it.

    Load it back with ``StableDiffusionPipeline.from_pretrained(path)`` (or its parts with
    ``subfolder=``).
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    comps = make_components(config, seed)
    tok_dir = path / "tokenizer"
    tokenizer = make_tokenizer(tok_dir)
    pipe = StableDiffusionPipeline(
        **comps, tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(str(path))
    return path
