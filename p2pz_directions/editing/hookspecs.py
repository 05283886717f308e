"""The whole plugin contract of p2pz-directions, in one module (as pytest's ``hookspec.py``).

A plugin is any importable module (or object) that implements one or more of the hooks below,
marked with `hookimpl`, and is announced in the entry-point group ``p2pz_directions.editing.editors``::

    # pyproject.toml of your package
    [project.entry-points."p2pz_directions.editors"]
    my-editor = "my_package.my_editor"

    # my_package/my_editor.py
    from p2pz_directions.editing.editors import Editor, EditResult
    from p2pz_directions.editing.hookspecs import hookimpl

    class MyEditor(Editor):
        name = "my-editor"
        description = "what it does, in one line"

        def run(self, image, direction, *, seed=0):
            ...
            return EditResult(image=..., original=image)

    @hookimpl
    def p2pz_register_editors():
        return [MyEditor]

The built-in editors (``pix2pix-zero``, ``diffedit``, ``sdedit``) are registered exactly so,
from the package ``p2pz_plugins``. Every hook is called once per plugin; a plugin whose import
or hook fails is reported by ``p2pz plugins`` and the other plugins keep working.

Hook names carry the project prefix ``p2pz_``; the marker project name is ``p2pz_directions``.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "p2pz_directions"
#: entry-point group that every plugin (built-in or third-party) is announced in
ENTRY_POINT_GROUP = "p2pz_directions.editors"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def p2pz_register_editors() -> list[Any]:
    """Return the editors this plugin provides.

    Each item is either a subclass of `p2pz_directions.editing.editors.Editor` or any callable with a
    ``name`` attribute (a factory) that is called as
    ``factory(model=None, pipe=None, device=None, dtype=None, **kw)`` and returns an `Editor`.
    The ``name`` (e.g. ``"pix2pix-zero"``) is the key users pass to ``editors.get(name)`` and
    ``p2pz edit --editor NAME``; names are lower-case, with ``-`` between words. An optional
    ``description`` attribute (one line) is shown by ``p2pz plugins``.

    >>> @hookimpl
    ... def p2pz_register_editors():
    ...     return [MyEditor]                      # doctest: +SKIP
    """


@hookspec
def p2pz_register_image_captioners() -> list[Any]:
    """Return image captioners (image -> text), e.g. for captioning a real photo before inversion.

    Each item is a class or factory with a ``name`` attribute, called as
    ``factory(device=None, dtype=None, **kw)``; the object it returns has
    ``caption(images: list[PIL.Image.Image]) -> list[str]``.
    The built-in one is ``"blip"`` (``Salesforce/blip-image-captioning-base``).
    """


@hookspec
def p2pz_register_captioners() -> list[Any]:
    """Return caption generators (concept -> many captions) that the concept builder may use.

    Each item is a class or factory with a ``name`` attribute (e.g. ``"flan-t5"``,
    ``"templates"``), called as ``factory(**kw)``; the object it returns has
    ``generate(concept: str, n: int, seed: int = 0) -> list[str]``.
    """


@hookspec
def p2pz_register_encoders() -> list[Any]:
    """Return text encoders (captions -> ``[N, 77, D]`` sequence embeddings) for the builder.

    Each item is a class or factory with a ``name`` attribute, called as
    ``factory(model=None, device=None, dtype=None, **kw)``; the object it returns has
    ``info`` (an `p2pz_directions.core.concept.EncoderInfo`) and
    ``encode(captions: list[str]) -> torch.Tensor``.
    """


@hookspec
def p2pz_register_scorers() -> list[Any]:
    """Return scorers that ``p2pz eval`` (`p2pz_directions.eval`) measures edits with.

    Each item is a class or factory with a ``name`` attribute (e.g. ``"clip"``) and ``metrics``, a
    tuple of `p2pz_directions.eval.scorers.Metric` (name, higher_is_better, description), called
    as ``factory(model=None, device=None, dtype=None)``; ``model`` is a Hub id or a local folder
    that overrides the scorer's default. The object it returns has
    ``score(inputs, edits, *, source_texts, target_texts, masks=None) -> dict[str, list[float | None]]``:
    one value per (input, edit) pair for each of its metrics, None where a metric does not apply
    (no mask, say). It should raise `p2pz_directions.eval.scorers.ScorerModelError` when given a
    model of the wrong kind, before loading weights. The built-ins are ``clip``,
    ``dino-structure`` and ``background-ssim`` (module ``p2pz_directions.eval.builtin``).

    >>> @hookimpl
    ... def p2pz_register_scorers():
    ...     return [MyScorer]                      # doctest: +SKIP
    """
