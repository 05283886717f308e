"""Load a Stable Diffusion folder's UNet, VAE, CLIP text encoder, tokenizer and scheduler into the lean classes.

`load_component(name, folder, ...)` reads ``folder/<name>/config.json``, builds the module on the
meta device (no memory, no random init) and assigns the tensors of its safetensors file(s), read
straight onto ``device`` and cast to ``dtype``. Every parameter must come from the file and every
tensor of the file must have a place (the same strictness as diffusers' loading); anything else,
like a ``.bin``-only folder or a config outside SD 1.x / 2.x, raises `LeanUnsupported` with the
reason, and the editor loads diffusers' or transformers' class instead (`lean_spec` says which
components may be tried at all).

Never unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from p2pz_directions.lean import LeanUnsupported

__all__ = ["LEAN_CLASSES", "lean_spec", "load_component", "read_config"]

#: the model_index.json entries the lean classes stand in for
LEAN_CLASSES: dict[str, set[tuple[str, str]]] = {
    "unet": {("diffusers", "UNet2DConditionModel")},
    "vae": {("diffusers", "AutoencoderKL")},
    "text_encoder": {("transformers", "CLIPTextModel")},
    "tokenizer": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
    "scheduler": {("diffusers", n) for n in ("DDIMScheduler", "DDIMInverseScheduler", "PNDMScheduler")},
}
_MAX_CONFIG = 1 << 20
_MAX_INDEX = 16 << 20


def lean_spec(name: str, spec: Any) -> bool:
    """Whether component ``name`` of a ``model_index.json`` entry ``spec`` may load lean."""
    if name not in LEAN_CLASSES:
        return False
    if spec is None:
        return True  # no model_index.json entry: the SD default classes
    return isinstance(spec, (list, tuple)) and len(spec) == 2 and tuple(spec) in LEAN_CLASSES[name]


def read_config(path: Path, limit: int = _MAX_CONFIG) -> dict[str, Any]:
    try:
        size = path.stat().st_size
    except OSError:
        raise LeanUnsupported(f"no {path}") from None
    if size > limit:
        raise LeanUnsupported(f"{path} is over {limit} bytes")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise LeanUnsupported(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise LeanUnsupported(f"{path} is not a JSON object")
    return data


def weight_files(folder: Path, stem: str, variant: str | None) -> list[Path]:
    """The safetensors file(s) of ``stem`` (``diffusion_pytorch_model``, ``model``) in ``folder``."""
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    single = folder / name
    if single.is_file():
        return [single]
    index = folder / f"{name}.index.json"
    if index.is_file():
        data = read_config(index, _MAX_INDEX)
        shards = data.get("weight_map")
        if not isinstance(shards, dict) or not shards:
            raise LeanUnsupported(f"{index} has no weight_map")
        files = []
        for shard in dict.fromkeys(shards.values()):
            if (
                not isinstance(shard, str)
                or os.path.basename(shard) != shard
                or not shard.endswith(".safetensors")
            ):
                raise LeanUnsupported(f"{index} names a shard that is not a file in the folder: {shard!r}")
            if not (folder / shard).is_file():
                raise LeanUnsupported(f"{index} names {shard}, which is missing")
            files.append(folder / shard)
        return files
    raise LeanUnsupported(f"no {name} in {folder} (only safetensors load lean)")


def read_tensors(files: list[Path], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f), device=str(device))
        state.update({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in part.items()})
    return state


def assign(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Put ``state``'s tensors in place of ``module``'s (meta) parameters; all of them, exactly."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise LeanUnsupported(
            f"{what}: the weights do not fit the lean class (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    bad = [k for k, v in own.items() if tuple(v.shape) != tuple(state[k].shape)]
    if bad:
        raise LeanUnsupported(
            f"{what}: {bad[0]} has shape {tuple(state[bad[0]].shape)}, not {tuple(own[bad[0]].shape)}"
        )
    module.load_state_dict(state, strict=True, assign=True)
    module.eval()
    module.requires_grad_(False)
    return module


def load_component(
    name: str,
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    variant: str | None = None,
) -> Any:
    """Component ``name`` (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``) of the diffusers folder
    ``folder`` as a lean class, in ``dtype`` on ``device``; `LeanUnsupported` if it cannot be."""
    sub = Path(folder) / name
    device = torch.device(device)
    if name == "scheduler":
        from p2pz_directions.lean.schedulers import scheduler_from_folder

        return scheduler_from_folder(folder)
    if name == "tokenizer":
        from p2pz_directions.lean.clip import LeanCLIPTokenizer

        return LeanCLIPTokenizer.from_folder(sub)
    if name == "text_encoder":
        from p2pz_directions.lean.clip import LeanCLIPTextModel

        return LeanCLIPTextModel.from_folder(sub, dtype=dtype, device=device, variant=variant)
    if name == "unet":
        from p2pz_directions.lean.unet import LeanUNet as cls
    elif name == "vae":
        from p2pz_directions.lean.vae import LeanVAE as cls
    else:
        raise LeanUnsupported(f"no lean class for {name}")
    config = read_config(sub / "config.json")
    files = weight_files(sub, "diffusion_pytorch_model", variant)
    with torch.device("meta"):
        module = cls(config)
    state = read_tensors(files, device, dtype)
    if name == "vae":
        from p2pz_directions.lean.vae import rename_legacy_keys

        state = rename_legacy_keys(state)
    return assign(module, state, f"{sub}")
