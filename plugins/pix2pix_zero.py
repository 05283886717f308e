"""pix2pix-zero (Parmar et al., SIGGRAPH 2023, arXiv 2302.03027) as a thin pipeline over
`p2pz_directions.sampling`.

An edit of real images: **caption** (BLIP, unless ``prompt=`` is given), **invert** (the
pipeline's ``inverse_scheduler``, with the noise regularizers), **reference** (sample from the
inverted noise with the caption, recording the cross-attention maps), **edit** (sample from the
same noise with the direction added to the caption's embedding, each step first moved toward the
reference maps). A synthetic edit starts from Gaussian noise and a prompt.

It takes what diffusers' ``StableDiffusionPix2PixZeroPipeline`` (``invert`` then ``__call__``)
takes, with its semantics, and is proven equal to it on diffusers' own fast tests
(tests/test_pix2pix_zero_diffusers.py): its ``scheduler`` (DDIM, DDPM, Euler-ancestral, LMS) and
``inverse_scheduler`` (DDIM-inverse) exactly as configured; any other is refused. Differences, on
purpose:

- the direction is added to every conditional row; diffusers adds it to row 1 only
  (``prompt_embeds_edit[1:2]``), which with several images (or ``num_images_per_prompt > 1``) edits
  the *unconditional* embedding of the second image and leaves the others unedited, and without
  classifier-free guidance edits nothing. ``diffusers_direction_row=True`` reproduces that;
- a photo's caption is its default negative prompt (as the authors and diffusers' docs do);
- one prompt for several images is used for each (diffusers refuses), and with
  ``num_images_per_prompt > 1`` the inverted latents are repeated for the copies;
- ``AutoencoderTiny`` works for real images too (diffusers' ``invert`` needs ``latent_dist``);
- the reference maps stay on the device, indexed by step (no ``.item()`` sync, no copy to the
  CPU); the guidance gradient is taken for the latents only; outside the recorded maps, attention
  may use PyTorch's fused kernel (``attention="fused"``, the default on a GPU);
- on a GPU every UNet step is replayed from a CUDA graph (`UNetRunner`, ``loops="graphs"``).

>>> from p2pz_directions import editors
>>> ed = editors.get("pix2pix-zero", model="CompVis/stable-diffusion-v1-4")   # doctest: +SKIP
>>> res = ed.edit("cat.png", "cat->dog", seed=0)                              # doctest: +SKIP
>>> res.image.save("dog.png"); res.caption                                     # doctest: +SKIP
>>> ed.edit(["cat1.png", "cat2.png"], ["cat->dog", "day->night"], seed=0).images   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from p2pz_directions import sampling as S
from p2pz_directions.core.concept import Direction
from p2pz_directions.editing.editors import Editor, EditorError, EditorOptionError, EditResult
from p2pz_directions.editing.hookspecs import hookimpl

__all__ = ["BlipCaptioner", "InversionResult", "Pix2PixZeroEditor", "Pix2PixZeroOptions"]

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
#: what ``StableDiffusionPix2PixZeroPipeline`` accepts (its ``__init__`` annotations)
SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler")
INVERSE_SCHEDULERS = ("DDIMInverseScheduler",)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
NAN_ADVICE = (
    "lower the cross-attention guidance (--xa-guidance / cross_attention_guidance_amount, default 0.1); "
    "Stable Diffusion 2.x (v-prediction) models need 0.01 or less"
)


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - the metadata key the contract names
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Pix2PixZeroOptions:
    """Options of `Pix2PixZeroEditor.edit` (diffusers' ``__call__`` and ``invert`` arguments, and ours)."""

    prompt: str | list[str] | None = _opt(
        None, "caption of each image (default: BLIP's) or the prompt to generate from"
    )
    negative_prompt: str | list[str] | None = _opt(None, "default: the caption for a photo, '' otherwise")
    prompt_embeds: torch.Tensor | None = _opt(None, "precomputed prompt embeddings instead of prompt")
    negative_prompt_embeds: torch.Tensor | None = _opt(None, "precomputed negative prompt embeddings")
    num_inference_steps: int = _opt(50, "denoising (and inversion) steps")
    guidance_scale: float = _opt(7.5, "classifier-free guidance of the reference and the edit (1: off)")
    cross_attention_guidance_amount: float = _opt(
        0.1, "step size toward the reference maps; SD 2.x needs <= 0.01"
    )
    inversion_guidance_scale: float = _opt(
        1.0, "classifier-free guidance during inversion (diffusers' invert guidance_scale)"
    )
    lambda_auto_corr: float = _opt(20.0, "weight of the auto-correlation regularizer (inversion)")
    lambda_kl: float = _opt(20.0, "weight of the KL regularizer (inversion)")
    num_reg_steps: int = _opt(5, "regularization rounds per inversion step (0: none)")
    num_auto_corr_rolls: int = _opt(5, "random rolls per auto-correlation round")
    eta: float = _opt(0.0, "DDIM eta (ignored by schedulers without it)")
    seed: int | None = _opt(None, "seed of a CPU generator, when no generator is given")
    generator: Any = _opt(None, "a torch.Generator or one per output image")
    latents: torch.Tensor | None = _opt(None, "start latents: skips the inversion (photo) or the noise draw")
    height: int | None = _opt(None, "generated image height (synthetic mode)")
    width: int | None = _opt(None, "generated image width (synthetic mode)")
    num_images_per_prompt: int = _opt(1, "outputs per prompt / image")
    clip_skip: int | None = _opt(None, "text-encoder layers to skip")
    output_type: str = _opt("pil", "pil, np, pt or latent")
    callback: Any = _opt(None, "callback(step, t, latents) in the inversion and reference loops (diffusers')")
    callback_steps: int = _opt(1, "call callback every this many steps")
    callback_on_step_end: Any = _opt(
        None, "callback_on_step_end(editor, i, t, tensors) in the reference and edit loops"
    )
    callback_on_step_end_tensor_inputs: tuple[str, ...] = _opt(("latents",), "latents and/or prompt_embeds")
    attention: str = _opt("auto", "exact (diffusers' numerics), fused, or auto (exact on the CPU)")
    attention_maps_device: str | None = _opt(None, "keep the reference maps here, e.g. 'cpu' (eager loops)")
    loops: str = _opt("auto", "eager, graphs (CUDA graphs), compile, or auto (graphs on a GPU)")
    passes: str = _opt(
        "auto",
        "lockstep (reference and edit in step: one step's maps kept, one UNet pass less per step), "
        "sequential (diffusers' order), or auto (lockstep unless attention is exact, the maps are kept "
        "elsewhere or the sampler draws random numbers)",
    )
    compile_regularizer: bool = _opt(False, "torch.compile the inversion step (first edit pays compilation)")
    return_reconstruction: bool = _opt(True, "decode the reference (reconstruction) too")
    return_inversion_images: bool = _opt(False, "decode the inverted latents (diffusers' invert images)")
    diffusers_direction_row: bool = _opt(
        False, "add the direction to row 1 only, as diffusers does (for comparisons)"
    )


@dataclass
class InversionResult:
    """What `Pix2PixZeroEditor.invert` returns (diffusers' ``Pix2PixInversionPipelineOutput``)."""

    latents: torch.Tensor
    images: Any = None


# ---------------------------------------------------------------------------------------------------
# BLIP captioner (an image-captioner plugin)
# ---------------------------------------------------------------------------------------------------
class BlipCaptioner:
    """Captions photos with BLIP, as diffusers' pix2pix-zero pipeline does (prompt "a photography of").

    >>> BlipCaptioner().caption([Image.open("cat.png")])      # doctest: +SKIP
    ['a photography of a cat sitting on a couch']
    """

    name = "blip"

    def __init__(
        self,
        model: str = DEFAULT_CAPTIONER,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        text: str = "a photography of",
        max_new_tokens: int = 128,
        processor: Any = None,
        generator_model: Any = None,
    ) -> None:
        self.model_id = model
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.text = text
        self.max_new_tokens = max_new_tokens
        self._processor = processor
        self._model = generator_model

    def _load(self) -> None:
        if self._model is not None and self._processor is not None:
            return
        from transformers import BlipForConditionalGeneration, BlipProcessor

        try:
            self._processor = self._processor or BlipProcessor.from_pretrained(self.model_id)
            self._model = self._model or BlipForConditionalGeneration.from_pretrained(
                self.model_id, torch_dtype=self.dtype
            )
        except (OSError, ValueError) as e:
            raise EditorError(
                f"cannot load the BLIP captioner {self.model_id}: {str(e).rstrip('.')}. Pass prompt='a photo of a cat' (a caption "
                f"of your image) to skip captioning, or make the model available offline first."
            ) from None
        self._model.to(self.device).eval()

    @torch.no_grad()
    def caption(self, images: list[Any]) -> list[str]:
        self._load()
        model = self._model
        inputs = self._processor(images, [self.text] * len(images), return_tensors="pt").to(
            device=model.device, dtype=model.dtype
        )
        out = model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [s.strip() for s in self._processor.batch_decode(out, skip_special_tokens=True)]


# ---------------------------------------------------------------------------------------------------
# the editor
# ---------------------------------------------------------------------------------------------------
class Pix2PixZeroEditor(Editor):
    """pix2pix-zero: edit real photos (caption, invert, reference, edit) or generated images.

    ``scheduler`` / ``inverse_scheduler`` (constructor): the schedulers to use. Default: a
    ``pipe=``'s own ``scheduler`` and ``inverse_scheduler``, exactly as configured; for ``model=``
    the model's scheduler if pix2pix-zero supports it, else DDIM built from its config, and
    DDIM-inverse from that (as diffusers' docs build them). `schedulers` tells which.

    >>> ed = editors.get("pix2pix-zero", model="CompVis/stable-diffusion-v1-4", device="cuda")  # doctest: +SKIP
    >>> ed.edit("cat.png", "cat->dog", seed=0).image.save("dog.png")                          # doctest: +SKIP
    >>> ed.edit(None, "cat->dog", prompt="a painting of a cat", seed=0).image                   # doctest: +SKIP
    >>> ed.invert("cat.png", prompt="a cat", return_inversion_images=True).images              # doctest: +SKIP
    """

    name = "pix2pix-zero"
    description = (
        "pix2pix-zero: direction in CLIP space + cross-attention guidance (real or generated images)"
    )
    phases = ("caption", "invert", "reference", "edit")
    options = Pix2PixZeroOptions
    memory_advice = (
        "use dtype float16 (--dtype float16), keep the passes in step (passes='lockstep', the default "
        "unless attention is exact or the sampler draws noise: one step's attention maps kept), edit a "
        "smaller image, or edit fewer images at once"
    )

    def __init__(
        self,
        model: Any = None,
        *,
        captioner: Any = None,
        caption_model: str = DEFAULT_CAPTIONER,
        scheduler: Any = None,
        inverse_scheduler: Any = None,
        **kw: Any,
    ) -> None:
        super().__init__(model, **kw)
        self._captioner = captioner
        self.caption_model = caption_model
        self._scheduler, self._inverse_scheduler = scheduler, inverse_scheduler
        #: the settings each loop mode's `UNetRunner` (``self.runners``) holds graphs for
        self._runner_keys: dict[str, Any] = {}
        #: the loop running now ("invert", "reference", "edit"), for ``callback_on_step_end``
        self.phase: str | None = None
        self._passes = "sequential"  # how the last edit ran its reference and edit passes

    # -- parts ----------------------------------------------------------------------------------
    @property
    def captioner(self) -> Any:
        """The image captioner (BLIP unless another was given), created on first use."""
        if self._captioner is None:
            self._captioner = BlipCaptioner(self.caption_model, device=self.device, dtype=self.dtype)
        elif isinstance(self._captioner, str):
            from p2pz_directions.editing import plugins

            found = plugins.image_captioners()
            if self._captioner not in found:
                raise EditorOptionError(
                    f"unknown image captioner {self._captioner!r}; installed: {', '.join(found) or '(none)'}"
                )
            self._captioner = found[self._captioner](device=self.device, dtype=self.dtype)
        return self._captioner

    def schedulers(self) -> tuple[Any, Any]:
        """``(scheduler, inverse_scheduler)`` as configured (see the class docstring); not copied."""
        if self.pipe is not None:
            sched = self._scheduler or getattr(self.pipe, "scheduler", None)
            inverse = self._inverse_scheduler or getattr(self.pipe, "inverse_scheduler", None)
            return sched, inverse
        sched = self._scheduler
        if sched is None:
            sched = self.load_components(("scheduler",))["scheduler"]
            if type(sched).__name__ not in SCHEDULERS:
                sched = S.copy_scheduler(sched, S.scheduler_class("DDIMScheduler", like=sched))
            self._scheduler = sched
        if self._inverse_scheduler is None:
            self._inverse_scheduler = S.copy_scheduler(
                sched, S.scheduler_class("DDIMInverseScheduler", like=sched)
            )
        return sched, self._inverse_scheduler

    def encode_text(self, prompts: str | list[str], clip_skip: int | None = None) -> torch.Tensor:
        """``[N, 77, D]`` embeddings of ``prompts`` with the model's text encoder."""
        c = self.load_components()
        return S.encode_text(c["tokenizer"], c["text_encoder"], prompts, self.device, clip_skip)

    # -- the edit -------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, images: list[Any] | None, direction: Direction, o: Pix2PixZeroOptions) -> EditResult:
        """Edit ``images`` (a list; None: generate from ``o.prompt``) along ``direction``."""
        # 1. check inputs; schedulers copied with every setting
        pixels, gen, runner, exact = self._check_inputs(images, o)
        c, (sched, inverse) = self.load_components(), self.schedulers()
        sched = S.copy_scheduler(S.check_scheduler(sched, SCHEDULERS, pipeline="pix2pix-zero"))
        # 2. conditioning: captions, [uncond; cond] embeddings, the direction added to the cond rows
        prompts, negative = self._prompts(pixels, o)
        texts: dict = {}  # the caption is the prompt, the negative prompt and the inversion's: encoded once
        embeds, edit_embeds = self._conditioning(c, prompts, negative, direction, o, texts)
        # 3. latents: the inverted images, the given latents, or noise
        inverted = None
        if o.latents is not None:
            x_T = o.latents.to(self.device, c["unet"].dtype)
        elif pixels is not None:
            x_T = inverted = self._invert(c, inverse, pixels, prompts, gen, runner, exact, o, texts)
        else:
            x_T = S.randn(self._noise_shape(c, embeds, o), gen, self.device, c["unet"].dtype)
        rows = edit_embeds.shape[0] // (2 if S.do_cfg(c["unet"], o.guidance_scale) else 1)
        if x_T.shape[0] != rows and rows % x_T.shape[0] == 0:
            x_T = x_T.repeat_interleave(rows // x_T.shape[0], 0)  # num_images_per_prompt copies
        sched.set_timesteps(o.num_inference_steps, device="cpu")
        x_T = x_T * sched.init_noise_sigma
        # 4. sample: the reference pass records the cross-attention maps, the edit is guided by them
        x_rec, x_edit = self._sample(c["unet"], sched, x_T, embeds, edit_embeds, gen, runner, exact, o)
        _check_finite(x_edit, "edit")
        # 5. decode
        return self._result(c["vae"], images, pixels, x_edit, x_rec, inverted, prompts, negative, runner, o)

    @torch.no_grad()
    def invert(self, image: Any, *, progress: Any = None, **options: Any) -> InversionResult:
        """Inverted latents of ``image`` (one or a list), as diffusers' ``invert``: ``prompt``
        (default: the caption), ``inversion_guidance_scale``, the regularizers, ``generator`` /
        ``seed``; ``return_inversion_images=True`` also decodes them (``output_type``)."""
        o = self.make_options(**options)
        images = [self._load_image(i) for i in (image if isinstance(image, list) else [image])]
        self._progress, self._interrupt = progress, False
        try:
            pixels, gen, runner, exact = self._check_inputs(images, o)
            prompts, _ = self._prompts(pixels, o)
            c = self.load_components()
            latents = self._invert(c, self.schedulers()[1], pixels, prompts, gen, runner, exact, o)
        finally:
            self._progress = None
        decoded = (
            S.decode_latents(c["vae"], latents, o.output_type, runner=runner)
            if o.return_inversion_images
            else None
        )
        return InversionResult(latents=latents, images=decoded)

    # -- the steps ------------------------------------------------------------------------------
    def _check_inputs(
        self, images: list[Any] | None, o: Pix2PixZeroOptions
    ) -> tuple[Any, Any, S.UNetRunner, bool]:
        """Step 1: ``(pixels, generator, runner, exact)`` after checking every option: the images as
        ``[B, 3, H, W]`` in [-1, 1] (None for a generated image), the generator, the `UNetRunner` of
        the loop mode, and whether attention runs diffusers' exact (unfused) kernel."""
        _check_options(images, o)
        exact = o.attention == "exact" or (o.attention == "auto" and self.device.type == "cpu")
        mode = self._loop_mode(o, exact)
        gen = o.generator if o.generator is not None else S.make_generator(o.seed)
        pixels = None if images is None else self._pixels(images)
        return pixels, gen, self._runner(mode, pixels, exact, o), exact

    def _loop_mode(self, o: Pix2PixZeroOptions, exact: bool) -> str:
        """``o.loops``, with ``"auto"`` resolved: CUDA graphs on a GPU (unless the maps are kept
        elsewhere or attention is exact), eager loops otherwise."""
        mode = self.loop_mode(o.loops)
        if o.loops == "auto" and (o.attention_maps_device is not None or exact):
            mode = "eager"
        if mode != "eager" and o.attention_maps_device is not None:
            raise EditorOptionError("attention_maps_device needs loops='eager'")
        return mode

    def _pixels(self, images: list[Any]) -> torch.Tensor:
        vae = self.load_components(("vae",))["vae"]
        try:
            return S.preprocess_images(vae, images)
        except (ValueError, TypeError) as e:
            raise EditorOptionError(f"cannot use these images: {e}") from None

    def _runner(self, mode: str, pixels: Any, exact: bool, o: Pix2PixZeroOptions) -> S.UNetRunner:
        """The editor's `UNetRunner` of ``mode``; its graphs and map buffers are freed when the
        settings they were captured for change (they are kept between edits of the same settings)."""
        runner = self.unet_runner(mode)
        key = (
            o.num_inference_steps, o.guidance_scale, o.cross_attention_guidance_amount, o.inversion_guidance_scale,
            o.lambda_auto_corr, o.lambda_kl, o.num_reg_steps, o.num_auto_corr_rolls, o.num_images_per_prompt,
            o.compile_regularizer, exact, o.passes, None if pixels is None else tuple(pixels.shape), o.height, o.width,
            len(o.prompt) if isinstance(o.prompt, list) else None,
        )  # fmt: skip
        if runner.mode != "eager" and key != self._runner_keys.get(mode):
            runner.clear()  # free the graphs and map buffers of other settings first
        self._runner_keys[mode] = key
        return runner

    def _prompts(self, pixels: torch.Tensor | None, o: Pix2PixZeroOptions) -> tuple[Any, Any]:
        """``(prompts, negative prompts)``: BLIP captions for photos without a prompt, one prompt
        repeated for several images, and the caption as the photo's default negative prompt."""
        prompt, negative = o.prompt, o.negative_prompt
        n_images = 0 if pixels is None else pixels.shape[0]
        if pixels is not None and prompt is None and o.prompt_embeds is None:
            if pixels.shape[1] != 3:
                raise EditorOptionError("latents given as images cannot be captioned: pass prompt=...")
            self.progress("caption", 0, 1)
            pil = S.image_processor(self.load_components(("vae",))["vae"]).postprocess(
                pixels, output_type="pil"
            )
            prompt = self.captioner.caption(pil)
            prompt = prompt[0] if len(prompt) == 1 else prompt
            self.progress("caption", 1, 1)
        if isinstance(prompt, str) and n_images > 1:
            prompt = [prompt] * n_images
        if (
            negative is None
            and pixels is not None
            and o.negative_prompt_embeds is None
            and prompt is not None
        ):
            negative = prompt
        if isinstance(prompt, list) and isinstance(negative, str):
            negative = [negative] * len(prompt)
        rows = (
            len(prompt)
            if isinstance(prompt, list)
            else (1 if prompt is not None else o.prompt_embeds.shape[0])
        )
        if n_images and rows % n_images:
            raise EditorOptionError(
                f"{n_images} images for {rows} prompts; give one prompt, or one per image"
            )
        return prompt, negative

    def _conditioning(
        self, c, prompts, negative, direction, o, texts=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        guided = S.do_cfg(c["unet"], o.guidance_scale)
        pos, neg = S.encode_prompt(
            c["tokenizer"], c["text_encoder"], prompts, self.device, num_images_per_prompt=o.num_images_per_prompt,
            do_classifier_free_guidance=guided, negative_prompt=negative, prompt_embeds=o.prompt_embeds,
            negative_prompt_embeds=o.negative_prompt_embeds, clip_skip=o.clip_skip, cache=texts,
        )  # fmt: skip
        embeds = torch.cat([neg, pos]) if guided else pos
        edit_embeds = embeds.clone()
        delta = direction.delta.to(self.device)
        if o.diffusers_direction_row:
            edit_embeds[1:2] += delta  # diffusers' prompt_embeds_edit[1:2] += edit_direction
        else:
            edit_embeds[-pos.shape[0] :] += delta
        return embeds, edit_embeds

    def _noise_shape(self, c, embeds, o) -> tuple[int, ...]:
        sf, unet = S.vae_scale_factor(c["vae"]), c["unet"]
        rows = embeds.shape[0] // (2 if S.do_cfg(unet, o.guidance_scale) else 1)
        if isinstance(o.generator, list) and len(o.generator) != rows:
            raise EditorOptionError(
                f"{len(o.generator)} generators for {rows} images; give one, or one per image"
            )
        h, w = o.height or unet.config.sample_size * sf, o.width or unet.config.sample_size * sf
        return (rows, unet.config.in_channels, h // sf, w // sf)

    def _invert(self, c, inverse, pixels, prompts, gen, runner, exact, o, texts=None) -> torch.Tensor:
        """Step 3 for photos: VAE latents, then ``invert`` along the inverse scheduler (regularized)."""
        inverse = S.copy_scheduler(
            S.check_scheduler(inverse, INVERSE_SCHEDULERS, role="inverse_scheduler", pipeline="pix2pix-zero")
        )
        unet, guided = c["unet"], o.inversion_guidance_scale > 1.0
        pos, neg = S.encode_prompt(
            c["tokenizer"], c["text_encoder"], prompts, self.device, do_classifier_free_guidance=guided,
            prompt_embeds=o.prompt_embeds, cache=texts,
        )  # fmt: skip
        n = pixels.shape[0]
        if isinstance(gen, list) and len(gen) not in (n, n * o.num_images_per_prompt):
            raise EditorOptionError(f"{len(gen)} generators for {n} images; give one, or one per image")
        enc_gen = gen[:: len(gen) // n] if isinstance(gen, list) else gen
        x0 = S.encode_image(c["vae"], pixels.to(c["vae"].dtype), enc_gen, runner=runner).to(unet.dtype)
        if pos.shape[0] != n:
            x0 = torch.cat([x0] * (pos.shape[0] // n))  # diffusers: images repeated for more prompts
        inverse.set_timesteps(o.num_inference_steps, device="cpu")
        reg = S.Regularizer(o.lambda_auto_corr, o.lambda_kl, o.num_reg_steps, o.num_auto_corr_rolls)
        predict = S.inversion_predictor(
            unet, inverse, guidance_scale=o.inversion_guidance_scale, regularizer=reg, generator=enc_gen,
            runner=runner, compile_regularizer=o.compile_regularizer, analytic=not exact,
        )  # fmt: skip
        self.phase = "invert"
        with S.attention_maps(unet, S.AttentionMaps(0, exact=exact), self._fused(runner, unet, exact)):
            x_T = S.invert(
                predict, x0, inverse, tensors={"prompt_embeds": torch.cat([neg, pos]) if guided else pos},
                callback=o.callback, callback_steps=o.callback_steps, progress=lambda i, k: self.progress("invert", i, k),
            )  # fmt: skip
        _check_finite(x_T, "inversion")
        return x_T

    def _sample(
        self, unet, sched, x_T, embeds, edit_embeds, gen, runner, exact, o
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 4: the reference pass (its cross-attention maps recorded) and the edit guided by them,
        in step (`S.lockstep_passes`) or one after the other as diffusers runs them (``o.passes``)."""
        steps, gs = len(sched.timesteps), o.guidance_scale
        step_kw = S.extra_step_kwargs(sched, gen, o.eta)
        lockstep = self._lockstep(sched, x_T, step_kw, exact, o)
        self._passes = "lockstep" if lockstep else "sequential"
        key = (steps, tuple(x_T.shape), x_T.dtype, gs, o.cross_attention_guidance_amount, exact, lockstep)
        n_maps = 1 if lockstep else steps
        make = lambda: S.AttentionMaps(n_maps, store_device=o.attention_maps_device, exact=exact)  # noqa: E731
        maps = make() if runner.mode == "eager" else runner.resource(("maps", key), make)
        common = dict(
            extra_step_kwargs=step_kw, pipe=self, callback_on_step_end=o.callback_on_step_end,
            callback_on_step_end_tensor_inputs=list(o.callback_on_step_end_tensor_inputs),
        )  # fmt: skip
        reference = dict(
            scheduler=sched, tensors={"prompt_embeds": embeds}, callback=o.callback, callback_steps=o.callback_steps,
            progress=lambda i, k: self.progress("reference", i, k), **common,
        )  # fmt: skip
        with S.attention_maps(unet, maps, self._fused(runner, unet, exact)):
            if lockstep:
                edit_sched = S.copy_scheduler(sched)
                edit_sched.set_timesteps(o.num_inference_steps, device="cpu")
                edit = dict(
                    scheduler=edit_sched, tensors={"prompt_embeds": edit_embeds},
                    progress=lambda i, k: self.progress("edit", i, k), **common,
                )  # fmt: skip
                x_rec, x_edit = S.lockstep_passes(
                    unet, maps, x_T, reference, edit, amount=o.cross_attention_guidance_amount, guidance_scale=gs,
                    runner=runner, phase=lambda name: setattr(self, "phase", name),
                )  # fmt: skip
                _check_finite(x_rec, "reference")
                self.phase = None
                return x_rec, x_edit
            self.phase = "reference"
            predict = S.reference_predictor(unet, maps, guidance_scale=gs, runner=runner)
            x_rec = S.denoise(predict, x_T, **reference)
            _check_finite(x_rec, "reference")
            if self.interrupt:
                return x_rec, x_rec
            sched.set_timesteps(o.num_inference_steps, device="cpu")
            self.phase = "edit"
            x_edit = S.denoise(
                S.guided_predictor(unet, maps, amount=o.cross_attention_guidance_amount, guidance_scale=gs, runner=runner),
                x_T, sched, tensors={"prompt_embeds": edit_embeds}, progress=lambda i, k: self.progress("edit", i, k),
                **common,
            )  # fmt: skip
        self.phase = None
        return x_rec, x_edit

    @staticmethod
    def _fused(runner: S.UNetRunner, unet: Any, exact: bool) -> S.FusedProjections | None:
        """Under CUDA graphs or ``torch.compile`` each attention layer's projections run as one matrix
        product (`S.FusedProjections`, kept with the runner's graphs; the same numbers on an H200,
        1-3% off a UNet pass); eager loops and exact attention keep diffusers' three."""
        if runner.mode == "eager" or exact:
            return None
        return runner.resource(("fused-projections", id(unet)), lambda: S.FusedProjections(unet))

    def _lockstep(self, sched, x_T, step_kw, exact, o) -> bool:
        """``o.passes`` resolved: ``"auto"`` runs the passes in step unless attention is exact
        (diffusers' numerics), the maps are kept on another device, or the sampler draws random
        numbers (its draws would interleave; `S.draws_random_numbers`)."""
        if o.passes == "sequential":
            return False
        if o.attention_maps_device is not None:  # (with passes="lockstep": refused in _check_options)
            return False
        if o.passes == "lockstep":
            return True
        return not exact and not S.draws_random_numbers(sched, tuple(x_T.shape), step_kw)

    def _result(
        self, vae, images, pixels, x_edit, x_rec, inverted, prompts, negative, runner, o
    ) -> EditResult:
        """Step 5: decode the edit (and the reconstruction, the inversion) to ``output_type``."""
        real, ot = pixels is not None, o.output_type

        def one(x):
            return x[0] if ot == "pil" and isinstance(x, list) and len(x) == 1 else x

        out = S.decode_latents(vae, x_edit, ot, runner=runner)
        rec = (
            S.decode_latents(vae, x_rec, ot, runner=runner) if (o.return_reconstruction or not real) else None
        )
        extra: dict[str, Any] = {
            "negative_prompt": "" if negative is None else negative, "num_inference_steps": o.num_inference_steps, "guidance_scale": o.guidance_scale,
            "cross_attention_guidance_amount": o.cross_attention_guidance_amount, "seed": o.seed,
            "mode": "real" if real else "synthetic", "loops": runner.mode, "passes": self._passes, "scheduler": type(self.schedulers()[0]).__name__,
        }  # fmt: skip
        if o.return_inversion_images and inverted is not None:
            extra["inversion_images"] = S.decode_latents(vae, inverted, ot, runner=runner)
        return EditResult(
            image=one(out), original=one(images) if real else one(rec), caption=prompts if isinstance(prompts, (str, list)) else None,
            inverted_latents=inverted, reconstruction=one(rec) if real else None, extra=extra,
        )  # fmt: skip


def _check_options(images: list[Any] | None, o: Pix2PixZeroOptions) -> None:
    """Refuse options pix2pix-zero cannot use, before any model work, saying what to pass instead."""
    if o.num_inference_steps < 1:
        raise EditorOptionError(f"num_inference_steps must be at least 1, not {o.num_inference_steps}")
    if o.output_type not in (*OUTPUT_TYPES, "numpy"):
        raise EditorOptionError(
            f"output_type must be one of {', '.join(OUTPUT_TYPES)}; not {o.output_type!r}"
        )
    if o.callback_steps < 1:
        raise EditorOptionError(f"callback_steps must be a positive integer, not {o.callback_steps}")
    if images is None and o.prompt is None and o.prompt_embeds is None:
        raise EditorOptionError(
            "without an image, pix2pix-zero generates one from a prompt: pass prompt='a photo of a cat' "
            "(and a seed), or give an image to edit"
        )
    if o.prompt is not None and o.prompt_embeds is not None:
        raise EditorOptionError("give prompt or prompt_embeds, not both")
    try:
        S.check_callback_inputs(o.callback_on_step_end_tensor_inputs, ("latents", "prompt_embeds"))
    except ValueError as e:
        raise EditorOptionError(str(e)) from None
    if o.attention not in ("auto", "exact", "fused"):
        raise EditorOptionError(f"attention must be 'auto', 'exact' or 'fused', not {o.attention!r}")
    if o.passes not in ("auto", "lockstep", "sequential"):
        raise EditorOptionError(f"passes must be 'auto', 'lockstep' or 'sequential', not {o.passes!r}")
    if o.passes == "lockstep" and o.attention_maps_device is not None:
        raise EditorOptionError(
            "attention_maps_device keeps every step's maps, which passes='lockstep' does not need: "
            "drop attention_maps_device, or use passes='sequential'"
        )


def _check_finite(latents: torch.Tensor, phase: str) -> None:
    if not torch.isfinite(latents).all():
        raise EditorError(f"the latents became NaN or infinite during the {phase} phase; {NAN_ADVICE}")


@hookimpl
def p2pz_register_editors() -> list[Any]:
    return [Pix2PixZeroEditor]


@hookimpl
def p2pz_register_image_captioners() -> list[Any]:
    return [BlipCaptioner]
