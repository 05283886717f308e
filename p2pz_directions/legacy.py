"""Import the pix2pix-zero authors' ``.pt`` concept embeddings (and any like them).

Each file holds one tensor ``[1, 77, D]`` or ``[77, D]`` (float16 or float32), the mean text
embedding of a concept's captions. Files are read only with ``torch.load(weights_only=True)``:
a pickle that tries to build anything but plain tensors is refused, and nothing is written unless
every file is valid. URLs are downloaded to a temp file with a progress bar and a size bound.

>>> from p2pz_directions.legacy import import_pt
>>> import_pt(["embeddings_sd_1.4/"], pack="pix2pix-zero",
...           encoder="openai/clip-vit-large-patch14")          # doctest: +SKIP
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from . import naming
from .concept import Concept, EncoderInfo
from .errors import FormatError, P2PZError, UnsafeFileError
from .format import sha256_file
from .models import encoder_for
from .store import LocalStore, default_store

MAX_DOWNLOAD_BYTES = int(os.environ.get("P2PZ_MAX_DOWNLOAD_BYTES", str(64 * 1024 * 1024)))
#: seconds one download may take in all, however slowly the server sends (`P2PZ_DOWNLOAD_DEADLINE`)
DOWNLOAD_DEADLINE_S = float(os.environ.get("P2PZ_DOWNLOAD_DEADLINE", "300"))

#: where the diffusers pix2pix-zero docs point for the authors' SD 1.4 concepts
AUTHORS_SD14_URLS = {
    name: f"https://github.com/pix2pixzero/pix2pix-zero/raw/main/assets/embeddings_sd_1.4/{name}.pt"
    for name in ("cat", "dog", "horse", "zebra")
}


class DownloadError(P2PZError, OSError):
    """A legacy file could not be downloaded."""


@dataclass
class Source:
    """One legacy file: where it came from and where its bytes are now."""

    origin: str
    path: Path
    name: str


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "P2PZ_OFFLINE")
    )


def is_url(s: str) -> bool:
    return urlparse(str(s)).scheme in ("http", "https")


def download(
    url: str,
    dest: Path,
    max_bytes: int | None = None,
    progress: bool = True,
    deadline_s: float | None = None,
) -> Path:
    """Stream ``url`` into ``dest`` (a temp file), refusing more than ``max_bytes`` and cutting it
    off after ``deadline_s`` seconds in all (default `DOWNLOAD_DEADLINE_S`)."""
    max_bytes = MAX_DOWNLOAD_BYTES if max_bytes is None else max_bytes
    limit = DOWNLOAD_DEADLINE_S if deadline_s is None else deadline_s
    end = time.monotonic() + limit
    if _offline():
        raise DownloadError(
            f"cannot download {url}: offline mode (HF_HUB_OFFLINE/P2PZ_OFFLINE) is on. Import from a local copy "
            f"instead, e.g. `p2pz import-pt path/to/embeddings_sd_1.4/`"
        )
    import httpx2
    from tqdm.auto import tqdm

    def over() -> DownloadError:
        return DownloadError(
            f"{url}: gave up after {limit:g} s (P2PZ_DOWNLOAD_DEADLINE); the server is too slow or stalling. "
            "Try again later, or download the file yourself and import it from disk"
        )

    def left() -> float:
        rest = end - time.monotonic()
        if rest <= 0:
            raise over()
        return rest

    try:
        # every read waits at most the time left, and the deadline is checked at each chunk received
        timeout = httpx2.Timeout(min(30.0, left()), connect=min(10.0, left()))
        with httpx2.stream("GET", url, timeout=timeout, follow_redirects=True) as r:
            if r.status_code != 200:
                raise DownloadError(f"downloading {url} failed: HTTP {r.status_code}. Check the URL.")
            size = int(r.headers.get("content-length") or 0)
            if size > max_bytes:
                raise DownloadError(
                    f"{url} is {size} bytes, over the {max_bytes}-byte bound (P2PZ_MAX_DOWNLOAD_BYTES)"
                )
            got = 0
            with (
                open(dest, "wb") as f,
                tqdm(
                    total=size or None,
                    unit="B",
                    unit_scale=True,
                    desc=Path(urlparse(url).path).name,
                    disable=not progress,
                ) as bar,
            ):
                for chunk in r.iter_raw():
                    left()
                    got += len(chunk)
                    if got > max_bytes:
                        raise DownloadError(
                            f"{url} sent over {max_bytes} bytes; refused (P2PZ_MAX_DOWNLOAD_BYTES)"
                        )
                    f.write(chunk)
                    bar.update(len(chunk))
            if size and got != size:
                raise DownloadError(f"{url}: got {got} of {size} bytes; the download was cut. Try again.")
    except httpx2.TimeoutException:
        if time.monotonic() >= end - 0.05:
            raise over() from None
        raise DownloadError(f"downloading {url} failed: the server stopped answering. Try again.") from None
    except httpx2.HTTPError as e:
        raise DownloadError(
            f"downloading {url} failed: {e.__class__.__name__}: {e}. Check your connection."
        ) from None
    return dest


#: the pre-1.6 torch.save format starts with this pickled magic number (protocol 2, LONG1)
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
#: bounds checked from a .pt file's metadata before any tensor is materialised
MAX_PT_BYTES = 64 * 1024 * 1024
MAX_PT_ENTRIES = 64
MAX_PT_PICKLE_BYTES = 1024 * 1024


def _check_pt_archive(path: Path) -> None:
    """Bounds on a .pt file before torch reads it: size, zip members (count, uncompressed sizes, no
    compression), no sparse tensors in its pickle, not the pre-1.6 format (whose loader allocates
    what the file declares). Raises `FormatError` with one line."""
    size = path.stat().st_size
    if size > MAX_PT_BYTES:
        raise FormatError(f"{path}: {size} bytes, over the {MAX_PT_BYTES}-byte bound for a concept file")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head == _LEGACY_MAGIC:
        raise FormatError(
            f"{path} uses the pre-1.6 torch.save format, which is not read (its loader allocates whatever the file "
            "declares); load and torch.save it again with torch >= 1.6 where you trust it, or export safetensors"
        )
    if not zipfile.is_zipfile(path):
        return  # a bare pickle or junk: torch.load(weights_only=True) refuses it without allocating
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if len(infos) > MAX_PT_ENTRIES:
                raise FormatError(f"{path}: {len(infos)} archive members, over the bound of {MAX_PT_ENTRIES}")
            total = 0
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise FormatError(
                        f"{path}: archive member {info.filename!r} is compressed; torch never writes that"
                    )
                total += info.file_size
                if info.file_size > MAX_PT_BYTES or total > MAX_PT_BYTES:
                    raise FormatError(f"{path}: its members hold over {MAX_PT_BYTES} bytes")
            pkl = [i for i in infos if i.filename.endswith("data.pkl")]
            if len(pkl) != 1 or pkl[0].file_size > MAX_PT_PICKLE_BYTES:
                raise FormatError(
                    f"{path}: not a torch.save archive (no data.pkl, or one over {MAX_PT_PICKLE_BYTES} bytes)"
                )
            data = z.read(pkl[0])
    except (zipfile.BadZipFile, OSError) as e:
        raise FormatError(f"{path}: a damaged archive ({e})") from None
    low = data.lower()
    if b"sparse" in low or b"_rebuild_nested" in low:
        raise FormatError(
            f"{path} holds a sparse (COO/CSR/...) or nested tensor; a concept is a dense [1, 77, D] or [77, D] tensor. "
            "Save it with tensor.to_dense() where you trust it"
        )


def load_pt(path: str | os.PathLike) -> torch.Tensor:
    """Read a legacy tensor file safely (``weights_only=True``); return ``[77, D]``.

    Shape, element count, layout and storage size are checked from the file's metadata (the
    tensor is memory-mapped, not materialised) before any copy is made: a stride-0 view that
    claims terabytes, a huge shape or a sparse tensor is refused with a `FormatError`.
    """
    from .format import MAX_HIDDEN, MAX_SEQ

    path = Path(path)
    _check_pt_archive(path)
    try:
        obj = torch.load(str(path), weights_only=True, map_location="cpu", mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(str(e))
        if "GLOBAL" in reason:
            why = f"it is a pickle that asks to run or build arbitrary objects ({reason})"
        else:
            why = (
                f"torch.load(weights_only=True) cannot read it as plain tensors ({reason}); it may be damaged"
            )
        raise UnsafeFileError(
            f"{path} was refused: {why}. Nothing was imported. Only load embeddings from people you trust, "
            f"and prefer safetensors files."
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise FormatError(
            f"{path} is not a readable torch file ({e.__class__.__name__}: {str(e)[:200].splitlines()[0] if str(e) else ''})"
        ) from None
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor):
        raise FormatError(f"{path} holds a {type(obj).__name__}, not a tensor of shape [1, 77, D] or [77, D]")
    if obj.layout != torch.strided or obj.is_nested:
        raise FormatError(
            f"{path} holds a {obj.layout} tensor; a concept is a dense [1, 77, D] or [77, D] tensor"
        )
    if obj.dim() == 3 and obj.shape[0] == 1:
        obj = obj[0]
    if obj.dim() != 2:
        raise FormatError(f"{path}: tensor shape {list(obj.shape)}; expected [1, 77, D] or [77, D]")
    if not (1 <= obj.shape[0] <= MAX_SEQ and 1 <= obj.shape[1] <= MAX_HIDDEN):
        raise FormatError(
            f"{path}: tensor shape {list(obj.shape)}; a concept is [L, D] with L in 1..{MAX_SEQ} and D in 1..{MAX_HIDDEN}"
        )
    if obj.dtype not in (torch.float16, torch.float32, torch.bfloat16):
        raise FormatError(f"{path}: dtype {obj.dtype}; expected float16 or float32")
    storage = obj.untyped_storage().nbytes()
    if storage > MAX_PT_BYTES:
        raise FormatError(
            f"{path}: its tensor storage is {storage} bytes, over the {MAX_PT_BYTES}-byte bound"
        )
    out = torch.empty(tuple(obj.shape), dtype=obj.dtype)
    out.copy_(obj)  # bounded now: at most MAX_SEQ * MAX_HIDDEN elements; drops the memory map
    return out


def _unpickler_reason(text: str) -> str:
    """The one informative line of torch's weights-only refusal."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("Trying to load unsupported GLOBAL", "Unsupported operand", "Unsupported global")):
            return ln[:200]
    return (lines[-1] if lines else "unreadable")[:200]


def collect_sources(items: Sequence[str | os.PathLike], workdir: Path, progress: bool = True) -> list[Source]:
    """Expand folders (their ``*.pt``), files and URLs into local files, downloading URLs."""
    out: list[Source] = []
    for item in items:
        s = str(item)
        if is_url(s):
            stem = Path(urlparse(s).path).stem
            dest = workdir / f"{len(out)}-{Path(urlparse(s).path).name or 'download'}"
            out.append(Source(s, download(s, dest, progress=progress), stem))
            continue
        p = Path(s).expanduser()
        if p.is_dir():
            files = sorted(p.glob("*.pt")) + sorted(p.glob("*.pth"))
            if not files:
                raise FormatError(f"{p} holds no .pt files")
            out.extend(Source(str(f.resolve()), f, f.stem) for f in files)
        elif p.is_file():
            out.append(Source(str(p.resolve()), p, p.stem))
        else:
            raise FormatError(f"{s} is neither a file, a folder nor an http(s) URL")
    return out


def _resolve_encoder(encoder: str | EncoderInfo | None, model: str | None, hidden: int) -> EncoderInfo:
    if isinstance(encoder, EncoderInfo):
        info = encoder
    elif encoder is None and model is None:
        raise ValueError(
            "say which text encoder made these embeddings: encoder='openai/clip-vit-large-patch14' (SD 1.x) "
            "or model='CompVis/stable-diffusion-v1-4'"
        )
    else:
        info = encoder_for(model=model, encoder=encoder)
    if info.hidden_size == 0:  # an encoder id we do not know: take D from the files
        info = EncoderInfo(info.id, hidden, "unknown")
    return info


def import_pt(
    items: Sequence[str | os.PathLike],
    *,
    pack: str = "local",
    encoder: str | EncoderInfo | None = None,
    model: str | None = None,
    names: Sequence[str] | None = None,
    store: LocalStore | None = None,
    progress: bool = True,
    on_source: Callable[[Source], None] | None = None,
) -> list[Concept]:
    """Import legacy ``.pt`` concept embeddings as concepts of ``pack``; all or nothing.

    ``names`` overrides the concept names (default: each file's stem).
    """
    store = store or default_store()
    naming.parse_pack(pack)
    with tempfile.TemporaryDirectory(prefix="p2pz-import-") as tmp:
        sources = collect_sources(items, Path(tmp), progress=progress)
        if names is not None and len(names) != len(sources):
            raise ValueError(f"{len(names)} names given for {len(sources)} files")
        tensors = []
        for src in sources:
            tensors.append(load_pt(src.path))
            if on_source:
                on_source(src)
        hidden = {t.shape[1] for t in tensors}
        if len(hidden) != 1:
            raise FormatError(
                f"the files have different hidden sizes {sorted(hidden)}; import them separately"
            )
        info = _resolve_encoder(encoder, model, hidden.pop())
        concepts = []
        for i, (src, t) in enumerate(zip(sources, tensors, strict=True)):
            name = naming.normalize_concept(names[i] if names else src.name)
            if t.shape[0] != info.max_length or t.shape[1] != info.hidden_size:
                raise FormatError(
                    f"{src.origin}: tensor is {list(t.shape)}, but encoder {info.id} makes "
                    f"[{info.max_length}, {info.hidden_size}]. Check --encoder."
                )
            concepts.append(
                Concept(
                    name=name,
                    embedding=t,
                    encoder=info,
                    captions=None,
                    provenance={
                        "method": "legacy-import",
                        "source": src.origin,
                        "source_sha256": sha256_file(src.path),
                        "source_format": "torch.save (read with weights_only=True)",
                    },
                )
            )
        return store.publish_many(concepts, pack=pack)
