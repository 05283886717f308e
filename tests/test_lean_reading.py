"""lean.reading.read_safetensors: equal to safetensors' load_file, strict about hostile headers."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from p2pz_directions.lean import LeanUnsupported
from p2pz_directions.lean.reading import DTYPES, MAX_HEADER_BYTES, read_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "f32": torch.randn(3, 5, generator=g),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "f16": torch.randn(2, 3, 2, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.arange(-3, 6, dtype=torch.int64),
        "i32": torch.arange(5, dtype=torch.int32).reshape(5, 1),
        "i16": torch.tensor([-2, 9, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(2.5),
        "scalar_i": torch.tensor(7, dtype=torch.int32),
        "empty": torch.zeros(0, 4),
        "empty_h": torch.zeros(3, 0, dtype=torch.float16),
        "big": torch.randn(40, 10, generator=g),  # 1600 bytes: bigger than the small chunks below
    }
    if hasattr(torch, "float8_e4m3fn"):
        t["f8e4"] = torch.randn(6, generator=g).to(torch.float8_e4m3fn)
        t["f8e5"] = torch.randn(6, generator=g).to(torch.float8_e5m2)
    return t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.cpu().reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8))


def _expected(path, dtype, device="cpu"):
    from safetensors.torch import load_file

    ref = load_file(str(path), device=device)
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in ref.items()}


@pytest.fixture
def saved(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_equal_to_load_file(saved, dtype, chunk_bytes):
    got = read_safetensors(saved, "cpu", dtype, chunk_bytes=chunk_bytes)
    want = _expected(saved, dtype)
    assert set(got) == set(want) == set(_tensors())
    for k in want:
        assert _same(got[k], want[k]), k


def test_views_share_chunks(saved):
    one = read_safetensors(saved, "cpu")  # everything in one chunk: views of one buffer
    ptrs = {t.untyped_storage().data_ptr() for t in one.values() if t.numel()}
    assert len(ptrs) == 1
    many = read_safetensors(saved, "cpu", chunk_bytes=64)
    ptrs = {t.untyped_storage().data_ptr() for t in many.values() if t.numel()}
    assert len(ptrs) > 3
    assert many["big"].untyped_storage().nbytes() == many["big"].nbytes  # a chunk of its own
    # converted tensors are fresh; the ones already in the target dtype stay views
    half = read_safetensors(saved, "cpu", torch.float16)
    assert half["f32"].untyped_storage().data_ptr() != half["big"].untyped_storage().data_ptr()
    assert half["f16"].untyped_storage().data_ptr() == half["i64"].untyped_storage().data_ptr()


def test_keys(saved):
    seen = []

    def keep(name):
        seen.append(name)
        return name.startswith("f")

    got = read_safetensors(saved, "cpu", keys=keep, chunk_bytes=64)
    assert len(seen) == len(_tensors()) and set(seen) == set(_tensors())
    assert set(got) == {k for k in _tensors() if k.startswith("f")}
    assert set(read_safetensors(saved, "cpu", keys={"i8", "scalar", "nope"})) == {"i8", "scalar"}
    assert read_safetensors(saved, "cpu", keys=set()) == {}


def test_empty_file(tmp_path):
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "e.safetensors"))
    assert read_safetensors(tmp_path / "e.safetensors", "cpu") == {}


def test_bad_arguments(saved):
    with pytest.raises(ValueError, match="floating"):
        read_safetensors(saved, "cpu", torch.int32)
    with pytest.raises(ValueError, match="chunk_bytes"):
        read_safetensors(saved, "cpu", chunk_bytes=0)


# ---------------------------------------------------------------------------------------------------
# hostile files
# ---------------------------------------------------------------------------------------------------
def _raw(header, data: bytes = b"", n: int | None = None) -> bytes:
    """A file of header length ``n`` (default: the header's), the header (object, str or bytes), ``data``."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def _t(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE = {
    "shorter than 8 bytes": (b"\x01\x00", "shorter than the 8-byte"),
    "header length larger than the file": (_raw({}, n=1000), "larger than the file"),
    "header length above the bound": (struct.pack("<Q", MAX_HEADER_BYTES + 1), "above the 100000000"),
    "header length 2**64-1": (b"\xff" * 8, "above"),
    "non-JSON": (_raw("{not json"), "not valid JSON"),
    "not UTF-8": (_raw(b'{"\xff": 1}'), "not valid JSON"),
    "NaN": (_raw('{"__metadata__": NaN}'), "not valid JSON"),
    "JSON array": (_raw("[]"), "JSON list, not an object"),
    "JSON string": (_raw('"x"'), "JSON str, not an object"),
    "duplicate key": (
        _raw(f'{{"a": {json.dumps(_t())}, "a": {json.dumps(_t())}}}', b"\0" * 4),
        "duplicate key 'a'",
    ),
    "unknown dtype": (_raw({"a": _t("F12")}, b"\0" * 4), "dtype 'F12'"),
    "dtype not a string": (_raw({"a": _t(4)}, b"\0" * 4), "dtype 4"),
    "entry not an object": (_raw({"a": [1, 2]}), "must be an object"),
    "missing field": (_raw({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "must be an object of exactly"),
    "extra field": (_raw({"a": {**_t(), "x": 1}}, b"\0" * 4), "must be an object of exactly"),
    "negative shape": (_raw({"a": _t(shape=[-1])}, b"\0" * 4), r"shape \[-1\]"),
    "float shape": (_raw({"a": _t(shape=[1.0])}, b"\0" * 4), r"shape \[1.0\]"),
    "bool shape": (_raw({"a": _t(shape=[True])}, b"\0" * 4), r"shape \[True\]"),
    "shape not a list": (_raw({"a": {**_t(), "shape": 1}}, b"\0" * 4), "shape 1"),
    "offsets not two": (_raw({"a": _t(offsets=[0])}, b"\0" * 4), "not \\[start, end\\]"),
    "offsets float": (_raw({"a": _t(offsets=[0, 4.0])}, b"\0" * 4), "not \\[start, end\\]"),
    "offsets bool": (_raw({"a": _t(dtype="U8", offsets=[False, True])}, b"\0"), "not \\[start, end\\]"),
    "offsets past the data": (_raw({"a": _t(offsets=[0, 400])}, b"\0" * 4), "outside 0 <= start <= end <= 4"),
    "negative start": (_raw({"a": _t(offsets=[-4, 0])}, b"\0" * 4), "outside"),
    "end < start": (_raw({"a": _t(shape=[0], offsets=[4, 0])}, b"\0" * 4), "outside"),
    "wrong byte count": (
        _raw({"a": _t(shape=[2], offsets=[0, 4])}, b"\0" * 4),
        "needs 8 bytes, its offsets span 4",
    ),
    "huge shape": (_raw({"a": _t(shape=[10**30, 10**30], offsets=[0, 4])}, b"\0" * 4), "offsets span 4"),
    "overlap": (
        _raw({"a": _t(shape=[2], offsets=[0, 8]), "b": _t(shape=[2], offsets=[4, 12])}, b"\0" * 12),
        "overlaps",
    ),
    "gap": (_raw({"a": _t(offsets=[0, 4]), "b": _t(offsets=[8, 12])}, b"\0" * 12), "gap of 4 bytes"),
    "trailing bytes": (_raw({"a": _t()}, b"\0" * 8), "end at byte 4 of the 8-byte data region"),
    "metadata a list": (_raw({"__metadata__": []}), "__metadata__"),
    "metadata null": (_raw({"__metadata__": None}), "__metadata__"),
    "metadata not strings": (_raw({"__metadata__": {"k": 1}}), "__metadata__"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_refused(tmp_path, case):
    blob, why = HOSTILE[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(LeanUnsupported, match=why) as err:
        read_safetensors(path, "cpu")
    assert str(path) in str(err.value)


def test_truncated_data(saved):
    blob = saved.read_bytes()
    saved.write_bytes(blob[:-3])
    with pytest.raises(LeanUnsupported, match=r"outside .*data region") as err:
        read_safetensors(saved, "cpu")
    assert str(saved) in str(err.value)


def test_not_a_file(tmp_path):
    for path in (tmp_path / "missing.safetensors", tmp_path):
        with pytest.raises(LeanUnsupported, match="safetensors file"):
            read_safetensors(path, "cpu")


def test_misaligned_offsets(tmp_path):
    """An F32 tensor at an odd offset, after a U8 one: copied to aligned memory, same values."""
    w = torch.tensor([1.5, -2.25, 3e-3], dtype=torch.float32)
    h = torch.tensor([[7, -8]], dtype=torch.int16)
    header = {
        "b": _t("U8", [1], [0, 1]),
        "w": _t("F32", [3], [1, 13]),
        "h": _t("I16", [1, 2], [13, 17]),
    }
    path = tmp_path / "odd.safetensors"
    path.write_bytes(_raw(header, b"\x09" + w.numpy().tobytes() + h.numpy().tobytes()))
    for chunk_bytes in (1 << 20, 1):  # one chunk (odd offsets inside it), a chunk each (offset 0)
        for dtype in (None, torch.float16):
            got = read_safetensors(path, "cpu", dtype, chunk_bytes=chunk_bytes)
            assert _same(got["b"], torch.tensor([9], dtype=torch.uint8))
            assert _same(got["w"], w if dtype is None else w.to(dtype))
            assert _same(got["h"], h)
    assert set(DTYPES) >= {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}


# ---------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.float32])
def test_cuda_equal_to_load_file(saved, tmp_path, dtype, monkeypatch):
    import p2pz_directions.lean.reading as reading

    want = _expected(saved, dtype, device="cuda")
    # small slots: many copies; small pieces: several threads fill each slot
    for chunk_bytes, slot, piece in [(1 << 20, 1 << 20, 1 << 20), (64, 1 << 20, 1 << 20), (1 << 20, 48, 5)]:
        monkeypatch.setattr(reading, "_SLOT_BYTES", slot)
        monkeypatch.setattr(reading, "_PIECE_BYTES", piece)
        got = read_safetensors(saved, "cuda", dtype, chunk_bytes=chunk_bytes)
        assert set(got) == set(want)
        for k in want:
            assert got[k].device.type == "cuda" and _same(got[k], want[k]), (chunk_bytes, slot, piece, k)
    one = read_safetensors(saved, "cuda", chunk_bytes=1 << 20)
    assert one["i8"].untyped_storage().data_ptr() == one["u8"].untyped_storage().data_ptr()
    # odd offsets on the GPU too
    w = torch.arange(5, dtype=torch.float32) / 3
    path = tmp_path / "odd.safetensors"
    path.write_bytes(
        _raw({"b": _t("U8", [1], [0, 1]), "w": _t("F32", [5], [1, 21])}, b"\x01" + w.numpy().tobytes())
    )
    got = read_safetensors(path, "cuda", dtype)
    assert _same(got["w"], w if dtype is None else w.to(dtype))


def test_parallel_reads(saved, monkeypatch):
    """Buffers split into pieces read by several threads: the same tensors."""
    import p2pz_directions.lean.reading as reading

    monkeypatch.setattr(reading, "_PIECE_BYTES", 5)
    monkeypatch.setattr(reading, "_MAX_THREADS", 3)
    monkeypatch.setattr(reading.os, "cpu_count", lambda: 3)
    monkeypatch.delattr(reading.os, "process_cpu_count", raising=False)
    for chunk_bytes in (64, 1 << 20):
        got = read_safetensors(saved, "cpu", chunk_bytes=chunk_bytes)
        want = _expected(saved, None)
        assert all(_same(got[k], want[k]) for k in want)


@pytest.mark.parametrize("threads", [1, 3])
def test_file_shrinking_while_read(saved, monkeypatch, threads):
    """The file cut short after its header was read (someone rewriting it): refused, not garbage."""
    import p2pz_directions.lean.reading as reading

    monkeypatch.setattr(reading, "_PIECE_BYTES", 5)
    monkeypatch.setattr(reading, "_MAX_THREADS", threads)
    size = saved.stat().st_size

    def keep(name):
        with open(saved, "r+b") as f:
            f.truncate(size - 100)
        return True

    with pytest.raises(LeanUnsupported, match="truncated") as err:
        read_safetensors(saved, "cpu", keys=keep)
    assert str(saved) in str(err.value)
