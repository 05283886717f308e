"""The one parser of compute dtypes (``--dtype``, ``dtype=``): names and aliases to torch dtypes.

Torch is imported only by `torch_dtype`, so the CLI checks ``--dtype`` before anything heavy loads::

    >>> from p2pz_directions.core.dtypes import dtype_name
    >>> dtype_name("fp16"), dtype_name("torch.bfloat16"), dtype_name("float")
    ('float16', 'bfloat16', 'float32')

(The dtypes a concept is *stored* in are the format's business: `format.py`, `pack_schema.DTYPE_BYTES`.)
"""

from __future__ import annotations

from typing import Any

#: every accepted spelling -> the canonical name (a torch attribute)
ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
NAMES = ("float32", "float16", "bfloat16")


class UnknownDtypeError(ValueError):
    """A dtype name that is none of float32, float16, bfloat16 (or their aliases)."""


def dtype_name(dtype: Any) -> str:
    """``"fp16"``, ``"torch.float16"``, ``torch.float16`` -> ``"float16"``; anything else: `UnknownDtypeError`."""
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in ALIASES:
        raise UnknownDtypeError(f"unknown dtype {dtype!r}; use one of {', '.join(NAMES)}")
    return ALIASES[key]


def torch_dtype(dtype: Any, device: Any = None):
    """The torch dtype for ``dtype`` (a name, an alias or a torch dtype).

    ``None`` gives ``None`` when no ``device`` is given, else the default for that device:
    float16 on CUDA, float32 elsewhere.
    """
    import torch

    if dtype is None:
        if device is None:
            return None
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, dtype_name(dtype))
