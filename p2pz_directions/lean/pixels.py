"""`PixelProcessor`: what the SD pipelines' ``VaeImageProcessor`` does to images, without diffusers.

The default ``VaeImageProcessor(vae_scale_factor=f)`` (resize to a multiple of ``f`` with Lanczos,
``x / 255``, ``2x - 1``; back: ``(x * 0.5 + 0.5).clamp(0, 1)``, ``round(x * 255)``) for the inputs
our editors see: RGB PIL images (one or a list), float numpy arrays (HWC / NHWC) and torch tensors
(CHW / NCHW), with the same deprecation warning for -1..1 tensors. Any other input (a list of 4-D
arrays, grayscale or RGBA pictures, other resize modes) goes to diffusers' own class, so every
input gives diffusers' answer; tests/test_lean_models.py holds the two bit-equal.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["PixelProcessor"]


class PixelProcessor:
    """The default ``VaeImageProcessor`` of a VAE that downsamples ``vae_scale_factor`` times."""

    def __init__(self, vae_scale_factor: int = 8, vae_latent_channels: int = 4):
        self.vae_scale_factor = int(vae_scale_factor)
        self.vae_latent_channels = int(vae_latent_channels)
        self._diffusers: Any = None

    def diffusers(self) -> Any:
        """diffusers' ``VaeImageProcessor`` of the same settings (for the inputs not handled here)."""
        if self._diffusers is None:
            from diffusers.image_processor import VaeImageProcessor

            self._diffusers = VaeImageProcessor(
                vae_scale_factor=self.vae_scale_factor, vae_latent_channels=self.vae_latent_channels
            )
        return self._diffusers

    # -- the conversions -------------------------------------------------------------------------
    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
        if images.ndim == 3:
            images = images[None, ...]
        images = (images * 255).round().astype("uint8")
        if images.shape[-1] == 1:
            return [Image.fromarray(im.squeeze(), mode="L") for im in images]
        return [Image.fromarray(im) for im in images]

    @staticmethod
    def pil_to_numpy(images: list[Image.Image] | Image.Image) -> np.ndarray:
        if not isinstance(images, list):
            images = [images]
        return np.stack([np.array(im).astype(np.float32) / 255.0 for im in images], axis=0)

    @staticmethod
    def numpy_to_pt(images: np.ndarray) -> torch.Tensor:
        if images.ndim == 3:
            images = images[..., None]
        return torch.from_numpy(images.transpose(0, 3, 1, 2))

    @staticmethod
    def pt_to_numpy(images: torch.Tensor) -> np.ndarray:
        return images.cpu().permute(0, 2, 3, 1).float().numpy()

    def get_default_height_width(
        self, image: Any, height: int | None = None, width: int | None = None
    ) -> tuple[int, int]:
        if height is None:
            height = (
                image.height
                if isinstance(image, Image.Image)
                else image.shape[2 if torch.is_tensor(image) else 1]
            )
        if width is None:
            width = (
                image.width
                if isinstance(image, Image.Image)
                else image.shape[3 if torch.is_tensor(image) else 2]
            )
        f = self.vae_scale_factor
        return height - height % f, width - width % f

    def resize(self, image: Any, height: int, width: int, resize_mode: str = "default") -> Any:
        if resize_mode != "default":
            return self.diffusers().resize(image, height, width, resize_mode=resize_mode)
        if isinstance(image, Image.Image):
            return image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
        if isinstance(image, torch.Tensor):
            return torch.nn.functional.interpolate(image, size=(height, width))
        return self.pt_to_numpy(
            torch.nn.functional.interpolate(self.numpy_to_pt(image), size=(height, width))
        )

    # -- preprocess / postprocess ----------------------------------------------------------------
    def preprocess(
        self,
        image: Any,
        height: int | None = None,
        width: int | None = None,
        resize_mode: str = "default",
        crops_coords: Any = None,
    ) -> torch.Tensor:
        """``[B, C, H, W]`` float in -1..1, as ``VaeImageProcessor.preprocess``."""
        items = image if isinstance(image, list) else [image]
        if not self._handled(items) or resize_mode != "default" or crops_coords is not None:
            return self.diffusers().preprocess(
                image, height, width, resize_mode=resize_mode, crops_coords=crops_coords
            )
        first = items[0]
        if isinstance(first, Image.Image):
            height, width = self.get_default_height_width(first, height, width)
            pixels = self.numpy_to_pt(self.pil_to_numpy([self.resize(i, height, width) for i in items]))
        elif isinstance(first, np.ndarray):
            arr = np.concatenate(items, axis=0) if first.ndim == 4 else np.stack(items, axis=0)
            pixels = self.numpy_to_pt(arr)
            height, width = self.get_default_height_width(pixels, height, width)
            pixels = self.resize(pixels, height, width)
        else:
            pixels = torch.cat(items, axis=0) if first.ndim == 4 else torch.stack(items, axis=0)
            if pixels.shape[1] == self.vae_latent_channels:
                return pixels
            height, width = self.get_default_height_width(pixels, height, width)
            pixels = self.resize(pixels, height, width)
        if pixels.min() < 0:
            warnings.warn(
                "Passing `image` as torch tensor with value range in [-1,1] is deprecated. The expected value range "
                "for image tensor is [0,1] when passing as pytorch tensor or numpy Array. You passed `image` with "
                f"value range [{pixels.min()},{pixels.max()}]",
                FutureWarning,
                stacklevel=2,
            )
            return pixels
        return 2.0 * pixels - 1.0

    @staticmethod
    def _handled(items: list[Any]) -> bool:
        if not items:
            return False
        if all(isinstance(i, Image.Image) and i.mode == "RGB" for i in items):
            return True
        if all(isinstance(i, np.ndarray) and i.ndim == 3 and i.shape[-1] == 3 for i in items):
            return True  # HWC colour arrays (4-D ones in a list are deprecated in diffusers: its class)
        if (
            len(items) == 1
            and isinstance(items[0], np.ndarray)
            and items[0].ndim == 4
            and items[0].shape[-1] == 3
        ):
            return True
        return all(isinstance(i, torch.Tensor) and i.ndim == 3 and i.shape[0] in (3, 4) for i in items) or (
            len(items) == 1 and isinstance(items[0], torch.Tensor) and items[0].ndim == 4
        )

    def postprocess(self, image: torch.Tensor, output_type: str = "pil", do_denormalize: Any = None) -> Any:
        """A ``[B, C, H, W]`` tensor in -1..1 as ``output_type`` (``pil``, ``np``, ``pt``, ``latent``)."""
        if (
            not isinstance(image, torch.Tensor)
            or output_type not in ("latent", "pt", "np", "pil")
            or do_denormalize
        ):
            return self.diffusers().postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        if output_type == "latent":
            return image
        image = (image * 0.5 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        arr = self.pt_to_numpy(image)
        return arr if output_type == "np" else self.numpy_to_pil(arr)
