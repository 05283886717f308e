"""p2pz's lean UNet and VAE (`p2pz_directions.lean`) against diffusers' classes, and their loading.

The lean classes must compute what diffusers computes, bit for bit in float32 on the CPU, for every
config they accept (the tiny SD 1.x / 2.x configs, diffusers' dummy configs with their test-case
changes) and refuse the others; loading must take exactly the file's tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers_dummies import dummy_unet, dummy_vae

from p2pz_directions.editing.demo import make_components
from p2pz_directions.lean import LeanUnsupported
from p2pz_directions.lean.loading import load_component
from p2pz_directions.lean.unet import LeanUNet
from p2pz_directions.lean.vae import LeanVAE


def _lean_copy(module, cls):
    module.eval()  # as from_pretrained leaves a model (in training mode diffusers' resnets differ slightly)
    lean = cls(dict(module.config))
    lean.load_state_dict(module.state_dict(), strict=True)
    return lean.eval()


def _unets():
    yield "sd1", make_components("sd1")["unet"]
    yield "sd2", make_components("sd2")["unet"]
    yield "sd1-8x", make_components("sd1-8x")["unet"]
    yield "dummy", dummy_unet()
    yield "dummy-linear", dummy_unet(use_linear_projection=True)
    yield "dummy-heads", dummy_unet(attention_head_dim=(2, 4), upcast_attention=True, layers_per_block=1)
    yield "dummy-xattn-list", dummy_unet(cross_attention_dim=(32, 32))


@pytest.mark.parametrize("name,unet", list(_unets()), ids=[n for n, _ in _unets()])
def test_unet_is_bit_equal_to_diffusers(name, unet):
    lean = _lean_copy(unet, LeanUNet)
    assert set(lean.state_dict()) == set(unet.state_dict())
    assert list(lean.attn_processors) == list(unet.attn_processors)
    d = unet.config.cross_attention_dim
    d = d[0] if isinstance(d, (list, tuple)) else d
    g = torch.Generator().manual_seed(0)
    cases = [
        (torch.randn(2, 4, 16, 16, generator=g), torch.tensor(37), torch.randn(2, 7, d, generator=g), {}),
        (
            torch.randn(1, 4, 12, 20, generator=g),
            5,
            torch.randn(1, 77, d, generator=g),
            {},
        ),  # not a multiple of 4
        (
            torch.randn(3, 4, 8, 8, generator=g),
            torch.tensor([1.5, 900.0, 3.0]),
            torch.randn(3, 5, d, generator=g),
            {},
        ),
        (
            torch.randn(2, 4, 8, 8, generator=g),
            torch.tensor(3),
            torch.randn(2, 6, d, generator=g),
            {"encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])},
        ),
    ]
    with torch.no_grad():
        for x, t, e, kw in cases:
            want = unet(x, t, e, **kw).sample
            got = lean(x, t, e, **kw)
            assert torch.equal(got.sample, want) and torch.equal(got[0], want)
            assert torch.equal(lean(x, t, e, return_dict=False, **kw)[0], want)


def test_unet_runs_foreign_processors_and_drops_unknown_kwargs():
    """A processor written for diffusers' Attention (diffusers' own classic one) runs on the lean
    blocks; cross_attention_kwargs a processor does not take are dropped, as diffusers does."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = dummy_unet()
    lean = _lean_copy(unet, LeanUNet)
    for m in (unet, lean):
        m.set_attn_processor(AttnProcessor())
    x, e = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32)
    with torch.no_grad():
        want = unet(x, 10, e, cross_attention_kwargs={"timestep": 3}).sample
        assert torch.equal(lean(x, 10, e, cross_attention_kwargs={"timestep": 3}).sample, want)

    seen = []

    class Recording:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, tag=None):
            seen.append((attn.is_cross_attention, tag))
            return AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask)

    procs = {name: (Recording() if "attn2" in name else AttnProcessor()) for name in lean.attn_processors}
    lean.set_attn_processor(procs)
    with torch.no_grad():
        lean(x, 10, e, cross_attention_kwargs={"tag": "t", "other": 1})
    assert seen and all(s == (True, "t") for s in seen)
    with pytest.raises(ValueError, match="attention layers"):
        lean.set_attn_processor({"x": AttnProcessor()})


def _vaes():
    yield "sd1", make_components("sd1")["vae"]
    yield "sd1-8x", make_components("sd1-8x")["vae"]
    yield "dummy", dummy_vae()
    yield "dummy-groups", dummy_vae(norm_num_groups=16, layers_per_block=2)


@pytest.mark.parametrize("name,vae", list(_vaes()), ids=[n for n, _ in _vaes()])
def test_vae_is_bit_equal_to_diffusers(name, vae):
    lean = _lean_copy(vae, LeanVAE)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = vae.encode(x).latent_dist, lean.encode(x).latent_dist
        assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std) and torch.equal(a.mode(), b.mode())
        assert torch.equal(
            a.sample(torch.Generator().manual_seed(3)), b.sample(torch.Generator().manual_seed(3))
        )
        gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
        assert torch.equal(a.sample([torch.Generator().manual_seed(s) for s in (4, 5)]), b.sample(gens))
        z = a.mean
        assert torch.equal(vae.decode(z).sample, lean.decode(z).sample)
        assert torch.equal(vae.decode(z, return_dict=False)[0], lean.decode(z, return_dict=False)[0])


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------
def _saved(module, folder: Path, **kw) -> Path:
    module.save_pretrained(str(folder), **kw)
    return folder.parent


def test_load_component_is_the_folders_model(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet, vae = make_components("sd2")["unet"], make_components("sd1")["vae"]
    root = _saved(unet, tmp_path / "m" / "unet")
    _saved(vae, tmp_path / "m" / "vae")
    lu = load_component("unet", root)
    lv = load_component("vae", root)
    du = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    dv = AutoencoderKL.from_pretrained(root, subfolder="vae")
    assert not lu.training and not any(p.requires_grad for p in lu.parameters())
    x, e = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 64)
    with torch.no_grad():
        assert torch.equal(lu(x, 7, e).sample, du(x, 7, e).sample)
        img = torch.randn(1, 3, 32, 32)
        assert torch.equal(
            lv.decode(lv.encode(img).latent_dist.mean).sample,
            dv.decode(dv.encode(img).latent_dist.mean).sample,
        )
    assert lu.config.use_linear_projection is True and lu.config["sample_size"] == 32
    assert lv.config.scaling_factor == dv.config.scaling_factor

    half = load_component("unet", root, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert half.device == torch.device("cpu")


def test_variants_shards_and_legacy_names(tmp_path):
    vae = make_components("sd1")["vae"]
    root = _saved(vae, tmp_path / "m" / "vae", variant="fp16")
    assert (root / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    with pytest.raises(LeanUnsupported, match="safetensors only"):
        load_component("vae", root)  # no plain file: the variant must be asked for
    lean = load_component("vae", root, variant="fp16")
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(z).sample
        assert torch.equal(lean.decode(z).sample, want)

    sharded = _saved(vae, tmp_path / "s" / "vae", max_shard_size="200KB")
    assert (sharded / "vae" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert torch.equal(load_component("vae", sharded).decode(z).sample, want)
    # a sharded variant: diffusers names its index diffusion_pytorch_model.safetensors.index.fp16.json
    both = _saved(vae, tmp_path / "sv" / "vae", variant="fp16", max_shard_size="200KB")
    assert (both / "vae" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    with torch.no_grad():
        assert torch.equal(load_component("vae", both, variant="fp16").decode(z).sample, want)

    # an old checkpoint's attention names (query/key/value/proj_attn) load as diffusers renames them
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old" / "vae"
    shutil.copytree(root / "vae", old)
    state = load_file(str(old / "diffusion_pytorch_model.fp16.safetensors"))
    renamed = {}
    for k, v in state.items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{legacy}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(old / "diffusion_pytorch_model.fp16.safetensors"))
    with torch.no_grad():
        assert torch.equal(load_component("vae", old.parent, variant="fp16").decode(z).sample, want)


def test_what_the_lean_classes_refuse(tmp_path):
    unet = dummy_unet()
    root = _saved(unet, tmp_path / "m" / "unet")
    cfg_path = root / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for change, why in [
        ({"time_cond_proj_dim": 8}, "time_cond_proj_dim"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D"]}, "blocks"),
        ({"_class_name": "UNet3DConditionModel"}, "UNet3DConditionModel"),
        ({"act_fn": "softsign"}, "softsign"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
    ]:
        cfg_path.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(LeanUnsupported, match=why):
            load_component("unet", root)
    cfg_path.write_text(json.dumps(cfg))
    assert load_component("unet", root) is not None

    # weights that do not fit: a missing tensor, an extra one, a wrong shape
    from safetensors.torch import load_file, save_file

    wpath = root / "unet" / "diffusion_pytorch_model.safetensors"
    good = load_file(str(wpath))
    first = sorted(good)[0]
    for state, why in [
        ({k: v for k, v in good.items() if k != first}, "missing"),
        ({**good, "extra.weight": torch.zeros(1)}, "unexpected"),
        ({**good, first: torch.zeros(3, 3)}, "shape"),
    ]:
        save_file(state, str(wpath))
        with pytest.raises(LeanUnsupported, match=why):
            load_component("unet", root)
    save_file(good, str(wpath))

    # only a pickle: never read, the caller falls back
    os.replace(wpath, wpath.with_suffix(".bin"))
    with pytest.raises(LeanUnsupported, match="safetensors only"):
        load_component("unet", root)


def test_hostile_folder_files(tmp_path):
    vae = dummy_vae()
    root = _saved(vae, tmp_path / "m" / "vae", max_shard_size="200KB")
    index = root / "vae" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    for shard in ("../../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "x.bin"):
        bad = {**data, "weight_map": {k: shard for k in data["weight_map"]}}
        index.write_text(json.dumps(bad))
        with pytest.raises(LeanUnsupported, match="not a plain .safetensors file name inside the folder"):
            load_component("vae", root)
    index.write_text(json.dumps({**data, "weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(LeanUnsupported, match="missing"):
        load_component("vae", root)
    index.write_text(json.dumps(data))
    cfg = root / "vae" / "config.json"
    cfg.write_text(" " * (1 << 20) + "{}")
    with pytest.raises(LeanUnsupported, match="more than the"):
        load_component("vae", root)
    cfg.write_text("[1, 2]")
    with pytest.raises(LeanUnsupported, match="not a JSON object"):
        load_component("vae", root)
    cfg.write_text("{not json")
    with pytest.raises(LeanUnsupported, match="cannot parse"):
        load_component("vae", root)


# ---------------------------------------------------------------------------------------------------
# editors: lean classes by default for a local folder, equal to diffusers' classes
# ---------------------------------------------------------------------------------------------------
def _pair(folder):
    from p2pz_directions.core.concept import Concept, Direction
    from p2pz_directions.core.store import LocalStore
    from p2pz_directions.editing.models import encoder_for

    enc = encoder_for(model=str(folder))
    g = torch.Generator().manual_seed(0)
    store = LocalStore()
    cs = [
        store.publish(Concept(n, torch.randn(77, enc.hidden_size, generator=g), enc)) for n in ("cat", "dog")
    ]
    return Direction(cs[0], cs[1])


def _photo(size=32):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8))


EDITS = {
    "pix2pix-zero": dict(
        prompt="a photo of a cat", num_inference_steps=3, cross_attention_guidance_amount=0.1
    ),
    "diffedit": dict(
        source_prompt="a photo of a cat", num_inference_steps=3, num_maps_per_mask=2, output_type="np"
    ),
    "sdedit": dict(prompt="a photo of a cat", num_inference_steps=4, strength=0.75, output_type="np"),
    "ledits": dict(source_prompt="a photo of a cat", num_inversion_steps=4, output_type="np"),
}


@pytest.mark.parametrize("editor", sorted(EDITS))
@pytest.mark.parametrize("config", ["tiny_sd1", "tiny_sd2"])
def test_editors_give_the_same_edit_with_lean_and_diffusers_classes(editor, config, request):
    from p2pz_directions import editors

    folder = request.getfixturevalue(config)
    d = _pair(folder)
    out = {}
    for models in ("lean", "diffusers"):
        ed = editors.get(editor, model=str(folder), device="cpu", dtype=torch.float32, models=models)
        res = ed.edit(_photo(), d, seed=0, **EDITS[editor])
        comps = ed.load_components()
        kinds = {type(comps[n]).__module__.split(".")[0] for n in ("unet", "vae") if n in comps}
        assert kinds == ({"p2pz_directions"} if models == "lean" else {"diffusers"})
        assert not ed.lean_fallbacks
        out[models] = res.image
    import numpy as np

    a, b = np.asarray(out["lean"]), np.asarray(out["diffusers"])
    assert a.shape == b.shape and float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) == 0.0


def test_auto_falls_back_and_lean_refuses(tiny_sd1, tmp_path):
    """A folder the lean UNet cannot run (an LCM-style ``time_cond_proj_dim``) loads diffusers' class
    under ``models="auto"`` (the reason kept in ``lean_fallbacks``); ``models="lean"`` says why not."""
    from p2pz_directions import editors
    from p2pz_directions.editing.editors import EditorError, EditorOptionError

    folder = tmp_path / "lcm"
    shutil.copytree(tiny_sd1, folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "time_cond_proj_dim": 256}))
    ed = editors.get("sdedit", model=str(folder), device="cpu", dtype=torch.float32)
    assert ed.models == "auto"
    try:
        comps = ed.load_components(("unet", "vae"))
    except Exception as e:  # diffusers' class may refuse the mismatched weights; the fallback is what counts
        assert "time_cond_proj_dim" in ed.lean_fallbacks.get("unet", ""), e
    else:
        assert type(comps["unet"]).__name__ == "UNet2DConditionModel"
        assert type(comps["vae"]).__module__.startswith("p2pz_directions.lean")
    assert "time_cond_proj_dim" in ed.lean_fallbacks["unet"]

    strict = editors.get("sdedit", model=str(folder), device="cpu", dtype=torch.float32, models="lean")
    with pytest.raises(EditorError, match="lean classes: unet config time_cond_proj_dim=256"):
        strict.load_components(("unet",))
    with pytest.raises(EditorOptionError, match="models must be one of"):
        editors.get("sdedit", model=str(tiny_sd1), models="fast")


def test_p2pz_models_variable(tiny_sd1, monkeypatch):
    from p2pz_directions import editors
    from p2pz_directions.core.constants import ConfigError

    monkeypatch.setenv("P2PZ_MODELS", "diffusers")
    ed = editors.get("sdedit", model=str(tiny_sd1), device="cpu", dtype=torch.float32)
    assert ed.models == "diffusers"
    assert type(ed.load_components(("unet",))["unet"]).__module__.startswith("diffusers")
    monkeypatch.setenv("P2PZ_MODELS", "quick")
    with pytest.raises(ConfigError, match="P2PZ_MODELS='quick' must be auto, lean or diffusers"):
        editors.get("sdedit", model=str(tiny_sd1))


def test_a_lean_cli_edit_imports_neither_transformers_nor_diffusers(tiny_sd1, tmp_path):
    """What the lean classes are for: ``p2pz edit`` with a local SD folder imports nothing of
    diffusers or transformers (seconds each in a fresh process): models, scheduler, pixels are lean."""
    _pair(tiny_sd1)
    photo = tmp_path / "photo.png"
    _photo().save(photo)
    code = (
        "import sys; from p2pz_directions import cli\n"
        "rc = cli.main(sys.argv[1:])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'diffusers'))\n"
        "print('IMPORTED', bad)\n"
    )
    for editor in ("sdedit", "pix2pix-zero", "diffedit"):
        out = tmp_path / f"{editor}.png"
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                "edit",
                str(photo),
                "-d",
                "cat->dog",
                "--editor",
                editor,
                "--model",
                str(tiny_sd1),
                "--prompt",
                "a cat",
                "--steps",
                "2",
                "--device",
                "cpu",
                "-o",
                str(out),
                "--quiet",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert out.is_file()
        assert "IMPORTED []" in r.stdout, (editor, r.stdout[-2000:])


def test_clip_skip_is_the_same_with_lean_and_transformers_classes(tiny_sd1):
    """``clip_skip`` reads an earlier layer through the final layer norm; transformers 5's
    ``CLIPTextModel`` has no ``.text_model``, the lean one does: both must give the same."""
    from p2pz_directions import editors

    d = _pair(tiny_sd1)
    got = []
    for models in ("lean", "diffusers"):
        ed = editors.get("sdedit", model=str(tiny_sd1), device="cpu", dtype=torch.float32, models=models)
        got.append(ed.edit(_photo(), d, seed=0, clip_skip=1, **EDITS["sdedit"]).image)
        plain = ed.edit(_photo(), d, seed=0, **EDITS["sdedit"]).image
    import numpy as np

    assert np.array_equal(got[0], got[1])
    assert not np.array_equal(got[1], plain)  # clip_skip did change the edit


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("editor", ["pix2pix-zero", "diffedit", "sdedit"])
def test_lean_classes_equal_diffusers_on_cuda_in_float16(editor, tiny_sd1):
    """On the GPU in float16 (graph loops, the default there) the lean classes run the same kernels
    as diffusers' classes: the same edit."""
    import numpy as np

    from p2pz_directions import editors

    d = _pair(tiny_sd1)
    out = {}
    for models in ("lean", "diffusers"):
        ed = editors.get(editor, model=str(tiny_sd1), device="cuda", dtype=torch.float16, models=models)
        out[models] = np.asarray(ed.edit(_photo(), d, seed=0, **EDITS[editor]).image, dtype=np.float64)
    diff = float(np.abs(out["lean"] - out["diffusers"]).max())
    assert diff == 0.0, f"{editor}: max abs difference {diff:.3e}"


# ---------------------------------------------------------------------------------------------------
# pixels: PixelProcessor is VaeImageProcessor without diffusers
# ---------------------------------------------------------------------------------------------------
def _pixel_inputs():
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    rgb = lambda w, h: Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))  # noqa: E731
    yield "pil", rgb(40, 32), {}
    yield "pil-odd-size", rgb(43, 37), {}
    yield "pil-list-sized", [rgb(40, 40), rgb(40, 40)], {"height": 24, "width": 32}
    yield "np-hwc", rng.rand(32, 40, 3).astype(np.float32), {}
    yield "np-nhwc", rng.rand(2, 36, 20, 3).astype(np.float32), {"height": 16, "width": 16}
    yield "np-list", [rng.rand(16, 16, 3).astype(np.float32)] * 2, {}
    yield "pt-chw", torch.rand(3, 32, 32), {}
    yield "pt-nchw-minus1", torch.rand(2, 3, 16, 24) * 2 - 1, {}
    yield "pt-latents", torch.randn(1, 4, 8, 8), {}
    yield "pt-list", [torch.rand(3, 16, 16), torch.rand(3, 16, 16)], {"height": 8, "width": 8}
    yield "pil-rgba (diffusers' class)", Image.new("RGBA", (16, 16), (1, 2, 3, 4)), {}
    yield "np-gray (diffusers' class)", rng.rand(16, 16).astype(np.float32), {}


@pytest.mark.parametrize("name,image,kw", list(_pixel_inputs()), ids=[n for n, *_ in _pixel_inputs()])
def test_pixel_processor_is_vae_image_processor(name, image, kw):
    import warnings

    import numpy as np
    from diffusers.image_processor import VaeImageProcessor

    from p2pz_directions.lean.pixels import PixelProcessor

    ours, theirs = PixelProcessor(vae_scale_factor=8), VaeImageProcessor(vae_scale_factor=8)
    with warnings.catch_warnings(record=True) as w_ours:
        warnings.simplefilter("always")
        got = ours.preprocess(image, **kw)
    with warnings.catch_warnings(record=True) as w_theirs:
        warnings.simplefilter("always")
        want = theirs.preprocess(image, **kw)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert [type(x.message) for x in w_ours] == [type(x.message) for x in w_theirs]
    if got.shape[1] == 3:
        x = (torch.rand_like(got) * 2.4 - 1.2).clamp(-1.3, 1.3)
        assert torch.equal(ours.postprocess(x, "pt"), theirs.postprocess(x, "pt"))
        assert np.array_equal(ours.postprocess(x, "np"), theirs.postprocess(x, "np"))
        for a, b in zip(ours.postprocess(x, "pil"), theirs.postprocess(x, "pil"), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert ours.postprocess(x, "latent") is x
    if not isinstance(image, list) and (not hasattr(image, "ndim") or image.ndim == 4):
        assert ours.get_default_height_width(image) == theirs.get_default_height_width(image)


# ---------------------------------------------------------------------------------------------------
# schedulers: DDIM, DDIM-inverse and PNDM without diffusers
# ---------------------------------------------------------------------------------------------------
def _walk(s, steps, eta, seed=0):
    import inspect

    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = []
    for i, t in enumerate(s.timesteps):
        eps = torch.sin(lat * (i + 1)) * 0.5
        extra = dict(eta=eta, generator=g) if "eta" in inspect.signature(s.step).parameters else {}
        res = s.step(eps, t, lat, **extra)
        lat = res.prev_sample
        out.append(lat)
    return torch.stack(out), s.timesteps.clone()


def _grid(name):
    import itertools

    grid = {
        "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
        "prediction_type": ["epsilon", "v_prediction"] + (["sample"] if name != "PNDMScheduler" else []),
        "timestep_spacing": ["leading", "trailing"]
        + (["linspace"] if name != "DDIMInverseScheduler" else []),
        "steps_offset": [0, 1],
        "set_alpha_to_one": [True, False],
        **{
            "DDIMScheduler": {
                "clip_sample": [True, False],
                "rescale_betas_zero_snr": [False, True],
                "thresholding": [False, True],
            },
            "DDIMInverseScheduler": {"clip_sample": [True, False]},
            "PNDMScheduler": {"skip_prk_steps": [True, False]},
        }[name],
    }
    for vals in itertools.product(*grid.values()):
        cfg = dict(zip(grid, vals, strict=True), beta_start=0.00085, beta_end=0.012)
        if not cfg.get("rescale_betas_zero_snr") or cfg["prediction_type"] == "v_prediction":
            yield cfg


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDIMInverseScheduler", "PNDMScheduler"])
def test_lean_schedulers_step_as_diffusers(name):
    import diffusers

    from p2pz_directions.lean.schedulers import SCHEDULERS

    ours, theirs = SCHEDULERS[name], getattr(diffusers, name)
    n = 0
    for cfg in _grid(name):
        for steps, eta in [(5, 0.0), (7, 0.7)] if name == "DDIMScheduler" else [(5, 0.0), (6, 0.0)]:
            a, ta = _walk(theirs(**cfg), steps, eta)
            b, tb = _walk(ours(**cfg), steps, eta)
            assert torch.equal(ta, tb), (cfg, steps)
            assert torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), (cfg, steps, eta)
            n += 1
    assert n > 100
    # add_noise, scale_model_input, attributes the samplers read
    s, d = ours(beta_schedule="scaled_linear"), theirs(beta_schedule="scaled_linear")
    x, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 999])
    assert hasattr(s, "add_noise") == hasattr(d, "add_noise")
    if hasattr(d, "add_noise"):
        assert torch.equal(s.add_noise(x, noise, t), d.add_noise(x, noise, t))
    assert s.scale_model_input(x, 3) is x and s.init_noise_sigma == d.init_noise_sigma and s.order == d.order
    assert torch.equal(s.alphas_cumprod, d.alphas_cumprod) and len(s) == len(d)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDIMInverseScheduler", "PNDMScheduler"])
def test_lean_scheduler_configs_follow_diffusers(name, tmp_path):
    import inspect

    import diffusers

    from p2pz_directions.lean.schedulers import SCHEDULERS
    from p2pz_directions.sampling.schedulers import copy_scheduler

    ours, theirs = SCHEDULERS[name], getattr(diffusers, name)

    def sig(c):
        return [
            (p.name, p.default)
            for p in inspect.signature(c.__init__).parameters.values()
            if p.name not in ("self", "kwargs")
        ]

    assert sig(ours) == sig(theirs)
    a, b = ours(beta_start=0.00085, steps_offset=1), theirs(beta_start=0.00085, steps_offset=1)
    strip = lambda c: {k: v for k, v in c.items() if k != "_use_default_values"}  # noqa: E731
    assert strip(a.config) == strip(b.config) and a.config.steps_offset == 1
    assert set(a.config["_use_default_values"]) == set(b.config["_use_default_values"])
    theirs(beta_schedule="scaled_linear", steps_offset=1).save_pretrained(tmp_path / "s")
    loaded, want = ours.from_pretrained(tmp_path / "s"), theirs.from_pretrained(tmp_path / "s")
    assert dict(loaded.config) == dict(want.config)
    # from one class to another, as copy_scheduler and from_config do it (PNDM and DDIM differ on set_alpha_to_one)
    for target in ("DDIMScheduler", "DDIMInverseScheduler"):
        got = copy_scheduler(ours(beta_schedule="scaled_linear", steps_offset=1), SCHEDULERS[target])
        ref = copy_scheduler(
            theirs(beta_schedule="scaled_linear", steps_offset=1), getattr(diffusers, target)
        )
        assert strip(got.config) == strip(ref.config), target
        assert (
            SCHEDULERS[target].from_config(dict(b.config)).config
            == SCHEDULERS[target].from_config(dict(a.config)).config
        )
    with pytest.raises(TypeError, match="no setting"):
        ours(beta_stat=0.1)


def test_scheduler_from_folder_refuses_other_classes(tmp_path):
    import diffusers

    from p2pz_directions.lean.schedulers import scheduler_from_folder

    diffusers.EulerDiscreteScheduler().save_pretrained(tmp_path / "m" / "scheduler")
    with pytest.raises(LeanUnsupported, match="EulerDiscreteScheduler"):
        scheduler_from_folder(tmp_path / "m")
    diffusers.PNDMScheduler(skip_prk_steps=True).save_pretrained(tmp_path / "p" / "scheduler")
    s = scheduler_from_folder(tmp_path / "p")
    assert type(s).__name__ == "PNDMScheduler" and type(s).__module__ == "p2pz_directions.lean.schedulers"
    assert s.config.skip_prk_steps is True
