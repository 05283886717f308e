"""Tiny random-weight scorer models (CLIP, DINO ViT) for tests and ``bench_eval.py --tiny``.

They are saved with ``save_pretrained`` and loaded back by the scorers through the real
``from_pretrained``, so the loading path is the one real models take.

>>> from p2pz_directions.eval.tiny import make_tiny_clip, make_tiny_dino
>>> clip_dir = make_tiny_clip("/tmp/tiny-clip")            # doctest: +SKIP
>>> dino_dir = make_tiny_dino("/tmp/tiny-dino")            # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def make_tiny_clip(path: str | os.PathLike, *, image_size: int = 32, hidden: int = 32, seed: int = 0) -> Path:
    """A CLIPModel (both towers, width ``hidden``, 2 layers) with a character-level CLIP tokenizer
    and a CLIP ``preprocessor_config.json``, saved to ``path``."""
    from transformers import CLIPConfig, CLIPModel

    from p2pz_directions.editing.demo import make_tokenizer

    path = Path(path)
    tok = make_tokenizer(path)
    torch.manual_seed(seed)
    text = {
        "hidden_size": hidden,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": len(tok),
        "max_position_embeddings": 77,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    }
    vision = {
        "hidden_size": hidden,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "image_size": image_size,
        "patch_size": 8,
    }
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden)
    CLIPModel(cfg).eval().save_pretrained(str(path))
    _processor(path, "CLIPImageProcessor", image_size, crop=True)
    return path


def make_tiny_dino(path: str | os.PathLike, *, image_size: int = 32, hidden: int = 32, seed: int = 0) -> Path:
    """A ViTModel (patch 8, 2 layers, width ``hidden``) with a ViT ``preprocessor_config.json``."""
    from transformers import ViTConfig, ViTModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=image_size,
        patch_size=8,
        qkv_bias=True,
    )
    ViTModel(cfg, add_pooling_layer=False).eval().save_pretrained(str(path))
    _processor(path, "ViTImageProcessor", image_size, crop=False)
    return path


def _processor(path: Path, cls: str, size: int, *, crop: bool) -> None:
    if crop:
        cfg = {
            "image_processor_type": cls,
            "do_resize": True,
            "size": {"shortest_edge": size},
            "do_center_crop": True,
            "crop_size": {"height": size, "width": size},
            "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
        }
    else:
        cfg = {
            "image_processor_type": cls,
            "do_resize": True,
            "size": {"height": size, "width": size},
            "do_normalize": True,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
            "resample": 2,
        }
    (path / "preprocessor_config.json").write_text(json.dumps(cfg, indent=1), "utf-8")
