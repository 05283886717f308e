"""Pack validation through `jsonschema` against registry/schema/: what each error says."""

from __future__ import annotations

import json

import pytest

from p2pz_directions.packs import pack_schema

ENC = "local/clip-test0123456789ab"


def row(**over):
    d = pack_schema.concept_dir(ENC, "cat", 1)
    rec = {
        "name": "cat",
        "version": 1,
        "encoder": ENC,
        "encoder_revision": None,
        "encoder_family": "clip",
        "hidden_size": 8,
        "max_length": 4,
        "dtype": "float32",
        "num_captions": 1,
        "created": None,
        "content_hash": "a" * 64,
        "sha256": "b" * 64,
        "size": 200,
        "metadata_sha256": "c" * 64,
        "metadata_size": 100,
        "tensor_path": f"{d}/embedding.safetensors",
        "metadata_path": f"{d}/concept.json",
    }
    return rec | over


def test_an_honest_row_passes():
    r = pack_schema.validate_row(row(), 1)
    assert r.key == (ENC, "cat", 1) and r.size == 200


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"version": 1.0}, r"row 3 .*: version must be integer, not float 1\.0"),
        ({"version": True}, r"version must be integer, not bool True"),
        ({"version": 0}, r"version is 0, below the minimum 1"),
        ({"sha256": "XYZ"}, r"sha256 'XYZ' does not match \^\[0-9a-f\]\{64\}\$"),
        ({"dtype": "int8"}, r"dtype must be one of \['float16', 'bfloat16', 'float32'\], not 'int8'"),
        ({"encoder_revision": 5}, r"encoder_revision must be string or null, not int 5"),
        ({"created": "x" * 65}, r"created is too long \(65 > 64 characters\)"),
        ({"hidden_size": 9000}, r"hidden_size is 9000, above the maximum 8192"),
    ],
)
def test_a_bad_field_is_named_with_what_it_must_be(over, message):
    with pytest.raises(pack_schema.PackFormatError, match=message) as e:
        pack_schema.validate_row(row(**over), 3)
    assert "\n" not in str(e.value)


def test_a_missing_column_is_named():
    rec = row()
    del rec["size"]
    with pytest.raises(pack_schema.PackFormatError, match="lacks the required field 'size'"):
        pack_schema.validate_row(rec, 1)


def test_known_packs_errors_carry_the_path_into_the_list():
    listing = {"format": "p2pz-known-packs", "format_version": 1, "packs": [{"repo_id": "a/b"}]}
    with pytest.raises(
        pack_schema.PackFormatError, match=r"known_packs\.json\.packs\[0\] lacks the required"
    ):
        pack_schema.load_known_packs(json.dumps(listing))
    listing["packs"] = [{"repo_id": "a/b", "description": "x", "revision": "main", "extra": 1}]
    with pytest.raises(pack_schema.PackFormatError, match=r"packs\[0\] has unknown fields \['extra'\]"):
        pack_schema.load_known_packs(json.dumps(listing))
    listing["format"] = "other"
    listing["packs"] = []
    with pytest.raises(pack_schema.PackFormatError, match="format must be 'p2pz-known-packs'"):
        pack_schema.load_known_packs(json.dumps(listing))


def test_every_schema_file_is_a_valid_draft_2020_12_schema():
    from jsonschema import Draft202012Validator

    for name in ("index-row", "known-packs", "pack-card"):
        Draft202012Validator.check_schema(pack_schema.load_schema(name))
        assert pack_schema._validator(name) is pack_schema._validator(name)  # compiled once
