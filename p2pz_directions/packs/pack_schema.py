"""Validation of what comes from untrusted packs: the index rows, concept metadata, known-pack lists.

A Hub pack is data only. Before anything but its index is downloaded, every index row is checked
against ``registry/schema/index-row.schema.json`` (types, bounds, hex digests, and file paths that
must equal the canonical path of the row's encoder, name and version, so no row can point outside
``concepts/``), sizes are bounded by the tensor shape, and duplicates are refused. Errors name the
file and the row (rows count from 1)::

    >>> from p2pz_directions import pack_schema
    >>> pack_schema.concept_dir("openai/clip-vit-large-patch14", "cat", 2)
    'concepts/openai--clip-vit-large-patch14/cat/2'
    >>> pack_schema.concept_dir("openai/clip-vit-large-patch14", "cat wearing a hat", 1)
    'concepts/openai--clip-vit-large-patch14/cat_wearing_a_hat-9784a91c/1'

The JSON schemas live in ``registry/schema/`` (package ``p2pz_registry``) and are applied with the
`jsonschema` library (draft 2020-12); its errors are turned into one line that names the field and
what it must be (`validate`).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from p2pz_directions.core import naming
from p2pz_directions.core.concept import EncoderInfo
from p2pz_directions.core.errors import FormatError, InvalidNameError

INDEX_FILE = "index.parquet"
INDEX_FORMAT = "p2pz-pack-index"
INDEX_FORMAT_VERSION = 1
TENSOR_FILE = "embedding.safetensors"
META_FILE = "concept.json"
MAX_INDEX_BYTES = 64 * 1024 * 1024
MAX_INDEX_ROWS = 100_000
#: decoded (uncompressed) bytes of an index's columns; 100 000 honest rows take about 60 MB
MAX_INDEX_DECODED_BYTES = 256 * 1024 * 1024
INDEX_BATCH_ROWS = 1024
MAX_PACK_BYTES = 8 * 1024**3
#: safetensors header and metadata beyond the raw tensor bytes
TENSOR_HEADER_SLACK = 4096
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

#: index columns, in order, with their Arrow type names (see `index_schema`)
INDEX_COLUMNS: dict[str, str] = {
    "name": "string",
    "version": "int64",
    "encoder": "string",
    "encoder_revision": "string",
    "encoder_family": "string",
    "hidden_size": "int64",
    "max_length": "int64",
    "dtype": "string",
    "num_captions": "int64",
    "created": "string",
    "content_hash": "string",
    "sha256": "string",
    "size": "int64",
    "metadata_sha256": "string",
    "metadata_size": "int64",
    "tensor_path": "string",
    "metadata_path": "string",
}

_COMPONENT = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,78}[a-z0-9])?$")


class PackFormatError(FormatError):
    """A Hub pack's index or metadata breaks the pack schema."""


# -- paths ------------------------------------------------------------------------------------------
def name_component(name: str) -> str:
    """The folder name of a concept inside a pack repo: the name itself when it is a plain
    ``[a-z0-9._-]`` word, else a readable slug plus 8 hex of the name's sha256 (unique, stable)."""
    if _COMPONENT.match(name) and ".." not in name:
        return name
    base = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:60] or "concept"
    return f"{base}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"


def concept_dir(encoder_id: str, name: str, version: int) -> str:
    """Repo folder of one concept version: ``concepts/<encoder slug>/<name component>/<version>``."""
    return f"concepts/{naming.slug(encoder_id)}/{name_component(name)}/{int(version)}"


# -- JSON Schema (the `jsonschema` library) -----------------------------------------------------------
def _strict_integer(checker: Any, v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@cache
def _validator_class() -> type:
    """Draft 2020-12, except that an integer field refuses ``1.0`` (JSON Schema accepts it; a version
    or a byte size that arrives as a float is a writer's bug, and it would slip past the checks)."""
    from jsonschema import Draft202012Validator, validators

    checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_integer)
    return validators.extend(Draft202012Validator, type_checker=checker)


@cache
def _validator(name: str) -> Any:
    cls = _validator_class()
    schema = load_schema(name)
    cls.check_schema(schema)  # a broken schema file is our bug: say so at once, not as a pack error
    return cls(schema)


def validate(obj: Any, schema: dict[str, Any] | str, where: str = "") -> None:
    """Check ``obj`` against ``schema`` (a dict, or the stem of a file in ``registry/schema/``) with
    `jsonschema`; raise `PackFormatError` naming the bad field (``where.field[i]``) and what it must be."""
    from jsonschema.exceptions import best_match

    # Measured (2 shared cores, one index row): jsonschema 4.18-4.26 takes about 0.45-0.5 ms where the
    # hand-written subset it replaces took 0.08-0.13 ms, so an index at the 100 000-row bound costs
    # about 45 s more to check; a real pack has hundreds of rows (well under a second). The fast
    # `is_valid` path runs first; `best_match` only picks the error to report.
    v = _validator(schema) if isinstance(schema, str) else _validator_class()(schema)
    if v.is_valid(obj):
        return
    raise PackFormatError(_describe(best_match(v.iter_errors(obj)), where))


def _describe(err: Any, where: str) -> str:
    """One line for a `jsonschema.ValidationError`: the field's path, then what was expected."""
    label = where
    for part in err.absolute_path:
        label = f"{label}[{part}]" if isinstance(part, int) else (f"{label}.{part}" if label else part)
    label = label or "value"
    kind, want, got = err.validator, err.validator_value, err.instance
    if kind == "const":
        return f"{label} must be {want!r}, not {_short(got)}"
    if kind == "enum":
        return f"{label} must be one of {want}, not {_short(got)}"
    if kind == "type":
        types = [want] if isinstance(want, str) else want
        return f"{label} must be {' or '.join(types)}, not {type(got).__name__} {_short(got)}"
    if kind == "minLength":
        return f"{label} is too short ({len(got)} < {want} characters)"
    if kind == "maxLength":
        return f"{label} is too long ({len(got)} > {want} characters)"
    if kind == "pattern":
        return f"{label} {_short(got)} does not match {want}"
    if kind in ("minimum", "exclusiveMinimum"):
        return f"{label} is {got}, below the minimum {want}"
    if kind in ("maximum", "exclusiveMaximum"):
        return f"{label} is {got}, above the maximum {want}"
    if kind == "minItems":
        return f"{label} has {len(got)} items, fewer than {want}"
    if kind == "maxItems":
        return f"{label} has {len(got)} items, more than {want}"
    if kind == "required":
        missing = [k for k in want if k not in got]
        return f"{label} lacks the required field {missing[0]!r}" if missing else f"{label}: {err.message}"
    if kind == "additionalProperties":
        allowed = set(err.schema.get("properties", {}))
        return f"{label} has unknown fields {sorted(set(got) - allowed)}"
    return f"{label}: {err.message[:200]}"


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


@cache
def load_schema(name: str) -> dict[str, Any]:
    """A schema from ``registry/schema/`` by file stem (``"index-row"``, ``"known-packs"``, ...)."""
    text = _registry_file(f"schema/{name}.schema.json")
    return json.loads(text)


def _registry_file(rel: str) -> str:
    try:
        return (resources.files("p2pz_registry") / rel).read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):  # running from a source tree without install
        return (Path(__file__).resolve().parent.parent / "registry" / rel).read_text("utf-8")


# -- index rows ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexRow:
    """One concept version as listed in a pack's ``index.parquet`` (validated)."""

    name: str
    version: int
    encoder: EncoderInfo
    dtype: str
    num_captions: int | None
    created: str | None
    content_hash: str
    sha256: str
    size: int
    metadata_sha256: str
    metadata_size: int
    tensor_path: str
    metadata_path: str

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.encoder.id, self.name, self.version)

    @property
    def dir(self) -> str:
        return self.tensor_path.rsplit("/", 1)[0]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version} ({self.encoder.id})"

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "encoder": self.encoder.id,
            "encoder_revision": self.encoder.revision,
            "encoder_family": self.encoder.family,
            "hidden_size": self.encoder.hidden_size,
            "max_length": self.encoder.max_length,
            "dtype": self.dtype,
            "num_captions": self.num_captions,
            "created": self.created,
            "content_hash": self.content_hash,
            "sha256": self.sha256,
            "size": self.size,
            "metadata_sha256": self.metadata_sha256,
            "metadata_size": self.metadata_size,
            "tensor_path": self.tensor_path,
            "metadata_path": self.metadata_path,
        }


def max_tensor_bytes(hidden_size: int, max_length: int, dtype: str) -> int:
    return hidden_size * max_length * DTYPE_BYTES[dtype] + TENSOR_HEADER_SLACK


def validate_row(obj: dict[str, Any], row: int, source: str = INDEX_FILE) -> IndexRow:
    """Validate one index row (a dict of column -> value); ``row`` counts from 1 for messages."""
    where = f"{source} row {row}"
    name = obj.get("name")
    if isinstance(name, str):
        where += f" ({name!r}@{obj.get('version')})"
    try:
        validate(obj, "index-row", "")
    except PackFormatError as e:
        raise PackFormatError(f"{where}: {e}") from None
    try:
        norm = naming.normalize_concept(name)
    except InvalidNameError as e:
        raise PackFormatError(f"{where}: bad concept name: {e}") from None
    if norm != name:
        raise PackFormatError(f"{where}: concept name {name!r} is not in normal form (expected {norm!r})")
    enc_id = obj["encoder"]
    if ".." in enc_id or "//" in enc_id or enc_id.endswith("/"):
        raise PackFormatError(f"{where}: encoder id {enc_id!r} is malformed")
    want_dir = concept_dir(enc_id, name, obj["version"])
    for col, fname in (("tensor_path", TENSOR_FILE), ("metadata_path", META_FILE)):
        if obj[col] != f"{want_dir}/{fname}":
            raise PackFormatError(f"{where}: {col} is {obj[col]!r}, expected {want_dir}/{fname!s}")
    limit = max_tensor_bytes(obj["hidden_size"], obj["max_length"], obj["dtype"])
    floor = obj["hidden_size"] * obj["max_length"] * DTYPE_BYTES[obj["dtype"]]
    if not floor < obj["size"] <= limit:
        raise PackFormatError(
            f"{where}: size {obj['size']} bytes does not fit a [{obj['max_length']}, {obj['hidden_size']}] "
            f"{obj['dtype']} tensor ({floor} bytes of data plus at most {TENSOR_HEADER_SLACK} of header)"
        )
    enc = EncoderInfo(
        id=enc_id,
        hidden_size=obj["hidden_size"],
        family=obj.get("encoder_family") or "unknown",
        revision=obj.get("encoder_revision"),
        max_length=obj["max_length"],
    )
    return IndexRow(
        name=name,
        version=obj["version"],
        encoder=enc,
        dtype=obj["dtype"],
        num_captions=obj.get("num_captions"),
        created=obj.get("created"),
        content_hash=obj["content_hash"],
        sha256=obj["sha256"],
        size=obj["size"],
        metadata_sha256=obj["metadata_sha256"],
        metadata_size=obj["metadata_size"],
        tensor_path=obj["tensor_path"],
        metadata_path=obj["metadata_path"],
    )


def validate_rows(records: list[dict[str, Any]], source: str = INDEX_FILE) -> list[IndexRow]:
    """Validate every row, then the whole: no duplicate (encoder, name, version), bounded total size."""
    if len(records) > MAX_INDEX_ROWS:
        raise PackFormatError(f"{source}: {len(records)} rows, over the limit of {MAX_INDEX_ROWS}")
    return _check_rows([validate_row(r, i + 1, source) for i, r in enumerate(records)], source)


def _check_rows(rows: list[IndexRow], source: str) -> list[IndexRow]:
    seen: dict[tuple[str, str, int], int] = {}
    for i, r in enumerate(rows):
        if r.key in seen:
            raise PackFormatError(
                f"{source} row {i + 1}: {r.ref} is listed twice (also row {seen[r.key] + 1}); a version is one row"
            )
        seen[r.key] = i
    total = sum(r.size + r.metadata_size for r in rows)
    if total > MAX_PACK_BYTES:
        raise PackFormatError(
            f"{source}: the pack would be {total} bytes, over the {MAX_PACK_BYTES}-byte bound"
        )
    return rows


def index_schema():
    """The Arrow schema of ``index.parquet`` (with the index format in its key-value metadata)."""
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64()}
    meta = {b"p2pz": json.dumps({"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION}).encode()}
    return pa.schema([pa.field(k, types[t]) for k, t in INDEX_COLUMNS.items()], metadata=meta)


def write_index(rows: list[IndexRow]) -> bytes:
    """Parquet bytes of the index, sorted by (encoder, name, version): deterministic for equal rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: r.key)
    table = pa.Table.from_pylist([r.to_record() for r in rows], schema=index_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=False)
    return buf.getvalue()


def read_index(data: bytes | str | Path, source: str = INDEX_FILE) -> list[IndexRow]:
    """Parse and validate an index (bytes or a file path). Unknown columns are ignored.

    Bounded while reading, not after: the file's bytes (`MAX_INDEX_BYTES`), its row count
    (`MAX_INDEX_ROWS`, from the footer), and the decoded bytes (`MAX_INDEX_DECODED_BYTES`,
    declared per row group in the footer and counted batch by batch as rows are decoded); each
    batch of rows is validated as soon as it is decoded, so the first bad row stops the read.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(data, bytes):
        p = Path(data)
        try:
            size = p.stat().st_size
            if not p.is_file():
                raise PackFormatError(f"{source}: not a file")
            if size > MAX_INDEX_BYTES:
                raise PackFormatError(f"{source}: {size} bytes, over the {MAX_INDEX_BYTES}-byte bound")
            data = p.read_bytes()
        except OSError as e:
            raise PackFormatError(f"{source}: cannot be read ({e.__class__.__name__})") from None
    if len(data) > MAX_INDEX_BYTES:
        raise PackFormatError(f"{source}: {len(data)} bytes, over the {MAX_INDEX_BYTES}-byte bound")
    records: list[dict[str, Any]] = []
    rows: list[IndexRow] = []
    try:
        pf = pq.ParquetFile(
            pa.BufferReader(data), thrift_string_size_limit=1 << 20, thrift_container_size_limit=1 << 20
        )
        meta = pf.metadata
        if meta.num_rows > MAX_INDEX_ROWS:
            raise PackFormatError(f"{source}: {meta.num_rows} rows, over the limit of {MAX_INDEX_ROWS}")
        names = set(pf.schema_arrow.names)
        missing = [c for c in load_schema("index-row")["required"] if c not in names]
        if missing:
            raise PackFormatError(f"{source} lacks the columns {missing}; is this a p2pz directions pack?")
        _check_index_format(pf.schema_arrow.metadata or {}, source)
        cols = [c for c in INDEX_COLUMNS if c in names]
        col_idx = [i for i in range(meta.num_columns) if meta.schema.column(i).path in cols]
        declared = 0
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            declared += sum(max(rg.column(i).total_uncompressed_size, 0) for i in col_idx)
            if declared > MAX_INDEX_DECODED_BYTES:
                raise PackFormatError(
                    f"{source}: its columns decode to over {MAX_INDEX_DECODED_BYTES} bytes (row group {g + 1}); "
                    "a pack index is far smaller"
                )
        decoded = 0
        for g in range(meta.num_row_groups):
            for batch in pf.iter_batches(
                batch_size=INDEX_BATCH_ROWS, row_groups=[g], columns=cols, use_threads=False
            ):
                decoded += batch.nbytes
                if decoded > MAX_INDEX_DECODED_BYTES:
                    raise PackFormatError(
                        f"{source}: decoded over {MAX_INDEX_DECODED_BYTES} bytes by row {len(records) + batch.num_rows}; "
                        "a pack index is far smaller"
                    )
                start = len(records)
                batch_records = batch.to_pylist()
                records.extend(batch_records)
                if len(records) > MAX_INDEX_ROWS:
                    raise PackFormatError(f"{source}: over {MAX_INDEX_ROWS} rows")
                rows.extend(validate_row(r, start + i + 1, source) for i, r in enumerate(batch_records))
    except PackFormatError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        raise PackFormatError(
            f"{source} is not a readable parquet file ({e.__class__.__name__}: {e})"
        ) from None
    return _check_rows(rows, source)


def _check_index_format(meta: dict[bytes, bytes], source: str) -> None:
    raw = meta.get(b"p2pz")
    if raw is None:
        return  # written by another tool: the columns were enough
    try:
        info = json.loads(raw)
        version = int(info.get("format_version", 1))
    except (ValueError, TypeError, AttributeError):
        raise PackFormatError(f"{source}: its 'p2pz' parquet metadata is not valid JSON") from None
    if version > INDEX_FORMAT_VERSION:
        raise PackFormatError(
            f"{source}: pack index format {version} is newer than this p2pz-directions understands "
            f"({INDEX_FORMAT_VERSION}); upgrade with `pip install -U p2pz-directions`"
        )


def check_manifest_against_row(meta: dict[str, Any], row: IndexRow, source: str) -> None:
    """A concept.json (already schema- and hash-checked by `format.read_manifest`) must say what
    its index row says: same name, version, encoder, shape, content hash and tensor hash."""
    enc = meta.get("encoder") or {}
    checks = [
        ("name", meta.get("name"), row.name),
        ("version", meta.get("version"), row.version),
        ("encoder.id", enc.get("id"), row.encoder.id),
        ("encoder.hidden_size", enc.get("hidden_size"), row.encoder.hidden_size),
        ("encoder.max_length", enc.get("max_length", 77), row.encoder.max_length),
        ("dtype", meta.get("dtype"), row.dtype),
        ("content_hash", meta.get("content_hash"), row.content_hash),
        ("tensor_sha256", meta.get("tensor_sha256"), row.sha256),
    ]
    for field, got, want in checks:
        if got != want:
            raise PackFormatError(f"{source}: {field} is {_short(got)} but the index says {_short(want)}")


# -- known packs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnownPack:
    repo_id: str
    description: str
    revision: str
    encoders: tuple[str, ...] = ()
    license: str | None = None
    homepage: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.repo_id}@{self.revision}"


def load_known_packs(text: str | None = None) -> list[KnownPack]:
    """The packs listed in ``registry/known_packs.json`` (validated)."""
    raw = _registry_file("known_packs.json") if text is None else text
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise PackFormatError(f"known_packs.json is not valid JSON: {e}") from None
    validate(data, "known-packs", "known_packs.json")
    return [
        KnownPack(
            repo_id=p["repo_id"],
            description=p["description"],
            revision=p["revision"],
            encoders=tuple(p.get("encoders", ())),
            license=p.get("license"),
            homepage=p.get("homepage"),
        )
        for p in data["packs"]
    ]
