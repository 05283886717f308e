"""pix2pix-zero equals diffusers' StableDiffusionPix2PixZeroPipeline on tiny models (CPU, fp32).

Ground truth: no real weights exist here, so the reference is diffusers' own (deprecated)
pipeline run with the same inputs, settings and generator: ``invert`` then ``__call__`` for a
real image, ``__call__`` alone for a synthetic one. Directions are random concept embeddings for
the tiny model's text encoder, published to the registry and used by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz_directions import editors
from p2pz_directions.core.concept import Concept, Direction
from p2pz_directions.core.store import LocalStore
from p2pz_directions.editing.editors import EditorError, EditorOptionError
from p2pz_directions.editing.models import encoder_for

TOL = 1e-4
STEPS = 2
SIZE = 32  # pixels; the tiny VAE downsamples by 2 -> 16x16 latents


def publish_pair(folder, names=("cat", "dog"), seed=0) -> Direction:
    enc = encoder_for(model=str(folder))
    g = torch.Generator().manual_seed(seed)
    store = LocalStore()
    cs = [store.publish(Concept(n, torch.randn(77, enc.hidden_size, generator=g), enc)) for n in names]
    return Direction(cs[0], cs[1])


def test_image(seed: int = 0, size: int = SIZE) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8))


test_image.__test__ = False  # a helper, not a test


def _reference_pipeline(folder, **extra):
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionPix2PixZeroPipeline

    kw = dict(caption_generator=None, caption_processor=None, inverse_scheduler=None)
    kw.update(extra)
    pipe = StableDiffusionPix2PixZeroPipeline.from_pretrained(
        str(folder), safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kw
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.inverse_scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def ref_pipes(tiny_sd1, tiny_sd2):
    return {
        "sd1": (tiny_sd1, _reference_pipeline(tiny_sd1)),
        "sd2": (tiny_sd2, _reference_pipeline(tiny_sd2)),
    }


@pytest.fixture(scope="session")
def our_editors(tiny_sd1, tiny_sd2):
    return {
        "sd1": editors.get("pix2pix-zero", model=str(tiny_sd1), device="cpu", dtype=torch.float32),
        "sd2": editors.get("pix2pix-zero", model=str(tiny_sd2), device="cpu", dtype=torch.float32),
    }


REG = dict(lambda_auto_corr=20.0, lambda_kl=20.0, num_reg_steps=2, num_auto_corr_rolls=2)
NO_REG = dict(lambda_auto_corr=0.0, lambda_kl=0.0, num_reg_steps=0, num_auto_corr_rolls=5)
CASES = [
    ("sd1", "real", REG, 0.0),
    ("sd1", "real", NO_REG, 0.5),
    ("sd1", "synthetic", None, 0.5),
    ("sd2", "real", REG, 0.5),
    ("sd2", "synthetic", None, 0.0),
]


@pytest.mark.parametrize(
    "config,mode,reg,eta",
    CASES,
    ids=[f"{c}-{m}-{'reg' if r is REG else 'noreg'}-eta{e}" for c, m, r, e in CASES],
)
def test_equal_to_diffusers(config, mode, reg, eta, ref_pipes, our_editors):
    folder, pipe = ref_pipes[config]
    ed = our_editors[config]
    d = publish_pair(folder)
    prompt = "a photo of a cat"
    xa = 0.1 if config == "sd1" else 0.01
    common = dict(num_inference_steps=STEPS, cross_attention_guidance_amount=xa, output_type="np", eta=eta)

    g = torch.Generator().manual_seed(0)
    if mode == "real":
        img = test_image()
        inv = pipe.invert(prompt, image=img, num_inference_steps=STEPS, generator=g, **reg).latents
        expected = pipe(
            prompt,
            source_embeds=d.source_embeds,
            target_embeds=d.target_embeds,
            latents=inv,
            generator=g,
            negative_prompt=prompt,
            **common,
        ).images
        res = ed.edit(
            img, "cat->dog", prompt=prompt, generator=torch.Generator().manual_seed(0), **reg, **common
        )
        assert res.extra["negative_prompt"] == prompt  # a photo's caption is its negative prompt by default
        assert (res.inverted_latents - inv).abs().max().item() < 1e-5
        assert res.original.size == img.size if hasattr(res.original, "size") else True
    else:
        expected = pipe(
            prompt,
            source_embeds=d.source_embeds,
            target_embeds=d.target_embeds,
            generator=g,
            height=SIZE,
            width=SIZE,
            **common,
        ).images
        res = ed.edit(None, "cat->dog", prompt=prompt, seed=0, height=SIZE, width=SIZE, **common)
        assert res.extra["mode"] == "synthetic" and res.extra["negative_prompt"] == ""
    assert res.image.shape == expected.shape == (1, SIZE, SIZE, 3)
    diff = float(np.abs(res.image - expected).max())
    assert diff < TOL, f"max abs pixel difference {diff:.2e} >= {TOL}"
    assert float(np.abs(expected - 0.5).max()) > 0.05  # not a blank image


def test_exact_float16_is_bit_equal_to_diffusers(tiny_sd1):
    """In float16, ``attention="exact"`` (the default on the CPU) rounds as diffusers does: the
    regularizer's gradients go through autograd there, as in the pipeline (the closed form,
    used by the fast paths, differs by an ulp here and there, which 3 inversion steps grow to ~1e-2)."""
    pipe = _reference_pipeline(tiny_sd1, torch_dtype=torch.float16)
    d = publish_pair(tiny_sd1)
    prompt, img = "a photo of a cat", test_image(7)
    common = dict(num_inference_steps=3, cross_attention_guidance_amount=0.1, output_type="np")
    g = torch.Generator().manual_seed(0)
    inv = pipe.invert(prompt, image=img, num_inference_steps=3, generator=g, **REG).latents
    expected = pipe(
        prompt, source_embeds=d.source_embeds, target_embeds=d.target_embeds, latents=inv, generator=g,
        negative_prompt=prompt, **common,
    ).images  # fmt: skip
    ed = editors.get("pix2pix-zero", pipe=pipe)
    res = ed.edit(img, d, prompt=prompt, generator=torch.Generator().manual_seed(0), **REG, **common)
    assert res.inverted_latents.dtype == torch.float16 and res.extra["loops"] == "eager"
    assert torch.equal(res.inverted_latents, inv)
    assert float(np.abs(res.image - expected).max()) == 0.0
    assert float(np.abs(expected - 0.5).max()) > 0.05  # not a blank image


def test_regularization_and_direction_change_the_result(our_editors, tiny_sd1):
    ed = our_editors["sd1"]
    d = publish_pair(tiny_sd1)
    img = test_image(1)
    kw = dict(prompt="a cat", num_inference_steps=1, seed=0, output_type="np")
    a = ed.edit(img, d, **REG, **kw)
    b = ed.edit(img, d, **NO_REG, **kw)
    c = ed.edit(img, d * 0.0, **NO_REG, **kw)
    assert not torch.equal(a.inverted_latents, b.inverted_latents)
    assert np.abs(b.image - c.image).max() > 1e-3  # the direction does something
    # with a zero direction and no guidance, the edit is the reconstruction
    e = ed.edit(img, d * 0.0, **NO_REG, cross_attention_guidance_amount=0.0, **kw)
    assert np.abs(e.image - e.reconstruction).max() < 1e-5


def test_fused_attention_is_close_to_exact(our_editors, tiny_sd1):
    ed = our_editors["sd1"]
    d = publish_pair(tiny_sd1)
    kw = dict(prompt="a cat", num_inference_steps=1, seed=0, output_type="np", **REG)
    exact = ed.edit(test_image(2), d, attention="exact", **kw)
    fused = ed.edit(test_image(2), d, attention="fused", **kw)
    assert np.abs(exact.image - fused.image).max() < 1e-3
    with pytest.raises(EditorOptionError, match="attention must be"):
        ed.edit(test_image(2), d, attention="fast", **kw)


def test_graph_and_compile_loops_fuse_projections_and_encode_the_caption_once(tiny_sd1, monkeypatch):
    """Issue 10: under a graphs or compile runner the edit runs each attention layer's projections as
    one matrix product (kept with the runner, the same object edit after edit) and the caption -
    prompt, negative prompt, the inversion's prompt - goes through the text encoder once. Here the
    runner runs each step eagerly on the CPU, so the edit must equal the eager loops' edit (both with
    PyTorch's fused attention: on the CPU ``attention="auto"`` is exact, which never fuses)."""
    from p2pz_directions import sampling as S

    class EagerCompile(S.UNetRunner):  # a 'compile' runner that runs each step as it is
        def __call__(self, name, fn, *inputs, key=()):
            return fn(*inputs)

    ed = editors.get("pix2pix-zero", model=str(tiny_sd1), device="cpu", dtype=torch.float32)
    d = publish_pair(tiny_sd1)
    kw = dict(prompt="a cat", num_inference_steps=STEPS, seed=0, output_type="np", attention="fused", **REG)
    te = ed.load_components()["text_encoder"]
    runs = []
    handle = te.register_forward_hook(lambda *a: runs.append(1))
    try:
        want = ed.edit(test_image(3), d, **kw)
        assert len(runs) == 1  # was 3 before the cache
    finally:
        handle.remove()
    runner = EagerCompile("compile")
    monkeypatch.setattr(ed, "unet_runner", lambda mode: runner)
    got = ed.edit(test_image(3), d, loops="compile", **kw)
    fused = [v for k, v in runner._resources.items() if k[0] == "fused-projections"]
    assert len(fused) == 1 and isinstance(fused[0], S.FusedProjections) and fused[0].weights
    np.testing.assert_allclose(got.image, want.image, atol=TOL)
    np.testing.assert_allclose(got.reconstruction, want.reconstruction, atol=TOL)
    again = ed.edit(test_image(3), d, loops="compile", **kw)
    assert [v for k, v in runner._resources.items() if k[0] == "fused-projections"] == fused
    np.testing.assert_allclose(again.image, got.image, atol=1e-6)
    unet = ed.load_components()["unet"]
    assert type(ed)._fused(S.UNetRunner("eager"), unet, False) is None
    assert type(ed)._fused(runner, unet, True) is None  # exact attention: diffusers' three projections


def test_graph_loops_need_cuda(our_editors, tiny_sd2):
    d = publish_pair(tiny_sd2)
    with pytest.raises(EditorOptionError, match="needs a CUDA device"):
        our_editors["sd2"].edit(test_image(6), d, prompt="a cat", num_inference_steps=1, loops="graphs")
    with pytest.raises(EditorOptionError, match="loops must be"):
        our_editors["sd2"].edit(test_image(6), d, prompt="a cat", num_inference_steps=1, loops="static")


@pytest.fixture
def no_tf32():
    """Plain float32 convolutions (cuDNN uses TF32 by default), so that kernel choices differ by
    float32 rounding only."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_graphs_replayed_on_new_inputs_equal_eager_steps(tiny_sd2, no_tf32):
    """Each pix2pix-zero step, captured with one set of inputs and replayed with another (latents,
    timestep, alpha, roll shifts, step index), equals the eager step on the second set: no input,
    random draw or closure value is frozen into a graph. No sampling loop amplifies rounding here."""
    from diffusers import UNet2DConditionModel

    from p2pz_directions import sampling as S

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd2), subfolder="unet").to("cuda").eval()
    unet.requires_grad_(False)
    c, hw, dim = unet.config.in_channels, unet.config.sample_size, unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)

    def inputs(t, seed):
        x = torch.randn(1, c, hw, hw, generator=g).cuda()
        e = torch.randn(1, 77, dim, generator=g).cuda()
        shifts = S.draw_roll_shifts(tuple(x.shape), torch.Generator().manual_seed(seed), 4).cuda()
        return x, torch.tensor(t, device="cuda"), e, torch.tensor(0.1 * seed, device="cuda"), shifts

    runner = S.UNetRunner("graphs")
    reg = S.Regularizer(20.0, 20.0, 2, 2)

    def inv(x, t, e, alpha, shifts):
        return S.inversion_step(
            unet, x, t, e, alpha, shifts, guidance_scale=1.0, regularizer=reg, prediction_type="v_prediction"
        )

    first, second = inputs(101, 1), inputs(801, 2)
    a1, a2 = runner("invert", inv, *first), runner("invert", inv, *second)
    assert len(runner.graphs) == 1 and _rel(a1, a2) > 1e-2  # one graph, other inputs, other output
    assert _rel(a2, inv(*second)) < 1e-4 and _rel(a1, inv(*first)) < 1e-4

    maps, eager_maps = S.AttentionMaps(2), S.AttentionMaps(2)
    (x1, t1, *_), (x2, t2, *_) = first, second
    e = torch.randn(2, 77, dim, generator=g).cuda()
    e_edit = e + 0.5 * torch.randn(2, 77, dim, generator=g).cuda()  # as a direction moves the caption
    i0, i1 = torch.tensor(0, device="cuda"), torch.tensor(1, device="cuda")

    def ref(m):
        return lambda x, t, emb, i: S.reference_step(unet, m, x, t, emb, i, guidance_scale=7.5)

    with S.attention_maps(unet, maps):
        r1, r2 = runner("reference", ref(maps), x1, t1, e, i0), runner("reference", ref(maps), x2, t2, e, i1)
    with S.attention_maps(unet, eager_maps):
        e1, e2 = ref(eager_maps)(x1, t1, e, i0), ref(eager_maps)(x2, t2, e, i1)
    assert _rel(r1, e1) < 1e-4 and _rel(r2, e2) < 1e-4 and _rel(r1, r2) > 1e-2
    assert len(maps.buffers) == len(eager_maps.buffers) > 0
    for got, want in zip(maps.buffers, eager_maps.buffers, strict=True):
        assert _rel(got, want) < 1e-4  # both steps' maps written, at their own index

    def edit(x, t, emb, i):
        return S.cross_attention_guided_step(unet, maps, x, t, emb, i, amount=0.01, guidance_scale=7.5)

    with S.attention_maps(unet, maps):
        (n1, l1), (n2, l2) = (
            runner("edit", edit, x1, t1, e_edit, i0),
            runner("edit", edit, x2, t2, e_edit, i1),
        )
        (m1, k1), (m2, k2) = edit(x1, t1, e_edit, i0), edit(x2, t2, e_edit, i1)
    assert len(runner.graphs) == 3
    assert _rel(n1, m1) < 1e-4 and _rel(n2, m2) < 1e-4 and _rel(n1, n2) > 1e-2
    assert _rel(l1, k1) < 1e-4 and _rel(l2, k2) < 1e-4 and (l2 - x2).abs().max() > 0  # the guidance moved x


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_loops_equal_eager_loops_on_gpu(tiny_sd2, no_tf32):
    """The CUDA-graph loops compute what the eager loops do, to within the eager loops' own
    run-to-run spread on the GPU: a few of the kernels the guided steps use are not deterministic
    (the backward passes of fused attention and of nearest upsampling add with atomics), and 2 x 2
    guided steps grow that rounding. Measured on an H200: see benchmarks/RESULTS.md."""
    ed = editors.get("pix2pix-zero", model=str(tiny_sd2), device="cuda", dtype=torch.float32)
    d = publish_pair(tiny_sd2)
    kw = dict(prompt="a cat", num_inference_steps=2, seed=0, output_type="np", attention="fused", eta=0.3)
    kw.update(REG, cross_attention_guidance_amount=0.01)  # the SD 2.x setting (NAN_ADVICE)
    eager = ed.edit(test_image(6), d, loops="eager", **kw)
    eager2 = ed.edit(test_image(6), d, loops="eager", **kw)
    graphs = ed.edit(test_image(6), d, loops="graphs", **kw)
    n_graphs = len(ed.runners["graphs"].graphs)
    again = ed.edit(test_image(6), d, loops="graphs", **kw)  # the captured graphs are replayed
    assert graphs.extra["loops"] == "graphs" and eager.extra["loops"] == "eager"
    assert n_graphs == len(ed.runners["graphs"].graphs) == 3  # invert, reference, edit
    assert (graphs.inverted_latents - eager.inverted_latents).abs().max().item() < 1e-4
    spread = float(np.abs(eager.image - eager2.image).max())
    tol = max(1e-3, 4 * spread)
    diff, replay = (
        float(np.abs(graphs.image - eager.image).max()),
        float(np.abs(graphs.image - again.image).max()),
    )
    assert diff < tol, f"graphs vs eager {diff:.2e}; eager vs eager {spread:.2e}"
    assert replay < tol, f"graphs vs graphs {replay:.2e}; eager vs eager {spread:.2e}"
    assert float(np.abs(eager.image - 0.5).max()) > 0.05  # not a blank image


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_loops_compile_the_vae_too_and_equal_eager_on_gpu(tiny_sd2, no_tf32, monkeypatch, tmp_path):
    """loops='compile' compiles the steps and, since issue 10's last saving, the VAE's encoder and
    decoder: all replayed as CUDA graphs, the edit within the eager loops' own spread."""
    monkeypatch.setenv("P2PZ_HOME", str(tmp_path / "home"))
    ed = editors.get("pix2pix-zero", model=str(tiny_sd2), device="cuda", dtype=torch.float32)
    d = publish_pair(tiny_sd2)
    kw = dict(prompt="a cat", num_inference_steps=2, seed=0, output_type="np", attention="fused")
    kw.update(REG, cross_attention_guidance_amount=0.01)
    eager, eager2 = (ed.edit(test_image(6), d, loops="eager", **kw) for _ in range(2))
    compiled = ed.edit(test_image(6), d, loops="compile", **kw)
    names = {k[0] for k, g in ed.runners["compile"].graphs.items() if g is not None}
    assert {"vae-encode", "vae-decode"} <= names, names
    spread = float(np.abs(eager.image - eager2.image).max())
    diff = float(np.abs(compiled.image - eager.image).max())
    assert diff < max(2e-3, 4 * spread), f"compile vs eager {diff:.2e}; eager vs eager {spread:.2e}"
    assert (compiled.inverted_latents - eager.inverted_latents).abs().max().item() < 1e-3


def test_pipe_components_are_reused_and_restored(ref_pipes):
    folder, pipe = ref_pipes["sd1"]
    d = publish_pair(folder)
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    ed = editors.get("pix2pix-zero", pipe=pipe)
    kw = dict(prompt="a cat", num_inference_steps=1, seed=0, output_type="np", **NO_REG)
    res_pipe = ed.edit(test_image(3), "cat->dog", **kw)
    assert ed.load_components()["unet"] is pipe.unet
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before
    res_model = editors.get("pix2pix-zero", model=str(folder), device="cpu").edit(test_image(3), d, **kw)
    assert np.abs(res_pipe.image - res_model.image).max() < TOL


def test_outputs_batches_callbacks(our_editors, tiny_sd1):
    ed = our_editors["sd1"]
    d = publish_pair(tiny_sd1)
    seen, phases = [], []
    res = ed.edit(
        None,
        d,
        prompt="a cat",
        seed=1,
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        num_images_per_prompt=2,
        callback=lambda i, t, lat: seen.append((i, int(t), tuple(lat.shape))),
        progress=lambda *a: phases.append(a),
    )
    assert isinstance(res.image, list) and len(res.image) == 2 and res.image[0].size == (SIZE, SIZE)
    assert len(seen) == 2 and seen[0][2] == (2, 4, 16, 16)  # the reference loop, as diffusers' callback
    assert ("reference", 2, 2) in phases and ("edit", 2, 2) in phases
    lat = ed.edit(
        None, d, prompt="a cat", seed=1, height=SIZE, width=SIZE, num_inference_steps=2, output_type="latent"
    )
    assert lat.image.shape == (1, 4, 16, 16)
    # inverted latents can be reused: no inversion the second time
    img = test_image(4)
    first = ed.edit(img, d, prompt="a cat", num_inference_steps=2, seed=0, output_type="np")
    phases.clear()
    again = ed.edit(
        img, d, prompt="a cat", num_inference_steps=2, seed=0, output_type="np", latents=first.inverted_latents,
        progress=lambda *a: phases.append(a),
    )  # fmt: skip
    assert not any(p[0] == "invert" for p in phases)
    assert np.abs(first.image - again.image).max() < 1e-6


def test_synthetic_needs_a_prompt(our_editors, tiny_sd1):
    d = publish_pair(tiny_sd1)
    with pytest.raises(EditorOptionError, match="pass prompt="):
        our_editors["sd1"].edit(None, d)


def test_nan_latents_stop_with_advice(our_editors, tiny_sd2):
    d = publish_pair(tiny_sd2)
    with pytest.raises(EditorError, match=r"NaN.*--xa-guidance.*0\.01 or less"):
        our_editors["sd2"].edit(
            test_image(),
            d,
            prompt="a cat",
            num_inference_steps=2,
            seed=0,
            cross_attention_guidance_amount=1e38,
        )


# -- BLIP ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory):
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    path = tmp_path_factory.mktemp("tiny-blip")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "[DEC]",
        "a",
        "photography",
        "of",
        "cat",
        "dog",
        "on",
    ]
    (path / "vocab.txt").write_text("\n".join(words) + "\n", "utf-8")
    tok = BertTokenizer(str(path / "vocab.txt"), bos_token="[DEC]")
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config=dict(
            vocab_size=len(words),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=160,
            encoder_hidden_size=32,
            bos_token_id=5,
            pad_token_id=0,
            sep_token_id=3,
            eos_token_id=3,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    BlipForConditionalGeneration(cfg).eval().save_pretrained(path)
    proc.save_pretrained(path)
    return path


def test_blip_caption_matches_diffusers_and_feeds_the_edit(tiny_blip, tiny_sd1):
    from p2pz_plugins.pix2pix_zero import BlipCaptioner
    from transformers import BlipForConditionalGeneration, BlipProcessor

    img = test_image(5)
    pipe = _reference_pipeline(
        tiny_sd1,
        caption_generator=BlipForConditionalGeneration.from_pretrained(tiny_blip),
        caption_processor=BlipProcessor.from_pretrained(tiny_blip),
    )
    expected = pipe.generate_caption(img).strip()
    ours = BlipCaptioner(str(tiny_blip)).caption([img])[0]
    assert ours == expected and ours.startswith("a photography of")
    d = publish_pair(tiny_sd1)
    ed = editors.get("pix2pix-zero", model=str(tiny_sd1), device="cpu", caption_model=str(tiny_blip))
    phases = []
    res = ed.edit(img, d, num_inference_steps=1, seed=0, progress=lambda *a: phases.append(a[0]), **NO_REG)
    assert res.caption == expected and res.extra["negative_prompt"] == expected
    assert phases[0] == "caption"
    missing = editors.get(
        "pix2pix-zero", model=str(tiny_sd1), device="cpu", caption_model=str(tiny_sd1 / "nope")
    )
    with pytest.raises(EditorError, match="(?i)pass prompt="):
        missing.edit(img, d, num_inference_steps=1)


# ---------------------------------------------------------------------------------------------------
# the reference and edit passes in step (passes="lockstep")
# ---------------------------------------------------------------------------------------------------
LOCKSTEP_CASES = [
    ("sd1", "real", REG, "exact"),
    ("sd1", "synthetic", None, "fused"),
    ("sd2", "real", NO_REG, "fused"),
]


@pytest.mark.parametrize(
    "config,mode,reg,attention", LOCKSTEP_CASES, ids=[f"{c}-{m}-{a}" for c, m, _, a in LOCKSTEP_CASES]
)
def test_lockstep_passes_equal_diffusers(config, mode, reg, attention, ref_pipes, our_editors):
    """The passes in step (one step's maps, the edit's prediction batched with the reference's next
    step) give diffusers' images: the rows of a batch do not see each other."""
    folder, pipe = ref_pipes[config]
    ed = our_editors[config]
    d = publish_pair(folder)
    prompt = "a photo of a cat"
    xa = 0.1 if config == "sd1" else 0.01
    common = dict(num_inference_steps=3, cross_attention_guidance_amount=xa, output_type="np")
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt=prompt, attention=attention, passes="lockstep", **common)
    if mode == "real":
        img = test_image(5)
        inv = pipe.invert(prompt, image=img, num_inference_steps=3, generator=g, **reg).latents
        expected = pipe(
            prompt, source_embeds=d.source_embeds, target_embeds=d.target_embeds, latents=inv, generator=g,
            negative_prompt=prompt, **common,
        )  # fmt: skip
        res = ed.edit(img, "cat->dog", generator=torch.Generator().manual_seed(0), **reg, **kw)
    else:
        expected = pipe(
            prompt, source_embeds=d.source_embeds, target_embeds=d.target_embeds, generator=g, height=SIZE,
            width=SIZE, **common,
        )  # fmt: skip
        res = ed.edit(None, "cat->dog", seed=0, height=SIZE, width=SIZE, **kw)
        # synthetic: the "original" is the reference pass, decoded - diffusers' pipeline does not return it
    assert res.extra["passes"] == "lockstep"
    diff = float(np.abs(res.image - expected.images).max())
    assert diff < TOL, f"max abs pixel difference {diff:.2e} >= {TOL}"
    assert float(np.abs(expected.images - 0.5).max()) > 0.05
    seq = ed.edit(None if mode == "synthetic" else img, "cat->dog", **{**kw, "passes": "sequential"},
                  **({"seed": 0, "height": SIZE, "width": SIZE} if mode == "synthetic" else
                     {"generator": torch.Generator().manual_seed(0), **reg}))  # fmt: skip
    assert seq.extra["passes"] == "sequential"
    assert np.abs(np.asarray(seq.reconstruction if mode == "real" else seq.original, dtype=np.float32)
                  - np.asarray(res.reconstruction if mode == "real" else res.original, dtype=np.float32)).max() < TOL  # fmt: skip


def test_passes_auto_is_lockstep_unless_exact_or_random(our_editors, tiny_sd1):
    ed = our_editors["sd1"]
    d = publish_pair(tiny_sd1)
    kw = dict(prompt="a cat", num_inference_steps=2, seed=0, output_type="np", **NO_REG)
    img = test_image(7)
    assert ed.edit(img, d, attention="fused", **kw).extra["passes"] == "lockstep"
    assert ed.edit(img, d, **kw).extra["passes"] == "sequential"  # exact attention on the CPU
    # DDIM with eta > 0 draws noise each step: in step the two passes would draw in another order
    random = ed.edit(img, d, attention="fused", eta=0.5, **kw)
    assert random.extra["passes"] == "sequential"
    with pytest.raises(EditorOptionError, match="passes must be"):
        ed.edit(img, d, passes="interleaved", **kw)
    with pytest.raises(EditorOptionError, match="drop attention_maps_device"):
        ed.edit(img, d, passes="lockstep", attention_maps_device="cpu", **kw)


def test_lockstep_callbacks_progress_and_interrupt(our_editors, tiny_sd1):
    """In step, each pass still gets diffusers' callbacks (the legacy one in the reference pass
    only), its own progress, ``editor.phase``; an interrupt stops both passes."""
    ed = our_editors["sd1"]
    d = publish_pair(tiny_sd1)
    legacy, ends, progress = [], [], []

    def on_end(pipe, i, t, tensors):
        ends.append((pipe.phase, i))
        return tensors

    kw = dict(prompt="a cat", num_inference_steps=3, seed=0, output_type="np", attention="fused", **NO_REG)
    res = ed.edit(
        test_image(8), d, callback=lambda i, t, lat: legacy.append(i), callback_on_step_end=on_end,
        progress=lambda *a: progress.append(a), **kw,
    )  # fmt: skip
    assert res.extra["passes"] == "lockstep"
    assert legacy == [0, 1, 2, 0, 1, 2]  # the inversion, then the reference pass (as diffusers)
    assert ends == [
        ("reference", 0),
        ("edit", 0),
        ("reference", 1),
        ("edit", 1),
        ("reference", 2),
        ("edit", 2),
    ]
    assert [p for p in progress if p[0] in ("reference", "edit")][-2:] == [
        ("reference", 3, 3),
        ("edit", 3, 3),
    ]

    def stop(pipe, i, t, tensors):
        if pipe.phase == "edit" and i == 0:
            pipe.interrupt = True
        ends.append((pipe.phase, i))
        return tensors

    ends.clear()
    ed.edit(test_image(8), d, callback_on_step_end=stop, **kw)
    assert ends == [("reference", 0), ("edit", 0)]


def test_lockstep_keeps_one_step_of_maps(tiny_sd1):
    """`lockstep_passes` with `AttentionMaps(1)` equals the sequential predictors with a map per step."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from p2pz_directions import sampling as S

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd1), subfolder="unet").eval()
    sched = DDIMScheduler.from_pretrained(str(tiny_sd1), subfolder="scheduler")
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(1, 4, 16, 16, generator=g)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    edit_emb = emb + 0.3 * torch.randn(emb.shape, generator=g)

    def schedule():
        s = S.copy_scheduler(sched)
        s.set_timesteps(4)
        return s

    with torch.no_grad():
        maps = S.AttentionMaps(4)
        with S.attention_maps(unet, maps):
            rec = S.denoise(
                S.reference_predictor(unet, maps), x_T, schedule(), tensors={"prompt_embeds": emb}
            )
            edit = S.denoise(
                S.guided_predictor(unet, maps), x_T, schedule(), tensors={"prompt_embeds": edit_emb}
            )
        one = S.AttentionMaps(1)
        with S.attention_maps(unet, one):
            rec2, edit2 = S.lockstep_passes(
                unet, one, x_T, dict(scheduler=schedule(), tensors={"prompt_embeds": emb}),
                dict(scheduler=schedule(), tensors={"prompt_embeds": edit_emb}),
            )  # fmt: skip
    assert maps.buffers[0].shape[0] == 4 and one.buffers[0].shape[0] == 1
    assert one.buffers[0].shape[1:] == maps.buffers[0].shape[1:]  # the reference rows only
    # float32 rounding of another batch size (latents of magnitude ~5)
    assert (rec2 - rec).abs().max() < 1e-5 and (edit2 - edit).abs().max() < 1e-4
    assert (edit - rec).abs().max() > 1e-3  # the guidance and the direction did something


def test_draws_random_numbers_by_dry_run():
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        LMSDiscreteScheduler,
    )

    from p2pz_directions import sampling as S

    def draws(cls, eta=0.0, **config):
        s = cls(**config)
        s.set_timesteps(4)
        gen = torch.Generator().manual_seed(1)
        before_user, before_global = gen.get_state(), torch.get_rng_state()
        out = S.draws_random_numbers(s, (1, 4, 8, 8), S.extra_step_kwargs(s, gen, eta))
        assert torch.equal(gen.get_state(), before_user) and torch.equal(torch.get_rng_state(), before_global)
        assert s.timesteps.numel() == 4  # the scheduler itself is not stepped
        return out

    assert not draws(DDIMScheduler)
    assert draws(DDIMScheduler, eta=0.5)
    assert not draws(LMSDiscreteScheduler)
    assert not draws(DPMSolverMultistepScheduler)
    assert draws(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++")
    assert draws(EulerAncestralDiscreteScheduler)
    assert draws(DDPMScheduler)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lockstep_graph_loops_equal_eager_and_sequential_on_gpu(tiny_sd2, no_tf32):
    """On the GPU, the passes in step replay three graphs (invert, the gradient step, the paired
    pass) and give what the eager loops and the sequential passes give, within the eager loops'
    own spread (see test_graph_loops_equal_eager_loops_on_gpu)."""
    ed = editors.get("pix2pix-zero", model=str(tiny_sd2), device="cuda", dtype=torch.float32)
    d = publish_pair(tiny_sd2)
    kw = dict(prompt="a cat", num_inference_steps=3, seed=0, output_type="np", attention="fused")
    kw.update(REG, cross_attention_guidance_amount=0.01)
    eager = ed.edit(test_image(6), d, loops="eager", **kw)
    eager2 = ed.edit(test_image(6), d, loops="eager", **kw)
    sequential = ed.edit(test_image(6), d, loops="eager", passes="sequential", **kw)
    graphs = ed.edit(test_image(6), d, loops="graphs", **kw)
    names = sorted(k[0] for k in ed.runners["graphs"].graphs)
    assert eager.extra["passes"] == graphs.extra["passes"] == "lockstep"
    assert names == ["guide", "invert", "pair"]
    tol = max(1e-3, 4 * float(np.abs(eager.image - eager2.image).max()))
    for other in (graphs, sequential):
        diff = float(np.abs(other.image - eager.image).max())
        assert diff < tol, (
            f"{other.extra['loops']}/{other.extra['passes']} vs eager lockstep {diff:.2e} (tol {tol:.2e})"
        )
    assert float(np.abs(eager.image - 0.5).max()) > 0.05


def test_lockstep_equals_sequential_for_a_multistep_scheduler_and_a_batch(tiny_sd1):
    """LMS keeps a history of derivatives: in step, the reference and the edit each step their own
    copy. A batch of two images (one prompt each) runs in step as it does in sequence."""
    from diffusers import LMSDiscreteScheduler

    from p2pz_directions import sampling as S

    base = editors.get("pix2pix-zero", model=str(tiny_sd1), device="cpu", dtype=torch.float32)
    lms = S.copy_scheduler(base.schedulers()[0], LMSDiscreteScheduler)
    ed = editors.get("pix2pix-zero", model=str(tiny_sd1), device="cpu", dtype=torch.float32, scheduler=lms)
    d = publish_pair(tiny_sd1)
    kw = dict(
        prompt=["a cat", "a cat on grass"], num_inference_steps=3, seed=0, output_type="np",
        attention="fused", **REG,
    )  # fmt: skip
    imgs = [test_image(9), test_image(10)]
    step = ed.edit(imgs, d, **kw)
    seq = ed.edit(imgs, d, passes="sequential", **kw)
    assert step.extra["passes"] == "lockstep" and step.extra["scheduler"] == "LMSDiscreteScheduler"
    assert seq.extra["passes"] == "sequential"
    assert step.image.shape == seq.image.shape == (2, SIZE, SIZE, 3)
    assert np.abs(step.image - seq.image).max() < TOL
    assert np.abs(np.asarray(step.reconstruction) - np.asarray(seq.reconstruction)).max() < TOL


def test_a_scheduler_whose_dry_run_fails_is_taken_to_draw():
    from diffusers import DDIMScheduler

    from p2pz_directions import sampling as S

    class Odd(DDIMScheduler):
        def step(self, *a, **kw):
            raise RuntimeError("needs a GPU")

    s = Odd()
    s.set_timesteps(3)
    before = torch.get_rng_state()
    assert S.draws_random_numbers(s, (1, 4, 8, 8), {}) is True
    assert torch.equal(before, torch.get_rng_state())
