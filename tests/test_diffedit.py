"""DiffEdit editor: equal to diffusers' StableDiffusionDiffEditPipeline on tiny models, and bad input.

The reference run is the diffusers docs' recipe with the direction's concept embeddings in place of
prompts: ``generate_mask(source, target)`` -> ``invert(source)`` -> ``__call__(target, negative=source)``,
all three with one seeded generator. Our editor does the same in one ``edit`` call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz_directions import editors
from p2pz_directions.core.concept import Concept, Direction
from p2pz_directions.core.errors import EncoderMismatchError, P2PZError
from p2pz_directions.editing.editors import EditorOptionError
from p2pz_directions.editing.images import ImageError
from p2pz_directions.editing.models import encoder_for
from p2pz_directions.sampling.runner import UNetRunner

TOL = 1e-4
STEPS = 6
MAPS = 3


def _direction(model_dir, seed: int = 0) -> Direction:
    enc = encoder_for(model=str(model_dir))
    g = torch.Generator().manual_seed(seed)
    src = Concept("cat", torch.randn(77, enc.hidden_size, generator=g), enc)
    tgt = Concept("dog", torch.randn(77, enc.hidden_size, generator=g), enc)
    return Direction(src, tgt)


def _image(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    base = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
    return Image.fromarray(np.clip(base * 0.6 + rng.rand(size, size, 3) * 100, 0, 255).astype("uint8"))


def _reference_pipe(model_dir):
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline

    pipe = StableDiffusionDiffEditPipeline.from_pretrained(
        str(model_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.inverse_scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def setup(request):
    """(config, model folder, diffusers pipeline, our editor, direction) for each tiny config."""
    path = request.getfixturevalue(f"tiny_{request.param}")
    pipe = _reference_pipe(path)
    ed = editors.get("diffedit", model=str(path), device="cpu", dtype=torch.float32)
    return request.param, path, pipe, ed, _direction(path)


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    path = tiny_sd1
    ed = editors.get("diffedit", model=str(path), device="cpu", dtype=torch.float32)
    return path, ed, _direction(path)


# --- equality with diffusers --------------------------------------------------------------------
def _diffusers_edit(pipe, d, img):
    """diffusers' generate_mask -> invert -> __call__ with one seeded generator: (mask, latents, image)."""
    gen = torch.Generator().manual_seed(0)
    ref_mask = pipe.generate_mask(
        image=img,
        source_prompt_embeds=d.source_embeds,
        target_prompt_embeds=d.target_embeds,
        num_maps_per_mask=MAPS,
        num_inference_steps=STEPS,
        generator=gen,
    )
    ref_inv = pipe.invert(
        image=img, prompt_embeds=d.source_embeds, num_inference_steps=STEPS, generator=gen
    ).latents
    ref = pipe(
        prompt_embeds=d.target_embeds,
        negative_prompt_embeds=d.source_embeds,
        mask_image=ref_mask,
        image_latents=ref_inv,
        num_inference_steps=STEPS,
        generator=gen,
        output_type="np",
    ).images[0]
    return ref_mask, ref_inv, ref


def test_mask_inversion_and_image_match_diffusers(setup):
    _, _, pipe, ed, d = setup
    img = _image(32)
    ref_mask, ref_inv, ref = _diffusers_edit(pipe, d, img)

    phases = []
    res = ed.edit(
        img,
        d,
        seed=0,
        num_maps_per_mask=MAPS,
        num_inference_steps=STEPS,
        output_type="np",
        progress=lambda phase, i, n: phases.append((phase, i, n)),
    )
    ours_mask = res.extra["latent_mask"][0, 0].numpy()
    assert ours_mask.shape == ref_mask[0].shape
    assert np.abs(ours_mask - ref_mask[0]).max() == 0
    assert 0 < ref_mask.mean() < 1, "a degenerate mask would not test the blend"
    assert (res.inverted_latents - ref_inv).abs().max().item() < TOL
    assert res.image.shape == ref.shape
    assert np.abs(res.image - ref).max() < TOL
    # the mask users get: image-sized, 8-bit, white where edited, same pixels as the latent mask
    assert res.mask.mode == "L" and res.mask.size == img.size
    up = np.asarray(res.mask.resize(ours_mask.shape[::-1], Image.Resampling.NEAREST)) / 255.0
    assert np.array_equal(up, ours_mask)
    assert {p for p, _, _ in phases} == {"mask", "invert", "edit"}
    assert ("edit", int(STEPS * 0.8), int(STEPS * 0.8)) in phases
    assert res.extra["mask_passes"] == "batch", "eager loops: the mask is one UNet batch, as diffusers"


class _RecordingRunner(UNetRunner):
    """An eager runner that notes the (name, key, input shapes) of every step it runs: what a
    ``graphs`` runner would capture one CUDA graph for."""

    def __init__(self) -> None:
        super().__init__("eager")
        self.seen: list[tuple] = []

    def __call__(self, name, fn, *inputs, key=()):
        self.seen.append((name, key, tuple(tuple(x.shape) for x in inputs)))
        return super().__call__(name, fn, *inputs, key=key)


def test_mask_by_draw_matches_diffusers_and_shares_the_edit_step(setup):
    """mask_passes='draws' (the default with CUDA graphs): the mask's noise predictions one draw at a
    time through the edit's own predictor - diffusers' mask, inversion and image still, and the mask,
    the inversion and the edit all run one step function of one shape (one graph to capture)."""
    _, _, pipe, ed, d = setup
    img = _image(32)
    ref_mask, ref_inv, ref = _diffusers_edit(pipe, d, img)
    kept, ed.runners["eager"] = ed.runners.get("eager"), _RecordingRunner()
    try:
        phases = []
        res = ed.edit(
            img, d, seed=0, num_maps_per_mask=MAPS, num_inference_steps=STEPS, output_type="np",
            mask_passes="draws", progress=lambda phase, i, n: phases.append((phase, i, n)),
        )  # fmt: skip
        seen = ed.runners["eager"].seen
    finally:
        if kept is None:
            ed.runners.pop("eager")
        else:
            ed.runners["eager"] = kept
    assert res.extra["mask_passes"] == "draws"
    assert np.array_equal(res.extra["latent_mask"][0, 0].numpy(), ref_mask[0])
    assert (res.inverted_latents - ref_inv).abs().max().item() < TOL
    assert np.abs(res.image - ref).max() < TOL
    n_inv = n_edit = int(STEPS * 0.8)
    assert len(seen) == 2 * MAPS + n_inv + n_edit
    assert len(set(seen)) == 1, f"mask, inversion and edit should share one step, got {set(seen)}"
    assert [(i, n) for p, i, n in phases if p == "mask"] == [(i, MAPS) for i in range(MAPS + 1)]


def test_mask_draws_and_batch_agree_for_several_images(sd1):
    """Image-major rows: with two images (and a guidance scale of the mask's own) the per-draw mask
    is the one-batch mask, and its map the same up to float rounding."""
    path, ed, d = sd1
    imgs_ = [_image(32, seed=0), _image(32, seed=5)]
    kw = dict(
        seed=2, num_maps_per_mask=MAPS, num_inference_steps=STEPS, mask_only=True, mask_guidance_scale=5.0
    )
    a = ed.edit(imgs_, d, mask_passes="batch", **kw)
    b = ed.edit(imgs_, d, mask_passes="draws", **kw)
    assert a.extra["mask_passes"] == "batch" and b.extra["mask_passes"] == "draws"
    assert torch.allclose(a.extra["mask_map"], b.extra["mask_map"], atol=1e-5)
    assert torch.equal(a.extra["latent_mask"], b.extra["latent_mask"])
    assert not torch.equal(a.extra["mask_map"][0], a.extra["mask_map"][1]), "two images, two maps"
    with pytest.raises(ValueError, match="mask_passes must be 'auto', 'batch' or 'draws'"):
        ed.edit(imgs_, d, mask_passes="chunks", **kw)


def test_user_mask_and_regularized_inversion_match_diffusers(setup, tmp_path):
    """A user mask (a PNG file, image-sized) replaces generate_mask; regularized inversion as diffusers."""
    config, _, pipe, ed, d = setup
    img = _image(32, seed=1)
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 4:20] = 255
    Image.fromarray(m, "L").save(tmp_path / "m.png")
    latent_mask = m[::2, ::2] / 255.0  # the tiny VAE downsamples by 2
    # diffusers' invert doubles the batch for v-prediction with guidance; compare without it there
    g_inv = 7.5 if config == "sd1" else 1.0
    reg = {"num_reg_steps": 1, "num_auto_corr_rolls": 2, "lambda_auto_corr": 5.0, "lambda_kl": 5.0}

    gen = torch.Generator().manual_seed(3)
    ref_inv = pipe.invert(
        image=img,
        prompt_embeds=d.source_embeds,
        num_inference_steps=STEPS,
        inpaint_strength=0.6,
        guidance_scale=g_inv,
        generator=gen,
        **reg,
    ).latents
    ref = pipe(
        prompt_embeds=d.target_embeds,
        negative_prompt_embeds=d.source_embeds,
        mask_image=latent_mask,
        image_latents=ref_inv,
        inpaint_strength=0.6,
        num_inference_steps=STEPS,
        generator=gen,
        output_type="np",
    ).images[0]
    res = ed.edit(
        img,
        d,
        mask=tmp_path / "m.png",
        seed=3,
        inpaint_strength=0.6,
        inversion_guidance_scale=g_inv,
        num_inference_steps=STEPS,
        output_type="np",
        **reg,
    )
    assert res.extra["mask_source"] == "user"
    assert np.array_equal(res.extra["latent_mask"][0, 0].numpy(), latent_mask)
    assert (res.inverted_latents - ref_inv).abs().max().item() < TOL
    assert np.abs(res.image - ref).max() < TOL
    assert res.extra["notes"] == []


def test_text_prompts_override_concepts_like_diffusers(sd1):
    path, ed, d = sd1
    pipe = _reference_pipe(path)
    img = _image(32, seed=2)
    gen = torch.Generator().manual_seed(5)
    ref_mask = pipe.generate_mask(
        image=img,
        source_prompt="a cat",
        target_prompt="a dog",
        num_maps_per_mask=MAPS,
        num_inference_steps=STEPS,
        mask_encode_strength=0.7,
        mask_thresholding_ratio=2.0,
        generator=gen,
    )
    ref_inv = pipe.invert(image=img, prompt="a cat", num_inference_steps=STEPS, generator=gen).latents
    ref = pipe(
        prompt="a dog",
        negative_prompt="a cat",
        mask_image=ref_mask,
        image_latents=ref_inv,
        num_inference_steps=STEPS,
        eta=0.5,
        generator=gen,
        output_type="np",
    ).images[0]
    res = ed.edit(
        img,
        d,
        source_prompt="a cat",
        target_prompt="a dog",
        seed=5,
        num_maps_per_mask=MAPS,
        mask_encode_strength=0.7,
        mask_thresholding_ratio=2.0,
        num_inference_steps=STEPS,
        eta=0.5,
        output_type="np",
    )
    assert np.array_equal(res.extra["latent_mask"][0, 0].numpy(), ref_mask[0])
    assert (res.inverted_latents - ref_inv).abs().max().item() < TOL
    assert np.abs(res.image - ref).max() < TOL


def test_pure_functions_match_the_pipeline_pieces(tiny_sd1):
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    from p2pz_directions.sampling.diffedit import (
        diffedit_timesteps,
        inverse_timesteps,
        mask_guidance_map,
        threshold_mask,
    )

    pipe = _reference_pipe(tiny_sd1)
    for strength in (0.8, 1.0, 0.35):
        pipe.scheduler.set_timesteps(50)
        want, _ = pipe.get_timesteps(50, strength, "cpu")
        assert torch.equal(
            diffedit_timesteps(DDIMScheduler.from_config(pipe.scheduler.config), 50, strength), want
        )
        pipe.inverse_scheduler.set_timesteps(50)
        want, _ = pipe.get_inverse_timesteps(50, strength, "cpu")
        inv = DDIMInverseScheduler.from_config(pipe.scheduler.config)
        assert torch.equal(inverse_timesteps(inv, 50, strength), want)
    m = threshold_mask(torch.tensor([[[0.0, 0.1], [0.9, 5.0]]]), 1.0)
    assert m.tolist() == [[[0.0, 0.0], [1.0, 1.0]]]
    a, b = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    gmap = mask_guidance_map(a, b, 3)
    assert gmap.shape == (2, 8, 8) and torch.allclose(gmap[1], (b - a).abs()[3:].mean([0, 1]))


# --- what users get ------------------------------------------------------------------------------
def test_mask_only_reuse_latents_and_several_images(sd1):
    path, ed, d = sd1
    img = _image(32)
    only = ed.edit(img, d, mask_only=True, seed=0, num_maps_per_mask=MAPS, num_inference_steps=STEPS)
    assert only.inverted_latents is None and only.image is only.mask
    assert set(np.unique(np.asarray(only.mask))) <= {0, 255}
    assert ed.generate_mask(img, d, seed=0, num_maps_per_mask=MAPS, num_inference_steps=STEPS).tobytes() == (
        only.mask.tobytes()
    )

    first = ed.edit(img, d, seed=0, num_maps_per_mask=MAPS, num_inference_steps=STEPS, output_type="np")
    assert first.inverted_latents.shape == (1, int(STEPS * 0.8), 4, 16, 16)
    again = ed.edit(
        img,
        d,
        mask=first.mask,
        image_latents=first.inverted_latents,
        num_inference_steps=STEPS,
        output_type="np",
    )
    assert np.abs(again.image - first.image).max() < 1e-6
    with pytest.raises(ValueError, match="image_latents has shape"):
        ed.edit(img, d, mask=first.mask, image_latents=first.inverted_latents, num_inference_steps=10)

    two = ed.edit(
        img,
        d,
        mask=first.mask,
        num_images_per_prompt=2,
        eta=1.0,
        seed=1,
        num_inference_steps=STEPS,
        decode_latents=True,
    )
    assert isinstance(two.image, list) and len(two.image) == 2
    assert all(isinstance(i, Image.Image) and i.size == img.size for i in two.image)
    assert two.image[0].tobytes() != two.image[1].tobytes(), "eta=1 draws different noise per image"
    assert len(two.extra["inversion_images"]) == int(STEPS * 0.8)


def test_direction_by_name_resolves_through_the_store(sd1):
    from p2pz_directions.core.store import default_store

    path, ed, d = sd1
    store = default_store()
    store.publish(d.source, pack="local")
    store.publish(d.target, pack="local")
    a = ed.edit(
        _image(32), "cat->dog", mask_only=True, seed=0, num_maps_per_mask=MAPS, num_inference_steps=STEPS
    )
    b = ed.edit(_image(32), d, mask_only=True, seed=0, num_maps_per_mask=MAPS, num_inference_steps=STEPS)
    assert "cat@1->" in a.extra["direction"] and a.extra["direction"].endswith("dog@1")
    assert a.mask.tobytes() == b.mask.tobytes()


def test_plugin_is_discovered_through_the_entry_point_group():
    from p2pz_plugins.diffedit import DiffEditEditor

    from p2pz_directions.editing import plugins

    assert "diffedit" in editors.available()
    assert plugins.editors()["diffedit"] is DiffEditEditor
    info = {p.name: p for p in plugins.plugin_report()}["diffedit"]
    assert info.ok and info.editors == ["diffedit"]


# --- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts, match",
    [
        ({"inpaint_strength": 0}, r"inpaint_strength=0 is outside \(0, 1\]"),
        ({"inpaint_strength": 1.5}, r"inpaint_strength=1.5 is outside"),
        ({"inpaint_strength": -0.1}, r"outside \(0, 1\]"),
        ({"mask_encode_strength": 0.0}, r"mask_encode_strength=0.0 is outside"),
        ({"inpaint_strength": 0.05}, r"runs no step"),
        ({"num_maps_per_mask": 0}, r"num_maps_per_mask must be a positive whole number"),
        ({"mask_thresholding_ratio": 0}, r"mask_thresholding_ratio must be positive"),
        ({"output_type": "jpeg"}, r"output_type must be"),
    ],
)
def test_bad_option_values_are_clear_errors_before_model_work(sd1, opts, match):
    path, ed, d = sd1
    with pytest.raises(ValueError, match=match) as e:
        ed.edit(_image(32), d, num_inference_steps=STEPS, **opts)
    assert isinstance(e.value, P2PZError)


def test_misspelt_option_missing_image_and_wrong_encoder(sd1, tiny_sd2):
    path, ed, d = sd1
    with pytest.raises(EditorOptionError, match="did you mean 'inpaint_strength'"):
        ed.edit(_image(32), d, inpaint_strenght=0.5)
    with pytest.raises(EditorOptionError, match="diffedit edits an existing image"):
        ed.edit(None, d)
    with pytest.raises(EditorOptionError, match="not both"):
        ed.edit(_image(32), d, source_prompt="a cat", source_prompt_embeds=d.source_embeds)
    with pytest.raises(EncoderMismatchError):
        ed.edit(_image(32), _direction(tiny_sd2))
    with pytest.raises(ValueError, match=r"takes \[1, L, 32\]"):
        ed.edit(_image(32), d, target_prompt_embeds=torch.zeros(1, 77, 8), mask_only=True)


def test_user_mask_conversions(sd1, tmp_path):
    from p2pz_plugins.diffedit import prepare_mask

    # an RGB mask becomes one channel, with a note
    rgb = Image.new("RGB", (32, 32), (255, 255, 255))
    t, notes = prepare_mask(rgb, (32, 32), (16, 16))
    assert t.shape == (1, 1, 16, 16) and t.min() == 1 and "one channel" in notes[0]
    # the wrong size is resized, with a note; a latent-sized mask is used as is
    small = np.zeros((10, 10), np.float32)
    small[:, 5:] = 1.0
    t, notes = prepare_mask(small, (32, 32), (16, 16))
    assert any("resized 10x10 -> 32x32" in n for n in notes)
    assert t[0, 0, :, :7].max() == 0 and t[0, 0, :, 9:].min() == 1
    t, notes = prepare_mask(torch.ones(16, 16), (32, 32), (16, 16))
    assert notes == [] and t.sum() == 256
    t, _ = prepare_mask(np.full((32, 32, 3), 255, np.uint8), (32, 32), (16, 16))
    assert t.min() == 1
    with pytest.raises(ImageError, match="0..1"):
        prepare_mask(np.full((16, 16), 3.0, np.float32), (32, 32), (16, 16))
    with pytest.raises(ImageError, match="mask file not found"):
        prepare_mask(tmp_path / "nope.png", (32, 32), (16, 16))
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageError, match="not a mask image"):
        prepare_mask(tmp_path / "text.png", (32, 32), (16, 16))

    # through the editor: the notes reach the result
    path, ed, d = sd1
    res = ed.edit(_image(32), d, mask=Image.new("RGBA", (20, 12), (255, 255, 255, 255)), mask_only=True)
    assert any("converted" in n for n in res.extra["notes"])
    assert any("resized 20x12" in n for n in res.extra["notes"])
    assert res.mask.size == (32, 32)


# --- CUDA graphs -------------------------------------------------------------------------------------
def test_cuda_graphs_option_is_eager_on_cpu(sd1):
    path, ed, d = sd1
    kw = dict(mask=np.ones((16, 16), np.float32), seed=0, num_inference_steps=STEPS, output_type="np")
    a = ed.edit(_image(32), d, **kw)
    b = ed.edit(_image(32), d, cuda_graphs=True, **kw)
    assert np.array_equal(a.image, b.image)
    assert ed.loop_mode("auto", True) == "eager", "no CUDA device: the UNet runs eagerly"
    assert set(ed.runners) == {"eager"}, "one runner per mode, kept by the editor"
    with pytest.raises(EditorOptionError, match="loops='graphs' needs a CUDA device"):
        ed.edit(_image(32), d, loops="graphs", **kw)
    with pytest.raises(EditorOptionError, match="loops must be 'auto'"):
        ed.edit(_image(32), d, loops="fast", **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager_on_gpu(tiny_sd1):
    ed = editors.get("diffedit", model=str(tiny_sd1), device="cuda", dtype=torch.float32)
    d = _direction(tiny_sd1)
    kw = dict(seed=0, num_maps_per_mask=MAPS, num_inference_steps=STEPS, output_type="np")
    eager = ed.edit(_image(64), d, loops="eager", **kw)
    graphed = ed.edit(_image(64), d, cuda_graphs=True, **kw)
    again = ed.edit(_image(64), d, cuda_graphs=True, **kw)  # replays the graphs captured above
    runner = ed.runners["graphs"]
    assert graphed.extra["mask_passes"] == "draws" and eager.extra["mask_passes"] == "batch"
    # the mask, the inversion and the edit replay one graph (one capture, one batch shape)
    assert len(runner.graphs) == 1 and all(g is not None for g in runner.graphs.values())
    drawn = ed.edit(_image(64), d, loops="eager", mask_passes="draws", **kw)  # the graphs' passes, eagerly
    assert np.abs(graphed.image - drawn.image).max() < 1e-4
    # one batch against one draw at a time: the same map up to TF32 rounding of other batch sizes
    gap = (graphed.extra["mask_map"] - eager.extra["mask_map"]).abs().max().item()
    assert gap < 0.05 * eager.extra["mask_map"].abs().max().item(), gap
    assert np.array_equal(graphed.image, again.image)
