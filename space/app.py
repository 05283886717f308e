"""Hugging Face Space entry point for the p2pz-directions web app (``sdk: gradio``, ``app_file: app.py``).

Settings (Space variables):

- ``P2PZ_MODEL``: the diffusers model (default ``CompVis/stable-diffusion-v1-4``);
- ``P2PZ_DEMO=1``: the tiny random-weight demo model instead (no weights to download, CPU);
- ``P2PZ_AUTHORS=1`` (default): when the registry has no direction for an SD 1.x model, import the
  pix2pix-zero authors' four SD 1.4 concepts (cat, dog, horse, zebra) from their URLs once;
- ``P2PZ_HOME``: where the registry lives (a persistent-storage Space: ``/data/p2pz``).

Run it locally the same way: ``P2PZ_DEMO=1 python space/app.py``.
"""

from __future__ import annotations

import os

from p2pz_directions.app import create_app, launch
from p2pz_directions.core import constants


def _ensure_directions(model: str) -> None:
    """The authors' SD 1.4 concepts, when nothing in the registry fits the model (SD 1.x only)."""
    from p2pz_directions import directions
    from p2pz_directions.editing.models import CLIP_L, encoder_for
    from p2pz_directions.packs.legacy import AUTHORS_SD14_URLS, import_pt

    if not constants.flag("P2PZ_AUTHORS", default=True):
        return
    try:
        enc = encoder_for(model=model)
    except Exception:  # noqa: BLE001 - unknown model: nothing to import for it
        return
    if enc.id == CLIP_L.id and not directions.list("*", encoder=enc.id):
        import_pt(list(AUTHORS_SD14_URLS.values()), pack="pix2pix-zero", encoder=enc.id, progress=False)


def build():
    """The app's page, from the Space variables."""
    if constants.flag("P2PZ_DEMO"):
        return create_app(demo=True, demo_dir=constants.text("P2PZ_DEMO_DIR"))
    model = constants.text("P2PZ_MODEL")
    _ensure_directions(model)
    return create_app(model)


demo = build()

if __name__ == "__main__":
    launch(
        demo,
        host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
