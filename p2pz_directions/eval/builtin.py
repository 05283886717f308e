"""The built-in scorers, registered as a plugin exactly as a third party would register its own.

- ``clip`` (`ClipScorer`): **CLIP accuracy** — 1 when the edited image is closer in CLIP space to
  the target concept's text than to the source's, else 0 (pix2pix-zero, Sec. 5) — and **CLIP
  directional similarity** — cosine between the image change ``E_I(edit) - E_I(input)`` and the
  text change ``E_T(target) - E_T(source)`` (Gal et al., StyleGAN-NADA; InstructPix2Pix).
- ``dino-structure`` (`DinoStructureScorer`): **structure distance** — the mean squared difference
  between the cosine self-similarity matrices of the keys of the last DINO ViT layer for the
  input and for the edit (Tumanyan et al., Splice, Eq. 3; the metric pix2pix-zero reports). Equal
  images give exactly 0.
- ``background-ssim`` (`BackgroundSSIMScorer`): **background preservation** — SSIM (Wang et al.
  2004; 11x11 Gaussian window, sigma 1.5) between input and edit averaged over the pixels outside
  the editor's mask (DiffEdit's), None where the editor gives no mask. SSIM rather than LPIPS: it
  needs no network weights.

>>> from p2pz_directions.eval import builtin
>>> builtin.ssim_map(img, img).mean()                      # doctest: +SKIP
tensor(1.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from p2pz_directions.editing.hookspecs import hookimpl
from p2pz_directions.eval.preprocess import Preprocess, as_pil, model_config, read_preprocessor_config
from p2pz_directions.eval.scorers import Metric, Scorer, ScorerModelError, check_batch

CLIP_DEFAULT = "openai/clip-vit-base-patch32"
DINO_DEFAULT = "facebook/dino-vitb8"


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


class ClipScorer(Scorer):
    """CLIP accuracy and CLIP directional similarity (``--clip-model``; default ViT-B/32)."""

    name = "clip"
    description = "CLIP accuracy and CLIP directional similarity"
    default_model = CLIP_DEFAULT
    metrics = (
        Metric(
            "clip_accuracy",
            True,
            "1 when the edit is closer in CLIP space to the target text than to the source text",
            (0.0, 1.0),
        ),
        Metric(
            "clip_directional_similarity",
            True,
            "cosine between the CLIP image change and the CLIP text change",
            (-1.0, 1.0),
        ),
    )
    batch_size = 32

    def __init__(self, model: str | os.PathLike | None = None, *, device=None, dtype=None) -> None:
        super().__init__(model, device=device, dtype=dtype)
        cfg = model_config(self.model_id, "CLIP", "a CLIP model (e.g. openai/clip-vit-base-patch32)")
        if getattr(cfg, "model_type", None) != "clip":
            raise ScorerModelError(
                f"--clip-model {self.model_id!r} is a {getattr(cfg, 'model_type', '?')!r} model, not CLIP: CLIP "
                "accuracy needs a CLIP model with both towers (transformers CLIPModel), e.g. "
                "openai/clip-vit-base-patch32"
            )
        self._cfg = cfg
        self._model = None
        self._tok = None
        self._pre: Preprocess | None = None
        self._text_cache: dict[str, torch.Tensor] = {}

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoTokenizer, CLIPModel

        try:
            self._model = CLIPModel.from_pretrained(self.model_id, torch_dtype=self.dtype)
            self._tok = AutoTokenizer.from_pretrained(self.model_id)
        except (OSError, ValueError) as e:
            raise ScorerModelError(
                f"cannot load CLIP model {self.model_id!r}: {' '.join(str(e).split())[:300]}"
            ) from None
        self._model.to(self.device).eval().requires_grad_(False)
        size = int(self._cfg.vision_config.image_size)
        self._pre = Preprocess.from_config(read_preprocessor_config(self.model_id), "clip", size)

    @torch.inference_mode()
    def image_features(self, images: Sequence[Any]) -> torch.Tensor:
        """Unit-norm CLIP image embeddings ``[N, P]`` (float32)."""
        self._load()
        out = []
        for sl in _chunks(len(images), self.batch_size):
            px = self._pre(list(images[sl]), self.device, self.dtype)
            pooled = self._model.vision_model(pixel_values=px).pooler_output
            out.append(self._model.visual_projection(pooled).float())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm CLIP text embeddings ``[N, P]`` (float32); each distinct text is encoded once."""
        self._load()
        todo = sorted({t for t in texts if t not in self._text_cache})
        if todo:
            max_len = min(int(self._cfg.text_config.max_position_embeddings), 77)
            enc = self._tok(todo, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            pooled = self._model.text_model(**enc).pooler_output
            feats = F.normalize(self._model.text_projection(pooled).float(), dim=-1)
            for t, f in zip(todo, feats, strict=True):
                self._text_cache[t] = f
        return torch.stack([self._text_cache[t] for t in texts])

    def score(self, inputs, edits, *, source_texts, target_texts, masks=None):
        check_batch(inputs, edits, source_texts, target_texts, masks)
        if not inputs:
            return {"clip_accuracy": [], "clip_directional_similarity": []}
        f_in, f_ed = self.image_features(inputs), self.image_features(edits)
        t_src, t_tgt = self.text_features(source_texts), self.text_features(target_texts)
        acc = ((f_ed * t_tgt).sum(-1) > (f_ed * t_src).sum(-1)).float()
        dirsim = F.cosine_similarity(f_ed - f_in, t_tgt - t_src, dim=-1, eps=1e-8)
        return {"clip_accuracy": acc.tolist(), "clip_directional_similarity": dirsim.tolist()}


def _key_module(model: torch.nn.Module) -> torch.nn.Module:
    """The key projection of the last transformer layer of a ViT (transformers 4.x and 5.x layouts)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        enc = getattr(model, "encoder", None)
        layers = getattr(enc, "layer", None) if enc is not None else None
    if layers is None or len(layers) == 0:
        raise ScorerModelError(f"{type(model).__name__} has no transformer layers to read DINO keys from")
    att = layers[-1].attention
    key = getattr(att, "k_proj", None)
    if key is None:
        key = getattr(getattr(att, "attention", None), "key", None)
    if key is None:
        raise ScorerModelError(f"cannot find the key projection in the last layer of {type(model).__name__}")
    return key


def self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Cosine self-similarity ``[B, T, T]`` of token keys ``[B, T, D]`` (Splice's ``attn_cosine_sim``)."""
    k = F.normalize(keys.float(), dim=-1)
    return k @ k.transpose(1, 2)


class DinoStructureScorer(Scorer):
    """Structure distance: DINO ViT last-layer key self-similarity, input vs edit (``--dino-model``)."""

    name = "dino-structure"
    description = "DINO ViT self-similarity structure distance (Splice / pix2pix-zero)"
    default_model = DINO_DEFAULT
    metrics = (
        Metric(
            "structure_distance",
            False,
            "mean squared difference of DINO ViT key self-similarity between input and edit (0 = same structure)",
            (0.0, 4.0),
        ),
    )
    batch_size = 16

    def __init__(self, model: str | os.PathLike | None = None, *, device=None, dtype=None) -> None:
        super().__init__(model, device=device, dtype=dtype)
        cfg = model_config(self.model_id, "DINO", "a DINO ViT (e.g. facebook/dino-vitb8)")
        if getattr(cfg, "model_type", None) != "vit":
            raise ScorerModelError(
                f"--dino-model {self.model_id!r} is a {getattr(cfg, 'model_type', '?')!r} model, not a ViT: structure "
                "distance needs a DINO ViT (transformers ViTModel), e.g. facebook/dino-vitb8"
            )
        self._cfg = cfg
        self._model = None
        self._pre: Preprocess | None = None

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import ViTModel

        try:
            self._model = ViTModel.from_pretrained(
                self.model_id, torch_dtype=self.dtype, add_pooling_layer=False
            )
        except (OSError, ValueError) as e:
            raise ScorerModelError(
                f"cannot load DINO model {self.model_id!r}: {' '.join(str(e).split())[:300]}"
            ) from None
        self._model.to(self.device).eval().requires_grad_(False)
        self._key = _key_module(self._model)
        size = int(self._cfg.image_size)
        self._pre = Preprocess.from_config(read_preprocessor_config(self.model_id), "vit", size)

    @torch.inference_mode()
    def keys(self, images: Sequence[Any]) -> torch.Tensor:
        """Last-layer keys ``[N, T, D]`` (CLS and patch tokens, heads concatenated)."""
        self._load()
        out = []
        got: list[torch.Tensor] = []
        handle = self._key.register_forward_hook(lambda _m, _i, o: got.append(o))
        try:
            for sl in _chunks(len(images), self.batch_size):
                got.clear()
                px = self._pre(list(images[sl]), self.device, self.dtype)
                self._model(pixel_values=px)
                out.append(got[-1].float())
        finally:
            handle.remove()
        return torch.cat(out)

    def score(self, inputs, edits, *, source_texts, target_texts, masks=None):
        check_batch(inputs, edits, source_texts, target_texts, masks)
        if not inputs:
            return {"structure_distance": []}
        s_in, s_ed = self_similarity(self.keys(inputs)), self_similarity(self.keys(edits))
        return {"structure_distance": ((s_in - s_ed) ** 2).mean(dim=(1, 2)).tolist()}


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def ssim_map(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM ``[H, W]`` of two ``[C, H, W]`` images in 0..1 (mean over channels; borders
    reflect-padded so the map covers every pixel). The Gaussian window is applied as two 1-D passes
    over the five local moments at once."""
    g = _gaussian(window, sigma).to(a)
    pad = window // 2
    c, h, w = a.shape
    x = torch.cat([a, b, a * a, b * b, a * b])[None]  # [1, 5C, H, W]
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    n = x.shape[1]  # grouped (depthwise) passes: much faster on CPU than a batch of 1-channel images
    x = F.conv2d(x, g.view(1, 1, 1, window).expand(n, 1, 1, window).contiguous(), groups=n)
    x = F.conv2d(x, g.view(1, 1, window, 1).expand(n, 1, window, 1).contiguous(), groups=n)[0]
    mu_a, mu_b, aa, bb, ab = x.split(c)
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(0)


def _to_chw(img: Any, size: tuple[int, int] | None = None) -> torch.Tensor:
    from PIL import Image

    im = as_pil(img)
    if size is not None and im.size != size:
        im = im.resize(size, resample=Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)


def background_of(mask: Any, size: tuple[int, int]) -> torch.Tensor:
    """Boolean ``[H, W]``: True outside the mask (mask white = edited region), nearest-resized to ``size``."""
    from PIL import Image

    if isinstance(mask, torch.Tensor):
        m = mask.detach().float().cpu().squeeze()
        if m.ndim == 3:
            m = m.mean(0)
        arr = m.numpy()
        if arr.max() > 1.0:
            arr = arr / 255.0
        im = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8))
    elif isinstance(mask, np.ndarray):
        arr = mask.astype(np.float32).squeeze()
        if arr.ndim == 3:
            arr = arr.mean(-1)
        if arr.max() > 1.0:
            arr = arr / 255.0
        im = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8))
    else:
        im = mask.convert("L")
    if im.size != size:
        im = im.resize(size, resample=Image.NEAREST)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0) < 0.5


class BackgroundSSIMScorer(Scorer):
    """SSIM between input and edit outside the editor's mask; None where there is no mask."""

    name = "background-ssim"
    description = "background preservation: SSIM outside the editor's mask (DiffEdit)"
    default_model = None
    metrics = (
        Metric(
            "background_ssim",
            True,
            "SSIM between input and edit outside the edit mask (1 = background untouched)",
            (-1.0, 1.0),
        ),
    )

    def settings(self) -> dict[str, Any]:
        return {"window": 11, "sigma": 1.5}

    def score(self, inputs, edits, *, source_texts, target_texts, masks=None):
        check_batch(inputs, edits, source_texts, target_texts, masks)
        out: list[float | None] = []
        for i, (a, b) in enumerate(zip(inputs, edits, strict=True)):
            m = masks[i] if masks is not None else None
            if m is None:
                out.append(None)
                continue
            ta = _to_chw(a).to(self.device)
            size = (ta.shape[2], ta.shape[1])
            tb = _to_chw(b, size).to(self.device)
            bg = background_of(m, size).to(self.device)
            if not bool(bg.any()):
                out.append(None)  # the mask covers everything: no background to preserve
                continue
            out.append(float(ssim_map(ta, tb)[bg].mean()))
        return {"background_ssim": out}


@hookimpl
def p2pz_register_scorers():
    return [ClipScorer, DinoStructureScorer, BackgroundSSIMScorer]
