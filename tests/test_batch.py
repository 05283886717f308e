"""`p2pz batch`: folders, job files and datasets in; PNGs, results.parquet and metadata.jsonl out;
bad items recorded; equal to `p2pz edit`; batched editors proven equal; resumable after a kill."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import hub_server
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from p2pz_directions import batch
from p2pz_directions.batch import jobs as jobs_mod
from p2pz_directions.batch.results import STATE_DIR, read_journals
from p2pz_directions.cli import main
from p2pz_directions.core.concept import Concept
from p2pz_directions.core.store import LocalStore
from p2pz_directions.editing.editors import EditResult
from p2pz_directions.editing.models import encoder_for

pytestmark = pytest.mark.usefixtures("one_thread")
fake_hub = hub_server.fake_hub  # the fixture

FAST = ("-e", "sdedit", "--prompt", "a cat", "--steps", "2", "--device", "cpu", "-q")


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def model(tiny_sd1):
    """The tiny SD model with concepts cat, dog, horse in this test's registry."""
    enc = encoder_for(model=str(tiny_sd1))
    g = torch.Generator().manual_seed(0)
    store = LocalStore()
    for name in ("cat", "dog", "horse"):
        store.publish(Concept(name, torch.randn(77, enc.hidden_size, generator=g), enc))
    return tiny_sd1


def picture(path: Path, seed: int, size: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    picture(folder / "a.png", 1)
    picture(folder / "sub" / "b.png", 2)
    (folder / "notes.txt").write_text("not an input", "utf-8")
    return folder


def table(out: Path) -> list[dict]:
    return pq.read_table(out / "results.parquet").to_pylist()


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# -- jobs ------------------------------------------------------------------------------------------
def test_seeds_sweeps_and_stable_ids(tmp_path):
    assert jobs_mod.parse_seeds("0,1,5-7") == [0, 1, 5, 6, 7]
    with pytest.raises(jobs_mod.JobFileError, match="0,1,5-7"):
        jobs_mod.parse_seeds("zero")
    assert jobs_mod.parse_sweep(["strength=0.5,0.75", "eta=0,1"]) == [
        {"strength": 0.5, "eta": 0},
        {"strength": 0.5, "eta": 1},
        {"strength": 0.75, "eta": 0},
        {"strength": 0.75, "eta": 1},
    ]
    img = picture(tmp_path / "in" / "x.png", 0)
    kw = dict(directions=["cat->dog", "cat->horse"], seeds=[0, 1], editor="sdedit", model="m")
    plan = batch.plan_jobs([tmp_path / "in"], sweep={"strength": [0.5, 0.7]}, **kw)
    assert len(plan) == 2 * 2 * 2 and len({j.id for j in plan}) == 8
    again = batch.plan_jobs([tmp_path / "in"], sweep={"strength": [0.5, 0.7]}, **kw)
    assert [j.id for j in again] == [j.id for j in plan]  # same content, same ids
    assert plan[0].file_name == f"images/x-{plan[0].id}.png"
    picture(img, 9)  # other pixels under the same name: other jobs
    changed = batch.plan_jobs([tmp_path / "in"], sweep={"strength": [0.5, 0.7]}, **kw)
    assert not {j.id for j in changed} & {j.id for j in plan}
    with pytest.raises(jobs_mod.JobFileError, match="no direction"):
        batch.plan_jobs([img])
    with pytest.raises(jobs_mod.JobFileError, match="--seeds"):
        batch.plan_jobs([img], directions=["cat->dog"], options={"seed": 3})
    with pytest.raises(jobs_mod.JobFileError, match="no such file"):
        batch.plan_jobs([tmp_path / "missing"], directions=["cat->dog"])


def test_job_files_jsonl_and_csv(tmp_path):
    picture(tmp_path / "x.png", 0)
    lines = [
        {"image": "x.png", "direction": "cat->dog", "seed": 3, "prompt": "a cat", "strength": 0.5},
        {"image": "x.png", "direction": ["cat->dog", "cat->horse"], "seeds": [1, 2], "options": {"eta": 0.5}},
        {"image": "x.png"},
    ]
    jl = tmp_path / "jobs.jsonl"
    jl.write_text("\n".join(json.dumps(x) for x in lines) + "\n# a comment\n", "utf-8")
    plan = batch.plan_jobs([jl], directions=["horse->cat"], seeds=[0], editor="sdedit", model="m")
    got = [(j.direction, j.seed, j.options) for j in plan]
    assert got == [
        ("cat->dog", 3, {"prompt": "a cat", "strength": 0.5}),
        ("cat->dog", 1, {"eta": 0.5}),
        ("cat->dog", 2, {"eta": 0.5}),
        ("cat->horse", 1, {"eta": 0.5}),
        ("cat->horse", 2, {"eta": 0.5}),
        ("horse->cat", 0, {}),  # the command's direction and seeds where the line has none
    ]
    csv_file = tmp_path / "jobs.csv"
    csv_file.write_text(
        "image,direction,seed,strength,prompt\nx.png,cat->dog,4,0.25,a cat\nx.png,,,,\n", "utf-8"
    )
    plan = batch.plan_jobs([csv_file], directions=["dog->cat"], editor="sdedit", model="m")
    assert [(j.direction, j.seed, j.options) for j in plan] == [
        ("cat->dog", 4, {"prompt": "a cat", "strength": 0.25}),
        ("dog->cat", 0, {}),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\n{not json\n', "utf-8")
    with pytest.raises(jobs_mod.JobFileError, match=r"bad.jsonl:2 is not JSON"):
        batch.plan_jobs([bad], directions=["cat->dog"])
    bad.write_text('{"direction": "cat->dog"}\n', "utf-8")
    with pytest.raises(jobs_mod.JobFileError, match="'image'"):
        batch.plan_jobs([bad])


def test_cli_bad_input_exits_2_before_model_work(capsys, tmp_path):
    code, _, err = run(capsys, "batch", tmp_path / "nope", "-d", "cat->dog", "--out", tmp_path / "o")
    assert code == 2 and "error: no such file or folder" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run(capsys, "batch", "--out", tmp_path / "o", "-d", "cat->dog", "--seeds", "x")
    assert code == 2 and "error:" in err


# -- a folder, equal to `p2pz edit`; imagefolder; resume ---------------------------------------------
def test_folder_outputs_equal_p2pz_edit_and_load_as_imagefolder(capsys, model, photos, tmp_path):
    out = tmp_path / "edited"
    code, stdout, err = run(
        capsys, "batch", photos, "-d", "cat->dog", "--seeds", "0,1", "-m", model, "--out", out, *FAST
    )
    assert code == 0, err
    rows = table(out)
    assert len(rows) == 4 and not any(r["error"] for r in rows)
    assert {r["input"] for r in rows} == {"a.png", "sub/b.png"}  # notes.txt is not an image
    assert "4 jobs: 4 edited now, 0 already done, 0 failed" in stdout and "images/s" in stdout
    for r in rows:
        assert r["direction_name"] == "local:cat@1->dog@1" and r["editor"] == "sdedit"
        assert len(r["concept_hashes"]) == 2 and all(
            "=" in h and len(h.split("=")[1]) == 64 for h in r["concept_hashes"]
        )
        assert json.loads(r["options"]) == {"prompt": "a cat", "num_inference_steps": 2}
        import hashlib

        assert hashlib.sha256((out / r["file_name"]).read_bytes()).hexdigest() == r["sha256"]
    # the same job alone with `p2pz edit`: the same pixels
    for r in [x for x in rows if x["input"] == "sub/b.png" and x["seed"] == 1]:
        alone = tmp_path / "alone.png"
        code, _, err = run(
            capsys, "edit", photos / r["input"], "-d", "cat->dog", "-m", model, "--seed", r["seed"], "-o", alone,
            *FAST,
        )  # fmt: skip
        assert code == 0, err
        assert np.array_equal(pixels(alone), pixels(out / r["file_name"]))

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert ds.num_rows == 4 and sorted(ds["job_id"]) == sorted(r["job_id"] for r in rows)
    assert {"image", "direction", "seed", "options", "sha256"} <= set(ds.column_names)

    # the same command again: nothing to do, nothing rewritten
    mtimes = {r["file_name"]: (out / r["file_name"]).stat().st_mtime_ns for r in rows}
    code, stdout, _ = run(
        capsys, "batch", photos, "-d", "cat->dog", "--seeds", "0,1", "-m", model, "--out", out, *FAST
    )
    assert code == 0 and "0 edited now, 4 already done" in stdout
    assert {f: (out / f).stat().st_mtime_ns for f in mtimes} == mtimes
    assert table(out) == rows


def test_bad_items_are_recorded_and_the_rest_done(capsys, model, photos, tmp_path):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG header, no image
    out = tmp_path / "edited"
    code, stdout, err = run(
        capsys, "batch", photos, "-d", "cat->dog", "-d", "cat->dgo", "--sweep", "eta=0,NaN", "-m", model,
        "--out", out, *FAST,
    )  # fmt: skip
    assert code == 1
    rows = table(out)
    assert len(rows) == 3 * 2 * 2
    by = {(r["input"], r["direction"], json.loads(r["options"])["eta"] == 0): r for r in rows}
    for (inp, d, finite), r in by.items():
        if inp == "broken.png":
            assert "ImageError" in r["error"] and "broken.png" in r["error"] and r["file_name"] is None
        elif d == "cat->dgo":
            assert "NotFoundError" in r["error"] and "dog" in r["error"]
        elif not finite:
            assert "EditorError" in r["error"] and r["file_name"] is None
        else:
            assert r["error"] is None and (out / r["file_name"]).is_file()
    assert sum(r["error"] is None for r in rows) == 2
    assert err.count("error: job ") == 10 and "broken.png" in err and "cat->dgo" in err
    meta = [json.loads(x) for x in (out / "metadata.jsonl").read_text("utf-8").splitlines()]
    assert len(meta) == 2 and all((out / m["file_name"]).is_file() for m in meta)


# -- datasets ----------------------------------------------------------------------------------------
def test_local_dataset_with_prompt_column(capsys, model, tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.open(picture(tmp_path / "src" / f"{i}.png", i)).convert("RGB") for i in (1, 2)]
    ds = datasets.Dataset.from_dict(
        {"image": imgs, "caption": ["a cat", "a cat"], "label": [0, 1]},
        features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.Value("string"), "label": datasets.Value("int64")}
        ),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "edited"
    code, _, err = run(
        capsys, "batch", "--dataset", tmp_path / "ds", "--prompt-column", "caption", "-d", "cat->dog", "-m", model,
        "--out", out, "-e", "sdedit", "--steps", "2", "--device", "cpu", "-q",
    )  # fmt: skip
    assert code == 0, err
    rows = sorted(table(out), key=lambda r: r["input"])
    assert [r["input"].rsplit(":", 1)[1] for r in rows] == ["train[0]", "train[1]"]
    assert all(json.loads(r["options"])["prompt"] == "a cat" for r in rows)
    # the same image from a folder gives the same edit
    ref = tmp_path / "ref"
    code, _, err = run(
        capsys, "batch", tmp_path / "src" / "2.png", "-d", "cat->dog", "-m", model, "--out", ref, *FAST
    )
    assert code == 0, err
    assert np.array_equal(pixels(out / rows[1]["file_name"]), pixels(ref / table(ref)[0]["file_name"]))
    code, _, err = run(
        capsys, "batch", "--dataset", tmp_path / "ds", "--image-column", "img", "-d", "x->y", "--out", out
    )
    assert code == 2 and "no column 'img'" in err and "caption" in err


# -- batching --------------------------------------------------------------------------------------
class ToyEditor:
    """Adds seeded noise to the image; takes a list of images with one generator each when ``batched``;
    ``lie`` makes the batched result differ from the single one."""

    def __init__(self, batched: bool = True, lie: bool = False):
        self.batched, self.lie = batched, lie
        self.calls: list[int] = []

    def resolve_direction(self, name):
        if "?" in name:
            raise LookupError(f"no direction {name!r}")
        return SimpleNamespace(name=f"toy:{name}", source=None, target=None)

    def _one(self, image, gen, scale, extra=0):
        arr = np.asarray(image, dtype=np.int16)
        noise = torch.randint(0, 40, arr.shape, generator=gen).numpy()
        return Image.fromarray(np.clip(arr + noise * scale + extra, 0, 255).astype(np.uint8))

    def edit(self, image, direction, *, seed=None, generator=None, scale=1):
        if isinstance(image, list):
            if not self.batched:
                raise TypeError("toy takes one image")
            self.calls.append(len(image))
            outs = [self._one(im, g, scale, int(self.lie)) for im, g in zip(image, generator, strict=True)]
            return EditResult(image=outs)
        self.calls.append(1)
        return EditResult(image=self._one(image, torch.Generator().manual_seed(seed), scale))


@pytest.mark.parametrize("kind", ["batched", "lying", "singles", "tolerated"])
def test_batches_only_when_proven_equal(tmp_path, kind):
    folder = tmp_path / "in"
    for i in range(3):
        picture(folder / f"{i}.png", i)
    picture(folder / "big.png", 7, size=48)  # another size: its own batch
    toy = ToyEditor(batched=kind != "singles", lie=kind in ("lying", "tolerated"))
    kw = dict(directions=["a->b", "a?b"], seeds=[0, 1], editor="toy", model="m", progress=False)
    tol = 1 if kind == "tolerated" else 0
    rep = batch.run(folder, out=tmp_path / "o", batch_size=4, editors={"toy": toy}, batch_tolerance=tol, **kw)
    rows = rep.records
    assert rep.failed == 8 and rep.done == 8 and len(rows) == 16
    assert all("no direction" in r["error"] for r in rows if r["direction"] == "a?b")
    sizes = sorted(r["batch_size"] for r in rows if not r["error"])
    if kind in ("batched", "tolerated"):
        # 8 jobs of one group, batches of 4: [4 small], then [2 small] + [2 big]; one proof edit alone
        assert sizes == [2, 2, 2, 2, 4, 4, 4, 4] and toy.calls == [4, 1, 2, 2]
    else:
        assert sizes == [1] * 8
        assert rep.notes and (
            "differs from the same job alone (by 1 levels, tolerance 0)" in rep.notes[0]
        ) == (kind == "lying")
    single = ToyEditor(batched=False)
    ref = batch.run(folder, out=tmp_path / "ref", batch_size=1, editors={"toy": single}, **kw)
    for r, s in zip(rows, ref.records, strict=True):
        assert r["job_id"] == s["job_id"]
        if kind == "tolerated":  # off by at most the tolerance
            assert (r["sha256"] == s["sha256"]) == (r["error"] is not None)
            if r["error"] is None:
                diff = np.abs(
                    pixels(tmp_path / "o" / r["file_name"]).astype(int)
                    - pixels(tmp_path / "ref" / s["file_name"])
                )
                assert diff.max() == 1
        else:
            assert r["sha256"] == s["sha256"]  # same bytes as one by one


# -- the Hub -------------------------------------------------------------------------------------------
def test_push_to_hub_loads_as_a_dataset(tmp_path, fake_hub):
    folder = tmp_path / "in"
    for i in range(2):
        picture(folder / f"{i}.png", i)
    rep = batch.run(
        folder, out=tmp_path / "o", directions=["a->b"], editor="toy", model="m", editors={"toy": ToyEditor()},
        progress=False,
    )  # fmt: skip
    assert rep.ok
    url = batch.push_to_hub(tmp_path / "o", "alice/edits", token=fake_hub.token)
    assert "alice/edits" in url
    files = set(fake_hub.files("alice/edits"))
    assert {"README.md", "metadata.jsonl", "results.parquet"} <= files and sum(
        f.endswith(".png") for f in files
    ) == 2
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("alice/edits", split="train")
    assert ds.num_rows == 2 and sorted(ds["job_id"]) == sorted(r["job_id"] for r in rep.records)
    assert ds[0]["image"].size == (32, 32)
    # and a Hub dataset is an input: its images, by row, hashed by their bytes
    plan = batch.plan_jobs(dataset="alice/edits", directions=["a->b"], editor="toy", model="m")
    assert [j.input.name for j in plan] == ["alice/edits:train[0]", "alice/edits:train[1]"]
    by_job = {r["job_id"]: r["sha256"] for r in rep.records}
    assert sorted(j.input.sha256 for j in plan) == sorted(by_job[i] for i in ds["job_id"])


def test_journal_ignores_a_cut_line(tmp_path):
    d = tmp_path / STATE_DIR
    d.mkdir()
    good = {"job_id": "a", "error": None, "finished_at": 1.0}
    (d / "journal-0.jsonl").write_text(json.dumps(good) + "\n" + '{"job_id": "b", "err', "utf-8")
    assert list(read_journals(tmp_path)) == ["a"]
    assert math.isfinite(read_journals(tmp_path)["a"]["finished_at"])


def test_gpus_launches_accelerate_with_the_same_arguments(capsys, monkeypatch, tmp_path):
    from p2pz_directions.cli import batch as cli_batch

    picture(tmp_path / "x.png", 0)
    seen = {}

    def fake_call(cmd):
        seen["cmd"] = cmd
        return 0

    monkeypatch.setattr(cli_batch.subprocess, "call", fake_call)
    code, _, err = run(
        capsys, "batch", tmp_path / "x.png", "-d", "cat->dog", "-d", "cat->horse", "--out", tmp_path / "o",
        "--gpus", "4", "--steps", "3", "--no-check-batch", "-q",
    )  # fmt: skip
    assert code == 0, err
    cmd = seen["cmd"]
    i = cmd.index("accelerate.commands.launch")
    assert cmd[i + 1 : i + 4] == ["--multi_gpu", "--num_processes", "4"]
    assert cmd[cmd.index("-m", i) + 1] == "p2pz_directions.batch"
    tail = cmd[cmd.index("p2pz_directions.batch") + 1 :]
    assert tail == [
        str(tmp_path / "x.png"), "--output", str(tmp_path / "o"), "--direction", "cat->dog", "--direction", "cat->horse",
        "--steps", "3", "--no-check-batch", "--quiet",
    ]  # fmt: skip
    assert "--gpus" not in tail and not (tmp_path / "o").exists()  # nothing ran here


def test_a_second_run_on_the_same_folder_is_refused(capsys, tmp_path):
    from filelock import FileLock

    picture(tmp_path / "x.png", 0)
    out = tmp_path / "o"
    (out / STATE_DIR).mkdir(parents=True)
    with FileLock(str(out / STATE_DIR / "lock-0")):
        code, _, err = run(capsys, "batch", tmp_path / "x.png", "-d", "a->b", "--out", out, "-e", "toy", "-q")
    assert code == 2 and "another p2pz batch is writing to" in err


def test_one_progress_bar_with_done_failed_and_eta(tmp_path):
    import io

    from rich.console import Console

    folder = tmp_path / "in"
    for i in range(3):
        picture(folder / f"{i}.png", i)
    (folder / "bad.png").write_text("text", "utf-8")
    buf = io.StringIO()
    plan = batch.plan_jobs(folder, directions=["a->b"], editor="toy", model="m")
    rep = batch.run_jobs(
        plan, tmp_path / "o", editors={"toy": ToyEditor()}, err_console=Console(file=buf, width=150)
    )
    text = buf.getvalue()
    assert rep.done == 3 and rep.failed == 1
    assert "batch" in text and "4/4" in text and "1 failed" in text and "ETA" in text
    assert "error: job " in text and "bad.png" in text


def test_real_batched_editor_gets_one_generator_per_job(model, tmp_path):
    """pix2pix-zero takes a list of images with one generator each: batched within the tolerance, each
    job's seed its own (a batch that mixed up the seeds would differ by far more than one level)."""
    from p2pz_directions import editors

    if getattr(editors.get("pix2pix-zero", model=str(model)), "options", None) is None:
        pytest.skip("this pix2pix-zero takes one image per call")
    picture(tmp_path / "in" / "x.png", 3)
    kw = dict(
        directions=["cat->dog"], seeds=[0, 1], editor="pix2pix-zero", model=str(model), device="cpu", progress=False,
        options={"prompt": "a cat", "num_inference_steps": 2, "num_reg_steps": 0, "cross_attention_guidance_amount": 0.05},
    )  # fmt: skip
    rep = batch.run(tmp_path / "in", out=tmp_path / "b", batch_size=2, batch_tolerance=2, **kw)
    assert rep.ok and [r["batch_size"] for r in rep.records] == [2, 2], rep.notes
    ref = batch.run(tmp_path / "in", out=tmp_path / "s", batch_size=1, **kw)
    got = [pixels(tmp_path / "b" / r["file_name"]).astype(int) for r in rep.records]
    want = [pixels(tmp_path / "s" / r["file_name"]).astype(int) for r in ref.records]
    assert all(np.abs(g - w).max() <= 2 for g, w in zip(got, want, strict=True))
    assert np.abs(want[0] - want[1]).max() > 10  # the two seeds do give other pictures


def test_run_takes_the_plan_keywords_and_names_a_wrong_one(tmp_path):
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) direction; .*directions"):
        batch.run(tmp_path, out=tmp_path / "o", direction=["a->b"])
    assert not (tmp_path / "o").exists()
