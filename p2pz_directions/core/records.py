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

from p2pz_directions import __version__
from p2pz_directions.core.errors import FormatError, IntegrityError, NotFoundError
from p2pz_directions.core.format import canonical_json, check_header, require, sha256_bytes

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
    from p2pz_directions.core.store import now_iso

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


def validate_record(meta: Any, path: Path) -> dict[str, Any]:
    """Check a record's schema; raise `FormatError` naming the file and the field."""
    check_header(meta, path, FORMAT_NAME, FORMAT_VERSION, what="record format")
    d = meta.get("direction")
    require(
        isinstance(d, dict) and isinstance(d.get("name"), str),
        path,
        "'direction' must be an object with a name",
    )
    for side in ("source", "target"):
        s = d.get(side)
        require(
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and _HEX64.match(str(s.get("content_hash", ""))),
            path,
            f"'direction.{side}' must name a concept and its 64-hex content_hash",
        )
    require(
        isinstance(meta.get("editor"), str) and meta["editor"], path, "'editor' must be a non-empty string"
    )
    require(
        meta.get("model") is None or isinstance(meta["model"], str), path, "'model' must be a string or null"
    )
    require(isinstance(meta.get("settings"), dict), path, "'settings' must be an object")
    im = meta.get("images")
    require(
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
    require(isinstance(sc, dict) and sc, path, "'scores' must be a non-empty object")
    for m, s in sc.items():
        require(
            isinstance(s, dict)
            and all(s.get(k) is None or isinstance(s.get(k), (int, float)) for k in ("mean", "std"))
            and isinstance(s.get("n"), int),
            path,
            f"'scores.{m}' must hold mean, std (numbers or null) and n",
        )
    require(isinstance(meta.get("samples"), list), path, "'samples' must be a list")
    for key in ("record_id", "manifest_sha256"):
        require(
            _HEX64.match(str(meta.get(key, ""))) is not None, path, f"'{key}' must be a sha256 hex digest"
        )
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
    from p2pz_directions.core.atomic import write_bytes
    from p2pz_directions.core.store import _fsync_dir, default_store

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
        write_bytes(dest, record_bytes(meta))
        _fsync_dir(d)
    return read_record(dest, pack=pack)


def list_records(
    store: Any = None, pack: str | None = None, *, skip_damaged: bool = False
) -> list[EvalRecord]:
    """Every record in the store (or one pack), oldest first. A damaged one raises `IntegrityError`,
    or with ``skip_damaged`` is left out with a warning."""
    import warnings

    from p2pz_directions.core.store import default_store

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
    return for_hashes(
        direction.source.content_hash, direction.target.content_hash, store, skip_damaged=skip_damaged
    )


def for_hashes(
    source_hash: str, target_hash: str, store: Any = None, *, skip_damaged: bool = True
) -> list[EvalRecord]:
    """The records measured on the concept versions with these content hashes (any pack)."""
    return [
        r
        for r in list_records(store, skip_damaged=skip_damaged)
        if r.source_hash == source_hash and r.target_hash == target_hash
    ]


def verify(store: Any = None, pack: str | None = None) -> tuple[int, list[tuple[Path, str]]]:
    """Check every record file; returns (records checked, [(path, problem)])."""
    from p2pz_directions.core.store import default_store

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
    """Untrusted text (a pulled record) for the terminal: `terminal.safe_text`, the one escaper."""
    from p2pz_directions.core.terminal import safe_text

    return safe_text(str(s))


def render(recs: list[EvalRecord], console: Any) -> None:
    """Print recorded scores (``p2pz show``): per record its setting, then mean ± std per metric."""
    from rich.table import Table

    from p2pz_directions.eval.aggregate import fmt

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


# -- the Hub: records travel with the pack ------------------------------------------------------------
#
# A pack repo holds its records under ``evals/<record_id>.json`` and lists them in ``evals.parquet``
# (one row per record: what was measured, mean/std per metric as columns, and the file's sha256 and
# size). The card declares it as a second dataset config, ``evaluations``, so the Hub's viewer shows
# the scores beside the concepts of ``index.parquet``. Pull checks every record file against that
# index and reads it with `read_record` (schema, id, manifest hash) before anything is installed.

EVALS_INDEX = "evals.parquet"
MAX_EVALS_ROWS = 100_000
CARD_BEGIN = "<!-- p2pz-evals:begin (generated by p2pz push) -->"
CARD_END = "<!-- p2pz-evals:end -->"
_FIXED_COLUMNS = {
    "record_id": "string",
    "direction": "string",
    "source": "string",
    "source_version": "int64",
    "source_hash": "string",
    "target": "string",
    "target_version": "int64",
    "target_hash": "string",
    "encoder": "string",
    "editor": "string",
    "model": "string",
    "images": "int64",
    "image_set_sha256": "string",
    "seeds": "string",
    "created": "string",
    "package_version": "string",
    "path": "string",
    "sha256": "string",
    "size": "int64",
}
_METRIC = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def record_repo_path(record_id: str) -> str:
    return f"{RECORDS_DIR}/{record_id}.json"


def _row_of(rec: EvalRecord, data: bytes) -> dict[str, Any]:
    d = rec.data["direction"]
    row: dict[str, Any] = {
        "record_id": rec.record_id,
        "direction": d["name"],
        "source": d["source"]["name"],
        "source_version": d["source"].get("version"),
        "source_hash": d["source"]["content_hash"],
        "target": d["target"]["name"],
        "target_version": d["target"].get("version"),
        "target_hash": d["target"]["content_hash"],
        "encoder": d.get("encoder"),
        "editor": rec.editor,
        "model": rec.model,
        "images": rec.data["images"]["count"],
        "image_set_sha256": rec.data["images"]["sha256"],
        "seeds": ",".join(str(s) for s in rec.data["settings"].get("seeds", [])),
        "created": rec.created,
        "package_version": rec.data.get("package_version"),
        "path": record_repo_path(rec.record_id),
        "sha256": sha256_bytes(data),
        "size": len(data),
    }
    for m, s in rec.scores.items():
        if _METRIC.match(m):
            row[f"{m}_mean"] = s.get("mean")
            row[f"{m}_std"] = s.get("std")
    return row


def write_evals_index(rows: list[dict[str, Any]]) -> bytes:
    """Parquet bytes of ``evals.parquet`` (sorted by direction, editor, record id)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"string": pa.string(), "int64": pa.int64()}
    extra = sorted({k for r in rows for k in r if k not in _FIXED_COLUMNS})
    schema = pa.schema(
        [pa.field(k, types[t]) for k, t in _FIXED_COLUMNS.items()]
        + [pa.field(k, pa.float64()) for k in extra],
        metadata={b"p2pz": json.dumps({"format": "p2pz-evals-index", "format_version": 1}).encode()},
    )
    rows = sorted(rows, key=lambda r: (r["direction"], r["editor"], r["record_id"]))
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=False)
    return buf.getvalue()


def read_evals_index(data: bytes, source: str = EVALS_INDEX) -> list[dict[str, Any]]:
    """Parse and validate ``evals.parquet`` rows (ids, paths, hashes, sizes) before any record is fetched."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from p2pz_directions.packs.pack_schema import MAX_INDEX_BYTES, PackFormatError

    if len(data) > MAX_INDEX_BYTES:
        raise PackFormatError(f"{source}: {len(data)} bytes, over the {MAX_INDEX_BYTES}-byte bound")
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        if pf.metadata.num_rows > MAX_EVALS_ROWS:
            raise PackFormatError(
                f"{source}: {pf.metadata.num_rows} rows, over the limit of {MAX_EVALS_ROWS}"
            )
        missing = [c for c in ("record_id", "path", "sha256", "size") if c not in pf.schema_arrow.names]
        if missing:
            raise PackFormatError(f"{source} lacks the columns {missing}")
        rows = pf.read().to_pylist()
    except PackFormatError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        raise PackFormatError(
            f"{source} is not a readable parquet file ({e.__class__.__name__}: {e})"
        ) from None
    seen = set()
    for i, r in enumerate(rows):
        where = f"{source} row {i + 1}"
        rid = r.get("record_id")
        if not isinstance(rid, str) or not _HEX64.match(rid):
            raise PackFormatError(f"{where}: record_id must be a sha256 hex digest")
        if r.get("path") != record_repo_path(rid):
            raise PackFormatError(f"{where}: path is {r.get('path')!r}, expected {record_repo_path(rid)!r}")
        if not isinstance(r.get("sha256"), str) or not _HEX64.match(r["sha256"]):
            raise PackFormatError(f"{where}: sha256 must be a sha256 hex digest")
        if not isinstance(r.get("size"), int) or not 2 <= r["size"] <= MAX_RECORD_BYTES:
            raise PackFormatError(f"{where}: size must be 2..{MAX_RECORD_BYTES} bytes")
        if rid in seen:
            raise PackFormatError(f"{where}: record {rid[:12]}... is listed twice")
        seen.add(rid)
    return rows


def hub_push_plan(store: Any, pack: str, repo_id: str, remote: Any, readme: str, token: Any = None):
    """What ``hub.push`` adds for records: ``(operations, readme)``.

    Local records not yet in the repo are uploaded with a rewritten ``evals.parquet``; records
    already there stay as they are (same id, same content). The card gets the ``evaluations`` config
    and a table of scores. Every local record is hash-checked first: a damaged one is never pushed.
    """
    from huggingface_hub import CommitOperationAdd

    local = list_records(store, pack)
    remote_rows: list[dict[str, Any]] = []
    files = getattr(remote, "files", {}) or {}
    if getattr(remote, "exists", False) and EVALS_INDEX in files:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, EVALS_INDEX, repo_type="dataset", revision=remote.head, token=token)
        remote_rows = read_evals_index(Path(path).read_bytes(), f"{repo_id}/{EVALS_INDEX}")
    have = {r["record_id"] for r in remote_rows}
    ops = []
    rows = list(remote_rows)
    for rec in local:
        if rec.record_id in have:
            continue
        data = rec.path.read_bytes()
        ops.append(CommitOperationAdd(record_repo_path(rec.record_id), data))
        rows.append(_row_of(rec, data))
    if ops:
        ops.append(CommitOperationAdd(EVALS_INDEX, write_evals_index(rows)))
    if rows:
        readme = annotate_card(readme, rows)
    return ops, readme


def annotate_card(readme: str, rows: list[dict[str, Any]]) -> str:
    """The card with an ``evaluations`` dataset config (``evals.parquet``) and a generated scores table."""
    from huggingface_hub import DatasetCard

    card = DatasetCard(readme, ignore_metadata_errors=True)
    configs = [c for c in (card.data.to_dict().get("configs") or []) if c.get("config_name") != "evaluations"]
    configs.append({"config_name": "evaluations", "data_files": [{"split": "train", "path": EVALS_INDEX}]})
    card.data.configs = configs
    metrics = sorted({k[: -len("_mean")] for r in rows for k in r if k.endswith("_mean")})
    head = ["direction", "editor", "model", "images × seeds", *metrics]
    lines = [
        CARD_BEGIN,
        "",
        f"## Evaluations ({len(rows)} records)",
        "",
        "Scores measured with `p2pz eval --record` (mean ± std over images and seeds); each record names the exact "
        "concept versions by content hash. The `evaluations` subset of this dataset lists them; `p2pz show a->b` "
        "prints them after `p2pz pull`.",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")[:80]

    for r in sorted(rows, key=lambda r: (r["direction"], r["editor"], r["record_id"]))[:500]:
        n_seeds = len([s for s in str(r.get("seeds") or "").split(",") if s])
        vals = []
        for m in metrics:
            mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
            vals.append("-" if mean is None else f"{mean:.3f} ± {std or 0:.3f}")
        lines.append(
            "| "
            + " | ".join(
                [
                    cell(r["direction"]),
                    cell(r["editor"]),
                    cell(r.get("model") or "-"),
                    f"{r['images']} × {n_seeds}",
                ]
                + vals
            )
            + " |"
        )
    lines += ["", CARD_END]
    section = "\n".join(lines)
    body = card.text
    if CARD_BEGIN in body and CARD_END in body:
        pre, rest = body.split(CARD_BEGIN, 1)
        body = pre + section + rest.split(CARD_END, 1)[1]
    else:
        body = body.rstrip() + "\n\n" + section + "\n"
    return str(DatasetCard(f"---\n{card.data.to_yaml()}\n---\n{body.lstrip(chr(10))}"))


def hub_pull_rows(
    repo_id: str, commit: str, sizes: Mapping[str, Any] | None, *, cache_dir=None, token=None, offline=False
) -> list[dict[str, Any]]:
    """The validated ``evals.parquet`` rows of a pack at ``commit`` ([] when it has none)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    if sizes is not None and EVALS_INDEX not in sizes:
        return []
    try:
        path = hf_hub_download(
            repo_id,
            EVALS_INDEX,
            repo_type="dataset",
            revision=commit,
            cache_dir=cache_dir,
            token=token,
            local_files_only=offline,
        )
    except (EntryNotFoundError, LocalEntryNotFoundError):
        if sizes is not None:
            raise
        return []
    rows = read_evals_index(Path(path).read_bytes(), f"{repo_id}@{commit[:10]}/{EVALS_INDEX}")
    if sizes is not None:
        from p2pz_directions.packs.pack_schema import PackFormatError

        for i, r in enumerate(rows):
            if r["path"] not in sizes:
                raise PackFormatError(f"{repo_id}/{EVALS_INDEX} row {i + 1}: {r['path']} is not in the repo")
            if sizes[r["path"]] is not None and sizes[r["path"]] != r["size"]:
                raise PackFormatError(
                    f"{repo_id}/{EVALS_INDEX} row {i + 1}: {r['path']} is {sizes[r['path']]} bytes, the index says "
                    f"{r['size']}"
                )
    return rows


def hub_verify(
    snap: Path | Mapping[str, Path], rows: list[dict[str, Any]], label: str, commit: str
) -> list[EvalRecord]:
    """sha256 and size of each downloaded record against ``evals.parquet``, then a full `read_record`."""
    out = []
    for r in rows:
        p = snap[r["path"]] if isinstance(snap, Mapping) else snap / r["path"]
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(
                f"{label}: {r['path']} was not downloaded (commit {commit[:10]}). Run the pull again"
            ) from None
        got = sha256_bytes(data)
        if got != r["sha256"] or len(data) != r["size"]:
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass
            raise IntegrityError(
                f"{label}: {r['path']} (commit {commit[:10]}) has sha256 {got[:12]}... and {len(data)} bytes, but "
                f"{EVALS_INDEX} says {r['sha256'][:12]}... and {r['size']} bytes: the download was corrupted or the "
                "file was tampered with. Nothing was installed and the bad copy was deleted, so run the pull again"
            )
        try:
            out.append(read_record(p))
        except IntegrityError as e:
            raise IntegrityError(f"{label}: {e}. The pack on the Hub is damaged; tell its owner") from None
    return out


def keep_local_records(staged_pack: Path, installed_pack: Path) -> None:
    """Carry the installed pack's own records that the pulled revision lacks into the staged pack
    (call under the store's lock, just before the swap). A record never changes, so keeping one is
    safe; a damaged local copy is left behind."""
    import shutil

    old = installed_pack / RECORDS_DIR
    if not old.is_dir():
        return
    d = staged_pack / RECORDS_DIR
    for f in sorted(old.glob("*.json")):
        if (d / f.name).exists():
            continue
        try:
            read_record(f)
        except IntegrityError:
            continue
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, d / f.name)
