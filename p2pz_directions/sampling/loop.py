"""The denoising loop and the inversion loop: one loop for any diffusers scheduler.

A sampler is a *predictor* plus a scheduler. The predictor ``predict(x, t, i, tensors)`` gets the
scheduler-scaled model input ``x`` (``scheduler.scale_model_input(latents, t)``), the timestep,
the step index and the named tensors of the loop (``tensors``, e.g. ``{"prompt_embeds": ...}``),
and returns the (guided) model output - or ``(model_output, latents)`` when it also moves the
latents, as pix2pix-zero's cross-attention guidance does. The loop does the rest as diffusers'
pipelines do: ``scheduler.step`` with the extra arguments the step accepts, ``callback_on_step_end``
with the requested tensors (which it may replace) and ``interrupt``, the legacy
``callback(step, t, latents)`` every ``callback_steps`` steps, and ``progress(done, total)``.

>>> from p2pz_directions.sampling import cfg_predictor, denoise, extra_step_kwargs   # doctest: +SKIP
>>> scheduler.set_timesteps(50)                                                     # doctest: +SKIP
>>> predict = cfg_predictor(unet, guidance_scale=7.5)                               # doctest: +SKIP
>>> latents = denoise(predict, noise * scheduler.init_noise_sigma, scheduler,       # doctest: +SKIP
...                   tensors={"prompt_embeds": torch.cat([neg, pos])},
...                   extra_step_kwargs=extra_step_kwargs(scheduler, generator, eta))
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple, Protocol

import torch

from p2pz_directions.sampling.guidance import cfg, do_cfg, guidance_scale_embedding
from p2pz_directions.sampling.runner import UNetRunner
from p2pz_directions.sampling.schedulers import is_inverse_scheduler

__all__ = [
    "LoopState",
    "Predictor",
    "StepEndCallback",
    "StepRequest",
    "cfg_predictor",
    "check_callback_inputs",
    "denoise",
    "denoise_steps",
    "invert",
    "unet_forward",
]


class Predictor(Protocol):
    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, i: int, tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


#: ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`` (diffusers' signature)
StepEndCallback = Callable[[Any, int, Any, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]


class LoopState:
    """What a ``callback_on_step_end`` receives as ``pipe`` when no pipeline is given. As with a
    diffusers pipeline, setting ``pipe._interrupt = True`` (or ``pipe.interrupt = True``) stops the
    loop after this step; the latents so far are returned."""

    def __init__(self) -> None:
        self._interrupt = False
        self.num_timesteps = 0

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)


def check_callback_inputs(names: Sequence[str] | None, allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` (as diffusers' ``check_inputs``) when a requested tensor is not offered."""
    bad = [n for n in names or () if n not in allowed]
    if bad:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs has {', '.join(bad)}; this loop offers: {', '.join(allowed)}"
        )


class StepRequest(NamedTuple):
    """What `denoise_steps` asks for at a step: the predictor's arguments ``(x, t, i, tensors)``
    and the latents before the step (unscaled; what the loop returns if it is stopped here)."""

    x: torch.Tensor
    t: Any
    i: int
    tensors: dict[str, torch.Tensor]
    latents: torch.Tensor


def _steps(
    latents: torch.Tensor,
    scheduler: Any,
    timesteps: Sequence[Any] | torch.Tensor | None,
    tensors: dict[str, torch.Tensor] | None,
    extra_step_kwargs: dict[str, Any] | None,
    callback_on_step_end: StepEndCallback | None,
    callback_on_step_end_tensor_inputs: Sequence[str] | None,
    pipe: Any,
    callback: Callable[[int, Any, torch.Tensor], None] | None,
    callback_steps: int,
    progress: Callable[[int, int], None] | None,
    num_inference_steps: int | None,
    intermediates: list[torch.Tensor] | None,
) -> Generator[StepRequest, Any, torch.Tensor]:
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    tensors = dict(tensors or {})
    tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
    check_callback_inputs(tensor_inputs, ["latents", *tensors])
    order = getattr(scheduler, "order", 1)
    n = len(timesteps)
    num_inference_steps = num_inference_steps or n // order
    num_warmup = n - num_inference_steps * order
    pipe = pipe if pipe is not None else LoopState()
    if hasattr(pipe, "num_timesteps"):
        pipe.num_timesteps = n
    done = 0
    # the scheduler gets each timestep as a CPU value: its arithmetic on a GPU timestep (an index into
    # alphas_cumprod, `prev_timestep >= 0`) would make the host wait for every UNet pass before it
    # queues the next; the predictor and the callbacks get the timesteps as given
    on_host = (
        timesteps.cpu() if isinstance(timesteps, torch.Tensor) and timesteps.device.type != "cpu" else None
    )
    for i, t in enumerate(timesteps):
        if getattr(pipe, "interrupt", False):
            break
        t_host = t if on_host is None else on_host[i]
        out = yield StepRequest(scheduler.scale_model_input(latents, t_host), t, i, tensors, latents)
        if isinstance(out, tuple):
            out, latents = out
        latents = scheduler.step(out, t_host, latents, **(extra_step_kwargs or {}), return_dict=False)[0]
        if intermediates is not None:
            intermediates.append(latents.detach().clone())
        if callback_on_step_end is not None:
            kwargs = {k: (latents if k == "latents" else tensors[k]) for k in tensor_inputs}
            outputs = callback_on_step_end(pipe, i, t, kwargs) or {}
            latents = outputs.pop("latents", latents)
            for k in list(tensors):
                tensors[k] = outputs.pop(k, tensors[k])
        if i == n - 1 or ((i + 1) > num_warmup and (i + 1) % order == 0):
            done += 1
            if progress is not None:
                progress(done, num_inference_steps)
            if callback is not None and i % callback_steps == 0:
                callback(i // order, t, latents)
    return latents


#: `denoise`'s keyword arguments in `_steps`' order, with their defaults
_LOOP_DEFAULTS: dict[str, Any] = dict(
    timesteps=None, tensors=None, extra_step_kwargs=None, callback_on_step_end=None,
    callback_on_step_end_tensor_inputs=None, pipe=None, callback=None, callback_steps=1, progress=None,
    num_inference_steps=None, intermediates=None,
)  # fmt: skip


def _loop(predict: Predictor, *args: Any) -> torch.Tensor:
    steps = _steps(*args)
    try:
        request = next(steps)
        while True:
            request = steps.send(predict(*request[:4]))
    except StopIteration as stop:
        return stop.value


def denoise_steps(
    latents: torch.Tensor, scheduler: Any, **loop: Any
) -> Generator[StepRequest, Any, torch.Tensor]:
    """`denoise` (or `invert`, with an inverse scheduler) as a coroutine, for samplers that run
    several loops in step with one another (pix2pix-zero's reference and edit passes,
    `pix2pix_zero.lockstep_passes`): each step yields a `StepRequest` and is sent the predictor's
    output for it; the loop's return value (the final latents) is ``StopIteration.value``.
    ``loop``: `denoise`'s keyword arguments (``timesteps``, ``tensors``, ``extra_step_kwargs``, the
    callbacks, ``pipe``, ``progress``, ...).

    >>> steps = denoise_steps(latents, scheduler, tensors={"prompt_embeds": embeds})   # doctest: +SKIP
    >>> request = next(steps)                                                           # doctest: +SKIP
    >>> request = steps.send(predict(*request[:4]))   # ... until StopIteration         # doctest: +SKIP
    """
    unknown = set(loop) - set(_LOOP_DEFAULTS)
    if unknown:
        raise TypeError(f"denoise_steps got unexpected arguments {', '.join(sorted(unknown))}")
    kw = {**_LOOP_DEFAULTS, **loop}
    return _steps(latents, scheduler, *(kw[k] for k in _LOOP_DEFAULTS))


def denoise(
    predict: Predictor,
    latents: torch.Tensor,
    scheduler: Any,
    *,
    timesteps: Sequence[Any] | torch.Tensor | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    extra_step_kwargs: dict[str, Any] | None = None,
    callback_on_step_end: StepEndCallback | None = None,
    callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
    pipe: Any = None,
    callback: Callable[[int, Any, torch.Tensor], None] | None = None,
    callback_steps: int = 1,
    progress: Callable[[int, int], None] | None = None,
    num_inference_steps: int | None = None,
    intermediates: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Ancestral sampling ``x_T -> x_0`` along ``scheduler`` (DDPM, Ho et al. 2020, Algorithm 2, in the
    form of whatever ``scheduler.step`` implements: DDIM eq. 12, Euler, LMS, DPM-Solver, ...).

    ``timesteps`` defaults to ``scheduler.timesteps`` (set them first; for img2img use
    `strength_timesteps`). ``latents`` must already be scaled by ``init_noise_sigma`` where that
    applies. ``pipe`` is what ``callback_on_step_end`` gets as its first argument (a `LoopState`
    by default); its ``interrupt`` attribute, once true, ends the loop. ``intermediates``, a list,
    receives the latents after every step. Returns the final latents.
    """
    return _loop(
        predict, latents, scheduler, timesteps, tensors, extra_step_kwargs, callback_on_step_end,
        callback_on_step_end_tensor_inputs, pipe, callback, callback_steps, progress, num_inference_steps,
        intermediates,
    )  # fmt: skip


def invert(
    predict: Predictor,
    latents: torch.Tensor,
    inverse_scheduler: Any,
    *,
    timesteps: Sequence[Any] | torch.Tensor | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    extra_step_kwargs: dict[str, Any] | None = None,
    callback_on_step_end: StepEndCallback | None = None,
    callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
    pipe: Any = None,
    callback: Callable[[int, Any, torch.Tensor], None] | None = None,
    callback_steps: int = 1,
    progress: Callable[[int, int], None] | None = None,
    num_inference_steps: int | None = None,
    intermediates: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Inversion ``x_0 -> x_T``: the deterministic DDIM update run backwards (Song et al. 2021,
    eq. 13 read from t to t+1; Mokady et al. 2023, eq. 4), or any other ``*InverseScheduler``
    (``DDIMInverseScheduler``, ``DPMSolverMultistepInverseScheduler``). The same loop as `denoise`;
    ``inverse_scheduler`` must be an inverse scheduler (make one from a pipeline's scheduler with
    ``copy_scheduler(pipe.scheduler, DDIMInverseScheduler)``), with its timesteps set.
    """
    if not is_inverse_scheduler(inverse_scheduler):
        raise ValueError(
            f"invert needs an inverse scheduler (DDIMInverseScheduler, DPMSolverMultistepInverseScheduler), "
            f"not {type(inverse_scheduler).__name__}; make one with copy_scheduler(scheduler, DDIMInverseScheduler)"
        )
    return _loop(
        predict, latents, inverse_scheduler, timesteps, tensors, extra_step_kwargs, callback_on_step_end,
        callback_on_step_end_tensor_inputs, pipe, callback, callback_steps, progress, num_inference_steps,
        intermediates,
    )  # fmt: skip


def unet_forward(
    unet: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    *,
    timestep_cond: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    added_cond_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``unet(x, t, encoder_hidden_states=embeds, ...).sample`` (only the extra arguments that are given)."""
    kw: dict[str, Any] = {}
    if timestep_cond is not None:
        kw["timestep_cond"] = timestep_cond
    if cross_attention_kwargs is not None:
        kw["cross_attention_kwargs"] = cross_attention_kwargs
    if added_cond_kwargs is not None:
        kw["added_cond_kwargs"] = added_cond_kwargs
    return unet(x, t, encoder_hidden_states=embeds, return_dict=False, **kw)[0]


def cfg_predictor(
    unet: Any,
    *,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    embeds_key: str = "prompt_embeds",
    runner: UNetRunner | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    name: str = "cfg",
) -> Predictor:
    """The predictor of text-to-image / img2img sampling: the UNet on ``[x; x]`` with
    ``tensors[embeds_key] = [uncond; cond]`` and `cfg` (with ``guidance_rescale``), or the UNet on
    ``x`` alone when guidance is off (``guidance_scale <= 1``) or the UNet embeds the guidance scale
    (``time_cond_proj_dim``, LCM: ``timestep_cond = guidance_scale_embedding(guidance_scale - 1)``).
    With a ``runner`` each UNet pass goes through it (CUDA graphs, compile)."""
    guided = do_cfg(unet, guidance_scale)
    proj = getattr(unet.config, "time_cond_proj_dim", None)
    timestep_cond = None
    if proj is not None:
        timestep_cond = guidance_scale_embedding(torch.tensor([guidance_scale - 1.0]), embedding_dim=proj).to(
            device=unet.device, dtype=unet.dtype
        )
    runner = runner or UNetRunner("eager")

    def step(x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        model_in = torch.cat([x] * 2) if guided else x
        tc = None if timestep_cond is None else timestep_cond.expand(model_in.shape[0], -1)
        out = unet_forward(
            unet, model_in, t, embeds, timestep_cond=tc, cross_attention_kwargs=cross_attention_kwargs
        )
        return cfg(out, guidance_scale, guidance_rescale) if guided else out

    # predictors of one name and key share a graph / compiled step (DiffEdit's mask, inversion and
    # edit): the key holds everything ``step`` closes over
    xa = None if cross_attention_kwargs is None else id(cross_attention_kwargs)
    key = (id(unet), guidance_scale, guidance_rescale, guided, xa)

    def predict(x: torch.Tensor, t: Any, i: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        return runner(name, step, x, t, tensors[embeds_key], key=key)

    return predict
