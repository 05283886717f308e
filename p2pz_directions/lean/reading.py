"""Our own safetensors reader for the lean loaders.

``safetensors.torch.load_file(path, device="cuda")`` makes one synchronous pageable host-to-device
copy per tensor (about 700 for an SD UNet); `read_safetensors` reads the file in large chunks, with
parallel preads (one thread's read from the page cache is the slowest step), through two pinned
buffers, so reads and copies overlap and each chunk lands in one GPU buffer that the tensors view.
The header is checked strictly (`LeanUnsupported` for anything malformed); nothing is unpickled or
memory-mapped: the file is only read (``readinto`` / ``preadv``)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import stat
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from p2pz_directions.lean import LeanUnsupported

__all__ = ["DTYPES", "MAX_HEADER_BYTES", "read_safetensors"]

#: the header length safetensors itself accepts at most
MAX_HEADER_BYTES = 100_000_000
_SLOT_BYTES = 32 << 20  # each of the two pinned staging buffers
_PIECE_BYTES = 4 << 20  # the least one reader thread takes of a buffer to fill
_MAX_THREADS = 8  # one thread's read from the page cache is the bottleneck (~5 GB/s): preads in parallel

#: safetensors dtype string -> torch dtype (the float8 and unsigned ones where torch has them)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in [
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
]:
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets in the data region
    end: int


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _read_exact(f, buf, path: Path) -> None:
    """Fill the writable buffer ``buf`` from ``f``; a short file is `LeanUnsupported`."""
    view = memoryview(buf).cast("B")
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise LeanUnsupported(f"safetensors file {path}: truncated ({len(view) - got} bytes missing)")
        got += n


class _Filler:
    """Fills buffers from byte ranges of the open file ``f``: split into pieces read by parallel
    ``os.preadv`` calls where the OS has it (one ``seek`` + ``readinto`` otherwise)."""

    def __init__(self, f, path: Path):
        self.f, self.fd, self.path = f, f.fileno(), path
        cpus = os.process_cpu_count() if hasattr(os, "process_cpu_count") else os.cpu_count()
        self.threads = max(1, min(_MAX_THREADS, cpus or 1)) if hasattr(os, "preadv") else 1
        self.pool = concurrent.futures.ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def fill(self, buf, offset: int) -> None:
        """``buf`` (writable, contiguous) from the file's bytes at ``offset``."""
        view = memoryview(buf).cast("B")
        parts = min(self.threads, len(view) // _PIECE_BYTES)
        if self.pool is None or parts < 2:
            if self.pool is None:
                self.f.seek(offset)
                _read_exact(self.f, view, self.path)
            else:
                self._pread(view, offset)
            return
        step = -(-len(view) // parts)
        jobs = [
            self.pool.submit(self._pread, view[a : a + step], offset + a) for a in range(0, len(view), step)
        ]
        concurrent.futures.wait(jobs)  # all done before any error is raised: no thread writes on after
        for j in jobs:
            j.result()

    def _pread(self, view: memoryview, offset: int) -> None:
        while len(view):
            n = os.preadv(self.fd, [view], offset)
            if not n:
                raise LeanUnsupported(f"safetensors file {self.path}: truncated ({len(view)} bytes missing)")
            view, offset = view[n:], offset + n


def _parse_header(path: Path, f, size: int) -> tuple[list[_Entry], int]:
    """The tensors of the header, sorted by offset, and where the data region starts."""

    def bad(problem: str) -> LeanUnsupported:
        return LeanUnsupported(f"safetensors file {path}: {problem}")

    if size < 8:
        raise bad(f"only {size} bytes, shorter than the 8-byte header length")
    head = bytearray(8)
    _read_exact(f, head, path)
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise bad(f"header length {n} is above the {MAX_HEADER_BYTES} bytes safetensors allows")
    if n > size - 8:
        raise bad(f"header length {n} is larger than the file ({size} bytes)")
    raw = bytearray(n)
    _read_exact(f, raw, path)
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, not an object")
    data_len = size - 8 - n
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must be an object of strings")
    entries: list[_Entry] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} must be an object of exactly dtype, shape and data_offsets")
        dt = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dt is None:
            raise bad(f"tensor {name!r} has dtype {info['dtype']!r}, not one of {', '.join(DTYPES)}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}, not [start, end] integers")
        start, end = offsets
        if not 0 <= start <= end <= data_len:
            raise bad(
                f"tensor {name!r} has data_offsets {offsets!r}, outside 0 <= start <= end <= {data_len} "
                "(the data region's length)"
            )
        # the product, stopped early once it is past the data region (no huge-int arithmetic)
        count = 0 if 0 in shape else 1
        for d in shape:
            count *= d
            if count > data_len:
                break
        want = count * dt.itemsize
        if want != end - start:
            raise bad(
                f"tensor {name!r} of {info['dtype']} {shape} needs {want} bytes, its offsets span {end - start}"
            )
        entries.append(_Entry(name, dt, tuple(shape), start, end))
    entries.sort(key=lambda e: (e.start, e.end))
    pos = 0
    for e in entries:
        if e.start != pos:
            what = (
                "overlaps the tensor before it"
                if e.start < pos
                else f"leaves a gap of {e.start - pos} bytes before it"
            )
            raise bad(f"tensor {e.name!r} at data_offsets [{e.start}, {e.end}] {what}")
        pos = e.end
    if pos != data_len:
        raise bad(f"the tensors end at byte {pos} of the {data_len}-byte data region")
    return entries, 8 + n


def _chunks(entries: list[_Entry], chunk_bytes: int) -> list[list[_Entry]]:
    """Consecutive runs of about ``chunk_bytes``; a bigger tensor is a run of its own."""
    out: list[list[_Entry]] = []
    cur: list[_Entry] = []
    for e in entries:
        if cur and e.end - cur[0].start > chunk_bytes:
            out.append(cur)
            cur = []
        cur.append(e)
    if cur:
        out.append(cur)
    return out


def _tensor(buf: torch.Tensor, a: int, e: _Entry, dtype: torch.dtype | None) -> torch.Tensor:
    """Tensor ``e`` from the bytes ``buf[a:a + size]``: a view where it can be, else a copy."""
    if e.start == e.end:
        t = torch.empty(e.shape, dtype=e.dtype, device=buf.device)
    else:
        raw = buf[a : a + e.end - e.start]
        if a % e.dtype.itemsize:
            raw = raw.clone()  # fresh storage, aligned for any dtype
        t = raw.view(e.dtype).view(e.shape)
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t


def read_safetensors(
    path: str | os.PathLike,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    *,
    keys: Callable[[str], bool] | Collection[str] | None = None,
    chunk_bytes: int = 64 << 20,
) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file ``path`` on ``device``, floating ones cast to ``dtype``
    (``None``: as stored), in file order. ``keys`` (a predicate, called once per tensor in file
    order, or a set of names) chooses which to return. Tensors kept in their stored dtype are views
    of a shared chunk buffer. Any problem with the file is `LeanUnsupported`."""
    path = Path(path)
    device = torch.device(device)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype or None, got {dtype}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if sys.byteorder != "little":
        raise LeanUnsupported(f"safetensors file {path}: reading needs a little-endian machine")
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    keep = keys if keys is None or callable(keys) else keys.__contains__
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise LeanUnsupported(f"cannot read safetensors file {path}: {e}") from e
    out: dict[str, torch.Tensor] = {}
    with f:
        try:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise LeanUnsupported(f"safetensors file {path} is not a regular file")
            entries, data_start = _parse_header(path, f, st.st_size)
            wanted = {e.name for e in entries if keep is None or keep(e.name)}
            chunks = [c for c in _chunks(entries, chunk_bytes) if wanted.intersection(e.name for e in c)]
            filler = _Filler(f, path)
            try:
                if cuda:
                    with torch.cuda.device(device):
                        _read_cuda(filler, chunks, data_start, wanted, dtype, device, out)
                else:
                    for chunk in chunks:
                        c0 = chunk[0].start
                        buf = torch.empty(chunk[-1].end - c0, dtype=torch.uint8, device=device)
                        filler.fill(buf.numpy(), data_start + c0)
                        for e in chunk:
                            if e.name in wanted:
                                out[e.name] = _tensor(buf, e.start - c0, e, dtype)
            finally:
                filler.close()
        except OSError as e:
            raise LeanUnsupported(f"cannot read safetensors file {path}: {e}") from e
    return out


def _read_cuda(filler: _Filler, chunks, data_start, wanted, dtype, device, out) -> None:
    """Each chunk into one GPU buffer through two pinned slots: fill slot k while slot k-1's
    asynchronous copy runs; a slot is reused only once its copy's event has completed."""
    if not chunks:
        return
    biggest = max(c[-1].end - c[0].start for c in chunks)
    slot_size = max(1, min(_SLOT_BYTES, biggest))
    slots = [torch.empty(slot_size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    hosts = [s.numpy() for s in slots]
    events = [torch.cuda.Event(), torch.cuda.Event()]
    used = [False, False]
    k = 0
    for chunk in chunks:
        c0, size = chunk[0].start, chunk[-1].end - chunk[0].start
        buf = torch.empty(size, dtype=torch.uint8, device=device)
        for o in range(0, size, slot_size):
            n = min(slot_size, size - o)
            if used[k]:
                events[k].synchronize()
            filler.fill(hosts[k][:n], data_start + c0 + o)
            buf[o : o + n].copy_(slots[k][:n], non_blocking=True)
            events[k].record()
            used[k] = True
            k ^= 1
        for e in chunk:  # queued behind the copies on the same stream
            if e.name in wanted:
                out[e.name] = _tensor(buf, e.start - c0, e, dtype)
        del buf
    torch.cuda.current_stream(device).synchronize()
