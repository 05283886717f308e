"""``p2pz app``: serve the web app (needs ``pip install "p2pz-directions[app]"``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from p2pz_directions.cli.options import DEFAULT_MODEL, DeviceOpt, DtypeOpt, model_option, steps_option


def register(app: typer.Typer) -> None:
    """Add ``app`` to the ``p2pz`` command line."""

    @app.command("app")
    def app_cmd(
        model: Annotated[
            str | None, model_option(f"Diffusers model id or folder (default {DEFAULT_MODEL}).")
        ] = None,
        demo: Annotated[
            bool,
            typer.Option("--demo", help="The tiny random-weight demo model, offline (pictures are noise)."),
        ] = False,
        demo_dir: Annotated[
            Path, typer.Option("--demo-dir", help="Folder for the demo's model and registry.")
        ] = Path("p2pz-app-demo"),
        host: Annotated[
            str, typer.Option("--host", help="Address to serve on (0.0.0.0: every interface).")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 7860,
        share: Annotated[bool, typer.Option("--share", help="Also make a public gradio.live link.")] = False,
        open_browser: Annotated[bool, typer.Option("--open", help="Open the page in a browser.")] = False,
        steps: Annotated[int | None, steps_option("Steps the page starts with.")] = None,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
    ) -> None:
        """Serve the web app: edit with any direction and editor, make directions, browse packs."""
        from p2pz_directions.app import create_app, launch, require_gradio

        require_gradio()  # says how to install it before anything is loaded
        if demo and model is not None:
            raise typer.BadParameter("give --model or --demo, not both", param_hint="--demo")
        page = create_app(
            model if model is not None or demo else "CompVis/stable-diffusion-v1-4",
            demo=demo,
            demo_dir=demo_dir,
            device=device,
            dtype=dtype,
            steps=steps,
        )
        typer.echo(f"serving on http://{host}:{port} (Ctrl+C stops)", err=True)
        launch(page, host=host, port=port, share=share, open_browser=open_browser)
