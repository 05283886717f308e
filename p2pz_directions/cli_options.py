"""Option types shared by every ``p2pz`` command module, so each flag reads the same everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="Diffusers model id or folder: picks its text encoder.")
]
EncoderOpt = Annotated[str | None, typer.Option("--encoder", help="Text encoder id (instead of --model).")]
PackOpt = Annotated[str | None, typer.Option("--pack", "-p", help="Only this pack.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="cuda, cpu, cuda:1 ... (default: cuda if present).")
]
DtypeOpt = Annotated[
    str | None, typer.Option("--dtype", help="float16 | bfloat16 | float32 (default: float16 on GPU).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
