"""``p2pz batch``: edit folders, job files and datasets; resumable; several GPUs through accelerate.

Errors of single jobs go to stderr as they happen (and into ``results.parquet``); the one progress
bar to stderr; the summary (or ``--json``) to stdout. Exit code 0: every job done; 1: some job
failed (the others are done); 2: bad input, before any model work; 130: interrupted (re-run the
same command to finish).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from p2pz_directions.cli.options import (
    DEFAULT_MODEL,
    DeviceOpt,
    DirectionsOpt,
    DtypeOpt,
    EditorOpt,
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

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def relaunch_args(ctx: typer.Context, drop: tuple[str, ...] = ("gpus",)) -> list[str]:
    """The command line this command was given (what the user typed), without ``drop``.

    >>> relaunch_args(ctx)                      # doctest: +SKIP
    ['photos/', '--direction', 'cat->dog', '--out', 'edited']
    """
    args: list[str] = []
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name)  # typer may vendor its own click: compare by name
        if p.name in drop or getattr(source, "name", None) != "COMMANDLINE":
            continue
        value = ctx.params.get(p.name)
        if p.param_type_name == "argument":
            args.extend(str(v) for v in (value or ()))
            continue
        flag = p.opts[0]
        if p.is_flag:
            if value:
                args.append(flag)
            elif p.secondary_opts:
                args.append(p.secondary_opts[0])
        elif p.multiple:
            for v in value or ():
                args.extend([flag, str(v)])
        elif value is not None:
            args.extend([flag, str(value)])
    return args


def launch_command(n: int, args: list[str]) -> list[str]:
    """``accelerate launch`` of ``p2pz_directions.batch`` on ``n`` processes (one per GPU)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "p2pz_directions.batch",
        *args,
    ]


def register(app: typer.Typer) -> None:
    """Add ``batch`` to the ``p2pz`` app."""

    @app.command("batch")
    def batch_cmd(
        ctx: typer.Context,
        inputs: Annotated[
            list[str] | None,
            typer.Argument(help="Images, folders, globs ('photos/*.jpg') or job files (.jsonl / .csv)."),
        ] = None,
        out_dir: Annotated[
            Path,
            output_option("Output folder (created; resumable).", "--out"),
        ] = ...,
        direction: DirectionsOpt = None,
        seeds: SeedsOpt = "0",
        editor: EditorOpt = "pix2pix-zero",
        model: RunModelOpt = DEFAULT_MODEL,
        prompt: PromptOpt = None,
        negative_prompt: NegativePromptOpt = None,
        steps: StepsOpt = None,
        guidance_scale: GuidanceScaleOpt = None,
        xa_guidance: XaGuidanceOpt = None,
        strength: StrengthOpt = None,
        inpaint_strength: InpaintStrengthOpt = None,
        opt: OptOpt = None,
        sweep: Annotated[
            list[str] | None,
            typer.Option("--sweep", help="An option's values to cross: KEY=V1,V2 (e.g. strength=0.5,0.75)."),
        ] = None,
        dataset: Annotated[
            str | None, typer.Option("--dataset", help="A `datasets` dataset: Hub id or local folder.")
        ] = None,
        split: Annotated[str, typer.Option("--split", help="Dataset split.")] = "train",
        image_column: Annotated[str, typer.Option("--image-column", help="Dataset image column.")] = "image",
        prompt_column: Annotated[
            str | None, typer.Option("--prompt-column", help="Dataset column with each image's caption.")
        ] = None,
        dataset_config: Annotated[
            str | None, typer.Option("--dataset-config", help="Dataset configuration name.")
        ] = None,
        limit: Annotated[int | None, typer.Option("--limit", help="Only the first N input images.")] = None,
        batch_size: Annotated[
            int, typer.Option("--batch-size", "-b", help="Images per editor call (where the editor batches).")
        ] = 4,
        gpus: Annotated[
            int | None,
            typer.Option(
                "--gpus",
                help="Run on N GPUs: starts `accelerate launch` with N processes (with --device cpu: N CPU processes).",
            ),
        ] = None,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        check_batch: Annotated[
            bool,
            typer.Option(
                "--check-batch/--no-check-batch",
                help="Prove once per kind of job that a batched edit equals the job alone (else edit singly).",
            ),
        ] = True,
        batch_tolerance: Annotated[
            int,
            typer.Option(
                "--batch-tolerance",
                help="8-bit levels a batched edit may differ from the job alone (0: equal pixels).",
            ),
        ] = 0,
        push_to_hub: Annotated[
            str | None, typer.Option("--push-to-hub", help="Publish the output folder as this Hub dataset.")
        ] = None,
        private: Annotated[
            bool, typer.Option("--private", help="With --push-to-hub: a private repo.")
        ] = False,
        as_json: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Edit many images: every input x direction x seed (x --sweep), one PNG each plus results.parquet."""
        from p2pz_directions.batch import runner
        from p2pz_directions.batch.results import push_to_hub as push
        from p2pz_directions.cli.options import editor_kwargs, parse_opts

        if gpus is not None and gpus < 1:
            raise typer.BadParameter("--gpus takes a number of GPUs, 1 or more", param_hint="--gpus")
        options = editor_kwargs(ctx.params)
        options.update(parse_opts(opt))  # typed by the editor once it is loaded (runner)
        # the plan first: bad inputs, job files or sweeps are errors before any model work or launch
        plan = runner.plan_jobs(
            list(inputs or []),
            directions=direction or [],
            seeds=seeds,
            editor=editor,
            model=model,
            options=options,
            sweep=sweep,
            dataset=dataset,
            split=split,
            image_column=image_column,
            prompt_column=prompt_column,
            dataset_config=dataset_config,
            limit=limit,
        )
        if gpus is not None and gpus > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            cmd = launch_command(gpus, relaunch_args(ctx))
            if not quiet and not as_json:
                err.print(
                    f"launching {gpus} processes: accelerate launch ... -m p2pz_directions.batch",
                    markup=False,
                )
            raise typer.Exit(subprocess.call(cmd))

        report = runner.run_jobs(
            plan,
            out_dir,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            check_batch=check_batch,
            batch_tolerance=batch_tolerance,
            progress=not quiet and not as_json,
            err_console=err,
        )
        if not report.is_main:
            raise typer.Exit(0)  # process 0 reports for everyone
        summary = report.to_dict()
        if push_to_hub and not report.interrupted:
            summary["pushed"] = push(out_dir, push_to_hub, private=private or None)
        if as_json:
            sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        else:
            runner.print_summary(report, out)
            if summary.get("pushed"):
                out.print(f"pushed: {summary['pushed']}", markup=False)
        raise typer.Exit(report.exit_code)
