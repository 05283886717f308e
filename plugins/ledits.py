"""LEDITS++ (Brack et al., CVPR 2024, arXiv 2311.16711) with directions as edit concepts.

A direction ``a->b`` is LEDITS++ with ``b`` as an edit concept and ``a`` as a *reverse* edit concept
("add b, remove a"): for each term ``w * (target - source)`` of a direction, the concepts
``[target, source]`` (in that order, directions in the order given) go into the UNet batch as
``editing_prompt_embeds`` rows, with ``reverse_editing_direction`` ``[False, True]`` (flipped for
``w < 0``) and ``edit_guidance_scale`` ``scale * |w|``. Per-direction options (lists, one value
per direction) apply to both concepts of the direction; ``remove_source=False`` keeps only ``b``.

The cross-attention mask (``use_cross_attn_mask``, and ``use_intersect_mask``, the default) sums
each concept's attention over its tokens 1..n. Embeddings do not carry n; ``edit_tokens="all"``
(default) takes what diffusers 0.42 computes for *any* prompt - its tokenizer call pads before
counting, so n = 77 - 2 = 75 - and ``edit_tokens="captions"`` the longest of the concept's
captions (refused, with a message, for a concept without captions); an int sets n.

The loop is `p2pz_directions.sampling.ledits`: edit-friendly inversion (`invert`), then
``eps = eps_uncond + semantic_guidance(...)`` and ``scheduler.step(..., variance_noise=zs[i])``.
It equals diffusers' ``LEditsPPPipelineStableDiffusion.invert`` + ``__call__`` (tests/test_ledits.py).

>>> ed = editors.get("ledits", model="stable-diffusion-v1-5/stable-diffusion-v1-5")         # doctest: +SKIP
>>> res = ed.edit(img, ["cat->dog", "summer->winter"], edit_guidance_scale=[5, 3])           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pz_directions import sampling as S
from p2pz_directions.core.concept import Direction
from p2pz_directions.editing.editors import Editor, EditorOptionError, EditResult
from p2pz_directions.editing.hookspecs import hookimpl
from p2pz_directions.sampling import ledits as L

__all__ = ["LEditsEditor", "LEditsOptions", "concept_rows"]

PER_DIRECTION = (
    "edit_guidance_scale",
    "edit_warmup_steps",
    "edit_cooldown_steps",
    "edit_threshold",
    "reverse_editing_direction",
    "remove_source",
    "edit_tokens",
)


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class LEditsOptions:
    """The options of the ``ledits`` editor: diffusers' ``invert`` and ``__call__`` arguments, same
    names and defaults. Those in `PER_DIRECTION` take one value or a list (one per direction)."""

    edit_guidance_scale: Any = field(
        default=5.0, metadata=_h("s_e: strength of each direction (list: per direction)")
    )
    edit_warmup_steps: Any = field(default=0, metadata=_h("steps before a direction's guidance starts"))
    edit_cooldown_steps: Any = field(default=None, metadata=_h("step at which a direction's guidance stops"))
    edit_threshold: Any = field(default=0.9, metadata=_h("lambda: quantile above which the mask is on"))
    reverse_editing_direction: Any = field(default=False, metadata=_h("apply b->a instead of a->b"))
    remove_source: Any = field(default=True, metadata=_h("also guide away from the source concept"))
    edit_tokens: Any = field(default="all", metadata=_h("tokens of the attention mask: all, captions or N"))
    use_intersect_mask: bool | None = field(
        default=None, metadata=_h("mask = attention mask * noise mask (None: on where the UNet can)")
    )
    use_cross_attn_mask: bool = field(default=False, metadata=_h("mask by cross-attention only"))
    user_mask: Any = field(default=None, metadata=_h("a [1, 1, h, w] latent-size mask multiplied in"))
    sem_guidance: Any = field(default=None, metadata=_h("precomputed guidance per step (replaces it)"))
    guidance_rescale: float = field(default=0.0, metadata=_h("phi of Lin et al. 2023, sec. 3.4"))
    negative_prompt: str | None = field(default=None, metadata=_h("the unconditional prompt (default '')"))
    source_prompt: str = field(default="", metadata=_h("a caption of the image, for inversion"))
    source_guidance_scale: float = field(
        default=3.5, metadata=_h("guidance of the source prompt in inversion")
    )
    num_inversion_steps: int = field(default=30, metadata=_h("steps run (after skipping)"))
    skip: float = field(default=0.15, metadata=_h("fraction of the noisiest steps not run"))
    clip_skip: int | None = field(default=None, metadata=_h("CLIP layers skipped for prompts"))
    seed: int | None = field(default=0, metadata=_h("seed of the inversion noise"))
    generator: Any = field(default=None, metadata=_h("a torch.Generator (overrides seed)"))
    output_type: str = field(default="pil", metadata=_h("pil, np, pt or latent"))
    callback_on_step_end: Any = field(
        default=None, metadata=_h("f(pipe, i, t, tensors) after each edit step")
    )
    callback_on_step_end_tensor_inputs: Any = field(
        default=("latents",), metadata=_h("tensors it gets: latents, negative_prompt_embeds")
    )
    cuda_graphs: bool | None = field(
        default=None, metadata=_h("replay UNet steps as CUDA graphs (default on CUDA)")
    )
    loops: str = field(
        default="auto", metadata=_h("eager, graphs (CUDA graphs), compile (torch.compile + graphs), or auto")
    )


def _item(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false", "none", "null"):
        return {"true": True, "false": False}.get(low)
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        return text.strip()


def _per_direction(opts: LEditsOptions, name: str, n: int) -> list[Any]:
    """One value per direction: a list as given, ``"6,4"`` (the CLI's ``--opt edit_guidance_scale=6,4``)
    split at commas, or one value for all."""
    value = getattr(opts, name)
    if isinstance(value, str):
        items = [_item(v) for v in value.split(",")]
        value = items if len(items) > 1 else items[0]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise EditorOptionError(
                f"{name} has {len(value)} values for {n} direction(s); give one value, or one per direction"
            )
        return list(value)
    return [value] * n


def _check_value(name: str, value: Any, kind: type, lo: float | None = None, hi: float | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if ok and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        ok = False
    if not ok:
        what = {float: "a number", int: "a whole number"}[kind]
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise EditorOptionError(f"{name} must be {what}{rng} (one, or one per direction), not {value!r}")


def _tokens(spec: Any, concept: Any, tokenizer: Any, seq_len: int) -> int:
    if spec == "all" or spec is None:
        return seq_len - 2
    if isinstance(spec, int) and not isinstance(spec, bool) and 1 <= spec <= seq_len - 2:
        return spec
    if spec == "captions":
        if not concept.captions:
            raise EditorOptionError(
                f"edit_tokens='captions': concept {concept.ref!r} has no captions, so the number of tokens its "
                f"cross-attention mask sums over is unknown. Use edit_tokens='all' (diffusers' count), a number, "
                f"or use_intersect_mask=False"
            )
        if tokenizer is None:
            return max(len(c.split()) for c in concept.captions)
        ids = tokenizer(list(concept.captions), truncation=True, max_length=seq_len).input_ids
        return max(1, min(seq_len - 2, max(len(i) for i in ids) - 2))
    raise EditorOptionError(
        f"edit_tokens must be 'all', 'captions' or a number 1..{seq_len - 2}, not {spec!r}"
    )


def concept_rows(
    directions: list[Direction], opts: LEditsOptions, tokenizer: Any = None
) -> tuple[torch.Tensor, list[L.ConceptGuidance]]:
    """The ``editing_prompt_embeds`` ``[E, 77, D]`` (float32) and per-concept settings of ``directions``
    (the mapping described in the module docstring)."""
    n = len(directions)
    per = {k: _per_direction(opts, k, n) for k in PER_DIRECTION}
    for j in range(n):
        _check_value("edit_guidance_scale", per["edit_guidance_scale"][j], float)
        _check_value("edit_threshold", per["edit_threshold"][j], float, 0.0, 1.0)
        _check_value("edit_warmup_steps", per["edit_warmup_steps"][j], int, 0)
        if per["edit_cooldown_steps"][j] is not None:
            _check_value("edit_cooldown_steps", per["edit_cooldown_steps"][j], int, 0)
    rows, guide = [], []
    for j, d in enumerate(directions):
        for w, source, target in d.terms:
            reverse = bool(per["reverse_editing_direction"][j]) != (w < 0)
            sides = [(target, reverse)] + ([(source, not reverse)] if per["remove_source"][j] else [])
            for concept, rev in sides:
                rows.append(concept.embedding.float())
                seq = concept.embedding.shape[0]
                guide.append(
                    L.ConceptGuidance(
                        scale=float(per["edit_guidance_scale"][j]) * abs(w),
                        threshold=float(per["edit_threshold"][j]),
                        reverse=rev,
                        warmup=int(per["edit_warmup_steps"][j]),
                        cooldown=per["edit_cooldown_steps"][j],
                        tokens=_tokens(per["edit_tokens"][j], concept, tokenizer, seq),
                    )
                )
    return torch.stack(rows), guide


class _AttnStore:
    """Cross-attention probabilities of the edit concepts at 1/4 of the latent size, per call."""

    def __init__(self, pixels: int, n_concepts: int):
        self.pixels, self.n = pixels, n_concepts
        self.up: list[torch.Tensor] = []
        self.down: list[torch.Tensor] = []

    def maps(self, hw: tuple[int, int]) -> torch.Tensor:
        """``[E, 1, h, w, K]``: the mean over layers and heads (up blocks first, as diffusers sums)."""
        out = torch.cat(self.up + self.down, dim=1)  # [E, layers * heads, h*w, K]
        self.up, self.down = [], []
        return (out.sum(1) / out.shape[1]).reshape(self.n, 1, *hw, -1)


def _edit_forward(unet: Any, store: _AttnStore | None, hw, x, t, embeds) -> tuple[torch.Tensor, torch.Tensor]:
    """One edit step's UNet call: the noise predictions of ``[uncond, concepts...]`` and, with masks,
    the concepts' cross-attention maps (an empty tensor without)."""
    eps = unet(x, t, encoder_hidden_states=embeds).sample
    maps = store.maps(hw) if store is not None else eps.new_zeros(0)
    return eps, maps


class _CaptureProcessor:
    """diffusers' classic attention (``AttnProcessor``) that also keeps the concept rows' probabilities."""

    def __init__(self, store: _AttnStore, place: str):
        self.store, self.place = store, place

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        batch, seq, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        ehs = (
            attn.norm_encoder_hidden_states(encoder_hidden_states)
            if attn.norm_cross
            else encoder_hidden_states
        )
        key = attn.head_to_batch_dim(attn.to_k(ehs))
        value = attn.head_to_batch_dim(attn.to_v(ehs))
        probs = attn.get_attention_scores(query, key, attention_mask)
        if probs.shape[1] == self.store.pixels:
            # [E, heads, q, K]: the concept rows (the unconditional one is row 0)
            rows = probs.reshape(batch, -1, *probs.shape[1:])[1:]
            getattr(self.store, self.place).append(rows)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def _set_processors(unet: Any, store: _AttnStore | None, classic: bool) -> dict[str, Any]:
    """Capture processors on the down/up cross-attention layers; classic attention elsewhere when
    ``classic`` (what diffusers' LEDITS++ runs). Returns the processors to restore."""
    from diffusers.models.attention_processor import AttnProcessor

    old = dict(unet.attn_processors)
    procs = {}
    for name, proc in old.items():
        place = "down" if name.startswith("down_blocks") else "up" if name.startswith("up_blocks") else None
        if store is not None and place is not None and "attn2" in name:
            procs[name] = _CaptureProcessor(store, place)
        else:
            procs[name] = AttnProcessor() if classic else proc
    unet.set_attn_processor(procs)
    return old


def _mask_problem(unet: Any, latent_hw: tuple[int, ...]) -> str | None:
    """Why the attention masks cannot run on ``unet`` (they need cross-attention at 1/4 of the latent
    size, in the down/up blocks: every SD 1.x / 2.x UNet has it), or None."""
    types = list(unet.config.down_block_types)
    levels = [i for i, t in enumerate(types) if "CrossAttn" in t]
    if 2 in levels and latent_hw[0] % 4 == 0 and latent_hw[1] % 4 == 0:
        return None
    return (
        f"the cross-attention masks of LEDITS++ (use_intersect_mask / use_cross_attn_mask) need cross-"
        f"attention layers at 1/4 of the latent size; this UNet has them at levels {levels} of {types} "
        f"(diffusers fails here too). Pass use_intersect_mask=False"
    )


class LEditsEditor(Editor):
    """LEDITS++: exact DDPM inversion, then several directions at once with implicit masks."""

    name = "ledits"
    description = "LEDITS++ (Brack et al. 2024): DDPM inversion, several directions at once, implicit masks"
    phases = ("invert", "edit")
    options = LEditsOptions
    image_multiple = 32
    #: one UNet batch holds 1 + 2 * (directions' terms) rows
    max_directions = 8

    # -- options and directions (checked before any model work) ----------------------------------
    def make_options(self, **options: Any) -> LEditsOptions:
        """`LEditsOptions` from keyword options: command-line strings for the flags (``"False"``), the
        base class's name and type checks, then the values (per-direction lists are checked in `run`,
        which knows the directions, before any model work)."""
        for flag in ("use_intersect_mask", "use_cross_attn_mask", "cuda_graphs"):
            if isinstance(options.get(flag), str):
                options = {**options, flag: _item(options[flag])}
            if options.get(flag) is not None and not isinstance(options[flag], bool):
                raise EditorOptionError(f"{flag} must be true or false, not {options[flag]!r}")
        opts = super().make_options(**options)
        if not (isinstance(opts.num_inversion_steps, int) and opts.num_inversion_steps >= 1):
            raise EditorOptionError(
                f"num_inversion_steps must be a positive whole number, not {opts.num_inversion_steps!r}"
            )
        if not 0 <= float(opts.skip) < 1:
            raise EditorOptionError(f"skip must be in [0, 1), not {opts.skip!r}")
        if opts.output_type not in ("pil", "np", "pt", "latent"):
            raise EditorOptionError(
                f"output_type must be 'pil', 'np', 'pt' or 'latent', not {opts.output_type!r}"
            )
        return opts

    def combine_directions(self, directions: list[Direction]) -> _Many:
        """Several directions stay apart: each is its own pair of edit concepts (LEDITS++ multi-edit)."""
        if len(directions) > self.max_directions:
            raise EditorOptionError(
                f"editor 'ledits' takes at most {self.max_directions} directions at once, got "
                f"{len(directions)}; edit in two passes, or sum directions (d1 + d2) first"
            )
        return _Many(directions)

    # -- the pipeline ----------------------------------------------------------------------------
    def run(self, images: list[Any] | None, direction: Any, opts: LEditsOptions) -> EditResult:
        """Edit each image (one at a time, as diffusers' pipeline edits one) along the directions."""
        dirs = list(direction) if isinstance(direction, _Many) else [direction]
        concept_rows(dirs, opts)  # per-direction lists and values: refused before any model work
        if not images:
            raise EditorOptionError("ledits edits an existing image: pass one (or a list)")
        results = [self._edit_one(im, dirs, opts) for im in images]
        if len(results) == 1:
            return results[0]
        return EditResult(
            image=[r.image for r in results],
            original=[r.original for r in results],
            inverted_latents=torch.cat([r.inverted_latents for r in results]),
            extra={"results": results, "notes": [n for r in results for n in r.extra["notes"]]},
        )

    def _edit_one(self, image: Any, dirs: list[Direction], opts: LEditsOptions) -> EditResult:
        """Invert ``image``, then edit it along ``dirs`` (LEDITS++; diffusers' steps in order)."""
        # 1. check inputs: the edit concepts (editing_prompt_embeds rows, per-concept guidance)
        comps = self.load_components()
        unet, vae, tok, te = comps["unet"], comps["vae"], comps["tokenizer"], comps["text_encoder"]
        rows, guide = concept_rows(dirs, opts, tok)
        # 2. scheduler: a copy with "leading" spacing (diffusers sets it on the pipeline's own)
        scheduler = ledits_scheduler(comps["scheduler"])
        timesteps = L.ledits_timesteps(scheduler, opts.num_inversion_steps, float(opts.skip))
        # 3. latents: the image's (the VAE's mode, as diffusers' invert); the masks this UNet can run
        x0, notes = self._image_latents(vae, image)
        opts, more = _usable_masks(opts, unet, tuple(x0.shape[-2:]))
        notes += more
        # 4. conditioning: the source prompt for inversion (clip_skip), the unconditional prompt, the concepts
        enc = lambda s, skip: S.encode_text(tok, te, s, self.device, skip).to(self.dtype)  # noqa: E731
        uncond = enc(opts.negative_prompt or "", None)
        embeds = torch.cat([uncond, rows.to(device=self.device, dtype=self.dtype)])
        inversion = _inversion_model(
            self._model(unet, ("invert",), opts, lambda: None)[0],
            enc(opts.source_prompt, opts.clip_skip), enc("", None), opts,
        )  # fmt: skip
        # 5. sample: edit-friendly inversion (x_T, noise maps zs), then semantic guidance with DDPM steps
        old = _set_processors(unet, None, classic=self.device.type != "cuda")
        try:
            x, zs = self._invert(inversion, scheduler, x0, timesteps, opts)
            x = self._edit(unet, scheduler, x, zs, timesteps, embeds, uncond, guide, opts)
        finally:
            unet.set_attn_processor(old)
        # 6. decode
        return EditResult(
            image=_one(S.decode_latents(vae, x, opts.output_type)),
            original=image,
            inverted_latents=x0,
            extra={"timesteps": [int(t) for t in timesteps], "concepts": len(guide), "notes": notes},
        )

    def _image_latents(self, vae: Any, image: Any) -> tuple[torch.Tensor, list[str]]:
        """Step 3: ``scaling_factor * mode(q(z | x))`` of the image at sides a multiple of 32 (`_pixels`)."""
        pixels, notes = _pixels(S.image_processor(vae), image)
        x0 = vae.encode(pixels.to(device=self.device, dtype=self.dtype)).latent_dist.mode().to(self.dtype)
        return x0 * vae.config.scaling_factor, notes

    def _invert(self, inversion, scheduler, x0, timesteps, opts) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 5a: edit-friendly DDPM inversion (`sampling.ledits.invert`): ``(x_T, zs)``."""
        scheduler.set_timesteps(len(scheduler.timesteps))
        gen = opts.generator if opts.generator is not None else _generator(opts.seed)
        return L.invert(inversion, scheduler, x0, timesteps, gen, lambda i, n: self.progress("invert", i, n))

    def _edit(self, unet, scheduler, x, zs, timesteps, embeds, uncond, guide, opts) -> torch.Tensor:
        """Step 5b: from x_T, ``eps_uncond + semantic_guidance`` on ``[uncond, concepts...]`` (capturing
        the concepts' cross-attention for the masks), each step a DDPM step with the noise map ``zs[i]``."""
        masks = opts.use_intersect_mask or opts.use_cross_attn_mask
        hw = (x.shape[-2] // 4, x.shape[-1] // 4)
        run_edit, store = self._model(
            unet, ("edit", len(guide), hw, masks), opts,
            lambda: _AttnStore(hw[0] * hw[1], len(guide)) if masks else None,
        )  # fmt: skip
        if store is not None:
            _set_processors(unet, store, classic=self.device.type != "cuda")
        scheduler.set_timesteps(len(scheduler.timesteps))
        return S.denoise(
            _edit_predictor(run_edit, embeds, guide, opts, masks, self.device), x * scheduler.init_noise_sigma,
            L.NoiseMapScheduler(scheduler, zs), timesteps=timesteps, tensors={"negative_prompt_embeds": uncond},
            extra_step_kwargs=S.extra_step_kwargs(scheduler, None, eta=1.0),
            callback_on_step_end=opts.callback_on_step_end,
            callback_on_step_end_tensor_inputs=opts.callback_on_step_end_tensor_inputs,
            progress=lambda i, n: self.progress("edit", i, n), pipe=self,
        )  # fmt: skip

    def _model(self, unet: Any, key: tuple, opts: LEditsOptions, make_store: Any) -> tuple[Any, Any]:
        """``(call(x, t, embeds), attention store)`` for inversion (``key[0] == "invert"``) or an edit
        step, through the editor's `UNetRunner` (CUDA graphs by default on CUDA): the graphs it
        captures, and the store they write into, serve every later edit of the same shape."""
        runner = self.options_runner(opts)
        full = (id(unet), *key)
        store = runner.resource(("ledits-store", *full), make_store)
        if key[0] == "invert":
            fn = lambda x, t, e: (unet(x, t, encoder_hidden_states=e).sample,)  # noqa: E731
        else:
            fn = lambda x, t, e: _edit_forward(unet, store, key[2], x, t, e)  # noqa: E731
        return (lambda x, t, e: runner(f"ledits-{key[0]}", fn, x, t, e, key=full)), store


class _Many(list):
    """Directions already resolved, passed through `Editor.edit` as one argument."""

    name = property(lambda self: " & ".join(d.name for d in self))


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(int(seed))


def _mask(mask: Any, device: Any) -> torch.Tensor | None:
    return None if mask is None else torch.as_tensor(mask).to(device)


def _one(images: Any) -> Any:
    """One image, not a batch of one (a PIL list, an array or a tensor)."""
    return (
        images[0] if (isinstance(images, list) or hasattr(images, "shape")) and len(images) == 1 else images
    )


def ledits_scheduler(scheduler: Any) -> Any:
    """A copy of ``scheduler`` with ``timestep_spacing="leading"``: DDIM or the 2nd-order SDE
    DPM-Solver++ as given; any other class becomes that DPM-Solver++ (as diffusers' pipeline does)."""
    config = dict(scheduler.config)
    config.pop("_use_default_values", None)
    config["timestep_spacing"] = "leading"
    if S.is_scheduler(scheduler, "DDIMScheduler"):
        return type(scheduler).from_config(config)
    if S.is_scheduler(scheduler, "DPMSolverMultistepScheduler"):
        out = type(scheduler).from_config(config)
        if not L.supports_scheduler(out):
            raise EditorOptionError(
                f"LEDITS++ inverts with DPMSolverMultistepScheduler only for algorithm_type='sde-dpmsolver++' "
                f"and solver_order=2, not {out.config.algorithm_type!r} / {out.config.solver_order}; set "
                f"DPMSolverMultistepScheduler.from_config(config, algorithm_type='sde-dpmsolver++', solver_order=2)"
            )
        return out
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++", solver_order=2)


def _usable_masks(
    opts: LEditsOptions, unet: Any, latent_hw: tuple[int, ...]
) -> tuple[LEditsOptions, list[str]]:
    """The options with the masks resolved for this UNet: ``use_intersect_mask=None`` (default) is on
    where the UNet can run it and otherwise falls back to the noise mask, with a warning; a mask asked
    for explicitly (``True``) that cannot run is an error."""
    want = opts.use_intersect_mask is not False
    if not (want or opts.use_cross_attn_mask):
        return dataclasses.replace(opts, use_intersect_mask=False), []
    why = _mask_problem(unet, latent_hw)
    if why is None:
        return dataclasses.replace(opts, use_intersect_mask=want), []
    if opts.use_intersect_mask or opts.use_cross_attn_mask:
        raise EditorOptionError(why)
    note = why.replace(
        "Pass use_intersect_mask=False", "editing with the noise mask alone (use_intersect_mask=False)"
    )
    warnings.warn(note, UserWarning, stacklevel=4)
    return dataclasses.replace(opts, use_intersect_mask=False, use_cross_attn_mask=False), [note]


def _pixels(proc: Any, image: Any) -> tuple[torch.Tensor, list[str]]:
    """``[1, 3, H, W]`` in [-1, 1] with sides a multiple of 32 (LEDITS++ needs them; diffusers raises):
    a larger image is resized down to the nearest multiple, with a note."""
    h, w = proc.get_default_height_width(image)
    h32, w32 = h - h % 32, w - w % 32
    if not (h32 and w32):
        raise EditorOptionError(f"the image is {w}x{h}; LEDITS++ needs sides of at least 32 pixels")
    if (h32, w32) == (h, w):
        return proc.preprocess(image), []
    return proc.preprocess(image, height=h32, width=w32), [
        f"resized {w}x{h} -> {w32}x{h32} (multiples of 32)"
    ]


def _edit_predictor(
    run_edit: Any, embeds: torch.Tensor, guide: list, opts: LEditsOptions, masks: bool, dev: Any
):
    """``predict(x, t, i, tensors)`` of one edit step: the UNet on ``[uncond, concepts...]``, then
    ``eps_uncond + semantic_guidance`` (or ``sem_guidance[i]``), guidance-rescaled if asked."""
    kernel = L.gaussian_kernel(dev) if masks else None
    user_mask = _mask(opts.user_mask, dev)

    def predict(x: torch.Tensor, t: Any, i: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        eps, maps = run_edit(torch.cat([x] * (1 + len(guide))), t.to(dev), embeds)
        eps = eps.chunk(1 + len(guide))
        if opts.sem_guidance is not None and len(opts.sem_guidance) > i:
            g = torch.zeros_like(eps[0]) + opts.sem_guidance[i].to(dev)
        else:
            attn = L.AttentionMaps(list(maps)) if masks else None
            g = L.semantic_guidance(
                eps[0], eps[1:], guide, i, t, attn=attn, use_cross_attn_mask=opts.use_cross_attn_mask,
                use_intersect_mask=opts.use_intersect_mask, user_mask=user_mask, kernel=kernel,
            )  # fmt: skip
        noise_pred = eps[0] + g
        if opts.guidance_rescale > 0.0:
            noise_pred = S.rescale_noise_cfg(noise_pred, torch.stack(eps[1:]).mean(0), opts.guidance_rescale)
        return noise_pred

    return predict


def _inversion_model(runner: Any, src: torch.Tensor, empty: torch.Tensor, opts: LEditsOptions) -> Any:
    """The noise prediction of inversion, as diffusers' ``invert`` computes it: the source prompt's,
    and with a source prompt ``eps_src + s * (eps("") - eps_src)`` (diffusers' order of terms)."""
    dev = src.device
    if opts.source_prompt == "" or opts.source_guidance_scale <= 1.0:
        return lambda x, t: runner(x, t.to(dev), src)[0]

    def model(x: torch.Tensor, t: Any) -> torch.Tensor:
        e_src = runner(x, t.to(dev), src)[0]
        return e_src + opts.source_guidance_scale * (runner(x, t.to(dev), empty)[0] - e_src)

    return model


@hookimpl
def p2pz_register_editors() -> list[type[Editor]]:
    return [LEditsEditor]
