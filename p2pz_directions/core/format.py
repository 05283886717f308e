"""The on-disk form of one concept version (see docs/format.md).

A version is a folder holding two files:

- ``embedding.safetensors``: one tensor named ``embedding``, shape ``[max_length, D]``;
- ``concept.json``: the metadata, with ``tensor_sha256`` (sha256 of the tensor file's bytes),
  ``content_hash`` (sha256 over the canonical JSON of the content fields *and* the tensor hash:
  the content-addressed identity, equal for equal content) and ``manifest_sha256`` (sha256 over
  the canonical JSON of every other field, so any edit of the metadata is caught).

Readers validate the JSON against the schema below and check all three hashes before any tensor
is used; nothing here ever unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pz_directions import __version__
from p2pz_directions.core import naming
from p2pz_directions.core.concept import Concept, EncoderInfo
from p2pz_directions.core.errors import FormatError, IntegrityError

if TYPE_CHECKING:  # torch is imported where tensors are read or written, so listings start without it
    import torch

FORMAT_NAME = "p2pz-concept"
FORMAT_VERSION = 1
TENSOR_FILE = "embedding.safetensors"
META_FILE = "concept.json"
TENSOR_KEY = "embedding"
MAX_CAPTIONS = 100_000
MAX_HIDDEN = 8192
MAX_SEQ = 1024
MAX_META_BYTES = 64 * 1024 * 1024
#: the largest tensor file: [MAX_SEQ, MAX_HIDDEN] float32 plus header
MAX_TENSOR_FILE_BYTES = MAX_SEQ * MAX_HIDDEN * 4 + 4096
#: nesting depth of any JSON file the store or a pack holds
MAX_JSON_DEPTH = 64

#: fields that define a concept's content (its identity); the rest is record-keeping
CONTENT_FIELDS = (
    "format",
    "format_version",
    "name",
    "encoder",
    "dtype",
    "shape",
    "captions",
    "tensor_sha256",
)


class JSONRefused(ValueError):
    """What `strict_json` refuses (the caller turns it into its own error naming the file)."""


def _no_constant(name: str) -> Any:
    raise JSONRefused(f"{name} is not allowed (JSON has no NaN or infinity)")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise JSONRefused(f"number {text[:40]} is out of range")
    return v


def _check_json_value(obj: Any, depth: int = 0) -> None:
    """Depth bound and well-formed strings (no lone surrogates), iteratively."""
    stack = [(obj, 0)]
    while stack:
        v, d = stack.pop()
        if d > MAX_JSON_DEPTH:
            raise JSONRefused(f"nested over {MAX_JSON_DEPTH} levels deep")
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise JSONRefused("a string holds a lone surrogate (not valid Unicode)") from None
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, d + 1))
                stack.append((x, d + 1))
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)


def _json_depth_ok(raw: str) -> bool:
    """Nesting depth of JSON text, counted on brackets outside strings, before parsing."""
    depth = 0
    in_str = esc = False
    for ch in raw:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def strict_json(raw: bytes | str) -> Any:
    """Parse JSON as the store and packs allow it: UTF-8, no NaN/Infinity, finite numbers, at most
    `MAX_JSON_DEPTH` levels, no lone surrogates. Raises `JSONRefused` (a ValueError) otherwise.

    >>> strict_json(b'{"a": [1, 2.5]}')
    {'a': [1, 2.5]}
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise JSONRefused(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    if not _json_depth_ok(text):
        raise JSONRefused(f"nested over {MAX_JSON_DEPTH} levels deep")
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except JSONRefused:
        raise
    except RecursionError:
        raise JSONRefused(f"nested over {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:
        raise JSONRefused(f"not valid JSON ({e}); it may be truncated") from None
    _check_json_value(obj)
    return obj


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_bytes(concept: Concept) -> bytes:
    """The safetensors bytes of a concept's embedding (deterministic for equal tensors)."""
    from safetensors.torch import save

    return save({TENSOR_KEY: concept.embedding.contiguous()}, metadata={"format": "pt"})


def build_manifest(concept: Concept, tensor_sha256: str) -> dict[str, Any]:
    """The ``concept.json`` content for ``concept`` (hashes included)."""
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": concept.name,
        "encoder": concept.encoder.to_dict(),
        "dtype": concept.dtype,
        "shape": list(concept.embedding.shape),
        "captions": list(concept.captions) if concept.captions is not None else None,
        "num_captions": len(concept.captions) if concept.captions is not None else None,
        "provenance": {"package_version": __version__, **(concept.provenance or {})},
        "version": concept.version,
        "created": concept.created,
        "tensor_file": TENSOR_FILE,
        "tensor_sha256": tensor_sha256,
    }
    meta["content_hash"] = content_hash(meta)
    meta["manifest_sha256"] = manifest_hash(meta)
    return meta


def content_hash(meta: dict[str, Any]) -> str:
    return sha256_bytes(canonical_json({k: meta.get(k) for k in CONTENT_FIELDS}))


def manifest_hash(meta: dict[str, Any]) -> str:
    return sha256_bytes(canonical_json({k: v for k, v in meta.items() if k != "manifest_sha256"}))


def concept_content_hash(concept: Concept) -> str:
    """The content-addressed id a concept would get if stored (no file is written)."""
    return build_manifest(concept, sha256_bytes(tensor_bytes(concept)))["content_hash"]


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_concept_dir(concept: Concept, folder: str | os.PathLike) -> dict[str, Any]:
    """Write the two files of ``concept`` into ``folder`` (which should be a fresh temp folder)."""
    folder = Path(folder)
    data, meta, meta_bytes = prepare_concept(concept, folder)
    folder.mkdir(parents=True, exist_ok=True)
    _fsync_write(folder / TENSOR_FILE, data)
    _fsync_write(folder / META_FILE, meta_bytes)
    return meta


def prepare_concept(
    concept: Concept, where: str | os.PathLike = "<new concept>"
) -> tuple[bytes, dict, bytes]:
    """The two files of ``concept`` (tensor bytes, manifest, manifest bytes), checked by exactly the
    reader's validation (`check_manifest`, `load_tensor_bytes`) before anything is written: what the
    writer stores, the reader reads."""
    data = tensor_bytes(concept)
    meta = build_manifest(concept, sha256_bytes(data))
    where = Path(where)
    try:
        meta_bytes = json.dumps(meta, ensure_ascii=False, indent=1, allow_nan=False).encode("utf-8")
        check_manifest(strict_json(meta_bytes), where / META_FILE)
    except (JSONRefused, UnicodeEncodeError) as e:
        raise FormatError(f"{where / META_FILE}: {e}; nothing was written") from None
    except FormatError as e:
        raise FormatError(f"{e}; nothing was written") from None
    if len(meta_bytes) > MAX_META_BYTES:
        raise FormatError(
            f"{where / META_FILE}: {len(meta_bytes)} bytes, over the {MAX_META_BYTES}-byte bound"
        )
    tensor = load_tensor_bytes(data, where / TENSOR_FILE)
    if list(tensor.shape) != meta["shape"]:
        raise FormatError(
            f"{where / TENSOR_FILE}: tensor is {list(tensor.shape)}, metadata says {meta['shape']}"
        )
    return data, meta, meta_bytes


def require(cond: Any, path: Path, what: str) -> None:
    """Raise `FormatError` ``"<path>: <what>"`` unless ``cond``: the schema checks' one way to refuse."""
    if not cond:
        raise FormatError(f"{path}: {what}")


def check_header(meta: Any, path: Path, name: str, version: int, what: str = "format version") -> int:
    """The header of every p2pz JSON file (``concept.json``, eval records): a JSON object whose
    ``format`` is ``name`` and whose integer ``format_version`` is at most ``version``; returns it."""
    require(isinstance(meta, dict), path, "not a JSON object")
    require(meta.get("format") == name, path, f"'format' is {meta.get('format')!r}, expected {name!r}")
    fv = meta.get("format_version")
    require(isinstance(fv, int), path, "'format_version' missing")
    if fv > version:
        raise FormatError(
            f"{path}: {what} {fv} is newer than this p2pz-directions understands ({version}); "
            "upgrade with `pip install -U p2pz-directions`"
        )
    return fv


def validate_manifest(meta: Any, path: Path) -> dict[str, Any]:
    """Check the schema of a parsed ``concept.json``; raise FormatError naming the file and field."""
    check_header(meta, path, FORMAT_NAME, FORMAT_VERSION)
    require(isinstance(meta.get("name"), str) and meta["name"], path, "'name' must be a non-empty string")
    try:
        norm = naming.normalize_concept(meta["name"])
    except ValueError as e:
        raise FormatError(f"{path}: bad concept name: {e}") from None
    require(norm == meta["name"], path, f"'name' {meta['name']!r} is not in normal form ({norm!r})")
    enc = meta.get("encoder")
    require(
        isinstance(enc, dict) and isinstance(enc.get("id"), str),
        path,
        "'encoder' must be an object with an 'id'",
    )
    require(
        isinstance(enc.get("hidden_size"), int) and 0 < enc["hidden_size"] <= MAX_HIDDEN,
        path,
        f"'encoder.hidden_size' must be an integer in 1..{MAX_HIDDEN}",
    )
    require(
        isinstance(enc.get("max_length", 77), int) and 0 < enc.get("max_length", 77) <= MAX_SEQ,
        path,
        f"'encoder.max_length' must be in 1..{MAX_SEQ}",
    )
    require(
        meta.get("dtype") in ("float16", "float32", "bfloat16"),
        path,
        f"unsupported dtype {meta.get('dtype')!r}",
    )
    shape = meta.get("shape")
    require(
        shape == [enc.get("max_length", 77), enc["hidden_size"]],
        path,
        f"'shape' {shape} does not match the encoder ([{enc.get('max_length', 77)}, {enc['hidden_size']}])",
    )
    caps = meta.get("captions")
    require(
        caps is None
        or (isinstance(caps, list) and len(caps) <= MAX_CAPTIONS and all(isinstance(c, str) for c in caps)),
        path,
        f"'captions' must be null or a list of at most {MAX_CAPTIONS} strings",
    )
    require(isinstance(meta.get("provenance", {}), dict), path, "'provenance' must be an object")
    ver = meta.get("version")
    require(ver is None or (isinstance(ver, int) and ver >= 1), path, "'version' must be a positive integer")
    for key in ("tensor_sha256", "content_hash", "manifest_sha256"):
        v = meta.get(key)
        require(
            isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
            path,
            f"'{key}' must be a sha256 hex digest",
        )
    require(
        meta.get("tensor_file", TENSOR_FILE) == TENSOR_FILE, path, f"'tensor_file' must be {TENSOR_FILE!r}"
    )
    nc = meta.get("num_captions")
    require(
        nc is None or (isinstance(nc, int) and not isinstance(nc, bool) and nc == len(caps or [])),
        path,
        "'num_captions' must match 'captions'",
    )
    return meta


def check_manifest(meta: Any, path: Path) -> dict[str, Any]:
    """The one check of a ``concept.json``, for the reader and the writer alike: schema, then its
    own two hashes. Raises `FormatError` naming the file."""
    validate_manifest(meta, path)
    if manifest_hash(meta) != meta["manifest_sha256"]:
        raise FormatError(f"{path}: its metadata does not match its manifest_sha256")
    if content_hash(meta) != meta["content_hash"]:
        raise FormatError(f"{path}: its content fields do not match its content_hash")
    return meta


def _corrupt(path: Path, what: str, hint: str) -> IntegrityError:
    return IntegrityError(f"{path} is corrupted: {what}. {hint}")


def read_manifest(folder: str | os.PathLike, hint: str = "") -> dict[str, Any]:
    """Read and validate ``concept.json`` (schema and its own hashes), without touching the tensor."""
    folder = Path(folder)
    path = folder / META_FILE
    hint = hint or "Run `p2pz verify` to list damaged files, then re-import or re-pull that pack."
    raw = read_file_bounded(path, MAX_META_BYTES, hint)
    try:
        meta = strict_json(raw)
    except JSONRefused as e:
        raise _corrupt(path, str(e), hint) from None
    try:
        check_manifest(meta, path)
    except FormatError as e:
        raise _corrupt(path, str(e).removeprefix(f"{path}: "), hint) from None
    return meta


def read_file_bounded(path: Path, limit: int, hint: str) -> bytes:
    """A stored file's bytes; a missing file, a folder in its place, an unreadable or oversized one
    raise `IntegrityError` naming it."""
    try:
        if not path.is_file():
            what = "a folder stands where the file should be" if path.is_dir() else "the file is missing"
            if path.is_dir() or not path.exists():
                raise _corrupt(path, what, hint)
        size = path.stat().st_size
        if size > limit:
            raise _corrupt(path, f"{size} bytes, over the {limit}-byte bound", hint)
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except IntegrityError:
        raise
    except OSError as e:
        raise _corrupt(path, f"it cannot be read ({e.__class__.__name__}: {e.strerror or e})", hint) from None
    if len(data) > limit:
        raise _corrupt(path, f"over the {limit}-byte bound", hint)
    return data


def read_concept_dir(folder: str | os.PathLike, *, pack: str | None = None, hint: str = "") -> Concept:
    """Read one concept version, checking every hash; raise IntegrityError naming the bad file."""
    folder = Path(folder)
    hint = hint or "Run `p2pz verify` to list damaged files, then re-import or re-pull that pack."
    meta = read_manifest(folder, hint)
    tpath = folder / TENSOR_FILE
    data = read_file_bounded(tpath, MAX_TENSOR_FILE_BYTES, hint)
    if sha256_bytes(data) != meta["tensor_sha256"]:
        raise _corrupt(
            tpath,
            f"sha256 {sha256_bytes(data)[:12]}... does not match the recorded "
            f"{meta['tensor_sha256'][:12]}... (truncated or modified)",
            hint,
        )
    try:
        tensor = load_tensor_bytes(data, tpath)
    except FormatError as e:
        raise _corrupt(tpath, str(e).removeprefix(f"{tpath}: "), hint) from None
    shape = list(tensor.shape)
    if shape != meta["shape"] or str(tensor.dtype).removeprefix("torch.") != meta["dtype"]:
        raise _corrupt(
            tpath, f"tensor is {shape} {tensor.dtype}, metadata says {meta['shape']} {meta['dtype']}", hint
        )
    return Concept(
        name=meta["name"],
        embedding=tensor,
        encoder=EncoderInfo.from_dict(meta["encoder"]),
        captions=meta.get("captions"),
        provenance=dict(meta.get("provenance") or {}),
        version=meta.get("version"),
        created=meta.get("created"),
        pack=pack,
        content_hash=meta["content_hash"],
    )


def load_tensor_bytes(data: bytes, path: Path) -> torch.Tensor:
    """Parse safetensors bytes holding exactly one tensor named ``embedding``."""
    from safetensors.torch import load

    if len(data) < 8:
        raise FormatError(f"{path}: {len(data)} bytes is too short to be a safetensors file")
    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
        raise FormatError(f"{path}: not a valid safetensors file ({e})") from None
    if set(tensors) != {TENSOR_KEY}:
        raise FormatError(
            f"{path}: expected exactly one tensor named {TENSOR_KEY!r}, found {sorted(tensors)}"
        )
    return tensors[TENSOR_KEY]


def peek_tensor_header(path: str | os.PathLike) -> dict[str, Any]:
    """Shape and dtype of the tensor in a safetensors file, reading only its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        sl = f.get_slice(TENSOR_KEY)
        return {"shape": list(sl.get_shape()), "dtype": str(sl.get_dtype())}
