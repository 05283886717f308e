"""pix2pix-zero's parts (Parmar et al., SIGGRAPH 2023, arXiv 2302.03027), as pure functions.

- the inversion regularizers of section 3.2 ("noise regularization"): `auto_corr_loss` (pairwise
  auto-correlation over a pyramid, eq. 3-4) and `kl_divergence` (the KL term), their gradients in
  closed form (`auto_corr_grad`, `kl_grad`), and `regularize_noise_pred` (the gradient steps
  diffusers' ``invert`` takes on each noise prediction);
- cross-attention maps (`AttentionMaps`, installed by `attention_maps`): recorded during the
  reference pass, compared during the edit;
- the steps of the three passes as functions over tensors, so that a `UNetRunner` can replay
  them as CUDA graphs: `inversion_step`, `reference_step` and `cross_attention_guided_step`
  (section 3.3, eq. 5: ``x_t <- x_t - lambda_xa * grad ||M_edit - M_ref||^2``), and the predictors
  that hand them to `denoise` / `invert`.

>>> from p2pz_directions.sampling import auto_corr_loss, draw_roll_shifts
>>> x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
>>> shifts = draw_roll_shifts(tuple(x.shape), torch.Generator().manual_seed(1))[0]
>>> bool(auto_corr_loss(x, shifts) >= 0)
True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from p2pz_directions.sampling.guidance import cfg
from p2pz_directions.sampling.latents import epsilon_from_output
from p2pz_directions.sampling.loop import Predictor, StepRequest, denoise_steps, unet_forward
from p2pz_directions.sampling.runner import UNetRunner, compiled

__all__ = [
    "AttentionMaps",
    "FusedProjections",
    "Regularizer",
    "attention_maps",
    "auto_corr_grad",
    "auto_corr_loss",
    "cross_attention_guidance",
    "cross_attention_guided_step",
    "draw_roll_shifts",
    "guided_predictor",
    "inversion_predictor",
    "inversion_step",
    "kl_divergence",
    "kl_grad",
    "lockstep_passes",
    "paired_step",
    "reference_predictor",
    "reference_step",
    "regularize_noise_pred",
]


# ---------------------------------------------------------------------------------------------------
# inversion regularizers
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Regularizer:
    """The settings of the noise regularization during inversion (diffusers' ``invert`` arguments)."""

    lambda_auto_corr: float = 20.0
    lambda_kl: float = 20.0
    num_reg_steps: int = 5
    num_auto_corr_rolls: int = 5

    @property
    def active(self) -> bool:
        return self.num_reg_steps > 0 and (self.lambda_auto_corr > 0 or self.lambda_kl > 0)

    @property
    def num_draws(self) -> int:
        """Roll draws per inversion step (0 without the auto-correlation term)."""
        return self.num_reg_steps * self.num_auto_corr_rolls if self.lambda_auto_corr > 0 else 0


def _pyramid_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """Sizes the auto-correlation loss visits: halve (avg-pool 2) while the height is over 8."""
    sizes = [(h, w)]
    while sizes[-1][0] > 8:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    return sizes


def _randint(high: int, generator: torch.Generator | None) -> int:
    if generator is not None and generator.device.type != "cpu":
        return int(torch.randint(high, (1,), generator=generator, device=generator.device).item())
    return int(torch.randint(high, (1,), generator=generator).item())


def _draws_per_call(generator: Any) -> bool:
    """Whether ``generator`` (or each of a list) is a host generator, whose ``randint(high, (n,))``
    takes one 32-bit number per value, ``value = number % high``, in order - as n calls of
    ``randint(high, (1,))`` do (a GPU generator's Philox draws are grouped otherwise)."""
    gens = generator if isinstance(generator, list) else [generator]
    return all(g is None or torch.device(g.device).type == "cpu" for g in gens)


def draw_roll_shifts(shape: tuple[int, ...], generator: Any, rolls: int = 1) -> torch.Tensor:
    """Random roll amounts for ``rolls`` evaluations of `auto_corr_loss` on latents of ``shape``.

    The numbers of the reference implementation's draws (per roll, per image, per channel, per
    pyramid level, ``randint(height // 2)``), so a seeded generator gives the same shifts; a list of
    generators draws image ``b``'s shifts from ``generator[b]``. Returns ``[rolls, levels, B * C]``
    int64 (CPU).

    With host generators all of a step's values come from one ``randint`` over the least common
    multiple ``L`` of the levels' ranges: the generator gives each value one 32-bit number ``u``
    either way, and ``(u % L) % high == u % high`` because ``high`` divides ``L`` - the same numbers
    as the per-value calls (400 of them per inversion step of a 512x512 edit, ~3-5 ms of host time
    per step, more than the GPU's compiled step), in one call.
    """
    b, c, h, w = shape
    sizes = _pyramid_sizes(h, w)
    highs = [lh // 2 for lh, _ in sizes]
    gens = generator if isinstance(generator, list) else None
    lcm = math.lcm(*highs)
    if min(highs) > 0 and lcm < 2**31 and _draws_per_call(generator) and (gens is None or len(gens) >= b):
        levels = len(sizes)
        if gens is None:
            u = torch.randint(0, lcm, (rolls, b * c, levels), generator=generator)
        else:  # generator k's draws: for each roll, image k's channels and levels
            u = torch.stack([torch.randint(0, lcm, (rolls, c, levels), generator=g) for g in gens[:b]], 1)
            u = u.reshape(rolls, b * c, levels)
        return (u % torch.tensor(highs)).transpose(1, 2).contiguous()
    out = torch.empty(rolls, len(sizes), b * c, dtype=torch.int64)
    for r in range(rolls):
        for n in range(b * c):
            g = gens[n // c] if gens is not None else generator
            for lvl, high in enumerate(highs):
                out[r, lvl, n] = _randint(high, g)
    return out


def _roll_rows(x: torch.Tensor, shifts: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.roll(x[n], shifts[n], dim)`` for every ``n`` of ``x`` ([N, 1, H, W]) at once (no host sync)."""
    size = x.shape[dim]
    idx = (torch.arange(size, device=x.device)[None, :] - shifts[:, None]) % size  # [N, size]
    idx = idx[:, None, :, None] if dim == 2 else idx[:, None, None, :]
    return x.gather(dim, idx.expand_as(x))


def auto_corr_loss(eps: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Pairwise auto-correlation loss (pix2pix-zero eq. 3-4, after Karras et al.'s noise
    regularization): ``sum over images, channels and pyramid levels of mean(e * roll(e, s))^2``
    along both spatial axes. ``eps`` is ``[B, C, H, W]``; ``shifts`` ``[levels, B * C]`` (one row
    of `draw_roll_shifts`). Zero for white noise in expectation.
    """
    b, c, h, w = eps.shape
    x = eps.reshape(b * c, 1, h, w)
    shifts = shifts.to(x.device)
    total = x.new_zeros(())
    for lvl in range(shifts.shape[0]):
        s = shifts[lvl]
        total = total + ((x * _roll_rows(x, s, 2)).mean(dim=(1, 2, 3)) ** 2).sum()
        total = total + ((x * _roll_rows(x, s, 3)).mean(dim=(1, 2, 3)) ** 2).sum()
        if x.shape[2] <= 8:
            break
        x = F.avg_pool2d(x, kernel_size=2)
    return total


def kl_divergence(eps: torch.Tensor) -> torch.Tensor:
    """The KL term of pix2pix-zero's regularizer: ``var + mean^2 - 1 - log var`` over the whole
    batch (2 KL(N(mean, var) || N(0, 1)) + const, as the reference implementation)."""
    mean, var = eps.mean(), eps.var()
    return var + mean**2 - 1 - torch.log(var + 1e-7)


def roll_pair_indices(shifts: torch.Tensor, size: int) -> torch.Tensor:
    """Gather indices of ``roll(x, s)`` followed by ``roll(x, -s)`` along an axis of ``size``, for
    every shift: ``[..., size]`` shifts in, ``[..., 2 * size]`` indices out (one gather makes both rolls)."""
    ar = torch.arange(size, device=shifts.device)
    s = shifts.unsqueeze(-1)
    return torch.cat([(ar - s) % size, (ar + s) % size], dim=-1)


def _level_indices(
    shifts: torch.Tensor, sizes: list[tuple[int, int]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`roll_pair_indices` of each pyramid level along its height and width: ``shifts`` is
    ``[..., levels, N]``, each entry ``([..., N, 2 h], [..., N, 2 w])``."""
    return [
        (roll_pair_indices(shifts[..., lvl, :], h), roll_pair_indices(shifts[..., lvl, :], w))
        for lvl, (h, w) in enumerate(sizes[: shifts.shape[-2]])
    ]


def auto_corr_grad(
    eps: torch.Tensor, shifts: torch.Tensor, indices: list[tuple[torch.Tensor, torch.Tensor]] | None = None
) -> torch.Tensor:
    """``d auto_corr_loss(eps, shifts) / d eps`` in closed form (no autograd graph, a few kernels).

    For one level, ``d mean(x * roll(x, s))^2 / dx = 2 m (roll(x, s) + roll(x, -s)) / (H W)``; a
    level's gradient reaches the finer one through the average pooling (nearest upsampling / 4).
    ``indices``: the levels' `roll_pair_indices` for these shifts, when the caller made them for
    many rolls at once (`regularize_noise_pred`); a step then runs ~55 kernels per roll, not ~135.
    """
    b, c, h, w = eps.shape
    x = eps.reshape(b * c, 1, h, w)
    if indices is None:
        indices = _level_indices(shifts.to(x.device), _pyramid_sizes(h, w))
    grads: list[torch.Tensor] = []
    for idx_h, idx_w in indices:
        lh, lw = x.shape[2], x.shape[3]
        both_h = x.gather(2, idx_h[:, None, :, None].expand(-1, 1, 2 * lh, lw))  # roll(x, s) | roll(x, -s)
        both_w = x.gather(3, idx_w[:, None, None, :].expand(-1, 1, lh, 2 * lw))
        rh, rh_back = both_h[:, :, :lh], both_h[:, :, lh:]
        rw, rw_back = both_w[..., :lw], both_w[..., lw:]
        m_h = (x * rh).mean(dim=(1, 2, 3), keepdim=True)
        m_w = (x * rw).mean(dim=(1, 2, 3), keepdim=True)
        grads.append((m_h * (rh + rh_back) + m_w * (rw + rw_back)) * (2.0 / (lh * lw)))
        if lh <= 8:
            break
        x = F.avg_pool2d(x, kernel_size=2)
    g = grads[-1]
    for finer in reversed(grads[:-1]):
        up = F.interpolate(g, scale_factor=2, mode="nearest")  # = repeat_interleave 2 x 2, one kernel
        if up.shape != finer.shape:  # an odd size lost a row / column to the pooling
            up = F.pad(up, (0, finer.shape[3] - up.shape[3], 0, finer.shape[2] - up.shape[2]))
        g = finer + up / 4  # (not add(alpha=0.25): in float16 that rounds once less, a different number)
    return g.reshape(b, c, h, w)


def kl_grad(eps: torch.Tensor) -> torch.Tensor:
    """``d kl_divergence(eps) / d eps`` in closed form."""
    n = eps.numel()
    mean, var = eps.mean(), eps.var()
    return (eps - mean) * (2.0 / (n - 1)) * (1 - 1 / (var + 1e-7)) + mean * (2.0 / n)


def _d_eps_d_output(alpha_prod_t: torch.Tensor | float, prediction_type: str) -> torch.Tensor | float:
    """How the epsilon of `epsilon_from_output` changes with the model output (a scalar)."""
    if prediction_type == "epsilon":
        return 1.0
    if prediction_type == "v_prediction":
        return alpha_prod_t**0.5
    if prediction_type == "sample":
        return -(alpha_prod_t**0.5) / (1 - alpha_prod_t) ** 0.5
    raise ValueError(f"prediction_type {prediction_type!r} must be one of epsilon, sample, v_prediction")


def regularize_noise_pred(
    noise_pred: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor | float,
    prediction_type: str,
    *,
    lambda_auto_corr: float = 20.0,
    lambda_kl: float = 20.0,
    num_reg_steps: int = 5,
    num_auto_corr_rolls: int = 5,
    generator: Any = None,
    shifts: torch.Tensor | None = None,
    analytic: bool = True,
) -> torch.Tensor:
    """Gradient steps that pull a noise prediction toward i.i.d. standard normal noise (pix2pix-zero
    section 3.2): ``num_reg_steps`` rounds of ``num_auto_corr_rolls`` steps on `auto_corr_loss`
    (``lambda_auto_corr / rolls`` each) and one on `kl_divergence` (``lambda_kl``), in diffusers' order.

    The losses are taken on the epsilon the output stands for (`epsilon_from_output`), so one code
    serves epsilon, sample and v-prediction models. The roll amounts come from ``shifts``
    (``[rolls, levels, B * C]``) or are drawn from ``generator`` (`draw_roll_shifts`). Gradients are
    in closed form (`auto_corr_grad`, `kl_grad`); ``analytic=False`` takes them through autograd as
    the reference implementation does (equal up to rounding; tests/test_sampling.py).
    """
    sample = sample.detach()
    if shifts is None and lambda_auto_corr > 0 and num_reg_steps > 0:
        shifts = draw_roll_shifts(tuple(noise_pred.shape), generator, num_reg_steps * num_auto_corr_rolls)
        shifts = shifts.to(noise_pred.device)
    d_out = _d_eps_d_output(alpha_prod_t, prediction_type)

    indices = None
    if analytic and shifts is not None:  # every roll's gather indices at once: a few kernels per step
        indices = _level_indices(shifts.to(noise_pred.device), _pyramid_sizes(*noise_pred.shape[-2:]))

    def grad_of(loss_fn, grad_fn, x):
        if analytic:
            g = grad_fn(epsilon_from_output(x, sample, alpha_prod_t, prediction_type))
            return g if isinstance(d_out, float) and d_out == 1.0 else g * d_out
        var = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(epsilon_from_output(var, sample, alpha_prod_t, prediction_type))
            return torch.autograd.grad(loss, var)[0]

    k = 0
    for _ in range(num_reg_steps):
        if lambda_auto_corr > 0:
            for _ in range(num_auto_corr_rolls):
                s = shifts[k]
                ix = None if indices is None else [(ih[k], iw[k]) for ih, iw in indices]
                g = grad_of(
                    lambda e, s=s: auto_corr_loss(e, s),
                    lambda e, s=s, ix=ix: auto_corr_grad(e, s, ix),
                    noise_pred,
                )
                noise_pred = noise_pred - lambda_auto_corr * (g / num_auto_corr_rolls)
                k += 1
        if lambda_kl > 0:
            noise_pred = noise_pred - lambda_kl * grad_of(kl_divergence, kl_grad, noise_pred)
        noise_pred = noise_pred.detach()
    return noise_pred


# ---------------------------------------------------------------------------------------------------
# cross-attention maps
# ---------------------------------------------------------------------------------------------------
class AttentionMaps:
    """Cross-attention probabilities of every step, kept in one ``[num_steps, ...]`` buffer per layer.

    ``mode``: ``"off"`` (plain attention), ``"record"`` (write each layer's map at ``step_index``),
    ``"guide"`` (add ``sum((p - ref) ** 2, (1, 2)).mean(0)`` per layer to ``loss``, ``ref`` the map
    recorded at ``step_index`` - diffusers' ``Pix2PixZeroL2Loss``). ``step_index`` is a device
    tensor, so a step writes and reads without allocating or syncing the host, and a whole UNet pass
    can be captured as a CUDA graph. ``store_device="cpu"`` keeps the buffers in host memory
    (lower GPU memory, eager only). ``exact=True`` makes every attention layer use an explicit
    softmax as diffusers' processor does (bit-equal on the CPU); otherwise layers whose maps are
    not needed use PyTorch's fused attention.
    """

    def __init__(
        self, num_steps: int, *, store_device: torch.device | str | None = None, exact: bool = False
    ) -> None:
        self.num_steps = num_steps
        self.store_device = torch.device(store_device) if store_device is not None else None
        self.exact = exact
        self.mode = "off"
        self.buffers: list[torch.Tensor] = []
        self.step_index: torch.Tensor = torch.zeros((), dtype=torch.int64)
        self.loss: torch.Tensor | float = 0.0
        self._next = 0
        self._skip = 0

    @contextlib.contextmanager
    def recording(self, step_index: torch.Tensor, skip: int = 0) -> Iterator[AttentionMaps]:
        """Record the maps of the UNet passes inside; ``skip``: leading rows of the UNet batch whose
        maps are not kept (a pass that runs another trajectory's rows first, `paired_step`)."""
        self.mode, self.step_index, self._next, self._skip = "record", step_index, 0, skip
        try:
            yield self
        finally:
            self.mode, self._skip = "off", 0

    @contextlib.contextmanager
    def guiding(self, step_index: torch.Tensor) -> Iterator[AttentionMaps]:
        self.mode, self.step_index, self.loss, self._next = "guide", step_index, 0.0, 0
        try:
            yield self
        finally:
            self.mode = "off"

    def __call__(self, probs: torch.Tensor, batch: int | None = None) -> None:
        """Take one layer's probabilities (``[batch * heads, queries, keys]``, batch-major)."""
        i, self._next = self._next, self._next + 1
        host = self.store_device is not None and self.store_device != probs.device
        if self.mode == "record":
            if self._skip:  # rows are batch-major: image b's heads are rows b * heads ... (b + 1) * heads - 1
                if batch is None:
                    raise ValueError("recording(skip=...) needs the UNet batch size: call maps(probs, batch)")
                probs = probs[probs.shape[0] // batch * self._skip :]
            if i == len(self.buffers):  # first pass: allocate (in a runner's warm-up, never in a capture)
                self.buffers.append(
                    torch.empty(
                        (self.num_steps, *probs.shape),
                        dtype=probs.dtype,
                        device=self.store_device or probs.device,
                    )
                )
            if host:
                self.buffers[i][int(self.step_index)].copy_(probs.detach(), non_blocking=True)
            else:
                self.buffers[i].index_copy_(0, self.step_index.reshape(1), probs.detach().unsqueeze(0))
        elif self.mode == "guide":
            if host:
                ref = self.buffers[i][int(self.step_index)].to(probs.device, non_blocking=True)
            else:
                ref = self.buffers[i].index_select(0, self.step_index.reshape(1))[0]
            self.loss = self.loss + ((probs - ref) ** 2).sum((1, 2)).mean(0)


class FusedProjections:
    """Each attention layer's input projections in one matrix: ``[to_q; to_k; to_v]`` for
    self-attention (one matrix product instead of three), ``[to_k; to_v]`` for cross-attention.

    Copies of the UNet's weights, made once (a runner keeps them with the graphs that read them,
    ``runner.resource``). `sync` re-copies a layer, in place, when one of its weights changed since
    (PyTorch counts in-place changes in ``tensor._version``; a replaced tensor has another identity):
    a loaded LoRA or an edited weight reaches the fused copy before the next step, and a CUDA graph
    that reads the copy keeps reading valid memory. The numbers are the separate projections' up to
    the matrix kernels' rounding (on an H200 and on the CPU they came out bit for bit the same), and
    the exact variant of pix2pix-zero never fuses. Measured on an H200 (benchmarks/RESULTS.md): a
    batch-1 UNet pass 5.35 -> 5.21 ms compiled, 9.63 -> 9.35 ms from CUDA graphs.
    """

    def __init__(self, unet: Any) -> None:
        self.layers: dict[str, tuple[Any, tuple[str, ...]]] = {}
        for name, module in unet.named_modules():
            if all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "processor")):
                parts = ("to_k", "to_v") if _is_cross(module) else ("to_q", "to_k", "to_v")
                self.layers[name] = (module, parts)
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._stamps: dict[str, tuple] = {}
        self._retired: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.sync()

    @staticmethod
    def _stamp(linears: list[Any]) -> tuple:
        return tuple(
            (
                type(lin),
                *(
                    (id(t), t._version, t.data_ptr(), t.dtype, t.device)
                    for t in (lin.weight, lin.bias)
                    if t is not None
                ),
            )
            for lin in linears
        )

    def sync(self) -> int:
        """Re-copy the layers whose weights changed; returns how many were copied. A layer whose
        projections are not plain ``nn.Linear`` any more (a LoRA wrapper, say) is left unfused."""
        copied = 0
        with torch.no_grad():
            for name, (module, parts) in self.layers.items():
                linears = [getattr(module, p) for p in parts]
                stamp = self._stamp(linears)
                if self._stamps.get(name) == stamp:
                    continue
                self._stamps[name] = stamp
                old = self.weights.pop(name, None)
                plain = all(type(lin) is torch.nn.Linear for lin in linears)
                weights = [lin.weight for lin in linears]
                biases = None if linears[0].bias is None else [lin.bias for lin in linears]
                if plain and old is not None and _fits(old, weights, biases):
                    torch.cat(weights, out=old[0])  # in place: a captured graph keeps reading this memory
                    if biases is not None:
                        torch.cat(biases, out=old[1])
                    self.weights[name] = old
                else:
                    if old is not None:
                        self._retired.append(old)  # a captured graph may still read it: never free it
                    if not plain:
                        continue
                    self.weights[name] = (torch.cat(weights), None if biases is None else torch.cat(biases))
                copied += 1
        return copied

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        return self.weights.get(name)


def _fits(old: tuple[torch.Tensor, torch.Tensor | None], weights: list, biases: list | None) -> bool:
    """Whether the fused copy ``old`` can take ``weights`` / ``biases`` in place (same rows, dtype, device)."""
    w = old[0]
    rows = sum(x.shape[0] for x in weights)
    same = (
        w.shape == (rows, *weights[0].shape[1:])
        and w.dtype == weights[0].dtype
        and w.device == weights[0].device
    )
    return same and (biases is None) == (old[1] is None)


def _is_cross(module: Any) -> bool:
    cross = getattr(module, "is_cross_attention", None)
    if cross is not None:
        return bool(cross)
    return module.to_k.in_features != module.to_q.in_features


class _Processor:
    """Attention processor: explicit softmax probabilities where maps are recorded or compared (or
    everywhere with ``exact``), PyTorch's fused attention otherwise. ``fused``: this layer's
    concatenated projection weight and bias (from `FusedProjections`), or None for the three projections."""

    def __init__(self, maps: AttentionMaps, cross: bool, fused: tuple | None = None) -> None:
        self.maps = maps
        self.cross = cross
        self.fused = fused

    def _project(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any):
        wb = self.fused
        parts = 0 if wb is None else wb[0].shape[0] // attn.to_q.out_features  # 3: [q; k; v], 2: [k; v]
        if parts == 3 and encoder_hidden_states is None:  # self-attention: one matrix product
            return F.linear(hidden_states, *wb).chunk(3, dim=-1)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if parts == 2:  # cross-attention: keys and values of the text in one product
            key, value = F.linear(encoder_hidden_states, *wb).chunk(2, dim=-1)
            return query, key, value
        return query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        **kw,
    ):
        residual = hidden_states
        batch, seq, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = self._project(attn, hidden_states, encoder_hidden_states)
        if self.maps.exact or (self.cross and self.maps.mode != "off"):
            mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            q, k, v = (
                attn.head_to_batch_dim(query),
                attn.head_to_batch_dim(key),
                attn.head_to_batch_dim(value),
            )
            probs = attn.get_attention_scores(q, k, mask)
            if self.cross and self.maps.mode != "off":
                self.maps(probs, batch)
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, v))
        else:
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
                mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            head_dim = query.shape[-1] // attn.heads
            q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            hidden_states = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
            hidden_states = (
                hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
            )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def attention_maps(
    unet: Any, maps: AttentionMaps, fused: FusedProjections | None = None
) -> Iterator[AttentionMaps]:
    """Install ``maps``' processors on every attention layer of ``unet`` (``attn2``: cross-attention)
    for the duration; the UNet's own processors come back after. ``fused``: the layers' projections
    in one matrix each (`FusedProjections` of this UNet, synced here); refused with ``maps.exact``.

    >>> maps = AttentionMaps(num_steps=50)                          # doctest: +SKIP
    >>> with attention_maps(unet, maps), maps.recording(torch.tensor(0)):   # doctest: +SKIP
    ...     unet(x, t, encoder_hidden_states=emb)
    """
    if fused is not None:
        if maps.exact:
            raise ValueError(
                "fused projections round differently: exact attention takes the three projections"
            )
        fused.sync()
    old = unet.attn_processors
    unet.set_attn_processor(
        {
            name: _Processor(
                maps,
                cross="attn2" in name,
                fused=None if fused is None else fused.get(name.removesuffix(".processor")),
            )
            for name in old
        }
    )
    try:
        yield maps
    finally:
        unet.set_attn_processor(old)


# ---------------------------------------------------------------------------------------------------
# the three steps (pure functions over tensors) and their predictors
# ---------------------------------------------------------------------------------------------------
def _eps(
    unet: Any, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    guided = guidance_scale > 1.0
    out = unet_forward(unet, torch.cat([x] * 2) if guided else x, t, embeds)
    return cfg(out, guidance_scale) if guided else out


def inversion_step(
    unet: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    shifts: torch.Tensor,
    *,
    guidance_scale: float,
    regularizer: Regularizer | None,
    prediction_type: str,
    analytic: bool = True,
) -> torch.Tensor:
    """One inversion model evaluation: the (guided) noise prediction, regularized
    (`regularize_noise_pred`) when ``regularizer`` is active. ``shifts``: ``[num_draws, levels, B * C]``.
    ``analytic=False`` takes the regularizer's gradients through autograd, as diffusers does (the
    same rounding in float16; the closed form differs there by a few ulps per step)."""
    eps = _eps(unet, x, t, embeds, guidance_scale)
    if regularizer is None or not regularizer.active:
        return eps
    return regularize_noise_pred(
        eps, x, alpha_prod_t, prediction_type, lambda_auto_corr=regularizer.lambda_auto_corr,
        lambda_kl=regularizer.lambda_kl, num_reg_steps=regularizer.num_reg_steps,
        num_auto_corr_rolls=regularizer.num_auto_corr_rolls, shifts=shifts if shifts.numel() else None,
        analytic=analytic,
    )  # fmt: skip


def reference_step(
    unet: Any, maps: AttentionMaps, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, step_index: torch.Tensor,
    *, guidance_scale: float,
) -> torch.Tensor:  # fmt: skip
    """The (guided) noise prediction of the reference pass, recording its cross-attention maps at ``step_index``."""
    with maps.recording(step_index):
        return _eps(unet, x, t, embeds, guidance_scale)


def cross_attention_guided_step(
    unet: Any, maps: AttentionMaps, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, step_index: torch.Tensor,
    *, amount: float, guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Cross-attention guidance (pix2pix-zero eq. 5): one gradient step of size ``amount`` on the
    model input toward the reference maps of ``step_index``, then the (guided) noise prediction at
    the moved input. Returns ``(noise_pred, latents)``, the latents being the moved input's
    unconditional half, as diffusers' pipeline continues from it."""
    guided = guidance_scale > 1.0
    x_in = cross_attention_guidance(
        unet, maps, x, t, embeds, step_index, amount=amount, guidance_scale=guidance_scale
    )
    out = unet_forward(unet, x_in, t, embeds)
    if guided:
        return cfg(out, guidance_scale), x_in.chunk(2)[0]
    return out, x_in


def cross_attention_guidance(
    unet: Any, maps: AttentionMaps, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, step_index: torch.Tensor,
    *, amount: float, guidance_scale: float,
) -> torch.Tensor:  # fmt: skip
    """The gradient step of `cross_attention_guided_step` alone: the model input (``[x; x]`` under
    classifier-free guidance) moved by ``-amount * grad ||M_edit - M_ref||^2``."""
    x_in = (torch.cat([x] * 2) if guidance_scale > 1.0 else x).detach().clone().requires_grad_(True)
    with torch.enable_grad(), maps.guiding(step_index):
        unet_forward(unet, x_in, t, embeds.detach())
        (grad,) = torch.autograd.grad(maps.loss, x_in)
    return x_in.detach().add(grad, alpha=-amount)  # torch.optim.SGD's update, as diffusers takes it


def paired_step(
    unet: Any, maps: AttentionMaps, x_in: torch.Tensor, t_edit: torch.Tensor, edit_embeds: torch.Tensor,
    x_ref: torch.Tensor, t_ref: torch.Tensor, embeds: torch.Tensor, step_index: torch.Tensor, *, guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One UNet pass for two trajectories: the edit's noise prediction at its moved model input
    ``x_in`` (from `cross_attention_guidance`, timestep ``t_edit``) and the reference pass's next
    step at ``x_ref`` (``t_ref``), whose cross-attention maps are recorded at ``step_index``.
    Each row has its own timestep, so this is the two passes' forwards, batched. Returns the
    (guided) noise predictions ``(edit, reference)``."""
    guided = guidance_scale > 1.0
    ref_in = torch.cat([x_ref] * 2) if guided else x_ref
    n_edit, n_ref = x_in.shape[0], ref_in.shape[0]
    t = torch.cat([t_edit.reshape(1).expand(n_edit), t_ref.reshape(1).expand(n_ref)])
    with maps.recording(step_index, skip=n_edit):
        out = unet_forward(unet, torch.cat([x_in, ref_in]), t, torch.cat([edit_embeds, embeds]))
    edit, ref = out[:n_edit], out[n_edit:]
    return (cfg(edit, guidance_scale), cfg(ref, guidance_scale)) if guided else (edit, ref)


def _device_t(t: Any, device: torch.device) -> torch.Tensor:
    """``t`` as a 0-d tensor on ``device``; a timestep already there is used as it is (reading it back
    with ``.item()`` would make the host wait for the GPU every step)."""
    if isinstance(t, torch.Tensor) and t.device == device and t.numel() == 1:
        return t.reshape(())
    t = torch.as_tensor(t)
    return torch.full((), t.item(), dtype=t.dtype, device=device)


def inversion_predictor(
    unet: Any,
    inverse_scheduler: Any,
    *,
    guidance_scale: float = 1.0,
    regularizer: Regularizer | None = None,
    generator: Any = None,
    runner: UNetRunner | None = None,
    embeds_key: str = "prompt_embeds",
    compile_regularizer: bool = False,
    analytic: bool = True,
) -> Predictor:
    """The predictor of pix2pix-zero's inversion (`inversion_step` through ``runner``). The roll
    amounts are drawn on the host from ``generator`` each step, in diffusers' order.
    ``analytic=False``: the regularizer's gradients through autograd (diffusers' float16 rounding)."""
    runner = runner or UNetRunner("eager")
    pred_type = inverse_scheduler.config.prediction_type
    reg = regularizer if regularizer is not None and regularizer.active else None
    key = (id(unet), guidance_scale, reg, pred_type, compile_regularizer, analytic)
    fn = lambda *a: inversion_step(  # noqa: E731
        unet, *a, guidance_scale=guidance_scale, regularizer=reg, prediction_type=pred_type, analytic=analytic
    )
    if compile_regularizer and reg is not None:
        fn = runner.resource(("compiled-inversion", key), lambda: compiled(fn, dynamic=False))

    alphas: dict[torch.device, torch.Tensor] = {}  # alphas_cumprod on each device, float32

    def predict(x: torch.Tensor, t: Any, i: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = x.device
        if dev not in alphas:
            alphas[dev] = torch.as_tensor(inverse_scheduler.alphas_cumprod).to(dev, torch.float32)
        t = _device_t(t, dev)
        alpha = alphas[dev][t.long()]  # indexed where t is: no host round trip
        draws = reg.num_draws if reg is not None else 0
        if draws:
            shifts = draw_roll_shifts(tuple(x.shape), generator, draws)
            shifts = (shifts.pin_memory() if dev.type == "cuda" else shifts).to(dev, non_blocking=True)
        else:
            shifts = torch.zeros(0, dtype=torch.int64, device=dev)
        return runner("invert", fn, x, t, tensors[embeds_key], alpha, shifts, key=key)

    return predict


def reference_predictor(
    unet: Any, maps: AttentionMaps, *, guidance_scale: float = 7.5, runner: UNetRunner | None = None,
    embeds_key: str = "prompt_embeds",
) -> Predictor:  # fmt: skip
    """The predictor of the reference pass (`reference_step`): step ``i`` records into ``maps`` at ``i``."""
    runner = runner or UNetRunner("eager")
    key = (id(unet), id(maps), guidance_scale)

    def fn(x, t, embeds, step_index):
        return reference_step(unet, maps, x, t, embeds, step_index, guidance_scale=guidance_scale)

    def predict(x: torch.Tensor, t: Any, i: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = x.device
        idx = torch.full((), i, dtype=torch.int64, device=dev)
        return runner("reference", fn, x, _device_t(t, dev), tensors[embeds_key], idx, key=key)

    return predict


def guided_predictor(
    unet: Any, maps: AttentionMaps, *, amount: float = 0.1, guidance_scale: float = 7.5,
    runner: UNetRunner | None = None, embeds_key: str = "prompt_embeds",
) -> Predictor:  # fmt: skip
    """The predictor of the edit pass (`cross_attention_guided_step` against the maps of step ``i``)."""
    runner = runner or UNetRunner("eager")
    key = (id(unet), id(maps), amount, guidance_scale)

    def fn(x, t, embeds, step_index):
        return cross_attention_guided_step(
            unet, maps, x, t, embeds, step_index, amount=amount, guidance_scale=guidance_scale
        )

    def predict(x: torch.Tensor, t: Any, i: int, tensors: dict[str, torch.Tensor]):
        dev = x.device
        idx = torch.full((), i, dtype=torch.int64, device=dev)
        return runner("edit", fn, x, _device_t(t, dev), tensors[embeds_key], idx, key=key)

    return predict


def lockstep_passes(
    unet: Any,
    maps: AttentionMaps,
    x_T: torch.Tensor,
    reference: dict[str, Any],
    edit: dict[str, Any],
    *,
    amount: float = 0.1,
    guidance_scale: float = 7.5,
    runner: UNetRunner | None = None,
    phase: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pix2pix-zero's reference pass and cross-attention-guided edit from ``x_T``, run in step:
    returns ``(reconstruction latents, edited latents)``, what the reference loop and then the edit
    loop of diffusers' pipeline return.

    Diffusers runs the whole reference pass first and keeps the maps of every step (~66 MB per
    step of an SD-1.x 512x512 edit, 3.3 GB for 50); the edit at step ``i`` needs only step ``i``'s.
    Here ``maps`` holds one step (``AttentionMaps(1)``) and each edit step is the gradient step
    (`cross_attention_guidance`, forward + backward) and then *one* UNet pass, `paired_step`, that
    predicts the edit's noise at the moved input together with the reference pass's next step
    (recording the maps the next gradient step compares with): per step one backward and two UNet
    passes, one of them at twice the batch, instead of three passes. Each row keeps its own timestep
    and text, so the numbers are the sequential passes' (up to the kernels' rounding at another
    batch size); a sampler that draws random numbers (`draws_random_numbers`) would draw them in
    another order, so the caller runs the passes one after the other then.

    ``reference`` / ``edit``: the keyword arguments of `denoise_steps` for each pass (``scheduler``
    - two separate objects with the same timesteps -, ``tensors={"prompt_embeds": ...}``,
    callbacks, ``progress``); both get the same ``pipe``, so an interrupt stops both.
    ``phase(name)`` is called with ``"reference"`` or ``"edit"`` before each pass's step work
    (its scheduler step and callbacks).
    """
    runner = runner or UNetRunner("eager")
    guided = guidance_scale > 1.0
    dev = x_T.device
    idx = torch.zeros((), dtype=torch.int64, device=dev)
    key = (id(unet), id(maps), amount, guidance_scale)

    def guide(x, t, embeds, step_index):
        return cross_attention_guidance(
            unet, maps, x, t, embeds, step_index, amount=amount, guidance_scale=guidance_scale
        )

    def pair(x_in, t_edit, edit_embeds, x_ref, t_ref, embeds, step_index):
        return paired_step(
            unet, maps, x_in, t_edit, edit_embeds, x_ref, t_ref, embeds, step_index, guidance_scale=guidance_scale
        )  # fmt: skip

    def advance(steps, value, name) -> tuple[StepRequest | None, torch.Tensor | None]:
        if phase is not None:
            phase(name)
        try:
            return (next(steps) if value is None else steps.send(value)), None
        except StopIteration as stop:
            return None, stop.value

    def reference_alone(r: StepRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's prediction at ``r`` (its maps recorded), with the reference's own input
        in the edit rows of the pass (not used): the same graph as the paired steps."""
        t_r, embeds = _device_t(r.t, dev), r.tensors["prompt_embeds"]
        both = torch.cat([r.x] * 2) if guided else r.x
        return embeds, runner("pair", pair, both, t_r, embeds, r.x, t_r, embeds, idx, key=key)[1]

    ref_steps, edit_steps = denoise_steps(x_T, **reference), denoise_steps(x_T, **edit)
    r, x_rec = advance(ref_steps, None, "reference")
    e, x_edit = advance(edit_steps, None, "edit")
    ref_embeds = reference.get("tensors", {}).get("prompt_embeds")
    out_ref = None
    if r is not None:  # the maps of the reference's first step
        ref_embeds, out_ref = reference_alone(r)
    pipe = reference.get("pipe")
    while r is not None or e is not None:
        if r is not None and getattr(pipe, "interrupt", False):  # an edit callback stopped both passes
            r, x_rec = None, r.latents
        if r is not None:  # step i of the reference: its scheduler step, its callbacks
            r, x_rec = advance(ref_steps, out_ref, "reference")
        if e is None:  # the edit was stopped first: the reference goes on alone
            if r is not None:
                ref_embeds, out_ref = reference_alone(r)
            continue
        t_e, edit_embeds = _device_t(e.t, dev), e.tensors["prompt_embeds"]
        x_in = runner("guide", guide, e.x, t_e, edit_embeds, idx, key=key)  # against the maps of step i
        if r is not None:  # the edit's prediction at step i and the reference's at step i + 1, in one pass
            ref_embeds = r.tensors["prompt_embeds"]
            eps, out_ref = runner(
                "pair", pair, x_in, t_e, edit_embeds, r.x, _device_t(r.t, dev), ref_embeds, idx, key=key
            )
        else:  # the reference is done: its rows repeat the edit's input (their maps are not read again)
            eps, _ = runner("pair", pair, x_in, t_e, edit_embeds, e.x, t_e, ref_embeds, idx, key=key)
        e, x_edit = advance(edit_steps, (eps, x_in.chunk(2)[0] if guided else x_in), "edit")
    return x_rec, x_edit
