"""``evaluate``: edit a set of images along one or more directions and score every edit.

Steps (what ``p2pz eval`` runs):

1. Check inputs, before any model work: the images load (their sha256 and the image set's hash
   are taken), the directions resolve in the store, the scorers' models are of the right kind.
2. For each editor, direction and seed: edit all images (one batched call when the editor takes
   lists, else one call per image) through the editors' public API, ``ed.edit(image, direction,
   seed=...)``.
3. Score each batch with every scorer: input (as the editor saw it) vs edit, source vs target
   text, the editor's mask where it has one.
4. Aggregate mean ± std over images and seeds per direction × editor, a winner per metric when
   several directions are compared, a grid image (inputs × directions) and, with ``record=True``,
   one evaluation record per direction × editor stored in the direction's pack.

>>> from p2pz_directions.eval import evaluate
>>> res = evaluate(["cat->dog@1", "cat->dog@2"], "cats/", editor="pix2pix-zero",
...                model="CompVis/stable-diffusion-v1-4", seeds=[0, 1])            # doctest: +SKIP
>>> res.summaries["cat->dog@1"]["pix2pix-zero"]["clip_accuracy"]                  # doctest: +SKIP
{'mean': 0.8, 'std': 0.4, 'n': 10, 'higher_is_better': True}
>>> res.winners                                                                     # doctest: +SKIP
{'pix2pix-zero': {'clip_accuracy': ['cat->dog@2'], 'structure_distance': ['cat->dog@1']}}
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pz_directions.core.errors import P2PZError
from p2pz_directions.eval import aggregate
from p2pz_directions.eval.scorers import Scorer

__all__ = ["EvalError", "EvalResult", "evaluate", "load_image_set", "DEFAULT_SCORERS"]

DEFAULT_SCORERS = ("clip", "dino-structure", "background-ssim")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
#: ``progress(phase, done, total)``: phases "load", "edit", "score"
Progress = Callable[[str, int, int], None]


class EvalError(P2PZError, ValueError):
    """An evaluation cannot start: no images, nothing to compare, a bad setting."""


@dataclass
class InputImage:
    name: str
    sha256: str
    image: Any  # PIL RGB


def _file_list(src: str | os.PathLike) -> list[Path]:
    p = Path(src).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise EvalError(
                f"no images in {p} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); give a folder of images or files"
            )
        return files
    if p.is_file():
        return [p]
    raise EvalError(f"{p}: no such image or folder")


def load_image_set(images: Any) -> tuple[list[InputImage], str]:
    """Images from a folder, files, or PIL images; returns them with their sha256 and the set's sha256
    (over the sorted per-image hashes, so order and file names do not change it)."""
    from PIL import Image

    from p2pz_directions.editing.images import load_image, to_rgb

    if images is None:
        raise EvalError("no images to evaluate on: give --images FOLDER (or files)")
    items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
    if not items:
        raise EvalError("no images to evaluate on: the list is empty")
    out: list[InputImage] = []
    for i, it in enumerate(items):
        if isinstance(it, Image.Image):
            buf = io.BytesIO()
            to_rgb(it).save(buf, format="PNG")
            out.append(InputImage(f"image_{i}", hashlib.sha256(buf.getvalue()).hexdigest(), to_rgb(it)))
            continue
        for f in _file_list(it):
            img = load_image(f)  # ImageError names a file that is not an image
            out.append(InputImage(f.name, hashlib.sha256(f.read_bytes()).hexdigest(), img))
    names = [x.name for x in out]
    if len(set(names)) != len(names):
        seen: dict[str, int] = {}
        for x in out:
            k = seen.get(x.name, 0)
            seen[x.name] = k + 1
            if k:
                x.name = f"{x.name}#{k}"
    set_hash = hashlib.sha256("\n".join(sorted(x.sha256 for x in out)).encode()).hexdigest()
    return out, set_hash


@dataclass
class EvalResult:
    """What `evaluate` returns.

    ``samples``: one dict per (direction, editor, image, seed) with every metric; ``summaries``:
    ``{direction: {editor: {metric: {mean, std, n, higher_is_better}}}}``; ``winners``:
    ``{editor: {metric: [direction, ...]}}`` (only when several directions were compared);
    ``grid``: the contact sheet (PIL image); ``records``: the stored records (``record=True``).
    """

    directions: list[str]
    editors: list[str]
    model: str | None
    seeds: list[int]
    images: list[dict[str, str]]
    image_set_sha256: str
    metrics: dict[str, dict[str, Any]]
    samples: list[dict[str, Any]] = field(default_factory=list)
    summaries: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict)
    winners: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    grid: Any = None
    records: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "directions": self.directions,
            "editors": self.editors,
            "model": self.model,
            "seeds": self.seeds,
            "images": self.images,
            "image_set_sha256": self.image_set_sha256,
            "metrics": self.metrics,
            "summaries": self.summaries,
            "winners": self.winners,
            "settings": self.settings,
            "samples": self.samples,
            "records": [r.record_id for r in self.records],
        }

    def rows(self) -> list[dict[str, Any]]:
        """One row per direction × editor: ``{direction, editor, <metric>: "mean ± std", ...}``."""
        out = []
        for d, per_ed in self.summaries.items():
            for e, s in per_ed.items():
                out.append(
                    {"direction": d, "editor": e, **{m: aggregate.fmt(s.get(m)) for m in self.metrics}}
                )
        return out


def _accepts_lists(ed: Any) -> bool:
    """Editors with an options dataclass take lists of images (the batched-editor contract)."""
    return dataclasses.is_dataclass(getattr(type(ed), "options", None))


def _split_result(res: Any, n: int) -> list[tuple[Any, Any, Any]]:
    """``[(edit, original, mask)] * n`` from one EditResult of a batched call."""

    def seq(v: Any) -> list[Any]:
        if isinstance(v, (list, tuple)) and len(v) == n:
            return list(v)
        return [v] * n

    imgs = res.images if n > 1 else [res.images[0]]
    if len(imgs) != n:
        raise EvalError(f"the editor returned {len(imgs)} images for {n} inputs")
    return list(zip(imgs, seq(res.original), seq(res.mask), strict=True))


def _edit_all(
    ed: Any,
    images: list[InputImage],
    direction: Any,
    seed: int,
    options: Mapping[str, Any],
    batch_size: int = 8,
):
    if _accepts_lists(ed) and len(images) > 1:
        out = []
        for i in range(0, len(images), batch_size):
            chunk = [x.image for x in images[i : i + batch_size]]
            if len(chunk) == 1:
                res = ed.edit(chunk[0], direction, seed=seed, **options)
                out.append((res.images[0], res.original, res.mask))
            else:
                out.extend(_split_result(ed.edit(chunk, direction, seed=seed, **options), len(chunk)))
        return out
    out = []
    for x in images:
        res = ed.edit(x.image, direction, seed=seed, **options)
        out.append((res.images[0], res.original, res.mask))
    return out


def _same_size(a: Any, b: Any) -> bool:
    return getattr(a, "size", None) is not None and getattr(a, "size", None) == getattr(b, "size", None)


def _label(name: str, editor: str, several_editors: bool) -> str:
    return f"{name} [{editor}]" if several_editors else name


def evaluate(
    directions: Sequence[Any] | str,
    images: Any,
    *,
    editor: str | Sequence[str] = "pix2pix-zero",
    model: str | os.PathLike | None = None,
    seeds: Sequence[int] = (0,),
    scorers: Sequence[str] | None = None,
    scorer_models: Mapping[str, str | os.PathLike] | None = None,
    editor_options: Mapping[str, Any] | None = None,
    prompt_template: str = "a photo of a {}",
    device: str | None = None,
    dtype: Any = None,
    record: bool = False,
    record_pack: str | None = None,
    store: Any = None,
    pipe: Any = None,
    editors_given: Mapping[str, Any] | None = None,
    edit_batch_size: int = 8,
    progress: Progress | None = None,
) -> EvalResult:
    """Edit ``images`` along each of ``directions`` with each ``editor`` and every seed; score every edit.

    ``scorers`` names the scorer plugins (default: clip, dino-structure, background-ssim);
    ``scorer_models`` overrides their models (``{"clip": "openai/clip-vit-large-patch14"}``).
    ``editors_given`` passes ready editor objects by name (tests, notebooks). Editors that take lists
    get ``edit_batch_size`` images per call (lower it if the GPU runs out of memory). Nothing is recorded
    unless every edit and score succeeded.
    """
    import torch

    from p2pz_directions import directions as dirs
    from p2pz_directions import editors as editors_mod
    from p2pz_directions.core import records
    from p2pz_directions.core.store import default_store
    from p2pz_directions.eval import scorers as scorers_mod
    from p2pz_directions.eval.grid import make_grid

    store = store or default_store()
    tick = progress or (lambda *_: None)
    # 1. check everything before model work
    names = [directions] if isinstance(directions, str) else list(directions)
    if not names:
        raise EvalError("no direction to evaluate: give one or more names like 'cat->dog'")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise EvalError("no seeds: give at least one (--seeds 0)")
    if "{}" not in prompt_template:
        raise EvalError(
            f"--prompt-template {prompt_template!r} must contain '{{}}' where the concept name goes"
        )
    ed_names = [editor] if isinstance(editor, str) else list(editor)
    if not ed_names:
        raise EvalError("no editor given")
    if edit_batch_size < 1:
        raise EvalError(f"edit_batch_size must be at least 1, not {edit_batch_size}")
    if len(set(ed_names)) != len(ed_names):
        raise EvalError(f"editor listed twice: {ed_names}")
    inputs, set_hash = load_image_set(images)
    tick("load", len(inputs), len(inputs))
    resolved = []
    for n in names:
        d = n if not isinstance(n, str) else dirs.load(n, model=model, store=store)
        resolved.append(d)
    labels = [n if isinstance(n, str) else d.name for n, d in zip(names, resolved, strict=True)]
    if len(set(labels)) != len(labels):
        raise EvalError(f"a direction is listed twice: {labels}")
    for lab, d in zip(labels, resolved, strict=True):
        if not d.is_simple:
            raise EvalError(f"{lab!r} is a combination of directions; evaluate one concept pair at a time")
    if record:
        for lab, d in zip(labels, resolved, strict=True):
            if not (d.source.content_hash and d.target.content_hash):
                raise EvalError(f"{lab!r} is not from the store, so it cannot be recorded")
            pack = record_pack or d.source.pack
            if pack is None or not store.pack_dir(pack).is_dir():
                raise EvalError(
                    f"cannot record {lab!r}: no pack {pack!r} in {store.root} (give record_pack=...)"
                )
    sc_names = list(scorers) if scorers is not None else list(DEFAULT_SCORERS)
    if not sc_names:
        raise EvalError("no scorers: give at least one (see `p2pz eval --list-scorers`)")
    unknown_models = set(scorer_models or {}) - set(sc_names)
    if unknown_models:
        raise EvalError(f"a model was given for scorer(s) not in use: {', '.join(sorted(unknown_models))}")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sc_dtype = torch.float16 if (str(dev).startswith("cuda") and dtype is None) else None
    if isinstance(dtype, torch.dtype):
        sc_dtype = dtype
    sc_objs: list[Scorer] = [
        scorers_mod.get(s, (scorer_models or {}).get(s), device=dev, dtype=sc_dtype) for s in sc_names
    ]
    metrics: dict[str, dict[str, Any]] = {}
    for s in sc_objs:
        for m in s.metrics:
            metrics[m.name] = {
                "scorer": s.name,
                "higher_is_better": m.higher_is_better,
                "description": m.description,
            }
    higher = {m: v["higher_is_better"] for m, v in metrics.items()}
    eds = {}
    for e in ed_names:
        if editors_given and e in editors_given:
            eds[e] = editors_given[e]
        else:
            eds[e] = editors_mod.get(e, model=model, pipe=pipe, device=device, dtype=dtype)
        for d in resolved:
            eds[e].resolve_direction(d)  # an encoder mismatch fails here, before any edit
    options = dict(editor_options or {})

    # 2-3. edit and score
    total = len(eds) * len(resolved) * len(seeds) * len(inputs)
    done = 0
    samples: list[dict[str, Any]] = []
    first_edits: dict[str, list[Any]] = {}
    several = len(eds) > 1
    tick("edit", 0, total)
    for e, ed in eds.items():
        for lab, d in zip(labels, resolved, strict=True):
            src_text = prompt_template.format(d.source.name)
            tgt_text = prompt_template.format(d.target.name)
            for seed in seeds:
                triples = _edit_all(ed, inputs, d, seed, options, edit_batch_size)
                done += len(inputs)
                tick("edit", done, total)
                ins = [
                    orig if _same_size(orig, edit) else x.image
                    for x, (edit, orig, _) in zip(inputs, triples, strict=True)
                ]
                edits = [t[0] for t in triples]
                masks = [t[2] for t in triples]
                per: list[dict[str, Any]] = [
                    {"direction": lab, "editor": e, "image": x.name, "seed": seed} for x in inputs
                ]
                for s in sc_objs:
                    vals = s.score(
                        ins,
                        edits,
                        source_texts=[src_text] * len(ins),
                        target_texts=[tgt_text] * len(ins),
                        masks=masks,
                    )
                    for m in s.metrics:
                        col = vals.get(m.name)
                        if col is None or len(col) != len(ins):
                            raise EvalError(f"scorer {s.name!r} returned no {m.name!r} value per image")
                        for row, v in zip(per, col, strict=True):
                            row[m.name] = None if v is None else float(v)
                samples.extend(per)
                tick("score", done, total)
                if seed == seeds[0]:
                    first_edits[_label(lab, e, several)] = edits

    # 4. aggregate, winners, grid, records
    summaries: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for lab in labels:
        for e in eds:
            rows = [x for x in samples if x["direction"] == lab and x["editor"] == e]
            summaries.setdefault(lab, {})[e] = aggregate.summarize(rows, higher)
    win: dict[str, dict[str, list[str]]] = {}
    if len(labels) > 1:
        for e in eds:
            w = aggregate.winners({lab: summaries[lab][e] for lab in labels}, higher)
            if w:
                win[e] = w
    settings = {
        "seeds": seeds,
        "editor_options": {
            k: v for k, v in sorted(options.items()) if isinstance(v, (int, float, str, bool, type(None)))
        },
        "prompt_template": prompt_template,
        "scorers": {s.name: s.settings() for s in sc_objs},
    }
    img_list = [{"name": x.name, "sha256": x.sha256} for x in inputs]
    result = EvalResult(
        directions=labels,
        editors=list(eds),
        model=os.fspath(model) if model is not None else None,
        seeds=seeds,
        images=img_list,
        image_set_sha256=set_hash,
        metrics=metrics,
        samples=samples,
        summaries=summaries,
        winners=win,
        settings=settings,
    )
    result.grid = make_grid([x.image for x in inputs], first_edits, row_labels=[x.name for x in inputs])
    if record:
        for lab, d in zip(labels, resolved, strict=True):
            for e in eds:
                meta = records.build(
                    direction=d,
                    editor=e,
                    model=result.model,
                    settings=settings,
                    images=img_list,
                    image_set_sha256=set_hash,
                    scores=summaries[lab][e],
                    samples=[
                        {k: v for k, v in x.items() if k not in ("direction", "editor")}
                        for x in samples
                        if x["direction"] == lab and x["editor"] == e
                    ],
                )
                result.records.append(records.publish(meta, record_pack or d.source.pack, store))
    return result
