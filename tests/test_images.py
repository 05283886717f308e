"""Image inputs: PIL, numpy and torch at full precision, batches, EXIF orientation, clear errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps

from p2pz_directions.editing.images import (
    ImageError,
    ImageResizedWarning,
    fit_to_multiple,
    image_size,
    is_latents,
    load_image,
    num_images,
    open_image,
    prepare_image,
    to_pixels,
)


def _diffusers(images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return VaeImageProcessor(vae_scale_factor=8).preprocess(images)


def test_float_arrays_keep_full_precision():
    rng = np.random.RandomState(0)
    arr = rng.rand(16, 24, 3)  # float64, values no 8-bit image holds
    images, note = prepare_image(arr)
    assert note is None and images.shape == (1, 16, 24, 3) and images.dtype == np.float64
    assert np.array_equal(images[0], arr)
    px = to_pixels(images)
    assert px.shape == (1, 3, 16, 24)
    assert torch.equal(px, _diffusers(arr))
    rounded = _diffusers(np.asarray(load_image(arr), np.float32) / 255.0)
    assert (px.float() - rounded).abs().max() > 1e-4, "an 8-bit round trip would lose this"


@pytest.mark.parametrize("low", [0.0, -1.0], ids=["0..1", "-1..1"])
def test_tensors_keep_their_values_and_range(low):
    g = torch.Generator().manual_seed(1)
    t = torch.rand(3, 16, 16, generator=g) * (1 - low) + low
    images, note = prepare_image(t)
    assert note is None and images.shape == (1, 3, 16, 16) and torch.equal(images[0], t)
    assert torch.equal(to_pixels(images), _diffusers(t))
    if low == 0.0:
        assert torch.allclose(to_pixels(images), t[None] * 2 - 1)
    else:
        assert torch.equal(to_pixels(images), t[None])


def test_uint8_arrays_equal_the_pil_image():
    arr = (np.random.RandomState(2).rand(8, 16, 3) * 255).astype(np.uint8)
    images, _ = prepare_image(arr)
    assert images.dtype == np.float32
    assert torch.equal(to_pixels(images), _diffusers(Image.fromarray(arr)))


def test_batches_of_each_kind():
    a, b = np.random.RandomState(3).rand(2, 16, 16, 3)
    batch, _ = prepare_image([a, b])
    assert batch.shape == (2, 16, 16, 3) and num_images(batch) == 2
    assert torch.equal(to_pixels(batch), _diffusers([a, b]))
    nhwc, _ = prepare_image(np.stack([a, b]))
    assert np.array_equal(nhwc, batch)

    t = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tb, _ = prepare_image([t[0], t[1]])
    assert torch.equal(tb, t) and num_images(tb) == 2

    pils = [Image.new("RGB", (16, 16), "red"), Image.new("RGBA", (24, 16), (0, 0, 255, 0))]
    out, note = prepare_image(pils)
    assert isinstance(out, list) and [im.mode for im in out] == ["RGB", "RGB"]
    assert "image 1 resized 24x16 -> 16x16" in note
    assert to_pixels(out).shape == (2, 3, 16, 16)
    assert torch.equal(to_pixels(out), _diffusers([pils[0], out[1]]))
    assert image_size(out) == (16, 16)


def test_latents_pass_through():
    lat = torch.randn(2, 4, 8, 8)
    images, _ = prepare_image(lat)
    assert is_latents(images) and torch.equal(images, lat)
    assert image_size(images) == (64, 64)
    assert torch.equal(to_pixels(images), lat)


def test_grayscale_and_rgba_arrays():
    gray, note = prepare_image(np.full((16, 16), 0.25))
    assert gray.shape == (1, 16, 16, 3) and "grayscale" in note and np.all(gray == 0.25)
    rgba = np.zeros((16, 16, 4))
    rgba[..., 3] = 0.0  # fully transparent -> white
    out, note = prepare_image(rgba)
    assert np.all(out == 1.0) and "laid on white" in note
    g1, note = prepare_image(torch.full((1, 16, 16), 0.5))
    assert g1.shape == (1, 3, 16, 16) and "grayscale" in note


def test_odd_sizes_are_said_and_floored_like_diffusers():
    arr = np.random.RandomState(4).rand(20, 30, 3)
    with pytest.warns(ImageResizedWarning):
        images, note = prepare_image(arr)
    assert note == "resized 30x20 -> 24x16 (sides must be multiples of 8)"
    assert image_size(images) == (24, 16)
    assert torch.equal(to_pixels(images), _diffusers(arr))
    with pytest.warns(ImageResizedWarning):
        pil, note = prepare_image(Image.new("RGB", (515, 300)))
    assert pil.size == (512, 296)


def test_files_open_upright_from_exif(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 5, 5))  # top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=100)
    out = open_image(path)
    assert out.size == (10, 20), "the EXIF rotation is applied"
    with Image.open(path) as raw:
        want = ImageOps.exif_transpose(raw).convert("RGB")
    assert out.tobytes() == want.tobytes()
    assert load_image(path).size == (10, 20)
    prepared, _ = prepare_image(str(path), warn=False)
    assert prepared.size == (8, 16)  # floored to multiples of 8 after rotating, not before
    r, g, b = out.getpixel((8, 1))  # top-left went to the top-right
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize(
    "src, match",
    [
        (torch.rand(16, 16, 3), r"channels-first: use t.permute\(2, 0, 1\)"),
        (np.random.rand(3, 16, 16, 2), r"\[N, H, W, C\] with C = 1, 3 or 4"),
        (np.full((8, 8, 3), 2.0), r"0..1 \(diffusers' convention\); got 2..2"),
        (np.full((8, 8, 3), -0.5), r"pass \(x \+ 1\) / 2"),
        (torch.full((3, 8, 8), 3.0), r"0..1 or -1..1"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), "must hold floats"),
        (np.full((8, 8, 3), np.nan), "NaN"),
        ([], "empty list"),
        ([np.zeros((8, 8, 3)), torch.zeros(3, 8, 8)], "one kind"),
        ([np.zeros((8, 8, 3)), np.zeros((16, 8, 3))], "one size"),
        ({}, "cannot use a dict"),
        (np.zeros((4, 4, 3)), "at least 8 pixels"),
    ],
)
def test_bad_images_are_clear_errors(src, match):
    with pytest.raises(ImageError, match=match):
        prepare_image(src, warn=False)


def test_files_keep_what_diffusers_default_conversion_loses(tmp_path):
    """`open_image` is diffusers' load_image with our `to_rgb`: the two cases its default
    ``convert("RGB")`` gets wrong (the measured reason to keep `to_rgb`)."""
    from diffusers.utils import load_image as diffusers_load_image

    a = np.zeros((16, 16, 4), np.uint8)
    a[4:12, 4:12] = (255, 0, 0, 255)  # a cut-out: a red square on transparent black
    Image.fromarray(a, "RGBA").save(tmp_path / "cut.png")
    assert diffusers_load_image(str(tmp_path / "cut.png")).getpixel((0, 0)) == (0, 0, 0)
    assert open_image(tmp_path / "cut.png").getpixel((0, 0)) == (255, 255, 255)
    assert open_image(tmp_path / "cut.png").getpixel((8, 8)) == (255, 0, 0)
    Image.fromarray(np.linspace(0, 65535, 256).reshape(16, 16).astype(np.uint16)).save(tmp_path / "g16.png")
    assert len(np.unique(np.asarray(diffusers_load_image(str(tmp_path / "g16.png"))))) <= 2
    assert len(np.unique(np.asarray(open_image(tmp_path / "g16.png")))) == 256


def test_pil_resizing_is_vae_image_processors_own():
    img = Image.fromarray((np.random.RandomState(5).rand(21, 35, 3) * 255).astype(np.uint8))
    ours, note = fit_to_multiple(img, warn=False)
    proc = VaeImageProcessor(vae_scale_factor=8)
    h, w = proc.get_default_height_width(img)
    assert ours.size == (w, h) == (32, 16) and note
    assert ours.tobytes() == proc.resize(img, h, w).tobytes()
    assert torch.equal(to_pixels(ours), _diffusers(img))
