"""Evaluation records: the measured quality of a direction, stored immutably with its pack.

A record says which direction was measured (the content hashes of both concepts, so it never
drifts to another version), with what (editor, model, settings, scorer models, seeds), on what
(the sha256 of every image and of the image set) and what came out (mean, std and n per metric,
and every per-image value), by which package version. It lives beside the concepts::

    packs/<pack>/evals/<record_id>.json

``record_id`` is the sha256 of the canonical JSON of the content (everything but ``created``
and the hashes), so the same evaluation recorded twice is one record; ``manifest_sha256`` covers
every field, so any edit of the file is caught when it is read. Writes are atomic (temp file,
fsync, rename) under the store's lock; a record never changes once written.

>>> from p2pz_directions import records
>>> rec = records.publish(records.build(...), pack="local")                  # doctest: +SKIP
>>> [r.summary() for r in records.for_direction(d)]                          # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import __version__
from .errors import FormatError, IntegrityError, NotFoundError
from .format import canonical_json, sha256_bytes

__all__ = [
    "EvalRecord",
    "FORMAT_NAME",
    "RECORDS_DIR",
    "build",
    "for_direction",
    "list_records",
    "publish",
    "read_record",
    "record_bytes",
    "validate_record",
]

FORMAT_NAME = "p2pz-eval-record"
FORMAT_VERSION = 1
RECORDS_DIR = "evals"
MAX_RECORD_BYTES = 16 * 1024 * 1024
#: fields outside the content: when it was written, and the hashes themselves
NON_CONTENT = ("created", "record_id", "manifest_sha256")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class EvalRecord:
    """One stored evaluation record (read-only, hash-checked)."""

    record_id: str
    data: Mapping[str, Any]
    pack: str | None = None
    path: Path | None = None

    @property
    def direction(self) -> str:
        return self.data["direction"]["name"]

    @property
    def editor(self) -> str:
        return self.data["editor"]

    @property
    def model(self) -> str | None:
        return self.data.get("model")

    @property
    def scores(self) -> Mapping[str, Mapping[str, Any]]:
        return self.data["scores"]

    @property
    def created(self) -> str | None:
        return self.data.get("created")

    @property
    def source_hash(self) -> str:
        return self.data["direction"]["source"]["content_hash"]

    @property
    def target_hash(self) -> str:
        return self.data["direction"]["target"]["content_hash"]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(record_bytes(self.data))

    def summary(self) -> dict[str, Any]:
        """What a listing shows: id, direction, editor, model, images, seeds, mean ± std per metric."""
        return {
            "record_id": self.record_id,
            "pack": self.pack,
            "direction": self.direction,
            "editor": self.editor,
            "model": self.model,
            "images": self.data["images"]["count"],
            "image_set_sha256": self.data["images"]["sha256"],
            "seeds": list(self.data["settings"].get("seeds", [])),
            "scores": {k: dict(v) for k, v in self.scores.items()},
            "created": self.created,
            "package_version": self.data.get("package_version"),
        }


def _freeze(obj: Any) -> Any:
    if isinstance(obj, dict):
        return MappingProxyType({k: _freeze(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return tuple(_freeze(v) for v in obj)
    return obj


def _thaw(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_thaw(v) for v in obj]
    return obj


def content_of(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _thaw(v) for k, v in meta.items() if k not in NON_CONTENT}


def compute_record_id(meta: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the record's content fields."""
    return sha256_bytes(canonical_json(content_of(meta)))


def compute_manifest_hash(meta: Mapping[str, Any]) -> str:
    return sha256_bytes(canonical_json({k: _thaw(v) for k, v in meta.items() if k != "manifest_sha256"}))


def record_bytes(meta: Mapping[str, Any]) -> bytes:
    """The bytes of a record file (deterministic for equal records)."""
    return (
        json.dumps(_thaw(meta), sort_keys=True, ensure_ascii=False, indent=1, allow_nan=False) + "\n"
    ).encode("utf-8")


def _concept_ref(c: Any) -> dict[str, Any]:
    if not c.content_hash:
        raise FormatError(
            f"concept {c.name!r} has no content hash (it is not from the store); record only stored directions"
        )
    return {"name": c.name, "version": c.version, "pack": c.pack, "content_hash": c.content_hash}


def _clean_number(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) or math.isinf(f) else f


def build(
    *,
    direction: Any,
    editor: str,
    model: str | None,
    settings: Mapping[str, Any],
    images: list[Mapping[str, str]],
    image_set_sha256: str,
    scores: Mapping[str, Mapping[str, Any]],
    samples: list[Mapping[str, Any]],
    created: str | None = None,
) -> dict[str, Any]:
    """A complete record (with ``record_id`` and ``manifest_sha256``) for one direction × editor.

    ``scores`` is ``{metric: {"mean", "std", "n", "higher_is_better"}}``; ``samples`` one dict per
    (image, seed) with the per-metric values; ``images`` ``[{"name", "sha256"}]``.
    """
    from .store import now_iso

    if not direction.is_simple:
        raise FormatError(f"direction {direction.name!r} is a combination; records are for one concept pair")
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "direction": {
            "name": f"{direction.source.name}->{direction.target.name}",
            "source": _concept_ref(direction.source),
            "target": _concept_ref(direction.target),
            "encoder": direction.encoder.id,
        },
        "editor": editor,
        "model": model,
        "settings": json.loads(canonical_json(_thaw(settings))),
        "images": {"count": len(images), "sha256": image_set_sha256, "files": [dict(i) for i in images]},
        "scores": {
            m: {
                "mean": _clean_number(s.get("mean")),
                "std": _clean_number(s.get("std")),
                "n": int(s.get("n", 0)),
                "higher_is_better": bool(s.get("higher_is_better", True)),
            }
            for m, s in sorted(scores.items())
        },
        "samples": [
            {k: (_clean_number(v) if isinstance(v, float) else v) for k, v in dict(s).items()}
            for s in samples
        ],
        "package_version": __version__,
        "created": created or now_iso(),
    }
    meta["record_id"] = compute_record_id(meta)
    meta["manifest_sha256"] = compute_manifest_hash(meta)
    validate_record(meta, Path("<new record>"))
    return meta


def _req(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise FormatError(f"{path}: {what}")


def validate_record(meta: Any, path: Path) -> dict[str, Any]:
    """Check a record's schema; raise `FormatError` naming the file and the field."""
    _req(isinstance(meta, dict), path, "not a JSON object")
    _req(
        meta.get("format") == FORMAT_NAME,
        path,
        f"'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}",
    )
    fv = meta.get("format_version")
    _req(isinstance(fv, int), path, "'format_version' missing")
    if fv > FORMAT_VERSION:
        raise FormatError(
            f"{path}: record format {fv} is newer than this p2pz-directions understands ({FORMAT_VERSION}); "
            "upgrade with `pip install -U p2pz-directions`"
        )
    d = meta.get("direction")
    _req(
        isinstance(d, dict) and isinstance(d.get("name"), str),
        path,
        "'direction' must be an object with a name",
    )
    for side in ("source", "target"):
        s = d.get(side)
        _req(
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and _HEX64.match(str(s.get("content_hash", ""))),
            path,
            f"'direction.{side}' must name a concept and its 64-hex content_hash",
        )
    _req(isinstance(meta.get("editor"), str) and meta["editor"], path, "'editor' must be a non-empty string")
    _req(
        meta.get("model") is None or isinstance(meta["model"], str), path, "'model' must be a string or null"
    )
    _req(isinstance(meta.get("settings"), dict), path, "'settings' must be an object")
    im = meta.get("images")
    _req(
        isinstance(im, dict)
        and isinstance(im.get("count"), int)
        and im["count"] >= 1
        and _HEX64.match(str(im.get("sha256", ""))) is not None
        and isinstance(im.get("files"), list)
        and len(im["files"]) == im["count"],
        path,
        "'images' must hold count >= 1, the image set's sha256 and one entry per file",
    )
    sc = meta.get("scores")
    _req(isinstance(sc, dict) and sc, path, "'scores' must be a non-empty object")
    for m, s in sc.items():
        _req(
            isinstance(s, dict)
            and all(s.get(k) is None or isinstance(s.get(k), (int, float)) for k in ("mean", "std"))
            and isinstance(s.get("n"), int),
            path,
            f"'scores.{m}' must hold mean, std (numbers or null) and n",
        )
    _req(isinstance(meta.get("samples"), list), path, "'samples' must be a list")
    for key in ("record_id", "manifest_sha256"):
        _req(_HEX64.match(str(meta.get(key, ""))) is not None, path, f"'{key}' must be a sha256 hex digest")
    return meta


def read_record(path: str | os.PathLike, *, pack: str | None = None) -> EvalRecord:
    """Read one record, checking its schema, its id (the file name too) and its manifest hash."""
    path = Path(path)
    hint = "Run `p2pz verify`; remove the damaged record or re-pull its pack."
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing. {hint}") from None
    if len(raw) > MAX_RECORD_BYTES:
        raise IntegrityError(
            f"{path} is corrupted: {len(raw)} bytes, over the {MAX_RECORD_BYTES}-byte bound. {hint}"
        )
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise IntegrityError(
            f"{path} is corrupted: not valid JSON ({e}); it may be truncated. {hint}"
        ) from None
    try:
        validate_record(meta, path)
    except FormatError as e:
        raise IntegrityError(f"{path} is corrupted: {str(e).removeprefix(f'{path}: ')}. {hint}") from None
    if compute_manifest_hash(meta) != meta["manifest_sha256"]:
        raise IntegrityError(f"{path} is corrupted: its fields do not match its manifest_sha256. {hint}")
    if compute_record_id(meta) != meta["record_id"]:
        raise IntegrityError(f"{path} is corrupted: its content does not match its record_id. {hint}")
    if path.stem != meta["record_id"]:
        raise IntegrityError(
            f"{path} is corrupted: it holds record {meta['record_id'][:12]}... under another name. {hint}"
        )
    return EvalRecord(meta["record_id"], _freeze(meta), pack, path)


def records_dir(store: Any, pack: str) -> Path:
    return store.pack_dir(pack) / RECORDS_DIR


def publish(meta: Mapping[str, Any], pack: str, store: Any = None) -> EvalRecord:
    """Store a record built by `build` in ``pack`` (atomic, under the store's lock).

    The same record again returns the stored one; a record is never rewritten. The pack must exist.
    """
    from .store import _atomic_write, _fsync_dir, default_store

    store = store or default_store()
    meta = dict(meta)
    validate_record(meta, Path("<record>"))
    if compute_record_id(meta) != meta["record_id"] or compute_manifest_hash(meta) != meta["manifest_sha256"]:
        raise IntegrityError("the record's hashes do not match its content: build it with records.build(...)")
    with store.lock():
        if not store.pack_dir(pack).is_dir():
            raise NotFoundError(
                f"no pack {pack!r} in {store.root} to record into; installed: {', '.join(store.pack_names()) or 'none'}"
            )
        d = records_dir(store, pack)
        d.mkdir(parents=True, exist_ok=True)
        dest = d / f"{meta['record_id']}.json"
        if dest.exists():
            return read_record(dest, pack=pack)  # content-addressed: same id, same content
        _atomic_write(dest, record_bytes(meta))
        _fsync_dir(d)
    return read_record(dest, pack=pack)


def list_records(
    store: Any = None, pack: str | None = None, *, skip_damaged: bool = False
) -> list[EvalRecord]:
    """Every record in the store (or one pack), oldest first. A damaged one raises `IntegrityError`,
    or with ``skip_damaged`` is left out with a warning."""
    import warnings

    from .store import default_store

    store = store or default_store()
    packs = [store.pack_info(pack)] if pack is not None else store.packs()
    out = []
    for p in packs:
        d = p.path / RECORDS_DIR
        if not d.is_dir():
            continue
        for f in sorted(d.glob("*.json")):
            try:
                out.append(read_record(f, pack=p.name))
            except IntegrityError as e:
                if not skip_damaged:
                    raise
                warnings.warn(str(e), stacklevel=2)
    out.sort(key=lambda r: (r.created or "", r.record_id))
    return out


def for_direction(direction: Any, store: Any = None, *, skip_damaged: bool = True) -> list[EvalRecord]:
    """The records measured on exactly this direction's two concept versions (any pack)."""
    s, t = direction.source.content_hash, direction.target.content_hash
    return [
        r for r in list_records(store, skip_damaged=skip_damaged) if r.source_hash == s and r.target_hash == t
    ]


def verify(store: Any = None, pack: str | None = None) -> tuple[int, list[tuple[Path, str]]]:
    """Check every record file; returns (records checked, [(path, problem)])."""
    from .store import default_store

    store = store or default_store()
    packs = [store.pack_info(pack)] if pack is not None else store.packs()
    n, problems = 0, []
    for p in packs:
        d = p.path / RECORDS_DIR
        for f in sorted(d.glob("*.json")) if d.is_dir() else []:
            n += 1
            try:
                read_record(f, pack=p.name)
            except IntegrityError as e:
                problems.append((f, str(e)))
    return n, problems


def _safe(s: Any) -> str:
    """Untrusted text (a pulled record) for the terminal: control characters and rich markup escaped."""
    from rich.markup import escape

    text = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in str(s))
    return escape(text)


def render(recs: list[EvalRecord], console: Any) -> None:
    """Print recorded scores (``p2pz show``): per record its setting, then mean ± std per metric."""
    from rich.table import Table

    from .eval.aggregate import fmt

    if not recs:
        console.print(
            "no recorded scores for these concept versions; measure them with "
            "`p2pz eval 'a->b' --images FOLDER --record`"
        )
        return
    console.print(f"[bold]recorded scores[/bold] ({len(recs)}; mean ± std over images and seeds)")
    for r in recs:
        seeds = r.data["settings"].get("seeds") or []
        t = Table(
            title=(
                f"{_safe(r.pack)}:{r.record_id[:10]}  {_safe(r.editor)} on {_safe(r.model or '?')}, "
                f"{r.data['images']['count']} images × {len(seeds)} seeds, {_safe(r.created or '')[:10]}"
            ),
            title_justify="left",
        )
        t.add_column("metric")
        t.add_column("mean ± std", justify="right")
        t.add_column("n", justify="right")
        for m, s in r.scores.items():
            arrow = "↑" if s.get("higher_is_better", True) else "↓"
            t.add_row(f"{_safe(m)} {arrow}", fmt(s), str(s.get("n", "")))
        console.print(t)
