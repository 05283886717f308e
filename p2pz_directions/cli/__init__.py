"""The ``p2pz`` command line.

Exit codes: 0 ok; 1 a check failed (``verify`` found damage); 2 bad input or any other error,
printed as one line ``error: ...`` on stderr (``p2pz --debug ...`` or ``P2PZ_DEBUG=1`` shows the
traceback instead). ``--json`` prints data for scripts on stdout.

``--help``, ``list`` and ``show`` import no torch, transformers or diffusers: they answer at once.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from p2pz_directions import __version__
from p2pz_directions.cli.options import (
    EncoderOpt,
    JsonOpt,
    ModelOpt,
    PackOpt,
    check_encoder,
    cli_syntax,
    pack_option,
    print_table,
)
from p2pz_directions.core import constants, naming
from p2pz_directions.core.errors import P2PZError
from p2pz_directions.core.terminal import safe_text

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
    from p2pz_directions.core.store import default_store

    return default_store()


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="On an error, show the full traceback (also P2PZ_DEBUG=1).")
    ] = False,
) -> None:
    if version:
        out.print(f"p2pz-directions {__version__}")
        raise typer.Exit(0)


def _print_directions(store, names: list[str], model, encoder, pack) -> None:
    """One row per direction and encoder, with the packs its two concepts come from."""
    from p2pz_directions.core.directions import _norm_pattern, resolve_encoder_id

    enc_id = resolve_encoder_id(model, encoder)
    entries = store.entries(
        pack=naming.parse_pack(pack).name if pack else None, encoder=enc_id, skip_damaged=True
    )
    packs: dict[tuple[str, str], set[str]] = {}
    for e in entries:
        packs.setdefault((e.encoder.id, e.name), set()).add(e.pack)
    wanted = {_norm_pattern(n) for n in names}
    t = Table(title=f"directions in {store.root}", title_justify="left")
    for col in ("direction", "encoder", "source pack", "target pack"):
        t.add_column(col)
    rows = []
    for enc in sorted({k[0] for k in packs}):
        for n in names:
            a, b = n.split(naming.ARROW, 1)
            if (enc, a) in packs and (enc, b) in packs and n in wanted:
                rows.append((n, enc, ",".join(sorted(packs[enc, a])), ",".join(sorted(packs[enc, b]))))
    for r in rows:
        t.add_row(*r)
    print_table(out, t)
    if len({r[0] for r in rows}) < len(rows) or any("," in r[2] + r[3] for r in rows):
        out.print(
            "Some names are held by several encoders or packs: pick with --model/--encoder, --pack, "
            "or a prefix (`p2pz show 'PACK:cat->dog'`)."
        )


# --- show ---------------------------------------------------------------------------------------
def _read_array(entry):
    """The verified manifest and embedding (float32 numpy) of a stored version, without torch."""
    import numpy as np
    from safetensors.numpy import load as load_np

    from p2pz_directions.core.errors import IntegrityError
    from p2pz_directions.core.format import TENSOR_FILE, TENSOR_KEY, read_manifest, sha256_bytes

    meta = read_manifest(entry.path)
    tpath = entry.path / TENSOR_FILE
    try:
        data = tpath.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(
            f"{tpath} is missing. Run `p2pz verify`, then re-import or re-pull that pack."
        ) from None
    if sha256_bytes(data) != meta["tensor_sha256"]:
        raise IntegrityError(
            f"{tpath} is corrupted: its sha256 does not match the recorded one (truncated or modified). "
            "Run `p2pz verify`, then re-import or re-pull that pack."
        )
    try:
        arr = load_np(data)[TENSOR_KEY]
    except Exception:  # noqa: BLE001 - bfloat16 has no numpy dtype: read it the usual way
        return meta, None
    if list(arr.shape) != meta["shape"]:
        raise IntegrityError(
            f"{tpath} is corrupted: tensor is {list(arr.shape)}, metadata says {meta['shape']}"
        )
    return meta, np.asarray(arr, dtype=np.float32)


def _entry_info(entry) -> tuple[dict[str, Any], Any]:
    """`_concept_info` of a stored version, read with numpy (torch only for bfloat16 tensors)."""
    import numpy as np

    meta, arr = _read_array(entry)
    if arr is None:
        c = _store().load(entry)
        return _concept_info(c), c.embedding.float().numpy()
    caps = meta.get("captions") or []
    ver = meta.get("version")
    ref = f"{entry.pack}:{meta['name']}" + (f"@{ver}" if ver is not None else "")
    return {
        "ref": ref,
        "name": meta["name"],
        "pack": entry.pack,
        "version": ver,
        "encoder": entry.encoder.to_dict(),
        "dtype": meta["dtype"],
        "shape": list(meta["shape"]),
        "norm": round(float(np.linalg.norm(arr)), 4),
        "content_hash": meta["content_hash"],
        "created": meta.get("created"),
        "num_captions": len(caps),
        "captions_sample": caps[:5],
        "provenance": dict(meta.get("provenance") or {}),
    }, arr


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


def _direction_name(src: dict[str, Any], tgt: dict[str, Any]) -> str:
    """Named like `Direction.name`: one pack prefix when both sides share it."""

    def bare(i: dict[str, Any]) -> str:
        return i["name"] if i["version"] is None else f"{i['name']}@{i['version']}"

    if src["pack"] and src["pack"] == tgt["pack"]:
        return f"{src['pack']}:{bare(src)}->{bare(tgt)}"
    return f"{src['ref']}->{tgt['ref']}"


def _print_concept(info: dict[str, Any], label: str) -> None:
    t = Table(show_header=False, title=f"{label}: {safe_text(info['ref'])}", title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for key in ("encoder", "dtype", "shape", "norm", "content_hash", "created", "num_captions"):
        v = info[key]
        if key == "encoder":
            v = f"{v['id']} (D={v['hidden_size']}, {v['family']})"
        t.add_row(key, safe_text(v))
    prov = info["provenance"] or {}
    t.add_row(
        "made by",
        safe_text(str(prov.get("method", "?")) + (f" from {prov['source']}" if "source" in prov else "")),
    )
    for cap in info["captions_sample"]:
        t.add_row("caption", safe_text(cap))
    print_table(out, t)


# --- the commands ----------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    """Add ``list``, ``show``, ``import-pt``, ``export`` and ``verify`` to the ``p2pz`` app.

    Every command module has a ``register(app)`` like this one (called below, then those of
    `COMMAND_MODULES`): its commands are defined inside it with ``@app.command(NAME)`` and take the
    options they share from `cli_options`.
    """

    @app.command("list")
    def list_cmd(
        pattern: Annotated[
            str, typer.Argument(help="Shell-style pattern: 'cat*' or, with '->', directions.")
        ] = "*",
        model: ModelOpt = None,
        encoder: EncoderOpt = None,
        pack: PackOpt = None,
        show_directions: Annotated[
            bool,
            typer.Option("--directions", help="List directions, not concepts (-d is --direction elsewhere)."),
        ] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """List stored concepts (or, with --directions or a pattern containing '->', directions)."""
        import fnmatch

        from p2pz_directions import directions
        from p2pz_directions.core.directions import _norm_pattern, resolve_encoder_id

        check_encoder(encoder)
        store = _store()
        if show_directions or naming.ARROW in pattern:
            names = directions.list(pattern, model=model, encoder=encoder, pack=pack, store=store)
            if as_json:
                return print_json(names)
            if not names:
                err.print(f"no directions match {pattern!r} in {store.root}")
                return
            return _print_directions(store, names, model, encoder, pack)
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
        t = Table(title=f"concepts in {store.root}", title_justify="left")
        for col in ("pack", "concept", "versions", "encoder", "D", "captions", "hash"):
            t.add_column(col)
        for (p, enc, n), es in rows.items():
            last = es[-1]
            t.add_row(
                safe_text(p),
                safe_text(n),
                ",".join(str(x.version) for x in es),
                safe_text(enc),
                str(last.encoder.hidden_size),
                "-" if last.num_captions is None else str(last.num_captions),
                last.content_hash[:12],
            )
        print_table(out, t)
        n_dir = len(directions.list("*", model=model, encoder=encoder, pack=pack, store=store))
        out.print(
            f"{n_dir} directions available: `p2pz list --directions` lists them, `p2pz show a->b` shows one."
        )

    @app.command("show")
    def show_cmd(
        name: Annotated[
            str, typer.Argument(help="A direction ('cat->dog') or a concept ('cat', 'pack:cat@2').")
        ],
        model: ModelOpt = None,
        encoder: EncoderOpt = None,
        pack: PackOpt = None,
        as_json: JsonOpt = False,
        with_diagnostics: Annotated[
            bool,
            typer.Option(
                "--diagnostics",
                "-D",
                help="Also the embedding diagnostics (token positions moved, caption diversity, entangled directions).",
            ),
        ] = False,
    ) -> None:
        """Show a direction or concept: metadata, norms, a few captions, recorded scores."""
        import numpy as np

        from p2pz_directions import directions

        check_encoder(encoder)
        store = _store()
        found = directions.resolve_entries(name, model=model, encoder=encoder, pack=pack, store=store)
        if len(found) == 2:
            (src, s), (tgt, t) = _entry_info(found[0]), _entry_info(found[1])
            delta = t - s
            tok_norm = np.linalg.norm(delta, axis=-1)
            denom = float(np.linalg.norm(s) * np.linalg.norm(t)) or 1.0
            cos = float((s.ravel() * t.ravel()).sum()) / denom
            d_name = _direction_name(src, tgt)
            info = {
                "direction": d_name,
                "encoder": src["encoder"],
                "delta_shape": [1, *delta.shape],
                "delta_norm": round(float(np.linalg.norm(delta)), 4),
                "delta_token_norm": {
                    "min": round(float(tok_norm.min()), 4),
                    "max": round(float(tok_norm.max()), 4),
                    "mean": round(float(tok_norm.mean()), 4),
                },
                "cosine_source_target": round(cos, 6),
                "source": src,
                "target": tgt,
            }
            from p2pz_directions.core import records

            recs = records.for_hashes(src["content_hash"], tgt["content_hash"], store)
            info["evaluations"] = [r.summary() for r in recs]
            diag = None
            if with_diagnostics:  # needs torch (and MiniLM for caption diversity): only when asked
                from p2pz_directions import directions as _directions
                from p2pz_directions.builder import diagnostics

                d = _directions.load(name, model=model, encoder=encoder, pack=pack, store=store)
                diag = diagnostics.diagnose(d, store) if d.is_simple else None
                info["diagnostics"] = diag.to_dict() if diag else None
            if as_json:
                return print_json(info)
            enc = info["encoder"]
            out.print(
                f"[bold]{safe_text(d_name)}[/bold]  encoder {safe_text(enc['id'])} (D={enc['hidden_size']})"
            )
            out.print(
                f"delta {info['delta_shape']}  norm {info['delta_norm']}  per-token norm "
                f"{info['delta_token_norm']['min']}..{info['delta_token_norm']['max']}  "
                f"cos(source, target) {info['cosine_source_target']}"
            )
            for side in ("source", "target"):
                _print_concept(info[side], side)
            if diag:
                diagnostics.render(diag, out)
            elif not as_json:
                out.print("(embedding diagnostics: `p2pz show NAME --diagnostics`)")
            records.render(recs, out)
            return
        info, _ = _entry_info(found[0])
        if as_json:
            return print_json(info)
        _print_concept(info, "concept")

    @app.command("import-pt")
    def import_pt_cmd(
        items: Annotated[
            list[str] | None,
            typer.Argument(help="Folders of .pt files, .pt files, or http(s) URLs.", show_default=False),
        ] = None,
        pack: Annotated[str, pack_option("Pack to import into.")] = "local",
        encoder: EncoderOpt = None,
        model: ModelOpt = None,
        name: Annotated[
            list[str] | None, typer.Option("--name", help="Concept name per file (default: the file's stem).")
        ] = None,
        authors: Annotated[
            bool,
            typer.Option(
                "--authors", help="Import the pix2pix-zero authors' SD 1.4 concepts from their URLs."
            ),
        ] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Import legacy .pt concept embeddings (read with torch.load(weights_only=True) only)."""
        from p2pz_directions.packs.legacy import AUTHORS_SD14_URLS, import_pt

        check_encoder(encoder)
        sources = list(items or [])
        if authors:
            sources += list(AUTHORS_SD14_URLS.values())
            if encoder is None and model is None:
                encoder = "openai/clip-vit-large-patch14"
        if not sources:
            raise P2PZError("nothing to import: give folders, .pt files or URLs, or --authors")
        concepts = import_pt(
            sources, pack=pack, encoder=encoder, model=model, names=name, progress=not as_json
        )
        if as_json:
            return print_json([_concept_info(c) | {"captions_sample": []} for c in concepts])
        for c in concepts:
            out.print(
                f"imported {safe_text(c.ref)}  ({safe_text(c.encoder.id)}, {c.dtype}, hash {c.content_hash[:12]})"
            )

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
        from p2pz_directions.packs.exporting import export

        check_encoder(encoder)
        if fmt not in ("pt", "safetensors"):
            raise P2PZError(f"--format {fmt!r}: use 'pt' or 'safetensors'")
        files = export(name, to, fmt=fmt, model=model, encoder=encoder, pack=pack, store=_store())
        if as_json:
            return print_json([str(f) for f in files])
        for f in files:
            out.print(f"wrote {f}")

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
                err.print(f"[red]damaged[/red] {safe_text(p.path)}: {safe_text(p.message)}")
            out.print(f"checked {n} concept versions in {store.root}: {len(problems)} damaged")
            if problems:
                err.print(
                    "Fix: re-import the concept (`p2pz import-pt`), rebuild it, or re-pull its pack (`p2pz pull`)."
                )
        if problems:
            raise typer.Exit(1)


# --- registration -------------------------------------------------------------------------------
#: the other modules whose ``register(app)`` adds commands, after this module's own; one that is
#: missing (a trimmed install) is skipped, one that fails to import for another reason is an error
COMMAND_MODULES = ("cli.build", "cli.edit", "cli.mask", "cli.hub", "cli.webapp", "cli.eval", "cli.batch")
register(app)
for _mod in COMMAND_MODULES:
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


def _debug_wanted(args: list[str]) -> tuple[bool, list[str]]:
    """``--debug`` anywhere before ``--`` (and P2PZ_DEBUG=1) turns tracebacks on."""
    env = constants.debug()
    cut = args.index("--") if "--" in args else len(args)
    head = [a for a in args[:cut] if a != "--debug"]
    return env or len(head) != cut, head + args[cut:]


def _one_line(e: BaseException) -> str:
    return cli_syntax(" ".join(str(e).split()) or e.__class__.__name__)


def _usage_line(e: Any) -> str:
    msg = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    path = getattr(ctx, "command_path", None) or "p2pz"
    return f"{msg} (see `{path} --help`)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``p2pz`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug, args = _debug_wanted(list(sys.argv[1:] if argv is None else argv))
    try:
        rv = app(args=args, prog_name="p2pz", standalone_mode=False)
    except _EXIT as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except _ABORT:
        err.print("aborted")
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except _USAGE as e:
        if debug:
            raise
        err.print(f"error: {_usage_line(e)}", markup=False, soft_wrap=True)
        return 2
    except (P2PZError, ValueError, LookupError, OSError) as e:
        if debug:
            raise
        err.print(f"error: {_one_line(e)}", markup=False, soft_wrap=True)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug or a library failure: still one line, the rest with --debug
        if debug:
            raise
        err.print(
            f"error: {e.__class__.__name__}: {_one_line(e)} (run `p2pz --debug ...` for the traceback)",
            markup=False,
            soft_wrap=True,
        )
        return 2
    return rv if isinstance(rv, int) else 0


def entry() -> None:
    """The ``p2pz`` console script: `main`, then `end_process`. ``P2PZ_FAST_EXIT`` is read first,
    so a value that cannot be used is one error line before any work, not a traceback after it."""
    try:
        fast = constants.fast_exit()
    except P2PZError as e:
        err.print(f"error: {_one_line(e)}", markup=False, soft_wrap=True)
        sys.exit(2)
    end_process(main(), fast)


def end_process(code: int, fast: bool | None = None) -> None:
    """End the process with ``code`` once a command has returned.

    A process that imported torch, diffusers and transformers spends ~1.5 s in Python's own shutdown
    (module teardown; measured in benchmarks/RESULTS.md) after the PNG is written. So when torch is
    loaded, the streams and log handlers are flushed and the process ends with ``os._exit``: every
    file the command wrote is closed by then (in the kernel's hands), and no atexit handler runs.
    ``P2PZ_FAST_EXIT=0`` keeps the full shutdown (coverage, profilers); ``fast``, when given, is
    that setting as read before the command ran.
    """
    if "torch" in sys.modules and (constants.fast_exit() if fast is None else fast):
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
