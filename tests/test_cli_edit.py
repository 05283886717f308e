"""`p2pz edit`, `p2pz plugins`, `p2pz demo`: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from p2pz_directions.cli import main
from p2pz_directions.core.concept import Concept
from p2pz_directions.core.store import LocalStore
from p2pz_directions.editing.models import encoder_for


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def cat_dog(tiny_sd1):
    enc = encoder_for(model=str(tiny_sd1))
    g = torch.Generator().manual_seed(0)
    store = LocalStore()
    for name in ("cat", "dog", "horse"):
        store.publish(Concept(name, torch.randn(77, enc.hidden_size, generator=g), enc))
    return tiny_sd1


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGBA", (36, 34), (200, 120, 40, 255)).save(path)  # RGBA and odd size on purpose
    return path


FAST = ("--opt", "num_reg_steps=0", "--steps", "1")


def test_plugins_table_and_json(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0 and "pix2pix-zero" in out and "blip" in out and "ok" in out
    code, out, _ = run(capsys, "plugins", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["pix2pix-zero"]["ok"] and rows["pix2pix-zero"]["editors"] == ["pix2pix-zero"]
    assert rows["pix2pix-zero"]["version"]


def test_edit_with_compare(capsys, cat_dog, photo, tmp_path):
    dst = tmp_path / "out" / "dog.png"
    code, out, err = run(
        capsys, "edit", photo, "-d", "cat->dog", "-m", cat_dog, "--prompt", "a cat", "--compare", "-o", dst,
        "--device", "cpu", "--xa-guidance", "0.05", *FAST,
    )  # fmt: skip
    assert code == 0, err
    assert "wrote image" in out and "caption: a cat" in out
    assert "resized 36x34 -> 32x32" in err  # the note about the odd size
    for phase in ("invert", "reference", "edit"):
        assert phase in err  # one progress bar per phase
    assert Image.open(dst).size == (32, 32)
    cmp = Image.open(dst.with_name("dog-compare.png"))
    assert cmp.size == (3 * 32 + 2 * 4, 32)  # input | reconstruction | edit


def test_edit_json_synthetic(capsys, cat_dog, tmp_path):
    dst = tmp_path / "gen.png"
    code, out, err = run(
        capsys, "edit", "-d", "cat->dog", "-m", cat_dog, "--prompt", "a cat", "-o", dst, "--json",
        "--steps", "1", "--guidance-scale", "3", "--seed", "7",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["editor"] == "pix2pix-zero" and summary["written"]["image"] == str(dst)
    assert summary["direction"].startswith("local:cat@1->")
    assert Image.open(dst).size == (64, 64)


def test_edit_bad_inputs(capsys, cat_dog, photo, tmp_path):
    code, _, err = run(capsys, "edit", photo, "-d", "cat->dog", "-m", cat_dog, "--editor", "pix2pix", *FAST)
    assert (
        code == 2 and "error: unknown editor 'pix2pix'; installed editors:" in err and "pix2pix-zero" in err
    )
    code, _, err = run(capsys, "edit", photo, "-d", "cat->dgo", "-m", cat_dog, "--prompt", "a cat", *FAST)
    assert code == 2 and "error:" in err and "dog" in err
    notimg = tmp_path / "notes.png"
    notimg.write_text("just text", "utf-8")
    code, _, err = run(capsys, "edit", notimg, "-d", "cat->dog", "-m", cat_dog, "--prompt", "a cat", *FAST)
    assert code == 2 and "is not an image" in err
    # generic editor options go to the editor only when given; pix2pix-zero does not take --strength
    code, _, err = run(
        capsys, "edit", photo, "-d", "cat->dog", "-m", cat_dog, "--prompt", "x", "--strength", "0.5", *FAST
    )
    assert code == 2 and "does not take option 'strength'" in err
    code, _, err = run(capsys, "edit", "-d", "cat->dog", "-m", cat_dog)
    assert code == 2 and "--prompt" in err
    code, _, err = run(capsys, "edit", photo, "-d", "cat->dog", "-m", cat_dog, "--opt", "oops", *FAST)
    assert code == 2 and "KEY=VALUE" in err


def test_encoder_mismatch_in_cli(capsys, cat_dog, tiny_sd2, photo):
    code, _, err = run(capsys, "edit", photo, "-d", "cat->dog", "-m", tiny_sd2, "--prompt", "x", *FAST)
    assert code == 2 and err.startswith("error:") and "cat" in err


def test_save_mask_without_a_mask(capsys, cat_dog, photo, tmp_path):
    code, _, err = run(
        capsys, "edit", photo, "-d", "cat->dog", "-m", cat_dog, "--prompt", "x", "--save-mask", tmp_path / "m.png",
        "-o", tmp_path / "e.png", *FAST,
    )  # fmt: skip
    assert code == 2 and "made no mask" in err and (tmp_path / "e.png").exists()


@pytest.mark.slow
def test_demo_offline(capsys, tmp_path):
    code, out, err = run(
        capsys, "demo", "--out", tmp_path / "demo", "--steps", "1", "--editor", "pix2pix-zero", "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["failures"] == {}
    assert set(report["outputs"]) == {"pix2pix-zero", "compare"}
    assert "RANDOM weights" in report["note"] and "plumbing" in report["note"]
    assert Image.open(report["outputs"]["pix2pix-zero"]).size == (512, 512)  # the SD-shaped demo model
    assert (tmp_path / "demo" / "registry").is_dir()  # the user's registry is untouched
    assert "loaded demo:cat@1->dog@1 by name" in err
