"""``p2pz mask``: DiffEdit's mask for a direction, written as an image (white = what the edit changes).

The mask is the one ``p2pz edit --editor diffedit`` computes (same options, same seed), saved at
the image's size as an 8-bit PNG, so any inpainting pipeline can take it as ``mask_image``, and
``p2pz edit --editor diffedit --mask mask.png`` can reuse or hand-correct it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from p2pz_directions.cli.options import (
    DEFAULT_MODEL,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    QuietOpt,
    RunModelOpt,
    SeedOpt,
    direction_option,
    opt_option,
    output_option,
    steps_option,
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``mask`` to the ``p2pz`` app."""

    @app.command("mask")
    def mask_cmd(
        image: Annotated[Path, typer.Argument(help="The image to mask (any format/mode).")],
        direction: Annotated[
            str,
            direction_option("Direction name, e.g. 'bowl of fruits->bowl of pears'."),
        ] = ...,
        output: Annotated[
            str | None,
            output_option("Where to write the mask (PNG; default IMAGE-mask.png)."),
        ] = None,
        model: RunModelOpt = DEFAULT_MODEL,
        steps: Annotated[int, steps_option("Schedule length the strength refers to.")] = 50,
        num_maps: Annotated[
            int, typer.Option("--num-maps", help="Noise draws averaged into the mask (num_maps_per_mask).")
        ] = 10,
        mask_strength: Annotated[
            float,
            typer.Option(
                "--mask-strength", help="Noise level of the draws, in (0, 1] (mask_encode_strength)."
            ),
        ] = 0.5,
        threshold: Annotated[
            float,
            typer.Option(
                "--threshold", help="Clamp at this many times the mean difference (mask_thresholding_ratio)."
            ),
        ] = 3.0,
        guidance_scale: Annotated[
            float, typer.Option("--guidance-scale", help="Classifier-free guidance of the two predictions.")
        ] = 7.5,
        source_prompt: Annotated[
            str | None, typer.Option("--source-prompt", help="Text instead of the source concept.")
        ] = None,
        target_prompt: Annotated[
            str | None, typer.Option("--target-prompt", help="Text instead of the target concept.")
        ] = None,
        seed: SeedOpt = 0,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        opt: Annotated[
            list[str] | None,
            opt_option("Any other DiffEdit mask option, KEY=VALUE. Repeatable."),
        ] = None,
        as_json: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Compute DiffEdit's mask of IMAGE for a direction and write it as a PNG (white = edit)."""
        import numpy as np

        from p2pz_directions import editors
        from p2pz_directions.cli.edit import PhaseProgress, _save
        from p2pz_directions.cli.options import (
            check_device,
            check_dtype,
            check_image_output,
            check_inputs,
            check_model_available,
            parse_opts,
            quiet_loading,
        )

        check_inputs([image])
        check_device(device)
        check_dtype(dtype)
        output = check_image_output(output or str(image.with_name(f"{image.stem}-mask.png")))
        check_model_available(model)
        options: dict[str, Any] = {
            "seed": seed,
            "num_inference_steps": steps,
            "num_maps_per_mask": num_maps,
            "mask_encode_strength": mask_strength,
            "mask_thresholding_ratio": threshold,
            "guidance_scale": guidance_scale,
        }
        if source_prompt is not None:
            options["source_prompt"] = source_prompt
        if target_prompt is not None:
            options["target_prompt"] = target_prompt
        quiet_loading()
        ed = editors.get("diffedit", model=model, device=device, dtype=dtype)
        options.update(parse_opts(opt, ed))
        options["mask_only"] = True
        d = ed.resolve_direction(direction)  # name and encoder first: nothing loads for a wrong one
        with PhaseProgress(("mask",), enabled=not quiet and not as_json) as cb:
            res = ed.edit(str(image), d, progress=cb, **options)
        _save(res.mask, output)
        coverage = float((np.asarray(res.mask) >= 128).mean())
        summary = {
            "direction": d.name,
            "model": model,
            "mask": str(output),
            "size": list(res.mask.size),
            "coverage": round(coverage, 4),
            "seconds": round(float(res.extra.get("seconds", 0.0)), 3),
            "notes": res.extra.get("notes", []),
        }
        if as_json:
            sys.stdout.write(json.dumps(summary, indent=2) + "\n")
            return
        for note in summary["notes"]:
            err.print(f"note: {note}", markup=False)
        out.print(
            f"wrote mask: {output} ({res.mask.size[0]}x{res.mask.size[1]}, {coverage:.1%} to edit)",
            markup=False,
        )
        if coverage in (0.0, 1.0):
            err.print(
                "note: the mask is all "
                + ("black: nothing would change" if coverage == 0.0 else "white: everything would change")
                + "; try another --threshold or --mask-strength",
                markup=False,
            )
