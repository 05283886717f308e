"""diffusers' ``DDIMScheduler``, ``DDIMInverseScheduler`` and ``PNDMScheduler`` without importing diffusers.

The three schedulers of SD folders and of pix2pix-zero / DiffEdit, under the same names, with the
same settings, defaults, state and arithmetic (``set_timesteps``, ``step``, ``add_noise``,
``scale_model_input``, ``alphas_cumprod``, ``final_alpha_cumprod``, ``_get_variance``, ...), and
diffusers' config conventions: ``config`` (dict and attribute access) holds every setting plus
``_use_default_values`` (those not given), ``from_config`` drops a source's defaulted and private
keys, ``from_pretrained(folder, subfolder=...)`` reads ``scheduler_config.json``. Held step for
step equal to diffusers' classes in tests/test_lean_models.py. Any other scheduler class is
diffusers' own (`SCHEDULERS` lists the lean ones).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pz_directions.lean import LeanUnsupported
from p2pz_directions.lean.blocks import LeanConfig
from p2pz_directions.lean.loading import read_config

__all__ = ["SCHEDULERS", "DDIMInverseScheduler", "DDIMScheduler", "PNDMScheduler", "scheduler_from_folder"]


class SchedulerOutput:
    """``prev_sample`` (and ``pred_original_sample``), also as a tuple with ``return_dict=False``."""

    def __init__(self, prev_sample: torch.Tensor, pred_original_sample: torch.Tensor | None = None):
        self.prev_sample = prev_sample
        self.pred_original_sample = pred_original_sample

    def __getitem__(self, i: int) -> torch.Tensor:
        return [v for v in (self.prev_sample, self.pred_original_sample) if v is not None][i]


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule (``squaredcos_cap_v2``), as diffusers discretises it."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(
            1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps),
            max_beta,
        )
        for i in range(num_diffusion_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled to a zero terminal SNR (Lin et al. 2024, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _betas(cls_name: str, cfg: LeanConfig) -> torch.Tensor:
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return torch.tensor(cfg.trained_betas, dtype=torch.float32)
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    if cfg.beta_schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    if cfg.beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n)
    raise NotImplementedError(f"{cfg.beta_schedule} is not implemented for {cls_name}")


class _Scheduler:
    """diffusers' config handling for the lean schedulers (`ConfigMixin`'s conventions)."""

    order = 1
    config_name = "scheduler_config.json"
    #: setting -> default, in the order of diffusers' ``__init__``
    defaults: dict[str, Any] = {}
    config: LeanConfig

    def __init_subclass__(cls, **kw: Any) -> None:
        """Give each class an ``__init__`` whose signature lists its settings and defaults (what
        ``inspect.signature`` shows for diffusers' classes; `copy_scheduler` reads it)."""
        super().__init_subclass__(**kw)

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            _Scheduler.__init__(self, *args, **kwargs)

        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [
            inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v)
            for k, v in cls.defaults.items()
        ]
        __init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        __init__.__qualname__ = f"{cls.__name__}.__init__"
        cls.__init__ = __init__  # type: ignore[method-assign]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = list(self.defaults)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} settings")
        given = dict(zip(names, args, strict=False))
        for k, v in kwargs.items():
            if k in given:
                raise TypeError(f"{type(self).__name__} got {k!r} twice")
            given[k] = v
        unknown = [k for k in given if k not in self.defaults]
        if unknown:
            raise TypeError(f"{type(self).__name__} takes no setting {unknown[0]!r}")
        cfg = LeanConfig({k: given.get(k, v) for k, v in self.defaults.items()})
        unused = [k for k in self.defaults if k not in given]
        if unused:
            cfg["_use_default_values"] = unused
        self.config = cfg
        self._setup(cfg)

    def _setup(self, cfg: LeanConfig) -> None:  # pragma: no cover - each class has its own
        raise NotImplementedError

    def _schedule(self, cfg: LeanConfig) -> torch.Tensor:
        """Betas, alphas and their cumulative product; returns the alpha_cumprod beyond the schedule's
        end (1 with ``set_alpha_to_one``, else the first one): DDIM's final / DDIM-inverse's initial."""
        self.betas = _betas(type(self).__name__, cfg)
        if cfg.get("rescale_betas_zero_snr"):
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        return torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    @classmethod
    def from_config(cls, config: Any = None, **kwargs: Any) -> Any:
        """As diffusers' ``from_config``: the source's settings that this class takes, minus those
        the source left at its own defaults (``_use_default_values``) and private keys; ``kwargs``
        override. Private keys (``_class_name``, ``_diffusers_version``) are kept in ``config``."""
        src = dict(config or {})
        used_defaults = set(src.pop("_use_default_values", None) or ())
        hidden = {k: v for k, v in src.items() if k.startswith("_")}
        init = {k: v for k, v in src.items() if k in cls.defaults and k not in used_defaults}
        init.update({k: v for k, v in kwargs.items() if k in cls.defaults})
        obj = cls(**init)
        for k, v in hidden.items():
            obj.config[k] = v
        return obj

    @classmethod
    def load_config(cls, folder: str | os.PathLike, subfolder: str | None = None, **_: Any) -> dict[str, Any]:
        return read_config(Path(folder) / (subfolder or "") / cls.config_name)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, subfolder: str | None = None, **kwargs: Any) -> Any:
        return cls.from_config(cls.load_config(folder, subfolder), **kwargs)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps({k: v for k, v in self.config.items() if not k.startswith('_')}, default=str)})"

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return sample

    def _sqrt_alphas(
        self, timesteps: torch.IntTensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``sqrt(alpha_cumprod_t)`` and ``sqrt(1 - alpha_cumprod_t)``, shaped to broadcast over ``like``."""
        self.alphas_cumprod = self.alphas_cumprod.to(device=like.device)
        alphas_cumprod = self.alphas_cumprod.to(dtype=like.dtype)
        timesteps = timesteps.to(like.device)
        out = []
        for v in (alphas_cumprod[timesteps] ** 0.5, (1 - alphas_cumprod[timesteps]) ** 0.5):
            v = v.flatten()
            while len(v.shape) < len(like.shape):
                v = v.unsqueeze(-1)
            out.append(v)
        return out[0], out[1]

    def _add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """``add_noise`` of DDIM and PNDM (diffusers' DDIM-inverse has none)."""
        sqrt_alpha, sqrt_one_minus = self._sqrt_alphas(timesteps, original_samples)
        return sqrt_alpha * original_samples + sqrt_one_minus * noise

    def _check_steps(self, num_inference_steps: int) -> None:
        if num_inference_steps > self.config.num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
                f" {self.config.num_train_timesteps} as the unet model trained with this scheduler can only handle"
                f" maximal {self.config.num_train_timesteps} timesteps."
            )

    @staticmethod
    def _predict(
        cfg: LeanConfig, model_output: torch.Tensor, sample: torch.Tensor, alpha: Any, beta: Any
    ) -> tuple:
        """``(pred_original_sample, pred_epsilon)`` for the prediction type."""
        if cfg.prediction_type == "epsilon":
            return (sample - beta ** (0.5) * model_output) / alpha ** (0.5), model_output
        if cfg.prediction_type == "sample":
            return model_output, (sample - alpha ** (0.5) * model_output) / beta ** (0.5)
        if cfg.prediction_type == "v_prediction":
            return (alpha**0.5) * sample - (beta**0.5) * model_output, (alpha**0.5) * model_output + (
                beta**0.5
            ) * sample
        raise ValueError(
            f"prediction_type given as {cfg.prediction_type} must be one of `epsilon`, `sample`, or `v_prediction`"
        )


_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}


class DDIMScheduler(_Scheduler):
    """Denoising diffusion implicit models (Song et al. 2021), diffusers' settings and arithmetic."""

    defaults = {
        **_COMMON,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }

    def _setup(self, cfg: LeanConfig) -> None:
        self.final_alpha_cumprod = self._schedule(cfg)
        self.timesteps = torch.from_numpy(np.arange(0, cfg.num_train_timesteps)[::-1].copy().astype(np.int64))

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = (
            self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        )
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        dtype = sample.dtype
        batch, channels, *rest = sample.shape
        if dtype not in (torch.float32, torch.float64):
            sample = sample.float()
        sample = sample.reshape(batch, channels * int(np.prod(rest)))
        s = torch.quantile(sample.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(s, min=1, max=self.config.sample_max_value).unsqueeze(1)
        sample = torch.clamp(sample, -s, s) / s
        return sample.reshape(batch, channels, *rest).to(dtype)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self._check_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        ts = self.descending_timesteps(self.config, num_inference_steps, ("linspace", "leading", "trailing"))
        self.timesteps = torch.from_numpy(ts).to(device)

    @staticmethod
    def descending_timesteps(
        cfg: LeanConfig, num_inference_steps: int, spacings: tuple[str, ...]
    ) -> np.ndarray:
        """DDIM's timesteps for ``timestep_spacing`` (one of ``spacings``), noisiest first; DDIM-inverse
        walks the same ones the other way."""
        spacing = cfg.timestep_spacing if cfg.timestep_spacing in spacings else None
        if spacing == "linspace":
            return (
                np.linspace(0, cfg.num_train_timesteps - 1, num_inference_steps)
                .round()[::-1]
                .copy()
                .astype(np.int64)
            )
        if spacing == "leading":
            ratio = cfg.num_train_timesteps // num_inference_steps
            ts = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(np.int64)
            return ts + cfg.steps_offset
        if spacing == "trailing":
            ratio = cfg.num_train_timesteps / num_inference_steps
            return np.round(np.arange(cfg.num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
        raise ValueError(
            f"{cfg.timestep_spacing} is not supported. Please make sure to choose one of 'leading' or 'trailing'."
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        cfg = self.config
        prev_timestep = timestep - cfg.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = (
            self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        )
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample, pred_epsilon = self._predict(
            cfg, model_output, sample, alpha_prod_t, beta_prod_t
        )
        if cfg.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif cfg.clip_sample:
            pred_original_sample = pred_original_sample.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        variance = self._get_variance(timestep, prev_timestep)
        std_dev_t = eta * variance ** (0.5)
        if use_clipped_model_output:
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
        prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + direction
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`."
                )
            if variance_noise is None:
                from p2pz_directions.sampling.latents import randn

                variance_noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample, pred_original_sample)

    add_noise = _Scheduler._add_noise

    def get_velocity(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        sqrt_alpha, sqrt_one_minus = self._sqrt_alphas(timesteps, sample)
        return sqrt_alpha * noise - sqrt_one_minus * sample


class DDIMInverseScheduler(_Scheduler):
    """DDIM run from data to noise (the inversion of pix2pix-zero and DiffEdit)."""

    defaults = {
        **_COMMON,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }

    def _setup(self, cfg: LeanConfig) -> None:
        self.initial_alpha_cumprod = self._schedule(cfg)
        self.timesteps = torch.from_numpy(np.arange(0, cfg.num_train_timesteps).copy().astype(np.int64))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self._check_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        ts = DDIMScheduler.descending_timesteps(self.config, num_inference_steps, ("leading", "trailing"))
        self.timesteps = torch.from_numpy(ts[::-1].copy()).to(device)

    def step(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, return_dict: bool = True
    ) -> Any:
        cfg = self.config
        prev_timestep = timestep
        timestep = min(
            timestep - cfg.num_train_timesteps // self.num_inference_steps, cfg.num_train_timesteps - 1
        )
        alpha_prod_t = self.alphas_cumprod[timestep] if timestep >= 0 else self.initial_alpha_cumprod
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep]
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample, pred_epsilon = self._predict(
            cfg, model_output, sample, alpha_prod_t, beta_prod_t
        )
        if cfg.clip_sample:
            pred_original_sample = pred_original_sample.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        direction = (1 - alpha_prod_t_prev) ** (0.5) * pred_epsilon
        prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + direction
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample, pred_original_sample)


class PNDMScheduler(_Scheduler):
    """Pseudo numerical methods for diffusion models (Liu et al. 2022): Runge-Kutta warm-up steps,
    then linear multistep; SD 1.x folders ship it with ``skip_prk_steps``."""

    defaults = {
        **_COMMON,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }

    def _setup(self, cfg: LeanConfig) -> None:
        self.final_alpha_cumprod = self._schedule(cfg)
        self.pndm_order = 4
        self.cur_model_output: Any = 0
        self.counter = 0
        self.cur_sample: torch.Tensor | None = None
        self.ets: list[torch.Tensor] = []
        self._timesteps = np.arange(0, cfg.num_train_timesteps)[::-1].copy()
        self.prk_timesteps: np.ndarray | None = None
        self.plms_timesteps: np.ndarray | None = None
        self.timesteps: torch.Tensor | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        cfg = self.config
        self.num_inference_steps = num_inference_steps
        if cfg.timestep_spacing == "linspace":
            self._timesteps = (
                np.linspace(0, cfg.num_train_timesteps - 1, num_inference_steps).round().astype(np.int64)
            )
        elif cfg.timestep_spacing == "leading":
            ratio = cfg.num_train_timesteps // num_inference_steps
            self._timesteps = (np.arange(0, num_inference_steps) * ratio).round()
            self._timesteps += cfg.steps_offset
        elif cfg.timestep_spacing == "trailing":
            ratio = cfg.num_train_timesteps / num_inference_steps
            self._timesteps = np.round(np.arange(cfg.num_train_timesteps, 0, -ratio))[::-1].astype(np.int64)
            self._timesteps -= 1
        else:
            raise ValueError(
                f"{cfg.timestep_spacing} is not supported. Please make sure to choose one of 'linspace', 'leading' or "
                "'trailing'."
            )
        if cfg.skip_prk_steps:
            self.prk_timesteps = np.array([])
            self.plms_timesteps = np.concatenate(
                [self._timesteps[:-1], self._timesteps[-2:-1], self._timesteps[-1:]]
            )[::-1].copy()
        else:
            prk = np.array(self._timesteps[-self.pndm_order :]).repeat(2) + np.tile(
                np.array([0, cfg.num_train_timesteps // num_inference_steps // 2]), self.pndm_order
            )
            self.prk_timesteps = (prk[:-1].repeat(2)[1:-1])[::-1].copy()
            self.plms_timesteps = self._timesteps[:-3][::-1].copy()
        ts = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.timesteps = torch.from_numpy(ts).to(device)
        self.ets = []
        self.counter = 0
        self.cur_model_output = 0

    add_noise = _Scheduler._add_noise

    def step(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, return_dict: bool = True
    ) -> Any:
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict)

    def _need_steps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )

    def step_prk(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, return_dict: bool = True
    ) -> Any:
        self._need_steps()
        n = self.config.num_train_timesteps
        diff_to_prev = 0 if self.counter % 2 else n // self.num_inference_steps // 2
        prev_timestep = timestep - diff_to_prev
        timestep = self.prk_timesteps[self.counter // 4 * 4]
        if self.counter % 4 == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif (self.counter - 1) % 4 == 0:
            self.cur_model_output += 1 / 3 * model_output
        elif (self.counter - 2) % 4 == 0:
            self.cur_model_output += 1 / 3 * model_output
        elif (self.counter - 3) % 4 == 0:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return (prev_sample,) if not return_dict else SchedulerOutput(prev_sample)

    def step_plms(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, return_dict: bool = True
    ) -> Any:
        self._need_steps()
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(
                f"{self.__class__} can only be run AFTER scheduler has been run in 'prk' mode for at least 12 iterations"
            )
        n = self.config.num_train_timesteps
        prev_timestep = timestep - n // self.num_inference_steps
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + n // self.num_inference_steps
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        prev_sample = self._get_prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return (prev_sample,) if not return_dict else SchedulerOutput(prev_sample)

    def _get_prev_sample(
        self, sample: torch.Tensor, timestep: int, prev_timestep: int, model_output: torch.Tensor
    ) -> torch.Tensor:
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = (
            self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        )
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        if self.config.prediction_type == "v_prediction":
            model_output = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        elif self.config.prediction_type != "epsilon":
            raise ValueError(
                f"prediction_type given as {self.config.prediction_type} must be one of `epsilon` or `v_prediction`"
            )
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** (0.5)
        denom = alpha_prod_t * beta_prod_t_prev ** (0.5) + (
            alpha_prod_t * beta_prod_t * alpha_prod_t_prev
        ) ** (0.5)
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom


#: the schedulers p2pz has lean classes for, by diffusers' class name
SCHEDULERS: dict[str, type[_Scheduler]] = {
    c.__name__: c for c in (DDIMScheduler, DDIMInverseScheduler, PNDMScheduler)
}


def scheduler_from_folder(folder: str | os.PathLike, subfolder: str = "scheduler") -> _Scheduler:
    """The folder's scheduler as a lean class, or `LeanUnsupported` (another class: diffusers' own)."""
    cfg = read_config(Path(folder) / subfolder / _Scheduler.config_name)
    name = cfg.get("_class_name")
    if name not in SCHEDULERS:
        raise LeanUnsupported(f"scheduler class {name}")
    return SCHEDULERS[name].from_config(cfg)
