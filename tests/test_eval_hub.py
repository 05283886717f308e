"""Evaluation records travel with a pack: push/pull through the fake Hub with the same hash checks."""

from __future__ import annotations

import json
import warnings

import hub_server
import pytest
import torch

from p2pz_directions import directions, hub
from p2pz_directions.core import records
from p2pz_directions.core.concept import Concept, EncoderInfo
from p2pz_directions.core.errors import IntegrityError
from p2pz_directions.core.store import LocalStore

ENC = EncoderInfo("local/clip-test0123456789ab", 32, "clip")
REPO = "alice/pack"
fake_hub = hub_server.fake_hub  # the fixture


def concept(name: str, seed: int) -> Concept:
    g = torch.Generator().manual_seed(seed)
    return Concept(name, torch.randn(77, 32, generator=g).half(), ENC, captions=[f"a {name}"])


def record_for(store, name, mean, pack="mine", editor="pix2pix-zero"):
    d = directions.load(f"{pack}:{name}", store=store)
    meta = records.build(
        direction=d,
        editor=editor,
        model="CompVis/stable-diffusion-v1-4",
        settings={"seeds": [0, 1, 2]},
        images=[{"name": "cat_1.png", "sha256": "1" * 64}],
        image_set_sha256="2" * 64,
        scores={
            "clip_accuracy": {"mean": mean, "std": 0.1, "n": 3, "higher_is_better": True},
            "structure_distance": {"mean": 0.05, "std": 0.01, "n": 3, "higher_is_better": False},
        },
        samples=[{"image": "cat_1.png", "seed": s, "clip_accuracy": 1.0} for s in range(3)],
    )
    return records.publish(meta, pack, store)


@pytest.fixture
def stores(tmp_path):
    mine = LocalStore(tmp_path / "publisher")
    for i, n in enumerate(["cat", "dog", "horse"]):
        mine.publish(concept(n, i), pack="mine")
    return mine, LocalStore(tmp_path / "consumer")


def pull(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hub.UnknownEncoderWarning)
        return hub.pull(*args, **kwargs)


def test_records_push_pull_round_trip(fake_hub, stores):
    mine, other = stores
    r1 = record_for(mine, "cat->dog", 0.8)
    r2 = record_for(mine, "cat->horse", 0.6)
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    files = fake_hub.files(REPO)
    assert {"evals.parquet", f"evals/{r1.record_id}.json", f"evals/{r2.record_id}.json"} <= set(files)
    assert files[f"evals/{r1.record_id}.json"] == r1.path.read_bytes()
    rows = records.read_evals_index(files["evals.parquet"])
    assert {r["direction"]: r["clip_accuracy_mean"] for r in rows} == {"cat->dog": 0.8, "cat->horse": 0.6}

    pull(REPO, store=other)
    got = records.list_records(other, REPO)
    assert sorted(r.record_id for r in got) == sorted([r1.record_id, r2.record_id])
    assert all(r.pack == REPO for r in got)
    pulled = {r.record_id: r.path.read_bytes() for r in got}
    assert pulled[r1.record_id] == r1.path.read_bytes()  # byte for byte
    d = directions.load(f"{REPO}:cat->dog", store=other)
    assert [r.record_id for r in records.for_direction(d, other)] == [r1.record_id]


def test_card_lists_scores_and_viewer_config(fake_hub, stores):
    from huggingface_hub import DatasetCard

    mine, _ = stores
    record_for(mine, "cat->dog", 0.8)
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    card = DatasetCard(fake_hub.file(REPO, "README.md").decode())
    configs = {c["config_name"]: c for c in card.data.to_dict()["configs"]}
    assert configs["default"]["data_files"][0]["path"] == "index.parquet"
    assert configs["evaluations"]["data_files"][0]["path"] == "evals.parquet"
    assert "## Evaluations (1 records)" in card.text and "0.800 ± 0.100" in card.text
    assert card.text.count(records.CARD_BEGIN) == 1
    # a second push with one more record rewrites the section, keeps one copy of it
    record_for(mine, "dog->horse", 0.4)
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    card = DatasetCard(fake_hub.file(REPO, "README.md").decode())
    assert "## Evaluations (2 records)" in card.text and card.text.count(records.CARD_BEGIN) == 1
    assert "## Concepts" in card.text  # hub's own section is still there

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(REPO, "evaluations", split="train")
    assert sorted(ds["direction"]) == ["cat->dog", "dog->horse"]
    assert "clip_accuracy_mean" in ds.column_names


def test_nothing_new_means_no_commit_and_existing_records_stay(fake_hub, stores):
    mine, _ = stores
    rec = record_for(mine, "cat->dog", 0.8)
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    n = len(fake_hub.repo(REPO).commits)
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    assert len(fake_hub.repo(REPO).commits) == n
    assert fake_hub.file(REPO, f"evals/{rec.record_id}.json") == rec.path.read_bytes()


def test_damaged_local_record_is_never_pushed(fake_hub, stores):
    mine, _ = stores
    rec = record_for(mine, "cat->dog", 0.8)
    rec.path.write_text(rec.path.read_text().replace("0.8", "0.9"))
    with pytest.raises(IntegrityError, match="corrupted"):
        hub.push("mine", REPO, token=fake_hub.token, store=mine)
    assert (REPO, "dataset") not in fake_hub.repos  # refused before the repo was created


def test_tampered_record_on_the_hub_installs_nothing(fake_hub, stores):
    mine, other = stores
    rec = record_for(mine, "cat->dog", 0.8)
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    fake_hub.tamper(REPO, f"evals/{rec.record_id}.json")
    with pytest.raises(IntegrityError, match="tampered"):
        pull(REPO, store=other)
    assert not other.pack_dir(REPO).exists()
    fake_hub.clear_faults()
    pull(REPO, store=other)
    assert [r.record_id for r in records.list_records(other, REPO)] == [rec.record_id]


def test_forged_record_matching_its_index_is_still_refused(fake_hub, stores):
    """A record whose bytes match evals.parquet but whose content was edited fails read_record."""
    import hashlib

    mine, other = stores
    rec = record_for(mine, "cat->dog", 0.8)
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    forged = json.loads(rec.path.read_text())
    forged["scores"]["clip_accuracy"]["mean"] = 1.0  # better scores, same id
    data = json.dumps(forged).encode()
    rows = records.read_evals_index(fake_hub.file(REPO, "evals.parquet"))
    rows[0] |= {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    fake_hub.upload(
        REPO, {f"evals/{rec.record_id}.json": data, "evals.parquet": records.write_evals_index(rows)}
    )
    with pytest.raises(IntegrityError, match="damaged"):
        pull(REPO, store=other)
    assert not other.pack_dir(REPO).exists()


def test_local_records_of_a_pulled_pack_survive_a_repull(fake_hub, stores):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    pull(REPO, store=other)
    mine_local = record_for(other, "cat->dog", 0.7, pack=REPO)  # the consumer measures it too
    mine.publish(concept("zebra", 7), pack="mine")
    hub.push("mine", REPO, token=fake_hub.token, store=mine)  # a new revision
    pull(REPO, store=other)
    assert [r.record_id for r in records.list_records(other, REPO)] == [mine_local.record_id]
    assert len(other.entries(pack=REPO)) == 4
