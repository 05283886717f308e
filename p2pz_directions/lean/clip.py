"""Lean CLIP text encoder and tokenizer: what a Stable Diffusion folder's ``text_encoder/`` and
``tokenizer/`` need, without importing transformers (or diffusers).

- `LeanCLIPTextModel` is the text tower of transformers' ``CLIPTextModel`` (transformers 5.x,
  ``attn_implementation="sdpa"``, its default): the same parameter names (``text_model.…``), the same
  operations in the same order, so fp32 results are bit-equal on CPU; ``from_folder`` reads
  ``config.json`` and safetensors weights (single file, sharded, or a ``variant`` such as ``fp16``).
- `LeanCLIPTokenizer` is transformers' ``CLIPTokenizer`` (the `tokenizers`-backed one of
  transformers 5.x): the same Rust pipeline (NFC, whitespace runs to one space, lowercase; CLIP's split
  regex and byte-level pre-tokenizer; byte-level BPE with the ``</w>`` end-of-word suffix; bos/eos
  added by a RoBERTa post-processor), the same added/special tokens, padding and truncation.

Anything these classes do not handle raises `LeanUnsupported`: the caller then loads transformers'
classes instead. Imports: torch, json and the `tokenizers` package only (weights: `lean.reading`).

>>> te = LeanCLIPTextModel.from_folder("sd/text_encoder")          # doctest: +SKIP
>>> tok = LeanCLIPTokenizer.from_folder("sd/tokenizer")            # doctest: +SKIP
>>> ids = tok(["a cat"], padding="max_length", max_length=tok.model_max_length,
...           truncation=True, return_tensors="pt").input_ids      # doctest: +SKIP
>>> te(ids)[0].shape                                               # doctest: +SKIP
torch.Size([1, 77, 768])
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from p2pz_directions.lean import LeanUnsupported
from p2pz_directions.lean.loading import read_json, weight_files

if TYPE_CHECKING:
    from tokenizers import AddedToken, Tokenizer

__all__ = [
    "LeanBatchEncoding",
    "LeanCLIPTextModel",
    "LeanCLIPTextOutput",
    "LeanCLIPTokenizer",
    "LeanUnsupported",
]

logger = logging.getLogger(__name__)

_MiB = 1024 * 1024
CONFIG_MAX_BYTES = 1 * _MiB
TOKENIZER_FILE_MAX_BYTES = 64 * _MiB

# ---------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------


def _check_size(path: Path, max_bytes: int, what: str) -> None:
    size = path.stat().st_size
    if size > max_bytes:
        raise LeanUnsupported(
            f"{what} {path} is {size} bytes, more than the {max_bytes} the lean tokenizer reads; "
            "check the file or load the folder with transformers"
        )


# ---------------------------------------------------------------------------------------------------
# the text model
# ---------------------------------------------------------------------------------------------------

#: CLIPTextConfig's defaults (transformers 5.x), for keys a config.json leaves out
_TEXT_CONFIG_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
_ACTIVATIONS = ("quick_gelu", "gelu")
_INT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's settings from a ``clip_text_model`` config (or a ``clip`` one's
    ``text_config``), CLIPTextConfig's defaults filled in; `LeanUnsupported` for anything else."""
    if not isinstance(config, dict):
        raise LeanUnsupported(f"a CLIP config must be a JSON object, got {type(config).__name__}")
    mtype = config.get("model_type")
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        raise LeanUnsupported(f"config 'architectures' must be a list, got {archs!r}")
    if mtype == "clip_text_model":
        bad = [a for a in archs if a != "CLIPTextModel"]
        if bad:
            raise LeanUnsupported(
                f"architecture {bad[0]!r} is not handled by the lean CLIP text model (only CLIPTextModel)"
            )
        text = dict(config)
    elif mtype == "clip":
        bad = [a for a in archs if a not in ("CLIPModel", "CLIPTextModel")]
        if bad:
            raise LeanUnsupported(
                f"architecture {bad[0]!r} is not handled by the lean CLIP text model "
                "(only CLIPTextModel, or CLIPModel's text tower)"
            )
        text = config.get("text_config") or {}
        if not isinstance(text, dict):
            raise LeanUnsupported("a 'clip' config's text_config must be a JSON object")
        legacy = config.get("text_config_dict")
        if isinstance(legacy, dict) and any(
            text.get(k) != v for k, v in legacy.items() if k != "transformers_version"
        ):
            raise LeanUnsupported("a 'clip' config whose text_config_dict differs from text_config")
        text = dict(text)
        text.setdefault("model_type", "clip_text_model")
    else:
        raise LeanUnsupported(
            f"model_type {mtype!r} is not a CLIP text model (the lean class reads 'clip_text_model' or 'clip')"
        )
    resolved = {**_TEXT_CONFIG_DEFAULTS, **text}
    act = resolved["hidden_act"]
    if act not in _ACTIVATIONS:
        raise LeanUnsupported(
            f"hidden_act {act!r} is not handled by the lean CLIP text model (only {', '.join(_ACTIVATIONS)})"
        )
    for key in _INT_KEYS:
        v = resolved[key]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise LeanUnsupported(f"config {key} must be a positive integer, got {v!r}")
    if resolved["hidden_size"] % resolved["num_attention_heads"]:
        raise LeanUnsupported(
            f"hidden_size {resolved['hidden_size']} is not a multiple of num_attention_heads "
            f"{resolved['num_attention_heads']}"
        )
    eos = resolved["eos_token_id"]
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise LeanUnsupported(f"eos_token_id must be one integer for the lean CLIP text model, got {eos!r}")
    eps = resolved["layer_norm_eps"]
    if eps is None:
        resolved["layer_norm_eps"] = eps = 1e-5
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise LeanUnsupported(f"layer_norm_eps must be a number, got {eps!r}")
    return resolved


class _NoMetaInit:
    """Skip the random initialisation while the module is built on the meta device (the weights come
    from the file): ``nn.init`` on meta tensors runs through ``torch._refs``, which imports
    ``torch._dynamo`` - over a second of a fresh process."""

    weight: torch.Tensor

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        super().reset_parameters()  # type: ignore[misc]


class _Linear(_NoMetaInit, nn.Linear):
    pass


class _Embedding(_NoMetaInit, nn.Embedding):
    pass


class _LayerNorm(_NoMetaInit, nn.LayerNorm):
    pass


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _GELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x)


class _Embeddings(nn.Module):
    def __init__(self, cfg: SimpleNamespace) -> None:
        super().__init__()
        self.token_embedding = _Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = _Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.register_buffer(
            "position_ids",
            torch.arange(cfg.max_position_embeddings, device="cpu").expand((1, -1)),
            persistent=False,
        )

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        seq_length = input_ids.shape[-1]
        max_positions = self.position_embedding.weight.shape[0]
        if seq_length > max_positions:
            raise ValueError(
                f"Sequence length must be less than max_position_embeddings (got `sequence length`: "
                f"{seq_length} and max_position_embeddings: {max_positions}"
            )
        if position_ids is None:
            position_ids = self.position_ids[:, :seq_length]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class _Attention(nn.Module):
    def __init__(self, cfg: SimpleNamespace) -> None:
        super().__init__()
        self.embed_dim = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.k_proj = _Linear(self.embed_dim, self.embed_dim)
        self.v_proj = _Linear(self.embed_dim, self.embed_dim)
        self.q_proj = _Linear(self.embed_dim, self.embed_dim)
        self.out_proj = _Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        # transformers' sdpa path: is_causal when no mask is materialized, else the (causal & padding) mask
        is_causal = mask is None and q.shape[2] > 1
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.scale, is_causal=is_causal
        )
        out = out.reshape(out.shape[0], -1, q.shape[2], v.shape[-1]).transpose(1, 2).contiguous()
        out = out.reshape(*input_shape, -1).contiguous()
        return self.out_proj(out)


class _MLP(nn.Module):
    def __init__(self, cfg: SimpleNamespace) -> None:
        super().__init__()
        self.activation_fn = _QuickGELU() if cfg.hidden_act == "quick_gelu" else _GELU()
        self.fc1 = _Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = _Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class _EncoderLayer(nn.Module):
    def __init__(self, cfg: SimpleNamespace) -> None:
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.layer_norm1 = _LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg)
        self.layer_norm2 = _LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        residual = hidden_states
        hidden_states = residual + self.self_attn(self.layer_norm1(hidden_states), mask)
        residual = hidden_states
        return residual + self.mlp(self.layer_norm2(hidden_states))


class _Encoder(nn.Module):
    def __init__(self, cfg: SimpleNamespace) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class _TextTransformer(nn.Module):
    """``text_model``: embeddings, encoder layers, final layer norm (the module tree of
    transformers' CLIP text model, so its state dict keys match)."""

    def __init__(self, cfg: SimpleNamespace) -> None:
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.final_layer_norm = _LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class LeanCLIPTextOutput(tuple):
    """``(last_hidden_state, pooler_output[, hidden_states])``, laid out like transformers'
    ``BaseModelOutputWithPooling.to_tuple()``; also readable by attribute or by name."""

    def __new__(
        cls,
        last_hidden_state: torch.Tensor,
        pooler_output: torch.Tensor,
        hidden_states: tuple[torch.Tensor, ...] | None = None,
    ) -> LeanCLIPTextOutput:
        items: tuple[Any, ...] = (last_hidden_state, pooler_output)
        if hidden_states is not None:
            items = (*items, hidden_states)
        return super().__new__(cls, items)

    @property
    def last_hidden_state(self) -> torch.Tensor:
        return tuple.__getitem__(self, 0)

    @property
    def pooler_output(self) -> torch.Tensor:
        return tuple.__getitem__(self, 1)

    @property
    def hidden_states(self) -> tuple[torch.Tensor, ...] | None:
        return tuple.__getitem__(self, 2) if len(self) > 2 else None

    @property
    def attentions(self) -> None:
        return None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return ["last_hidden_state", "pooler_output", "hidden_states"][: len(self)]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self)


class LeanCLIPTextModel(nn.Module):
    """transformers' ``CLIPTextModel`` (text tower only), without transformers.

    ``config`` is the ``config.json`` dict (``model_type`` ``clip_text_model``, or ``clip`` with a
    ``text_config``); ``self.config`` gives its resolved settings by attribute, ``self.config_dict``
    the same as a dict."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        resolved = _text_config(config)
        self.config_dict: dict[str, Any] = resolved
        self.config = SimpleNamespace(**resolved)
        self.eos_token_id: int = resolved["eos_token_id"]
        self.text_model = _TextTransformer(self.config)

    # -- properties -----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- forward --------------------------------------------------------------------------------
    @staticmethod
    def _attention_mask(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
        """transformers' ``create_causal_mask`` for sdpa: ``None`` (sdpa's own causal mask) when nothing
        is padded, else the boolean ``[B, 1, L, L]`` mask ``causal & keep``; a 4-D mask is used as given."""
        if attention_mask is None:
            return None
        if attention_mask.ndim == 4:
            return attention_mask
        if attention_mask.ndim != 2:
            raise ValueError(
                f"attention_mask must be [batch, length] (or 4-D), got shape {tuple(attention_mask.shape)}"
            )
        keep = attention_mask.to(device=hidden.device, dtype=torch.bool)
        length = hidden.shape[1]
        if keep.shape[-1] < length:
            keep = nn.functional.pad(keep, (0, length - keep.shape[-1]))
        if keep.sum() == keep.numel():
            return None
        q = torch.arange(length, device=hidden.device)[None, None, :, None]
        kv = torch.arange(keep.shape[-1], device=hidden.device)[None, None, None, :]
        batch = torch.arange(hidden.shape[0], device=hidden.device)[:, None, None, None]
        return torch.ones((), dtype=torch.bool, device=hidden.device) & (kv <= q) & keep[batch, kv]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = False,
        return_dict: bool | None = True,
    ) -> LeanCLIPTextOutput | tuple[Any, ...]:
        if input_ids is None:
            raise ValueError("You have to specify input_ids")
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        tm = self.text_model
        hidden = tm.embeddings(input_ids, position_ids)
        mask = self._attention_mask(attention_mask, hidden)
        states: list[torch.Tensor] | None = [hidden] if output_hidden_states else None
        for layer in tm.encoder.layers:
            hidden = layer(hidden, mask)
            if states is not None:
                states.append(hidden)
        last = tm.final_layer_norm(hidden)
        rows = torch.arange(last.shape[0], device=last.device)
        ids = input_ids.to(dtype=torch.int, device=last.device)
        if self.eos_token_id == 2:  # configs from before transformers PR #24773: eos is the largest id
            pooled = last[rows, ids.argmax(dim=-1)]
        else:
            pooled = last[rows, (ids == self.eos_token_id).int().argmax(dim=-1)]
        out = LeanCLIPTextOutput(last, pooled, tuple(states) if states is not None else None)
        return out if return_dict or return_dict is None else tuple(out)

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        *,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device = "cpu",
        variant: str | None = None,
    ) -> LeanCLIPTextModel:
        """Load a ``text_encoder`` folder (``config.json`` + safetensors weights) in ``dtype`` (``None``:
        as stored) on ``device``; the result is in eval mode without gradients."""
        from p2pz_directions.lean.reading import read_safetensors

        folder = Path(folder)
        if not folder.is_dir():
            raise LeanUnsupported(f"{folder} is not a folder")
        config = read_json(folder / "config.json", CONFIG_MAX_BYTES, "config")
        files = weight_files(folder, "model.safetensors", variant, "transformers")
        with torch.device("meta"):
            model = cls(config)
        wanted = set(model.state_dict().keys())
        whole_clip = config.get("model_type") == "clip"  # CLIPModel: only the text tower's tensors
        dev = torch.device(device)
        sd: dict[str, torch.Tensor] = {}
        unexpected: list[str] = []
        stored: dict[str, str] = {}  # parameter name -> the file key it is read from

        def keep(key: str) -> bool:
            # transformers 4 wrote "text_model.<name>", transformers 5 writes "<name>"
            if key.startswith("text_model."):
                name = key
            elif whole_clip:
                return False
            else:
                name = f"text_model.{key}"
            if name == "text_model.embeddings.position_ids":
                return False  # a buffer old files saved; rebuilt below
            if name not in wanted:
                unexpected.append(key)
                return False
            if name in stored:
                raise LeanUnsupported(f"{folder}: {name} is stored twice (as {key!r} too)")
            stored[name] = key
            return True

        for path in files:
            try:
                part = read_safetensors(path, dev, dtype, keys=keep)
            except LeanUnsupported:
                raise
            except Exception as e:  # a corrupt or foreign file: let transformers report it
                raise LeanUnsupported(f"cannot read safetensors file {path}: {e}") from e
            sd.update((name, part[key]) for name, key in stored.items() if key in part)
        if unexpected:
            raise LeanUnsupported(
                f"{folder}: the weights hold tensors a CLIPTextModel has no place for "
                f"({', '.join(sorted(unexpected)[:3])}); load this folder with transformers"
            )
        missing = sorted(wanted - sd.keys())
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise LeanUnsupported(
                f"{folder}: weights missing for {', '.join(missing[:3])}{more}; "
                "the file does not hold a CLIP text model of this config"
            )
        shapes = model.state_dict()
        for name, t in sd.items():
            if tuple(t.shape) != tuple(shapes[name].shape):
                raise LeanUnsupported(
                    f"{folder}: {name} has shape {tuple(t.shape)}, the config expects {tuple(shapes[name].shape)}"
                )
        result = model.load_state_dict(sd, strict=False, assign=True)
        if result.missing_keys:
            raise LeanUnsupported(f"{folder}: weights missing for {', '.join(result.missing_keys[:3])}")
        emb = model.text_model.embeddings
        emb.position_ids = torch.arange(model.config.max_position_embeddings, device=dev).expand((1, -1))
        meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if meta:
            raise LeanUnsupported(f"{folder}: tensors left unloaded: {', '.join(meta[:3])}")
        model.eval()
        model.requires_grad_(False)
        return model


# ---------------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------------

VERY_LARGE_INTEGER = int(1e30)  # transformers' "no limit" model_max_length
LARGE_INTEGER = int(1e20)
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLIP_SPECIAL_DEFAULTS = {
    "unk_token": "<|endoftext|>",
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_TOKENIZER_CLASSES = (None, "CLIPTokenizer", "CLIPTokenizerFast")


class LeanBatchEncoding(dict):
    """``input_ids`` and ``attention_mask``, by key or attribute (like transformers' BatchEncoding)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def to(self, device: str | torch.device) -> LeanBatchEncoding:
        return LeanBatchEncoding(
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()}
        )


def _added_token(value: dict[str, Any], **override: Any) -> AddedToken:
    from tokenizers import AddedToken

    kw = {k: v for k, v in value.items() if k != "__type"}
    kw.update(override)
    try:
        return AddedToken(**kw)
    except TypeError as e:
        raise LeanUnsupported(f"an added token the lean tokenizer cannot read: {value!r} ({e})") from e


def _convert_added_tokens(obj: Any) -> Any:
    """``{"__type": "AddedToken", ...}`` dicts (old tokenizer_config.json) to AddedToken, recursively."""
    if isinstance(obj, dict) and obj.get("__type") == "AddedToken":
        return _added_token(obj)
    if isinstance(obj, (list, tuple)):
        return [_convert_added_tokens(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _convert_added_tokens(v) for k, v in obj.items()}
    return obj


class LeanCLIPTokenizer:
    """transformers' ``CLIPTokenizer`` (``from_pretrained(folder)``), without transformers."""

    padding_side: str = "right"
    truncation_side: str = "right"

    def __init__(
        self,
        backend: Tokenizer,
        special_tokens: dict[str, Any],
        *,
        model_max_length: int = VERY_LARGE_INTEGER,
        padding_side: str = "right",
        truncation_side: str = "right",
    ) -> None:
        """``backend``: the finished `tokenizers.Tokenizer`; ``special_tokens``: ``bos_token`` ...
        (str, AddedToken or None). Use `from_folder` to build both as transformers does."""
        if padding_side not in ("right", "left") or truncation_side not in ("right", "left"):
            raise LeanUnsupported(
                f"padding/truncation side must be 'right' or 'left', got {padding_side!r}/{truncation_side!r}"
            )
        self._tokenizer = backend
        self._special = dict(special_tokens)
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self._warned_long = False

    # -- special tokens -------------------------------------------------------------------------
    def _token(self, attr: str) -> str | None:
        v = self._special.get(attr)
        return None if v is None else str(v)

    def _id(self, attr: str) -> int | None:
        tok = self._token(attr)
        if tok is None:
            return None
        return self.convert_tokens_to_ids(tok)

    @property
    def bos_token(self) -> str | None:
        return self._token("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._token("eos_token")

    @property
    def unk_token(self) -> str | None:
        return self._token("unk_token")

    @property
    def pad_token(self) -> str | None:
        return self._token("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The base vocabulary's size (without added tokens), as transformers counts it."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int] | None:
        if isinstance(tokens, str):
            i = self._tokenizer.token_to_id(tokens)
            if i is None:
                unk = self._token("unk_token")
                return None if unk is None else self._tokenizer.token_to_id(unk)
            return i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        return [self._tokenizer.id_to_token(int(i)) for i in ids]

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> LeanCLIPTokenizer:
        """Load a ``tokenizer`` folder: ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``, with
        ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``added_tokens.json``, resolving special
        and added tokens the way transformers 5's ``CLIPTokenizer.from_pretrained`` does."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        folder = Path(folder)
        if not folder.is_dir():
            raise LeanUnsupported(f"{folder} is not a folder")
        cfg_path = folder / "tokenizer_config.json"
        init: dict[str, Any] = (
            read_json(cfg_path, CONFIG_MAX_BYTES, "tokenizer config") if cfg_path.is_file() else {}
        )
        if not isinstance(init, dict):
            raise LeanUnsupported(f"{cfg_path} must hold a JSON object")
        klass = init.pop("tokenizer_class", None)
        if klass not in _TOKENIZER_CLASSES:
            raise LeanUnsupported(
                f"tokenizer_class {klass!r} is not a CLIP tokenizer (the lean class reads CLIPTokenizer)"
            )
        init.pop("init_inputs", None)
        tok_json = folder / "tokenizer.json"
        has_tok_json = tok_json.is_file()
        if "additional_special_tokens" in init and not init.get("extra_special_tokens"):
            init["extra_special_tokens"] = init.pop("additional_special_tokens")
        for key, value in init.items():
            if key.endswith("_token") and key not in _SPECIAL_ATTRS and isinstance(value, (str, dict)):
                raise LeanUnsupported(
                    f"{cfg_path}: model-specific special token {key!r} is not handled by the lean tokenizer"
                )
        if init.get("extra_special_tokens"):
            raise LeanUnsupported(f"{cfg_path}: extra_special_tokens are not handled by the lean tokenizer")

        # -- added tokens: tokenizer_config's added_tokens_decoder, else the legacy files ---------
        decoder: dict[int, AddedToken] = {}
        by_content: dict[str, AddedToken] = {}
        if "added_tokens_decoder" in init:
            raw = init["added_tokens_decoder"]
            if not isinstance(raw, dict):
                raise LeanUnsupported(f"{cfg_path}: added_tokens_decoder must be an object")
            for idx, value in raw.items():
                if not isinstance(value, dict):
                    raise LeanUnsupported(f"{cfg_path}: added token {idx} must be an object, got {value!r}")
                t = _added_token(value)
                decoder[int(idx)] = t
                by_content[str(t)] = t
        else:
            stm_path = folder / "special_tokens_map.json"
            if stm_path.is_file():
                stm = read_json(stm_path, CONFIG_MAX_BYTES, "special tokens map")
                if not isinstance(stm, dict):
                    raise LeanUnsupported(f"{stm_path} must hold a JSON object")
                for key, value in stm.items():
                    if key in ("extra_special_tokens", "additional_special_tokens"):
                        if value:
                            raise LeanUnsupported(f"{stm_path}: {key} are not handled by the lean tokenizer")
                        continue
                    if isinstance(value, dict):
                        value = _added_token({k: v for k, v in value.items() if k != "special"}, special=True)
                    init[key] = value
            at_path = folder / "added_tokens.json"
            if at_path.is_file():
                added = read_json(at_path, CONFIG_MAX_BYTES, "added tokens")
                if not isinstance(added, dict):
                    raise LeanUnsupported(f"{at_path} must hold a JSON object")
                # transformers takes str() of the raw values here (an {"__type": ...} dict never matches)
                specials = {str(init[k]) for k in _SPECIAL_ATTRS if init.get(k)}
                for content, idx in added.items():
                    is_special = content in specials
                    t = AddedToken(
                        content, rstrip=False, lstrip=False, normalized=not is_special, special=is_special
                    )
                    decoder[int(idx)] = t
                    by_content[content] = t
        backend_json: Tokenizer | None = None
        if has_tok_json:
            _check_size(tok_json, TOKENIZER_FILE_MAX_BYTES, "tokenizer.json")
            try:
                backend_json = Tokenizer.from_file(str(tok_json))
            except Exception as e:
                raise LeanUnsupported(f"cannot read {tok_json}: {e}") from e
            if "added_tokens_decoder" not in init:
                for idx, t in backend_json.get_added_tokens_decoder().items():
                    decoder[idx] = t
                    by_content[str(t)] = t
        init = _convert_added_tokens(init)
        for key in _SPECIAL_ATTRS:
            if key in init and by_content and init[key] is not None:
                init[key] = by_content.get(str(init[key]), init[key])
        special: dict[str, Any] = dict.fromkeys(_SPECIAL_ATTRS)
        for key in _SPECIAL_ATTRS:
            value = init.get(key, _CLIP_SPECIAL_DEFAULTS.get(key))
            if value is not None and not isinstance(value, (str, AddedToken)):
                raise LeanUnsupported(f"special token {key} must be a string, got {value!r}")
            special[key] = value
        for key in ("bos_token", "eos_token", "unk_token"):
            if special[key] is None:
                raise LeanUnsupported(f"the tokenizer has no {key}; the lean CLIP tokenizer needs one")
        unk = str(special["unk_token"])

        # -- the backend: CLIPTokenizer.__init__'s pipeline over this vocabulary -----------------
        bpe_kw: dict[str, Any] = dict(
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=unk,
        )
        if backend_json is not None:
            model = backend_json.model
            if not isinstance(model, BPE):
                raise LeanUnsupported(f"{tok_json} holds a {type(model).__name__} model, not CLIP's BPE")
            for key, value in bpe_kw.items():
                setattr(model, key, value)
            model.byte_fallback = False
            model.ignore_merges = False
        else:
            vocab, merges = folder / "vocab.json", folder / "merges.txt"
            for path in (vocab, merges):
                if not path.is_file():
                    raise LeanUnsupported(
                        f"no tokenizer.json and no {path.name} in {folder}: not a CLIP tokenizer folder"
                    )
                _check_size(path, TOKENIZER_FILE_MAX_BYTES, path.name)
            try:
                model = BPE(vocab=str(vocab), merges=str(merges), **bpe_kw)
            except Exception as e:
                raise LeanUnsupported(f"cannot read {vocab} / {merges}: {e}") from e
        backend = Tokenizer(model)
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()

        # -- added/special tokens, in TokenizersBackend.__init__'s order -------------------------
        tokens_to_add: list[Any] = [t for _, t in sorted(decoder.items(), key=lambda kv: kv[0])]
        encoder = [str(t) for t in tokens_to_add]
        for value in special.values():
            if value is None:
                continue
            if str(value) not in encoder and value not in tokens_to_add:
                tokens_to_add.append(value)
        named = [str(t) for t in special.values() if t]
        tokens: list[AddedToken] = []
        for t in tokens_to_add:
            if isinstance(t, str):
                t = AddedToken(t, special=True)
            elif not t.special and str(t) in named:
                t.special = True
            tokens.append(t)
        if tokens:
            backend.add_tokens(tokens)
        backend.encode_special_tokens = bool(init.get("split_special_tokens", False))

        max_len = init.get("model_max_length", init.get("max_len"))
        if max_len is None:
            max_len = VERY_LARGE_INTEGER
        if isinstance(max_len, float) and math.isfinite(max_len) and max_len.is_integer():
            max_len = int(max_len)
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 0:
            raise LeanUnsupported(f"model_max_length must be a non-negative integer, got {max_len!r}")
        tok = cls(
            backend,
            special,
            model_max_length=max_len,
            padding_side=init.get("padding_side", "right"),
            truncation_side=init.get("truncation_side", "right"),
        )
        backend.post_processor = processors.RobertaProcessing(
            (str(special["eos_token"]), tok.eos_token_id),
            (str(special["bos_token"]), tok.bos_token_id),
            False,  # trim_offsets
            False,  # add_prefix_space
        )
        return tok

    # -- encoding -------------------------------------------------------------------------------
    def _strategies(
        self, padding: bool | str, truncation: bool | str | None, max_length: int | None
    ) -> tuple[str | None, bool, int | None]:
        """transformers' ``_get_padding_truncation_strategies`` for one sequence per row: the padding
        (``None``, ``"longest"`` or ``"max_length"``), whether to truncate, and the length."""
        if max_length is not None and padding is False and truncation is None:
            truncation = True
        if padding is False or padding == "do_not_pad":
            pad = None
        elif padding is True or padding == "longest":
            pad = "longest"
        elif padding == "max_length":
            pad = "max_length"
        else:
            raise ValueError(
                f"padding must be False, True, 'longest', 'max_length' or 'do_not_pad', got {padding!r}"
            )
        if truncation is None or truncation is False or truncation == "do_not_truncate":
            trunc = False
        elif truncation is True or truncation in ("longest_first", "only_first"):
            trunc = True
        else:
            raise ValueError(
                f"truncation must be True, False, 'longest_first', 'only_first' or 'do_not_truncate', got {truncation!r}"
            )
        if max_length is None:
            if pad == "max_length":
                if self.model_max_length > LARGE_INTEGER:
                    pad = None
                else:
                    max_length = self.model_max_length
            if trunc:
                if self.model_max_length > LARGE_INTEGER:
                    trunc = False
                else:
                    max_length = self.model_max_length
        if pad is not None and (self.pad_token is None or self.pad_token_id is None or self.pad_token_id < 0):
            raise ValueError(
                "Asking to pad but the tokenizer does not have a padding token; pass padding=False "
                "or use a tokenizer folder whose config names a pad_token"
            )
        return pad, trunc, max_length

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool | str | None = None,
        return_tensors: str | None = None,
        *,
        add_special_tokens: bool = True,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        verbose: bool = True,
    ) -> LeanBatchEncoding:
        """Tokenize ``text`` (one string, or a list of them) like transformers' CLIPTokenizer:
        ``input_ids`` and ``attention_mask`` as lists (a flat list for one string) or, with
        ``return_tensors="pt"``, ``[batch, length]`` LongTensors."""
        if return_tensors not in (None, "pt"):
            raise ValueError(
                f"return_tensors must be None or 'pt' for the lean tokenizer, got {return_tensors!r}"
            )
        batched = isinstance(text, (list, tuple))
        if batched:
            if not all(isinstance(t, str) for t in text):
                raise ValueError("text must be a str or a list of str (pre-tokenized input is not supported)")
            texts = list(text)
        elif isinstance(text, str):
            texts = [text]
        else:
            raise ValueError(f"text must be a str or a list of str, got {type(text).__name__}")
        pad, trunc, max_length = self._strategies(padding, truncation, max_length)
        if trunc and max_length is None:
            raise ValueError("truncation needs max_length (the tokenizer has no model_max_length)")
        if (
            trunc
            and pad is not None
            and pad_to_multiple_of is not None
            and max_length is not None
            and max_length % pad_to_multiple_of
        ):
            raise ValueError(
                f"Truncation and padding are both activated but truncation length ({max_length}) is not a "
                f"multiple of pad_to_multiple_of ({pad_to_multiple_of})."
            )
        be = self._tokenizer
        if trunc:
            be.enable_truncation(
                max_length=max_length, stride=0, strategy="longest_first", direction=self.truncation_side
            )
        else:
            be.no_truncation()
        if pad is not None:
            be.enable_padding(
                direction=padding_side or self.padding_side,
                pad_id=self.pad_token_id,
                pad_type_id=0,
                pad_token=self.pad_token,
                length=max_length if pad == "max_length" else None,
                pad_to_multiple_of=pad_to_multiple_of,
            )
        else:
            be.no_padding()
        encodings = be.encode_batch(texts, add_special_tokens=add_special_tokens) if texts else []
        ids = [e.ids for e in encodings]
        mask = [e.attention_mask for e in encodings]
        if verbose and max_length is None and not self._warned_long:
            if any(len(row) > self.model_max_length for row in ids):
                self._warned_long = True
                logger.warning(
                    "Token indices sequence length is longer than the specified maximum sequence length for this "
                    "model (%d > %d); running it through the model will fail or truncate",
                    max(len(row) for row in ids),
                    self.model_max_length,
                )
        data: dict[str, Any] = {"input_ids": ids}
        if return_attention_mask is None or return_attention_mask:
            data["attention_mask"] = mask
        if return_tensors == "pt":
            lengths = {len(row) for row in ids}
            if len(lengths) > 1:
                raise ValueError(
                    "Unable to create tensor: the rows have different lengths "
                    f"({sorted(lengths)}); use padding=True or padding='max_length' with truncation=True"
                )
            return LeanBatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in data.items()})
        if not batched:
            data = {k: v[0] for k, v in data.items()}
        return LeanBatchEncoding(data)

    # -- decoding -------------------------------------------------------------------------------
    @staticmethod
    def _as_ids(ids: Any) -> Any:
        if isinstance(ids, torch.Tensor):
            return ids.tolist()
        if isinstance(ids, dict):
            return ids["input_ids"]
        return ids

    def decode(self, ids: int | Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``, as transformers' CLIPTokenizer decodes (``</w>`` to spaces, stripped)."""
        ids = self._as_ids(ids)
        if isinstance(ids, int):
            ids = [ids]
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text.replace("</w>", " ").strip()

    def batch_decode(
        self, rows: Iterable[Iterable[int]] | torch.Tensor, skip_special_tokens: bool = False
    ) -> list[str]:
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in self._as_ids(rows)]

    def __repr__(self) -> str:
        return (
            f"LeanCLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
            f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r})"
        )
