"""Hypothesis fuzz of names and manifests: the one name rule holds for parser, store and pack index.

- Any text either parses or raises `InvalidNameError`; a name that parses is storable (its folder
  fits the file system: no separators, at most 255 bytes) and reads back as the same name.
- Two names that parse to different concepts never share a store folder, even on a
  case-insensitive file system; pack names never share a pack folder.
- The pack index validator accepts exactly the names the parser accepts (one rule).
- Any mutation of a stored ``concept.json`` either still reads (an unchanged manifest) or raises
  `IntegrityError` naming the file: never another exception.
"""

from __future__ import annotations

import json
import string
import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pz_directions.core import naming
from p2pz_directions.core.concept import Concept, EncoderInfo
from p2pz_directions.core.errors import IntegrityError, InvalidNameError
from p2pz_directions.core.format import META_FILE, read_manifest, write_concept_dir
from p2pz_directions.packs import pack_schema

ENC = EncoderInfo("test/fuzz", 4, "test", max_length=2)
NAMES = st.text(
    alphabet=st.characters(codec="utf-8") | st.sampled_from(list("aAßſ.-_ @:/\\\t\n\u202e\x1b猫")),
    min_size=0,
    max_size=120,
)


def _ok(text: str) -> str | None:
    try:
        return naming.normalize_concept(text)
    except InvalidNameError:
        return None


@settings(max_examples=400, deadline=None)
@given(text=NAMES)
def test_a_name_parses_or_raises_the_name_error_and_a_parsed_name_is_a_safe_folder(text):
    norm = _ok(text)
    if norm is None:
        return
    assert norm == _ok(norm)  # normal form is a fixed point
    raw = norm.encode("utf-8")
    assert 0 < len(raw) <= naming.MAX_NAME_BYTES < 255
    assert "/" not in norm and "\\" not in norm and "\x00" not in norm and norm not in (".", "..")
    assert norm == unicodedata.normalize("NFC", norm)
    assert norm.casefold() == norm  # one name per case-insensitive folder
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in norm)


@settings(max_examples=300, deadline=None)
@given(a=NAMES, b=NAMES)
def test_different_names_never_share_a_folder_on_a_case_insensitive_system(a, b):
    na, nb = _ok(a), _ok(b)
    if na is None or nb is None or na == nb:
        return
    assert na.casefold() != nb.casefold()
    assert unicodedata.normalize("NFD", na) != unicodedata.normalize("NFD", nb)  # nor on HFS+ (NFD)


PACK_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "-_./@", min_size=1, max_size=40)


@settings(max_examples=400, deadline=None)
@given(a=PACK_TEXT, b=PACK_TEXT)
def test_pack_folders_are_one_to_one(a, b):
    try:
        ra, rb = naming.parse_pack(a), naming.parse_pack(b)
    except InvalidNameError:
        return
    if ra.revision or rb.revision:
        return
    fa, fb = naming.pack_folder(ra), naming.pack_folder(rb)
    assert "/" not in fa and len(fa.encode()) <= 255
    if ra.name.lower() != rb.name.lower():
        assert fa != fb, (ra, rb)


@settings(max_examples=200, deadline=None)
@given(text=NAMES)
def test_the_index_validator_applies_the_same_name_rule(text):
    norm = _ok(text)
    name = text
    try:
        d = pack_schema.concept_dir(ENC.id, name, 1)
    except UnicodeEncodeError:  # a lone surrogate: no path at all, the name check must refuse it
        d = pack_schema.concept_dir(ENC.id, "x", 1)
    row = {
        "name": name,
        "version": 1,
        "encoder": ENC.id,
        "hidden_size": 4,
        "max_length": 2,
        "dtype": "float32",
        "content_hash": "0" * 64,
        "sha256": "0" * 64,
        "size": 100,
        "metadata_sha256": "0" * 64,
        "metadata_size": 100,
        "tensor_path": f"{d}/embedding.safetensors",
        "metadata_path": f"{d}/concept.json",
    }
    try:
        pack_schema.validate_row(row, 1)
        accepted = True
    except pack_schema.PackFormatError:
        accepted = False
    assert accepted == (norm is not None and norm == text)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "cat" / "1"
    c = Concept("cat", torch.ones(2, 4), ENC, captions=["a cat"], version=1)
    write_concept_dir(c, folder)
    return folder, (folder / META_FILE).read_bytes()


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
RAW_INJECT = st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "1e999", '"\\ud800"', "[" * 5000 + "]" * 5000, "{"]
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(
        ["name", "encoder", "shape", "captions", "num_captions", "version", "dtype", "provenance", "x"]
    ),
    value=JSON_VALUES,
    raw=st.none() | RAW_INJECT,
    cut=st.none() | st.integers(min_value=0, max_value=4000),
)
def test_a_mutated_manifest_reads_or_raises_the_integrity_error(stored, key, value, raw, cut):
    folder, original = stored
    meta = json.loads(original)
    meta[key] = value
    text = json.dumps(meta)
    if raw is not None:
        text = text.replace('"provenance": {', f'"provenance": {{"z": {raw}, ', 1)
    data = text.encode("utf-8", "surrogatepass")
    if cut is not None:
        data = data[:cut]
    (folder / META_FILE).write_bytes(data)
    try:
        got = read_manifest(folder)
    except IntegrityError as e:
        assert str(folder / META_FILE) in str(e)
    else:
        assert got == json.loads(original) or got[key] == value
    finally:
        (folder / META_FILE).write_bytes(original)
