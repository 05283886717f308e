"""``p2pz app``: the web app (Gradio) over the registry and the editor plugins.

Needs the optional extra: ``pip install "p2pz-directions[app]"``.

>>> from p2pz_directions.app import create_app
>>> page = create_app("CompVis/stable-diffusion-v1-4")          # doctest: +SKIP
>>> page.launch(server_name="127.0.0.1", server_port=7860)      # doctest: +SKIP

Offline, on the tiny random-weight demo model (its registry lives in the demo folder):

>>> page = create_app(demo=True, demo_dir="p2pz-app-demo")      # doctest: +SKIP

Parts: `backend` (editors, builds, registry; no gradio), `page` (the widgets).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from p2pz_directions.core.errors import P2PZError

__all__ = ["INSTALL_HINT", "DEMO_PACK", "create_app", "launch", "prepare_demo", "require_gradio"]

INSTALL_HINT = 'the web app needs gradio: pip install "p2pz-directions[app]"'
DEMO_PACK = "demo"
GRADIO_MIN = (6, 0)


def require_gradio() -> Any:
    """Import gradio, or raise a `P2PZError` saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise P2PZError(INSTALL_HINT) from None
    major_minor = tuple(int(p) for p in gradio.__version__.split(".")[:2] if p.isdigit())
    if major_minor < GRADIO_MIN:
        raise P2PZError(f"gradio {gradio.__version__} is too old for the app (needs >= 6.0): {INSTALL_HINT}")
    return gradio


def prepare_demo(folder: str | os.PathLike = "p2pz-app-demo", *, n_captions: int = 24) -> Path:
    """Make the tiny demo model and the ``demo:cat->dog`` direction in ``folder``; return the model path.

    Sets ``P2PZ_HOME`` to ``folder/registry`` for this process, so the app's registry is the
    demo's own (your registry is not touched). Reuses what an earlier run made.
    """
    from p2pz_directions.builder.pipeline import build
    from p2pz_directions.core.store import LocalStore
    from p2pz_directions.editing.demo import make_tiny_sd

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "tiny-sd"
    if not (model / "model_index.json").is_file():
        make_tiny_sd(model, "sd1", seed=0)
    os.environ["P2PZ_HOME"] = str((folder / "registry").resolve())
    store = LocalStore(folder / "registry")
    if not [e for e in store.entries(name="dog", skip_damaged=True) if e.pack == DEMO_PACK]:
        build(
            "cat",
            "dog",
            model=str(model),
            captioner="templates",
            n=n_captions,
            min_captions=4,
            pack=DEMO_PACK,
            device="cpu",
            store=store,
        )
    return model


def create_app(
    model: str | os.PathLike | None = None,
    *,
    demo: bool = False,
    demo_dir: str | os.PathLike = "p2pz-app-demo",
    device: str | None = None,
    dtype: str | None = None,
    steps: int | None = None,
    pipe: Any = None,
) -> Any:
    """The app's `gradio.Blocks` (not launched), with its queue set: one job at a time.

    ``demo=True`` uses the tiny random-weight model made by `prepare_demo` (CPU, float32, few steps).
    """
    require_gradio()
    from p2pz_directions.app.backend import Backend
    from p2pz_directions.app.page import build_page

    if demo:
        model = prepare_demo(demo_dir)
        device = device or "cpu"
        dtype = dtype or "float32"
    elif model is None and pipe is None:
        raise P2PZError("give a model (--model CompVis/stable-diffusion-v1-4 or a folder), or use --demo")
    backend = Backend(
        model,
        pipe=pipe,
        device=device,
        dtype=dtype,
        demo=demo,
        default_steps=steps if steps is not None else (4 if demo else 50),
    )
    page = build_page(backend)
    page.p2pz_backend = backend  # type: ignore[attr-defined]
    page.queue(default_concurrency_limit=1)
    return page


def launch(
    page: Any,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    open_browser: bool = False,
    block: bool = True,
    quiet: bool = False,
) -> Any:
    """Serve ``page`` (from `create_app`) on ``host:port``; ``share=True`` makes a public gradio link."""
    import gradio as gr

    return page.launch(
        server_name=host,
        server_port=port,
        share=share,
        inbrowser=open_browser,
        prevent_thread_lock=not block,
        show_error=True,
        quiet=quiet,
        ssr_mode=False,
        css=getattr(page, "p2pz_css", None),
        theme=gr.themes.Default(),
        footer_links=["api"],
    )
