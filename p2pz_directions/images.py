"""Images in, images out: any mode or size a user hands us becomes what a Stable Diffusion VAE takes.

- Any PIL mode (RGBA, LA, palette ``P`` with or without transparency, grayscale ``L``, ``I;16``,
  CMYK, ...) becomes RGB. Transparent pixels are laid on white, so a cut-out keeps its outline.
- A width or height that is not a multiple of 8 (the VAE's downscale factor for SD) is resized
  down to the nearest multiple, with Lanczos as diffusers' ``VaeImageProcessor`` does, and the
  change is said (a `ImageResizedWarning` and a note returned to the caller).
- A file that is not an image gives an `ImageError` that names the file and what it is instead.

>>> from p2pz_directions.images import load_image, fit_to_multiple
>>> img = load_image("cat.png")                 # doctest: +SKIP
>>> img, note = fit_to_multiple(img, 8)          # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import P2PZError

__all__ = [
    "ImageError",
    "ImageResizedWarning",
    "load_image",
    "to_rgb",
    "fit_to_multiple",
    "prepare_image",
    "side_by_side",
]


class ImageError(P2PZError, ValueError):
    """The input is not an image we can read."""


class ImageResizedWarning(UserWarning):
    """An input image was resized to a size the model accepts."""


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on ``background`` (white)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # wide grayscale: scale to 8 bit by the range of the type, not by clipping
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            top = 1.0 if arr.max() <= 1.0 else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(src: Any) -> Image.Image:
    """Load ``src`` as an RGB PIL image.

    ``src`` may be a path, a PIL image, a ``[H, W]`` / ``[H, W, C]`` uint8 or float (0..1) numpy
    array, or a ``[C, H, W]`` / ``[1, C, H, W]`` torch tensor in 0..1.

    >>> load_image("photo.png").mode                # doctest: +SKIP
    'RGB'
    """
    if isinstance(src, Image.Image):
        return to_rgb(src)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise ImageError(f"image file not found: {path}")
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image file")
        try:
            with Image.open(path) as im:
                im.load()
                return to_rgb(im)
        except UnidentifiedImageError:
            head = path.read_bytes()[:64]
            kind = "a text file" if _looks_like_text(head) else "not an image format Pillow can read"
            raise ImageError(
                f"{path} is not an image ({kind}); give a PNG, JPEG, WebP or another format Pillow reads"
            ) from None
        except OSError as e:
            raise ImageError(
                f"cannot read image {path}: {e} (the file may be truncated or damaged)"
            ) from None
    try:
        import torch

        if isinstance(src, torch.Tensor):
            t = src.detach().cpu().float()
            if t.dim() == 4 and t.shape[0] == 1:
                t = t[0]
            if t.dim() == 3 and t.shape[0] in (1, 3, 4):
                t = t.permute(1, 2, 0)
            src = t.numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(src, np.ndarray):
        arr = src
        if arr.dtype != np.uint8:
            arr = np.clip(arr.astype(np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ImageError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4]; got {list(src.shape)}")
        return to_rgb(Image.fromarray(arr))
    raise ImageError(
        f"cannot use a {type(src).__name__} as an image; give a path, PIL image, array or tensor"
    )


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return True
    text = head.decode("utf-8", errors="ignore")  # a character cut at the end is dropped
    if len(text.encode("utf-8")) < len(head) - 3:
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def fit_to_multiple(
    img: Image.Image, multiple: int = 8, *, warn: bool = True
) -> tuple[Image.Image, str | None]:
    """Resize ``img`` down to the nearest multiple of ``multiple`` on each side.

    Returns the image and a note (``None`` when nothing changed). The rule is diffusers'
    ``VaeImageProcessor``'s (floor to a multiple, Lanczos), so our input equals the pipeline's.

    >>> im, note = fit_to_multiple(Image.new("RGB", (515, 300)))   # doctest: +SKIP
    >>> im.size, note                                              # doctest: +SKIP
    ((512, 296), 'resized 515x300 -> 512x296 (sides must be multiples of 8)')
    """
    w, h = img.size
    nw, nh = w - w % multiple, h - h % multiple
    if nw == 0 or nh == 0:
        raise ImageError(f"image is {w}x{h}; each side must be at least {multiple} pixels")
    if (nw, nh) == (w, h):
        return img, None
    note = f"resized {w}x{h} -> {nw}x{nh} (sides must be multiples of {multiple})"
    if warn:
        warnings.warn(note, ImageResizedWarning, stacklevel=2)
    return img.resize((nw, nh), resample=Image.Resampling.LANCZOS), note


def prepare_image(src: Any, multiple: int = 8, *, warn: bool = True) -> tuple[Image.Image, str | None]:
    """`load_image` then `fit_to_multiple`: an RGB image the VAE takes, and a note if it was resized."""
    return fit_to_multiple(load_image(src), multiple, warn=warn)


def side_by_side(
    images: list[Image.Image], gap: int = 4, background: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Paste images left to right (scaled to the first one's height), for ``--compare``."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    h = images[0].height
    scaled = [
        im if im.height == h else im.resize((max(1, round(im.width * h / im.height)), h)) for im in images
    ]
    width = sum(im.width for im in scaled) + gap * (len(scaled) - 1)
    out = Image.new("RGB", (width, h), background)
    x = 0
    for im in scaled:
        out.paste(to_rgb(im), (x, 0))
        x += im.width + gap
    return out
