"""Images in, images out: what a user hands us becomes what a Stable Diffusion VAE takes, losing nothing.

Three kinds of input, with diffusers' own conventions (``PipelineImageInput``), so that an image
given to an editor is exactly the image given to the matching diffusers pipeline:

- **PIL images and files.** Any PIL mode (RGBA, LA, palette ``P`` with or without transparency,
  grayscale ``L``, ``I;16``, CMYK, ...) becomes RGB; transparent pixels are laid on white, so a
  cut-out keeps its outline. Files are opened as diffusers' ``load_image`` opens them (EXIF
  orientation applied: a phone photo taken upright comes out upright) with our `to_rgb`. A side that
  is not a multiple of 8 (the VAE's downscale factor for SD) is resized down to the nearest multiple
  by ``VaeImageProcessor``'s rule and Lanczos resampler, and the change is said (an
  `ImageResizedWarning` and a note returned to the caller).
- **numpy arrays** ``[H, W]``, ``[H, W, C]`` or ``[N, H, W, C]``, floats in 0..1 (or ``uint8``
  0..255, turned into the same floats ``VaeImageProcessor.pil_to_numpy`` makes). Kept at full
  precision, never rounded through 8 bits.
- **torch tensors** ``[C, H, W]`` or ``[N, C, H, W]``, in 0..1 or -1..1 (diffusers' two value
  ranges), kept as they are; a 4-channel tensor is taken as VAE latents, as diffusers does.

A list of any one kind is a batch. `prepare_image` checks the input and puts it in that form;
`to_pixels` then runs ``VaeImageProcessor.preprocess`` on it (the pipelines' own step, through
`p2pz_directions.lean.pixels.PixelProcessor`, which computes it without importing diffusers),
giving ``[N, 3, H, W]`` in -1..1. Bad input is an `ImageError` that says what was wrong.

>>> from p2pz_directions.editing.images import load_image, prepare_image, to_pixels
>>> img = load_image("cat.png")                     # doctest: +SKIP
>>> images, note = prepare_image([img, img])        # doctest: +SKIP
>>> to_pixels(images).shape                         # doctest: +SKIP
torch.Size([2, 3, 512, 512])
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from p2pz_directions.core.errors import P2PZError

__all__ = [
    "ImageError",
    "ImageResizedWarning",
    "fit_to_multiple",
    "image_size",
    "is_latents",
    "load_image",
    "num_images",
    "open_image",
    "prepare_image",
    "side_by_side",
    "to_pixels",
    "to_rgb",
]

#: what `prepare_image` returns: one PIL image, a list of them, a float numpy batch or a torch batch
PreparedImage = Any


class ImageError(P2PZError, ValueError):
    """The input is not an image we can read."""


class ImageResizedWarning(UserWarning):
    """An input image was resized to a size the model accepts."""


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on ``background`` (white)."""
    # Kept instead of diffusers' ``image.convert("RGB")`` (its load_image default; we hand this to it
    # as ``convert_method``). Measured on a 16x16 cut-out PNG (transparent black around a red square):
    # convert("RGB") makes the transparent pixels black, this makes them white; on a 16-bit grayscale
    # gradient (PNG ``I;16``) convert("RGB") keeps 2 levels (99.6 % of pixels white), this keeps 256.
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


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied (as diffusers' ``load_image``).

    >>> open_image("phone-photo.jpg").size          # doctest: +SKIP
    (3024, 4032)
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image file")
    # as diffusers' ``load_image`` does (EXIF orientation, then the conversion), with our `to_rgb`;
    # written here so that opening a photo does not import diffusers
    try:
        with Image.open(path) as im:  # opened and closed here: nothing is left open
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except UnidentifiedImageError:
        head = path.read_bytes()[:64]
        kind = "a text file" if _looks_like_text(head) else "not an image format Pillow can read"
        raise ImageError(
            f"{path} is not an image ({kind}); give a PNG, JPEG, WebP or another format Pillow reads"
        ) from None
    except OSError as e:
        raise ImageError(f"cannot read image {path}: {e} (the file may be truncated or damaged)") from None


def load_image(src: Any) -> Image.Image:
    """``src`` as one RGB PIL image (for display and saving; editors take `prepare_image`'s form).

    ``src`` may be a path (EXIF orientation applied), a PIL image, a ``[H, W]`` / ``[H, W, C]``
    uint8 or float (0..1) numpy array, or a ``[C, H, W]`` / ``[1, C, H, W]`` torch tensor in 0..1.

    >>> load_image("photo.png").mode                # doctest: +SKIP
    'RGB'
    """
    if isinstance(src, Image.Image):
        return to_rgb(src)
    if isinstance(src, (str, os.PathLike)):
        return open_image(src)
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
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ImageError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4]; got {list(src.shape)}")
        if arr.dtype == np.uint8:
            return to_rgb(Image.fromarray(arr))
        from p2pz_directions.lean.pixels import PixelProcessor

        # floats in 0..1 to 8 bits as the pipelines' ``output_type="pil"`` does (x * 255, rounded);
        # clipped first: diffusers' cast would wrap 1.01 around to 2
        batch = np.clip(arr.astype(np.float64), 0.0, 1.0)
        batch = batch[None, :, :, None] if batch.ndim == 2 else batch[None]
        return to_rgb(PixelProcessor.numpy_to_pil(batch)[0])
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

    >>> im, note = fit_to_multiple(Image.new("RGB", (515, 300)), warn=False)
    >>> im.size, note
    ((512, 296), 'resized 515x300 -> 512x296 (sides must be multiples of 8)')
    """
    from p2pz_directions.lean.pixels import PixelProcessor

    w, h = img.size
    _floor_size(w, h, multiple)  # a side below ``multiple`` is an ImageError, not a 0-pixel image
    proc = PixelProcessor(vae_scale_factor=multiple)  # the pipelines' own rule and resampler
    nh, nw = proc.get_default_height_width(img)
    if (nw, nh) == (w, h):
        return img, None
    note = f"resized {w}x{h} -> {nw}x{nh} (sides must be multiples of {multiple})"
    if warn:
        warnings.warn(note, ImageResizedWarning, stacklevel=2)
    return proc.resize(img, nh, nw), note


def _floor_size(w: int, h: int, multiple: int) -> tuple[int, int]:
    nw, nh = w - w % multiple, h - h % multiple
    if nw == 0 or nh == 0:
        raise ImageError(f"image is {w}x{h}; each side must be at least {multiple} pixels")
    return nw, nh


# ---------------------------------------------------------------------------------------------------
# full-precision inputs: what the editors take
# ---------------------------------------------------------------------------------------------------
def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _kind(x: Any) -> str:
    if isinstance(x, (Image.Image, str, os.PathLike)):
        return "pil"
    if isinstance(x, np.ndarray):
        return "np"
    if _is_tensor(x):
        return "pt"
    raise ImageError(
        f"cannot use a {type(x).__name__} as an image; give a path, PIL image, numpy array (0..1) or "
        f"torch tensor (0..1 or -1..1), or a list of one of these"
    )


def _prepare_array(arr: np.ndarray, notes: list[str]) -> np.ndarray:
    """A numpy image or batch as ``[N, H, W, 3]`` floats in 0..1 (uint8 divided by 255, as diffusers)."""
    shape = list(arr.shape)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype == bool or not np.issubdtype(arr.dtype, np.floating):
        raise ImageError(f"a numpy image must hold floats in 0..1 or uint8 0..255, not {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None] if arr.shape[-1] in (1, 3, 4) else arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        hint = (
            " (numpy images are channels-last: [H, W, C])" if len(shape) >= 3 and shape[-3] in (1, 3) else ""
        )
        raise ImageError(
            f"a numpy image must be [H, W], [H, W, C] or [N, H, W, C] with C = 1, 3 or 4; got {shape}{hint}"
        )
    if not np.isfinite(arr).all():
        raise ImageError("the numpy image holds NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        hint = " (a -1..1 image: pass (x + 1) / 2)" if lo >= -1.0 and hi <= 1.0 else ""
        raise ImageError(
            f"numpy images hold values in 0..1 (diffusers' convention); got {lo:g}..{hi:g}{hint}"
        )
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
        notes.append("grayscale array repeated to 3 channels")
    elif arr.shape[-1] == 4:
        alpha = arr[..., 3:]
        arr = arr[..., :3] * alpha + (1.0 - alpha)
        notes.append("RGBA array laid on white (alpha dropped)")
    return arr


def _prepare_tensor(t: Any, notes: list[str]) -> Any:
    """A torch image or batch as ``[N, 3, H, W]`` (values kept: 0..1 or -1..1), or latents ``[N, 4, h, w]``."""
    import torch

    t = t.detach()
    shape = list(t.shape)
    if not (t.is_floating_point()):
        raise ImageError(f"a torch image must hold floats (0..1 or -1..1), not {t.dtype}")
    if t.dim() == 2:
        t = t[None, None]
    elif t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[1] not in (1, 3, 4):
        hint = ""
        if len(shape) in (3, 4) and shape[-1] in (1, 3, 4):
            hint = " (torch images are channels-first: use t.permute(2, 0, 1) on an [H, W, C] tensor)"
        raise ImageError(
            f"a torch image must be [C, H, W] or [N, C, H, W] with C = 1 or 3 (4: VAE latents); got {shape}{hint}"
        )
    if not torch.isfinite(t).all():
        raise ImageError("the image tensor holds NaN or infinite values")
    if t.shape[1] == 4:
        return t  # VAE latents, as diffusers takes them
    lo, hi = float(t.min()), float(t.max())
    if lo < -1.0 or hi > 1.0:
        raise ImageError(
            f"torch images hold values in 0..1 or -1..1 (diffusers' conventions); got {lo:g}..{hi:g}"
        )
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
        notes.append("grayscale tensor repeated to 3 channels")
    return t


def prepare_image(src: Any, multiple: int = 8, *, warn: bool = True) -> tuple[PreparedImage, str | None]:
    """Check an input image (or a list: a batch) and put it in the form the editors take, losing nothing.

    Returns ``(images, note)``; ``note`` says what was converted or resized (None when nothing was):

    - a path or PIL image: an RGB PIL image (files with EXIF orientation applied), sides floored to
      ``multiple`` (Lanczos, as diffusers); a list of them: a list of PIL images (the first fitted;
      the others are resized to its size by `to_pixels`, as diffusers does);
    - numpy (``[H, W]``, ``[H, W, C]``, ``[N, H, W, C]``, lists of them): one ``[N, H, W, 3]`` float
      array in 0..1, the input's own float precision kept (uint8 is divided by 255);
    - torch (``[C, H, W]``, ``[N, C, H, W]``, lists of them): one ``[N, 3, H, W]`` tensor with the
      input's values and dtype (0..1 or -1..1); 4 channels are VAE latents, passed through.

    Arrays and tensors whose sides are not multiples of ``multiple`` are resized by `to_pixels`
    (diffusers' ``VaeImageProcessor``), which the note says.

    >>> images, note = prepare_image(np.zeros((32, 32, 3)))
    >>> images.shape, images.dtype, note
    ((1, 32, 32, 3), dtype('float64'), None)
    """
    items = list(src) if isinstance(src, (list, tuple)) else [src]
    if not items:
        raise ImageError("got an empty list of images; give at least one")
    kinds = {_kind(x) for x in items}
    if len(kinds) > 1:
        raise ImageError(
            "a batch of images must be of one kind (all PIL images/paths, all numpy arrays or all torch "
            f"tensors); got {' and '.join(sorted(kinds))}"
        )
    kind = kinds.pop()
    notes: list[str] = []
    if kind == "pil":
        out = [load_image(x) for x in items]
        out[0], note = fit_to_multiple(out[0], multiple, warn=warn)
        if note:
            notes.append(note)
        for i, im in enumerate(out[1:], 1):
            if im.size != out[0].size:
                notes.append(
                    f"image {i} resized {im.size[0]}x{im.size[1]} -> {out[0].size[0]}x{out[0].size[1]} "
                    f"(the first image's size)"
                )
        result: Any = out if isinstance(src, (list, tuple)) else out[0]
    elif kind == "np":
        parts = [_prepare_array(np.asarray(x), notes) for x in items]
        _same_shape([p.shape[1:3] for p in parts])
        result = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        h, w = result.shape[1:3]
        _note_resize(w, h, multiple, notes, warn)
    else:
        import torch

        parts = [_prepare_tensor(x, notes) for x in items]
        _same_shape([tuple(p.shape[1:]) for p in parts])
        result = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if result.shape[1] != 4:
            h, w = result.shape[2:]
            _note_resize(w, h, multiple, notes, warn)
    notes = list(dict.fromkeys(notes))
    return result, ("; ".join(notes) if notes else None)


def _same_shape(shapes: list[tuple[int, ...]]) -> None:
    if len(set(shapes)) > 1:
        raise ImageError(
            f"the images of a batch of arrays or tensors must all have one size; got {sorted(set(shapes))}. "
            f"Resize them first, or pass PIL images (resized to the first one's size)"
        )


def _note_resize(w: int, h: int, multiple: int, notes: list[str], warn: bool) -> None:
    nw, nh = _floor_size(w, h, multiple)
    if (nw, nh) != (w, h):
        note = f"resized {w}x{h} -> {nw}x{nh} (sides must be multiples of {multiple})"
        notes.append(note)
        if warn:
            warnings.warn(note, ImageResizedWarning, stacklevel=3)


def num_images(images: PreparedImage) -> int:
    """How many images `prepare_image`'s result holds."""
    if isinstance(images, list):
        return len(images)
    if isinstance(images, Image.Image):
        return 1
    return int(images.shape[0])


def is_latents(images: PreparedImage) -> bool:
    """Whether `prepare_image`'s result is a batch of VAE latents (a 4-channel tensor)."""
    return _is_tensor(images) and images.dim() == 4 and images.shape[1] == 4


def image_size(images: PreparedImage, multiple: int = 8) -> tuple[int, int]:
    """``(W, H)`` of the pixels `to_pixels` makes of ``images`` (latents: their size times ``multiple``)."""
    if isinstance(images, list):
        images = images[0]
    if isinstance(images, Image.Image):
        w, h = images.size
    elif isinstance(images, np.ndarray):
        h, w = images.shape[1:3]
    elif is_latents(images):
        return int(images.shape[3]) * multiple, int(images.shape[2]) * multiple
    else:
        h, w = images.shape[2:]
    return _floor_size(int(w), int(h), multiple)


def to_pixels(
    images: PreparedImage, vae_scale_factor: int = 8, *, height: int | None = None, width: int | None = None
):
    """``[N, 3, H, W]`` in -1..1 (or latents as given) by diffusers' ``VaeImageProcessor.preprocess``.

    The pipelines' own preprocessing step, on `prepare_image`'s result: the same input gives the
    same tensor, bit for bit. (diffusers warns that -1..1 tensors are deprecated; we take them.)

    >>> to_pixels(np.ones((1, 16, 16, 3))).unique().tolist()
    [1.0]
    """
    from p2pz_directions.lean.pixels import PixelProcessor

    if isinstance(images, (str, os.PathLike)) or (isinstance(images, Image.Image) and images.mode != "RGB"):
        images, _ = prepare_image(images, vae_scale_factor, warn=False)
    proc = PixelProcessor(vae_scale_factor=vae_scale_factor)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*value range in \[-1,1\] is deprecated", category=FutureWarning
        )
        return proc.preprocess(images, height=height, width=width)


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
