"""Images to latents and back, noise, and what a UNet output stands for (diffusers' conventions).

>>> from p2pz_directions.sampling import make_generator, randn
>>> x = randn((1, 4, 8, 8), make_generator(0), torch.device("cpu"), torch.float32)
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "decode_latents",
    "encode_image",
    "epsilon_from_output",
    "image_processor",
    "make_generator",
    "postprocess_images",
    "preprocess_images",
    "randn",
    "retrieve_latents",
    "vae_scale_factor",
]


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A ``torch.Generator`` seeded with ``seed`` (None for no seed; CPU by default, as diffusers advises)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def randn(
    shape: tuple[int, ...], generator: Any, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Gaussian noise as diffusers' ``randn_tensor`` draws it: on the generator's device (a CPU
    generator for a CUDA tensor draws on the CPU, then moves), a list of generators one row each.
    (Written here so that drawing noise does not import diffusers; tests/test_sampling.py holds
    it equal to ``randn_tensor``.)"""
    device = torch.device(device)
    rand_device: torch.device | str = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = "cpu"
        elif gen_type != device.type and gen_type == "cuda":
            raise ValueError(f"cannot draw a {device} tensor from a generator on {gen_type}")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        row = (1, *shape[1:])
        rows = [
            torch.randn(row, generator=generator[i], device=rand_device, dtype=dtype) for i in range(shape[0])
        ]
        return torch.cat(rows, dim=0).to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def vae_scale_factor(vae: Any) -> int:
    """How much the VAE downsamples: ``2 ** (len(block_out_channels) - 1)`` (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def image_processor(vae: Any) -> Any:
    """The SD pipelines' ``VaeImageProcessor(vae_scale_factor=...)`` for ``vae``: p2pz's
    `PixelProcessor`, which does what it does without importing diffusers (and hands the inputs it
    does not handle to diffusers' class)."""
    from p2pz_directions.lean.pixels import PixelProcessor

    return PixelProcessor(vae_scale_factor=vae_scale_factor(vae))


def preprocess_images(
    vae: Any, image: Any, height: int | None = None, width: int | None = None
) -> torch.Tensor:
    """``[B, 3, H, W]`` float32 in [-1, 1] from PIL / numpy (HWC, NHWC, 0..1) / torch (CHW, NCHW,
    -1..1 or 0..1) images or lists of them, through ``VaeImageProcessor.preprocess`` at full
    precision (nothing rounded to 8 bits). A ``[B, latent_channels, h, w]`` tensor is returned as is
    (latents, as diffusers' pipelines accept them)."""
    if isinstance(image, list) and image and isinstance(image[0], torch.Tensor) and image[0].ndim == 4:
        image = torch.cat(image)
    return image_processor(vae).preprocess(image, height=height, width=width)


def postprocess_images(vae: Any, images: torch.Tensor, output_type: str = "pil") -> Any:
    """``[B, 3, H, W]`` pixels in [-1, 1] (what `preprocess_images` made) as ``output_type``, through
    ``VaeImageProcessor.postprocess``: an edit's ``original`` in the form of its ``image``. Latents
    (not 3 channels) and ``output_type="latent"`` come back as they are."""
    if output_type == "latent" or images.shape[1] != 3:
        return images
    return image_processor(vae).postprocess(images.float(), output_type=output_type)


def retrieve_latents(encoder_output: Any, generator: Any = None, sample_mode: str = "sample") -> torch.Tensor:
    """The latents of a VAE's ``encode`` output: a sample (or the mode, ``"argmax"``) of its
    ``latent_dist``, or ``.latents`` for VAEs without a distribution (``AutoencoderTiny``)."""
    if hasattr(encoder_output, "latent_dist") and sample_mode == "sample":
        return encoder_output.latent_dist.sample(generator)
    if hasattr(encoder_output, "latent_dist") and sample_mode == "argmax":
        return encoder_output.latent_dist.mode()
    if hasattr(encoder_output, "latents"):
        return encoder_output.latents
    raise AttributeError("could not access the latents of the VAE's encode output")


#: the VAEs whose ``encode`` output is a diagonal Gaussian (``latent_dist.parameters``) and whose
#: encoder and decoder `loops="compile"` compiles (diffusers' ``AutoencoderKL`` and p2pz's lean one)
_COMPILED_VAES = frozenset({"AutoencoderKL", "LeanVAE"})


def _compiles_vae(runner: Any, vae: Any) -> bool:
    """Whether ``runner`` runs ``vae`` compiled: mode ``"compile"`` and a KL autoencoder. (Under
    ``"graphs"`` the VAE stays eager: it runs once or twice per edit, where a capture costs more than it
    saves in a fresh process.)"""
    return (
        runner is not None
        and getattr(runner, "mode", None) == "compile"
        and type(vae).__name__ in _COMPILED_VAES
    )


def _posterior(vae: Any, image: torch.Tensor, runner: Any) -> Any:
    """The diagonal Gaussian of ``vae.encode(image)``, its parameters computed by ``runner`` (compiled)."""
    from p2pz_directions.lean.vae import DiagonalGaussian

    def fn(x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x).latent_dist.parameters

    # same chunk / clamp / exp and the same noise as diffusers' DiagonalGaussianDistribution
    return DiagonalGaussian(runner("vae-encode", fn, image, key=(id(vae),)))


@torch.no_grad()
def encode_image(
    vae: Any,
    image: Any,
    generator: Any = None,
    *,
    sample_mode: str = "sample",
    sample: bool | None = None,
    runner: Any = None,
) -> torch.Tensor:
    """Scaled VAE latents ``scaling_factor * z`` of ``image`` (anything `preprocess_images` takes, or a
    ``[B, 3, H, W]`` tensor in [-1, 1]). A list of generators encodes one image with each, as
    diffusers' pipelines do. A tensor that already has ``latent_channels`` channels is returned as is.
    ``sample=False`` is ``sample_mode="argmax"``. ``runner``: a `UNetRunner`; in mode ``"compile"`` the
    encoder runs compiled (on CUDA replayed as a CUDA graph), the noise still drawn from ``generator``
    outside it.
    """
    if sample is not None:
        sample_mode = "sample" if sample else "argmax"
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        image = preprocess_images(vae, image)
    latent_channels = getattr(vae.config, "latent_channels", 4)
    if image.shape[1] == latent_channels:
        return image
    image = image.to(device=vae.device, dtype=vae.dtype)
    if _compiles_vae(runner, vae) and sample_mode in ("sample", "argmax"):

        def one(x: torch.Tensor, gen: Any) -> torch.Tensor:
            dist = _posterior(vae, x, runner)
            return dist.sample(gen) if sample_mode == "sample" else dist.mode()
    else:

        def one(x: torch.Tensor, gen: Any) -> torch.Tensor:
            return retrieve_latents(vae.encode(x), gen, sample_mode)

    if isinstance(generator, list):
        if len(generator) != image.shape[0]:
            raise ValueError(
                f"{len(generator)} generators for {image.shape[0]} images; pass one generator or one per image"
            )
        z = torch.cat([one(image[i : i + 1], generator[i]) for i in range(len(image))])
    else:
        z = one(image, generator)
    return vae.config.scaling_factor * z


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, output_type: str = "pil", *, runner: Any = None) -> Any:
    """Decode latents and post-process with ``VaeImageProcessor.postprocess``: ``"pil"`` (a list of
    images), ``"np"``, ``"pt"`` (0..1), or ``"latent"`` (the latents themselves). ``runner``: a
    `UNetRunner`; in mode ``"compile"`` the decoder runs compiled (on CUDA replayed as a CUDA graph)."""
    if output_type == "latent":
        return latents
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    if _compiles_vae(runner, vae):
        image = runner("vae-decode", lambda x: vae.decode(x, return_dict=False)[0], z, key=(id(vae),))
    else:
        image = vae.decode(z, return_dict=False)[0]
    return image_processor(vae).postprocess(image, output_type=output_type)


def epsilon_from_output(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor | float, prediction_type: str
) -> torch.Tensor:
    """The noise ``eps`` a UNet output stands for (x_t = sqrt(a) x0 + sqrt(1 - a) eps, DDPM eq. 4):
    ``epsilon``: itself; ``sample``: ``(x - sqrt(a) x0) / sqrt(1 - a)``; ``v_prediction``
    (Salimans & Ho 2022, section 4): ``sqrt(a) v + sqrt(1 - a) x``."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
    if prediction_type == "v_prediction":
        return alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    raise ValueError(f"prediction_type {prediction_type!r} must be one of epsilon, sample, v_prediction")
