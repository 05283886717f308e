"""``p2pz edit``, ``p2pz plugins`` and ``p2pz demo``.

Progress bars (one per phase: caption, invert, reference, edit) go to stderr; the summary (or
``--json``) to stdout.
"""

from __future__ import annotations

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
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, phase: str, step: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=total)
        self.progress.update(self.tasks[phase], completed=step, total=total)


def _parse_opt(pairs: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values parsed as JSON when they can be (numbers, true/false, null)."""
    opts: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise typer.BadParameter(f"--opt takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            opts[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            opts[key.strip().replace("-", "_")] = value
    return opts


def _save(img: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def register(app: typer.Typer) -> None:
    """Add ``edit``, ``plugins`` and ``demo`` to the ``p2pz`` app."""

    @app.command("edit")
    def edit_cmd(
        image: Annotated[
            Path | None,
            typer.Argument(help="Image to edit (any format/mode). Leave out to generate one from --prompt."),
        ] = None,
        direction: Annotated[
            str,
            typer.Option("--direction", "-d", help="Direction name, e.g. 'cat->dog' or 'pack:cat@1->dog'."),
        ] = ...,
        output: Annotated[
            Path | None, typer.Option("--output", "-o", help="Where to write the edit (PNG).")
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
            bool, typer.Option("--compare", help="Also write input | reconstruction | edit side by side.")
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
        """Apply a named direction to an image (or to one generated from --prompt)."""
        from . import editors

        if image is None and prompt is None:
            raise typer.BadParameter("give an IMAGE to edit, or --prompt to generate one", param_hint="IMAGE")
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
        options.update(_parse_opt(opt))
        if output is None:
            stem = image.stem if image is not None else "generated"
            output = Path(f"{stem}-{editor}.png")

        ed = editors.get(editor, model=model, device=device, dtype=dtype)
        # name and encoder first: nothing is loaded for a wrong direction or option
        d = ed.resolve_direction(direction)
        with PhaseProgress(ed.phases, enabled=not quiet and not as_json) as cb, warnings.catch_warnings():
            from .images import ImageResizedWarning

            warnings.simplefilter("ignore", ImageResizedWarning)  # said once, as a note, below
            res = ed.edit(str(image) if image is not None else None, d, progress=cb, **options)

        written = {"image": str(output)}
        _save(res.image, output)
        if save_mask is not None:
            if res.mask is None:
                raise P2PZError(
                    f"editor {editor!r} made no mask to save (--save-mask); the edit was written to {output}"
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
            cmp_path = output.with_name(output.stem + "-compare" + output.suffix)
            _save(side_by_side(panels), cmp_path)
            written["compare"] = str(cmp_path)
        summary = {
            "editor": editor,
            "direction": d.name,
            "model": model,
            "caption": res.caption,
            "seconds": round(float(res.extra.get("seconds", 0.0)), 3),
            "notes": res.extra.get("notes", []),
            "written": written,
        }
        if as_json:
            sys.stdout.write(json.dumps(summary, indent=2) + "\n")
            return
        for note in summary["notes"]:
            err.print(f"note: {note}", markup=False)
        if res.caption:
            out.print(f"caption: {res.caption}", markup=False)
        for what, path in written.items():
            out.print(f"wrote {what}: {path}", markup=False)
        out.print(f"{editor} {d.name} in {summary['seconds']:.1f} s", markup=False)

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
        from .demo import run_demo

        say = (lambda s: err.print(s, markup=False)) if as_json else (lambda s: out.print(s, markup=False))
        report = run_demo(out_dir, steps=steps, editors_to_run=editor or None, say=say)
        if as_json:
            sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        if report.failures:
            raise typer.Exit(1)
