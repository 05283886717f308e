"""``p2pz mask`` and the DiffEdit/SDEdit options of ``p2pz edit``: files written, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz_directions.cli import main
from p2pz_directions.core.concept import Concept
from p2pz_directions.editing.models import encoder_for


@pytest.fixture
def registry(tiny_sd1):
    """The concepts 'cat' and 'dog' for the tiny model's encoder, in this test's registry."""
    from p2pz_directions.core.store import default_store

    enc = encoder_for(model=str(tiny_sd1))
    g = torch.Generator().manual_seed(0)
    store = default_store()
    for name in ("cat", "dog"):
        store.publish(Concept(name, torch.randn(77, enc.hidden_size, generator=g), enc), pack="local")
    return tiny_sd1


@pytest.fixture
def photo(tmp_path):
    rng = np.random.RandomState(0)
    path = tmp_path / "photo.png"
    Image.fromarray((rng.rand(36, 40, 4) * 255).astype("uint8"), "RGBA").save(path)  # RGBA, not /8
    return path


COMMON = ["--steps", "4", "--device", "cpu", "--dtype", "float32", "--quiet"]


def test_mask_writes_an_image_sized_png(registry, photo, tmp_path, capsys):
    out = tmp_path / "m" / "mask.png"
    rc = main(
        [
            "mask",
            str(photo),
            "-d",
            "cat->dog",
            "-m",
            str(registry),
            "-o",
            str(out),
            "--num-maps",
            "2",
            *COMMON,
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    with Image.open(out) as m:
        assert m.mode == "L" and m.size == (40, 32)  # 36 rows -> 32: resized with a note
        values = set(np.unique(np.asarray(m)))
    assert values <= {0, 255}
    assert summary["size"] == [40, 32] and summary["mask"] == str(out)
    assert 0.0 <= summary["coverage"] <= 1.0
    assert any("resized 40x36 -> 40x32" in n for n in summary["notes"])


def test_mask_then_edit_with_that_mask(registry, photo, tmp_path, capsys):
    mask = tmp_path / "mask.png"
    assert (
        main(
            [
                "mask",
                str(photo),
                "-d",
                "cat->dog",
                "-m",
                str(registry),
                "-o",
                str(mask),
                "--num-maps",
                "2",
                *COMMON,
            ]
        )
        == 0
    )
    assert "wrote mask" in capsys.readouterr().out
    edited, saved = tmp_path / "edit.png", tmp_path / "again.png"
    rc = main(
        [
            "edit",
            str(photo),
            "-d",
            "cat->dog",
            "-e",
            "diffedit",
            "-m",
            str(registry),
            "--mask",
            str(mask),
            "--inpaint-strength",
            "0.5",
            "--save-mask",
            str(saved),
            "-o",
            str(edited),
            *COMMON,
        ]
    )
    assert rc == 0
    with Image.open(mask) as a, Image.open(saved) as b:
        assert a.tobytes() == b.tobytes(), "the user's mask is the one used and saved"
    with Image.open(edited) as e:
        assert e.size == (40, 32)


def test_sdedit_through_the_cli(registry, photo, tmp_path):
    out = tmp_path / "dog.png"
    rc = main(
        [
            "edit",
            str(photo),
            "-d",
            "cat->dog",
            "-e",
            "sdedit",
            "-m",
            str(registry),
            "--prompt",
            "a cat",
            "--strength",
            "0.75",
            "-o",
            str(out),
            *COMMON,
        ]
    )
    assert rc == 0 and out.is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mask-strength", "1.5"], "mask_encode_strength=1.5 is outside (0, 1]"),
        (["--num-maps", "0"], "num_maps_per_mask must be a positive whole number"),
        (["-d", "cat->unicorn"], "unicorn"),
    ],
)
def test_mask_bad_input_is_one_line(registry, photo, tmp_path, capsys, args, message):
    base = ["mask", str(photo), "-m", str(registry), "-o", str(tmp_path / "m.png"), *COMMON]
    if "-d" not in args:
        base += ["-d", "cat->dog"]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "m.png").exists()


def test_mask_of_a_file_that_is_not_an_image(registry, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    assert main(["mask", str(bad), "-d", "cat->dog", "-m", str(registry), *COMMON]) == 2
    assert "is not an image" in capsys.readouterr().err


def test_edit_strength_out_of_range(registry, photo, tmp_path, capsys):
    rc = main(
        [
            "edit",
            str(photo),
            "-d",
            "cat->dog",
            "-e",
            "sdedit",
            "-m",
            str(registry),
            "--prompt",
            "a cat",
            "--strength",
            "0",
            "-o",
            str(tmp_path / "x.png"),
            *COMMON,
        ]
    )
    assert rc == 2 and "strength=0.0 is outside (0, 1]" in capsys.readouterr().err
    rc = main(
        [
            "edit",
            str(photo),
            "-d",
            "cat->dog",
            "-e",
            "diffedit",
            "-m",
            str(registry),
            "--inpaint-strength",
            "2",
            "-o",
            str(tmp_path / "x.png"),
            *COMMON,
        ]
    )
    assert rc == 2 and "inpaint_strength=2.0 is outside (0, 1]" in capsys.readouterr().err
