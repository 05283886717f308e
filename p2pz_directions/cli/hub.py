"""``p2pz push / pull / search / packs``: the Hub commands, added to the CLI by `register`.

p2pz push my-pack --repo me/my-directions [--private] [--tag v1.0]
p2pz pull someone/their-pack[@v1.0|@<commit>]
p2pz search "kitten into a puppy" [--hub]
p2pz packs [--known]
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from p2pz_directions.cli.options import JsonOpt, print_table
from p2pz_directions.core.terminal import safe_text

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _store():
    from p2pz_directions.core.store import default_store

    return default_store()


def _warn(lines: list[str]) -> None:
    for line in lines:
        err.print(f"warning: {safe_text(line, markup=False)}", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``push``, ``pull``, ``search`` and ``packs`` to the ``p2pz`` app."""

    @app.command("push")
    def push_cmd(
        pack: Annotated[str, typer.Argument(help="Local pack to publish (see `p2pz packs`).")],
        repo: Annotated[
            str, typer.Option("--repo", "-r", help="Hub dataset repo id 'owner/name' (created if missing).")
        ],
        private: Annotated[
            bool, typer.Option("--private", help="Create the repo private (if it does not exist).")
        ] = False,
        tag: Annotated[
            str | None, typer.Option("--tag", help="Tag the new commit (e.g. v1.0); tags never move.")
        ] = None,
        license: Annotated[  # noqa: A002 - the dataset card's field
            str | None, typer.Option("--license", help="License for the dataset card (e.g. cc-by-4.0).")
        ] = None,
        message: Annotated[
            str | None,
            typer.Option("--message", help="Commit message (no short flag: -m is --model everywhere)."),
        ] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Publish a local pack to a Hub dataset repo in one commit (versions already there never change)."""
        from p2pz_directions import hub

        res = hub.push(pack, repo, private=private, tag=tag, license=license, message=message, store=_store())
        if as_json:
            return _print_json(res.to_dict())
        if res.added:
            out.print(
                f"pushed {len(res.added)} concept version(s) of {pack!r} to {res.url} (commit {res.commit[:10]})"
            )
            for a in res.added:
                out.print(f"  + {safe_text(a, markup=False)}", markup=False)
        else:
            out.print(
                f"{res.repo_id} already has every version of {pack!r} (commit {res.commit[:10]}); nothing to push"
            )
        if res.tag:
            out.print(
                f"tagged {res.commit[:10]} as {res.tag}: pull it with `p2pz pull {res.repo_id}@{res.tag}`"
            )
        out.print(f'use it: directions.load("{res.repo_id}:a->b")', markup=False)

    @app.command("pull")
    def pull_cmd(
        ref: Annotated[str, typer.Argument(help="owner/name, owner/name@tag or owner/name@<commit>.")],
        force: Annotated[
            bool, typer.Option("--force", help="Replace installed versions even if the Hub changed them.")
        ] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Install (or update, or pin) a Hub pack into the local registry, checking every file."""
        from p2pz_directions import hub

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hub.UnknownEncoderWarning)
            res = hub.pull(ref, store=_store(), force=force)
        if as_json:
            return _print_json(res.to_dict())
        _warn(res.warnings)
        where = f"{res.repo_id}@{res.revision} (commit {res.commit[:10]})"
        if res.up_to_date:
            out.print(f"{res.pack} is up to date: {where}, {res.concepts} concept versions")
            return
        out.print(f"installed {where} as pack {res.pack!r}: {res.concepts} concept versions")
        for a in res.added:
            out.print(f"  + {safe_text(a, markup=False)}", markup=False)
        for r in res.removed:
            out.print(f"  - {safe_text(r, markup=False)} (not in this revision)", markup=False)
        out.print(
            f'use it: directions.load("{res.pack}:a->b")  or  p2pz list --pack {res.pack}', markup=False
        )

    @app.command("search")
    def search_cmd(
        query: Annotated[list[str], typer.Argument(help="What you want, in words: 'kitten into a puppy'.")],
        use_hub: Annotated[
            bool, typer.Option("--hub", help="Also list packs on the Hub tagged p2pz-directions.")
        ] = False,
        k: Annotated[int, typer.Option("--top", "-k", help="How many results.", min=1, max=1000)] = 10,
        as_json: JsonOpt = False,
    ) -> None:
        """Rank stored concepts and directions (and Hub packs with --hub) by meaning."""
        from p2pz_directions import search

        hits = search.search(" ".join(query), store=_store(), k=k, hub=use_hub)
        if as_json:
            return _print_json([h.to_dict() for h in hits])
        if not hits:
            err.print(
                "nothing to search: the registry is empty. Import concepts with `p2pz import-pt`, build them with "
                "`p2pz build`, pull a pack with `p2pz pull`, or add --hub"
            )
            return
        t = Table(title=f"search: {' '.join(query)}", title_justify="left")
        for col in ("score", "kind", "name", "use as", "encoders / about"):
            t.add_column(col)
        for h in hits:
            about = ", ".join(h.encoders) if h.kind != "hub" else h.detail
            use = h.ref if h.kind != "hub" else f"p2pz pull {h.ref}"
            t.add_row(f"{h.score:.2f}", h.kind, safe_text(h.name), safe_text(use), safe_text(about))
        print_table(out, t)  # at its full width: names are never cut

    @app.command("packs")
    def packs_cmd(
        known: Annotated[
            bool, typer.Option("--known", help="List the known community packs (registry/).")
        ] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Installed packs with their source repo and revision (or, with --known, community packs)."""
        from p2pz_directions import hub
        from p2pz_directions.packs.pack_schema import load_known_packs

        store = _store()
        if known:
            rows = []
            for kp in load_known_packs():
                src = hub.installed_source(store, kp.repo_id) or {}
                rows.append(
                    {
                        "repo_id": kp.repo_id,
                        "revision": kp.revision,
                        "description": kp.description,
                        "encoders": list(kp.encoders),
                        "license": kp.license,
                        "installed": src.get("revision") if src.get("type") == "hub" else None,
                        "pull": f"p2pz pull {kp.ref}",
                    }
                )
            if as_json:
                return _print_json(rows)
            if not rows:
                err.print("no known packs are listed yet; find packs with `p2pz search --hub '...'`")
                return
            t = Table(
                title="known community packs (`p2pz pull PACK@PINNED` installs one)", title_justify="left"
            )
            t.add_column("pack", no_wrap=True)
            t.add_column("pinned", no_wrap=True)
            t.add_column("installed", no_wrap=True)
            t.add_column("about")
            for r in rows:
                t.add_row(
                    safe_text(r["repo_id"]),
                    safe_text(r["revision"]),
                    safe_text(r["installed"] or "-"),
                    safe_text(r["description"]),
                )
            out.print(t)
            return
        rows = []
        for p in store.packs():
            entries = store.entries(pack=p.name, skip_damaged=True)
            src = p.source or {}
            rows.append(
                {
                    "pack": p.name,
                    "source": src.get("type", "local"),
                    "repo_id": src.get("repo_id"),
                    "revision": src.get("revision"),
                    "commit": src.get("commit"),
                    "pulled": src.get("pulled"),
                    "concepts": len({(e.encoder.id, e.name) for e in entries}),
                    "versions": len(entries),
                    "encoders": sorted({e.encoder.id for e in entries}),
                }
            )
        if as_json:
            return _print_json(rows)
        if not rows:
            err.print(f"no packs in {store.root}: `p2pz pull owner/name` installs one from the Hub")
            return
        t = Table(title=f"packs in {store.root}", title_justify="left")
        t.add_column("pack", no_wrap=True)
        t.add_column("from", no_wrap=True)
        t.add_column("commit", no_wrap=True)
        t.add_column("concepts")
        t.add_column("versions")
        t.add_column("encoders", overflow="fold")
        for r in rows:
            origin = f"hub @{r['revision']}" if r["source"] == "hub" else r["source"]
            t.add_row(
                safe_text(r["pack"]),
                safe_text(origin),
                safe_text((r["commit"] or "-")[:10]),
                str(r["concepts"]),
                str(r["versions"]),
                safe_text(", ".join(r["encoders"])),
            )
        out.print(t)
