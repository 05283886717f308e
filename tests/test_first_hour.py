"""A newcomer's first hour (issue 17): every mistake is caught before model work and said in one
line, in CLI syntax; the quick start runs the demo; the CLI starts without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from p2pz_directions.cli import main
from p2pz_directions.cli.options import cli_syntax, parse_opts
from p2pz_directions.core.concept import Concept
from p2pz_directions.core.store import LocalStore
from p2pz_directions.editing.models import CLIP_L, encoder_for

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "diffusers")


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line_error(code: int, err: str) -> bool:
    return code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture
def cat_dog(tiny_sd1):
    """cat, dog, horse for the tiny model's encoder."""
    enc = encoder_for(model=str(tiny_sd1))
    g = torch.Generator().manual_seed(0)
    store = LocalStore()
    for name in ("cat", "dog", "horse"):
        store.publish(Concept(name, torch.randn(77, enc.hidden_size, generator=g), enc))
    return tiny_sd1


@pytest.fixture
def clip_cat_dog():
    """cat and dog for CLIP ViT-L/14 in pack pix2pix-zero (random values: only names matter here)."""
    g = torch.Generator().manual_seed(1)
    LocalStore().publish_many(
        [Concept(n, torch.randn(77, 768, generator=g), CLIP_L) for n in ("cat", "dog")], pack="pix2pix-zero"
    )


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (200, 120, 40)).save(path)
    return path


FAST = ("--opt", "num_reg_steps=0", "--steps", "1", "--device", "cpu")


# --- the quick start ------------------------------------------------------------------------------
def test_main_job_never_pipes_into_grep_q():
    """`cmd | grep -q` under pipefail fails when grep exits first: the demo was skipped 4 times in 5."""
    text = (REPO / ".ci" / "main-job").read_text("utf-8")
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "pipefail" in code and "| grep -q" not in code
    assert '"$P" demo' in text and "skipped" in text  # runs it, or says why not
    # the same check as main-job makes, run many times: always finds the demo
    script = (
        'set -euo pipefail; HELP="$(printf "%5000s\\n  demo   x\\n%5000s" a b)"; grep -q " demo " <<<"$HELP"'
    )
    assert all(subprocess.run(["bash", "-c", script]).returncode == 0 for _ in range(5))


def test_startup_imports_no_torch(clip_cat_dog, p2pz_home):
    """`p2pz --help`, `list` and `show` import no torch/transformers/diffusers (issue 10)."""
    code = (
        "import sys, time, json, io, contextlib\n"
        "t0 = time.perf_counter()\n"
        "from p2pz_directions.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    rc = main(sys.argv[1:])\n"
        "dt = time.perf_counter() - t0\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'diffusers'})\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy, 'seconds': dt, 'out': buf.getvalue()}))\n"
    )
    env = {**os.environ, "P2PZ_HOME": str(p2pz_home)}
    timings, outs = {}, {}
    for args in (["--help"], ["list"], ["list", "--directions"], ["show", "cat->dog"], ["show", "cat"]):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout.strip().splitlines()[-1])
        assert info["rc"] == 0 and info["heavy"] == [], (args, info["heavy"])
        timings[" ".join(args)] = round(wall, 2)
        outs[" ".join(args)] = info["out"]
    assert "cat@1->dog@1" in outs["show cat->dog"] and "pix2pix-zero" in outs["list"]
    print("startup wall seconds:", timings)


def test_show_without_torch_matches_the_torch_path(capsys, clip_cat_dog):
    """show reads the verified tensors with numpy: the same numbers as through `directions.load`."""
    from p2pz_directions import directions

    d = directions.load("cat->dog")
    code, out, err = run(capsys, "show", "cat->dog", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["delta_norm"] == pytest.approx(float(d.delta.norm()), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(
        d.source.embedding.flatten(), d.target.embedding.flatten(), dim=0
    )
    assert info["cosine_source_target"] == pytest.approx(float(cos), abs=1e-5)
    assert info["direction"] == d.name and info["source"]["content_hash"] == d.source.content_hash


# --- one line, exit 2, before any model work ---------------------------------------------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (["edit", "{photo}"], "Missing option '--direction'"),
        (["lst"], "No such command 'lst'"),
        (["edit", "{photo}", "-d", "cat->dog", "-m", "{model}", "--device", "foo"], "--device 'foo'"),
        (["edit", "{photo}", "-d", "cat->dog", "-m", "{model}", "--dtype", "fp8"], "--dtype 'fp8'"),
        (["edit", "{photo}", "-d", "cat->dog", "-m", "{model}", "-o", "{tmp}/somedir/"], "is a folder"),
        (["edit", "{photo}", "-d", "cat->dog", "-m", "{model}", "-o", "{tmp}/x.xyz"], "not an image format"),
        (["edit", "{photo}", "-d", "cat->dog", "-m", "{model}", "-o", "{photo}/x.png"], "is a file"),
        (["edit", "{tmp}/nope.png", "-d", "cat->dog", "-m", "{model}"], "does not exist"),
        (
            ["edit", "{photo}", "-d", "cat->dog", "-m", "{model}", "--opt", "num_reg_steps=abc"],
            "whole number",
        ),
        (
            ["edit", "{photo}", "-d", "cat->dog", "-m", "{model}", "--opt", "lambda_k=1"],
            "did you mean lambda_kl",
        ),
        (["mask", "{photo}", "-d", "cat->dog", "-m", "{model}", "--device", "cuda:99"], "--device cuda:99"),
        (
            ["list", "--encoder", "openai/clip-vit-large-patch-14"],
            "Did you mean openai/clip-vit-large-patch14",
        ),
        (["build", "cat", "dog", "--encoder", "openai/clip-vit-large-patch-14"], "Did you mean"),
        (["build", "cat", "dog", "--encoder", "CompVis/stable-diffusion-v1-4"], "--model CompVis"),
        (["reencode", "cat", "--device", "foo"], "--device 'foo'"),
        (["import-pt", "x.pt", "--encoder", "openai/clip-vit-large-patch-14"], "Did you mean"),
    ],
)
def test_mistakes_are_one_line_before_model_work(capsys, cat_dog, photo, tmp_path, args, needle, monkeypatch):
    import p2pz_directions.editing.editors as editors_mod

    def no_loading(*a, **k):
        raise AssertionError("model weights were loaded for a bad command line")

    monkeypatch.setattr(editors_mod.Editor, "load_components", no_loading)
    fill = {"{photo}": str(photo), "{model}": str(cat_dog), "{tmp}": str(tmp_path)}
    argv = []
    for a in args:
        for k, v in fill.items():
            a = a.replace(k, v)
        argv.append(a)
    code, _, err = run(capsys, *argv)
    assert one_line_error(code, err), err
    assert needle in err, err
    assert not (tmp_path / "somedir").exists() and not (tmp_path / "x.xyz").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_on_cpu_only_torch(capsys, cat_dog, photo):
    for cmd in (
        ["edit", photo, "-d", "cat->dog", "-m", cat_dog],
        ["mask", photo, "-d", "cat->dog", "-m", cat_dog],
    ):
        code, _, err = run(capsys, *cmd, "--device", "cuda")
        assert one_line_error(code, err) and "no CUDA GPU" in err and "--device cpu" in err
    code, _, err = run(
        capsys, "build", "cat", "dog", "-m", cat_dog, "--captioner", "templates", "--device", "cuda"
    )
    assert one_line_error(code, err) and "no CUDA GPU" in err


def test_debug_flag_shows_the_traceback(tmp_path):
    env = {**os.environ, "P2PZ_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "p2pz_directions.cli", "show", "cat->dog"]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and plain.stderr.startswith("error: ")
    debug = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], capture_output=True, text=True, env=env)
    assert "Traceback" in debug.stderr and "NotFoundError" in debug.stderr


def test_hints_are_in_cli_syntax():
    assert cli_syntax("Pass prompt='a photo of a cat' to skip") == "Pass --prompt 'a photo of a cat' to skip"
    assert cli_syntax("choose with model=... or encoder=...") == "choose with --model ... or --encoder ..."
    assert cli_syntax("HF_HUB_OFFLINE=1 is set; D=768") == "HF_HUB_OFFLINE=1 is set; D=768"


def test_opt_values_typed_from_the_editor(cat_dog):
    from p2pz_directions import editors

    ed = editors.get("pix2pix-zero", model=str(cat_dog), device="cpu")
    opts = parse_opts(["num_reg_steps=3", "lambda_kl=10", "compile_regularizer=false", "loops=eager"], ed)
    assert opts == {"num_reg_steps": 3, "lambda_kl": 10.0, "compile_regularizer": False, "loops": "eager"}
    assert type(opts["lambda_kl"]) is float


# --- offline: said at once, with the flag to pass --------------------------------------------------
def test_offline_without_prompt_says_pass_prompt_at_once(capsys, cat_dog, photo, monkeypatch):
    from p2pz_directions.cli import options as cli_options

    if cli_options.in_hf_cache("Salesforce/blip-image-captioning-base", "config.json"):
        pytest.skip("BLIP is in this machine's Hugging Face cache: captioning would work offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    code, _, err = run(capsys, "edit", photo, "-d", "cat->dog", "-m", cat_dog, *FAST)
    assert one_line_error(code, err) and "--prompt '" in err and "prompt=" not in err
    assert "HF_HUB_OFFLINE" in err
    assert time.perf_counter() - t0 < 20  # no minutes of Hub retries


def test_offline_hub_model_is_refused_at_once(capsys, photo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "edit", photo, "-d", "cat->dog", "--model", "someone/not-cached-model")
    assert one_line_error(code, err) and "--model PATH" in err and "not in the Hugging Face cache" in err


# --- names: wrong encoder, ambiguity, listings ---------------------------------------------------------
def test_direction_for_another_encoder_is_an_encoder_mismatch(capsys, tiny_sd1, clip_cat_dog, photo):
    code, _, err = run(capsys, "edit", photo, "-d", "cat->dog", "-m", tiny_sd1, "--prompt", "a cat", *FAST)
    assert one_line_error(code, err)
    assert "exists only for text encoder openai/clip-vit-large-patch14" in err and "Did you mean" not in err
    assert "p2pz reencode cat --model" in err
    from p2pz_directions import directions
    from p2pz_directions.core.errors import EncoderMismatchError

    with pytest.raises(EncoderMismatchError):
        directions.load("cat->dog", model=str(tiny_sd1))


def test_ambiguity_resolved_by_the_model_and_hinted_in_cli_syntax(
    capsys, cat_dog, clip_cat_dog, photo, tmp_path
):
    code, _, err = run(capsys, "show", "cat->dog")
    assert one_line_error(code, err) and "--model" in err and "model=" not in err
    code, out, err = run(capsys, "show", "cat->dog", "--model", cat_dog, "--json")
    assert code == 0 and json.loads(out)["encoder"]["hidden_size"] == 32
    code, out, err = run(capsys, "list", "--directions")
    assert code == 0 and "openai/clip-vit-large-patch14" in out and "pix2pix-zero" in out and "local" in out
    assert "…" not in out and "--model/--encoder" in out
    dst = tmp_path / "e.png"
    code, out, err = run(
        capsys, "edit", photo, "-d", "cat->dog", "-m", cat_dog, "--prompt", "a", "-o", dst, *FAST
    )
    assert code == 0, err  # the model's encoder picks the local concepts, no ambiguity


def test_tables_never_cut_names(capsys):
    long_pack = "a-rather-long-community-pack-name-for-testing"
    g = torch.Generator().manual_seed(2)
    LocalStore().publish(Concept("cat", torch.randn(77, 768, generator=g), CLIP_L), pack=long_pack)
    code, out, _ = run(capsys, "list")
    assert code == 0 and long_pack in out and CLIP_L.id in out and "…" not in out


# --- several images, several directions --------------------------------------------------------------
def test_edit_several_images_into_a_folder_with_two_directions(capsys, cat_dog, tmp_path):
    imgs = []
    for i, color in enumerate(((200, 120, 40), (40, 120, 200))):
        p = tmp_path / f"in{i}.png"
        Image.new("RGB", (32, 32), color).save(p)
        imgs.append(p)
    outdir = tmp_path / "outdir"
    code, out, err = run(
        capsys, "edit", *imgs, "-d", "cat->dog", "-d", "cat->horse", "-m", cat_dog, "--prompt", "a cat",
        "-o", f"{outdir}/", "--json", *FAST,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert [Path(x["written"]["image"]).name for x in summary["images"]] == [
        "in0-pix2pix-zero.png",
        "in1-pix2pix-zero.png",
    ]
    assert "local:cat@1->dog@1" in summary["direction"] and "horse" in summary["direction"]
    for x in summary["images"]:
        assert Image.open(x["written"]["image"]).size == (32, 32)


# --- the demo model: SD-shaped ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_shaped(tmp_path_factory):
    from p2pz_directions.editing.demo import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny-8x"), "sd1-8x")


def test_demo_model_is_sd_shaped(sd_shaped):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd_shaped, subfolder="vae")
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 96, 128)).latent_dist.mean
    assert tuple(z.shape) == (1, 4, 12, 16)  # 8x, any multiple-of-8 size, like SD


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_demo_model_edits_a_shipped_512_photo_quickly(capsys, sd_shaped, authors_images, tmp_path):
    """A real 512x512 photo through pix2pix-zero on the demo model, on one CPU thread."""
    enc = encoder_for(model=str(sd_shaped))
    g = torch.Generator().manual_seed(0)
    LocalStore().publish_many([Concept(n, torch.randn(77, 32, generator=g), enc) for n in ("cat", "dog")])
    dst = tmp_path / "dog.png"
    t0 = time.perf_counter()
    code, out, err = run(
        capsys, "edit", authors_images / "cat_6.png", "-d", "cat->dog", "-m", sd_shaped, "--prompt", "a cat",
        "--steps", "10", "--device", "cpu", "-o", dst, "--quiet",
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    assert code == 0, err
    assert Image.open(dst).size == (512, 512)
    print(f"512x512 pix2pix-zero, 10 steps, 1 thread: {seconds:.1f} s")
    assert seconds < 120


def test_built_concepts_say_how_they_were_made(capsys, cat_dog):
    code, _, err = run(capsys, "build", "fox", "wolf", "-m", cat_dog, "--captioner", "templates", "--n", "8",
                       "--min-captions", "4", "--near-duplicates", "off", "--device", "cpu", "--json")  # fmt: skip
    assert code == 0, err
    code, out, _ = run(capsys, "show", "fox", "--json")
    assert json.loads(out)["provenance"]["method"] == "build"


def test_editor_that_takes_lists_gets_one_call(capsys, cat_dog, tmp_path, monkeypatch):
    """An editor declaring an options dataclass gets every image and direction in one call."""
    import dataclasses

    from p2pz_directions import editors
    from p2pz_directions.editing.editors import Editor, EditResult

    @dataclasses.dataclass(frozen=True)
    class Opts:
        seed: int = 0
        prompt: str | None = None
        num_inference_steps: int = 50
        scale: float = dataclasses.field(default=1.0, metadata={"help": "how much"})

    calls = []

    class Batched(Editor):
        name = "batched"
        options = Opts

        def edit(self, image, direction, *, progress=None, **options):
            calls.append((image, direction, options))
            imgs = [Image.new("RGB", (8, 8), (i * 50, 0, 0)) for i in range(len(image))]
            return EditResult(image=imgs, original=imgs, caption=["a", "b"], extra={"seconds": 1.5})

    monkeypatch.setattr(editors, "get", lambda name, **kw: Batched(kw["model"], device="cpu"))
    imgs = []
    for i in range(2):
        p = tmp_path / f"b{i}.png"
        Image.new("RGB", (16, 16)).save(p)
        imgs.append(p)
    code, out, err = run(
        capsys, "edit", *imgs, "-d", "cat->dog", "-d", "dog->horse", "-m", cat_dog, "-e", "batched",
        "--prompt", "x", "--opt", "scale=2", "-o", tmp_path / "o", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert len(calls) == 1
    image_arg, d_arg, opts = calls[0]
    assert image_arg == [str(p) for p in imgs] and [d.name for d in d_arg] == [
        "local:cat@1->dog@1",
        "local:dog@1->horse@1",
    ]
    assert opts["scale"] == 2.0 and isinstance(opts["scale"], float)
    summary = json.loads(out)
    assert summary["seconds"] == 1.5 and [x["caption"] for x in summary["images"]] == ["a", "b"]
    assert (tmp_path / "o" / "b1-batched.png").is_file()
    code, _, err = run(capsys, "edit", imgs[0], "-d", "cat->dog", "-m", cat_dog, "-e", "batched",
                       "--opt", "scale=lots")  # fmt: skip
    assert one_line_error(code, err) and "scale takes a number" in err
