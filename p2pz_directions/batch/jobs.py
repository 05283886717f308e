"""Jobs: what to edit. Inputs (folders, globs, job files, datasets) x directions x seeds x option sweeps.

A `Job` is one edit: one input image, one direction, one editor and model, its options and a seed.
Its ``id`` is a hash of exactly that content (the input's name *and* the sha256 of its bytes), so the
same job always has the same id: re-running a command finds what is already done, and a changed
image is a new job.

>>> from p2pz_directions.batch import jobs
>>> inputs = jobs.collect_inputs(["photos/"])                                   # doctest: +SKIP
>>> plan = jobs.make_jobs(inputs, directions=["cat->dog"], seeds=[0, 1],
...                       editor="sdedit", model="CompVis/stable-diffusion-v1-4")  # doctest: +SKIP
>>> plan[0].id, plan[0].file_name                                               # doctest: +SKIP
('5d0c...', 'images/cat-5d0c....png')

Job files
---------
JSONL (one JSON object a line) or CSV (a header row). Keys / columns:

- ``image`` (required): a path, relative to the job file's folder unless absolute;
- ``direction``: a name, or (JSONL) a list of names; without it the command's ``--direction``\\ s;
- ``seed`` (or ``seeds``, a list): without it the command's ``--seeds``;
- ``editor``, ``model``: without them the command's;
- ``prompt`` and any other key: an editor option (CSV values are read as JSON when they parse:
  ``0.5`` is a number, ``true`` a bool, anything else a string); ``options`` (JSONL: an object,
  CSV: a JSON object) adds several at once.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pz_directions.core.errors import P2PZError

__all__ = [
    "IMAGE_SUFFIXES",
    "InputImage",
    "Job",
    "JobFileError",
    "collect_inputs",
    "dataset_inputs",
    "make_jobs",
    "parse_seeds",
    "parse_sweep",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
JOB_FILE_SUFFIXES = (".jsonl", ".csv")
#: options that the batch sets itself, per job; a job file or --opt may not set them
RESERVED_OPTIONS = ("seed", "generator", "output_type", "progress")


class JobFileError(P2PZError, ValueError):
    """A job file, input or sweep cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class InputImage:
    """One input image: ``name`` as shown in the results, ``key`` its stable identity, the sha256 of
    its bytes, and ``source`` (a path, PNG/JPEG bytes or an in-memory image) to load it from."""

    name: str
    key: str
    sha256: str
    source: Any = field(compare=False, repr=False)
    #: what a job file's line or a dataset's prompt column set for this image
    overrides: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Job:
    """One edit. ``options`` is canonical JSON (sorted keys), so jobs hash and compare by value."""

    id: str
    input: InputImage
    direction: str
    editor: str
    model: str
    options_json: str
    seed: int

    @property
    def options(self) -> dict[str, Any]:
        return json.loads(self.options_json)

    @property
    def group(self) -> tuple[str, str, str, str]:
        """Jobs with the same group may be edited together in one batched call."""
        return (self.editor, self.model, self.direction, self.options_json)

    @property
    def file_name(self) -> str:
        """Where the edit goes, relative to the output folder."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.input.name).stem)
        stem = stem.strip("._")[:40] or "image"
        return f"images/{stem}-{self.id}.png"


def canonical_json(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    except TypeError as e:
        raise JobFileError(f"batch options must be JSON values (numbers, strings, lists, ...): {e}") from None


def job_id(inp: InputImage, direction: str, editor: str, model: str, options_json: str, seed: int) -> str:
    """16 hex digits of the sha256 over the job's content."""
    content = canonical_json(
        {
            "input": inp.key,
            "input_sha256": inp.sha256,
            "direction": direction,
            "editor": editor,
            "model": model,
            "options": json.loads(options_json),
            "seed": seed,
        }
    )
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# parsing small things
# ---------------------------------------------------------------------------------------------------
def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """``"0,1,5-7"`` -> ``[0, 1, 5, 6, 7]`` (also an int or a list of ints).

    >>> parse_seeds("0,1,5-7")
    [0, 1, 5, 6, 7]
    """
    if isinstance(text, int):
        return [text]
    if not isinstance(text, str):
        return [int(s) for s in text]
    seeds: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not m:
            raise JobFileError(f"cannot read seeds {text!r}: write numbers and ranges like 0,1,5-7")
        a, b = int(m.group(1)), int(m.group(2)) if m.group(2) is not None else None
        if b is not None and b < a:
            raise JobFileError(f"seed range {part!r} goes down; write it as {b}-{a}")
        seeds.extend(range(a, (b if b is not None else a) + 1))
    if not seeds:
        raise JobFileError(f"no seeds in {text!r}; write e.g. --seeds 0,1")
    return list(dict.fromkeys(seeds))


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def parse_sweep(items: Iterable[str] | dict[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
    """``["strength=0.5,0.75", "guidance_scale=5,7.5"]`` -> the cross product as option dicts.

    >>> parse_sweep(["strength=0.5,0.75"])
    [{'strength': 0.5}, {'strength': 0.75}]
    """
    if not items:
        return [{}]
    if isinstance(items, dict):
        pairs = [(k, list(v)) for k, v in items.items()]
    else:
        pairs = []
        for item in items:
            if "=" not in item:
                raise JobFileError(f"--sweep takes KEY=V1,V2,..., got {item!r}")
            key, values = item.split("=", 1)
            vals = [_json_or_text(v.strip()) for v in values.split(",") if v.strip()]
            if not vals:
                raise JobFileError(f"--sweep {key} has no values; write e.g. --sweep {key}=0.5,0.75")
            pairs.append((key.strip().replace("-", "_"), vals))
    keys = [k for k, _ in pairs]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in pairs))]


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return ""  # unreadable: the job fails when it is loaded, and says why


def _file_input(path: Path, name: str, overrides: tuple = ()) -> InputImage:
    return InputImage(name=name, key=name, sha256=_file_sha256(path), source=path, overrides=overrides)


def _memory_input(obj: Any, i: int) -> InputImage:
    from p2pz_directions.editing.images import load_image

    img = load_image(obj)
    h = hashlib.sha256(f"{img.mode}:{img.size}:".encode() + img.tobytes()).hexdigest()
    return InputImage(name=f"image[{i}]", key=f"image[{i}]", sha256=h, source=img)


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def collect_inputs(sources: Iterable[Any]) -> list[InputImage]:
    """Every input image named by ``sources``: folders (all images inside, recursively, sorted),
    globs, image files, job files (``.jsonl`` / ``.csv``), or in-memory images (PIL, arrays).

    Raises `JobFileError` for a path that does not exist or a malformed job file, before any model work.
    """
    out: list[InputImage] = []
    mem = 0
    for src in sources:
        if not isinstance(src, (str, os.PathLike)):
            out.append(_memory_input(src, mem))
            mem += 1
            continue
        s = os.fspath(src)
        p = Path(s)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise JobFileError(
                    f"folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)}); give another folder"
                )
            out.extend(_file_input(f, f.relative_to(p).as_posix()) for f in files)
        elif p.is_file() and p.suffix.lower() in JOB_FILE_SUFFIXES:
            out.extend(read_job_file(p))
        elif p.is_file():
            out.append(_file_input(p, p.as_posix()))
        elif _is_glob(s):
            files = sorted(Path(f) for f in glob.glob(s, recursive=True))
            files = [f for f in files if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                raise JobFileError(f"no image matches {s!r}")
            out.extend(_file_input(f, f.as_posix()) for f in files)
        else:
            raise JobFileError(f"no such file or folder: {s} (give image files, folders, globs or job files)")
    return out


_KNOWN_KEYS = ("image", "direction", "directions", "seed", "seeds", "editor", "model", "options")


def _line_overrides(row: dict[str, Any], where: str, from_csv: bool) -> tuple[tuple[str, Any], ...]:
    over: dict[str, Any] = {}
    opts: dict[str, Any] = {}
    for key, value in row.items():
        if key is None:
            raise JobFileError(f"{where}: more cells than header columns")
        key = key.strip()
        if from_csv:
            if value is None or value == "":
                continue
            if key not in ("image", "direction", "editor", "model", "prompt"):
                value = _json_or_text(value)
        if key == "image":
            continue
        if key in ("direction", "directions"):
            vals = value if isinstance(value, list) else [value]
            if not vals or not all(isinstance(v, str) and v for v in vals):
                raise JobFileError(f"{where}: direction must be a name or a list of names, not {value!r}")
            over["directions"] = vals
        elif key in ("seed", "seeds"):
            vals = value if isinstance(value, list) else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
                raise JobFileError(f"{where}: seed must be an integer (or a list of them), not {value!r}")
            over["seeds"] = vals
        elif key in ("editor", "model"):
            if not isinstance(value, str) or not value:
                raise JobFileError(f"{where}: {key} must be a non-empty string")
            over[key] = value
        elif key == "options":
            if not isinstance(value, dict):
                raise JobFileError(f"{where}: options must be an object of editor options, not {value!r}")
            opts.update(value)
        else:
            opts[key] = value
    if opts:
        over["options"] = opts
    return tuple(sorted(over.items()))


def read_job_file(path: str | os.PathLike) -> list[InputImage]:
    """The inputs of a JSONL or CSV job file, each with what its line sets (see the module doc)."""
    path = Path(path)
    base = path.parent
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JobFileError(f"cannot read job file {path}: {e}") from None
    rows: list[tuple[str, dict[str, Any], bool]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "image" not in [f.strip() for f in reader.fieldnames]:
            raise JobFileError(f"{path}: a CSV job file needs a header row with an 'image' column")
        for i, row in enumerate(reader, start=2):
            rows.append((f"{path}:{i}", row, True))
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise JobFileError(f"{path}:{i} is not JSON ({e}); write one JSON object a line") from None
            if not isinstance(row, dict):
                raise JobFileError(f"{path}:{i}: each line must be a JSON object with an 'image' key")
            rows.append((f"{path}:{i}", row, False))
    out = []
    for where, row, from_csv in rows:
        img = (row.get("image") or "").strip() if isinstance(row.get("image"), str) else row.get("image")
        if not isinstance(img, str) or not img:
            raise JobFileError(f"{where}: 'image' (a path to the image) is missing")
        p = Path(img) if Path(img).is_absolute() else base / img
        out.append(_file_input(p, img, _line_overrides(row, where, from_csv)))
    if not out:
        raise JobFileError(f"job file {path} holds no jobs")
    return out


def dataset_inputs(
    dataset: Any,
    *,
    split: str | None = "train",
    image_column: str = "image",
    prompt_column: str | None = None,
    config: str | None = None,
    limit: int | None = None,
) -> list[InputImage]:
    """The images of a Hugging Face ``datasets`` dataset: a Hub id, a local folder (``save_to_disk``
    or any folder ``load_dataset`` reads), or a ``datasets.Dataset``. ``prompt_column`` gives each
    image its ``prompt`` option. Needs the ``datasets`` package (``pip install 'p2pz-directions[batch]'``).
    """
    try:
        import datasets
    except ImportError:
        raise JobFileError(
            "dataset inputs need the `datasets` package: pip install 'p2pz-directions[batch]'"
        ) from None
    if isinstance(dataset, (str, os.PathLike)):
        label = os.fspath(dataset)
        p = Path(label)
        try:
            if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
                ds = datasets.load_from_disk(label)
            else:
                ds = datasets.load_dataset(label, config, split=split)
        except (FileNotFoundError, ValueError) as e:
            raise JobFileError(f"cannot load dataset {label!r}: {' '.join(str(e).split())}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise JobFileError(f"dataset {label!r} has no split {split!r}; it has {', '.join(ds)}")
            ds = ds[split]
    else:
        ds = dataset
        label = getattr(getattr(ds, "info", None), "dataset_name", None) or "dataset"
    if image_column not in ds.column_names:
        raise JobFileError(
            f"dataset {label!r} has no column {image_column!r}; its columns: {', '.join(ds.column_names)}. "
            f"Pick one with --image-column"
        )
    if prompt_column is not None and prompt_column not in ds.column_names:
        raise JobFileError(
            f"dataset {label!r} has no column {prompt_column!r}; its columns: {', '.join(ds.column_names)}"
        )
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    feature = ds.features.get(image_column)
    if isinstance(feature, datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    out = []
    where = f"{label}:{split}" if split else label
    for i, row in enumerate(ds):
        cell = row[image_column]
        if isinstance(cell, dict):
            data = cell.get("bytes")
            if data is None and cell.get("path"):
                try:
                    data = Path(cell["path"]).read_bytes()
                except OSError:
                    data = b""
            data = data or b""
            source: Any = bytes(data)
            sha = hashlib.sha256(source).hexdigest()
        elif isinstance(cell, str):
            source = Path(cell)
            sha = _file_sha256(source)
        else:
            mi = _memory_input(cell, i)
            source, sha = mi.source, mi.sha256
        over: tuple = ()
        if prompt_column is not None and row[prompt_column] is not None:
            over = (("options", {"prompt": str(row[prompt_column])}),)
        name = f"{where}[{i}]"
        out.append(InputImage(name=name, key=name, sha256=sha, source=source, overrides=over))
    if not out:
        raise JobFileError(f"dataset {label!r} (split {split!r}) has no rows")
    return out


# ---------------------------------------------------------------------------------------------------
# the cross product
# ---------------------------------------------------------------------------------------------------
def make_jobs(
    inputs: Sequence[InputImage],
    *,
    directions: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    editor: str = "pix2pix-zero",
    model: str = "CompVis/stable-diffusion-v1-4",
    options: dict[str, Any] | None = None,
    sweep: Sequence[dict[str, Any]] = ({},),
) -> list[Job]:
    """Jobs = inputs x directions x seeds x sweep, in that order; what a job file's line sets wins.

    Raises `JobFileError` when an input has no direction, or an option is one the batch sets itself.
    Duplicate jobs (same content) are kept once.
    """
    base = dict(options or {})
    jobs: dict[str, Job] = {}
    for inp in inputs:
        over = dict(inp.overrides)
        dirs = over.get("directions") or list(directions)
        if not dirs:
            raise JobFileError(
                f"no direction for {inp.name}: give --direction 'cat->dog' (or a 'direction' in its job line)"
            )
        for d in dirs:
            for seed in over.get("seeds") or list(seeds):
                for sw in sweep or ({},):
                    opts = {**base, **sw, **over.get("options", {})}
                    bad = [k for k in opts if k in RESERVED_OPTIONS]
                    if bad:
                        raise JobFileError(
                            f"option {bad[0]!r} ({inp.name}) is set by the batch itself; use --seeds for seeds "
                            f"(outputs are always PNG images)"
                        )
                    oj = canonical_json(opts)
                    ed, mo = over.get("editor", editor), over.get("model", model)
                    jid = job_id(inp, d, ed, mo, oj, int(seed))
                    jobs.setdefault(jid, Job(jid, inp, d, ed, mo, oj, int(seed)))
    return list(jobs.values())
