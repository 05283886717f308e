"""Batched text encoding: the mean sequence embedding of many captions, for one text encoder.

This is the "embed the captions" half of the paper's recipe: tokenize each caption padded to the
encoder's max length (77 for CLIP) with truncation, run the text encoder, take output ``[0]``
(the last hidden state, exactly what Stable Diffusion conditions on) and average over captions.
The authors and diffusers' docs loop one caption at a time; we tokenize once and run large
batches under `torch.inference_mode`, accumulating the sum in float32. On float32 the result
equals their loop to float rounding (see `encode_one_by_one`, kept here as the reference).

>>> from p2pz_directions.builder.encoders import TextEncoder
>>> te = TextEncoder.from_pretrained("CompVis/stable-diffusion-v1-4", device="cuda")   # doctest: +SKIP
>>> te.encode(["a photo of a cat", "a cat on a sofa"]).shape                          # doctest: +SKIP
torch.Size([77, 768])
>>> te.info.id                                                                         # doctest: +SKIP
'openai/clip-vit-large-patch14'
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from p2pz_directions.core.concept import EncoderInfo
from p2pz_directions.core.dtypes import torch_dtype
from p2pz_directions.core.errors import FormatError
from p2pz_directions.editing.models import EncoderLoadError

__all__ = ["EncoderLoadError", "TextEncoder", "encode_one_by_one", "load_tokenizer", "resolve_device_dtype"]

#: progress callback: (captions done, captions total)
EncodeProgress = Callable[[int, int], None]


def resolve_device_dtype(device: str | torch.device | None, dtype: Any) -> tuple[str, torch.dtype]:
    """``(device, dtype)`` with defaults: CUDA if present; float16 on GPU, float32 on CPU."""
    dev = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return dev, torch_dtype(dtype, dev)


def _locate(
    model: str | os.PathLike | None, encoder: str | os.PathLike | None
) -> tuple[str, str | None, str | None]:
    """``(source, tokenizer subfolder, text encoder subfolder)`` for a model or an encoder."""
    if model is None and encoder is None:
        raise ValueError(
            "give model= (a diffusers model id or folder) or encoder= (a CLIP text encoder id or folder)"
        )
    if encoder is not None:
        src = str(encoder)
        p = Path(src)
        if (
            p.is_dir()
            and not (p / "config.json").is_file()
            and (p / "text_encoder" / "config.json").is_file()
        ):
            return src, "tokenizer", "text_encoder"  # a diffusers folder passed as encoder=
        if p.is_dir() and not (p / "config.json").is_file():
            raise EncoderLoadError(
                f"{p} holds no text encoder: expected {p}/config.json (a CLIP text model folder)"
            )
        return src, None, None
    src = str(model)
    p = Path(src)
    if p.is_dir():
        if (p / "text_encoder" / "config.json").is_file():
            if not (p / "tokenizer").is_dir():
                raise EncoderLoadError(
                    f"model folder {p} has a text_encoder/ but no tokenizer/; both are needed to embed captions"
                )
            return src, "tokenizer", "text_encoder"
        if (p / "model_index.json").is_file() or (p / "unet").is_dir():
            raise EncoderLoadError(
                f"model {p} has no text encoder (no text_encoder/config.json): p2pz cannot embed captions for it. "
                "Use a Stable Diffusion model with a CLIP text encoder, or name one with --encoder"
            )
        if (p / "config.json").is_file():
            return src, None, None  # a bare CLIP (text) model folder
        raise EncoderLoadError(
            f"{p} is neither a diffusers model folder (text_encoder/, tokenizer/) nor a CLIP model folder (config.json)"
        )
    return src, "tokenizer", "text_encoder"


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def load_tokenizer(model: str | os.PathLike | None = None, encoder: str | os.PathLike | None = None):
    """The tokenizer of ``model`` (its ``tokenizer`` subfolder) or of the text encoder ``encoder``."""
    from transformers import AutoTokenizer

    src, tok_sub, _ = _locate(model, encoder)
    try:
        if tok_sub:
            return AutoTokenizer.from_pretrained(src, subfolder=tok_sub)
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise EncoderLoadError(
            f"cannot load the tokenizer of {src!r} ({_first_line(e)}). Check the id or path (offline, pass a "
            "local model folder)"
        ) from None


def _text_model_class(src: str, sub: str | None):
    """The transformers class that holds the text tower, from the config's model_type."""
    from transformers import AutoConfig, AutoModel, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    try:
        cfg = AutoConfig.from_pretrained(src, subfolder=sub) if sub else AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise EncoderLoadError(
            f"cannot read the text encoder config of {src!r}{f' ({sub}/)' if sub else ''}: {_first_line(e)}. "
            "Check the id or path (offline, pass a local model folder)"
        ) from None
    mtype = getattr(cfg, "model_type", "")
    archs = getattr(cfg, "architectures", None) or []
    if mtype in ("clip", "clip_text_model"):
        if "CLIPTextModelWithProjection" in archs:
            return CLIPTextModelWithProjection
        return CLIPTextModel
    if mtype in ("t5", "umt5", "mt5"):
        return T5EncoderModel
    return AutoModel


class TextEncoder:
    """A tokenizer and text encoder pair that turns captions into a mean ``[max_length, D]`` embedding.

    >>> te = TextEncoder.from_pretrained(model="path/to/sd-model", device="cpu")   # doctest: +SKIP
    >>> emb = te.encode(captions, batch_size=256)                                  # doctest: +SKIP
    """

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: torch.nn.Module,
        info: EncoderInfo,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        source: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.info = info
        self.device = device
        self.dtype = dtype
        self.source = source

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        *,
        encoder: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: Any = None,
        tokenizer: Any = None,
    ) -> TextEncoder:
        """Load the text encoder of a diffusers model (``text_encoder/`` + ``tokenizer/``) or a CLIP id.

        The recorded identity comes from `p2pz_directions.editing.models.encoder_for`, the same function
        the resolver uses, so concepts built here are refused by models with another encoder.
        """
        from p2pz_directions.editing.models import encoder_for

        dev, dt = resolve_device_dtype(device, dtype)
        src, tok_sub, te_sub = _locate(model, encoder)
        # the identity first, from the small files: a model p2pz cannot use fails before any weights load
        info = encoder_for(encoder=encoder) if encoder is not None else encoder_for(model=model)
        tok = tokenizer if tokenizer is not None else load_tokenizer(model, encoder)
        klass = _text_model_class(src, te_sub)
        try:
            kwargs: dict[str, Any] = {"dtype": dt}
            if te_sub:
                kwargs["subfolder"] = te_sub
            te = klass.from_pretrained(src, **kwargs)
        except (OSError, ValueError) as e:
            raise EncoderLoadError(
                f"cannot load the text encoder of {src!r} ({_first_line(e)}). Check the id or path (offline, "
                "pass a local model folder)"
            ) from None
        te = te.to(dev).eval()
        te.requires_grad_(False)
        hidden = int(getattr(te.config, "hidden_size", 0) or getattr(te.config, "d_model", 0))
        max_len = int(getattr(tok, "model_max_length", info.max_length) or info.max_length)
        if max_len > 4096:  # "no limit" sentinel of some tokenizers
            max_len = int(getattr(te.config, "max_position_embeddings", info.max_length))
        if info.hidden_size == 0:  # an encoder id p2pz has no table entry for
            info = EncoderInfo(
                info.id, hidden, getattr(te.config, "model_type", "unknown"), info.revision, max_len
            )
        if info.hidden_size != hidden or info.max_length != max_len:
            raise FormatError(
                f"text encoder of {src!r} has hidden size {hidden} and max length {max_len}, but its recorded "
                f"identity {info.id} says {info.hidden_size} / {info.max_length}; the model files look inconsistent"
            )
        return cls(tok, te, info, device=dev, dtype=dt, source=src)

    # -- encoding ----------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self.info.max_length

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """``[N, max_length]`` token ids: padded to max length, truncated (as the authors do)."""
        return self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def count_tokens(self, captions: Sequence[str]) -> list[int]:
        """Token counts (special tokens included) of each caption, without truncation."""
        ids = self.tokenizer(list(captions), truncation=False, verbose=False).input_ids
        return [len(x) for x in ids]

    @torch.inference_mode()
    def embed_batch(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Output ``[0]`` (last hidden state) for a batch of token ids: ``[B, max_length, D]``."""
        return self.text_encoder(input_ids.to(self.device), attention_mask=None)[0]

    @torch.inference_mode()
    def encode(
        self,
        captions: Sequence[str],
        *,
        batch_size: int = 1024,
        progress: EncodeProgress | None = None,
    ) -> torch.Tensor:
        """Mean embedding of ``captions``: ``[max_length, D]`` float32 on the CPU.

        ``batch_size`` captions go through the encoder at once; the sum is accumulated in float32.
        """
        captions = list(captions)
        if not captions:
            raise ValueError("no captions to encode")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids = self.tokenize(captions).to(self.device)
        total = torch.zeros(ids.shape[1], self.info.hidden_size, dtype=torch.float32, device=self.device)
        done = 0
        for start in range(0, len(captions), batch_size):
            out = self.embed_batch(ids[start : start + batch_size])
            total += out.sum(dim=0, dtype=torch.float32)
            done = min(len(captions), start + batch_size)
            if progress is not None:
                progress(done, len(captions))
        mean = total / len(captions)
        if mean.shape != (self.info.max_length, self.info.hidden_size):
            raise FormatError(
                f"text encoder produced {list(mean.shape)}, expected [{self.info.max_length}, {self.info.hidden_size}]"
            )
        return mean.cpu()

    def settings(self) -> dict[str, Any]:
        """What is recorded in provenance about how the embedding was computed."""
        return {
            "source": _describe_source(self.source),
            "class": type(self.text_encoder).__name__,
            "device_type": str(self.device).split(":")[0],
            "dtype": str(self.dtype).removeprefix("torch."),
            "output": "text_encoder(input_ids, attention_mask=None)[0], mean over captions",
            "padding": "max_length",
            "truncation": True,
            "max_length": self.info.max_length,
        }

    def to(self, device: str) -> TextEncoder:
        self.text_encoder.to(device)
        self.device = str(device)
        return self


def _describe_source(src: str | None) -> str | None:
    """A model id as given; a local folder by its name only (paths differ between machines)."""
    if src is None:
        return None
    p = Path(src)
    if p.is_dir():
        name = p.resolve().name
        try:
            idx = json.loads((p / "model_index.json").read_text("utf-8"))
            name = str(idx.get("_name_or_path") or name)
        except (OSError, ValueError):
            pass
        return f"local:{name}"
    return src


@torch.no_grad()
def encode_one_by_one(
    captions: Sequence[str], tokenizer: Any, text_encoder: torch.nn.Module, device: str = "cpu"
) -> torch.Tensor:
    """The authors' reference: one caption per forward pass, then the mean. ``[1, max_length, D]``.

    Kept for tests and the benchmark (``make_edit_direction.py`` / diffusers docs' ``embed_captions``).
    """
    outs = []
    for sent in captions:
        ids = tokenizer(
            sent,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        outs.append(text_encoder(ids.to(device), attention_mask=None)[0])
    return torch.concatenate(outs, dim=0).mean(dim=0).unsqueeze(0)
