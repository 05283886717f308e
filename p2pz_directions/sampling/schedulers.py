"""Schedulers: copy one without losing its settings, check it against a pipeline's list, and the
small rules diffusers' pipelines apply around ``scheduler.step`` (extra step arguments, strength,
custom timesteps).

Why copies lose settings: diffusers records the init arguments a scheduler was built with
*without* a value in ``config["_use_default_values"]``, and ``from_config`` drops those keys so
that they take the class default again. A Stable Diffusion pipeline that "fixes" an old
``steps_offset=0`` rewrites ``config["steps_offset"] = 1`` but leaves ``"steps_offset"`` in that
list, so ``DDIMScheduler.from_config(pipe.scheduler.config)`` silently goes back to
``steps_offset=0`` (timesteps 500, 0 instead of 501, 1 for 2 steps). `copy_scheduler` builds
the copy from every key the config holds.

>>> from diffusers import DDIMScheduler
>>> s = copy_scheduler(DDIMScheduler(steps_offset=1))
>>> s.config.steps_offset
1
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from p2pz_directions.editing.editors import EditorOptionError

__all__ = [
    "UnsupportedSchedulerError",
    "check_scheduler",
    "copy_scheduler",
    "custom_strength_timesteps",
    "draws_random_numbers",
    "extra_step_kwargs",
    "scheduler_class",
    "is_inverse_scheduler",
    "is_scheduler",
    "strength_timesteps",
]


class UnsupportedSchedulerError(EditorOptionError):
    """A scheduler that the editor's diffusers pipeline does not accept (the message names those it does)."""


def scheduler_class(name: str, like: Any = None) -> type:
    """diffusers' scheduler class ``name``, or p2pz's lean class of that name
    (`p2pz_directions.lean.schedulers`) when ``like`` is a lean scheduler: the inverse or DDIM copy
    of a folder's scheduler stays in its family (a lean edit never imports diffusers)."""
    if like is not None and type(like).__module__.startswith("p2pz_directions.lean"):
        from p2pz_directions.lean.schedulers import SCHEDULERS

        if name in SCHEDULERS:
            return SCHEDULERS[name]
    import diffusers

    return getattr(diffusers, name)


def copy_scheduler(scheduler: Any, cls: type | None = None) -> Any:
    """A fresh scheduler of ``cls`` (default: the same class) with every setting of ``scheduler``.

    Unlike ``cls.from_config(scheduler.config)``, values a pipeline patched into the config
    (``steps_offset=1``) are kept. Keys that still hold the source class's own default are left
    out, so that ``cls`` uses *its* default for them, as ``from_config`` does (``PNDMScheduler``
    and ``DDIMScheduler`` differ on ``set_alpha_to_one``, say).
    """
    config = dict(scheduler.config)
    used_defaults = set(config.pop("_use_default_values", None) or ())
    params = inspect.signature(type(scheduler).__init__).parameters
    for k in used_defaults:
        p = params.get(k)
        if p is not None and p.default is not inspect.Parameter.empty and _same(config.get(k), p.default):
            config.pop(k, None)
    return (cls or type(scheduler)).from_config(config)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - arrays and the like: treat as set on purpose
        return False


def _names(classes: tuple[type, ...] | tuple[str, ...]) -> list[str]:
    return [c if isinstance(c, str) else c.__name__ for c in classes]


def check_scheduler(
    scheduler: Any,
    supported: tuple[type | str, ...],
    *,
    role: str = "scheduler",
    pipeline: str = "the pipeline",
) -> Any:
    """Return ``scheduler`` if it is one of ``supported`` (classes or class names), else raise
    `UnsupportedSchedulerError` naming them. Never substitutes another scheduler."""
    names = _names(supported)
    if scheduler is None:
        raise UnsupportedSchedulerError(
            f"{pipeline} needs a {role}; give one of {', '.join(names)} (e.g. "
            f"{names[0]}.from_config(pipe.scheduler.config))"
        )
    if not any(is_scheduler(scheduler, n) for n in names):
        raise UnsupportedSchedulerError(
            f"{pipeline} does not support {type(scheduler).__name__} as its {role}; supported: "
            f"{', '.join(names)}. Set one, e.g. {role} = {names[0]}.from_config(pipe.{role}.config)"
        )
    return scheduler


def is_scheduler(scheduler: Any, name: str) -> bool:
    """Whether ``scheduler`` is a ``name`` (diffusers' class of that name, a subclass, or p2pz's lean
    class of that name): the test to use instead of ``isinstance`` with a diffusers class."""
    return name in {c.__name__ for c in type(scheduler).__mro__}


def is_inverse_scheduler(scheduler: Any) -> bool:
    """Whether ``scheduler`` walks from data to noise (``*InverseScheduler``, e.g. DDIMInverseScheduler)."""
    return type(scheduler).__name__.endswith("InverseScheduler")


def extra_step_kwargs(scheduler: Any, generator: Any = None, eta: float = 0.0) -> dict[str, Any]:
    """``eta`` and ``generator`` for ``scheduler.step``, each only if the step takes it (diffusers'
    ``prepare_extra_step_kwargs``; eta is DDIM's eta, Song et al. 2021, eq. 16)."""
    params = set(inspect.signature(scheduler.step).parameters)
    out: dict[str, Any] = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params:
        out["generator"] = generator
    return out


def draws_random_numbers(
    scheduler: Any,
    shape: tuple[int, ...],
    extra_step_kwargs: dict[str, Any] | None = None,
    timesteps: Any = None,
) -> bool:
    """Whether stepping ``scheduler`` along ``timesteps`` (default: its own) on latents of ``shape``
    draws random numbers: DDIM with ``eta > 0``, ancestral and SDE samplers, DDPM. Found by a dry
    run of a copy on zeros on the CPU with a probe generator (the caller's generator and the global
    random state are left as they were), so it holds for any scheduler, not a list of names; a
    scheduler whose dry run fails is taken to draw.
    A sampler that runs two loops in step (`pix2pix_zero.lockstep_passes`) is only the same as
    running them one after the other when neither draws."""
    import copy

    sched = copy.deepcopy(scheduler)
    steps = sched.timesteps if timesteps is None else timesteps
    kw = dict(extra_step_kwargs or {})
    probe = torch.Generator().manual_seed(0)
    if "generator" in kw:
        kw["generator"] = probe
    before, probe_before = torch.get_rng_state(), probe.get_state()
    x = torch.zeros(shape)
    try:
        for t in steps:
            t = t.cpu() if isinstance(t, torch.Tensor) else t
            model_in = sched.scale_model_input(x, t)
            x = sched.step(torch.zeros_like(model_in), t, x, **kw, return_dict=False)[0]
    except Exception:  # noqa: BLE001 - a scheduler that cannot step on zeros: assume it draws (the safe answer)
        return True
    finally:
        drew_global = not torch.equal(before, torch.get_rng_state())
        torch.set_rng_state(before)
    return drew_global or not torch.equal(probe_before, probe.get_state())


def strength_timesteps(
    scheduler: Any, num_inference_steps: int, strength: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, int]:
    """SDEdit (Meng et al. 2022) start: set ``num_inference_steps`` timesteps and keep the last
    ``strength`` fraction, as diffusers' img2img ``get_timesteps`` (``order`` aware, sets the
    scheduler's begin index). Returns ``(timesteps, number of denoising steps)``.
    """
    scheduler.set_timesteps(num_inference_steps, device=device)
    return _strength_tail(scheduler, num_inference_steps, strength)


def custom_strength_timesteps(
    scheduler: Any,
    strength: float,
    device: torch.device | str | None = None,
    *,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
) -> tuple[torch.Tensor, int]:
    """`strength_timesteps` on a custom schedule: diffusers' ``retrieve_timesteps`` with ``timesteps``
    or ``sigmas`` (a ValueError if the scheduler takes neither, or both are given), then img2img's
    strength rule (SDEdit's t0, Meng et al. 2022, Algorithm 1) on the ``len(timesteps)`` steps set."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass timesteps= or sigmas=, not both")
    name = "timesteps" if timesteps is not None else "sigmas"
    if name not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(f"{type(scheduler).__name__} does not take custom {name}; use num_inference_steps")
    scheduler.set_timesteps(**{name: timesteps if timesteps is not None else sigmas}, device=device)
    return _strength_tail(scheduler, len(scheduler.timesteps), strength)


def _strength_tail(scheduler: Any, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps, num_inference_steps - t_start
