"""SDEdit (Meng et al., ICLR 2022, arXiv 2108.01073): noise the image part way, denoise with new text.

The sampler is one plain function, `sdedit_sample`: add noise to the image latents at the first
timestep that ``strength`` keeps, then run the scheduler's loop with classifier-free guidance. It
reproduces ``StableDiffusionImg2ImgPipeline`` of diffusers step for step (the tests prove equality
on tiny models given the same prompt embeddings).

The editor class `SDEditEditor` chooses the conditioning from a direction:

- ``mode="direction"`` (default): the caption's embedding (BLIP, or ``prompt=``) moved along the
  direction, ``prompt_embeds + scale * delta``, as pix2pix-zero edits its prompt;
- ``mode="target"``: the target concept's embedding itself is the prompt.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["img2img_timesteps", "sdedit_sample"]


def img2img_timesteps(
    scheduler: Any,
    num_inference_steps: int | None,
    strength: float,
    *,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, int]:
    """The timesteps img2img runs at ``strength``, and how many there are.

    Sets the scheduler's schedule (``num_inference_steps``, or custom ``timesteps`` / ``sigmas``),
    keeps the last ``int(n * strength)`` steps and tells the scheduler where it begins.

    >>> from diffusers import DDIMScheduler
    >>> ts, n = img2img_timesteps(DDIMScheduler(steps_offset=1), 10, 0.5)
    >>> ts.tolist(), n
    ([401, 301, 201, 101, 1], 5)
    """
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass timesteps= or sigmas=, not both")
    params = set(inspect.signature(scheduler.set_timesteps).parameters)
    if timesteps is not None:
        if "timesteps" not in params:
            raise ValueError(
                f"{type(scheduler).__name__} does not take custom timesteps; use num_inference_steps"
            )
        scheduler.set_timesteps(timesteps=timesteps, device=device)
        num_inference_steps = len(scheduler.timesteps)
    elif sigmas is not None:
        if "sigmas" not in params:
            raise ValueError(
                f"{type(scheduler).__name__} does not take custom sigmas; use num_inference_steps"
            )
        scheduler.set_timesteps(sigmas=sigmas, device=device)
        num_inference_steps = len(scheduler.timesteps)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    init = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init, 0)
    order = getattr(scheduler, "order", 1)
    out = scheduler.timesteps[t_start * order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * order)
    return out, num_inference_steps - t_start


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32):
    """Sinusoidal embedding of the guidance scale, for UNets with ``time_cond_proj_dim`` (LCM)."""
    w = w * 1000.0
    half = embedding_dim // 2
    freq = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(dtype)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


StepEndCallback = Callable[[int, Any, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]


@torch.no_grad()
def sdedit_sample(
    unet: torch.nn.Module,
    scheduler: Any,
    image_latents: torch.Tensor,
    noise: torch.Tensor,
    embeds: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    timestep_cond: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, Any] | None = None,
    callback_on_step_end: StepEndCallback | None = None,
) -> torch.Tensor:
    """SDEdit: noise ``image_latents`` to ``timesteps[0]`` with ``noise``, then denoise.

    ``embeds`` is ``cat([negative, positive])`` when ``guidance_scale > 1``, else the positive ones;
    ``timesteps`` come from `img2img_timesteps`. ``callback_on_step_end(i, t, {"latents": ...})`` may
    return a dict whose ``"latents"`` replaces the current latents. Returns the final latents.
    """
    from p2pz_plugins.diffedit import cfg_noise_pred

    batch = image_latents.shape[0]
    x = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
    step_kwargs = _step_kwargs(scheduler, eta, generator)
    for i, t in enumerate(timesteps):
        noise_pred = cfg_noise_pred(
            unet,
            x,
            t,
            embeds,
            guidance_scale,
            scheduler=scheduler,
            cross_attention_kwargs=cross_attention_kwargs,
            timestep_cond=timestep_cond,
            added_cond_kwargs=added_cond_kwargs,
        )
        x = scheduler.step(noise_pred, t, x, **step_kwargs, return_dict=False)[0]
        if callback_on_step_end is not None:
            out = callback_on_step_end(i, t, {"latents": x})
            if out and "latents" in out:
                x = out["latents"]
    return x


def _step_kwargs(scheduler: Any, eta: float, generator: Any) -> dict[str, Any]:
    params = set(inspect.signature(scheduler.step).parameters)
    out: dict[str, Any] = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params:
        out["generator"] = generator
    return out


# ---------------------------------------------------------------------------------------------------
# the editor
# ---------------------------------------------------------------------------------------------------
from p2pz_directions.editors import Editor, EditorOptionError, EditResult  # noqa: E402
from p2pz_directions.hookspecs import hookimpl  # noqa: E402

MODES = ("direction", "target")


class SDEditEditor(Editor):
    """SDEdit along a direction: the image noised to ``strength``, denoised with the edited prompt.

    ``mode="direction"`` (default) conditions on the caption's embedding plus the direction's delta
    (the caption from BLIP, or ``prompt=``); ``mode="target"`` on the target concept's embedding.

    >>> ed = editors.get("sdedit", model="CompVis/stable-diffusion-v1-4")             # doctest: +SKIP
    >>> res = ed.edit(photo, "cat->dog", strength=0.75, seed=0)                       # doctest: +SKIP
    >>> res.image.save("dog.png"); res.caption                                        # doctest: +SKIP
    """

    name = "sdedit"
    description = "SDEdit (img2img): noise to a strength, denoise with the caption moved along the direction"
    phases = ("caption", "edit")
    memory_advice = "use --dtype float16, a smaller image, or num_images_per_prompt=1"

    def __init__(
        self, model: Any = None, *, captioner: Any = None, caption_model: str | None = None, **kw: Any
    ):
        super().__init__(model, **kw)
        self._captioner = captioner
        self.caption_model = caption_model

    @property
    def captioner(self) -> Any:
        """The image captioner (the ``blip`` image-captioner plugin unless another is given), made on first use."""
        cap = self._captioner
        if cap is None or isinstance(cap, str):
            from p2pz_directions import plugins

            name = cap or "blip"
            found = plugins.image_captioners()
            if name not in found:
                raise EditorOptionError(
                    f"no image captioner {name!r} is installed (installed: {', '.join(found) or 'none'}); "
                    f"pass prompt='a photo of a cat' (a caption of your image) instead"
                )
            kw: dict[str, Any] = {"device": self.device, "dtype": self.dtype}
            if self.caption_model:
                kw["model"] = self.caption_model
            self._captioner = found[name](**kw)
        return self._captioner

    def run(
        self,
        image: Any,
        direction: Any,
        *,
        mode: str = "direction",
        strength: float = 0.8,
        prompt: str | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt: str | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        source_as_negative: bool = False,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        seed: int | None = 0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor] | None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        callback: Callable[[int, Any, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        cuda_graphs: bool | None = None,
    ) -> EditResult:
        """Noise to ``strength``, denoise with the edited prompt. Options (diffusers' img2img names):

        - ``mode``: ``"direction"`` (caption embedding + delta) or ``"target"`` (target concept);
        - ``strength`` in (0, 1]: how much of the schedule is re-run (1 ignores the image's layout);
        - ``prompt`` / ``prompt_embeds``: the caption (direction mode; BLIP captions the image when
          neither is given); the direction's delta is added to it;
        - ``negative_prompt`` / ``negative_prompt_embeds`` (default ``""``), or
          ``source_as_negative=True`` for the source concept;
        - ``num_inference_steps``, ``timesteps`` / ``sigmas`` (custom schedules, where the
          scheduler takes them), ``guidance_scale``, ``num_images_per_prompt``, ``eta``, ``seed`` /
          ``generator``, ``output_type``, ``cross_attention_kwargs``, ``clip_skip``;
        - ``callback_on_step_end(editor, step, t, {"latents": ...})`` (may return new latents), or
          the older ``callback(step, t, latents)`` every ``callback_steps`` steps;
        - ``cuda_graphs`` (default on for CUDA; ``False`` for eager): replay the UNet from CUDA graphs (see
          `p2pz_plugins.diffedit.CudaGraphUNet`), captured on the first edit, reused after.

        With the same prompt embeddings and generator the result equals
        ``StableDiffusionImg2ImgPipeline``'s.
        """
        from p2pz_plugins._common import decode_latents as vae_decode
        from p2pz_plugins._common import image_processor, make_generator, randn
        from p2pz_plugins.diffedit import (
            OptionValueError,
            TextConditioning,
            _check_finite,
            _output,
            _positive_int,
            _steps_run,
            _strength,
            unet_runner,
        )

        if image is None:
            raise EditorOptionError(
                "sdedit edits an existing image: pass one (p2pz edit IMAGE ...). For an image generated from "
                "a prompt, use the pix2pix-zero editor"
            )
        if mode not in MODES:
            raise OptionValueError(f"mode must be 'direction' or 'target', not {mode!r}")
        strength = _strength(strength, "strength")
        k = _positive_int(num_images_per_prompt, "num_images_per_prompt")
        callback_steps = _positive_int(callback_steps, "callback_steps")
        if timesteps is None and sigmas is None:
            num_inference_steps = _positive_int(num_inference_steps, "num_inference_steps")
            _steps_run(num_inference_steps, strength, "strength")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise OptionValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', not {output_type!r}")
        bad = [n for n in callback_on_step_end_tensor_inputs if n != "latents"]
        if bad:
            raise OptionValueError(f"callback_on_step_end_tensor_inputs may only hold 'latents', not {bad}")
        if mode == "target" and (prompt is not None or prompt_embeds is not None):
            raise EditorOptionError(
                "mode='target' conditions on the target concept alone; drop prompt/prompt_embeds, or use "
                "mode='direction' to move your prompt along the direction"
            )
        if source_as_negative and (negative_prompt is not None or negative_prompt_embeds is not None):
            raise EditorOptionError("pass source_as_negative=True or a negative prompt, not both")

        comps = self.load_components(("unet", "vae", "scheduler"))
        unet, vae = comps["unet"], comps["vae"]
        dim = int(unet.config.cross_attention_dim)
        dev, dt = self.device, self.dtype
        text = TextConditioning(self, clip_skip)
        gen = generator if generator is not None else make_generator(seed)

        # -- conditioning -------------------------------------------------------------------------------
        caption = prompt
        if mode == "target":
            cond = direction.target_embeds.to(device=dev, dtype=dt)
        else:
            if prompt is None and prompt_embeds is None:
                self.progress("caption", 0, 1)
                caption = self.captioner.caption([image])[0]
                self.progress("caption", 1, 1)
            base = text.pick(caption, prompt_embeds, None, "prompt", dim)
            cond = base + direction.delta.to(device=dev, dtype=dt)
        embeds = cond
        if guidance_scale > 1.0:
            if source_as_negative:
                neg = direction.source_embeds.to(device=dev, dtype=dt)
            else:
                neg = text.pick(
                    negative_prompt,
                    negative_prompt_embeds,
                    lambda: text.encode("", positive=False),
                    "negative_prompt",
                    dim,
                    positive=False,
                )
            embeds = torch.cat([neg, cond])
        if k > 1:
            embeds = embeds.repeat_interleave(k, dim=0)

        # -- schedule, image latents, noise (diffusers' order of random draws) ---------------------------
        sched_src = comps["scheduler"]
        scheduler = type(sched_src).from_config(sched_src.config)
        try:
            ts, n_run = img2img_timesteps(
                scheduler, num_inference_steps, strength, timesteps=timesteps, sigmas=sigmas, device=dev
            )
        except ValueError as e:
            raise OptionValueError(str(e)) from None
        if len(ts) == 0:
            raise OptionValueError(f"strength={strength} leaves no step of the schedule to run; raise it")
        proc = image_processor(vae)
        x = proc.preprocess(image).to(device=dev, dtype=vae.dtype)
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        # one draw per generator (a list) or one for all images, as diffusers does; torch.cat keeps the
        # VAE's memory format (channels-last from the image processor), so the UNet rounds alike
        sf = vae.config.scaling_factor
        if isinstance(gen, list):
            if len(gen) != k:
                raise OptionValueError(f"got {len(gen)} generators for {k} images; pass one per image")
            draws = [
                dist.mean + dist.std * randn(tuple(dist.mean.shape), g, dev, dist.mean.dtype) for g in gen
            ]
            init = sf * torch.cat(draws, dim=0)
        else:
            init = sf * (dist.mean + dist.std * randn(tuple(dist.mean.shape), gen, dev, dist.mean.dtype))
            init = torch.cat([init] * k, dim=0)
        init = init.to(dt)
        noise = randn(tuple(init.shape), gen, dev, dt)

        timestep_cond = None
        if getattr(unet.config, "time_cond_proj_dim", None) is not None:
            w = torch.tensor(guidance_scale - 1).repeat(k)
            timestep_cond = guidance_scale_embedding(w, unet.config.time_cond_proj_dim).to(
                device=dev, dtype=dt
            )

        def on_step(i: int, t: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
            self.progress("edit", i + 1, n_run)
            out = None
            if callback_on_step_end is not None:
                out = callback_on_step_end(self, i, t, dict(tensors))
            if callback is not None and i % callback_steps == 0:
                callback(i, t, (out or tensors)["latents"])
            return out

        self.progress("edit", 0, n_run)
        latents = sdedit_sample(
            unet_runner(self, unet, cuda_graphs),
            scheduler,
            init,
            noise,
            embeds,
            ts,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=gen,
            cross_attention_kwargs=cross_attention_kwargs,
            timestep_cond=timestep_cond,
            callback_on_step_end=on_step,
        )
        _check_finite(latents, self.name, "edited")
        edited = vae_decode(vae, latents, output_type)
        original = image if output_type == "pil" else _output(proc.postprocess(x, output_type=output_type), 1)
        return EditResult(
            image=_output(edited, k),
            original=original,
            caption=caption,
            extra={"mode": mode, "strength": strength, "steps_run": n_run},
        )


@hookimpl
def p2pz_register_editors() -> list[type[Editor]]:
    return [SDEditEditor]
