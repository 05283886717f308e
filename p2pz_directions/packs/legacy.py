"""Import the pix2pix-zero authors' ``.pt`` concept embeddings (and any like them).

Each file holds one tensor ``[1, 77, D]`` or ``[77, D]`` (float16 or float32), the mean text
embedding of a concept's captions. Files are read only with ``torch.load(weights_only=True)``:
a pickle that tries to build anything but plain tensors is refused, and nothing is written unless
every file is valid. URLs are downloaded to a temp file with huggingface_hub's downloader, a size
bound (``P2PZ_MAX_DOWNLOAD_BYTES``) and an overall deadline (``P2PZ_DOWNLOAD_DEADLINE``).

>>> from p2pz_directions.packs.legacy import import_pt
>>> import_pt(["embeddings_sd_1.4/"], pack="pix2pix-zero",
...           encoder="openai/clip-vit-large-patch14")          # doctest: +SKIP
"""

from __future__ import annotations

import os
import pickle
import tempfile
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from p2pz_directions.core import constants, naming
from p2pz_directions.core.concept import Concept, EncoderInfo
from p2pz_directions.core.errors import FormatError, P2PZError, UnsafeFileError
from p2pz_directions.core.format import sha256_file
from p2pz_directions.core.store import LocalStore, default_store
from p2pz_directions.editing.models import encoder_for

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


def is_url(s: str) -> bool:
    return urlparse(str(s)).scheme in ("http", "https")


class _BoundedFile:
    """The file `huggingface_hub.file_download.http_get` streams into: refuses bytes past ``max_bytes``
    and every write once `cancel` was called (the deadline passed), so the download stops there."""

    def __init__(self, path: Path, max_bytes: int, url: str):
        self._f = open(path, "wb")  # noqa: SIM115 - closed by `close`, from either thread
        self._lock = threading.Lock()
        self._max, self._url = max_bytes, url
        self.cancelled = False

    def write(self, chunk: bytes) -> int:
        with self._lock:
            if self.cancelled:
                raise DownloadError(f"{self._url}: cancelled (deadline)")
            if self._f.tell() + len(chunk) > self._max:
                raise _too_big(self._url, self._max)
            return self._f.write(chunk)

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def truncate(self, size: int | None = None) -> int:
        return self._f.truncate(size)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            self._f.close()

    def close(self) -> None:
        with self._lock:
            self._f.close()


def _too_big(url: str, max_bytes: int, size: int | None = None) -> DownloadError:
    said = f"is {size} bytes" if size else "sent more"
    return DownloadError(f"{url} {said}, over the {max_bytes}-byte bound (P2PZ_MAX_DOWNLOAD_BYTES)")


def download(
    url: str,
    dest: Path,
    max_bytes: int | None = None,
    progress: bool = True,
    deadline_s: float | None = None,
) -> Path:
    """Download ``url`` into ``dest`` (a temp file) with huggingface_hub's `http_get` (its HTTP client,
    retries and progress bar; it sends no Hub token), refusing more than ``max_bytes`` (default
    ``P2PZ_MAX_DOWNLOAD_BYTES``) and cutting it off after ``deadline_s`` seconds in all (default
    ``P2PZ_DOWNLOAD_DEADLINE``), however the time goes: slow bytes, a silent server, retries.

    huggingface_hub's own limits are per request (a read timeout, then up to five resumed attempts),
    so the whole transfer runs in a worker thread that the caller stops waiting for at the deadline;
    the file it writes into then refuses every byte, which ends the transfer at its next chunk.
    """
    max_bytes = constants.max_download_bytes() if max_bytes is None else max_bytes
    limit = constants.download_deadline_s() if deadline_s is None else deadline_s
    if constants.hf_offline():
        raise DownloadError(
            f"cannot download {url}: offline mode (HF_HUB_OFFLINE) is on. Import from a local copy "
            f"instead, e.g. `p2pz import-pt path/to/embeddings_sd_1.4/`"
        )
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import tqdm as hf_tqdm

    name = Path(urlparse(url).path).name or "download"

    def bar(total: int | None = None, **kw: Any) -> Any:
        # the declared size (Content-Length) is known when the bar is made, before any byte is kept
        if total is not None and total > max_bytes:
            raise _too_big(url, max_bytes, total)
        return hf_tqdm(total=total, disable=not progress or None, **kw)

    sink = _BoundedFile(dest, max_bytes, url)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            http_get(url, sink, displayed_filename=name, tqdm_class=bar)  # type: ignore[arg-type]
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            failure.append(e)

    worker = threading.Thread(target=run, name=f"p2pz-download-{name}", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        sink.cancel()  # the worker stops at its next chunk; its file is closed already
        raise DownloadError(
            f"{url}: gave up after {limit:g} s (P2PZ_DOWNLOAD_DEADLINE); the server is too slow or stalling. "
            "Try again later, or download the file yourself and import it from disk"
        )
    sink.close()
    if failure:
        raise _download_error(url, failure[0]) from None
    return dest


def _download_error(url: str, e: BaseException) -> BaseException:
    import httpx2

    if isinstance(e, DownloadError):
        return e
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)  # huggingface_hub's HfHubHTTPError or httpx2's own
    if isinstance(e, httpx2.HTTPError) and isinstance(status, int):
        return DownloadError(f"downloading {url} failed: HTTP {status}. Check the URL.")
    if isinstance(e, httpx2.TimeoutException):
        return DownloadError(f"downloading {url} failed: the server stopped answering. Try again.")
    if isinstance(e, (httpx2.HTTPError, OSError)):
        text = " ".join(str(e).split())[:200]
        return DownloadError(
            f"downloading {url} failed: {e.__class__.__name__}: {text}. Check your connection."
        )
    return e


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
    from p2pz_directions.core.format import MAX_HIDDEN, MAX_SEQ

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
