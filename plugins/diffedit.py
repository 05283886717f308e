"""DiffEdit (Couairon et al., ICLR 2023, arXiv 2210.11427) along a direction: a thin pipeline over
`p2pz_directions.sampling` (the DiffEdit-only parts in `p2pz_directions.sampling.diffedit`).

A direction's concepts stand in for the prompts of the diffusers docs' recipe: the mask from the
source vs the target concept, the inversion conditioned on the source, the denoising with the
target and the source as negative prompt, the inverted latents kept outside the mask. One ``edit``
call equals ``StableDiffusionDiffEditPipeline``'s ``generate_mask`` -> ``invert`` -> ``__call__``
with one generator (the tests re-run diffusers' own DiffEdit fast tests against it), with the
pipeline's own ``scheduler`` and ``inverse_scheduler`` (DDIM or DPM-Solver multistep).

Where we differ from diffusers, on purpose: the image is VAE-encoded once (not once per mask draw);
the mask's unconditional branch runs once when both negatives are equal; ``latents=`` (a start
other than the most-noised inverted latent) is honoured (diffusers ignores it); masks of a batch
with ``num_images_per_prompt > 1`` follow their images (diffusers tiles them in the wrong order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2pz_directions import sampling as S
from p2pz_directions.core.concept import Direction
from p2pz_directions.editing import images as imgs
from p2pz_directions.editing.editors import Editor, EditorError, EditorOptionError, EditResult
from p2pz_directions.editing.hookspecs import hookimpl
from p2pz_directions.sampling import diffedit as D

__all__ = ["DiffEditEditor", "DiffEditOptions", "mask_to_image", "prepare_mask"]


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DiffEditOptions:
    """Every option of the DiffEdit editor (diffusers' names where it has them)."""

    # conditioning (default: the direction's concepts); each text has an *_embeds twin ([1 or B, 77, D])
    source_prompt: str | list[str] | None = _opt(
        None, "text instead of the source concept, everywhere it is used"
    )
    target_prompt: str | list[str] | None = _opt(
        None, "text instead of the target concept, everywhere it is used"
    )
    prompt: str | list[str] | None = _opt(None, "the inversion's prompt (default: the source)")
    negative_prompt: str | list[str] | None = _opt(None, "the edit's negative prompt (default: the source)")
    source_negative_prompt: str | list[str] | None = _opt(None, "the mask's source negative (default: '')")
    target_negative_prompt: str | list[str] | None = _opt(None, "the mask's target negative (default: '')")
    inversion_negative_prompt: str | list[str] | None = _opt(None, "the inversion's negative (default: '')")
    source_prompt_embeds: torch.Tensor | None = _opt(None, "embeddings instead of source_prompt")
    target_prompt_embeds: torch.Tensor | None = _opt(None, "embeddings instead of target_prompt")
    prompt_embeds: torch.Tensor | None = _opt(None, "embeddings instead of prompt")
    negative_prompt_embeds: torch.Tensor | None = _opt(None, "embeddings instead of negative_prompt")
    source_negative_prompt_embeds: torch.Tensor | None = _opt(
        None, "embeddings instead of source_negative_prompt"
    )
    target_negative_prompt_embeds: torch.Tensor | None = _opt(
        None, "embeddings instead of target_negative_prompt"
    )
    inversion_negative_prompt_embeds: torch.Tensor | None = _opt(
        None, "embeddings instead of inversion_negative_prompt"
    )
    # mask
    mask: Any = _opt(None, "a mask (path, image, array, tensor; white = edit) instead of the generated one")
    mask_image: Any = _opt(None, "diffusers' name for mask")
    num_maps_per_mask: int = _opt(10, "noise draws averaged into the mask")
    mask_encode_strength: float = _opt(0.5, "how far the image is noised for the mask, in (0, 1]")
    mask_thresholding_ratio: float = _opt(3.0, "the map is clamped at this times its mean, then cut at 0.5")
    mask_guidance_scale: float | None = _opt(
        None, "guidance of the mask's predictions (default: guidance_scale)"
    )
    mask_only: bool = _opt(False, "stop after the mask (the result's image is the mask)")
    mask_passes: str = _opt(
        "auto",
        "'batch': the mask's UNet passes in one batch (diffusers'); 'draws': one call per noise draw "
        "through the edit's CUDA graph; 'auto': draws unless the loops are eager",
    )
    # inversion
    inpaint_strength: float = _opt(0.8, "the encoding ratio: how far the image is inverted, in (0, 1]")
    inversion_guidance_scale: float | None = _opt(None, "guidance of the inversion (default: guidance_scale)")
    num_reg_steps: int = _opt(0, "pix2pix-zero's noise regularization steps during inversion")
    lambda_auto_corr: float = _opt(20.0, "weight of the auto-correlation regularizer")
    lambda_kl: float = _opt(20.0, "weight of the KL regularizer")
    num_auto_corr_rolls: int = _opt(5, "random rolls of the auto-correlation regularizer")
    image_latents: torch.Tensor | None = _opt(
        None, "inverted latents [B, T, C, h, w] of an earlier run (skips inversion)"
    )
    decode_latents: bool = _opt(False, "decode every inverted latent into extra['inversion_images']")
    inversion_callback: Any = _opt(None, "fn(step, t, latents) during inversion, every callback_steps steps")
    # edit
    num_inference_steps: int = _opt(50, "steps of the whole schedule")
    guidance_scale: float = _opt(7.5, "classifier-free guidance of the edit")
    eta: float = _opt(0.0, "DDIM's eta (schedulers that take it)")
    num_images_per_prompt: int = _opt(1, "edits per image")
    latents: torch.Tensor | None = _opt(None, "start here instead of the most-noised inverted latent")
    seed: int | None = _opt(0, "seed of a CPU generator, when no generator is given")
    generator: Any = _opt(None, "one torch.Generator (used for mask, inversion and edit, in that order)")
    output_type: str = _opt("pil", "'pil', 'np', 'pt' or 'latent'")
    callback: Any = _opt(None, "fn(step, t, latents) during the edit, every callback_steps steps")
    callback_steps: int = _opt(1, "how often the step callbacks are called")
    callback_on_step_end: Any = _opt(None, "fn(editor, step, t, tensors) -> tensors after each edit step")
    callback_on_step_end_tensor_inputs: tuple[str, ...] = _opt(("latents",), "of latents, prompt_embeds")
    cross_attention_kwargs: dict[str, Any] | None = _opt(None, "passed to the UNet's attention processors")
    clip_skip: int | None = _opt(None, "CLIP layers skipped for positive prompts")
    cuda_graphs: bool | None = _opt(None, "replay the UNet from CUDA graphs (default: on for CUDA)")
    loops: str = _opt("auto", "eager, graphs (CUDA graphs), compile (torch.compile + graphs), or auto")


class OptionValueError(EditorOptionError, ValueError):
    """An option has a value the editor cannot use (a strength outside (0, 1], a count below 1...)."""


class DiffEditEditor(Editor):
    """DiffEdit with a direction's concepts in place of prompts.

    >>> ed = editors.get("diffedit", model="stabilityai/stable-diffusion-2-1")      # doctest: +SKIP
    >>> res = ed.edit(photo, "bowl of fruits->bowl of pears", seed=0)               # doctest: +SKIP
    >>> res.image, res.mask               # mask: white = edited, usable by inpainting pipelines
    """

    name = "diffedit"
    description = "DiffEdit: mask from source vs target noise, partial DDIM inversion, masked denoising"
    phases = ("mask", "invert", "edit")
    memory_advice = (
        "lower num_maps_per_mask or set mask_passes='draws' (with mask_passes='batch' the mask runs up to "
        "4 x num_maps_per_mask images in one UNet batch), use --dtype float16, or a smaller image"
    )
    options = DiffEditOptions
    component_names = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

    def run(self, images: list[Any] | None, direction: Direction, o: DiffEditOptions) -> EditResult:
        """Mask, invert, edit (options: `DiffEditOptions`). One generator is used in diffusers' order."""
        # 1. check inputs (images at full precision, `images.prepare_image`); the pipeline's schedulers
        user_mask, n_edit = _check(images, o)
        image, note = imgs.prepare_image(images if len(images) > 1 else images[0], self.image_multiple)
        comps = self.load_components(("unet", "vae", "scheduler"))
        unet, vae = comps["unet"], comps["vae"]
        scheduler, inverse = D.diffedit_schedulers(
            self._scheduler(comps["scheduler"]), self._inverse_scheduler()
        )
        gen = o.generator if o.generator is not None else S.make_generator(o.seed)
        extra: dict[str, Any] = {"notes": [note] if note else []}
        # 2. conditioning: one row per image
        n = imgs.num_images(image)
        text = _Text(self, unet, n, o.clip_skip)
        source = text(o.source_prompt, o.source_prompt_embeds, direction.source_embeds, "source_prompt")
        target = text(o.target_prompt, o.target_prompt_embeds, direction.target_embeds, "target_prompt")
        # 3. the image latents: one VAE pass, sampled as often as needed
        x = imgs.to_pixels(image, S.vae_scale_factor(vae)).to(device=self.device, dtype=vae.dtype)
        with torch.no_grad():
            encoded = vae.encode(x)
        # 4. mask (DiffEdit step 1): the user's, or from the source vs target noise predictions
        if user_mask is not None:
            mask = self._user_mask(user_mask, image, encoded, extra)
        else:
            mask = self._mask(unet, vae, scheduler, encoded, gen, text, source, target, o, extra)
        masks = [mask_to_image(m, imgs.image_size(image, S.vae_scale_factor(vae))) for m in mask]
        extra["latent_mask"] = mask[:, None].float().cpu()
        if o.mask_only:
            return EditResult(image=_one(masks), original=_one(image), mask=_one(masks), extra=extra)
        # 5. inversion to inpaint_strength (DiffEdit step 2), or the latents of an earlier one
        inverted = o.image_latents
        if inverted is None:
            inverted = self._invert(unet, vae, inverse, encoded, text, source, gen, o, n_edit, extra)
        inverted = _check_latents(inverted, n, n_edit, o).to(device=self.device, dtype=self.dtype)
        # 6. denoising with mask guidance (DiffEdit step 3)
        neg = text(o.negative_prompt, o.negative_prompt_embeds, source, "negative_prompt")
        latents = self._denoise(unet, scheduler, inverted, mask, target, neg, gen, o, n_edit)
        # 7. decode
        edited = S.decode_latents(vae, latents, o.output_type)
        original = (
            image if o.output_type in ("pil", "latent") else S.postprocess_images(vae, x, o.output_type)
        )
        return EditResult(
            image=_one(edited),
            original=_one(original),
            inverted_latents=inverted,
            mask=_one(masks),
            extra=extra,
        )

    # -- the steps ------------------------------------------------------------------------------------
    def _scheduler(self, scheduler: Any) -> Any:
        """The model's scheduler; a model folder's that DiffEdit does not run (SD 1.4 ships PNDM) is
        replaced by DDIM with its settings, as diffusers' docs do, with a warning. A ``pipe=``'s
        scheduler is the user's choice: never replaced (refused if unsupported)."""
        if self.pipe is None and not any(S.is_scheduler(scheduler, n) for n in D.DIFFEDIT_SCHEDULERS):
            import warnings

            DDIMScheduler = S.scheduler_class("DDIMScheduler", like=scheduler)  # noqa: N806
            warnings.warn(
                f"{self.model_label} ships {type(scheduler).__name__}, which DiffEdit does not run; using "
                f"DDIMScheduler with its settings (pass pipe= with DPMSolverMultistepScheduler for DPM-Solver)",
                UserWarning,
                stacklevel=4,
            )
            return S.copy_scheduler(scheduler, DDIMScheduler)
        return scheduler

    def _inverse_scheduler(self) -> Any:
        """The pipeline's ``inverse_scheduler`` (``pipe=``, or a folder that has one), else None."""
        if self.pipe is not None:
            return getattr(self.pipe, "inverse_scheduler", None)
        if self.model is not None and (Path(self.model) / "inverse_scheduler").is_dir():
            if "inverse_scheduler" not in self._components:
                import diffusers

                cfg = diffusers.DDIMInverseScheduler.load_config(self.model, subfolder="inverse_scheduler")
                cls = getattr(diffusers, cfg.get("_class_name", "DDIMInverseScheduler"))
                self._components["inverse_scheduler"] = cls.from_config(cfg)
            return self._components["inverse_scheduler"]
        return None

    def _user_mask(self, user_mask, image, encoded, extra) -> torch.Tensor:
        """Step 4 with a mask given: one per image (or one for all) at latent resolution (`prepare_mask`)."""
        size, n = imgs.image_size(image), imgs.num_images(image)
        lat_h, lat_w = D.draw_latents(encoded, 1, None, 1.0).shape[-2:]
        items = user_mask if isinstance(user_mask, list) else [user_mask]
        if len(items) not in (1, n):
            raise OptionValueError(f"got {len(items)} masks for {n} images; give one mask, or one per image")
        ms = []
        for m in items:
            t, notes = prepare_mask(m, size, (lat_w, lat_h))
            ms.append(t)
            extra["notes"].extend(notes)
        extra["mask_source"] = "user"
        mask = torch.cat(ms)[:, 0]
        return (mask.expand(n, -1, -1) if mask.shape[0] == 1 else mask).to(
            device=self.device, dtype=self.dtype
        )

    def _mask(self, unet, vae, scheduler, encoded, gen, text, source, target, o, extra) -> torch.Tensor:
        """Step 4: DiffEdit's mask from ``num_maps_per_mask`` noise draws (`sampling.diffedit.diffedit_mask`)."""
        maps = o.num_maps_per_mask
        lat = D.draw_latents(encoded, maps, gen, vae.config.scaling_factor).to(self.dtype)
        noise = S.randn(tuple(lat.shape), gen, self.device, lat.dtype)
        rows = lambda e: e.repeat_interleave(maps, dim=0)  # noqa: E731 - one row per draw
        g = o.guidance_scale if o.mask_guidance_scale is None else o.mask_guidance_scale
        runner = self.options_runner(o)
        passes = (
            o.mask_passes if o.mask_passes != "auto" else ("batch" if runner.mode == "eager" else "draws")
        )
        # one call per draw goes through the edit's predictor (same graph); a UNet that embeds the
        # guidance scale (LCM) would be guided differently there, so its mask stays one batch
        if S.do_cfg(unet, g) != (g > 1.0):
            passes = "batch"
        predict = None
        if passes == "draws":
            predict = S.cfg_predictor(
                unet, guidance_scale=g, runner=runner, cross_attention_kwargs=o.cross_attention_kwargs
            )
        self.progress("mask", 0, maps if predict is not None else 1)
        mask, gmap = D.diffedit_mask(
            unet, scheduler, lat, noise, rows(source), rows(target), num_maps=maps,
            num_inference_steps=o.num_inference_steps, mask_encode_strength=o.mask_encode_strength,
            mask_thresholding_ratio=o.mask_thresholding_ratio, guidance_scale=g,
            source_negative=rows(text(o.source_negative_prompt, o.source_negative_prompt_embeds, "", "source_negative_prompt")),
            target_negative=rows(text(o.target_negative_prompt, o.target_negative_prompt_embeds, "", "target_negative_prompt")),
            cross_attention_kwargs=o.cross_attention_kwargs, predict=predict,
            progress=None if predict is None else (lambda i, m: self.progress("mask", i, m)),
        )  # fmt: skip
        extra.update(mask_source="generated", mask_map=gmap.float().cpu(), mask_passes=passes)
        if predict is None:
            self.progress("mask", 1, 1)
        return mask

    def _invert(self, unet, vae, inverse, encoded, text, source, gen, o, n_edit, extra) -> torch.Tensor:
        """Step 5: the latents of each inversion step, ``[B, T, C, h, w]`` (decoded into
        ``extra["inversion_images"]`` when asked), from one draw of the image latents."""
        latents = D.draw_latents(encoded, 1, gen, vae.config.scaling_factor).to(self.dtype)
        g = o.guidance_scale if o.inversion_guidance_scale is None else o.inversion_guidance_scale
        cond = text(o.prompt, o.prompt_embeds, source, "prompt")
        embeds = cond
        if g > 1.0:
            neg = text(
                o.inversion_negative_prompt,
                o.inversion_negative_prompt_embeds,
                "",
                "inversion_negative_prompt",
            )
            embeds = torch.cat([neg, cond])
        predict = D.inversion_predictor(
            unet, inverse, guidance_scale=g, runner=self.options_runner(o), cross_attention_kwargs=o.cross_attention_kwargs,
            num_reg_steps=o.num_reg_steps, lambda_auto_corr=o.lambda_auto_corr, lambda_kl=o.lambda_kl,
            num_auto_corr_rolls=o.num_auto_corr_rolls, generator=gen,
        )  # fmt: skip
        steps: list[torch.Tensor] = []
        self.progress("invert", 0, n_edit)
        S.invert(
            predict, latents, inverse, timesteps=D.inverse_timesteps(inverse, o.num_inference_steps, o.inpaint_strength, self.device),
            tensors={"prompt_embeds": embeds}, callback=o.inversion_callback, callback_steps=o.callback_steps,
            progress=lambda i, m: self.progress("invert", i, m), intermediates=steps,
        )  # fmt: skip
        out = torch.stack(steps[::-1], 1)
        if not torch.isfinite(out).all():
            raise EditorError(
                f"{self.name}: the inverted latents hold NaN or infinite values; lower guidance_scale or use float32"
            )
        if o.decode_latents:
            extra["inversion_images"] = S.decode_latents(vae, out.flatten(0, 1), o.output_type)
        return out

    def _denoise(self, unet, scheduler, inverted, mask, target, neg, gen, o, n_edit) -> torch.Tensor:
        """Step 6: denoise from the last inverted latents with the target (and ``neg``), keeping each
        step's inverted latents outside the mask (`sampling.diffedit.mask_guidance_callback`)."""
        k = o.num_images_per_prompt
        per_step = inverted.transpose(0, 1).repeat_interleave(k, dim=1)  # [T, B * k, C, h, w]
        mask = mask[:, None].repeat_interleave(k, dim=0)
        if o.guidance_scale <= 1.0:
            embeds = target.repeat_interleave(k, dim=0)
        else:
            embeds = torch.cat([neg.repeat_interleave(k, dim=0), target.repeat_interleave(k, dim=0)])
        start = (
            per_step[0].clone() if o.latents is None else o.latents.to(device=self.device, dtype=self.dtype)
        )
        timesteps = D.diffedit_timesteps(scheduler, o.num_inference_steps, o.inpaint_strength, self.device)
        predict = S.cfg_predictor(
            unet, guidance_scale=o.guidance_scale, runner=self.options_runner(o), cross_attention_kwargs=o.cross_attention_kwargs,
        )  # fmt: skip
        self.progress("edit", 0, n_edit)
        latents = S.denoise(
            predict, start, scheduler, timesteps=timesteps, tensors={"prompt_embeds": embeds},
            extra_step_kwargs=S.extra_step_kwargs(scheduler, gen, o.eta),
            callback_on_step_end=D.mask_guidance_callback(mask, per_step, o.callback_on_step_end),
            callback_on_step_end_tensor_inputs=["latents", *[t for t in o.callback_on_step_end_tensor_inputs if t != "latents"]],
            pipe=self, callback=o.callback, callback_steps=o.callback_steps,
            progress=lambda i, m: self.progress("edit", i, m), num_inference_steps=n_edit,
        )  # fmt: skip
        if not torch.isfinite(latents).all():
            raise EditorError(
                f"{self.name}: the edited latents hold NaN or infinite values; lower guidance_scale or use float32"
            )
        return latents

    def generate_mask(self, image: Any, direction: Any, **options: Any) -> Any:
        """Only the mask, as an 8-bit PIL image the size of the (prepared) image: white = edit.

        >>> ed.generate_mask(photo, "bowl of fruits->bowl of pears").save("mask.png")   # doctest: +SKIP
        """
        return self.edit(image, direction, mask_only=True, **options).mask


class _Text:
    """Embeddings with one row per image: given ones (checked), encoded text, or a default."""

    def __init__(self, editor: Editor, unet: Any, n: int, clip_skip: int | None) -> None:
        self.editor, self.n, self.clip_skip = editor, n, clip_skip
        self.dim = int(unet.config.cross_attention_dim)
        self.cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, text: Any, embeds: torch.Tensor | None, default: Any, name: str) -> torch.Tensor:
        ed = self.editor
        if text is not None and embeds is not None:
            raise EditorOptionError(f"pass {name} or {name}_embeds, not both")
        if embeds is None and text is None and isinstance(default, torch.Tensor):
            embeds = default
        if embeds is not None:
            if not isinstance(embeds, torch.Tensor):
                raise EditorOptionError(
                    f"{name}_embeds must be a torch.Tensor [1, 77, D], not {type(embeds).__name__}"
                )
            e = embeds[None] if embeds.dim() == 2 else embeds
            if e.dim() != 3 or e.shape[-1] != self.dim or e.shape[0] not in (1, self.n):
                raise OptionValueError(
                    f"{name}_embeds has shape {list(embeds.shape)}; this model's UNet takes [1, L, {self.dim}] "
                    f"(or [{self.n}, L, {self.dim}], one per image) text embeddings"
                )
            return e.to(device=ed.device, dtype=ed.dtype).expand(self.n, -1, -1)
        text = default if text is None else text
        texts = [text] * self.n if isinstance(text, str) else text
        if not isinstance(texts, list) or len(texts) != self.n or not all(isinstance(t, str) for t in texts):
            raise EditorOptionError(
                f"{name} must be a string or a list of {self.n} strings (one per image), not {text!r}"
            )
        skip = None if name.endswith("negative_prompt") else self.clip_skip
        key = (tuple(texts), skip)
        if key not in self.cache:
            comps = ed.load_components(("tokenizer", "text_encoder"))
            self.cache[key] = S.encode_text(
                comps["tokenizer"], comps["text_encoder"], texts, ed.device, skip
            ).to(ed.dtype)
        return self.cache[key]


def _check(image: Any, o: DiffEditOptions) -> tuple[Any, int]:
    """The user mask (or None) and the number of edit steps, after checking every option."""
    if image is None:
        raise EditorOptionError(
            "diffedit edits an existing image: pass one (p2pz edit IMAGE ...). For an image generated "
            "from a prompt, use the pix2pix-zero editor"
        )
    if o.mask is not None and o.mask_image is not None:
        raise EditorOptionError("pass mask or mask_image (the same option), not both")
    if isinstance(o.generator, list):
        raise EditorOptionError(
            "diffedit takes one generator (its mask, inversion and edit draw from it in turn), not a list; "
            "for several images pass one generator or a seed"
        )
    user_mask = o.mask if o.mask is not None else o.mask_image
    for name in ("num_inference_steps", "num_images_per_prompt", "callback_steps"):
        _positive_int(getattr(o, name), name)
    n_edit = _steps_run(
        o.num_inference_steps, _strength(o.inpaint_strength, "inpaint_strength"), "inpaint_strength"
    )
    if user_mask is None:
        _steps_run(
            o.num_inference_steps,
            _strength(o.mask_encode_strength, "mask_encode_strength"),
            "mask_encode_strength",
        )
        _positive_int(o.num_maps_per_mask, "num_maps_per_mask")
        if o.mask_passes not in ("auto", "batch", "draws"):
            raise OptionValueError(f"mask_passes must be 'auto', 'batch' or 'draws', not {o.mask_passes!r}")
        if not o.mask_thresholding_ratio or o.mask_thresholding_ratio <= 0:
            raise OptionValueError(
                f"mask_thresholding_ratio must be positive, not {o.mask_thresholding_ratio!r}"
            )
    if o.num_reg_steps < 0 or o.num_auto_corr_rolls < 0:
        raise OptionValueError("num_reg_steps and num_auto_corr_rolls must be 0 or more")
    if o.output_type not in ("pil", "np", "pt", "latent"):
        raise OptionValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', not {o.output_type!r}")
    bad = [t for t in o.callback_on_step_end_tensor_inputs if t not in ("latents", "prompt_embeds")]
    if bad:
        raise OptionValueError(
            f"callback_on_step_end_tensor_inputs may only hold latents, prompt_embeds; not {bad}"
        )
    return user_mask, n_edit


def _check_latents(inverted: Any, n: int, n_edit: int, o: DiffEditOptions) -> torch.Tensor:
    if not isinstance(inverted, torch.Tensor):
        raise EditorOptionError("image_latents must be a tensor [B, T, C, h, w] from an earlier inversion")
    if inverted.dim() == 4:
        inverted = inverted.unsqueeze(0)
    if inverted.dim() != 5 or tuple(inverted.shape[:2]) != (n, n_edit):
        raise OptionValueError(
            f"image_latents has shape {list(inverted.shape)}, but {n} image(s) with num_inference_steps="
            f"{o.num_inference_steps} and inpaint_strength={o.inpaint_strength} need [{n}, {n_edit}, C, h, w]: "
            f"invert with the same settings"
        )
    return inverted


def _strength(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OptionValueError(f"{name} must be a number in (0, 1], not {value!r}") from None
    if not 0.0 < v <= 1.0:
        raise OptionValueError(
            f"{name}={value} is outside (0, 1]: it is the fraction of the schedule that is re-noised "
            f"(0.8 means 80% of the steps). Pass a value such as 0.5 or 0.8."
        )
    return v


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionValueError(f"{name} must be a positive whole number, not {value!r}")
    return value


def _steps_run(num_inference_steps: int, strength: float, name: str) -> int:
    n = min(int(num_inference_steps * strength), num_inference_steps)
    if n < 1:
        raise OptionValueError(
            f"{name}={strength} with num_inference_steps={num_inference_steps} runs no step at all "
            f"(int({num_inference_steps} * {strength}) = 0); raise one of them"
        )
    return n


def _one(images: Any) -> Any:
    """One image (not a batch of one) when one was made."""
    if (isinstance(images, list) or hasattr(images, "shape")) and len(images) == 1:
        return images[0]
    return images


# ---------------------------------------------------------------------------------------------------
# user masks
# ---------------------------------------------------------------------------------------------------
def _mask_array(mask: Any) -> tuple[Any, list[str]]:
    """A user mask as a float32 numpy ``[H, W]`` in 0..1, and notes on what was converted."""
    import numpy as np
    from PIL import Image

    notes: list[str] = []
    if isinstance(mask, (str, os.PathLike)):
        mask = _open_mask(Path(mask))
    if isinstance(mask, Image.Image):
        return _pil_mask_array(mask, notes), notes
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().float().numpy()
    if not isinstance(mask, np.ndarray):
        raise imgs.ImageError(
            f"cannot use a {type(mask).__name__} as a mask; give a path, PIL image, array or tensor"
        )
    return _numpy_mask_array(mask, notes), notes


def _open_mask(path: Path) -> Any:
    """The PIL image of a mask file (its mode kept: a 16-bit or float mask stays one)."""
    from PIL import Image

    if not path.is_file():
        raise imgs.ImageError(f"mask file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError) as e:
        raise imgs.ImageError(
            f"{path} is not a mask image Pillow can read ({e}); give a PNG with white = edit"
        ) from None


def _pil_mask_array(mask: Any, notes: list[str]) -> Any:
    """A PIL mask in 0..1: single-channel modes scaled by their range, others by luminance (noted)."""
    import numpy as np

    if mask.mode not in ("L", "1", "I", "I;16", "F"):
        notes.append(f"mask converted from mode {mask.mode} to one channel (luminance)")
        mask = mask.convert("L")
    arr = np.asarray(mask, dtype=np.float32)
    top = {"L": 255.0, "1": 1.0, "I;16": 65535.0}.get(mask.mode, 255.0 if arr.max() > 1 else 1.0)
    return arr / top


def _numpy_mask_array(mask: Any, notes: list[str]) -> Any:
    """An array mask (``[H, W]``, ``[1, H, W]``, ``[H, W, 1|3|4]`` or ``[3|4, H, W]``) as ``[H, W]``
    in 0..1: 8-bit values divided by 255, colours by luminance (noted), others checked to lie in 0..1."""
    import numpy as np

    arr = mask
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        chan_first = arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4)
        arr = np.moveaxis(arr, 0, -1) if chan_first else arr
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.shape[-1] in (3, 4):
            notes.append(f"mask converted from {arr.shape[-1]} channels to one (luminance)")
            arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if arr.ndim != 2:
        raise imgs.ImageError(
            f"a mask must be [H, W] (or [1, H, W], [H, W, 3]); got shape {list(mask.shape)}"
        )
    if mask.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise imgs.ImageError(
            f"mask values must lie in 0..1 (white = edit), or be 8-bit 0..255; got {arr.min():g}..{arr.max():g}"
        )
    return arr


def prepare_mask(
    mask: Any, image_size: tuple[int, int], latent_size: tuple[int, int]
) -> tuple[torch.Tensor, list[str]]:
    """A user mask as DiffEdit uses it: ``[1, 1, h, w]`` float 0/1 at latent resolution, and notes.

    Accepts a path, PIL image (any mode; not single-channel -> luminance, with a note), numpy array
    or tensor. White (>= 0.5) marks what is repainted. A mask the size of the image (``image_size``
    ``(W, H)``) or of the latents (``latent_size`` ``(w, h)``) is used as is (the first averaged down
    to the latent grid); any other size is resized to the image first, with a note.
    """
    import numpy as np
    from PIL import Image

    arr, notes = _mask_array(mask)
    h, w = arr.shape
    if (w, h) != tuple(latent_size):
        im = Image.fromarray(arr.astype(np.float32), mode="F")
        if (w, h) != tuple(image_size):
            notes.append(f"mask resized {w}x{h} -> {image_size[0]}x{image_size[1]} (the image size)")
            im = im.resize(tuple(image_size), resample=Image.Resampling.BILINEAR)
        im = im.resize(tuple(latent_size), resample=Image.Resampling.BOX)
        arr = np.asarray(im, dtype=np.float32)
    out = torch.from_numpy((arr >= 0.5).astype(np.float32))[None, None]
    return out, notes


def mask_to_image(mask: torch.Tensor, size: tuple[int, int]):
    """A latent-resolution 0/1 mask as an 8-bit PIL image of ``size`` ``(W, H)``: white = edited.

    The form inpainting pipelines take as ``mask_image``.
    """
    import numpy as np
    from PIL import Image

    m = mask.detach().float().cpu().reshape(mask.shape[-2:]).numpy()
    im = Image.fromarray((m >= 0.5).astype(np.uint8) * 255, mode="L")
    return im.resize(tuple(size), resample=Image.Resampling.NEAREST)


@hookimpl
def p2pz_register_editors() -> list[type[Editor]]:
    return [DiffEditEditor]
