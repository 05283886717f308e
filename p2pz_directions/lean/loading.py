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

__all__ = [
    "LEAN_CLASSES",
    "add_variant",
    "lean_spec",
    "load_component",
    "read_config",
    "read_json",
    "weight_files",
]

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


def read_json(path: Path, max_bytes: int, what: str) -> Any:
    """``json.loads`` of ``path`` after checking its size; any problem is `LeanUnsupported`."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise LeanUnsupported(f"cannot read {what} {path}: {e}") from e
    if size > max_bytes:
        raise LeanUnsupported(
            f"{what} {path} is {size} bytes, more than the {max_bytes} the lean loader reads; "
            "check the file (a config is a few KiB) or load the folder with diffusers / transformers"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.read(max_bytes + 1))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LeanUnsupported(f"cannot parse {what} {path}: {e}") from e


def read_config(path: Path, limit: int = _MAX_CONFIG, what: str = "config") -> dict[str, Any]:
    """A ``config.json`` / ``scheduler_config.json``: `read_json`, and it must be a JSON object."""
    data = read_json(path, limit, what)
    if not isinstance(data, dict):
        raise LeanUnsupported(f"{what} {path} is not a JSON object")
    return data


def add_variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.fp16.safetensors``, ``x.safetensors.index.json`` ->
    ``x.safetensors.index.fp16.json`` (how diffusers and transformers name a variant's files)."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def plain_file_name(name: Any) -> bool:
    """A file name with no folder part (what a shard index may name)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not os.path.isabs(name)
    )


def weight_files(folder: Path, filename: str, variant: str | None, library: str) -> list[Path]:
    """The safetensors file(s) of ``filename`` (``diffusion_pytorch_model.safetensors``,
    ``model.safetensors``) in ``folder``: the single file, else the shards its index names (plain
    file names inside the folder only). ``library`` (diffusers, transformers) is named in the advice."""
    single = folder / add_variant(filename, variant)
    if single.is_file():
        return [single]
    index = folder / add_variant(f"{filename}.index.json", variant)
    if index.is_file():
        data = read_json(index, _MAX_INDEX, "safetensors index")
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise LeanUnsupported(f"{index} has no 'weight_map'; re-save the model or load it with {library}")
        shards: list[Path] = []
        for name in dict.fromkeys(wmap.values()):
            if not plain_file_name(name) or not name.endswith(".safetensors"):
                raise LeanUnsupported(
                    f"{index} names shard {name!r}, which is not a plain .safetensors file name inside the folder"
                )
            path = folder / name
            if not path.is_file():
                raise LeanUnsupported(f"{index} names shard {name!r}, which is missing from {folder}")
            shards.append(path)
        return shards
    present = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.safetensors") if p != single
    )
    want = f"{single.name} or {index.name}"
    if present:
        raise LeanUnsupported(
            f"no {want} in {folder} (found {', '.join(present[:4])}); the lean loader reads "
            f"safetensors only: load this folder with {library}, or convert it to safetensors"
        )
    raise LeanUnsupported(f"no weights in {folder}: expected {want}")


def read_tensors(files: list[Path], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of ``files`` on ``device``, floating ones in ``dtype`` (`read_safetensors`)."""
    from p2pz_directions.lean.reading import read_safetensors

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(f, device, dtype))
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
    files = weight_files(sub, "diffusion_pytorch_model.safetensors", variant, "diffusers")
    with torch.device("meta"):
        module = cls(config)
    state = read_tensors(files, device, dtype)
    if name == "vae":
        from p2pz_directions.lean.vae import rename_legacy_keys

        state = rename_legacy_keys(state)
    return assign(module, state, f"{sub}")
