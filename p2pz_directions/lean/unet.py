"""`LeanUNet`: Stable Diffusion 1.x / 2.x's ``UNet2DConditionModel`` without importing diffusers.

It is built from the model's own ``unet/config.json`` and reads its safetensors as they are
(diffusers' parameter names). Configs outside what SD 1.x / 2.x use (other block types, class or
addition embeddings, a ``time_cond_proj_dim``, ...) raise `LeanUnsupported`, and the caller loads
diffusers' class instead; `check_config` says which key made it so.

The forward pass is diffusers' (same operations in the same order), and so are the parts p2pz's
editors use: ``config``, ``dtype`` / ``device``, ``attn_processors`` / ``set_attn_processor``
(processor names as diffusers gives them), ``forward(sample, timestep, encoder_hidden_states,
..., cross_attention_kwargs=..., return_dict=...)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from p2pz_directions.lean import LeanUnsupported
from p2pz_directions.lean.blocks import (
    AttentionLayers,
    DownBlock,
    LeanConfig,
    MidBlockCrossAttn,
    ModelOutput,
    UpBlock,
    activation,
    timestep_embedding,
)

__all__ = ["LeanUNet", "UNET_DEFAULTS"]

#: diffusers' ``UNet2DConditionModel`` defaults for the keys a config may leave out
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

#: keys that must keep their default (what SD 1.x / 2.x have) for the lean UNet to run the model
_MUST = {
    k: UNET_DEFAULTS[k]
    for k in (
        "center_input_sample", "mid_block_type", "only_cross_attention", "dropout", "transformer_layers_per_block",
        "reverse_transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type", "dual_cross_attention",
        "class_embed_type", "addition_embed_type", "num_class_embeds", "resnet_time_scale_shift",
        "resnet_skip_time_act", "resnet_out_scale_factor", "time_embedding_type", "time_embedding_dim",
        "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim", "projection_class_embeddings_input_dim",
        "attention_type", "class_embeddings_concat", "mid_block_only_cross_attention", "cross_attention_norm",
    )
}  # fmt: skip
_DOWN = {"DownBlock2D", "CrossAttnDownBlock2D"}
_UP = {"UpBlock2D", "CrossAttnUpBlock2D"}


def _per_block(value: Any, n: int, key: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise LeanUnsupported(f"unet config {key} has {len(value)} entries for {n} blocks")
        return list(value)
    return [value] * n


def check_config(raw: dict[str, Any]) -> LeanConfig:
    """The full config (defaults filled in), or `LeanUnsupported` naming what the lean UNet lacks."""
    cls = raw.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise LeanUnsupported(f"unet class {cls}")
    cfg = LeanConfig(UNET_DEFAULTS)
    cfg.update({k: v for k, v in raw.items()})
    for key, want in _MUST.items():
        got = cfg.get(key)
        if isinstance(got, (list, tuple)) and not isinstance(want, (list, tuple)):
            if any(g != want for g in got):
                raise LeanUnsupported(f"unet config {key}={got!r}")
        elif got != want:
            raise LeanUnsupported(f"unet config {key}={got!r}")
    if not set(cfg["down_block_types"]) <= _DOWN or not set(cfg["up_block_types"]) <= _UP:
        raise LeanUnsupported(f"unet blocks {cfg['down_block_types']} / {cfg['up_block_types']}")
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise LeanUnsupported("unet config: block types and block_out_channels differ in length")
    if cfg["norm_num_groups"] is None or cfg["conv_in_kernel"] % 2 != 1 or cfg["conv_out_kernel"] % 2 != 1:
        raise LeanUnsupported("unet config: no norm groups, or an even conv kernel")
    activation(cfg["act_fn"])
    for key in ("layers_per_block", "cross_attention_dim", "attention_head_dim"):
        _per_block(cfg[key], n, key)
    if cfg["num_attention_heads"] is not None:
        _per_block(cfg["num_attention_heads"], n, "num_attention_heads")
    return cfg


class LeanUNet(AttentionLayers, nn.Module):
    """SD's conditional UNet (see the module docstring). ``LeanUNet(config_dict)`` builds it with
    uninitialised weights; `p2pz_directions.lean.loading` fills them from the model's files."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        cfg = check_config(config)
        self.config = cfg
        n = len(cfg.block_out_channels)
        boc = list(cfg.block_out_channels)
        layers = _per_block(cfg.layers_per_block, n, "layers_per_block")
        cross = _per_block(cfg.cross_attention_dim, n, "cross_attention_dim")
        # diffusers' naming quirk: without num_attention_heads, attention_head_dim is the number of heads
        heads = _per_block(cfg.num_attention_heads or cfg.attention_head_dim, n, "attention_head_dim")
        groups, eps, act = cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn
        k_in, k_out = cfg.conv_in_kernel, cfg.conv_out_kernel

        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], kernel_size=k_in, padding=(k_in - 1) // 2)
        temb = boc[0] * 4
        self.time_embedding = _TimestepEmbedding(boc[0], temb, act)

        def transformer(
            i: int, channels: int, heads: list[int] = heads, cross: list[Any] = cross
        ) -> dict[str, Any]:
            return dict(
                heads=heads[i],
                dim_head=channels // heads[i],
                layers=1,
                cross_attention_dim=cross[i],
                groups=groups,
                use_linear_projection=cfg.use_linear_projection,
                upcast_attention=cfg.upcast_attention,
            )

        self.down_blocks = nn.ModuleList()
        self.up_blocks = (
            nn.ModuleList()
        )  # registered before the mid block, as diffusers does (same name order)
        out_ch = boc[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, boc[i]
            self.down_blocks.append(
                DownBlock(
                    in_ch,
                    out_ch,
                    layers=layers[i],
                    temb_channels=temb,
                    eps=eps,
                    groups=groups,
                    act=act,
                    add_downsample=i < n - 1,
                    downsample_padding=cfg.downsample_padding,
                    transformer=transformer(i, out_ch) if kind == "CrossAttnDownBlock2D" else None,
                )
            )
        mid = transformer(n - 1, boc[-1])
        self.mid_block = MidBlockCrossAttn(
            boc[-1],
            temb_channels=temb,
            eps=eps,
            groups=groups,
            act=act,
            output_scale_factor=cfg.mid_block_scale_factor,
            transformer=mid,
        )
        self.num_upsamplers = 0
        rev = list(reversed(boc))
        rev_heads, rev_layers, rev_cross = heads[::-1], layers[::-1], cross[::-1]
        out_ch = rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            final = i == n - 1
            prev, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, n - 1)]
            if not final:
                self.num_upsamplers += 1
            t = transformer(i, out_ch, rev_heads, rev_cross) if kind == "CrossAttnUpBlock2D" else None
            self.up_blocks.append(
                UpBlock(
                    in_ch,
                    prev,
                    out_ch,
                    layers=rev_layers[i] + 1,
                    temb_channels=temb,
                    eps=eps,
                    groups=groups,
                    act=act,
                    add_upsample=not final,
                    transformer=t,
                )
            )
        self.conv_norm_out = nn.GroupNorm(num_channels=boc[0], num_groups=groups, eps=eps)
        self.conv_act = activation(act)
        self.conv_out = nn.Conv2d(boc[0], cfg.out_channels, kernel_size=k_out, padding=(k_out - 1) // 2)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ModelOutput:
        if (
            class_labels is not None
            or timestep_cond is not None
            or down_block_additional_residuals is not None
            or mid_block_additional_residual is not None
            or down_intrablock_additional_residuals is not None
        ):
            raise LeanUnsupported(
                "the lean UNet takes no class labels, timestep_cond or ControlNet / adapter residuals; "
                "load the model with models='diffusers'"
            )
        factor = 2**self.num_upsamplers
        forward_upsample_size = any(d % factor != 0 for d in sample.shape[-2:])
        upsample_size = None
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)

        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            if sample.device.type == "mps" and dtype == torch.float64:
                dtype = torch.float32
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif len(timesteps.shape) == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(sample.shape[0])
        t_emb = timestep_embedding(
            timesteps, self.config.block_out_channels[0], self.config.flip_sin_to_cos, self.config.freq_shift
        ).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb)

        attn_kw = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        sample = self.conv_in(sample)
        res_samples: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            sample, res = block(sample, emb, **(attn_kw if block.has_cross_attention else {}))
            res_samples += res
        sample = self.mid_block(sample, emb, **attn_kw)
        for i, block in enumerate(self.up_blocks):
            final = i == len(self.up_blocks) - 1
            skips = res_samples[-len(block.resnets) :]
            res_samples = res_samples[: -len(block.resnets)]
            if not final and forward_upsample_size:
                upsample_size = res_samples[-1].shape[2:]
            sample = block(
                sample, skips, emb, upsample_size, **(attn_kw if block.has_cross_attention else {})
            )
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        return ModelOutput((sample,))


class _TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int, act: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.act = activation(act)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))
