"""The ``p2pz`` command line.

Exit codes: 0 ok; 1 a check failed (``verify`` found damage); 2 bad input or any other error,
printed as one line ``error: ...`` on stderr. ``--json`` prints data for scripts on stdout.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from . import __version__, naming
from .cli_options import EncoderOpt, JsonOpt, ModelOpt, PackOpt
from .errors import P2PZError

app = typer.Typer(
    name="p2pz",
    help="Edit directions for zero-shot image editing: build, store, share and apply them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _store():
    from .store import default_store

    return default_store()


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"p2pz-directions {__version__}")
        raise typer.Exit(0)


# --- list ---------------------------------------------------------------------------------------
@app.command("list")
def list_cmd(
    pattern: Annotated[
        str, typer.Argument(help="Shell-style pattern: 'cat*' or, with '->', directions.")
    ] = "*",
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    pack: PackOpt = None,
    show_directions: Annotated[
        bool, typer.Option("--directions", "-d", help="List directions, not concepts.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List stored concepts (or, with --directions or a pattern containing '->', directions)."""
    import fnmatch

    from . import directions
    from .directions import _norm_pattern, resolve_encoder_id

    store = _store()
    if show_directions or naming.ARROW in pattern:
        names = directions.list(pattern, model=model, encoder=encoder, pack=pack, store=store)
        if as_json:
            return print_json(names)
        for n in names:
            out.print(n)
        if not names:
            err.print(f"no directions match {pattern!r} in {store.root}")
        return
    enc_id = resolve_encoder_id(model, encoder)
    pat = _norm_pattern(pattern)
    entries = [
        e
        for e in (store.entries(pack=pack, encoder=enc_id, skip_damaged=True))
        if fnmatch.fnmatchcase(e.name, pat)
    ]
    rows: dict[tuple[str, str, str], list] = {}
    for e in entries:
        rows.setdefault((e.pack, e.encoder.id, e.name), []).append(e)
    if as_json:
        return print_json(
            [
                {
                    "pack": p,
                    "name": n,
                    "encoder": enc,
                    "hidden_size": es[-1].encoder.hidden_size,
                    "versions": [x.version for x in es],
                    "latest": es[-1].version,
                    "content_hash": es[-1].content_hash,
                    "num_captions": es[-1].num_captions,
                    "created": es[-1].created,
                }
                for (p, enc, n), es in rows.items()
            ]
        )
    if not rows:
        err.print(
            f"no concepts match {pattern!r} in {store.root}. Import some with `p2pz import-pt`, "
            "build them with `p2pz build`, or pull a pack with `p2pz pull`."
        )
        return
    t = Table(title=f"concepts in {store.root}")
    for col in ("pack", "concept", "versions", "encoder", "D", "captions", "hash"):
        t.add_column(col)
    for (p, enc, n), es in rows.items():
        last = es[-1]
        t.add_row(
            p,
            n,
            ",".join(str(x.version) for x in es),
            enc,
            str(last.encoder.hidden_size),
            "-" if last.num_captions is None else str(last.num_captions),
            last.content_hash[:12],
        )
    out.print(t)
    n_dir = len(directions.list("*", model=model, encoder=encoder, pack=pack, store=store))
    out.print(
        f"{n_dir} directions available: `p2pz list --directions` lists them, `p2pz show a->b` shows one."
    )


# --- show ---------------------------------------------------------------------------------------
def _concept_info(c) -> dict[str, Any]:
    emb = c.embedding.float()
    return {
        "ref": c.ref,
        "name": c.name,
        "pack": c.pack,
        "version": c.version,
        "encoder": c.encoder.to_dict(),
        "dtype": c.dtype,
        "shape": list(c.embedding.shape),
        "norm": round(float(emb.norm()), 4),
        "content_hash": c.content_hash,
        "created": c.created,
        "num_captions": len(c.captions) if c.captions else 0,
        "captions_sample": (c.captions or [])[:5],
        "provenance": c.provenance,
    }


@app.command("show")
def show_cmd(
    name: Annotated[str, typer.Argument(help="A direction ('cat->dog') or a concept ('cat', 'pack:cat@2').")],
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    pack: PackOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a direction or concept: metadata, norms, a few captions."""
    import torch

    from . import directions

    store = _store()
    if naming.is_direction(name):
        d = directions.load(name, model=model, encoder=encoder, pack=pack, store=store)
        delta = d.delta[0]
        s, t = d.source.embedding.float(), d.target.embedding.float()
        cos = torch.nn.functional.cosine_similarity(s.flatten(), t.flatten(), dim=0)
        tok_norm = delta.norm(dim=-1)
        info = {
            "direction": d.name,
            "encoder": d.encoder.to_dict(),
            "delta_shape": list(d.delta.shape),
            "delta_norm": round(float(delta.norm()), 4),
            "delta_token_norm": {
                "min": round(float(tok_norm.min()), 4),
                "max": round(float(tok_norm.max()), 4),
                "mean": round(float(tok_norm.mean()), 4),
            },
            "cosine_source_target": round(float(cos), 6),
            "source": _concept_info(d.source),
            "target": _concept_info(d.target),
        }
        if as_json:
            return print_json(info)
        out.print(f"[bold]{d.name}[/bold]  encoder {d.encoder.id} (D={d.encoder.hidden_size})")
        out.print(
            f"delta {info['delta_shape']}  norm {info['delta_norm']}  per-token norm "
            f"{info['delta_token_norm']['min']}..{info['delta_token_norm']['max']}  "
            f"cos(source, target) {info['cosine_source_target']}"
        )
        for side in ("source", "target"):
            _print_concept(info[side], side)
        return
    c = directions.load_concept(name, model=model, encoder=encoder, pack=pack, store=store)
    info = _concept_info(c)
    if as_json:
        return print_json(info)
    _print_concept(info, "concept")


def _print_concept(info: dict[str, Any], label: str) -> None:
    t = Table(show_header=False, title=f"{label}: {info['ref']}", title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for key in ("encoder", "dtype", "shape", "norm", "content_hash", "created", "num_captions"):
        v = info[key]
        if key == "encoder":
            v = f"{v['id']} (D={v['hidden_size']}, {v['family']})"
        t.add_row(key, str(v))
    prov = info["provenance"] or {}
    t.add_row(
        "made by", str(prov.get("method", "?")) + (f" from {prov['source']}" if "source" in prov else "")
    )
    for cap in info["captions_sample"]:
        t.add_row("caption", cap)
    out.print(t)


# --- import-pt ----------------------------------------------------------------------------------
@app.command("import-pt")
def import_pt_cmd(
    items: Annotated[
        list[str] | None,
        typer.Argument(help="Folders of .pt files, .pt files, or http(s) URLs.", show_default=False),
    ] = None,
    pack: Annotated[str, typer.Option("--pack", "-p", help="Pack to import into.")] = "local",
    encoder: EncoderOpt = None,
    model: ModelOpt = None,
    name: Annotated[
        list[str] | None, typer.Option("--name", help="Concept name per file (default: the file's stem).")
    ] = None,
    authors: Annotated[
        bool,
        typer.Option("--authors", help="Import the pix2pix-zero authors' SD 1.4 concepts from their URLs."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Import legacy .pt concept embeddings (read with torch.load(weights_only=True) only)."""
    from .legacy import AUTHORS_SD14_URLS, import_pt

    sources = list(items or [])
    if authors:
        sources += list(AUTHORS_SD14_URLS.values())
        if encoder is None and model is None:
            encoder = "openai/clip-vit-large-patch14"
    if not sources:
        raise P2PZError("nothing to import: give folders, .pt files or URLs, or --authors")
    concepts = import_pt(sources, pack=pack, encoder=encoder, model=model, names=name, progress=not as_json)
    if as_json:
        return print_json([_concept_info(c) | {"captions_sample": []} for c in concepts])
    for c in concepts:
        out.print(f"imported {c.ref}  ({c.encoder.id}, {c.dtype}, hash {c.content_hash[:12]})")


# --- export -------------------------------------------------------------------------------------
@app.command("export")
def export_cmd(
    name: Annotated[str, typer.Argument(help="A direction ('cat->dog') or a concept.")],
    to: Annotated[Path, typer.Option("--to", help="Folder to write into (created if missing).")],
    fmt: Annotated[
        str, typer.Option("--format", help="pt (torch.save, as the authors ship) or safetensors.")
    ] = "pt",
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    pack: PackOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write concepts as [1, 77, D] tensors, so the diffusers docs snippets work with our data.

    A direction writes its source and target concepts (``cat.pt``, ``dog.pt``).
    """
    from .exporting import export

    if fmt not in ("pt", "safetensors"):
        raise P2PZError(f"--format {fmt!r}: use 'pt' or 'safetensors'")
    files = export(name, to, fmt=fmt, model=model, encoder=encoder, pack=pack, store=_store())
    if as_json:
        return print_json([str(f) for f in files])
    for f in files:
        out.print(f"wrote {f}")


# --- verify -------------------------------------------------------------------------------------
@app.command("verify")
def verify_cmd(pack: PackOpt = None, as_json: JsonOpt = False) -> None:
    """Check every stored file against its hashes; exit 1 if any is damaged."""
    store = _store()
    n, problems = store.verify(pack)
    if as_json:
        print_json(
            {"checked": n, "problems": [{"path": str(p.path), "message": p.message} for p in problems]}
        )
    else:
        for p in problems:
            err.print(f"[red]damaged[/red] {p.path}: {p.message}")
        out.print(f"checked {n} concept versions in {store.root}: {len(problems)} damaged")
        if problems:
            err.print(
                "Fix: re-import the concept (`p2pz import-pt`), rebuild it, or re-pull its pack (`p2pz pull`)."
            )
    if problems:
        raise typer.Exit(1)


# --- optional command groups --------------------------------------------------------------------
_OPTIONAL = ("cli_build", "cli_edit", "cli_mask", "cli_hub", "cli_batch")
for _mod in _OPTIONAL:
    try:
        _m = importlib.import_module(f"p2pz_directions.{_mod}")
    except ImportError as _e:
        if getattr(_e, "name", "") != f"p2pz_directions.{_mod}":
            raise
        continue
    _m.register(app)


# typer may vendor its own click: catch its exception classes and plain click's alike
_EXIT = (typer.Exit, click.exceptions.Exit)
_ABORT = (typer.Abort, click.exceptions.Abort)
_USAGE = (next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"), click.ClickException)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``p2pz`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        rv = app(args=argv, prog_name="p2pz", standalone_mode=False)
    except _EXIT as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except _ABORT:
        err.print("aborted")
        return 1
    except _USAGE as e:
        e.show()
        return 2
    except (P2PZError, ValueError, LookupError, OSError) as e:
        msg = " ".join(str(e).split()) or e.__class__.__name__
        err.print(f"error: {msg}", markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
