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

from .cli_options import DeviceOpt, DtypeOpt, SeedOpt
from .errors import P2PZError

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
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


def _parse_opt(pairs: list[str] | None, editor: Any = None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, typed from the editor's options (see `cli_options.parse_opts`)."""
    from .cli_options import parse_opts

    return parse_opts(pairs, editor)


def _save(img: Any, path: Path) -> None:
    """Write an image atomically: a temp file in the same folder, then a rename."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        img.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    from .cli_options import UsageError, hub_reachable, in_hf_cache, offline_reason

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
    from .cli_options import UsageError, check_image_output, check_output_dir

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
        images: Annotated[
            list[Path] | None,
            typer.Argument(
                help="Images to edit (any format/mode; several go to one -o folder). Leave out to generate "
                "one from --prompt.",
                show_default=False,
            ),
        ] = None,
        direction: Annotated[
            list[str],
            typer.Option(
                "--direction",
                "-d",
                help="Direction name, e.g. 'cat->dog' or 'pack:cat@1->dog' (quote it). Repeat to apply several.",
            ),
        ] = ...,
        output: Annotated[
            str | None,
            typer.Option(
                "--output",
                "-o",
                help="Image file for the edit (.png, .jpg ...), or a folder for several images.",
            ),
        ] = None,
        editor: Annotated[
            str, typer.Option("--editor", "-e", help="Editor plugin (see `p2pz plugins`).")
        ] = "pix2pix-zero",
        model: Annotated[
            str, typer.Option("--model", "-m", help="Diffusers model id or folder.")
        ] = DEFAULT_MODEL,
        prompt: Annotated[
            str | None,
            typer.Option("--prompt", help="Caption of the image (skips BLIP) or, without IMAGE, the prompt."),
        ] = None,
        negative_prompt: Annotated[
            str | None, typer.Option("--negative-prompt", help="Negative prompt.")
        ] = None,
        steps: Annotated[
            int | None, typer.Option("--steps", help="Sampling steps (editor default: 50).")
        ] = None,
        guidance_scale: Annotated[
            float | None, typer.Option("--guidance-scale", help="Classifier-free guidance (default 7.5).")
        ] = None,
        xa_guidance: Annotated[
            float | None,
            typer.Option(
                "--xa-guidance",
                help="pix2pix-zero cross-attention guidance (default 0.1; SD 2.x needs 0.01 or less).",
            ),
        ] = None,
        strength: Annotated[
            float | None, typer.Option("--strength", help="SDEdit: noise strength in (0, 1].")
        ] = None,
        inpaint_strength: Annotated[
            float | None, typer.Option("--inpaint-strength", help="DiffEdit: inversion strength in (0, 1].")
        ] = None,
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
        opt: Annotated[
            list[str] | None,
            typer.Option(
                "--opt", help="Any other editor option, KEY=VALUE (e.g. --opt lambda_kl=10). Repeatable."
            ),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    ) -> None:
        """Apply a named direction to images (or to one generated from --prompt)."""
        from . import editors
        from .cli_options import (
            UsageError,
            check_device,
            check_dtype,
            check_image_output,
            check_inputs,
            check_model_available,
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
        given = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
            "cross_attention_guidance_amount": xa_guidance,
            "strength": strength,
            "inpaint_strength": inpaint_strength,
            "mask": str(mask) if mask is not None else None,
        }
        options.update({k: v for k, v in given.items() if v is not None})

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
        options.update(_parse_opt(opt, ed))
        ed._check_options(options)
        _check_captioner_reachable(ed, options, len(images))
        ds = [ed.resolve_direction(name) for name in direction]
        batched = _accepts_lists(ed)
        d_arg = ds if batched and len(ds) > 1 else _combined(ds)
        d_name = " + ".join(d.name for d in ds)

        # 3. the edit: one batched call when the editor takes lists, else one image at a time
        results = []
        with PhaseProgress(ed.phases, enabled=not quiet and not as_json) as cb, warnings.catch_warnings():
            from .images import ImageResizedWarning

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
                    from .images import load_image

                    m = load_image(m)
                _save(m, save_mask)
                written["mask"] = str(save_mask)
            if compare:
                from .images import side_by_side

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
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        verbose: Annotated[
            bool, typer.Option("--verbose", "-v", help="Show tracebacks of failures.")
        ] = False,
    ) -> None:
        """List discovered plugins, their versions, what they provide, and any that failed to load."""
        from . import plugins

        report = plugins.plugin_report()
        if as_json:
            sys.stdout.write(json.dumps([p.to_dict() for p in report], indent=2) + "\n")
            return
        table = Table(title="p2pz plugins (entry-point group p2pz_directions.editors)")
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
            Path, typer.Option("--out", help="Folder for the model, registry and pictures.")
        ] = Path("p2pz-demo"),
        steps: Annotated[int, typer.Option("--steps", help="Sampling steps per editor.")] = 4,
        editor: Annotated[
            list[str] | None,
            typer.Option("--editor", "-e", help="Only these editors (default: every installed one)."),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
    ) -> None:
        """Run the whole flow offline on a tiny random-weight model (a plumbing check, not a picture)."""
        from .cli_options import quiet_loading
        from .demo import run_demo

        quiet_loading()

        say = (lambda s: err.print(s, markup=False)) if as_json else (lambda s: out.print(s, markup=False))
        report = run_demo(out_dir, steps=steps, editors_to_run=editor or None, say=say)
        if as_json:
            sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        if report.failures:
            raise typer.Exit(1)
