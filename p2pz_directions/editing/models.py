"""Which text encoder a model uses: the key that keeps embeddings and models matched.

SD 1.x models share OpenAI's CLIP ViT-L/14 text encoder (D=768), SD 2.x OpenCLIP ViT-H/14
(D=1024). Any Stable Diffusion model is identified from its own small files, not from a list of
model ids: ``text_encoder/config.json`` (and the presence of ``tokenizer/``), read from a local
folder or, for a Hub id, downloaded through huggingface_hub (``hf_hub_download`` of those files
only, into the Hugging Face cache; with ``HF_HUB_OFFLINE=1`` from the cache). One rule for both:

1. the config names a known encoder (``_name_or_path``, as SD 1.x configs do) of its hidden
   size: that encoder;
2. else the config has exactly the architecture of a known encoder (`ENCODER_SIGNATURES`: CLIP
   ViT-L/14's 12 layers of 768 with quick-GELU, or the 23 layers of 1024 with GELU that SD 2.x
   keeps of OpenCLIP ViT-H/14): that encoder, so SD 2.x variants and fine-tuned community
   checkpoints resolve by id;
3. else a fingerprint of the text encoder's weights, ``local/<model type>-d<D>-<16 hex of
   sha256>``: two copies of the same weights match (a Hub id and a local folder of it alike) and
   different weights never do. For a Hub id the sha256 is the Hub's own (the ETag of an LFS file),
   so no weights are downloaded to learn it.

A concept for one encoder is never used with another (`Concept.check_model`): a CLIP-L concept
never meets an OpenCLIP-H model, whatever the model id. A model with no text encoder, no
tokenizer, two text encoders (SDXL) or a text encoder of an architecture p2pz cannot run gets an
`EncoderLoadError` saying so. `KNOWN_MODELS` only spares the official models the download.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from p2pz_directions.core.concept import EncoderInfo
from p2pz_directions.core.errors import FormatError

CLIP_L = EncoderInfo("openai/clip-vit-large-patch14", 768, "clip-vit-l-14")
OPENCLIP_H = EncoderInfo("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", 1024, "openclip-vit-h-14")

#: text encoders by id
KNOWN_ENCODERS: dict[str, EncoderInfo] = {e.id: e for e in (CLIP_L, OPENCLIP_H)}

#: the text-encoder config fields that pin a known encoder's architecture (as diffusers saves it)
ENCODER_SIGNATURES: dict[str, dict[str, Any]] = {
    CLIP_L.id: {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "quick_gelu",
    },
    OPENCLIP_H.id: {
        "hidden_size": 1024,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "gelu",
    },
}

#: text-encoder model types p2pz can run (`encoders.TextEncoder`)
TEXT_MODEL_TYPES = ("clip", "clip_text_model", "t5", "umt5", "mt5")

#: official diffusers model ids (lower-case) -> their text encoder, known without any download
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
_TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "tokenizer.json", "spiece.model")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_CONFIG_BYTES = 1024 * 1024


class EncoderLoadError(FormatError):
    """The model has no usable text encoder / tokenizer (none, two, an architecture p2pz cannot
    run), or its files cannot be read or loaded. (`p2pz_directions.builder.encoders` raises it too.)"""


def _text_encoder_dir(path: Path) -> Path | None:
    if (path / "text_encoder" / "config.json").is_file():
        return path / "text_encoder"
    if (path / "config.json").is_file():
        return path
    return None


def _sha256_file(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(folder: Path) -> str:
    for name in _WEIGHT_FILES:
        f = folder / name
        if f.is_file():
            return _sha256_file(f)[:16]
    return hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:16]


def _read_config(data: bytes, where: str) -> dict[str, Any]:
    try:
        cfg = json.loads(data)
    except ValueError as e:
        raise EncoderLoadError(f"cannot read {where}: {e}") from None
    if not isinstance(cfg, dict):
        raise EncoderLoadError(f"{where} is not a JSON object")
    return cfg


def _check_model_index(index: dict[str, Any] | None, what: str) -> None:
    """A diffusers ``model_index.json``: refuse a pipeline without a text encoder, or with two."""
    if index is None:
        return
    if index.get("text_encoder_2") or index.get("text_encoder_3"):
        raise EncoderLoadError(
            f"{what} has two or more text encoders (text_encoder_2: an SDXL or SD3 pipeline); p2pz directions are "
            "made for one text encoder (Stable Diffusion 1.x / 2.x): use such a model, or name the encoder with "
            "encoder=..."
        )
    te = index.get("text_encoder", "absent")
    if te == "absent":
        return  # the text_encoder/ folder decides
    if not te or not isinstance(te, list) or te[0] is None:
        raise EncoderLoadError(
            f"{what} has no text encoder (model_index.json lists none): p2pz cannot embed captions for it. "
            "Use a Stable Diffusion model with a CLIP text encoder, or name one with encoder=..."
        )


def _identify(cfg: dict[str, Any], fingerprint, *, label: str | None, where: str) -> EncoderInfo:
    """The one identity rule (module docstring) for a text encoder's ``config.json``."""
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    mtype = str(cfg.get("model_type", ""))
    try:
        hidden = int(cfg.get("hidden_size") or cfg.get("d_model") or 0)
        max_len = int(cfg.get("max_position_embeddings", 77))
    except (TypeError, ValueError):
        hidden, max_len = 0, 0
    if hidden <= 0 or max_len <= 0:
        raise EncoderLoadError(f"{where} gives no hidden size / max length: not a text encoder config")
    named = str(cfg.get("_name_or_path", ""))
    known = KNOWN_ENCODERS.get(named)
    if known is not None and known.hidden_size == hidden:
        return known
    if mtype in ("clip", "clip_text_model"):
        for eid, sig in ENCODER_SIGNATURES.items():
            if all(cfg.get(k) == v for k, v in sig.items()):
                return KNOWN_ENCODERS[eid]
    fam = f"{mtype or 'text-encoder'}-d{hidden}"
    return EncoderInfo(f"local/{label or fam}-{fingerprint()}", hidden, fam, max_length=max_len)


def encoder_from_folder(folder: str | os.PathLike, *, label: str | None = None) -> EncoderInfo:
    """Identify the text encoder stored in ``folder`` (a diffusers model folder or a CLIP folder)."""
    path = Path(folder)
    if (path / "model_index.json").is_file():
        try:
            index = _read_config((path / "model_index.json").read_bytes(), str(path / "model_index.json"))
        except OSError:
            index = None
        _check_model_index(index, f"model {path}")
    te = _text_encoder_dir(path)
    if te is None:
        raise FormatError(
            f"{path} has no text encoder: expected {path}/text_encoder/config.json (a diffusers model) "
            f"or {path}/config.json (a CLIP text model)"
        )
    try:
        data = (te / "config.json").read_bytes()
    except OSError as e:
        raise FormatError(f"cannot read {te / 'config.json'}: {e}") from None
    cfg = _read_config(data, str(te / "config.json"))
    _check_architecture(cfg, str(path))
    return _identify(cfg, lambda: _fingerprint(te), label=label, where=str(te / "config.json"))


def _hub_error(repo_id: str, e: Exception) -> EncoderLoadError:
    """huggingface_hub's errors, said as what to do next (never showing a token)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return EncoderLoadError(
            f"model {repo_id} is gated: accept its terms on the Hub, then log in (`hf auth login` or HF_TOKEN)"
        )
    if isinstance(e, RepositoryNotFoundError):
        return EncoderLoadError(
            f"unknown model {repo_id!r}: the Hub has no such model repo (or it is private: log in with "
            "`hf auth login`). Check the id, or pass a local diffusers model folder"
        )
    if isinstance(e, RevisionNotFoundError):
        return EncoderLoadError(f"model {repo_id}: no such revision on the Hub")
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return EncoderLoadError(
            f"unknown model {repo_id!r}: its text_encoder/config.json is not in the Hugging Face cache and the "
            "Hub cannot be used (HF_HUB_OFFLINE=1, or no connection). Run once with network access (any p2pz "
            "command with --model, or `hf download` of the model), or pass a local diffusers model folder"
        )
    return EncoderLoadError(
        f"model {repo_id!r}: cannot read its text encoder config from the Hub ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). Check the id and your connection, or pass a local folder"
    )


def _hub_file(repo_id: str, filename: str, revision: str | None, *, optional: bool = False) -> Path | None:
    """One small file of a Hub model (downloaded into the HF cache, or from it offline); None when
    the repo has no such file. Offline, an ``optional`` file missing from the cache gives
    `_OFFLINE_UNKNOWN`: only the check it would feed is skipped."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError:
        if optional:
            return _OFFLINE_UNKNOWN
        raise
    except EntryNotFoundError:
        return None


#: an optional file that is not in the cache while offline: its checks are skipped
_OFFLINE_UNKNOWN = Path(os.devnull)


def _hub_fingerprint(repo_id: str, revision: str | None) -> str:
    """16 hex of the sha256 of the text encoder's weights file, as `_fingerprint` takes it of a
    folder: the Hub's sha256 of the LFS file (its ETag), else the file itself hashed."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    for name in _WEIGHT_FILES:
        path = f"text_encoder/{name}"
        if constants.HF_HUB_OFFLINE:
            cached = try_to_load_from_cache(repo_id, path, revision=revision)
            if isinstance(cached, str):
                return _sha256_file(Path(cached))[:16]
            continue
        try:
            meta = get_hf_file_metadata(hf_hub_url(repo_id, path, revision=revision))
        except EntryNotFoundError:
            continue
        etag = (meta.etag or "").lower()
        if _SHA256.match(etag):  # an LFS file: the Hub's ETag is the sha256 of its bytes
            return etag[:16]
        local = _hub_file(repo_id, path, revision)  # a small file kept in git: hash it
        if local is not None:
            return _sha256_file(local)[:16]
    config = _hub_file(repo_id, "text_encoder/config.json", revision)
    if config is None:
        raise EncoderLoadError(f"model {repo_id}: text_encoder/config.json went missing")
    return hashlib.sha256(config.read_bytes()).hexdigest()[:16]


def encoder_from_hub(repo_id: str, *, revision: str | None = None) -> EncoderInfo:
    """Identify the text encoder of the Hub model ``repo_id`` from its small files only
    (``model_index.json``, ``text_encoder/config.json``, the tokenizer's config), downloaded into
    the Hugging Face cache; offline (``HF_HUB_OFFLINE=1``) from the cache.

    >>> encoder_from_hub("stable-diffusion-v1-5/stable-diffusion-v1-5").id       # doctest: +SKIP
    'openai/clip-vit-large-patch14'

    The answer is remembered for this process (per endpoint, cache folder and offline mode).
    """
    from huggingface_hub import constants

    key = (constants.ENDPOINT, constants.HF_HUB_CACHE, bool(constants.HF_HUB_OFFLINE), repo_id, revision)
    if key not in _HUB_MEMO:
        _HUB_MEMO[key] = _encoder_from_hub(repo_id, revision)
    return _HUB_MEMO[key]


_HUB_MEMO: dict[tuple[Any, ...], EncoderInfo] = {}


def _encoder_from_hub(repo_id: str, revision: str | None) -> EncoderInfo:
    try:
        cfg_path = _hub_file(repo_id, "text_encoder/config.json", revision)
        index_path = _hub_file(repo_id, "model_index.json", revision, optional=True)
        index = None
        if index_path is not None and index_path != _OFFLINE_UNKNOWN:
            index = _read_config(_bounded(index_path), f"{repo_id}/model_index.json")
        _check_model_index(index, f"model {repo_id}")
        if cfg_path is None:
            raise EncoderLoadError(
                f"model {repo_id} has no text encoder (no text_encoder/config.json in the repo): p2pz cannot embed "
                "captions for it. Use a diffusers Stable Diffusion model (text_encoder/ and tokenizer/), or name "
                "the text encoder with encoder=..."
            )
        cfg = _read_config(_bounded(cfg_path), f"{repo_id}/text_encoder/config.json")
        _check_architecture(cfg, f"model {repo_id}")
        if not any(
            _hub_file(repo_id, f"tokenizer/{name}", revision, optional=True) for name in _TOKENIZER_FILES
        ):
            raise EncoderLoadError(
                f"model {repo_id} has a text_encoder/ but no tokenizer/ (tokenizer_config.json, vocab.json, "
                "tokenizer.json): both are needed to embed captions"
            )
        return _identify(
            cfg,
            lambda: _hub_fingerprint(repo_id, revision),
            label=None,
            where=f"{repo_id}/text_encoder/config.json",
        )
    except EncoderLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - every huggingface_hub / network error, said plainly
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        if isinstance(e, (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError)):
            raise _hub_error(repo_id, e) from None
        raise


def _bounded(path: Path) -> bytes:
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise EncoderLoadError(f"{path} is over {_MAX_CONFIG_BYTES} bytes: not a config file")
    return path.read_bytes()


def _check_architecture(cfg: dict[str, Any], what: str) -> None:
    inner = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    mtype = str(inner.get("model_type", ""))
    if mtype not in TEXT_MODEL_TYPES:
        raise EncoderLoadError(
            f"{what}: its text encoder is a {mtype or 'model of no stated type'!r} (architectures "
            f"{cfg.get('architectures')}), not one p2pz can run ({', '.join(TEXT_MODEL_TYPES)}). Use a Stable "
            "Diffusion model with a CLIP text encoder, or name a supported encoder with encoder=..."
        )


def _looks_like_hub_id(key: str) -> bool:
    parts = key.split("/")
    return len(parts) == 2 and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", p) for p in parts)


def encoder_for(
    model: str | os.PathLike | None = None, encoder: str | os.PathLike | None = None
) -> EncoderInfo:
    """The text encoder for a diffusers model id/path (``model=``) or an encoder id/path (``encoder=``).

    A model id is resolved from the model's own ``text_encoder/config.json`` on the Hub (see the
    module docstring); the official SD 1.x / 2.x ids need no download.
    """
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
    if low.startswith("local/") or not _looks_like_hub_id(key):
        raise FormatError(
            f"unknown model {key!r}: not a local folder and not a Hub model id ('owner/name'). Pass a local path "
            "to a diffusers model folder, a Hub model id, or name the encoder with encoder=..."
        )
    return encoder_from_hub(key)


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
