"""``p2pz app``: the web app driven through its API with gradio_client, plus its backend in-process.

One app (``p2pz app --demo``, the tiny random-weight model, 64x64 images, 2 steps) serves the whole
module from a subprocess on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

gradio = pytest.importorskip("gradio", reason='the app needs gradio: pip install "p2pz-directions[app]"')
gradio_client = pytest.importorskip("gradio_client", reason='pip install "p2pz-directions[app,test]"')

from app_server import start_app  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from PIL import Image  # noqa: E402

from p2pz_directions.app.backend import (  # noqa: E402
    AppInputError,
    Backend,
    OptionSpec,
    mask_overlay,
    option_specs,
    readable_error,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_app(tmp_path_factory.mktemp("app-demo"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    from p2pz_directions.editing.demo import demo_image

    p = tmp_path_factory.mktemp("pics") / "cat.png"
    demo_image(64).save(p)
    return p


def _message(excinfo) -> str:
    return str(excinfo.value)


# ------------------------------------------------------------------------------------------ API shape
def test_edit_endpoint_requires_image_direction_editor_and_defaults_the_rest(client):
    info = client.view_api(return_format="dict", print_info=False)
    params = info["named_endpoints"]["/edit"]["parameters"]
    required = [p["parameter_name"] for p in params if not p["parameter_has_default"]]
    assert required == ["image", "direction", "editor"]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in params if p["parameter_has_default"]}
    assert defaults["steps"] == 2  # the app was started with --steps 2
    assert defaults["strength"] == 1.0 and defaults["seed"] == 0
    assert "/build" in info["named_endpoints"]


# ------------------------------------------------------------------------------------------ edits
def test_edit_by_name_returns_the_edited_image(client, picture):
    out = client.predict(handle_file(str(picture)), "demo:cat->dog", "pix2pix-zero", api_name="/edit")
    img = Image.open(out)
    assert img.size == (64, 64)
    assert Path(out).suffix == ".png"
    # the same call again (the warm editor) with the same seed gives the same picture
    again = Image.open(
        client.predict(handle_file(str(picture)), "demo:cat->dog", "pix2pix-zero", api_name="/edit")
    )
    assert list(img.convert("RGB").getdata()) == list(again.convert("RGB").getdata())
    # and another seed another one
    other = Image.open(
        client.predict(handle_file(str(picture)), "demo:cat->dog", "pix2pix-zero", seed=3, api_name="/edit")
    )
    assert list(img.convert("RGB").getdata()) != list(other.convert("RGB").getdata())


def test_generate_from_a_prompt_and_seed_then_edit(client):
    out = client.predict(
        None, "demo:cat->dog", "pix2pix-zero", prompt="a photo of a cat", seed=1, api_name="/edit"
    )
    img = Image.open(out)
    assert min(img.size) >= 8  # a picture generated from the prompt, then edited
    again = Image.open(
        client.predict(
            None, "demo:cat->dog", "pix2pix-zero", prompt="a photo of a cat", seed=1, api_name="/edit"
        )
    )
    assert list(img.getdata()) == list(again.getdata())


@pytest.mark.parametrize("editor", ["diffedit", "sdedit"])
def test_every_editor_edits_through_the_api(client, picture, editor):
    out = client.predict(handle_file(str(picture)), "cat->dog", editor, api_name="/edit")
    assert Image.open(out).size == (64, 64)


def test_editor_options_pass_through(client, picture):
    # sdedit's own option `strength` (noise strength): two values, two different pictures
    a = client.predict(
        handle_file(str(picture)), "cat->dog", "sdedit", options={"strength": 0.5}, api_name="/edit"
    )
    b = client.predict(
        handle_file(str(picture)), "cat->dog", "sdedit", options={"strength": 1.0}, api_name="/edit"
    )
    assert list(Image.open(a).getdata()) != list(Image.open(b).getdata())


def test_build_then_edit_with_the_new_direction(client, server, picture):
    ref, summary = client.predict(
        "tiger", "red fox", "templates", 8, 0, "mine", None, None, "", api_name="/build"
    )
    assert ref == "mine:tiger->red fox"
    assert "published" in summary and "mine" in summary
    from p2pz_directions.core.store import LocalStore

    names = {(e.pack, e.name) for e in LocalStore(server.registry).entries()}
    assert ("mine", "red fox") in names and ("mine", "tiger") in names
    out = client.predict(handle_file(str(picture)), ref, "pix2pix-zero", api_name="/edit")
    assert Image.open(out).size == (64, 64)


def test_build_from_caption_files(client, tmp_path):
    src = tmp_path / "owl.txt"
    tgt = tmp_path / "eagle.txt"
    scenes = ["in a forest", "on a branch at night", "in the snow", "over a lake", "on a fence post",
              "in a zoo", "drawn in pencil", "as an oil painting", "in a children's book", "on a stamp"]  # fmt: skip
    src.write_text("\n".join(f"an owl {s}" for s in scenes) + "\n", "utf-8")
    tgt.write_text("\n".join(f"an eagle {s}" for s in scenes) + "\n", "utf-8")
    ref, summary = client.predict(
        "owl",
        "eagle",
        "file",
        8,
        0,
        "files",
        handle_file(str(src)),
        handle_file(str(tgt)),
        "",
        api_name="/build",
    )
    assert ref == "files:owl->eagle" and "kept 8" in summary


# ------------------------------------------------------------------------------------------ errors
def test_unknown_direction_is_a_readable_error(client, picture):
    with pytest.raises(AppError) as e:
        client.predict(handle_file(str(picture)), "cat->unicorn", "pix2pix-zero", api_name="/edit")
    msg = _message(e)
    assert "unknown direction 'cat->unicorn'" in msg and "unicorn" in msg
    assert "Traceback" not in msg


def test_encoder_mismatch_is_a_readable_error(client, picture):
    # other:horse / other:zebra exist only for CLIP ViT-L/14, not the tiny model's encoder
    with pytest.raises(AppError) as e:
        client.predict(handle_file(str(picture)), "horse->zebra", "pix2pix-zero", api_name="/edit")
    msg = _message(e)
    assert "Encoder mismatch" in msg and "openai/clip-vit-large-patch14" in msg
    assert "Make your own direction" in msg


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"editor": "pix2pix-one"}, "unknown editor 'pix2pix-one'"),
        ({"steps": 0}, "steps must be a whole number >= 1"),
        ({"strength": 0}, "edit strength must be a non-zero number"),
        ({"seed": -1}, "seed must be a whole number >= 0"),
        ({"options": {"no_such_option": 1}}, "has no option 'no_such_option'"),
        ({"options": {"lambda_kl": "lots"}}, "option 'lambda kl' must be a float"),
        ({"direction": ""}, "pick a direction"),
    ],
)
def test_bad_inputs_are_readable_errors(client, picture, kwargs, expected):
    args = {"image": handle_file(str(picture)), "direction": "cat->dog", "editor": "pix2pix-zero"}
    args.update(kwargs)
    with pytest.raises(AppError) as e:
        client.predict(**args, api_name="/edit")
    assert expected in _message(e)


def test_no_image_and_no_prompt_is_a_readable_error(client):
    with pytest.raises(AppError) as e:
        client.predict(None, "cat->dog", "pix2pix-zero", api_name="/edit")
    assert "upload an image to edit, or write a prompt" in _message(e)


def test_nan_says_lower_the_guidance(client, picture):
    # a cross-attention guidance this large blows the latents up to inf/NaN
    with pytest.raises(AppError) as e:
        client.predict(
            handle_file(str(picture)), "cat->dog", "pix2pix-zero", xa_guidance=1e30, api_name="/edit"
        )
    msg = _message(e)
    assert "NaN" in msg and "lower the cross-attention guidance" in msg


def test_build_errors_are_readable(client):
    with pytest.raises(AppError) as e:
        client.predict("cat", "cat", "templates", 8, 0, "mine", None, None, "", api_name="/build")
    assert "two different concepts" in _message(e)
    with pytest.raises(AppError) as e:
        client.predict("cat", "dog", "file", 8, 0, "mine", None, None, "", api_name="/build")
    assert "needs a caption file" in _message(e)


# ------------------------------------------------------------------------------------------ backend
def test_option_specs_from_an_options_dataclass():
    @dataclasses.dataclass(frozen=True)
    class Opts:
        guidance_scale: float = dataclasses.field(default=7.5, metadata={"help": "classifier-free guidance"})
        num_reg_steps: int = dataclasses.field(default=5, metadata={"help": "regularizer rounds"})
        attention: Literal["auto", "exact", "fused"] = "auto"
        fast: bool = False
        negative_prompt: str | None = None
        seed: int | None = 0  # drawn by the page itself
        prompt_embeds: object = None  # a tensor: no widget

    class Ed:
        options = Opts

        def run(self, image, direction, **kw):  # never read: the dataclass wins
            raise AssertionError

    specs = {s.name: s for s in option_specs(Ed)}
    assert list(specs) == ["guidance_scale", "num_reg_steps", "attention", "fast", "negative_prompt"]
    assert specs["guidance_scale"] == OptionSpec("guidance_scale", "float", 7.5, "classifier-free guidance")
    assert specs["num_reg_steps"].kind == "int" and specs["num_reg_steps"].help == "regularizer rounds"
    assert specs["attention"].kind == "choice" and specs["attention"].choices == ("auto", "exact", "fused")
    assert specs["fast"].kind == "bool"
    assert specs["negative_prompt"].kind == "str" and specs["negative_prompt"].optional


def test_option_specs_fall_back_to_the_run_signature():
    from p2pz_directions.editing import plugins

    cls = plugins.editors()["pix2pix-zero"]
    specs = {s.name: s for s in option_specs(cls)}
    assert specs["guidance_scale"].kind == "float" and specs["guidance_scale"].default == 7.5
    assert specs["num_reg_steps"].kind == "int"
    assert "cross_attention_guidance_amount" not in specs  # drawn by the page for every editor
    assert not any("embeds" in n or n in ("generator", "latents", "callback") for n in specs)


def test_option_spec_convert():
    s = OptionSpec("lambda_kl", "float", 20.0)
    assert s.convert("3.5") == 3.5 and s.convert(None) == 20.0
    with pytest.raises(AppInputError, match="must be a float"):
        s.convert("lots")
    i = OptionSpec("num_reg_steps", "int", 5)
    assert i.convert(7.0) == 7
    with pytest.raises(AppInputError):
        i.convert(2.5)
    assert OptionSpec("mask_guidance_scale", "float", None, optional=True).convert("") is None


def test_out_of_memory_says_which_option_lowers_memory():
    import torch

    class Ed:
        memory_advice = "keep the reference attention maps on the CPU (attention_maps_device='cpu')"

    msg = readable_error(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), editor=Ed()
    )
    assert msg.startswith("Out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert "attention_maps_device='cpu'" in msg


def test_unexpected_errors_are_one_line_without_traceback():
    msg = readable_error(RuntimeError("first line\n  File 'x.py', line 3\nmore"))
    assert msg == "RuntimeError: first line"


def test_mask_overlay_tints_only_the_masked_part():
    img = Image.new("RGB", (8, 8), (0, 0, 255))
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 4, 8))
    out = mask_overlay(img, mask)
    assert out.getpixel((0, 0)) != (0, 0, 255) and out.getpixel((7, 0)) == (0, 0, 255)


def test_backend_reports_progress_per_phase_and_keeps_one_editor(tmp_path, monkeypatch):
    from p2pz_directions.app import prepare_demo

    model = prepare_demo(tmp_path / "demo")  # sets P2PZ_HOME for this test (monkeypatch restores it)
    monkeypatch.setenv("P2PZ_HOME", str(tmp_path / "demo" / "registry"))
    be = Backend(model, device="cpu", dtype="float32", demo=True, work_dir=tmp_path / "out")
    seen: list[tuple[float, str]] = []
    from p2pz_directions.editing.demo import demo_image

    out = be.edit(
        demo_image(64), "demo:cat->dog", "diffedit", steps=2, progress=lambda f, d: seen.append((f, d))
    )
    assert out.image.size == (64, 64) and out.path.is_file()
    assert out.mask is not None and out.overlay is not None and out.overlay.size == (64, 64)
    fracs = [f for f, _ in seen]
    assert fracs == sorted(fracs) and 0.0 <= fracs[0] and fracs[-1] <= 1.0
    phases = {d.split()[0] for _, d in seen[1:]}
    assert len(phases) >= 2  # several phases reported, each by name
    first = be.pool.get("diffedit")
    be.edit(demo_image(64), "demo:cat->dog", "diffedit", steps=2)
    assert be.pool.get("diffedit") is first and be.pool.warm() == [(str(model), "diffedit")]


# ------------------------------------------------------------------------------------------ CLI
def test_cli_says_how_to_install_gradio_when_missing(tmp_path):
    code = (
        "import sys; sys.modules['gradio'] = None\n"
        "from p2pz_directions.cli import main\n"
        f"sys.exit(main(['app', '--demo', '--demo-dir', {str(tmp_path)!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert 'error: the web app needs gradio: pip install "p2pz-directions[app]"' in r.stderr
    assert not (tmp_path / "tiny-sd").exists()  # nothing was made before the check


def test_cli_app_help_lists_its_options():
    from typer.testing import CliRunner

    from p2pz_directions.cli import app

    r = CliRunner().invoke(app, ["app", "--help"])
    assert r.exit_code == 0
    for flag in ("--model", "--demo", "--port", "--share", "--host"):
        assert flag in r.output


# ------------------------------------------------------------------------------------------ Space
def test_space_entry_builds_the_app_with_its_edit_endpoint(tmp_path, monkeypatch):
    import runpy

    monkeypatch.setenv("P2PZ_DEMO", "1")
    monkeypatch.setenv("P2PZ_DEMO_DIR", str(tmp_path / "space-demo"))
    monkeypatch.setenv("P2PZ_HOME", str(tmp_path / "space-demo" / "registry"))  # restored after the test
    ns = runpy.run_path(
        str(Path(__file__).resolve().parent.parent / "space" / "app.py"), run_name="space_app"
    )
    page = ns["demo"]
    assert isinstance(page, gradio.Blocks)
    api_names = {getattr(fn, "api_name", None) for fn in page.fns.values()}
    assert {"edit", "build"} <= api_names
    assert (tmp_path / "space-demo" / "tiny-sd" / "model_index.json").is_file()
    req = (Path(__file__).resolve().parent.parent / "space" / "requirements.txt").read_text()
    assert "p2pz-directions[app]" in req


def test_known_options_prefer_the_options_dataclass():
    from p2pz_directions.app.backend import known_options

    @dataclasses.dataclass(frozen=True)
    class Opts:
        seed: int = 0
        strength: float = 0.8

    class New:
        options = Opts

    class Old:
        def option_names(self):
            return ["seed", "num_inference_steps"]

    assert known_options(New()) == ["seed", "strength"]
    assert known_options(Old()) == ["seed", "num_inference_steps"]
    assert known_options(object()) is None
