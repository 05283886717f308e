"""Which text encoder a model uses: the key that keeps embeddings and models matched.

SD 1.x models share OpenAI's CLIP ViT-L/14 text encoder (D=768), SD 2.x OpenCLIP ViT-H/14
(D=1024). A known model id maps to its encoder through the table below; a local diffusers folder
is identified by its text encoder's config (``_name_or_path`` when it names a known encoder), or
else by a fingerprint of the text encoder's weights, so two copies of the same weights match and
different weights never do.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .concept import EncoderInfo
from .errors import FormatError

CLIP_L = EncoderInfo("openai/clip-vit-large-patch14", 768, "clip-vit-l-14")
OPENCLIP_H = EncoderInfo("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", 1024, "openclip-vit-h-14")

#: text encoders by id
KNOWN_ENCODERS: dict[str, EncoderInfo] = {e.id: e for e in (CLIP_L, OPENCLIP_H)}

#: diffusers model ids (lower-case) -> the text encoder they ship
KNOWN_MODELS: dict[str, EncoderInfo] = {
    "compvis/stable-diffusion-v1-1": CLIP_L,
    "compvis/stable-diffusion-v1-2": CLIP_L,
    "compvis/stable-diffusion-v1-3": CLIP_L,
    "compvis/stable-diffusion-v1-4": CLIP_L,
    "runwayml/stable-diffusion-v1-5": CLIP_L,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": CLIP_L,
    "runwayml/stable-diffusion-inpainting": CLIP_L,
    "stabilityai/stable-diffusion-2": OPENCLIP_H,
    "stabilityai/stable-diffusion-2-base": OPENCLIP_H,
    "stabilityai/stable-diffusion-2-1": OPENCLIP_H,
    "stabilityai/stable-diffusion-2-1-base": OPENCLIP_H,
    "stabilityai/stable-diffusion-2-inpainting": OPENCLIP_H,
}

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors")


def _text_encoder_dir(path: Path) -> Path | None:
    if (path / "text_encoder" / "config.json").is_file():
        return path / "text_encoder"
    if (path / "config.json").is_file():
        return path
    return None


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    found = False
    for name in _WEIGHT_FILES:
        f = folder / name
        if f.is_file():
            found = True
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            break
    if not found:
        h.update((folder / "config.json").read_bytes())
    return h.hexdigest()[:16]


def encoder_from_folder(folder: str | os.PathLike, *, label: str | None = None) -> EncoderInfo:
    """Identify the text encoder stored in ``folder`` (a diffusers model folder or a CLIP folder)."""
    path = Path(folder)
    te = _text_encoder_dir(path)
    if te is None:
        raise FormatError(
            f"{path} has no text encoder: expected {path}/text_encoder/config.json (a diffusers model) "
            f"or {path}/config.json (a CLIP text model)"
        )
    try:
        cfg = json.loads((te / "config.json").read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read {te / 'config.json'}: {e}") from None
    cfg = cfg.get("text_config", cfg)
    hidden = int(cfg.get("hidden_size") or cfg.get("d_model") or 0)
    max_len = int(cfg.get("max_position_embeddings", 77))
    named = str(cfg.get("_name_or_path", ""))
    known = KNOWN_ENCODERS.get(named)
    if known is not None and known.hidden_size == hidden:
        return known
    fam = f"{cfg.get('model_type', 'text-encoder')}-d{hidden}"
    return EncoderInfo(f"local/{label or fam}-{_fingerprint(te)}", hidden, fam, max_length=max_len)


def encoder_for(
    model: str | os.PathLike | None = None, encoder: str | os.PathLike | None = None
) -> EncoderInfo:
    """The text encoder for a diffusers model id/path (``model=``) or an encoder id/path (``encoder=``)."""
    if model is None and encoder is None:
        raise ValueError("give model= (a diffusers model id or path) or encoder= (a text encoder id or path)")
    key = str(encoder if encoder is not None else model)
    if os.path.isdir(key):
        return encoder_from_folder(key)
    low = key.lower().rstrip("/")
    if encoder is not None:
        for eid, info in KNOWN_ENCODERS.items():
            if eid.lower() == low:
                return info
        return EncoderInfo(key, 0, "unknown")
    if low in KNOWN_MODELS:
        return KNOWN_MODELS[low]
    for eid, info in KNOWN_ENCODERS.items():
        if eid.lower() == low:
            return info
    try:  # a model in the local Hugging Face cache
        from huggingface_hub import try_to_load_from_cache

        cfg = try_to_load_from_cache(key, "text_encoder/config.json")
        if isinstance(cfg, str):
            return encoder_from_folder(Path(cfg).parent.parent, label=key.replace("/", "--"))
    except Exception:  # noqa: BLE001 - the cache is only a hint
        pass
    raise FormatError(
        f"unknown model {key!r}: p2pz does not know which text encoder it uses. Pass a local path to the "
        f"model folder, name the encoder with encoder=..., or use one of: {', '.join(sorted(KNOWN_MODELS))}"
    )


def validate_encoder_id(encoder: str | os.PathLike) -> EncoderInfo | None:
    """Check an encoder id a person typed: a folder or a known id passes (its `EncoderInfo` is returned);
    a model id or a near-miss of a known id (``openai/clip-vit-large-patch-14``) raises `FormatError`
    saying what to write instead. Any other id returns None: the caller decides (cache, registry).

    >>> validate_encoder_id("openai/clip-vit-large-patch14").hidden_size
    768
    """
    import difflib

    key = os.fspath(encoder)
    if os.path.isdir(key):
        return encoder_from_folder(key)
    low = key.lower().rstrip("/")
    for eid, info in KNOWN_ENCODERS.items():
        if eid.lower() == low:
            return info
    if low in KNOWN_MODELS:
        raise FormatError(
            f"{key!r} is a diffusers model, not a text encoder: pass it as --model {key} "
            f"(its text encoder is {KNOWN_MODELS[low].id})"
        )
    close = difflib.get_close_matches(low, [e.lower() for e in KNOWN_ENCODERS], n=1, cutoff=0.8)
    if close:
        (match,) = (e for e in KNOWN_ENCODERS if e.lower() == close[0])
        raise FormatError(f"unknown text encoder {key!r}. Did you mean {match}?")
    return None
