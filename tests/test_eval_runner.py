"""`evaluate` and `p2pz eval`: real editors on a tiny SD model, tiny CLIP/DINO scorers, records, bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz_directions import directions, editors
from p2pz_directions.cli import main
from p2pz_directions.core import records
from p2pz_directions.core.concept import Concept
from p2pz_directions.core.errors import NotFoundError
from p2pz_directions.core.store import LocalStore
from p2pz_directions.editing.editors import Editor, EditResult
from p2pz_directions.editing.models import encoder_for
from p2pz_directions.eval import EvalError, ScorerModelError, evaluate
from p2pz_directions.eval.tiny import make_tiny_clip, make_tiny_dino

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"num_inference_steps": 2, "prompt": "a cat"}


@pytest.fixture(scope="session")
def scorer_models(tmp_path_factory):
    return {
        "clip": str(make_tiny_clip(tmp_path_factory.mktemp("clip"))),
        "dino-structure": str(make_tiny_dino(tmp_path_factory.mktemp("dino"))),
    }


@pytest.fixture
def store(tiny_sd1, p2pz_home):
    enc = encoder_for(model=str(tiny_sd1))
    g = torch.Generator().manual_seed(0)
    st = LocalStore(p2pz_home)
    for name in ("cat", "dog", "horse"):
        st.publish(Concept(name, torch.randn(77, enc.hidden_size, generator=g), enc))
    return st


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "cats"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"cat_{i}.png")
    (d / "notes.txt").write_text("not an image, and not looked at")
    return d


def run(sd, store, photos, scorer_models, **kw):
    args = dict(
        editor="sdedit",
        model=str(sd),
        seeds=[0, 1],
        scorer_models=scorer_models,
        editor_options=FAST,
        device="cpu",
        store=store,
    )
    names = kw.pop("directions", ["cat->dog", "cat->horse"])
    args.update(kw)
    return evaluate(names, photos, **args)


def test_compare_two_directions(tiny_sd1, store, photos, scorer_models):
    seen = []
    res = run(tiny_sd1, store, photos, scorer_models, progress=lambda *a: seen.append(a))
    assert res.directions == ["cat->dog", "cat->horse"] and res.editors == ["sdedit"]
    assert [x["name"] for x in res.images] == ["cat_0.png", "cat_1.png"]
    assert len(res.samples) == 2 * 2 * 2  # directions x images x seeds
    assert set(res.metrics) == {
        "clip_accuracy",
        "clip_directional_similarity",
        "structure_distance",
        "background_ssim",
    }
    for d in res.directions:
        rows = [s for s in res.samples if s["direction"] == d]
        for m in ("clip_accuracy", "structure_distance", "clip_directional_similarity"):
            vals = [r[m] for r in rows]
            s = res.summaries[d]["sdedit"][m]
            assert (
                s["n"] == 4
                and s["mean"] == pytest.approx(np.mean(vals))
                and s["std"] == pytest.approx(np.std(vals))
            )
        assert res.summaries[d]["sdedit"]["background_ssim"]["n"] == 0  # SDEdit has no mask
        assert all(r["structure_distance"] > 0 for r in rows)  # the edit changed the image
    for m, best in res.winners["sdedit"].items():
        means = {d: res.summaries[d]["sdedit"][m]["mean"] for d in res.directions}
        pick = max(means.values()) if res.metrics[m]["higher_is_better"] else min(means.values())
        assert best == [d for d in res.directions if math.isclose(means[d], pick)]
    assert "background_ssim" not in res.winners["sdedit"]
    assert res.grid.size == (3 * 192, 18 + 2 * 192)  # input + 2 directions, 2 rows
    assert ("edit", 8, 8) in seen and seen[-1][0] == "score"
    assert records.list_records(store) == []  # nothing recorded without record=True
    json.dumps(res.to_dict())  # JSON-ready


def test_deterministic_across_runs(tiny_sd1, store, photos, scorer_models):
    a = run(tiny_sd1, store, photos, scorer_models, seeds=[3])
    b = run(tiny_sd1, store, photos, scorer_models, seeds=[3])
    assert a.samples == b.samples and a.summaries == b.summaries


def test_diffedit_mask_gives_background_ssim_and_record(tiny_sd1, store, photos, scorer_models, capsys):
    res = run(
        tiny_sd1,
        store,
        photos,
        scorer_models,
        directions=["cat->dog"],
        editor="diffedit",
        seeds=[0],
        editor_options={"num_inference_steps": 2, "num_maps_per_mask": 1},
        record=True,
    )
    vals = [s["background_ssim"] for s in res.samples]
    assert len(vals) == 2 and all(v is not None and -1 <= v <= 1 for v in vals)
    assert res.winners == {}  # one direction: nothing to win
    (rec,) = res.records
    d = directions.load("cat->dog", store=store)
    assert records.for_direction(d, store) == [rec]
    assert rec.pack == "local" and rec.editor == "diffedit" and rec.model == str(tiny_sd1)
    assert rec.data["images"]["sha256"] == res.image_set_sha256
    assert rec.data["settings"]["scorers"]["clip"]["model"] == scorer_models["clip"]
    assert rec.scores["background_ssim"]["mean"] == pytest.approx(np.mean(vals))
    assert len(rec.data["samples"]) == 2
    assert main(["show", "cat->dog"]) == 0
    out = capsys.readouterr().out
    assert "recorded scores" in out and rec.record_id[:10] in out and "diffedit" in out
    assert main(["show", "cat->dog", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["evaluations"][0]["record_id"] == rec.record_id


@dataclasses.dataclass(frozen=True)
class _Opts:
    seed: int = 0


class _Batched(Editor):
    """Takes lists (declares an options dataclass); brightens by the seed; records its calls."""

    name = "batched-test"
    options = _Opts
    calls: list = []

    def __init__(self):
        super().__init__(model="unused", encoder="local/clip-test0123456789ab")

    def edit(self, image, direction, **options):
        self.calls.append(type(image).__name__)
        imgs = image if isinstance(image, list) else [image]
        outs = [
            Image.fromarray(np.clip(np.asarray(i, np.int16) + 10 + options["seed"], 0, 255).astype(np.uint8))
            for i in imgs
        ]
        return EditResult(image=outs if isinstance(image, list) else outs[0], original=image)


def test_batched_editor_gets_one_call_per_seed(tiny_sd1, store, photos, scorer_models):
    enc = encoder_for(model=str(tiny_sd1))
    ed = _Batched()
    ed._encoder_info = enc
    _Batched.calls = []
    res = run(
        tiny_sd1, store, photos, scorer_models, directions=["cat->dog"], editors_given={"batched-test": ed},
        editor="batched-test", editor_options={},
    )  # fmt: skip
    assert _Batched.calls == ["list", "list"]  # two seeds, each one call with both images
    assert len(res.samples) == 4 and all(s["structure_distance"] >= 0 for s in res.samples)
    # seed s brightens by 10 + s: the per-seed edits reached the scorers in order
    _Batched.calls = []
    res1 = run(
        tiny_sd1, store, photos, scorer_models, directions=["cat->dog"], editors_given={"batched-test": ed},
        editor="batched-test", editor_options={}, edit_batch_size=1,
    )  # fmt: skip
    # chunks of one image: the image itself (a PIL image, opened upright), not a list
    assert len(_Batched.calls) == 4 and "list" not in _Batched.calls
    assert res1.samples == res.samples


def test_bad_input_fails_before_editing_and_records_nothing(tiny_sd1, store, photos, scorer_models, tmp_path):
    calls = []

    class Counting(Editor):
        name = "counting"

        def edit(self, image, direction, **kw):
            calls.append(1)
            return EditResult(image=image, original=image)

    ed = Counting(model="x", encoder=encoder_for(model=str(tiny_sd1)))
    base = dict(editor="counting", editors_given={"counting": ed}, record=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvalError, match="no images in"):
        run(tiny_sd1, store, empty, scorer_models, **base)
    with pytest.raises(EvalError, match="no images to evaluate"):
        run(tiny_sd1, store, [], scorer_models, **base)
    with pytest.raises(EvalError, match="no such image"):
        run(tiny_sd1, store, tmp_path / "missing", scorer_models, **base)
    with pytest.raises(NotFoundError, match="no concept 'cta'"):
        run(tiny_sd1, store, photos, scorer_models, directions=["cta->dog"], **base)
    wrong = {"clip": scorer_models["dino-structure"], "dino-structure": scorer_models["dino-structure"]}
    with pytest.raises(ScorerModelError, match="not CLIP"):
        run(tiny_sd1, store, photos, wrong, **base)
    with pytest.raises(LookupError, match="unknown scorer"):
        run(tiny_sd1, store, photos, {"clip": scorer_models["clip"]}, scorers=["clip", "nope"], **base)
    with pytest.raises(EvalError, match="not in use: dino-structure"):
        run(tiny_sd1, store, photos, scorer_models, scorers=["clip"], **base)
    with pytest.raises(EvalError, match="listed twice"):
        run(tiny_sd1, store, photos, scorer_models, directions=["cat->dog", "cat->dog"], **base)
    with pytest.raises(EvalError, match="no pack 'nowhere'"):
        run(tiny_sd1, store, photos, scorer_models, record_pack="nowhere", **{k: v for k, v in base.items()})
    assert calls == []  # no edit was attempted
    assert records.list_records(store) == []


def test_encoder_mismatch_is_refused_before_editing(tiny_sd1, tiny_sd2, store, photos, scorer_models):
    ed = editors.get("sdedit", model=str(tiny_sd2))
    with pytest.raises(Exception, match="encoder|D=") as ei:
        run(tiny_sd1, store, photos, scorer_models, editors_given={"sdedit": ed})
    assert "P2PZError" in [c.__name__ for c in type(ei.value).__mro__]


# -- CLI ----------------------------------------------------------------------------------------------
def cli(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_eval_table_json_grid_and_record(tiny_sd1, store, photos, scorer_models, tmp_path, capsys):
    out_json = tmp_path / "res" / "cats.json"
    common = (
        "-i", photos, "-e", "sdedit", "-m", tiny_sd1, "--seeds", "0,1", "--steps", "2", "--prompt", "a cat",
        "--clip-model", scorer_models["clip"], "--dino-model", scorer_models["dino-structure"], "--device", "cpu",
    )  # fmt: skip
    code, out, err = cli(capsys, "eval", "cat->dog", "cat->horse", *common, "-o", out_json)
    assert code == 0, err
    assert "clip_accuracy" in out and "±" in out and "cat->horse" in out and "best of the directions" in out
    assert "edit" in err  # the progress bar
    data = json.loads(out_json.read_text())
    assert data["seeds"] == [0, 1] and len(data["samples"]) == 8
    grid = out_json.with_name("cats-grid.png")
    assert data["grid"] == str(grid) and Image.open(grid).size == (3 * 192, 18 + 2 * 192)

    code, out, err = cli(
        capsys, "eval", "cat->dog", *common, "-o", out_json, "--json", "--record", "--strength", "0.6"
    )
    assert code == 0, err
    data = json.loads(out)
    # the editor flags of `p2pz edit` reach the editor as its keywords
    want = {"num_inference_steps": 2, "prompt": "a cat", "strength": 0.6}
    assert want.items() <= data["settings"]["editor_options"].items(), data["settings"]
    assert len(data["records"]) == 1 and data["winners"] == {}
    assert [r.record_id for r in records.list_records(store)] == data["records"]

    code, out, _ = cli(capsys, "eval", "--list-scorers", "--json")
    assert code == 0 and {r["metric"] for r in json.loads(out)} >= {"clip_accuracy", "structure_distance"}


def test_cli_eval_errors_are_one_line(tiny_sd1, store, photos, scorer_models, tmp_path, capsys):
    base = ("-e", "sdedit", "-m", tiny_sd1, "--device", "cpu", "--clip-model", scorer_models["clip"])
    for args, want in [
        (("eval", "cat->dog", *base), "give the images"),
        (("eval", "-i", photos, *base), "give one or more directions"),
        (("eval", "cat->dog", "-i", tmp_path / "none", *base), "no such image or folder"),
        (
            ("eval", "cat->dog", "-i", photos, *base, "--clip-model", scorer_models["dino-structure"]),
            "not CLIP",
        ),
        (("eval", "cat->dog", "-i", photos, *base, "-o", tmp_path / "x.txt"), "give a .json file name"),
    ]:
        code, out, err = cli(capsys, *args)
        assert code == 2 and err.startswith("error: ") and want in err and err.count("\n") == 1, (args, err)
    assert records.list_records(store) == []
