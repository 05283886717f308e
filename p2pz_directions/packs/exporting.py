"""Export stored concepts as plain tensor files, for code that expects the authors' ``.pt`` files.

The diffusers pix2pix-zero docs load ``source_embeds = torch.load("cat.pt")``; after
``p2pz export cat->dog --to out/ --format pt`` the same snippet works on ``out/cat.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from p2pz_directions.core import naming
from p2pz_directions.core.atomic import atomic_path
from p2pz_directions.core.concept import Concept
from p2pz_directions.core.store import LocalStore, default_store


def _file_stem(name: str) -> str:
    return name.replace(" ", "_")


def _write_atomic(concept: Concept, path: Path, fmt: str) -> None:
    tensor = concept.as_embeds(concept.embedding.dtype).contiguous()  # [1, 77, D], stored dtype
    with atomic_path(path) as tmp:
        if fmt == "pt":
            torch.save(tensor, tmp)
        else:
            save_file(
                {"embedding": tensor},
                str(tmp),
                metadata={"concept": concept.name, "encoder": concept.encoder.id},
            )


def export(
    name: str,
    to: str | os.PathLike,
    *,
    fmt: str = "pt",
    model: str | None = None,
    encoder: str | None = None,
    pack: str | None = None,
    store: LocalStore | None = None,
) -> list[Path]:
    """Write the concept(s) behind ``name`` to folder ``to`` as ``[1, 77, D]`` tensors."""
    from p2pz_directions import directions

    if fmt not in ("pt", "safetensors"):
        raise ValueError(f"format {fmt!r}: use 'pt' or 'safetensors'")
    store = store or default_store()
    if naming.is_direction(name):
        d = directions.load(name, model=model, encoder=encoder, pack=pack, store=store)
        concepts = [d.source, d.target]
    else:
        concepts = [directions.load_concept(name, model=model, encoder=encoder, pack=pack, store=store)]
    folder = Path(to)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for c in concepts:
        path = folder / f"{_file_stem(c.name)}.{'pt' if fmt == 'pt' else 'safetensors'}"
        _write_atomic(c, path, fmt)
        files.append(path)
    return files
