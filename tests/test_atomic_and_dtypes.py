"""The one atomic-write helper and the one dtype parser, and that the package has no others."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from p2pz_directions.core.atomic import atomic_open, atomic_path, write_bytes
from p2pz_directions.core.dtypes import UnknownDtypeError, dtype_name, torch_dtype

REPO = Path(__file__).resolve().parent.parent


def test_write_bytes_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_bytes(target, b"one")
    write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_temp_names_are_the_ones_the_store_cleans_up(tmp_path):
    with atomic_path(tmp_path / "index.json") as tmp:
        parts = tmp.name.split(".")
        assert tmp.name.startswith(".index.json.") and tmp.name.endswith(".tmp")
        assert parts[-3] == str(os.getpid())  # store.LocalStore._stale_files reads the pid there
        tmp.write_text("{}")
    with atomic_path(tmp_path / "out.png", keep_suffix=True) as tmp:
        assert tmp.name.endswith(".tmp.png")  # PIL picks the format from the suffix
        tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "out.png"]


def test_no_other_module_builds_its_own_temp_file():
    found = []
    for p in sorted((REPO / "p2pz_directions").rglob("*.py")):
        if p.name == "atomic.py":
            continue
        for i, line in enumerate(p.read_text("utf-8").splitlines(), 1):
            if re.search(r"mkstemp\(|with_name\(f\"\.[^\"]*\.tmp", line):
                found.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not found, "use p2pz_directions.core.atomic:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("given", "name"),
    [("fp16", "float16"), ("half", "float16"), ("torch.bfloat16", "bfloat16"), ("BF16", "bfloat16"),
     ("float", "float32"), (torch.float32, "float32")],
)  # fmt: skip
def test_every_alias_names_one_dtype(given, name):
    assert dtype_name(given) == name
    assert torch_dtype(given) is getattr(torch, name)


def test_defaults_follow_the_device_and_unknown_names_are_refused():
    assert torch_dtype(None) is None
    assert torch_dtype(None, "cuda:0") is torch.float16
    assert torch_dtype(None, "cpu") is torch.float32
    with pytest.raises(
        UnknownDtypeError, match=r"unknown dtype 'int8'; use one of float32, float16, bfloat16"
    ):
        dtype_name("int8")


def test_the_callers_share_the_parser():
    from p2pz_directions.builder.captioners import _resolve_dtype
    from p2pz_directions.builder.encoders import resolve_device_dtype
    from p2pz_directions.cli.options import UsageError, check_dtype
    from p2pz_directions.editing.editors import EditorOptionError, parse_dtype

    assert _resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert resolve_device_dtype("cpu", "half") == ("cpu", torch.float16)
    assert parse_dtype("fp32") is torch.float32
    assert check_dtype("BF16") == "BF16"
    for call, err in [
        (lambda: _resolve_dtype("int8", "cpu"), ValueError),
        (lambda: resolve_device_dtype("cpu", "int8"), ValueError),
        (lambda: parse_dtype("int8"), EditorOptionError),
        (lambda: check_dtype("int8"), UsageError),
    ]:
        with pytest.raises(err, match="int8"):
            call()
