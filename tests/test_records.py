"""Evaluation records: content-addressed, immutable, hash-checked on read, atomic under the lock."""

from __future__ import annotations

import json

import pytest
import torch

from p2pz_directions import directions
from p2pz_directions.core import records
from p2pz_directions.core.concept import Concept, Direction, EncoderInfo
from p2pz_directions.core.errors import FormatError, IntegrityError, NotFoundError
from p2pz_directions.core.store import LocalStore

ENC = EncoderInfo("local/clip-test0123456789ab", 32, "clip")


def concept(name: str, seed: int) -> Concept:
    g = torch.Generator().manual_seed(seed)
    return Concept(
        name, torch.randn(77, 32, generator=g), ENC, captions=[f"a {name}", f"a photo of a {name}"]
    )


@pytest.fixture
def store(tmp_path):
    st = LocalStore(tmp_path / "home")
    for i, n in enumerate(["cat", "dog", "horse"]):
        st.publish(concept(n, i), pack="mine")
    return st


def make(d, scores=None, **kw):
    scores = scores or {
        "clip_accuracy": {"mean": 0.75, "std": 0.25, "n": 4, "higher_is_better": True},
        "structure_distance": {"mean": 0.031, "std": 0.004, "n": 4, "higher_is_better": False},
    }
    args = dict(
        direction=d,
        editor="pix2pix-zero",
        model="CompVis/stable-diffusion-v1-4",
        settings={"seeds": [0, 1], "editor_options": {"num_inference_steps": 50}},
        images=[{"name": "a.png", "sha256": "a" * 64}, {"name": "b.png", "sha256": "b" * 64}],
        image_set_sha256="c" * 64,
        scores=scores,
        samples=[{"image": "a.png", "seed": 0, "clip_accuracy": 1.0, "structure_distance": float("nan")}],
    )
    args.update(kw)
    return records.build(**args)


def test_publish_read_round_trip_and_content_address(store):
    d = directions.load("cat->dog", store=store)
    meta = make(d)
    rec = records.publish(meta, "mine", store)
    assert rec.path == store.pack_dir("mine") / "evals" / f"{rec.record_id}.json"
    assert rec.direction == "cat->dog" and rec.editor == "pix2pix-zero" and rec.pack == "mine"
    assert rec.source_hash == d.source.content_hash and rec.target_hash == d.target.content_hash
    assert rec.data["package_version"] and rec.data["images"]["sha256"] == "c" * 64
    assert rec.data["samples"][0]["structure_distance"] is None  # NaN is stored as null
    again = records.read_record(rec.path)
    assert again.to_dict() == rec.to_dict()
    # the same evaluation recorded later (another timestamp) is the same record: one file
    later = make(d, created="2030-01-01T00:00:00.000000Z")
    assert later["record_id"] == meta["record_id"] and later["manifest_sha256"] != meta["manifest_sha256"]
    before = rec.path.read_bytes()
    assert records.publish(later, "mine", store).record_id == rec.record_id
    assert rec.path.read_bytes() == before  # never rewritten
    assert len(records.list_records(store)) == 1
    # other scores: another record
    other = make(d, scores={"clip_accuracy": {"mean": 0.5, "std": 0.5, "n": 4}})
    assert records.publish(other, "mine", store).record_id != rec.record_id
    assert len(records.for_direction(d, store)) == 2
    assert records.for_direction(directions.load("dog->cat", store=store), store) == []


def test_records_are_immutable_objects(store):
    rec = records.publish(make(directions.load("cat->dog", store=store)), "mine", store)
    with pytest.raises(TypeError):
        rec.data["editor"] = "other"  # type: ignore[index]
    with pytest.raises(TypeError):
        rec.scores["clip_accuracy"]["mean"] = 1.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        rec.record_id = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: m["scores"]["clip_accuracy"].__setitem__("mean", 0.99),  # the score changed
        lambda m: m.__setitem__("created", "2000-01-01"),  # only the date changed
        lambda m: m.__setitem__("editor", "diffedit"),
    ],
)
def test_edited_record_is_caught_on_read(store, damage):
    rec = records.publish(make(directions.load("cat->dog", store=store)), "mine", store)
    meta = json.loads(rec.path.read_text())
    damage(meta)
    rec.path.write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="is corrupted"):
        records.read_record(rec.path)
    with pytest.raises(IntegrityError):
        records.list_records(store)
    with pytest.warns(UserWarning, match="corrupted"):
        assert records.list_records(store, skip_damaged=True) == []
    n, problems = records.verify(store)
    assert n == 1 and len(problems) == 1


def test_truncated_or_renamed_record_is_caught(store):
    rec = records.publish(make(directions.load("cat->dog", store=store)), "mine", store)
    raw = rec.path.read_bytes()
    moved = rec.path.with_name("f" * 64 + ".json")
    moved.write_bytes(raw)
    with pytest.raises(IntegrityError, match="under another name"):
        records.read_record(moved)
    moved.unlink()
    rec.path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IntegrityError, match="not valid JSON"):
        records.read_record(rec.path)
    # a publish does not paper over a damaged copy
    with pytest.raises(IntegrityError):
        records.publish(make(directions.load("cat->dog", store=store)), "mine", store)


def test_bad_records_are_refused_before_writing(store):
    d = directions.load("cat->dog", store=store)
    with pytest.raises(NotFoundError, match="no pack 'nope'"):
        records.publish(make(d), "nope", store)
    meta = make(d)
    meta["scores"]["clip_accuracy"]["mean"] = 0.1  # built, then altered
    with pytest.raises(IntegrityError, match="hashes do not match"):
        records.publish(meta, "mine", store)
    loose = Direction(concept("cat", 0), concept("dog", 1))  # not from the store: no content hash
    with pytest.raises(FormatError, match="not from the store"):
        make(loose)
    with pytest.raises(FormatError, match="combination"):
        make(d + directions.load("cat->horse", store=store))
    with pytest.raises(FormatError, match="images"):
        make(d, images=[])
    assert not (store.pack_dir("mine") / "evals").exists() or not any(
        (store.pack_dir("mine") / "evals").iterdir()
    )
    assert not any((store.root / "tmp").iterdir()) if (store.root / "tmp").is_dir() else True
