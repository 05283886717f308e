"""``p2pz edit``, ``p2pz plugins`` and ``p2pz demo``.

Progress bars (one per phase: caption, invert, reference, edit) go to stderr; the summary (or
``--json``) to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
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
    EditorOpt,
    GuidanceScaleOpt,
    InpaintStrengthOpt,
    JsonOpt,
    NegativePromptOpt,
    OptOpt,
    PromptOpt,
    QuietOpt,
    RunModelOpt,
    SeedOpt,
    StepsOpt,
    StrengthOpt,
    XaGuidanceOpt,
    direction_option,
    editor_option,
    output_option,
    steps_option,
)
from p2pz_directions.core.errors import P2PZError

#: the image captioner editors use when no --prompt is given (the ``blip`` plugin's model)
BLIP_DEFAULT = "Salesforce/blip-image-captioning-base"
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


class PhaseProgress:
    """A ``progress(phase, step, total)`` callback that draws one rich bar per phase.

    >>> with PhaseProgress(("invert", "edit")) as cb:       # doctest: +SKIP
    ...     editor.edit(img, "cat->dog", progress=cb)
    """

    def __init__(self, phases: tuple[str, ...] = (), console: Console | None = None, enabled: bool = True):
        self.phases = phases
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console or err,
            transient=False,
            disable=not enabled,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> PhaseProgress:
        # a disabled rich Progress still writes an empty line when it stops (rich < 14.3, output not a
        # terminal), which would come before a one-line error: start one only when it draws
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)

    def __call__(self, phase: str, step: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=total)
        self.progress.update(self.tasks[phase], completed=step, total=total)


def _save(img: Any, path: Path) -> None:
    """Write an image atomically: a temp file in the same folder, then a rename."""
    from p2pz_directions.core.atomic import atomic_path

    with atomic_path(path, keep_suffix=True) as tmp:  # PIL picks the format from the suffix
        img.save(tmp)


def _accepts_lists(ed: Any) -> bool:
    """Editors that declare an ``options`` dataclass take lists of images and of directions."""
    import dataclasses

    return dataclasses.is_dataclass(getattr(type(ed), "options", None))


def _combined(ds: list[Any]) -> Any:
    """Several directions as one (their sum), for editors that take a single direction."""
    total = ds[0]
    for d in ds[1:]:
        total = total + d
    return total


def _split(res: Any, n: int) -> list[Any]:
    """One result per input image from a batched result (lists in its fields)."""
    import dataclasses

    if n == 1 and not isinstance(res.image, list):
        return [res]
    out = []
    for i in range(n):
        fields = {}
        for f in dataclasses.fields(res):
            v = getattr(res, f.name)
            fields[f.name] = v[i] if isinstance(v, list) and len(v) == n and f.name != "extra" else v
        out.append(dataclasses.replace(res, **fields))
    return out


def _check_captioner_reachable(ed: Any, options: dict[str, Any], n_images: int) -> None:
    """pix2pix-zero captions a photo with BLIP unless --prompt is given: offline, say so at once."""
    from p2pz_directions.cli.options import UsageError, hub_reachable, in_hf_cache, offline_reason

    if not n_images or options.get("prompt") or "caption" not in getattr(ed, "phases", ()):
        return
    if options.get("mode") == "target":  # SDEdit on the target concept: no caption needed
        return
    cap_model = getattr(ed, "caption_model", None) or BLIP_DEFAULT
    if not isinstance(cap_model, str):
        return
    if getattr(ed, "_captioner", None) is not None or Path(cap_model).is_dir():
        return
    if in_hf_cache(cap_model, "config.json") or hub_reachable():
        return
    raise UsageError(
        f"{ed.name} needs a caption of the image: without --prompt it asks BLIP ({cap_model}), which is not "
        f"in the Hugging Face cache, and {offline_reason()}. Pass --prompt 'a photo of a cat' "
        "(a short caption of your image)"
    )


def _output_paths(images: list[Path], output: str | None, editor: str) -> list[Path]:
    """Where each edit goes: ``-o FILE`` for one image, ``-o FOLDER`` (default: here) for several."""
    from p2pz_directions.cli.options import UsageError, check_image_output, check_output_dir

    if len(images) <= 1:
        stem = images[0].stem if images else "generated"
        return [check_image_output(output or f"{stem}-{editor}.png", folder_for_many=True)]
    folder = check_output_dir(output if output is not None else ".")
    paths, seen = [], set()
    for img in images:
        p = folder / f"{img.stem}-{editor}.png"
        k = 2
        while p in seen:
            p = folder / f"{img.stem}-{k}-{editor}.png"
            k += 1
        seen.add(p)
        paths.append(p)
    if len(set(images)) != len(images):
        raise UsageError("the same input image is given twice")
    return paths


def register(app: typer.Typer) -> None:
    """Add ``edit``, ``plugins`` and ``demo`` to the ``p2pz`` app."""

    @app.command("edit")
    def edit_cmd(
        ctx: typer.Context,
        images: Annotated[
            list[Path] | None,
            typer.Argument(
                help="Images to edit (any format/mode; several go to one -o folder). Leave out to generate "
                "one from --prompt.",
                show_default=False,
            ),
        ] = None,
        direction: Annotated[list[str], direction_option()] = ...,
        output: Annotated[
            str | None,
            output_option("Image file for the edit (.png, .jpg ...), or a folder for several images."),
        ] = None,
        editor: EditorOpt = "pix2pix-zero",
        model: RunModelOpt = DEFAULT_MODEL,
        prompt: PromptOpt = None,
        negative_prompt: NegativePromptOpt = None,
        steps: StepsOpt = None,
        guidance_scale: GuidanceScaleOpt = None,
        xa_guidance: XaGuidanceOpt = None,
        strength: StrengthOpt = None,
        inpaint_strength: InpaintStrengthOpt = None,
        mask: Annotated[
            Path | None, typer.Option("--mask", help="DiffEdit: a mask image (white = edit).")
        ] = None,
        save_mask: Annotated[
            Path | None, typer.Option("--save-mask", help="Write the editor's mask here.")
        ] = None,
        seed: SeedOpt = 0,
        compare: Annotated[
            bool,
            typer.Option(
                "--compare",
                help="Also write the panels side by side: input | reconstruction | edit (pix2pix-zero), "
                "input | edit (DiffEdit, SDEdit).",
            ),
        ] = False,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        opt: OptOpt = None,
        as_json: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Apply a named direction to images (or to one generated from --prompt)."""
        from p2pz_directions.core import cuda_start

        cuda_start.start(device)  # the CUDA context and first kernels, while torch imports
        from p2pz_directions import editors
        from p2pz_directions.cli.options import (
            UsageError,
            check_device,
            check_dtype,
            check_image_output,
            check_inputs,
            check_model_available,
            editor_kwargs,
            parse_opts,
            quiet_loading,
        )

        # 1. check every input before any model work: nothing is loaded or written for a wrong one
        images = list(images or [])
        if not images and prompt is None:
            raise UsageError("give an IMAGE to edit, or --prompt to generate one (see `p2pz edit --help`)")
        check_inputs(images)
        if mask is not None:
            check_inputs([mask])
        check_device(device)
        check_dtype(dtype)
        outputs = _output_paths(images, output, editor)
        if save_mask is not None:
            if len(images) > 1:
                raise UsageError("--save-mask takes one image; with several, the masks are not saved")
            check_image_output(save_mask, "--save-mask")
        check_model_available(model)
        options: dict[str, Any] = {"seed": seed}
        options.update(editor_kwargs(ctx.params))
        if mask is not None:
            options["mask"] = str(mask)

        # 2. the editor (nothing loaded yet), its typed options, the directions by name
        quiet_loading()
        ed = editors.get(editor, model=model, device=device, dtype=dtype)
        fields = (
            {f.name for f in dataclasses.fields(ed.options)}
            if dataclasses.is_dataclass(getattr(ed, "options", None))
            else set()
        )
        if (
            "num_inference_steps" in options
            and "num_inference_steps" not in fields
            and "num_inversion_steps" in fields
        ):
            options["num_inversion_steps"] = options.pop(
                "num_inference_steps"
            )  # LEDITS++: --steps are its inversion steps
        options.update(parse_opts(opt, ed))
        ed._check_options(options)
        _check_captioner_reachable(ed, options, len(images))
        ds = [ed.resolve_direction(name) for name in direction]
        batched = _accepts_lists(ed)
        d_arg = ds if batched and len(ds) > 1 else _combined(ds)
        d_name = " + ".join(d.name for d in ds)

        # 3. the edit: one batched call when the editor takes lists, else one image at a time
        results = []
        with PhaseProgress(ed.phases, enabled=not quiet and not as_json) as cb, warnings.catch_warnings():
            from p2pz_directions.editing.images import ImageResizedWarning

            warnings.simplefilter("ignore", ImageResizedWarning)  # said once, as a note, below
            if not images:
                results = [ed.edit(None, d_arg, progress=cb, **options)]
            elif batched and len(images) > 1:
                results = _split(
                    ed.edit([str(p) for p in images], d_arg, progress=cb, **options), len(images)
                )
            else:
                results = [ed.edit(str(p), d_arg, progress=cb, **options) for p in images]

        # 4. write the pictures
        written_all = []
        for res, out_path in zip(results, outputs, strict=True):
            written = {"image": str(out_path)}
            _save(res.image, out_path)
            if save_mask is not None:
                if res.mask is None:
                    raise P2PZError(
                        f"editor {editor!r} made no mask to save (--save-mask); the edit was written to {out_path}"
                    )
                m = res.mask
                if not hasattr(m, "save"):
                    from p2pz_directions.editing.images import load_image

                    m = load_image(m)
                _save(m, save_mask)
                written["mask"] = str(save_mask)
            if compare:
                from p2pz_directions.editing.images import side_by_side

                panels = [
                    p
                    for p in (res.original, res.reconstruction, res.image)
                    if p is not None and hasattr(p, "save")
                ]
                cmp_path = out_path.with_name(out_path.stem + "-compare" + out_path.suffix)
                _save(side_by_side(panels), cmp_path)
                written["compare"] = str(cmp_path)
            written_all.append(written)
        # a batched call's results share one `extra` (one time for all); one-by-one edits add up
        timed = results[:1] if batched and len(images) > 1 else results
        seconds = sum(float(r.extra.get("seconds", 0.0)) for r in timed)
        notes = [n for r in results for n in r.extra.get("notes", [])]
        summary: dict[str, Any] = {
            "editor": editor,
            "direction": d_name,
            "model": model,
            "caption": results[0].caption,
            "seconds": round(seconds, 3),
            "notes": list(dict.fromkeys(notes)),
            "written": written_all[0],
        }
        if len(results) > 1:
            summary["images"] = [
                {"input": str(p), "caption": r.caption, "written": w}
                for p, r, w in zip(images, results, written_all, strict=True)
            ]
        if as_json:
            sys.stdout.write(json.dumps(summary, indent=2) + "\n")
            return
        for note in summary["notes"]:
            err.print(f"note: {note}", markup=False)
        for r, w in zip(results, written_all, strict=True):
            if r.caption:
                out.print(f"caption: {r.caption}", markup=False)
            for what, path in w.items():
                out.print(f"wrote {what}: {path}", markup=False)
        n = f" ({len(results)} images)" if len(results) > 1 else ""
        out.print(f"{editor} {d_name}{n} in {summary['seconds']:.1f} s", markup=False)

    @app.command("plugins")
    def plugins_cmd(
        as_json: JsonOpt = False,
        verbose: Annotated[
            bool, typer.Option("--verbose", "-v", help="Show tracebacks of failures.")
        ] = False,
    ) -> None:
        """List discovered plugins, their versions, what they provide, and any that failed to load."""
        from p2pz_directions.editing import plugins

        report = plugins.plugin_report()
        if as_json:
            sys.stdout.write(json.dumps([p.to_dict() for p in report], indent=2) + "\n")
            return
        table = Table(title="p2pz plugins (entry-point group p2pz_directions.editing.editors)")
        for col in ("plugin", "version", "provides", "status"):
            table.add_column(col)
        for p in report:
            provides = []
            for kind in ("editors", "image_captioners", "captioners", "encoders"):
                names = getattr(p, kind)
                if names:
                    provides.append(f"{kind.replace('_', ' ')}: {', '.join(names)}")
            version = p.version or "-"
            if p.distribution:
                version = f"{p.distribution} {version}"
            status = "ok" if p.ok else f"[red]FAILED[/red]: {p.error}"
            table.add_row(p.name, version, "\n".join(provides) or "-", status)
        out.print(table)
        failed = [p for p in report if not p.ok]
        if verbose:
            for p in failed:
                if p.detail:
                    err.print(f"--- {p.name} ---\n{p.detail}", markup=False)
        if failed:
            err.print(f"{len(failed)} plugin(s) failed; the others work. Use --verbose for tracebacks.")

    @app.command("demo")
    def demo_cmd(
        out_dir: Annotated[
            Path,
            output_option("Folder for the model, registry and pictures.", "--out"),
        ] = Path("p2pz-demo"),
        steps: Annotated[int, steps_option("Sampling steps per editor.")] = 4,
        editor: Annotated[
            list[str] | None, editor_option("Only these editors (default: every installed one).")
        ] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Run the whole flow offline on a tiny random-weight model (a plumbing check, not a picture)."""
        from p2pz_directions.cli.options import quiet_loading
        from p2pz_directions.editing.demo import run_demo

        quiet_loading()

        say = (lambda s: err.print(s, markup=False)) if as_json else (lambda s: out.print(s, markup=False))
        report = run_demo(out_dir, steps=steps, editors_to_run=editor or None, say=say)
        if as_json:
            sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        if report.failures:
            raise typer.Exit(1)
