"""``p2pz build``, ``p2pz reencode`` and ``p2pz build-pack``: the builder on the command line.

::

    p2pz build cat dog --model CompVis/stable-diffusion-v1-4 [--n 1000] [--captioner flan-t5|templates|file]
          [--captioner-model google/flan-t5-xl] [--source-captions cats.txt --target-captions dogs.txt]
          [--seed 0] [--device cuda] [--dtype float16] [--pack NAME] [--dry-run] [--json]
    p2pz reencode cat --model stabilityai/stable-diffusion-2-1
    p2pz build-pack [NAMES...] --model CompVis/stable-diffusion-v1-4 [--captioner templates]

Progress bars (generation, filtering, encoding) go to stderr; the summary (or ``--json``) to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from p2pz_directions.cli.options import (
    DeviceOpt,
    DtypeOpt,
    EncoderOpt,
    JsonOpt,
    ModelOpt,
    SeedOpt,
    model_option,
    pack_option,
)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

_STAGE_LABEL = {"generate": "generating", "filter": "usable", "encode": "encoding"}


class RichProgress:
    """A ``progress(stage, concept, done, total)`` callback drawing one rich bar per stage and concept.

    >>> with RichProgress(Console(stderr=True)) as cb:     # doctest: +SKIP
    ...     build("cat", "dog", progress=cb)
    """

    def __init__(self, console: Console | None = None, enabled: bool | None = None):
        console = console or err
        self.enabled = console.is_terminal if enabled is None else enabled
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not self.enabled,
            transient=False,
        )
        self.tasks: dict[tuple[str, str], Any] = {}
        self.events: list[tuple[str, str, int, int | None]] = []

    def __enter__(self) -> RichProgress:
        # a disabled rich Progress still writes an empty line when it stops (rich < 14.3, output not a
        # terminal), which would come before a one-line error: start one only when it draws
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)

    def __call__(self, stage: str, concept: str, done: int, total: int | None) -> None:
        self.events.append((stage, concept, done, total))
        key = (stage, concept)
        if key not in self.tasks:
            label = f"{_STAGE_LABEL.get(stage, stage)} {concept}"
            self.tasks[key] = self.progress.add_task(label[:28], total=total)
        self.progress.update(self.tasks[key], completed=done, total=total)


def _quiet_libraries() -> None:
    """Keep transformers' load-time progress bars and warnings out of our progress display."""
    from p2pz_directions.cli.options import quiet_loading

    quiet_loading()


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _near_dup(value: str) -> float | None:
    v = value.strip().lower()
    if v in ("off", "none", "no", "0"):
        return None
    try:
        t = float(v)
    except ValueError:
        raise typer.BadParameter(
            f"--near-duplicates takes a similarity in (0, 1] or 'off', not {value!r}"
        ) from None
    if not 0 < t <= 1:
        raise typer.BadParameter(f"--near-duplicates must be in (0, 1] (or 'off'), not {t}")
    return t


def _drops(report: dict[str, Any]) -> str:
    d = report.get("dropped") or {}
    return ", ".join(f"{v} {k}" for k, v in d.items()) or "-"


def _summary(result, show: int) -> None:
    info = result.to_dict()
    t = Table(title="dry run: nothing encoded or stored" if result.dry_run else f"built {info['direction']}")
    for col in ("concept", "kept", "seen", "dropped (by reason)", "stored as", "content hash"):
        t.add_column(col)
    for side in ("source", "target"):
        s = info[side]
        t.add_row(
            s["name"],
            str(s["kept"]),
            str(s["report"]["seen"]),
            _drops(s["report"]),
            s.get("ref", "-"),
            (s.get("content_hash") or "-")[:12],
        )
    out.print(t)
    if result.dry_run:
        for cs in (result.source, result.target):
            out.print(f"[bold]{cs.name}[/bold]: {len(cs.captions)} captions")
            for i, c in enumerate(cs.captions[:show] if show else cs.captions, 1):
                out.print(f"  {i:>4}  {c}", markup=False)
            if show and len(cs.captions) > show:
                out.print(f"  ... {len(cs.captions) - show} more (--show 0 prints all)")
        return
    enc = info["encoder"]
    out.print(f"encoder {enc['id']} (D={enc['hidden_size']})  delta norm {info['delta_norm']}")
    out.print(f"stored in {info['store']}  ->  use it as {info['direction']!r}", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``build``, ``reencode`` and ``build-pack`` to the ``p2pz`` app."""

    @app.command("build")
    def build_cmd(
        source: Annotated[str, typer.Argument(help="Source concept, e.g. 'cat'.")],
        target: Annotated[str, typer.Argument(help="Target concept, e.g. 'dog'.")],
        model: ModelOpt = None,
        encoder: EncoderOpt = None,
        n: Annotated[int, typer.Option("--n", "-n", help="Usable captions per concept.")] = 1000,
        captioner: Annotated[
            str, typer.Option("--captioner", "-c", help="flan-t5 | templates | file (or a registered one).")
        ] = "flan-t5",
        captioner_model: Annotated[
            str, typer.Option("--captioner-model", help="Seq2seq model of flan-t5 (id or folder).")
        ] = "google/flan-t5-xl",
        source_captions: Annotated[
            Path | None, typer.Option("--source-captions", help="Caption file for the source, one per line.")
        ] = None,
        target_captions: Annotated[
            Path | None, typer.Option("--target-captions", help="Caption file for the target, one per line.")
        ] = None,
        seed: SeedOpt = 0,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        pack: Annotated[str, pack_option("Local pack to publish into.")] = "local",
        batch_size: Annotated[
            int, typer.Option("--batch-size", help="Captions per text-encoder batch.")
        ] = 1024,
        min_captions: Annotated[
            int, typer.Option("--min-captions", help="Fewest usable captions accepted.")
        ] = 16,
        prompt: Annotated[
            str | None, typer.Option("--prompt", help="flan-t5 prompt with {concept} (default: the paper's).")
        ] = None,
        temperature: Annotated[
            float, typer.Option("--temperature", help="flan-t5 sampling temperature.")
        ] = 0.8,
        top_k: Annotated[int, typer.Option("--top-k", help="flan-t5 top-k sampling.")] = 10,
        max_new_tokens: Annotated[
            int, typer.Option("--max-new-tokens", help="flan-t5 caption length cap.")
        ] = 64,
        gen_batch_size: Annotated[
            int | None, typer.Option("--gen-batch-size", help="flan-t5 samples per generate call.")
        ] = None,
        max_chars: Annotated[int, typer.Option("--max-chars", help="Drop captions longer than this.")] = 150,
        no_mention_check: Annotated[
            bool, typer.Option("--no-mention-check", help="Keep captions that do not mention the concept.")
        ] = False,
        near_duplicates: Annotated[
            str,
            typer.Option(
                "--near-duplicates", help="MiniLM cosine at which captions are near duplicates, or 'off'."
            ),
        ] = "0.95",
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Print the captions; encode and store nothing.")
        ] = False,
        show: Annotated[
            int, typer.Option("--show", help="With --dry-run: captions printed per concept (0: all).")
        ] = 20,
        as_json: JsonOpt = False,
    ) -> None:
        """Build SOURCE and TARGET concepts from captions and publish them: the direction SOURCE->TARGET."""
        from p2pz_directions.builder.pipeline import DEFAULT_MODEL, run_build
        from p2pz_directions.cli.options import (
            check_device,
            check_dtype,
            check_encoder,
            check_model_available,
        )

        check_device(device)
        check_dtype(dtype)
        check_encoder(encoder)
        if not dry_run:  # the text encoder's weights must be here (a dry run encodes nothing)
            if encoder is not None:
                check_model_available(encoder, "--encoder", "config.json")
            else:
                check_model_available(model or DEFAULT_MODEL, filename="text_encoder/config.json")
        _quiet_libraries()
        cap_opts: dict[str, Any] = {}
        if captioner.strip().lower() == "flan-t5":
            cap_opts = {"temperature": temperature, "top_k": top_k, "max_new_tokens": max_new_tokens}
            if prompt is not None:
                cap_opts["prompt"] = prompt
            if gen_batch_size is not None:
                cap_opts["batch_size"] = gen_batch_size
        elif prompt is not None:
            raise typer.BadParameter("--prompt only applies to --captioner flan-t5")
        filt = {
            "max_chars": max_chars,
            "require_mention": not no_mention_check,
            "near_duplicate_threshold": _near_dup(near_duplicates),
        }
        with RichProgress() as cb:
            result = run_build(
                source,
                target,
                model=model,
                encoder=encoder,
                n=n,
                captioner=captioner,
                captioner_model=captioner_model,
                source_captions=source_captions,
                target_captions=target_captions,
                seed=seed,
                device=device,
                dtype=dtype,
                pack=pack,
                batch_size=batch_size,
                min_captions=min_captions,
                dry_run=dry_run,
                progress=cb,
                captioner_options=cap_opts,
                filter_options=filt,
            )
        if as_json:
            return _print_json(result.to_dict(captions=dry_run))
        _summary(result, show)

    @app.command("reencode")
    def reencode_cmd(
        name: Annotated[str, typer.Argument(help="Stored concept, e.g. 'cat', 'mypack:cat@2'.")],
        model: Annotated[str | None, model_option("Diffusers model id or folder to embed for.")] = None,
        encoder: EncoderOpt = None,
        from_encoder: Annotated[
            str | None,
            typer.Option(
                "--from-encoder", help="Take the captions of the version built for this model/encoder."
            ),
        ] = None,
        pack: Annotated[str | None, pack_option("Pack to publish into (default: the source's pack).")] = None,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        batch_size: Annotated[
            int, typer.Option("--batch-size", help="Captions per text-encoder batch.")
        ] = 1024,
        as_json: JsonOpt = False,
    ) -> None:
        """Embed a stored concept's captions with another model's text encoder (no caption model needed)."""
        from p2pz_directions.builder.pipeline import reencode
        from p2pz_directions.cli.options import (
            check_device,
            check_dtype,
            check_encoder,
            check_model_available,
        )

        check_device(device)
        check_dtype(dtype)
        check_encoder(encoder)
        if model is not None:
            check_model_available(model, filename="text_encoder/config.json")
        _quiet_libraries()
        with RichProgress() as cb:
            c = reencode(
                name,
                model=model,
                encoder=encoder,
                from_encoder=from_encoder,
                pack=pack,
                device=device,
                dtype=dtype,
                batch_size=batch_size,
                progress=cb,
            )
        info = {
            "ref": c.ref,
            "encoder": c.encoder.to_dict(),
            "num_captions": len(c.captions or []),
            "content_hash": c.content_hash,
            "reencoded_from": c.provenance.get("reencoded_from"),
        }
        if as_json:
            return _print_json(info)
        src = info["reencoded_from"] or {}
        out.print(
            f"re-encoded {src.get('pack')}:{src.get('name')}@{src.get('version')} ({src.get('encoder')}) -> "
            f"{c.ref} for {c.encoder.id} (D={c.encoder.hidden_size}), {info['num_captions']} captions, "
            f"hash {(c.content_hash or '')[:12]}",
            markup=False,
        )

    @app.command("build-pack")
    def build_pack_cmd(
        names: Annotated[list[str] | None, typer.Argument(help="Recipe names (default: all).")] = None,
        model: Annotated[
            str | None, model_option("Model to build for (default: the recipe's first).")
        ] = None,
        encoder: EncoderOpt = None,
        pack: Annotated[str, pack_option("Local pack to publish into.")] = "official",
        recipes_dir: Annotated[
            Path | None, typer.Option("--recipes", help="Folder of recipe .toml files.")
        ] = None,
        captioner: Annotated[
            str | None,
            typer.Option("--captioner", "-c", help="Override every recipe's captioner (e.g. templates)."),
        ] = None,
        n: Annotated[
            int | None, typer.Option("--n", "-n", help="Override every recipe's caption count.")
        ] = None,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        list_only: Annotated[bool, typer.Option("--list", help="List the recipes and exit.")] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Rebuild concepts of the official pack from their recipes (registry/recipes/*.toml)."""
        from p2pz_directions.builder import recipes
        from p2pz_directions.cli.options import check_device, check_dtype, check_encoder

        check_device(device)
        check_dtype(dtype)
        check_encoder(encoder)
        _quiet_libraries()
        if list_only:
            allr = recipes.official_recipes(recipes_dir)
            if as_json:
                return _print_json([r.to_dict() for r in allr.values()])
            for r in allr.values():
                out.print(
                    f"{r.name:<20} {r.captioner:<9} n={r.n:<5} seed={r.seed}  {r.description}", markup=False
                )
            return
        with RichProgress() as cb:
            built = recipes.build_recipes(
                names or None,
                model=model,
                encoder=encoder,
                pack=pack,
                folder=recipes_dir,
                captioner=captioner,
                n=n,
                device=device,
                dtype=dtype,
                progress=cb,
            )
        rows = [
            {
                "ref": c.ref,
                "encoder": c.encoder.id,
                "num_captions": len(c.captions or []),
                "content_hash": c.content_hash,
            }
            for c in built
        ]
        if as_json:
            return _print_json(rows)
        for r in rows:
            out.print(f"built {r['ref']}  {r['num_captions']} captions  {r['encoder']}", markup=False)
