"""The building blocks of Stable Diffusion's UNet and VAE, for `p2pz_directions.lean`.

Each block computes what its diffusers namesake computes, in the same order of operations, and
keeps diffusers' parameter names (``resnets.0.norm1.weight``, ``attentions.0.transformer_blocks.0.
attn2.to_q.weight``, ``upsamplers.0.conv.weight``), so a ``diffusion_pytorch_model.safetensors``
loads into it as it is. Only what SD 1.x / 2.x checkpoints use is here: ResNet blocks with the
"default" time-embedding norm, Transformer2D blocks with GEGLU feed-forwards and layer norms,
nearest-neighbour upsampling and strided-conv downsampling.

`Attention` offers the interface diffusers' attention processors are written against (``to_q``,
``heads``, ``scale``, ``prepare_attention_mask``, ``head_to_batch_dim``, ``get_attention_scores``,
...), so p2pz's own processors (pix2pix-zero's map capture, LEDITS++) and diffusers' classic
``AttnProcessor`` run on these blocks unchanged; the default processor is `SDPAProcessor`, diffusers'
``AttnProcessor2_0``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p2pz_directions.lean import LeanUnsupported

__all__ = [
    "Attention",
    "LeanConfig",
    "ModelOutput",
    "SDPAProcessor",
]


class LeanConfig(dict):
    """A model's ``config.json`` as diffusers shows it: ``config["sample_size"]`` and
    ``config.sample_size`` alike."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ModelOutput(tuple):
    """``(sample,)`` that is also ``.sample``, like diffusers' output classes."""

    @property
    def sample(self) -> torch.Tensor:
        return self[0]


def activation(name: str) -> nn.Module:
    acts = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish, "relu": nn.ReLU}
    if name not in acts:
        raise LeanUnsupported(f"activation {name!r}")
    return acts[name]()


# ---------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------
class SDPAProcessor:
    """Attention through ``torch.nn.functional.scaled_dot_product_attention`` (diffusers'
    ``AttnProcessor2_0``, its default on torch 2)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = (
            hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class Attention(nn.Module):
    """Multi-head attention with diffusers' ``Attention`` interface (the parts processors use)."""

    spatial_norm = None
    norm_cross = None
    norm_q = None
    norm_k = None
    is_cross_attention: bool

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        out_bias: bool = True,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
    ):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.scale = dim_head**-0.5
        self.upcast_attention = upcast_attention
        self.upcast_softmax = upcast_softmax
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.is_cross_attention = cross_attention_dim is not None
        self.group_norm = (
            nn.GroupNorm(num_channels=query_dim, num_groups=norm_num_groups, eps=eps, affine=True)
            if norm_num_groups is not None
            else None
        )
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(0.0)])
        self.processor: Any = SDPAProcessor()
        self._accepts: tuple[Any, frozenset[str]] | None = None

    def set_processor(self, processor: Any) -> None:
        self.processor = processor
        self._accepts = None

    def _processor_params(self) -> frozenset[str]:
        if self._accepts is None or self._accepts[0] is not self.processor:
            params = frozenset(inspect.signature(self.processor.__call__).parameters)
            self._accepts = (self.processor, params)
        return self._accepts[1]

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **cross_attention_kwargs: Any,
    ) -> torch.Tensor:
        if cross_attention_kwargs:  # as diffusers: keyword arguments the processor does not take are dropped
            accepted = self._processor_params()
            cross_attention_kwargs = {k: v for k, v in cross_attention_kwargs.items() if k in accepted}
        return self.processor(
            self,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **cross_attention_kwargs,
        )

    def norm_encoder_hidden_states(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return encoder_hidden_states  # SD's attention has no cross-attention norm (norm_cross is None)

    def head_to_batch_dim(self, tensor: torch.Tensor, out_dim: int = 3) -> torch.Tensor:
        heads = self.heads
        if tensor.ndim == 3:
            batch, seq, dim = tensor.shape
            extra = 1
        else:
            batch, extra, seq, dim = tensor.shape
        tensor = tensor.reshape(batch, seq * extra, heads, dim // heads).permute(0, 2, 1, 3)
        if out_dim == 3:
            tensor = tensor.reshape(batch * heads, seq * extra, dim // heads)
        return tensor

    def batch_to_head_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        heads = self.heads
        batch, seq, dim = tensor.shape
        tensor = tensor.reshape(batch // heads, heads, seq, dim)
        return tensor.permute(0, 2, 1, 3).reshape(batch // heads, seq, dim * heads)

    def get_attention_scores(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        dtype = query.dtype
        if self.upcast_attention:
            query, key = query.float(), key.float()
        if attention_mask is None:
            base = torch.empty(
                query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device
            )
            beta = 0
        else:
            base, beta = attention_mask, 1
        scores = torch.baddbmm(base, query, key.transpose(-1, -2), beta=beta, alpha=self.scale)
        del base
        if self.upcast_softmax:
            scores = scores.float()
        return scores.softmax(dim=-1).to(dtype)

    def prepare_attention_mask(
        self, attention_mask: torch.Tensor | None, target_length: int, batch_size: int, out_dim: int = 3
    ) -> torch.Tensor | None:
        if attention_mask is None:
            return attention_mask
        if attention_mask.shape[-1] != target_length:
            attention_mask = F.pad(attention_mask, (0, target_length), value=0.0)
        if out_dim == 3:
            if attention_mask.shape[0] < batch_size * self.heads:
                attention_mask = attention_mask.repeat_interleave(
                    self.heads, dim=0, output_size=attention_mask.shape[0] * self.heads
                )
        elif out_dim == 4:
            attention_mask = attention_mask.unsqueeze(1).repeat_interleave(
                self.heads, dim=1, output_size=attention_mask.shape[1] * self.heads
            )
        return attention_mask


class AttentionLayers:
    """``attn_processors`` / ``set_attn_processor`` of diffusers' models, over every `Attention`."""

    def _attention_layers(self) -> dict[str, Attention]:
        return {f"{n}.processor": m for n, m in self.named_modules() if isinstance(m, Attention)}  # type: ignore[attr-defined]

    @property
    def attn_processors(self) -> dict[str, Any]:
        return {name: m.processor for name, m in self._attention_layers().items()}

    def set_attn_processor(self, processor: Any) -> None:
        layers = self._attention_layers()
        if isinstance(processor, dict):
            if len(processor) != len(layers):
                raise ValueError(
                    f"a dict of {len(processor)} processors was given, but the model has {len(layers)} "
                    "attention layers: give one per layer (keys as in attn_processors) or a single processor"
                )
            for name, m in layers.items():
                if name not in processor:
                    raise ValueError(f"no processor given for attention layer {name}")
                m.set_processor(processor[name])
        else:
            for m in layers.values():
                m.set_processor(processor)

    def set_default_attn_processor(self) -> None:
        self.set_attn_processor(SDPAProcessor())


# ---------------------------------------------------------------------------------------------------
# convolutional blocks
# ---------------------------------------------------------------------------------------------------
class ResnetBlock2D(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        act: str = "silu",
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups=groups, num_channels=in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(num_groups=groups, num_channels=out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = activation(act)
        self.output_scale_factor = output_scale_factor
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
            if in_channels != out_channels
            else None
        )

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv; ``padding=0`` pads right and bottom by one first (the VAE's)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to ``output_size``), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        if hidden_states.shape[0] >= 64:
            hidden_states = hidden_states.contiguous()
        scale = (
            2
            if output_size is None
            else max(f / s for f, s in zip(output_size, hidden_states.shape[-2:], strict=False))
        )
        if hidden_states.numel() * scale > 2**31:
            hidden_states = hidden_states.contiguous()
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        return self.conv(hidden_states)


# ---------------------------------------------------------------------------------------------------
# transformer blocks
# ---------------------------------------------------------------------------------------------------
class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return hidden_states * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward, each after a layer norm, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, upcast_attention: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-5)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, upcast_attention=upcast_attention)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-5)
        self.attn2 = Attention(
            dim,
            heads=heads,
            dim_head=dim_head,
            cross_attention_dim=cross_attention_dim,
            upcast_attention=upcast_attention,
        )
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        cross_attention_kwargs: dict[str, Any] | None,
    ) -> torch.Tensor:
        kw = dict(cross_attention_kwargs or {})
        kw.pop("gligen", None)
        hidden_states = self.attn1(self.norm1(hidden_states), None, attention_mask, **kw) + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        hidden_states = (
            self.attn2(self.norm2(hidden_states), encoder_hidden_states, encoder_attention_mask, **kw)
            + hidden_states
        )
        hidden_states = self.ff(self.norm3(hidden_states)) + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        return hidden_states


class Transformer2D(nn.Module):
    """diffusers' ``Transformer2DModel`` on continuous (image) input."""

    def __init__(
        self,
        heads: int,
        dim_head: int,
        in_channels: int,
        *,
        layers: int,
        cross_attention_dim: int,
        groups: int,
        use_linear_projection: bool,
        upcast_attention: bool,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(num_groups=groups, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, upcast_attention)
                for _ in range(layers)
            ]
        )
        if use_linear_projection:
            self.proj_out: nn.Module = nn.Linear(inner, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = ((1 - attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            encoder_attention_mask = (
                (1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0
            ).unsqueeze(1)
        batch, _, height, width = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
            inner = hidden_states.shape[1]
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, inner)
        else:
            inner = hidden_states.shape[1]
            hidden_states = self.proj_in(
                hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, inner)
            )
            inner = hidden_states.shape[-1]
        for block in self.transformer_blocks:
            hidden_states = block(
                hidden_states,
                attention_mask,
                encoder_hidden_states,
                encoder_attention_mask,
                cross_attention_kwargs,
            )
        if not self.use_linear_projection:
            hidden_states = (
                hidden_states.reshape(batch, height, width, inner).permute(0, 3, 1, 2).contiguous()
            )
            hidden_states = self.proj_out(hidden_states)
        else:
            hidden_states = self.proj_out(hidden_states)
            hidden_states = hidden_states.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()
        return hidden_states + residual


# ---------------------------------------------------------------------------------------------------
# the UNet's down / mid / up blocks
# ---------------------------------------------------------------------------------------------------
class DownBlock(nn.Module):
    """``DownBlock2D`` (no attention) and ``CrossAttnDownBlock2D`` (a Transformer2D after each resnet)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        layers: int,
        temb_channels: int | None,
        eps: float,
        groups: int,
        act: str,
        add_downsample: bool,
        downsample_padding: int,
        transformer: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=temb_channels,
                    groups=groups,
                    eps=eps,
                    act=act,
                )
                for i in range(layers)
            ]
        )
        self.has_cross_attention = transformer is not None
        if transformer is not None:
            self.attentions = nn.ModuleList(
                [Transformer2D(in_channels=out_channels, **transformer) for _ in range(layers)]
            )
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=downsample_padding)])
        else:
            self.downsamplers = None

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, **attn_kw: Any
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        outputs: tuple[torch.Tensor, ...] = ()
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.has_cross_attention:
                hidden_states = self.attentions[i](hidden_states, **attn_kw)
            outputs += (hidden_states,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            outputs += (hidden_states,)
        return hidden_states, outputs


class UpBlock(nn.Module):
    """``UpBlock2D`` and ``CrossAttnUpBlock2D``: each resnet takes the next skip connection."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        *,
        layers: int,
        temb_channels: int,
        eps: float,
        groups: int,
        act: str,
        add_upsample: bool,
        transformer: dict[str, Any] | None = None,
    ):
        super().__init__()
        resnets = []
        for i in range(layers):
            skip = in_channels if i == layers - 1 else out_channels
            first = prev_output_channel if i == 0 else out_channels
            resnets.append(
                ResnetBlock2D(
                    first + skip, out_channels, temb_channels=temb_channels, groups=groups, eps=eps, act=act
                )
            )
        self.resnets = nn.ModuleList(resnets)
        self.has_cross_attention = transformer is not None
        if transformer is not None:
            self.attentions = nn.ModuleList(
                [Transformer2D(in_channels=out_channels, **transformer) for _ in range(layers)]
            )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        upsample_size: Any = None,
        **attn_kw: Any,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            res = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = resnet(torch.cat([hidden_states, res], dim=1), temb)
            if self.has_cross_attention:
                hidden_states = self.attentions[i](hidden_states, **attn_kw)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states, upsample_size)
        return hidden_states


class MidBlockCrossAttn(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, then (Transformer2D, resnet) per layer."""

    def __init__(
        self,
        channels: int,
        *,
        temb_channels: int,
        eps: float,
        groups: int,
        act: str,
        output_scale_factor: float,
        transformer: dict[str, Any],
        layers: int = 1,
    ):
        super().__init__()
        self.has_cross_attention = True
        kw = dict(
            temb_channels=temb_channels,
            groups=groups,
            eps=eps,
            act=act,
            output_scale_factor=output_scale_factor,
        )
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, **kw) for _ in range(layers + 1)])
        self.attentions = nn.ModuleList(
            [Transformer2D(in_channels=channels, **transformer) for _ in range(layers)]
        )

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, **attn_kw: Any
    ) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=False):
            hidden_states = resnet(attn(hidden_states, **attn_kw), temb)
        return hidden_states


# ---------------------------------------------------------------------------------------------------
# the VAE's blocks
# ---------------------------------------------------------------------------------------------------
class MidBlock2D(nn.Module):
    """``UNetMidBlock2D`` of the VAE: resnet, (single-head self-attention with a group norm, resnet)."""

    def __init__(self, channels: int, *, eps: float, groups: int | None, act: str, add_attention: bool):
        super().__init__()
        groups = groups if groups is not None else min(channels // 4, 32)
        self.add_attention = add_attention
        kw = dict(temb_channels=None, groups=groups, eps=eps, act=act)
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, **kw) for _ in range(2)])
        if add_attention:
            self.attentions = nn.ModuleList(
                [
                    Attention(
                        channels,
                        heads=1,
                        dim_head=channels,
                        bias=True,
                        upcast_softmax=True,
                        norm_num_groups=groups,
                        eps=eps,
                        residual_connection=True,
                    )
                ]
            )
        else:
            self.attentions = nn.ModuleList([nn.Identity()])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, None)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=False):
            if self.add_attention:
                hidden_states = attn(hidden_states)
            hidden_states = resnet(hidden_states, None)
        return hidden_states


class VAEBlock(nn.Module):
    """``DownEncoderBlock2D`` (``sample="down"``: resnets, then a stride-2 conv), ``UpDecoderBlock2D``
    (``"up"``: resnets, then nearest 2x and a conv), or the last block of either (``None``: resnets)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, layers: int, groups: int, act: str, sample: str | None
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=None,
                    groups=groups,
                    eps=1e-6,
                    act=act,
                )
                for i in range(layers)
            ]
        )
        self.sample = sample
        if sample is not None:  # diffusers' names: the weights are downsamplers.0.conv / upsamplers.0.conv
            sampler = Upsample2D(out_channels) if sample == "up" else Downsample2D(out_channels, padding=0)
            setattr(self, f"{sample}samplers", nn.ModuleList([sampler]))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, None)
        if self.sample is not None:
            for sampler in getattr(self, f"{self.sample}samplers"):
                hidden_states = sampler(hidden_states)
        return hidden_states


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal embeddings of ``timesteps`` (``[N]``) as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half - downscale_freq_shift)
    emb = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb
