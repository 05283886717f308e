"""SDEdit (Meng et al., ICLR 2022, arXiv 2108.01073) along a direction: a thin pipeline over
`p2pz_directions.sampling`, equal to diffusers' ``StableDiffusionImg2ImgPipeline``.

SDEdit's Algorithm 1 ("guided image synthesis"): perturb the guide image with the forward SDE to
time ``t0`` (here ``strength``: the image latents noised to the first timestep kept), then solve the
reverse SDE from there (here any diffusers scheduler img2img takes). The conditioning comes from a
direction:

- ``mode="direction"`` (default): the caption's embedding (BLIP, or ``prompt=``) moved along the
  direction, ``prompt_embeds + delta``, as pix2pix-zero edits its prompt; several directions are
  summed (one encoder);
- ``mode="target"``: the target concept's embedding itself is the prompt.

With a zero direction (``d * 0``) and ``prompt=`` the editor is img2img itself: the tests re-run
diffusers' own img2img fast tests against it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pz_directions import sampling as S
from p2pz_directions.core.concept import Direction
from p2pz_directions.editing import images as imgs
from p2pz_directions.editing.editors import Editor, EditorError, EditorOptionError, EditResult
from p2pz_directions.editing.hookspecs import hookimpl

__all__ = ["IMG2IMG_SCHEDULERS", "SDEditEditor", "SDEditOptions"]

#: what ``StableDiffusionImg2ImgPipeline`` takes (``KarrasDiffusionSchedulers`` and LCM); tested ones first
IMG2IMG_SCHEDULERS = (
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "LCMScheduler",
    "DPMSolverSinglestepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
)
CALLBACK_TENSORS = ("latents", "prompt_embeds", "negative_prompt_embeds")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SDEditOptions:
    """Every option of the SDEdit editor (diffusers' img2img names where it has them)."""

    mode: str = _opt(
        "direction", "'direction': the caption + the direction's delta; 'target': the target concept"
    )
    strength: float = _opt(
        0.8, "how much of the schedule is re-run, in (0, 1] (1 ignores the image's layout)"
    )
    prompt: str | list[str] | None = _opt(
        None, "the caption(s) to move along the direction (default: BLIP's)"
    )
    prompt_embeds: torch.Tensor | None = _opt(None, "[B, 77, D] caption embeddings instead of prompt")
    negative_prompt: str | list[str] | None = _opt(None, "negative prompt(s) (default: '')")
    negative_prompt_embeds: torch.Tensor | None = _opt(None, "[B, 77, D] negative embeddings")
    source_as_negative: bool = _opt(False, "use the source concept as the negative prompt")
    num_inference_steps: int = _opt(50, "steps of the whole schedule (strength runs a part of them)")
    timesteps: list[int] | None = _opt(None, "a custom schedule, where the scheduler takes one")
    sigmas: list[float] | None = _opt(None, "custom sigmas, where the scheduler takes them")
    guidance_scale: float = _opt(7.5, "classifier-free guidance (or the embedded scale of an LCM UNet)")
    num_images_per_prompt: int = _opt(1, "images per prompt (each with its own noise)")
    eta: float = _opt(0.0, "DDIM's eta (schedulers that take it)")
    seed: int | None = _opt(0, "seed of a CPU generator, when no generator is given")
    generator: Any = _opt(None, "a torch.Generator, or one per image")
    output_type: str = _opt("pil", "'pil', 'np', 'pt' or 'latent'")
    cross_attention_kwargs: dict[str, Any] | None = _opt(None, "passed to the UNet's attention processors")
    clip_skip: int | None = _opt(None, "CLIP layers skipped for the prompt")
    callback_on_step_end: Any = _opt(
        None, "fn(editor, step, t, tensors) -> tensors; editor._interrupt = True stops"
    )
    callback_on_step_end_tensor_inputs: tuple[str, ...] = _opt(
        ("latents",), f"tensors given: of {CALLBACK_TENSORS}"
    )
    callback: Any = _opt(None, "the older fn(step, t, latents), every callback_steps steps")
    callback_steps: int = _opt(1, "how often the older callback is called")
    cuda_graphs: bool | None = _opt(None, "replay the UNet from CUDA graphs (default: on for CUDA)")
    loops: str = _opt("auto", "eager, graphs (CUDA graphs), compile (torch.compile + graphs), or auto")


class SDEditEditor(Editor):
    """SDEdit along a direction: the image noised to ``strength``, denoised with the edited prompt.

    >>> ed = editors.get("sdedit", model="CompVis/stable-diffusion-v1-4")             # doctest: +SKIP
    >>> res = ed.edit(photo, "cat->dog", strength=0.75, seed=0)                       # doctest: +SKIP
    >>> res.image.save("dog.png"); res.caption                                        # doctest: +SKIP
    """

    name = "sdedit"
    description = "SDEdit (img2img): noise to a strength, denoise with the caption moved along the direction"
    phases = ("caption", "edit")
    memory_advice = "use --dtype float16, a smaller image, or num_images_per_prompt=1"
    options = SDEditOptions

    def __init__(
        self, model: Any = None, *, captioner: Any = None, caption_model: str | None = None, **kw: Any
    ):
        super().__init__(model, **kw)
        self._captioner = captioner
        self.caption_model = caption_model

    @property
    def captioner(self) -> Any:
        """The image captioner (the ``blip`` plugin unless another is given), made on first use."""
        if self._captioner is None or isinstance(self._captioner, str):
            from p2pz_directions.editing import plugins

            name, found = self._captioner or "blip", plugins.image_captioners()
            if name not in found:
                raise EditorOptionError(
                    f"no image captioner {name!r} is installed (installed: {', '.join(found) or 'none'}); "
                    f"pass prompt='a photo of a cat' (a caption of your image) instead"
                )
            kw = {
                "device": self.device,
                "dtype": self.dtype,
                **({"model": self.caption_model} if self.caption_model else {}),
            }
            self._captioner = found[name](**kw)
        return self._captioner

    def run(self, images: list[Any] | None, direction: Direction, o: SDEditOptions) -> EditResult:
        """Noise to ``strength``, denoise with the edited prompt (options: `SDEditOptions`)."""
        # 1. check inputs (images at full precision, `images.prepare_image`), the model's own scheduler
        image, n_images, notes = self._check(images, o)
        comps = self.load_components(("unet", "vae", "scheduler"))
        unet, vae = comps["unet"], comps["vae"]
        scheduler = S.check_scheduler(
            copy.deepcopy(comps["scheduler"]),
            IMG2IMG_SCHEDULERS,
            pipeline="SDEdit (StableDiffusionImg2ImgPipeline)",
        )
        # 2. conditioning: [B * k, 77, D] prompt and negative embeddings
        caption, pos, neg = self._conditioning(image, n_images, direction, o, unet)
        batch = pos.shape[0] // o.num_images_per_prompt
        # 3. timesteps: the tail of the schedule that strength keeps
        timesteps, n_run = self._timesteps(scheduler, o)
        # 4. latents: the image latents noised to the first timestep kept (diffusers' order of draws)
        gen = o.generator if o.generator is not None else S.make_generator(o.seed)
        x = imgs.to_pixels(image, S.vae_scale_factor(vae))
        latents = self._noised_latents(vae, scheduler, x, batch * o.num_images_per_prompt, timesteps, gen)
        # 5. sample
        guided = S.do_cfg(unet, o.guidance_scale)
        tensors = {"prompt_embeds": torch.cat([neg, pos]) if guided else pos, "negative_prompt_embeds": neg}
        predict = S.cfg_predictor(
            unet, guidance_scale=o.guidance_scale, runner=self.options_runner(o),
            cross_attention_kwargs=o.cross_attention_kwargs,
        )  # fmt: skip
        self.progress("edit", 0, n_run)
        latents = S.denoise(
            predict, latents, scheduler, timesteps=timesteps, tensors=tensors,
            extra_step_kwargs=S.extra_step_kwargs(scheduler, gen, o.eta),
            callback_on_step_end=o.callback_on_step_end,
            callback_on_step_end_tensor_inputs=o.callback_on_step_end_tensor_inputs,
            pipe=self, callback=o.callback, callback_steps=o.callback_steps,
            progress=lambda i, n: self.progress("edit", i, n), num_inference_steps=n_run,
        )  # fmt: skip
        # 6. decode
        if not torch.isfinite(latents).all():
            raise EditorError(
                f"{self.name}: the edited latents hold NaN or infinite values; lower guidance_scale or use float32"
            )
        edited = S.decode_latents(vae, latents, o.output_type)
        original = (
            image if o.output_type in ("pil", "latent") else S.postprocess_images(vae, x, o.output_type)
        )
        extra = {"mode": o.mode, "strength": o.strength, "steps_run": n_run, "notes": notes}
        return EditResult(image=_one(edited), original=_one(original), caption=caption, extra=extra)

    # -- the steps ------------------------------------------------------------------------------------
    def _check(self, images: list[Any] | None, o: SDEditOptions) -> tuple[Any, int, list[str]]:
        if images is None:
            raise EditorOptionError(
                "sdedit edits an existing image: pass one (p2pz edit IMAGE ...). For an image generated from "
                "a prompt, use the pix2pix-zero editor"
            )
        _check_options(o)
        if o.mode == "target" and (o.prompt is not None or o.prompt_embeds is not None):
            raise EditorOptionError(
                "mode='target' conditions on the target concept alone; drop prompt/prompt_embeds, or use "
                "mode='direction' to move your prompt along the direction"
            )
        if o.source_as_negative and (o.negative_prompt is not None or o.negative_prompt_embeds is not None):
            raise EditorOptionError("pass source_as_negative=True or a negative prompt, not both")
        image, note = imgs.prepare_image(images if len(images) > 1 else images[0], self.image_multiple)
        return image, imgs.num_images(image), [note] if note else []

    def _conditioning(
        self, image, n_images, direction, o, unet
    ) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
        dev, dt, k = self.device, self.dtype, o.num_images_per_prompt
        caption, prompt_embeds = o.prompt, o.prompt_embeds
        if o.mode == "target":
            prompt_embeds = direction.target_embeds.expand(n_images, -1, -1)
        elif prompt_embeds is None and caption is None:
            self.progress("caption", 0, 1)
            caption = self.captioner.caption(_pil_list(image, n_images))
            caption = caption if n_images > 1 else caption[0]
            self.progress("caption", 1, 1)
        if isinstance(caption, str) and n_images > 1:
            caption = [caption] * n_images
        neg_text, neg_embeds = o.negative_prompt, o.negative_prompt_embeds
        if o.source_as_negative:
            neg_embeds = direction.source_embeds
        comps = self.load_components(("tokenizer", "text_encoder"))
        pos, neg = S.encode_prompt(
            comps["tokenizer"], comps["text_encoder"], caption, dev, num_images_per_prompt=1,
            do_classifier_free_guidance=S.do_cfg(unet, o.guidance_scale), negative_prompt=neg_text,
            prompt_embeds=None if prompt_embeds is None else prompt_embeds.to(dev, dt),
            negative_prompt_embeds=None if neg_embeds is None else _rows(neg_embeds.to(dev, dt), o, caption),
            clip_skip=o.clip_skip, dtype=dt,
        )  # fmt: skip
        _check_dim(pos, unet)
        if o.mode == "direction":
            pos = pos + direction.delta.to(device=dev, dtype=dt)
        pos = pos.repeat_interleave(k, dim=0)
        neg = None if neg is None else neg.repeat_interleave(k, dim=0)
        return caption, pos, neg

    def _timesteps(self, scheduler: Any, o: SDEditOptions) -> tuple[torch.Tensor, int]:
        try:
            if o.timesteps is None and o.sigmas is None:
                timesteps, n_run = S.strength_timesteps(
                    scheduler, o.num_inference_steps, o.strength, self.device
                )
            else:
                timesteps, n_run = S.custom_strength_timesteps(
                    scheduler, o.strength, self.device, timesteps=o.timesteps, sigmas=o.sigmas
                )
        except ValueError as e:
            raise OptionValueError(str(e)) from None
        if n_run < 1 or len(timesteps) == 0:
            raise OptionValueError(
                f"strength={o.strength} with num_inference_steps={o.num_inference_steps} runs no step at all "
                f"(int(steps * strength) = 0); raise one of them"
            )
        return timesteps, n_run

    def _noised_latents(self, vae, scheduler, x, batch: int, timesteps, gen) -> torch.Tensor:
        """diffusers' ``prepare_latents``: encode (one generator per image, or one for all), repeat to
        the batch, draw the noise, ``add_noise`` at the first timestep."""
        dev, dt = self.device, self.dtype
        if isinstance(gen, list) and len(gen) != batch:
            raise OptionValueError(
                f"got {len(gen)} generators for {batch} images; pass one, or one per image"
            )
        if x.shape[1] != 4 and isinstance(gen, list) and x.shape[0] < batch:
            if batch % x.shape[0]:
                raise OptionValueError(f"cannot spread {x.shape[0]} images over {batch} prompts * images")
            x = torch.cat([x] * (batch // x.shape[0]))
        init = S.encode_image(vae, x.to(device=dev, dtype=vae.dtype), gen).to(dt)
        if batch % init.shape[0]:
            raise OptionValueError(f"cannot spread {init.shape[0]} images over {batch} prompts * images")
        init = torch.cat([init] * (batch // init.shape[0]))
        noise = S.randn(tuple(init.shape), gen, dev, dt)
        return scheduler.add_noise(init, noise, timesteps[:1].repeat(batch))


class OptionValueError(EditorOptionError, ValueError):
    """An option has a value the editor cannot use (a strength outside (0, 1], a count below 1...)."""


def _check_options(o: SDEditOptions) -> None:
    if o.mode not in ("direction", "target"):
        raise OptionValueError(f"mode must be 'direction' or 'target', not {o.mode!r}")
    try:
        s = float(o.strength)
    except (TypeError, ValueError):
        raise OptionValueError(f"strength must be a number in (0, 1], not {o.strength!r}") from None
    if not 0.0 < s <= 1.0:
        raise OptionValueError(
            f"strength={o.strength} is outside (0, 1]: it is the fraction of the schedule re-run"
        )
    for name in ("num_images_per_prompt", "callback_steps", "num_inference_steps"):
        v = getattr(o, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise OptionValueError(f"{name} must be a positive whole number, not {v!r}")
    if o.output_type not in ("pil", "np", "pt", "latent"):
        raise OptionValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', not {o.output_type!r}")
    bad = [n for n in o.callback_on_step_end_tensor_inputs if n not in CALLBACK_TENSORS]
    if bad:
        raise OptionValueError(
            f"callback_on_step_end_tensor_inputs may only hold {', '.join(CALLBACK_TENSORS)}, not {bad}"
        )


def _pil_list(image: Any, n: int) -> list[Any]:
    """The input images as PIL, for a captioner (tensors in -1..1 shifted to 0..1 first)."""
    if isinstance(image, list):
        return image
    if not hasattr(image, "shape"):
        return [image]
    if isinstance(image, torch.Tensor) and image.min() < 0:
        image = (image + 1) / 2
    return [imgs.load_image(image[i]) for i in range(n)]


def _rows(embeds: torch.Tensor, o: SDEditOptions, caption: Any) -> torch.Tensor:
    n = len(caption) if isinstance(caption, list) else 1
    return embeds.expand(n, -1, -1) if embeds.shape[0] == 1 and n > 1 else embeds


def _check_dim(pos: torch.Tensor, unet: Any) -> None:
    dim = int(unet.config.cross_attention_dim)
    if pos.shape[-1] != dim:
        raise OptionValueError(
            f"prompt embeddings have shape {list(pos.shape)}; this UNet takes [B, L, {dim}]"
        )


def _one(images: Any) -> Any:
    """One image (not a batch of one) when one was made."""
    if (isinstance(images, list) or hasattr(images, "shape")) and len(images) == 1:
        return images[0]
    return images


@hookimpl
def p2pz_register_editors() -> list[type[Editor]]:
    return [SDEditEditor]
