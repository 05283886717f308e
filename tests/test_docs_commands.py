"""The shell commands in README.md and docs/*.md work as written (issue 17: docs that stay true).

Every fenced shell block is read; its ``p2pz`` lines run in order, in one fresh registry, in a
folder holding the files they name (``cat.png``, ``fruits.png``, ``cats.txt`` ...), against the
demo's SD-shaped tiny model. What cannot run here is skipped by the marker lists below, each with
its reason; the rest must exit 0. Adaptations, all for speed or for weights this machine lacks:
Hub model ids become the demo model, edits get ``--steps 2``, and pix2pix-zero and SDEdit edits
of a photo get ``--prompt`` (BLIP's weights are not here).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from p2pz_directions.cli import main
from p2pz_directions.core.concept import Concept
from p2pz_directions.core.store import LocalStore
from p2pz_directions.editing.models import encoder_for

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

#: substrings that make a command unrunnable here, and why
NEEDS = {
    "synopsis, not a command": ("ID|PATH", "SOURCE TARGET", "NAME", "[", "..."),
    "network (the Hugging Face Hub)": (" push ", " pull ", "--hub", "--authors", "http://", "https://"),
    "weights: SD 2's text encoder": ("stabilityai/",),
    "a GPU": ("--device cuda",),
}
#: `p2pz build` without templates or caption files needs Flan-T5's weights
BUILD_OFFLINE = ("--captioner templates", "--source-captions")


def _blocks() -> list[tuple[str, list[str]]]:
    out = []
    for f in DOCS:
        text = f.read_text("utf-8")
        for m in re.finditer(r"^```([a-z]*)\n(.*?)^```", text, re.S | re.M):
            if m.group(1) not in ("", "bash", "sh", "shell", "console"):
                continue
            line_no = text[: m.start()].count("\n") + 2
            cmds = [
                ln.strip().removeprefix("$ ")
                for ln in m.group(2).splitlines()
                if ln.strip().startswith(("p2pz ", "$ p2pz "))
            ]
            if cmds:
                out.append((f"{f.relative_to(REPO)}:{line_no}", cmds))
    return out


def _skip_reason(cmd: str) -> str | None:
    padded = f" {cmd} "
    for why, marks in NEEDS.items():
        if any(m in padded for m in marks):
            return why
    words = shlex.split(cmd, comments=True)
    if words[1] == "build" and not any(m in cmd for m in BUILD_OFFLINE):
        return "weights: Flan-T5 (the default captioner)"
    if words[1] in ("reencode", "build-pack"):
        return "weights: a second text encoder / Flan-T5"
    if words[1] in ("demo", "app", "eval", "batch"):
        return "covered by its own tests (minutes on a CPU)"
    return None


def _adapt(words: list[str], model: str) -> list[str]:
    """The command as it runs here: the demo model, few steps, a caption instead of BLIP."""
    out = list(words[1:])
    for i, w in enumerate(out[:-1]):
        if w in ("--model", "-m") and not Path(out[i + 1]).exists():
            out[i + 1] = model
    cmd = out[0]
    if cmd in ("edit", "mask"):
        if "--model" not in out and "-m" not in out:
            out += ["--model", model]
        if "--steps" not in out:
            out += ["--steps", "2"]
        out += ["--device", "cpu", *(["--quiet"] if "--json" not in out else [])]
    if cmd == "edit":
        editor = out[out.index("--editor") + 1] if "--editor" in out else "pix2pix-zero"
        has_image = not out[1].startswith("-")
        if editor in ("pix2pix-zero", "sdedit") and has_image and "--prompt" not in out:
            out += ["--prompt", "a photo of a cat"]  # they caption with BLIP otherwise
        if editor == "pix2pix-zero":
            out += ["--opt", "num_reg_steps=0"]
    if cmd == "build" and "--dry-run" not in out and "--model" not in out and "--encoder" not in out:
        out += ["--model", model]
    if cmd == "build":
        for flag, value in (("--n", "8"), ("--min-captions", "4"), ("--near-duplicates", "off")):
            if flag in out:
                out[out.index(flag) + 1] = value
            else:
                out += [flag, value]
    return out


BLOCKS = _blocks()


def test_the_docs_have_commands():
    assert len(BLOCKS) >= 5 and sum(len(c) for _, c in BLOCKS) >= 20


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    from p2pz_directions.editing.demo import DEMO_CONFIG, make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("docs-demo-model"), DEMO_CONFIG)


def _workdir(path: Path) -> None:
    from p2pz_directions.editing.demo import demo_image

    for name in ("cat.png", "fruits.png", "photo.png"):
        demo_image(64).save(path / name)
    Image.new("L", (64, 64), 255).save(path / "my-mask.png")
    (path / "cats.txt").write_text("\n".join(f"a photo of a cat number {i}" for i in range(8)), "utf-8")
    (path / "dogs.txt").write_text("\n".join(f"a photo of a dog number {i}" for i in range(8)), "utf-8")


def _seed_registry(model: Path) -> None:
    enc = encoder_for(model=str(model))
    g = torch.Generator().manual_seed(0)
    names = ("cat", "dog", "horse", "zebra", "bowl of fruits", "bowl of pears")
    LocalStore().publish_many(
        [Concept(n, torch.randn(77, enc.hidden_size, generator=g) * 0.1, enc) for n in names]
    )


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("where, cmds", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_docs_block_runs(where, cmds, demo_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _workdir(tmp_path)
    local_shared = REPO.parent / "shared"
    if any("../shared/data" in c for c in cmds):
        if not (local_shared / "data").is_dir():
            pytest.skip("reference data absent: ../shared/data")
        (tmp_path.parent / "shared").mkdir(exist_ok=True)
        link = tmp_path.parent / "shared" / "data"
        if not link.exists():
            link.symlink_to(local_shared / "data")
    if not any(shlex.split(c)[1] in ("import-pt",) for c in cmds):
        _seed_registry(demo_model)
    ran, skipped = [], []
    for cmd in cmds:
        why = _skip_reason(cmd)
        if why:
            skipped.append(f"{cmd}  [{why}]")
            continue
        argv = _adapt(shlex.split(cmd, comments=True), str(demo_model))
        code = main(argv)
        cap = capsys.readouterr()
        assert code == 0, f"{where}: `{cmd}` ran as `p2pz {shlex.join(argv)}` and failed:\n{cap.err}"
        assert "Traceback" not in cap.err
        ran.append(cmd)
    if not ran:
        pytest.skip("nothing runnable offline here: " + "; ".join(skipped))
