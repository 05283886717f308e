"""Images to model pixels the way the models' own image processors do it, without their classes.

The numbers follow the model folder's ``preprocessor_config.json`` (resize, center crop, mean,
std, resample) when it has one, else the defaults of the model family. Doing it here keeps the
scorers independent of which image-processor backend a transformers install picks (PIL or
torchvision), and lets them run on whatever device the model is on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from p2pz_directions.core import constants

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def as_pil(img: Any) -> Image.Image:
    """A PIL RGB image from PIL (any mode), an ``HxWxC`` array (uint8, or float in 0..1) or a
    ``CxHxW`` / ``HxWxC`` tensor in 0..1."""
    from p2pz_directions.editing.images import to_rgb

    if isinstance(img, Image.Image):
        return to_rgb(img)
    if isinstance(img, torch.Tensor):
        t = img.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        img = t.numpy()
    arr = np.asarray(img)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return to_rgb(Image.fromarray(arr))


def read_preprocessor_config(model: str, revision: str | None = None) -> dict[str, Any]:
    """The model's ``preprocessor_config.json`` (a folder or a Hub id; {} when it has none)."""
    path = Path(model) / "preprocessor_config.json"
    try:
        if not path.is_file():
            if Path(model).is_dir():
                return {}
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "preprocessor_config.json", revision=revision))
        data = json.loads(path.read_text("utf-8"))
        return data if isinstance(data, dict) else {}
    except Exception:  # noqa: BLE001 - no processor config: the family defaults apply
        return {}


def _hw(size: Any, default: int) -> tuple[int | None, int | None, int | None]:
    """(height, width, shortest_edge) from a processor ``size`` entry."""
    if isinstance(size, int):
        return None, None, size
    if isinstance(size, dict):
        if "shortest_edge" in size:
            return None, None, int(size["shortest_edge"])
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"]), None
    return None, None, default


class Preprocess:
    """``Preprocess.from_config(cfg, family)(images) -> [B, 3, H, W]`` float tensor."""

    def __init__(
        self,
        *,
        height: int | None,
        width: int | None,
        shortest_edge: int | None,
        crop: tuple[int, int] | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        resample: int,
    ) -> None:
        self.height, self.width, self.shortest_edge = height, width, shortest_edge
        self.crop, self.mean, self.std, self.resample = crop, mean, std, resample

    @classmethod
    def from_config(cls, cfg: dict[str, Any], family: str, image_size: int) -> Preprocess:
        """``family`` "clip" (shortest edge + center crop, CLIP mean/std, bicubic) or "vit" (square resize,
        ImageNet mean/std, bilinear) gives the defaults; the config's own fields win."""
        clip = family == "clip"
        h, w, se = _hw(cfg.get("size"), image_size)
        if h is None and se is not None and not clip and not cfg.get("do_center_crop"):
            h = w = se
            se = None
        crop = None
        if cfg.get("do_center_crop", clip):
            ch, cw, cse = _hw(cfg.get("crop_size"), image_size)
            crop = (ch, cw) if ch is not None else (cse, cse)
        mean = tuple(cfg.get("image_mean") or (CLIP_MEAN if clip else IMAGENET_MEAN))
        std = tuple(cfg.get("image_std") or (CLIP_STD if clip else IMAGENET_STD))
        resample = int(cfg.get("resample", 3 if clip else 2))
        return cls(height=h, width=w, shortest_edge=se, crop=crop, mean=mean, std=std, resample=resample)

    def one(self, img: Any) -> torch.Tensor:
        im = as_pil(img)
        if self.shortest_edge is not None:
            w, h = im.size
            s = self.shortest_edge
            nw, nh = (s, max(1, round(h * s / w))) if w <= h else (max(1, round(w * s / h)), s)
            im = im.resize((nw, nh), resample=self.resample)
        elif self.height is not None and self.width is not None:
            im = im.resize((self.width, self.height), resample=self.resample)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = im.size
            left, top = (w - cw) // 2, (h - ch) // 2
            im = im.crop((left, top, left + cw, top + ch))
        arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (arr - mean) / std

    def __call__(self, images: list[Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.stack([self.one(im) for im in images]).to(device=device, dtype=dtype)


def model_config(model: str, what: str, expected: str, revision: str | None = None) -> Any:
    """The transformers config of ``model``, read before any weights; clear errors for a missing model."""
    from transformers import AutoConfig

    from p2pz_directions.eval.scorers import ScorerModelError

    try:
        return AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as e:
        offline = constants.hf_offline()
        raise ScorerModelError(
            f"cannot load the {what} model {model!r} ({' '.join(str(e).split())[:200]}). Give a Hub id or a local "
            f"folder of {expected}; offline (HF_HUB_OFFLINE={int(offline)}) the model must already be in the "
            "Hugging Face cache"
        ) from None
