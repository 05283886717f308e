"""``p2pz eval``: how good is a direction? Edit a set of images and score the edits.

The table (mean ± std over images and seeds per direction × editor, winners marked) goes to
stdout, or ``--json``; the JSON and a grid image (inputs × directions) are written to
``--output`` (default ``p2pz-eval.json`` and ``p2pz-eval-grid.png``); progress bars go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2pz_directions.cli.options import (
    DEFAULT_MODEL,
    DeviceOpt,
    DtypeOpt,
    EditorsOpt,
    GuidanceScaleOpt,
    InpaintStrengthOpt,
    JsonOpt,
    NegativePromptOpt,
    OptOpt,
    PromptOpt,
    QuietOpt,
    RunModelOpt,
    SeedsOpt,
    StepsOpt,
    StrengthOpt,
    XaGuidanceOpt,
    output_option,
)
from p2pz_directions.core.errors import P2PZError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


class _Bars:
    """``progress(phase, done, total)`` drawn as one rich bar per phase (edit, score)."""

    def __init__(self, enabled: bool) -> None:
        self.p = Progress(
            TextColumn("[bold]{task.description:<6}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            disable=not enabled,
        )
        self.enabled = enabled
        self.tasks: dict[str, Any] = {}
        self.started = False

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            self.p.__exit__(*exc)

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase == "load":
            return
        # drawn once the checks passed and work begins; never started when disabled: a disabled rich
        # Progress still writes an empty line when it stops (rich < 14.3, output not a terminal)
        if not self.started and self.enabled:
            self.p.__enter__()
            self.started = True
        if phase not in self.tasks:
            self.tasks[phase] = self.p.add_task(phase, total=total)
        self.p.update(self.tasks[phase], completed=done, total=total)


def render_tables(res: Any) -> list[Table]:
    """One table per editor: a row per metric, a column per direction; the winner marked ``*``."""
    from p2pz_directions.eval.aggregate import fmt

    tables = []
    for e in res.editors:
        t = Table(
            title=f"{e}: {len(res.images)} images × {len(res.seeds)} seeds, mean ± std",
            title_justify="left",
        )
        t.add_column("metric")
        for d in res.directions:
            t.add_column(d, justify="right")
        for m, info in res.metrics.items():
            cells = []
            for d in res.directions:
                text = fmt(res.summaries[d][e].get(m))
                if d in res.winners.get(e, {}).get(m, []):
                    text = f"[bold]{text} *[/bold]"
                cells.append(text)
            t.add_row(f"{m} {'↑' if info['higher_is_better'] else '↓'}", *cells)
        tables.append(t)
    return tables


def register(app: typer.Typer) -> None:
    """Add ``eval`` to the ``p2pz`` app."""

    @app.command("eval")
    def eval_cmd(
        ctx: typer.Context,
        directions: Annotated[
            list[str] | None,
            typer.Argument(
                help="Directions to score and compare: 'cat->dog', 'cat->dog@2', 'pack:cat->dog'."
            ),
        ] = None,
        images: Annotated[
            list[Path] | None,
            typer.Option("--images", "-i", help="A folder of images, or image files. Repeatable."),
        ] = None,
        editor: EditorsOpt = None,
        model: RunModelOpt = DEFAULT_MODEL,
        seeds: SeedsOpt = "0",
        scorer: Annotated[
            list[str] | None,
            typer.Option(
                "--scorer",
                help="Scorer plugin(s); repeatable (default clip, dino-structure, background-ssim).",
            ),
        ] = None,
        clip_model: Annotated[
            str | None,
            typer.Option("--clip-model", help="CLIP id or folder (default openai/clip-vit-base-patch32)."),
        ] = None,
        dino_model: Annotated[
            str | None,
            typer.Option("--dino-model", help="DINO ViT id or folder (default facebook/dino-vitb8)."),
        ] = None,
        prompt: PromptOpt = None,
        negative_prompt: NegativePromptOpt = None,
        steps: StepsOpt = None,
        guidance_scale: GuidanceScaleOpt = None,
        xa_guidance: XaGuidanceOpt = None,
        strength: StrengthOpt = None,
        inpaint_strength: InpaintStrengthOpt = None,
        prompt_template: Annotated[
            str, typer.Option("--prompt-template", help="CLIP text for a concept; '{}' is its name.")
        ] = "a photo of a {}",
        opt: OptOpt = None,
        record: Annotated[
            bool, typer.Option("--record", help="Store the scores with the concept pair, in its pack.")
        ] = False,
        record_pack: Annotated[
            str | None,
            typer.Option("--record-pack", help="Pack to store records in (default: the direction's)."),
        ] = None,
        output: Annotated[
            Path,
            output_option("JSON results file; the grid image is written beside it."),
        ] = Path("p2pz-eval.json"),
        batch_size: Annotated[
            int, typer.Option("--batch-size", help="Images per editor call, for editors that take lists.")
        ] = 8,
        no_grid: Annotated[bool, typer.Option("--no-grid", help="Do not write the grid image.")] = False,
        list_scorers: Annotated[
            bool, typer.Option("--list-scorers", help="List scorers and metrics, then exit.")
        ] = False,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        as_json: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Score directions: edit --images along each direction, measure CLIP accuracy, structure distance,
        CLIP directional similarity and background SSIM; mean ± std, winners, a grid image, optional record."""
        from p2pz_directions.eval import scorers as scorers_mod

        if list_scorers:
            rows = []
            for name in scorers_mod.available():
                f = scorers_mod._registry()[name]
                for m in getattr(f, "metrics", ()):
                    rows.append(
                        {
                            "scorer": name,
                            "metric": m.name,
                            "higher_is_better": m.higher_is_better,
                            "default_model": getattr(f, "default_model", None),
                            "description": m.description,
                        }
                    )
            if as_json:
                sys.stdout.write(json.dumps(rows, indent=2) + "\n")
                return
            t = Table(title="scorers")
            for col in ("scorer", "metric", "better", "default model", "what"):
                t.add_column(col)
            for r in rows:
                better = "higher" if r["higher_is_better"] else "lower"
                t.add_row(r["scorer"], r["metric"], better, str(r["default_model"] or "-"), r["description"])
            out.print(t)
            return
        if not directions:
            raise P2PZError(
                "give one or more directions to evaluate, e.g. p2pz eval 'cat->dog' --images cats/"
            )
        if not images:
            raise P2PZError("give the images to edit: --images FOLDER (or image files)")
        from p2pz_directions.batch.jobs import parse_seeds
        from p2pz_directions.cli.options import editor_kwargs, parse_opts
        from p2pz_directions.core.atomic import write_bytes
        from p2pz_directions.editing.editors import parse_dtype
        from p2pz_directions.eval import evaluate

        options = editor_kwargs(ctx.params)
        options.update(parse_opts(opt))
        models: dict[str, str] = {}
        sc = list(scorer) if scorer else None
        chosen = sc if sc is not None else ["clip", "dino-structure", "background-ssim"]
        if clip_model is not None:
            if "clip" not in chosen:
                raise P2PZError(
                    "--clip-model was given but the clip scorer is not in use (add --scorer clip)"
                )
            models["clip"] = clip_model
        if dino_model is not None:
            if "dino-structure" not in chosen:
                raise P2PZError("--dino-model was given but the dino-structure scorer is not in use")
            models["dino-structure"] = dino_model
        if output.suffix.lower() != ".json":
            raise P2PZError(f"--output {output}: give a .json file name (the grid is written beside it)")
        with _Bars(enabled=not quiet and not as_json) as bars:
            res = evaluate(
                directions,
                [os.fspath(p) for p in images],
                editor=editor or ["pix2pix-zero"],
                model=model,
                seeds=parse_seeds(seeds),
                scorers=sc,
                scorer_models=models,
                editor_options=options,
                prompt_template=prompt_template,
                device=device,
                dtype=parse_dtype(dtype),
                record=record,
                record_pack=record_pack,
                edit_batch_size=batch_size,
                progress=bars,
            )
        data = res.to_dict()
        output.parent.mkdir(parents=True, exist_ok=True)
        grid_path = output.with_name(output.stem + "-grid.png")
        if not no_grid and res.grid is not None:
            res.grid.save(grid_path)
            data["grid"] = str(grid_path)
        write_bytes(output, json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8"))
        if as_json:
            sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            return
        for t in render_tables(res):
            out.print(t)
        if res.winners:
            out.print("* best of the directions compared, per editor and metric")
        out.print(f"wrote {output}" + ("" if no_grid else f" and {grid_path}"))
        for r in res.records:
            out.print(
                f"recorded {r.direction} ({r.editor}) as {r.pack}:{r.record_id[:12]}  (p2pz show '{r.direction}')"
            )
