"""The local registry: immutability, atomic and locked writes, hash checks on every read."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest
import torch

from p2pz_directions import directions
from p2pz_directions.core.concept import Concept, EncoderInfo
from p2pz_directions.core.errors import FormatError, ImmutableVersionError, IntegrityError, NotFoundError
from p2pz_directions.core.format import META_FILE, TENSOR_FILE
from p2pz_directions.core.store import LocalStore

ENC = EncoderInfo("test/enc-a", 16, "test")
ENC_B = EncoderInfo("test/enc-b", 16, "test")


def concept(name: str, seed: int, enc: EncoderInfo = ENC, dtype=torch.float32, captions=None) -> Concept:
    g = torch.Generator().manual_seed(seed)
    return Concept(name, torch.randn(77, enc.hidden_size, generator=g).to(dtype), enc, captions=captions)


def test_publish_load_round_trip(p2pz_home):
    store = LocalStore()
    assert store.root == p2pz_home
    c = concept("cat", 0, captions=["a cat", "a cat on a mat"], dtype=torch.float16)
    stored = store.publish(c, pack="mine")
    assert (stored.version, stored.pack) == (1, "mine") and stored.created
    (entry,) = store.entries(name="cat")
    back = store.load(entry)
    assert torch.equal(back.embedding, c.embedding) and back.embedding.dtype == torch.float16
    assert back.captions == c.captions and back.content_hash == entry.content_hash
    assert back.provenance["package_version"]


def test_same_content_is_a_noop_other_content_gets_next_version():
    store = LocalStore()
    a = store.publish(concept("cat", 0))
    again = store.publish(concept("cat", 0))
    assert again.version == a.version == 1
    assert len(store.entries(name="cat")) == 1
    b = store.publish(concept("cat", 1))
    assert b.version == 2
    assert store.publish(concept("cat", 1), version=2).version == 2  # same content, same version: no-op


def test_immutable_version_conflict_is_refused_and_nothing_changes():
    store = LocalStore()
    store.publish(concept("cat", 0))
    before = sorted(p.read_bytes() for p in store.root.rglob("*") if p.is_file() and p.name != ".lock")
    with pytest.raises(ImmutableVersionError, match="already exists with other content"):
        store.publish(concept("cat", 99), version=1)
    after = sorted(p.read_bytes() for p in store.root.rglob("*") if p.is_file() and p.name != ".lock")
    assert before == after


def test_publish_many_is_all_or_nothing():
    store = LocalStore()
    store.publish(concept("dog", 0))
    with pytest.raises(ImmutableVersionError):
        store.publish_many([concept("cat", 1), concept("dog", 5)], versions=[None, 1])
    assert store.entries(name="cat") == []


def _concept_files(store: LocalStore, name: str):
    (entry,) = store.entries(name=name)
    return entry, entry.path / TENSOR_FILE, entry.path / META_FILE


def test_corrupted_tensor_blob_is_caught_on_load():
    store = LocalStore()
    store.publish(concept("cat", 0))
    store.publish(concept("dog", 1))
    entry, tensor, _ = _concept_files(store, "cat")
    data = bytearray(tensor.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data, same length
    tensor.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        directions.load("cat->dog")
    msg = str(info.value)
    assert str(tensor) in msg and "p2pz verify" in msg
    n, problems = store.verify()
    assert n == 2 and [p.path for p in problems] == [entry.path]


def test_truncated_tensor_blob_is_caught():
    store = LocalStore()
    store.publish(concept("cat", 0))
    entry, tensor, _ = _concept_files(store, "cat")
    tensor.write_bytes(tensor.read_bytes()[:100])
    with pytest.raises(IntegrityError, match="truncated or modified"):
        store.load(entry)


def test_truncated_or_edited_metadata_is_caught():
    store = LocalStore()
    store.publish(concept("cat", 0, captions=["a cat"]))
    entry, _, meta = _concept_files(store, "cat")
    raw = meta.read_bytes()
    meta.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IntegrityError, match="not valid JSON.*truncated"):
        store.entries(name="cat")
    d = json.loads(raw)
    d["captions"] = ["a dog"]  # tampered content, hashes left alone
    meta.write_text(json.dumps(d))
    with pytest.raises(IntegrityError, match=str(meta)):
        store.load(entry)
    # listings skip the damaged version with a warning instead of failing
    with pytest.warns(UserWarning, match="corrupted"):
        assert store.entries(skip_damaged=True) == []


def test_crash_mid_write_leaves_no_visible_version(monkeypatch):
    store = LocalStore()
    import p2pz_directions.core.store as store_mod

    def boom(src, dst):
        raise KeyboardInterrupt("simulated crash at the commit point")

    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        store.publish_many([concept("cat", 0), concept("dog", 1)])
    monkeypatch.undo()
    assert store.entries() == []
    assert not (store.root / "txn").exists() or not any((store.root / "txn").iterdir())
    store.publish(concept("dog", 0))
    assert [e.name for e in store.entries()] == ["dog"]


def test_crash_after_the_commit_point_is_rolled_forward_on_open(monkeypatch):
    store = LocalStore()
    store.publish(concept("bird", 9))
    import p2pz_directions.core.store as store_mod

    real = os.replace
    calls = []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the journal is written (call 1); die at the first rename of a version
            raise KeyboardInterrupt("simulated crash between the renames")
        return real(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        store.publish_many([concept("cat", 0), concept("dog", 1)])
    monkeypatch.undo()
    store_mod._ACTIVE_TXNS.clear()  # as if the process had died
    fresh = LocalStore(store.root)
    assert sorted(e.name for e in fresh.entries()) == ["bird", "cat", "dog"]  # all of it, finished on open
    assert not (store.root / "txn").exists()


def _publish_worker(root: str, seed: int, n: int, q) -> None:
    try:
        store = LocalStore(root)
        got = [store.publish(concept("cat", seed * 1000 + i)).version for i in range(n)]
        q.put(("ok", got))
    except Exception as e:  # pragma: no cover - reported to the parent
        q.put(("err", repr(e)))


def test_two_processes_publishing_at_once_both_succeed(tmp_path):
    root = str(tmp_path / "shared-store")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_publish_worker, args=(root, s, 5, q)) for s in (1, 2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert all(kind == "ok" for kind, _ in results), results
    versions = sorted(v for _, got in results for v in got)
    assert versions == list(range(1, 11))  # no version lost or written twice
    store = LocalStore(root)
    assert len(store.entries(name="cat")) == 10
    assert store.verify()[1] == []


def test_lock_timeout_gives_clear_error(tmp_path):
    from filelock import FileLock

    from p2pz_directions.core.errors import StoreLockedError

    store = LocalStore(tmp_path / "s")
    store.root.mkdir(parents=True)
    other = FileLock(str(store.root / ".lock"))
    ctx = mp.get_context("spawn")
    with other:
        q = ctx.Queue()
        p = ctx.Process(target=_locked_try, args=(str(store.root), q))
        p.start()
        kind, msg = q.get(timeout=60)
        p.join(30)
    assert kind == "StoreLockedError" and "remove" in msg and ".lock" in msg
    assert StoreLockedError


def _locked_try(root, q):
    from p2pz_directions.core.errors import StoreLockedError

    try:
        with LocalStore(root).lock(timeout=0.2):
            q.put(("locked", ""))
    except StoreLockedError as e:
        q.put(("StoreLockedError", str(e)))


def test_concept_validation():
    with pytest.raises(FormatError, match=r"shape \[76, 16\]"):
        Concept("cat", torch.zeros(76, 16), ENC)
    with pytest.raises(FormatError, match="NaN"):
        Concept("cat", torch.full((77, 16), float("nan")), ENC)
    with pytest.raises(FormatError, match="dtype"):
        Concept("cat", torch.zeros(77, 16, dtype=torch.int64), ENC)


def test_unknown_pack_lists_installed():
    store = LocalStore()
    store.publish(concept("cat", 0), pack="alpha")
    with pytest.raises(NotFoundError, match="installed: alpha"):
        store.entries(pack="beta")


def test_env_home_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("P2PZ_HOME", str(tmp_path / "elsewhere"))
    from p2pz_directions.core.store import default_store

    assert default_store().root == tmp_path / "elsewhere"
    assert os.fspath(LocalStore().root) == os.fspath(tmp_path / "elsewhere")


# -- malformed stored files: always the documented integrity error, naming the file -----------------
def _damage_meta(store: LocalStore, name: str, text_change) -> None:
    (e,) = store.entries(name=name)
    p = e.path / META_FILE
    p.write_text(text_change(p.read_text("utf-8")), "utf-8")


DAMAGE = {
    "nan": lambda t: t.replace('"provenance": {', '"provenance": {"x": NaN, ', 1),
    "1e999": lambda t: t.replace('"provenance": {', '"provenance": {"x": 1e999, ', 1),
    "deep": lambda t: t.replace(
        '"provenance": {', '"provenance": {"x": ' + "[" * 100_000 + "]" * 100_000 + ", ", 1
    ),
    "surrogate": lambda t: t.replace('"provenance": {', '"provenance": {"x": "\\ud800", ', 1),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_malformed_manifest_is_an_integrity_error(kind):
    store = LocalStore()
    store.publish_many([concept("cat", 0), concept("dog", 1)])
    _damage_meta(store, "cat", DAMAGE[kind])
    with pytest.raises(IntegrityError, match=r"cat/1/concept.json is corrupted"):
        store.entries()
    with pytest.warns(UserWarning, match="skipped a damaged version"):
        assert [e.name for e in store.entries(skip_damaged=True)] == ["dog"]
    n, problems = store.verify()
    assert n == 2 and [p.path.parent.name for p in problems] == ["cat"]


@pytest.mark.parametrize("which", [META_FILE, TENSOR_FILE])
def test_a_folder_where_a_file_should_be(which):
    store = LocalStore()
    store.publish_many([concept("cat", 0), concept("dog", 1)])
    (e,) = store.entries(name="cat")
    (e.path / which).unlink()
    (e.path / which).mkdir()
    n, problems = store.verify()
    assert len(problems) == 1 and "a folder stands where the file should be" in problems[0].message
    with pytest.raises(IntegrityError, match=which):
        store.load(e) if which == TENSOR_FILE else store.entries(name="cat")


def test_cli_verify_exits_1_and_list_skips_the_damaged_version(capsys):
    from p2pz_directions.cli import main

    store = LocalStore()
    store.publish_many([concept("cat", 0), concept("dog", 1)])
    _damage_meta(store, "cat", DAMAGE["surrogate"])
    assert main(["verify"]) == 1
    cap = capsys.readouterr()
    assert "1 damaged" in cap.out and "cat" in cap.err
    with pytest.warns(UserWarning, match="skipped a damaged version"):
        assert main(["list", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["dog"]


# -- the writer refuses what the reader would refuse, before writing anything ------------------------
def test_writes_the_reader_would_refuse_are_refused_first():
    from p2pz_directions.core.format import MAX_CAPTIONS

    store = LocalStore()
    too_many = concept("cat", 0, captions=[f"c{i}" for i in range(MAX_CAPTIONS + 1)])
    with pytest.raises(FormatError, match="at most 100000"):
        store.publish(too_many)
    for d in (0, 10_000):
        enc = EncoderInfo("test/odd", d, "test")
        with pytest.raises(FormatError, match="hidden_size"):
            store.publish(Concept("cat", torch.zeros(77, d), enc))
    assert store.entries() == []
    assert not any((store.root / "packs").rglob("concept.json")) if (store.root / "packs").exists() else True
    ok = store.publish(concept("cat", 0, captions=[f"c{i}" for i in range(3)]))
    assert store.load(store.entries()[0]).captions == ok.captions


def test_a_version_number_is_never_reused_for_other_content():
    store = LocalStore()
    store.publish(concept("cat", 0))
    (e,) = store.entries()
    import shutil

    shutil.rmtree(e.path)  # the version is gone from the folder, not from the pack's history
    with pytest.raises(ImmutableVersionError, match="never reused"):
        store.publish(concept("cat", 5), version=1)
    assert store.publish(concept("cat", 5)).version == 2
    assert store.publish(concept("cat", 0), version=1).version == 1  # the same content may come back


def test_stale_temp_and_staging_files_of_dead_writers_are_removed_on_open():
    store = LocalStore()
    store.publish(concept("cat", 0), pack="mine")
    dead = 2**22 + 12345  # no such process
    pj = store.pack_dir("mine")
    (pj / f".pack.json.{dead}.{'a' * 32}.tmp").write_bytes(b"{")
    (store.root / "staging" / f"{dead}-x" / "old").mkdir(parents=True)
    (store.root / "tmp" / f"{dead}-y").mkdir(parents=True)
    (store.root / "txn" / f"{dead}-z" / "items").mkdir(parents=True)  # never committed
    live = pj / f".pack.json.{os.getpid()}.{'b' * 32}.tmp"
    live.write_bytes(b"{")  # a live writer's: kept
    fresh = LocalStore(store.root)
    assert [e.name for e in fresh.entries()] == ["cat"]
    assert not list(pj.glob(f".pack.json.{dead}.*"))
    assert live.exists()
    for d in ("staging", "tmp", "txn"):
        assert not (store.root / d).exists() or not any((store.root / d).iterdir())


def test_a_damaged_pack_json_or_history_is_reported_by_verify_and_listing_goes_on():
    store = LocalStore()
    store.publish(concept("cat", 0), pack="mine")
    d = store.pack_dir("mine")
    (d / "pack.json").write_text('{"name": "mine", "x": NaN}')
    (d / "versions.json").write_text("[" * 1000)
    assert [e.name for e in store.entries()] == ["cat"]
    n, problems = store.verify()
    assert n == 1 and sorted(p.path.name for p in problems) == ["pack.json", "versions.json"]
    assert all("corrupted" in p.message for p in problems)


def test_store_layout_is_the_hub_layout_and_old_folders_still_read(tmp_path):
    from p2pz_directions.packs.pack_schema import concept_dir

    store = LocalStore(tmp_path)
    hat = store.publish(concept("cat wearing a hat", 0), pack="mine")
    store.publish(concept("cat", 1), pack="mine")
    vd = store.pack_dir("mine") / concept_dir(ENC.id, "cat wearing a hat", 1)
    assert (vd / META_FILE).is_file() and vd.parent.name.startswith("cat_wearing_a_hat-")
    assert (store.pack_dir("mine") / concept_dir(ENC.id, "cat", 1) / TENSOR_FILE).is_file()
    # a store written before the one layout named the folder by the raw concept name
    legacy = vd.parent.with_name("cat wearing a hat")
    vd.parent.rename(legacy)
    assert [e.path for e in store.entries(name="cat wearing a hat")] == [legacy / "1"]
    assert store.verify() == (2, [])
    assert torch.equal(directions.load("cat wearing a hat->cat", store=store).source.embedding, hat.embedding)
    # and a concept never passes for another one's folder
    legacy.with_name("dog").mkdir()
    (legacy / "1").rename(legacy.with_name("dog") / "1")
    n, problems = store.verify()
    assert n == 2 and len(problems) == 1 and "lies in dog/1" in problems[0].message
