"""The ``ledits`` editor equals diffusers' LEditsPPPipelineStableDiffusion (invert + __call__).

Same tiny model, image, concept embeddings, options and generator; CPU fp32; max abs diff < 1e-4.
A direction ``a->b`` is given to diffusers as ``editing_prompt_embeds = [b, a]`` with
``reverse_editing_direction = [False, True]`` (see plugins/ledits.py).

Two things diffusers 0.42.1 cannot do as shipped, and what the reference does instead:
- ``invert`` with a DDIMScheduler fails (``add_noise`` indexes with a float tensor): the reference
  uses `FixedDDIM`, DDIM whose ``add_noise`` casts the timestep to long - nothing else changes;
- the cross-attention / intersect masks fail with ``editing_prompt_embeds`` (they need token counts
  only prompts give): `EmbedsLEdits` returns, for embeddings, the count diffusers computes for any
  prompt (77 - 2 = 75; its tokenizer call pads before counting). A separate test runs the masks
  unpatched from prompt strings against concepts made from those single captions.
The cross-attention masks need attention at 1/4 of the latent size, which the 2-level tiny UNets
of tests/tiny_sd.py lack (diffusers fails on them too), so mask tests use 3-level tiny UNets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz_directions import editors
from p2pz_directions.core.concept import Concept, Direction
from p2pz_directions.core.errors import EncoderMismatchError
from p2pz_directions.editing.editors import EditorOptionError
from p2pz_directions.editing.models import encoder_for

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
STEPS = 5


def _image(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


def _direction(enc, names=("cat", "dog"), seed=0, captions=None) -> Direction:
    g = torch.Generator().manual_seed(seed)
    a = Concept(names[0], torch.randn(77, enc.hidden_size, generator=g) * 0.5, enc, captions=captions)
    b = Concept(names[1], torch.randn(77, enc.hidden_size, generator=g) * 0.5, enc, captions=captions)
    return Direction(a, b)


def make_deep_sd(path, config: str):
    """A tiny SD folder whose UNet has 3 levels (cross-attention at 1/2 and 1/4 of the latents)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from p2pz_directions.editing.demo import make_components, make_tokenizer

    comps = make_components(config)
    sd2 = config == "sd2"
    torch.manual_seed(0)
    comps["unet"] = UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64 if sd2 else 32,
        attention_head_dim=(2, 4, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )
    pipe = StableDiffusionPipeline(
        **comps, tokenizer=make_tokenizer(path / "tokenizer"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def deep_sd1(tmp_path_factory):
    return make_deep_sd(tmp_path_factory.mktemp("deep-sd1"), "sd1")


@pytest.fixture(scope="session")
def deep_sd2(tmp_path_factory):
    return make_deep_sd(tmp_path_factory.mktemp("deep-sd2"), "sd2")


def _fixed_ddim():
    from diffusers import DDIMScheduler

    class FixedDDIM(DDIMScheduler):
        def add_noise(self, original_samples, noise, timesteps):
            return super().add_noise(original_samples, noise, timesteps.long())

    return FixedDDIM


def _embeds_pipeline_cls():
    from diffusers import LEditsPPPipelineStableDiffusion

    class EmbedsLEdits(LEditsPPPipelineStableDiffusion):
        def encode_prompt(self, *args, **kw):
            edit, neg, tokens = super().encode_prompt(*args, **kw)
            if tokens is None and kw.get("editing_prompt_embeds") is not None:
                tokens = torch.full((kw["editing_prompt_embeds"].shape[0],), neg.shape[1] - 2)
            return edit, neg, tokens

    return EmbedsLEdits


def _pipe(path, scheduler: str, embeds_cls: bool = False):
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusion

    cls = _embeds_pipeline_cls() if embeds_cls else LEditsPPPipelineStableDiffusion
    pipe = cls.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
    if scheduler == "ddim":
        pipe.scheduler = _fixed_ddim().from_config(pipe.scheduler.config)
    else:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _editor(path, scheduler: str):
    from diffusers import DPMSolverMultistepScheduler

    ed = editors.get("ledits", model=str(path), device="cpu", dtype=torch.float32)
    if scheduler == "dpm":
        comps = ed.load_components()
        comps["scheduler"] = DPMSolverMultistepScheduler.from_config(
            comps["scheduler"].config, algorithm_type="sde-dpmsolver++", solver_order=2
        )
        ed._components["scheduler"] = comps["scheduler"]
    return ed


def _reference(pipe, image, dirs, *, invert_kw=None, masks=False, **kw):
    """diffusers: invert, then the concepts of ``dirs`` ([target, source] each) as editing_prompt_embeds."""
    pipe.invert(
        image,
        num_inversion_steps=STEPS,
        skip=0.2,
        generator=torch.Generator().manual_seed(0),
        **(invert_kw or {}),
    )
    rows = torch.stack([c.embedding for d in dirs for c in (d.target, d.source)])
    extra = {"editing_prompt": [f"concept {i}" for i in range(len(rows))]} if masks else {}
    return pipe(
        editing_prompt_embeds=rows,
        reverse_editing_direction=[False, True] * len(dirs),
        output_type="np",
        **extra,
        **kw,
    ).images[0]


def _ours(ed, image, dirs, **kw):
    kw.setdefault("num_inversion_steps", STEPS)
    kw.setdefault("skip", 0.2)
    return ed.edit(image, dirs if len(dirs) > 1 else dirs[0], output_type="np", seed=0, **kw).image


@pytest.mark.parametrize("config", ["sd1", "sd2"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_one_direction_without_masks_equals_diffusers(request, config, scheduler):
    path = request.getfixturevalue(f"tiny_{config}")
    enc = encoder_for(model=str(path))
    d, img = _direction(enc), _image()
    ref = _reference(_pipe(path, scheduler), img, [d], use_intersect_mask=False, edit_guidance_scale=6.0)
    ours = _ours(_editor(path, scheduler), img, [d], use_intersect_mask=False, edit_guidance_scale=6.0)
    assert ours.shape == ref.shape == (64, 64, 3)
    assert np.abs(ours - ref).max() < TOL
    plain = _ours(_editor(path, scheduler), img, [d], use_intersect_mask=False, edit_guidance_scale=0.0)
    assert np.abs(ours - plain).max() > 1e-3  # the direction does something


@pytest.mark.parametrize("config", ["sd1", "sd2"])
def test_two_directions_per_direction_options_without_masks(request, config):
    path = request.getfixturevalue(f"tiny_{config}")
    enc = encoder_for(model=str(path))
    d1, d2 = _direction(enc), _direction(enc, ("summer", "winter"), seed=1)
    img = _image(seed=2)
    ref = _reference(
        _pipe(path, "ddim"), img, [d1, d2], use_intersect_mask=False,
        edit_guidance_scale=[6.0, 6.0, 3.0, 3.0], edit_warmup_steps=[0, 0, 1, 1], edit_cooldown_steps=[4, 4, 99, 99],  # diffusers: no None in lists
        edit_threshold=[0.8, 0.8, 0.5, 0.5],
    )  # fmt: skip
    ours = _ours(
        _editor(path, "ddim"), img, [d1, d2], use_intersect_mask=False, edit_guidance_scale=[6.0, 3.0],
        edit_warmup_steps=[0, 1], edit_cooldown_steps=[4, None], edit_threshold=[0.8, 0.5],
    )  # fmt: skip
    assert np.abs(ours - ref).max() < TOL


@pytest.mark.parametrize("config", ["sd1", "sd2"])
@pytest.mark.parametrize("n_dirs", [1, 2])
def test_intersect_mask_equals_diffusers(request, config, n_dirs):
    path = request.getfixturevalue(f"deep_{config}")
    enc = encoder_for(model=str(path))
    dirs = [_direction(enc), _direction(enc, ("summer", "winter"), seed=1)][:n_dirs]
    img = _image(seed=3)
    scale = [5.0, 5.0, 3.0, 3.0][: 2 * n_dirs]
    ref = _reference(_pipe(path, "dpm", embeds_cls=True), img, dirs, masks=True, edit_guidance_scale=scale)
    ours = _ours(_editor(path, "dpm"), img, dirs, edit_guidance_scale=scale[::2])
    assert np.abs(ours - ref).max() < TOL
    no_mask = _ours(_editor(path, "dpm"), img, dirs, edit_guidance_scale=scale[::2], use_intersect_mask=False)
    assert np.abs(ours - no_mask).max() > 1e-3  # the mask does something


def test_cross_attn_mask_user_mask_and_source_prompt_equal_diffusers(deep_sd1):
    enc = encoder_for(model=str(deep_sd1))
    d, img = _direction(enc), _image(seed=4)
    user = (torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(5)) > 0.3).float()
    kw = dict(use_intersect_mask=False, use_cross_attn_mask=True, edit_threshold=0.7)
    ref = _reference(
        _pipe(deep_sd1, "ddim", embeds_cls=True), img, [d], masks=True, user_mask=user, negative_prompt="blurry",
        invert_kw={"source_prompt": "a cat", "source_guidance_scale": 4.0}, **kw,
    )  # fmt: skip
    ours = _ours(
        _editor(deep_sd1, "ddim"), img, [d], user_mask=user, negative_prompt="blurry", source_prompt="a cat",
        source_guidance_scale=4.0, **kw,
    )  # fmt: skip
    assert np.abs(ours - ref).max() < TOL


def test_masks_from_prompt_strings_unpatched_diffusers(deep_sd2):
    """Concepts made from one caption each equal diffusers' own prompt encoding and token counts."""
    from p2pz_directions.sampling import encode_prompt

    pipe = _pipe(deep_sd2, "dpm")
    enc = encoder_for(model=str(deep_sd2))
    caps = ["a dog", "a cat"]
    emb, _ = encode_prompt(pipe.tokenizer, pipe.text_encoder, caps, "cpu")
    d = Direction(
        Concept("cat", emb[1], enc, captions=[caps[1]]), Concept("dog", emb[0], enc, captions=[caps[0]])
    )
    img = _image(seed=6)
    pipe.invert(img, num_inversion_steps=STEPS, skip=0.2, generator=torch.Generator().manual_seed(0))
    ref = pipe(editing_prompt=caps, reverse_editing_direction=[False, True], output_type="np").images[0]
    ours = _ours(_editor(deep_sd2, "dpm"), img, [d])
    assert np.abs(ours - ref).max() < TOL


def test_edit_tokens_captions_counts_the_longest_caption(deep_sd1):
    from p2pz_plugins.ledits import LEditsOptions, concept_rows

    enc = encoder_for(model=str(deep_sd1))
    ed = _editor(deep_sd1, "ddim")
    tok = ed.load_components()["tokenizer"]
    d = _direction(enc, captions=["a cat", "a big cat here"])
    _, guide = concept_rows([d], LEditsOptions(edit_tokens="captions"), tok)
    assert [g.tokens for g in guide] == [11, 11]  # one token per letter here (the longer caption)
    _, guide = concept_rows([d], LEditsOptions(), tok)
    assert [g.tokens for g in guide] == [75, 75]
    _, guide = concept_rows([d * -2.0], LEditsOptions(edit_guidance_scale=3, remove_source=False), tok)
    assert [(g.scale, g.reverse) for g in guide] == [(6.0, True)]


def test_list_of_images_edits_each(tiny_sd1):
    enc = encoder_for(model=str(tiny_sd1))
    ed = _editor(tiny_sd1, "ddim")
    d = _direction(enc)
    one = _ours(ed, _image(seed=1), [d], use_intersect_mask=False)
    res = ed.edit(
        [_image(seed=0), _image(seed=1)],
        d,
        use_intersect_mask=False,
        output_type="np",
        num_inversion_steps=STEPS,
        skip=0.2,
    )
    assert len(res.image) == 2 and np.abs(res.image[1] - one).max() < 1e-6


# -- bad input, before any model work -----------------------------------------------------------------
@pytest.fixture
def fresh(tiny_sd1):
    return editors.get("ledits", model=str(tiny_sd1), device="cpu", dtype=torch.float32)


def _no_model_work(ed):
    assert ed._components == {}


def test_unknown_option_is_refused(fresh, tiny_sd1):
    d = _direction(encoder_for(model=str(tiny_sd1)))
    with pytest.raises(EditorOptionError, match="edit_guidance_scale"):
        fresh.edit(_image(), d, edit_guidance_scael=3)
    _no_model_work(fresh)


@pytest.mark.parametrize(
    "loops, match", [("fast", "loops must be 'auto'"), ("graphs", "needs a CUDA device")]
)
def test_bad_loops_are_refused_before_model_work(fresh, tiny_sd1, loops, match):
    d = _direction(encoder_for(model=str(tiny_sd1)))
    with pytest.raises(EditorOptionError, match=match):
        fresh.edit(_image(), d, loops=loops)
    _no_model_work(fresh)


def test_direction_for_another_encoder_is_refused(fresh, tiny_sd2):
    with pytest.raises(EncoderMismatchError):
        fresh.edit(_image(), _direction(encoder_for(model=str(tiny_sd2))))
    _no_model_work(fresh)


def test_too_many_directions_and_wrong_list_lengths(fresh, tiny_sd1):
    d = _direction(encoder_for(model=str(tiny_sd1)))
    with pytest.raises(EditorOptionError, match="at most 8 directions"):
        fresh.edit(_image(), [d] * 9)
    with pytest.raises(EditorOptionError, match="2 values for 1 direction"):
        fresh.edit(_image(), d, edit_guidance_scale=[1, 2])
    with pytest.raises(EditorOptionError, match="edit_threshold"):
        fresh.edit(_image(), d, edit_threshold=1.5)
    with pytest.raises(EditorOptionError, match="has no captions"):
        fresh.edit(_image(), d, edit_tokens="captions")
    _no_model_work(fresh)


def test_masks_on_a_unet_without_quarter_resolution_attention(fresh, tiny_sd1):
    """Asked for: a clear error. By default: the noise mask alone, with a warning and a note."""
    d = _direction(encoder_for(model=str(tiny_sd1)))
    kw = dict(num_inversion_steps=2, output_type="np")
    with pytest.raises(EditorOptionError, match="use_intersect_mask=False"):
        fresh.edit(_image(), d, use_intersect_mask=True, **kw)
    with pytest.warns(UserWarning, match="noise mask alone"):
        res = fresh.edit(_image(), d, **kw)
    assert (
        res.extra["notes"]
        and np.abs(res.image - fresh.edit(_image(), d, use_intersect_mask=False, **kw).image).max() == 0
    )


def test_per_direction_values_from_the_cli_form(tiny_sd1):
    """``--opt edit_guidance_scale=6,4`` reaches the editor as the string "6,4"."""
    from p2pz_plugins.ledits import LEditsOptions, concept_rows

    enc = encoder_for(model=str(tiny_sd1))
    dirs = [_direction(enc), _direction(enc, ("summer", "winter"), seed=1)]
    opts = LEditsOptions(
        edit_guidance_scale="6,4", reverse_editing_direction="false,true", edit_cooldown_steps="3,none"
    )
    _, guide = concept_rows(dirs, opts)
    assert [(g.scale, g.reverse, g.cooldown) for g in guide] == [
        (6.0, False, 3), (6.0, True, 3), (4.0, True, None), (4.0, False, None),
    ]  # fmt: skip
    with pytest.raises(EditorOptionError, match="edit_warmup_steps must be a whole number"):
        concept_rows(dirs, LEditsOptions(edit_warmup_steps="1,x"))


def test_guidance_rescale_is_applied_where_diffusers_crashes(tiny_sd1):
    """diffusers 0.42.1 takes ``.mean`` of a tuple for guidance_rescale > 0; ours rescales towards the
    concepts' mean prediction (Lin et al. 2023, sec. 3.4) and changes the result."""
    enc = encoder_for(model=str(tiny_sd1))
    d, img = _direction(enc), _image(seed=7)
    pipe = _pipe(tiny_sd1, "dpm")
    pipe.invert(img, num_inversion_steps=STEPS, skip=0.2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AttributeError, match="tuple"):
        pipe(editing_prompt_embeds=torch.stack([d.target.embedding, d.source.embedding]), guidance_rescale=0.7,
             use_intersect_mask=False)  # fmt: skip
    ed = _editor(tiny_sd1, "dpm")
    a = _ours(ed, img, [d], use_intersect_mask=False, guidance_rescale=0.7)
    b = _ours(ed, img, [d], use_intersect_mask=False)
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-4


def test_callback_on_step_end_equals_diffusers(tiny_sd2):
    """A callback that rescales the latents at step 1 changes both runs alike."""
    enc = encoder_for(model=str(tiny_sd2))
    d, img = _direction(enc), _image(seed=8)
    seen = []

    def cb(pipe, i, t, kw):
        seen.append(i)
        return {"latents": kw["latents"] * 0.9} if i == 1 else kw

    ref = _reference(_pipe(tiny_sd2, "ddim"), img, [d], use_intersect_mask=False, callback_on_step_end=cb)
    ours = _ours(_editor(tiny_sd2, "ddim"), img, [d], use_intersect_mask=False, callback_on_step_end=cb)
    assert seen == list(range(STEPS)) * 2
    assert np.abs(ours - ref).max() < TOL


def test_cli_edit_with_per_direction_opt_and_one_line_errors(capsys, tiny_sd1, tmp_path):
    from p2pz_directions.cli import main
    from p2pz_directions.core.store import LocalStore

    enc = encoder_for(model=str(tiny_sd1))
    g = torch.Generator().manual_seed(0)
    for name in ("cat", "dog"):
        LocalStore().publish(Concept(name, torch.randn(77, enc.hidden_size, generator=g), enc))
    src, dst = tmp_path / "cat.png", tmp_path / "dog.png"
    _image(64).save(src)
    common = [
        "edit",
        str(src),
        "-d",
        "cat->dog",
        "--editor",
        "ledits",
        "-m",
        str(tiny_sd1),
        "--device",
        "cpu",
    ]
    code = main([*common, "--opt", "edit_guidance_scale=6", "--opt", "num_inversion_steps=2", "--opt",
                 "use_intersect_mask=false", "-o", str(dst)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert Image.open(dst).size == (64, 64)
    capsys.readouterr()
    # --steps are LEDITS++'s inversion steps (it has no num_inference_steps)
    code = main([*common, "--steps", "2", "--opt", "use_intersect_mask=false", "-o", str(dst)])
    err = capsys.readouterr().err
    assert code == 0, err
    code = main([*common, "--opt", "num_inference_steps=2", "-o", str(dst)])
    err = capsys.readouterr().err
    assert code == 2 and "num_inversion_steps" in err and len(err.strip().splitlines()) == 1


def test_string_values_from_a_command_line_are_parsed(tiny_sd1):
    from p2pz_plugins.ledits import LEditsOptions, concept_rows

    enc = encoder_for(model=str(tiny_sd1))
    _, guide = concept_rows(
        [_direction(enc)], LEditsOptions(reverse_editing_direction="False", edit_tokens="12")
    )
    assert [(g.reverse, g.tokens) for g in guide] == [(False, 12), (True, 12)]
    ed = editors.get("ledits", model=str(tiny_sd1), device="cpu", dtype=torch.float32)
    assert ed.make_options(use_intersect_mask="False").use_intersect_mask is False
    with pytest.raises(EditorOptionError, match="true or false"):
        ed.make_options(use_intersect_mask="maybe")
