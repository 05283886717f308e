"""Scorers on constructed cases: tiny random CLIP and DINO ViT built here, loaded back by from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from p2pz_directions.editing import plugins
from p2pz_directions.editing.hookspecs import hookimpl
from p2pz_directions.eval import builtin, scorers
from p2pz_directions.eval.scorers import ScorerError, ScorerModelError
from p2pz_directions.eval.tiny import make_tiny_clip, make_tiny_dino

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
    return make_tiny_dino(tmp_path_factory.mktemp("tiny-dino"))


def random_images(n: int, seed: int = 0, size=(40, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def texts(n, s="a photo of a cat", t="a photo of a dog"):
    return {"source_texts": [s] * n, "target_texts": [t] * n}


def test_builtin_scorers_come_from_the_plugin_hook():
    assert {"clip", "dino-structure", "background-ssim"} <= set(scorers.available())
    report = {p.name: p for p in plugins.plugin_report()}
    assert sorted(report["p2pz-scorers"].scorers) == ["background-ssim", "clip", "dino-structure"]
    info = scorers.metric_info()
    assert info["clip_accuracy"][0] == "clip" and info["clip_accuracy"][1].higher_is_better
    assert (
        info["structure_distance"][0] == "dino-structure"
        and not info["structure_distance"][1].higher_is_better
    )


def test_identical_images_have_structure_distance_zero(tiny_dino):
    dino = scorers.get("dino-structure", model=tiny_dino)
    a = random_images(3, seed=1)
    b = random_images(3, seed=2)
    same = dino.score(a, [im.copy() for im in a], **texts(3))["structure_distance"]
    assert same == [0.0, 0.0, 0.0]
    other = dino.score(a, b, **texts(3))["structure_distance"]
    assert all(v > 1e-4 for v in other)


def test_structure_distance_matches_a_direct_computation(tiny_dino):
    """Keys of the last layer = k_proj(layernorm_before(input of the last layer)); Splice's MSE of
    their cosine self-similarity, computed here from the model's hidden states, not from the hook."""
    from transformers import ViTImageProcessorPil, ViTModel

    a, b = random_images(2, seed=3)
    dino = scorers.get("dino-structure", model=tiny_dino)
    got = dino.score([a], [b], **texts(1))["structure_distance"][0]

    model = ViTModel.from_pretrained(tiny_dino, add_pooling_layer=False).eval()
    proc = ViTImageProcessorPil.from_pretrained(tiny_dino)
    px = proc(images=[a, b], return_tensors="pt")["pixel_values"]
    assert torch.allclose(px, dino._pre([a, b], torch.device("cpu"), torch.float32), atol=1e-5)
    with torch.no_grad():
        hs = model(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        last = model.layers[-1] if hasattr(model, "layers") else model.encoder.layer[-1]
        att = last.attention
        kproj = att.k_proj if hasattr(att, "k_proj") else att.attention.key
        k = F.normalize(kproj(last.layernorm_before(hs)), dim=-1)
    sim = k @ k.transpose(1, 2)
    want = float(((sim[0] - sim[1]) ** 2).mean())
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_clip_accuracy_is_one_for_the_target_texts_best_match(tiny_clip):
    """Among random images, the one CLIP (computed here with transformers' own processor and
    get_*_features) finds closest to the target text relative to the source is scored 1, the
    one closest to the source 0."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    rng = np.random.default_rng(4)
    pool = random_images(8, seed=4) + [
        Image.new("RGB", (40, 48), tuple(int(c) for c in rng.integers(0, 256, 3))) for _ in range(24)
    ]
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    proc = CLIPImageProcessorPil.from_pretrained(tiny_clip)
    with torch.no_grad():
        px = proc(images=pool, return_tensors="pt")["pixel_values"]
        out = model.get_image_features(pixel_values=px)
        img = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
        enc = tok(["a photo of a cat", "a photo of a dog"], padding=True, return_tensors="pt")
        tout = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        txt = F.normalize(tout if isinstance(tout, torch.Tensor) else tout.pooler_output, dim=-1)
    margin = img @ txt[1] - img @ txt[0]
    best, worst = int(margin.argmax()), int(margin.argmin())
    assert margin[best] > 0 > margin[worst]  # the pool holds both kinds

    clip = scorers.get("clip", model=tiny_clip)
    assert torch.allclose(clip.image_features(pool), img, atol=1e-5)
    inputs = [pool[0], pool[0]]
    res = clip.score(inputs, [pool[best], pool[worst]], **texts(2))
    assert res["clip_accuracy"] == [1.0, 0.0]
    # directional similarity: cos(E_I(edit) - E_I(input), E_T(dog) - E_T(cat))
    want = F.cosine_similarity(img[[best, worst]] - img[0], (txt[1] - txt[0])[None], dim=-1)
    assert res["clip_directional_similarity"] == pytest.approx(want.tolist(), abs=1e-5)
    # an edit equal to its input has no direction
    assert clip.score([pool[0]], [pool[0]], **texts(1))["clip_directional_similarity"] == [0.0]


def test_scores_are_deterministic_across_instances(tiny_clip, tiny_dino):
    a, b = random_images(4, seed=5), random_images(4, seed=6)
    for name, m in (("clip", tiny_clip), ("dino-structure", tiny_dino)):
        first = scorers.get(name, model=m).score(a, b, **texts(4))
        second = scorers.get(name, model=m).score(a, b, **texts(4))
        assert first == second


def test_background_ssim_outside_the_mask():
    a = random_images(1, seed=7, size=(32, 32))[0]
    arr = np.asarray(a).copy()
    arr[8:24, 8:24] = 255 - arr[8:24, 8:24]  # change only inside the mask
    b = Image.fromarray(arr)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (2, 2, 30, 30))  # covers the change with a margin wider than the SSIM window radius (5)
    bg = scorers.get("background-ssim")
    res = bg.score(
        [a, a, a, a], [b, b, a, b], masks=[mask, None, mask, Image.new("L", (32, 32), 255)], **texts(4)
    )
    vals = res["background_ssim"]
    assert vals[0] == pytest.approx(1.0, abs=1e-5)  # background untouched
    assert vals[1] is None and vals[3] is None  # no mask / no background
    assert vals[2] == pytest.approx(1.0, abs=1e-6)
    # the same change with a mask that leaves it in the "background" is penalised
    small = Image.new("L", (32, 32), 0)
    small.paste(255, (0, 0, 8, 8))
    assert bg.score([a], [b], masks=[small], **texts(1))["background_ssim"][0] < 0.9
    # SSIM of a slightly noisier copy is below 1 and symmetric
    ta, tb = builtin._to_chw(a), builtin._to_chw(b)
    assert float(builtin.ssim_map(ta, ta).mean()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(builtin.ssim_map(ta, tb), builtin.ssim_map(tb, ta), atol=1e-6)
    # Wang et al.'s formula with the 11x11 Gaussian window applied in 2-D, written out here
    g = builtin._gaussian(11, 1.5)
    k = (g[:, None] * g[None, :]).expand(3, 1, 11, 11).contiguous()

    def blur(x):
        return F.conv2d(F.pad(x[None], (5, 5, 5, 5), mode="reflect"), k, groups=3)[0]

    ma, mb = blur(ta), blur(tb)
    va, vb, cov = blur(ta * ta) - ma**2, blur(tb * tb) - mb**2, blur(ta * tb) - ma * mb
    c1, c2 = 0.01**2, 0.03**2
    want = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    assert torch.allclose(builtin.ssim_map(ta, tb), want.mean(0), atol=1e-5)


def test_scorer_model_of_the_wrong_kind_is_a_clear_error(tiny_clip, tiny_dino, tmp_path):
    with pytest.raises(ScorerModelError, match="not CLIP.*CLIPModel"):
        scorers.get("clip", model=tiny_dino)
    with pytest.raises(ScorerModelError, match="not a ViT.*dino-vitb8"):
        scorers.get("dino-structure", model=tiny_clip)
    with pytest.raises(ScorerModelError, match="cannot load the CLIP model"):
        scorers.get("clip", model=tmp_path / "nowhere")
    with pytest.raises(LookupError, match="unknown scorer 'clipp'.*Did you mean 'clip'"):
        scorers.get("clipp")


def test_mismatched_batch_is_refused(tiny_dino):
    with pytest.raises(ScorerError, match="2 inputs but 1 edits"):
        scorers.get("dino-structure", model=tiny_dino).score(random_images(2), random_images(1), **texts(2))


class _Brightness(scorers.Scorer):
    name = "brightness-test"
    metrics = (scorers.Metric("brightness_gain", True, "mean pixel change"),)

    def score(self, inputs, edits, *, source_texts, target_texts, masks=None):
        return {
            "brightness_gain": [
                float(np.asarray(e, np.float32).mean() - np.asarray(i, np.float32).mean())
                for i, e in zip(inputs, edits, strict=True)
            ]
        }


class _ThirdParty:
    @hookimpl
    def p2pz_register_scorers(self):
        return [_Brightness]


def test_third_party_scorer_plugin():
    plugins.register(_ThirdParty(), name="bright")
    try:
        assert "brightness-test" in scorers.available()
        s = scorers.get("brightness-test")
        dark, light = Image.new("RGB", (8, 8), (10, 10, 10)), Image.new("RGB", (8, 8), (30, 30, 30))
        assert s.score([dark], [light], **texts(1)) == {"brightness_gain": [20.0]}
    finally:
        plugins.unregister("bright")
