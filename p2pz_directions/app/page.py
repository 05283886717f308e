"""The Gradio page over `p2pz_directions.app.backend.Backend`: Edit, Make your own direction, Browse.

Every handler catches errors and shows them as one readable line in a status box (the page) or
raises ``gr.Error`` with it (the API), never a traceback. The GPU work (edits, builds, pulls)
shares one queue slot (``concurrency_id="gpu"``, ``concurrency_limit=1``): one job at a time.

The edit is also an API endpoint, ``api_name="edit"``: ``image``, ``direction`` and ``editor``
are required, the rest have defaults; it returns the edited image.

>>> from gradio_client import Client, handle_file                               # doctest: +SKIP
>>> c = Client("http://127.0.0.1:7860/")                                         # doctest: +SKIP
>>> c.predict(handle_file("cat.png"), "cat->dog", "pix2pix-zero", api_name="/edit")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from p2pz_directions.app.backend import AppInputError, Backend, OptionSpec, known_options, readable_error

__all__ = ["build_page"]

GPU = "gpu"  # the concurrency id every job that uses the model shares
CAPTIONERS = ("templates", "file", "flan-t5")
BROWSE_HEADERS = ["pack", "concept", "versions", "encoder", "D", "captions", "hash"]

_CSS = """
#edit-status, #build-status, #browse-status {min-height: 2.5em}
.p2pz-error {color: #b00020; font-weight: 600}
.p2pz-panel img {width: 100%; height: 100%; object-fit: contain}
"""

_INTRO = """# p2pz-directions
Edit an image along a *direction* between two concepts (pix2pix-zero, DiffEdit, SDEdit), make your own
directions, and browse the installed packs. Model: `{model}` · text encoder `{encoder}` · device `{device}`.
"""

_DEMO_NOTE = (
    "\n**Demo mode**: a tiny model with random weights. Its pictures are noise by design: the demo shows that "
    "every piece works together. Start the app with `--model CompVis/stable-diffusion-v1-4` for real edits."
)


def _error_md(exc: BaseException, editor: Any = None) -> str:
    return f"<span class='p2pz-error'>Error: {_html(readable_error(exc, editor=editor))}</span>"


def _html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _widget(spec: OptionSpec) -> Any:
    info = spec.help[:300] or None
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(spec.default), label=spec.label, info=info)
    if spec.kind == "int":
        return gr.Number(value=spec.default, precision=0, label=spec.label, info=info)
    if spec.kind == "float":
        return gr.Number(value=spec.default, label=spec.label, info=info)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), value=spec.default, label=spec.label, info=info)
    return gr.Textbox(value=spec.default or "", label=spec.label, info=info)


def _panel(label: str, elem_id: str, **kw: Any) -> gr.Image:
    """One of the Edit tab's result pictures (input, reconstruction, edit, mask): read-only, 256 px."""
    return gr.Image(
        label=label, elem_id=elem_id, elem_classes=["p2pz-panel"], interactive=False, height=256, **kw
    )


def _pair(src: str | None, tgt: str | None) -> str | None:
    """``pack:cat`` + ``pack:dog`` -> ``pack:cat->dog`` (bare names when the packs differ)."""
    if not src or not tgt:
        return None
    sp, _, sn = src.rpartition(":")
    tp, _, tn = tgt.rpartition(":")
    if sn == tn:
        return None
    return f"{sp}:{sn}->{tn}" if sp and sp == tp else f"{sn}->{tn}"


def build_page(backend: Backend, *, title: str = "p2pz-directions") -> gr.Blocks:
    """The app's `gr.Blocks` for ``backend`` (not launched). See `p2pz_directions.app.create_app`."""
    editor_names = backend.pool.names()
    default_editor = "pix2pix-zero" if "pix2pix-zero" in editor_names else (editor_names or [None])[0]
    specs = {name: backend.pool.specs(name) for name in editor_names}
    try:
        dirs = backend.directions()
        concepts = backend.concepts()
        encoder = backend.encoder_info.id
    except Exception as e:  # noqa: BLE001 - the page still opens and says what is wrong
        dirs, concepts, encoder = [], [], f"unknown ({readable_error(e)})"

    def takes_xa(name: str | None) -> bool:
        if not name:
            return False
        known = known_options(backend.pool.get(name))
        return known is None or "cross_attention_guidance_amount" in known

    with gr.Blocks(title=title) as page:
        intro = _INTRO.format(model=backend.model, encoder=encoder, device=backend.device or "auto")
        gr.Markdown(intro + (_DEMO_NOTE if backend.demo else ""), elem_id="intro")

        # ------------------------------------------------------------------------------ Edit
        with gr.Tab("Edit", id="edit"):
            with gr.Row():
                with gr.Column(scale=1, min_width=320):
                    image = gr.Image(
                        type="pil",
                        label="Image to edit",
                        elem_id="input-image",
                        sources=["upload", "clipboard"],
                        height=256,
                    )
                    prompt = gr.Textbox(
                        label="Caption / prompt",
                        placeholder="what the image shows (empty: captioned for you); without an image: a prompt "
                        "to generate one",
                        elem_id="prompt",
                    )
                    direction = gr.Dropdown(
                        choices=dirs,
                        value=dirs[0] if dirs else None,
                        allow_custom_value=True,
                        label="Direction",
                        info="source->target; any installed or pulled pack (pack:cat->dog, cat@1->dog)",
                        elem_id="direction",
                    )
                    with gr.Row():
                        src = gr.Dropdown(
                            choices=concepts, value=None, label="Source concept", elem_id="source"
                        )
                        tgt = gr.Dropdown(
                            choices=concepts, value=None, label="Target concept", elem_id="target"
                        )
                    with gr.Row():
                        query = gr.Textbox(
                            label="Search by meaning",
                            placeholder="kitten into a puppy",
                            elem_id="search-query",
                            scale=3,
                        )
                        search_btn = gr.Button("Search", elem_id="search-button", scale=1)
                    hits = gr.Radio(
                        choices=[], label="Matches (pick one)", elem_id="search-hits", visible=False
                    )
                    editor = gr.Dropdown(
                        choices=editor_names, value=default_editor, label="Editor", elem_id="editor"
                    )
                    steps = gr.Slider(
                        1, 100, value=backend.default_steps, step=1, label="Steps", elem_id="steps"
                    )
                    xa = gr.Slider(
                        0.0,
                        0.5,
                        value=0.1,
                        step=0.01,
                        label="Cross-attention guidance",
                        info="pix2pix-zero: how strongly the layout is kept (SD 2.x: 0.01 or less)",
                        visible=takes_xa(default_editor),
                        elem_id="xa-guidance",
                    )
                    strength = gr.Slider(
                        -2.0,
                        2.0,
                        value=1.0,
                        step=0.05,
                        label="Edit strength",
                        info="multiplies the direction: 1 as built, 0.5 half way, -1 the reverse",
                        elem_id="strength",
                    )
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                    groups = []
                    option_widgets: list[tuple[str, OptionSpec, Any]] = []
                    with gr.Accordion("Editor options", open=False):
                        for name in editor_names:
                            with gr.Group(visible=name == default_editor) as grp:
                                gr.Markdown(f"**{name}**")
                                for spec in specs[name]:
                                    option_widgets.append((name, spec, _widget(spec)))
                            groups.append(grp)
                    edit_btn = gr.Button("Edit", variant="primary", elem_id="edit-button")
                with gr.Column(scale=2, min_width=480):
                    with gr.Row():
                        out_input = _panel("Input", "out-input")
                        out_recon = _panel("Reconstruction", "out-recon")
                        out_edit = _panel("Edit", "out-edit", format="png")
                    out_mask = _panel("Mask (DiffEdit, red = edited)", "out-mask", visible=False)
                    edit_status = gr.Markdown("", elem_id="edit-status")
                    download = gr.File(
                        label="Download the edit (PNG)", elem_id="download", interactive=False, height=90
                    )

        # ------------------------------------------------------------------------------ Build
        with gr.Tab("Make your own direction", id="build"):
            gr.Markdown(
                "Captions about each concept are embedded with this model's text encoder; the mean difference "
                "is the direction. It is published into the local registry and can be picked at once."
            )
            with gr.Row():
                b_src = gr.Textbox(label="Source concept", placeholder="cat", elem_id="build-source")
                b_tgt = gr.Textbox(label="Target concept", placeholder="dog", elem_id="build-target")
            b_cap = gr.Radio(
                list(CAPTIONERS),
                value="templates",
                label="Captioner",
                info="templates: offline, no model; file: your captions; flan-t5: a caption model (downloads)",
                elem_id="build-captioner",
            )
            with gr.Row(visible=False) as files_row:
                b_src_file = gr.File(label="Source captions (.txt, one per line)", file_types=[".txt"])
                b_tgt_file = gr.File(label="Target captions (.txt, one per line)", file_types=[".txt"])
            b_t5 = gr.Textbox(label="Flan-T5 model", value="google/flan-t5-xl", visible=False)
            with gr.Row():
                b_n = gr.Slider(
                    4, 2000, value=32 if backend.demo else 1000, step=1, label="Captions per concept"
                )
                b_seed = gr.Number(value=0, precision=0, label="Seed")
                b_pack = gr.Textbox(value="local", label="Pack")
            build_btn = gr.Button("Build and publish", variant="primary", elem_id="build-button")
            build_status = gr.Markdown("", elem_id="build-status")

        # ------------------------------------------------------------------------------ Browse
        with gr.Tab("Browse", id="browse"):
            table = gr.Dataframe(
                headers=BROWSE_HEADERS,
                value=backend.concept_rows(),
                interactive=False,
                label="Installed concepts (every pack and encoder)",
                elem_id="browse-table",
            )
            refresh_btn = gr.Button("Refresh")
            with gr.Row():
                c_ref = gr.Textbox(label="Concept", placeholder="pack:name", elem_id="browse-concept")
                show_btn = gr.Button("Show")
            detail = gr.Markdown("", elem_id="browse-detail")
            with gr.Row():
                repo = gr.Textbox(
                    label="Pull a pack from the Hub", placeholder="someone/their-pack", elem_id="pull-repo"
                )
                pull_btn = gr.Button("Pull", elem_id="pull-button")
            browse_status = gr.Markdown("", elem_id="browse-status")

        # ------------------------------------------------------------------------------ API
        with gr.Row(visible=False):
            a_image = gr.Image(type="pil", label="image")
            a_direction = gr.Textbox(value=None, label="direction")
            a_editor = gr.Textbox(value=None, label="editor")
            a_steps = gr.Number(value=backend.default_steps, precision=0, label="steps")
            a_xa = gr.Number(value=0.1, label="xa_guidance")
            a_strength = gr.Number(value=1.0, label="strength")
            a_seed = gr.Number(value=0, precision=0, label="seed")
            a_prompt = gr.Textbox(value="", label="prompt")
            a_options = gr.JSON(value={}, label="options")
            a_out = gr.Image(type="pil", label="edited image", format="png")
            a_btn = gr.Button("api edit")

        # ------------------------------------------------------------------------------ handlers
        def on_editor(name: str):
            return [gr.update(visible=takes_xa(name))] + [gr.update(visible=n == name) for n in editor_names]

        editor.change(on_editor, editor, [xa, *groups], api_visibility="private")

        def on_pair(s: str | None, t: str | None):
            pair = _pair(s, t)
            return gr.update(value=pair) if pair else gr.update()

        src.change(on_pair, [src, tgt], direction, api_visibility="private")
        tgt.change(on_pair, [src, tgt], direction, api_visibility="private")

        def on_search(q: str):
            try:
                found = backend.search(q)
            except Exception as e:  # noqa: BLE001
                return gr.update(choices=[], visible=False), _error_md(e)
            if not found:
                return gr.update(choices=[], visible=False), f"nothing matches {_html(q)!r} for this model"
            return gr.update(choices=found, value=None, visible=True), ""

        search_btn.click(on_search, query, [hits, edit_status], api_visibility="private")
        query.submit(on_search, query, [hits, edit_status], api_visibility="private")

        def on_hit(value: str | None):
            if value and "->" in value:
                return gr.update(value=value), ""
            if value:
                return gr.update(), f"{_html(value)} is a concept: pick it as source or target above"
            return gr.update(), ""

        hits.change(on_hit, hits, [direction, edit_status], api_visibility="private")

        def ui_edit(img, prm, dname, ename, n_steps, xa_amount, mult, sd, *values, progress=gr.Progress()):
            opts = {
                spec.name: v for (n, spec, _), v in zip(option_widgets, values, strict=True) if n == ename
            }
            try:
                out = backend.edit(
                    img,
                    dname,
                    ename,
                    steps=n_steps,
                    xa_guidance=xa_amount,
                    strength=mult,
                    seed=sd,
                    prompt=prm,
                    options=opts,
                    progress=lambda f, d: progress(f, desc=d),
                )
            except Exception as e:  # noqa: BLE001 - shown in the page, never a traceback
                ed = _safe_editor(backend, ename)
                return None, None, None, gr.update(value=None, visible=False), None, _error_md(e, ed)
            mask = gr.update(value=out.overlay, visible=out.overlay is not None)
            return out.original, out.reconstruction, out.image, mask, str(out.path), _html(out.summary())

        edit_btn.click(
            ui_edit,
            [image, prompt, direction, editor, steps, xa, strength, seed, *(w for _, _, w in option_widgets)],
            [out_input, out_recon, out_edit, out_mask, download, edit_status],
            api_visibility="private",
            concurrency_id=GPU,
            concurrency_limit=1,
        )

        def edit(
            image,
            direction,
            editor,
            steps=backend.default_steps,
            xa_guidance=0.1,
            strength=1.0,
            seed=0,
            prompt="",
            options=None,
            progress=gr.Progress(),
        ):
            """Edit `image` along `direction` (e.g. 'cat->dog') with `editor`; returns the edited image.

            `options` is a JSON object of the editor's own options (see the page's 'Editor options').
            """
            try:
                out = backend.edit(
                    image,
                    direction,
                    editor,
                    steps=steps,
                    xa_guidance=xa_guidance,
                    strength=strength,
                    seed=seed,
                    prompt=prompt,
                    options=dict(options or {}),
                    progress=lambda f, d: progress(f, desc=d),
                )
            except Exception as e:  # noqa: BLE001
                raise gr.Error(
                    readable_error(e, editor=_safe_editor(backend, editor)), print_exception=False
                ) from None
            return out.image

        a_btn.click(
            edit,
            [a_image, a_direction, a_editor, a_steps, a_xa, a_strength, a_seed, a_prompt, a_options],
            a_out,
            api_name="edit",
            concurrency_id=GPU,
            concurrency_limit=1,
        )

        def on_captioner(c: str):
            return gr.update(visible=c == "file"), gr.update(visible=c == "flan-t5")

        b_cap.change(on_captioner, b_cap, [files_row, b_t5], api_visibility="private")

        def build(source, target, captioner="templates", n=32, seed=0, pack="local", source_captions=None,
                  target_captions=None, captioner_model="", progress=gr.Progress()):  # fmt: skip
            """Build the concepts `source` and `target` for this model, publish them; returns (direction, summary)."""
            try:
                ref, summary = backend.build(
                    source,
                    target,
                    captioner=captioner,
                    n=n,
                    seed=int(seed or 0),
                    pack=pack,
                    source_captions=_path(source_captions),
                    target_captions=_path(target_captions),
                    captioner_model=captioner_model,
                    progress=lambda f, d: progress(f, desc=d),
                )
            except Exception as e:  # noqa: BLE001
                raise gr.Error(readable_error(e), print_exception=False) from None
            return ref, summary

        def ui_build(*args, progress=gr.Progress()):
            try:
                ref, summary = build(*args, progress=progress)
            except gr.Error as e:
                return (
                    gr.update(),
                    gr.update(),
                    gr.update(),
                    gr.update(),
                    f"<span class='p2pz-error'>Error: {_html(e.message)}</span>",
                )
            choices = backend.directions()
            names = backend.concepts()
            return (
                gr.update(choices=choices, value=ref),
                gr.update(choices=names),
                gr.update(choices=names),
                backend.concept_rows(),
                _html(summary).replace("\n", "\n\n"),
            )

        build_inputs = [b_src, b_tgt, b_cap, b_n, b_seed, b_pack, b_src_file, b_tgt_file, b_t5]
        build_btn.click(
            ui_build,
            build_inputs,
            [direction, src, tgt, table, build_status],
            api_visibility="private",
            concurrency_id=GPU,
            concurrency_limit=1,
        )
        # the same build for scripts: api_name="build" returns (direction, summary)
        b_api_btn = gr.Button("api build", visible=False)
        b_api_out = [gr.Textbox(visible=False), gr.Textbox(visible=False)]
        b_api_btn.click(
            build, build_inputs, b_api_out, api_name="build", concurrency_id=GPU, concurrency_limit=1
        )

        def on_refresh():
            names = backend.concepts()
            return (
                backend.concept_rows(),
                gr.update(choices=backend.directions()),
                gr.update(choices=names),
                gr.update(choices=names),
            )

        refresh_btn.click(on_refresh, None, [table, direction, src, tgt], api_visibility="private")

        def on_select(evt: gr.SelectData, rows):
            try:
                row = rows.iloc[evt.index[0]] if hasattr(rows, "iloc") else rows[evt.index[0]]
                return f"{row[0]}:{row[1]}"
            except Exception:  # noqa: BLE001
                return gr.update()

        table.select(on_select, table, c_ref, api_visibility="private")

        def on_show(ref: str):
            try:
                return backend.concept_detail(ref)
            except Exception as e:  # noqa: BLE001
                return _error_md(e)

        show_btn.click(on_show, c_ref, detail, api_visibility="private")
        c_ref.submit(on_show, c_ref, detail, api_visibility="private")

        def on_pull(repo_id: str):
            try:
                msg = backend.pull(repo_id)
            except Exception as e:  # noqa: BLE001
                return gr.update(), gr.update(), _error_md(e)
            return backend.concept_rows(), gr.update(choices=backend.directions()), _html(msg)

        pull_btn.click(
            on_pull, repo, [table, direction, browse_status], api_visibility="private", concurrency_id=GPU,
            concurrency_limit=1,
        )  # fmt: skip
    page.p2pz_css = _CSS  # type: ignore[attr-defined]  # given to launch() (gradio 6 takes css there)
    return page


def _safe_editor(backend: Backend, name: Any) -> Any:
    try:
        return backend.pool.get(str(name)) if name else None
    except Exception:  # noqa: BLE001
        return None


def _path(f: Any) -> str | None:
    if f is None:
        return None
    if isinstance(f, str):
        return f or None
    return getattr(f, "name", None) or getattr(f, "path", None)


# the input error type, for callers that check it
__all__ += ["AppInputError"]
