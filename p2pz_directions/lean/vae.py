"""`LeanVAE`: Stable Diffusion's ``AutoencoderKL`` without importing diffusers.

Built from ``vae/config.json``; reads diffusers' safetensors as they are (old files' attention
names ``query`` / ``key`` / ``value`` / ``proj_attn`` are renamed on load, as diffusers does).
``encode(x)`` gives an object with ``latent_dist`` (``sample(generator)``, ``mode()``, ``mean``,
``std``), ``decode(z, return_dict=False)[0]`` the image, as diffusers' class. Configs other than
SD's (other block types, no quant convs, a spatial norm) raise `LeanUnsupported`. Slicing and
tiling are not offered: p2pz's editors use neither.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from p2pz_directions.lean import LeanUnsupported
from p2pz_directions.lean.blocks import (
    AttentionLayers,
    LeanConfig,
    MidBlock2D,
    ModelOutput,
    VAEBlock,
    activation,
)

__all__ = ["DiagonalGaussian", "LeanVAE", "VAE_DEFAULTS"]

VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def check_config(raw: dict[str, Any]) -> LeanConfig:
    cls = raw.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise LeanUnsupported(f"vae class {cls}")
    cfg = LeanConfig(VAE_DEFAULTS)
    cfg.update(raw)
    n = len(cfg.block_out_channels)
    if (
        list(cfg.down_block_types) != ["DownEncoderBlock2D"] * n
        or list(cfg.up_block_types) != ["UpDecoderBlock2D"] * n
    ):
        raise LeanUnsupported(f"vae blocks {cfg.down_block_types} / {cfg.up_block_types}")
    if not cfg.use_quant_conv or not cfg.use_post_quant_conv:
        raise LeanUnsupported("vae without quant convs")
    activation(cfg.act_fn)
    return cfg


class DiagonalGaussian:
    """The encoder's posterior: ``mean`` and ``logvar`` (clamped to [-30, 20]) of ``parameters``."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Any = None) -> torch.Tensor:
        from p2pz_directions.sampling.latents import randn

        noise = randn(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class EncodeOutput(tuple):
    @property
    def latent_dist(self) -> DiagonalGaussian:
        return self[0]


class _Encoder(nn.Module):
    def __init__(self, cfg: LeanConfig):
        super().__init__()
        boc, groups, act = list(cfg.block_out_channels), cfg.norm_num_groups, cfg.act_fn
        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList()
        out_ch = boc[0]
        for i in range(len(boc)):
            in_ch, out_ch = out_ch, boc[i]
            self.down_blocks.append(
                VAEBlock(
                    in_ch,
                    out_ch,
                    layers=cfg.layers_per_block,
                    groups=groups,
                    act=act,
                    sample="down" if i < len(boc) - 1 else None,
                )
            )
        self.mid_block = MidBlock2D(
            boc[-1], eps=1e-6, groups=groups, act=act, add_attention=cfg.mid_block_add_attention
        )
        self.conv_norm_out = nn.GroupNorm(num_channels=boc[-1], num_groups=groups, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(boc[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class _Decoder(nn.Module):
    def __init__(self, cfg: LeanConfig):
        super().__init__()
        boc, groups, act = list(cfg.block_out_channels), cfg.norm_num_groups, cfg.act_fn
        self.conv_in = nn.Conv2d(cfg.latent_channels, boc[-1], kernel_size=3, stride=1, padding=1)
        self.mid_block = MidBlock2D(
            boc[-1], eps=1e-6, groups=groups, act=act, add_attention=cfg.mid_block_add_attention
        )
        rev = list(reversed(boc))
        self.up_blocks = nn.ModuleList()
        out_ch = rev[0]
        for i in range(len(boc)):
            prev, out_ch = out_ch, rev[i]
            self.up_blocks.append(
                VAEBlock(
                    prev,
                    out_ch,
                    layers=cfg.layers_per_block + 1,
                    groups=groups,
                    act=act,
                    sample="up" if i < len(boc) - 1 else None,
                )
            )
        self.conv_norm_out = nn.GroupNorm(num_channels=boc[0], num_groups=groups, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(boc[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.mid_block(self.conv_in(sample))
        for block in self.up_blocks:
            sample = block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class LeanVAE(AttentionLayers, nn.Module):
    """SD's KL autoencoder (see the module docstring)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        cfg = check_config(config)
        self.config = cfg
        self.encoder = _Encoder(cfg)
        self.decoder = _Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> EncodeOutput:
        return EncodeOutput((DiagonalGaussian(self.quant_conv(self.encoder(x))),))

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> ModelOutput:
        return ModelOutput((self.decoder(self.post_quant_conv(z)),))

    def forward(
        self, sample: torch.Tensor, sample_posterior: bool = False, generator: Any = None
    ) -> ModelOutput:
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)


#: diffusers' old attention parameter names in VAE checkpoints -> today's
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``...mid_block.attentions.0.query.weight`` -> ``...to_q.weight`` (1x1-conv shapes flattened)."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if len(parts) >= 2 and "attentions" in parts and parts[-2] in LEGACY_ATTENTION_NAMES:
            k = ".".join([*parts[:-2], LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
            if v.ndim == 4 and v.shape[-2:] == (1, 1):
                v = v[:, :, 0, 0]
        out[k] = v
    return out
