"""`p2pz build`, `p2pz reencode`, `p2pz build-pack` through the real entry point (cli.main)."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from p2pz_directions.cli import main
from p2pz_directions.cli.build import RichProgress
from p2pz_directions.core.store import LocalStore

FAST = ["--near-duplicates", "off"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    from tiny_t5 import make_tiny_t5

    return make_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_build_summary(capsys, tiny_sd1):
    code, out, err = run(
        capsys, "build", "cat", "dog", "--model", tiny_sd1, "--captioner", "templates", "--n", 20, *FAST
    )
    assert code == 0, err
    assert "built cat->dog" in out and "local:cat@1" in out and "local:dog@1" in out
    assert (
        "delta norm" in out
        and "stored in" in out
        and str(LocalStore().pack_dir("local")) in out.replace("\n", "")
    )
    assert [e.ref for e in LocalStore().entries()] == ["local:cat@1", "local:dog@1"]


def test_build_json_reports_drops(capsys, tiny_sd1, tmp_path):
    dogs = tmp_path / "dogs.txt"
    dogs.write_text("\n".join(["a dog", "a dog", "a cat"] + [f"dog number {i}" for i in range(20)]), "utf-8")
    code, out, err = run(
        capsys,
        "build",
        "cat",
        "dog",
        "-m",
        tiny_sd1,
        "-c",
        "templates",
        "-n",
        20,
        "--target-captions",
        dogs,
        "--json",
        *FAST,
    )
    assert code == 0, err
    info = json.loads(out)
    assert info["target"]["report"]["dropped"] == {"no_concept": 1, "duplicate": 1}
    assert info["target"]["kept"] == 20 and info["source"]["ref"] == "local:cat@1" and info["delta_norm"] > 0


def test_dry_run_prints_captions_and_stores_nothing(capsys, tiny_sd1):
    code, out, err = run(
        capsys,
        "build",
        "cat",
        "dog",
        "-m",
        tiny_sd1,
        "-c",
        "templates",
        "-n",
        16,
        "--dry-run",
        "--show",
        3,
        *FAST,
    )
    assert code == 0, err
    assert "dry run: nothing encoded or stored" in out and "13 more" in out
    assert sum(1 for line in out.splitlines() if line.strip().startswith("1  ")) == 2
    assert LocalStore().entries() == []
    code, out, _ = run(
        capsys, "build", "cat", "dog", "-c", "templates", "-n", 16, "--dry-run", "--json", *FAST
    )
    info = json.loads(out)
    assert code == 0 and len(info["source"]["captions"]) == 16 and info["dry_run"] is True


def test_flan_t5_from_the_cli(capsys, tiny_sd1, tiny_t5):
    code, out, err = run(
        capsys,
        "build",
        "cat",
        "dog",
        "-m",
        tiny_sd1,
        "--captioner-model",
        tiny_t5,
        "--n",
        4,
        "--min-captions",
        2,
        "--no-mention-check",
        "--max-new-tokens",
        6,
        "--gen-batch-size",
        8,
        "--temperature",
        1.5,
        "--json",
    )
    assert code == 0, err
    info = json.loads(out)
    cap = info["source"]["captioner"]
    assert cap["captioner"] == "flan-t5" and cap["temperature"] == 1.5 and cap["batch_size"] == 8
    assert info["source"]["kept"] >= 2


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["cat", "Cat"], "same concept"),
        (["cat", " "], "empty"),
        (["cat", "dog", "--captioner", "nope"], "unknown captioner 'nope'"),
        (["cat", "dog", "--captioner", "file"], "needs caption files"),
    ],
)
def test_bad_input_one_line_error(capsys, tiny_sd1, args, match):
    code, out, err = run(capsys, "build", *args, "--model", tiny_sd1)
    assert code == 2 and out == ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]
    assert LocalStore().entries() == []


def test_bad_model_and_files(capsys, tmp_path, tiny_sd1):
    bad = tmp_path / "no-te"
    (bad / "unet").mkdir(parents=True)
    (bad / "model_index.json").write_text("{}", "utf-8")
    code, _, err = run(capsys, "build", "cat", "dog", "--model", bad, "-c", "templates")
    assert code == 2 and "no text encoder" in err and err.count("\n") == 1
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("un chat \xe9l\xe9gant\n".encode("latin-1"))
    for f, msg in ((empty, "is empty"), (latin, "not UTF-8")):
        code, _, err = run(
            capsys, "build", "cat", "dog", "-m", tiny_sd1, "--source-captions", f, "-c", "templates"
        )
        assert code == 2 and msg in err and err.startswith("error: ")
    code, _, err = run(capsys, "build", "cat", "dog", "-m", tiny_sd1, "--near-duplicates", "2")
    assert code == 2 and "near-duplicates" in err
    assert LocalStore().entries() == []


def test_reencode_command(capsys, tiny_sd1, tiny_sd2):
    assert run(capsys, "build", "cat", "dog", "-m", tiny_sd1, "-c", "templates", "-n", 16, *FAST)[0] == 0
    code, out, err = run(capsys, "reencode", "cat", "--model", tiny_sd2, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["encoder"]["hidden_size"] == 64 and info["num_captions"] == 16
    assert info["reencoded_from"]["name"] == "cat"
    code, out, err = run(capsys, "reencode", "dog", "--model", tiny_sd2)
    assert code == 0 and "re-encoded local:dog@1" in out
    code, out, _ = run(capsys, "show", "cat->dog", "--model", tiny_sd2, "--json")
    assert code == 0 and json.loads(out)["encoder"]["hidden_size"] == 64
    code, _, err = run(capsys, "reencode", "horse", "--model", tiny_sd2)
    assert code == 2 and err.startswith("error: ") and "horse" in err


def test_build_pack_from_recipes(capsys, tiny_sd1):
    code, out, _ = run(capsys, "build-pack", "--list", "--json")
    names = [r["name"] for r in json.loads(out)]
    assert code == 0 and {"cat", "dog", "horse", "zebra"} <= set(names)
    code, out, err = run(
        capsys, "build-pack", "cat", "zebra", "-m", tiny_sd1, "--captioner", "templates", "--n", 16, "--json"
    )
    assert code == 0, err
    rows = json.loads(out)
    assert [r["ref"] for r in rows] == ["official:cat@1", "official:zebra@1"]
    c = LocalStore().load(LocalStore().entries(name="zebra")[0])
    assert c.provenance["recipe"]["name"] == "zebra" and c.provenance["recipe"]["seed"] == 0


def test_rich_progress_draws_bars():
    con = Console(record=True, force_terminal=True, width=100)
    with RichProgress(con, enabled=True) as cb:
        cb("generate", "cat", 32, None)
        cb("filter", "cat", 10, 16)
        cb("encode", "cat", 16, 16)
    text = con.export_text()
    assert "generating cat" in text and "usable cat" in text and "16/16" in text
    assert cb.events[-1] == ("encode", "cat", 16, 16)
