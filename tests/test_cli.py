"""The core `p2pz` commands: list, show, import-pt, export, verify; exit codes and --json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from p2pz_directions.cli import main

CLIP_L = "openai/clip-vit-large-patch14"


def run(capsys, *args):
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def imported(capsys, authors_embeddings):
    code, out, _ = run(
        capsys, "import-pt", str(authors_embeddings), "--pack", "pix2pix-zero", "--encoder", CLIP_L
    )
    assert code == 0 and "imported pix2pix-zero:cat@1" in out
    return authors_embeddings


def test_list_show_json(capsys, imported):
    code, out, _ = run(capsys, "list", "--json")
    rows = json.loads(out)
    assert code == 0 and sorted(r["name"] for r in rows) == ["cat", "dog", "horse", "zebra"]
    assert {r["encoder"] for r in rows} == {CLIP_L}
    code, out, _ = run(capsys, "list", "cat*", "--directions", "--json")
    assert json.loads(out) == ["cat->dog", "cat->horse", "cat->zebra"]
    code, out, _ = run(capsys, "show", "Cat -> Dog", "--json")
    info = json.loads(out)
    cat = torch.load(imported / "cat.pt", weights_only=True, map_location="cpu")
    dog = torch.load(imported / "dog.pt", weights_only=True, map_location="cpu")
    assert info["delta_norm"] == pytest.approx(float((dog - cat).norm()), rel=1e-5)
    assert info["source"]["name"] == "cat" and info["target"]["version"] == 1
    code, out, _ = run(capsys, "show", "cat->dog")
    assert code == 0 and "delta [1, 77, 768]" in out and "legacy-import" in out
    code, out, _ = run(capsys, "list")
    assert code == 0 and "12 directions available" in out


def test_export_round_trips_for_the_diffusers_snippet(capsys, imported, tmp_path):
    code, out, _ = run(capsys, "export", "cat->dog", "--to", str(tmp_path / "pt"), "--format", "pt")
    assert code == 0
    # the docs snippet: source_embeds = torch.load("cat.pt")
    src = torch.load(tmp_path / "pt" / "cat.pt", weights_only=True)
    assert src.shape == (1, 77, 768) and torch.equal(
        src, torch.load(imported / "cat.pt", weights_only=True, map_location="cpu")
    )
    code, _, _ = run(capsys, "export", "horse", "--to", str(tmp_path / "st"), "--format", "safetensors")
    from safetensors.torch import load_file

    horse = load_file(str(tmp_path / "st" / "horse.safetensors"))["embedding"]
    assert code == 0 and horse.dtype == torch.float16 and horse.shape == (1, 77, 768)
    code, _, err = run(capsys, "export", "cat->dog", "--to", str(tmp_path), "--format", "pickle")
    assert code == 2 and err.startswith("error: --format 'pickle'")


def test_verify_exit_codes(capsys, imported, p2pz_home):
    code, out, _ = run(capsys, "verify", "--json")
    assert code == 0 and json.loads(out) == {"checked": 4, "problems": []}
    blob = next(p2pz_home.rglob("dog/1/embedding.safetensors"))
    blob.write_bytes(blob.read_bytes()[:-10])
    code, out, err = run(capsys, "verify")
    assert code == 1 and "1 damaged" in out and "dog/1" in err
    code, _, err = run(capsys, "show", "cat->dog")
    assert code == 2 and err.startswith("error: ") and "p2pz verify" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["show", "cat->cat"], "same concept"),
        (["show", "cat->"], "empty"),
        (["show", "cat->dgo"], "Did you mean: dog"),
        (["show", "cat->dog", "--model", "no/such-model"], "unknown model"),
        (["import-pt"], "nothing to import"),
        (["import-pt", "/no/such/dir", "--encoder", CLIP_L], "neither a file"),
    ],
)
def test_bad_input_one_line_error(capsys, imported, args, needle):
    code, _, err = run(capsys, *args)
    assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_console_script_runs():
    r = subprocess.run(
        [sys.executable, "-m", "p2pz_directions.cli", "--version"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "p2pz-directions" in r.stdout


_ENTRY = """
import atexit, sys
if sys.argv[1] == "torch":
    import torch  # noqa: F401 - as every editing command has
atexit.register(lambda: print("atexit ran", flush=True))
sys.argv = ["p2pz", *sys.argv[2:]]
from p2pz_directions.cli import entry
entry()
"""


@pytest.mark.parametrize(
    "torch_loaded, fast_exit, fast", [("torch", "", True), ("torch", "0", False), ("plain", "", False)]
)
def test_console_script_ends_without_teardown_once_torch_is_loaded(tmp_path, torch_loaded, fast_exit, fast):
    # the output and the exit code survive os._exit; the interpreter's shutdown (atexit) is skipped
    # only where torch was loaded, and P2PZ_FAST_EXIT=0 keeps it
    import os

    env = dict(os.environ, P2PZ_HOME=str(tmp_path), P2PZ_FAST_EXIT=fast_exit)
    ok = subprocess.run(
        [sys.executable, "-c", _ENTRY, torch_loaded, "--version"], capture_output=True, text=True, env=env
    )
    bad = subprocess.run(
        [sys.executable, "-c", _ENTRY, torch_loaded, "show", "no-such-concept"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0 and "p2pz-directions" in ok.stdout
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "no-such-concept" in bad.stderr
    assert ("atexit ran" not in ok.stdout) is fast
    if torch_loaded == "torch":  # (an unknown name may load torch itself, for the "did you mean")
        assert ("atexit ran" not in bad.stdout) is fast


def test_a_bad_fast_exit_value_is_one_error_line_before_any_work(tmp_path):
    import os

    env = dict(os.environ, P2PZ_HOME=str(tmp_path), P2PZ_FAST_EXIT="maybe")
    r = subprocess.run(
        [sys.executable, "-c", _ENTRY, "torch", "list"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2 and r.stdout == "atexit ran\n"  # no command output; a normal shutdown
    assert r.stderr.startswith("error: P2PZ_FAST_EXIT='maybe' is neither") and r.stderr.count("\n") == 1


def _options_by_command() -> dict[str, list]:
    import typer.main

    from p2pz_directions.cli import app

    group = typer.main.get_command(app)
    ctx = group.context_class(group)
    return {
        name: [p for p in group.get_command(ctx, name).params if p.param_type_name == "option"]
        for name in group.list_commands(ctx)
    }


def test_a_short_flag_means_one_long_flag_in_every_command():
    """-m is --model wherever it exists (it was --message in `push`), -d --direction, and so on."""
    by_command = _options_by_command()
    assert {"edit", "batch", "eval", "mask", "list", "push", "build"} <= set(by_command)
    meaning: dict[str, set[str]] = {}
    for params in by_command.values():
        for p in params:
            longs = [o for o in p.opts if o.startswith("--")]
            for short in (o for o in p.opts if not o.startswith("--")):
                meaning.setdefault(short, set()).add(longs[0])
    clashes = {s: sorted(m) for s, m in meaning.items() if len(m) > 1}
    assert not clashes, f"one short flag, several long ones: {clashes}"
    assert meaning["-m"] == {"--model"} and meaning["-d"] == {"--direction"}
    push = {o for p in by_command["push"] for o in p.opts}
    assert "--message" in push and "-m" not in push


def test_shared_options_read_the_same_everywhere():
    """--json, --quiet, --model, --device, ... come from cli_options: one help text each."""
    helps: dict[str, set[str]] = {}
    for params in _options_by_command().values():
        for p in params:
            helps.setdefault(p.opts[0], set()).add(p.help)
    for flag in ("--json", "--quiet", "--device", "--dtype", "--encoder", "--seeds", "--negative-prompt"):
        assert len(helps[flag]) == 1, (flag, helps[flag])
    # the editor flags of `edit` reach `batch` and `eval` too
    by_command = _options_by_command()
    editor_flags = {"--prompt", "--negative-prompt", "--steps", "--guidance-scale", "--xa-guidance"}
    editor_flags |= {"--strength", "--inpaint-strength", "--opt"}
    for name in ("edit", "batch", "eval"):
        assert editor_flags <= {p.opts[0] for p in by_command[name]}, name


def test_batch_and_demo_take_output_and_the_old_out():
    for name in ("batch", "demo"):
        (out,) = [p for p in _options_by_command()[name] if "-o" in p.opts]
        assert out.opts[0] == "--output" and "--out" in out.opts


def test_quiet_loading_waits_for_the_libraries_to_be_imported(tmp_path):
    """`quiet_loading` imports neither transformers nor diffusers (seconds each in a fresh process);
    their quieting runs when they are imported, and at once for a module already imported."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from p2pz_directions.cli.options import after_import, quiet_loading\n"
        "quiet_loading()\n"
        "assert 'transformers' not in sys.modules and 'diffusers' not in sys.modules\n"
        "import json\n"
        "seen = []\n"
        "after_import('json', lambda m: seen.append(('now', m.__name__)))\n"
        "after_import('wave', lambda m: seen.append(('later', m.__name__, hasattr(m, 'open'))))\n"
        "after_import('wave', lambda m: 1 / 0)  # an error in a cosmetic action is ignored\n"
        "assert seen == [('now', 'json')], seen\n"
        "import wave\n"
        "assert seen[-1] == ('later', 'wave', True), seen\n"
        "from transformers.utils import logging as tlog\n"
        "assert tlog.get_verbosity() == tlog.ERROR and not tlog.is_progress_bar_enabled()\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
