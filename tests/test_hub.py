"""Hub packs: push and pull through the unmodified huggingface_hub / datasets clients against a fake Hub."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import hub_server
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from p2pz_directions import directions, hub
from p2pz_directions.core.concept import Concept, EncoderInfo
from p2pz_directions.core.errors import (
    AmbiguousNameError,
    ImmutableVersionError,
    IntegrityError,
    NotFoundError,
)
from p2pz_directions.core.store import LocalStore
from p2pz_directions.packs import pack_schema

ENC = EncoderInfo("local/clip-test0123456789ab", 32, "clip")
REPO = "alice/pack"
fake_hub = hub_server.fake_hub  # the fixture


def concept(name: str, seed: int, enc: EncoderInfo = ENC) -> Concept:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(enc.max_length, enc.hidden_size, generator=g).half()
    return Concept(name, emb, enc, captions=[f"a photo of a {name}", f"a {name} in the park"])


@pytest.fixture
def stores(tmp_path):
    """A publisher's store holding pack 'mine' (cat, dog, 'cat wearing a hat') and an empty consumer store."""
    mine = LocalStore(tmp_path / "publisher")
    for i, n in enumerate(["cat", "dog", "cat wearing a hat"]):
        mine.publish(concept(n, i), pack="mine")
    return mine, LocalStore(tmp_path / "consumer")


def quiet_pull(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hub.UnknownEncoderWarning)
        return hub.pull(*args, **kwargs)


def tree_bytes(store: LocalStore, pack: str) -> dict[str, bytes]:
    root = store.pack_dir(pack) / "concepts"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def commits(fake_hub, repo_id=REPO) -> int:
    return len(fake_hub.repo(repo_id).commits)


# -- round trip ------------------------------------------------------------------------------------
def test_push_pull_round_trip_is_byte_equal(fake_hub, stores):
    mine, other = stores
    res = hub.push("mine", REPO, token=fake_hub.token, store=mine)
    assert res.created_repo and sorted(res.added) == ["cat wearing a hat@1", "cat@1", "dog@1"]
    assert res.commit == fake_hub.repo(REPO).branches["main"]
    files = fake_hub.files(REPO)
    assert {"README.md", "index.parquet"} <= set(files)
    assert sum(p.endswith("embedding.safetensors") for p in files) == 3

    got = quiet_pull(REPO, store=other)
    assert got.pack == REPO and got.concepts == 3 and got.commit == res.commit
    assert tree_bytes(other, REPO) == tree_bytes(mine, "mine")  # equal to the byte
    src = other.pack_info(REPO).source
    assert src["type"] == "hub" and src["repo_id"] == REPO and src["commit"] == res.commit
    assert src["revision"] == "main" and "token" not in json.dumps(src).lower()
    assert other.verify(REPO) == (3, [])
    d = directions.load(f"{REPO}:cat->dog", store=other)
    ref = directions.load("mine:cat->dog", store=mine)
    assert torch.equal(d.delta, ref.delta) and d.source.pack == REPO

    before = len(fake_hub.requests)
    again = quiet_pull(REPO, store=other)  # same commit: nothing downloaded
    assert again.up_to_date and fake_hub.count("GET", "*/resolve/*") == sum(
        1 for r in fake_hub.requests[:before] if r["method"] == "GET" and "/resolve/" in r["path"]
    )


def _copies(roots: list[Path], digest: str) -> set[tuple[int, int]]:
    """The distinct files (device, inode) under ``roots`` whose bytes have sha256 ``digest``."""
    import hashlib

    found = set()
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink() and hashlib.sha256(p.read_bytes()).hexdigest() == digest:
                st = p.stat()
                found.add((st.st_dev, st.st_ino))
    return found


def test_pulled_concepts_are_on_disk_once(fake_hub, stores):
    from huggingface_hub import constants

    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine, tag="v1.0")
    quiet_pull(f"{REPO}@v1.0", store=other)
    cache = Path(constants.HF_HUB_CACHE)
    pack = other.pack_dir(REPO)
    rows = pack_schema.read_index(fake_hub.file(REPO, "index.parquet"))
    for r in rows:
        for rel, digest in ((r.tensor_path, r.sha256), (r.metadata_path, r.metadata_sha256)):
            assert (pack / rel).is_file()  # the store's layout is the repo's: same relative path
            assert _copies([cache, other.root], digest) == {
                ((pack / rel).stat().st_dev, (pack / rel).stat().st_ino)
            }, rel
            assert (pack / rel).stat().st_nlink == 1
    snapshot_files = sorted(p.name for p in cache.rglob("*") if p.is_file() and "snapshots" in p.parts)
    assert snapshot_files == ["index.parquet"]  # the cache holds the index, not the concepts
    assert not (pack / ".cache").exists()  # huggingface_hub's local_dir metadata is not kept

    # a new revision reuses the unchanged files of the installed one (hard links, no download) and
    # still leaves one copy once the old revision is gone
    mine.publish(concept("horse", 3), pack="mine")
    hub.push("mine", REPO, token=fake_hub.token, store=mine, tag="v2.0")
    before = fake_hub.count("GET", "*/cat/1/embedding.safetensors")
    got = quiet_pull(f"{REPO}@v2.0", store=other)
    assert got.added == ["horse@1"] and fake_hub.count("GET", "*/cat/1/embedding.safetensors") == before
    for r in pack_schema.read_index(fake_hub.file(REPO, "index.parquet")):
        assert len(_copies([cache, other.root], r.sha256)) == 1, r.ref
        assert (pack / r.tensor_path).stat().st_nlink == 1
    assert other.verify(REPO) == (4, [])


def test_a_damaged_installed_file_is_downloaded_again(fake_hub, stores):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine, tag="v1.0")
    quiet_pull(f"{REPO}@v1.0", store=other)
    cat = next(e for e in other.entries(pack=REPO) if e.name == "cat").path / "embedding.safetensors"
    cat.write_bytes(cat.read_bytes()[:-4] + b"\0\0\0\0")  # bit rot in the installed copy
    mine.publish(concept("horse", 3), pack="mine")
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    before = fake_hub.count("GET", "*/cat/1/embedding.safetensors")
    assert quiet_pull(REPO, store=other).added == ["horse@1"]
    assert fake_hub.count("GET", "*/cat/1/embedding.safetensors") == before + 1  # not reused: fetched
    assert other.verify(REPO) == (4, [])


def test_card_index_and_datasets_load(fake_hub, stores):
    from huggingface_hub import DatasetCard

    mine, _ = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine, license="cc-by-4.0")
    card = DatasetCard(fake_hub.file(REPO, "README.md").decode())
    data = card.data.to_dict()
    assert data["license"] == "cc-by-4.0" and hub.HUB_TAG in data["tags"]
    pack_schema.validate(data["p2pz"], pack_schema.load_schema("pack-card"), "p2pz")
    assert data["p2pz"]["concepts"] == ["cat", "cat wearing a hat", "dog"]
    assert data["p2pz"]["encoders"] == [{"id": ENC.id, "hidden_size": 32, "concepts": 3}]
    assert f'directions.load("{REPO}:cat->dog")' in card.text
    rows = pack_schema.read_index(fake_hub.file(REPO, "index.parquet"))
    assert [(r.name, r.version, r.num_captions) for r in rows] == [
        ("cat", 1, 2),
        ("cat wearing a hat", 1, 2),
        ("dog", 1, 2),
    ]

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(REPO, split="train")
    assert ds.num_rows == 3 and sorted(ds["name"]) == ["cat", "cat wearing a hat", "dog"]
    assert set(pack_schema.INDEX_COLUMNS) <= set(ds.column_names)
    assert all(len(h) == 64 for h in ds["sha256"])


def test_owner_text_in_card_is_kept(fake_hub, stores):
    mine, _ = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    text = (
        fake_hub.file(REPO, "README.md").decode().replace("# alice/pack\n", "# alice/pack\n\nMy own words.\n")
    )
    fake_hub.upload(REPO, {"README.md": text.encode()})
    mine.publish(concept("horse", 7), pack="mine")
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    new = fake_hub.file(REPO, "README.md").decode()
    assert "My own words." in new and "| horse | 1 |" in new and new.count("p2pz:begin") == 1


# -- versions, tags, pins -----------------------------------------------------------------------------
def test_tags_and_pinned_revisions(fake_hub, stores):
    mine, other = stores
    v1 = hub.push("mine", REPO, token=fake_hub.token, store=mine, tag="v1.0").commit
    mine.publish(concept("cat", 100), pack="mine")  # cat@2
    mine.publish(concept("horse", 101), pack="mine")
    v2 = hub.push("mine", REPO, token=fake_hub.token, store=mine, tag="v2.0")
    assert sorted(v2.added) == ["cat@2", "horse@1"] and v2.unchanged == 3
    assert fake_hub.repo(REPO).tags == {"v1.0": v1, "v2.0": v2.commit}

    # nothing new: no commit, the tag still needs to be new
    n = commits(fake_hub)
    same = hub.push("mine", REPO, token=fake_hub.token, store=mine)
    assert same.added == [] and same.commit == v2.commit and commits(fake_hub) == n
    with pytest.raises(ImmutableVersionError, match="tag or branch 'v1.0' already exists"):
        hub.push("mine", REPO, token=fake_hub.token, store=mine, tag="v1.0")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hub.UnknownEncoderWarning)
        d = directions.load(f"{REPO}@v1.0:cat->dog", store=other)  # pulled on first use
        assert d.source.version == 1 and len(other.entries(pack=REPO)) == 3
        assert other.pack_info(REPO).source["commit"] == v1
        d2 = directions.load(f"{REPO}@v2.0:cat->horse", store=other)  # another pin: re-pulled
        assert d2.source.version == 2 and len(other.entries(pack=REPO)) == 5
        back = hub.pull(f"{REPO}@{v1[:8]}", store=other)  # a short commit id pins too
    assert back.commit == v1 and sorted(back.removed) == ["cat@2", "horse@1"]
    assert directions.load(f"{REPO}:cat->dog", store=other).source.version == 1
    with pytest.raises(NotFoundError, match="no revision 'v9'"):
        hub.pull(f"{REPO}@v9", store=other)


def test_immutable_version_conflict_is_refused_before_upload(fake_hub, stores, tmp_path):
    mine, _ = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    rogue = LocalStore(tmp_path / "rogue")
    rogue.publish(concept("cat", 999), pack="mine")  # cat@1 with other content
    rogue.publish(concept("zebra", 5), pack="mine")
    n, before = commits(fake_hub), len(fake_hub.requests)
    with pytest.raises(ImmutableVersionError, match=r"cat@1 .*Nothing was uploaded"):
        hub.push("mine", REPO, token=fake_hub.token, store=rogue)
    assert commits(fake_hub) == n
    later = fake_hub.requests[before:]
    assert not any(r["method"] == "POST" for r in later)  # no preupload, no commit


def test_history_rewrite_is_refused_on_pull(fake_hub, stores):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    quiet_pull(REPO, store=other)
    old = tree_bytes(other, REPO)
    # someone force-pushes other content under cat@1 (by hand, past the client's checks)
    rogue = LocalStore(other.root.parent / "rogue")
    rogue.publish(concept("cat", 999), pack="x")
    e = rogue.entries(pack="x")[0]
    row = pack_schema.read_index(fake_hub.file(REPO, "index.parquet"))
    meta, tensor = (e.path / "concept.json").read_bytes(), (e.path / "embedding.safetensors").read_bytes()
    import hashlib

    new_rows = [
        r
        if r.name != "cat"
        else pack_schema.validate_row(
            r.to_record()
            | {
                "content_hash": json.loads(meta)["content_hash"],
                "sha256": hashlib.sha256(tensor).hexdigest(),
                "size": len(tensor),
                "metadata_sha256": hashlib.sha256(meta).hexdigest(),
                "metadata_size": len(meta),
            },
            1,
        )
        for r in row
    ]
    cat_dir = next(r for r in row if r.name == "cat").dir
    fake_hub.upload(
        REPO,
        {
            "index.parquet": pack_schema.write_index(new_rows),
            f"{cat_dir}/concept.json": meta,
            f"{cat_dir}/embedding.safetensors": tensor,
        },
    )
    with pytest.raises(ImmutableVersionError, match="history was rewritten"):
        quiet_pull(REPO, store=other)
    assert tree_bytes(other, REPO) == old
    quiet_pull(REPO, store=other, force=True)
    assert tree_bytes(other, REPO) != old


# -- failures in transit ---------------------------------------------------------------------------
def test_download_cut_mid_file_then_retry(fake_hub, stores):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    fake_hub.cut("*/cat/1/embedding.safetensors", after=100)  # socket closed after 100 bytes
    fake_hub.fail(503, "*/cat/1/embedding.safetensors", method="GET")  # and the client's resume attempt fails
    with pytest.raises(hub.HubConnectionError, match="Nothing was installed"):
        quiet_pull(REPO, store=other)
    assert not other.pack_dir(REPO).exists() and other.entries() == []
    assert not any((other.root / "staging").glob("*/packs"))
    assert fake_hub.count("GET", "*/cat/1/embedding.safetensors") == 2

    fake_hub.clear_faults()
    got = quiet_pull(REPO, store=other)  # the retry completes it
    assert got.concepts == 3 and tree_bytes(other, REPO) == tree_bytes(mine, "mine")


def test_single_cut_is_resumed_transparently(fake_hub, stores):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    fake_hub.cut("*/dog/1/embedding.safetensors", after=64)
    got = quiet_pull(REPO, store=other)
    assert got.concepts == 3 and tree_bytes(other, REPO) == tree_bytes(mine, "mine")


def test_tampered_blob_is_caught_and_dropped(fake_hub, stores):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    path = next(p for p in fake_hub.files(REPO) if p.endswith("dog/1/embedding.safetensors"))
    fake_hub.tamper(REPO, path)
    with pytest.raises(IntegrityError, match=r"dog/1/embedding.safetensors .*tampered"):
        quiet_pull(REPO, store=other)
    assert not other.pack_dir(REPO).exists()
    fake_hub.clear_faults()
    assert quiet_pull(REPO, store=other).concepts == 3  # the bad cached copy was dropped


def test_tampered_metadata_is_caught(fake_hub, stores):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    path = next(p for p in fake_hub.files(REPO) if p.endswith("cat/1/concept.json"))
    fake_hub.tamper(REPO, path, lambda b: b.replace(b"a photo of a cat", b"a photo of a rat"))
    with pytest.raises(IntegrityError, match="cat/1/concept.json"):
        quiet_pull(REPO, store=other)
    assert other.entries() == []


# -- auth and not-found messages ---------------------------------------------------------------------
def test_401_404_403_messages(fake_hub, stores, monkeypatch):
    mine, other = stores
    with pytest.raises(NotFoundError, match=r"no such dataset repo.*hf auth login"):
        hub.pull("alice/nope", store=other)
    with pytest.raises(NotFoundError, match="ask its owner for access"):
        hub.pull("alice/nope", store=other, token=fake_hub.read_token)

    hub.push("mine", "alice/private", token=fake_hub.token, store=mine, private=True)
    assert fake_hub.repo("alice/private").private
    with pytest.raises(NotFoundError, match="log in first"):
        hub.pull("alice/private", store=other)  # anonymous: 401 RepoNotFound
    with pytest.raises(NotFoundError, match="your token cannot see it"):
        hub.pull("alice/private", store=other, token=fake_hub.read_token)  # bob: 404
    assert quiet_pull("alice/private", store=other, token=fake_hub.token).concepts == 3

    bad = "hf_this_token_is_not_valid_0000"
    monkeypatch.setenv("HF_TOKEN", bad)  # huggingface_hub's usual place
    with pytest.raises(hub.HubAccessError, match=r"rejected your credentials \(401\).*hf auth login") as e:
        hub.pull(REPO, store=other)
    assert bad not in str(e.value)
    monkeypatch.delenv("HF_TOKEN")

    with pytest.raises(hub.HubAccessError, match=r"403.*write") as e:
        hub.push("mine", REPO, token=fake_hub.read_token, store=mine)
    assert fake_hub.read_token not in str(e.value)
    with pytest.raises(hub.HubAccessError, match=r"403.*write"):
        hub.push("mine", "bob/theirs", token=fake_hub.token, store=mine)

    fake_hub.upload("carol/gated", {"x.txt": b"x"})
    fake_hub.repo("carol/gated").gated = True
    with pytest.raises(hub.HubAccessError, match="request access"):
        hub.pull("carol/gated", store=other, token=fake_hub.token)


# -- offline ---------------------------------------------------------------------------------------
def test_offline_mode(fake_hub, stores, monkeypatch):
    from huggingface_hub import constants

    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine, tag="v1.0")
    mine.publish(concept("horse", 3), pack="mine")
    hub.push("mine", REPO, token=fake_hub.token, store=mine, tag="v2.0")
    quiet_pull(f"{REPO}@v1.0", store=other)
    quiet_pull(f"{REPO}@v2.0", store=other)  # both revisions now in the HF cache

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(fake_hub.requests)
    assert directions.load(f"{REPO}:cat->horse", store=other).target.name == "horse"
    assert directions.load(f"{REPO}@v2.0:cat->dog", store=other).source.pack == REPO
    back = quiet_pull(f"{REPO}@v1.0", store=other)  # from the HF cache, no network
    assert back.offline and back.removed == ["horse@1"]
    assert len(fake_hub.requests) == n  # not one request
    with pytest.raises(hub.OfflineError, match="HF_HUB_OFFLINE"):
        directions.load("alice/other:cat->dog", store=other)
    with pytest.raises(hub.OfflineError, match="HF_HUB_OFFLINE"):
        hub.pull(f"{REPO}@v3.0", store=other)
    assert len(fake_hub.requests) == n


# -- bad input -------------------------------------------------------------------------------------
def test_repo_that_is_not_a_pack(fake_hub, stores):
    mine, other = stores
    fake_hub.upload("alice/data", {"train.csv": b"a,b\n1,2\n"})
    with pytest.raises(hub.NotAPackError, match=r"not a p2pz directions pack.*train.csv"):
        hub.pull("alice/data", store=other)
    with pytest.raises(hub.NotAPackError, match="is not a p2pz directions pack"):
        hub.push("mine", "alice/data", token=fake_hub.token, store=mine)
    with pytest.raises(ValueError, match="local pack name"):
        hub.pull("mine", store=other)


def _index_bytes(records: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records, schema=pack_schema.index_schema()), buf)
    return buf.getvalue()


def test_malformed_index_row_names_the_row(fake_hub, stores):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    recs = [r.to_record() for r in pack_schema.read_index(fake_hub.file(REPO, "index.parquet"))]
    n_get = fake_hub.count("GET", "*/concepts/*")
    bad = [dict(r) for r in recs]
    bad[1]["sha256"] = "not-a-hash"
    fake_hub.upload(REPO, {"index.parquet": _index_bytes(bad)})
    with pytest.raises(pack_schema.PackFormatError, match=r"row 2 \('cat wearing a hat'@1\): sha256"):
        hub.pull(REPO, store=other)
    evil = [dict(r) for r in recs]
    evil[2]["tensor_path"] = "../../../../etc/passwd"
    fake_hub.upload(REPO, {"index.parquet": _index_bytes(evil)})
    with pytest.raises(pack_schema.PackFormatError, match=r"row 3 .*tensor_path"):
        hub.pull(REPO, store=other)
    huge = [dict(r) for r in recs]
    huge[0]["size"] = 10**9
    fake_hub.upload(REPO, {"index.parquet": _index_bytes(huge)})
    with pytest.raises(pack_schema.PackFormatError, match=r"row 1 .*size"):
        hub.pull(REPO, store=other)
    fake_hub.upload(REPO, {"index.parquet": b"PAR1 this is not parquet"})
    with pytest.raises(pack_schema.PackFormatError, match="not a readable parquet"):
        hub.pull(REPO, store=other)
    assert fake_hub.count("GET", "*/concepts/*") == n_get  # no concept file was fetched
    assert other.entries() == []


def test_extra_repo_files_are_ignored(fake_hub, stores):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    fake_hub.upload(REPO, {"setup.py": b"raise SystemExit('never run')", "concepts/evil.pt": b"\x80\x04junk"})
    got = quiet_pull(REPO, store=other)
    assert got.concepts == 3
    assert fake_hub.count("GET", "*/setup.py") == 0 and fake_hub.count("GET", "*/evil.pt") == 0
    assert not list(other.root.rglob("*.py")) and not list(other.root.rglob("*.pt"))


def test_unknown_encoder_warns_but_loads(fake_hub, tmp_path):
    pub, other = LocalStore(tmp_path / "p"), LocalStore(tmp_path / "c")
    odd = EncoderInfo("someone/odd-text-encoder", 16, "odd")
    pub.publish(concept("cat", 1, odd), pack="odd")
    pub.publish(concept("dog", 2, odd), pack="odd")
    hub.push("odd", "alice/odd", token=fake_hub.token, store=pub)
    with pytest.warns(hub.UnknownEncoderWarning, match="someone/odd-text-encoder"):
        got = hub.pull("alice/odd", store=other)
    assert got.warnings and directions.load("alice/odd:cat->dog", store=other).encoder.id == odd.id

    clip = EncoderInfo("openai/clip-vit-large-patch14", 768, "clip-vit-l-14")
    pub.publish(concept("cat", 3, clip), pack="clip")
    pub.publish(concept("dog", 4, clip), pack="clip")
    hub.push("clip", "alice/clip", token=fake_hub.token, store=pub)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hub.UnknownEncoderWarning)
        assert hub.pull("alice/clip", store=other).warnings == []


def test_names_clashing_across_packs_ask_for_the_prefix(fake_hub, stores):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    other.publish(concept("cat", 50), pack="local")
    other.publish(concept("dog", 51), pack="local")
    got = quiet_pull(REPO, store=other)
    assert any(f"'{REPO}:cat'" in w and "'local:cat'" in w for w in got.warnings)
    with pytest.raises(AmbiguousNameError, match="prefix"):
        directions.load("cat->dog", store=other)
    assert directions.load(f"{REPO}:cat->dog", store=other).source.pack == REPO


def test_push_needs_a_pack_with_concepts(fake_hub, tmp_path):
    with pytest.raises(NotFoundError, match="no pack 'nothing'"):
        hub.push("nothing", REPO, token=fake_hub.token, store=LocalStore(tmp_path / "s"))
    with pytest.raises(ValueError, match="without '@revision'"):
        hub.push("nothing", f"{REPO}@v1", token=fake_hub.token, store=LocalStore(tmp_path / "s"))


# -- the fake Hub itself -----------------------------------------------------------------------------
def test_fake_hub_resolve_etag_and_range(fake_hub):
    import httpx2

    commit = fake_hub.upload("alice/raw", {"a.bin": bytes(range(256))})
    url = f"{fake_hub.url}/datasets/alice/raw/resolve/main/a.bin"
    head = httpx2.head(url)
    assert head.status_code == 200 and head.headers["X-Repo-Commit"] == commit
    assert head.headers["ETag"].strip('"') == fake_hub.repo("alice/raw").commits[commit].tree["a.bin"]
    part = httpx2.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == bytes(range(10, 20))
    assert part.headers["Content-Range"] == "bytes 10-19/256"
    assert httpx2.get(url, headers={"Range": "bytes=250-"}).content == bytes(range(250, 256))
    assert httpx2.get(f"{fake_hub.url}/datasets/alice/raw/resolve/nope/a.bin").headers["X-Error-Code"] == (
        "RevisionNotFound"
    )


def test_pack_path_components_are_safe():
    assert pack_schema.name_component("cat") == "cat"
    odd = ["cat wearing a hat", "chat noir é", "a/b", "x" * 150, "..", "c#t?"]
    comps = [pack_schema.name_component(n) for n in odd]
    assert len(set(comps)) == len(comps)
    for c in comps:
        assert pack_schema._COMPONENT.match(c) or c.rsplit("-", 1)[0].replace("_", "a").isalnum()
        assert "/" not in c and ".." not in c and len(c) <= 80


def test_index_write_read_round_trip_and_pinned_known_packs(tmp_path):
    rec = {
        "name": "cat",
        "version": 1,
        "encoder": ENC.id,
        "encoder_revision": None,
        "encoder_family": "clip",
        "hidden_size": 32,
        "max_length": 77,
        "dtype": "float16",
        "num_captions": None,
        "created": None,
        "content_hash": "a" * 64,
        "sha256": "b" * 64,
        "size": 77 * 32 * 2 + 100,
        "metadata_sha256": "c" * 64,
        "metadata_size": 500,
        "tensor_path": f"{pack_schema.concept_dir(ENC.id, 'cat', 1)}/embedding.safetensors",
        "metadata_path": f"{pack_schema.concept_dir(ENC.id, 'cat', 1)}/concept.json",
    }
    rows = [pack_schema.validate_row(rec, 1)]
    assert pack_schema.read_index(pack_schema.write_index(rows)) == rows
    with pytest.raises(pack_schema.PackFormatError, match="listed twice"):
        pack_schema.validate_rows([rec, dict(rec)])
    with pytest.raises(pack_schema.PackFormatError, match="not in normal form"):
        pack_schema.validate_row(rec | {"name": "Cat"}, 1)
    known = pack_schema.load_known_packs()
    assert all("/" in k.repo_id and k.revision for k in known)
    with pytest.raises(pack_schema.PackFormatError, match="revision"):
        pack_schema.load_known_packs(
            json.dumps(
                {
                    "format": "p2pz-known-packs",
                    "format_version": 1,
                    "packs": [{"repo_id": "a/b", "description": "x", "revision": "bad rev"}],
                }
            )
        )


def test_token_from_the_login_file(fake_hub, stores):
    from huggingface_hub import constants

    mine, other = stores
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(fake_hub.token)  # what `hf auth login` writes
    res = hub.push("mine", "alice/from-file", store=mine, private=True)
    assert res.created_repo and fake_hub.repo("alice/from-file").private
    assert quiet_pull("alice/from-file", store=other).concepts == 3
    assert all(r["auth"] for r in fake_hub.requests if "/alice/from-file" in r["path"])
