"""LEDITS++ (Brack et al., CVPR 2024, arXiv 2311.16711) as small pure functions.

Two halves, each checked line by line against the papers and against diffusers'
``LEditsPPPipelineStableDiffusion`` (0.42), which the ``ledits`` editor equals on tiny models:

*Inversion* - the edit-friendly DDPM noise space of Huberman-Spiegelglas, Kulikov & Michaeli
(CVPR 2024, arXiv 2304.06140), which LEDITS++ (Sec. 3.1) carries over to the SDE DPM-Solver++:

- `ddpm_noisy_latents`  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_t with *independent* eps_t
                        (edit-friendly DDPM, eq. 6), one draw per step, smallest t first;
- `ddim_noise_map`      z_t = (x_{t-1} - mu_t(x_t)) / sigma_t for DDIM with eta = 1 (= DDPM; eq. 5),
                        and the corrected x_{t-1} = mu_t + sigma_t z_t;
- `dpmpp_sde_noise_map` the same for the 2nd-order SDE DPM-Solver++ (LEDITS++ Sec. 3.1): mu_t is
                        the solver's noise-free update, sigma_t = sigma_t sqrt(1 - e^{-2h});
- `invert`              the loop: noise maps zs[i] for each timestep, and x_T to start editing from;
- `NoiseMapScheduler`   a scheduler whose i-th step adds zs[i] (x_{t-1} = mu_t + sigma_t z_t, eq. 5):
                        the edit's denoising steps.

*Editing* - semantic guidance with implicit masks (LEDITS++ Sec. 3.2-3.3, eq. 12; SEGA, Brack et
al. 2023): for each concept e, gamma_e = s_e * (eps_e - eps_uncond) (sign flipped for a reverse
concept), masked by M^1 (the concept's cross-attention map above its lambda-quantile), M^2 (|gamma_e|
above its lambda-quantile) or their intersection, active between warm-up and cool-down steps;
``eps = eps_uncond + sum_e gamma_e``:

- `attention_mask`      M^1 from aggregated cross-attention maps (smoothed, thresholded, upsampled)
- `quantile_mask`       M^2 (and the plain SEGA mask) from the guidance's magnitude
- `semantic_guidance`   sum_e gamma_e with every per-concept setting (`ConceptGuidance`)

>>> import torch
>>> from p2pz_directions.sampling.ledits import quantile_mask
>>> g = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(1, 4, 1, 1)
>>> int(quantile_mask(g, 0.75).sum())      # the top quarter of the pixels, in every channel
16
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "AttentionMaps",
    "ConceptGuidance",
    "NoiseMapScheduler",
    "attention_mask",
    "ddim_noise_map",
    "ddpm_noisy_latents",
    "dpmpp_sde_noise_map",
    "gaussian_kernel",
    "invert",
    "ledits_timesteps",
    "noise_map",
    "quantile_mask",
    "semantic_guidance",
    "supports_scheduler",
]

#: above this timestep the intersect mask uses the attention mask alone (diffusers' ``t <= 800``)
INTERSECT_FROM_T = 800


# ---------------------------------------------------------------------------------------------------
# inversion
# ---------------------------------------------------------------------------------------------------
def supports_scheduler(scheduler: Any) -> bool:
    """Whether LEDITS++ can invert with ``scheduler``: DDIM (run with eta = 1, i.e. DDPM) or the
    2nd-order SDE DPM-Solver++ (``algorithm_type="sde-dpmsolver++"``, ``solver_order=2``)."""
    from p2pz_directions.sampling.schedulers import is_scheduler

    if is_scheduler(scheduler, "DDIMScheduler"):
        return True
    return (
        is_scheduler(scheduler, "DPMSolverMultistepScheduler")
        and scheduler.config.algorithm_type == "sde-dpmsolver++"
        and scheduler.config.solver_order == 2
    )


def ledits_timesteps(scheduler: Any, num_inversion_steps: int, skip: float) -> torch.Tensor:
    """Set ``int(num_inversion_steps * (1 + skip))`` "leading" timesteps on ``scheduler`` (which must
    already have ``timestep_spacing="leading"``) and return the last ``num_inversion_steps``: the
    first ``skip`` fraction (the noisiest steps) is never run, so the edit keeps more of the image."""
    scheduler.set_timesteps(int(num_inversion_steps * (1 + skip)))
    return scheduler.timesteps[-num_inversion_steps:]


def ddpm_noisy_latents(
    scheduler: Any, x0: torch.Tensor, timesteps: torch.Tensor, generator: Any
) -> torch.Tensor:
    """``[N + 1, *x0.shape]``: ``x0`` then x_t for the N timesteps from the *least* noisy up, each
    ``scheduler.add_noise(x0, eps_t, t)`` with its own draw eps_t (edit-friendly DDPM, eq. 6).

    The draws come in order of increasing t, one ``randn`` of ``x0.shape`` each, as diffusers'
    ``invert`` draws them (so a seeded generator gives the same maps)."""
    from p2pz_directions.sampling.latents import randn

    xts = [x0]
    for t in reversed(timesteps):
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        t_in = torch.tensor([int(t)], dtype=torch.long)
        xts.append(scheduler.add_noise(x0, noise, t_in))
    return torch.stack(xts)


def ddim_noise_map(
    scheduler: Any, x_prev: torch.Tensor, x_t: torch.Tensor, t: Any, eps: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_t, x_{t-1}')`` for a DDIM step of ``eta`` (DDIM, Song et al. 2021, eq. 12 and 16):

    x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);  sigma_t = eta sqrt((1 - a_p)/(1 - a_t) (1 - a_t/a_p))
    mu_t = sqrt(a_p) x0_hat + sqrt(1 - a_p - sigma_t^2) eps;  z_t = (x_{t-1} - mu_t) / sigma_t

    and the corrected ``x_{t-1}' = mu_t + sigma_t z_t`` (edit-friendly DDPM, eq. 5). ``eps`` is used
    as a noise prediction whatever the model's ``prediction_type``, as diffusers' LEDITS++ does."""
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t]
    a_p = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    x0_hat = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    if scheduler.config.clip_sample:
        x0_hat = torch.clamp(x0_hat, -1, 1)
    variance = scheduler._get_variance(t, prev_t)
    std = eta * variance**0.5
    mu = a_p**0.5 * x0_hat + (1 - a_p - std**2) ** 0.5 * eps
    if variance > 0.0:
        z = (x_prev - mu) / (variance**0.5 * eta)
    else:
        z = torch.tensor([0.0]).to(x_t.device)
    return z, mu + std * z


def dpmpp_sde_noise_map(
    scheduler: Any, x_prev: torch.Tensor, x_t: torch.Tensor, t: Any, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_t, x_{t-1}')`` for the 2nd-order SDE DPM-Solver++ (Lu et al. 2022; LEDITS++ Sec. 3.1).

    With lambda = log(alpha/sigma), h = lambda_t - lambda_s0 and the data predictions D:
    1st order  mu = (sigma_t/sigma_s) e^{-h} x + alpha_t (1 - e^{-2h}) D0
    2nd order  mu = (sigma_t/sigma_s0) e^{-h} x + alpha_t (1 - e^{-2h}) (D0 + 0.5 D1),
               D1 = (D0 - D_{-1}) / r0, r0 = h_0 / h
    z = (x_{t-1} - mu) / (sigma_t sqrt(1 - e^{-2h})). Advances the scheduler's multistep state (its
    model outputs, order counter and step index) exactly as ``scheduler.step`` would."""
    if scheduler.step_index is None:
        scheduler._init_step_index(t)
    d0 = scheduler.convert_model_output(model_output=eps, sample=x_t)
    for i in range(scheduler.config.solver_order - 1):
        scheduler.model_outputs[i] = scheduler.model_outputs[i + 1]
    scheduler.model_outputs[-1] = d0
    k = scheduler.step_index
    sig = scheduler._sigma_to_alpha_sigma_t
    alpha_t, sigma_t = sig(scheduler.sigmas[k + 1])
    alpha_s0, sigma_s0 = sig(scheduler.sigmas[k])
    h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s0) - torch.log(sigma_s0))
    if scheduler.lower_order_nums < 1:
        mu = scheduler.dpm_solver_first_order_update(model_output=d0, sample=x_t, noise=torch.zeros_like(x_t))
    else:
        alpha_s1, sigma_s1 = sig(scheduler.sigmas[k - 1])
        h0 = (torch.log(alpha_s0) - torch.log(sigma_s0)) - (torch.log(alpha_s1) - torch.log(sigma_s1))
        m0, m1 = scheduler.model_outputs[-1], scheduler.model_outputs[-2]
        d1 = (1.0 / (h0 / h)) * (m0 - m1)
        mu = (
            (sigma_t / sigma_s0 * torch.exp(-h)) * x_t
            + (alpha_t * (1 - torch.exp(-2.0 * h))) * m0
            + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
        )
    sigma = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
    z = (x_prev - mu) / sigma if sigma > 0.0 else torch.tensor([0.0]).to(x_t.device)
    if scheduler.lower_order_nums < scheduler.config.solver_order:
        scheduler.lower_order_nums += 1
    scheduler._step_index += 1
    return z, mu + sigma * z


def noise_map(scheduler: Any, x_prev, x_t, t, eps, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`ddim_noise_map` or `dpmpp_sde_noise_map`, whichever fits ``scheduler``."""
    from p2pz_directions.sampling.schedulers import is_scheduler

    if is_scheduler(scheduler, "DDIMScheduler"):
        return ddim_noise_map(scheduler, x_prev, x_t, t, eps, eta)
    if supports_scheduler(scheduler):
        return dpmpp_sde_noise_map(scheduler, x_prev, x_t, t, eps)
    raise NotImplementedError(f"LEDITS++ cannot invert with {type(scheduler).__name__}")


@torch.no_grad()
def invert(
    model: Callable[[torch.Tensor, Any], torch.Tensor],
    scheduler: Any,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    generator: Any = None,
    callback: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edit-friendly inversion of ``x0``: returns ``(x_T, zs)`` with ``zs[i]`` the noise map of
    ``timesteps[i]`` (noisiest first), so that ``scheduler.step(eps(x, t_i), t_i, x, variance_noise=zs[i])``
    from x_T gives back x0 (with the same, unedited, eps).

    ``model(x, t)`` is the guided noise prediction used for inversion. The x_t are drawn up front
    (`ddpm_noisy_latents`); walking down from the noisiest, each x_{t-1} is replaced by its
    corrected value, which is then the next model input (as diffusers does)."""
    n = len(timesteps)
    xts = ddpm_noisy_latents(scheduler, x0, timesteps, generator)  # xts[k]: timesteps[n - k], xts[0] = x0
    zs = torch.zeros((n, *x0.shape), device=x0.device, dtype=x0.dtype)
    for j, t in enumerate(timesteps):
        k = n - 1 - j
        eps = model(xts[k + 1], t)
        z, xts[k] = noise_map(scheduler, xts[k], xts[k + 1], t, eps)
        zs[k] = z
        if callback is not None:
            callback(j + 1, n)
    return xts[-1], zs.flip(0)


class NoiseMapScheduler:
    """``scheduler`` whose ``step`` at its i-th call uses ``variance_noise=zs[i]``: the DDPM step
    x_{t-1} = mu_t(x_t) + sigma_t z_t of edit-friendly DDPM (Huberman-Spiegelglas et al. 2024, eq. 5)
    with the noise maps of `invert`; everything else is the scheduler's own. Give it to
    `p2pz_directions.sampling.denoise` with ``eta=1`` (DDIM) for the edit."""

    def __init__(self, scheduler: Any, zs: torch.Tensor):
        self.scheduler, self.zs, self.i = scheduler, zs, 0

    def __getattr__(self, name: str) -> Any:
        if name == "scheduler":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def step(self, model_output: torch.Tensor, t: Any, x: torch.Tensor, **kw: Any) -> Any:
        out = self.scheduler.step(model_output, t, x, variance_noise=self.zs[self.i], **kw)
        self.i += 1
        return out


# ---------------------------------------------------------------------------------------------------
# editing: semantic guidance with implicit masks
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConceptGuidance:
    """One edit concept's settings (LEDITS++ eq. 12): ``scale`` s_e, ``threshold`` lambda,
    ``reverse`` (subtract the concept), active for steps ``warmup <= i < cooldown`` (None: to the end),
    and ``tokens``: how many tokens after the start token its cross-attention map sums over."""

    scale: float = 5.0
    threshold: float = 0.9
    reverse: bool = False
    warmup: int = 0
    cooldown: int | None = None
    tokens: int = 75

    def active(self, i: int) -> bool:
        return i >= self.warmup and (self.cooldown is None or i < self.cooldown)


def gaussian_kernel(device: Any = "cpu", size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The ``[1, 1, size, size]`` Gaussian (sum 1) that smooths the attention maps (diffusers'
    ``LeditsGaussianSmoothing``: exp(-((x - m) / (2 sigma))^2) per axis, normalised)."""
    kernel = 1
    grids = torch.meshgrid([torch.arange(size, dtype=torch.float32)] * 2, indexing="ij")
    for g in grids:
        mean = (size - 1) / 2
        kernel = kernel * (
            1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((g - mean) / (2 * sigma)) ** 2))
        )
    kernel = kernel / torch.sum(kernel)
    return kernel.view(1, 1, size, size).to(device)


def _quantile(x: torch.Tensor, q: float, dim: int) -> torch.Tensor:
    if x.dtype == torch.float32:
        return torch.quantile(x, q, dim=dim)
    return torch.quantile(x.to(torch.float32), q, dim=dim).to(x.dtype)


def quantile_mask(guidance: torch.Tensor, threshold: float) -> torch.Tensor:
    """M^2: 1 where the channel-summed |guidance| is at or above its ``threshold``-quantile over the
    image (per sample), else 0; ``[B, C, H, W]`` like ``guidance`` (SEGA's mask; LEDITS++ eq. 12)."""
    mag = guidance.abs().sum(dim=1, keepdim=True)
    q = _quantile(mag.flatten(start_dim=2), threshold, dim=2)
    return torch.where(mag >= q[:, :, None, None], 1.0, 0.0).to(guidance.dtype).expand_as(guidance)


def attention_mask(
    attn: torch.Tensor,
    tokens: int,
    threshold: float,
    size: tuple[int, int],
    channels: int,
    kernel: torch.Tensor,
) -> torch.Tensor:
    """M^1 of one concept: ``attn`` ``[B, h, w, K]`` (cross-attention probabilities averaged over
    heads and layers) summed over the key tokens ``1 .. tokens``, smoothed with ``kernel`` (reflect
    padding), 1 at or above its ``threshold``-quantile, upsampled (nearest) to ``size`` and repeated
    over ``channels``: ``[B, channels, *size]``."""
    m = attn[:, :, :, 1 : 1 + tokens].sum(dim=3)
    m = F.pad(m.unsqueeze(1), (1, 1, 1, 1), mode="reflect")
    m = F.conv2d(m, weight=kernel.to(m.dtype)).squeeze(1)
    q = _quantile(m.flatten(start_dim=1), threshold, dim=1)
    mask = torch.where(m >= q[:, None, None], 1.0, 0.0)
    return F.interpolate(mask.unsqueeze(1), size).repeat(1, channels, 1, 1)


@dataclass
class AttentionMaps:
    """Cross-attention maps of one UNet call, per edit concept: ``maps[c]`` is ``[B, h, w, K]``."""

    maps: list[torch.Tensor]


def semantic_guidance(
    eps_uncond: torch.Tensor,
    eps_concepts: Sequence[torch.Tensor],
    concepts: Sequence[ConceptGuidance],
    i: int,
    t: Any,
    *,
    attn: AttentionMaps | None = None,
    use_cross_attn_mask: bool = False,
    use_intersect_mask: bool = True,
    user_mask: torch.Tensor | None = None,
    kernel: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_e gamma_e at step ``i`` (timestep ``t``), LEDITS++ eq. 12: for each active concept,
    gamma_e = +-s_e (eps_e - eps_uncond), times ``user_mask``, then masked by M^1 (attention),
    M^2 (`quantile_mask`) or, with ``use_intersect_mask``, M^1 * M^2 (M^1 alone while t > 800).
    ``attn`` is needed for the attention masks. The concepts are added in order, from zero."""
    out = torch.zeros(eps_uncond.shape, device=eps_uncond.device, dtype=eps_uncond.dtype)
    cross = use_cross_attn_mask or use_intersect_mask
    for c, (eps_c, cg) in enumerate(zip(eps_concepts, concepts, strict=True)):
        if not cg.active(i):
            continue
        g = eps_c - eps_uncond
        if cg.reverse:
            g = g * -1
        g = g * cg.scale
        if user_mask is not None:
            g = g * user_mask
        if cross:
            m1 = attention_mask(attn.maps[c], cg.tokens, cg.threshold, g.shape[-2:], g.shape[1], kernel)
            if not use_intersect_mask:
                g = g * m1
            elif t <= INTERSECT_FROM_T:
                g = g * (quantile_mask(g, cg.threshold) * m1)
            else:
                g = g * m1
        else:
            g = torch.where(quantile_mask(g, cg.threshold) > 0, g, torch.zeros_like(g))
        out += g
    return out
